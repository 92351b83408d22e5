"""``ksmlab export``: a trace's samples as CSV, or Parquet (``-o FILE.parquet``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..trace import Trace, write_atomic
from .common import fail


def export(trace: Annotated[Path, typer.Argument(help="a .trace.json.gz (run, sim, validate)")],
           out: Annotated[Path | None, typer.Option(
               "--out", "-o", help="CSV file, or .parquet (default: CSV on stdout)")] = None,
           raw: Annotated[bool, typer.Option(
               "--raw", help="counters as the kernel shows them, not since the start")]
           = False) -> None:
    """A trace's samples as CSV or Parquet (one row a sample, one column a counter),
    for pandas, polars or a spreadsheet; the meta (scenario, knobs, kernel) stays in
    the trace."""
    try:
        tr = Trace.load(trace)
    except OSError as e:
        fail(f"{trace}: {e.strerror or e}")
    if out is None:
        sys.stdout.write(tr.to_csv(since_start=not raw))
        return
    if out.exists() and out.is_dir():
        fail(f"--out {out}: is a folder (name the file)")
    frame = None
    if out.suffix == ".parquet":
        try:
            import pandas as pd
        except ImportError:
            fail("--out *.parquet needs pandas and pyarrow: pip install 'ksmlab[sweep]'")
        frame = pd.DataFrame(tr.table(since_start=not raw))
    text = tr.to_csv(since_start=not raw).encode() if frame is None else b""

    def writer(tmp: Path) -> None:
        if frame is not None:
            frame.to_parquet(tmp, index=False)
        else:
            tmp.write_bytes(text)

    try:
        write_atomic(out, writer=writer)
    except (OSError, ImportError) as e:  # pyarrow missing is an ImportError from pandas
        fail(f"--out {out}: {getattr(e, 'strerror', None) or e}")
