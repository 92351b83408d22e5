"""Metrics and verdicts on synthetic traces whose figures are worked out here."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ksmlab import metrics, report, scenario
from ksmlab.trace import Trace

PAGES = 32768  # 128 MiB
KB = 4.0 * PAGES


def synthetic(name: str, duration: float,
              fill: Callable[[float], dict[str, float]]) -> Trace:
    sc = scenario.load(name)
    rows = []
    for t in np.round(np.arange(0, duration + 1e-9, 0.1), 3):
        row = {"t": float(t), "pages_sharing": 0.0, "ksm_zero_pages": 0.0, "full_scans": 0.0,
               "thp_split_page": 0.0, "thp_split_page_failed": 0.0, "pages_scanned": 0.0,
               "AnonHugePages": KB, "RssAnon": KB, "ksmd_cpu_ns": t * 1e7}
        row.update(fill(float(t)))
        rows.append(row)
    meta = {"scenario": sc.model_dump(mode="json"), "baseline": {"RssAnon": 0.0}}
    return Trace.from_rows(meta, rows, [{"t": 0.0, "action": "ksm_start"}])


def scans(t: float, per_scan: float = 6.6) -> float:
    return float(int(t / per_scan))


def test_burst_is_a_bypass() -> None:
    # all 128 MiB freed between t=7.9 and 8.0, nothing counted by KSM
    def burst(t: float) -> dict[str, float]:
        gone = t >= 8.0
        return {"RssAnon": 0.0 if gone else KB, "AnonHugePages": 0.0 if gone else KB,
                "thp_split_page": 64.0 if gone else 0.0, "full_scans": scans(t)}

    s = metrics.summarize(synthetic("seed-uzp1", 12, burst))
    assert s.budget_pages_per_s == 5000
    assert s.freed_mib == pytest.approx(128)
    assert s.ksm_accounted_mib == 0
    # peak over the 0.2 s window: 32768 pages / 0.2 s / 5000 pages/s
    assert s.budget_ratio_peak == pytest.approx(PAGES / 0.2 / 5000)
    assert [v.name for v in s.verdicts] == ["rate-limit-bypass"]
    assert s.thps_kept == 0 and s.thps_start == 64


def test_merging_at_the_budget_is_honest() -> None:
    # MADV_NOHUGEPAGE + use_zero_pages=1: 5000 zero pages/s from the second scan
    def steady(t: float) -> dict[str, float]:
        merged = float(min(PAGES, max(0.0, (t - 6.6) * 5000)))
        return {"RssAnon": KB - 4 * merged, "ksm_zero_pages": merged,
                "AnonHugePages": 0.0, "full_scans": scans(t)}

    s = metrics.summarize(synthetic("seed-uzp1-nothp", 16, steady))
    assert s.verdicts == []
    assert s.budget_ratio_peak == pytest.approx(1.0, abs=0.01)
    assert s.ksm_accounted_mib == pytest.approx(128)
    assert s.side_effect_mib == pytest.approx(0)


def test_one_thp_per_scan_is_a_collapse() -> None:
    # use_zero_pages=0: one THP (512 pages) split and freed at the end of each scan
    def slow(t: float) -> dict[str, float]:
        splits = max(0.0, scans(t) - 1)
        return {"RssAnon": KB - 2048 * splits, "thp_split_page": splits,
                "thp_split_page_failed": splits, "full_scans": scans(t)}

    s = metrics.summarize(synthetic("seed-uzp0", 25, slow))
    assert [v.name for v in s.verdicts] == ["merge-collapse"]
    assert s.merge_rate_mib_s is not None and s.merge_rate_mib_s < 0.5
    assert "failed +2" in s.verdicts[0].evidence


def test_short_run_cannot_judge_collapse() -> None:
    s = metrics.summarize(synthetic("seed-uzp0", 5, lambda t: {}))
    assert s.verdicts == []
    assert any("before the first full scan" in u for u in s.undetermined)


def test_freed_counts_ksm_pages_that_keep_rss() -> None:
    # an ordinary KSM merge leaves RssAnon unchanged: pages_sharing is the saving
    tr = synthetic("seed-uzp0-nothp", 2, lambda t: {"pages_sharing": 100 * t * 10})
    assert metrics.freed_pages(tr)[-1] == pytest.approx(2000)


def test_compare_table_fits_80_columns() -> None:
    tr = synthetic("seed-uzp1", 12, lambda t: {"RssAnon": 0.0 if t >= 8 else KB,
                                               "full_scans": scans(t)})
    s = metrics.summarize(tr)
    text = report.compare_table([("ksm-split-no-remap", s), ("mainline", s)], "text", "x" * 90)
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "bypass" in text
    from ksmlab.kernel.validate import Confirmation

    confirmed = {"mainline": Confirmation(True, False, "6.12.118-ksmlab-6.12", "2026-12-08"),
                 "v1": Confirmation(False, False, "r", "d"),
                 "v1-p2": Confirmation(True, True, "r", "d")}.get
    lines = report.compare_table([("mainline", s), ("v1", s), ("rfc", s), ("v1-p2", s)],
                                 "text", confirmed=confirmed).splitlines()
    assert lines[1].split()[8] == "yes" and lines[2].split()[8] == "NO"
    assert lines[3].split()[8] == "-"  # no patched-kernel run on record
    assert lines[4].split()[8] == "yes*"  # shipped: recorded on another machine
    assert "yes* shipped with ksmlab (recorded elsewhere" in " ".join(lines)
    js = json.loads(report.compare_table([("v1-p2", s)], "json", confirmed=confirmed))
    assert js["rows"][0]["kernel_confirmed"] is True
    assert js["rows"][0]["kernel_confirmed_where"] == "shipped"
    md = report.compare_table([("mainline", s)], "markdown")
    assert md.splitlines()[0].startswith("| policy |")
    assert all(len(line) <= 80 for line in report.summary_text(s, "t").splitlines())


# ---- borderline verdicts --------------------------------------------------------------

def bypass_at(factor: float) -> Trace:
    """seed-uzp1 freeing at ``factor`` x the bypass threshold's rate, steadily from t=1 s
    and all outside KSM's counters: the peak budget ratio is BYPASS_RATIO * factor."""
    rate = factor * metrics.BYPASS_RATIO * 5000  # pages/s; the budget is 5000 pages/s

    def fill(t: float) -> dict[str, float]:
        freed = min(PAGES, max(0.0, t - 1.0) * rate)
        return {"RssAnon": KB - 4 * freed, "thp_split_page": freed // 512,
                "full_scans": scans(t)}

    return synthetic("seed-uzp1", 8, fill)


