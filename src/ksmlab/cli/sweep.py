"""``ksmlab sweep`` and ``ksmlab report``: policies x a grid of settings on Dask, and
the page that shows them (ksmlab.sweep, ksmlab.report_html)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from ..orchestrate import model_fits
from .common import ProfileOpt, err, fail, profile, say


class SweepCommand(TyperCommand):
    """``--example`` without a name (last, or before another option) lists them."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # typer's own click
        if "--example" in args:
            i = args.index("--example") + 1
            if i == len(args) or args[i].startswith("-"):
                args = [*args[:i], "", *args[i:]]
        return super().parse_args(ctx, args)


def sweep(spec: Annotated[Path | None, typer.Argument(
              help="a sweep spec (TOML); or --example NAME")] = None,
          out: Annotated[Path | None, typer.Option(
              "--out", "-o", help="folder for the results")] = None,
          example: Annotated[str | None, typer.Option(
              "--example", metavar="NAME",
              help="run an example spec shipped with ksmlab; --example alone lists them")]
          = None,
          scheduler: Annotated[str | None, typer.Option(
              "--scheduler", help="a Dask scheduler (tcp://HOST:8786); default: a local "
              "cluster")] = None,
          workers: Annotated[int | None, typer.Option(
              "--workers", min=1, help="local cluster processes (default: one a core)")] = None,
          profile_path: ProfileOpt = None) -> None:
    """Policies x a grid of scenario fields, one model run a point, on Dask.

    \b
    Examples:
      ksmlab sweep --example                  the example specs shipped
      ksmlab sweep --example seeds -o seeds/  216 points, a minute or two
      ksmlab report seeds/                    seeds/report.html and report.txt
      ksmlab sweep my.toml -o sw/ --scheduler tcp://HOST:8786"""
    from ..sweep import SweepError, example_spec, examples
    from ..sweep import sweep as run_sweep

    if example == "" or (example is None and spec is None):
        if example is None:  # nothing to run: what there is to run
            print("ksmlab sweep SPEC -o DIR, or --example NAME -o DIR with one of:")
        for name, (_, about) in examples().items():
            say(f"{name:<12} {about}", " " * 13)
        return
    if example is not None and spec is not None:
        fail("name a spec or --example NAME, not both")
    if out is None:
        fail("Missing option '--out' / '-o': the folder for the results")
    try:
        path = example_spec(example) if example is not None else spec
        assert path is not None
        choice = profile(profile_path)
        res = run_sweep(path, out, scheduler, workers, choice.profile, choice.label(), err,
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
