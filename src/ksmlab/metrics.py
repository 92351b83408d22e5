"""Derived figures and the two verdicts, from any trace (live or model alike).

Memory freed counts both ways the kernel frees anonymous memory here:
  freed = drop of the workloads' RssAnon from its running peak  (zero-page
          merges by KSM and the zero-page remap on THP split both lower
          MM_ANONPAGES)
        + pages_sharing                                          (an ordinary KSM
          merge leaves RSS unchanged: every mapping of a KSM page is counted)
KSM-accounted = pages_sharing + ksm_zero_pages: what KSM's own counters claim.
The rest is freed as a side effect, outside KSM's accounting.

KSM's budget is ``pages_to_scan`` pages per ``sleep_millisecs``: since one
page handed to ``cmp_and_merge_page`` frees at most one page, an honest KSM
never frees faster than its budget (a budget ratio of at most 1).

Verdicts and their margin.  Each verdict is decided by one figure against a
threshold (the other conditions are gates that must hold either way):
  rate-limit-bypass  peak budget ratio > BYPASS_RATIO
  merge-collapse     merge rate after scan 1 / the rate the budget allows
                     < COLLAPSE_FRACTION
A figure within BORDERLINE_MARGIN of its threshold (relative: between
threshold / (1 + margin) and threshold * (1 + margin)) is *borderline*: the
same run on a busier machine could land on the other side.  So:
  ``Summary.verdicts``     the verdicts reached, each with ``borderline`` set
                           when its figure lies within the margin above
                           (or, for the collapse, below) its threshold;
  ``Summary.near_misses``  verdicts whose figure missed the threshold by less
                           than the margin (always ``borderline``), so that a
                           near miss is visible rather than silently absent.
``Summary.to_json`` keeps ``verdicts`` (names reached) and ``evidence`` as
they were, and adds ``borderline`` (names within the margin, on either side of
the threshold) and ``near_misses`` (name -> evidence).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from . import content
from .scenario import PAGE_SIZE, Scenario
from .trace import MTHP_PREFIX, Trace, mthp_column

KIB_PER_PAGE = PAGE_SIZE // 1024
# Rates are measured over at least this long (10 ksmd batches at the default 20 ms):
# short enough to see a burst, long enough that batch quantisation stays within ~10 %.
PEAK_WINDOW_S = 0.2
BYPASS_RATIO = 2.0  # freed faster than twice the budget ...
BYPASS_SIDE_SHARE = 0.5  # ... and mostly outside KSM's counters
COLLAPSE_FRACTION = 0.1  # merging below a tenth of what the budget would merge
# A deciding figure this close to its threshold (relative, either side) is borderline:
# ksmd's pace and the sampling move these figures by a few to ~20 % from run to run.
BORDERLINE_MARGIN = 0.25

Array = npt.NDArray[np.float64]


@dataclass
class Verdict:
    name: str
    evidence: str
    borderline: bool = False  # the deciding figure is within BORDERLINE_MARGIN of threshold
    figure: float | None = None  # the deciding figure (see the module docstring) ...
    threshold: float | None = None  # ... and its threshold
    measure: str = ""  # both in words, e.g. "peak ratio 2.03x vs threshold 2.0x"


def within_margin(figure: float, threshold: float, margin: float = BORDERLINE_MARGIN) -> bool:
    """Is ``figure`` within a relative ``margin`` of ``threshold``, on either side?"""
    return threshold / (1 + margin) <= figure <= threshold * (1 + margin)


@dataclass
class Summary:
    duration_s: float
    budget_pages_per_s: float | None
    budget_mib_s: float | None
    freed_mib: float
    ksm_accounted_mib: float
    side_effect_mib: float
    freed_rate_peak_mib_s: float
    ksm_rate_peak_mib_s: float
    budget_ratio_peak: float | None
    budget_ratio_mean: float | None
    time_to_90pct_s: float | None
    # after the first full scan (merging cannot start before), from its end to 90 % of
    # the mergeable memory freed (or the run's end), over PEAK_WINDOW_S at least
    merge_rate_mib_s: float | None
    ksmd_cpu_pct: float | None
    ksmd_cpu_pct_peak: float | None
    thps_start: float
    thps_kept: float
    thp_split_page: int
    thp_split_page_failed: int
    full_scans: int
    pages_scanned: int
    expected_mergeable_mib: float
    # splits of multi-size THPs (hugepages-<N>kB/stats/split summed): not in thp_split_page
    mthp_split: int = 0
    # per folio size below PMD ("64kB"): folios at the start and kept (nr_anon), split,
    # split_failed; a merge attempt that splits one frees up to the folio at once
    mthp: dict[str, dict[str, int]] = field(default_factory=dict)
    peak_window_s: float = PEAK_WINDOW_S  # the shortest span a rate is measured over
    merge_rate_span_s: tuple[float, float] | None = None  # (from, to) of merge_rate_mib_s
    verdicts: list[Verdict] = field(default_factory=list)  # reached
    undetermined: list[str] = field(default_factory=list)
    near_misses: list[Verdict] = field(default_factory=list)  # missed within the margin
    # why the verdicts may not hold for the scenario (a knob changed by someone else)
    caveats: list[str] = field(default_factory=list)

    def borderline(self) -> list[Verdict]:
        """Every verdict within the margin of its threshold, reached or not."""
        return [v for v in self.verdicts + self.near_misses if v.borderline]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdicts"] = [v.name for v in self.verdicts]
        d["evidence"] = {v.name: v.evidence for v in self.verdicts}
        d["borderline"] = [v.name for v in self.borderline()]
        d["near_misses"] = {v.name: v.evidence for v in self.near_misses}
        if self.merge_rate_span_s is not None:
            d["merge_rate_span_s"] = [round(x, 3) for x in self.merge_rate_span_s]
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()}


def freed_pages(tr: Trace) -> Array:
    """Pages freed so far at each sample (see the module docstring)."""
    rss = tr.since_start("RssAnon")
    drop = np.maximum.accumulate(rss) - rss
    return drop / KIB_PER_PAGE + tr["pages_sharing"]


def ksm_accounted_pages(tr: Trace) -> Array:
    return tr["pages_sharing"] + tr["ksm_zero_pages"]


def peak_rate(t: Array, y: Array, window: float = PEAK_WINDOW_S) -> float:
    """Largest increase per second of ``y`` over any span of at least ``window``."""
    if len(t) < 2:
        return 0.0
    j = np.searchsorted(t, t + window)
    ok = j < len(t)
    if not ok.any():
        return float(max(0.0, (y[-1] - y[0]) / max(t[-1] - t[0], 1e-9)))
    i = np.flatnonzero(ok)
    return float(max(0.0, np.max((y[j[ok]] - y[i]) / (t[j[ok]] - t[i]))))


def _event_time(tr: Trace, action: str) -> float | None:
    for e in tr.events:
        if e.get("action") == action:
            return float(e["t"])
    return None


def mthp_figures(tr: Trace) -> dict[str, dict[str, int]]:
    """Per multi-size THP size sampled: folios at the start and at the end
    (``nr_anon``) and the splits (``split``, ``split_failed``) during the run."""
    out: dict[str, dict[str, int]] = {}
    for c in tr.columns:
        if not (c.startswith(MTHP_PREFIX) and c.endswith("/nr_anon")) or not len(tr.t):
            continue
        size = c[len(MTHP_PREFIX):-len("/nr_anon")]
        nr = tr[c]
        out[size] = {"start": int(nr[0]), "kept": int(nr[-1]),
                     **{st: int(tr.since_start(mthp_column(size, st))[-1])
                        for st in ("split", "split_failed")
                        if mthp_column(size, st) in tr}}
    return out


def _first_time(t: Array, cond: npt.NDArray[np.bool_]) -> float | None:
    idx = np.flatnonzero(cond)
    return float(t[idx[0]]) if idx.size else None


def pages_to_scan(tr: Trace, sc: Scenario, start: float = 0.0) -> float:
    """KSM's pages_to_scan over the run: the scenario's, or with the scan-time advisor
    on its decisions (``meta["advisor"]``) averaged over the time each held, from
    ``start`` to the trace's end (the advisor starts at advisor_min_pages_to_scan)."""
    rec = tr.meta.get("advisor")
    if not rec or not len(tr.t):
        return float(sc.ksm.pages_to_scan)
    end = float(tr.t[-1])
    t, pages, total = start, float(sc.ksm.pages_to_scan), 0.0
    for d in rec.get("decisions", []):
        at = min(max(float(d["t"]), start), end)
        total += pages * (at - t)
        t, pages = at, float(d["pages_to_scan"])
    total += pages * (end - t)
    return total / (end - start) if end > start else pages


