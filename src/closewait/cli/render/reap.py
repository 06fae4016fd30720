"""The terminal view of a reap plan and its result (``closewait reap``)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from closewait.cli.render import console
from closewait.display import format_command, format_duration, plural
from closewait.reap import Method, Outcome, ReapPlan, ReapResult, ReapTarget

_METHOD_WORDS = {
    Method.SHUTDOWN: "pidfd_getfd + shutdown(SHUT_RDWR): a normal FIN; the process keeps its fd, "
    "its next recv() returns EOF and send() fails with EPIPE",
    Method.DESTROY: "SOCK_DESTROY (like ss -K): the kernel aborts the socket with an RST; "
    "the process keeps its fd, its next send() fails with ECONNABORTED",
}
_OUTCOME_STYLE = {Outcome.DONE: "green", Outcome.SKIPPED: "yellow", Outcome.FAILED: "bold red"}


def _process_line(target: ReapTarget) -> str:
    process = target.process
    cmd = format_command(process.cmdline, process.name, 80)
    workload = process.workload
    where = f"  [{workload.label()}]" if workload is not None and workload.kind != "host" else ""
    return f"pid {process.pid} {process.name}{where}  {cmd}"


def _where(plan: ReapPlan) -> str:
    """Which network namespaces the plan covers, for its first line: nothing for the caller's own."""
    if plan.namespaces == (None,):
        return ""
    if len(plan.namespaces) == 1:
        return f" in network namespace {plan.namespaces[0]}"
    return f" across {plural(len(plan.namespaces), 'network namespace')}"


def _netns_column(plan: ReapPlan) -> bool:
    """A NETNS column when the plan spans several namespaces (--all-netns): each row says which."""
    return len(plan.namespaces) > 1


def _netns_cell(path: str | None) -> str:
    return path if path is not None else "host"


def _row(target: ReapTarget) -> list[str]:
    sock = target.socket
    also = ", ".join(f"pid {o.process.pid} fd {o.fd}" for o in target.other_holders) or "-"
    return [
        str(target.process.pid),
        ",".join(str(fd) for fd in target.fds),
        str(sock.local),
        str(sock.remote),
        format_duration(sock.idle_ms) if sock.idle_ms is not None else "-",
        str(sock.recv_q),
        str(sock.inode),
        also,
    ]


def _table(*, netns: bool) -> Table:
    table = Table(box=None, padding=(0, 2), pad_edge=False, show_edge=False, header_style="dim")
    for name in ("PID", "FD", "LOCAL", "REMOTE", "IDLE", "RECV-Q", "INODE", "ALSO HELD BY"):
        table.add_column(name, justify="left" if name in ("LOCAL", "REMOTE", "ALSO HELD BY") else "right")
    if netns:
        table.add_column("NETNS")
    return table


def print_plan(plan: ReapPlan, *, dry_run: bool, out: Console | None = None) -> None:
    out = out or console()
    header = Text()
    header.append(f"plan: {plan.method.value} {plural(len(plan.targets), 'CLOSE_WAIT socket')}", style="bold")
    header.append(f" held by {plural(len(plan.processes), 'process')} ({plan.criteria.describe()}){_where(plan)}")
    out.print(header)
    for process_line in dict.fromkeys(_process_line(t) for t in plan.targets):
        out.print(Text(f"  {process_line}", style="cyan"))
    out.print(Text(f"  method: {_METHOD_WORDS[plan.method]}", style="dim"))
    netns = _netns_column(plan)
    table = _table(netns=netns)
    for target in plan.targets:
        cells = _row(target) + ([_netns_cell(target.netns)] if netns else [])
        table.add_row(*[escape(c) for c in cells])
    out.print(Padding(table, (0, 0, 0, 2), expand=False))
    _print_excluded(plan, out)
    if dry_run:
        out.print(Text("dry run: nothing was changed; add --yes to release these sockets", style="bold yellow"))


def _print_excluded(plan: ReapPlan, out: Console) -> None:
    for item in plan.excluded:
        where = f" (network namespace {_netns_cell(item.netns)})" if _netns_column(plan) else ""
        line = f"  not touched: {item.socket.local} -> {item.socket.remote}{where}: {item.reason}"
        out.print(Text(line, style="yellow"))
    err = console(stderr=True)
    for message in plan.errors:
        err.print(Text(f"warning: {message}", style="yellow"))


def print_nothing(plan: ReapPlan, out: Console | None = None) -> None:
    out = out or console()
    out.print(Text(f"nothing to reap: no CLOSE_WAIT socket matches {plan.criteria.describe()}{_where(plan)}"))
    _print_excluded(plan, out)


def print_result(result: ReapResult, out: Console | None = None) -> None:
    out = out or console()
    table = Table(box=None, padding=(0, 2), pad_edge=False, show_edge=False, header_style="dim")
    for name in ("PID", "FD", "LOCAL", "REMOTE", "OUTCOME", "WHY"):
        table.add_column(name)
    for outcome in result.outcomes:
        target = outcome.target
        cells = [str(target.process.pid), str(target.fd), str(target.socket.local), str(target.socket.remote)]
        table.add_row(
            *[escape(c) for c in cells],
            Text(f"{outcome.outcome.value} ({outcome.code})", style=_OUTCOME_STYLE[outcome.outcome]),
            escape(outcome.reason),
        )
    out.print()
    out.print(Padding(table, (0, 0, 0, 2), expand=False))
    summary = Text()
    summary.append(f"released {len(result.done)}", style="bold green")
    summary.append(f", skipped {len(result.skipped)}", style="bold yellow" if result.skipped else "")
    summary.append(f", failed {len(result.failed)}", style="bold red" if result.failed else "")
    codes: dict[str, int] = {}
    for outcome in result.outcomes:
        if outcome.outcome != Outcome.DONE:
            codes[outcome.code] = codes.get(outcome.code, 0) + 1
    if codes:
        summary.append(" (" + ", ".join(f"{n} {code}" for code, n in codes.items()) + ")")
    out.print(summary)
