"""The recorder's pure parts: histogram arithmetic, state-count resynchronisation, the assembler and
disassembler, and the BTF index on malformed data. No kernel needed (the BTF test reads this
kernel's types when they are there)."""

from __future__ import annotations

import math
import struct

import pytest

from closewait.errors import KernelDataError
from closewait.events import (
    BUCKET_BOUNDS,
    BUCKET_BOUNDS_NS,
    N_BUCKETS,
    TRACKED_STATES,
    Counters,
    Histogram,
    StateCountSync,
    bucket_index,
    merge_histograms,
)
from closewait.model import TcpState
from closewait.sources import bpf_asm
from closewait.sources.bpf import BpfUnavailable
from closewait.sources.recorder import program_listing


def test_bucket_index_treats_bounds_as_inclusive() -> None:
    assert bucket_index(0) == 0
    assert bucket_index(1_000_000) == 0
    assert bucket_index(1_000_001) == 1
    assert bucket_index(50_000_000) == 3
    assert bucket_index(50_000_001) == 4
    assert bucket_index(3600 * 10**9) == len(BUCKET_BOUNDS) - 1
    assert bucket_index(3600 * 10**9 + 1) == len(BUCKET_BOUNDS)
    assert len(BUCKET_BOUNDS_NS) == len(BUCKET_BOUNDS) == N_BUCKETS - 1


def test_histogram_cumulative_and_arithmetic() -> None:
    counts = [0] * N_BUCKETS
    counts[0], counts[3], counts[-1] = 5, 2, 1
    histogram = Histogram(tuple(counts), 7200.5)
    cumulative = histogram.cumulative()
    assert cumulative[0] == (0.001, 5)
    assert cumulative[3] == (0.05, 7)
    assert cumulative[-1] == (math.inf, 8)
    assert histogram.count == 8
    doubled = merge_histograms([histogram, histogram])
    assert doubled.count == 16
    assert (doubled - histogram) == histogram
    with pytest.raises(ValueError, match="bucket counts"):
        Histogram((1, 2), 0.0)


def test_histogram_quantile_interpolates_like_promql() -> None:
    counts = [0] * N_BUCKETS
    counts[1] = 10  # all in (1 ms, 5 ms]
    histogram = Histogram(tuple(counts), 0.03)
    assert histogram.quantile(0.5) == pytest.approx(0.003)
    assert histogram.quantile(1.0) == pytest.approx(0.005)
    assert math.isnan(Histogram.empty().quantile(0.99))
    only_inf = [0] * N_BUCKETS
    only_inf[-1] = 1
    assert Histogram(tuple(only_inf), 9000.0).quantile(0.5) == 3600.0


def test_ages_from_the_monotonic_clock() -> None:
    from closewait.events import age_seconds, wall_time

    assert age_seconds(1_000_000_000, 4_500_000_000) == 3.5
    assert age_seconds(5, 4) == 0.0  # read just before the kernel stamped it
    assert wall_time(1_000_000_000, 4_000_000_000, 1_700_000_000.0) == 1_699_999_997.0


def test_counters_difference_and_reasons() -> None:
    later = Counters(10, 5, 2, 1, 4, 0, 1, 100, 0)
    earlier = Counters(4, 2, 0, 1, 0, 0, 0, 40, 0)
    changed = later - earlier
    assert changed == Counters(6, 3, 2, 0, 4, 0, 1, 60, 0)
    assert changed.left == 5


