"""The model side of `ksmlab validate`, timed on recorded kernel traces (no live run).

For each ``*.kernel.trace.json.gz`` in the folders given (a `validate` output
folder), the replay `validate` does: ``simulate(scenario, policy, pins, khugepaged
passes, shrinker)``, with KSM's event stream when the trace recorded one (as
`validate --kernel-events`, the default) or without (``--no-events``).  Prints the
seconds per scenario and in all, as JSON with ``--json``.  Usage:
  python benchmarks/validate_model.py [--json] [--no-events] [--engine auto]
      [--policy mainline] DIR...
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ksmlab import fidelity
from ksmlab.model import simulate
from ksmlab.model.costs import DEFAULT_PROFILE
from ksmlab.scenario import Scenario
from ksmlab.trace import Trace


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--no-events", action="store_true", help="no KSM event stream")
    ap.add_argument("--engine", default="auto", help="auto, fast or exact")
    # validate takes the policy of the host it runs on (features.policy_for_host());
    # the recorded traces are of 6.18, which remaps as mainline does
    ap.add_argument("--policy", default="mainline", help="the model policy")
    args = ap.parse_args()
    out: dict[str, float] = {}
    for folder in args.folders:
        for f in sorted(folder.glob("*.kernel.trace.json.gz")):
            ref = Trace.load(f)
            sc = Scenario.model_validate(ref.meta["scenario"])
            stream = bool(ref.kernel_events and ref.kernel_events.get("recorded"))
            t0 = time.perf_counter()
            simulate(sc, args.policy, profile=DEFAULT_PROFILE, engine=args.engine,
                     kernel_events=stream and not args.no_events, **fidelity.replay(ref))
            out[sc.name] = round(time.perf_counter() - t0, 3)
            if not args.json:
                print(f"{sc.name:24} {out[sc.name]:8.3f} s", flush=True)
    total = round(sum(out.values()), 3)
    if args.json:
        print(json.dumps({"scenarios": out, "total_s": total}))
    else:
        print(f"{'all':24} {total:8.3f} s")


if __name__ == "__main__":
    main()
