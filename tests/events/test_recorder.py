"""The CLOSE_WAIT recorder on the real kernel: real loopback sockets, real child processes.

Each exact check runs against a child (``netns_worker.py``) in a network namespace of its own, with
a recorder that records only that namespace: its counters are this test's alone, however many
other tests run on the machine. Delays are known to the child, which brackets every shutdown()
and close() with CLOCK_MONOTONIC readings, so each dwell's bucket is known before the kernel's
histogram is read.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from closewait.events import BUCKET_BOUNDS_NS, N_BUCKETS, Histogram, LeaveReason, Transition, bucket_index
from closewait.model import TcpState
from closewait.sources import bpf_asm, netlink, netns
from closewait.sources.recorder import (
    PROBES,
    Recorder,
    RecorderUnavailable,
    cgroup_id,
    mount_bpffs,
    socket_cookie,
    unpin,
)
from tests.conftest import Nobody
from tests.util import wait_for

WORKER = Path(__file__).with_name("netns_worker.py")
TEST_CAPACITY = 1 << 16


def _recorder_reason() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip"
    try:
        Recorder.open(capacity=64).close()
    except RecorderUnavailable as err:
        return str(err)
    return None


_REASON = _recorder_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"recorder unavailable: {_REASON}")


@dataclass
class Worker:
    proc: subprocess.Popen[str]
    pid: int
    netns: str

    def call(self, op: str, **arguments: Any) -> Any:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"worker {self.pid} died"
        return json.loads(line)

    def end(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def start_worker(argv_prefix: list[str]) -> Worker:
    proc = subprocess.Popen(
        [*argv_prefix, sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    hello = json.loads(proc.stdout.readline())
    return Worker(proc, hello["pid"], f"/proc/{hello['pid']}/ns/net")


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    """A worker alone in a fresh network namespace, loopback up."""
    started = start_worker(["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$0" "$@"'])
    yield started
    started.end()


@pytest.fixture(scope="module")
def recorder(worker: Worker) -> Iterator[Recorder]:
    with Recorder.open(netns=worker.netns, capacity=TEST_CAPACITY, feed=True) as opened:
        yield opened


def _histogram(recorder: Recorder, tgid: int, reason: LeaveReason = LeaveReason.CLOSED) -> Histogram:
    key = (0, 0) if reason == LeaveReason.RESET else (cgroup_id(tgid) or 0, tgid)
    return recorder.histograms(reason).get(key) or Histogram.empty()


def test_listing_shows_the_program(recorder: Recorder) -> None:
    text = recorder.listing()
    for expected in (
        "call get_socket_cookie",
        "map[entries]",
        "call get_current_pid_tgid",
        "lock *(u64 *)",
        "r0 = atomic64_cmpxchg((u64 *)(r3 +0), r0, r2)",
        "r1 = atomic64_xchg((u64 *)(r0 +0), r1)",
    ):
        assert expected in text
    assert "net->net_cookie" in text  # this recorder records one namespace


def test_entry_times_are_keyed_by_sock_diag_cookies_and_match_the_client_close(
    worker: Worker, recorder: Recorder
) -> None:
    pairs = worker.call("pairs", n=20)
    with netns.entered(netns.resolve(worker.netns)):
        dumped = {sock.cookie for sock in netlink.dump({TcpState.CLOSE_WAIT}) if sock.cookie is not None}
    cookies = {pair["cookie"] for pair in pairs}
    assert dumped == cookies  # SO_COOKIE and sock_diag agree, and nothing else is in this namespace
    times = recorder.entry_times(dumped)
    assert set(times) == cookies
    checked = 0
    for pair in pairs:
        entered = times[pair["cookie"]]
        # Same clock: the FIN arrived during the client's shutdown() (loopback delivers it inline).
        assert pair["c0"] <= entered <= pair["fin"]
        if pair["c1"] - pair["c0"] <= 10_000_000:  # unless the client was preempted around shutdown()
            assert abs(entered - pair["c1"]) <= 10_000_000
            checked += 1
    assert checked >= len(pairs) // 2
    worker.call("close", ids=[pair["id"] for pair in pairs])
    assert recorder.entry_times(cookies) == {}


def _delays() -> list[float]:
    """2,000 connections: one stuck 3 s, a few 1 s and 200 ms, most closed at once or after 50 ms.
    The long ones first, so the run lasts about 3 s."""
    head = [3.0] + [1.0] * 9 + [0.2] * 40
    rest = [0.0, 0.0, 0.0, 0.05] * 487 + [0.0, 0.0]
    return head + rest


def test_histogram_buckets_and_counters_are_exact(worker: Worker, recorder: Recorder) -> None:
    """Each bucket's count is checked exactly twice over: against the child's own clock readings
    (which fix the bucket of all but the few closes preempted across a bound), and against the
    kernel's per-socket dwell from the feed, itself checked to lie within the child's bracket."""
    delays = _delays()
    assert len(delays) == 2000
    feed = recorder.feed()
    feed.read()  # what earlier tests left
    counters_before = recorder.counters()
    histogram_before = _histogram(recorder, worker.pid)
    brackets = worker.call("stress", delays=delays)
    changed = recorder.counters() - counters_before
    histogram = _histogram(recorder, worker.pid) - histogram_before
    leaves = {t.cookie: t for t in feed.read() if not t.entered}

    assert changed.entered == len(delays)
    assert changed.left_closed == len(delays)
    assert (changed.left_exited, changed.left_reset, changed.left_untracked) == (0, 0, 0)
    assert changed.histogram_dropped == 0
    assert changed.entries_dropped == 0
    assert recorder.feed_lost() == 0

    # The kernel's own dwell of every socket, each within what the child measured.
    by_kernel = [0] * N_BUCKETS
    for (low, high, cookie), delay in zip(brackets, delays, strict=True):
        assert low >= delay * 1e9  # the child closed no earlier than asked
        leave = leaves[cookie]
        assert leave.reason == LeaveReason.CLOSED
        assert leave.tgid == worker.pid
        assert leave.dwell_ns is not None
        assert low <= leave.dwell_ns <= high
        by_kernel[bucket_index(leave.dwell_ns)] += 1
    assert list(histogram.counts) == by_kernel
    assert histogram.sum_seconds == pytest.approx(sum(leaves[c].dwell_ns or 0 for *_, c in brackets) / 1e9, abs=1e-6)

    # The child's clocks alone: exact where they fix the bucket, bounded for the closes preempted
    # across a bucket bound (0-6 of 2,000 here with the machine shared by other test suites).
    known = [0] * N_BUCKETS
    straddling: list[tuple[int, int]] = []
    for low, high, _cookie in brackets:
        if bucket_index(low) == bucket_index(high):
            known[bucket_index(low)] += 1
        else:
            straddling.append((bucket_index(low), bucket_index(high)))
    assert len(straddling) <= len(delays) // 10, straddling
    for index in range(N_BUCKETS):
        spread = sum(lo <= index <= hi for lo, hi in straddling)
        assert known[index] <= histogram.counts[index] <= known[index] + spread
    assert histogram.counts[bucket_index(3_000_000_000)] >= 10  # the 1 s and 3 s ones, in (1, 5] s


def test_a_socket_stuck_3s_between_two_scrapes_is_counted(worker: Worker, recorder: Recorder) -> None:
    (pair,) = worker.call("pairs", n=1)
    first = _histogram(recorder, worker.pid)
    counters = recorder.counters()
    time.sleep(3)
    (closed,) = worker.call("close", ids=[pair["id"]])
    second = _histogram(recorder, worker.pid)
    added = second - first
    assert added.count == 1
    assert added.counts[bucket_index(3_000_000_000)] == 1
    assert pair["c0"] / 1e9 + added.sum_seconds <= closed["s1"] / 1e9 + 1e-6
    assert (recorder.counters() - counters).left_closed == 1


def test_leaving_without_close_is_counted_apart(worker: Worker, recorder: Recorder) -> None:
    before = recorder.counters()
    reset_before = _histogram(recorder, 0, LeaveReason.RESET)
    closed_before = _histogram(recorder, worker.pid)

    # The peer resets: CLOSE_WAIT -> CLOSE in softirq, no owner.
    reset_pairs = worker.call("pairs", n=2)
    worker.call("rst", ids=[pair["id"] for pair in reset_pairs])
    # The owner closes with unread data: the kernel resets, but it is the owner's close().
    (unread,) = worker.call("pairs", n=1, unread=True)
    worker.call("close", ids=[unread["id"]])
    # SOCK_DESTROY (ss -K, closewait reap): aborted by another process.
    (destroyed,) = worker.call("pairs", n=1)
    with netns.entered(netns.resolve(worker.netns)):
        (victim,) = [s for s in netlink.dump({TcpState.CLOSE_WAIT}) if s.cookie == destroyed["cookie"]]
        nl = netlink.open_socket()
    with nl:
        netlink.destroy(victim, nl=nl)

    # The owner exits holding three: the kernel closes them in the exiting task.
    exiting = start_worker(["nsenter", f"--net={worker.netns}"])
    try:
        exiting.call("pairs", n=3)
        exiting_cgroup = cgroup_id(exiting.pid)
        os.kill(exiting.pid, signal.SIGKILL)
        exiting.proc.wait(timeout=10)
    finally:
        exiting.end()

    def changed() -> Any:
        return recorder.counters() - before

    wait_for(lambda: changed().left == 7)
    counted = changed()
    assert counted.entered == 7
    assert (counted.left_closed, counted.left_exited, counted.left_reset) == (1, 3, 3)
    assert counted.left_untracked == 0
    assert (_histogram(recorder, 0, LeaveReason.RESET) - reset_before).count == 3
    assert (_histogram(recorder, worker.pid) - closed_before).count == 1
    exited = recorder.histograms(LeaveReason.EXITED)
    assert exited[(exiting_cgroup or 0, exiting.pid)].count == 3
    worker.call("close", ids=[pair["id"] for pair in (*reset_pairs, destroyed)])


def test_a_full_entries_map_keeps_the_oldest_and_counts_the_rest(worker: Worker) -> None:
    """Past ``capacity`` sockets in CLOSE_WAIT at once, new entries are counted, not recorded, and
    nothing already recorded (the oldest: the leaks) is evicted."""
    with Recorder.open(netns=worker.netns, capacity=4) as small:
        before = small.counters()
        pairs = worker.call("pairs", n=6)
        held = small.entry_times(pair["cookie"] for pair in pairs)
        assert sorted(held) == sorted(pair["cookie"] for pair in pairs[:4])
        worker.call("close", ids=[pair["id"] for pair in pairs])
        changed = small.counters() - before
    assert (changed.entered, changed.entries_dropped) == (6, 2)
    assert (changed.left_closed, changed.left_untracked) == (4, 2)


def _slots_by_syscall(recorder: Recorder) -> dict[int, tuple[int, int]]:
    """slot -> (cookie, entry time) of every used slot, read through bpf(BPF_MAP_LOOKUP_ELEM): the
    kernel's own view of the table, against which the mmap reader is checked."""
    table = bpf_asm.MapAccess(recorder._bpf, recorder._fds["entries"], 4, 16)
    used = {}
    for slot in range(recorder.capacity):
        value = table.lookup(slot.to_bytes(4, "little"))
        assert value is not None
        cookie, entered = struct.unpack("<QQ", value)
        if cookie:
            used[slot] = (cookie, entered)
    return used


