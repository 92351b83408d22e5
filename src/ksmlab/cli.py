"""The ``ksmlab`` command."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__, metrics, report
from . import scenario as scenario_mod
from .kernel.cli import kernel_app
from .live.journal import Journal, RunLock
from .live.kernelfs import KernelFS
from .live.knobs import KnobError, RestoreError
from .model.policies import POLICIES as _POLICY_NAMES
from .profiles import ProfileChoice
from .scenario import KHUGEPAGED_PARKED_MS, Scenario, ScenarioError
from .trace import Trace, TraceError, write_atomic

if TYPE_CHECKING:
    from .fidelity import Fidelity
    from .live.attach import Attach

EXAMPLES = """\b
Examples:
  ksmlab doctor                      can live runs work here; the knobs now
  ksmlab run seed-uzp1               the rate-limit bypass, live (root)
  ksmlab run seed-uzp0 --json        the merge collapse, one JSON object
  ksmlab run my.toml -o out/ -d 20   a scenario file; trace+plot in out/
  ksmlab sim seed-uzp1 --policy v1   the same scenario in the model
  ksmlab compare seed-uzp0 --policies mainline,pre-6.12,v1
  ksmlab restore                     undo knobs left by a killed run
  ksmlab calibrate chains-mps8 --traces val/ --by-scan
                                     ksmd CPU per full scan, kernel/model
