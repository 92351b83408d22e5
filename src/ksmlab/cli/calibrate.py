"""``ksmlab calibrate``: fit the model's cost profile on this machine.  What it runs
is ksmlab.orchestrate.calibrate; this module reads the options and prints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import orchestrate
from ..errors import UserError
from ..live.kernelfs import KernelFS
from .common import POLICY_HELP, PolicyName, err, fail, live_run, load, pct, writable


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
    policy: Annotated[PolicyName | None, typer.Option(
        metavar="POLICY", help=f"{POLICY_HELP}; default: the one this kernel's features "
        "stand for")]
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
    from .. import calibrate as cal
    from .. import fidelity
    from ..live import features, machine
    from ..model.costs import shipped_profile
    from ..trace import Trace

    if quick and scenarios:
        fail("--quick runs the calibration set; give scenarios or --quick, not both")
    if quick:
        names = list(fidelity.CALIBRATION_SET)
    else:
        names = list(fidelity.SUITE) if scenarios in (None, [], ["all"]) else list(scenarios)
    pol = policy or features.policy_for_host(KernelFS())
    ident = machine.identity()
    key = machine.key(ident)
    if out is not None:
        writable(out)
    kernels: list[tuple[str, Trace]] = []
    try:
        if traces:
            kernels = orchestrate.kernel_traces(names, traces, key, own_profile=out is None)
        else:
            loaded = [load(n, None) for n in names]  # every file checked before anything runs
            for sc in loaded:
                kernels.append((sc.name, orchestrate.quiet_run(
                    sc, lambda sc, ke, attach: live_run(sc),
                    lambda m: err.print(m, markup=False))))
        c = orchestrate.calibrate(kernels, pol, quick, out, ident, key,
                                  features.release(KernelFS()), keep_traces=not traces)
    except UserError as e:
        fail(str(e))
    profile, data, where, kernel = c.profile, c.data, c.where, c.kernel
    print(f"{len(data)} full-scan intervals from {len(kernels)} kernel traces ({kernel})")
    for label, r in (("hand-set priors", c.before), ("fitted", c.after)):
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
            print(f"  {name:<24} {pct(cpu):>7} {pct(t):>7}")