def _check_entered(recorder: Recorder, fins: list[dict[str, int]], cookies: dict[int, int]) -> None:
    """Each socket's entry time (mmap reader) lies in the bracket of its peer's FIN."""
    times = recorder.entry_times(cookies[fin["id"]] for fin in fins)
    for fin in fins:
        assert fin["c0"] <= times[cookies[fin["id"]]] <= fin["fin"]


def test_cookies_sharing_a_slot_are_probed_past_and_a_freed_slot_is_reused(worker: Worker) -> None:
    """Three sockets whose cookies are equal modulo the table's size take their home slot and the
    two after it, each with its own exact time; freeing the home slot hides neither of the others
    (from the reader or the program), and the next colliding socket takes the freed slot."""
    with Recorder.open(netns=worker.netns, capacity=16) as small:
        assert small.capacity == 16
        opened = worker.call("open", n=4, modulus=16, residue=5)
        cookies = {pair["id"]: pair["cookie"] for pair in opened}
        first, second, third, fourth = (pair["id"] for pair in opened)
        before = small.counters()
        fins = worker.call("fin", ids=[first, second, third])
        _check_entered(small, fins, cookies)
        assert {slot: cookie for slot, (cookie, _) in _slots_by_syscall(small).items()} == {
            5: cookies[first],
            6: cookies[second],
            7: cookies[third],
        }
        worker.call("close", ids=[first])
        assert small.entry_times([cookies[first]]) == {}
        _check_entered(small, fins[1:], cookies)  # past the free home slot
        (fin,) = worker.call("fin", ids=[fourth])
        _check_entered(small, [fin], cookies)
        assert _slots_by_syscall(small)[5][0] == cookies[fourth]  # the freed slot, reused
        worker.call("close", ids=[second, third, fourth])
        changed = small.counters() - before
        assert small.all_entry_times() == {}
    assert (changed.entered, changed.left_closed, changed.left_untracked, changed.entries_dropped) == (4, 4, 0, 0)


