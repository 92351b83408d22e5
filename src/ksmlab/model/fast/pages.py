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
def thp_allowed(V: Vmas, G: I64, v: int) -> bool:
    if V.nohuge[v]:
        return False
    return bool(G[THP_ALLOWED_ALWAYS] != 0 or (G[THP_ALLOWED_MADV] != 0 and V.huge[v] != 0))


@jit()
def deferred_split_folio(R: Ranges, G: I64, r: int) -> None:
    if not G[DEFER_ON]:
        return
    if R.qseq[r] == 0:
        G[DEFER_SEQ] += 1
        R.qseq[r] = G[DEFER_SEQ]


@jit()
def split_folio(S: Slots, R: Ranges, G: I64, r: int, mode: int, extra: int, keep: int,
                budget: int) -> tuple[bool, int, int, int, int]:
    """split_huge_page() of the THP of range ``r``: (ok, zero_tested, data_tested,
    remapped, ksm_remapped).  ``keep`` is the slot of the caller's page (or -1)."""
    if extra > 0 or R.pmd[r] != PMD_THP:
        G[V_SPLIT_FAILED] += 1
        return False, 0, 0, 0, 0
    G[V_SPLIT_PMD] += 1
    G[V_SPLIT_PAGE] += 1
    G[NR_THP] -= 1
    G[THP_RANGES] -= 1
    R.qseq[r] = 0
    R.pmd[r] = PMD_TABLE
    zt = 0
    dt = 0
    rem = 0
    krem = 0
    if mode == R_NONE:
        return True, 0, 0, 0, 0
    base = r * HPAGE
    for s in range(base, base + HPAGE):
        if S.scid[s] != 0:
            dt += 1
            continue
        zt += 1
        if S.pte[s] != OWN:
            continue
        if mode == R_KSM:
            if s == keep or krem >= budget:
                continue
            S.pte[s] = KZERO
            G[KSM_ZERO] += 1
            krem += 1
        else:
            S.pte[s] = ZERO
        G[ANON_RSS] -= 1
        rem += 1
    return True, zt, dt, rem, krem


@jit()
def write_fault(S: Slots, R: Ranges, V: Vmas, P: Pool, G: I64, s: int, code: int) -> None:
    p = S.pte[s]
    if p == NONE:
        r = s // HPAGE
        v = R.vma[r]
        V.anon[v] = 1
        if R.pmd[r] == PMD_NONE and thp_allowed(V, G, v):
            base = r * HPAGE
            for k in range(base, base + HPAGE):
                S.pte[k] = OWN
                S.scid[k] = 0
            R.pmd[r] = PMD_THP
            G[ANON_RSS] += HPAGE
            G[V_FAULT_ALLOC] += 1
            G[NR_THP] += 1
            G[THP_RANGES] += 1
            deferred_split_folio(R, G, r)
            S.scid[s] = code
            return
        if R.pmd[r] == PMD_NONE:
            R.pmd[r] = PMD_TABLE
        S.pte[s] = OWN
        S.scid[s] = code
        G[ANON_RSS] += 1
        return
    if p in (ZERO, KZERO):
        if p == KZERO:
            G[KSM_ZERO] -= 1
        S.pte[s] = OWN
        S.scid[s] = code
        G[ANON_RSS] += 1
        return
    if p >= 0:
        S.pte[s] = OWN
        S.scid[s] = code
        P.kmap[p] -= 1
        return
    S.scid[s] = code


@jit()
def write_many(S: Slots, R: Ranges, V: Vmas, P: Pool, G: I64, slots: I64,
               codes: I64) -> None:
    for j in range(len(slots)):
        write_fault(S, R, V, P, G, slots[j], codes[j])


@jit()
def break_ksm(S: Slots, P: Pool, G: I64, s: int) -> None:
    p = S.pte[s]
    if p >= 0:
        S.pte[s] = OWN
        S.scid[s] = P.kcid[p]
        P.kmap[p] -= 1
    elif p == KZERO:
        G[KSM_ZERO] -= 1
        S.pte[s] = OWN
        S.scid[s] = 0
        G[ANON_RSS] += 1


_underused = jit(inline=True)(rules.thp_underused)  # the exact engine's rule, compiled


@jit()
def deferred_split_scan(S: Slots, R: Ranges, V: Vmas, G: I64, order: I64, max_none: int,
                        mode_m: int, mode_nm: int, held: U8, failed_counted: int) -> int:
    """The shrinker over the queue (``order``: queued ranges, oldest first).

    ``held``: per range, 1 where someone else holds the THP at that moment (a replay:
    the kernel kept it), whose split fails and drops it from the queue (set to 2:
    met); ``failed_counted`` of those failures count thp_split_page_failed."""
    split = 0
    for j in range(len(order)):
        r = order[j]
        if R.pmd[r] != PMD_THP:
            R.qseq[r] = 0
            continue
        if not _underused(S.scid, r * HPAGE, max_none):
            R.qseq[r] = 0
            continue
        if held[r]:
            held[r] = 2
            if failed_counted > 0:
                G[V_SPLIT_FAILED] += 1
                failed_counted -= 1
            R.qseq[r] = 0
            continue
        mode = mode_m if V.merge[R.vma[r]] else mode_nm
        ok, _zt, _dt, _rem, _krem = split_folio(S, R, G, r, mode, 0, -1, 0)
        if ok:
            split += 1
            G[V_UNDERUSED] += 1
        else:
            R.qseq[r] = 0
    return split


def queued_order(R: Ranges) -> I64:
    q = np.flatnonzero(R.qseq)
    return q[np.argsort(R.qseq[q], kind="stable")].astype(np.int64)


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
