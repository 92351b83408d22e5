"""``ksmlab sim`` and ``ksmlab compare``: scenarios in the model (no root needed).

The model (numpy, numba) is imported inside the commands: the live lab and
``doctor`` work without the ``model`` extra."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from ..orchestrate import model_fits, pid_base
from ..scenario import Scenario
from .common import (
    POLICY_HELP,
    DurationOpt,
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
    model_progress,
    profile,
    say_profile,
    uzp_values,
)


def sim(scenario: ScenarioArg,
        policy: Annotated[PolicyName, typer.Option("--policy", "-p", metavar="POLICY",
                                                   help=POLICY_HELP)],
        duration: DurationOpt = None, out: OutOpt = None, json_out: JsonOpt = False,
        profile_path: ProfileOpt = None, engine: EngineOpt = "auto") -> None:
    """Run a scenario in the model under one kernel policy (no root needed)."""
    from .. import metrics
    from ..model import simulate

    sc = load(scenario, duration)
    model_fits(sc, engine)
    check_out(out)
    choice = profile(profile_path)
    with model_progress(sc, f"{sc.name} under {policy}", engine) as progress:
        tr = simulate(sc, policy, profile=choice.profile, engine=engine, progress=progress)
    summary = metrics.summarize(tr)
    if not json_out:
        say_profile(choice)
    emit(tr, summary, f"{sc.name} under {policy} (model)", json_out, out,
         {"policy": policy, "profile": choice.to_json(), "engine": engine})


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

    With --pid: capture the process (ksmlab capture) and compare its memory as it is."""
    from .. import metrics, report
    from ..kernel.validate import kernel_confirmed
    from ..model import POLICIES, simulate

    fmt = "json" if json_out else fmt  # --json as every other command has it
    if (scenario is None) == (pid is None):
        fail("name a scenario or --pid PID (one of them)")
    if pid is not None:
        from ..live.capture import capture

        values = uzp_values(use_zero_pages)
        if len(values) != 1:
            fail("compare --pid takes one --use-zero-pages value")
        uzp = values[0]
        check_out(out)
        if out is None:  # the image lives as long as the command
            tmp = tempfile.TemporaryDirectory(prefix="ksmlab-capture-")
            ctx.call_on_close(tmp.cleanup)
        folder = (out or Path(tmp.name)) / f"pid{pid}.image"
        capture([pid], folder)
        sc = Scenario.model_validate({**pid_base(pid, uzp, duration or 60.0, pages_to_scan),
                                      "process": [{"name": "captured", "image": str(folder)}]})
        if out is not None:
            err.print(f"captured process {pid} into {folder}", markup=False)
    else:
        assert scenario is not None
        sc = load(scenario, duration)
    names = list(POLICIES) if policies == "all" else [p.strip() for p in policies.split(",")]
    for n in names:
        check_policy(n)
    model_fits(sc, engine)
    check_out(out)
    choice = profile(profile_path)
    results = []
    for n in names:
        with model_progress(sc, f"{sc.name} under {n}", engine) as progress:
            results.append((n, simulate(sc, n, profile=choice.profile, engine=engine,
                                        progress=progress)))
    summaries = [(n, metrics.summarize(tr)) for n, tr in results]
    table = report.compare_table(summaries, fmt, f"{sc.name}: {sc.description}",
                                 kernel_confirmed(sc.name))
    if fmt == "json":
        dump({**json.loads(table), "profile": choice.to_json(), "engine": engine}, indent=1)
    else:
        say_profile(choice)
        print(table)
    if out is not None:
        report.plot_freed(results, out / f"{sc.name}-compare.png", sc.name)