def test_a_full_window_drops_the_entry_and_counts_it(worker: Worker) -> None:
    """A table of 64 slots looks at most 32 slots (PROBES) from a cookie's home: the 33rd socket
    whose cookie has the same home finds its window full and is counted in ``entries_dropped``,
    though half the table is free; the 32 kept keep their exact times, and leave tracked."""
    assert PROBES == 32
    with Recorder.open(netns=worker.netns, capacity=64) as small:
        opened = worker.call("open", n=PROBES + 1, modulus=64, residue=40)
        cookies = {pair["id"]: pair["cookie"] for pair in opened}
        before = small.counters()
        fins = worker.call("fin", ids=[pair["id"] for pair in opened])
        _check_entered(small, fins[:PROBES], cookies)
        last = cookies[opened[-1]["id"]]
        assert small.entry_times([last]) == {}
        assert set(_slots_by_syscall(small)) == {(40 + i) % 64 for i in range(PROBES)}  # wraps past 63
        worker.call("close", ids=list(cookies))
        changed = small.counters() - before
    assert (changed.entered, changed.entries_dropped) == (PROBES + 1, 1)
    assert (changed.left_closed, changed.left_untracked) == (PROBES, 1)


def test_the_mmap_reader_agrees_with_the_kernel(worker: Worker) -> None:
    """The same table three ways: the mmap reader, bpf(2) lookups, and the program itself (its
    feed reports the time it wrote on entry, and on leaving the dwell from the time it found)."""
    with Recorder.open(netns=worker.netns, capacity=16, feed=True) as small:
        feed = small.feed()
        # Eight that share a home slot, then more than the table holds: most away from home, some dropped.
        opened = worker.call("open", n=8, modulus=16, residue=3) + worker.call("open", n=32)
        cookies = [pair["cookie"] for pair in opened]
        worker.call("fin", ids=[pair["id"] for pair in opened])
        slots = _slots_by_syscall(small)
        assert len(slots) == 16
        assert any(slot != cookie % 16 for slot, (cookie, _) in slots.items())
        by_syscall = dict(slots.values())
        by_mmap = small.entry_times(cookies)
        assert by_mmap == by_syscall == small.all_entry_times()
        small.reads_by_mmap = False  # how a weakly ordered CPU (arm64) reads a slot: bpf(2)
        assert small.entry_times(cookies) == by_mmap == small.all_entry_times()
        small.reads_by_mmap = True
        assert set(by_mmap) <= set(cookies)
        entered = {t.cookie: t.time_ns for t in feed.read(1.0) if t.entered}  # dropped ones too
        assert set(entered) == set(cookies)
        assert {cookie: entered[cookie] for cookie in by_mmap} == by_mmap
        dropped = len(cookies) - len(by_mmap)
        assert small.counters().entries_dropped == dropped
        worker.call("close", ids=[pair["id"] for pair in opened])
        seen: list[Transition] = []
        wait_for(lambda: seen.extend(feed.read(0.1)) or len([t for t in seen if not t.entered]) >= len(by_mmap))
    for leave in seen:
        assert leave.dwell_ns == leave.time_ns - by_mmap[leave.cookie]


