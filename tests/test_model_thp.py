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
