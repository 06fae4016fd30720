"""The pieces a hand-assembled BPF program needs beyond ``bpf.py``'s iterator: a BTF index that
answers "which type id has this name" and "at which offset is sock.__sk_common.skc_net", an
assembler with labels and comments, a disassembler (the listing ``--ebpf`` shows, like bcc's), and
the bpf(2) commands for maps, pinning and object info.

Built on ``bpf.py`` (its syscall wrapper ``_Bpf``, BTF tables, ``read_btf``); nothing here loads a
program by itself.
"""

from __future__ import annotations

import errno
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from closewait.errors import KernelDataError
from closewait.sources.bpf import (
    _FIXED_WORDS,
    _KNOWN_KINDS,
    _PER_MEMBER_WORDS,
    BpfUnavailable,
    _Bpf,
    _os_error,
    btf_sections,
)

# --- BTF ------------------------------------------------------------------------------------------
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_FUNC = 8, 9, 10, 11, 12
KIND_TYPE_TAG, KIND_ENUM64 = 18, 19
_MODIFIERS = frozenset({KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG})
#: Kinds that can be looked up by name here.
_NAMED_KINDS = frozenset({KIND_STRUCT, KIND_UNION, KIND_TYPEDEF, KIND_FUNC})


@dataclass(frozen=True, slots=True)
class Field:
    """A struct member found by ``Btf.member``: byte offset from the outer struct, and size in bytes."""

    offset: int
    size: int


