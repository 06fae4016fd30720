"""The terminal view of a Snapshot (``closewait scan``): by workload, then process (``--by workload``,
the default), or by process alone (``--by process``)."""

from __future__ import annotations

import os

from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from closewait.cli.render import console
from closewait.diagnosis import CODES
from closewait.display import format_clock, format_command, format_duration, plural
from closewait.model import AgeSource, Finding, ProcessGroup, Snapshot, TcpState, WorkloadGroup

#: Rows shown per process unless --wide.
ROWS_PER_PROCESS = 10


def _process_title(group: ProcessGroup, snapshot: Snapshot) -> Text:
    process = group.process
    if process is None:
        if not snapshot.owners_resolved:
            return Text("owners not looked up (--no-owners)", style="bold yellow")
        if all(f.socket.inode == 0 for f in group.findings):
            # TIME_WAIT, orphaned FIN_WAIT2: the program closed them; only the kernel holds them now.
            return Text("no owning process (closed by its program, the kernel finishes the teardown)", style="bold")
        if snapshot.errors:
            why = "refused even to root" if os.geteuid() == 0 else "permission denied, run as root"
            return Text(f"owner unknown ({why})", style="bold yellow")
        return Text("owner unknown (no process holds a descriptor; it may have just exited)", style="bold yellow")
    cmd = format_command(process.cmdline, process.name, 100)
    title = Text()
    title.append(f"pid {process.pid}", style="bold")
    title.append(f"  {process.name}", style="bold cyan")
    title.append(f"  {cmd}", style="dim")
    return title


def _group_summary(group: ProcessGroup, states: frozenset[TcpState]) -> Text:
    roles = sorted({f.role.value for f in group.findings})
    what = "socket" if len(states) != 1 else f"{next(iter(states)).name} socket"
    line = Text("  ")
    line.append(plural(group.count, what), style="bold red" if TcpState.CLOSE_WAIT in states else "bold")
    line.append(f"  role {'/'.join(roles)}")
    if group.oldest_idle_ms is not None:
        line.append(f"  oldest idle {format_duration(group.oldest_idle_ms)}")
    if group.unread_bytes:
        line.append(f"  unread {group.unread_bytes} B")
    return line


def _hanging(label: Text, text: str) -> Table:
    """``label`` then ``text``; lines that wrap start under the text, not under the label."""
    grid = Table.grid()
    grid.add_column(no_wrap=True)
    grid.add_column()
    grid.add_row(label, Text(text))
    return grid


def _diagnosis_lines(group: ProcessGroup) -> list[Table]:
    lines: list[Table] = []
    seen: dict[str, Finding] = {}
    counts = group.diagnosis_counts()
    for finding in group.findings:
        if finding.diagnosis and finding.diagnosis.code not in seen:
            seen[finding.diagnosis.code] = finding
    order = list(CODES)
    for code, finding in sorted(
        seen.items(), key=lambda item: (-counts[item[0]], order.index(item[0]) if item[0] in order else len(order))
    ):
        assert finding.diagnosis is not None
        label = Text("  ")
        label.append(f"{code}", style="bold magenta")
        label.append(f" x{counts[code]}: ", style="magenta")
        # The summary names one socket; with several, it is an example of them.
        summary = finding.diagnosis.summary if counts[code] == 1 else f"e.g. {finding.diagnosis.summary}"
        lines.append(_hanging(label, summary))
        lines.append(_hanging(Text("    fix: ", style="green"), finding.diagnosis.remedy))
    return lines


#: Columns right-aligned (numbers); STATE, LOCAL and REMOTE are never folded by rich's table either.
_NUMERIC = frozenset({"IDLE", "RECV-Q", "SEND-Q", "FD"})
_KEEP = _NUMERIC | {"STATE", "LOCAL", "REMOTE", "STUCK SINCE"}
#: The table's layout: two spaces before it, two between columns (what rich's grid printed).
_INDENT = "  "
_GAP = "  "
#: Rows written per call to the console: output starts before a long table is formatted to its end.
_CHUNK_ROWS = 1000
#: Up to this many rows a table too wide for the terminal is left to rich, which folds the ROLE and
#: DIAGNOSIS cells; beyond it, rich's per-cell measuring takes seconds, so lines are printed whole
#: (the terminal wraps them; nothing is cut).
_RICH_MAX_ROWS = 200


