"""The CLOSE_WAIT recorder: a BPF program on the kernel's ``sock:inet_sock_set_state`` tracepoint.

Sampling cannot see a socket that sits 20 s in CLOSE_WAIT between two scrapes, nor say when the
peer's FIN arrived. The kernel announces every TCP state change; this program keeps, in BPF maps:

``entries``     socket cookie -> the time it entered CLOSE_WAIT (``bpf_ktime_get_ns``, i.e.
                CLOCK_MONOTONIC): an open-addressed table in a BPF array of ``capacity`` slots
                (a power of two; 2M by default), 16 bytes each (cookie, time), allocated whole
                at attach and mmap()ed by readers. A socket's home slot is ``cookie & (slots -
                1)``; on entry the program claims the first free slot of the PROBES slots from
                there with a compare-and-exchange of the cookie word (another CPU may want the
                same slot), then writes the time; on leaving it finds the cookie in that window,
                reads the time, clears the time, then the cookie. An array's lookups are inlined
                by the verifier: no helper call, no hashing, no lock, no free list, which made
                both edges about three times cheaper than the preallocated hash this was before.
                Cookies are handed out in sequence, so sockets in CLOSE_WAIT at once rarely share
                a home slot. Nothing is ever evicted (an LRU would evict the entries nobody
                touched for longest, and the socket nobody touches is exactly the leak this is
                for): an entry whose window is full is not recorded, counted in
                ``entries_dropped``, and its age falls back to sampling.
``histograms``  (cgroup id, tgid, LeaveReason) -> dwell-time buckets (``events.BUCKET_BOUNDS``) and
                their sum. The leaving edge CLOSE_WAIT -> LAST_ACK runs in the task that called
                close()/shutdown(), so its tgid and cgroup are the closer's (unlike the entering
                edge, which runs in softirq: bcc#690). A hash of ``histogram_capacity`` keys, not
                preallocated; a leave that finds it full is counted in ``histogram_dropped``.
``counters``    a per-CPU array: the per-state deltas (+1 new state, -1 old state on every
                transition; ``events.StateCountSync`` pins them to a sock_diag count), entered,
                left by reason, left untracked, entries/histograms/feed records dropped.
``feed``        only with ``open(feed=True)``: a ring buffer that each entry and leave is written
                to, with endpoints and the closing task (``EventFeed``, for ``watch --events``).

The cookie is ``bpf_get_socket_cookie(sk)``: the kernel's ``sock_gen_cookie``, the same number
sock_diag reports as ``idiag_cookie`` and ``getsockopt(SO_COOKIE)`` returns, so ``scan`` can join
its dump with ``entry_times``.

Program type: BPF_PROG_TYPE_TRACING attached as BPF_TRACE_RAW_TP ("tp_btf"). Its context is the
tracepoint's own arguments typed by BTF (``struct sock *sk, int oldstate, int newstate``), so the
program reads ``sk->sk_protocol`` directly (the verifier checks the offset against the type), and
it may call ``bpf_get_socket_cookie`` and ``bpf_get_current_task_btf``, which a classic
TRACEPOINT or RAW_TRACEPOINT program cannot; the classic tracepoint would also need tracefs
mounted and its format file parsed. It needs BTF (which the iterator needs anyway) and Linux 5.12+.

Trust: like the owner iterator's marker socket, ``open()`` checks the attached program with a
loopback connection of its own (``_self_test``): the entry time of the accepted socket's cookie
must appear when the peer's FIN has been read, within the time bracket it happened in, and the
close must remove it and count one CLOSED dwell under this process's tgid and cgroup. Otherwise
the recorder is detached and ``RecorderUnavailable`` says why; callers fall back to sampling.

Pinning: with ``pin_dir`` (a directory in a bpffs), the link and the three maps are pinned there,
so the program stays attached after this process exits and other processes (``closewait scan``)
read the same maps with ``Recorder.open_pinned(pin_dir)``. ``unpin(pin_dir)`` detaches it. Many
hosts do not mount a bpffs at /sys/fs/bpf; ``mount_bpffs()`` mounts one.

``program_listing()`` (and ``Recorder.listing()``) show the assembled program, as bcc's ``--ebpf``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from closewait.errors import ClosewaitError, NotSupported
from closewait.events import (
    BUCKET_BOUNDS_NS,
    N_BUCKETS,
    N_STATE_SLOTS,
    Counters,
    Histogram,
    HistogramKey,
    LeaveReason,
    StateCountSync,
    Transition,
)
from closewait.model import Endpoint, TcpState
from closewait.sources import bpf_asm
from closewait.sources.bpf import BTF_PATH, BpfUnavailable, _Bpf, read_btf
from closewait.sources.bpf_asm import (
    ADD,
    AND,
    JEQ,
    JGT,
    JLE,
    JNE,
    LSH,
    RSH,
    SUB,
    Asm,
    Btf,
    MapAccess,
)
from closewait.sources.pinned import DEFAULT_PIN_DIR

if TYPE_CHECKING:
    import mmap

TRACEPOINT = "inet_sock_set_state"
BPFFS_MAGIC = 0xCAFE4A11

#: Slots of the entries table (16 B each): at most this many sockets' CLOSE_WAIT entry times are
#: kept at once, and up to about half as many without a drop (see PROBES). 2M slots: 32 MiB, for 1M.
DEFAULT_CAPACITY = 1 << 21
#: How many slots, from a cookie's home slot on, an entry may take (the table's probe window). With
#: the table half full no entry was dropped in simulation (sequential or random cookies); 16 dropped
#: 0.03-0.4%, 8 dropped 1-3.6%. A longer window costs only the exits of sockets the recorder never
#: saw enter (they look at every slot of it) and the lookups of ``scan`` for those.
PROBES = 32
#: A slot of the entries table: the socket's cookie (0: free), then its entry time.
_SLOT = struct.Struct("<QQ")
#: (cgroup, tgid, reason) histograms kept; leaves past this are counted as dropped.
DEFAULT_HISTOGRAM_CAPACITY = 16384

# The counters map: one per-CPU value of u64 slots. Slots 0..12 are per-state deltas (by state number).
_SLOT_TRANSITIONS = 13
_SLOT_ENTERED = 14
_SLOT_LEFT = 15  # + LeaveReason: 15 closed, 16 exited, 17 reset
_SLOT_LEFT_UNTRACKED = 18
_SLOT_HIST_DROPPED = 19
_SLOT_ENTRIES_DROPPED = 20
_SLOT_FEED_LOST = 21
_N_SLOTS = 22

#: What the program writes to the feed for each edge (little-endian, 96 bytes): time (ns since boot),
#: cookie, cgroup id, dwell (ns), tgid, old state, new state, reason (LeaveReason, or
#: _FEED_ENTERED), pad, family, local port (host order), remote port (network order), pad, local
#: and remote address (16 bytes each: IPv4 in the first 4), comm (16 bytes, NUL-padded).
_FEED_RECORD = struct.Struct("<QQQQIBBBxHHHxx16s16s16s")
_FEED_ENTERED = 0xFF
_BPF_RB_NO_WAKEUP = 1
DEFAULT_FEED_BYTES = 1 << 22  # 43,690 records: a few seconds of a busy host

#: A histogram's value: one u64 per bucket, then the sum of dwells in ns.
_HIST_VALUE = struct.Struct(f"<{N_BUCKETS + 1}Q")
_HIST_KEY = struct.Struct("<QII")  # cgroup id, tgid, reason

#: The names the maps and the program get (bpftool shows them); a pinned recorder must match them.
_MAP_NAMES = {"entries": "cw_entries_v2", "histograms": "cw_hist_v1", "counters": "cw_counters_v1"}
_PROG_NAME = "cw_closewait"

_ADDRESS_FIELDS = (
    "skc_family", "skc_num", "skc_dport", "skc_rcv_saddr", "skc_daddr", "skc_v6_rcv_saddr", "skc_v6_daddr",
)  # fmt: skip
_IPPROTO_TCP = 6
_PF_EXITING = 0x4  # include/linux/sched.h
_SEND_SHUTDOWN = 2  # include/net/sock.h
_SO_COOKIE = 57
_SO_NETNS_COOKIE = 71
_BPF_PROG_TYPE_TRACING = 26
_BPF_TRACE_RAW_TP = 23

#: Whether this CPU keeps loads in program order, as the mmap reader needs (it takes a slot's time
#: only between two loads of its cookie): x86-64's TSO does. A weakly ordered CPU (arm64, ...) may
#: perform the time's load before the first cookie load, and Python has no load barrier to stop it,
#: so elsewhere a slot the mmap reader found is read through bpf(2) (``Recorder._read_slot``).
LOADS_IN_ORDER = os.uname().machine == "x86_64"

_T = TypeVar("_T")


class RecorderUnavailable(NotSupported):
    """The recorder cannot run (or cannot be trusted) here; ``str(err)`` is the one-line reason.

    Callers report it once and keep sampling (``tcpi_last_ack_recv`` ages, sock_diag counts).
    """


@dataclass(frozen=True, slots=True)
class Layout:
    """What the program needs from this kernel's types."""

    attach_btf_id: int
    sk_protocol: bpf_asm.Field
    sk_shutdown: bpf_asm.Field
    skc_cookie: bpf_asm.Field
    skc_net: bpf_asm.Field
    net_cookie: bpf_asm.Field
    task_flags: bpf_asm.Field
    skc_family: bpf_asm.Field
    skc_num: bpf_asm.Field
    skc_dport: bpf_asm.Field
    skc_rcv_saddr: bpf_asm.Field
    skc_daddr: bpf_asm.Field
    skc_v6_rcv_saddr: bpf_asm.Field
    skc_v6_daddr: bpf_asm.Field