class Btf:
    """An index of the kernel's BTF (``/sys/kernel/btf/vmlinux``): one walk over every type record.

    Raises KernelDataError for data that is not BTF or whose records run past the section, and
    BpfUnavailable when a looked-up name is absent (a kernel without that feature).
    """

    def __init__(self, data: bytes) -> None:
        words, self._strings = btf_sections(data)
        self._words = words
        positions = [0]  # type id 0 is void
        by_name: dict[tuple[int, int], int] = {}
        position = 0
        n_words = len(words)
        fixed, per_member, named = _FIXED_WORDS, _PER_MEMBER_WORDS, _NAMED_KINDS
        while position < n_words:
            if position + 3 > n_words:
                raise KernelDataError(f"BTF type {len(positions)} is truncated")
            info = words[position + 1]
            kind = (info >> 24) & 0x1F
            if kind not in _KNOWN_KINDS:
                raise KernelDataError(f"BTF type {len(positions)} has unknown kind {kind}")
            if kind in named:
                by_name.setdefault((kind, words[position]), len(positions))
            positions.append(position)
            position += fixed[kind] + per_member[kind] * (info & 0xFFFF)
        if position != n_words:
            raise KernelDataError("the last BTF type runs past the type section")
        self._positions = positions
        self._by_name = by_name

    def _name_offset(self, name: str) -> int | None:
        at = self._strings.find(b"\0" + name.encode() + b"\0")
        return None if at < 0 else at + 1

    def name_of(self, type_id: int) -> str:
        start = self._words[self._positions[type_id]]
        end = self._strings.find(b"\0", start)
        return self._strings[start:end].decode()

    def type_id(self, name: str, kind: int) -> int:
        """The id of the first type named ``name`` of ``kind`` (KIND_STRUCT, KIND_TYPEDEF, KIND_FUNC...)."""
        offset = self._name_offset(name)
        found = None if offset is None else self._by_name.get((kind, offset))
        if found is None:
            raise BpfUnavailable(f"this kernel's BTF has no {name!r}")
        return found

    def _kind(self, type_id: int) -> tuple[int, int]:
        position = self._positions[type_id]
        return (self._words[position + 1] >> 24) & 0x1F, position

    def _skip_modifiers(self, type_id: int) -> int:
        for _ in range(32):
            kind, position = self._kind(type_id)
            if kind not in _MODIFIERS:
                return type_id
            type_id = self._words[position + 2]
        raise KernelDataError(f"BTF type {type_id}: a loop of typedefs")

    def size_of(self, type_id: int) -> int:
        type_id = self._skip_modifiers(type_id)
        kind, position = self._kind(type_id)
        if kind == KIND_PTR:
            return 8
        if kind in (KIND_INT, KIND_ENUM, KIND_ENUM64, KIND_STRUCT, KIND_UNION):
            return int(self._words[position + 2])
        if kind == KIND_ARRAY:
            elem, _index, n = self._words[position + 3 : position + 6]
            return self.size_of(elem) * n
        raise KernelDataError(f"BTF type {type_id} (kind {kind}) has no size")

    def _find_member(self, type_id: int, name_off: int) -> tuple[int, int] | None:
        """(bit offset, member type id) of the member ``name_off`` of struct/union ``type_id``,
        looking inside anonymous struct/union members too."""
        type_id = self._skip_modifiers(type_id)
        kind, position = self._kind(type_id)
        if kind not in (KIND_STRUCT, KIND_UNION):
            return None
        info = self._words[position + 1]
        kind_flag = info >> 31
        for index in range(info & 0xFFFF):
            base = position + 3 + 3 * index
            member_name, member_type, raw = self._words[base : base + 3]
            bits = raw & 0xFFFFFF if kind_flag else raw
            if kind_flag and raw >> 24:
                if member_name == name_off:
                    raise KernelDataError(f"{self.name_of(type_id)}.{self._strings_at(name_off)} is a bit field")
                continue
            if member_name == name_off:
                return bits, member_type
            if member_name == 0:
                inner = self._find_member(member_type, name_off)
                if inner is not None:
                    return bits + inner[0], inner[1]
        return None

    def _strings_at(self, offset: int) -> str:
        return self._strings[offset : self._strings.find(b"\0", offset)].decode()

    def member(self, struct_name: str, path: str) -> Field:
        """The offset and size of ``path`` (dotted: ``__sk_common.skc_net``) inside ``struct struct_name``."""
        type_id = self.type_id(struct_name, KIND_STRUCT)
        offset_bits = 0
        for part in path.split("."):
            name_off = self._name_offset(part)
            found = None if name_off is None else self._find_member(type_id, name_off)
            if found is None:
                raise BpfUnavailable(f"this kernel's struct {struct_name} has no {path}")
            offset_bits += found[0]
            type_id = found[1]
        if offset_bits % 8:
            raise KernelDataError(f"{struct_name}.{path} is not byte aligned")
        return Field(offset_bits // 8, self.size_of(type_id))


# --- Assembler ------------------------------------------------------------------------------------
# Registers r0..r10; opcodes (class | op | source), from <linux/bpf_common.h> and <linux/bpf.h>.
LDX, STX, ST, ALU64, JMP, JMP32 = 0x01, 0x03, 0x02, 0x07, 0x05, 0x06
SIZE_W, SIZE_H, SIZE_B, SIZE_DW = 0x00, 0x08, 0x10, 0x18
MEM, ATOMIC = 0x60, 0xC0
#: BPF_ATOMIC operations (the instruction's imm): add, and with BPF_FETCH exchange and compare-and-exchange.
FETCH = 0x01
XCHG, CMPXCHG = 0xE0 | FETCH, 0xF0 | FETCH
K, X = 0x00, 0x08
ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, NEG, MOD, XOR, MOV, ARSH = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0, 0xB0, 0xC0,
)  # fmt: skip
JA, JEQ, JGT, JGE, JSET, JNE, JSGT, JSGE, CALL, EXIT, JLT, JLE, JSLT, JSLE = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0,
)  # fmt: skip
LD_IMM64 = 0x18
PSEUDO_MAP_FD = 1
_SIZE_BYTES = {1: SIZE_B, 2: SIZE_H, 4: SIZE_W, 8: SIZE_DW}

