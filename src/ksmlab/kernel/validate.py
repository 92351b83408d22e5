"""The model under a variant's policy against that patched kernel's trace.

Time under TCG emulation is not the host's time (ksmd's pace is set by
``sleep_millisecs`` but everything between the sleeps runs slower), so the two
traces are compared in **full-scan units**: at every full-scan boundary k
(``full_scans`` reaching k), each trace's state just before it (its last
sample with ``full_scans`` = k-1, i.e. at the end of scan k) is compared, for
every boundary that both traces observed (when several scans end inside one
sample interval, the inner boundaries have no sample of their own):

- memory freed (RssAnon drop + pages_sharing, :func:`metrics.freed_pages`),
- memory KSM accounts for (pages_sharing + ksm_zero_pages),
- memory still in THPs (AnonHugePages).

A checkpoint agrees when all three are within ``max(2 MiB, 5 % of the
scenario's memory)``.  The kernel confirms the policy when at least 95 % of the
checkpoints agree and both traces reach the same verdicts (bypass, collapse,
or none), up to borderline ones (:func:`ksmlab.fidelity.verdict_agreement`:
a verdict reached on one side only, with its figure within the margin of its
threshold on either side, is noted in ``verdict_notes`` and not held against).

Results go to a small JSON index in the kernel cache (``results/index.json``).
The package ships the results recorded on the machine that made the release
(``kernel/data/confirmed.json``, marked as recorded elsewhere, the way the
shipped cost profile is); a result recorded here replaces the shipped one of the
same variant and scenario.  A result counts only for the patch it ran: one whose
``patch_sha256`` differs from the variant's patch today is kept but no longer
confirms anything.  :func:`confirmed` reads both without building anything.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import metrics
from ..fidelity import verdict_agreement
from ..scenario import Scenario
from ..trace import Trace
from .build import cache_dir, get_variant, kernel_dir, patch_sha256

AGREE_FRACTION = 0.95
TOL_MIB = 2.0
TOL_FRACTION = 0.05
KIB_PER_PAGE = 4


@dataclass
class Checkpoint:
    k: int  # full-scan boundary
    t_kernel: float  # seconds (emulated guest) at the kernel's sample
    t_model: float
    freed: tuple[float, float]  # MiB: (kernel, model)
    ksm: tuple[float, float]
    thp: tuple[float, float]
    agree: bool


@dataclass
class Validation:
    scenario: str
    stands_for: str  # the built-in scenario a scaled one stands for
    variant: str
    policy: str
    release: str
    accelerator: str
    checkpoints: list[Checkpoint]
    agreement: float  # fraction of checkpoints that agree
    verdicts_kernel: list[str]
    verdicts_model: list[str]
    tolerance_mib: float
    seconds_per_scan: dict[str, float]  # kernel (emulated) and model, first full scan
    confirmed: bool
    trace: str
    date: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    verdicts_agree: bool = True  # up to borderline verdicts
    verdict_notes: list[str] = field(default_factory=list)
    source_version: str | None = None  # the guest's point release, e.g. 6.12.118
    patch_sha256: str | None = None  # the patch the guest ran (None: unpatched)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["checkpoints"] = len(self.checkpoints)
        d["disagree"] = [asdict(c) for c in self.checkpoints if not c.agree][:20]
        d["time_axis"] = "full-scan units (guest time runs under TCG emulation)"
        return d


def stands_for(scenario_name: str) -> str:
    """``seed-uzp1-64m`` (a scaled copy for the guest) stands for ``seed-uzp1``."""
    return re.sub(r"-\d+m$", "", scenario_name)


Array = npt.NDArray[np.float64]


def _before_boundaries(full_scans: Array, kmax: int) -> list[int]:
    """For k = 1..kmax: index of the last sample with full_scans < k (-1 if none)."""
    fs = np.asarray(full_scans)
    return [int(np.searchsorted(fs, k, side="left")) - 1 for k in range(1, kmax + 1)]


def _series(tr: Trace, zero_counted: bool = True) -> dict[str, Array]:
    """The compared figures in MiB.  ``zero_counted=False`` (a kernel without the
    ksm_zero_pages counter, before 6.10): KSM's account is pages_sharing alone."""
    mib = KIB_PER_PAGE / 1024
    ksm = metrics.ksm_accounted_pages(tr) if zero_counted else tr["pages_sharing"]
    return {
        "freed": metrics.freed_pages(tr) * mib,
        "ksm": ksm * mib,
        "thp": tr["AnonHugePages"] / 1024,
    }


