"""Where each socket was created: opt-in, like ``tracemalloc`` is for memory.

``start()`` patches three methods of ``socket.socket`` (the class itself is untouched, so
``isinstance`` and subclasses such as ``ssl.SSLSocket`` keep working); ``stop()`` puts the very same
function objects back. While tracing, every IPv4/IPv6 stream socket the process creates through the
``socket`` module is recorded under its inode (``os.fstat(fd).st_ino``, the number a scan reports as
``Socket.inode``), so a CLOSE_WAIT finding can be joined to the code that created the socket::

    from closewait import trace
    trace.start()
    ...
    for finding in closewait.scan(pids=[os.getpid()]).findings:
        tb = trace.get_traceback(finding)          # or get_traceback(sock), or by inode
        if tb is not None:
            print(tb.origin, tb.kind)              # tests/test_app.py:42 in fetch, "accept"

What is covered, and why one patch covers it: every path in the standard library that makes a
Python socket object ends in ``socket.socket.__init__``: the constructor, ``accept()`` (it wraps the
new fd in ``socket(..., fileno=fd)``), ``create_connection``, ``create_server``, ``socketpair``,
``fromfd``, ``dup``, and asyncio's selector loop (``loop.create_connection``/``create_server``/
``start_server``/``open_connection`` construct ``socket.socket``; accepted connections come from
``sock.accept()``). ``kind`` says which ``socket`` module function made it (``"accept"``,
``"create_connection"``, ...; ``"socket"`` for the bare constructor). An accepted socket also links
to the trace of the listening socket it came from (``Traceback.listener``): for an asyncio server
that is where the user called ``start_server``, usually more telling than the event loop's stack.

Not covered: sockets made in C extensions without the ``socket`` module (uvloop, gevent's own
classes, a C library's fds), and sockets created before ``start()``.

Pitfalls it avoids:

- The same kernel socket can be wrapped by several Python objects (``fromfd``, ``dup``, ssl's
  wrap, ``socket.socket(fileno=os.dup(fd))``). The first record for an inode is kept (it is the
  creation site of the kernel socket) and the record is dropped only when the last traced
  descriptor of that inode is closed.
- ``close()`` does not always close: with ``makefile()`` readers alive (``http.client`` keeps one)
  the descriptor stays open until they are gone, so the hook is on ``socket.socket._real_close``,
  which runs when the fd is really closed. Sockets closed by the garbage collector (the C finalizer
  of ``_socket.socket``) are never seen by Python code; their records stay until evicted.
- Memory is bounded: at most ``max_entries`` records (oldest evicted first) of at most ``limit``
  frames each. Frames are kept as plain tuples and turned into ``Frame`` objects on lookup.
- ``_real_close`` may run during interpreter shutdown, when module globals are gone, so the
  wrappers reach their state through closures only.

Thread-safe: the record table has one lock; start/stop take another.
"""

from __future__ import annotations

import _socket
import functools
import os
import socket
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Any

from closewait.errors import UsageError
from closewait.model import Finding, Socket

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_MAX_ENTRIES",
    "Frame",
    "TraceStatistics",
    "Traceback",
    "clear_traces",
    "get_traceback",
    "get_traceback_for_inode",
    "is_tracing",
    "start",
    "statistics",
    "stop",
    "traced_inodes",
]

#: Frames kept per socket unless ``start(limit=...)`` says otherwise: enough to reach user code from
#: inside asyncio's event loop (about eight frames deep).
DEFAULT_LIMIT = 16
#: Records kept at most; the oldest are evicted first.
DEFAULT_MAX_ENTRIES = 16384

_SOCKET_FILE = socket.__file__
_INET_FAMILIES = frozenset({int(socket.AF_INET), int(socket.AF_INET6)})
_SOCK_STREAM = int(socket.SOCK_STREAM)
# The C-level attributes, read without socket.socket's enum-converting properties (ten times cheaper).
_raw_family = _socket.socket.__dict__["family"].__get__
_raw_type = _socket.socket.__dict__["type"].__get__
_raw_fileno = _socket.socket.fileno