#: Helper numbers (enum bpf_func_id, uapi: stable) by name, for the program and its listing.
HELPERS = {
    "map_lookup_elem": 1,
    "map_update_elem": 2,
    "map_delete_elem": 3,
    "ktime_get_ns": 5,
    "get_current_pid_tgid": 14,
    "get_current_comm": 16,
    "get_socket_cookie": 46,
    "get_current_cgroup_id": 80,
    "ringbuf_reserve": 131,
    "ringbuf_submit": 132,
    "get_current_task_btf": 158,
}


@dataclass
class Asm:
    """A program being assembled: instructions, jumps to named labels, and one comment per line.

    ``label(name)`` marks the next instruction; jumps name a label and are resolved by ``code()``.
    Comments are kept for ``listing()`` only.
    """

    _insns: list[tuple[int, int, int, int | str, int]] = field(default_factory=list)
    _labels: dict[str, int] = field(default_factory=dict)
    _comments: dict[int, str] = field(default_factory=dict)
    #: map fds by name, for the listing.
    map_names: dict[int, str] = field(default_factory=dict)

    def _emit(self, code: int, dst: int = 0, src: int = 0, off: int | str = 0, imm: int = 0, note: str = "") -> None:
        if note:
            self._comments[len(self._insns)] = note
        self._insns.append((code, dst, src, off, imm))

    def label(self, name: str) -> None:
        if name in self._labels:
            raise ValueError(f"label {name} defined twice")
        self._labels[name] = len(self._insns)

    def mov(self, dst: int, src: int, note: str = "") -> None:
        self._emit(ALU64 | MOV | X, dst, src, note=note)

    def movi(self, dst: int, imm: int, note: str = "") -> None:
        self._emit(ALU64 | MOV | K, dst, imm=imm, note=note)

    def alu(self, op: int, dst: int, imm: int, note: str = "") -> None:
        self._emit(ALU64 | op | K, dst, imm=imm, note=note)

    def alur(self, op: int, dst: int, src: int, note: str = "") -> None:
        self._emit(ALU64 | op | X, dst, src, note=note)

    def load(self, size: int, dst: int, src: int, off: int, note: str = "") -> None:
        self._emit(LDX | MEM | _SIZE_BYTES[size], dst, src, off, note=note)

    def store(self, size: int, dst: int, off: int, src: int, note: str = "") -> None:
        self._emit(STX | MEM | _SIZE_BYTES[size], dst, src, off, note=note)

    def storei(self, size: int, dst: int, off: int, imm: int, note: str = "") -> None:
        self._emit(ST | MEM | _SIZE_BYTES[size], dst, 0, off, imm, note=note)

    def atomic_add(self, dst: int, off: int, src: int, note: str = "") -> None:
        """``lock *(u64 *)(dst + off) += src``."""
        self._emit(STX | ATOMIC | SIZE_DW, dst, src, off, ADD, note=note)

    def xchg(self, dst: int, off: int, src: int, note: str = "") -> None:
        """``src = xchg(*(u64 *)(dst + off), src)``: fully ordered (Linux 5.12+)."""
        self._emit(STX | ATOMIC | SIZE_DW, dst, src, off, XCHG, note=note)

    def cmpxchg(self, dst: int, off: int, src: int, note: str = "") -> None:
        """``r0 = cmpxchg((u64 *)(dst + off), r0, src)``: stores ``src`` only if the word equals r0;
        r0 is the word as it was either way. Fully ordered (Linux 5.12+)."""
        self._emit(STX | ATOMIC | SIZE_DW, dst, src, off, CMPXCHG, note=note)

    def ld_imm64(self, dst: int, value: int, note: str = "") -> None:
        self._emit(LD_IMM64, dst, 0, 0, value & 0xFFFFFFFF, note=note)
        self._emit(0, 0, 0, 0, (value >> 32) & 0xFFFFFFFF)

    def ld_map(self, dst: int, map_fd: int, note: str = "") -> None:
        self._emit(LD_IMM64, dst, PSEUDO_MAP_FD, 0, map_fd, note=note)
        self._emit(0)

    def jump(self, op: int, dst: int, imm: int, target: str, note: str = "") -> None:
        self._emit(JMP | op | K, dst, 0, target, imm, note=note)

    def jumpr(self, op: int, dst: int, src: int, target: str, note: str = "") -> None:
        self._emit(JMP | op | X, dst, src, target, note=note)

    def goto(self, target: str, note: str = "") -> None:
        self._emit(JMP | JA, 0, 0, target, note=note)

    def call(self, helper: str, note: str = "") -> None:
        self._emit(JMP | CALL, imm=HELPERS[helper], note=note)

    def exit(self, note: str = "") -> None:
        self._emit(JMP | EXIT, note=note)

    def code(self) -> bytes:
        out = []
        for index, (code, dst, src, target, imm) in enumerate(self._insns):
            off = target
            if isinstance(target, str):
                if target not in self._labels:
                    raise ValueError(f"jump to undefined label {target}")
                off = self._labels[target] - index - 1
            out.append(struct.pack("<BBhi", code, dst | (src << 4), off, imm if imm < 2**31 else imm - 2**32))
        return b"".join(out)

    def listing(self) -> str:
        """The program as text, one instruction a line, with labels and comments."""
        names = {at: name for name, at in self._labels.items()}
        return disassemble(self.code(), labels=names, comments=self._comments, map_names=self.map_names)


