"""THP split, the underused shrinker and khugepaged's re-collapse."""

from __future__ import annotations

from ksmlab.model.memory import PMD_THP, ZERO_PTE, Page
from ksmlab.model.thp import deferred_split_scan, split_folio
from tests.model_helpers import unique, world

THP = 512


def _half_zero() -> list[int]:
    return [0] * 256 + unique(256)


def test_split_remaps_zero_subpages_by_policy() -> None:
    for policy, freed in (("mainline", 256), ("pre-6.12", 0), ("rfc", 0)):
        w = world(_half_zero(), policy=policy)
        page = w.vma.pte[0]
        assert isinstance(page, Page) and page.folio is not None
        res = split_folio(w.sys, page.folio, "other")
        assert res.ok and res.remapped == freed, policy
        assert w.rss_pages == THP - freed
        assert w.sys.vmstat["thp_split_page"] == 1 and w.sys.nr_anon_thp == 0


def test_split_fails_with_extra_reference() -> None:
    w = world(_half_zero())
    page = w.vma.pte[0]
    assert isinstance(page, Page) and page.folio is not None
    assert not split_folio(w.sys, page.folio, "ksm", extra_refs=1).ok
    assert w.sys.vmstat["thp_split_page_failed"] == 1 and w.sys.nr_anon_thp == 1


def test_underused_shrinker_inert_at_511() -> None:
    w = world([0] * THP)
    assert len(w.sys.deferred) == 1  # queued at fault time (shrink_underused=1)
    assert deferred_split_scan(w.sys) == 0
    assert w.rss_pages == THP and not w.sys.deferred  # "considered used", dropped


def test_underused_shrinker_splits_at_409() -> None:
    ids = [0] * 461 + unique(51)  # 90 % zero
    w = world(ids, max_ptes_none=409)
    assert deferred_split_scan(w.sys) == 1
    assert w.sys.vmstat["thp_underused_split_page"] == 1
    assert w.rss_pages == 51


def test_no_queueing_without_shrink_underused() -> None:
    w = world([0] * THP, max_ptes_none=409, shrink_underused=0)
    assert not w.sys.deferred and deferred_split_scan(w.sys) == 0


def test_khugepaged_recollapses_what_ksm_split() -> None:
    # use_zero_pages=1: scan 2 splits the THP on its first zero subpage and the
    # remap frees the 256 zero subpages.  khugepaged (max_ptes_none=511): 256
    # none/zero PTEs, 256 writable pages -> collapse, RSS back to 512.  The
    # zero subpage that triggered the split kept its rmap item (the cursor
    # never walked over its address while it was a zero PTE: it was the item
    # being processed), with the zero checksum, so scan 3 splits again at once.
    w = world(_half_zero(), use_zero_pages=1)
    w.full_scan()
    w.full_scan()
    assert w.sys.vmstat["thp_split_page"] == 1 and w.rss_pages == 256
    w.khugepaged.do_scan()
    assert w.khugepaged.pages_collapsed == 1
    assert w.sys.vmstat["thp_collapse_alloc"] == 1
    assert w.rss_pages == THP and w.vma.pmd[0] == PMD_THP
    assert w.khugepaged.full_scans == 1  # one mm of one PMD: the list wrapped
    w.full_scan()
    assert w.sys.vmstat["thp_split_page"] == 2 and w.rss_pages == 256


def test_khugepaged_respects_max_ptes_none_and_writable() -> None:
    w = world(_half_zero(), use_zero_pages=1, max_ptes_none=255)
    w.full_scan()
    w.full_scan()
    w.khugepaged.do_scan()
    assert w.khugepaged.pages_collapsed == 0  # 256 > 255 none/zero PTEs
    w2 = world([0] * THP, use_zero_pages=1)
    w2.full_scan()
    w2.full_scan()
    assert all(p is ZERO_PTE for p in w2.vma.pte)
    w2.khugepaged.do_scan()
    assert w2.khugepaged.pages_collapsed == 0  # no writable PTE (SCAN_PAGE_RO)


def test_khugepaged_pass_covers_eight_pmds() -> None:
    w = world(_half_zero() * 20, use_zero_pages=1)
    w.full_scan()
    w.full_scan()
    assert w.sys.vmstat["thp_split_page"] == 20
    w.khugepaged.do_scan()  # 1 + 8 x 512 >= 4096
    assert w.khugepaged.pages_collapsed == 8
    w.khugepaged.do_scan()
    assert w.khugepaged.pages_collapsed == 16


def test_a_thp_someone_else_holds_is_not_split_and_leaves_the_queue() -> None:
    """deferred_split_scan(): a failed split of an underused THP drops it from the
    queue for good (6.12-6.18); a replay says which THPs the kernel could not split."""
    ids = ([0] * 461 + unique(51)) * 2
    w = world(ids, max_ptes_none=409)
    first = w.vma.pte[0]
    assert isinstance(first, Page) and first.folio is not None
    held = first.folio
    assert deferred_split_scan(w.sys, lambda f: f is held, failed_counted=1) == 1
    assert w.sys.vmstat["thp_underused_split_page"] == 1
    assert w.sys.vmstat["thp_split_page_failed"] == 1
    assert held.alive and held.pmd_mapped and not held.queued and not w.sys.deferred
    # a lost folio_trylock() counts no failure
    w = world(ids, max_ptes_none=409)
    assert deferred_split_scan(w.sys, lambda f: f.index == 0, failed_counted=0) == 1
    assert w.sys.vmstat["thp_split_page_failed"] == 0


