"""Options and value types every command shares, declared once.

Numbers on the command line are ASCII decimal only: ``INTEGER``, ``SECONDS`` and ``DURATION`` below
refuse what Python's ``int()``/``float()`` would quietly accept (``８０``, ``٣``, ``1_000``, ``nan``,
``inf``) and values too large to mean anything (an interval of 1e308 seconds, 400 nines), each with
one line naming the option. Help texts follow one style: an upper-case metavar (PID, PORT, N,
SECONDS, PATH), a default shown by click as ``[default: X]``, ``(repeatable)`` on options that may
be given several times, and two or three real examples at the end (``examples()``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, TypeVar

import click

from closewait.errors import UsageError
from closewait.model import TcpState, parse_states
from closewait.sources import BACKENDS
from closewait.sources.pinned import DEFAULT_PIN_DIR
from closewait.workload import WorkloadSelector

F = TypeVar("F", bound=Callable[..., Any])

_INTEGER = re.compile(r"[+-]?[0-9]+\Z")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")
#: pid_t is a 32-bit int; a larger number cannot name a process (and makes /proc paths too long).
#: Counts and thresholds have the same bound: nothing on a host counts past it.
PID_MAX = INT_MAX = 2**31 - 1
#: The longest interval or age a flag takes: a day for intervals, ten years for ages.
DAY_S = 86_400.0


def _shown(value: str) -> str:
    """A value quoted for a message, cut so that the message stays one readable line."""
    return repr(value if len(value) <= 24 else value[:21] + "...")


def _non_ascii_digits(text: str) -> bool:
    return any(ch.isnumeric() and not ch.isascii() for ch in text)


class Integer(click.ParamType[int]):
    """An ASCII decimal integer within ``[min, max]``."""

    name = "integer"

    def __init__(self, min: int | None = None, max: int | None = None) -> None:
        self.min = min
        self.max = max

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            text = str(value)
            if not _INTEGER.match(text):
                why = ": use the ASCII digits 0-9" if _non_ascii_digits(text) else "."
                self.fail(f"{_shown(text)} is not a valid integer{why}", param, ctx)
            number = int(text)
        if (self.min is not None and number < self.min) or (self.max is not None and number > self.max):
            shown = str(number) if len(str(number)) <= 24 else _shown(str(number))
            self.fail(f"{shown} is not in the range {self._range()}.", param, ctx)
        return number

    def _range(self) -> str:
        if self.min is not None and self.max is not None:
            return f"{self.min}<=x<={self.max}"
        return f"x>={self.min}" if self.min is not None else f"x<={self.max}"


class Seconds(click.ParamType[float]):
    """A finite ASCII decimal number of seconds within ``[min, max]`` (``min_open``: above min)."""

    name = "seconds"

    def __init__(self, min: float | None = None, max: float | None = None, *, min_open: bool = False) -> None:
        self.min = min
        self.max = max
        self.min_open = min_open

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        else:
            text = str(value)
            if not _DECIMAL.match(text):
                why = "use the ASCII digits 0-9" if _non_ascii_digits(text) else "use a decimal number like 2 or 0.5"
                self.fail(f"{_shown(text)} is not a number of seconds: {why}", param, ctx)
            number = float(text)
        if not math.isfinite(number):
            self.fail(f"{_shown(str(value))} is too large", param, ctx)
        low_bad = self.min is not None and (number <= self.min if self.min_open else number < self.min)
        if low_bad or (self.max is not None and number > self.max):
            self.fail(f"{number:g} is not in the range {self._range()}.", param, ctx)
        return number

    def _range(self) -> str:
        low = "" if self.min is None else f"{self.min:g}{'<' if self.min_open else '<='}"
        high = "" if self.max is None else f"<={self.max:g}"
        return f"{low}x{high}"


class Duration(click.ParamType[int]):
    """``500ms``, ``30s``, ``5m``, ``1h``, ``2d`` or a sum like ``1m30s``, as milliseconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        from closewait.errors import UsageError
        from closewait.filters import parse_duration

        try:
            return parse_duration(str(value))
        except UsageError as err:
            self.fail(str(err).replace(repr(str(value)), _shown(str(value))), param, ctx)


