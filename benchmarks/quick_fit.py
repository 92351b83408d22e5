"""How well a quick calibration predicts scenarios it was not fitted on.

Fits the profile as ``ksmlab calibrate --quick`` does, on the calibration set's
kernel traces in FIT_DIR (e.g. the ``<profile>.traces/`` folder that calibrate
keeps), then judges every other kernel trace in the JUDGE_DIRs (``ksmlab validate
--out``) with the model: ksmd CPU and full-scan time errors per scenario, their
median and worst, and the CPU summed over them.  No root, no kernel: traces only.

    python benchmarks/quick_fit.py FIT_DIR JUDGE_DIR... [--prior-weight W] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from ksmlab import calibrate, fidelity
from ksmlab.model import simulate
from ksmlab.model.costs import shipped_profile
from ksmlab.scenario import Scenario
from ksmlab.trace import Trace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fit_dir", type=Path)
    ap.add_argument("judge_dirs", type=Path, nargs="+")
    ap.add_argument("--prior-weight", type=float, default=calibrate.QUICK_PRIOR_WEIGHT)
    ap.add_argument("--json", action="store_true", help="one JSON object")
    args = ap.parse_args()
    calibrate.QUICK_PRIOR_WEIGHT = args.prior_weight
    fit_on = [(n, Trace.load(args.fit_dir / f"{n}.kernel.trace.json.gz"))
              for n in fidelity.CALIBRATION_SET]
    profile, _ = calibrate.fit_kernels(fit_on, "mainline", base=shipped_profile())
    results = []
    for folder in args.judge_dirs:
        for path in sorted(folder.glob("*.kernel.trace.json.gz")):
            name = path.name.split(".")[0]
            if name in fidelity.CALIBRATION_SET:
                continue
            tr = Trace.load(path)
            sc = Scenario.model_validate(tr.meta["scenario"])
            cand = simulate(sc, "mainline", profile=profile, **fidelity.replay(tr))
            results.append(fidelity.compare(name, tr, cand))
    cpu = [r.cpu_rel_err for r in results if r.cpu_rel_err is not None]
    out = {
        "prior_weight": args.prior_weight,
        "scenarios": [{"name": r.name, "cpu_rel_err": r.cpu_rel_err,
                       "time_rel_err": r.time_rel_err} for r in results],
        "cpu_median": statistics.median(cpu) if cpu else None,
        "cpu_worst": max(cpu, default=None),
        "cpu_total": fidelity.suite_cpu_rel_err(results),
        "profile": profile.to_json(),
    }
    if args.json:
        print(json.dumps(out))
        return
    for s in out["scenarios"]:
        print(f"{s['name']:<24} cpu {s['cpu_rel_err'] * 100:5.1f} %  "
              f"time {s['time_rel_err'] * 100:5.1f} %")
    if cpu:
        print(f"held out: CPU error median {out['cpu_median'] * 100:.1f} %, worst "
              f"{out['cpu_worst'] * 100:.1f} %; summed {out['cpu_total'] * 100:.1f} %")


if __name__ == "__main__":
    main()
