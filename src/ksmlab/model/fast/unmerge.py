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
def unmerge_all(S: Slots, V: Vmas, P: Pool, G: I64, F: F64, C: F64) -> None:
    for cs in range(G[NSLOTS]):
        m = V.ksm_slots[cs]
        first = V.mm_first[m]
        for v in range(first, first + V.mm_count[m]):
            if not V.merge[v] or not V.anon[v]:
                continue
            for s in range(V.base[v], V.base[v] + V.n[v]):
                break_ksm(S, P, G, s)
        for v in range(first, first + V.mm_count[m]):
            for s in range(V.base[v], V.base[v] + V.n[v]):
                if S.iflags[s] & EXISTS:
                    remove_rmap_item_from_tree(S, P, G, s)
                    S.iflags[s] = 0
                    G[RMAP_ITEMS] -= 1
                    charge(F, C, C_RMAP_FREE, 1.0)
    # remove_all_stable_nodes(): an in-order snapshot of the stable tree
    order = np.empty(G[NN], np.int64)
    k = 0
    stack = np.empty(128, np.int64)
    top = 0
    n = G[ROOT_S]
    while top > 0 or n >= 0:
        while n >= 0:
            stack[top] = n
            top += 1
            n = P.nleft[n]
        top -= 1
        n = stack[top]
        order[k] = n
        k += 1
        n = P.nright[n]
    for j in range(k):
        n = order[j]
        if P.nchain[n]:
            d = P.nfirst[n]
            while d >= 0:
                nx = P.nnext[d]
                ksm_get_folio(S, P, G, d)
                d = nx
            if not P.ndead[n]:
                rb.erase(G, ROOT_S, P.nleft, P.nright, P.npar, P.nred, n)
                P.ndead[n] = 1
                G[CHAINS] -= 1
        else:
            ksm_get_folio(S, P, G, n)
    G[ROOT_S] = -1
    G[ROOT_U] = -1
    G[CUR_SLOT] = -1
    G[CUR_ADDR] = -1
    G[CUR_PREV] = -1
    G[SEQNR] = 0