#: A frame as recorded: the code object and the offset of the instruction running in it. Turning
#: that into a line number (``f_lineno`` walks the line table) costs about 1 µs a frame, so it is
#: done on lookup, not on every socket creation.
RawFrame = tuple[CodeType, int]


@dataclass(frozen=True, slots=True)
class Frame:
    """One line of a creation traceback."""

    filename: str
    lineno: int
    function: str

    def __str__(self) -> str:
        return f"{self.filename}:{self.lineno} in {self.function}"


@dataclass(frozen=True, slots=True)
class Traceback:
    """Where a socket was created. ``frames`` are most recent call first, at most ``limit`` of them.

    ``kind`` is the ``socket`` module function that created the Python object (``"socket"`` for the
    constructor, ``"accept"``, ``"create_connection"``, ``"socketpair"``, ``"fromfd"``, ...); frames
    inside socket.py itself are not kept. ``listener`` is the listening socket's trace for an
    accepted socket, when that socket was traced too.
    """

    inode: int
    kind: str
    frames: tuple[Frame, ...]
    created_at: float
    thread: str
    listener: Traceback | None = None

    @property
    def origin(self) -> Frame | None:
        """The most recent frame in the application's own code: not the standard library, not an
        installed package (site-packages), not closewait. Falls back to the most recent frame."""
        for frame in self.frames:
            if _is_application_file(frame.filename):
                return frame
        return self.frames[0] if self.frames else None

    @property
    def application_frames(self) -> tuple[Frame, ...]:
        """The frames in the application's own code (see ``origin``), most recent call first."""
        return tuple(f for f in self.frames if _is_application_file(f.filename))

    def format(self, limit: int | None = None, *, most_recent_first: bool = False) -> list[str]:
        """Lines like ``traceback.format_list`` gives (``  File "x.py", line 3, in f``)."""
        frames = self.frames if limit is None else self.frames[:limit]
        ordered = frames if most_recent_first else tuple(reversed(frames))
        return [f'  File "{f.filename}", line {f.lineno}, in {f.function}' for f in ordered]

    def describe(self) -> str:
        """One line for a person: ``accepted at app.py:12 in serve (listener created at app.py:30 in main)``."""
        origin = self.origin
        where = str(origin) if origin is not None else "an unknown place"
        verb = "accepted" if self.kind == "accept" else "created"
        text = f"{verb} at {where}"
        if self.kind not in ("socket", "accept"):
            text += f" (via socket.{self.kind})"
        if self.listener is not None and self.listener.origin is not None:
            text += f" (listener created at {self.listener.origin})"
        return text

    def __str__(self) -> str:
        return self.describe()


@dataclass(frozen=True, slots=True)
class TraceStatistics:
    """Counters since ``start()``: how many sockets were recorded, dropped on close, evicted."""

    tracing: bool
    limit: int
    max_entries: int
    traced: int
    recorded: int
    dropped_on_close: int
    evicted: int
    errors: int


class _Entry:
    __slots__ = ("created_at", "fds", "frames", "inode", "kind", "listener", "thread")

    def __init__(
        self, inode: int, frames: tuple[RawFrame, ...], kind: str, created_at: float, thread: str, fd: int
    ) -> None:
        self.inode = inode
        self.frames = frames
        self.kind = kind
        self.created_at = created_at
        self.thread = thread
        # The listening socket's entry, kept by reference so it outlives the listener's own record
        # (a server is often closed before anyone asks where its leaked connections came from).
        self.listener: _Entry | None = None
        # One descriptor almost always; a set only when a second object wraps the same socket.
        self.fds: int | set[int] = fd