def _socket_rows(group: ProcessGroup, multi_state: bool, wide: bool) -> tuple[list[str], list[list[str]]]:
    """The table's headers and cells, one row per socket."""
    # The group's summary line already says the role when every socket shares it.
    show_role = len({f.role for f in group.findings}) > 1
    headers = ["LOCAL", "REMOTE", "IDLE", "RECV-Q", "SEND-Q", "FD", "ROLE", "DIAGNOSIS"]
    if multi_state:
        headers.insert(0, "STATE")
    rows = group.findings if wide else group.findings[:ROWS_PER_PROCESS]
    # Exact ages (a recorder is running): "stuck since" when the peer's FIN arrived, and for how long.
    stuck_since = any(f.age is not None and f.age.source is AgeSource.EXACT for f in rows)
    if stuck_since:
        headers.insert(headers.index("IDLE"), "STUCK SINCE")
    pid = group.process.pid if group.process else None
    body: list[list[str]] = []
    for finding in rows:
        sock = finding.socket
        fds = ",".join(str(o.fd) for o in finding.owners if o.process.pid == pid) or "-"
        cells = [
            str(sock.local),
            str(sock.remote),
            format_duration(sock.idle_ms) if sock.idle_ms is not None else "-",
            str(sock.recv_q),
            str(sock.send_q),
            fds,
            finding.role.value,
            finding.diagnosis.code if finding.diagnosis else "",
        ]
        if multi_state:
            cells.insert(0, sock.state.ss_name)
        if stuck_since:
            cells.insert(headers.index("STUCK SINCE"), _stuck_since(finding))
        body.append(cells)
    if not show_role:
        role_index = headers.index("ROLE")
        del headers[role_index]
        for cells in body:
            del cells[role_index]
    return headers, body


def _stuck_since(finding: Finding) -> str:
    """``11:55:21 (3.2 s)``: when the socket entered CLOSE_WAIT and how long ago, if known exactly."""
    age = finding.age
    if age is None or age.source is not AgeSource.EXACT:
        return "-"
    return f"{format_clock(age.since)} ({format_duration(age.ms)})"


def _rich_table(headers: list[str], body: list[list[str]]) -> Table:
    """The table through rich: on a narrow terminal it folds ROLE and DIAGNOSIS, never an endpoint."""
    table = Table(box=None, padding=(0, 1), pad_edge=False, show_edge=False, header_style="dim")
    for index, header in enumerate(headers):
        width = max([len(header), *(len(row[index]) for row in body)])
        numeric = header in _NUMERIC
        table.add_column(
            header,
            justify="right" if numeric else "left",
            min_width=width if header in _KEEP else None,
            overflow="fold",
        )
    for cells in body:
        table.add_row(*[escape(c) for c in cells])
    return table


def _print_socket_table(out: Console, group: ProcessGroup, multi_state: bool, wide: bool) -> None:
    """One row per socket. Endpoints and codes are never cut: on a narrow terminal the table
    wraps rather than print ``127.0.0.1:4…``, which would hide the one thing a reader needs.

    The column widths are computed once here and each row is one plain line (what rich's table
    printed, at a fraction of the cost: rich measures every cell, ~0.65 ms a row, and prints
    nothing until the whole table is laid out; 20,000 rows took 14-27 s). The cells are ASCII
    (addresses, numbers, state and diagnosis names), so a cell's width is its length.
    """
    headers, body = _socket_rows(group, multi_state, wide)
    columns = zip(*body, strict=True)
    widths = [max(len(header), *map(len, column)) for header, column in zip(headers, columns, strict=True)]
    line_width = len(_INDENT) + sum(widths) + len(_GAP) * (len(widths) - 1)
    if line_width > out.width and len(body) <= _RICH_MAX_ROWS:
        out.print(Padding(_rich_table(headers, body), (0, 0, 0, 2), expand=False))
        return
    # One format string for every row: "  {:<10}  {:<15}  ...  {:>5}  ...".
    row_format = _INDENT + _GAP.join(
        f"{{:{'>' if header in _NUMERIC else '<'}{width}}}" for header, width in zip(headers, widths, strict=True)
    )
    out.print(Text(row_format.format(*headers), style="dim"), no_wrap=True, crop=False, overflow="ignore")
    for first in range(0, len(body), _CHUNK_ROWS):
        _write_plain(out, "".join(row_format.format(*cells) + "\n" for cells in body[first : first + _CHUNK_ROWS]))


def _write_plain(out: Console, text: str) -> None:
    """Write plain lines to the console's file: rich would split them into Text objects and
    segments again (about half the table's cost). A recording console gets them through rich."""
    if out.quiet:
        return
    if out.record:
        out.out(text, end="", highlight=False)
        return
    try:
        out.file.write(text)
        out.file.flush()
    except BrokenPipeError:
        out.on_broken_pipe()