def test_state_count_sync_pins_deltas_to_a_dump() -> None:
    sync = StateCountSync()
    assert not sync.synced
    deltas = [0] * 13
    deltas[TcpState.ESTABLISHED] = -3  # three established sockets existed before attach and closed since
    diag = dict.fromkeys(TcpState, 0)
    diag[TcpState.ESTABLISHED] = 10
    diag[TcpState.TIME_WAIT] = 7
    assert sync.resync(diag, deltas, deltas)
    assert sync.counts(deltas)[TcpState.ESTABLISHED] == 10
    later = list(deltas)
    later[TcpState.ESTABLISHED] += 5
    later[TcpState.CLOSE_WAIT] += 2
    counts = sync.counts(later)
    assert counts[TcpState.ESTABLISHED] == 15
    assert counts[TcpState.CLOSE_WAIT] == 2
    assert counts[TcpState.TIME_WAIT] == 7  # untracked: as of the dump
    raced = list(deltas)
    raced[TcpState.LISTEN] += 2
    assert not sync.resync(diag, deltas, raced)
    assert sync.counts(raced)[TcpState.LISTEN] == 1  # midpoint: off by at most half the race
    assert TcpState.TIME_WAIT not in TRACKED_STATES


def test_assembler_resolves_labels_and_lists_them() -> None:
    a = bpf_asm.Asm()
    a.movi(0, 0)
    a.jump(bpf_asm.JEQ, 1, 0, "done", "skip")
    a.ld_imm64(2, 1 << 40)
    a.label("done")
    a.exit()
    code = a.code()
    assert len(code) == 5 * 8
    _op, _regs, offset, _imm = struct.unpack_from("<BBhi", code, 8)
    assert offset == 2  # over the two slots of ld_imm64
    text = a.listing()
    assert "if r1 == 0 goto done" in text
    assert "; skip" in text
    assert "r2 = 0x10000000000 ll" in text
    bad = bpf_asm.Asm()
    bad.goto("nowhere")
    with pytest.raises(ValueError, match="undefined label"):
        bad.code()


def test_atomics_are_encoded_and_listed_as_the_verifier_writes_them() -> None:
    a = bpf_asm.Asm()
    a.atomic_add(1, 8, 2)
    a.xchg(3, 0, 4)
    a.cmpxchg(5, 16, 6)
    code = a.code()
    assert [struct.unpack_from("<BBhi", code, 8 * i) for i in range(3)] == [
        (0xDB, 0x21, 8, 0x00),  # BPF_STX | BPF_ATOMIC | BPF_DW, imm BPF_ADD
        (0xDB, 0x43, 0, 0xE1),  # BPF_XCHG (0xe0 | BPF_FETCH)
        (0xDB, 0x65, 16, 0xF1),  # BPF_CMPXCHG (0xf0 | BPF_FETCH)
    ]
    assert a.listing().splitlines() == [
        "     0: lock *(u64 *)(r1 +8) += r2",
        "     1: r4 = atomic64_xchg((u64 *)(r3 +0), r4)",
        "     2: r0 = atomic64_cmpxchg((u64 *)(r5 +16), r0, r6)",
    ]


def test_program_listing_without_a_kernel_shows_every_edge() -> None:
    text = program_listing(netns_cookie=42)
    for expected in ("call ktime_get_ns", "call get_current_task_btf", "bucket[+Inf]++", "entered++", "0x2a ll"):
        assert expected in text


def test_btf_index_refuses_malformed_data() -> None:
    with pytest.raises(KernelDataError):
        bpf_asm.Btf(b"\0" * 8)
    with pytest.raises(KernelDataError, match="not BTF"):
        bpf_asm.Btf(b"\0" * 32)
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, 12, 12, 1)
    one_struct_truncated = struct.pack("<III", 0, (4 << 24) | 5, 8)  # a struct claiming 5 members, none there
    with pytest.raises(KernelDataError):
        bpf_asm.Btf(header + one_struct_truncated + b"\0")


def test_btf_index_on_this_kernel() -> None:
    from closewait.sources.bpf import read_btf

    try:
        btf = bpf_asm.Btf(read_btf())
    except BpfUnavailable as err:
        pytest.skip(str(err))
    assert btf.member("sock", "sk_protocol").size == 2
    assert btf.member("sock", "__sk_common.skc_cookie").size == 8
    with pytest.raises(BpfUnavailable):
        btf.member("sock", "no_such_member")
    with pytest.raises(BpfUnavailable):
        btf.type_id("btf_trace_no_such_tracepoint", bpf_asm.KIND_TYPEDEF)
