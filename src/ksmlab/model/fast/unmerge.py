"""run=2 on arrays: unmerge_and_remove_all_rmap_items() (numba)."""

from __future__ import annotations

import numpy as np

from . import rbtree as rb
from .jit import jit
from .ksmd import ksm_get_folio, remove_rmap_item_from_tree
from .pages import break_ksm
from .state import (
    C_RMAP_FREE,
    CHAINS,
    CUR_ADDR,
    CUR_PREV,
    CUR_SLOT,
    EXISTS,
    F64,
    I64,
    NN,
    NSLOTS,
    RMAP_ITEMS,
    ROOT_S,
    ROOT_U,
    SEQNR,
    Pool,
    Slots,
    Vmas,
    charge,
)


@jit(nrt=True)
def unmerge_all(page: Slots, vmas: Vmas, pool: Pool, glob: I64, meter: F64, price: F64) -> None:
    for cs in range(glob[NSLOTS]):
        m = vmas.ksm_slots[cs]
        first = vmas.mm_first[m]
        for v in range(first, first + vmas.mm_count[m]):
            if not vmas.merge[v] or not vmas.anon[v]:
                continue
            for s in range(vmas.base[v], vmas.base[v] + vmas.n[v]):
                break_ksm(page, pool, glob, s)
        for v in range(first, first + vmas.mm_count[m]):
            for s in range(vmas.base[v], vmas.base[v] + vmas.n[v]):
                if page.iflags[s] & EXISTS:
                    remove_rmap_item_from_tree(page, pool, glob, s)
                    page.iflags[s] = 0
                    glob[RMAP_ITEMS] -= 1
                    charge(meter, price, C_RMAP_FREE, 1.0)
    # remove_all_stable_nodes(): an in-order snapshot of the stable tree
    order = np.empty(glob[NN], np.int64)
    k = 0
    stack = np.empty(128, np.int64)
    top = 0
    n = glob[ROOT_S]
    while top > 0 or n >= 0:
        while n >= 0:
            stack[top] = n
            top += 1
            n = pool.nleft[n]
        top -= 1
        n = stack[top]
        order[k] = n
        k += 1
        n = pool.nright[n]
    for j in range(k):
        n = order[j]
        if pool.nchain[n]:
            d = pool.nfirst[n]
            while d >= 0:
                nx = pool.nnext[d]
                ksm_get_folio(page, pool, glob, d)
                d = nx
            if not pool.ndead[n]:
                rb.erase(glob, ROOT_S, pool.nleft, pool.nright, pool.npar, pool.nred, n)
                pool.ndead[n] = 1
                glob[CHAINS] -= 1
        else:
            ksm_get_folio(page, pool, glob, n)
    glob[ROOT_S] = -1
    glob[ROOT_U] = -1
    glob[CUR_SLOT] = -1
    glob[CUR_ADDR] = -1
    glob[CUR_PREV] = -1
    glob[SEQNR] = 0