def _workload_title(group: WorkloadGroup) -> Text:
    """The heading over a workload's processes: ``container web (podman 3f2a9c1b2d4e)``, ``unit
    nginx.service``, ``host``; then how many sockets and processes it holds."""
    title = Text()
    if group.workload is None:
        title.append("no workload (no owning process known)", style="bold")
        return title
    title.append(group.workload.describe(), style="bold blue")
    owned = sum(1 for g in group.processes if g.process is not None)
    title.append(f"  {plural(group.count, 'socket')}, {plural(owned, 'process')}", style="dim")
    return title


def print_snapshot(snapshot: Snapshot, *, wide: bool = False, by: str = "workload", out: Console | None = None) -> None:
    """The scan as text. ``by="workload"`` puts a heading per container, pod, unit or the host over
    its processes; without workloads (``--no-workloads``, ``--no-owners``) it is ``by="process"``."""
    out = out or console()
    names = ", ".join(sorted(s.name for s in snapshot.states)) if len(snapshot.states) <= 3 else "the asked states"
    where = f" in network namespace {snapshot.netns}" if snapshot.netns else ""
    selected = f" of {snapshot.selection.describe()}" if snapshot.selection is not None else ""
    if not snapshot.findings:
        if snapshot.states == frozenset({TcpState.CLOSE_WAIT}):
            out.print(f"no sockets in CLOSE_WAIT{where}{selected}")
        else:
            out.print(f"no sockets in {names}{where}{selected}")
        _print_errors(snapshot)
        return
    groups = snapshot.by_process()
    processes = sum(1 for g in groups if g.process is not None)
    by_workload = by == "workload" and any(g.process is not None and g.process.workload for g in groups)
    workload_groups = snapshot.by_workload() if by_workload else []
    header = Text()
    header.append(f"{plural(len(snapshot.findings), 'socket')} in {names}", style="bold")
    if processes:
        header.append(f", held by {plural(processes, 'process')}")
        if by_workload:
            header.append(f" in {plural(sum(1 for g in workload_groups if g.workload), 'workload')}")
    elif snapshot.owners_resolved:
        header.append(", no owning process found")
    header.append(selected)
    header.append(f"{where}  (source: {snapshot.backend})", style="dim")
    out.print(header)
    multi_state = len(snapshot.states) > 1
    if not by_workload:
        for group in groups:
            _print_process(out, snapshot, group, multi_state, wide)
    for workload_group in workload_groups:
        out.print()
        out.print(_workload_title(workload_group))
        for group in workload_group.processes:
            _print_process(out, snapshot, group, multi_state, wide)
    _print_footer(snapshot, out)
    _print_errors(snapshot)


def _print_process(out: Console, snapshot: Snapshot, group: ProcessGroup, multi_state: bool, wide: bool) -> None:
    out.print()
    out.print(_process_title(group, snapshot))
    out.print(_group_summary(group, snapshot.states))
    for line in _diagnosis_lines(group):
        out.print(line)
    _print_socket_table(out, group, multi_state, wide)
    hidden = group.count - ROWS_PER_PROCESS
    if not wide and hidden > 0:
        out.print(Text(f"  ... and {hidden} more (--wide shows all)", style="dim"))


def _print_footer(snapshot: Snapshot, out: Console) -> None:
    """How the scan was made, when it was not the best way: the BPF owner lookup fell back, or the
    CLOSE_WAIT ages are lower bounds because no recorder was used (said once)."""
    if snapshot.recorder_unavailable is not None and snapshot.in_state(TcpState.CLOSE_WAIT):
        out.print()
        out.print(
            Text(
                "IDLE is a lower bound on the time in CLOSE_WAIT (tcpi_last_ack_recv); exact ages need "
                f"a recorder: {snapshot.recorder_unavailable}",
                style="dim",
            ),
            soft_wrap=True,  # one line, however long the reason: the terminal wraps it
        )
    if snapshot.owners_fallback_reason is not None:
        out.print()
        out.print(
            Text(
                f"owners found by the /proc walk (BPF iterator not used: {snapshot.owners_fallback_reason})",
                style="dim",
            )
        )


def _print_errors(snapshot: Snapshot) -> None:
    err = console(stderr=True)
    for message in snapshot.errors:
        err.print(Text(f"warning: {message}", style="yellow"))