def collapse_at(factor: float) -> Trace:
    """seed-uzp0 (all of it mergeable: the healthy rate is the budget) freeing at
    ``factor`` x the collapse threshold's rate after the first full scan, by splits."""
    rate = factor * metrics.COLLAPSE_FRACTION * 5000

    def fill(t: float) -> dict[str, float]:
        freed = max(0.0, t - 6.6) * rate
        return {"RssAnon": KB - 4 * freed, "thp_split_page": 1.0 if t >= 6.6 else 0.0,
                "full_scans": scans(t)}

    return synthetic("seed-uzp0", 25, fill)


M = 1 + metrics.BORDERLINE_MARGIN


@pytest.mark.parametrize(
    ("factor", "reached", "near_miss"),
    [(1.05, True, False), (0.95, False, True),  # within the margin, either side
     (M * 1.1, True, False), (1 / M / 1.1, False, False)],  # outside it
    ids=["just-above", "just-below", "far-above", "far-below"])
def test_bypass_near_its_threshold_is_borderline(factor: float, reached: bool,
                                                 near_miss: bool) -> None:
    s = metrics.summarize(bypass_at(factor))
    assert s.budget_ratio_peak == pytest.approx(metrics.BYPASS_RATIO * factor, rel=1e-6)
    assert [v.name for v in s.verdicts] == (["rate-limit-bypass"] if reached else [])
    assert [v.name for v in s.near_misses] == (["rate-limit-bypass"] if near_miss else [])
    border = abs(factor - 1) < 0.1
    assert [v.name for v in s.borderline()] == (["rate-limit-bypass"] if border else [])
    assert all(v.borderline == border for v in s.verdicts + s.near_misses)
    d = s.to_json()
    assert d["verdicts"] == (["rate-limit-bypass"] if reached else [])  # names, as before
    assert d["borderline"] == (["rate-limit-bypass"] if border else [])
    assert list(d["near_misses"]) == (["rate-limit-bypass"] if near_miss else [])
    if border:
        v = s.borderline()[0]
        assert v.figure == pytest.approx(metrics.BYPASS_RATIO * factor, rel=1e-6)
        assert v.threshold == metrics.BYPASS_RATIO
        assert f"peak ratio {metrics.BYPASS_RATIO * factor:.2f}x" in v.measure
        word = "VERDICT" if reached else "NEAR MISS"
        assert f"{word} rate-limit-bypass" in report.summary_text(s, "t")