def _diag_counts(worker: Worker) -> dict[TcpState, int]:
    with netns.entered(netns.resolve(worker.netns)):
        return netlink.count_by_state()


def test_threads_sharing_a_map_reader_each_get_their_own_key_s_value() -> None:
    """Two threads read one MapAccess (as the exporter's resync thread and a scrape read the
    recorder's counters): each lookup returns its own key's value whole, never the other's. The
    bpf(2) call releases the GIL, so without the reader's lock they share its key and value buffers
    mid-call. A 16 KiB value makes the kernel's copy long enough to race on."""
    size = 16384
    bpf = bpf_asm._Bpf()
    try:
        fd = bpf_asm.create_map(bpf, "cw_test_race", bpf_asm.MAP_TYPE_ARRAY, 4, size, 2)
        shared = bpf_asm.MapAccess(bpf, fd, 4, size)
        bpf_asm.MapAccess(bpf, fd, 4, size).update((1).to_bytes(4, "little"), b"\xff" * size)
        wrong: list[tuple[int, int]] = []

        def read(index: int) -> None:
            key, expected = index.to_bytes(4, "little"), bytes([0xFF * index]) * size
            for _ in range(3000):
                value = shared.lookup(key)
                if value != expected:
                    wrong.append((index, value.count(b"\xff") if value else -1))

        threads = [threading.Thread(target=read, args=(index,)) for index in (0, 1, 0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        bpf.close()
    assert wrong == []


def test_state_counts_follow_sock_diag_without_a_dump(worker: Worker, recorder: Recorder) -> None:
    from closewait.events import TRACKED_STATES

    def settled() -> bool:
        # Read twice around the dump: delayed ACKs (FIN_WAIT1 -> FIN_WAIT2) may still be in flight.
        counts = recorder.state_counts(resync_every=float("inf"))
        expected = _diag_counts(worker)
        again = recorder.state_counts(resync_every=float("inf"))
        return counts == again and all(counts[s] == expected[s] for s in TRACKED_STATES)

    wait_for(recorder.resync)  # True once nothing raced the dump (nothing else moves in this namespace)
    pairs = worker.call("pairs", n=30)
    wait_for(settled)
    assert recorder.state_counts(resync_every=float("inf"))[TcpState.CLOSE_WAIT] == 30
    worker.call("close", ids=[pair["id"] for pair in pairs])
    worker.call("stress", delays=[0.0] * 300)
    wait_for(settled)


@pytest.fixture
def bpffs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "bpffs"
    assert mount_bpffs(str(mount))
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_pinned_recorder_is_read_by_another_process(bpffs: Path) -> None:
    pin_dir = str(bpffs / "closewait")
    first = Recorder.attach_or_open_pinned(pin_dir, capacity=TEST_CAPACITY)
    try:
        assert first.pinned
        second = Recorder.attach_or_open_pinned(pin_dir)
        with second:
            assert second.capacity == TEST_CAPACITY  # the same maps, opened, not a new recorder
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            with socket.create_connection(listener.getsockname()) as client:
                server, _ = listener.accept()
                with server:
                    client.shutdown(socket.SHUT_WR)
                    assert server.recv(1) == b""
                    cookie = socket_cookie(server)
                    entered = first.entry_times([cookie])[cookie]
                    first.close()  # the pins keep it attached
                    code = (
                        "import sys; from closewait.sources.recorder import Recorder\n"
                        f"r = Recorder.open_pinned({pin_dir!r}); print(r.entry_times([{cookie}])[{cookie}])"
                    )
                    result = subprocess.run(
                        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
                    )
                    assert int(result.stdout) == entered
    finally:
        first.close()
        assert unpin(pin_dir)
    with pytest.raises(RecorderUnavailable, match="no recorder is pinned"):
        Recorder.open_pinned(pin_dir)


def test_pinning_outside_a_bpffs_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(RecorderUnavailable, match="not on a bpffs"):
        Recorder.attach_or_open_pinned(str(tmp_path / "closewait"))
    assert not (tmp_path / "closewait").exists()


def test_not_root_gets_one_reason(nobody: Nobody) -> None:
    code = (
        "from closewait.sources.recorder import Recorder, RecorderUnavailable\n"
        "try:\n    Recorder.open()\nexcept RecorderUnavailable as err:\n    print('unavailable:', err)\n"
    )
    result = subprocess.run(
        [*nobody.argv, "-c", code], env=nobody.env, capture_output=True, text=True, timeout=60, cwd="/", check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("unavailable: ")
    assert "permission denied" in lines[0]


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_without_btf_the_reason_is_given_and_nothing_is_left_open() -> None:
    before = _open_fds()
    with pytest.raises(RecorderUnavailable, match="does not exist"):
        Recorder.open(btf_path="/nonexistent/vmlinux")
    assert _open_fds() <= before


def test_a_program_that_does_not_see_the_marker_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from closewait.sources import recorder as module

    real = module.assemble

    def blind(
        layout: Any, entries: int, hist: int, counters: int, _netns: int | None, feed: int | None, **options: Any
    ) -> Any:
        return real(layout, entries, hist, counters, 1, feed, **options)  # records only a netns that does not exist

    monkeypatch.setattr(module, "assemble", blind)
    before = _open_fds()
    with pytest.raises(RecorderUnavailable, match="did not see a socket enter CLOSE_WAIT"):
        Recorder.open(capacity=64)
    assert _open_fds() <= before  # detached: every descriptor closed


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_the_feed_reports_each_edge_with_endpoints_and_the_closer(family: socket.AddressFamily) -> None:
    loopback = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with Recorder.open(feed=True, capacity=4096) as recorder, socket.socket(family) as listener:
        feed = recorder.feed()
        listener.bind((loopback, 0))
        listener.listen()
        pairs = []
        for _ in range(2):
            client = socket.create_connection(listener.getsockname()[:2])
            server, _ = listener.accept()
            client.shutdown(socket.SHUT_WR)
            assert server.recv(1) == b""
            pairs.append((client, server, socket_cookie(server)))
        (closer_client, closer, closed_cookie), (reset_client, reset_server, reset_cookie) = pairs
        local, remote = closer.getsockname()[:2], closer.getpeername()[:2]
        closer.close()
        reset_client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset_client.close()
        wait_for(lambda: reset_server.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TcpState.CLOSE)
        seen: list[Transition] = []
        wait_for(lambda: seen.extend(feed.read(0.1)) or len([t for t in seen if t.cookie == reset_cookie]) == 2)
        closer_client.close()
        reset_server.close()
    mine = {cookie: [t for t in seen if t.cookie == cookie] for cookie in (closed_cookie, reset_cookie)}
    entered, left = mine[closed_cookie]
    assert entered.entered
    assert (entered.old_state, entered.new_state) == (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT)
    assert (entered.local.address, entered.local.port) == local
    assert (entered.remote.address, entered.remote.port) == remote
    assert entered.tgid is None
    assert (left.reason, left.new_state, left.tgid) == (LeaveReason.CLOSED, TcpState.LAST_ACK, os.getpid())
    assert left.comm is not None
    assert left.comm
    assert left.dwell_ns == left.time_ns - entered.time_ns
    _, reset = mine[reset_cookie]
    assert (reset.reason, reset.new_state, reset.tgid, reset.comm) == (LeaveReason.RESET, TcpState.CLOSE, None, None)


def test_bucket_bounds_are_what_the_kernel_compares() -> None:
    assert BUCKET_BOUNDS_NS[0] == 1_000_000
    assert BUCKET_BOUNDS_NS[-1] == 3600 * 10**9
