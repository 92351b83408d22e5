"""Whether two sweep folders hold the same results table (`DIR/results.parquet`).

For a sweep run twice, e.g. on a local cluster and on `dask scheduler` + workers:
  python benchmarks/sweep_tables.py A/ B/
prints {"rows", "columns", "identical"} as JSON; exit code 1 when they differ.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd


def main() -> int:
    a, b = (pd.read_parquet(Path(d) / "results.parquet") for d in sys.argv[1:3])
    same = bool(a.equals(b))
    print(json.dumps({"rows": [len(a), len(b)], "columns": [a.shape[1], b.shape[1]],
                      "identical": same}))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
