"""Differential tests: the fast engine gives the exact model's trace, column by
column and sample by sample, on random small scenarios under every policy, with
random cost profiles, and replaying random pins (a kernel run's replay: events at
given full scans, khugepaged's set-up passes, THPs the shrinker kept), with the same
cost counts at every full-scan end (what calibration fits), and the same KSM event
stream (``kernel_events``: the same list of dicts), drawn on or off.

Beside the fixed (derandomized) examples, one test draws new ones each run from the
seed printed in pytest's header; ``KSMLAB_FAST_SEED=N`` replays a run's examples."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from ksmlab import fidelity
from ksmlab.model import POLICIES, ModelUnsupported, simulate
from ksmlab.model.costs import COST_FIELDS, CostProfile
from ksmlab.model.fast import FastSimulation, unsupported
from ksmlab.model.run import Simulation, run_model
from ksmlab.scenario import Scenario, builtin_names, load
from ksmlab.trace import COLUMNS, MTHP_STATS, Trace

EXAMPLES = int(os.environ.get("KSMLAB_FAST_EXAMPLES", "1000"))
# replays and random profiles: fewer (each runs both engines on a pinned timeline)
REPLAY_EXAMPLES = int(os.environ.get("KSMLAB_FAST_REPLAY_EXAMPLES", "300"))
# new examples each run (conftest.py chose the seed and printed it)
RUN_SEED = int(os.environ["KSMLAB_FAST_SEED"])
RUN_EXAMPLES = int(os.environ.get("KSMLAB_FAST_RUN_EXAMPLES", "100"))


def assert_same(a: Trace, b: Trace) -> None:
    extra = [c for c in a.columns if c not in COLUMNS]  # per-size counters (mTHP)
    assert extra == [c for c in b.columns if c not in COLUMNS]
    for c in (*COLUMNS, *extra):
        x, y = np.asarray(a[c]), np.asarray(b[c])
        assert x.shape == y.shape, f"{c}: {x.shape} samples vs {y.shape}"
        bad = np.flatnonzero(x != y)
        assert bad.size == 0, f"{c} differs first at sample {bad[0]}: {x[bad[0]]} vs {y[bad[0]]}"
    assert a.events == b.events
    assert_same_stream(a, b)
    which = ("engine", "engine_why")  # the one thing that may differ: who ran it
    assert {k: v for k, v in a.meta.items() if k not in which} == {
        k: v for k, v in b.meta.items() if k not in which}


def assert_same_stream(a: Trace, b: Trace) -> None:
    """KSM's event streams (or both None): the same dicts, in the same order."""
    ea, eb = a.kernel_events, b.kernel_events
    assert (ea is None) == (eb is None)
    if ea is None or eb is None:
        return
    x, y = ea["events"], eb["events"]
    k = next((k for k, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), None)
    assert k is None, f"KSM event {k} differs: {x[k]} vs {y[k]} (after {x[max(0, k - 2):k]})"
    assert len(x) == len(y), f"{len(x)} KSM events vs {len(y)}"
    assert ea == eb


mixes = st.lists(
    st.tuples(st.sampled_from([0.0, 0.02, 0.3, 0.5, 0.98, 1.0]),
              st.sampled_from([0.0, 0.1, 0.25, 0.5]),
              st.sampled_from([1.0, 3.0])),
    min_size=1, max_size=3,
).map(lambda ms: [{"zero": z, "duplicate": min(d, 1.0 - z), "weight": w} for z, d, w in ms])

regions = st.fixed_dictionaries({
    "size_mib": st.sampled_from([2, 2, 2, 4]),
    "thp": st.sampled_from(["hugepage", "nohugepage", "default"]),
    "mergeable": st.sampled_from([True, True, True, True, False]),
    "content": mixes,
    "seed": st.integers(0, 3),
    "volatile_pages_per_s": st.sampled_from([0.0, 0.0, 0.0, 150.0]),
    "volatile_pages_per_scan": st.sampled_from([0, 0, 0, 1, 40]),
})

processes = st.lists(st.fixed_dictionaries({
    "count": st.sampled_from([1, 1, 2]),
    "merge": st.sampled_from(["madvise", "madvise", "madvise", "prctl", "prctl", "none"]),
    "region": st.lists(regions, min_size=1, max_size=2),
}), min_size=1, max_size=2)

