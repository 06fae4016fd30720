"""DwellTotals: the exporter's close-time series are bounded like the CLOSE_WAIT series and never go down."""

from __future__ import annotations

from closewait.events import N_BUCKETS, Histogram
from closewait.exporter.recording import DwellTotals, histogram_buckets
from closewait.exporter.series import RowKey


def _one(bucket: int) -> Histogram:
    counts = [0] * N_BUCKETS
    counts[bucket] = 1
    return Histogram(tuple(counts), 0.5)


def test_top_workloads_and_processes_keep_series_the_rest_fold_for_good() -> None:
    totals = DwellTotals(top_n=2)
    a1, a2, a3 = (RowKey("", "", "", "a.service", name) for name in ("p1", "p2", "p3"))
    b1 = RowKey("shop", "cart", "app", "", "python3")
    c1 = RowKey("", "", "c", "", "nginx")
    for key in (a1, a2, a3, b1, c1):
        totals.add(key, _one(0))
    assert set(totals.totals) == {
        a1,
        a2,
        RowKey("", "", "", "a.service", "other"),  # a's third process name
        b1,
        RowKey("", "", "", "", "other"),  # a third workload
    }
    # Later activity of a folded label set stays folded, even if it is now the busiest: no series goes down.
    for _ in range(10):
        totals.add(c1, _one(3))
    assert c1 not in totals.totals
    other = totals.totals[RowKey("", "", "", "", "other")]
    assert other.count == 11
    assert totals.totals[a1].count == 1


def test_top_zero_folds_everything_into_one_series() -> None:
    totals = DwellTotals(top_n=0)
    totals.add(RowKey("", "", "", "x.service", "x"), _one(1))
    assert list(totals.totals) == [RowKey("", "", "", "", "other")]


def test_a_workload_per_netns_and_one_other_series_whatever_the_namespaces() -> None:
    """With --all-netns the same workload labels in two namespaces are two workloads; workloads beyond
    ``top_n`` fold into the one series with no netns, so namespaces that come and go add no series."""
    totals = DwellTotals(top_n=2)
    host = RowKey("", "", "", "nginx.service", "nginx", netns="1/systemd")
    guest = host._replace(netns="4711/nginx")
    late = [host._replace(netns=f"{pid}/nginx") for pid in range(5000, 5010)]
    for key in (host, guest, *late):
        totals.add(key, _one(0))
    assert set(totals.totals) == {host, guest, RowKey("", "", "", "", "other")}
    assert totals.totals[RowKey("", "", "", "", "other")].count == len(late)


def test_buckets_are_cumulative_with_prometheus_le_labels() -> None:
    buckets = histogram_buckets(_one(1) + _one(N_BUCKETS - 1))
    assert buckets[0] == ("0.001", 0.0)
    assert buckets[1] == ("0.005", 1.0)
    assert buckets[6] == ("1.0", 1.0)
    assert buckets[-1] == ("+Inf", 2.0)
