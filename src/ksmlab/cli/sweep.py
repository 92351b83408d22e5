"""``ksmlab sweep`` and ``ksmlab report``: policies x a grid of settings on Dask, and
the page that shows them (ksmlab.sweep, ksmlab.report_html)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..orchestrate import model_fits
from .common import ProfileOpt, err, fail, profile


def sweep(spec: Annotated[Path, typer.Argument(help="a sweep spec (TOML)")],
          out: Annotated[Path, typer.Option("--out", "-o", help="folder for the results")],
          scheduler: Annotated[str | None, typer.Option(
              "--scheduler", help="a Dask scheduler (tcp://HOST:8786); default: a local "
              "cluster")] = None,
          workers: Annotated[int | None, typer.Option(
              "--workers", min=1, help="local cluster processes (default: one a core)")] = None,
          profile_path: ProfileOpt = None) -> None:
    """Policies x a grid of scenario fields, one model run a point, on Dask."""
    from ..sweep import SweepError
    from ..sweep import sweep as run_sweep

    choice = profile(profile_path)
    try:
        res = run_sweep(spec, out, scheduler, workers, choice.profile, choice.label(), err,
                        model_fits)
    except SweepError as e:
        fail(str(e))
    for line in res.failed[:10]:
        err.print(f"failed: {line}", markup=False, soft_wrap=True)
    print(f"{res.points} points: {res.cached} cached, {res.ran} run, {len(res.failed)} "
          f"failed; {out / 'results.parquet'}")
    if res.failed:
        raise typer.Exit(1)


def report(folder: Annotated[Path, typer.Argument(help="a folder `ksmlab sweep` wrote")]
           ) -> None:
    """The sweep's page: DIR/report.html (offline) and DIR/report.txt."""
    from ..report_html import write_report
    from ..sweep import SweepError

    try:
        print(write_report(folder))
    except SweepError as e:
        fail(str(e))
