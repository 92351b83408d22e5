"""``ksmlab export``: a trace's samples as CSV."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..trace import Trace, write_atomic
from .common import fail


def export(trace: Annotated[Path, typer.Argument(help="a .trace.json.gz (run, sim, validate)")],
           out: Annotated[Path | None, typer.Option("--out", "-o", help="CSV file (default: "
                                                    "stdout)")] = None,
           raw: Annotated[bool, typer.Option(
               "--raw", help="counters as the kernel shows them, not since the start")]
           = False) -> None:
    """A trace's samples as CSV (one row a sample, one column a counter), for pandas,
    polars or a spreadsheet; the meta (scenario, knobs, kernel) stays in the trace."""
    try:
        tr = Trace.load(trace)
    except OSError as e:
        fail(f"{trace}: {e.strerror or e}")
    text = tr.to_csv(since_start=not raw)
    if out is None:
        sys.stdout.write(text)
        return
    if out.exists() and out.is_dir():
        fail(f"--out {out}: is a folder (name the CSV file)")
    try:
        write_atomic(out, text.encode())
    except OSError as e:
        fail(f"--out {out}: {e.strerror or e}")