class _State:
    """Everything the wrappers need, reachable through closures (see the module docstring)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: dict[int, _Entry] = {}
        self.limit = DEFAULT_LIMIT
        self.max_entries = DEFAULT_MAX_ENTRIES
        self.recorded = 0
        self.dropped_on_close = 0
        self.evicted = 0
        self.errors = 0


_state = _State()
_control = threading.Lock()


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork() stays held forever in the child: start over.
    global _control
    _state.lock = threading.Lock()
    _control = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
#: (attribute name, original function) for every method start() replaced; empty when not tracing.
_originals: list[tuple[str, Any]] = []
_app_exclusions: tuple[str, ...] = ()


def _excluded_prefixes() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    prefixes = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    prefixes.add(os.path.dirname(os.path.abspath(__file__)))
    return tuple(sorted(os.path.join(p, "") for p in prefixes))


def _is_application_file(filename: str) -> bool:
    global _app_exclusions
    if filename.startswith("<"):
        return False
    if not _app_exclusions:
        _app_exclusions = _excluded_prefixes()
    return not filename.startswith(_app_exclusions)


def _make_wrappers(
    state: _State, original_init: Callable[..., None], original_real_close: Callable[..., None]
) -> tuple[Callable[..., None], Callable[..., None]]:
    getframe = sys._getframe
    fstat = os.fstat
    now = time.time
    current_thread = threading.current_thread
    socket_file = _SOCKET_FILE
    inet = _INET_FAMILIES
    stream = _SOCK_STREAM
    raw_family, raw_type, raw_fileno = _raw_family, _raw_type, _raw_fileno

    def record(sock: Any, caller: FrameType | None) -> None:
        if raw_family(sock, _socket.socket) not in inet or raw_type(sock, _socket.socket) & 0xF != stream:
            return
        fd = raw_fileno(sock)
        kind = "socket"
        listener_inode: int | None = None
        frame = caller
        while frame is not None and frame.f_code.co_filename == socket_file:
            kind = frame.f_code.co_name
            if kind == "accept":
                listener = frame.f_locals.get("self")
                if listener is not None:
                    try:
                        listener_inode = fstat(raw_fileno(listener)).st_ino
                    except OSError:
                        listener_inode = None
            frame = frame.f_back
        try:
            inode = fstat(fd).st_ino
        except OSError:
            with state.lock:
                state.errors += 1
            return
        frames: list[RawFrame] = []
        limit = state.limit
        while frame is not None and len(frames) < limit:
            frames.append((frame.f_code, frame.f_lasti))
            frame = frame.f_back
        entry = _Entry(inode, tuple(frames), kind, now(), current_thread().name, fd)
        with state.lock:
            existing = state.entries.get(inode)
            if existing is not None:
                # Another Python object for a kernel socket already traced: keep the creation site.
                fds = existing.fds
                if isinstance(fds, int):
                    existing.fds = {fds, fd}
                else:
                    fds.add(fd)
                return
            if listener_inode is not None and listener_inode != inode:
                listener_entry = state.entries.get(listener_inode)
                if listener_entry is not None:
                    # One level only: a listener's own listener link is dropped, so chains stay short.
                    entry.listener = listener_entry
            state.entries[inode] = entry
            state.recorded += 1
            while len(state.entries) > state.max_entries:
                del state.entries[next(iter(state.entries))]
                state.evicted += 1

    @functools.wraps(original_init)
    def traced_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        record(self, getframe(1))

    @functools.wraps(original_real_close)
    def traced_real_close(self: Any, *args: Any) -> None:
        fd = raw_fileno(self)
        if fd >= 0:
            try:
                inode = fstat(fd).st_ino
            except OSError:
                inode = None
            if inode is not None:
                with state.lock:
                    entry = state.entries.get(inode)
                    if entry is not None:
                        fds = entry.fds
                        if isinstance(fds, set):
                            fds.discard(fd)
                            last = not fds
                        else:
                            last = fds == fd
                        if last:
                            del state.entries[inode]
                            state.dropped_on_close += 1
        original_real_close(self, *args)

    return traced_init, traced_real_close


def start(limit: int = DEFAULT_LIMIT, *, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
    """Start recording where sockets are created. Idempotent: when already tracing, only ``limit``
    and ``max_entries`` are updated (records already taken keep their frames)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise UsageError(f"trace limit must be a positive number of frames, not {limit!r}")
    if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
        raise UsageError(f"max_entries must be a positive number, not {max_entries!r}")
    with _control:
        _state.limit = limit
        _state.max_entries = max_entries
        if _originals:
            return
        cls = socket.socket
        original_init = cls.__dict__["__init__"]
        original_real_close = cls.__dict__.get("_real_close")
        if original_real_close is None:  # pragma: no cover - every CPython since 3.2 has it
            raise UsageError("this Python's socket.socket has no _real_close; closewait.trace cannot hook close")
        _state.recorded = _state.dropped_on_close = _state.evicted = _state.errors = 0
        traced_init, traced_real_close = _make_wrappers(_state, original_init, original_real_close)
        _originals.extend([("__init__", original_init), ("_real_close", original_real_close)])
        type.__setattr__(cls, "__init__", traced_init)
        type.__setattr__(cls, "_real_close", traced_real_close)


