"""ksmd's CPU in the model: each price is charged where the kernel pays it.

With every price zero but one, ksmd's CPU is that price times a count the
kernel also reports, in both engines."""

from __future__ import annotations

from dataclasses import fields

import pytest

from ksmlab.model import simulate
from ksmlab.model.costs import CostProfile
from ksmlab.scenario import Scenario
from ksmlab.trace import Trace

ENGINES = ("exact", "fast")


def only(**prices: float) -> CostProfile:
    """A profile charging nothing but ``prices`` (wall-time fields kept)."""
    keep = {"sleep_slack_ns", "tick_ns", "cold_window_ns"}
    zero = {f.name: 0.0 for f in fields(CostProfile) if f.name not in keep}
    return CostProfile(**{**zero, **prices})


def scenario(content: dict[str, float], *, size_mib: int = 4, pages_to_scan: int = 100,
             smart_scan: int = 1, max_page_sharing: int = 256, pool: int = 2) -> Scenario:
    return Scenario.model_validate({
        "name": "costs", "duration": 3.0, "duplicate_pool": pool,
        "ksm": {"pages_to_scan": pages_to_scan, "smart_scan": smart_scan,
                "max_page_sharing": max_page_sharing},
        "process": [{"region": [{"size_mib": size_mib, "thp": "nohugepage", "seed": 3,
                                 "content": content}]}],
    })


def last(tr: Trace, col: str) -> float:
    return float(tr.columns[col][-1])


@pytest.mark.parametrize("engine", ENGINES)
def test_smart_scan_skips_are_charged_per_page_skipped(engine: str) -> None:
    # should_skip_rmap_item() pages cost CPU but count in neither pages_scanned
    # nor the batch's pages_to_scan (uzp0-1000: 30208 skips in 3-4 ms of ksmd)
    sc = scenario({"zero": 0.0, "duplicate": 0.0})
    tr = simulate(sc, "mainline", profile=only(smart_skip_ns=100.0), engine=engine)
    assert last(tr, "pages_skipped") > 0
    assert last(tr, "ksmd_cpu_ns") == pytest.approx(100.0 * last(tr, "pages_skipped"))
    off = scenario({"zero": 0.0, "duplicate": 0.0}, smart_scan=0)
    tr = simulate(off, "mainline", profile=only(smart_skip_ns=100.0), engine=engine)
    assert last(tr, "ksmd_cpu_ns") == 0.0


@pytest.mark.parametrize("engine", ENGINES)
def test_stable_chain_dups_are_charged_per_dup_walked(engine: str) -> None:
    # stable_node_dup() looks at dups until one has room: only chains have dups
    prof = only(dup_visit_ns=10.0)
    chains = simulate(scenario({"zero": 0.0, "duplicate": 1.0}, max_page_sharing=8),
                      "mainline", profile=prof, engine=engine)
    assert last(chains, "stable_node_dups") > 0
    # every dup created was walked past at least once by later merges
    assert last(chains, "ksmd_cpu_ns") >= 10.0 * last(chains, "stable_node_dups")
    # 512 pages of 4 contents: 128 sharers each, under max_page_sharing=256
    plain = simulate(scenario({"zero": 0.0, "duplicate": 1.0}, size_mib=2, pool=4), "mainline",
                     profile=prof, engine=engine)
    assert last(plain, "stable_node_dups") == 0
    assert last(plain, "ksmd_cpu_ns") == 0.0


@pytest.mark.parametrize("engine", ENGINES)
def test_cold_start_charges_the_first_window_of_each_batch(engine: str) -> None:
    # a batch of 100 visits (100 us of work) lies inside the 250 us window: all cold
    prof = only(visit_ns=1000.0, cold_start=0.5, cold_window_ns=250_000.0)
    tr = simulate(scenario({"zero": 0.0, "duplicate": 0.0}), "mainline", profile=prof,
                  engine=engine)
    assert last(tr, "ksmd_cpu_ns") == pytest.approx(1.5 * 1000.0 * last(tr, "pages_scanned"))
    # 1000 visits a batch: only the first 250 us of each batch run cold.  A full
    # scan of 4096 pages (smart scan off) ends a batch: 1000, 1000, 1000, 1000, 96
    big = scenario({"zero": 0.0, "duplicate": 0.0}, size_mib=16, pages_to_scan=1000,
                   smart_scan=0)
    tr = simulate(big, "mainline", profile=prof, engine=engine)
    scans = last(tr, "full_scans")
    per_scan = 4 * 0.5 * 250_000.0 + 0.5 * 96 * 1000.0
    extra = last(tr, "pages_scanned") - 4096 * scans  # a scan under way at the end
    assert 0 <= extra < 4096
    done = 4096 * scans * 1000.0 + scans * per_scan
    assert done + extra * 1000.0 <= last(tr, "ksmd_cpu_ns") <= done + extra * 1500.0
