"""Time closewait's sock_diag parser on a loopback fixture, optionally for several source trees.

Holds ``--pairs`` loopback connections (every tenth with its client closed, so its server end sits
in CLOSE_WAIT), then, in a fresh interpreter per source tree and round, captures one dump of every
TCP socket on the host and times on it:

- ``parse``: ``netlink.parse_messages`` of each recv() (what ``dump`` does per recv, Socket objects
  built);
- ``count``: ``count_by_state``'s parse of the same bytes (states counted, nothing built);
- ``dump_all``, ``dump_close_wait``, ``count_by_state``: the whole call, the kernel's walk included.

Best of ``--repeat`` per round, best over the rounds; trees are timed round-robin so that load
from elsewhere hits them alike. To compare a change, pass the ``src`` directory of each checkout:

    python bench/bench_netlink_parse.py --pairs 3000 --tree /tmp/before/src --tree src
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TIMING = r"""
import json, timeit
from closewait.model import TcpState
from closewait.sources import netlink

nl = netlink.open_socket()
request = netlink.build_request_both(TcpState)
seq = netlink._seq_of(request)
recvs = []
for data in netlink._replies(nl, request):
    recvs.append(data)
    if netlink.parse_messages(data, seq, netlink.TCPDIAG_GETSOCK)[1]:
        break
nl.close()

def parse():
    for data in recvs:
        netlink.parse_messages(data, seq, netlink.TCPDIAG_GETSOCK)

def count():
    for data in recvs:
        netlink._count_states(data, seq, netlink.TCPDIAG_GETSOCK)

cases = {
    "parse": parse,
    "count": count,
    "dump_all": lambda: list(netlink.dump(TcpState)),
    "dump_close_wait": lambda: list(netlink.dump({TcpState.CLOSE_WAIT})),
    "count_by_state": netlink.count_by_state,
}
best = {name: min(timeit.repeat(case, number=1, repeat=REPEAT)) * 1e3 for name, case in cases.items()}
best["sockets"] = sum(len(netlink.parse_messages(d, seq, netlink.TCPDIAG_GETSOCK)[0]) for d in recvs)
print(json.dumps(best))
"""


def hold_pairs(pairs: int) -> list[socket.socket]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4096)
    held = [server]
    for i in range(pairs):
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        held.append(accepted)
        if i % 10 == 0:
            client.close()  # the accepted end goes to CLOSE_WAIT
        else:
            held.append(client)
    return held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3000, help="loopback connections to hold (default 3,000)")
    parser.add_argument("--rounds", type=int, default=3, help="fresh interpreters per tree (default 3)")
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per case and round (default 10)")
    parser.add_argument(
        "--tree", action="append", help="a src directory to time (repeatable; default: this checkout's src)"
    )
    args = parser.parse_args()
    trees = args.tree or [str(ROOT / "src")]
    held = hold_pairs(args.pairs)
    results: dict[str, list[dict[str, float]]] = {tree: [] for tree in trees}
    try:
        for _ in range(args.rounds):
            for tree in trees:
                env = dict(os.environ, PYTHONPATH=tree)
                program = f"REPEAT = {args.repeat}\n{TIMING}"
                argv = [sys.executable, "-c", program]
                out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True)
                results[tree].append(json.loads(out.stdout))
    finally:
        for sock in held:
            sock.close()
    cases = ["parse", "count", "dump_all", "dump_close_wait", "count_by_state"]
    print(f"{'tree':40} {'sockets':>8} " + " ".join(f"{case:>15}" for case in cases) + "   (ms, best)")
    for tree, rounds in results.items():
        best = {case: min(r[case] for r in rounds) for case in cases}
        sockets = int(rounds[-1]["sockets"])
        print(f"{tree[-40:]:40} {sockets:>8} " + " ".join(f"{best[case]:15.2f}" for case in cases))


if __name__ == "__main__":
    main()
