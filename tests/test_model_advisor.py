"""The scan-time advisor (model/advisor.py) against decisions the kernel made."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ksmlab import fidelity
from ksmlab.metrics import pages_to_scan as mean_pages_to_scan
from ksmlab.model import advisor, simulate
from ksmlab.model.advisor import AdvisorCtx, AdvisorKnobs
from ksmlab.model.costs import CostProfile
from ksmlab.model.run import Simulation
from ksmlab.scenario import KsmKnobs, Scenario, ScenarioError, load, parse

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


# ---- scenarios ------------------------------------------------------------------
SMALL = '''
name = "adv"
duration = 6.0
[ksm]
advisor_mode = "scan-time"
advisor_target_scan_time = 2
advisor_max_pages_to_scan = 2000
{extra}
[[process]]
[[process.region]]
size_mib = 16
thp = "nohugepage"
content = {{ duplicate = 0.0 }}
'''


def small(extra: str = "") -> Scenario:
    return parse(SMALL.format(extra=extra))


def test_the_knobs_default_as_the_kernel_and_pages_to_scan_follows_the_switch() -> None:
    k = KsmKnobs()
    assert (k.advisor_mode, k.advisor_max_cpu, k.advisor_min_pages_to_scan,
            k.advisor_max_pages_to_scan, k.advisor_target_scan_time) == (
        "none", 70, 500, 30000, 200)
    assert advisor.knobs_of(k) == AdvisorKnobs()
    on = KsmKnobs(advisor_mode="scan-time", advisor_min_pages_to_scan=700)
    # advisor_mode_store() -> set_advisor_defaults(): the scenario says what the kernel has
    assert on.pages_to_scan == 700 == advisor.pages_on_switch("scan-time", advisor.knobs_of(on))
    assert KsmKnobs.model_validate(on.model_dump()) == on  # a dump reads back (with_duration)


@pytest.mark.parametrize(("extra", "message"), [
    ("pages_to_scan = 1000", "adv: ksm: pages_to_scan 1000 with advisor_mode scan-time: the "
     "advisor sets it, starting at advisor_min_pages_to_scan (500; advisor_mode_store()): "
     "leave pages_to_scan out"),
    ("advisor_target_scan_time = 0", "adv: ksm.advisor_target_scan_time: Input should be "
     "greater than or equal to 1"),
    ("advisor_max_cpu = 101", "adv: ksm.advisor_max_cpu: Input should be less than or equal "
     "to 100"),
    ("advisor_mode = \"sometimes\"", "adv: ksm.advisor_mode: Input should be 'none' or "
     "'scan-time'"),
])
def test_a_bad_advisor_knob_is_one_line(extra: str, message: str) -> None:
    text = SMALL.format(extra=extra)
    if "advisor_target_scan_time = 0" in extra or "advisor_mode =" in extra:
        key = extra.split(" =")[0]
        text = "\n".join(x for x in text.splitlines()
                         if not (x.startswith(key + " =") and x != extra))
    with pytest.raises(ScenarioError) as e:
        parse(text, "adv")
    assert str(e.value) == message


def test_set_events_the_kernel_refuses_with_the_advisor_on() -> None:
    ev = '\n[[event]]\naction = "set"\nat = 1.0\nknob = "ksm.{knob}"\nvalue = {value}\n'
    with pytest.raises(ScenarioError, match=r"pages_to_scan_store\(\) refuses it"):
        parse(SMALL.format(extra="") + ev.format(knob="pages_to_scan", value=10), "adv")
    with pytest.raises(ScenarioError, match="advisor_mode cannot change mid-run"):
        parse(SMALL.format(extra="") + ev.format(knob="advisor_mode", value='"none"'), "adv")
    sc = parse(SMALL.format(extra="") + ev.format(knob="advisor_max_cpu", value=20), "adv")
    assert sc.event[0].sysfs_name == "ksm/advisor_max_cpu"


def test_builtins_have_the_advisor_on_and_are_in_the_suite() -> None:
    for name in ("advisor-healthy", "advisor-collapse"):
        sc = load(name)
        assert sc.ksm.advisor_mode == "scan-time" and name in fidelity.SUITE
        assert sc.total_mib <= 256 and sc.duration <= 120
        assert sc.ksm.advisor_target_scan_time <= 5
    assert load("advisor-collapse").ksm.use_zero_pages == 0
    assert all(r.thp == "nohugepage" for p in load("advisor-healthy").process for r in p.region)


# ---- the model's decisions --------------------------------------------------------
def test_the_models_decisions_by_hand() -> None:
    """16 MiB of unique pages, target 2 s, ksmd's CPU before the run 178 s (as the
    6.18 record): every scan takes under 2 s (scan_time 1, factor 200)."""
    sim = Simulation(small(), "mainline", CostProfile(), ksmd_runtime0_ns=178 * 10**9)
    tr = sim.run()
    got = [(d["scan_time"], d["cpu_percent"], d["pages_to_scan"])
           for d in tr.meta["advisor"]["decisions"]]
    # 1: cpu 178 s over 1 s: 17800 %, cost 500 // 17800 -> 1; change ewma(0, 100) = 30:
    #    500 * 100 // 200 = 250, * 30 // 100 = 75, min(75, 1 * 70) = 70, max(70, 10) = 70
    # 2: change ewma(30, 100) = 51: 70 * 100 // 200 = 35 * 51 // 100 = 17; cost 70 // 1:
    #    max(17, 70 * 10) = 700
    # 3: change 65: 350 * 65 // 100 = 227; cost 700: max(227, 7000) capped at 2000
    assert got[:4] == [(1, 17800, 70), (1, 1, 700), (1, 1, 2000), (1, 1, 2000)]
    assert [d["full_scans"] for d in tr.meta["advisor"]["decisions"][:3]] == [1, 2, 3]
    # the next scan runs at the decision: 4096 pages in batches of 70 (the last one short)
    assert sim.at_scan_end[2][1] - sim.at_scan_end[1][1] == -(-4096 // 70)
    assert sim.at_scan_end[3][1] - sim.at_scan_end[2][1] == -(-4096 // 700)
    # a pure model run: ksmd's CPU starts at 0, cost 500 // 1: the 10 % floor, capped
    tr0 = simulate(small(), "mainline", engine="exact")
    assert tr0.meta["advisor"]["decisions"][0]["pages_to_scan"] == 2000
    assert tr0.meta["advisor"]["runtime0_ns"] == 0


def test_the_advisor_off_records_nothing() -> None:
    tr = simulate(load("seed-uzp1").with_duration(1.0), "mainline", engine="exact")
    assert "advisor" not in tr.meta


def test_replayed_decisions_set_pages_to_scan_and_the_models_own_are_kept() -> None:
    sim = Simulation(small(), "mainline", CostProfile(), advisor=[100, 300],
                     ksmd_runtime0_ns=178 * 10**9)
    ds = sim.run().meta["advisor"]["decisions"]
    assert [d["pages_to_scan"] for d in ds[:3]] == [100, 300, 2000]
    assert [d["predicted"] for d in ds[:2]] == [70, 1000]  # 100 // 1 * 10: the floor
    assert sim.at_scan_end[2][1] - sim.at_scan_end[1][1] == -(-4096 // 100)
    assert sim.at_scan_end[3][1] - sim.at_scan_end[2][1] == -(-4096 // 300)
    assert sim.advisor.record() is not None and sim.advisor.record()["replayed"] == 2  # type: ignore[index]
    assert any("the kernel made 2 decisions" in n for n in sim.notes)


@pytest.mark.parametrize("name", ["advisor-healthy", "advisor-collapse"])
def test_both_engines_decide_alike_with_and_without_replay(name: str) -> None:
    from .test_model_fast import assert_same

    sc = load(name).with_duration(15.0)
    for rep in ({}, {"advisor": [700, 1400, 2000], "ksmd_runtime0_ns": 178 * 10**9}):
        exact = simulate(sc, "mainline", engine="exact", **rep)  # type: ignore[arg-type]
        fast = simulate(sc, "mainline", engine="fast", **rep)  # type: ignore[arg-type]
        assert_same(exact, fast)
        assert len(exact.meta["advisor"]["decisions"]) > 4


# ---- validate: replay and the arithmetic check ----------------------------------------
def _kernel_like(decisions: list[dict[str, Any]]) -> Any:
    """A model trace dressed as a live one: meta["advisor"] as the lab records it."""
    tr = simulate(small(), "mainline", engine="exact", ksmd_runtime0_ns=178 * 10**9)
    tr.meta["source"] = "live"
    tr.meta["baseline"]["ksmd_cpu_ns"] = 178 * 10**9
    tr.meta["advisor"] = {"mode": "scan-time", "recorded": True, "knobs": {},
                          "pages_to_scan_at_switch": 500, "decisions": decisions}
    return tr


def test_validate_replays_the_kernels_decisions_and_checks_the_arithmetic() -> None:
    record = json.loads(DATA.read_text())
    kernel = [dict(d, t=0.5 * i) for i, d in enumerate(record["decisions"])]
    ref = _kernel_like(kernel)
    ref.meta["scenario"]["ksm"].update(advisor_target_scan_time=3,  # as recorded
                                       advisor_max_pages_to_scan=30000)
    rep = fidelity.replay(ref)
    assert rep["advisor"] == [d["pages_to_scan"] for d in kernel]
    assert rep["ksmd_runtime0_ns"] == 178 * 10**9
    cand = simulate(small(), "mainline", **rep)
    fit = fidelity.advisor_fit(ref, cand)
    assert fit is not None
    assert fit["arithmetic_equal"] == fit["decisions"] == len(kernel)
    assert fit["replayed"] == min(len(kernel), fit["model_decisions"])
    r = fidelity.compare("adv", ref, cand)
    assert r.advisor_ok() and "decisions equal" in (fidelity.advisor_text(r) or "")
    # one decision the arithmetic does not give fails validate
    kernel[3]["pages_to_scan"] += 1
    worse = _kernel_like(kernel)
    worse.meta["scenario"] = ref.meta["scenario"]
    bad = fidelity.compare("adv", worse, cand)
    assert bad.advisor is not None and bad.advisor["first_unequal"] == 3
    assert not bad.advisor_ok() and not bad.ok()
    # nothing recorded (no ksm_advisor tracepoint): no replay, no pass
    none = _kernel_like([])
    none.meta["advisor"]["recorded"] = False
    assert not fidelity.compare("adv", none, cand).advisor_ok()


def test_check_decisions_follows_set_events_of_the_limits() -> None:
    d = [{"scan_time": 1, "cpu_percent": 1, "pages_to_scan": 2000}] * 2
    k1, k2 = AdvisorKnobs(max_pages_to_scan=2000), AdvisorKnobs(max_pages_to_scan=900)
    assert advisor.check_decisions(d, 500, [k1, k2]) == [2000, 900]


def test_verdict_budget_is_the_advisors_mean() -> None:
    tr = _kernel_like([{"t": 1.0, "scan_time": 1, "cpu_percent": 1, "pages_to_scan": 1500}])
    end = float(tr.t[-1])
    want = (500 * 1.0 + 1500 * (end - 1.0)) / end
    assert mean_pages_to_scan(tr, Scenario.model_validate(tr.meta["scenario"])) == \
        pytest.approx(want)
