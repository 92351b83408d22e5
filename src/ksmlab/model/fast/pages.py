"""Page-table operations of the fast engine (numba): THP split with the zero
remap, write faults, break_ksm, the deferred-split shrinker.  Mirrors
:mod:`ksmlab.model.thp` and :mod:`ksmlab.model.ksm` (break_ksm)."""

from __future__ import annotations

import numpy as np

from ...content import FRESH_BASE, UNIQUE_BASE
from ...scenario import PMD_ORDER
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
    M_FAULT_ALLOC,
    M_NR_ANON,
    M_SPLIT,
    M_SPLIT_DEFERRED,
    M_SPLIT_FAILED,
    MTHP_ORDERS_MADV,
    MTHP_ORDERS_PLAIN,
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
    mthp_g,
)

HPAGE = 512


@jit()
def thp_allowed(vmas: Vmas, glob: I64, v: int) -> bool:
    if vmas.nohuge[v]:
        return False
    return bool(glob[THP_ALLOWED_ALWAYS] != 0
                or (glob[THP_ALLOWED_MADV] != 0 and vmas.huge[v] != 0))


@jit(inline=True)
def mthp_orders(vmas: Vmas, glob: I64, v: int) -> int:
    """The orders below PMD a fault may allocate in VMA ``v``, as bits (System.mthp_orders())."""
    if vmas.nohuge[v]:
        return 0
    return int(glob[MTHP_ORDERS_MADV] if vmas.huge[v] else glob[MTHP_ORDERS_PLAIN])


@jit(inline=True)
def folio_of(page: Slots, ranges: Ranges, s: int) -> tuple[int, int]:
    """(order, first slot) of the large folio slot ``s``'s page is part of; order 0:
    none.  A PMD-mapped THP is its 2 MiB range; a multi-size THP is naturally aligned
    (alloc_anon_folio()) in slots, which are 2 MiB aligned per VMA."""
    if ranges.pmd[s // HPAGE] == PMD_THP:
        return PMD_ORDER, s - s % HPAGE
    p = page.pte[s]
    if p < OWN:
        o = int(OWN - p)
        return o, s - s % (1 << o)
    return 0, s


@jit()
def deferred_split_folio(ranges: Ranges, glob: I64, r: int) -> None:
    if not glob[DEFER_ON]:
        return
    if ranges.qseq[r] == 0:
        glob[DEFER_SEQ] += 1
        ranges.qseq[r] = glob[DEFER_SEQ]


@jit()
def split_folio(page: Slots, ranges: Ranges, glob: I64, s: int, mode: int, extra: int, keep: int,
                budget: int) -> tuple[bool, int, int, int, int, int]:
    """split_huge_page() of the large folio of slot ``s`` (thp.split_folio(): any order,
    to order 0): (ok, zero_tested, data_tested, remapped, ksm_remapped, pages of the
    folio).  ``keep`` is the slot of the caller's page (or -1)."""
    order, base = folio_of(page, ranges, s)
    if order == 0:
        glob[V_SPLIT_FAILED] += 1
        return False, 0, 0, 0, 0, 0
    nr = 1 << order
    if extra > 0:
        # can_split_folio() fails; thp_split_page* count the PMD order only, the
        # per-size split* every order (__folio_split())
        if order == PMD_ORDER:
            glob[V_SPLIT_FAILED] += 1
        glob[mthp_g(order, M_SPLIT_FAILED)] += 1
        return False, 0, 0, 0, 0, nr
    if order == PMD_ORDER:
        r = s // HPAGE
        glob[V_SPLIT_PMD] += 1  # __split_huge_pmd_locked()
        glob[V_SPLIT_PAGE] += 1
        glob[NR_THP] -= 1
        glob[THP_RANGES] -= 1
        ranges.qseq[r] = 0
        ranges.pmd[r] = PMD_TABLE
    else:
        # unmap_folio() of a PTE-mapped folio: partially mapped after its first PTE,
        # queued (deferred_split_folio(folio, true)) and taken off again by the split
        glob[mthp_g(order, M_SPLIT_DEFERRED)] += 1
        page.pte[base : base + nr] = OWN  # order-0 pages now
    glob[mthp_g(order, M_SPLIT)] += 1
    glob[mthp_g(order, M_NR_ANON)] -= 1
    zt = 0
    dt = 0
    rem = 0
    krem = 0
    if mode == R_NONE:
        return True, 0, 0, 0, 0, nr
    # try_to_map_unused_to_zeropage() on each subpage
    for k in range(base, base + nr):
        if page.scid[k] != 0:
            dt += 1
            continue
        zt += 1
        if page.pte[k] != OWN:
            continue
        if mode == R_KSM:
            if k == keep or krem >= budget:
                continue
            page.pte[k] = KZERO
            glob[KSM_ZERO] += 1
            krem += 1
        else:
            page.pte[k] = ZERO
        glob[ANON_RSS] -= 1
        rem += 1
    return True, zt, dt, rem, krem, nr


@jit(inline=True)
def _mthp_fault(page: Slots, glob: I64, base: int, order: int) -> None:
    """thp._mthp_fault(): a zeroed multi-size THP mapped by PTEs, counted per size."""
    nr = 1 << order
    for k in range(base, base + nr):
        page.pte[k] = OWN - order
        page.scid[k] = 0
    glob[ANON_RSS] += nr
    glob[mthp_g(order, M_FAULT_ALLOC)] += 1
    glob[mthp_g(order, M_NR_ANON)] += 1


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
        # do_anonymous_page(): alloc_anon_folio() takes the highest allowed order whose
        # aligned range lies in the VMA with every PTE none
        mask = mthp_orders(vmas, glob, v)
        if mask:
            for o in range(PMD_ORDER - 1, 1, -1):
                if not (mask >> o) & 1:
                    continue
                nr = 1 << o
                base = s - s % nr
                # within the VMA (only a region's VMA takes writes: it fills its
                # 2 MiB ranges, so vma.lo/hi are its first and last slots)
                if base < vmas.base[v] or base + nr > vmas.base[v] + vmas.n[v]:
                    continue
                free = True
                for k in range(base, base + nr):
                    if page.pte[k] != NONE:
                        free = False
                        break
                if free:
                    _mthp_fault(page, glob, base, o)
                    page.scid[s] = code
                    return
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
        ok, _zt, _dt, _rem, _krem, _nr = split_folio(page, ranges, glob, r * HPAGE, mode, 0,
                                                     -1, 0)
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
