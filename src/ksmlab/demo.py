"""``ksmlab demo``: the seed scenarios under every policy in the model, with the
comparison tables and plots; beside them the live kernel where it can run."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from . import metrics, report
from . import scenario as scenario_mod
from .live.kernelfs import KernelFS
from .profiles import ProfileChoice
from .trace import Trace

SEEDS = ("seed-uzp1", "seed-uzp0")


def run_demo(out: Path, live: bool, err: Console, choice: ProfileChoice) -> None:
    from .kernel.validate import kernel_confirmed
    from .model import POLICIES, simulate

    out.mkdir(parents=True, exist_ok=True)
    print(choice.label())
    if choice.warning:
        print(f"note: {choice.warning}")
    live_ok = False
    if live:
        from .live.run import problems

        why = problems(KernelFS(), scenario_mod.load(SEEDS[0]))
        live_ok = not why
        if why:
            err.print(f"live lab skipped: {why[0]}", markup=False)
    for name in SEEDS:
        sc = scenario_mod.load(name)
        with err.status(f"{name}: model under {len(POLICIES)} policies"):
            model = [(p, simulate(sc, p, profile=choice.profile)) for p in POLICIES]
        rows = [(p, metrics.summarize(tr)) for p, tr in model]
        confirmed = kernel_confirmed(name)
        table = report.compare_table(rows, "text", f"{name}: {sc.description} (model)",
                                     confirmed)
        print(table)
        (out / f"{name}-compare.txt").write_text(table + "\n")
        (out / f"{name}-compare.md").write_text(
            report.compare_table(rows, "markdown", name, confirmed))
        curves: list[tuple[str, Trace]] = list(model)
        if live_ok:
            from .live.run import LiveRun

            with err.status(f"{name}: live run on this kernel ({sc.duration:.0f} s)"):
                tr = LiveRun(sc).run()
            tr.save(out / f"{name}-live.trace.json.gz")
            s = metrics.summarize(tr)
            print(report.summary_text(s, f"{name} on Linux {tr.meta['kernel']} (live)"))
            curves.insert(0, (f"live {tr.meta['kernel']}", tr))
        plot = report.plot_freed(curves, out / f"{name}.png",
                                 f"{name}: memory freed per policy")
        print(f"plot: {plot}\n")
    print(f"results in {out}/")