"""

app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None,
    help="A laboratory for KSM x THP and the zero-page remap on THP split.",
    epilog=EXAMPLES,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True, highlight=False)

ScenarioArg = Annotated[str, typer.Argument(help="built-in name (ksmlab scenarios) or a .toml")]
DurationOpt = Annotated[float | None, typer.Option("--duration", "-d", help="seconds")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="folder for trace and plot")]
JsonOpt = Annotated[bool, typer.Option("--json", help="one JSON object on stdout")]
EngineOpt = Annotated[str, typer.Option(
    "--engine", help="model engine: auto (fast where it applies), fast or exact")]
POLICY_HELP = "one of: " + ", ".join(_POLICY_NAMES)


class UserError(Exception):
    """Bad input or a machine that cannot do it: one line, exit code 2."""


def fail(msg: str, code: int = 2) -> NoReturn:
    err.print(f"ksmlab: error: {msg}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def _load(name: str, duration: float | None) -> Scenario:
    return scenario_mod.load(name).with_duration(duration)


def _model_fits(sc: Scenario, engine: str = "auto", events: bool = False) -> None:
    """Refuse, before it starts, a model run this machine has no memory for (a 10 TiB
    region ran 30 s and was OOM-killed at 24 GB resident)."""
    from .live.run import mem_available_mib
    from .model.run import memory_estimate

    need, eng = memory_estimate(sc, engine, events)
    avail = mem_available_mib(KernelFS())
    if avail is not None and need > avail << 20:
        raise UserError(
            f"{sc.name}: the model needs about {need / 2**30:.1f} GiB for {sc.total_mib} MiB "
            f"of simulated memory ({eng} engine) but MemAvailable is {avail / 1024:.1f} GiB")


def _warn_journal(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand in ("restore", "run", "validate", "demo"):
        return
    from .live.journal import JournalDamaged

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


app.add_typer(kernel_app, name="kernel")  # patched kernels under qemu (ksmlab.kernel)


def _version(value: bool) -> None:
    if value:
        print(f"ksmlab {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(ctx: typer.Context,
          version: Annotated[bool, typer.Option(
              "--version", is_eager=True, callback=_version, help="print the version")]
          = False) -> None:
    _warn_journal(ctx)


@app.command()
def scenarios(json_out: JsonOpt = False) -> None:
    """List the built-in scenarios."""
    items = []
    for name in scenario_mod.builtin_names():
        sc = scenario_mod.load(name)
        items.append({"name": name, "mib": sc.total_mib, "duration": sc.duration,
                      "description": sc.description})
    if json_out:
        print(json.dumps({"ksmlab": __version__, "scenarios": items}))
        return
    for it in items:  # 80 columns: the description wraps under itself, never cut
        head = f"{it['name']:<22} {it['mib']:>7} MiB {it['duration']:>5.0f} s  "
        print(textwrap.fill(str(it["description"]), 80, initial_indent=head,
                            subsequent_indent=" " * len(head)))


@app.command()
def policies(json_out: JsonOpt = False) -> None:
    """List the kernel variants the model knows (policies)."""
    from .model import POLICIES

    if json_out:
        print(json.dumps({"ksmlab": __version__, "policies": [
            {"name": p.name, "description": p.description, "sources": p.sources}
            for p in POLICIES.values()]}))
        return
    for p in POLICIES.values():
        print(textwrap.fill(f"{p.name}: {p.description}", 80, subsequent_indent="  "))
        for rule, src in p.sources.items():
            print(textwrap.fill(f"{rule}: {src}", 80, initial_indent="    ",
                                subsequent_indent="      "))


@app.command()
def doctor(json_out: JsonOpt = False,
           advice: Annotated[bool, typer.Option(
               "--advice/--no-advice", help="run the model on the host's settings (a few s)")]
           = True) -> None:
    """This kernel for an operator: does it remap, what KSM does now, what the
    settings expose the host to, what to set; and whether live runs work here.

    Exit code 0: nothing to act on; 1: KSM runs here with settings under which the
    model of this kernel shows a regression, or a killed run left knobs changed;
    3: live runs cannot work here (no root, KSM or THP)."""
    from .live.doctor import diagnose, ksm_now
    from .live.probe import probe_remap

    fs = KernelFS()
    d = diagnose(fs)
    probe = probe_remap()
    d["remap"] = {"remaps": probe.remaps, "how": probe.how}
    d["ksm_now"] = now = ksm_now(fs)
    knobs = d["knobs"]  # as diagnose() read them: "ksm/pages_to_scan" -> "100"
    adv = None
    if advice and d["ksm"]:
        from .advice import advise

        adv = advise(knobs, probe.remaps)
        d["advice"] = adv.to_json()
    thp_on = knobs.get("transparent_hugepage/enabled", "never") != "never"
    exposed = bool(adv and adv.current.verdicts and now.get("run") == 1 and thp_on)
    d["exposed"] = exposed
    code = 3 if not d["live_ok"] and not d["journal"] else 1 if exposed or d["journal"] else 0
    d["exit_code"] = code
    if json_out:
        print(json.dumps({"ksmlab": __version__, **d}))
        raise typer.Exit(code)
    row = _row
    row("kernel", d["kernel"])
    row("root", "yes" if d["root"] else "no")
    row("KSM", f"{'yes' if d['ksm'] else 'no'}   THP {'yes' if d['thp'] else 'no'}   "
        f"ksmd pid {d['ksmd_pid']}")
    row("memory", f"{d['mem_available_mib']} MiB available")
    row("remap", f"{ {True: 'yes', False: 'no', None: 'unknown'}[probe.remaps]}: {probe.how}")
    _say_ksm_now(now)
    if adv is not None:
        verdict = ", ".join(adv.current.verdicts) or "neither regression"
        row("exposure", f"{'now' if exposed else 'if KSM ran'}: {verdict} (the model of "
            f"this kernel, {adv.policy}, on seed-uzp1 with this host's knobs, "
            f"{adv.seconds:.0f} s)")
        for line in adv.say:
            row("advice", f"- {line}", "  ")
    for name, value in d["knobs"].items():
        print(f"  {name:<48} {value}"[:80])
    prof = d["profile"]
    if prof["source"] == "machine":
        row("profile", f"this machine's, fitted {str(prof['fitted'])[:16]}: {prof['path']}")
    elif prof["source"] == "shipped":
        row("profile", "none for this machine; the shipped one is fitted elsewhere "
            "(ksmlab calibrate --quick fits this machine's, ~3 min live)")
    else:
        row("profile", f"{prof['source']}: {prof.get('path')}")
    if prof.get("warning") and prof["source"] != "shipped":
        row("", prof["warning"])
    row("events", d["kernel_events"])
    if d["journal"]:
        row("journal", f"a killed run left knobs changed: {d['journal']} (ksmlab restore)")
    if d["ksm_mergeable_pids"]:
        row("note", f"ksmd would also scan pids {d['ksm_mergeable_pids'][:8]} "
            "(mergeable memory)")
    if d["thp_eligible_pids"]:
        row("note", f"khugepaged shares its passes with pids {d['thp_eligible_pids'][:8]}")
    for scheme in d["damon"]:
        row("note", f"DAMON {scheme}: it can split THPs no KSM knob controls")
    if d["lock_holder"]:
        row("lock", f"a live run is in progress (pid {d['lock_holder']})")
    if d["live_ok"]:
        row("live runs", "can work here")
    else:
        for p in d["problems"]:
            row("live runs", f"cannot work: {p}")
    raise typer.Exit(code)


def _row(label: str, text: str, hang: str = "") -> None:
    """One labelled line of doctor's report, wrapped at 80 columns."""
    for i, line in enumerate(textwrap.wrap(text, 68, subsequent_indent=hang,
                                           break_on_hyphens=False) or [""]):
        print(f"{label if i == 0 else '':<12}{line}")


def _say_ksm_now(now: dict[str, Any]) -> None:
    def mib(pages: int | None) -> str:
        return "-" if pages is None else f"{pages * 4 / 1024:.1f} MiB"

    state = {0: "stopped", 1: "running", 2: "unmerging"}.get(now.get("run") or 0, "?")
    profit = now.get("general_profit")
    _row("KSM now", f"{state}: pages_sharing {now.get('pages_sharing')} "
         f"({mib(now.get('pages_sharing'))} saved), ksm_zero_pages "
         f"{now.get('ksm_zero_pages')}, general_profit "
         f"{'-' if profit is None else f'{profit / 2**20:.1f} MiB'}, full_scans "
         f"{now.get('full_scans')}")
    _row("THP splits", f"{now.get('thp_split_page')} since boot; where the kernel remaps, "
         "each freed its zero-filled subpages, which no KSM counter shows")


