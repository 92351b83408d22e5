"""Array state of the fast engine: one slot per simulated 4 KiB page.

Per slot (29 bytes): the PTE (``pte``: NONE, ZERO, KZERO, the slot's own private
page: OWN, or OWN - order for a subpage of a multi-size THP (a PTE-mapped large
folio; PMD-mapped THPs are per 2 MiB range, ``Ranges.pmd``), or the index of a
KSM page), the content code of the slot's own private page (``scid``) and the
slot's rmap item (flags, seqnr, age, remaining_skips, oldchecksum, and the
unstable-tree links; a stable item keeps its stable node in ``ileft``).  KSM
pages and stable nodes live in small pools that grow between compiled calls.
Content ids are coded in 32 bits keeping their order: 0..2**20 as themselves,
unique ids after them, fresh ids from 2**31.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import numpy.typing as npt

from ...content import FRESH_BASE, UNIQUE_BASE
from ...scenario import PMD_ORDER
from ...trace import MTHP_STATS
from ..costs import COST_FIELDS
from ..memory import VMSTAT_EVENTS
from .jit import jit

if TYPE_CHECKING:
    from .events import Events

I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
U32 = npt.NDArray[np.uint32]
U64 = npt.NDArray[np.uint64]
F64 = npt.NDArray[np.float64]

# PTE kinds (pte >= 0: a KSM page of the pool; pte <= OWN: the slot's own page, and
# pte = OWN - order < OWN a subpage of a multi-size THP of that order)
NONE, ZERO, KZERO, OWN = -1, -2, -3, -4
# rmap item flags
EXISTS, UNSTABLE, STABLE = 1, 2, 4
PMD_NONE, PMD_THP, PMD_TABLE = 0, 1, 2

# content codes
DUP_MAX = 1 << 20
UNIQ_CODE = DUP_MAX + 1
FRESH_CODE = 1 << 31
MAX_UNIQUE = FRESH_CODE - UNIQ_CODE
MAX_FRESH = (1 << 32) - 2 - FRESH_CODE

# The compiled functions take the state as a few arrays, each named for what it holds:
#   page   (Slots)  per 4 KiB slot: PTE, content code, rmap item
#   ranges (Ranges) per 2 MiB range: PMD, deferred-split queue position, VMA
#   vmas   (Vmas)   per VMA and per mm
#   pool   (Pool)   KSM pages and stable nodes
#   glob   int64 globals, by the names below (G_NAMES: all of them in order)
#   meter  float64: CPU ns, clocks, how often each cost was charged (CpuMeter)
#   price  float64: the cost profile, in COST_FIELDS order (C_* below)
G_NAMES = (
    # KSM's counters (/sys/kernel/mm/ksm) and the process counts they feed
    "PAGES_SCANNED", "PAGES_SHARED", "PAGES_SHARING", "PAGES_UNSHARED", "PAGES_SKIPPED",
    "RMAP_ITEMS", "CHAINS", "DUPS", "SEQNR", "KSM_ZERO", "ANON_RSS", "NR_THP", "THP_RANGES",
    # /proc/vmstat THP events, in VMSTAT_EVENTS order
    "V_FAULT_ALLOC", "V_FAULT_FALLBACK", "V_COLLAPSE_ALLOC", "V_SPLIT_PAGE", "V_SPLIT_FAILED",
    "V_DEFERRED", "V_UNDERUSED", "V_SPLIT_PMD", "V_ZERO_PAGE_ALLOC", "V_SWPOUT_FALLBACK",
    # ksmd: run, its cursor (ksm_scan), pressure scans left, the batch's budget, the pools'
    # fill, the tree roots
    "RUN", "CUR_SLOT", "CUR_ADDR", "CUR_PREV", "PRESSURE", "BUDGET", "NK", "NN", "ROOT_S",
    "ROOT_U",
    # KSM knobs: pages_to_scan, use_zero_pages, smart_scan, max_page_sharing,
    # sleep_millisecs, stable_node_chains_prune_millisecs
    "K_PTS", "K_UZP", "K_SMART", "K_MPS", "K_SLEEP", "K_PRUNE",
    # mm slots, deferred queue's next position, rmap frees charged at the next flush
    "NSLOTS", "DEFER_SEQ", "PENDING_FREE",
    # switches from the policy and knobs (FastSimulation._params())
    "REMAP_KSM", "SCAN_THP_P", "SCAN_THP_NP", "SKIP_ZP", "THP_ALLOWED_ALWAYS",
    "THP_ALLOWED_MADV", "DEFER_ON",
    # ksmd's batches so far
    "BATCHES",
    # multi-size THP: the orders below PMD a fault may allocate (bit o: order o), in a
    # VMA without / with VM_HUGEPAGE (thp_vma_allowable_orders(); none if VM_NOHUGEPAGE)
    "MTHP_ORDERS_PLAIN", "MTHP_ORDERS_MADV",
    # then count_mthp_stat()/mod_mthp_stat() per order 0..PMD_ORDER, in MTHP_STATS
    # order (mthp_g(): MTHP_<order>_<stat>)
    *(f"MTHP_{o}_{st}" for o in range(PMD_ORDER + 1) for st in MTHP_STATS),
)
(PAGES_SCANNED, PAGES_SHARED, PAGES_SHARING, PAGES_UNSHARED, PAGES_SKIPPED,
 RMAP_ITEMS, CHAINS, DUPS, SEQNR, KSM_ZERO, ANON_RSS, NR_THP, THP_RANGES,
 V_FAULT_ALLOC, V_FAULT_FALLBACK, V_COLLAPSE_ALLOC, V_SPLIT_PAGE, V_SPLIT_FAILED,
 V_DEFERRED, V_UNDERUSED, V_SPLIT_PMD, V_ZERO_PAGE_ALLOC, V_SWPOUT_FALLBACK,
 RUN, CUR_SLOT, CUR_ADDR, CUR_PREV, PRESSURE, BUDGET, NK, NN, ROOT_S,
 ROOT_U,
 K_PTS, K_UZP, K_SMART, K_MPS, K_SLEEP, K_PRUNE,
 NSLOTS, DEFER_SEQ, PENDING_FREE,
 REMAP_KSM, SCAN_THP_P, SCAN_THP_NP, SKIP_ZP, THP_ALLOWED_ALWAYS,
 THP_ALLOWED_MADV, DEFER_ON,
 BATCHES,
 MTHP_ORDERS_PLAIN, MTHP_ORDERS_MADV,
 MTHP_G) = range(G_NAMES.index(f"MTHP_0_{MTHP_STATS[0]}") + 1)  # MTHP_G: the block's first
# compile-time ints for numba; tests check the names
N_G = len(G_NAMES)
# the per-size stats, by position in MTHP_STATS
M_FAULT_ALLOC, M_SPLIT, M_SPLIT_FAILED, M_SPLIT_DEFERRED, M_NR_ANON = range(len(MTHP_STATS))
N_MSTAT = len(MTHP_STATS)
# meter: float64 clocks, then how often each cost was charged (CpuMeter.counts), by C_*;
# CPU_BATCH0: the CPU meter when the batch began; ADV_*: the model's clock at the last
# full scan's start and end, and the CPU meter at its end (the advisor's inputs)
(CPU, NOW, T_KSMD, T_SCAN_END, CPU_BATCH0, ADV_T_START, ADV_T_END, ADV_CPU_END,
 F_COUNTS) = range(9)
N_F = F_COUNTS + len(COST_FIELDS)


def named(glob: I64) -> dict[str, int]:
    """The int64 globals by name (for a reader, a debugger or a test)."""
    return {n: int(glob[i]) for i, n in enumerate(G_NAMES)}


@jit(inline=True)
def mthp_g(order: int, stat: int) -> int:
    """The global of one per-size stat (M_*) of one folio order."""
    return MTHP_G + order * N_MSTAT + stat


VMSTAT = VMSTAT_EVENTS  # in glob from V_FAULT_ALLOC on, in this order
VMSTAT_G = dict(zip(VMSTAT, range(V_FAULT_ALLOC, V_SWPOUT_FALLBACK + 1), strict=True))

# prices by position in COST_FIELDS (price: the profile's values in that order)
(C_VISIT, C_PTE_SKIP, C_RMAP_ALLOC, C_RMAP_FREE, C_CHECKSUM, C_STABLE_LEVEL,
 C_UNSTABLE_LEVEL, C_MEMCMP, C_MERGE, C_ZERO_MERGE, C_BREAK_COW, C_SPLIT, C_ZT_ZERO, C_ZT_DATA,
 C_REMAP_PTE, C_FREE_PAGE, C_SPLIT_FAILED, C_SCAN_START, C_BATCH, C_DUP_VISIT, C_SMART_SKIP,
 C_COLD, C_COLD_WINDOW, C_SLACK, C_TICK) = range(len(COST_FIELDS))



@jit(inline=True)
def charge(meter: F64, price: F64, k: int, n: float) -> None:
    """CpuMeter.charge(): ``n`` of cost ``k``, counted and added to ksmd's CPU."""
    meter[F_COUNTS + k] += n
    meter[CPU] += n * price[k]


