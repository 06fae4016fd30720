"""The recorder's program as it was before the entries table (for ``bench_recorder.py --compare``).

Until December 2026 the recorder kept CLOSE_WAIT entry times in a preallocated BPF hash keyed by
socket cookie: ``map_update_elem`` on entry, ``map_lookup_elem`` + ``map_delete_elem`` on exit
(80 bytes per tracked socket). ``src/`` now uses an open-addressed array table instead; this copy
of the old program exists only so the benchmark can measure both side by side in one run, on the
same churn. It is attached without the recorder's self-test and read only for the kernel's run
statistics; nothing in ``src/`` uses it.
"""

from __future__ import annotations

import struct

from closewait.events import BUCKET_BOUNDS_NS, N_BUCKETS, LeaveReason
from closewait.sources import bpf_asm
from closewait.sources.bpf_asm import ADD, AND, JEQ, JGT, JLE, JNE, LSH, RSH, SUB, Asm
from closewait.sources.recorder import (
    _FEED_ENTERED,
    _HIST_KEY,
    _HIST_VALUE,
    _IPPROTO_TCP,
    _N_SLOTS,
    _PF_EXITING,
    _SEND_SHUTDOWN,
    _SLOT_ENTERED,
    _SLOT_ENTRIES_DROPPED,
    _SLOT_HIST_DROPPED,
    _SLOT_LEFT,
    _SLOT_LEFT_UNTRACKED,
    _SLOT_TRANSITIONS,
    N_STATE_SLOTS,
    Layout,
    _attach,
    _bump,
    _emit,
    _load,
    _new_bpf,
    kernel_layout,
)

_BPF_ANY = 0


class HashRecorder:
    """The old program attached with its maps; ``program_stats()`` as ``Recorder.program_stats``."""

    def __init__(self, capacity: int) -> None:
        self._bpf = bpf = _new_bpf()
        try:
            layout = kernel_layout()
            self._fds = {
                "entries": bpf_asm.create_map(bpf, "cw_old_entries", bpf_asm.MAP_TYPE_HASH, 8, 8, capacity),
                "histograms": bpf_asm.create_map(
                    bpf, "cw_old_hist", bpf_asm.MAP_TYPE_HASH, _HIST_KEY.size, _HIST_VALUE.size, 16384, 1
                ),
                "counters": bpf_asm.create_map(
                    bpf, "cw_old_counters", bpf_asm.MAP_TYPE_PERCPU_ARRAY, 4, _N_SLOTS * 8, 1
                ),
            }
            program = assemble(layout, self._fds["entries"], self._fds["histograms"], self._fds["counters"], None)
            self._fds["prog"] = _load(bpf, program, layout.attach_btf_id)
            self._fds["link"] = _attach(bpf, self._fds["prog"])
        except BaseException:
            bpf.close()
            raise

    def program_stats(self) -> tuple[int, int]:
        info = bpf_asm.object_info(self._bpf, self._fds["prog"], 232, "reading the old program's info")
        run_time_ns, run_cnt = struct.unpack_from("<QQ", info, 192)
        return int(run_time_ns), int(run_cnt)

    def memory(self) -> dict[str, int]:
        return {name: bpf_asm.fd_memlock(fd) for name, fd in self._fds.items() if name != "link"}

    def close(self) -> None:
        self._bpf.close()

    def __enter__(self) -> HashRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def assemble(
    layout: Layout,
    entries_fd: int,
    hist_fd: int,
    counters_fd: int,
    netns_cookie: int | None,
    feed_fd: int | None = None,
) -> Asm:
    """The program. In C it would read::

        if (!sk || sk->sk_protocol != IPPROTO_TCP) return 0;
        if (NETNS && sk->__sk_common.skc_net.net->net_cookie != NETNS) return 0;
        c = counters[0]; c->transitions++;
        if (new < 13 && new != CLOSE) c->state[new]++;
        if (old < 13 && old != CLOSE && !(old == LISTEN && new == SYN_RECV)) c->state[old]--;
        if (new == CLOSE_WAIT) {
            c->entered++;
            if (update(entries, cookie(sk), ktime())) c->entries_dropped++;  /* full */
            return 0;
        }
        if (old != CLOSE_WAIT) return 0;
        t = entries[cookie(sk)]; if (!t) { c->left_untracked++; return 0; }
        dwell = ktime() - *t; delete entries[cookie(sk)];
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
    # Stack: fp-8 cookie, fp-16 time (entry, then dwell), fp-32 histogram key (cgroup u64, tgid u32,
    # reason u32), fp-40 array key, fp-48 now, fp-64 comm, from fp-208 zeroes for a new histogram.
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
    # Leaving CLOSE_WAIT.
    a.mov(1, 6)
    a.call("get_socket_cookie")
    a.store(8, 10, -8, 0)
    a.ld_map(1, entries_fd)
    a.mov(2, 10)
    a.alu(ADD, 2, -8)
    a.call("map_lookup_elem", "entry time")
    a.jump(JNE, 0, 0, "tracked")
    a.movi(1, 1)
    _bump(a, 9, _SLOT_LEFT_UNTRACKED * 8, 1, "left_untracked++")
    a.goto("out")
    a.label("tracked")
    a.load(8, 1, 0, 0)
    a.store(8, 10, -16, 1)
    a.call("ktime_get_ns")
    a.store(8, 10, -48, 0)
    a.load(8, 1, 10, -16)
    a.alur(SUB, 0, 1)
    a.store(8, 10, -16, 0, "dwell = now - entry")
    a.ld_map(1, entries_fd)
    a.mov(2, 10)
    a.alu(ADD, 2, -8)
    a.call("map_delete_elem")
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
    a.call("get_socket_cookie")
    a.store(8, 10, -8, 0)
    a.call("ktime_get_ns")
    a.store(8, 10, -16, 0)
    a.ld_map(1, entries_fd)
    a.mov(2, 10)
    a.alu(ADD, 2, -8)
    a.mov(3, 10)
    a.alu(ADD, 3, -16)
    a.movi(4, _BPF_ANY)
    a.call("map_update_elem", "entries[cookie] = now")
    a.movi(1, 1)
    a.jump(JEQ, 0, 0, "entered")
    _bump(a, 9, _SLOT_ENTRIES_DROPPED * 8, 1, "entries_dropped++ (map full)")
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
