"""How long ``closewait reap`` takes to plan and release N CLOSE_WAIT sockets of one live process.

Starts one child that leaks N connections into CLOSE_WAIT (loopback, port 0), then for each method
(shutdown, destroy) times: ``survey()`` (sock_diag dump, /proc walk of the pid, then of every process
for other holders of the sockets found), ``plan()``
(pure) and ``apply()`` (per socket: pidfd_open, start-time check, pidfd_getfd, fstat, one exact
sock_diag lookup, TCP_INFO, shutdown; or the SOCK_DESTROY request). It checks that every socket
was released and that the child still answers. Results go to stdout as a markdown table.

Usage (root; timings are wall clock, the machine may be shared)::

    .venv/bin/python -m bench.bench_reap --sizes 100 1000 2000

Every child is killed by pid at the end. Client ends are closed normally, so after a reap they
pass through TIME_WAIT (shutdown) or are reset (destroy); keep N modest on a shared host.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time

from closewait import reap

CHILD = textwrap.dedent(
    """
    import resource, socket, sys, time
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    n = int(sys.argv[1])
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1024)
    print(server.getsockname()[1], flush=True)
    leaked = []
    while len(leaked) < n:
        conn, _ = server.accept()
        conn.recv(10)  # EOF: the client already closed; keep the socket (the bug)
        leaked.append(conn)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        conn.sendall(b"alive\\n")
        conn.close()
    """
)


def start_child(n: int) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(n)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    for _ in range(n):
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.close()
    assert proc.stdout.readline().strip() == "ready"
    return proc, port


def measure(n: int, method: reap.Method) -> dict[str, float]:
    proc, port = start_child(n)
    try:
        time.sleep(0.2)
        t0 = time.perf_counter()
        snapshot = reap.survey(pids=[proc.pid])
        t1 = time.perf_counter()
        reap_plan = reap.plan(snapshot, pids=[proc.pid], method=method)
        t2 = time.perf_counter()
        result = reap.apply(reap_plan)
        t3 = time.perf_counter()
        assert len(reap_plan.targets) == n, (len(reap_plan.targets), n)
        assert len(result.done) == n, [o for o in result.outcomes if o.outcome != reap.Outcome.DONE][:3]
        assert reap.survey(pids=[proc.pid]).findings == ()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as check:
            assert check.recv(100) == b"alive\n"
        return {"survey": t1 - t0, "plan": t2 - t1, "apply": t3 - t2}
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeat", type=int, default=3, help="runs per size and method; the median is shown")
    args = parser.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    print("| CLOSE_WAIT sockets | method | survey (ms) | plan (ms) | apply (ms) | apply per socket (µs) |")
    print("|---:|---|---:|---:|---:|---:|")
    for n in args.sizes:
        if n > hard - 100:
            raise SystemExit(f"{n} sockets exceed RLIMIT_NOFILE's hard limit {hard}")
        for method in reap.Method:
            runs = sorted((measure(n, method) for _ in range(args.repeat)), key=lambda r: r["apply"])
            median = runs[len(runs) // 2]
            print(
                f"| {n} | {method.value} | {median['survey'] * 1000:.1f} | {median['plan'] * 1000:.2f} "
                f"| {median['apply'] * 1000:.1f} | {median['apply'] / n * 1e6:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