# remap modes (policies.Remap)
R_NONE, R_CLEAN, R_KSM = 0, 1, 2


class Slots(NamedTuple):
    pte: I32
    scid: U32
    iflags: U8
    iseq: U8
    iage: U8
    iskip: U8
    ired: U8
    ichk: U32
    ileft: I32
    iright: I32
    ipar: I32


class Ranges(NamedTuple):
    """Per 2 MiB range: PMD state, deferred-queue position, owning VMA, rmap items."""

    pmd: U8
    qseq: I64
    vma: I32
    # rmap items on the range's slots: a walk that skips PMD-mapped THPs passes a
    # range without any in one step (ksmd._thp_passes())
    nitems: I32


class Vmas(NamedTuple):
    """Per VMA (sorted by mm, then start) and per mm."""

    base: I64
    n: I64
    merge: U8
    anon: U8
    huge: U8
    nohuge: U8
    mm_first: I64
    mm_count: I64
    ksm_slots: I64


class Pool(NamedTuple):
    """KSM pages (k*) and stable nodes (n*); ``kname``, ``nhead`` and ``ev``: KSM's
    event stream (:mod:`.events`; placeholders when it is off)."""

    kcid: U32
    kmap: I32
    knode: I32
    nkpage: I32
    nchain: U8
    nhl: I32
    ndead: U8
    nchainof: I32
    nfirst: I32
    nnext: I32
    nprev: I32
    ndups: I32
    nprune: F64
    nleft: I32
    nright: I32
    npar: I32
    nred: U8
    kname: I32
    nhead: I32
    ev: Events


