"""The model's KSM event stream (model/ksm.py tracepoints) and its comparison with
another stream (events.compare, fidelity.streams)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ksmlab import events, fidelity
from ksmlab.model import simulate
from ksmlab.scenario import Scenario, load

SMALL = """
name = "two-small"
duration = 3.0
[ksm]
pages_to_scan = 100
use_zero_pages = {uzp}
[[process]]
count = 2
[[process.region]]
size_mib = 2
thp = "nohugepage"
seed = 5
content = {{ zero = {zero}, duplicate = 0.5 }}
"""


def small(uzp: int = 0, zero: float = 0.0) -> Scenario:
    import tomllib

    return Scenario.model_validate(tomllib.loads(SMALL.format(uzp=uzp, zero=zero)))


def test_stream_is_off_by_default_and_changes_nothing() -> None:
    sc = small()
    plain = simulate(sc, "mainline", engine="exact")
    traced = simulate(sc, "mainline", engine="exact", kernel_events=True)
    assert plain.kernel_events is None
    for c in plain.columns:
        assert np.array_equal(plain[c], traced[c], equal_nan=True), c
    ke = traced.kernel_events
    assert ke is not None and ke["source"] == "model" and ke["recorded"]


def test_merges_name_processes_pages_and_scans() -> None:
    tr = simulate(small(), "mainline", engine="exact", kernel_events=True)
    assert tr.kernel_events is not None
    evs = tr.kernel_events["events"]
    assert [e["proc"] for e in evs if e["event"] == "ksm_enter"] == [0, 1]  # scenario order
    starts = [e["seq"] for e in evs if e["event"] == "ksm_start_scan"]
    assert starts == list(range(len(starts)))
    ms = events.merges(evs)
    # no unmerging here: every successful merge into a KSM page is one pages_sharing
    assert len(ms) == tr["pages_sharing"][-1] > 0
    for m in ms:
        assert m.scan is not None and m.scan >= 1  # the first scan only takes checksums
        assert isinstance(m.page, list) and m.page[0] == m.proc
        assert isinstance(m.into, list) and 0 <= m.into[1] < 512
    # the first half of a two-page merge names the scanned page by its own pfn
    halves = [e for e in evs if e["event"] == "ksm_merge_with_ksm_page" and not e["ksm_page"]]
    assert halves and all(e["page"] == e["item"] for e in halves)


def test_zero_page_merges() -> None:
    tr = simulate(small(uzp=1, zero=0.5), "mainline", engine="exact", kernel_events=True)
    assert tr.kernel_events is not None
    zero = [m for m in events.merges(tr.kernel_events["events"]) if m.into == "zero"]
    assert len(zero) == tr["ksm_zero_pages"][-1] > 0


def test_a_stream_against_itself_and_against_what_the_kernel_can_name() -> None:
    tr = simulate(small(), "mainline", engine="exact", kernel_events=True)
    assert tr.kernel_events is not None
    evs = tr.kernel_events["events"]
    fit = events.compare(evs, evs)
    assert fit.identical_share == 1.0 and fit.first_divergence is None
    # the kernel knows no page of a stable-tree or tree-page merge: still identical
    blind = [{**e, "item": None} if e.get("ksm_page") else e for e in evs]
    fit = events.compare(blind, evs)
    assert fit.identical_share == 1.0 and fit.page_known_share == 0.0
    assert fit.merges_kernel == len(events.merges(evs)) > 0
    # one merge moved to the next scan: the divergence names it
    moved = list(evs)
    i = next(k for k, e in enumerate(moved) if e.get("ksm_page") and e["err"] == 0)
    moved[i] = {**moved[i], "scan": moved[i]["scan"] + 1}
    fit = events.compare(moved, evs)
    assert fit.identical_share < 1.0
    assert fit.first_divergence is not None
    assert fit.first_divergence["scan"] == evs[i]["scan"]


def test_fidelity_compares_streams_only_where_both_have_one() -> None:
    sc = small()
    a = simulate(sc, "mainline", engine="exact", kernel_events=True)
    b = simulate(sc, "mainline", engine="exact")
    assert fidelity.compare("x", a, b).events is None
    r = fidelity.compare("x", a, a)
    assert r.events is not None and r.events["identical_share"] == 1.0
    assert r.to_json()["events"]["merges_kernel"] == r.events["merges_model"]


def test_builtin_uzp1_attempts_fail_on_the_split() -> None:
    """seed-uzp1 on 6.12+: the split remaps the scanned zero page too, so the merge
    attempt fails (-EFAULT) and KSM's counters stay at 0 (the rate-limit bypass)."""
    tr = simulate(load("seed-uzp1"), "mainline", engine="exact", kernel_events=True)
    assert tr.kernel_events is not None
    tries = events.attempts(tr.kernel_events["events"])
    assert tries and all(err == -14 and m.into == "zero" for m, err in tries)
    assert events.merges(tr.kernel_events["events"]) == []