@app.command()
def restore(
    to_boot: Annotated[bool, typer.Option(
        "--to-boot", help="put every knob back as this boot had it before the lab's first "
        "change (when a journal is damaged or lost)")] = False,
) -> None:
    """Put back knobs left changed by a killed live run (from its journal)."""
    from .live.journal import BootValues, JournalDamaged
    from .live.run import LiveError, restore_journal, restore_to_boot

    if os.geteuid() != 0:
        try:
            left = Journal().read() is not None
        except JournalDamaged:
            left = True
        if left or to_boot:
            fail("restoring knobs needs root")
        print("nothing to restore: no journal of a killed run")
        return
    lock = RunLock()
    try:
        lock.acquire()
    except Exception as e:
        fail(str(e))
    try:
        if to_boot:
            boot = restore_to_boot(KernelFS(), Journal(), BootValues())
            print("restored as this boot had them: "
                  + ", ".join(f"{n}={v}" for n, v in boot))
            return
        saved = restore_journal(KernelFS(), Journal(), lock)
    except LiveError as e:
        fail(str(e))
    finally:
        lock.release()
    if saved:
        print("restored: " + ", ".join(f"{n}={v}" for n, v in saved))
    else:
        print("nothing to restore: no journal of a killed run")


def _live(sc: Scenario, kernel_events: bool = False, name_errors: bool = True,
          attach: Attach | None = None) -> Trace:
    """One live run with its progress display; a refusal or an interruption ends the
    command in one line (the run has restored everything by then)."""
    from .live.run import Interrupted, LiveError, LiveRun

    prog, update = _progress_live(sc, quiet=False)
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


def _progress_live(sc: Scenario, quiet: bool
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


MIN_FREE_BYTES = 8 << 20  # a run's trace and plot, with room to spare


def _check_out(out: Path | None) -> None:
    """An output folder that cannot take the results is refused before anything runs
    (a live run's results were lost after it: NotADirectoryError, exit 1)."""
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


def _emit(tr: Trace, summary: metrics.Summary, title: str, json_out: bool,
          out: Path | None, extra: dict[str, Any]) -> None:
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
    if json_out:
        obj = {"scenario": tr.meta["scenario"]["name"], "kernel": tr.meta.get("kernel"),
               **extra, **summary.to_json(), "notes": tr.meta.get("notes", []), "files": files}
        print(json.dumps({"ksmlab": __version__, **obj}))
    else:
        print(report.summary_text(summary, title))
        for n in tr.meta.get("notes", []):
            print(f"note: {n}")
        for k, v in files.items():
            print(f"{k}: {v}")
    if lost:  # the summary above is the result; the files are not
        fail(f"{lost} (the summary above is the run's result)", 1)


@app.command()
def run(scenario: ScenarioArg, duration: DurationOpt = None, out: OutOpt = None,
        json_out: JsonOpt = False,
        kernel_events: Annotated[bool, typer.Option(
            "--kernel-events", help="also record KSM's tracepoints (tracefs) in the trace")]
        = False) -> None:
    """Run a scenario on the running kernel (root): knobs set and always restored."""
    sc = _load(scenario, duration)
    _check_out(out)
    tr = _live(sc, kernel_events=kernel_events, name_errors=False)
    summary = metrics.summarize(tr)
    extra: dict[str, Any] = {}
    if tr.kernel_events is not None:
        ke = tr.kernel_events
        extra["kernel_events"] = {k: ke.get(k) for k in ("recorded", "counts", "lost")}
    _emit(tr, summary, f"{sc.name} on Linux {tr.meta['kernel']} (live)", json_out, out, extra)


@app.command()
def sim(scenario: ScenarioArg,
        policy: Annotated[str, typer.Option("--policy", "-p", help=POLICY_HELP)],
        duration: DurationOpt = None, out: OutOpt = None, json_out: JsonOpt = False,
        profile: ProfileOpt = None, engine: EngineOpt = "auto") -> None:
    """Run a scenario in the model under one kernel policy (no root needed)."""
    from .model import get_policy, simulate

    sc = _load(scenario, duration)
    _policy(get_policy, policy)
    _engine(engine)
    _model_fits(sc, engine)
    _check_out(out)
    choice = _profile(profile)
    with _model_progress(sc, f"{sc.name} under {policy}", engine) as progress:
        tr = simulate(sc, policy, profile=choice.profile, engine=engine, progress=progress)
    summary = metrics.summarize(tr)
    if not json_out:
        _say_profile(choice)
    _emit(tr, summary, f"{sc.name} under {policy} (model)", json_out, out,
          {"policy": policy, "profile": choice.to_json()})


ProfileOpt = Annotated[Path | None, typer.Option(
    "--profile", help="cost profile JSON (default: this machine's, from `ksmlab calibrate "
    "--quick`; else the shipped one)")]


@contextmanager
def _model_progress(sc: Scenario, what: str, engine: str = "auto"
                    ) -> Iterator[Callable[[float], None] | None]:
    """A bar on stderr while the model runs (a terminal only), and a word first when
    numba has yet to compile the fast engine (about a minute, once)."""
    if not err.is_terminal:
        yield None
        return
    from .model.fast import unsupported
    from .model.fast.jit import compiled_before

    if engine != "exact" and unsupported(sc) is None and not compiled_before():
        err.print("compiling the fast engine (numba) on its first run: about a minute; "
                  "cached after", markup=False)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                  TextColumn("{task.completed:.0f}/{task.total:.0f} s simulated"),
                  TimeElapsedColumn(), console=err, transient=True) as prog:
        task = prog.add_task(what, total=sc.duration)
        yield lambda t: prog.update(task, completed=min(t, sc.duration))


