"""khugepaged on arrays: a port of :mod:`ksmlab.model.khugepaged` (numpy; it
wakes rarely and looks at a few 2 MiB ranges per wake)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ...scenario import HPAGE_PMD_NR, PMD_ORDER, KhugepagedKnobs
from ..khugepaged import MAX_PTES_SHARED, KhugepagedWalk
from .pages import deferred_split_folio, thp_allowed
from .state import (
    ANON_RSS,
    I64,
    KSM_ZERO,
    KZERO,
    M_NR_ANON,
    NONE,
    NR_THP,
    OWN,
    PMD_TABLE,
    PMD_THP,
    THP_RANGES,
    V_COLLAPSE_ALLOC,
    ZERO,
    Pool,
    Ranges,
    Slots,
    Vmas,
    mthp_g,
)


class FastKhugepaged(KhugepagedWalk[int, int]):
    """Mms by index, VMAs by index, addresses are slots."""

    def __init__(self, page: Slots, ranges: Ranges, vmas: Vmas, glob: I64, knobs: KhugepagedKnobs,
                 needs_writable: bool, hstart: I64, hend: I64) -> None:
        super().__init__(knobs)
        self.page, self.ranges, self.vmas, self.glob = page, ranges, vmas, glob
        # per VMA, the slots of the whole 2 MiB ranges inside it (an image's unaligned
        # VMA is mapped in wider ranges): hstart/hend of khugepaged_scan_mm_slot()
        self.hstart, self.hend = hstart, hend
        self.needs_writable = needs_writable  # Policy.khugepaged_needs_writable
        self.pool: Pool | None = None  # set by the engine (the pool is replaced as it grows)

    def vma_ranges(self, mm: int) -> Iterator[tuple[int, int, int, bool]]:
        first = int(self.vmas.mm_first[mm])
        for v in range(first, first + int(self.vmas.mm_count[mm])):
            yield v, int(self.hstart[v]), int(self.hend[v]), thp_allowed(self.vmas, self.glob, v)

    def scan_pmd(self, vma: int, address: int) -> bool:
        return self._scan_pmd(address // HPAGE_PMD_NR)

    def _scan_pmd(self, r: int) -> bool:
        if self.ranges.pmd[r] != PMD_TABLE:
            return False
        assert self.pool is not None
        base = r * HPAGE_PMD_NR
        pte = self.page.pte[base : base + HPAGE_PMD_NR]
        none_or_zero = int(np.count_nonzero((pte == NONE) | (pte == ZERO) | (pte == KZERO)))
        if none_or_zero > self.knobs.max_ptes_none:
            return False
        ksm = pte[pte >= 0]
        if int(np.count_nonzero(self.pool.kmap[ksm] > 1)) > MAX_PTES_SHARED:
            return False
        if self.needs_writable and not np.any(pte <= OWN):
            return False  # SCAN_PAGE_RO (6.12; gone in later trees)
        self._collapse(r)
        return True

    def _collapse(self, r: int) -> None:
        page, glob = self.page, self.glob
        assert self.pool is not None
        base = r * HPAGE_PMD_NR
        sl = slice(base, base + HPAGE_PMD_NR)
        pte = page.pte[sl].copy()
        ksm = pte >= 0
        own = pte <= OWN
        present = int(np.count_nonzero(ksm | own))
        codes = page.scid[sl].copy()
        codes[ksm] = self.pool.kcid[pte[ksm]]
        codes[~(ksm | own)] = 0
        np.subtract.at(self.pool.kmap, pte[ksm], 1)
        glob[KSM_ZERO] -= int(np.count_nonzero(pte == KZERO))
        page.scid[sl] = codes
        # the multi-size THPs of the range (one per first slot) are copied, then freed
        # (free_pages_prepare(): mod_mthp_stat(order, MTHP_STAT_NR_ANON, -1))
        fo = np.where(own, OWN - pte.astype(np.int64), 0)
        first = (fo != 0) & (np.arange(base, base + HPAGE_PMD_NR) % (1 << fo) == 0)
        if first.any():
            for o, n in enumerate(np.bincount(fo[first], minlength=PMD_ORDER).tolist()):
                glob[mthp_g(o, M_NR_ANON)] -= n
        page.pte[sl] = OWN
        self.ranges.pmd[r] = PMD_THP
        glob[ANON_RSS] += HPAGE_PMD_NR - present
        glob[NR_THP] += 1
        glob[THP_RANGES] += 1
        glob[V_COLLAPSE_ALLOC] += 1
        deferred_split_folio(self.ranges, glob, r)
