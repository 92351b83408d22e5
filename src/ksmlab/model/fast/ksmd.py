"""ksmd on arrays (numba): cursor, rmap items, stable and unstable trees.

A line-by-line port of :mod:`ksmlab.model.ksm` (same decisions, same order of
CPU-cost additions, so the float sums are bit-identical).  Pages are handles:
``h >= 0`` is a KSM page of the pool, ``h < 0`` the private page of slot
``-h-1``.  An rmap item lives in the slot of its address.  A stable node's
hlist is a count: when a node goes, its items keep pointing at it and are
treated as unlinked (``ndead``), which is what the exact model makes eager.
With KSM's event stream on (``pool.ev``, :mod:`.events`), the tracepoints are
recorded where the exact model records them, in the same order.
"""

from __future__ import annotations

from ..advisor import scan_clock
from ..costs import ksmd_wake
from ..rules import skip_age
from . import rbtree as rb
from .events import (
    E_MERGE_ONE_PAGE,
    E_MERGE_WITH_KSM_PAGE,
    E_START_SCAN,
    E_STOP_SCAN,
    EV_N,
    EV_SCAN,
    emit,
    ev_on,
    hlist_add,
    hlist_del,
    need_jit,
    own_name,
    removed_node,
)
from .jit import jit
from .pages import break_ksm, folio_of, split_folio
from .state import (
    ADV_CPU_END,
    ADV_T_END,
    ADV_T_START,
    ANON_RSS,
    BATCHES,
    BUDGET,
    C_BATCH,
    C_BREAK_COW,
    C_CHECKSUM,
    C_COLD,
    C_COLD_WINDOW,
    C_DUP_VISIT,
    C_FREE_PAGE,
    C_MEMCMP,
    C_MERGE,
    C_PTE_SKIP,
    C_REMAP_PTE,
    C_RMAP_ALLOC,
    C_RMAP_FREE,
    C_SCAN_START,
    C_SLACK,
    C_SMART_SKIP,
    C_SPLIT,
    C_SPLIT_FAILED,
    C_STABLE_LEVEL,
    C_TICK,
    C_UNSTABLE_LEVEL,
    C_VISIT,
    C_ZERO_MERGE,
    C_ZT_DATA,
    C_ZT_ZERO,
    CHAINS,
    CPU,
    CPU_BATCH0,
    CUR_ADDR,
    CUR_PREV,
    CUR_SLOT,
    DUPS,
    EXISTS,
    F64,
    I64,
    K_MPS,
    K_PRUNE,
    K_PTS,
    K_SLEEP,
    K_SMART,
    K_UZP,
    KSM_ZERO,
    KZERO,
    NK,
    NN,
    NOW,
    NSLOTS,
    OWN,
    PAGES_SCANNED,
    PAGES_SHARED,
    PAGES_SHARING,
    PAGES_SKIPPED,
    PAGES_UNSHARED,
    PENDING_FREE,
    PMD_THP,
    PRESSURE,
    REMAP_KSM,
    RMAP_ITEMS,
    ROOT_S,
    ROOT_U,
    RUN,
    SCAN_THP_NP,
    SCAN_THP_P,
    SEQNR,
    SKIP_ZP,
    STABLE,
    T_KSMD,
    T_SCAN_END,
    UNSTABLE,
    ZERO,
    Pool,
    Ranges,
    Slots,
    Vmas,
    charge,
)

_wake = jit(inline=True)(ksmd_wake)  # the exact model's rules, compiled
_skip_age = jit(inline=True)(skip_age)
_clock = jit(inline=True)(scan_clock)

NOPAGE = 1 << 62
NULLK = NOPAGE + 1
ZEROPAGE = NOPAGE + 2
HPAGE = 512

# ksmd_until() results
KSMD_OK, KSMD_IDLE, KSMD_GROW, KSMD_SCAN_END = 0, 1, 2, 3


@jit(inline=True)
def _cid(page: Slots, pool: Pool, h: int) -> int:
    if h >= 0:
        return int(pool.kcid[h])
    return int(page.scid[-h - 1])


