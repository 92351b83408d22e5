"""THP: write faults, split_huge_page() with the zero remap, deferred split
queue and the underused shrinker (mm/huge_memory.c, mm/migrate.c)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .. import image as img
from ..scenario import HPAGE_PMD_NR, PMD_ORDER
from . import rules
from .memory import (
    KSM_ZERO_PTE,
    PMD_NONE,
    PMD_TABLE,
    PMD_THP,
    ZERO_PTE,
    Page,
    System,
    Thp,
    Vma,
    ZeroPte,
    put_mapping,
)
from .policies import Caller, Remap, remap_on_split


def write_fault(sys: System, vma: Vma, i: int, cid: int) -> None:
    """The workload writes page ``i`` of ``vma`` with content ``cid``."""
    mm = vma.mm
    pte = vma.pte[i]
    if pte is None:
        vma.anon_vma = True  # anon_vma_prepare()
        j = i // HPAGE_PMD_NR
        if vma.pmd[j] == PMD_NONE and sys.thp_allowed(vma):
            # do_huge_pmd_anonymous_page(): a write fault allocates a zeroed THP
            base = j * HPAGE_PMD_NR
            folio = Thp(vma, base, [])
            folio.pages = [Page(0, folio) for _ in range(HPAGE_PMD_NR)]
            vma.pte[base : base + HPAGE_PMD_NR] = folio.pages
            vma.pmd[j] = PMD_THP
            mm.anon_rss += HPAGE_PMD_NR
            sys.vmstat["thp_fault_alloc"] += 1
            sys.nr_anon_thp += 1
            mm.khugepaged = True  # khugepaged_enter_vma()
            deferred_split_folio(sys, folio, partially_mapped=False)
            folio.pages[i - base].cid = cid
            return
        if vma.pmd[j] == PMD_NONE:
            vma.pmd[j] = PMD_TABLE
        # do_anonymous_page(): alloc_anon_folio() takes the highest allowed order whose
        # aligned range lies in the VMA with every PTE none
        for order in sys.mthp_orders(vma):
            nr = 1 << order
            base = i - i % nr
            if base >= vma.lo and base + nr <= vma.hi and all(
                    p is None for p in vma.pte[base : base + nr]):
                folio = _mthp_fault(sys, vma, base, order)
                folio.pages[i - base].cid = cid
                return
        vma.pte[i] = Page(cid)
        mm.anon_rss += 1
        return
    if isinstance(pte, ZeroPte):
        # wp_page_copy() from the zero page
        if pte.ksm:
            sys.zap_ksm_zero(mm)
        vma.pte[i] = Page(cid)
        mm.anon_rss += 1
        return
    if pte.ksm:
        # do_wp_page() on a KSM page: always copied (MM_ANONPAGES unchanged)
        vma.pte[i] = Page(cid)
        put_mapping(pte)
        return
    pte.cid = cid  # writable private page (or THP subpage): written in place


def _mthp_fault(sys: System, vma: Vma, base: int, order: int) -> Thp:
    """A zeroed multi-size THP mapped by PTEs (do_anonymous_page() with order > 0):
    counted per size, not in thp_fault_alloc, and not queued for the underused
    shrinker (only do_huge_pmd_anonymous_page() queues at fault)."""
    nr = 1 << order
    folio = Thp(vma, base, [], order)
    folio.pages = [Page(0, folio) for _ in range(nr)]
    vma.pte[base : base + nr] = folio.pages
    vma.mm.anon_rss += nr
    sys.count_mthp(order, "anon_fault_alloc")
    sys.count_mthp(order, "nr_anon")
    return folio


def deferred_split_folio(sys: System, folio: Thp, partially_mapped: bool) -> None:
    # deferred_split_folio(): fully-mapped THPs are queued only for the
    # underused shrinker (shrink_underused=1)
    if not partially_mapped and not (sys.thp.shrink_underused and sys.policy.underused_shrinker):
        return
    if partially_mapped and not folio.partially_mapped:
        folio.partially_mapped = True
        sys.vmstat["thp_deferred_split_page"] += 1
    if not folio.queued:
        folio.queued = True
        sys.deferred[folio] = None


@dataclass
class SplitResult:
    ok: bool
    zero_tested: int = 0  # subpages found all-zero by the remap's test
    data_tested: int = 0  # subpages whose test stopped early
    remapped: int = 0  # subpages remapped to the zero page (and freed)
    ksm_remapped: int = 0  # ... of which KSM-marked (Remap.KSM_ACCOUNTED)


def split_folio(
    sys: System,
    folio: Thp,
    caller: Caller,
    extra_refs: int = 0,
    keep: Page | None = None,
    budget: int = 0,
) -> SplitResult:
    """split_huge_page(): uniform split of a PMD-mapped anon THP to order 0.

    ``extra_refs`` are references beyond the caller's pin (ksmd holding the
    same folio twice): can_split_folio() then fails.  The zero remap is the
    policy's decision; with :attr:`Remap.KSM_ACCOUNTED` the caller's own page
    ``keep`` is left for KSM's merge, and at most ``budget`` subpages are
    remapped (charged to pages_to_scan by the caller).
    """
    pmd_order = folio.order == PMD_ORDER
    if extra_refs > 0 or not folio.alive:
        # can_split_folio(): mapcount != refcount - 1; thp_split_page* count the PMD
        # order only, the per-size split* every order (__folio_split())
        if pmd_order:
            sys.vmstat["thp_split_page_failed"] += 1
        sys.count_mthp(folio.order, "split_failed")
        return SplitResult(False)
    vma = folio.vma
    mm = vma.mm
    mode = remap_on_split(
        sys.policy, caller, vma.mergeable, sys.ksm_running, sys.ksm_use_zero_pages,
        sys.thp.shrink_underused,
    )
    if folio.pmd_mapped:
        sys.vmstat["thp_split_pmd"] += 1  # __split_huge_pmd_locked()
    elif not pmd_order:
        # unmap_folio() takes a PTE-mapped folio's PTEs one by one: after the first,
        # __folio_remove_rmap() finds it partially mapped and queues it
        # (deferred_split_folio(folio, true)); the split takes it off the queue again
        sys.count_mthp(folio.order, "split_deferred")
    if pmd_order:
        sys.vmstat["thp_split_page"] += 1
        sys.nr_anon_thp -= 1
        vma.pmd[folio.index // HPAGE_PMD_NR] = PMD_TABLE
    sys.count_mthp(folio.order, "split")
    sys.count_mthp(folio.order, "nr_anon", -1)
    folio.alive = False
    folio.pmd_mapped = False
    if folio.queued:
        folio.queued = False
        sys.deferred.pop(folio, None)
    res = SplitResult(True)
    for k, page in enumerate(folio.pages):
        page.folio = None
        if mode is Remap.NONE:
            continue
        # try_to_map_unused_to_zeropage(): memchr_inv()/pages_identical()
        if page.cid != 0:
            res.data_tested += 1
            continue
        res.zero_tested += 1
        idx = folio.index + k
        if vma.pte[idx] is not page:
            continue
        if mode is Remap.KSM_ACCOUNTED:
            if page is keep or res.ksm_remapped >= budget:
                continue
            vma.pte[idx] = KSM_ZERO_PTE
            sys.ksm_zero_pages += 1
            mm.ksm_zero_pages += 1
            res.ksm_remapped += 1
        else:
            vma.pte[idx] = ZERO_PTE
        mm.anon_rss -= 1  # MM_ANONPAGES: the zero PTE is not counted
        page.mapcount = 0
        page.freed = True  # freed at the end of the split (or when ksmd drops it)
        res.remapped += 1
    return res


def thp_underused(sys: System, folio: Thp) -> bool:
    """thp_underused() of a folio (:func:`ksmlab.model.rules.thp_underused`)."""
    return rules.thp_underused([p.cid for p in folio.pages], 0,
                               sys.thp.khugepaged.max_ptes_none)


def deferred_split_scan(sys: System, held: Callable[[Thp], bool] | None = None,
                        failed_counted: int = 0) -> int:
    """deferred_split_scan() over the whole queue (a ``pressure`` event).

    ``held``: THPs someone else holds at that moment (a replay: the kernel kept them),
    whose split fails and drops them from the queue; ``failed_counted`` of those
    failures count thp_split_page_failed (a refcount failure does, a lost
    folio_trylock() does not).
    """
    split = 0
    for folio in list(sys.deferred):
        if not folio.alive:
            sys.deferred.pop(folio, None)
            folio.queued = False
            continue
        underused = False
        if not folio.partially_mapped:
            underused = thp_underused(sys, folio)
            if not underused:
                # "considered used": dropped from the queue for good
                sys.deferred.pop(folio, None)
                folio.queued = False
                continue
        if held is not None and held(folio):
            if failed_counted > 0:
                sys.vmstat["thp_split_page_failed"] += 1
                failed_counted -= 1
            res = SplitResult(False)
        else:
            res = split_folio(sys, folio, "shrinker")
        if res.ok:
            split += 1
            if underused:
                sys.vmstat["thp_underused_split_page"] += 1
        elif not folio.partially_mapped:
            sys.deferred.pop(folio, None)
            folio.queued = False
    return split


def ksm_zero_pte_count(vma: Vma) -> int:
    """KSM-marked zero PTEs in a VMA (for checks and tests)."""
    return sum(1 for p in vma.pte if p is KSM_ZERO_PTE)


def fill_fresh_vma(sys: System, vma: Vma, ids: list[int]) -> None:
    """The workload writes every page of a never-touched VMA in address order.

    Equivalent to :func:`write_fault` page by page (THP faults where allowed,
    4 KiB faults elsewhere), done range by range for speed.
    """
    assert all(s == PMD_NONE for s in vma.pmd) and len(ids) == vma.npages
    mm = vma.mm
    vma.anon_vma = True
    thp_ok = sys.thp_allowed(vma)
    for j in range(vma.npages // HPAGE_PMD_NR):
        base = j * HPAGE_PMD_NR
        chunk = ids[base : base + HPAGE_PMD_NR]
        if thp_ok and vma.pmd[j] == PMD_NONE:
            folio = Thp(vma, base, [])
            folio.pages = [Page(c, folio) for c in chunk]
            vma.pte[base : base + HPAGE_PMD_NR] = folio.pages
            vma.pmd[j] = PMD_THP
            sys.vmstat["thp_fault_alloc"] += 1
            sys.nr_anon_thp += 1
            mm.khugepaged = True
            deferred_split_folio(sys, folio, partially_mapped=False)
        else:
            vma.pmd[j] = PMD_TABLE
            orders = sys.mthp_orders(vma)
            if orders:  # a fresh range: every aligned folio fits (alloc_anon_folio())
                nr = 1 << orders[0]
                for b in range(base, base + HPAGE_PMD_NR, nr):
                    folio = _mthp_fault(sys, vma, b, orders[0])
                    for page, c in zip(folio.pages, ids[b : b + nr], strict=True):
                        page.cid = c
                continue
            vma.pte[base : base + HPAGE_PMD_NR] = [Page(c) for c in chunk]
        mm.anon_rss += HPAGE_PMD_NR


def fill_from_image(sys: System, vma: Vma, cid: npt.NDArray[np.uint32],
                    flags: npt.NDArray[np.uint8]) -> None:
    """Map a captured VMA's pages as they were (ksmlab/image.py): PMD-mapped THPs,
    4 KiB pages, zero-page PTEs, and nothing where nothing was.  ``cid``/``flags``
    cover [vma.lo, vma.hi).  THPs that existed before time 0 are not counted as faults
    (the kernel's baseline holds them); they are on the deferred split queue as
    their fault put them there (the model cannot know whether the shrinker has since
    found them used)."""
    mm = vma.mm
    vma.anon_vma = True
    c = cid.tolist()
    f = flags.tolist()
    for j in range(vma.npages // HPAGE_PMD_NR):
        base = j * HPAGE_PMD_NR
        lo, hi = max(base, vma.lo), min(base + HPAGE_PMD_NR, vma.hi)
        if lo >= hi:
            continue
        k0 = lo - vma.lo
        if hi - lo == HPAGE_PMD_NR and f[k0] & img.THP:
            folio = Thp(vma, base, [])
            folio.pages = [Page(c[k0 + i], folio) for i in range(HPAGE_PMD_NR)]
            vma.pte[base : base + HPAGE_PMD_NR] = folio.pages
            vma.pmd[j] = PMD_THP
            sys.nr_anon_thp += 1
            mm.khugepaged = True
            mm.anon_rss += HPAGE_PMD_NR
            deferred_split_folio(sys, folio, partially_mapped=False)
            continue
        any_pte = False
        for i in range(lo, hi):
            fl = f[i - vma.lo]
            if fl & img.ZERO_PTE:
                vma.pte[i] = ZERO_PTE
                any_pte = True
            elif fl & img.PRESENT:
                vma.pte[i] = Page(c[i - vma.lo])
                mm.anon_rss += 1
                any_pte = True
        vma.pmd[j] = PMD_TABLE if any_pte else PMD_NONE

