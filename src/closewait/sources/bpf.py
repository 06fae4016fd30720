"""Who holds which sockets, from one pass of the kernel over every fd table: a BPF iterator.

The /proc walk (``owners.py``) costs one ``readlinkat`` per open descriptor on the host, about
6 microseconds of kernel time each on a small VM: 1.2 s for a host with 210,000 descriptors,
however few sockets are wanted. The kernel can do the same walk itself. A BPF program of type
``iter/task_file`` is called once for every (process, fd, file) on the host, inside one
``read()``; this one keeps the files that are sockets whose inode is in a hash map of the wanted
inodes, and writes ``(inode, pid, fd, start time)`` for each. The same 210,000 descriptors take ~80 ms.

Everything here is the standard library: the program is 33 instructions assembled below, the
``bpf()`` syscall is reached through ``_libc`` (ctypes), and the struct offsets the program needs
(``file.f_inode``, ``inode.i_mode``/``i_ino``, ``task_struct.tgid``/``group_leader``/``start_boottime``)
and the id of the iterator's attach point come from the kernel's own type information,
``/sys/kernel/btf/vmlinux``.

The start time is the process's (its thread group leader's ``start_boottime``, the number
/proc/PID/stat's field 22 shows in clock ticks): the caller tells a pid reused since the pass from
the process the kernel saw with one read of /proc/PID/stat per process, not a readlink per fd.

It is used only when it can be trusted, and says why not otherwise (``BpfUnavailable``):

- it needs ``CAP_BPF`` and ``CAP_PERFMON`` (or ``CAP_SYS_ADMIN``), a kernel with BTF and BPF
  iterators (5.8+), and a 64-bit little-endian machine whose ``bpf()`` syscall number is known;
- the kernel's verifier checks every load against the types, so a wrong offset is refused at load
  time, never read;
- a marker socket this process holds is looked up along with the wanted inodes, and must come back
  with this process's pid, its fd and its start time as /proc/self/stat shows it. That proves the
  offsets, the pid numbering and the clock: in a child pid namespace the kernel's pids are not ours
  (in a time namespace, its boot time is not ours), the marker comes back wrong, and the caller
  falls back to the /proc walk.

Threads that share their process's fd table are skipped by the kernel, so each (pid, fd) comes
once, with the pid being the process id (tgid), as in /proc/PID/fd.
"""

from __future__ import annotations

import array
import contextlib
import os
import platform
import socket
import struct
import sys
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from closewait.errors import KernelDataError, NotSupported, from_os_error

BTF_PATH = "/sys/kernel/btf/vmlinux"

#: bpf(2) syscall numbers of the 64-bit little-endian machines this supports.
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "loongarch64": 280, "ppc64le": 361}

# bpf(2) commands, types and ids from <linux/bpf.h> (uapi: they never change).
_BPF_MAP_CREATE = 0
_BPF_PROG_LOAD = 5
_BPF_MAP_UPDATE_BATCH = 26
_BPF_LINK_CREATE = 28
_BPF_ITER_CREATE = 33
_BPF_MAP_TYPE_HASH = 1
_BPF_PROG_TYPE_TRACING = 26
_BPF_TRACE_ITER = 28
_BPF_FUNC_MAP_LOOKUP_ELEM = 1
_BPF_FUNC_SEQ_WRITE = 127
_BPF_PSEUDO_MAP_FD = 1

#: The attach point: the kernel's iterator over (task, fd, file).
ITER_FUNC = "bpf_iter_task_file"

# BTF kinds (<linux/btf.h>), and how many 32-bit words follow each type's 3-word header.
_BTF_MAGIC = 0xEB9F
_KIND_STRUCT = 4
_KIND_FUNC = 12
_FIXED_WORDS = [3] * 32  # header only
_PER_MEMBER_WORDS = [0] * 32
for _kind, _extra in {1: 1, 3: 3, 14: 1, 17: 1}.items():  # INT, ARRAY, VAR, DECL_TAG
    _FIXED_WORDS[_kind] = 3 + _extra