# multi-size THP: hugepages-<size>/enabled for a few sizes (PMD's among them), or none
hugepages = st.one_of(
    st.just({}),
    st.dictionaries(st.sampled_from(["16kB", "32kB", "64kB", "512kB", "1024kB", "2048kB"]),
                    st.sampled_from(["always", "inherit", "madvise", "never"]), max_size=3),
)

SET_KNOBS: dict[str, Any] = {
    "ksm.pages_to_scan": st.sampled_from([1, 20, 100]),
    "ksm.sleep_millisecs": st.sampled_from([1, 5, 20]),
    "ksm.use_zero_pages": st.sampled_from([0, 1]),
    "ksm.smart_scan": st.sampled_from([0, 1]),
    "ksm.max_page_sharing": st.sampled_from([2, 3, 256]),
    "thp.shrink_underused": st.sampled_from([0, 1]),
    "thp.enabled": st.sampled_from(["always", "madvise", "never"]),
    "thp.khugepaged.max_ptes_none": st.sampled_from([0, 256, 511]),
    "thp.khugepaged.pages_to_scan": st.sampled_from([512, 4096]),
    "ksm.advisor_max_cpu": st.sampled_from([1, 10, 70]),
    "ksm.advisor_max_pages_to_scan": st.sampled_from([30, 400, 30000]),
    "ksm.advisor_target_scan_time": st.sampled_from([1, 2, 200]),
}
# the scan-time advisor's knobs (a scenario with it on has no pages_to_scan of its own)
ADVISOR_KNOBS: dict[str, Any] = {
    "advisor_min_pages_to_scan": st.sampled_from([1, 16, 200, 500]),
    "advisor_max_cpu": st.sampled_from([1, 10, 70, 100]),
    "advisor_max_pages_to_scan": st.sampled_from([30, 400, 30000]),
    "advisor_target_scan_time": st.sampled_from([1, 2, 200]),
}


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    duration = draw(st.sampled_from([0.3, 0.6, 1.0]))
    procs = draw(processes)
    fill_at = draw(st.sampled_from([None, None, None, 0.2]))
    align = draw(st.sampled_from([True, True, False]))
    if fill_at is not None:  # the exact model cannot run these (see unsupported())
        for p in procs:
            for r in p["region"]:
                r["volatile_pages_per_scan"] = 0
                if align:
                    r["volatile_pages_per_s"] = 0.0
    advisor = draw(st.sampled_from(["none", "none", "scan-time"]))
    n_ev = draw(st.integers(0, 4))
    events: list[dict[str, Any]] = []
    for _ in range(n_ev):
        at = draw(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.8, 1.2])) * duration
        kind = draw(st.sampled_from(["ksm_start", "ksm_start", "ksm_stop", "ksm_unmerge", "write",
                                     "write", "pressure", "pressure", "set", "set", "set",
                                     "khugepaged"]))
        ev: dict[str, Any] = {"action": kind, "at": min(at, duration)}
        if kind == "write":
            p = draw(st.integers(0, len(procs) - 1))
            ev.update(process=p, region=draw(st.integers(0, len(procs[p]["region"]) - 1)),
                      fraction=draw(st.sampled_from([0.01, 0.2, 1.0])),
                      content=draw(st.sampled_from(["zero", "unique"])),
                      seed=draw(st.integers(0, 3)))
            if fill_at is not None:
                ev["at"] = max(ev["at"], fill_at)
        elif kind == "set":
            knob = draw(st.sampled_from(sorted(
                k for k in SET_KNOBS  # pages_to_scan_store(): EINVAL with the advisor on
                if not (advisor == "scan-time" and k == "ksm.pages_to_scan"))))
            ev.update(knob=knob, value=draw(SET_KNOBS[knob]))
        events.append(ev)
    ksm: dict[str, Any] = {
        "pages_to_scan": draw(st.sampled_from([1, 16, 64, 200, 400, 400])),
        "sleep_millisecs": draw(st.sampled_from([2, 5, 10, 20])),
        "use_zero_pages": draw(st.sampled_from([0, 1])),
        "smart_scan": draw(st.sampled_from([0, 1])),
        "max_page_sharing": draw(st.sampled_from([2, 3, 16, 256])),
        "stable_node_chains_prune_millisecs": draw(st.sampled_from([50, 2000])),
    }
    if advisor == "scan-time":
        del ksm["pages_to_scan"]
        ksm.update(advisor_mode=advisor, **{k: draw(v) for k, v in ADVISOR_KNOBS.items()})
    return {
        "name": "fuzz",
        "duration": duration,
        "sample_interval": draw(st.sampled_from([0.05, 0.1])),
        "ksm_start_at": draw(st.sampled_from([0.0, 0.0, 0.0, 0.1, 0.3, None])),
        "fill_at": fill_at,
        "duplicate_pool": draw(st.sampled_from([1, 7, 512])),
        "align_events": align,
        "drive_khugepaged": draw(st.sampled_from([True, True, False])),
        "ksm": ksm,
        "thp": {
            "enabled": draw(st.sampled_from(["always", "madvise", "madvise", "never"])),
            "hugepages": draw(hugepages),
            "shrink_underused": draw(st.sampled_from([0, 1])),
            "khugepaged": {
                "max_ptes_none": draw(st.sampled_from([0, 64, 511, 511])),
                "pages_to_scan": draw(st.sampled_from([512, 4096])),
                "scan_sleep_millisecs": draw(st.sampled_from([50, 200, 10000])),
            },
        },
        "process": procs,
        "event": events,
    }


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=scenarios(), policy=st.sampled_from(sorted(POLICIES)), events=st.booleans())
def test_fast_equals_exact_random(data: dict[str, Any], policy: str, events: bool) -> None:
    sc = Scenario.model_validate(data)
    assert unsupported(sc) is None
    exact = simulate(sc, policy, engine="exact", kernel_events=events)
    fast = simulate(sc, policy, engine="fast", kernel_events=events)
    assert_same(exact, fast)