def compare(kernel: Trace, model: Trace) -> tuple[list[Checkpoint], float]:
    sc = Scenario.model_validate(kernel.meta["scenario"])
    tol = max(TOL_MIB, TOL_FRACTION * sc.total_mib)
    fk, fm = np.maximum.accumulate(kernel["full_scans"]), np.maximum.accumulate(
        model["full_scans"])
    kmax = int(min(fk[-1], fm[-1]))
    ik, im = _before_boundaries(fk, kmax), _before_boundaries(fm, kmax)
    zero_counted = "ksm_zero_pages" not in kernel.meta.get("absent_counters", [])
    sk, sm = _series(kernel, zero_counted), _series(model, zero_counted)
    out: list[Checkpoint] = []
    for k, a, b in zip(range(1, kmax + 1), ik, im, strict=True):
        # observed in both: a sample during scan k (full_scans == k-1) exists in each trace;
        # several boundaries inside one sample interval leave the inner ones unobserved
        if a < 0 or b < 0 or fk[a] != k - 1 or fm[b] != k - 1:
            continue
        vals = {n: (round(float(sk[n][a]), 2), round(float(sm[n][b]), 2)) for n in sk}
        agree = all(abs(x - y) <= tol for x, y in vals.values())
        out.append(Checkpoint(k, round(float(kernel.t[a]), 2), round(float(model.t[b]), 2),
                              vals["freed"], vals["ksm"], vals["thp"], agree))
    return out, tol


def _first_scan_s(tr: Trace) -> float:
    fs = tr["full_scans"]
    i = np.flatnonzero(fs >= 1)
    return round(float(tr.t[i[0]]), 2) if i.size else float("nan")


def validate(kernel: Trace, trace_path: str = "") -> Validation:
    """Compare a labelled guest trace with the model under the variant's policy."""
    from ..model import simulate

    guest = kernel.meta.get("guest")
    if not guest:
        raise ValueError("not a patched-kernel trace (no meta.guest); use `ksmlab kernel run`")
    sc = Scenario.model_validate(kernel.meta["scenario"])
    model = simulate(sc, guest["policy"])
    cps, tol = compare(kernel, model)
    agree = sum(c.agree for c in cps) / len(cps) if cps else 0.0
    sk, sm = metrics.summarize(kernel), metrics.summarize(model)
    vk = sorted(v.name for v in sk.verdicts)
    vm = sorted(v.name for v in sm.verdicts)
    same, notes = verdict_agreement({"kernel": sk, "model": sm})
    return Validation(
        scenario=sc.name, stands_for=stands_for(sc.name), variant=guest["variant"],
        policy=guest["policy"], release=str(guest.get("release")),
        accelerator=str(guest.get("accelerator")), checkpoints=cps, agreement=round(agree, 4),
        verdicts_kernel=vk, verdicts_model=vm, tolerance_mib=round(tol, 2),
        seconds_per_scan={"kernel": _first_scan_s(kernel), "model": _first_scan_s(model)},
        confirmed=bool(cps) and agree >= AGREE_FRACTION and same, trace=trace_path,
        verdicts_agree=same, verdict_notes=notes,
        source_version=guest.get("source_version"), patch_sha256=guest.get("patch_sha256"),
    )


# ---- the index of results ------------------------------------------------------------

RESULTS_FORMAT = "ksmlab-kernel-results/1"


