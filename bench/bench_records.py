"""Time the model's fast constructors (``closewait._records``) against ``Class(...)``.

Each ``make_*`` is a plain typed function that fills a draft with the class's slots and then
assigns the draft's ``__class__`` (see ``closewait._records``). Until issue 10 they were generated
with ``exec`` from the dataclass's fields, setting each slot through its member descriptor; that
generator is repeated below as the reference, so this benchmark shows what the drafts gain over
it. Per call, best of ``--repeat`` runs of ``--number`` calls each, in nanoseconds; the three
variants of a class are timed round-robin so that load from elsewhere hits them alike.

    python bench/bench_records.py
    python bench/bench_records.py --number 200000 --repeat 9
"""

from __future__ import annotations

import argparse
import dataclasses
import timeit
from collections.abc import Callable
from typing import Any

from closewait import _records
from closewait.model import Diagnosis, Endpoint, Family, Finding, Role, Socket, TcpInfo, TcpState


def generated(cls: type[Any]) -> Callable[..., Any]:
    """The constructor ``model._slot_filler`` used to generate with ``exec`` (the reference)."""
    names = [f.name for f in dataclasses.fields(cls)]
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    lines = [f"def make_{cls.__name__}({', '.join(names)}):", "    self = _new(_cls)"]
    for name in names:
        namespace[f"_set_{name}"] = cls.__dict__[name].__set__
        lines.append(f"    _set_{name}(self, {name})")
    lines.append("    return self")
    exec("\n".join(lines), namespace)
    maker: Callable[..., Any] = namespace[f"make_{cls.__name__}"]
    return maker


INFO = TcpInfo(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13)
LOCAL = Endpoint("127.0.0.1", 8080)
REMOTE = Endpoint("127.0.0.2", 40000)
SOCK = Socket(TcpState.CLOSE_WAIT, Family.IPV4, LOCAL, REMOTE, 77, 0, 1, 0, 99, INFO, "netlink")
DIAG = Diagnosis("not-reading", "summary", "remedy")
CASES: list[tuple[type[Any], Callable[..., Any], Any]] = [
    (Endpoint, _records.make_endpoint, LOCAL),
    (TcpInfo, _records.make_tcp_info, INFO),
    (Socket, _records.make_socket, SOCK),
    (Diagnosis, _records.make_diagnosis, DIAG),
    (Finding, _records.make_finding, Finding(SOCK, (), Role.UNKNOWN, DIAG)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--number", type=int, default=100_000, help="calls per run (default 100,000)")
    parser.add_argument("--repeat", type=int, default=7, help="runs per variant; the best counts (default 7)")
    args = parser.parse_args()
    print(f"{'class':10} {'Class(...)':>11} {'generated':>11} {'typed':>11}   ns per call, best of {args.repeat}")
    for cls, typed, value in CASES:
        values = tuple(getattr(value, f.name) for f in dataclasses.fields(cls))
        variants = {"Class(...)": cls, "generated": generated(cls), "typed": typed}
        for make in variants.values():
            assert make(*values) == value
        best = dict.fromkeys(variants, float("inf"))
        # Arguments and constructor as locals of timeit's loop, the call written out: what is
        # timed is the call itself, as in the netlink parser.
        arguments = [f"a{i}" for i in range(len(values))]
        setup = f"make = variant; {', '.join(arguments)}, = values"
        statement = f"make({', '.join(arguments)})"
        for _ in range(args.repeat):
            for name, make in variants.items():
                timer = timeit.Timer(statement, setup, globals={"variant": make, "values": values})
                best[name] = min(best[name], timer.timeit(args.number) / args.number * 1e9)
        print(f"{cls.__name__:10} " + " ".join(f"{best[name]:11.0f}" for name in variants))


if __name__ == "__main__":
    main()