def _profile(path: Path | None) -> ProfileChoice:
    """The cost profile a model run uses (ksmlab.profiles says in which order)."""
    from .live import machine
    from .profiles import ProfileError, resolve

    ident = machine.identity()
    try:
        return resolve(path, ident, machine.key(ident))
    except ProfileError as e:
        raise UserError(str(e)) from None


def _say_profile(choice: ProfileChoice) -> None:
    """The profile used, and why its CPU and time figures may not be this machine's
    (stderr: stdout may be one JSON object)."""
    err.print(choice.label(), markup=False, soft_wrap=True)
    if choice.warning:
        err.print(f"note: {choice.warning}", markup=False, soft_wrap=True)


def kernel_confirmed(scenario: str) -> Callable[[str], bool | None]:
    """Per policy: did a patched kernel confirm the model on ``scenario``? (cached
    results of `ksmlab kernel validate`; nothing is built or booted here)"""
    from .kernel.validate import confirmed

    return lambda policy: confirmed(policy, scenario)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f} %"


def _policy(get: Callable[[str], object], name: str) -> None:
    try:
        get(name)
    except ValueError as e:  # get_policy() names the known ones
        raise UserError(str(e)) from None


def _engine(name: str) -> None:
    from .model.run import ENGINES

    if name not in ENGINES:
        fail(f"--engine {name}: use {', '.join(ENGINES)}")


Fmt = Annotated[str, typer.Option("--format", "-f", help="one of: text, markdown, json")]


@app.command()
def compare(ctx: typer.Context,
            scenario: Annotated[str | None, typer.Argument(
                help="built-in name (ksmlab scenarios) or a .toml")] = None,
            policies: Annotated[str, typer.Option("--policies", help="A,B,... or all")] = "all",
            duration: DurationOpt = None, fmt: Fmt = "text", out: OutOpt = None,
            profile: ProfileOpt = None, engine: EngineOpt = "auto",
            pid: PidOpt = None, use_zero_pages: PidUzpOpt = "0",
            pages_to_scan: PidScanOpt = 100, json_out: JsonOpt = False) -> None:
    """The same scenario under several policies, side by side.

    With --pid: capture the process (ksmlab capture) and compare its memory as it is."""
    from .model import POLICIES, get_policy, simulate

    fmt = "json" if json_out else fmt  # --json as every other command has it
    if fmt not in ("text", "markdown", "json"):
        fail(f"--format {fmt}: use text, markdown or json")
    if (scenario is None) == (pid is None):
        fail("name a scenario or --pid PID (one of them)")
    if pid is not None:
        from .live.capture import capture

        values = _uzp_values(use_zero_pages)
        if len(values) != 1:
            fail("compare --pid takes one --use-zero-pages value")
        uzp = values[0]
        _check_out(out)
        if out is None:  # the image lives as long as the command
            tmp = tempfile.TemporaryDirectory(prefix="ksmlab-capture-")
            ctx.call_on_close(tmp.cleanup)
        folder = (out or Path(tmp.name)) / f"pid{pid}.image"
        capture([pid], folder)
        sc = Scenario.model_validate({**_pid_base(pid, uzp, duration or 60.0, pages_to_scan),
                                      "process": [{"name": "captured", "image": str(folder)}]})
        if out is not None:
            err.print(f"captured process {pid} into {folder}", markup=False)
    else:
        assert scenario is not None
        sc = _load(scenario, duration)
    names = list(POLICIES) if policies == "all" else [p.strip() for p in policies.split(",")]
    for n in names:
        _policy(get_policy, n)
    _engine(engine)
    _model_fits(sc, engine)
    _check_out(out)
    choice = _profile(profile)
    results = []
    for n in names:
        with _model_progress(sc, f"{sc.name} under {n}", engine) as progress:
            results.append((n, simulate(sc, n, profile=choice.profile, engine=engine,
                                        progress=progress)))
    summaries = [(n, metrics.summarize(tr)) for n, tr in results]
    table = report.compare_table(summaries, fmt, f"{sc.name}: {sc.description}",
                                 kernel_confirmed(sc.name))
    if fmt == "json":
        table = json.dumps({"ksmlab": __version__, **json.loads(table),
                            "profile": choice.to_json(), "engine": engine}, indent=1)
    else:
        _say_profile(choice)
    print(table)
    if out is not None:
        report.plot_freed(results, out / f"{sc.name}-compare.png", sc.name)