_HELPER_NAMES = {number: name for name, number in HELPERS.items()}
_ALU_NAMES = {ADD: "+=", SUB: "-=", MUL: "*=", DIV: "/=", OR: "|=", AND: "&=", LSH: "<<=", RSH: ">>=", MOD: "%="}
_ALU_NAMES |= {XOR: "^=", MOV: "=", ARSH: "s>>="}
_JMP_NAMES = {JEQ: "==", JGT: ">", JGE: ">=", JSET: "&", JNE: "!=", JSGT: "s>", JSGE: "s>=", JLT: "<", JLE: "<="}
_JMP_NAMES |= {JSLT: "s<", JSLE: "s<="}
_SIZE_NAMES = {SIZE_B: "u8", SIZE_H: "u16", SIZE_W: "u32", SIZE_DW: "u64"}


def disassemble(
    code: bytes,
    *,
    labels: dict[int, str] | None = None,
    comments: dict[int, str] | None = None,
    map_names: dict[int, str] | None = None,
) -> str:
    """BPF bytecode as text, in the verifier's notation (``r1 = *(u64 *)(r6 + 0)``)."""
    labels = labels or {}
    comments = comments or {}
    map_names = map_names or {}
    insns = list(struct.iter_unpack("<BBhi", code))
    lines: list[str] = []
    index = 0
    while index < len(insns):
        op, regs, off, imm = insns[index]
        dst, src = regs & 0xF, regs >> 4
        cls = op & 0x07
        text: str
        width = 1
        if op == LD_IMM64:
            width = 2
            high = insns[index + 1][3] if index + 1 < len(insns) else 0
            if src == PSEUDO_MAP_FD:
                text = f"r{dst} = map[{map_names.get(imm, f'fd {imm}')}]"
            else:
                text = f"r{dst} = {(high << 32) | (imm & 0xFFFFFFFF):#x} ll"
        elif cls == ALU64:
            operand = f"r{src}" if op & X else str(imm)
            name = _ALU_NAMES.get(op & 0xF0)
            text = f"r{dst} = -r{dst}" if op & 0xF0 == NEG else f"r{dst} {name or hex(op)} {operand}"
        elif cls == LDX:
            text = f"r{dst} = *({_SIZE_NAMES[op & 0x18]} *)(r{src} {off:+d})"
        elif cls == STX and op & 0xE0 == ATOMIC:
            where = f"({_SIZE_NAMES[op & 0x18]} *)(r{dst} {off:+d})"
            if imm == CMPXCHG:
                text = f"r0 = atomic64_cmpxchg({where}, r0, r{src})"
            elif imm == XCHG:
                text = f"r{src} = atomic64_xchg({where}, r{src})"
            else:
                text = f"lock *{where} += r{src}"
        elif cls == STX:
            text = f"*({_SIZE_NAMES[op & 0x18]} *)(r{dst} {off:+d}) = r{src}"
        elif cls == ST:
            text = f"*({_SIZE_NAMES[op & 0x18]} *)(r{dst} {off:+d}) = {imm}"
        elif cls in (JMP, JMP32):
            kind = op & 0xF0
            target = labels.get(index + 1 + off, f"{index + 1 + off}")
            if kind == CALL:
                text = f"call {_HELPER_NAMES.get(imm, imm)}"
            elif kind == EXIT:
                text = "exit"
            elif kind == JA:
                text = f"goto {target}"
            else:
                operand = f"r{src}" if op & X else str(imm)
                reg = f"w{dst}" if cls == JMP32 else f"r{dst}"
                text = f"if {reg} {_JMP_NAMES.get(kind, hex(kind))} {operand} goto {target}"
        else:
            text = f".insn {op:#04x} {regs:#04x} {off} {imm}"
        if index in labels:
            lines.append(f"{labels[index]}:")
        note = comments.get(index)
        line = f"  {index:4d}: {text}"
        lines.append(f"{line:<48} ; {note}" if note else line)
        index += width
    return "\n".join(lines)


