"""Model speed: simulated page visits per second, memory per simulated page,
the 1 TiB host, and the real ksmd's CPU per page visit, in one run.

- exact engine: the 16 GiB mixed scenario (each 2 MiB: 50 % zero, 25 %
  duplicate, 25 % unique; MADV_HUGEPAGE; use_zero_pages=0; 1000 pages per
  20 ms), set up completely, then a bounded number of ksmd batches;
- fast engine: the same 16 GiB scenario simulated end to end through three
  full scans (``simulate(..., engine="fast")``; set-up timed apart);
- host-1t (256 guests x 4 GiB) on the fast engine through three full scans,
  in a child process (its own peak RSS), with a progress bar on stderr;
- the fast engine on the live run's own scenario (like for like);
- the real ksmd: an unthrottled live run (sleep_millisecs=0, pages_to_scan
  large) of a small scenario via ksmlab.live; ksmd's CPU ns / pages_scanned.
  It touches the kernel (root, KSM): skip it with --no-live.

"Visits" are pages handed to cmp_and_merge_page() (pages_scanned).  Memory per
page is the child's peak RSS over host-1t's page count (everything counted:
interpreter, numba, arrays).  Usage:
  python benchmarks/model_speed.py [--json] [--no-live] [--batches N] [--skip-host]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import resource
import subprocess
import sys
import time
from typing import Any

from ksmlab.model import simulate
from ksmlab.model.costs import DEFAULT_PROFILE
from ksmlab.model.run import Simulation
from ksmlab.scenario import Scenario, load

GiB = 1 << 30


def mixed(size_mib: int, duration: float) -> Scenario:
    return Scenario.model_validate({
        "name": f"bench-mixed-{size_mib}",
        "duration": duration,
        "sample_interval": 1.0,
        "ksm": {"pages_to_scan": 1000, "sleep_millisecs": 20, "use_zero_pages": 0},
        "process": [{"region": [{"size_mib": size_mib, "thp": "hugepage", "seed": 1,
                                 "content": {"zero": 0.5, "duplicate": 0.25}}]}],
    })


def maxrss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    return resource.getrusage(who).ru_maxrss * 1024


def bench_exact(size_mib: int, batches: int) -> dict[str, Any]:
    sc = mixed(size_mib, 3600.0)
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
    return {"pages": sc.total_pages, "batches": batches, "setup_s": round(t_setup, 2),
            "run_s": round(t_run, 3), "visits": ksm.pages_scanned,
            "visits_per_s": round(ksm.pages_scanned / t_run)}


def bench_fast(size_mib: int, scans: int) -> dict[str, Any]:
    from ksmlab.model.fast import FastSimulation

    # warm the compiled code (loaded from numba's cache, or compiled once)
    simulate(mixed(2, 0.2), "mainline", engine="fast")
    # about 110 s of simulated time per full scan of 16 GiB at 1000 pages / ~26 ms
    # (the shipped profile); 120 s per scan leaves room for the third one to end
    sc = mixed(size_mib, 1.0 + scans * 120.0 * size_mib / 16384)
    t0 = time.perf_counter()
    sim = FastSimulation(sc, "mainline", DEFAULT_PROFILE)
    t_setup = time.perf_counter() - t0
    marks: list[tuple[float, int, int]] = [(0.0, 0, 0)]  # (wall, full scans, visits)

    def tick(_t: float) -> None:
        if sim.full_scans() != marks[-1][1]:
            marks.append((time.perf_counter() - t1, sim.full_scans(), sim.pages_scanned()))

    t1 = time.perf_counter()
    tr = sim.run(progress=tick)
    t_run = time.perf_counter() - t1
    visits = int(tr["pages_scanned"][-1])
    # where the time goes: scan 1 only checksums, later scans walk and merge
    per_scan = [round((v1 - v0) / (w1 - w0)) for (w0, _, v0), (w1, _, v1)
                in itertools.pairwise(marks) if w1 > w0]
    return {"pages": sc.total_pages, "simulated_s": sc.duration,
            "full_scans": int(tr["full_scans"][-1]), "setup_s": round(t_setup, 2),
            "run_s": round(t_run, 3), "visits": visits, "visits_per_s": round(visits / t_run),
            "visits_per_s_by_scan": per_scan}


def host_child(scans: int) -> None:
    """Run in a child: host-1t until ``scans`` full scans end; one JSON line."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ksmlab.model.fast import FastSimulation

    sc = load("host-1t")
    t0 = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=Console(stderr=True)) as bar:
        fill = bar.add_task("host-1t set-up", total=sc.total_pages, info="")
        sim = FastSimulation(sc, "mainline", DEFAULT_PROFILE,
                             progress_setup=lambda done, _n: bar.update(fill, completed=done))
        t_setup = time.perf_counter() - t0
        task = bar.add_task("host-1t ksmd", total=scans, info="")

        def tick(t: float) -> None:
            scans_done = int(sim.full_scans())
            bar.update(task, completed=min(scans_done, scans),
                       info=f"t={t:,.0f} s, {scans_done} full scans, "
                            f"{sim.pages_scanned() / 1e6:,.0f}M visits")
            if scans_done >= scans:
                raise _Done

        with contextlib.suppress(_Done):
            sim.run(progress=tick)
    wall = time.perf_counter() - t0
    print(json.dumps({
        "pages": sc.total_pages, "full_scans": sim.full_scans(), "visits": sim.pages_scanned(),
        "setup_s": round(t_setup, 1), "wall_s": round(wall, 1),
        "peak_gib": round(maxrss_bytes() / GiB, 2),
        "bytes_per_page": round(maxrss_bytes() / sc.total_pages, 1),
    }))