def _pid_scenarios(pid: int, uzp: list[int], duration: float | None, pages_to_scan: int,
                   out: Path) -> list[tuple[Scenario, Attach]]:
    """validate --pid: one run per use_zero_pages value, each capturing the process
    into ``out`` when KSM is unmerged (live/attach.py); the image names the scenario's
    process."""
    from .live.attach import Attach

    runs = []
    for u in uzp:
        base = _pid_base(pid, u, duration, pages_to_scan)

        def build(folder: Path, base: dict[str, Any] = base) -> Scenario:
            return Scenario.model_validate({**base, "process": [{"name": "captured",
                                                                  "image": str(folder)}]})

        # what the lab checks before the capture: the knobs (the memory exists already)
        template = Scenario.model_validate({**base, "process": [{"region": [{"size_mib": 2}]}]})
        runs.append((template, Attach(pid, out / f"{base['name']}.image", build)))
    return runs


def _pid_base(pid: int, uzp: int, duration: float | None, pages_to_scan: int
              ) -> dict[str, Any]:
    # khugepaged parked for the run (a day, not driven): its cursor in a process it
    # has scanned since the process began cannot be known, and a pass at the wrong
    # range collapses another THP than the model's (a QEMU guest diverged at the first)
    return {"name": f"pid{pid}-uzp{uzp}", "duration": duration or 30.0,
            "description": f"process {pid} as captured, use_zero_pages={uzp}",
            "ksm": {"use_zero_pages": uzp, "pages_to_scan": pages_to_scan},
            "drive_khugepaged": False,
            "thp": {"khugepaged": {"scan_sleep_millisecs": KHUGEPAGED_PARKED_MS}}}


def _uzp_values(text: str) -> list[int]:
    try:
        uzp = sorted({int(x) for x in text.split(",")})
    except ValueError:
        uzp = []
    if not uzp or not set(uzp) <= {0, 1}:
        fail(f"--use-zero-pages {text}: use 0, 1 or 0,1")
    return uzp


PidUzpOpt = Annotated[str, typer.Option(
    "--use-zero-pages", help="with --pid: 0, 1 or 0,1 (a run each)")]
PidScanOpt = Annotated[int, typer.Option(
    "--pages-to-scan", min=1, help="with --pid: ksm/pages_to_scan (a GiB guest takes "
    "262144 pages a full scan)")]
PidOpt = Annotated[int | None, typer.Option(
    "--pid", help="a running process (paused for an exact image): capture it first")]


