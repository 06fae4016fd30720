"""How full the recorder's entries table may get: the share of new entries dropped, by load and window.

    python bench/recorder_table_sim.py            # 2^16 slots, windows 8, 16 and 32

The table (``closewait.sources.recorder``): a socket's home slot is ``cookie & (slots - 1)``, and
it takes the first free slot among the ``window`` slots from there, or is dropped. This plays the
same rule in Python, no kernel needed: every socket that enters is a leak that stays (the worst
case: nothing ever frees a slot), and at each load the next 4,000 sockets are tried without being
kept, to measure the share a table that full would drop. Two kinds of cookies:

- ``sequential``: the kernel's counter, with gaps of 1 to 20 between two sockets that enter (other
  sockets asked for theirs meanwhile), so the table wraps many times before it is full;
- ``random``: no order at all (an upper bound on collisions for a given load).
"""

from __future__ import annotations

import argparse
import random

LOADS = (0.25, 0.5, 0.75, 0.9)


def drop_shares(slots: int, window: int, kind: str, seed: int = 1) -> dict[float, float]:
    rnd = random.Random(seed)
    table = [0] * slots
    mask = slots - 1
    counter = 0

    def next_cookie() -> int:
        nonlocal counter
        if kind == "sequential":
            counter += rnd.randint(1, 20)
            return counter
        return rnd.getrandbits(40) | 1

    def free_slot(cookie: int) -> int | None:
        slot = cookie & mask
        for _ in range(window):
            if not table[slot]:
                return slot
            slot = (slot + 1) & mask
        return None

    shares: dict[float, float] = {}
    held = 0
    for load in LOADS:
        while held < load * slots:
            cookie = next_cookie()
            slot = free_slot(cookie)
            if slot is not None:
                table[slot] = cookie
                held += 1
        trials = 4000
        shares[load] = sum(free_slot(next_cookie()) is None for _ in range(trials)) / trials
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=1 << 16)
    args = parser.parse_args()
    print("kind        window  " + "  ".join(f"{load:>6.0%}" for load in LOADS))
    for kind in ("sequential", "random"):
        for window in (8, 16, 32):
            shares = drop_shares(args.slots, window, kind)
            print(f"{kind:<11} {window:>6}  " + "  ".join(f"{shares[load]:>6.2%}" for load in LOADS))


if __name__ == "__main__":
    main()
