"""``ksmlab validate``: live runs against the model, compared at every full-scan end.
What it runs is ksmlab.orchestrate.validate; this module reads the options and
prints the result."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .. import orchestrate
from ..live.kernelfs import KernelFS
from .common import (
    POLICY_HELP,
    DurationOpt,
    JsonOpt,
    OutOpt,
    PidOpt,
    PidScanOpt,
    PidUzpOpt,
    PolicyName,
    check_out,
    dump,
    err,
    fail,
    live_run,
    load,
    log,
    profile,
    say,
    say_compiling,
    uzp_values,
)

if TYPE_CHECKING:
    from ..fidelity import Fidelity
    from ..live.attach import Attach
    from ..scenario import Scenario


def validate(
    scenarios: Annotated[list[str] | None, typer.Argument(
        help="names, files, or 'all' (the suite)")] = None,
    policy: Annotated[PolicyName | None, typer.Option(
        metavar="POLICY", help=f"{POLICY_HELP}; default: the one this kernel's features "
        "stand for")]
    = None,
    profile_path: Annotated[Path | None, typer.Option(
        "--profile", help="cost profile JSON")] = None,
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
        from ..kernel.cli import validate_many

        raise typer.Exit(validate_many(scenarios, kernel, json_out=json_out))
    from .. import events as kevents
    from .. import fidelity
    from ..live import features
    out = out or Path("ksmlab-out") / time.strftime("validate-%Y%m%d-%H%M%S")
    if pid is not None:
        if scenarios:
            fail("--pid runs the captured process: name no scenario beside it")
        runs: list[tuple[Scenario, Attach | None]] = list(orchestrate.pid_scenarios(
            pid, uzp_values(use_zero_pages), duration, pages_to_scan, out))
    elif not scenarios:
        fail("name scenarios to validate (or 'all', or --pid PID)")
    else:
        names = list(fidelity.SUITE) if scenarios == ["all"] else scenarios
        # every file checked before anything runs
        runs = [(load(n, duration), None) for n in names]
    for sc, _ in runs:
        # replays run on the fast engine, KSM's event stream too
        orchestrate.model_fits(sc, events=kernel_events)
    pol = policy or features.policy_for_host(KernelFS())
    choice = profile(profile_path)
    check_out(out)
    say_compiling(runs[0][0])  # its replays run on the fast engine
    results = orchestrate.validate(
        runs, pol, choice, out, kernel_events,
        lambda sc, ke, attach: live_run(sc, kernel_events=ke, attach=attach),
        None if json_out else log)
    kernel_release = features.release(KernelFS())
    if json_out:
        dump({
            "kernel": kernel_release, "policy": pol,
            "date": time.strftime("%Y-%m-%d"), "folder": str(out),
            "machine": machine_identity(), "profile": choice.to_json(),
            "scenarios": [r.to_json() for r in results],
            "agreement": fidelity.suite_agreement(results),
            "cpu_rel_err_total": fidelity.suite_cpu_rel_err(results),
            "targets_met": all(r.passed() for r in results),
            "verdicts_agree": all(r.verdicts_agree is not False for r in results),
            "advisor_ok": all(r.advisor_ok() for r in results),
        })
        validate_exit(results)
        return
    print(f"Linux {kernel_release} against the model under {pol}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(choice.label())
    if choice.warning:
        say(f"note: {choice.warning}")
    print(fidelity.table(results))
    for r in results:
        k, m = (", ".join(r.verdicts[s]) or "none" for s in ("kernel", "model"))
        say(f"{r.name}: verdicts kernel {k}; model {m}")
        if r.events is not None:
            say(f"{r.name}: {kevents.text(kevents.StreamFit(**r.events_fit()))}")
        for line in fidelity.disagreements(r) + r.verdict_notes + r.notes:
            say(line)
    print(f"traces and plots in {out}/")
    validate_exit(results)


def validate_exit(results: list[Fidelity]) -> None:
    """Exit 1 (after the output) when a scenario misses its targets or the verdicts
    disagree, so that scripts and CI can tell; 2 stays for bad input."""
    bad = [r.name for r in results if not r.ok()]
    if bad:
        err.print(f"ksmlab: validate: {len(bad)} of {len(results)} scenarios missed their "
                  f"targets, disagree on verdicts or on the advisor's arithmetic: "
                  f"{', '.join(bad)}", markup=False)
        raise typer.Exit(1)


def machine_identity() -> dict[str, Any]:
    from ..live import machine

    return machine.identity()
