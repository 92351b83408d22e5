"""khugepaged: periodic collapse of PTE-mapped ranges into THPs (mm/khugepaged.c).

Every ``scan_sleep_millisecs`` it scans ``pages_to_scan`` "pages" of progress
(one per mm visited, HPAGE_PMD_NR per 2 MiB range looked at, so 4096 = 8
ranges).  A range collapses when none + zero-pfn PTEs (KSM-placed or
split-remapped alike) are at most ``max_ptes_none``, at most max_ptes_shared
pages are mapped more than once, and (up to 6.12 only: a policy decision) at
least one PTE is writable (KSM pages are mapped read-only).  With
max_ptes_none=511 this re-collapses ranges that a KSM split just emptied: the
churn loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

from ..scenario import HPAGE_PMD_NR, KhugepagedKnobs, Scenario
from .memory import PMD_TABLE, PMD_THP, Mm, Page, System, Thp, Vma, ZeroPte, put_mapping
from .thp import deferred_split_folio

MAX_PTES_SHARED = 256  # khugepaged/max_ptes_shared default
M = TypeVar("M")
H = TypeVar("H")


def timer_period_s(sc: Scenario, knobs: KhugepagedKnobs) -> float:
    """khugepaged's own timer after a pass: parked for the run when the lab drives it,
    else the current scan_sleep_millisecs (a `set` event may have changed it)."""
    ms = sc.khugepaged_kernel_sleep_ms() if sc.drive_khugepaged else knobs.scan_sleep_millisecs
    return max(ms / 1000.0, 0.001)


def khugepaged_enter_passes(slots: Sequence[object], recorded: int | None) -> int:
    """khugepaged passes while the workload is set up, before time 0.

    __khugepaged_enter() wakes khugepaged when it adds an mm to an empty list
    (mm/khugepaged.c), so the first MADV_HUGEPAGE (or THP-"always" mmap) of a run
    on an otherwise idle machine starts a pass at once.  It covers 8 ranges that
    are still unfaulted or whole THPs (nothing to collapse) but moves the cursor,
    so the lab's pass at time 0 starts 8 ranges in.  When another mm is already
    registered there is no such pass; a live trace records what happened
    (``khugepaged_enter_passes``) and a replay passes it as ``recorded``.
    """
    if recorded is not None:
        return recorded
    return 1 if slots else 0


class KhugepagedWalk(Generic[M, H]):
    """khugepaged_do_scan() and khugepaged_scan_mm_slot(): the walk over the mms
    registered with khugepaged, written once for both engines.  ``M``: an mm as the
    engine names it; ``H``: a VMA.  An engine says which VMAs an mm has and their
    whole 2 MiB ranges (:meth:`vma_ranges`), and scans one range (:meth:`scan_pmd`)."""

    def __init__(self, knobs: KhugepagedKnobs) -> None:
        self.knobs = knobs
        self.slots: list[M] = []
        self.slot: int | None = None  # khugepaged_scan.mm_slot (None = list head)
        self.address = 0  # khugepaged_scan.address
        self.full_scans = 0
        self.pages_collapsed = 0

    def vma_ranges(self, mm: M) -> Iterator[tuple[H, int, int, bool]]:
        """(vma, hstart, hend, THP allowed) of each of ``mm``'s VMAs in address order:
        hstart/hend the whole 2 MiB ranges inside it, as addresses in pages."""
        raise NotImplementedError

    def scan_pmd(self, vma: H, address: int) -> bool:
        """hpage_collapse_scan_pmd() + collapse_huge_page() of the range at ``address``."""
        raise NotImplementedError

    def register(self, mm: M) -> None:
        # khugepaged_enter_vma() -> __khugepaged_enter(): appended to the list
        if mm not in self.slots:
            self.slots.append(mm)

    def do_scan(self) -> None:
        """khugepaged_do_scan(): one pass of up to pages_to_scan progress."""
        pages = self.knobs.pages_to_scan
        progress = 0
        pass_through_head = 0
        while True:
            if self.slot is None:
                pass_through_head += 1
            if self.slots and pass_through_head < 2:
                progress += self._scan_mm_slot(pages - progress)
            else:
                progress = pages
            if progress >= pages:
                break

    def _scan_mm_slot(self, pages: int) -> int:
        # khugepaged_scan_mm_slot()
        if self.slot is None:
            self.slot = 0
            self.address = 0
        progress = 1
        for vma, hstart, hend, allowed in self.vma_ranges(self.slots[self.slot]):
            if not allowed or self.address >= hend or hend <= hstart:
                progress += 1
                continue
            self.address = max(self.address, hstart)
            while self.address < hend:
                if self.scan_pmd(vma, self.address):
                    self.pages_collapsed += 1
                self.address += HPAGE_PMD_NR
                progress += HPAGE_PMD_NR
                if progress >= pages:
                    return progress  # breakouterloop with a vma: same slot next time
        # no vma left: next mm; passing the list head counts a full scan
        self.slot += 1
        self.address = 0
        if self.slot >= len(self.slots):
            self.slot = None
            self.full_scans += 1
        return progress


class Khugepaged(KhugepagedWalk[Mm, Vma]):
    def __init__(self, sys: System, knobs: KhugepagedKnobs) -> None:
        super().__init__(knobs)
        self.sys = sys

    def vma_ranges(self, mm: Mm) -> Iterator[tuple[Vma, int, int, bool]]:
        for vma in mm.vmas:
            yield (vma, vma.start + -(-vma.lo // HPAGE_PMD_NR) * HPAGE_PMD_NR,
                   vma.start + vma.hi // HPAGE_PMD_NR * HPAGE_PMD_NR, self.sys.thp_allowed(vma))

    def scan_pmd(self, vma: Vma, address: int) -> bool:
        return self._scan_pmd(vma, (address - vma.start) // HPAGE_PMD_NR)

    def _scan_pmd(self, vma: Vma, j: int) -> bool:
        """hpage_collapse_scan_pmd() + collapse_huge_page()."""
        if vma.pmd[j] != PMD_TABLE:
            return False  # SCAN_PMD_MAPPED / SCAN_PMD_NULL
        base = j * HPAGE_PMD_NR
        none_or_zero = shared = 0
        writable = False
        max_none = self.knobs.max_ptes_none
        for pte in vma.pte[base : base + HPAGE_PMD_NR]:
            if pte is None or isinstance(pte, ZeroPte):
                none_or_zero += 1
                if none_or_zero > max_none:
                    return False  # SCAN_EXCEED_NONE_PTE
                continue
            if not pte.ksm:
                writable = True
            if pte.mapcount > 1:
                shared += 1
                if shared > MAX_PTES_SHARED:
                    return False  # SCAN_EXCEED_SHARED_PTE
        if not writable and self.sys.policy.khugepaged_needs_writable:
            return False  # SCAN_PAGE_RO (6.12; gone in later trees)
        self._collapse(vma, j)
        return True

    def _collapse(self, vma: Vma, j: int) -> None:
        sys = self.sys
        mm = vma.mm
        base = j * HPAGE_PMD_NR
        folio = Thp(vma, base, [])
        present = 0
        pages: list[Page] = []
        for pte in vma.pte[base : base + HPAGE_PMD_NR]:
            if isinstance(pte, Page):
                present += 1
                pages.append(Page(pte.cid, folio))
                old = pte.folio
                if old is not None and old.alive:
                    # a multi-size THP of the range: copied, then freed
                    # (free_pages_prepare(): mod_mthp_stat(order, MTHP_STAT_NR_ANON, -1))
                    old.alive = False
                    sys.count_mthp(old.order, "nr_anon", -1)
                put_mapping(pte)  # KSM mappings vanish; stable items die lazily
            else:
                if pte is not None and pte.ksm:
                    sys.zap_ksm_zero(mm)
                pages.append(Page(0, folio))
        folio.pages = pages
        vma.pte[base : base + HPAGE_PMD_NR] = pages
        vma.pmd[j] = PMD_THP
        mm.anon_rss += HPAGE_PMD_NR - present
        sys.nr_anon_thp += 1
        sys.vmstat["thp_collapse_alloc"] += 1
        deferred_split_folio(sys, folio, partially_mapped=False)
