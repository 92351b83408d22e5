"""Fit the model's cost profile (CPU per operation, sleep slack) to kernel traces.

Between two consecutive full-scan ends the model knows how often it charged each
cost (``CpuMeter.counts``) and how many batches ksmd ran; the kernel trace gives
ksmd's CPU time (``ksmd_cpu_ns``) and the wall time over the same interval.  So

    kernel CPU  = sum(count[p] * price[p])                  (linear in the prices)
    kernel wall = batches * period(CPU / batches, slack)    (whole jiffies: ksmd_wake)

Prices are fitted by bounded least squares on relative errors, pulled toward the
hand-set defaults (many operations always occur together, e.g. a checksum per
page visit, and the data alone cannot split their cost); the slack (where in its
jiffy a batch begins) is the value on a grid that gives the smallest mean wall
error.  The jiffy is not fitted (1/CONFIG_HZ).  Nothing here knows where a trace
came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import lsq_linear

from .fidelity import replay
from .model.costs import DEFAULT_PROFILE, CostProfile, ksmd_wake
from .model.run import run_model
from .scenario import Scenario
from .trace import Trace, write_atomic

PRIOR_WEIGHT = 0.2  # how hard the hand-set priors pull, against relative errors per scenario
# ... and the scaled shipped profile in a quick fit: one run of each of nine scenarios
# is noisy (the same full scan moved by a third between quiet runs), and a firmer pull
# to a shape fitted on four whole-suite runs predicted the held-out scenarios better
# (benchmarks/quick_fit.py on the suite run of 2026-11-30: worst held-out CPU error
# 20.8 % at the whole-suite weight, 13.8 % at this one)
QUICK_PRIOR_WEIGHT = 1.0
WHOLE_RUN_WEIGHT = 2.0  # a scenario's whole-run CPU, against its scans' errors together
# not fitted linearly: wall time, and the length of a batch's cold start
FIXED = ("cold_window_ns", "sleep_slack_ns", "tick_ns")


@dataclass
class Interval:
    scenario: str
    counts: dict[str, float]  # charges in the model over the interval
    batches: int
    kernel_cpu_ns: float
    kernel_wall_s: float
    sleep_ms: int


def intervals(name: str, kernel: Trace, policy: str,
              profile: CostProfile = DEFAULT_PROFILE) -> list[Interval]:
    """Consecutive full-scan ends seen in both the kernel trace and the model
    (run with ``profile``: a batch's cold-start count depends on its work)."""
    sc = Scenario.model_validate(kernel.meta["scenario"])
    sim, _ = run_model(sc, policy, profile=profile, **replay(kernel))  # the fast engine
    ck = {0: 0, **kernel.checkpoints()}  # 0: the run's start, before ksmd's first batch
    sim.at_scan_end[0] = ({}, 0)
    common = sorted(set(ck) & set(sim.at_scan_end))
    cpu = kernel.since_start("ksmd_cpu_ns")
    out = []
    for a, b in pairwise(common):
        (ca, ba), (cb, bb) = sim.at_scan_end[a], sim.at_scan_end[b]
        out.append(Interval(
            name, {k: cb[k] - ca.get(k, 0.0) for k in cb}, bb - ba,
            float(cpu[ck[b]] - cpu[ck[a]]), float(kernel.t[ck[b]] - kernel.t[ck[a]]),
            sc.ksm.sleep_millisecs,
        ))
    return out


def fit(data: list[Interval], base: CostProfile | None = None,
        prior_weight: float | None = None) -> CostProfile:
    """Prices that best explain the kernel's CPU; ``base`` (the hand-set priors by
    default, so a fit does not depend on the previous one) pulls where data is thin."""
    prior = (base or CostProfile()).to_json()
    names = [k for k in prior if k not in FIXED]
    rows = [iv for iv in data if iv.kernel_cpu_ns > 0 and iv.batches > 0]
    if not rows:
        raise ValueError("no full-scan intervals to fit (traces without checkpoints?)")
    # relative errors: each row divided by the kernel's CPU over the interval, and
    # each scenario weighing as much as any other however many scans it has
    per = {s: sum(1 for iv in rows if iv.scenario == s) for s in {iv.scenario for iv in rows}}
    # plus one row per scenario for its whole run: what `validate` compares (ksmd CPU %)
    whole = [Interval(sc, {n: sum(iv.counts.get(n, 0.0) for iv in rows if iv.scenario == sc)
                           for n in names}, 1,
                      sum(iv.kernel_cpu_ns for iv in rows if iv.scenario == sc), 0.0, 0)
             for sc in sorted(per)]
    weight = np.array([1.0 / np.sqrt(per[iv.scenario]) for iv in rows]
                      + [WHOLE_RUN_WEIGHT] * len(whole))
    a = np.array([[iv.counts.get(n, 0.0) / iv.kernel_cpu_ns for n in names]
                  for iv in rows + whole])
    a = a * weight[:, None]
    b = weight
    # prior rows: (p - p0) / p0 * weight, as x = p / p0 scales
    scale = np.array([prior[n] if prior[n] > 0 else 1.0 for n in names])
    a = a * scale
    w = (PRIOR_WEIGHT if prior_weight is None else prior_weight) * np.sqrt(len(per) / len(names))
    a_full = np.vstack([a, w * np.eye(len(names))])
    b_full = np.concatenate([b, w * np.ones(len(names))])
    res = lsq_linear(a_full, b_full, bounds=(0.0, np.inf))
    fitted = {n: float(x * s) for n, x, s in zip(names, res.x, scale, strict=True)}
    # wall time: the slack that makes whole-jiffy periods fit the kernel's walls best
    tick = prior["tick_ns"]
    timed = [iv for iv in rows if iv.sleep_ms > 0 and iv.batches > 0 and iv.kernel_wall_s > 0]
    fitted["tick_ns"] = tick
    fitted["cold_window_ns"] = prior["cold_window_ns"]
    if timed:
        grid = np.arange(0.0, tick, tick / 80)
        errs = [float(np.mean([abs(_wall(iv, iv.kernel_cpu_ns, g, tick) - iv.kernel_wall_s)
                               / iv.kernel_wall_s for iv in timed])) for g in grid]
        fitted["sleep_slack_ns"] = float(grid[int(np.argmin(errs))])
    else:
        fitted["sleep_slack_ns"] = prior["sleep_slack_ns"]
    return CostProfile.from_dict(fitted)


def speed_factor(data: list[Interval], base: CostProfile) -> float:
    """One factor for every price of ``base``: how much slower this machine's ksmd
    is, from each scenario's whole-run CPU (relative errors, scenarios weighing
    the same).  Machines of one kind differ mostly so: 291 against 968 ns a visit."""
    price = base.to_json()
    ratios = []
    for sc in sorted({iv.scenario for iv in data}):
        rows = [iv for iv in data if iv.scenario == sc and iv.kernel_cpu_ns > 0]
        model = sum(n * price[k] for iv in rows for k, n in iv.counts.items() if k in price)
        kernel = sum(iv.kernel_cpu_ns for iv in rows)
        if model > 0 and kernel > 0:
            ratios.append(model / kernel)
    if not ratios:
        raise ValueError("no full-scan intervals to fit (traces without checkpoints?)")
    r = np.array(ratios)
    return float(r.sum() / (r * r).sum())  # argmin of sum((f * r - 1)^2)


def scaled(base: CostProfile, factor: float) -> CostProfile:
    """``base`` with every CPU price times ``factor`` (not the jiffy, the slack, the
    cold window, nor the cold start, which is a ratio)."""
    d = base.to_json()
    keep = (*FIXED, "cold_start")
    return CostProfile.from_dict({k: v if k in keep else v * factor for k, v in d.items()})


def fit_kernels(kernels: list[tuple[str, Trace]], policy: str, rounds: int = 2,
                base: CostProfile | None = None) -> tuple[CostProfile, list[Interval]]:
    """Fit on the kernel traces, then again on the counts the fitted profile
    gives: the cold start charges part of a batch's work, so its count moves
    with the other prices (a second round moved the fit by a few per cent).

    ``base`` None: prices pulled toward the hand-set priors (a fit on the whole
    suite, which does not depend on an earlier fit).  A profile: pulled toward it,
    scaled to this machine's speed (:func:`speed_factor`) -- a quick fit on a few
    scenarios keeps the shape a whole-suite fit found and takes this machine's level.
    """
    profile, data = base or DEFAULT_PROFILE, []
    prior = None
    for _ in range(rounds):
        data = [iv for name, tr in kernels for iv in intervals(name, tr, policy, profile)]
        if base is not None and prior is None:
            prior = scaled(base, speed_factor(data, base))
        profile = fit(data, prior, None if base is None else QUICK_PRIOR_WEIGHT)
    return profile, data


def _wall(iv: Interval, cpu_ns: float, slack_ns: float, tick_ns: float) -> float:
    """The wall time of an interval's batches, each taking its mean CPU."""
    per = cpu_ns / 1e9 / iv.batches
    return iv.batches * ksmd_wake(0.0, per, iv.sleep_ms, slack_ns, tick_ns)


def residuals(data: list[Interval], profile: CostProfile) -> dict[str, float]:
    """Median and worst relative error of CPU and wall time per interval."""
    price = profile.to_json()
    cpu_err, wall_err = [], []
    for iv in data:
        if iv.kernel_cpu_ns <= 0 or iv.batches == 0:
            continue
        cpu = sum(n * price[k] for k, n in iv.counts.items())
        cpu_err.append(abs(cpu - iv.kernel_cpu_ns) / iv.kernel_cpu_ns)
        wall = _wall(iv, cpu, price["sleep_slack_ns"], price["tick_ns"])
        wall_err.append(abs(wall - iv.kernel_wall_s) / iv.kernel_wall_s)
    return {
        "cpu_median": float(np.median(cpu_err)), "cpu_worst": float(np.max(cpu_err)),
        "wall_median": float(np.median(wall_err)), "wall_worst": float(np.max(wall_err)),
        "intervals": len(cpu_err),
    }


def by_scan(data: list[Interval], profile: CostProfile, top: int = 3
            ) -> list[tuple[str, int, float, float, list[tuple[str, float]]]]:
    """Per full-scan interval: scenario, batches, kernel and model CPU (ms), and
    the model's largest charges (ms): where a missing cost shows first."""
    price = profile.to_json()
    out = []
    for iv in data:
        parts = sorted(((k, n * price[k] / 1e6) for k, n in iv.counts.items() if n),
                       key=lambda kv: -kv[1])
        out.append((iv.scenario, iv.batches, iv.kernel_cpu_ns / 1e6,
                    sum(v for _, v in parts), parts[:top]))
    return out


def profile_document(profile: CostProfile, data: list[Interval], kernel: str,
                     before: dict[str, float], after: dict[str, float],
                     machine: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "fitted": datetime.now(UTC).isoformat(timespec="seconds"),
        "kernel": kernel,
        "machine": machine or {},
        "scenarios": sorted({iv.scenario for iv in data}),
        "residuals_before": before,
        "residuals_after": after,
        "profile": profile.to_json(),
    }


def save(doc: dict[str, Any], path: Path) -> Path:
    return write_atomic(path, (json.dumps(doc, indent=1) + "\n").encode())


def holdout(kernels: list[tuple[str, Trace]], policy: str, base: CostProfile | None = None
            ) -> list[tuple[str, float | None, float | None]]:
    """Fit on every other scenario, judge the rest, then the other way round:
    (scenario, ksmd CPU relative error, time relative error) of each held-out run."""
    from .fidelity import compare
    from .model import simulate

    out = []
    names = list(dict.fromkeys(name for name, _ in kernels))  # several runs of one: together
    even = [(n, tr) for n, tr in kernels if names.index(n) % 2 == 0]
    odd = [(n, tr) for n, tr in kernels if names.index(n) % 2 == 1]
    for fit_on, judge in ((even, odd), (odd, even)):
        profile, _ = fit_kernels(fit_on, policy, base=base)
        for name, tr in judge:
            sc = Scenario.model_validate(tr.meta["scenario"])
            r = compare(name, tr, simulate(sc, policy, profile=profile, **replay(tr)))
            out.append((name, r.cpu_rel_err, r.time_rel_err))
    return out
