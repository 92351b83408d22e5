"""``ksmlab sim`` and ``ksmlab compare``: scenarios in the model (no root needed).

The model (numpy, numba) is imported inside the commands: the live lab and
``doctor`` work without the ``model`` extra."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..orchestrate import model_fits, pid_base
from ..scenario import Scenario
from .common import (
    POLICY_HELP,
    DurationOpt,
    Engine,
    EngineOpt,
    Format,
    JsonOpt,
    OutOpt,
    PidOpt,
    PidScanOpt,
    PidUzpOpt,
    PolicyName,
    ProfileOpt,
    ScenarioArg,
    check_out,
    check_policy,
    dump,
    emit,
    err,
    fail,
    load,
    log,
    model_progress,
    profile,
    say_profile,
    uzp_values,
)

if TYPE_CHECKING:
    from ..profiles import ProfileChoice


def sim(scenario: ScenarioArg,
        policy: Annotated[PolicyName | None, typer.Option(
            "--policy", "-p", metavar="POLICY",
            help=f"{POLICY_HELP}; default: the one this kernel stands for")] = None,
        duration: DurationOpt = None, out: OutOpt = None, json_out: JsonOpt = False,
        profile_path: ProfileOpt = None, engine: EngineOpt = "auto") -> None:
    """Run a scenario in the model under one kernel policy (no root needed).

    Without --policy, the policy of the running kernel: mainline where it remaps
    zero-filled subpages on a THP split (6.12+), pre-6.12 where it does not."""
    from .. import metrics
    from ..model import simulate

    sc = load(scenario, duration)
    model_fits(sc, engine)
    check_out(out)
    choice = profile(profile_path)
    extra: dict[str, Any] = {}
    pol: str = policy or ""
    if policy is None:
        pol, why = host_policy()
        extra["policy_why"] = why
        if not json_out:
            log(f"policy {pol} ({why})")
    with model_progress(sc, f"{sc.name} under {pol}", engine) as progress:
        tr = simulate(sc, pol, profile=choice.profile, engine=engine, progress=progress)
    summary = metrics.summarize(tr)
    if not json_out:
        say_profile(choice)
    emit(tr, summary, f"{sc.name} under {pol} (model)", json_out, out,
         {"policy": pol, **extra, "profile": choice.to_json(), "engine": engine})


def host_policy() -> tuple[str, str]:
    """The policy the running kernel stands for, and why, in words (its files only:
    no probe, no root)."""
    from ..live.features import policy_for_remap, remap_expected
    from ..live.kernelfs import KernelFS

    remaps = remap_expected(KernelFS())
    pol = policy_for_remap(remaps)
    if remaps is None:
        return pol, "this kernel's THP files cannot tell; every 6.12+ kernel remaps"
    if remaps:
        return pol, "this kernel remaps: it has the 6.12 underused-THP shrinker"
    return pol, "this kernel has no underused-THP shrinker: no remap"


FmtOpt = Annotated[Format, typer.Option("--format", "-f", metavar="FORMAT",
                                        help="one of: text, markdown, json")]


def compare(ctx: typer.Context,
            scenario: Annotated[str | None, typer.Argument(
                help="built-in name (ksmlab scenarios) or a .toml")] = None,
            policies: Annotated[str, typer.Option("--policies", help="A,B,... or all")] = "all",
            duration: DurationOpt = None, fmt: FmtOpt = "text", out: OutOpt = None,
            profile_path: ProfileOpt = None, engine: EngineOpt = "auto",
            pid: PidOpt = None, use_zero_pages: PidUzpOpt = "0",
            pages_to_scan: PidScanOpt = 100, json_out: JsonOpt = False) -> None:
    """The same scenario under several policies, side by side.

    With --pid: capture the process (ksmlab capture) and compare its memory as it is,
    once for each --use-zero-pages value (0,1: two tables from one capture)."""
    from ..model import POLICIES

    fmt = "json" if json_out else fmt  # --json as every other command has it
    if (scenario is None) == (pid is None):
        fail("name a scenario or --pid PID (one of them)")
    names = list(POLICIES) if policies == "all" else [p.strip() for p in policies.split(",")]
    for n in names:
        check_policy(n)
    if pid is not None:
        from ..live.capture import capture

        values = uzp_values(use_zero_pages)
        check_out(out)
        if out is None:  # the image lives as long as the command
            tmp = tempfile.TemporaryDirectory(prefix="ksmlab-capture-")
            ctx.call_on_close(tmp.cleanup)
        folder = (out or Path(tmp.name)) / f"pid{pid}.image"
        for note in capture([pid], folder).image.meta.notes:  # what it left out, and why
            err.print(f"note: {note}", markup=False, soft_wrap=True)
        scs = [Scenario.model_validate({**pid_base(pid, u, duration or 60.0, pages_to_scan),
                                        "process": [{"name": "captured",
                                                     "image": str(folder)}]})
               for u in values]
        if out is not None:
            err.print(f"captured process {pid} into {folder}", markup=False)
    else:
        assert scenario is not None
        scs = [load(scenario, duration)]
    for sc in scs:
        model_fits(sc, engine)
    check_out(out)
    choice = profile(profile_path)
    tables = [_compare(sc, names, fmt, out, choice, engine) for sc in scs]
    if fmt == "json":
        extra = {"profile": choice.to_json(), "engine": engine}
        # one use_zero_pages value (or a scenario): the table's object as it is
        dump({**tables[0], **extra} if len(tables) == 1 else
             {"comparisons": tables, **extra}, indent=1)
    else:
        say_profile(choice)
        print("\n\n".join(str(t["text"]) for t in tables))


def _compare(sc: Scenario, names: list[str], fmt: Format, out: Path | None,
             choice: ProfileChoice, engine: Engine) -> dict[str, Any]:
    """One scenario under ``names``: its table (JSON's object, or ``{"text": ...}``)
    and, with ``out``, its plot."""
    from .. import metrics, report
    from ..kernel.validate import kernel_confirmed
    from ..model import simulate

    results = []
    for n in names:
        with model_progress(sc, f"{sc.name} under {n}", engine) as progress:
            results.append((n, simulate(sc, n, profile=choice.profile, engine=engine,
                                        progress=progress)))
    summaries = [(n, metrics.summarize(tr)) for n, tr in results]
    table = report.compare_table(summaries, fmt, f"{sc.name}: {sc.description}",
                                 kernel_confirmed(sc.name))
    if out is not None:
        report.plot_freed(results, out / f"{sc.name}-compare.png", sc.name)
    return dict(json.loads(table)) if fmt == "json" else {"text": table}