@app.command()
def validate(
    scenarios: Annotated[list[str] | None, typer.Argument(
        help="names, files, or 'all' (the suite)")] = None,
    policy: Annotated[str | None, typer.Option(
        help=f"{POLICY_HELP}; default: the one matching this kernel")]
    = None,
    profile: Annotated[Path | None, typer.Option(help="cost profile JSON")] = None,
    out: OutOpt = None, json_out: JsonOpt = False,
    kernel: Annotated[str | None, typer.Option(
        help="a patched kernel variant: run it under qemu instead (ksmlab kernel validate)")]
    = None,
    kernel_events: Annotated[bool, typer.Option(
        "--kernel-events/--no-kernel-events",
        help="record KSM's tracepoints live and compare them with the model's merges")]
    = True,
    pid: PidOpt = None, use_zero_pages: PidUzpOpt = "0,1", duration: DurationOpt = None,
    pages_to_scan: PidScanOpt = 1000,
) -> None:
    """Live run and model run of each scenario, compared at every full-scan end.

    Exit code 0 when every scenario meets the targets and both sides reach the same
    verdicts (up to borderline ones); 1 otherwise, after the full table or JSON; 2 for
    bad input. With --kernel, every scenario runs, then 1 if any was not confirmed
    (2 if any could not run)."""
    scenarios = scenarios or []
    if kernel is not None:
        from .kernel.cli import validate_many

        raise typer.Exit(validate_many(scenarios, kernel, json_out=json_out))
    from . import events as kevents
    from . import fidelity
    from .model import get_policy, simulate
    out = out or Path("ksmlab-out") / time.strftime("validate-%Y%m%d-%H%M%S")
    if pid is not None:
        if scenarios:
            fail("--pid runs the captured process: name no scenario beside it")
        runs: list[tuple[Scenario, Attach | None]] = list(_pid_scenarios(
            pid, _uzp_values(use_zero_pages), duration, pages_to_scan, out))
    elif not scenarios:
        fail("name scenarios to validate (or 'all', or --pid PID)")
    else:
        names = list(fidelity.SUITE) if scenarios == ["all"] else scenarios
        # every file checked before anything runs
        runs = [(_load(n, duration), None) for n in names]
    for sc, _ in runs:
        _model_fits(sc, events=kernel_events)  # KSM's event stream: the exact engine
    pol = policy or fidelity.policy_for_kernel(os.uname().release)
    _policy(get_policy, pol)
    choice = _profile(profile)
    _check_out(out)
    results = []
    for sc, attach in runs:
        ref = _live(sc, kernel_events=kernel_events, attach=attach)
        if attach is not None:
            sc = attach.scenario(attach.folder)
            _model_fits(sc, events=kernel_events)
        stream = bool(ref.kernel_events and ref.kernel_events.get("recorded"))
        cand = simulate(sc, pol, profile=choice.profile, kernel_events=stream,
                        **fidelity.replay(ref))
        ref.save(out / f"{sc.name}.kernel.trace.json.gz")
        cand.save(out / f"{sc.name}.model.trace.json.gz")
        report.plot_validation(sc.name, ref, cand, out / f"{sc.name}.validate.png",
                               (f"Linux {ref.meta['kernel']}", f"model {pol}"))
        r = fidelity.compare(sc.name, ref, cand)
        r.judge_verdicts({"kernel": metrics.summarize(ref), "model": metrics.summarize(cand)})
        results.append(r)
        if not json_out:
            err.print(f"{sc.name}: {r.agreement * 100:.1f} % of {r.checkpoints} checkpoints "
                      "exact", markup=False)
            if r.events is not None:
                err.print(f"{sc.name}: {kevents.text(kevents.StreamFit(**r.events_fit()))}",
                          markup=False)
    if json_out:
        print(json.dumps({
            "ksmlab": __version__, "kernel": os.uname().release, "policy": pol,
            "date": time.strftime("%Y-%m-%d"), "folder": str(out),
            "machine": _machine(), "profile": choice.to_json(),
            "scenarios": [r.to_json() for r in results],
            "agreement": fidelity.suite_agreement(results),
            "cpu_rel_err_total": fidelity.suite_cpu_rel_err(results),
            "targets_met": all(r.passed() for r in results),
            "verdicts_agree": all(r.verdicts_agree is not False for r in results),
        }))
        _validate_exit(results)
        return
    print(f"Linux {os.uname().release} against the model under {pol}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(choice.label())
    if choice.warning:
        print(textwrap.fill(f"note: {choice.warning}", 80, subsequent_indent="  "))
    print(fidelity.table(results))
    for r in results:
        k, m = (", ".join(r.verdicts[s]) or "none" for s in ("kernel", "model"))
        print(f"{r.name}: verdicts kernel {k}; model {m}")
        if r.events is not None:
            print(f"{r.name}: {kevents.text(kevents.StreamFit(**r.events_fit()))}")
        for line in fidelity.disagreements(r) + r.verdict_notes + r.notes:
            print(textwrap.fill(line, 80, subsequent_indent="  "))
    print(f"traces and plots in {out}/")
    _validate_exit(results)


def _validate_exit(results: list[Fidelity]) -> None:
    """Exit 1 (after the output) when a scenario misses its targets or the verdicts
    disagree, so that scripts and CI can tell; 2 stays for bad input."""
    bad = [r.name for r in results if not r.ok()]
    if bad:
        err.print(f"ksmlab: validate: {len(bad)} of {len(results)} scenarios missed their "
                  f"targets or disagree on verdicts: {', '.join(bad)}", markup=False)
        raise typer.Exit(1)


def _machine() -> dict[str, Any]:
    from .live import machine

    return machine.identity()


@app.command()
def calibrate(
    scenarios: Annotated[list[str] | None, typer.Argument(
        help="names, files, or 'all' (the validation suite, also the default)")] = None,
    quick: Annotated[bool, typer.Option(
        "--quick", help="the calibration set only (about 3 min live), fitted toward the "
        "shipped profile scaled to this machine's speed")] = False,
    traces: Annotated[list[Path] | None, typer.Option(
        help="use kernel traces saved by `ksmlab validate --out DIR` instead of running live "
             "(repeat it to fit on several runs: the kernel's CPU varies from run to run)")]
    = None,
    out: Annotated[Path | None, typer.Option(
        help="where to write the profile (default: this machine's, in the user's cache, "
             "used from then on by sim, compare, validate and demo)")] = None,
    policy: Annotated[str | None, typer.Option(
        help=f"{POLICY_HELP}; default: the one matching this kernel")]
    = None,
    holdout: Annotated[bool, typer.Option(
        help="also fit on half the scenarios and judge the other half (and back)")] = False,
    by_scan: Annotated[bool, typer.Option(
        help="also print kernel and model CPU of every full-scan interval")] = False,
) -> None:
    """Fit the model's cost profile (CPU per operation, sleep slack) on this machine.

    Counters and verdicts do not depend on the machine, ksmd's CPU and the time of a
    full scan do: fit them where the model is used.  Without --out the profile is
    stored as this machine's (keyed by CPU, kernel release and CPU count) and every
    model command uses it from then on.
    """
    from . import calibrate as cal
    from . import fidelity
    from .live import machine
    from .model import get_policy
    from .model.costs import CostProfile, shipped_profile
    from .profiles import machine_path, save_machine

    if quick and scenarios:
        fail("--quick runs the calibration set; give scenarios or --quick, not both")
    if quick:
        names = list(fidelity.CALIBRATION_SET)
    else:
        names = list(fidelity.SUITE) if scenarios in (None, [], ["all"]) else list(scenarios)
    pol = policy or fidelity.policy_for_kernel(os.uname().release)
    _policy(get_policy, pol)
    ident = machine.identity()
    key = machine.key(ident)
    if out is not None:
        _writable(out)
    kernels: list[tuple[str, Trace]] = []
    if traces:
        for name in names:
            for folder in traces:
                path = folder / f"{name}.kernel.trace.json.gz"
                if not path.exists():
                    fail(f"{path}: no kernel trace for {name} (run `ksmlab validate --out`)")
                kernels.append((name, Trace.load(path)))
        theirs = {machine.key(tr.meta["identity"]) for _, tr in kernels
                  if isinstance(tr.meta.get("identity"), dict)}
        if out is None and theirs - {key}:
            fail("these traces come from another machine or kernel: give --out for "
                 "their profile (this machine's is fitted from its own runs)")
    else:
        loaded = [_load(n, None) for n in names]  # every file checked before anything runs
        for sc in loaded:
            kernels.append((sc.name, _quiet_run(sc)))
    try:
        profile, data = cal.fit_kernels(kernels, pol,
                                        base=shipped_profile() if quick else None)
    except ValueError as e:
        fail(str(e))
    before = cal.residuals(data, CostProfile())
    after = cal.residuals(data, profile)
    kernel = str(kernels[0][1].meta.get("kernel")) if kernels else os.uname().release
    doc = cal.profile_document(profile, data, kernel, before, after, ident)
    target = out if out is not None else machine_path(key)
    if not traces:  # the live runs it was fitted on, kept beside it: refit or inspect them
        folder = target.with_suffix(".traces")
        for name, tr in kernels:
            tr.save(folder / f"{name}.kernel.trace.json.gz")
        doc["traces"] = str(folder)
    where = cal.save(doc, out) if out is not None else save_machine(doc, key)
    print(f"{len(data)} full-scan intervals from {len(kernels)} kernel traces ({kernel})")
    for label, r in (("hand-set priors", before), ("fitted", after)):
        print(f"{label:<16} CPU error median {r['cpu_median'] * 100:5.1f} %, "
              f"wall time error median {r['wall_median'] * 100:4.1f} %")
    for k, v in profile.to_json().items():
        print(f"  {k:<22} {v:>12.1f} ns" if k.endswith("_ns") else f"  {k:<22} {v:>12.3f}")
    if out is None:
        print(f"profile: {where} (this machine's: sim, compare, validate and demo use it)")
    else:
        print(f"profile: {where} (use it with --profile)")
    if by_scan:
        print("per full scan: scenario, batches, ksmd CPU kernel / model (ms), "
              "largest model charges (ms)")
        for name, batches, kernel_ms, model_ms, parts in cal.by_scan(data, profile):
            top = " ".join(f"{p.removesuffix('_ns')}={ms:.1f}" for p, ms in parts)
            print(f"  {name:<22} {batches:>4} {kernel_ms:8.2f} / {model_ms:8.2f}  {top}")
    if holdout:
        print("held out (fitted on the other half): scenario, ksmd CPU error, time error")
        for name, cpu, t in cal.holdout(kernels, pol, shipped_profile() if quick else None):
            print(f"  {name:<24} {_pct(cpu):>7} {_pct(t):>7}")


def _quiet_run(sc: Scenario, tries: int = 2) -> Trace:
    """A live run to fit costs on: other work beside it skews ksmd's CPU (a test suite
    on the other core doubled it), so a busy run is run again, then refused."""
    from .trace import BUSY_PCT

    busy = 0.0
    for _ in range(tries):
        tr = _live(sc)
        busy = tr.meta.get("others_cpu_pct") or 0.0
        if busy <= BUSY_PCT:
            return tr
        err.print(f"{sc.name}: other work used {busy:.0f} % of a CPU beside the run; "
                  "running it again", markup=False)
    fail(f"{sc.name}: the machine stayed busy (other work used {busy:.0f} % of a CPU, more "
         f"than {BUSY_PCT:.0f} %): calibrate on a quiet machine")


def _writable(path: Path) -> None:
    """Refuse a profile file that cannot be written before any live run (one line)."""
    if path.is_dir():
        fail(f"--out {path}: is a folder; name the profile's file")
    _check_out(path.parent)


@app.command()
def capture(
    pids: Annotated[list[int], typer.Argument(help="processes to read (root)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="image folder to write")],
    json_out: JsonOpt = False,
) -> None:
    """A memory image of running processes: what KSM would scan, page by page.

    Reads the VMAs with VM_MERGEABLE through /proc/PID/smaps, pagemap, kpageflags
    and mem (present pages only: nothing is faulted in, nothing written). Pause a
    process first (kill -STOP, or QEMU's `stop`) for an exact image."""
    from .live.capture import capture as do_capture

    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / "image.json").exists())):
        fail(f"--out {out}: exists and is not an empty folder or an image")
    im = do_capture(pids, out).image
    st = im.stats()
    mib = st["pages"] * 4096 / 2**20
    rate = im.meta.bytes_read / 2**20 / max(im.meta.capture_s, 1e-9)
    disk = sum(f.stat().st_size for f in out.iterdir())
    if json_out:
        print(json.dumps({"ksmlab": __version__, "folder": str(out), **st,
                          "capture_s": im.meta.capture_s,
                          "read_mib_s": round(rate, 1), "disk_bytes": disk,
                          "bytes_per_page": round(disk / max(st["pages"], 1), 2),
                          "processes": [p.model_dump(mode="json", exclude={"vmas"})
                                        for p in im.meta.processes],
                          "notes": im.meta.notes}))
        return
    n = len(im.meta.processes)
    who = ", ".join(f"{p.pid} {p.comm}" for p in im.meta.processes)
    print(f"captured {n} process{'es' if n > 1 else ''} ({who}): {mib:.0f} MiB mergeable "
          f"in {sum(len(p.vmas) for p in im.meta.processes)} VMAs")
    present = max(st["present"], 1)
    print(f"  {st['present']} pages present: {st['zero'] / present * 100:.1f} % zero-filled, "
          f"{st['thp']} THPs, {st['zero_pte']} zero-page PTEs, {st['ksm']} KSM pages, "
          f"{st['contents']} distinct contents")
    print(f"  read {im.meta.bytes_read / 2**20:.0f} MiB in {im.meta.capture_s:.2f} s "
          f"({rate:.0f} MiB/s); {disk / 2**20:.1f} MiB on disk "
          f"({disk / max(st['pages'], 1):.1f} B/page) in {out}/")
    for note in im.meta.notes:
        print(textwrap.fill(f"note: {note}", 80, subsequent_indent="  "))


