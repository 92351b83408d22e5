"""Model speed: simulated page visits per second and memory per simulated page.

Two mixed scenarios (each 2 MiB: 50 % zero, 25 % duplicate, 25 % unique;
MADV_HUGEPAGE; use_zero_pages=0; 1000 pages per 20 ms):
- 1 GiB, simulated end to end for long enough to cover two full scans;
- 16 GiB, set up completely, then a bounded number of ksmd batches.
"Visits" are pages handed to cmp_and_merge_page() (pages_scanned); "PTE
steps" also count the PTEs the cursor walks over.  Memory is the growth of the
process's peak RSS (ru_maxrss) while the scenario is built and run, divided by
its page count.  Usage: python benchmarks/model_speed.py [--json] [--batches N]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Any

from ksmlab.model.costs import DEFAULT_PROFILE
from ksmlab.model.run import Simulation
from ksmlab.scenario import Scenario


def mixed(size_mib: int, duration: float) -> Scenario:
    return Scenario.model_validate({
        "name": f"bench-mixed-{size_mib}",
        "duration": duration,
        "ksm": {"pages_to_scan": 1000, "sleep_millisecs": 20, "use_zero_pages": 0},
        "process": [{"region": [{"size_mib": size_mib, "thp": "hugepage", "seed": 1,
                                 "content": {"zero": 0.5, "duplicate": 0.25}}]}],
    })


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_full(size_mib: int, duration: float) -> dict[str, Any]:
    sc = mixed(size_mib, duration)
    rss0 = maxrss_bytes()
    t0 = time.perf_counter()
    sim = Simulation(sc, "mainline", DEFAULT_PROFILE)
    t_setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    tr = sim.run()
    t_run = time.perf_counter() - t1
    visits = int(tr["pages_scanned"][-1])
    return {
        "scenario": sc.name, "pages": sc.total_pages, "simulated_s": duration,
        "full_scans": int(tr["full_scans"][-1]), "setup_s": round(t_setup, 3),
        "run_s": round(t_run, 3), "visits": visits,
        "visits_per_s": round(visits / t_run),
        "bytes_per_page": round((maxrss_bytes() - rss0) / sc.total_pages, 1),
    }


def bench_bounded(size_mib: int, batches: int) -> dict[str, Any]:
    sc = mixed(size_mib, 3600.0)
    rss0 = maxrss_bytes()
    t0 = time.perf_counter()
    sim = Simulation(sc, "mainline", DEFAULT_PROFILE)
    t_setup = time.perf_counter() - t0
    ksm = sim.ksm
    ksm.run = 1
    sim.sys.ksm_running = True
    t1 = time.perf_counter()
    for _ in range(batches):
        ksm.do_scan()
    t_run = time.perf_counter() - t1
    return {
        "scenario": sc.name, "pages": sc.total_pages, "batches": batches,
        "setup_s": round(t_setup, 3), "run_s": round(t_run, 3),
        "visits": ksm.pages_scanned, "visits_per_s": round(ksm.pages_scanned / t_run),
        "bytes_per_page": round((maxrss_bytes() - rss0) / sc.total_pages, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--batches", type=int, default=300, help="ksmd batches on 16 GiB")
    ap.add_argument("--skip-16g", action="store_true", help="only the 1 GiB scenario")
    args = ap.parse_args()
    out: dict[str, Any] = {"1GiB": bench_full(1024, 15.0)}
    if not args.skip_16g:
        out["16GiB"] = bench_bounded(16384, args.batches)
    if args.json:
        print(json.dumps(out))
        return
    for name, r in out.items():
        print(f"{name}: {r['visits']} visits in {r['run_s']} s = {r['visits_per_s']} "
              f"visits/s; setup {r['setup_s']} s; {r['bytes_per_page']} bytes/page "
              f"({r['pages']} pages)")


if __name__ == "__main__":
    main()