def table_slots(capacity: int) -> int:
    """The entries table's size for ``capacity``: the power of two at or above it (a slot is found
    by masking the cookie)."""
    if capacity < 1:
        raise ValueError(f"capacity must be positive, not {capacity}")
    return 1 << (capacity - 1).bit_length()


def kernel_layout(btf_path: str = BTF_PATH) -> Layout:
    """The Layout from the kernel's BTF; RecorderUnavailable when something is missing."""
    try:
        btf = Btf(read_btf(btf_path))
        return Layout(
            attach_btf_id=btf.type_id(f"btf_trace_{TRACEPOINT}", bpf_asm.KIND_TYPEDEF),
            sk_protocol=btf.member("sock", "sk_protocol"),
            sk_shutdown=btf.member("sock", "sk_shutdown"),
            skc_cookie=btf.member("sock", "__sk_common.skc_cookie"),
            skc_net=btf.member("sock", "__sk_common.skc_net"),
            net_cookie=btf.member("net", "net_cookie"),
            task_flags=btf.member("task_struct", "flags"),
            **{name: btf.member("sock", f"__sk_common.{name}") for name in _ADDRESS_FIELDS},
        )
    except (BpfUnavailable, ClosewaitError) as err:
        raise RecorderUnavailable(f"the kernel's types do not fit the recorder: {err}") from err


#: A layout with x86-64 6.x offsets, used only to show the program without a kernel (``program_listing``).
_EXAMPLE_LAYOUT = Layout(
    0,
    bpf_asm.Field(532, 2),
    bpf_asm.Field(575, 1),
    bpf_asm.Field(88, 8),
    bpf_asm.Field(48, 8),
    bpf_asm.Field(4096, 8),
    bpf_asm.Field(44, 4),
    bpf_asm.Field(16, 2),
    bpf_asm.Field(14, 2),
    bpf_asm.Field(12, 2),
    bpf_asm.Field(4, 4),
    bpf_asm.Field(0, 4),
    bpf_asm.Field(72, 16),
    bpf_asm.Field(56, 16),
)


