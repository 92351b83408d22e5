"""What every ``ksmlab`` command shares: the error helper, the stderr console,
option types and the checks made before anything runs.  ``ksmlab kernel``
(ksmlab/kernel/cli.py) uses the same ones."""

from __future__ import annotations

import json
import shutil
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn, get_args

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from .. import __version__
from .. import scenario as scenario_mod
from ..errors import UserError
from ..scenario import Scenario
from ..trace import Trace

if TYPE_CHECKING:
    from .. import metrics
    from ..profiles import ProfileChoice

err = Console(stderr=True, highlight=False)

ScenarioArg = Annotated[str, typer.Argument(help="built-in name (ksmlab scenarios) or a .toml")]
DurationOpt = Annotated[float | None, typer.Option("--duration", "-d", help="seconds")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="folder for trace and plot")]
JsonOpt = Annotated[bool, typer.Option("--json", help="one JSON object on stdout")]


# Choices as Literal types: click checks them, --help and completion list them, and
# mypy sees plain strings.  A test keeps each equal to the list it copies.
Engine = Literal["auto", "fast", "exact"]  # ksmlab.model.run.ENGINES
Format = Literal["text", "markdown", "json"]  # report.compare_table's formats
PolicyName = Literal[  # ksmlab.model.policies.POLICIES, in its order
    "pre-6.12", "6.12", "mainline", "v1", "v1-p2", "v1-p3", "rfc", "ksm-split-no-remap",
    "ksm-skip-zeropage", "ksm-skip-huge", "ksm-huge-under-pressure", "ksm-accounted-remap"]
POLICY_HELP = "kernel policy, one of: " + ", ".join(get_args(PolicyName))

EngineOpt = Annotated[Engine, typer.Option(
    "--engine", help="model engine: auto (fast where it applies), fast or exact")]
ProfileOpt = Annotated[Path | None, typer.Option(
    "--profile", help="cost profile JSON (default: this machine's, from `ksmlab calibrate "
    "--quick`; else the shipped one)")]
PidOpt = Annotated[int | None, typer.Option(
    "--pid", help="a running process (paused for an exact image): capture it first")]
PidUzpOpt = Annotated[str, typer.Option(
    "--use-zero-pages", help="with --pid: 0, 1 or 0,1 (a run each)")]
PidScanOpt = Annotated[int, typer.Option(
    "--pages-to-scan", min=1, help="with --pid: ksm/pages_to_scan (a GiB guest takes "
    "262144 pages a full scan)")]


def fail(msg: str, code: int = 2) -> NoReturn:
    """One line on stderr, then exit (2: bad input or a machine that cannot do it)."""
    err.print(f"ksmlab: error: {msg}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


# Modules of the ``model`` extra (pyproject.toml): the base install has none of them
MODEL_EXTRA = ("numba", "llvmlite", "scipy", "matplotlib")


def missing_extra(e: ImportError) -> str:
    """One line for a module of the model extra that is not installed."""
    return (f"{e.name or e} is not installed: pip install 'ksmlab[model]' (the model's "
            "fast engine, calibrate and plots)")


def log(msg: str) -> None:
    err.print(msg, markup=False, soft_wrap=True)


def say(text: str, indent: str = "  ") -> None:
    """A paragraph on stdout within 80 columns (wrapped at spaces, words whole)."""
    print(textwrap.fill(text, 80, subsequent_indent=indent, break_on_hyphens=False))


def dump(obj: dict[str, Any], indent: int | None = None) -> None:
    """One JSON object on stdout, with the version that wrote it."""
    print(json.dumps({"ksmlab": __version__, **obj}, indent=indent))


def load(name: str, duration: float | None) -> Scenario:
    return scenario_mod.load(name).with_duration(duration)


def check_policy(name: str) -> None:
    from ..model.policies import get_policy

    try:
        get_policy(name)
    except ValueError as e:  # get_policy() names the known ones
        raise UserError(str(e)) from None


MIN_FREE_BYTES = 8 << 20  # a run's trace and plot, with room to spare


def check_out(out: Path | None) -> None:
    """An output folder that cannot take the results is refused before anything runs
    (else a live run's results are lost after it: NotADirectoryError, exit 1)."""
    if out is None:
        return
    if out.exists() and not out.is_dir():
        fail(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".ksmlab-probe-"):
            pass
        free = shutil.disk_usage(out).free
    except OSError as e:
        fail(f"--out {out}: cannot write there: {e.strerror or e}")
    if free < MIN_FREE_BYTES:
        fail(f"--out {out}: only {free >> 10} KiB free (a run's files need a few MiB)")


def writable(path: Path) -> None:
    """Refuse a profile file that cannot be written before any live run (one line)."""
    if path.is_dir():
        fail(f"--out {path}: is a folder; name the profile's file")
    check_out(path.parent)


def profile(path: Path | None) -> ProfileChoice:
    """The cost profile a model run uses (ksmlab.profiles says in which order)."""
    from ..live import machine
    from ..profiles import ProfileError, resolve

    ident = machine.identity()
    try:
        return resolve(path, ident, machine.key(ident))
    except ProfileError as e:
        raise UserError(str(e)) from None


def say_profile(choice: ProfileChoice) -> None:
    """The profile used, and why its CPU and time figures may not be this machine's
    (stderr: stdout may be one JSON object)."""
    err.print(choice.label(), markup=False, soft_wrap=True)
    if choice.warning:
        err.print(f"note: {choice.warning}", markup=False, soft_wrap=True)


def uzp_values(text: str) -> list[int]:
    try:
        uzp = sorted({int(x) for x in text.split(",")})
    except ValueError:
        uzp = []
    if not uzp or not set(uzp) <= {0, 1}:
        fail(f"--use-zero-pages {text}: use 0, 1 or 0,1")
    return uzp


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f} %"