class _Done(Exception):
    pass


def bench_host(scans: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--host-child", str(scans)],
                         stdout=subprocess.PIPE, check=True, text=True)
    res: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return res


def unthrottled() -> Scenario:
    """The live ksmd measurement's scenario (256 MiB mixed, no sleeps)."""
    return Scenario.model_validate({
        "name": "bench-ksmd-unthrottled",
        "duration": 10.0,
        "ksm": {"pages_to_scan": 100000, "sleep_millisecs": 0, "use_zero_pages": 0},
        "process": [{"region": [{"size_mib": 256, "thp": "nohugepage", "seed": 1,
                                 "content": {"zero": 0.5, "duplicate": 0.25}}]}],
    })


def bench_fast_same() -> dict[str, Any]:
    """The fast engine on the live ksmd measurement's own scenario: like for like
    (hundreds of full scans of a small, mostly merged region)."""
    from ksmlab.model.fast import FastSimulation

    sim = FastSimulation(unthrottled(), "mainline", DEFAULT_PROFILE)
    t0 = time.perf_counter()
    sim.run()
    dt = time.perf_counter() - t0
    return {"visits": sim.pages_scanned(), "full_scans": sim.full_scans(),
            "run_s": round(dt, 3), "visits_per_s": round(sim.pages_scanned() / dt)}


def bench_ksmd() -> dict[str, Any]:
    """The real ksmd, unthrottled: CPU ns per page visit (touches the kernel)."""
    from ksmlab.live.run import LiveRun

    tr = LiveRun(unthrottled()).run()
    visits = float(tr.since_start("pages_scanned")[-1])
    cpu_ns = float(tr.since_start("ksmd_cpu_ns")[-1])
    return {"visits": int(visits), "cpu_s": round(cpu_ns / 1e9, 3),
            "ns_per_visit": round(cpu_ns / visits, 1) if visits else None,
            "visits_per_s": round(visits / (cpu_ns / 1e9)) if cpu_ns else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--no-live", action="store_true", help="skip the live ksmd measurement")
    ap.add_argument("--batches", type=int, default=300, help="exact engine: ksmd batches")
    ap.add_argument("--scans", type=int, default=3, help="full scans (fast 16 GiB, host-1t)")
    ap.add_argument("--skip-host", action="store_true", help="skip host-1t")
    ap.add_argument("--host-child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.host_child:
        host_child(args.host_child)
        return
    out: dict[str, Any] = {}
    out["exact_16GiB"] = bench_exact(16384, args.batches)
    out["fast_16GiB"] = bench_fast(16384, args.scans)
    out["fast_unthrottled"] = bench_fast_same()
    out["host_1t"] = None if args.skip_host else bench_host(args.scans)
    out["ksmd"] = None if args.no_live else bench_ksmd()
    host = out["host_1t"] or {}
    ksmd = out["ksmd"] or {}
    out.update({
        "exact_visits_per_s": out["exact_16GiB"]["visits_per_s"],
        "fast_visits_per_s": out["fast_16GiB"]["visits_per_s"],
        "ksmd_visits_per_s": ksmd.get("visits_per_s"),
        "fast_over_ksmd": (round(out["fast_16GiB"]["visits_per_s"] / ksmd["visits_per_s"], 1)
                           if ksmd.get("visits_per_s") else None),
        # like for like: both on the unthrottled 256 MiB scenario
        "fast_over_ksmd_same_scenario": (
            round(out["fast_unthrottled"]["visits_per_s"] / ksmd["visits_per_s"], 1)
            if ksmd.get("visits_per_s") else None),
        "bytes_per_page": host.get("bytes_per_page"),
        "host_1t_wall_s": host.get("wall_s"),
        "host_1t_peak_gib": host.get("peak_gib"),
    })
    if args.json:
        print(json.dumps(out))
        return
    e, f = out["exact_16GiB"], out["fast_16GiB"]
    print(f"exact 16 GiB: {e['visits']:,} visits in {e['run_s']} s = {e['visits_per_s']:,}/s "
          f"(set-up {e['setup_s']} s)")
    print(f"fast  16 GiB: {f['visits']:,} visits ({f['full_scans']} full scans) in {f['run_s']} s"
          f" = {f['visits_per_s']:,}/s (set-up {f['setup_s']} s)")
    print("  by full scan (M visits/s): "
          + ", ".join(f"{v / 1e6:.1f}" for v in f["visits_per_s_by_scan"]))
    if host:
        print(f"host-1t: {host['pages']:,} pages, {host['full_scans']} full scans, "
              f"{host['visits']:,} visits: {host['wall_s']} s wall (set-up {host['setup_s']} s),"
              f" peak {host['peak_gib']} GiB = {host['bytes_per_page']} bytes/page")
    if ksmd:
        print(f"real ksmd: {ksmd['ns_per_visit']} ns CPU per visit = {ksmd['visits_per_s']:,} "
              f"visits/s; fast engine = {out['fast_over_ksmd']}x")
        u = out["fast_unthrottled"]
        print(f"  on ksmd's own scenario the fast engine makes {u['visits_per_s']:,} visits/s "
              f"= {out['fast_over_ksmd_same_scenario']}x")
    else:
        print("real ksmd: not measured (--no-live)")


if __name__ == "__main__":
    main()