def _blind_run(sc: Scenario, per_scan: bool) -> tuple[list[dict[str, Any]], list[Any], Any]:
    """A model run seen as the live lab sees the kernel: pfns for pages, the item's page
    known only from the first half of a two-page merge, pagemap snapshots at time 0,
    at every full-scan end (``per_scan``) and at the end.  Returns (blind events,
    the true item of each merge event, windows for name_by_snapshots)."""
    from ksmlab.model.costs import DEFAULT_PROFILE
    from ksmlab.model.memory import KSM_ZERO_PTE, Page
    from ksmlab.model.run import Simulation

    sim = Simulation(sc, "mainline", DEFAULT_PROFILE, kernel_events=True)
    keep: dict[int, tuple[object, int]] = {}  # id(page) -> (page, pfn): ids never reused

    def pfn(pte: object) -> int:
        if pte is KSM_ZERO_PTE:
            return 1
        if isinstance(pte, Page):
            return keep.setdefault(id(pte), (pte, 100 + len(keep)))[1]
        return 0

    def snap() -> dict[int, list[tuple[int, int]]]:
        rows: dict[int, list[tuple[int, int, int]]] = {}
        for reg in sim.regions:
            inst, first = sim.ksm.vma_base[reg.vma]
            for i, pte in enumerate(reg.vma.pte):
                rows.setdefault(inst, []).append((reg.vma.start + i, first + i, pfn(pte)))
        # address order, as the live lab's snapshots (later regions lie lower)
        return {inst: [(idx, f) for _, idx, f in sorted(r)] for inst, r in rows.items()}

    base = snap()
    by_name = {tuple(v): k for k, v in sim.ksm.pages.items()}
    target_pfn = {k: pfn(page) for k, page in by_name.items()}
    windows: list[Any] = []
    last = [base]
    real_event = sim.ksm._event

    def event(name: str, **fields: Any) -> None:
        real_event(name, **fields)
        if name == "ksm_stop_scan" and per_scan:
            now = snap()
            windows.append((fields["seq"] + 1, events.changes(last[0], now)))
            last[0] = now

    sim.ksm._event = event  # type: ignore[method-assign]
    tr = sim.run()
    windows.append((None, events.changes(last[0], snap())))
    assert tr.kernel_events is not None
    truth, blind = [], []
    for e in tr.kernel_events["events"]:
        if e["event"] in ("ksm_merge_one_page", "ksm_merge_with_ksm_page"):
            target = e["page"]
            f = 1 if target == "zero" else (target_pfn.get(tuple(target), 0) if target else 0)
            known = e["event"] == "ksm_merge_with_ksm_page" and not e["ksm_page"]
            truth.append(e["item"])
            e = {**e, "pfn": f, "item": e["item"] if known else None}
        blind.append(e)
    return blind, truth, windows


@pytest.mark.parametrize("per_scan", [True, False])
def test_pages_named_from_pagemap_snapshots_are_right(per_scan: bool) -> None:
    """name_by_snapshots() on a model run made blind like the kernel: every page it
    names is the page the model merged, and with a snapshot at every full-scan end it
    names nearly all of them (one at the end alone: those whose merges fell in one scan)."""
    for sc in (small(), small(uzp=1, zero=0.5), load("volatile")):
        blind, truth, windows = _blind_run(sc, per_scan)
        named = events.name_by_snapshots(blind, windows)
        assert named == sum(1 for e in blind if e.get("item_from") == "pagemap")
        k = 0
        for e in blind:
            if e["event"] in ("ksm_merge_one_page", "ksm_merge_with_ksm_page"):
                if e.get("item_from") == "pagemap":
                    assert e["item"] == truth[k]
                k += 1
        total = len(events.merges(blind))
        if per_scan:
            assert named >= 0.9 * total, (sc.name, named, total)