for _kind, _per in {4: 3, 5: 3, 6: 2, 13: 2, 15: 3, 19: 3}.items():  # STRUCT UNION ENUM PROTO DATASEC ENUM64
    _PER_MEMBER_WORDS[_kind] = _per
_KNOWN_KINDS = frozenset(range(1, 20))

_RECORD = struct.Struct("<QIIQ")  # what the program writes: inode, pid, fd, start_boottime (ns)
#: What it writes with ``refs``: the same, and the file's reference count (``Layout.file_f_ref``).
_REFS_RECORD = struct.Struct("<QIIQQ")
_S_IFMT = 0o170000
_S_IFSOCK = 0o140000


class BpfUnavailable(NotSupported):
    """The BPF iterator cannot be used here; ``str(err)`` says why (the /proc walk still works)."""


@dataclass(frozen=True)
class Layout:
    """What the program needs from this kernel's types: byte offsets, and the attach point's id."""

    iter_func_id: int
    file_f_inode: int
    inode_i_mode: int
    inode_i_ino: int
    task_tgid: int
    task_group_leader: int
    task_start_boottime: int
    #: ``file.f_ref`` (Linux 6.13+, one less than the file's references) or ``file.f_count`` (the
    #: references); -1 when neither is there (then ``holders_in_processes`` is unavailable).
    file_f_ref: int = -1
    #: What to add to the value read there to get the number of references.
    file_ref_bias: int = 0


def btf_sections(data: bytes) -> tuple[array.array[int], bytes]:
    """The type section of raw BTF as 32-bit words (host order) and its string section.

    Raises KernelDataError when the data is not BTF or its header points outside it. The one reader
    of the BTF header, for the owner iterator's ``parse_btf`` and the recorder's ``bpf_asm.Btf``.
    """
    if len(data) < 24:
        raise KernelDataError(f"BTF too short: {len(data)} bytes")
    magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from("<HBBIIIII", data)
    if magic != _BTF_MAGIC:
        raise KernelDataError(f"not BTF: magic {magic:#06x}")
    types_start = hdr_len + type_off
    strings_start = hdr_len + str_off
    if hdr_len < 24 or type_len % 4 or types_start + type_len > len(data) or strings_start + str_len > len(data):
        raise KernelDataError("BTF header points outside the data")
    words = array.array("I")
    words.frombytes(data[types_start : types_start + type_len])
    if sys.byteorder != "little":
        words.byteswap()
    return words, data[strings_start : strings_start + str_len]