# ---- multi-size THP (hugepages-<N>kB, Linux 6.8) -------------------------------------

ONLY_64K = {"64kB": "madvise", "2048kB": "never"}


def test_a_fault_takes_the_highest_allowed_order() -> None:
    """alloc_anon_folio(): 64 KiB folios where only 64 KiB is allowed, PTE-mapped,
    counted per size and not in thp_fault_alloc, never on the underused queue."""
    w = world([0] * THP, hugepages=ONLY_64K)
    pages = w.vma.pte[:THP]
    assert all(isinstance(p, Page) and p.folio is not None for p in pages)
    folios = {id(p.folio) for p in pages if isinstance(p, Page)}
    assert len(folios) == THP // 16 and w.vma.pmd[0] != PMD_THP
    assert w.sys.mthp["hugepages-64kB/anon_fault_alloc"] == THP // 16
    assert w.sys.vmstat["thp_fault_alloc"] == 0 and not w.sys.deferred
    assert w.rss_pages == THP


def test_a_multi_size_split_remaps_and_counts_per_size() -> None:
    w = world([0] * 8 + unique(8) + unique(THP - 16), hugepages=ONLY_64K)
    page = w.vma.pte[0]
    assert isinstance(page, Page) and page.folio is not None and page.folio.order == 4
    res = split_folio(w.sys, page.folio, "ksm")
    assert res.ok and res.remapped == 8 and w.rss_pages == THP - 8
    m = w.sys.mthp
    assert (m["hugepages-64kB/split"], m["hugepages-64kB/split_deferred"],
            m["hugepages-64kB/nr_anon"]) == (1, 1, THP // 16 - 1)
    assert w.sys.vmstat["thp_split_page"] == 0 and w.sys.vmstat["thp_split_pmd"] == 0
    other = w.vma.pte[16]
    assert isinstance(other, Page) and other.folio is not None
    assert not split_folio(w.sys, other.folio, "ksm", extra_refs=1).ok
    assert m["hugepages-64kB/split_failed"] == 1 and w.sys.vmstat["thp_split_page_failed"] == 0


def test_a_collapse_frees_the_multi_size_thps_of_its_range() -> None:
    """khugepaged copies a range of 64 KiB folios into a PMD THP; the old folios are
    freed and free_pages_prepare() counts hugepages-64kB/nr_anon down (the per-size
    split counters do not move: nothing was split)."""
    w = world(unique(THP), hugepages=ONLY_64K)
    m = w.sys.mthp
    assert m["hugepages-64kB/nr_anon"] == THP // 16
    old = w.vma.pte[0]
    assert isinstance(old, Page) and old.folio is not None
    # PMD THPs allowed again (hugepages-2048kB back to "inherit", enabled=madvise)
    w.sys.thp = w.sys.thp.model_copy(update={"hugepages": {"64kB": "madvise"}})
    w.khugepaged.do_scan()
    assert w.khugepaged.pages_collapsed == 1 and w.vma.pmd[0] == PMD_THP
    assert m["hugepages-64kB/nr_anon"] == 0 and not old.folio.alive
    assert m["hugepages-64kB/split"] == 0 and m["hugepages-64kB/anon_fault_alloc"] == THP // 16
    assert w.rss_pages == THP and w.sys.nr_anon_thp == 1


def test_a_split_charges_a_pte_remap_per_page_of_the_folio() -> None:
    """remap_page() restores each PTE of the folio: 16 for a 64 KiB folio, 512 for a
    PMD THP (remap_pte_ns is per PTE)."""
    for hugepages, per_split in ((ONLY_64K, 16), (None, THP)):
        w = world([0] * THP, use_zero_pages=1, hugepages=hugepages)
        w.full_scan()
        w.full_scan()  # each merge attempt on a zero page splits its folio first
        splits = w.sys.mthp.get("hugepages-64kB/split", w.sys.vmstat["thp_split_page"])
        assert splits > 0
        assert w.ksm.cpu.counts["remap_pte_ns"] == splits * per_split


def test_fault_order_follows_the_size_modes() -> None:
    from ksmlab.scenario import ThpKnobs

    mixed = ThpKnobs(enabled="madvise", hugepages={"64kB": "always"})
    assert mixed.fault_order("hugepage") == 9  # PMD first where MADV_HUGEPAGE asks
    assert mixed.fault_order("default") == 4  # 64 KiB "always" elsewhere
    assert mixed.fault_order("nohugepage") == 0
    assert ThpKnobs(enabled="madvise").fault_order("default") == 0
    inherit = ThpKnobs(enabled="always", hugepages={"2048kB": "never", "16kB": "inherit"})
    assert inherit.fault_order("default") == 2  # "inherit" follows enabled=always


def test_multi_size_scenarios_run_on_the_fast_engine() -> None:
    from ksmlab.model import simulate
    from ksmlab.model.fast import unsupported
    from ksmlab.scenario import load

    sc = load("mthp-64k-uzp1").with_duration(6.0)
    assert unsupported(sc) is None
    tr = simulate(sc, "mainline")
    assert tr.meta["engine"] == "fast"  # the same trace as the exact one (test_model_fast)
    # the second full scan's 1024 merge attempts each split a 64 KiB folio, whose 16
    # zero subpages (the attempted page too) the split remaps: all 64 MiB, no KSM page
    assert tr.since_start("hugepages-64kB/split")[-1] == 1024
    assert tr.since_start("thp_split_page")[-1] == 0
    assert tr["RssAnon"][-1] < 4096 and tr["pages_sharing"][-1] == 0
    assert tr["ksm_zero_pages"][-1] == 0