@app.command(name="exec", context_settings={"allow_extra_args": True,
                                            "ignore_unknown_options": True})
def exec_(ctx: typer.Context,
          merge_any: Annotated[bool, typer.Option(
              "--merge-any", help="prctl(PR_SET_MEMORY_MERGE): all its memory mergeable")]
          = False) -> None:
    """Run a program with all its memory mergeable (ksmlab exec --merge-any -- CMD ...).

    A program that does not madvise(MADV_MERGEABLE) itself becomes a workload KSM
    scans (capture, compare --pid, validate --pid), as systemd's MemoryKSM= does."""
    from .live.workload import exec_merge_any

    argv = [a for a in ctx.args if a != "--"] if ctx.args[:1] == ["--"] else list(ctx.args)
    if not merge_any:
        fail("exec needs --merge-any (what it is for)")
    if not argv:
        fail("exec --merge-any -- CMD [ARGS...]: no command")
    try:
        exec_merge_any(argv)
    except OSError as e:
        fail(f"{argv[0]}: {e.strerror or e}")


@app.command()
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


@app.command()
def demo(out: OutOpt = None,
         live: Annotated[bool, typer.Option(help="also run live where possible")] = True) -> None:
    """The main job: the seed scenarios under every policy, table and plots."""
    from .demo import run_demo

    out = out or Path("ksmlab-out") / time.strftime("demo-%Y%m%d-%H%M%S")
    _check_out(out)
    run_demo(out, live, err, _profile(None))