def assemble(
    layout: Layout,
    entries_fd: int,
    hist_fd: int,
    counters_fd: int,
    netns_cookie: int | None,
    feed_fd: int | None = None,
    *,
    slots: int,
) -> Asm:
    """The program. In C it would read::

        if (!sk || sk->sk_protocol != IPPROTO_TCP) return 0;
        if (NETNS && sk->__sk_common.skc_net.net->net_cookie != NETNS) return 0;
        c = counters[0]; c->transitions++;
        if (new < 13 && new != CLOSE) c->state[new]++;
        if (old < 13 && old != CLOSE && !(old == LISTEN && new == SYN_RECV)) c->state[old]--;
        if (new == CLOSE_WAIT) {
            c->entered++; cookie = bpf_get_socket_cookie(sk); now = ktime();
            for (i = 0; i < PROBES; i++) {              /* unrolled; entries[] lookups inlined */
                s = &entries[(cookie + i) & (SLOTS - 1)];
                if (cmpxchg(&s->cookie, 0, cookie) == 0) { s->time = now; return 0; }
            }
            c->entries_dropped++;  /* its window is full */
            return 0;
        }
        if (old != CLOSE_WAIT) return 0;
        cookie = sk->skc_cookie;   /* made when it entered, if the recorder saw it enter */
        s = cookie ? first of entries[(cookie + i) & (SLOTS - 1)], i < PROBES, with s->cookie == cookie;
        if (!s) { c->left_untracked++; return 0; }
        t = s->time; s->time = 0; xchg(&s->cookie, 0); dwell = ktime() - t;
        if (current->flags & PF_EXITING)                     key = {cgroup, tgid, EXITED};
        else if (new == LAST_ACK || sk->sk_shutdown & SEND_SHUTDOWN) key = {cgroup, tgid, CLOSED};
        else                                                  key = {0, 0, RESET};
        c->left[key.reason]++;
        h = histograms[key] or insert zeroes (NOEXIST) and look again, else c->hist_dropped++;
        atomically: h->sum += dwell; h->bucket[first i with dwell <= BOUND[i], else 14]++;

    With ``feed_fd`` (a ring buffer), each entry and each tracked leave is also written there as a
    ``_FEED_RECORD`` (see ``EventFeed``); without it, no code for the feed is assembled at all.

    A passive open is reported LISTEN -> SYN_RECV (the child is cloned from the listener), so that
    one is a birth, not a listener leaving LISTEN. The per-CPU counters need no lock against
    themselves (plain adds, no locked instruction): the kernel does not run the same program nested
    on one CPU (it counts such runs as ``recursion_misses``, reported as ``Counters.missed``); the
    histograms, shared by every CPU, take atomic adds.
    """
    a = Asm()
    a.map_names.update({entries_fd: "entries", hist_fd: "histograms", counters_fd: "counters"})
    if feed_fd is not None:
        a.map_names[feed_fd] = "feed"
    close, close_wait, last_ack, listen, syn_recv = (int(s) for s in (7, 8, 9, 10, 3))
    probes = min(PROBES, slots)
    # Stack: fp-8 cookie, fp-16 time (entry, then dwell), fp-32 histogram key (cgroup u64, tgid u32,
    # reason u32), fp-40 array key (the counters', then an entries slot), fp-48 now, fp-64 comm,
    # from fp-208 zeroes for a new histogram.
    zeroes_at = -72 - _HIST_VALUE.size
    a.load(8, 6, 1, 0, "r6 = sk")
    a.load(8, 7, 1, 8, "r7 = oldstate")
    a.alu(LSH, 7, 32)
    a.alu(RSH, 7, 32)
    a.load(8, 8, 1, 16, "r8 = newstate")
    a.alu(LSH, 8, 32)
    a.alu(RSH, 8, 32)
    a.jump(JEQ, 6, 0, "out")
    a.load(layout.sk_protocol.size, 1, 6, layout.sk_protocol.offset, "sk->sk_protocol")
    a.jump(JNE, 1, _IPPROTO_TCP, "out", "TCP only")
    if netns_cookie is not None:
        a.load(8, 1, 6, layout.skc_net.offset, "sk->__sk_common.skc_net.net")
        a.jump(JEQ, 1, 0, "out")
        a.load(8, 1, 1, layout.net_cookie.offset, "net->net_cookie")
        a.ld_imm64(2, netns_cookie, "the one network namespace recorded")
        a.jumpr(JNE, 1, 2, "out")
    a.storei(4, 10, -40, 0, "key 0")
    a.ld_map(1, counters_fd)
    a.mov(2, 10)
    a.alu(ADD, 2, -40)
    a.call("map_lookup_elem", "this CPU's counters")
    a.jump(JEQ, 0, 0, "out")
    a.mov(9, 0, "r9 = counters")
    a.movi(1, 1)
    _bump(a, 9, _SLOT_TRANSITIONS * 8, 1, "transitions++")
    a.jump(JGT, 8, N_STATE_SLOTS - 1, "old_state")
    a.jump(JEQ, 8, close, "old_state")
    a.mov(2, 8)
    a.alu(LSH, 2, 3)
    a.mov(3, 9)
    a.alur(ADD, 3, 2)
    _bump(a, 3, 0, 1, "state[new]++")
    a.label("old_state")
    a.jump(JGT, 7, N_STATE_SLOTS - 1, "edges")
    a.jump(JEQ, 7, close, "edges")
    a.jump(JNE, 7, listen, "old_state_dec")
    a.jump(JEQ, 8, syn_recv, "edges", "a passive open: a birth")
    a.label("old_state_dec")
    a.mov(2, 7)
    a.alu(LSH, 2, 3)
    a.mov(3, 9)
    a.alur(ADD, 3, 2)
    a.movi(1, -1)
    _bump(a, 3, 0, 1, "state[old]--")
    a.label("edges")
    a.jump(JEQ, 8, close_wait, "enter")
    a.jump(JNE, 7, close_wait, "out")
    # Leaving CLOSE_WAIT: the cookie was made when it entered at the latest (0: the recorder did not see it).
    a.load(layout.skc_cookie.size, 1, 6, layout.skc_cookie.offset, "sk->skc_cookie")
    a.jump(JEQ, 1, 0, "untracked")
    _probe(a, entries_fd, slots, probes, "untracked")
    a.label("untracked")
    a.movi(1, 1)
    _bump(a, 9, _SLOT_LEFT_UNTRACKED * 8, 1, "left_untracked++")
    a.goto("out")
    a.label("tracked")
    a.load(8, 1, 0, 8, "entry time")
    a.store(8, 10, -16, 1)
    a.storei(8, 0, 8, 0, "slot.time = 0, then")
    a.movi(1, 0)
    a.xchg(0, 0, 1, "slot.cookie = 0: the slot is free")
    a.call("ktime_get_ns")
    a.store(8, 10, -48, 0)
    a.load(8, 1, 10, -16)
    a.alur(SUB, 0, 1)
    a.store(8, 10, -16, 0, "dwell = now - entry")
    a.call("get_current_task_btf")
    a.load(layout.task_flags.size, 1, 0, layout.task_flags.offset, "current->flags")
    a.alu(AND, 1, _PF_EXITING)
    a.jump(JNE, 1, 0, "exited")
    a.jump(JEQ, 8, last_ack, "closed", "close() or shutdown()")
    a.load(layout.sk_shutdown.size, 1, 6, layout.sk_shutdown.offset, "sk->sk_shutdown")
    a.alu(AND, 1, _SEND_SHUTDOWN)
    a.jump(JNE, 1, 0, "closed", "close() with unread data, or linger 0")
    a.storei(8, 10, -32, 0, "RESET: no owner")
    a.storei(4, 10, -24, 0)
    a.storei(4, 10, -20, int(LeaveReason.RESET))
    if feed_fd is not None:
        a.storei(8, 10, -64, 0, "no comm")
        a.storei(8, 10, -56, 0)
    a.goto("count_leave")
    a.label("exited")
    a.storei(4, 10, -20, int(LeaveReason.EXITED))
    a.goto("owner")
    a.label("closed")
    a.storei(4, 10, -20, int(LeaveReason.CLOSED))
    a.label("owner")
    a.call("get_current_cgroup_id")
    a.store(8, 10, -32, 0)
    a.call("get_current_pid_tgid")
    a.alu(RSH, 0, 32)
    a.store(4, 10, -24, 0)
    if feed_fd is not None:
        a.mov(1, 10)
        a.alu(ADD, 1, -64)
        a.movi(2, 16)
        a.call("get_current_comm")
    a.label("count_leave")
    a.load(4, 1, 10, -20)
    a.jump(JGT, 1, 2, "out")
    a.alu(LSH, 1, 3)
    a.mov(2, 9)
    a.alur(ADD, 2, 1)
    a.movi(1, 1)
    _bump(a, 2, _SLOT_LEFT * 8, 1, "left[reason]++")
    if feed_fd is not None:

        def leave_fields(a: Asm) -> None:
            for source, offset in ((-48, 0), (-8, 8), (-32, 16), (-16, 24), (-64, 80), (-56, 88)):
                a.load(8, 1, 10, source)
                a.store(8, 0, offset, 1)
            a.load(4, 1, 10, -24)
            a.store(4, 0, 32, 1, "tgid")
            a.load(4, 1, 10, -20)
            a.store(1, 0, 38, 1, "reason")

        _emit(a, "leave_feed", layout, feed_fd, leave_fields)
    a.ld_map(1, hist_fd)
    a.mov(2, 10)
    a.alu(ADD, 2, -32)
    a.call("map_lookup_elem", "this key's histogram")
    a.jump(JNE, 0, 0, "bucket")
    for slot in range(N_BUCKETS + 1):
        a.storei(8, 10, zeroes_at + 8 * slot, 0)
    a.ld_map(1, hist_fd)
    a.mov(2, 10)
    a.alu(ADD, 2, -32)
    a.mov(3, 10)
    a.alu(ADD, 3, zeroes_at)
    a.movi(4, bpf_asm.BPF_NOEXIST)
    a.call("map_update_elem", "a new histogram (another CPU may have won)")
    a.ld_map(1, hist_fd)
    a.mov(2, 10)
    a.alu(ADD, 2, -32)
    a.call("map_lookup_elem")
    a.jump(JNE, 0, 0, "bucket")
    a.movi(1, 1)
    _bump(a, 9, _SLOT_HIST_DROPPED * 8, 1, "histogram_dropped++ (map full)")
    a.goto("out")
    a.label("bucket")
    a.load(8, 1, 10, -16, "r1 = dwell")
    a.atomic_add(0, N_BUCKETS * 8, 1, "sum += dwell")
    a.movi(2, 1)
    for index, bound in enumerate(BUCKET_BOUNDS_NS):
        a.ld_imm64(3, bound)
        a.jumpr(JLE, 1, 3, f"bucket_{index}", f"dwell <= {bound / 1e9:g} s")
    a.atomic_add(0, (N_BUCKETS - 1) * 8, 2, "bucket[+Inf]++")
    a.goto("out")
    for index in range(len(BUCKET_BOUNDS_NS)):
        a.label(f"bucket_{index}")
        a.atomic_add(0, index * 8, 2, f"bucket[{index}]++")
        a.goto("out")
    a.label("enter")
    a.mov(1, 6)
    a.call("get_socket_cookie", "made now unless something asked for it before")
    a.store(8, 10, -8, 0)
    a.call("ktime_get_ns")
    a.store(8, 10, -16, 0)
    a.load(8, 1, 10, -8)
    _probe(a, entries_fd, slots, probes, "dropped", claim=True)
    a.label("dropped")
    a.movi(1, 1)
    _bump(a, 9, _SLOT_ENTRIES_DROPPED * 8, 1, "entries_dropped++ (no free slot in the window)")
    a.goto("entered")
    a.label("claimed")
    a.load(8, 1, 10, -16)
    a.store(8, 3, 8, 1, "slot.time = now")
    a.movi(1, 1)
    a.label("entered")
    _bump(a, 9, _SLOT_ENTERED * 8, 1, "entered++")
    if feed_fd is not None:

        def entry_fields(a: Asm) -> None:
            a.load(8, 1, 10, -16)
            a.store(8, 0, 0, 1, "time")
            a.load(8, 1, 10, -8)
            a.store(8, 0, 8, 1, "cookie")
            for offset in (16, 24, 32, 80, 88):  # cgroup, dwell, tgid + states + reason, comm: none
                a.storei(8, 0, offset, 0)
            a.storei(1, 0, 38, _FEED_ENTERED, "reason: entered")

        _emit(a, "entry_feed", layout, feed_fd, entry_fields)
    a.label("out")
    a.movi(0, 0)
    a.exit()
    return a