@jit(inline=True)
def _in_thp(page: Slots, ranges: Ranges, h: int) -> bool:
    """page.folio is not None: a subpage of a large folio (PMD-mapped THP, or a
    multi-size THP)."""
    if h >= 0:
        return False
    s = -h - 1
    return bool(ranges.pmd[s // HPAGE] == PMD_THP or page.pte[s] < OWN)


@jit(inline=True)
def _same_folio(page: Slots, ranges: Ranges, a: int, b: int) -> bool:
    """page.folio is tpage.folio (not None)."""
    if a >= 0 or b >= 0:
        return False
    oa, fa = folio_of(page, ranges, -a - 1)
    if oa == 0:
        return False
    ob, fb = folio_of(page, ranges, -b - 1)
    return oa == ob and fa == fb


@jit(inline=True)
def _maps(page: Slots, s: int, h: int) -> bool:
    if h >= 0:
        return bool(page.pte[s] == h)
    return page.pte[s] <= OWN and s == -h - 1


@jit(inline=True)
def _handle_at(page: Slots, s: int) -> int:
    p = page.pte[s]
    if p >= 0:
        return int(p)
    if p <= OWN:
        return -s - 1
    return NOPAGE


@jit(inline=True)
def _vma_ok(ranges: Ranges, vmas: Vmas, s: int) -> bool:
    v = ranges.vma[s // HPAGE]
    return bool(vmas.merge[v] != 0 and vmas.anon[v] != 0)


@jit(inline=True)
def _head(page: Slots, pool: Pool, i: int) -> int:
    """item.head, or -1 (an item of a removed node counts as unlinked)."""
    if page.iflags[i] & STABLE and not pool.ndead[page.ileft[i]]:
        return int(page.ileft[i])
    return -1


@jit(inline=True)
def _scan_thp(glob: I64) -> bool:
    return bool((glob[SCAN_THP_P] if glob[PRESSURE] > 0 else glob[SCAN_THP_NP]) != 0)


@jit(inline=True)
def _is_candidate(pool: Pool, glob: I64, n: int, offset: int) -> bool:
    c = pool.nhl[n]
    return bool(c > 0 and c + offset < glob[K_MPS])


@jit(inline=True)
def _page_name(pool: Pool, h: int) -> int:
    """The name (a slot) of page ``h`` in KSM's events: a KSM page's time-0 page, or
    the slot's own page if it is its time-0 one; -1: none."""
    if h >= 0:
        return int(pool.kname[h])
    return own_name(pool.ev, -h - 1)


# ---- stable nodes ---------------------------------------------------------
@jit()
def _remove_node(page: Slots, pool: Pool, glob: I64, n: int) -> None:
    if ev_on(pool.ev):  # remove_node_from_stable_tree(): ksm_remove_rmap_item/ksm_page
        kp = pool.nkpage[n]
        removed_node(pool.ev, pool.nhead, n, pool.kname[kp] if kp >= 0 else -1)
    c = pool.nhl[n]
    if c > 0:
        glob[PAGES_SHARING] -= c - 1
        glob[PAGES_SHARED] -= 1
    pool.nhl[n] = 0
    ch = pool.nchainof[n]
    if ch >= 0:
        _dup_unlink(pool, ch, n)
        pool.ndups[ch] -= 1
        pool.nchainof[n] = -1
        glob[DUPS] -= 1
    else:
        rb.erase(glob, ROOT_S, pool.nleft, pool.nright, pool.npar, pool.nred, n)
    pool.ndead[n] = 1


@jit()
def _dup_unlink(pool: Pool, ch: int, n: int) -> None:
    pv = pool.nprev[n]
    nx = pool.nnext[n]
    if pv >= 0:
        pool.nnext[pv] = nx
    else:
        pool.nfirst[ch] = nx
    if nx >= 0:
        pool.nprev[nx] = pv
    pool.nprev[n] = -1
    pool.nnext[n] = -1


@jit()
def _dup_push_front(pool: Pool, ch: int, n: int) -> None:
    f = pool.nfirst[ch]
    pool.nnext[n] = f
    pool.nprev[n] = -1
    if f >= 0:
        pool.nprev[f] = n
    pool.nfirst[ch] = n


@jit(inline=True)
def ksm_get_folio(page: Slots, pool: Pool, glob: I64, n: int) -> int:
    kp = pool.nkpage[n]
    if kp < 0 or pool.kmap[kp] <= 0 or pool.knode[kp] != n:
        _remove_node(page, pool, glob, n)
        return -1
    return int(kp)


@jit(inline=True)
def remove_rmap_item_from_tree(page: Slots, pool: Pool, glob: I64, i: int) -> None:
    f = page.iflags[i]
    if f & STABLE:
        n = page.ileft[i]
        if pool.ndead[n]:
            page.iflags[i] = EXISTS
            page.ileft[i] = -1
            return
        if ksm_get_folio(page, pool, glob, n) < 0:
            page.iflags[i] = EXISTS
            page.ileft[i] = -1
            return
        if ev_on(pool.ev):
            hlist_del(pool.ev, pool.nhead, n, i)
        pool.nhl[n] -= 1
        if pool.nhl[n] > 0:
            glob[PAGES_SHARING] -= 1
        else:
            glob[PAGES_SHARED] -= 1
        page.ileft[i] = -1
        page.iflags[i] = EXISTS
    elif f & UNSTABLE:
        age = (glob[SEQNR] - page.iseq[i]) & 0xFF
        if age == 0:
            rb.erase(glob, ROOT_U, page.ileft, page.iright, page.ipar, page.ired, i)
        glob[PAGES_UNSHARED] -= 1
        page.iflags[i] = EXISTS


@jit()
def _alloc_node(pool: Pool, glob: I64, kp: int, chain: bool) -> int:
    n = glob[NN]
    glob[NN] += 1
    pool.nkpage[n] = kp
    pool.nchain[n] = 1 if chain else 0
    pool.nhl[n] = 0
    pool.ndead[n] = 0
    pool.nchainof[n] = -1
    pool.nfirst[n] = -1
    pool.nnext[n] = -1
    pool.nprev[n] = -1
    pool.ndups[n] = 0
    pool.nprune[n] = 0.0
    pool.nleft[n] = -1
    pool.nright[n] = -1
    pool.npar[n] = -1
    pool.nred[n] = 0
    return int(n)


@jit()
def _stable_node_dup(page: Slots, pool: Pool, glob: I64, meter: F64, price: F64, chain: int,
                     prune: bool) -> tuple[int, int, int]:
    interval = glob[K_PRUNE] / 1000.0
    if not prune or meter[NOW] < pool.nprune[chain] + interval:
        prune = False
    else:
        pool.nprune[chain] = meter[NOW]
    found = -1
    found_len = 0
    tree_page = -1
    d = pool.nfirst[chain]
    visited = 0
    while d >= 0:
        nx = pool.nnext[d]
        visited += 1
        kp = ksm_get_folio(page, pool, glob, d)
        if kp >= 0 and (found < 0 or (_is_candidate(pool, glob, d, 0) and (
                not _is_candidate(pool, glob, found, 0) or pool.nhl[d] > found_len))):
            found = int(d)
            found_len = pool.nhl[d]
            tree_page = kp
            if not prune and _is_candidate(pool, glob, found, 0):
                break
        d = nx
    charge(meter, price, C_DUP_VISIT, visited)
    if found < 0:
        rb.erase(glob, ROOT_S, pool.nleft, pool.nright, pool.npar, pool.nred, chain)
        pool.ndead[chain] = 1
        glob[CHAINS] -= 1
        return -1, -1, chain
    if pool.ndups[chain] == 1:
        rb.replace_node(glob, ROOT_S, pool.nleft, pool.nright, pool.npar, pool.nred, chain, found)
        pool.nchainof[found] = -1
        pool.nnext[found] = -1
        pool.nprev[found] = -1
        pool.nfirst[chain] = -1
        pool.ndups[chain] = 0
        pool.ndead[chain] = 1
        glob[CHAINS] -= 1
        glob[DUPS] -= 1
        return tree_page, found, found
    if pool.nfirst[chain] != found and _is_candidate(pool, glob, found, 1):
        _dup_unlink(pool, chain, found)
        _dup_push_front(pool, chain, found)
    return tree_page, found, chain


@jit(inline=True)
def _chain(page: Slots, pool: Pool, glob: I64, meter: F64, price: F64, n: int,
           prune: bool) -> tuple[int, int, int]:
    if not pool.nchain[n]:
        return ksm_get_folio(page, pool, glob, n), n, n
    return _stable_node_dup(page, pool, glob, meter, price, n, prune)


@jit(inline=True)
def _stable_tree_search(page: Slots, pool: Pool, glob: I64, meter: F64, price: F64, h: int) -> int:
    if h >= 0 and pool.knode[h] >= 0:
        return h
    c = _cid(page, pool, h)
    levels = 0
    result = NOPAGE
    while True:
        n = int(glob[ROOT_S])
        restart = False
        while n >= 0:
            levels += 1
            kp, dup, cur = _chain(page, pool, glob, meter, price, n, True)
            if kp < 0 or dup < 0:
                restart = True
                break
            kc = int(pool.kcid[kp])
            if c < kc:
                n = int(pool.nleft[cur])
            elif c > kc:
                n = int(pool.nright[cur])
            else:
                if not _is_candidate(pool, glob, dup, 0):
                    result = NOPAGE
                    break
                kp2 = ksm_get_folio(page, pool, glob, dup)
                if kp2 < 0:
                    restart = True
                    break
                result = kp2
                break
        if not restart:
            break
    charge(meter, price, C_STABLE_LEVEL, levels)
    return result


@jit()
def _chain_add_dup(pool: Pool, glob: I64, dup: int, chain: int) -> None:
    pool.nchainof[dup] = chain
    _dup_push_front(pool, chain, dup)
    pool.ndups[chain] += 1
    glob[DUPS] += 1


@jit()
def _stable_tree_insert(page: Slots, pool: Pool, glob: I64, meter: F64, price: F64, kp: int) -> int:
    c = int(pool.kcid[kp])
    levels = 0
    while True:
        parent = -1
        left = False
        n = int(glob[ROOT_S])
        match = -1
        restart = False
        while n >= 0:
            levels += 1
            kp2, _dup, cur = _chain(page, pool, glob, meter, price, n, False)
            if kp2 < 0:
                restart = True
                break
            parent = cur
            kc = int(pool.kcid[kp2])
            if c < kc:
                n = int(pool.nleft[cur])
                left = True
            elif c > kc:
                n = int(pool.nright[cur])
                left = False
            else:
                match = cur
                break
        if not restart:
            break
    charge(meter, price, C_STABLE_LEVEL, levels)
    new = _alloc_node(pool, glob, kp, False)
    if match < 0:
        rb.link_node(glob, ROOT_S, pool.nleft, pool.nright, pool.npar, pool.nred, new, parent, left)
        rb.insert_color(glob, ROOT_S, pool.nleft, pool.nright, pool.npar, pool.nred, new)
    else:
        chain = match
        if not pool.nchain[match]:
            chain = _alloc_node(pool, glob, -1, True)
            pool.nprune[chain] = meter[NOW]
            rb.replace_node(glob, ROOT_S, pool.nleft, pool.nright, pool.npar, pool.nred, match,
                            chain)
            glob[CHAINS] += 1
            _chain_add_dup(pool, glob, match, chain)
        _chain_add_dup(pool, glob, new, chain)
    pool.knode[kp] = new
    return new


@jit(inline=True)
def _stable_tree_append(page: Slots, pool: Pool, glob: I64, i: int, n: int) -> None:
    if ev_on(pool.ev):
        hlist_add(pool.ev, pool.nhead, n, i)
    pool.nhl[n] += 1
    page.ileft[i] = n
    page.iflags[i] = EXISTS | STABLE
    if pool.nhl[n] > 1:
        glob[PAGES_SHARING] += 1
    else:
        glob[PAGES_SHARED] += 1


# ---- unstable tree ----------------------------------------------------------
@jit(inline=True)
def _unstable_search_insert(page: Slots, ranges: Ranges, vmas: Vmas, pool: Pool, glob: I64,
                            meter: F64, price: F64,
                            i: int, h: int) -> tuple[int, int]:
    """(tree item slot, its page) or (-1, NOPAGE)."""
    c = _cid(page, pool, h)
    levels = 0
    res_i = -1
    res_h = NOPAGE
    while True:
        parent = -1
        left = False
        n = int(glob[ROOT_U])
        restart = False
        done = False
        while n >= 0:
            levels += 1
            tp = _handle_at(page, n) if _vma_ok(ranges, vmas, n) else NOPAGE
            if tp == NOPAGE:
                if glob[SKIP_ZP] and (page.pte[n] == ZERO or page.pte[n] == KZERO):
                    remove_rmap_item_from_tree(page, pool, glob, n)
                    restart = True
                    break
                done = True
                break
            if tp == h:
                done = True
                break
            parent = n
            tc = _cid(page, pool, tp)
            if c < tc:
                n = int(page.ileft[n])
                left = True
            elif c > tc:
                n = int(page.iright[n])
                left = False
            else:
                charge(meter, price, C_MEMCMP, 1.0)
                res_i = n
                res_h = tp
                done = True
                break
        if restart:
            continue
        if not done:
            page.iflags[i] = EXISTS | UNSTABLE
            page.iseq[i] = glob[SEQNR] & 0xFF
            rb.link_node(glob, ROOT_U, page.ileft, page.iright, page.ipar, page.ired, i, parent,
                         left)
            rb.insert_color(glob, ROOT_U, page.ileft, page.iright, page.ipar, page.ired, i)
            glob[PAGES_UNSHARED] += 1
        break
    charge(meter, price, C_UNSTABLE_LEVEL, levels)
    return res_i, res_h


# ---- merging ----------------------------------------------------------------
@jit()
def _ksm_split(page: Slots, ranges: Ranges, glob: I64, price: F64, meter: F64, s: int,
               extra: int) -> bool:
    """Ksm._split(): split the large folio of slot ``s`` (its page is kept for the merge)."""
    budget = max(0, glob[BUDGET])
    ok, zt, dt, rem, krem, nr = split_folio(page, ranges, glob, s, glob[REMAP_KSM], extra, s,
                                            budget)
    if not ok:
        charge(meter, price, C_SPLIT_FAILED, 1.0)
        return False
    # CpuMeter.charge() one cost at a time (the float sum's order matters)
    charge(meter, price, C_SPLIT, 1.0)
    charge(meter, price, C_ZT_ZERO, zt)
    charge(meter, price, C_ZT_DATA, dt)
    charge(meter, price, C_REMAP_PTE, nr)
    charge(meter, price, C_FREE_PAGE, rem)
    if krem:
        glob[BUDGET] -= krem
        glob[PAGES_SCANNED] += krem
    return True


@jit(inline=True)
def _put_mapping(pool: Pool, h: int) -> None:
    if h >= 0:
        pool.kmap[h] -= 1


@jit()
def _merge_one_page(page: Slots, ranges: Ranges, pool: Pool, glob: I64, meter: F64, price: F64,
                    s: int, h: int,
                    kpage: int, extra: int) -> int:
    """try_to_merge_one_page() for the item at slot ``s``: 0 or -1."""
    if h == kpage:
        return 0
    if _in_thp(page, ranges, h):
        if not _scan_thp(glob):
            return -1
        if not _ksm_split(page, ranges, glob, price, meter, -h - 1, extra):
            return -1
    if not _maps(page, s, h):
        return -1
    if kpage == NULLK:
        if h >= 0:
            pool.knode[h] = -1
        else:
            k = glob[NK]
            glob[NK] += 1
            pool.kcid[k] = page.scid[s]
            pool.kmap[k] = 1
            pool.knode[k] = -1
            page.pte[s] = k
            if ev_on(pool.ev):  # the private page becomes the KSM page
                pool.kname[k] = own_name(pool.ev, s)
                pool.ev.orig[s] = 0
        return 0
    charge(meter, price, C_MEMCMP, 1.0)
    if kpage == ZEROPAGE:
        if _cid(page, pool, h) != 0:
            return -1
        charge(meter, price, C_ZERO_MERGE, 1.0)
        page.pte[s] = KZERO
        if ev_on(pool.ev):
            pool.ev.orig[s] = 0
        glob[KSM_ZERO] += 1
        glob[ANON_RSS] -= 1
        _put_mapping(pool, h)
        return 0
    if _cid(page, pool, h) != pool.kcid[kpage]:
        return -1
    charge(meter, price, C_MERGE, 1.0)
    page.pte[s] = kpage
    if ev_on(pool.ev):
        pool.ev.orig[s] = 0
    pool.kmap[kpage] += 1
    _put_mapping(pool, h)
    return 0


@jit()
def _merge_with_ksm_page(page: Slots, ranges: Ranges, vmas: Vmas, pool: Pool, glob: I64,
                         meter: F64, price: F64,
                         s: int, h: int, kpage: int, extra: int) -> int:
    on = ev_on(pool.ev)
    # the page the event names: the KSM page's, else the item's own (as it was)
    name = _page_name(pool, h if kpage == NULLK else kpage) if on else -1
    err = -1
    if _vma_ok(ranges, vmas, s):
        err = _merge_one_page(page, ranges, pool, glob, meter, price, s, h, kpage, extra)
        if not err:
            remove_rmap_item_from_tree(page, pool, glob, s)
    if on:  # try_to_merge_with_ksm_page(): ksm_merge_with_ksm_page
        emit(pool.ev, E_MERGE_WITH_KSM_PAGE, s, 0 if err == 0 else -14, name,
             1 if kpage != NULLK else 0)
    return err


@jit(inline=True)
def _cmp_and_merge_page(page: Slots, ranges: Ranges, vmas: Vmas, pool: Pool, glob: I64, meter: F64,
                        price: F64,
                        i: int) -> None:
    h = _handle_at(page, i)
    node = int(pool.knode[h]) if h >= 0 else -1
    if node >= 0:
        if _head(page, pool, i) == node:
            return
    else:
        remove_rmap_item_from_tree(page, pool, glob, i)
        charge(meter, price, C_CHECKSUM, 1.0)
        checksum = _cid(page, pool, h) + 1
        if page.ichk[i] != checksum:
            page.ichk[i] = checksum
            return
        # try_to_merge_with_zero_page(): 0 (merged, or no vma) ends here
        if glob[K_UZP] and page.ichk[i] == 1:
            if not _vma_ok(ranges, vmas, i):
                return
            err = _merge_one_page(page, ranges, pool, glob, meter, price, i, h, ZEROPAGE, 0)
            if ev_on(pool.ev):  # try_to_merge_with_zero_page(): ksm_merge_one_page
                emit(pool.ev, E_MERGE_ONE_PAGE, i, 0 if err == 0 else -14, -1, 0)
            if err == 0:
                return
        if glob[SKIP_ZP] and (page.pte[i] == ZERO or page.pte[i] == KZERO):
            return
    kpage = _stable_tree_search(page, pool, glob, meter, price, h)
    if kpage == h and _head(page, pool, i) == node:
        return
    remove_rmap_item_from_tree(page, pool, glob, i)
    if kpage != NOPAGE:
        if _merge_with_ksm_page(page, ranges, vmas, pool, glob, meter, price, i, h, kpage, 0) == 0:
            _stable_tree_append(page, pool, glob, i, int(pool.knode[kpage]))
        return
    ti, th = _unstable_search_insert(page, ranges, vmas, pool, glob, meter, price, i, h)
    if ti < 0:
        return
    # try_to_merge_two_pages()
    extra = 1 if _same_folio(page, ranges, h, th) else 0
    kp = NOPAGE
    err = _merge_with_ksm_page(page, ranges, vmas, pool, glob, meter, price, i, h, NULLK, extra)
    if not err:
        h2 = int(page.pte[i])
        err = _merge_with_ksm_page(page, ranges, vmas, pool, glob, meter, price, ti, th, h2, 0)
        if err:
            if _vma_ok(ranges, vmas, i):  # break_cow()
                break_ksm(page, pool, glob, i)
                charge(meter, price, C_BREAK_COW, 1.0)
        else:
            kp = h2
    split = _same_folio(page, ranges, h, th)
    if kp != NOPAGE:
        n2 = _stable_tree_insert(page, pool, glob, meter, price, kp)
        _stable_tree_append(page, pool, glob, ti, n2)
        _stable_tree_append(page, pool, glob, i, n2)
    elif split and _in_thp(page, ranges, h):
        # same large folio: the split failed on our two refs; retry without merging
        _ksm_split(page, ranges, glob, price, meter, -h - 1, 0)


# ---- the cursor ---------------------------------------------------------------
@jit(inline=True)
def _flush_frees(glob: I64, meter: F64, price: F64) -> None:
    for _ in range(glob[PENDING_FREE]):
        charge(meter, price, C_RMAP_FREE, 1.0)
    glob[PENDING_FREE] = 0


@jit(inline=True)
def _drop_item(page: Slots, ranges: Ranges, pool: Pool, glob: I64, i: int) -> None:
    """An item passed over: unlinked now, its free charged at the next flush."""
    remove_rmap_item_from_tree(page, pool, glob, i)
    page.iflags[i] = 0
    ranges.nitems[i // HPAGE] -= 1
    glob[RMAP_ITEMS] -= 1
    glob[PENDING_FREE] += 1


@jit(inline=True)
def _should_skip(page: Slots, pool: Pool, glob: I64, i: int, h: int) -> bool:
    if not glob[K_SMART] or h >= 0:
        return False
    age = page.iage[i]
    if age != 255:
        page.iage[i] = age + 1
    if age < 3:
        return False
    if not page.iskip[i]:
        page.iskip[i] = _skip_age(age)
        return False
    glob[PAGES_SKIPPED] += 1
    page.iskip[i] -= 1
    remove_rmap_item_from_tree(page, pool, glob, i)
    return True


@jit(inline=True)
def _thp_passes(ranges: Ranges, i: int, vend: int) -> bool:
    """Whether _scan_mm() with THPs skipped would pass over the whole range from
    ``i`` (aligned) without stopping or dropping an item: a PMD-mapped THP (its
    PTEs are all its own subpages) without an rmap item."""
    r = i // HPAGE
    return i + HPAGE <= vend and ranges.pmd[r] == PMD_THP and ranges.nitems[r] == 0


@jit(inline=True)
def _scan_mm(page: Slots, ranges: Ranges, vmas: Vmas, pool: Pool, glob: I64, meter: F64,
             price: F64, m: int) -> int:
    scan_thp = _scan_thp(glob)
    first = vmas.mm_first[m]
    for v in range(first, first + vmas.mm_count[m]):
        vbase = vmas.base[v]
        vend = vbase + vmas.n[v]
        if not vmas.merge[v] or vend <= glob[CUR_ADDR]:
            continue
        if glob[CUR_ADDR] < vbase:
            glob[CUR_ADDR] = vbase
        if not vmas.anon[v]:
            glob[CUR_ADDR] = vend
            continue
        i = glob[CUR_ADDR]
        skipped = 0
        while i < vend:
            p = page.pte[i]
            if (p >= 0 or p <= OWN) and (scan_thp or p >= 0
                                         or ranges.pmd[i // HPAGE] != PMD_THP):
                _flush_frees(glob, meter, price)
                if not page.iflags[i] & EXISTS:
                    page.iflags[i] = EXISTS
                    page.ichk[i] = 0
                    page.iage[i] = 0
                    page.iskip[i] = 0
                    page.iseq[i] = 0
                    page.ileft[i] = -1
                    page.iright[i] = -1
                    page.ipar[i] = -1
                    glob[RMAP_ITEMS] += 1
                    ranges.nitems[i // HPAGE] += 1
                    charge(meter, price, C_RMAP_ALLOC, 1.0)
                glob[CUR_PREV] = i
                h = int(p) if p >= 0 else -i - 1
                if _should_skip(page, pool, glob, i, h):
                    charge(meter, price, C_SMART_SKIP, 1.0)
                    i += 1
                    continue
                charge(meter, price, C_PTE_SKIP, skipped)
                glob[CUR_ADDR] = i + 1
                return int(i)
            if page.iflags[i] & EXISTS:
                _drop_item(page, ranges, pool, glob, i)
            elif not scan_thp and i % HPAGE == 0 and _thp_passes(ranges, i, vend):
                # a PMD-mapped THP a policy skips, with no small page and no rmap item
                # in it: the walk over its 512 PTEs at once (same result, same charge)
                skipped += HPAGE
                i += HPAGE
                continue
            skipped += 1
            i += 1
        charge(meter, price, C_PTE_SKIP, skipped)
        glob[CUR_ADDR] = vend
    return -1


@jit(inline=True)
def _scan_get_next(page: Slots, ranges: Ranges, vmas: Vmas, pool: Pool, glob: I64, meter: F64,
                   price: F64) -> int:
    if glob[NSLOTS] == 0:
        return -1
    if glob[CUR_SLOT] < 0:
        # advisor_start_scan(): its clock, for FastSimulation's advisor at the scan end
        meter[ADV_T_START] = _clock(meter[NOW], meter[CPU], meter[CPU_BATCH0])
        charge(meter, price, C_SCAN_START, 1.0)
        if ev_on(pool.ev):  # scan_get_next_rmap_item(): trace_ksm_start_scan()
            pool.ev.ctl[EV_SCAN] = glob[SEQNR]
            emit(pool.ev, E_START_SCAN, glob[SEQNR], glob[RMAP_ITEMS], -1, 0)
        glob[ROOT_U] = -1
        glob[CUR_SLOT] = 0
        glob[CUR_ADDR] = -1
        glob[CUR_PREV] = -1
    while True:
        cs = glob[CUR_SLOT]
        m = vmas.ksm_slots[cs]
        found = _scan_mm(page, ranges, vmas, pool, glob, meter, price, m)
        if found >= 0:
            return found
        _flush_frees(glob, meter, price)  # _remove_trailing_rmap_items()
        if glob[CUR_ADDR] < 0:
            for k in range(cs, glob[NSLOTS] - 1):
                vmas.ksm_slots[k] = vmas.ksm_slots[k + 1]
            glob[NSLOTS] -= 1
        else:
            glob[CUR_SLOT] += 1
        glob[CUR_ADDR] = -1
        glob[CUR_PREV] = -1
        if glob[CUR_SLOT] >= glob[NSLOTS]:
            glob[CUR_SLOT] = -1
            # advisor_stop_scan()'s inputs; ksmd_until() returns after this batch and
            # FastSimulation sets the next batch's pages_to_scan
            meter[ADV_T_END] = _clock(meter[NOW], meter[CPU], meter[CPU_BATCH0])
            meter[ADV_CPU_END] = meter[CPU]
            if ev_on(pool.ev):  # trace_ksm_stop_scan()
                emit(pool.ev, E_STOP_SCAN, glob[SEQNR], glob[RMAP_ITEMS], -1, 0)
                pool.ev.ctl[EV_SCAN] = -1
            glob[SEQNR] += 1
            if glob[PRESSURE] > 0:
                glob[PRESSURE] -= 1
            return -1


@jit()
def do_scan(page: Slots, ranges: Ranges, vmas: Vmas, pool: Pool, glob: I64, meter: F64,
            price: F64) -> bool:
    glob[BUDGET] = glob[K_PTS]
    while glob[BUDGET] > 0:
        glob[BUDGET] -= 1
        i = _scan_get_next(page, ranges, vmas, pool, glob, meter, price)
        if i < 0:
            return True
        charge(meter, price, C_VISIT, 1.0)
        _cmp_and_merge_page(page, ranges, vmas, pool, glob, meter, price, i)
        glob[PAGES_SCANNED] += 1
    return False


@jit()
def ksmd_until(page: Slots, ranges: Ranges, vmas: Vmas, pool: Pool, glob: I64, meter: F64,
               price: F64, t_next: float,
               inclusive: bool, t_end: float, room_k: int, room_n: int) -> int:
    """Run ksmd's batches while its wake-up time is before ``t_next`` (the next
    other action; at ``t_next`` too when ``inclusive``: that action's heap priority
    is after ksmd's) and not after ``t_end``.  KSMD_GROW: the pools need room;
    KSMD_SCAN_END: the last batch ended a full scan, at meter[T_SCAN_END]."""
    t = meter[T_KSMD]
    need = glob[K_PTS]
    while (t < t_next or (inclusive and t == t_next)) and t <= t_end:
        if glob[RUN] != 1 or glob[NSLOTS] == 0:
            return KSMD_IDLE
        if glob[NK] + need > room_k or glob[NN] + 2 * need > room_n:
            return KSMD_GROW
        if ev_on(pool.ev) and pool.ev.ctl[EV_N] + need_jit(
                need, glob[PAGES_SHARED], glob[PAGES_SHARING], glob[NN]) > len(pool.ev.t):
            return KSMD_GROW  # room for KSM's events
        before = meter[CPU]
        scans = glob[SEQNR]
        meter[NOW] = t
        meter[CPU_BATCH0] = before
        if ev_on(pool.ev):
            pool.ev.clock[0] = t
        do_scan(page, ranges, vmas, pool, glob, meter, price)
        charge(meter, price, C_BATCH, 1.0)
        charge(meter, price, C_COLD, min(meter[CPU] - before, price[C_COLD_WINDOW]))
        glob[BATCHES] += 1
        busy = (meter[CPU] - before) / 1e9
        meter[T_SCAN_END] = t + busy
        t = _wake(t, busy, glob[K_SLEEP], price[C_SLACK], price[C_TICK])
        meter[T_KSMD] = t
        if glob[SEQNR] > scans:
            return KSMD_SCAN_END
    return KSMD_OK