class NetnsSpec(click.ParamType[str]):
    """``--netns PID|PATH``: refused up front when empty or a pid in other than ASCII digits."""

    name = "netns"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        if not text or not text.isprintable():
            self.fail(
                f"{_shown(text)} is not a network namespace: give a pid, /proc/PID/ns/net or /run/netns/NAME",
                param,
                ctx,
            )
        if text.isnumeric() and not text.isascii():
            self.fail(f"{_shown(text)}: a pid is written with the ASCII digits 0-9", param, ctx)
        if text.isdigit() and int(text) > PID_MAX:
            self.fail(f"{_shown(text)} is not in the range 1<=x<={PID_MAX}.", param, ctx)
        return text


class Pid(Integer):
    """A process id. A thread id is refused: /proc accepts it, but it is not a process, and reap's
    pidfd_open would fail on it after the plan was printed (docs/cli.md, "Thread ids")."""

    name = "pid"

    def __init__(self) -> None:
        super().__init__(1, PID_MAX)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        pid = super().convert(value, param, ctx)
        from closewait.errors import ClosewaitError
        from closewait.sources.process import read_tgid

        try:
            leader: int | None = read_tgid(pid)
        except ClosewaitError:
            leader = None  # no such pid, or hidepid: the command's own check says so
        if leader is not None and leader != pid:
            self.fail(f"{pid} is a thread of process {leader}, not a process: give {leader}", param, ctx)
        return pid


PORT = Integer(1, 65535)
PID = Pid()
COUNT = Integer(1, INT_MAX)
DURATION = Duration()
NETNS = NetnsSpec()


def refuse_non_ascii_digits(text: str, flag: str) -> None:
    """A free-form value (``--listen``, ``--remote``) whose numbers must be ASCII digits too."""
    if _non_ascii_digits(text):
        raise UsageError(f"{flag} {_shown(text)}: numbers are written with the ASCII digits 0-9")


def examples(*pairs: tuple[str, str]) -> str:
    """A command's epilog: (command line, what it does) pairs, aligned and kept as written (click's
    ``\\b`` stops it from rewrapping the paragraph)."""
    width = max(len(command) for command, _ in pairs)
    lines = [f"  {command.ljust(width)}  # {what}" for command, what in pairs]
    return "\b\nExamples:\n" + "\n".join(lines)


def states_from(values: tuple[str, ...], default: frozenset[TcpState]) -> frozenset[TcpState]:
    """``--state`` values (ss's spelling, ``all``, ``teardown``) as states; a bad name is a UsageError."""
    if not values:
        return default
    try:
        return parse_states(values)
    except ValueError:
        bad = next(v for v in values if not _known_state(v))
        raise UsageError(
            f"unknown state {bad!r}: use ss's names (close-wait, fin-wait-2, time-wait, last-ack, "
            "established, ...), all or teardown"
        ) from None


def _known_state(value: str) -> bool:
    try:
        parse_states([value])
    except ValueError:
        return False
    return True


def state_option(f: F) -> F:
    return click.option(
        "--state",
        "states",
        multiple=True,
        default=("close-wait",),
        show_default=True,
        metavar="STATE",
        help="TCP state to list, in ss's spelling (close-wait, fin-wait-2, time-wait, ...), "
        "or all, or teardown (repeatable).",
    )(f)


def netns_option(help: str, metavar: str = "PID|PATH") -> Callable[[F], F]:
    return click.option("--netns", type=NETNS, metavar=metavar, help=help)


def port_option(f: F) -> F:
    """--port, repeatable: the same option and words in scan, watch, check and reap."""
    return click.option(
        "--port",
        "ports",
        multiple=True,
        type=PORT,
        metavar="PORT",
        help="Only sockets with this local or remote port, 1-65535 (repeatable).",
    )(f)


def filter_options(f: F) -> F:
    """--port, --pid and --netns."""
    f = netns_option("Scan another network namespace: a pid in it, /proc/PID/ns/net or /run/netns/NAME.")(f)
    f = click.option(
        "--pid",
        "pids",
        multiple=True,
        type=PID,
        metavar="PID",
        help="Only sockets this process holds (repeatable).",
    )(f)
    return port_option(f)


