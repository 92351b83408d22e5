"""The ``ksmlab`` application: every command registered, and the entry point that
turns a user's mistake into one line and exit code 2.

Only what every command needs is imported here: the live lab and ``doctor`` run
from the base install; the model (numba, scipy) is imported by the commands that
run it.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from .. import __version__
from ..errors import UserError
from ..kernel.cli import kernel_app
from ..live.journal import Journal, RunLock
from . import (
    calibrate,
    capture,
    demo,
    doctor,
    export,
    listing,
    model,
    restore,
    run,
    selftest,
    sweep,
    thread_report,
    validate,
    watch,
)
from .common import MODEL_EXTRA, err, missing_extra

EXAMPLES = """\b
Examples:
  ksmlab doctor                      can live runs work here; the knobs now
  ksmlab run seed-uzp1               the rate-limit bypass, live (root)
  ksmlab run seed-uzp0 --json        the merge collapse, one JSON object
  ksmlab run my.toml -o out/ -d 20   a scenario file; trace+plot in out/
  ksmlab sim seed-uzp1 --policy v1   the same scenario in the model
  ksmlab compare seed-uzp0 --policies mainline,pre-6.12,v1
  ksmlab restore                     undo knobs left by a killed run
  ksmlab watch --prometheus :9867    this host as it runs, read-only
  ksmlab calibrate chains-mps8 --traces val/ --by-scan
                                     ksmd CPU per full scan, kernel/model
  ksmlab sweep --example thread -o sw/ && ksmlab report sw/
                                     policies x knobs on Dask; report.html
"""

app = typer.Typer(
    add_completion=True, no_args_is_help=True, rich_markup_mode=None,
    help="A laboratory for KSM x THP and the zero-page remap on THP split.",
    epilog=EXAMPLES,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def warn_journal(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand in ("restore", "run", "validate", "demo", "selftest"):
        return
    if ctx.resilient_parsing:  # shell completion: print nothing but the candidates
        return
    from ..live.journal import JournalDamaged

    watch_left(ctx)
    if RunLock().holder() is not None:
        return  # a run is in progress: its journal is live, not a killed run's
    try:
        rec = Journal().read()
    except JournalDamaged as e:
        err.print(f"ksmlab: warning: {e}", markup=False, soft_wrap=True)
        return
    if rec is not None:
        names = ", ".join([n for n, _ in rec.saved] + (["tracefs"] if rec.tracing else []))
        err.print(f"ksmlab: warning: a killed run (pid {rec.pid}) left knobs changed ({names}); "
                  "run `ksmlab restore`", markup=False, soft_wrap=True)


def watch_left(ctx: typer.Context) -> None:
    """A killed ``watch --tracepoints`` left its trace instance: say so."""
    from ..live.journal import JournalDamaged
    from ..live.watchtrace import JOURNAL

    if ctx.invoked_subcommand in ("restore", "watch") or RunLock(kind="watch").holder():
        return
    try:
        rec = Journal(name=JOURNAL).read()
    except JournalDamaged as e:
        err.print(f"ksmlab: warning: {e}", markup=False, soft_wrap=True)
        return
    if rec is not None and rec.tracing:
        err.print(f"ksmlab: warning: a killed `ksmlab watch --tracepoints` (pid {rec.pid}) "
                  "left its trace instance; run `ksmlab restore`", markup=False,
                  soft_wrap=True)


app.add_typer(kernel_app, name="kernel")  # patched kernels under qemu (ksmlab.kernel)


def show_version(value: bool) -> None:
    if value:
        print(f"ksmlab {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_options(ctx: typer.Context,
                 version: Annotated[bool, typer.Option(
                     "--version", is_eager=True, callback=show_version,
                     help="print the version")] = False) -> None:
    warn_journal(ctx)


app.command()(listing.scenarios)
app.command()(listing.policies)
app.command()(doctor.doctor)
app.command()(restore.restore)
app.command()(run.run)
app.command()(model.sim)
app.command()(model.compare)
app.command()(validate.validate)
app.command()(selftest.selftest)
app.command(name="thread-report")(thread_report.thread_report)
app.command()(calibrate.calibrate)
app.command()(capture.capture)
app.command(name="exec", context_settings={"allow_extra_args": True,
                                           "ignore_unknown_options": True})(capture.exec_)
app.command()(export.export)
app.command()(demo.demo)
app.command(cls=sweep.SweepCommand)(sweep.sweep)
app.command(name="report")(sweep.report)
app.command(epilog=watch.EXAMPLES)(watch.watch)


def main() -> None:
    """Entry point: user errors are one line and exit code 2, never a traceback."""
    from ..image import ImageError
    from ..live.capture import CaptureError
    from ..live.knobs import KnobError, RestoreError
    from ..live.run import LiveError
    from ..scenario import ScenarioError
    from ..trace import TraceError

    if len(sys.argv) == 1:  # bare `ksmlab`: what it can do, not an error
        sys.argv.append("--help")
    try:
        rc = app(standalone_mode=False)  # click returns the code of typer.Exit here
        sys.exit(rc if isinstance(rc, int) else 0)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (ScenarioError, KnobError, TraceError, LiveError, UserError,
            CaptureError, ImageError) as e:
        err.print(f"ksmlab: error: {e}", markup=False, soft_wrap=True)
        sys.exit(2)
    except RestoreError as e:
        err.print(f"ksmlab: error: {e}", markup=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("ksmlab: interrupted", markup=False)
        sys.exit(130)
    except Exception as e:  # a usage error from click, the model refusing, or a bug
        if isinstance(e, ImportError) and (e.name or "").split(".")[0] in MODEL_EXTRA:
            err.print(f"ksmlab: error: {missing_extra(e)}", markup=False, soft_wrap=True)
            sys.exit(2)  # the base install: the model extra is missing
        model_run = sys.modules.get("ksmlab.model.run")  # not imported: could not raise
        if model_run is not None and isinstance(e, model_run.ModelUnsupported):
            err.print(f"ksmlab: error: {e}", markup=False, soft_wrap=True)
            sys.exit(2)
        code = getattr(e, "exit_code", None)
        if code is not None:  # click's UsageError and friends
            show = getattr(e, "format_message", None)
            # one line: click lists a choice's values one per line ("Choose from:\n\t...")
            msg = " ".join(str(show() if show else e).split())
            err.print(f"ksmlab: error: {msg}", markup=False, soft_wrap=True)
            sys.exit(int(code))
        if os.environ.get("KSMLAB_DEBUG"):
            raise
        err.print(f"ksmlab: internal error: {type(e).__name__}: {e} "
                  "(KSMLAB_DEBUG=1 shows the traceback)", markup=False, soft_wrap=True)
        sys.exit(1)


__all__ = ["app", "main"]