def code_of(ids: npt.NDArray[np.uint64]) -> U32:
    """Content ids -> 32-bit codes in the same order."""
    out = ids.astype(np.uint64, copy=True)
    uniq = (ids >= UNIQUE_BASE) & (ids < FRESH_BASE)
    fresh = ids >= FRESH_BASE
    out[uniq] = ids[uniq] - np.uint64(UNIQUE_BASE) + np.uint64(UNIQ_CODE)
    out[fresh] = ids[fresh] - np.uint64(FRESH_BASE) + np.uint64(FRESH_CODE)
    return out.astype(np.uint32)


def new_slots(n: int) -> Slots:
    return Slots(
        pte=np.full(n, NONE, np.int32), scid=np.zeros(n, np.uint32),
        iflags=np.zeros(n, np.uint8), iseq=np.zeros(n, np.uint8), iage=np.zeros(n, np.uint8),
        iskip=np.zeros(n, np.uint8), ired=np.zeros(n, np.uint8), ichk=np.zeros(n, np.uint32),
        ileft=np.full(n, -1, np.int32), iright=np.full(n, -1, np.int32),
        ipar=np.full(n, -1, np.int32),
    )


def new_pool(nk: int, nn: int, ev: Events) -> Pool:
    return Pool(
        kcid=np.zeros(nk, np.uint32), kmap=np.zeros(nk, np.int32),
        knode=np.full(nk, -1, np.int32),
        nkpage=np.full(nn, -1, np.int32), nchain=np.zeros(nn, np.uint8),
        nhl=np.zeros(nn, np.int32), ndead=np.zeros(nn, np.uint8),
        nchainof=np.full(nn, -1, np.int32), nfirst=np.full(nn, -1, np.int32),
        nnext=np.full(nn, -1, np.int32), nprev=np.full(nn, -1, np.int32),
        ndups=np.zeros(nn, np.int32), nprune=np.zeros(nn, np.float64),
        nleft=np.full(nn, -1, np.int32), nright=np.full(nn, -1, np.int32),
        npar=np.full(nn, -1, np.int32), nred=np.zeros(nn, np.uint8),
        kname=np.full(nk, -1, np.int32), nhead=np.full(nn, -1, np.int32), ev=ev,
    )


def grow_pool(p: Pool, nk: int, nn: int) -> Pool:
    """A pool with room for ``nk`` KSM pages and ``nn`` nodes, contents kept."""
    fresh = new_pool(nk, nn, p.ev)
    out: list[Any] = []
    for name in Pool._fields[:-1]:  # the arrays; ev is kept
        old: npt.NDArray[Any] = getattr(p, name)
        new: npt.NDArray[Any] = getattr(fresh, name)
        new[: len(old)] = old
        out.append(new)
    return Pool._make([*out, p.ev])
