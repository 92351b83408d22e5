"""What a host's KSM/THP settings expose it to, and what would change it.

``ksmlab doctor`` reads the host (live/doctor.py); this module only runs the
model: the thread's seed workload (128 MiB of zero-filled THPs made mergeable:
``seed-uzp0`` or ``seed-uzp1``, named by the ``use_zero_pages`` it runs with)
under the host's own KSM and khugepaged knobs, with the policy
that stands for this kernel (``mainline`` when the remap probe saw the remap,
``pre-6.12`` when it saw none), once with the host's ``use_zero_pages`` and once
with the other value, and under every policy for the fixes that would help.
Rules are the model's verdicts, not guesses: each figure comes with its run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .live.features import policy_for_remap
from .metrics import summarize
from .model import POLICIES, simulate
from .scenario import KsmKnobs, Scenario, load

SEED = "seed-uzp{}"  # the seed workload, by its use_zero_pages
SCANS = 3  # full scans the run lasts at the host's rate: merging starts in the second
KSM_KNOBS = tuple(KsmKnobs.model_fields)  # the knobs a scenario sets, read from the host


@dataclass
class Outcome:
    use_zero_pages: int
    freed_mib: float
    by_ksm_mib: float
    ratio_peak: float | None
    verdicts: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"use_zero_pages": self.use_zero_pages, "freed_mib": round(self.freed_mib, 1),
                "by_ksm_mib": round(self.by_ksm_mib, 1),
                "budget_ratio_peak": None if self.ratio_peak is None
                else round(self.ratio_peak, 2), "verdicts": self.verdicts}


@dataclass
class Advice:
    policy: str  # the model policy that stands for this kernel
    seconds: float  # how long the model ran the seed workload
    current: Outcome
    other: Outcome
    fixes: list[str] = field(default_factory=list)  # policies without a verdict here
    say: list[str] = field(default_factory=list)  # what to set, in sentences

    @property
    def workload(self) -> str:
        """The seed scenario the host's own use_zero_pages makes it."""
        return SEED.format(self.current.use_zero_pages)

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "workload": self.workload, "seconds": self.seconds,
                "current": self.current.to_json(), "other_use_zero_pages":
                self.other.to_json(), "fixes_without_verdict": self.fixes, "advice": self.say}


def _seed(knobs: dict[str, Any], uzp: int) -> Scenario:
    sc = load(SEED.format(uzp))
    # the values as sysfs shows them ("100"), or as a scenario has them (100)
    ksm: dict[str, Any] = {k: knobs[f"ksm/{k}"] if k == "advisor_mode" else
                           int(knobs[f"ksm/{k}"]) for k in KSM_KNOBS if f"ksm/{k}" in knobs}
    ksm["use_zero_pages"] = uzp
    data = sc.model_dump()
    data["ksm"] = {**data["ksm"], **ksm}
    if data["ksm"].get("advisor_mode") == "scan-time":
        # the advisor sets pages_to_scan, from advisor_min_pages_to_scan (scenario.KsmKnobs)
        del data["ksm"]["pages_to_scan"]
        data["ksm"] = KsmKnobs.model_validate(data["ksm"]).model_dump()
    k = {**data["ksm"]}
    rate = k["pages_to_scan"] * 1000 / max(k["sleep_millisecs"], 1)  # pages a second
    data["duration"] = min(120.0, max(15.0, SCANS * sc.total_pages / rate))
    return Scenario.model_validate(data)


def _run(knobs: dict[str, Any], uzp: int, policy: str) -> Outcome:
    s = summarize(simulate(_seed(knobs, uzp), policy, engine="exact"))
    return Outcome(uzp, s.freed_mib, s.ksm_accounted_mib, s.budget_ratio_peak,
                   [v.name for v in s.verdicts])


def advise(knobs: dict[str, Any], remaps: bool | None) -> Advice:
    """``knobs``: the host's values by sysfs name below /sys/kernel/mm
    (``ksm/pages_to_scan``); ``remaps``: what the remap probe saw (None: unknown,
    taken as the remap, which every kernel since 6.12 has)."""
    policy = policy_for_remap(remaps)
    uzp = int(knobs.get("ksm/use_zero_pages", 0))
    cur, other = _run(knobs, uzp, policy), _run(knobs, 1 - uzp, policy)
    adv = Advice(policy, _seed(knobs, uzp).duration, cur, other)
    if cur.verdicts:
        adv.fixes = [p for p in POLICIES if p != policy and not _run(knobs, uzp, p).verdicts]
    names = {"rate-limit-bypass": "the rate-limit bypass", "merge-collapse": "the merge collapse"}
    if not cur.verdicts:
        adv.say.append(f"with use_zero_pages={uzp} the model of this kernel shows neither "
                       "regression on the seed workload: nothing to change")
        return adv
    what = " and ".join(names.get(v, v) for v in cur.verdicts)
    if not other.verdicts:
        adv.say.append(f"set ksm/use_zero_pages={1 - uzp}: on the seed workload it avoids "
                       f"{what} ({other.freed_mib:.0f} MiB freed, {other.by_ksm_mib:.0f} "
                       "by KSM's account)")
    else:
        instead = " and ".join(names.get(v, v) for v in other.verdicts)
        adv.say.append(f"use_zero_pages={1 - uzp} gives {instead} instead: no value "
                       "avoids both on this kernel, where every KSM split of a THP remaps "
                       "its zero subpages")
        adv.say.append("to keep KSM's accounting and rate limit: keep THP off mergeable "
                       "memory (MADV_NOHUGEPAGE, or transparent_hugepage/enabled=never "
                       "for a host whose guests madvise)")
    if adv.fixes:
        adv.say.append("policies that avoid it in the model: " + ", ".join(adv.fixes)
                       + " (ksmlab policies; pre-6.12 is the remap reverted)")
    return adv
