"""The CPU of importing ``closewait.model``: its classes made by ``closewait._frozen.dataclass`` against
the plain ``dataclasses.dataclass`` (what ``model.py`` reads as; the model imports the first at run time).

Each run is a fresh interpreter that imports what the model's import needs anyway (enum,
dataclasses, display) first, then times ``import closewait.model`` alone; the plain runs put
``dataclasses.dataclass`` in ``closewait._frozen``'s place first. Runs alternate; medians printed:

    python bench/bench_model_import.py --runs 21
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

ONE_RUN = r"""
import sys, time, json, enum, dataclasses, collections.abc
import closewait.display, closewait._frozen
if sys.argv[1] == "plain":
    closewait._frozen.dataclass = dataclasses.dataclass
start = time.thread_time()
import closewait.model
print(json.dumps((time.thread_time() - start) * 1000))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=21, help="runs of each (default 21)")
    args = parser.parse_args()
    results: dict[str, list[float]] = {"plain": [], "frozen": []}
    for _ in range(args.runs):
        for kind, times in results.items():
            done = subprocess.run([sys.executable, "-c", ONE_RUN, kind], capture_output=True, text=True, check=True)
            times.append(json.loads(done.stdout))
    for kind, values in results.items():
        median = statistics.median(values)
        print(f"import closewait.model, {kind:>6} dataclasses: {median:5.2f} ms CPU (median of {args.runs})")


if __name__ == "__main__":
    main()