def _emit(a: Asm, prefix: str, layout: Layout, feed_fd: int, fields: Callable[[Asm], None]) -> None:
    """Reserve a ``_FEED_RECORD`` in the ring buffer, fill it (``fields`` writes the edge's own part
    through r0; this writes the states and the endpoints, read from sk in r6) and submit it. A full
    ring buffer counts ``feed_lost``."""
    a.ld_map(1, feed_fd)
    a.movi(2, _FEED_RECORD.size)
    a.movi(3, 0)
    a.call("ringbuf_reserve", "the feed's record")
    a.jump(JNE, 0, 0, f"{prefix}_reserved")
    a.movi(1, 1)
    _bump(a, 9, _SLOT_FEED_LOST * 8, 1, "feed_lost++ (ring buffer full)")
    a.goto("out")
    a.label(f"{prefix}_reserved")
    fields(a)
    a.store(1, 0, 36, 7, "oldstate")
    a.store(1, 0, 37, 8, "newstate")
    a.storei(1, 0, 39, 0)
    a.load(layout.skc_family.size, 1, 6, layout.skc_family.offset, "sk->skc_family")
    a.store(2, 0, 40, 1)
    a.load(layout.skc_num.size, 2, 6, layout.skc_num.offset, "local port (host order)")
    a.store(2, 0, 42, 2)
    a.load(layout.skc_dport.size, 2, 6, layout.skc_dport.offset, "remote port (network order)")
    a.store(2, 0, 44, 2)
    a.storei(2, 0, 46, 0)
    a.jump(JEQ, 1, socket.AF_INET6, f"{prefix}_v6")
    a.load(4, 2, 6, layout.skc_rcv_saddr.offset, "IPv4 local address")
    a.store(8, 0, 48, 2)
    a.storei(8, 0, 56, 0)
    a.load(4, 2, 6, layout.skc_daddr.offset, "IPv4 remote address")
    a.store(8, 0, 64, 2)
    a.storei(8, 0, 72, 0)
    a.goto(f"{prefix}_submit")
    a.label(f"{prefix}_v6")
    for field, at in ((layout.skc_v6_rcv_saddr, 48), (layout.skc_v6_daddr, 64)):
        for half in (0, 8):
            a.load(8, 2, 6, field.offset + half)
            a.store(8, 0, at + half, 2)
    a.label(f"{prefix}_submit")
    a.mov(1, 0)
    a.movi(2, _BPF_RB_NO_WAKEUP)
    a.call("ringbuf_submit", "no wakeup: the reader polls (a wakeup per record costs ~1 us)")


def _probe(a: Asm, entries_fd: int, slots: int, probes: int, missing: str, *, claim: bool = False) -> None:
    """Walk the cookie's window of the entries table: its home slot ``cookie & (slots - 1)`` and the
    ``probes - 1`` after it (wrapping), the cookie in r1 (kept at fp-8, the slot index at fp-40).
    An array's lookups are inlined by the verifier: no helper call, no hashing, no lock.

    Without ``claim``: jump to "tracked" with r0 = the slot holding the cookie. With ``claim``:
    take the first free slot by compare-and-exchange of its cookie word from 0 (another CPU may
    want the same slot at the same moment; one wins, the other moves on) and jump to "claimed"
    with r3 = the slot. Either way, jump to ``missing`` when no slot of the window qualifies.
    """
    a.store(8, 10, -8, 1)
    a.alu(AND, 1, slots - 1)
    a.store(4, 10, -40, 1, "slot = cookie & (slots - 1)")
    for probe in range(probes):
        if probe:
            a.load(4, 1, 10, -40)
            a.alu(ADD, 1, 1)
            a.alu(AND, 1, slots - 1)
            a.store(4, 10, -40, 1, "the next slot")
        a.ld_map(1, entries_fd)
        a.mov(2, 10)
        a.alu(ADD, 2, -40)
        a.call("map_lookup_elem", "inlined (an array): &entries[slot]")
        a.jump(JEQ, 0, 0, missing)
        a.load(8, 2, 10, -8)
        if claim:
            a.mov(3, 0)
            a.movi(0, 0)
            a.cmpxchg(3, 0, 2, "if slot.cookie == 0: slot.cookie = cookie")
            a.jump(JEQ, 0, 0, "claimed")
        else:
            a.load(8, 1, 0, 0, "slot.cookie")
            a.jumpr(JEQ, 1, 2, "tracked")
    a.goto(missing)


def _bump(a: Asm, pointer: int, offset: int, by: int, note: str) -> None:
    """``*(u64 *)(pointer + offset) += by`` on this CPU's counters, without a locked instruction:
    nothing else writes this CPU's slot while the program runs (r5 is the scratch register)."""
    a.load(8, 5, pointer, offset, note)
    a.alur(ADD, 5, by)
    a.store(8, pointer, offset, 5)


def program_listing(layout: Layout | None = None, *, netns_cookie: int | None = None, feed: bool = False) -> str:
    """The assembled program as text (bcc's ``--ebpf``). Without ``layout``, this kernel's, or an
    example x86-64 layout when the BTF cannot be read."""
    if layout is None:
        try:
            layout = kernel_layout()
        except RecorderUnavailable:
            layout = _EXAMPLE_LAYOUT
    return assemble(layout, 3, 4, 5, netns_cookie, 6 if feed else None, slots=DEFAULT_CAPACITY).listing()


def _load(bpf: _Bpf, program: Asm, attach_btf_id: int) -> int:
    code = program.code()
    license_text = bpf.address(b"GPL\0")

    def attr(log_level: int, log_address: int, log_size: int) -> bytes:
        data = bytearray(120)
        struct.pack_into(
            "<IIQQIIQ", data, 0, _BPF_PROG_TYPE_TRACING, len(code) // 8, bpf.address(code), license_text,
            log_level, log_size, log_address,
        )  # fmt: skip
        data[48 : 48 + len(_PROG_NAME)] = _PROG_NAME.encode()
        struct.pack_into("<I", data, 68, _BPF_TRACE_RAW_TP)
        struct.pack_into("<I", data, 108, attach_btf_id)
        return bytes(data)

    try:
        return bpf.new_fd(bpf_asm.BPF_PROG_LOAD, attr(0, 0, 0), "loading the recorder's BPF program")
    except BpfUnavailable as first:
        size = 1 << 20
        log = bpf.address(bytes(size))
        try:
            return bpf.new_fd(bpf_asm.BPF_PROG_LOAD, attr(1, log, size), "loading the recorder's BPF program")
        except BpfUnavailable:
            text = bpf._ctypes.string_at(log, size).split(b"\0", 1)[0].decode("utf-8", "replace")
            lines = [line for line in text.splitlines() if line.strip()]
            raise BpfUnavailable(f"{first}: {lines[-1] if lines else 'no verifier log'}") from None