# --- bpf(2) commands beyond the iterator's ----------------------------------------------------------
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_ENABLE_STATS = 32

MAP_TYPE_HASH = 1
MAP_TYPE_ARRAY = 2
MAP_TYPE_PERCPU_ARRAY = 6
MAP_TYPE_LRU_HASH = 9
MAP_TYPE_RINGBUF = 27
BPF_F_NO_PREALLOC = 1
BPF_F_MMAPABLE = 1 << 10
BPF_NOEXIST = 1


def create_map(
    bpf: _Bpf, name: str, map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0
) -> int:
    attr = bytearray(72)
    struct.pack_into("<IIIII", attr, 0, map_type, key_size, value_size, max_entries, flags)
    encoded = name.encode()[:15]
    attr[28 : 28 + len(encoded)] = encoded
    return bpf.new_fd(BPF_MAP_CREATE, bytes(attr), f"creating the BPF map {name}")


@dataclass(frozen=True, slots=True)
class MapInfo:
    map_type: int
    map_id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def object_info(bpf: _Bpf, fd: int, size: int, what: str) -> bytes:
    """The bytes of ``struct bpf_{map,prog,link}_info`` for ``fd`` (``size`` bytes asked for)."""
    buffer = bpf._ctypes.create_string_buffer(size)
    attr = struct.pack("<IIQ", fd, size, bpf._ctypes.addressof(buffer))
    bpf.call(BPF_OBJ_GET_INFO_BY_FD, attr, what)
    return bytes(buffer.raw)


def map_info(bpf: _Bpf, fd: int) -> MapInfo:
    data = object_info(bpf, fd, 88, "reading a BPF map's info")
    map_type, map_id, key_size, value_size, max_entries, flags = struct.unpack_from("<6I", data)
    return MapInfo(map_type, map_id, key_size, value_size, max_entries, flags, data[24:40].split(b"\0")[0].decode())


