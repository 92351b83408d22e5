"""What ``ksmlab validate`` and ``ksmlab calibrate`` do, without the command line.

A live run is handed in as a callable (the command line's shows a progress bar and
ends the command on a refusal); messages go to ``log``.  Bad input and a machine
that cannot do it raise :class:`ksmlab.errors.UserError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .scenario import KHUGEPAGED_PARKED_MS, Scenario
from .trace import Trace

if TYPE_CHECKING:
    from .calibrate import Interval
    from .fidelity import Fidelity
    from .live.attach import Attach
    from .model.costs import CostProfile
    from .profiles import ProfileChoice

# One live run: (scenario, kernel_events, attach) -> the kernel's trace
LiveRunner = Callable[[Scenario, bool, "Attach | None"], Trace]
Log = Callable[[str], None]


def model_fits(sc: Scenario, engine: str = "auto", events: bool = False) -> None:
    """Refuse, before it starts, a model run this machine has no memory for (a 10 TiB
    region runs for 30 s, then is OOM-killed at 24 GB resident)."""
    from .live.kernelfs import KernelFS
    from .live.run import mem_available_mib
    from .model.run import memory_estimate

    need, eng = memory_estimate(sc, engine, events)
    avail = mem_available_mib(KernelFS())
    if avail is not None and need > avail << 20:
        raise UserError(
            f"{sc.name}: the model needs about {need / 2**30:.1f} GiB for {sc.total_mib} MiB "
            f"of simulated memory ({eng} engine) but MemAvailable is {avail / 1024:.1f} GiB")


def pid_base(pid: int, uzp: int, duration: float | None, pages_to_scan: int
             ) -> dict[str, Any]:
    # khugepaged parked for the run (a day, not driven): its cursor in a process it
    # has scanned since the process began cannot be known, and a pass at the wrong
    # range collapses another THP than the model's (a QEMU guest diverges at the first)
    return {"name": f"pid{pid}-uzp{uzp}", "duration": duration or 30.0,
            "description": f"process {pid} as captured, use_zero_pages={uzp}",
            "ksm": {"use_zero_pages": uzp, "pages_to_scan": pages_to_scan},
            "drive_khugepaged": False,
            "thp": {"khugepaged": {"scan_sleep_millisecs": KHUGEPAGED_PARKED_MS}}}


def pid_scenarios(pid: int, uzp: list[int], duration: float | None, pages_to_scan: int,
                  out: Path) -> list[tuple[Scenario, Attach]]:
    """validate --pid: one run per use_zero_pages value, each capturing the process
    into ``out`` when KSM is unmerged (live/attach.py); the image names the scenario's
    process."""
    from .live.attach import Attach

    runs = []
    for u in uzp:
        base = pid_base(pid, u, duration, pages_to_scan)

        def build(folder: Path, base: dict[str, Any] = base) -> Scenario:
            return Scenario.model_validate({**base, "process": [{"name": "captured",
                                                                  "image": str(folder)}]})

        # what the lab checks before the capture: the knobs (the memory exists already)
        template = Scenario.model_validate({**base, "process": [{"region": [{"size_mib": 2}]}]})
        runs.append((template, Attach(pid, out / f"{base['name']}.image", build)))
    return runs


def validate(runs: list[tuple[Scenario, Attach | None]], pol: str, choice: ProfileChoice,
             out: Path, kernel_events: bool, live: LiveRunner, log: Log | None = None
             ) -> list[Fidelity]:
    """Each scenario live, then in the model replaying the kernel's run; traces and
    plots into ``out``; the comparison of each (ksmlab.fidelity)."""
    from . import events as kevents
    from . import fidelity, metrics, report
    from .model import simulate

    results = []
    for sc, attach in runs:
        ref = live(sc, kernel_events, attach)
        if attach is not None:
            sc = attach.scenario(attach.folder)
            model_fits(sc, events=kernel_events)
        stream = bool(ref.kernel_events and ref.kernel_events.get("recorded"))
        cand = simulate(sc, pol, profile=choice.profile, kernel_events=stream,
                        **fidelity.replay(ref))
        ref.save(out / f"{sc.name}.kernel.trace.json.gz")
        cand.save(out / f"{sc.name}.model.trace.json.gz")
        report.plot_validation(sc.name, ref, cand, out / f"{sc.name}.validate.png",
                               (f"Linux {ref.meta['kernel']}", f"model {pol}"))
        r = fidelity.compare(sc.name, ref, cand)
        r.engine = str(cand.meta.get("engine", ""))
        r.judge_verdicts({"kernel": metrics.summarize(ref), "model": metrics.summarize(cand)})
        results.append(r)
        if log is not None:
            log(f"{sc.name}: {r.agreement * 100:.1f} % of {r.checkpoints} checkpoints "
                "exact")
            if r.events is not None:
                log(f"{sc.name}: {kevents.text(kevents.StreamFit(**r.events_fit()))}")
            line = fidelity.advisor_text(r)
            if line is not None:
                log(line)
    return results


def quiet_run(sc: Scenario, live: LiveRunner, log: Log, tries: int = 2) -> Trace:
    """A live run to fit costs on: other work beside it skews ksmd's CPU (a test suite
    on the other core doubled it), so a busy run is run again, then refused."""
    from .trace import BUSY_PCT

    busy = 0.0
    for _ in range(tries):
        tr = live(sc, False, None)
        busy = tr.meta.get("others_cpu_pct") or 0.0
        if busy <= BUSY_PCT:
            return tr
        log(f"{sc.name}: other work used {busy:.0f} % of a CPU beside the run; "
            "running it again")
    raise UserError(f"{sc.name}: the machine stayed busy (other work used {busy:.0f} % of a "
                    f"CPU, more than {BUSY_PCT:.0f} %): calibrate on a quiet machine")


@dataclass
class Calibration:
    """What ``calibrate`` fitted, and on what (the command prints it)."""

    profile: CostProfile
    data: list[Interval]  # full-scan intervals
    kernels: list[tuple[str, Trace]]
    before: dict[str, float]
    after: dict[str, float]
    kernel: str
    where: Path


def kernel_traces(names: list[str], traces: list[Path], key: str, own_profile: bool
                  ) -> list[tuple[str, Trace]]:
    """calibrate --traces: the kernel traces `ksmlab validate --out` saved."""
    from .live import machine

    kernels: list[tuple[str, Trace]] = []
    for name in names:
        for folder in traces:
            path = folder / f"{name}.kernel.trace.json.gz"
            if not path.exists():
                raise UserError(f"{path}: no kernel trace for {name} "
                                "(run `ksmlab validate --out`)")
            kernels.append((name, Trace.load(path)))
    theirs = {machine.key(tr.meta["identity"]) for _, tr in kernels
              if isinstance(tr.meta.get("identity"), dict)}
    if own_profile and theirs - {key}:
        raise UserError("these traces come from another machine or kernel: give --out for "
                        "their profile (this machine's is fitted from its own runs)")
    return kernels


def calibrate(kernels: list[tuple[str, Trace]], pol: str, quick: bool, out: Path | None,
              ident: dict[str, Any], key: str, kernel_now: str, keep_traces: bool
              ) -> Calibration:
    """Fit the cost profile on the kernel traces and save it (``out``, else this
    machine's); with ``keep_traces`` the live runs are kept beside it."""
    from . import calibrate as cal
    from .model.costs import CostProfile, shipped_profile
    from .profiles import machine_path, save_machine

    try:
        profile, data = cal.fit_kernels(kernels, pol,
                                        base=shipped_profile() if quick else None)
    except ValueError as e:
        raise UserError(str(e)) from None
    before = cal.residuals(data, CostProfile())
    after = cal.residuals(data, profile)
    kernel = str(kernels[0][1].meta.get("kernel")) if kernels else kernel_now
    doc = cal.profile_document(profile, data, kernel, before, after, ident)
    target = out if out is not None else machine_path(key)
    if keep_traces:  # the live runs it was fitted on, kept beside it: refit or inspect them
        folder = target.with_suffix(".traces")
        for name, tr in kernels:
            tr.save(folder / f"{name}.kernel.trace.json.gz")
        doc["traces"] = str(folder)
    where = cal.save(doc, out) if out is not None else save_machine(doc, key)
    return Calibration(profile, data, kernels, before, after, kernel, where)