@pytest.mark.parametrize(
    ("factor", "reached", "near_miss"),
    [(0.95, True, False), (1.05, False, True),  # the collapse is reached *below* it
     (1 / M / 1.1, True, False), (M * 1.1, False, False)],
    ids=["just-below", "just-above", "far-below", "far-above"])
def test_collapse_near_its_threshold_is_borderline(factor: float, reached: bool,
                                                   near_miss: bool) -> None:
    s = metrics.summarize(collapse_at(factor))
    assert [v.name for v in s.verdicts] == (["merge-collapse"] if reached else [])
    assert [v.name for v in s.near_misses] == (["merge-collapse"] if near_miss else [])
    border = abs(factor - 1) < 0.1
    assert s.to_json()["borderline"] == (["merge-collapse"] if border else [])
    for v in s.verdicts + s.near_misses:
        assert v.figure == pytest.approx(metrics.COLLAPSE_FRACTION * factor, rel=1e-6)
        assert v.borderline == border


def test_within_margin_bounds() -> None:
    t, m = 2.0, metrics.BORDERLINE_MARGIN
    assert metrics.within_margin(t * (1 + m), t) and metrics.within_margin(t / (1 + m), t)
    assert not metrics.within_margin(t * (1 + m) * 1.001, t)
    assert not metrics.within_margin(t / (1 + m) / 1.001, t)


def test_a_policy_keeps_its_colour_in_every_plot(tmp_path: Path) -> None:
    """Issue 17: a fixed colour per policy, whatever else is plotted beside it; both
    panels (freed, and freed by KSM's account, drawn even where it is 0)."""
    from ksmlab import report
    from ksmlab.model import POLICIES, simulate
    from ksmlab.scenario import load

    colours = {p: report.policy_colour(p) for p in POLICIES}
    assert len(set(colours.values())) == len(colours)  # all distinct
    assert report.policy_colour("live") == "black"
    assert colours == {p: report.policy_colour(p) for p in reversed(list(POLICIES))}
    sc = load("seed-uzp1").with_duration(9.0)
    runs = [(p, simulate(sc, p)) for p in ("mainline", "v1")]
    import matplotlib.pyplot as plt

    seen: list[list[str]] = []
    real = plt.Figure.savefig

    def spy(fig: Any, *a: Any, **k: Any) -> None:
        seen.append([str(line.get_color()) for ax in fig.axes for line in ax.get_lines()])
        real(fig, *a, **k)

    plt.Figure.savefig = spy  # type: ignore[method-assign]
    try:
        report.plot_freed(runs, tmp_path / "a.png", "x")
        report.plot_freed(runs[::-1], tmp_path / "b.png", "x")
    finally:
        plt.Figure.savefig = real  # type: ignore[method-assign]
    for drawn in seen:
        assert colours["mainline"] in drawn and colours["v1"] in drawn
        assert drawn.count(colours["mainline"]) == 2  # freed, and KSM's account (0)
    assert (tmp_path / "a.png").stat().st_size > 10_000


def test_compare_counts_folios_of_every_size() -> None:
    # 64 MiB of 64 KiB folios (1024), all split by t=8 and freed outside KSM's account
    def split(t: float) -> dict[str, float]:
        gone = t >= 8.0
        return {"RssAnon": 0.0 if gone else KB / 2, "AnonHugePages": 0.0,
                "hugepages-64kB/nr_anon": 0.0 if gone else 1024.0,
                "hugepages-64kB/split": 1024.0 if gone else 0.0,
                "hugepages-64kB/split_failed": 0.0, "full_scans": scans(t)}
    s = metrics.summarize(synthetic("mthp-64k-uzp1", 12, split))
    assert s.mthp == {"64kB": {"start": 1024, "kept": 0, "split": 1024, "split_failed": 0}}
    assert s.mthp_split == 1024 and s.thp_split_page == 0
    row = report.compare_rows([("mainline", s)])[0]
    assert row["splits_all"] == 1024 and row["thps_kept_all"] == 0
    text = report.compare_table([("mainline", s)], "text")
    assert all(len(line) <= 80 for line in text.splitlines())
    note = " ".join(report.folio_note([s]))
    assert "64 KiB x1024" in note and "64 KiB (16 pages)" in note
    assert "hugepages-64kB" in report.summary_text(s, "t")
    # PMD THPs only: no folio note
    tr = synthetic("seed-uzp1", 12, lambda t: {"full_scans": scans(t)})
    assert report.folio_note([metrics.summarize(tr)]) == []
