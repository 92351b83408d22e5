"""Sweep speed: the same sweep in one process and on a LocalCluster, and a rerun of
the finished sweep (every point cached: no model work, no cluster).

- ``serial_s``: every point one after another in this process (``serial_runner``);
- ``local_cluster_s``: the same points on a LocalCluster of --workers processes,
  its workers already started and the fast engine loaded in each (as in this
  process for ``serial_s``); ``cluster_start_s`` is that start, apart;
- ``speedup``: serial_s / local_cluster_s;
- ``cached_rerun_s``: ``ksmlab sweep``'s path again on the cluster's folder.
Both tables are checked to be identical (``tables_identical``).

The default spec is the example `seeds` (ksmlab sweep --example; 216 points, about a minute in one
process).  Run it on a quiet machine: another job on the cores moves both times.
Usage:
  python benchmarks/sweep.py [--json] [--spec SPEC.toml] [--workers N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ksmlab import sweep
from ksmlab.profiles import resolve


def warm() -> None:
    """Load the fast engine's compiled code (numba's cache) in this process."""
    from ksmlab.model import simulate
    from ksmlab.scenario import load

    simulate(load("seed-uzp0").with_duration(0.5), "mainline")


def bench(spec_path: Path, workers: int, folder: Path) -> dict[str, Any]:
    import pandas as pd

    choice = resolve(None, None, None)
    prof, label = choice.profile, choice.label()
    spec, base = sweep.load_spec(spec_path)
    n = len(sweep.expand(spec, base, prof))

    warm()
    t0 = time.perf_counter()
    sweep.run(spec, base, folder / "serial", prof, label,
              sweep.serial_runner(spec.engine, prof))
    serial = time.perf_counter() - t0

    t0 = time.perf_counter()
    with sweep.dask_client(None, workers) as client:
        client.run(warm)
        t1 = time.perf_counter()
        sweep.run(spec, base, folder / "cluster", prof, label,
                  sweep.dask_runner(client, spec.engine, prof))
        t2 = time.perf_counter()

    t3 = time.perf_counter()
    again = sweep.sweep(spec_path, folder / "cluster", None, workers, prof, label, None)
    rerun = time.perf_counter() - t3
    assert again.ran == 0, again

    a = pd.read_parquet(folder / "serial" / sweep.RESULTS)
    b = pd.read_parquet(folder / "cluster" / sweep.RESULTS)
    return {"spec": str(spec_path), "points": n, "workers": workers,
            "cpus": os.cpu_count(), "serial_s": round(serial, 2),
            "cluster_start_s": round(t1 - t0, 2), "local_cluster_s": round(t2 - t1, 2),
            "speedup": round(serial / (t2 - t1), 2), "cached_rerun_s": round(rerun, 3),
            "tables_identical": a.equals(b), "profile": choice.path}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--spec", type=Path, default=sweep.example_spec("seeds"))
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--keep", type=Path, help="keep both sweep folders here")
    args = ap.parse_args()
    if args.keep:
        res = bench(args.spec, args.workers, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="ksmlab-bench-sweep-") as tmp:
            res = bench(args.spec, args.workers, Path(tmp))
    if args.json:
        print(json.dumps(res))
        return
    for k, v in res.items():
        print(f"{k:>18}: {v}")


if __name__ == "__main__":
    main()
