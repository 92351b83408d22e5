"""Metrics and verdicts on synthetic traces whose figures are worked out here."""

from __future__ import annotations

from collections.abc import Callable

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
    confirmed = {"mainline": True, "v1": False}.get
    lines = report.compare_table([("mainline", s), ("v1", s), ("rfc", s)], "text",
                                 confirmed=confirmed).splitlines()
    assert lines[1].split()[8] == "yes" and lines[2].split()[8] == "NO"
    assert lines[3].split()[8] == "-"  # no patched-kernel run on record
    md = report.compare_table([("mainline", s)], "markdown")
    assert md.splitlines()[0].startswith("| policy |")
    assert all(len(line) <= 80 for line in report.summary_text(s, "t").splitlines())