FAST_BUILTINS = [n for n in builtin_names() if n != "host-1t"]
MTHP_BUILTINS = [n for n in builtin_names() if n.startswith("mthp-")]


def test_every_builtin_is_in_the_fast_engine() -> None:
    """Multi-size THP included (the mthp-* built-ins)."""
    assert MTHP_BUILTINS
    for n in builtin_names():
        assert unsupported(load(n)) is None, n


@pytest.mark.parametrize("name", FAST_BUILTINS)
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_fast_equals_exact_builtins(name: str, policy: str) -> None:
    """The trace and KSM's event stream; the fast engine's trace without the stream
    is the same (its recording changes nothing)."""
    sc = load(name).with_duration(8.0)
    exact = simulate(sc, policy, engine="exact", kernel_events=True)
    fast = simulate(sc, policy, engine="fast", kernel_events=True)
    assert exact.kernel_events is not None and exact.kernel_events["events"]
    assert_same(exact, fast)
    plain = simulate(sc, policy, engine="fast")
    assert plain.kernel_events is None
    fast.kernel_events = None
    assert_same(fast, plain)


def test_auto_is_fast_and_engine_checked() -> None:
    sc = load("seed-uzp1").with_duration(1.0)
    auto, exact = simulate(sc, "mainline"), simulate(sc, "mainline", engine="exact")
    assert_same(auto, exact)
    assert (auto.meta["engine"], exact.meta["engine"]) == ("fast", "exact")
    # KSM's event stream too: no reason left to run the exact engine for it
    streamed = simulate(sc, "mainline", kernel_events=True)
    assert streamed.meta["engine"] == "fast" and "engine_why" not in streamed.meta
    assert_same(streamed, simulate(sc, "mainline", engine="exact", kernel_events=True))
    with pytest.raises(ValueError, match="unknown engine"):
        simulate(sc, "mainline", engine="turbo")


def test_fallback_outside_the_fast_engine() -> None:
    sc = load("seed-uzp1").with_duration(1.0)
    big = Scenario.model_validate({**sc.model_dump(), "duplicate_pool": 1 << 20})
    assert unsupported(big) is not None
    with pytest.raises(ModelUnsupported, match="fast engine"):
        simulate(big, "mainline", engine="fast")
    assert_same(simulate(big, "mainline"), simulate(big, "mainline", engine="exact"))


# ---- random cost profiles and replays -------------------------------------------
PRICES = st.sampled_from([0.0, 0.5, 3.0, 77.7, 1000.0, 31_337.25])


@st.composite
def profiles(draw: st.DrawFn) -> CostProfile:
    """Any prices: both engines add the same floats in the same order."""
    d = {f: draw(PRICES) for f in COST_FIELDS}
    d["cold_start"] = draw(st.sampled_from([0.0, 0.35, 2.0]))
    d["cold_window_ns"] = draw(st.sampled_from([0.0, 1000.0, 250_000.0]))
    d["sleep_slack_ns"] = draw(st.sampled_from([0.0, 500_000.0, 3_999_999.0]))
    d["tick_ns"] = draw(st.sampled_from([1_000_000.0, 4_000_000.0, 10_000_000.0]))
    return CostProfile.from_dict(d)