def summarize(tr: Trace) -> Summary:
    sc = Scenario.model_validate(tr.meta["scenario"])
    t = tr.t
    mib = KIB_PER_PAGE / 1024
    freed = freed_pages(tr)
    acct = ksm_accounted_pages(tr)
    start = _event_time(tr, "ksm_start")
    start = 0.0 if start is None else start
    budget = (pages_to_scan(tr, sc, start) * 1000.0 / sc.ksm.sleep_millisecs
              if sc.ksm.sleep_millisecs > 0 else None)
    total = float(freed[-1]) if len(freed) else 0.0
    window = max(PEAK_WINDOW_S, 2 * sc.sample_interval)
    peak = peak_rate(t, freed, window)
    t90 = _first_time(t, freed >= 0.9 * total) if total > 0 else None
    active = (t90 - start) if t90 is not None else None
    mean = total / active if active and active > 0 else None

    cpu = tr.since_start("ksmd_cpu_ns") if "ksmd_cpu_ns" in tr else None
    cpu_pct = cpu_peak = None
    if cpu is not None and len(t) > 1 and t[-1] > t[0]:
        cpu_pct = float((cpu[-1] - cpu[0]) / ((t[-1] - t[0]) * 1e9) * 100)
        cpu_peak = peak_rate(t, cpu, 1.0) / 1e9 * 100

    huge = tr["AnonHugePages"] / 2048.0
    scans = tr["full_scans"]
    # merging can only start in the second full scan (checksums first): rate from there
    scan1 = _first_time(t, scans >= 1)
    mergeable = content.expected_mergeable_pages(sc)
    merge_rate = None
    merge_span = None
    if scan1 is not None and t[-1] > scan1:
        i = int(np.searchsorted(t, scan1))
        end_idx = len(t) - 1
        if mergeable > 0:
            done = np.flatnonzero(freed >= 0.9 * mergeable)
            if done.size and done[0] > i:
                end_idx = int(done[0])
        # over the peak's window at least, as the peak rate is: a burst right after the
        # scan end, over one short sample, would read above the peak (seed-uzp1 in the
        # model: 3260 against 640 MiB/s)
        end_idx = max(end_idx, min(int(np.searchsorted(t, t[i] + window)), len(t) - 1))
        if t[end_idx] > t[i]:
            merge_rate = float((freed[end_idx] - freed[i]) / (t[end_idx] - t[i]))
            merge_span = (float(t[i]), float(t[end_idx]))

    s = Summary(
        duration_s=float(t[-1]) if len(t) else 0.0,
        budget_pages_per_s=budget,
        budget_mib_s=budget * mib if budget else None,
        freed_mib=total * mib,
        ksm_accounted_mib=float(acct[-1]) * mib if len(acct) else 0.0,
        side_effect_mib=max(0.0, total - float(acct[-1])) * mib if len(acct) else 0.0,
        freed_rate_peak_mib_s=peak * mib,
        ksm_rate_peak_mib_s=peak_rate(t, acct, window) * mib,
        budget_ratio_peak=peak / budget if budget else None,
        budget_ratio_mean=mean / budget if budget and mean is not None else None,
        time_to_90pct_s=active,
        merge_rate_mib_s=merge_rate * mib if merge_rate is not None else None,
        ksmd_cpu_pct=cpu_pct,
        ksmd_cpu_pct_peak=cpu_peak,
        thps_start=float(huge[0]) if len(huge) else 0.0,
        thps_kept=float(huge[-1]) if len(huge) else 0.0,
        thp_split_page=int(tr.since_start("thp_split_page")[-1]),
        thp_split_page_failed=int(tr.since_start("thp_split_page_failed")[-1]),
        full_scans=int(scans[-1]) if len(scans) else 0,
        pages_scanned=int(tr.since_start("pages_scanned")[-1]),
        expected_mergeable_mib=mergeable * mib,
        mthp_split=sum(int(tr.since_start(c)[-1]) for c in tr.columns
                       if c.startswith(MTHP_PREFIX) and c.endswith("/split")),
        mthp=mthp_figures(tr),
        peak_window_s=window,
        merge_rate_span_s=merge_span,
    )
    _judge(s, sc, mergeable)
    for c in tr.meta.get("foreign_knob_changes", []):
        s.caveats.append(f"{c['knob']} was set to {c['now']} by someone else at {c['t']:.1f} s "
                         "(the run set " + f"{c['ours']}): the verdicts are not the scenario's")
    return s