def index_path() -> Path:
    return cache_dir() / "results" / "index.json"


def shipped_path() -> Path:
    return kernel_dir() / "confirmed.json"


def _results(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    res = data.get("results", {}) if isinstance(data, dict) else {}
    return {k: r for k, r in res.items() if isinstance(r, dict)} if isinstance(res, dict) \
        else {}


def read_index() -> dict[str, dict[str, Any]]:
    """The results recorded on this machine."""
    return _results(index_path())


def shipped_origin() -> str:
    """Where the shipped results were recorded (one line)."""
    try:
        data = json.loads(shipped_path().read_text())
    except (OSError, ValueError):
        return "nowhere (no shipped results)"
    return str(data.get("recorded_on", "another machine")) if isinstance(data, dict) \
        else "another machine"


def read_results() -> dict[str, dict[str, Any]]:
    """Every result: the shipped ones (``origin`` "shipped"), replaced by those recorded
    here (``origin`` "here") for the same variant and scenario."""
    out = {k: {**r, "origin": "shipped"} for k, r in _results(shipped_path()).items()}
    out.update({k: {**r, "origin": "here"} for k, r in read_index().items()})
    return out


def current(r: dict[str, Any]) -> bool:
    """Was the result recorded with the patch the variant has today?"""
    try:
        return bool(r.get("patch_sha256", "absent") ==
                    patch_sha256(get_variant(str(r["variant"]))))
    except (KeyError, ValueError, RuntimeError, OSError):
        return False


def record(v: Validation) -> None:
    """Add (or replace) the result of (variant, scenario) in the index, atomically."""
    p = index_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = read_index()
        d = v.to_json()
        d.pop("disagree", None)
        results[f"{v.variant}|{v.scenario}"] = d
        tmp = p.with_name(f".index.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": RESULTS_FORMAT, "results": results},
                                  indent=1, sort_keys=True) + "\n")
        os.replace(tmp, p)


def export(dest: Path, recorded_on: str) -> int:
    """The results recorded here, as a file to ship with the package; the number
    written (only those of today's patches)."""
    results = {k: {kk: vv for kk, vv in r.items() if kk != "trace"}
               for k, r in read_index().items() if current(r)}
    dest.write_text(json.dumps({"format": RESULTS_FORMAT, "recorded_on": recorded_on,
                                "results": results}, indent=1, sort_keys=True) + "\n")
    return len(results)


@dataclass(frozen=True)
class Confirmation:
    """What the newest patched-kernel run of a policy on a scenario found."""

    confirmed: bool
    shipped: bool  # recorded elsewhere and shipped with the package, not run here
    release: str
    date: str


def kernel_confirmed(scenario: str) -> Callable[[str], Confirmation | None]:
    """Per policy: did a patched kernel confirm the model on ``scenario``? (recorded
    results of `ksmlab kernel validate`; nothing is built or booted here)"""
    results = read_results()
    return lambda policy: confirmed(policy, scenario, results)


def confirmed(policy: str, scenario: str,
              results: dict[str, dict[str, Any]] | None = None) -> Confirmation | None:
    """The newest result, recorded here or shipped, of a variant implementing
    ``policy`` on ``scenario`` or a scaled copy of it (``seed-uzp1-64m`` counts for
    ``seed-uzp1``) with its patch as it is today; None when there is none.  A result
    recorded here wins over a shipped one of any date."""
    best: dict[str, Any] | None = None
    for r in (read_results() if results is None else results).values():
        if r.get("policy") != policy or not current(r):
            continue
        if scenario not in (r.get("scenario"), r.get("stands_for")):
            continue
        rank = (r.get("origin") == "here", str(r.get("date", "")))
        if best is None or rank > (best.get("origin") == "here", str(best.get("date", ""))):
            best = r
    if best is None:
        return None
    return Confirmation(bool(best.get("confirmed")), best.get("origin") == "shipped",
                        str(best.get("release")), str(best.get("date", ""))[:10])
