"""Scenario-level behaviour: what each policy changes, determinism, refusals."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ksmlab import scenario
from ksmlab.model import POLICIES, ModelUnsupported, get_policy, simulate
from ksmlab.scenario import Scenario
from ksmlab.trace import COLUMNS, Trace


def sc(name: str, **over: Any) -> Scenario:
    base = scenario.load(name).model_dump()
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return Scenario.model_validate(base)


_cache: dict[tuple[str, str], Trace] = {}


def run(name: str, policy: str, **over: Any) -> Trace:
    key = (name + repr(sorted(over.items())), policy)
    if key not in _cache:
        _cache[key] = simulate(sc(name, **over), policy)
    return _cache[key]


def at(tr: Trace, col: str, t: float) -> float:
    i = int(np.searchsorted(tr.t, t - 1e-9))
    return float(tr[col][min(i, len(tr) - 1)])


def scan2_start(tr: Trace) -> float:
    return float(tr.t[np.argmax(tr["full_scans"] >= 1)])


RSS0 = 128 * 1024  # kB


def test_uzp1_mainline_bypasses_the_rate_limit() -> None:
    tr = run("seed-uzp1", "mainline")
    t2 = scan2_start(tr)
    assert 7.0 < t2 < 8.5  # 32768 pages at 100 per ~23.5 ms
    assert at(tr, "RssAnon", t2 - 0.1) == RSS0
    assert at(tr, "RssAnon", t2 + 1.0) <= 0.01 * RSS0
    assert at(tr, "thp_split_page", t2 + 0.2) == 64
    assert at(tr, "pages_scanned", t2 + 1.0) - 32768 <= 64 + 100
    assert tr["ksm_zero_pages"].max() == 0 and tr["pages_sharing"].max() == 0


@pytest.mark.parametrize(
    "policy", ["pre-6.12", "v1", "v1-p2", "ksm-split-no-remap", "rfc", "ksm-accounted-remap"]
)
def test_uzp1_policies_that_keep_the_budget(policy: str) -> None:
    tr = run("seed-uzp1", policy)
    t2 = scan2_start(tr)
    assert at(tr, "RssAnon", t2 + 1.0) >= 0.8 * RSS0
    kzp = at(tr, "ksm_zero_pages", t2 + 1.0)
    assert 2500 < kzp < 6000  # ~100 pages per ~23.5 ms
    freed_kb = RSS0 - tr["RssAnon"][-1]
    assert freed_kb == tr["ksm_zero_pages"][-1] * 4  # every freed page is counted


def test_v1_p3_only_gates_on_shrink_underused() -> None:
    on = run("seed-uzp1", "v1-p3")
    assert at(on, "RssAnon", scan2_start(on) + 1.0) <= 0.01 * RSS0
    off = run("seed-uzp1", "v1-p3", thp={"shrink_underused": 0})
    assert at(off, "RssAnon", scan2_start(off) + 1.0) >= 0.8 * RSS0
    assert off["ksm_zero_pages"][-1] > 0


def test_ksm_skip_zeropage_leaves_no_stale_orphan() -> None:
    tr = run("seed-uzp1", "ksm-skip-zeropage")
    assert at(tr, "RssAnon", scan2_start(tr) + 1.0) <= 0.01 * RSS0
    assert tr["pages_unshared"].max() == 0  # mainline leaves 1


def test_ksm_skip_huge_never_touches_thps() -> None:
    tr = run("seed-uzp1", "ksm-skip-huge")
    assert tr["pages_scanned"][-1] == 0 and tr["thp_split_page"][-1] == 0
    assert tr["RssAnon"][-1] == RSS0 and tr["full_scans"][-1] > 100


def test_ksm_huge_under_pressure() -> None:
    quiet = run("seed-uzp1", "ksm-huge-under-pressure")
    assert quiet["thp_split_page"][-1] == 0
    ev = [{"action": "pressure", "at": 2.0}]
    tr = run("seed-uzp1", "ksm-huge-under-pressure", event=ev)
    assert tr["thp_split_page"][-1] == 64 and tr["RssAnon"][-1] == 0


def test_uzp0_mainline_collapses_to_one_thp_per_scan() -> None:
    tr = run("seed-uzp0", "mainline")
    scans = tr["full_scans"][-1]
    assert scans >= 3
    assert tr["thp_split_page"][-1] == tr["thp_split_page_failed"][-1] == scans
    assert tr["pages_sharing"].max() == 0


def test_uzp0_pre612_merges_at_the_budget_into_chains() -> None:
    tr = run("seed-uzp0", "pre-6.12")
    t2 = scan2_start(tr)
    rate = (at(tr, "pages_sharing", t2 + 5) - at(tr, "pages_sharing", t2 + 1)) / 4
    assert 3500 < rate < 4500  # pages per second at 100 pages per ~23.5 ms
    assert tr["pages_shared"][-1] == 128 and tr["pages_sharing"][-1] == 32640
    assert tr["stable_node_chains"][-1] == 1 and tr["stable_node_dups"][-1] == 128
    assert tr["RssAnon"][-1] == RSS0  # KSM pages stay in RSS; AnonHugePages goes
    assert tr["AnonHugePages"][-1] == 0


def test_uzp0_ksm_skip_zeropage_splits_every_thp_in_scan_2() -> None:
    tr = run("seed-uzp0", "ksm-skip-zeropage")
    assert at(tr, "thp_split_page", scan2_start(tr) + 1.0) == 64


SHRINK = {
    "ksm_start_at": None,
    "duration": 2.0,
    "thp": {"khugepaged": {"max_ptes_none": 409}},
    "process": [{"region": [{"size_mib": 128, "content": {"zero": 0.9}}]}],
    "event": [{"action": "pressure", "at": 1.0}],
}


@pytest.mark.parametrize(("policy", "splits"), [("mainline", 64), ("rfc", 64), ("pre-6.12", 0)])
def test_pressure_runs_the_underused_shrinker(policy: str, splits: int) -> None:
    tr = run("seed-uzp0", policy, **SHRINK)
    assert tr["thp_underused_split_page"][-1] == splits
    assert at(tr, "RssAnon", 0.9) == RSS0
    if splits:
        assert tr["RssAnon"][-1] < 0.15 * RSS0


def test_deterministic() -> None:
    a = simulate(sc("mixed", duration=4.0), "mainline")
    b = simulate(sc("mixed", duration=4.0), "mainline")
    assert a.to_json() == b.to_json()


def test_trace_shape_and_meta() -> None:
    tr = simulate(sc("seed-uzp1-nothp", duration=1.0), "mainline")
    assert tuple(tr.columns) == COLUMNS
    regular = tr["full_scan_end"] == 0  # plus one sample at each full-scan end
    assert regular.sum() == 11 and tr.t[regular][-1] == pytest.approx(1.0)
    assert tr.meta["source"] == "model" and tr.meta["kernel"] == "model:mainline"
    assert tr.meta["baseline"]["thp_split_page"] == 0


@pytest.mark.parametrize("name", [n for n in scenario.builtin_names() if n != "host-1t"])
def test_every_builtin_runs(name: str) -> None:
    sc = scenario.load(name)
    duration = max([0.5, *(e.at for e in sc.event)])
    tr = simulate(sc, "mainline", duration=duration)
    assert (tr["full_scan_end"] == 0).sum() == round(duration / sc.sample_interval) + 1


def test_refusals() -> None:
    with pytest.raises(ModelUnsupported, match="merge_across_nodes"):
        simulate(sc("seed-uzp1", ksm={"merge_across_nodes": 0}), "mainline")
    with pytest.raises(ValueError, match=r"known: pre-6\.12"):
        get_policy("nope")
    assert {"pre-6.12", "6.12", "mainline", "v1", "v1-p2", "v1-p3", "rfc",
            "ksm-split-no-remap", "ksm-skip-zeropage", "ksm-skip-huge",
            "ksm-huge-under-pressure", "ksm-accounted-remap"} <= set(POLICIES)
    for p in POLICIES.values():
        assert p.description and p.sources


def test_set_event_changes_knobs_mid_run() -> None:
    # use_zero_pages 0 -> 1 at 1 s on the NOHUGEPAGE baseline: zero merges then
    # begin in the second full scan
    ev = [{"action": "set", "at": 1.0, "knob": "ksm.use_zero_pages", "value": 1}]
    tr = simulate(sc("seed-uzp0-nothp", event=ev), "mainline")
    assert tr["ksm_zero_pages"][-1] == 32768 and tr["pages_sharing"][-1] == 0
    ev = [{"action": "set", "at": 0.5, "knob": "ksm.pages_to_scan", "value": 1000}]
    fast = simulate(sc("seed-uzp1-nothp", duration=4.0, event=ev, align_events=False), "mainline")
    assert fast["full_scans"][-1] >= 2 and fast["ksm_zero_pages"][-1] == 32768


def _ends(tr: Trace) -> list[float]:
    return sorted(float(tr.t[i]) for i in tr.checkpoints().values())


def test_aligned_event_waits_for_the_next_full_scan_end() -> None:
    ev = [{"action": "pressure", "at": 1.0}]
    tr = simulate(sc("seed-uzp0", duration=9.0, event=ev), "mainline")
    applied = next(e["t"] for e in tr.events if e["action"] == "pressure")
    assert applied == min(t for t in _ends(tr) if t >= 1.0)  # the first scan ends at ~7.7 s
    loose = simulate(sc("seed-uzp0", duration=9.0, event=ev, align_events=False), "mainline")
    assert next(e["t"] for e in loose.events if e["action"] == "pressure") == 1.0


def test_driven_khugepaged_wakes_every_period_at_full_scan_ends() -> None:
    tr = simulate(scenario.load("khugepaged-recollapse"), "mainline")
    wakes = [e for e in tr.events if e["action"] == "khugepaged"]
    assert [w["at"] for w in wakes] == [3.0, 6.0, 9.0, 12.0, 15.0, 18.0]
    ends = _ends(tr)
    for w in wakes:
        assert w["t"] == min(t for t in ends if t >= w["at"])
    # each wake is one pass of 4096 pages = 8 PMDs; ranges KSM split collapse again
    assert tr["khugepaged_pages_collapsed"][-1] > 0
    assert tr["thp_split_page"][-1] > 32


def test_parked_khugepaged_knob_cannot_change_mid_run() -> None:
    ev = [{"action": "set", "at": 1.0, "knob": "thp.khugepaged.scan_sleep_millisecs",
           "value": 100}]
    with pytest.raises(ValueError, match="drives khugepaged"):
        sc("seed-uzp0", event=ev)
    assert sc("seed-uzp0", event=ev, drive_khugepaged=False).drive_khugepaged is False


def test_pinned_event_replays_at_the_given_full_scan() -> None:
    # the kernel applied the pressure after full scan 5, though its time (1 s) falls in
    # scan 3 here (scans of ~0.42 s): the model replays it at scan 5 (fidelity.pins())
    ev = [{"action": "pressure", "at": 1.0}]
    free = simulate(sc("volatile", duration=3.0, event=ev), "mainline")
    first_end_after = next(k for k, i in sorted(free.checkpoints().items()) if free.t[i] >= 1.0)
    assert next(e for e in free.events if e["action"] == "pressure")["full_scans"] == (
        first_end_after)
    tr = simulate(sc("volatile", duration=3.0, event=ev), "mainline", pins=[("pressure", 5)])
    done = next(e for e in tr.events if e["action"] == "pressure")
    assert done["full_scans"] == 5 and done["aligned"] is True
    assert first_end_after < 5