class MapAccess:
    """Lookups in one map from user space, reusing one set of buffers (one syscall per call).

    Safe to share between threads: the bpf(2) call releases the GIL, so two threads using the
    buffers at once could send each other's key or read a value while the kernel copies another
    into it (the exporter's resync thread and a scrape both read the recorder's counters). A lock
    holds the buffers from the key's copy to the value's; a ``keys()`` walk holds it throughout.
    """

    def __init__(self, bpf: _Bpf, fd: int, key_size: int, value_size: int) -> None:
        ctypes = bpf._ctypes
        self._bpf = bpf
        self.fd = fd
        self.key_size = key_size
        self.value_size = value_size
        self._key = ctypes.create_string_buffer(key_size)
        self._next = ctypes.create_string_buffer(key_size)
        self._value = ctypes.create_string_buffer(value_size)
        self._memmove = ctypes.memmove
        self._lock = threading.Lock()
        address = ctypes.addressof
        self._lookup_attr = struct.pack("<IIQQQ", fd, 0, address(self._key), address(self._value), 0)
        self._next_attr = struct.pack("<IIQQQ", fd, 0, address(self._key), address(self._next), 0)
        self._first_attr = struct.pack("<IIQQQ", fd, 0, 0, address(self._next), 0)

    def lookup(self, key: bytes) -> bytes | None:
        with self._lock:
            self._memmove(self._key, key, self.key_size)
            if not self._call_found(BPF_MAP_LOOKUP_ELEM, self._lookup_attr, "reading a BPF map"):
                return None
            return bytes(self._value.raw)

    def _call_found(self, command: int, attr: bytes, what: str) -> bool:
        """Run ``command``; False when the kernel answers ENOENT (no such key, or past the last one)."""
        bpf = self._bpf
        try:
            bpf._syscall(bpf._number, command, attr, len(attr))
        except OSError as err:
            if err.errno == errno.ENOENT:
                return False
            raise _os_error(err, what) from None
        return True

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        ctypes = self._bpf._ctypes
        key_buffer = ctypes.create_string_buffer(key, self.key_size)
        value_buffer = ctypes.create_string_buffer(value, self.value_size)
        attr = struct.pack("<IIQQQ", self.fd, 0, ctypes.addressof(key_buffer), ctypes.addressof(value_buffer), flags)
        self._bpf.call(BPF_MAP_UPDATE_ELEM, attr, "writing a BPF map")

    def delete(self, key: bytes) -> bool:
        ctypes = self._bpf._ctypes
        key_buffer = ctypes.create_string_buffer(key, self.key_size)
        attr = struct.pack("<IIQQQ", self.fd, 0, ctypes.addressof(key_buffer), 0, 0)
        return self._call_found(BPF_MAP_DELETE_ELEM, attr, "deleting from a BPF map")

    def keys(self) -> list[bytes]:
        """Every key, walked with GET_NEXT_KEY (a hash map changing meanwhile may restart the walk:
        keys are deduplicated)."""
        found: dict[bytes, None] = {}
        attr = self._first_attr
        with self._lock:
            for _ in range(10_000_000):
                if not self._call_found(BPF_MAP_GET_NEXT_KEY, attr, "walking a BPF map"):
                    break
                key = bytes(self._next.raw)
                found[key] = None
                self._memmove(self._key, key, self.key_size)
                attr = self._next_attr
        return list(found)

    def items(self) -> Iterable[tuple[bytes, bytes]]:
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                yield key, value


def pin(bpf: _Bpf, fd: int, path: str) -> None:
    encoded = bpf.address(path.encode() + b"\0")
    bpf.call(BPF_OBJ_PIN, struct.pack("<QIIi4x", encoded, fd, 0, 0), f"pinning {path}")


def get_pinned(bpf: _Bpf, path: str) -> int:
    encoded = bpf.address(path.encode() + b"\0")
    return bpf.new_fd(BPF_OBJ_GET, struct.pack("<QIIi4x", encoded, 0, 0, 0), f"opening the pinned {path}")


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """How many CPUs a per-CPU map has a slot for (``0-3,8-11`` -> highest + 1)."""
    with open(path) as handle:
        text = handle.read().strip()
    highest = 0
    for part in text.split(","):
        highest = max(highest, int(part.split("-")[-1]))
    return highest + 1


def fd_memlock(fd: int, pid: str = "self") -> int:
    """The bytes the kernel charges for a BPF object (``memlock:`` of /proc/PID/fdinfo/FD), 0 if absent."""
    with open(f"/proc/{pid}/fdinfo/{fd}") as handle:
        for line in handle:
            if line.startswith("memlock:"):
                return int(line.split()[1])
    return 0
