"""The scan-time advisor (model/advisor.py) against decisions the kernel made."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ksmlab.model import advisor
from ksmlab.model.advisor import AdvisorCtx, AdvisorKnobs

DATA = Path(__file__).parent / "data" / "advisor-6.18.json"


def _replay(record: dict[str, Any]) -> list[int]:
    """Feed scan_time_advisor() clocks that give each recorded scan's scan_time and
    cpu_percent; return the pages_to_scan it decides, scan by scan."""
    knobs = AdvisorKnobs(target_scan_time=record["target_scan_time"])
    pages = record["pages_to_scan_at_switch"]
    ctx, now, cpu, out = AdvisorCtx(), 10**12, 0, []
    for d in record["decisions"]:
        ctx = advisor.start_scan(ctx, now)
        now += d["scan_time"] * 1_000_000_000 + 400_000_000  # whole seconds, truncated
        cpu += d["cpu_percent"] * d["scan_time"] * 10 * 1_000_000
        ctx, dec = advisor.scan_time_advisor(ctx, now, cpu, pages, knobs)
        assert (dec.scan_time, dec.cpu_percent) == (d["scan_time"], d["cpu_percent"])
        pages = dec.pages_to_scan
        out.append(pages)
    return out


def test_the_kernels_own_decisions_replayed() -> None:
    """A live run's ksm_advisor tracepoints (6.18): the first scan saw ksmd's CPU since
    boot (cpu_percent 17829), so pages_to_scan fell to 49, below
    advisor_min_pages_to_scan; then up by the 10 % floor to the 30000 cap."""
    record = json.loads(DATA.read_text())
    want = [d["pages_to_scan"] for d in record["decisions"]]
    assert want[:6] == [49, 490, 980, 2450, 24500, 30000]
    assert _replay(record) == want


def test_switching_the_mode_sets_pages_to_scan() -> None:
    knobs = AdvisorKnobs(min_pages_to_scan=700)
    assert advisor.pages_on_switch("scan-time", knobs) == 700
    assert advisor.pages_on_switch("none", knobs) == advisor.DEFAULT_PAGES_TO_SCAN


def test_a_slow_scan_is_capped_by_max_cpu_and_max_pages() -> None:
    knobs = AdvisorKnobs(target_scan_time=10, max_cpu=20, max_pages_to_scan=30000)
    ctx = advisor.start_scan(AdvisorCtx(scan_time=100, change=100), 0)
    # 100 s scan at 5 % of a CPU: factor 10, change ewma(100, 100) = 100
    ctx, dec = advisor.scan_time_advisor(ctx, 100 * 10**9, 5 * 10**9, 1000, knobs)
    assert (dec.scan_time, dec.cpu_percent) == (100, 5)
    # 1000 * 100 / 10 = 10000 pages, capped at cost 200 a percent * 20 % = 4000
    assert dec.pages_to_scan == 4000
    assert ctx.cpu_time_ns == 5 * 10**9 and ctx.scan_time == 100