def parse_btf(data: bytes) -> Layout:
    """The ``Layout`` from raw BTF (the bytes of /sys/kernel/btf/vmlinux).

    Raises KernelDataError when the data is not BTF or a record runs past its section, and
    BpfUnavailable when a name the program needs is not there (a kernel without BPF iterators).
    """
    words, strings = btf_sections(data)

    def name_offset(name: str) -> int:
        at = strings.find(b"\0" + name.encode() + b"\0")
        if at < 0:
            raise BpfUnavailable(f"this kernel's BTF has no {name!r} (no BPF iterators?)")
        return at + 1

    def member_offset(struct_name: str, member: str) -> int:
        want_struct = name_offset(struct_name)
        want_member = name_offset(member)
        start = 0
        n_words = len(words)
        while True:
            # A struct record starts with its name's offset; the same number can occur elsewhere
            # (as data of another record), so check the kind and look for the member by name.
            try:
                at = words.index(want_struct, start)
            except ValueError:
                raise BpfUnavailable(f"this kernel's BTF has no struct {struct_name} with {member}") from None
            start = at + 1
            if at + 3 > n_words:
                continue
            info = words[at + 1]
            if (info >> 24) & 0x1F != _KIND_STRUCT:
                continue
            vlen = info & 0xFFFF
            if at + 3 + 3 * vlen > n_words:
                continue
            kind_flag = info >> 31
            for index in range(vlen):
                base = at + 3 + 3 * index
                if words[base] == want_member:
                    bits = words[base + 2] & 0xFFFFFF if kind_flag else words[base + 2]
                    if bits % 8:
                        raise KernelDataError(f"{struct_name}.{member} is a bit field")
                    return bits // 8

    want_func = name_offset(ITER_FUNC)
    # A type's id is its position in the section (1-based), so the records must be walked in order.
    position = 0
    type_id = 1
    n_words = len(words)
    fixed = _FIXED_WORDS
    per_member = _PER_MEMBER_WORDS
    func_id = 0
    while position < n_words:
        if position + 3 > n_words:
            raise KernelDataError(f"BTF type {type_id} is truncated")
        info = words[position + 1]
        kind = (info >> 24) & 0x1F
        if kind == _KIND_FUNC and words[position] == want_func:
            func_id = type_id
            break
        if kind not in _KNOWN_KINDS:
            raise KernelDataError(f"BTF type {type_id} has unknown kind {kind}")
        position += fixed[kind] + per_member[kind] * (info & 0xFFFF)
        type_id += 1
    if not func_id:
        raise BpfUnavailable(f"this kernel's BTF has no function {ITER_FUNC} (no BPF task_file iterator)")
    file_f_ref, file_ref_bias = -1, 0
    for member, bias in (("f_ref", 1), ("f_count", 0)):
        try:
            file_f_ref, file_ref_bias = member_offset("file", member), bias
            break
        except BpfUnavailable:
            continue
    return Layout(
        file_f_ref=file_f_ref,
        file_ref_bias=file_ref_bias,
        iter_func_id=func_id,
        file_f_inode=member_offset("file", "f_inode"),
        inode_i_mode=member_offset("inode", "i_mode"),
        inode_i_ino=member_offset("inode", "i_ino"),
        task_tgid=member_offset("task_struct", "tgid"),
        task_group_leader=member_offset("task_struct", "group_leader"),
        task_start_boottime=member_offset("task_struct", "start_boottime"),
    )


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


# Opcodes used (class | size/op | source).
_LDX_DW, _LDX_W, _LDX_H = 0x79, 0x61, 0x69
_STX_DW, _STX_W = 0x7B, 0x63
_MOV64_X, _MOV64_K, _AND64_K, _ADD64_K = 0xBF, 0xB7, 0x57, 0x07
_JEQ_K, _JNE_K = 0x15, 0x55
_LD_IMM64, _CALL, _EXIT = 0x18, 0x85, 0x95