@st.composite
def replays(draw: st.DrawFn, sc: Scenario) -> dict[str, Any]:
    """What fidelity.replay() takes from a kernel trace, made up: pins for some of the
    scenario's actions, khugepaged's set-up passes, the shrinker's record per pressure
    event (THPs kept by name: [instance, index of the THP's first page])."""
    # not the fill, nor a write after it: the kernel applied them in that order, and a
    # write before the fill has nothing to write to (pin 0: a scan end never seen)
    acts = (["ksm_start"] if sc.ksm_start_at is not None else []) + [
        e.action for e in sc.event if not (sc.fill_at is not None and e.action == "write")]
    pins = [(a, draw(st.integers(0, 4))) for a in acts if draw(st.booleans())]
    inst_pages = [p.pages for _pi, _k, p in sc.instances()]
    shrinker = []
    for e in sc.event:
        if e.action != "pressure":
            continue
        kept = {str(i): sorted(draw(st.sets(st.sampled_from(range(0, n, 512)), max_size=3)))
                for i, n in enumerate(inst_pages) if draw(st.booleans())}
        shrinker.append({"thps_kept": draw(st.sampled_from([None, kept])),
                         "vmstat": {"thp_split_page_failed": draw(st.integers(0, 2))}})
    # the kernel's advisor decisions (pages_to_scan, in order) and ksmd's CPU before
    advisor = draw(st.lists(st.sampled_from([1, 49, 500, 30000]), max_size=6)) \
        if sc.ksm.advisor_mode == "scan-time" else []
    return {"pins": pins, "shrinker": shrinker,
            "khugepaged_enter_passes": draw(st.sampled_from([None, 0, 1, 2])),
            "advisor": advisor,
            "ksmd_runtime0_ns": draw(st.sampled_from([0, 10**9, 178 * 10**9]))}


def assert_replay_same(data: dict[str, Any], policy: str, profile: CostProfile,
                       draw: st.DataObject) -> None:
    sc = Scenario.model_validate(data)
    assert unsupported(sc) is None
    rep = draw.draw(replays(sc))
    events = draw.draw(st.booleans())
    exact = Simulation(sc, policy, profile, rep["pins"], rep["khugepaged_enter_passes"],
                       shrinker=rep["shrinker"], advisor=rep["advisor"],
                       ksmd_runtime0_ns=rep["ksmd_runtime0_ns"], kernel_events=events)
    fast = FastSimulation(sc, policy, profile, pins=rep["pins"], shrinker=rep["shrinker"],
                          khugepaged_enter_passes=rep["khugepaged_enter_passes"],
                          advisor=rep["advisor"], ksmd_runtime0_ns=rep["ksmd_runtime0_ns"],
                          kernel_events=events)
    assert_same(exact.run(), fast.run())
    assert exact.at_scan_end == fast.at_scan_end  # cost counts and batches, exactly


def _replay_test(data: dict[str, Any], policy: str, profile: CostProfile,
                 draw: st.DataObject) -> None:
    assert_replay_same(data, policy, profile, draw)


