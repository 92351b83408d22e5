"""Page-table operations of the fast engine (numba): THP split with the zero
remap, write faults, break_ksm, the deferred-split shrinker.  Mirrors
:mod:`ksmlab.model.thp` and :mod:`ksmlab.model.ksm` (break_ksm)."""

from __future__ import annotations

import numpy as np

from ...content import FRESH_BASE, UNIQUE_BASE
from .. import rules
from .jit import jit
from .state import (
    ANON_RSS,
    DEFER_ON,
    DEFER_SEQ,
    FRESH_CODE,
    I64,
    KSM_ZERO,
    KZERO,
    NONE,
    NR_THP,
    OWN,
    PMD_NONE,
    PMD_TABLE,
    PMD_THP,
    R_KSM,
    R_NONE,
    THP_ALLOWED_ALWAYS,
    THP_ALLOWED_MADV,
    THP_RANGES,
    U8,
    U32,
    U64,
    UNIQ_CODE,
    V_FAULT_ALLOC,
    V_SPLIT_FAILED,
    V_SPLIT_PAGE,
    V_SPLIT_PMD,
    V_UNDERUSED,
    ZERO,
    Pool,
    Ranges,
    Slots,
    Vmas,
)

HPAGE = 512


@jit()
def thp_allowed(vmas: Vmas, glob: I64, v: int) -> bool:
    if vmas.nohuge[v]:
        return False
    return bool(glob[THP_ALLOWED_ALWAYS] != 0
                or (glob[THP_ALLOWED_MADV] != 0 and vmas.huge[v] != 0))


@jit()
def deferred_split_folio(ranges: Ranges, glob: I64, r: int) -> None:
    if not glob[DEFER_ON]:
        return
    if ranges.qseq[r] == 0:
        glob[DEFER_SEQ] += 1
        ranges.qseq[r] = glob[DEFER_SEQ]


@jit()
def split_folio(page: Slots, ranges: Ranges, glob: I64, r: int, mode: int, extra: int, keep: int,
                budget: int) -> tuple[bool, int, int, int, int]:
    """split_huge_page() of the THP of range ``r``: (ok, zero_tested, data_tested,
    remapped, ksm_remapped).  ``keep`` is the slot of the caller's page (or -1)."""
    if extra > 0 or ranges.pmd[r] != PMD_THP:
        glob[V_SPLIT_FAILED] += 1
        return False, 0, 0, 0, 0
    glob[V_SPLIT_PMD] += 1
    glob[V_SPLIT_PAGE] += 1
    glob[NR_THP] -= 1
    glob[THP_RANGES] -= 1
    ranges.qseq[r] = 0
    ranges.pmd[r] = PMD_TABLE
    zt = 0
    dt = 0
    rem = 0
    krem = 0
    if mode == R_NONE:
        return True, 0, 0, 0, 0
    base = r * HPAGE
    for s in range(base, base + HPAGE):
        if page.scid[s] != 0:
            dt += 1
            continue
        zt += 1
        if page.pte[s] != OWN:
            continue
        if mode == R_KSM:
            if s == keep or krem >= budget:
                continue
            page.pte[s] = KZERO
            glob[KSM_ZERO] += 1
            krem += 1
        else:
            page.pte[s] = ZERO
        glob[ANON_RSS] -= 1
        rem += 1
    return True, zt, dt, rem, krem


@jit()
def write_fault(page: Slots, ranges: Ranges, vmas: Vmas, pool: Pool, glob: I64, s: int,
                code: int) -> None:
    p = page.pte[s]
    if p == NONE:
        r = s // HPAGE
        v = ranges.vma[r]
        vmas.anon[v] = 1
        if ranges.pmd[r] == PMD_NONE and thp_allowed(vmas, glob, v):
            base = r * HPAGE
            for k in range(base, base + HPAGE):
                page.pte[k] = OWN
                page.scid[k] = 0
            ranges.pmd[r] = PMD_THP
            glob[ANON_RSS] += HPAGE
            glob[V_FAULT_ALLOC] += 1
            glob[NR_THP] += 1
            glob[THP_RANGES] += 1
            deferred_split_folio(ranges, glob, r)
            page.scid[s] = code
            return
        if ranges.pmd[r] == PMD_NONE:
            ranges.pmd[r] = PMD_TABLE
        page.pte[s] = OWN
        page.scid[s] = code
        glob[ANON_RSS] += 1
        return
    if p in (ZERO, KZERO):
        if p == KZERO:
            glob[KSM_ZERO] -= 1
        page.pte[s] = OWN
        page.scid[s] = code
        glob[ANON_RSS] += 1
        return
    if p >= 0:
        page.pte[s] = OWN
        page.scid[s] = code
        pool.kmap[p] -= 1
        return
    page.scid[s] = code


@jit()
def write_many(page: Slots, ranges: Ranges, vmas: Vmas, pool: Pool, glob: I64, slots: I64,
               codes: I64) -> None:
    for j in range(len(slots)):
        write_fault(page, ranges, vmas, pool, glob, slots[j], codes[j])


@jit()
def break_ksm(page: Slots, pool: Pool, glob: I64, s: int) -> None:
    p = page.pte[s]
    if p >= 0:
        page.pte[s] = OWN
        page.scid[s] = pool.kcid[p]
        pool.kmap[p] -= 1
    elif p == KZERO:
        glob[KSM_ZERO] -= 1
        page.pte[s] = OWN
        page.scid[s] = 0
        glob[ANON_RSS] += 1


_underused = jit(inline=True)(rules.thp_underused)  # the exact engine's rule, compiled


@jit()
def deferred_split_scan(page: Slots, ranges: Ranges, vmas: Vmas, glob: I64, order: I64,
                        max_none: int,
                        mode_m: int, mode_nm: int, held: U8, failed_counted: int) -> int:
    """The shrinker over the queue (``order``: queued ranges, oldest first).

    ``held``: per range, 1 where someone else holds the THP at that moment (a replay:
    the kernel kept it), whose split fails and drops it from the queue (set to 2:
    met); ``failed_counted`` of those failures count thp_split_page_failed."""
    split = 0
    for j in range(len(order)):
        r = order[j]
        if ranges.pmd[r] != PMD_THP:
            ranges.qseq[r] = 0
            continue
        if not _underused(page.scid, r * HPAGE, max_none):
            ranges.qseq[r] = 0
            continue
        if held[r]:
            held[r] = 2
            if failed_counted > 0:
                glob[V_SPLIT_FAILED] += 1
                failed_counted -= 1
            ranges.qseq[r] = 0
            continue
        mode = mode_m if vmas.merge[ranges.vma[r]] else mode_nm
        ok, _zt, _dt, _rem, _krem = split_folio(page, ranges, glob, r, mode, 0, -1, 0)
        if ok:
            split += 1
            glob[V_UNDERUSED] += 1
        else:
            ranges.qseq[r] = 0
    return split


def queued_order(ranges: Ranges) -> I64:
    q = np.flatnonzero(ranges.qseq)
    return q[np.argsort(ranges.qseq[q], kind="stable")].astype(np.int64)


_UB, _FB = np.uint64(UNIQUE_BASE), np.uint64(FRESH_BASE)
_UC, _FC = np.uint64(UNIQ_CODE), np.uint64(FRESH_CODE)


@jit()
def store_codes(ids: U64, out: U32) -> None:
    """``out[:] = code_of(ids)`` in one pass (the fill of a 1 TiB host)."""
    for j in range(len(ids)):
        x = ids[j]
        if x >= _FB:
            x = x - _FB + _FC
        elif x >= _UB:
            x = x - _UB + _UC
        out[j] = np.uint32(x)
