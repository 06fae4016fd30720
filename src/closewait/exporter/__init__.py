"""closewait's Prometheus exporter: ``collector`` turns scans into metric families (no HTTP),
``http`` serves a registry at /metrics. prometheus_client is imported here and nowhere else in the
library (``closewait.cli.exporter`` is the command).

Nothing is registered at import::

    from closewait.exporter import CloseWaitCollector, MetricsServer, build_registry, parse_listen

    registry = build_registry(CloseWaitCollector(top_n=20, min_interval=5))
    server = MetricsServer(registry, *parse_listen("127.0.0.1:9947"))
    server.start()
"""

from __future__ import annotations

from closewait.exporter.collector import (
    DEFAULT_MIN_INTERVAL,
    DEFAULT_TOP_N,
    ERROR_KINDS,
    CloseWaitCollector,
    Folded,
    Namespaces,
    ScanResult,
    build_registry,
    fold_rows,
    rows_from_snapshot,
    state_label,
)
from closewait.exporter.http import DEFAULT_LISTEN, MetricsServer, parse_listen
from closewait.exporter.series import WORKLOAD_LABELS, RowKey, workload_labels

__all__ = [
    "DEFAULT_LISTEN",
    "DEFAULT_MIN_INTERVAL",
    "DEFAULT_TOP_N",
    "ERROR_KINDS",
    "WORKLOAD_LABELS",
    "CloseWaitCollector",
    "Folded",
    "MetricsServer",
    "Namespaces",
    "RowKey",
    "ScanResult",
    "build_registry",
    "fold_rows",
    "parse_listen",
    "rows_from_snapshot",
    "state_label",
    "workload_labels",
]
