"""Runs inside the guest: the live lab on one scenario, trace written to the share.

``python3 -m ksmlab.kernel.guest SCENARIO.toml OUT_DIR [DURATION]``.  It is
``ksmlab run SCENARIO --json --out OUT_DIR`` without the plot (the guest has
no matplotlib): trace to ``OUT_DIR/trace.json.gz``, the summary as one JSON
object to ``OUT_DIR/summary.json`` and on stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .. import metrics
from .. import scenario as scenario_mod
from ..live.run import LiveError, LiveRun
from ..trace import KSM_COUNTERS


def main(argv: list[str]) -> int:
    src, out = Path(argv[0]), Path(argv[1])
    duration = float(argv[2]) if len(argv) > 2 and argv[2] else None
    sc = scenario_mod.load(str(src)).with_duration(duration)
    live = LiveRun(sc, log=lambda m: print(m, file=sys.stderr))
    try:
        tr = live.run()
    except LiveError as e:
        print(json.dumps({"error": str(e)}))
        (out / "summary.json").write_text(json.dumps({"error": str(e)}))
        return 2
    # counters this kernel does not have (6.1: ksm_zero_pages, pages_scanned,
    # general_profit): zero columns, so the trace has the one schema; listed in meta
    absent = [c for c in KSM_COUNTERS if c not in tr]
    for c in absent:
        tr.columns[c] = np.zeros(len(tr))
    if absent:
        tr.meta["absent_counters"] = absent
        tr.meta.setdefault("notes", []).append(
            f"this kernel has no {', '.join(absent)}: recorded as 0")
    tr.save(out / "trace.json.gz")
    obj = {"kernel": tr.meta["kernel"], **metrics.summarize(tr).to_json()}
    (out / "summary.json").write_text(json.dumps(obj))
    print(json.dumps(obj))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
