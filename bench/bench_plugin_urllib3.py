"""The pytest plugin on a real suite: urllib3's own tests, with and without ``--closewait``.

What it does (docs/benchmarks-plugin.md has the figures and the machine):

1. Uses urllib3's sdist from PyPI, unpacked (``--urllib3-dir``; fetch it with
   ``pip download --no-deps --no-binary :all: urllib3==2.2.3`` and ``tar xzf``). Its tests run from
   the sdist's ``src`` (as an editable install would: not under site-packages), with
   ``dummyserver`` from the sdist. The test server there needs urllib3's hypercorn fork, which is
   not on PyPI: install the nearest releases instead (hypercorn 0.17.3, Quart 0.19.4, quart-trio
   0.11.1, trio 0.26.2, flask 3.0.3, werkzeug 3.0.6, httpx 0.25.2, trustme, PySocks).
2. Runs the selection once *without* the plugin and deselects every test that fails or errors
   there (they fail without closewait too: the fork's behaviour, TLS libraries newer than urllib3
   2.2.3 expects, no route to the "tarpit" address), writing the list to ``--deselected``.
3. Then alternates plain runs and ``--closewait`` runs (default settings: 10 s horizon, no trace)
   ``--runs`` times each; every run must pass (exit code 0), and the wall times are compared.

Not part of the test suite (each run takes one to three minutes). Usage::

    PATH=/work/main/.venv/bin:$PATH python bench/bench_plugin_urllib3.py \\
        --urllib3-dir /tmp/urllib3-2.2.3 --runs 3 --json /tmp/bench-plugin.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

SELECTION = [
    "test/with_dummyserver",
    "test/test_connectionpool.py",
    "test/test_poolmanager.py",
    # Hangs now and then without the plugin (a TLS handshake with hypercorn 0.17 and today's
    # cryptography/pyOpenSSL waits forever), so it cannot be timed.
    "--ignore=test/with_dummyserver/test_https.py",
    # A hang anywhere becomes a failure (then deselected) rather than a stuck benchmark.
    "--timeout=60",
]
#: Plugins installed in the shared environment that urllib3's suite does not use: pytest-asyncio
#: warns at configure time, and urllib3's ``filterwarnings = error`` turns that into a crash.
OFF = ["-p", "no:cacheprovider", "-p", "no:asyncio", "-p", "no:rerunfailures", "-p", "no:xdist"]
_RESULT = re.compile(r"^(?:FAILED|ERROR) (\S+::.+?)(?: - .*)?$")
_SUMMARY = re.compile(r"^=*\s*(\d+ (?:passed|failed|skipped|errors?|deselected).*) in ([0-9.]+)s")


def _env(urllib3_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    closewait_src = Path(__file__).resolve().parent.parent / "src"
    env["PYTHONPATH"] = os.pathsep.join([str(closewait_src), str(urllib3_dir / "src"), str(urllib3_dir)])
    env.pop("PYTEST_ADDOPTS", None)
    return env


def _run(urllib3_dir: Path, extra: list[str], deselect: list[str]) -> tuple[float, int, str]:
    args = [sys.executable, "-m", "pytest", "-q", "-rfE", *OFF, *extra, *SELECTION]
    for nodeid in deselect:
        args += ["--deselect", nodeid]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=urllib3_dir, env=_env(urllib3_dir), capture_output=True, text=True, check=False)
    return time.perf_counter() - start, proc.returncode, proc.stdout


def _summary(output: str) -> str:
    for line in reversed(output.splitlines()):
        match = _SUMMARY.search(line)
        if match:
            return match.group(1)
    return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urllib3-dir", type=Path, required=True, help="the unpacked urllib3 sdist")
    parser.add_argument("--runs", type=int, default=3, help="runs of each kind (default 3)")
    parser.add_argument("--deselected", type=Path, default=None, help="write the deselected node ids here")
    parser.add_argument(
        "--deselect-from", type=Path, default=None, help="read the node ids to deselect (skips the first run)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    opts = parser.parse_args()
    urllib3_dir = opts.urllib3_dir.resolve()

    if opts.deselect_from is not None:
        deselect = opts.deselect_from.read_text().split("\n")[:-1]
        code, output, seconds = 1, "", 0.0
    else:
        seconds, code, output = _run(urllib3_dir, [], [])
        deselect = sorted({m.group(1) for line in output.splitlines() if (m := _RESULT.match(line))})
    print(
        f"without the plugin, all tests: {_summary(output)} in {seconds:.1f} s; deselecting {len(deselect)}",
        flush=True,
    )
    if code not in (0, 1):
        print(output[-4000:])
        return 1
    if opts.deselected is not None:
        opts.deselected.write_text("".join(f"{n}\n" for n in deselect))

    times: dict[str, list[float]] = {"plain": [], "closewait": []}
    summaries: dict[str, str] = {}
    #: Attempts thrown away because a test hung (pytest-timeout) with or without the plugin: the
    #: hypercorn release standing in for urllib3's fork sometimes never answers a request.
    hung: dict[str, list[str]] = {"plain": [], "closewait": []}
    load_before = os.getloadavg()
    for number in range(opts.runs):
        for kind, extra in (("plain", []), ("closewait", ["--closewait"])):
            for _attempt in range(3):
                seconds, code, output = _run(urllib3_dir, extra, deselect)
                summaries[kind] = _summary(output)
                print(f"run {number + 1} {kind:9}: {seconds:6.1f} s  exit {code}  {summaries[kind]}", flush=True)
                failed = [m.group(1) for line in output.splitlines() if (m := _RESULT.match(line))]
                if code == 0:
                    times[kind].append(seconds)
                    break
                if failed and output.count("Timeout (>") >= len(set(failed)):
                    hung[kind].extend(failed)
                    print(f"  a test hung ({', '.join(failed)}): run again", flush=True)
                    continue
                print(output[-6000:])
                return 1
            else:
                return 1
    load_after = os.getloadavg()
    plain, checked = statistics.median(times["plain"]), statistics.median(times["closewait"])
    figures = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "load_before": load_before,
            "load_after": load_after,
        },
        "selection": SELECTION,
        "deselected": len(deselect),
        "summaries": summaries,
        "hung_attempts_thrown_away": hung,
        "seconds": times,
        "median_plain": plain,
        "median_closewait": checked,
        "overhead_percent": 100.0 * (checked - plain) / plain,
    }
    print(
        f"median plain {plain:.1f} s, --closewait {checked:.1f} s: overhead {figures['overhead_percent']:+.1f} %"
        f" (load {load_before[0]:.1f} -> {load_after[0]:.1f})"
    )
    if opts.json is not None:
        opts.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