def say_compiling(sc: Scenario, engine: str = "auto") -> None:
    """A word on stderr, a terminal or not (piped or logged, a minute of silence looks
    like a hang), when the fast engine will run and numba has yet to compile it
    (about a minute, cached after)."""
    if engine == "exact":
        return
    try:
        from ..model.fast import unsupported
        from ..model.fast.jit import compiled_before
    except ImportError:  # no numba: the run says what to install
        return
    if unsupported(sc) is None and not compiled_before():
        err.print("compiling the fast engine (numba) on its first run: about a minute; "
                  "cached after", markup=False, soft_wrap=True)


@contextmanager
def model_progress(sc: Scenario, what: str, engine: str = "auto"
                   ) -> Iterator[Callable[[float], None] | None]:
    """A word first when numba has yet to compile the fast engine
    (:func:`say_compiling`), then a bar on stderr while the model runs (a terminal
    only)."""
    say_compiling(sc, engine)
    if not err.is_terminal:
        yield None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                  TextColumn("{task.completed:.0f}/{task.total:.0f} s simulated"),
                  TimeElapsedColumn(), console=err, transient=True) as prog:
        task = prog.add_task(what, total=sc.duration)
        yield lambda t: prog.update(task, completed=min(t, sc.duration))


def progress_live(sc: Scenario, quiet: bool
                  ) -> tuple[Progress, Callable[[dict[str, float]], None]]:
    prog = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), console=err, transient=True, disable=quiet,
    )
    task = prog.add_task(sc.name, total=sc.duration, info="")

    def update(row: dict[str, float]) -> None:
        info = (f"full_scans {row.get('full_scans', 0):.0f}  "
                f"RssAnon {row.get('RssAnon', 0) / 1024:.0f}M  "
                f"THP {row.get('AnonHugePages', 0) / 1024:.0f}M  "
                f"sharing {row.get('pages_sharing', 0):.0f}  "
                f"zero {row.get('ksm_zero_pages', 0):.0f}")
        prog.update(task, completed=min(row["t"], sc.duration), info=info)

    return prog, update


def live_run(sc: Scenario, kernel_events: bool = False, name_errors: bool = True,
             attach: Any = None) -> Trace:
    """One live run with its progress display; a refusal or an interruption ends the
    command in one line (the run has restored everything by then).  ``attach``: a
    ksmlab.live.attach.Attach, for validate --pid."""
    from ..live.run import Interrupted, LiveError, LiveRun

    prog, update = progress_live(sc, quiet=False)
    live = LiveRun(sc, progress=update, log=lambda m: err.print(m, markup=False),
                   kernel_events=kernel_events, attach=attach)
    try:
        live.check()  # before the progress display: a refusal is one line, nothing else
        with prog:
            return live.run()
    except LiveError as e:
        fail(f"{sc.name}: {e}" if name_errors else str(e))
    except Interrupted as e:
        fail(f"interrupted by {e}; knobs restored", 128 + e.signum)


def emit(tr: Trace, summary: metrics.Summary, title: str, json_out: bool,
         out: Path | None, extra: dict[str, Any]) -> None:
    from .. import report

    files: dict[str, str] = {}
    lost: str | None = None
    if out is not None:
        stem = f"{tr.meta['scenario']['name']}-{extra.get('policy', 'live')}"
        try:  # each write is atomic: a full disk leaves no half file
            files["trace"] = str(tr.save(out / f"{stem}.trace.json.gz"))
            files["plot"] = str(report.plot_freed([(extra.get("policy", "live"), tr)],
                                                  out / f"{stem}.png", title))
        except OSError as e:
            lost = f"could not write to {out}: {e.strerror or e}"
        except ImportError as e:  # no matplotlib: the base install; the trace is written
            err.print(f"note: no plot: {missing_extra(e)}", markup=False, soft_wrap=True)
    if json_out:
        obj = {"scenario": tr.meta["scenario"]["name"], "kernel": tr.meta.get("kernel"),
               **extra, **summary.to_json(), "notes": tr.meta.get("notes", []), "files": files}
        print(json.dumps({"ksmlab": __version__, **obj}))
    else:
        print(report.summary_text(summary, title))
        for n in tr.meta.get("notes", []):
            say(f"note: {n}")
        for k, v in files.items():
            print(f"{k}: {v}")
    if lost:  # the summary above is the result; the files are not
        fail(f"{lost} (the summary above is the run's result)", 1)