def main() -> None:
    """Entry point: user errors are one line and exit code 2, never a traceback."""
    from .image import ImageError
    from .live.capture import CaptureError
    from .live.run import LiveError
    from .model import ModelUnsupported

    if len(sys.argv) == 1:  # bare `ksmlab`: what it can do, not an error
        sys.argv.append("--help")
    try:
        rc = app(standalone_mode=False)  # click returns the code of typer.Exit here
        sys.exit(rc if isinstance(rc, int) else 0)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (ScenarioError, KnobError, TraceError, LiveError, UserError, ModelUnsupported,
            CaptureError, ImageError) as e:
        err.print(f"ksmlab: error: {e}", markup=False, soft_wrap=True)
        sys.exit(2)
    except RestoreError as e:
        err.print(f"ksmlab: error: {e}", markup=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("ksmlab: interrupted", markup=False)
        sys.exit(130)
    except Exception as e:  # a usage error from click, or a bug
        code = getattr(e, "exit_code", None)
        if code is not None:  # click's UsageError and friends
            show = getattr(e, "format_message", None)
            err.print(f"ksmlab: error: {show() if show else e}", markup=False, soft_wrap=True)
            sys.exit(int(code))
        if os.environ.get("KSMLAB_DEBUG"):
            raise
        err.print(f"ksmlab: internal error: {type(e).__name__}: {e} "
                  "(KSMLAB_DEBUG=1 shows the traceback)", markup=False, soft_wrap=True)
        sys.exit(1)


__all__ = ["__version__", "app", "main"]