def stop() -> None:
    """Stop recording, put back the exact original methods, and forget every record."""
    with _control:
        cls = socket.socket
        for name, original in reversed(_originals):
            type.__setattr__(cls, name, original)
        _originals.clear()
        with _state.lock:
            _state.entries.clear()


def is_tracing() -> bool:
    return bool(_originals)


def clear_traces() -> None:
    """Forget every record, keep tracing."""
    with _state.lock:
        _state.entries.clear()


def traced_inodes() -> frozenset[int]:
    """Inodes of the sockets currently recorded."""
    with _state.lock:
        return frozenset(_state.entries)


def statistics() -> TraceStatistics:
    with _state.lock:
        return TraceStatistics(
            tracing=bool(_originals),
            limit=_state.limit,
            max_entries=_state.max_entries,
            traced=len(_state.entries),
            recorded=_state.recorded,
            dropped_on_close=_state.dropped_on_close,
            evicted=_state.evicted,
            errors=_state.errors,
        )


def _traceback_of(entry: _Entry, with_listener: bool = True) -> Traceback:
    listener = entry.listener if with_listener else None
    return Traceback(
        inode=entry.inode,
        kind=entry.kind,
        frames=tuple(_frame(code, lasti) for code, lasti in entry.frames),
        created_at=entry.created_at,
        thread=entry.thread,
        listener=_traceback_of(listener, with_listener=False) if listener is not None else None,
    )


def _frame(code: CodeType, lasti: int) -> Frame:
    lineno = code.co_firstlineno
    for start, end, line in code.co_lines():
        if start <= lasti < end:
            if line is not None:
                lineno = line
            break
    return Frame(code.co_filename, lineno, code.co_name)


def _build(inode: int) -> Traceback | None:
    with _state.lock:
        entry = _state.entries.get(inode)
    return _traceback_of(entry) if entry is not None else None


def get_traceback_for_inode(inode: int) -> Traceback | None:
    """The creation trace of the socket with this inode (``Socket.inode`` in a scan), or None."""
    return _build(inode)


def get_traceback(target: socket.socket | int | Socket | Finding) -> Traceback | None:
    """The creation trace of a socket object, a descriptor (int), or a scan's ``Socket``/``Finding``.

    None when not tracing, or when the socket was created before ``start()``, outside the
    ``socket`` module, or evicted. An int is a file descriptor of this process; for an inode use
    ``get_traceback_for_inode``.
    """
    if isinstance(target, Finding):
        return _build(target.socket.inode)
    if isinstance(target, Socket):
        return _build(target.inode)
    fd = target if isinstance(target, int) else target.fileno()
    if fd < 0:
        return None
    try:
        inode = os.fstat(fd).st_ino
    except OSError:
        return None
    return _build(inode)