# no shrinking: a failure is reported as drawn (shrinking one took minutes)
PHASES = (Phase.explicit, Phase.reuse, Phase.generate)
test_fast_equals_exact_replay = settings(
    max_examples=REPLAY_EXAMPLES, deadline=None, derandomize=True, phases=PHASES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(
    given(data=scenarios(), policy=st.sampled_from(sorted(POLICIES)), profile=profiles(),
          draw=st.data())(_replay_test))

# the same, on examples new each run (the seed is in pytest's header)
test_fast_equals_exact_replay_this_run = seed(RUN_SEED)(settings(
    max_examples=RUN_EXAMPLES, deadline=None, database=None, phases=PHASES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(
    given(data=scenarios(), policy=st.sampled_from(sorted(POLICIES)), profile=profiles(),
          draw=st.data())(_replay_test)))


@pytest.mark.parametrize("name", ["pressure-409", "volatile", "khugepaged-recollapse",
                                  *MTHP_BUILTINS])
def test_fast_equals_exact_replay_builtins(name: str) -> None:
    """Pinned events past the first full scans, a pressure event kept by the shrinker."""
    sc = load(name).with_duration(6.0)
    acts = [e.action for e in sc.event]
    pins = [(a, 2 + i) for i, a in enumerate(acts)]
    shrinker = [{"thps_kept": {"0": [0, 1024]}, "vmstat": {"thp_split_page_failed": 1}}
                for a in acts if a == "pressure"]
    exact = Simulation(sc, "mainline", CostProfile(), pins, 1, shrinker=shrinker,
                       kernel_events=True)
    fast = FastSimulation(sc, "mainline", CostProfile(), pins=pins, shrinker=shrinker,
                          khugepaged_enter_passes=1, kernel_events=True)
    assert_same(exact.run(), fast.run())
    assert exact.at_scan_end == fast.at_scan_end and exact.at_scan_end


MTHP_EVENTS: list[dict[str, Any]] = [
    {"action": "pressure", "at": 1.0},
    {"action": "write", "at": 1.5, "process": 0, "region": 0, "fraction": 0.3,
     "content": "unique", "seed": 1},
    {"action": "set", "at": 2.0, "knob": "thp.enabled", "value": "always"},  # PMD where
    {"action": "ksm_unmerge", "at": 4.0},  # "inherit": khugepaged collapses mTHP ranges
    {"action": "set", "at": 4.2, "knob": "ksm.use_zero_pages", "value": 1},
    {"action": "khugepaged", "at": 4.5},
    {"action": "ksm_start", "at": 5.0},
]


@pytest.mark.parametrize("name", MTHP_BUILTINS)
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_fast_equals_exact_replay_mthp(name: str, policy: str) -> None:
    """Multi-size THP under every policy with events (splits by the shrinker's pass, by
    writes, collapses of ranges of mTHPs), pinned at full scans, cost counts included."""
    sc = Scenario.model_validate({**load(name).model_dump(), "duration": 8.0,
                                  "align_events": False, "event": MTHP_EVENTS})
    # (the scenario's ksm_start_at is the first ksm_start a pin would name)
    pins = [(e["action"], 1 + i // 4) for i, e in enumerate(MTHP_EVENTS[:5]) if i % 2 == 0]
    exact = Simulation(sc, policy, CostProfile(), pins, 1)
    fast = FastSimulation(sc, policy, CostProfile(), pins=pins, khugepaged_enter_passes=1)
    assert_same(exact.run(), fast.run())
    assert exact.at_scan_end == fast.at_scan_end and exact.at_scan_end


def test_mthp_write_faults_as_the_exact_model() -> None:
    """A write fault on a none PTE takes the highest allowed order whose aligned range
    is all none (alloc_anon_folio()), else a smaller one, else a 4 KiB page: the same
    folios, counters and RSS on both engines (after the fill no PTE is none, so this
    is the fault path the scenarios never reach)."""
    from ksmlab.model.fast.state import ANON_RSS, NONE, OWN, mthp_g
    from ksmlab.model.memory import Thp
    from ksmlab.model.thp import write_fault

    sc = Scenario.model_validate({
        "name": "mthp-faults", "duration": 1.0, "fill_at": 0.5,
        "thp": {"enabled": "never", "hugepages": {"64kB": "always", "16kB": "always",
                                                  "32kB": "madvise"}},
        "process": [{"region": [{"size_mib": 2, "thp": "default", "seed": 1},
                                {"size_mib": 2, "thp": "hugepage", "seed": 1}]}]})
    exact = Simulation(sc, "mainline", CostProfile())
    fast = FastSimulation(sc, "mainline", CostProfile())
    # 4 KiB pages first (multi-size THP off), then faults beside them: the folios that
    # fit between them, the highest order first, and 4 KiB pages where none does
    first, then = [3, 50, 300], [5, 9, 16, 17, 40, 51, 0, 100, 101, 301, *range(256, 512)]
    thp = exact.sys.thp
    for phase, offsets in enumerate((first, then)):
        exact.sys.thp = thp if phase else thp.model_copy(update={"hugepages": {}})
        fast.thp = exact.sys.thp
        fast._params()
        for ri, reg in enumerate(exact.regions):
            for k, i in enumerate(offsets):
                write_fault(exact.sys, reg.vma, i, 1000 + k)
            _v, b = fast._region(0, 0, ri)
            fast._write(np.asarray(offsets, np.int64) + b,
                        np.asarray([1000 + k for k in range(len(offsets))], np.uint64))
    for ri, reg in enumerate(exact.regions):
        _v, b = fast._region(0, 0, ri)
        orders = [p.folio.order if p is not None and isinstance(p.folio, Thp) else 0
                  for p in reg.vma.pte]
        pte = fast.page.pte[b : b + reg.vma.npages].astype(np.int64)
        assert orders == np.where(pte <= OWN, OWN - pte, 0).tolist()  # OWN - order
        none = [p is None for p in reg.vma.pte]
        assert none == (fast.page.pte[b : b + reg.vma.npages] == NONE).tolist()
        cids = [0 if p is None else getattr(p, "cid", 0) for p in reg.vma.pte]
        assert cids == fast.page.scid[b : b + reg.vma.npages].tolist()
        assert 0 in orders[:512] and 2 in orders and max(orders) == 4
    assert sum(mm.anon_rss for mm in exact.sys.mms) == fast.glob[ANON_RSS]
    for key, n in exact.sys.mthp.items():
        size, stat = key.removeprefix("hugepages-").split("/")
        order = {"16kB": 2, "32kB": 3, "64kB": 4}[size]
        assert n == fast.glob[mthp_g(order, MTHP_STATS.index(stat))], key
    assert exact.sys.mthp["hugepages-64kB/anon_fault_alloc"] > 0
    assert exact.sys.mthp["hugepages-32kB/anon_fault_alloc"] > 0
    assert exact.sys.mthp["hugepages-16kB/anon_fault_alloc"] > 0


def test_replays_run_on_the_fast_engine() -> None:
    """`validate` and `calibrate` replay kernel runs: the fast engine takes them."""
    sc = load("seed-uzp0").with_duration(2.0)
    tr = simulate(sc, "mainline", pins=[("ksm_start", 1)], shrinker=[{}], engine="fast")
    assert tr.meta["source"] == "model"


REPLAYS = sorted((Path(__file__).parent / "data" / "replay").glob("*.kernel.trace.json.gz"))


@pytest.mark.parametrize("path", REPLAYS, ids=[p.name.split(".")[0] for p in REPLAYS])
def test_fast_equals_exact_on_recorded_replays(path: Path) -> None:
    """Kernel traces recorded by `ksmlab validate` (6.18, 2 CPUs): what validate and
    calibrate replay, the same on both engines (trace, events, KSM's event stream,
    cost counts); validate's choice (auto, with the stream) is the fast engine."""
    ref = Trace.load(path)
    sc = Scenario.model_validate(ref.meta["scenario"])
    pol = "mainline"  # recorded on 6.18, which remaps (b1f202060afe) as mainline does
    exact, te = run_model(sc, pol, engine="exact", kernel_events=True, **fidelity.replay(ref))
    fast, tf = run_model(sc, pol, kernel_events=True, **fidelity.replay(ref))
    assert tf.meta["engine"] == "fast"
    assert te.kernel_events is not None and te.kernel_events["events"]
    assert_same(te, tf)
    assert exact.at_scan_end == fast.at_scan_end and exact.at_scan_end


def test_the_globals_are_named_in_order() -> None:
    """Each int64 global's constant is its index in G_NAMES (the layout a reader reads)."""
    from ksmlab.model.fast import state

    fixed = [n for n in state.G_NAMES if not n.startswith("MTHP_") or "ORDERS" in n]
    assert [getattr(state, n) for n in fixed] == list(range(len(fixed)))
    # then the per-size stats by order: MTHP_<order>_<stat> at mthp_g(order, stat)
    assert len(fixed) == state.MTHP_G
    assert [state.G_NAMES[state.mthp_g(o, k)] for o in range(state.PMD_ORDER + 1)
            for k in range(state.N_MSTAT)] == [f"MTHP_{o}_{st}" for o in range(10)
                                               for st in MTHP_STATS]
    assert state.mthp_g(state.PMD_ORDER, state.N_MSTAT - 1) == state.N_G - 1
    assert MTHP_STATS[state.M_SPLIT_DEFERRED] == "split_deferred"
    assert [state.COST_FIELDS[getattr(state, c)] for c in ("C_VISIT", "C_COLD", "C_TICK")] == [
        "visit_ns", "cold_start", "tick_ns"]
    assert state.VMSTAT_G["thp_swpout_fallback"] == state.V_SWPOUT_FALLBACK
