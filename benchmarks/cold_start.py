"""Does work run slower right after a sleep?  The user-space side of the model's
``cold_start`` price (README "Fidelity").

ksmd works in batches between 20 ms sleeps.  This loop checksums 4 KiB pages
(zlib.crc32 over a 64 MiB buffer, walked in order as ksmd walks a region) in
batches of N pages, each batch after a 20 ms sleep or straight after the last,
and prints the median ns per page of each.  No root, no knobs: it touches
nothing but its own memory.

    python benchmarks/cold_start.py [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import zlib

PAGE = 4096
BUFFER = 64 << 20


def batch_ns(buf: bytes, first: int, n: int) -> int:
    t = time.perf_counter_ns()
    for i in range(first, first + n):
        o = i * PAGE % len(buf)
        zlib.crc32(buf[o:o + PAGE])
    return time.perf_counter_ns() - t


def ns_per_page(buf: bytes, n: int, sleep_s: float, batches: int) -> float:
    first, times = 0, []
    for _ in range(batches):
        if sleep_s:
            time.sleep(sleep_s)
        times.append(batch_ns(buf, first, n))
        first += n
    return statistics.median(times[3:]) / n  # the first batches warm the interpreter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="one JSON object")
    args = ap.parse_args()
    buf = os.urandom(BUFFER)
    rows = []
    for n in (100, 1000):
        batches = max(40, 15000 // n)
        slept = ns_per_page(buf, n, 0.02, batches)
        warm = ns_per_page(buf, n, 0.0, batches)
        rows.append({"pages_per_batch": n, "after_sleep_ns": slept, "back_to_back_ns": warm,
                     "slower": slept / warm - 1.0})
    if args.json:
        print(json.dumps({"batches": rows}))
        return
    print(f"{'pages/batch':>11} {'after 20 ms sleep':>18} {'back to back':>13} {'slower':>7}")
    for r in rows:
        print(f"{r['pages_per_batch']:>11} {r['after_sleep_ns']:>15.0f} ns"
              f" {r['back_to_back_ns']:>10.0f} ns {r['slower'] * 100:>6.0f} %")


if __name__ == "__main__":
    main()