def backend_option(f: F) -> F:
    return click.option(
        "--backend",
        type=click.Choice(BACKENDS),
        default="auto",
        show_default=True,
        metavar="|".join(BACKENDS),
        help="Where to read sockets: netlink sock_diag (with idle times) or /proc/net/tcp.",
    )(f)


class PinDir(click.ParamType[str]):
    """A bpffs directory for the recorder's pins: a printable, non-empty path of sane length."""

    name = "path"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        if not text or not text.isprintable() or len(text) > 255:
            self.fail(f"{_shown(text)} is not a directory path for the recorder's pins", param, ctx)
        return text


PIN_DIR = PinDir()


def recorder_pins_option(f: F) -> F:
    """--recorder-pins: where a running recorder pinned its maps (scan reads exact ages there)."""
    return click.option(
        "--recorder-pins",
        type=PIN_DIR,
        default=DEFAULT_PIN_DIR,
        show_default=True,
        metavar="PATH",
        help="Where a running recorder (closewait record) pinned its maps: exact CLOSE_WAIT ages from there.",
    )(f)


def pin_dir_option(f: F) -> F:
    """record's --pin-dir: the same default as scan's --recorder-pins."""
    return click.option(
        "--pin-dir",
        type=PIN_DIR,
        default=DEFAULT_PIN_DIR,
        show_default=True,
        metavar="PATH",
        help="Pin the recorder's maps here, in a bpffs (mounted on its parent if need be).",
    )(f)


class WorkloadName(click.ParamType[str]):
    """A container, pod, namespace or unit name: refused up front when empty or not one printable line."""

    name = "name"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        if not text:
            self.fail("an empty name selects nothing: give a name", param, ctx)
        if not text.isprintable():
            self.fail(f"{_shown(text)}: a name has no control characters (a newline, a tab)", param, ctx)
        return text


WORKLOAD_NAME = WorkloadName()


def workload_options(f: F) -> F:
    """--container, --pod, --namespace and --unit: narrow to the sockets of some workloads
    (docs/workloads.md). Each is given once; given together, a workload must match all of them."""
    f = click.option(
        "--unit",
        type=WORKLOAD_NAME,
        metavar="NAME",
        help="Only sockets of processes in this systemd unit (nginx or nginx.service).",
    )(f)
    f = click.option(
        "--namespace",
        type=WORKLOAD_NAME,
        metavar="NS",
        help="Only sockets of pods in this Kubernetes namespace.",
    )(f)
    f = click.option(
        "--pod",
        type=WORKLOAD_NAME,
        metavar="[NS/]NAME",
        help="Only sockets of this Kubernetes pod (name or UID; NS/NAME sets the namespace too).",
    )(f)
    return click.option(
        "--container",
        type=WORKLOAD_NAME,
        metavar="NAME|ID",
        help="Only sockets of this container (name, id, or an id prefix of 4+ characters).",
    )(f)


def selector_from(
    container: str | None, pod: str | None, namespace: str | None, unit: str | None
) -> WorkloadSelector | None:
    """The workload options as a selector (None when none was given); a bad pod spelling is a UsageError."""
    if container is None and pod is None and namespace is None and unit is None:
        return None
    try:
        return WorkloadSelector.parse(container=container, pod=pod, namespace=namespace, unit=unit)
    except ValueError as err:
        raise UsageError(str(err)) from None


class StopSignals:
    """How a long-running command (exporter, record) waits for its end: SIGTERM or SIGINT sets
    ``stop``; ``interrupted`` says it was Ctrl-C (exit 130, as every command) rather than a service
    manager's SIGTERM (exit 0). A ``with`` block installs the handlers and restores the old ones."""

    def __init__(self) -> None:
        import threading

        self.stop = threading.Event()
        self._first: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        import signal

        def _on_signal(signum: int, _frame: object) -> None:
            if self._first is None:
                self._first = signum
            self.stop.set()

        self._previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def wait(self) -> None:
        """Until a stop signal arrives."""
        while not self.stop.wait(3600):
            pass

    @property
    def interrupted(self) -> bool:
        import signal

        return self._first == signal.SIGINT