def _attach(bpf: _Bpf, prog_fd: int) -> int:
    """BPF_RAW_TRACEPOINT_OPEN with no name: a tp_btf program's attach point is in the program."""
    return bpf.new_fd(bpf_asm.BPF_RAW_TRACEPOINT_OPEN, struct.pack("<QII", 0, prog_fd, 0), "attaching the recorder")


def _link_prog_fd(bpf: _Bpf, link_fd: int) -> int:
    info = bpf_asm.object_info(bpf, link_fd, 64, "reading the recorder's link")
    (prog_id,) = struct.unpack_from("<I", info, 8)
    return bpf.new_fd(bpf_asm.BPF_PROG_GET_FD_BY_ID, struct.pack("<I4x", prog_id), "opening the recorder's program")


def netns_cookie_of(sock: socket.socket) -> int:
    """The network namespace cookie of ``sock``'s namespace (SO_NETNS_COOKIE, Linux 5.14+)."""
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, _SO_NETNS_COOKIE, 8), "little")


def socket_cookie(sock: socket.socket) -> int:
    """The socket's cookie (SO_COOKIE): what sock_diag reports and the recorder keys entries by."""
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, _SO_COOKIE, 8), "little")


def _cgroup2_mount(pid: int | str, proc_root: str) -> str | None:
    """Where the cgroup v2 hierarchy is mounted, as ``pid`` sees it (its mountinfo); None without one."""
    with open(f"{proc_root}/{pid}/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            if fields[fields.index("-") + 1] == "cgroup2":
                return fields[4]
    return None


def cgroup_id(pid: int | str = "self", proc_root: str = "/proc") -> int | None:
    """The cgroup v2 id of a process (what ``bpf_get_current_cgroup_id`` returns in its context):
    the inode of its cgroup directory under the cgroup2 mount; None without a cgroup2 mount.

    The mount is looked up as *this* process sees it, not as ``pid`` does: /proc/PID/cgroup names
    the path relative to the reader's cgroup namespace, and the stat runs in the reader's mount
    namespace. (``pid``'s own view may have no cgroup2 mount at all: ``ip netns exec`` remounts /sys.)"""
    mount = _cgroup2_mount("self", proc_root)
    if mount is None:
        return None
    with open(f"{proc_root}/{pid}/cgroup") as handle:
        for line in handle:
            if line.startswith("0::"):
                return os.stat(mount + line[3:].rstrip("\n")).st_ino
    return None


def cgroup_paths(proc_root: str = "/proc") -> dict[int, str]:
    """cgroup v2 id -> its path (``/system.slice/nginx.service``), for naming histogram keys; empty
    without a cgroup2 mount. One directory walk of the cgroup2 tree."""
    mount = _cgroup2_mount("self", proc_root)
    if mount is None:
        return {}
    paths: dict[int, str] = {}
    for directory, _subdirs, _files in os.walk(mount):
        with contextlib.suppress(OSError):
            paths[os.stat(directory).st_ino] = "/" + os.path.relpath(directory, mount).removeprefix(".")
    return paths


def is_bpffs(path: str) -> bool:
    from closewait.sources import _libc

    try:
        return _libc.statfs_type(path) == BPFFS_MAGIC
    except OSError:
        return False


def mount_bpffs(path: str = "/sys/fs/bpf") -> bool:
    """Make sure ``path`` is a bpffs; mount one there if not. True when this call mounted it."""
    if is_bpffs(path):
        return False
    import ctypes

    from closewait.sources import _libc

    os.makedirs(path, mode=0o700, exist_ok=True)
    if _libc.libc().mount(b"bpf", path.encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise RecorderUnavailable(f"cannot mount a bpffs at {path}: {os.strerror(err)}")
    return True


def bpffs_for(pin_dir: str) -> str | None:
    """Make sure ``pin_dir`` can be created on a bpffs; the mount point this call mounted, or None
    when ``pin_dir`` or its parent already is one.

    A bpffs is mounted only on the parent when that is an existing, empty directory (/sys/fs/bpf
    on a host that mounts none): never over a directory with content, which it would hide.
    """
    parent = os.path.dirname(os.path.abspath(pin_dir))
    if is_bpffs(pin_dir) or is_bpffs(parent):
        return None
    if os.geteuid() != 0:
        raise RecorderUnavailable(f"{parent} is not a bpffs, and mounting one there needs root")
    try:
        empty = not os.listdir(parent)
    except OSError as err:
        raise RecorderUnavailable(f"cannot use {parent} for a bpffs: {err.strerror or err}") from err
    if not empty:
        raise RecorderUnavailable(
            f"{parent} is not a bpffs and not an empty directory to mount one on (mount one: mount -t bpf bpf DIR)"
        )
    mount_bpffs(parent)
    return parent


#: What the kernel itself puts in a new bpffs (its preloaded iterators, CONFIG_BPF_PRELOAD).
_BPFFS_PRELOADED = frozenset({"maps.debug", "progs.debug"})


def unmount_bpffs(path: str) -> bool:
    """Unmount a bpffs this process mounted (``bpffs_for``), unless something is pinned in it
    (unmounting would drop those pins). True when it was unmounted."""
    import ctypes

    from closewait.sources import _libc

    if not is_bpffs(path):
        return False
    try:
        if set(os.listdir(path)) - _BPFFS_PRELOADED:
            return False
    except OSError:
        return False
    if _libc.libc().umount2(path.encode(), 0) != 0:
        err = ctypes.get_errno()
        raise RecorderUnavailable(f"cannot unmount the bpffs at {path}: {os.strerror(err)}")
    return True


class Recorder:
    """An attached (or pinned and opened) CLOSE_WAIT recorder. See the module docstring.

    Build one with ``Recorder.open()``, ``Recorder.open_pinned(pin_dir)`` or
    ``Recorder.attach_or_open_pinned(pin_dir)``; every failure is RecorderUnavailable with the reason.
    ``close()`` releases this process's descriptors: an unpinned recorder is detached, a pinned one
    stays attached for the other processes.
    """

    def __init__(self, bpf: _Bpf, fds: dict[str, int], *, pin_dir: str | None, netns: str | None) -> None:
        self._bpf = bpf
        self._fds = fds
        self.pin_dir = pin_dir
        self.netns = netns
        import mmap

        self._hist = MapAccess(bpf, fds["histograms"], _HIST_KEY.size, _HIST_VALUE.size)
        self._n_cpus = bpf_asm.possible_cpus()
        self._counters = MapAccess(bpf, fds["counters"], 4, _N_SLOTS * 8 * self._n_cpus)
        self._sync = StateCountSync()
        self._program: Asm | None = None
        self._feed: EventFeed | None = None
        self._self_test_cookie = 0
        self._synced_at = 0.0
        info = bpf_asm.map_info(bpf, fds["entries"])
        self.capacity = info.max_entries
        self._probes = min(PROBES, self.capacity)
        self._table = mmap.mmap(fds["entries"], self.capacity * _SLOT.size, mmap.MAP_SHARED, mmap.PROT_READ)
        self._words = memoryview(self._table).cast("Q")
        self._slots_map = MapAccess(bpf, fds["entries"], 4, _SLOT.size)
        #: Read a found slot's time through the mmap (True) or bpf(2) (see ``LOADS_IN_ORDER``).
        self.reads_by_mmap = LOADS_IN_ORDER
        self.histogram_capacity = bpf_asm.map_info(bpf, fds["histograms"]).max_entries

    # --- construction --------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        pin_dir: str | None = None,
        *,
        capacity: int = DEFAULT_CAPACITY,
        histogram_capacity: int = DEFAULT_HISTOGRAM_CAPACITY,
        netns: str | None = None,
        feed: bool = False,
        feed_bytes: int = DEFAULT_FEED_BYTES,
        btf_path: str = BTF_PATH,
    ) -> Recorder:
        """Load, attach and self-test a new recorder; pin it in ``pin_dir`` (a bpffs) if given.

        ``capacity``: slots of the entries table (rounded up to a power of two, 16 B each): at most
        that many sockets in CLOSE_WAIT at once get an exact age, and about half as many without
        a drop (see ``PROBES``); ``Recorder.capacity`` is the table's size.
        ``netns`` (a path such as ``/proc/PID/ns/net``) records only that network namespace;
        None records every namespace. The self-test runs inside it (its loopback must be up).
        ``feed`` adds a ring buffer of ``feed_bytes`` (a power of 2, at least a page) that every
        entry and leave is written to, read with ``feed()``; without it the program has no feed
        code at all (the exporter's recorder needs none; ``watch --events`` opens its own).
        """
        bpf = _new_bpf()
        try:
            recorder = _guarded(
                lambda: cls._attach(bpf, capacity, histogram_capacity, netns, btf_path, feed_bytes if feed else 0)
            )
        except BaseException:
            bpf.close()
            raise
        try:
            recorder.self_test()
            if pin_dir is not None:
                recorder._pin(pin_dir)
        except BaseException:
            recorder.close()
            raise
        return recorder

    @classmethod
    def _attach(
        cls,
        bpf: _Bpf,
        capacity: int,
        histogram_capacity: int,
        netns: str | None,
        btf_path: str,
        feed_bytes: int = 0,
    ) -> Recorder:
        layout = kernel_layout(btf_path)
        slots = table_slots(capacity)
        fds = {
            "entries": bpf_asm.create_map(
                bpf, _MAP_NAMES["entries"], bpf_asm.MAP_TYPE_ARRAY, 4, _SLOT.size, slots, bpf_asm.BPF_F_MMAPABLE
            ),
            "histograms": bpf_asm.create_map(
                bpf,
                _MAP_NAMES["histograms"],
                bpf_asm.MAP_TYPE_HASH,
                _HIST_KEY.size,
                _HIST_VALUE.size,
                histogram_capacity,
                bpf_asm.BPF_F_NO_PREALLOC,
            ),
            "counters": bpf_asm.create_map(
                bpf, _MAP_NAMES["counters"], bpf_asm.MAP_TYPE_PERCPU_ARRAY, 4, _N_SLOTS * 8, 1
            ),
        }
        if feed_bytes:
            fds["feed"] = bpf_asm.create_map(bpf, "cw_feed_v1", bpf_asm.MAP_TYPE_RINGBUF, 0, 0, feed_bytes)
        cookie = None
        if netns is not None:
            cookie = _in_netns(netns, _netns_cookie_here)
        program = assemble(
            layout, fds["entries"], fds["histograms"], fds["counters"], cookie, fds.get("feed"), slots=slots
        )
        fds["prog"] = _load(bpf, program, layout.attach_btf_id)
        fds["link"] = _attach(bpf, fds["prog"])
        recorder = cls(bpf, fds, pin_dir=None, netns=netns)
        recorder._program = program
        return recorder

    @classmethod
    def open_pinned(cls, pin_dir: str = DEFAULT_PIN_DIR) -> Recorder:
        """Open a recorder another process pinned in ``pin_dir``; RecorderUnavailable if there is none."""
        bpf = _new_bpf()
        try:
            return _guarded(lambda: cls._open_pinned(bpf, pin_dir))
        except BaseException:
            bpf.close()
            raise

    @classmethod
    def _open_pinned(cls, bpf: _Bpf, pin_dir: str) -> Recorder:
        fds: dict[str, int] = {}
        for name in ("link", *_MAP_NAMES):
            path = os.path.join(pin_dir, name)
            if not os.path.exists(path):
                raise RecorderUnavailable(f"no recorder is pinned in {pin_dir} ({path} does not exist)")
            fds[name] = bpf_asm.get_pinned(bpf, path)
        sizes = {
            "entries": (4, _SLOT.size),
            "histograms": (_HIST_KEY.size, _HIST_VALUE.size),
            "counters": (4, _N_SLOTS * 8),
        }
        for name, expected in _MAP_NAMES.items():
            info = bpf_asm.map_info(bpf, fds[name])
            if (info.name, (info.key_size, info.value_size)) != (expected, sizes[name]):
                raise RecorderUnavailable(
                    f"{pin_dir}/{name} is {info.name!r} with {info.key_size}/{info.value_size}-byte keys/values, "
                    f"not {expected!r} with {sizes[name]} (pinned by another version of closewait?)"
                )
        fds["prog"] = _link_prog_fd(bpf, fds["link"])
        return cls(bpf, fds, pin_dir=pin_dir, netns=None)

    @classmethod
    def attach_or_open_pinned(
        cls,
        pin_dir: str = DEFAULT_PIN_DIR,
        *,
        capacity: int = DEFAULT_CAPACITY,
        histogram_capacity: int = DEFAULT_HISTOGRAM_CAPACITY,
        btf_path: str = BTF_PATH,
        netns: str | None = None,
    ) -> Recorder:
        """The recorder pinned in ``pin_dir``, or a new one attached and pinned there (the
        directory is created on a bpffs: see ``mount_bpffs``). Two processes racing here end up
        sharing one recorder (the directory is flock()ed while deciding). The options apply only
        when a new recorder is attached (``netns``: record only that namespace, as ``open``)."""
        parent = os.path.dirname(os.path.abspath(pin_dir))
        if not (is_bpffs(pin_dir) or is_bpffs(parent)):
            raise RecorderUnavailable(f"{pin_dir} is not on a bpffs (mount one: mount -t bpf bpf {parent})")
        import fcntl

        try:
            os.makedirs(pin_dir, mode=0o700, exist_ok=True)
            lock = os.open(pin_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise RecorderUnavailable(f"cannot use {pin_dir}: {err.strerror or err}") from err
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if os.path.exists(os.path.join(pin_dir, "link")):
                return cls.open_pinned(pin_dir)
            return cls.open(
                pin_dir, capacity=capacity, histogram_capacity=histogram_capacity, btf_path=btf_path, netns=netns
            )
        finally:
            os.close(lock)

    def _pin(self, pin_dir: str) -> None:
        pinned: list[str] = []
        try:
            os.makedirs(pin_dir, mode=0o700, exist_ok=True)
            for name in (*_MAP_NAMES, "link"):  # the link last: its presence means "complete"
                path = os.path.join(pin_dir, name)
                bpf_asm.pin(self._bpf, self._fds[name], path)
                pinned.append(path)
        except (BpfUnavailable, OSError) as err:
            for path in pinned:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise RecorderUnavailable(f"cannot pin the recorder in {pin_dir}: {err}") from err
        self.pin_dir = pin_dir

    # --- reading -------------------------------------------------------------------------------------
    def entry_times(self, cookies: Iterable[int]) -> dict[int, int]:
        """cookie -> when that socket entered CLOSE_WAIT (ns since boot, CLOCK_MONOTONIC), for the
        cookies the recorder holds (sockets in CLOSE_WAIT that entered it while it was attached)."""
        found: dict[int, int] = {}
        for cookie in cookies:
            if cookie:
                entered = self._entry_time(cookie)
                if entered:
                    found[cookie] = entered
        return found

    def _entry_time(self, cookie: int) -> int:
        """The time in the slot holding ``cookie``, 0 if none does. The program writes a slot's time
        after its cookie and clears it before, so a time that is not 0, read between two sightings
        of the cookie, is this socket's. Every word is read whole (a native 8-byte load); the time
        is read through the mmap only where loads stay in order (``LOADS_IN_ORDER``)."""
        words = self._words
        home = 2 * (cookie & (self.capacity - 1))
        if words[home] != cookie:  # not in its home slot (where most are): look along its window
            end = home + 2 * self._probes
            window = words[home:end:2].tolist()
            if end > len(words):
                window += words[: end - len(words) : 2].tolist()
            try:
                home = (home + 2 * window.index(cookie)) % len(words)
            except ValueError:
                return 0
        if not self.reads_by_mmap:
            return self._read_slot(home // 2, cookie)
        entered = words[home + 1]
        return entered if words[home] == cookie else 0

    def _read_slot(self, slot: int, cookie: int) -> int:
        """The time in ``slot`` if it holds ``cookie``, read through bpf(2): the kernel copies the
        slot's 16 bytes, then a second lookup sees the cookie again (no user-space load order needed)."""
        key = slot.to_bytes(4, "little")
        value = self._slots_map.lookup(key)
        if value is None:
            return 0
        held, entered = _SLOT.unpack(value)
        if held != cookie or not entered:
            return 0
        again = self._slots_map.lookup(key)
        return entered if again is not None and _SLOT.unpack(again)[0] == cookie else 0

    def all_entry_times(self) -> dict[int, int]:
        """Every cookie held -> its entry time (reads the whole table: ``capacity`` slots)."""
        found: dict[int, int] = {}
        words = self._words
        for slot, cookie in enumerate(words[::2].tolist()):
            if cookie:
                if not self.reads_by_mmap:
                    entered = self._read_slot(slot, cookie)
                else:
                    entered = words[2 * slot + 1]  # between the two loads of the cookie
                    if words[2 * slot] != cookie:
                        entered = 0
                if entered:
                    found[cookie] = entered
        return found

    def histogram_items(self) -> dict[HistogramKey, Histogram]:
        """Every histogram, keyed by (cgroup id, tgid, reason)."""
        out: dict[HistogramKey, Histogram] = {}
        for key, value in self._hist.items():
            cgroup, tgid, reason = _HIST_KEY.unpack(key)
            numbers = _HIST_VALUE.unpack(value)
            out[HistogramKey(cgroup, tgid, LeaveReason(reason))] = Histogram.from_kernel(
                numbers[:N_BUCKETS], numbers[N_BUCKETS]
            )
        return out

    def histograms(self, reason: LeaveReason = LeaveReason.CLOSED) -> dict[tuple[int, int], Histogram]:
        """(cgroup id, tgid) -> dwell histogram of the sockets that left CLOSE_WAIT by ``reason``
        (CLOSED by default: the closer's own close()). RESET has the one key (0, 0)."""
        return {(k.cgroup_id, k.tgid): h for k, h in self.histogram_items().items() if k.reason == reason}

    def forget_histograms(self, keys: Iterable[HistogramKey]) -> int:
        """Delete these histograms (processes gone, say) to free their slots; how many were there."""
        return sum(self._hist.delete(_HIST_KEY.pack(k.cgroup_id, k.tgid, int(k.reason))) for k in keys)

    def _slots(self) -> list[int]:
        """The counters' u64 slots summed over CPUs (state deltas as signed numbers)."""
        value = self._counters.lookup(b"\0\0\0\0")
        if value is None:
            raise RecorderUnavailable("the recorder's counters map is empty")
        totals = [0] * _N_SLOTS
        stride = _N_SLOTS
        numbers = struct.unpack(f"<{_N_SLOTS * self._n_cpus}q", value)
        for cpu in range(self._n_cpus):
            base = cpu * stride
            for slot in range(_N_SLOTS):
                totals[slot] += numbers[base + slot]
        return totals

    def counters(self) -> Counters:
        slots = self._slots()
        return Counters(
            entered=slots[_SLOT_ENTERED],
            left_closed=slots[_SLOT_LEFT + LeaveReason.CLOSED],
            left_exited=slots[_SLOT_LEFT + LeaveReason.EXITED],
            left_reset=slots[_SLOT_LEFT + LeaveReason.RESET],
            left_untracked=slots[_SLOT_LEFT_UNTRACKED],
            histogram_dropped=slots[_SLOT_HIST_DROPPED],
            entries_dropped=slots[_SLOT_ENTRIES_DROPPED],
            transitions=slots[_SLOT_TRANSITIONS],
            missed=self.missed(),
        )

    def missed(self) -> int:
        """Program runs the kernel skipped (``recursion_misses`` of ``bpf_prog_info``)."""
        info = bpf_asm.object_info(self._bpf, self._fds["prog"], 232, "reading the recorder's program info")
        return int(struct.unpack_from("<Q", info, 208)[0])

    def program_stats(self) -> tuple[int, int]:
        """(run_time_ns, run_cnt) of the program: what it cost so far, counted only while the kernel's
        BPF statistics are on (``enable_run_stats`` or sysctl kernel.bpf_stats_enabled=1)."""
        info = bpf_asm.object_info(self._bpf, self._fds["prog"], 232, "reading the recorder's program info")
        run_time_ns, run_cnt = struct.unpack_from("<QQ", info, 192)
        return int(run_time_ns), int(run_cnt)

    def state_deltas(self) -> list[int]:
        """The kernel's per-state deltas since attach, indexed by state number (0..12)."""
        return self._slots()[:N_STATE_SLOTS]

    def resync(self, tries: int = 3) -> bool:
        """Pin the per-state counts to one sock_diag count (see ``StateCountSync``); True when the
        count was not raced by a transition (else the last try's midpoint is kept)."""
        from closewait.sources import netlink

        consistent = False
        for _ in range(tries):
            before = self.state_deltas()
            sock = _in_netns(self.netns, netlink.open_socket) if self.netns else None
            try:
                diag = netlink.count_by_state(sock=sock)
            finally:
                if sock is not None:
                    sock.close()
            after = self.state_deltas()
            consistent = self._sync.resync(diag, before, after)
            if consistent:
                break
        self._synced_at = time.monotonic()
        return consistent

    def state_counts(self, *, resync_every: float = 300.0) -> dict[TcpState, int]:
        """TCP sockets per state, from the kernel's deltas: one map read, no dump. A sock_diag
        count re-pins them on the first call and every ``resync_every`` seconds (TIME_WAIT,
        NEW_SYN_RECV and CLOSE, which the tracepoint cannot follow, are as of that count)."""
        if not self._sync.synced or time.monotonic() - self._synced_at >= resync_every:
            self.resync()
        return self._sync.counts(self.state_deltas())

    def feed(self) -> EventFeed:
        """The ring buffer of transitions (``open(feed=True)`` only); one reader at a time."""
        if "feed" not in self._fds:
            raise RecorderUnavailable("this recorder was opened without a feed (Recorder.open(feed=True))")
        if self._feed is None:
            size = bpf_asm.map_info(self._bpf, self._fds["feed"]).max_entries
            self._feed = EventFeed(self._fds["feed"], size, skip_cookie=self._self_test_cookie)
        return self._feed

    # --- about ---------------------------------------------------------------------------------------
    def memory(self) -> dict[str, int]:
        """Bytes the kernel charges for each map and the program (``memlock`` in /proc/self/fdinfo)."""
        return {name: bpf_asm.fd_memlock(fd) for name, fd in self._fds.items() if name != "link"}

    def feed_lost(self) -> int:
        """Feed records dropped because the ring buffer was full (the reader fell behind)."""
        return self._slots()[_SLOT_FEED_LOST]

    def listing(self) -> str:
        """The program as assembled (for a pinned recorder, as this version assembles it)."""
        return self._program.listing() if self._program is not None else program_listing()

    @property
    def pinned(self) -> bool:
        return self.pin_dir is not None

    # --- trust ---------------------------------------------------------------------------------------
    def self_test(self, timeout: float = 2.0) -> None:
        """One loopback connection whose peer closes: the recorder must see its server end enter
        CLOSE_WAIT with the right cookie and time, then leave it by our close() under our tgid."""
        try:
            _in_netns(self.netns, lambda: self._self_test(timeout))
        except RecorderUnavailable:
            raise
        except (OSError, ClosewaitError) as err:
            raise RecorderUnavailable(f"the recorder's self-test could not run: {err}") from err

    def _self_test(self, timeout: float) -> None:
        pid = os.getpid()
        our_cgroup = cgroup_id()
        with contextlib.ExitStack() as stack:
            listener = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            client = stack.enter_context(socket.create_connection(listener.getsockname(), timeout=timeout))
            server, _ = listener.accept()
            stack.enter_context(server)
            server.settimeout(timeout)
            cookie = socket_cookie(server)
            self._self_test_cookie = cookie
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            client.shutdown(socket.SHUT_WR)
            if server.recv(1) != b"":
                raise RecorderUnavailable("self-test: the peer's FIN did not arrive")
            after = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            entered = self.entry_times([cookie]).get(cookie)
            if entered is None:
                raise RecorderUnavailable("self-test: the recorder did not see a socket enter CLOSE_WAIT")
            if not before <= entered <= after:
                raise RecorderUnavailable(f"self-test: entry time {entered} is outside [{before}, {after}]")
            closed_before = self._closed_by(pid, our_cgroup)
            server.close()
            if self.entry_times([cookie]):
                raise RecorderUnavailable("self-test: the recorder did not see the socket leave CLOSE_WAIT")
            if self._closed_by(pid, our_cgroup) <= closed_before:  # (other threads may close too)
                raise RecorderUnavailable(
                    f"self-test: the close was not counted under this process (tgid {pid}, cgroup {our_cgroup})"
                )

    def _closed_by(self, tgid: int, cgroup: int | None) -> int:
        return sum(
            h.count for (cg, pid), h in self.histograms().items() if pid == tgid and (cgroup is None or cg == cgroup)
        )

    # --- teardown ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release this process's descriptors (an unpinned recorder is detached by this)."""
        if self._feed is not None:
            self._feed.close()
            self._feed = None
        self._words.release()
        self._table.close()
        self._bpf.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventFeed:
    """Reads the recorder's ring buffer (BPF_MAP_TYPE_RINGBUF) through two mmap()s, as libbpf's
    ring_buffer does: the consumer page (ours to advance) and the producer page followed by the data,
    mapped twice in a row so a record that wraps around reads contiguously.

    The program submits records without waking the reader (BPF_RB_NO_WAKEUP): with a reader asleep
    in epoll, every record would cost the kernel a wakeup, ~1 µs per record, five times the whole
    program. The reader polls instead, every ``interval`` seconds while it waits."""

    _BUSY = 1 << 31
    _DISCARD = 1 << 30

    def __init__(self, map_fd: int, size: int, *, skip_cookie: int = 0, interval: float = 0.05) -> None:
        """``skip_cookie``: a socket whose transitions are left out (the recorder's self-test)."""
        import mmap

        page = mmap.PAGESIZE
        self._page = page
        self._mask = size - 1
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._data = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._skip = skip_cookie
        self.interval = interval

    def read(self, timeout: float | None = 0.0) -> list[Transition]:
        """The transitions written since the last read; waits up to ``timeout`` seconds (None:
        forever) for the first when there are none."""
        deadline = None if timeout is None else time.monotonic() + timeout
        found = self._drain()
        while not found and (deadline is None or time.monotonic() < deadline):
            time.sleep(self.interval if deadline is None else max(0.0, min(self.interval, deadline - time.monotonic())))
            found = self._drain()
        return found

    def _drain(self) -> list[Transition]:
        (consumer,) = struct.unpack_from("<Q", self._consumer, 0)
        (producer,) = struct.unpack_from("<Q", self._data, 0)
        found: list[Transition] = []
        while consumer < producer:
            at = self._page + (consumer & self._mask)
            (header,) = struct.unpack_from("<I", self._data, at)
            if header & self._BUSY:
                break  # reserved, not yet submitted
            length = header & ~(self._BUSY | self._DISCARD)
            if not header & self._DISCARD and length == _FEED_RECORD.size:
                transition = parse_feed_record(self._data, at + 8)
                if transition.cookie != self._skip:
                    found.append(transition)
            consumer += (length + 8 + 7) & ~7
        struct.pack_into("<Q", self._consumer, 0, consumer)
        return found

    def close(self) -> None:
        self._consumer.close()
        self._data.close()


def parse_feed_record(data: bytes | mmap.mmap, offset: int = 0) -> Transition:
    """A ``Transition`` from the ``_FEED_RECORD`` at ``offset`` of ``data``."""
    (time_ns, cookie, cgroup, dwell, tgid, old, new, reason, family, lport, rport_be, local, remote, comm) = (
        _FEED_RECORD.unpack_from(data, offset)
    )
    remote_port = ((rport_be & 0xFF) << 8) | (rport_be >> 8)
    if family == socket.AF_INET6:
        local_text, remote_text = socket.inet_ntop(family, local), socket.inet_ntop(family, remote)
    else:
        local_text, remote_text = socket.inet_ntop(family, local[:4]), socket.inet_ntop(family, remote[:4])
    ends = (Endpoint(local_text, lport), Endpoint(remote_text, remote_port))
    if reason == _FEED_ENTERED:
        return Transition(time_ns, cookie, TcpState(old), TcpState(new), *ends)
    how = LeaveReason(reason)
    owner = how != LeaveReason.RESET
    return Transition(
        time_ns,
        cookie,
        TcpState(old),
        TcpState(new),
        *ends,
        reason=how,
        dwell_ns=dwell,
        tgid=tgid if owner else None,
        comm=comm.split(b"\0", 1)[0].decode("utf-8", "replace") if owner else None,
        cgroup_id=cgroup if owner else None,
    )


@contextlib.contextmanager
def enable_run_stats() -> Iterator[None]:
    """Have the kernel time every BPF program run while the block runs (BPF_ENABLE_STATS; it costs
    two clock reads per run of every program on the host, so only for measuring)."""
    bpf = _new_bpf()
    try:
        _guarded_call(lambda: bpf.new_fd(bpf_asm.BPF_ENABLE_STATS, struct.pack("<I", 0), "enabling BPF run statistics"))
        yield
    finally:
        bpf.close()


def unpin(pin_dir: str = DEFAULT_PIN_DIR) -> bool:
    """Remove a pinned recorder (detached once no process holds it open); True if one was there."""
    removed = False
    for name in ("link", *_MAP_NAMES):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(pin_dir, name))
            removed = True
    with contextlib.suppress(OSError):
        os.rmdir(pin_dir)
    return removed


def _new_bpf() -> _Bpf:
    try:
        return _Bpf()
    except BpfUnavailable as err:
        raise RecorderUnavailable(str(err)) from err


def _guarded(build: Callable[[], Recorder]) -> Recorder:
    """Run ``build``; every BPF or kernel-data failure becomes RecorderUnavailable."""
    try:
        return build()
    except RecorderUnavailable:
        raise
    except (BpfUnavailable, ClosewaitError) as err:
        raise RecorderUnavailable(str(err)) from err
    except OSError as err:
        raise RecorderUnavailable(f"the recorder cannot start: {err.strerror or err}") from err


def _guarded_call(action: Callable[[], _T]) -> _T:
    try:
        return action()
    except BpfUnavailable as err:
        raise RecorderUnavailable(str(err)) from err


def _netns_cookie_here() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            return netns_cookie_of(probe)
        except OSError as err:
            if err.errno == errno.ENOPROTOOPT:
                raise RecorderUnavailable("this kernel has no SO_NETNS_COOKIE (Linux 5.14+)") from None
            raise


def _in_netns(path: str | None, action: Callable[[], _T]) -> _T:
    if path is None:
        return action()
    from closewait.sources import netns

    with netns.entered(netns.resolve(path)):
        return action()


__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_HISTOGRAM_CAPACITY",
    "DEFAULT_PIN_DIR",
    "EventFeed",
    "Recorder",
    "RecorderUnavailable",
    "bpffs_for",
    "cgroup_id",
    "cgroup_paths",
    "enable_run_stats",
    "is_bpffs",
    "mount_bpffs",
    "program_listing",
    "socket_cookie",
    "unmount_bpffs",
    "unpin",
]