def _decide(s: Summary, v: Verdict, reached: bool) -> None:
    """File ``v`` as reached, as a near miss (within the margin), or not at all."""
    assert v.figure is not None and v.threshold is not None
    v.borderline = within_margin(v.figure, v.threshold)
    pct = f"{BORDERLINE_MARGIN:.0%}"
    if reached:
        if v.borderline:
            v.evidence += f"; borderline: {v.measure}, within the {pct} margin"
        s.verdicts.append(v)
    elif v.borderline:
        v.evidence = (f"near miss ({v.measure}, within the {pct} margin): " + v.evidence)
        s.near_misses.append(v)


def _budget_pages(sc: Scenario, budget_mib_s: float) -> str:
    """pages_to_scan as the bypass verdict says it (the advisor's: a mean)."""
    pages = budget_mib_s * 1024 / KIB_PER_PAGE * sc.ksm.sleep_millisecs / 1000.0
    return (f"{pages:.0f}" if sc.ksm.advisor_mode == "none"
            else f"the advisor's mean of {pages:.0f}")


def _judge(s: Summary, sc: Scenario, mergeable: int) -> None:
    budget = s.budget_mib_s
    # rate-limit bypass: freed faster than KSM's budget allows, and not by KSM's account
    if budget and s.freed_mib > 0 and s.budget_ratio_peak:
        side_share = s.side_effect_mib / s.freed_mib
        if side_share > BYPASS_SIDE_SHARE:
            ratio = s.budget_ratio_peak
            _decide(s, Verdict(
                "rate-limit-bypass",
                f"freed {s.freed_mib:.1f} MiB at up to {s.freed_rate_peak_mib_s:.1f} MiB/s, "
                f"{ratio:.1f}x KSM's budget of {budget:.1f} MiB/s "
                f"({_budget_pages(sc, budget)} pages/{sc.ksm.sleep_millisecs} ms); KSM's counters "
                f"account for {s.ksm_accounted_mib:.1f} MiB; thp_split_page +{s.thp_split_page}",
                figure=ratio, threshold=BYPASS_RATIO,
                measure=f"peak ratio {ratio:.2f}x vs threshold {BYPASS_RATIO:.1f}x",
            ), reached=ratio > BYPASS_RATIO)
    # merge collapse: mergeable pages present, merging far below what the budget allows,
    # and splits freeing memory outside KSM's accounting
    if not budget or mergeable == 0:
        return
    if s.merge_rate_mib_s is None:
        s.undetermined.append("merge-collapse: the run ended before the first full scan did")
        return
    region_pages = sum(
        p.count * sum(r.pages for r in p.region) for p in sc.process if p.merge != "none"
    )
    healthy = budget * mergeable / max(region_pages, 1)  # all mergeable pages in one scan
    if (
        s.freed_mib < 0.9 * s.expected_mergeable_mib
        and s.thp_split_page + s.mthp_split > 0
        and s.side_effect_mib > 0
    ):
        share = s.merge_rate_mib_s / healthy
        _decide(s, Verdict(
            "merge-collapse",
            f"after the first full scan memory was freed at {s.merge_rate_mib_s:.2f} MiB/s, "
            f"{share * 100:.1f} % of the {healthy:.1f} MiB/s KSM's "
            f"budget would merge ({s.freed_mib:.1f} of {s.expected_mergeable_mib:.1f} MiB "
            f"mergeable freed); pages_sharing+ksm_zero_pages = {s.ksm_accounted_mib:.1f} MiB; "
            f"thp_split_page +{s.thp_split_page} (failed +{s.thp_split_page_failed})"
            + (f", multi-size THP splits +{s.mthp_split}" if s.mthp_split else ""),
            figure=share, threshold=COLLAPSE_FRACTION,
            measure=f"merge rate {share:.1%} of the budget's vs threshold "
                    f"{COLLAPSE_FRACTION:.0%}",
        ), reached=share < COLLAPSE_FRACTION)