def assemble(layout: Layout, map_fd: int, *, refs: bool = False) -> bytes:
    """The iterator program, for a hash map of wanted inodes at ``map_fd``.

    In C it would read::

        file = ctx->file; task = ctx->task;
        if (!file || !task || !file->f_inode) return 0;
        if ((file->f_inode->i_mode & S_IFMT) != S_IFSOCK) return 0;
        u64 ino = file->f_inode->i_ino;
        if (!bpf_map_lookup_elem(&wanted, &ino)) return 0;
        struct { u64 ino; u32 pid, fd; u64 start; } rec =
            { ino, task->tgid, ctx->fd, task->group_leader->start_boottime };
        bpf_seq_write(ctx->meta->seq, &rec, sizeof rec);
        return 0;

    ``ctx`` is ``struct bpf_iter__task_file``: meta at 0, task at 8, fd at 16, file at 24. The
    record sits at r10 - 24; its first field is also the map lookup's key. With ``refs`` the record
    has a fifth field, the file's reference count as ``layout.file_f_ref`` holds it
    (``_REFS_RECORD``), and sits at r10 - 32.
    """
    base = -_REFS_RECORD.size if refs else -_RECORD.size
    exit_at = 33 if refs else 31
    code: list[bytes] = []

    def jump_to_exit(op: int, reg: int, imm: int) -> bytes:
        return _insn(op, reg, 0, exit_at - (len(code) + 1), imm)

    code.append(_insn(_MOV64_X, 6, 1))  # r6 = ctx
    code.append(_insn(_LDX_DW, 7, 6, 24))  # r7 = ctx->file
    code.append(jump_to_exit(_JEQ_K, 7, 0))
    code.append(_insn(_LDX_DW, 8, 6, 8))  # r8 = ctx->task
    code.append(jump_to_exit(_JEQ_K, 8, 0))
    code.append(_insn(_LDX_DW, 2, 7, layout.file_f_inode))  # r2 = file->f_inode
    code.append(jump_to_exit(_JEQ_K, 2, 0))
    code.append(_insn(_LDX_H, 3, 2, layout.inode_i_mode))  # r3 = inode->i_mode
    code.append(_insn(_AND64_K, 3, 0, 0, _S_IFMT))
    code.append(jump_to_exit(_JNE_K, 3, _S_IFSOCK))
    code.append(_insn(_LDX_DW, 3, 2, layout.inode_i_ino))  # r3 = inode->i_ino
    code.append(_insn(_STX_DW, 10, 3, base))  # rec.ino = r3
    code.append(_insn(_LD_IMM64, 1, _BPF_PSEUDO_MAP_FD, 0, map_fd))  # r1 = &wanted
    code.append(_insn(0))
    code.append(_insn(_MOV64_X, 2, 10))
    code.append(_insn(_ADD64_K, 2, 0, 0, base))  # r2 = &rec.ino
    code.append(_insn(_CALL, imm=_BPF_FUNC_MAP_LOOKUP_ELEM))
    code.append(jump_to_exit(_JEQ_K, 0, 0))
    code.append(_insn(_LDX_W, 5, 8, layout.task_tgid))  # rec.pid = task->tgid
    code.append(_insn(_STX_W, 10, 5, base + 8))
    code.append(_insn(_LDX_W, 5, 6, 16))  # rec.fd = ctx->fd
    code.append(_insn(_STX_W, 10, 5, base + 12))
    code.append(_insn(_LDX_DW, 5, 8, layout.task_group_leader))  # r5 = task->group_leader
    code.append(_insn(_LDX_DW, 5, 5, layout.task_start_boottime))  # rec.start = r5->start_boottime
    code.append(_insn(_STX_DW, 10, 5, base + 16))
    if refs:
        code.append(_insn(_LDX_DW, 5, 7, layout.file_f_ref))  # rec.refs = file->f_ref
        code.append(_insn(_STX_DW, 10, 5, base + 24))
    code.append(_insn(_LDX_DW, 1, 6, 0))  # r1 = ctx->meta
    code.append(_insn(_LDX_DW, 1, 1, 0))  # r1 = meta->seq
    code.append(_insn(_MOV64_X, 2, 10))
    code.append(_insn(_ADD64_K, 2, 0, 0, base))  # r2 = &rec
    code.append(_insn(_MOV64_K, 3, 0, 0, -base))
    code.append(_insn(_CALL, imm=_BPF_FUNC_SEQ_WRITE))
    assert len(code) == exit_at
    code.append(_insn(_MOV64_K, 0, 0, 0, 0))
    code.append(_insn(_EXIT))
    return b"".join(code)


#: What the iterator reports for one descriptor: (pid, fd, the process's start time in clock ticks).
Holder = tuple[int, int, int]


