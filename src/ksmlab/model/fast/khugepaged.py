"""khugepaged on arrays: a port of :mod:`ksmlab.model.khugepaged` (numpy; it
wakes rarely and looks at a few 2 MiB ranges per wake)."""

from __future__ import annotations

import numpy as np

from ...scenario import HPAGE_PMD_NR, KhugepagedKnobs
from ..khugepaged import MAX_PTES_SHARED
from .pages import deferred_split_folio, thp_allowed
from .state import (
    ANON_RSS,
    I64,
    KSM_ZERO,
    KZERO,
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
)


class FastKhugepaged:
    def __init__(self, S: Slots, R: Ranges, V: Vmas, G: I64, knobs: KhugepagedKnobs,
                 needs_writable: bool, hstart: I64, hend: I64) -> None:
        self.S, self.R, self.V, self.G = S, R, V, G
        # per VMA, the slots of the whole 2 MiB ranges inside it (an image's unaligned
        # VMA is mapped in wider ranges): hstart/hend of khugepaged_scan_mm_slot()
        self.hstart, self.hend = hstart, hend
        self.needs_writable = needs_writable  # Policy.khugepaged_needs_writable
        self.P: Pool | None = None  # set by the engine (the pool is replaced as it grows)
        self.knobs = knobs
        self.slots: list[int] = []  # mm indices
        self.slot: int | None = None
        self.address = -1  # slot index; -1 = 0 in the exact model
        self.full_scans = 0
        self.pages_collapsed = 0

    def register(self, mm: int) -> None:
        if mm not in self.slots:
            self.slots.append(mm)

    def do_scan(self) -> None:
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
        if self.slot is None:
            self.slot = 0
            self.address = -1
        V = self.V
        m = self.slots[self.slot]
        progress = 1
        first = int(V.mm_first[m])
        for v in range(first, first + int(V.mm_count[m])):
            base, end = int(self.hstart[v]), int(self.hend[v])
            if not thp_allowed(V, self.G, v) or self.address >= end or end <= base:
                progress += 1
                continue
            self.address = max(self.address, base)
            while self.address < end:
                if self._scan_pmd(self.address // HPAGE_PMD_NR):
                    self.pages_collapsed += 1
                self.address += HPAGE_PMD_NR
                progress += HPAGE_PMD_NR
                if progress >= pages:
                    return progress
        self.slot += 1
        self.address = -1
        if self.slot >= len(self.slots):
            self.slot = None
            self.full_scans += 1
        return progress

    def _scan_pmd(self, r: int) -> bool:
        if self.R.pmd[r] != PMD_TABLE:
            return False
        assert self.P is not None
        base = r * HPAGE_PMD_NR
        pte = self.S.pte[base : base + HPAGE_PMD_NR]
        none_or_zero = int(np.count_nonzero((pte == NONE) | (pte == ZERO) | (pte == KZERO)))
        if none_or_zero > self.knobs.max_ptes_none:
            return False
        ksm = pte[pte >= 0]
        if int(np.count_nonzero(self.P.kmap[ksm] > 1)) > MAX_PTES_SHARED:
            return False
        if self.needs_writable and not np.any(pte == OWN):
            return False  # SCAN_PAGE_RO (6.12; gone in later trees)
        self._collapse(r)
        return True

    def _collapse(self, r: int) -> None:
        S, G = self.S, self.G
        assert self.P is not None
        base = r * HPAGE_PMD_NR
        sl = slice(base, base + HPAGE_PMD_NR)
        pte = S.pte[sl].copy()
        ksm = pte >= 0
        present = int(np.count_nonzero(ksm | (pte == OWN)))
        codes = S.scid[sl].copy()
        codes[ksm] = self.P.kcid[pte[ksm]]
        codes[~(ksm | (pte == OWN))] = 0
        np.subtract.at(self.P.kmap, pte[ksm], 1)
        G[KSM_ZERO] -= int(np.count_nonzero(pte == KZERO))
        S.scid[sl] = codes
        S.pte[sl] = OWN
        self.R.pmd[r] = PMD_THP
        G[ANON_RSS] += HPAGE_PMD_NR - present
        G[NR_THP] += 1
        G[THP_RANGES] += 1
        G[V_COLLAPSE_ALLOC] += 1
        deferred_split_folio(self.R, G, r)
