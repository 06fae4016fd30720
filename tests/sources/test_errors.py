"""``errors.from_os_error``: every errno the sources can meet maps to a documented error whose exit
code docs/cli.md documents; then the same mapping met for real, on this kernel."""

from __future__ import annotations

import errno
import os
import re
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from closewait import errors
from closewait.errors import (
    AccessDenied,
    ClosewaitError,
    KernelDataError,
    NetnsError,
    NoSuchProcess,
    NotSupported,
    UsageError,
    from_os_error,
)
from closewait.sources import netns, pidfd, process

ROOT = Path(__file__).resolve().parents[2]

PID: dict[str, object] = {"pid": 4242}
PATH: dict[str, object] = {"path": "/given/by/the/user"}
NETNS_PATH: dict[str, object] = {"path": "/run/netns/x", "path_error": NetnsError}

#: (errno, keyword arguments of the call site, the class it must become)
TABLE: list[tuple[int, dict[str, object], type[ClosewaitError]]] = [
    # refusals: a missing privilege, an LSM, the ptrace access check
    (errno.EPERM, {}, AccessDenied),
    (errno.EACCES, {}, AccessDenied),
    (errno.EPERM, PID, AccessDenied),
    (errno.EACCES, PATH, AccessDenied),
    # a process that is gone
    (errno.ESRCH, PID, NoSuchProcess),
    (errno.ENOENT, PID, NoSuchProcess),
    # a kernel without the call, option, protocol or family (no pidfd_getfd, no sock_diag, no AF_NETLINK)
    (errno.ENOSYS, {}, NotSupported),
    (errno.EOPNOTSUPP, {}, NotSupported),
    (errno.EPROTONOSUPPORT, {}, NotSupported),
    (errno.EAFNOSUPPORT, {}, NotSupported),
    (errno.ENOSYS, PID, NotSupported),
    # a missing file the kernel should provide (/proc/net/tcp, /sys/kernel/btf/vmlinux)
    (errno.ENOENT, {}, NotSupported),
    # a path the user gave that names nothing usable
    (errno.ENOENT, PATH, UsageError),
    (errno.ENOTDIR, PATH, UsageError),
    (errno.ELOOP, PATH, UsageError),
    (errno.ENAMETOOLONG, PATH, UsageError),
    (errno.EINVAL, PATH, UsageError),
    (errno.ENOENT, NETNS_PATH, NetnsError),
    (errno.ENOTDIR, NETNS_PATH, NetnsError),
    (errno.ELOOP, NETNS_PATH, NetnsError),
    (errno.ENAMETOOLONG, NETNS_PATH, NetnsError),
    (errno.EINVAL, NETNS_PATH, NetnsError),
    # a limit reached
    (errno.EMFILE, {}, ClosewaitError),
    (errno.ENFILE, {}, ClosewaitError),
    (errno.ENOMEM, PID, ClosewaitError),
    # the rest: the kernel's own words
    (errno.EBADF, {}, KernelDataError),
    (errno.EINVAL, {}, KernelDataError),
    (errno.EIO, PID, KernelDataError),
    (errno.ENOTCONN, {}, KernelDataError),
    (errno.ESTALE, {}, KernelDataError),
    (errno.EBUSY, {}, KernelDataError),
    (errno.EAGAIN, {}, KernelDataError),
    (errno.EINTR, {}, KernelDataError),
    (errno.ENOTSOCK, {}, KernelDataError),
    (errno.ENOBUFS, {}, KernelDataError),
    (errno.ESRCH, {}, KernelDataError),
    (errno.ENOTDIR, {}, KernelDataError),
]


def _documented_classes() -> set[str]:
    """The class names drawn in the tree of errors.py's docstring."""
    assert errors.__doc__ is not None
    return set(re.findall(r"^\s*(?:[├└]── )?([A-Z]\w+)\s", errors.__doc__, re.MULTILINE))


def _documented_exit_codes() -> set[int]:
    """The codes of the exit-code table of docs/cli.md."""
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    section = text.split("## Exit codes", 1)[1]
    return {int(code) for code in re.findall(r"^\| (\d+) \|", section, re.MULTILINE)}


def _errno_id(value: object) -> str | None:
    return errno.errorcode.get(value) if isinstance(value, int) else None


@pytest.mark.parametrize(("code", "where", "expected"), TABLE, ids=_errno_id)
@pytest.mark.parametrize("euid", [0, 1000])
def test_every_errno_maps_to_a_documented_error_and_exit_code(
    monkeypatch: pytest.MonkeyPatch, code: int, where: dict[str, object], expected: type[ClosewaitError], euid: int
) -> None:
    monkeypatch.setattr(errors._os, "geteuid", lambda: euid)
    err = from_os_error(OSError(code, os.strerror(code)), "reading /proc/4242/fd", **where)  # type: ignore[arg-type]
    assert type(err) is expected
    assert type(err).__name__ in _documented_classes()
    assert err.exit_code in _documented_exit_codes()
    message = str(err)
    assert message
    assert "\n" not in message
    if isinstance(err, AccessDenied):
        assert ("refused even to root" in message) == (euid == 0)
        assert ("run as root" in message) == (euid != 0)
    elif isinstance(err, NoSuchProcess):
        assert err.pid == 4242
    elif code in errors.EXHAUSTED_ERRNOS:
        assert "ran out" in message
    elif expected is KernelDataError:
        assert os.strerror(code) in message