def parse_records(data: bytes, clock_ticks: int = 100) -> dict[int, list[Holder]]:
    """inode -> sorted, distinct [(pid, fd, start time), ...] from the program's output.

    The kernel's ``start_boottime`` (ns since boot) becomes /proc/PID/stat's unit, clock ticks
    (``clock_ticks`` a second, ``SC_CLK_TCK``), as the kernel itself converts it there.
    """
    if len(data) % _RECORD.size:
        raise KernelDataError(f"BPF iterator output of {len(data)} bytes is not whole records")
    per_tick = 1_000_000_000 // clock_ticks
    holders: dict[int, set[Holder]] = {}
    for inode, pid, fd, start_ns in _RECORD.iter_unpack(data):
        holders.setdefault(inode, set()).add((pid, fd, start_ns // per_tick))
    return {inode: sorted(found) for inode, found in holders.items()}


class _Bpf:
    """The bpf(2) syscall through ctypes, with every fd it returns closed by ``close()``."""

    def __init__(self) -> None:
        if sys.byteorder != "little" or struct.calcsize("P") != 8:
            raise BpfUnavailable("the BPF owner lookup supports 64-bit little-endian machines only")
        number = _SYS_BPF.get(platform.machine())
        if number is None:
            raise BpfUnavailable(f"the bpf() syscall number of {platform.machine()} is not known here")
        import ctypes

        from closewait.sources import _libc

        self._ctypes = ctypes
        self._syscall = _libc.syscall
        self._number = number
        self._keep: list[Any] = []  # buffers whose addresses are in attributes
        self.fds: list[int] = []

    def address(self, data: bytes) -> int:
        buffer = self._ctypes.create_string_buffer(data, len(data))
        self._keep.append(buffer)
        return self._ctypes.addressof(buffer)

    def call(self, command: int, attr: bytes, what: str) -> int:
        buffer = self._ctypes.create_string_buffer(attr, len(attr))
        try:
            return self._syscall(self._number, command, buffer, len(attr))
        except OSError as err:
            raise _os_error(err, what) from None

    def new_fd(self, command: int, attr: bytes, what: str) -> int:
        fd = self.call(command, attr, what)
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.pop())
        self._keep.clear()


def _os_error(err: OSError, what: str) -> BpfUnavailable:
    """``from_os_error``'s answer, as the reason the BPF lookup is unavailable (the walk still works)."""
    return BpfUnavailable(str(from_os_error(err, what, needs="root, or CAP_BPF and CAP_PERFMON")))


def _create_map(bpf: _Bpf, entries: int) -> int:
    attr = bytearray(44)
    struct.pack_into("<IIII", attr, 0, _BPF_MAP_TYPE_HASH, 8, 1, entries)
    attr[28:41] = b"closewait_ino"
    return bpf.new_fd(_BPF_MAP_CREATE, bytes(attr), "creating a BPF map")


def _fill_map(bpf: _Bpf, map_fd: int, inodes: list[int]) -> None:
    keys = array.array("Q", inodes).tobytes()
    values = bytes(len(inodes))
    attr = struct.pack("<QQQQIIQQ", 0, 0, bpf.address(keys), bpf.address(values), len(inodes), map_fd, 0, 0)
    bpf.call(_BPF_MAP_UPDATE_BATCH, attr, "filling the BPF map")


def _load_program(bpf: _Bpf, layout: Layout, map_fd: int, *, refs: bool = False) -> int:
    code = assemble(layout, map_fd, refs=refs)
    license_text = bpf.address(b"GPL\0")  # bpf_seq_write is a GPL-only helper

    def attr(log_level: int, log_address: int, log_size: int) -> bytes:
        data = bytearray(120)
        struct.pack_into(
            "<IIQQIIQ",
            data,
            0,
            _BPF_PROG_TYPE_TRACING,
            len(code) // 8,
            bpf.address(code),
            license_text,
            log_level,
            log_size,
            log_address,
        )
        data[48:61] = b"closewait_fds"
        struct.pack_into("<I", data, 68, _BPF_TRACE_ITER)
        struct.pack_into("<I", data, 108, layout.iter_func_id)
        return bytes(data)

    try:
        return bpf.new_fd(_BPF_PROG_LOAD, attr(0, 0, 0), "loading the BPF program")
    except BpfUnavailable as first:
        # Load again with the verifier's log, to say why.
        size = 1 << 16
        log = bpf.address(bytes(size))
        try:
            return bpf.new_fd(_BPF_PROG_LOAD, attr(1, log, size), "loading the BPF program")
        except BpfUnavailable:
            text = bpf._ctypes.string_at(log, size).split(b"\0", 1)[0].decode("utf-8", "replace")
            lines = [line for line in text.splitlines() if line.strip()]
            raise BpfUnavailable(f"{first}: {lines[-1] if lines else 'no verifier log'}") from None


def read_btf(path: str = BTF_PATH) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise BpfUnavailable(f"{path} does not exist (a kernel built without BTF)") from None
    except OSError as err:
        raise _os_error(err, f"reading {path}") from None


#: Where the parsed Layout is kept between runs: a tmpfs, emptied at boot, when the kernel changes.
CACHE_PATH = "/run/closewait/btf-layout.json"


def _kernel_key(btf_path: str) -> str:
    """What identifies this kernel's types: its release, its build string and the BTF's size."""
    uname = os.uname()
    try:
        size = os.stat(btf_path).st_size
    except OSError:
        size = -1
    return f"{uname.release} {uname.version} {size}"


def cached_layout(btf_path: str = BTF_PATH, cache_path: str = CACHE_PATH) -> Layout | None:
    """The Layout saved for this kernel by an earlier run, or None.

    Walking the BTF costs ~50 ms (the attach point's id is its position among ~130,000 types), so
    root runs keep the result in ``cache_path``. The file is trusted only when it belongs to this
    user and nobody else may write it, and only for the same kernel; even then, a wrong offset
    could not do harm: the verifier checks every load, and the marker check catches a wrong answer
    (the caller then parses the BTF again and rewrites the file).
    """
    import json

    try:
        with open(cache_path, "rb") as handle:
            info = os.fstat(handle.fileno())
            if info.st_uid != os.geteuid() or info.st_mode & 0o022:
                return None
            saved = json.loads(handle.read())
        if saved.get("kernel") != _kernel_key(btf_path):
            return None
        return Layout(**{name: int(saved["layout"][name]) for name in Layout.__dataclass_fields__})
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def save_layout(layout: Layout, btf_path: str = BTF_PATH, cache_path: str = CACHE_PATH) -> None:
    """Keep ``layout`` for the next run; silently skipped when the directory is not writable."""
    import json

    directory = os.path.dirname(cache_path)
    fields = {name: getattr(layout, name) for name in Layout.__dataclass_fields__}
    text = json.dumps({"kernel": _kernel_key(btf_path), "layout": fields})
    temporary = f"{cache_path}.{os.getpid()}.tmp"
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        os.replace(temporary, cache_path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)


def _wanted_map(bpf: _Bpf, inodes: Collection[int], marker: socket.socket) -> tuple[int, int]:
    """The hash map of the wanted inodes (0 left out) and the marker socket's: (map fd, marker inode)."""
    wanted = sorted({inode for inode in inodes if inode})
    marker_inode = os.fstat(marker.fileno()).st_ino
    map_fd = _create_map(bpf, len(wanted) + 1)
    _fill_map(bpf, map_fd, [*wanted, marker_inode])
    return map_fd, marker_inode


def socket_holders(
    inodes: Collection[int], *, btf_path: str = BTF_PATH, cache_path: str | None = CACHE_PATH
) -> dict[int, list[Holder]]:
    """Every (pid, fd, start time) holding each of ``inodes``, from one kernel pass over all fd tables.

    The start time is the process's, in clock ticks since boot as /proc/PID/stat's field 22 shows
    it: a pid whose stat shows another start time now names another process.

    Inodes nobody holds are absent. Raises BpfUnavailable (with the reason) when the iterator
    cannot be used or cannot be trusted here; the caller then walks /proc instead. ``cache_path``
    None neither reads nor writes the Layout cache.
    """
    bpf = _Bpf()
    marker = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        # The map first: it is the cheapest call that tells whether bpf() is allowed at all.
        map_fd, marker_inode = _wanted_map(bpf, inodes, marker)
        cached = cached_layout(btf_path, cache_path) if cache_path else None
        if cached is not None:
            try:
                return _iterate(bpf, cached, map_fd, marker, marker_inode)
            except BpfUnavailable:
                layout = parse_btf(read_btf(btf_path))
                if layout == cached:
                    raise  # the cache was right: the failure is this host's, not the cache's
        else:
            layout = parse_btf(read_btf(btf_path))
        holders = _iterate(bpf, layout, map_fd, marker, marker_inode)
        if cache_path and layout != cached:
            save_layout(layout, btf_path, cache_path)
        return holders
    except KernelDataError as err:
        # Malformed BTF or iterator output: this way cannot be trusted, the /proc walk still can.
        raise BpfUnavailable(str(err)) from err
    finally:
        marker.close()
        bpf.close()


def _iterate(
    bpf: _Bpf, layout: Layout, map_fd: int, marker: socket.socket, marker_inode: int
) -> dict[int, list[Holder]]:
    """Load the program for ``layout``, run the iterator once, and check the marker came back right."""
    prog_fd = _load_program(bpf, layout, map_fd)
    link_attr = struct.pack("<IIII", prog_fd, 0, _BPF_TRACE_ITER, 0) + bytes(32)
    link_fd = bpf.new_fd(_BPF_LINK_CREATE, link_attr, "attaching the BPF iterator")
    iter_fd = bpf.new_fd(_BPF_ITER_CREATE, struct.pack("<II", link_fd, 0), "creating the BPF iterator")
    holders = parse_records(_read_iterator(iter_fd), os.sysconf("SC_CLK_TCK"))
    seen = holders.pop(marker_inode, [])
    expected = (os.getpid(), marker.fileno(), _own_start_time())
    if expected not in seen:
        raise BpfUnavailable(
            "the BPF iterator did not report this process's own socket as expected (another pid namespace, "
            f"or time namespace?): (pid, fd, start time) {expected}, saw {seen or 'nothing'}"
        )
    return holders


def _read_iterator(iter_fd: int) -> bytes:
    """Everything a BPF iterator writes, read until it ends."""
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(iter_fd, 1 << 16)
        except OSError as err:
            raise _os_error(err, "reading the BPF iterator") from None
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _own_start_time() -> int:
    """This process's start time as /proc/self/stat shows it (clock ticks since boot)."""
    from closewait.sources.process import parse_stat

    try:
        with open("/proc/self/stat", "rb") as handle:
            return parse_stat(handle.read().decode("utf-8", "replace")).start_time
    except OSError as err:
        raise _os_error(err, "reading /proc/self/stat") from None


#: The Layout ``holders_in_processes`` last saw pass the marker check, by BTF path: a long-running
#: caller that may not write the Layout cache (a user with CAP_BPF) does not parse the BTF each time.
_checked_layouts: dict[str, Layout] = {}


def holders_in_processes(
    inodes: Collection[int], pids: Collection[int], *, btf_path: str = BTF_PATH, cache_path: str | None = CACHE_PATH
) -> tuple[dict[int, list[Holder]], set[int]]:
    """Every (pid, fd, start time) holding each of ``inodes`` among the processes ``pids`` only, and
    the inodes some reference to which is not one of those fds.

    The same program as ``socket_holders`` runs over one process's fd table at a time (an iterator
    link whose ``bpf_iter_link_info.task.pid`` names it, Linux 6.1+), so the cost is those processes'
    descriptors, not the host's. It also reports each socket file's reference count: one per fd
    table entry anywhere (another process's, one shared by a fork), one per message in flight
    (SCM_RIGHTS), one per io_uring registration, and the iterator's own. A socket whose count is not
    the number of fds found here (plus the iterator's, measured on the marker socket this process
    holds once) has a reference elsewhere: it is in the second set, and the caller must look at the
    whole host. A pid that has exited is skipped (it holds nothing).

    Raises BpfUnavailable when this cannot be done or trusted (a kernel that refuses ``iter_info``,
    no reference count in this kernel's ``struct file``, the marker wrong).
    """
    bpf = _Bpf()
    marker = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        map_fd, marker_inode = _wanted_map(bpf, inodes, marker)
        layout = _checked_layouts.get(btf_path)
        if layout is None:
            layout = (cached_layout(btf_path, cache_path) if cache_path else None) or parse_btf(read_btf(btf_path))
        if layout.file_f_ref < 0:
            raise BpfUnavailable("this kernel's struct file has no reference count the program knows")
        prog_fd = _load_program(bpf, layout, map_fd, refs=True)
        own_pid = os.getpid()
        chunks = [_read_process_files(bpf, prog_fd, own_pid)]
        chunks += [_read_process_files(bpf, prog_fd, pid) for pid in sorted(set(pids)) if pid != own_pid]
        data = b"".join(chunks)
        if len(data) % _REFS_RECORD.size:
            raise KernelDataError(f"BPF iterator output of {len(data)} bytes is not whole records")
        per_tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
        holders: dict[int, set[Holder]] = {}
        counts: dict[int, set[int]] = {}
        for inode, pid, fd, start_ns, count in _REFS_RECORD.iter_unpack(data):
            holders.setdefault(inode, set()).add((pid, fd, start_ns // per_tick))
            counts.setdefault(inode, set()).add(count + layout.file_ref_bias)
        seen = holders.pop(marker_inode, set())
        marker_counts = counts.pop(marker_inode, set())
        expected = (own_pid, marker.fileno(), _own_start_time())
        if seen != {expected} or len(marker_counts) != 1:
            raise BpfUnavailable(
                "the BPF iterator did not report this process's own socket as expected: (pid, fd, start time) "
                f"{expected}, saw {sorted(seen) or 'nothing'}"
            )
        # The references the iterator itself holds while the program runs (the marker has one fd).
        (marker_count,) = marker_counts
        extra = marker_count - 1
        if not 0 <= extra <= 1:
            raise BpfUnavailable(f"the BPF iterator saw {marker_count} references to a socket held once")
        _checked_layouts[btf_path] = layout
        elsewhere = {inode for inode, seen_counts in counts.items() if seen_counts != {len(holders[inode]) + extra}}
        return {inode: sorted(found) for inode, found in holders.items()}, elsewhere
    except KernelDataError as err:
        raise BpfUnavailable(str(err)) from err
    finally:
        marker.close()
        bpf.close()


def _read_process_files(bpf: _Bpf, prog_fd: int, pid: int) -> bytes:
    """The program's output over the fd table of process ``pid`` alone (b"" if it has exited)."""
    import errno

    info = struct.pack("<III", 0, pid, 0)  # union bpf_iter_link_info: task.tid, task.pid, task.pid_fd
    attr = struct.pack("<IIIIQI", prog_fd, 0, _BPF_TRACE_ITER, 0, bpf.address(info), len(info)) + bytes(20)
    buffer = bpf._ctypes.create_string_buffer(attr, len(attr))
    try:
        link_fd = bpf._syscall(bpf._number, _BPF_LINK_CREATE, buffer, len(attr))
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ESRCH):
            return b""  # exited
        raise _os_error(err, f"attaching the BPF iterator to process {pid}") from None
    try:
        iter_fd = bpf.call(_BPF_ITER_CREATE, struct.pack("<II", link_fd, 0), "creating the BPF iterator")
        try:
            return _read_iterator(iter_fd)
        finally:
            os.close(iter_fd)
    finally:
        os.close(link_fd)