def test_the_privilege_needed_is_named_and_root_is_never_told_to_run_as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    refused = OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(errors._os, "geteuid", lambda: 1000)
    assert str(from_os_error(refused, "creating a BPF map", needs="CAP_BPF")) == (
        "creating a BPF map: permission denied (needs CAP_BPF)"
    )
    monkeypatch.setattr(errors._os, "geteuid", lambda: 0)
    assert str(from_os_error(refused, "creating a BPF map", needs="CAP_BPF")) == (
        "creating a BPF map: permission denied (needs CAP_BPF), refused even to root"
    )


# --- the real kernel ---------------------------------------------------------------------------------------


def _gone_pid() -> int:
    """A pid that existed a moment ago and is reaped now (not reused this soon in practice)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


@pytest.mark.parametrize(
    "call",
    [
        process.read_stat,
        process.read_comm,
        process.read_cmdline,
        process.read_tgid,
        process.read_process,
        process.read_uid,
        process.socket_fds,
        lambda pid: process.validate_pids([pid]),
        lambda pid: process.ns_inode(pid, "net"),
        pidfd.open_pidfd,
    ],
)
def test_a_pid_that_does_not_exist_is_no_such_process(call: Callable[[int], object]) -> None:
    pid = _gone_pid()
    with pytest.raises(NoSuchProcess) as raised:
        call(pid)
    assert raised.value.pid == pid
    assert str(raised.value) == f"no process with pid {pid}"


def test_a_thread_id_resolves_to_its_process() -> None:
    import threading

    ids: list[int] = []
    done = threading.Event()

    def run() -> None:
        ids.append(threading.get_native_id())
        done.wait(10)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        while not ids:
            thread.join(0.01)
        assert ids[0] != os.getpid()
        assert process.read_tgid(ids[0]) == os.getpid()
    finally:
        done.set()
        thread.join()
    assert process.read_tgid(os.getpid()) == os.getpid()
    assert process.read_stat(os.getpid()).ppid == os.getppid()
    assert process.read_comm(os.getpid()) == process.read_stat(os.getpid()).comm


def test_netns_paths_that_name_nothing_are_one_line_netns_errors(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    a_file = tmp_path / "file"
    a_file.write_text("")
    cases = {
        str(loop): "Too many levels of symbolic links",
        f"{a_file}/net": "Not a directory",
        "/" + "n" * 5000: "File name too long",
        str(a_file): "is not a network namespace",
        str(tmp_path / "nosuch"): "no such network namespace",
    }
    for spec, words in cases.items():
        with pytest.raises(NetnsError) as raised:
            netns.resolve(spec)
        assert words in str(raised.value), spec
        assert "\n" not in str(raised.value)
        assert raised.value.exit_code in _documented_exit_codes()


def _in_child(body: Callable[[], str]) -> str:
    """Run ``body`` in a forked child (it may drop privileges or limits) and return what it returned."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_end)
            try:
                answer = body()
            except BaseException as err:
                answer = f"{type(err).__name__}: {err}"
            os.write(write_end, answer.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        answer = reader.read().decode()
    os.waitpid(pid, 0)
    return answer


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to nobody needs root")
def test_nobody_reading_another_process_s_descriptors_is_access_denied() -> None:
    target = os.getpid()

    def as_nobody() -> str:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        try:
            process.socket_fds(target)
        except ClosewaitError as err:
            return f"{type(err).__name__}: {err}"
        return "read them"

    assert _in_child(as_nobody) == (
        f"AccessDenied: cannot read the descriptors of pid {target}: permission denied, run as root"
    )


def test_running_out_of_descriptors_says_so() -> None:
    def without_descriptors() -> str:
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        held = []
        try:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        try:
            process.socket_fds(os.getpid())
        except ClosewaitError as err:
            return f"{type(err).__name__}: {err}"
        return "no error"

    answer = _in_child(without_descriptors)
    assert answer.startswith("ClosewaitError: cannot read the descriptors of pid ")
    assert answer.endswith("this process's open-file limit (ulimit -n) ran out")


def test_reading_a_child_killed_mid_way_is_no_such_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process.read_stat(child.pid).ppid == os.getpid()
        assert child.pid in process.child_pids(os.getpid())
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    with pytest.raises(NoSuchProcess):
        process.read_stat(child.pid)
    assert child.pid not in process.child_pids(os.getpid())
