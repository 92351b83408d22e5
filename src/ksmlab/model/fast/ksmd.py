"""ksmd on arrays (numba): cursor, rmap items, stable and unstable trees.

A line-by-line port of :mod:`ksmlab.model.ksm` (same decisions, same order of
CPU-cost additions, so the float sums are bit-identical).  Pages are handles:
``h >= 0`` is a KSM page of the pool, ``h < 0`` the private page of slot
``-h-1``.  An rmap item lives in the slot of its address.  A stable node's
hlist is a count: when a node goes, its items keep pointing at it and are
treated as unlinked (``ndead``), which is what the exact model makes eager.
"""

from __future__ import annotations

from ..costs import ksmd_wake
from ..rules import skip_age
from . import rbtree as rb
from .jit import jit
from .pages import break_ksm, split_folio
from .state import (
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

NOPAGE = 1 << 62
NULLK = NOPAGE + 1
ZEROPAGE = NOPAGE + 2
HPAGE = 512

# ksmd_until() results
KSMD_OK, KSMD_IDLE, KSMD_GROW, KSMD_SCAN_END = 0, 1, 2, 3


@jit(inline=True)
def _cid(S: Slots, P: Pool, h: int) -> int:
    if h >= 0:
        return int(P.kcid[h])
    return int(S.scid[-h - 1])


@jit(inline=True)
def _in_thp(S: Slots, R: Ranges, h: int) -> bool:
    return h < 0 and R.pmd[(-h - 1) // HPAGE] == PMD_THP


@jit(inline=True)
def _same_folio(S: Slots, R: Ranges, a: int, b: int) -> bool:
    return (_in_thp(S, R, a) and _in_thp(S, R, b)
            and (-a - 1) // HPAGE == (-b - 1) // HPAGE)


@jit(inline=True)
def _maps(S: Slots, s: int, h: int) -> bool:
    if h >= 0:
        return bool(S.pte[s] == h)
    return S.pte[s] == OWN and s == -h - 1


@jit(inline=True)
def _handle_at(S: Slots, s: int) -> int:
    p = S.pte[s]
    if p >= 0:
        return int(p)
    if p == OWN:
        return -s - 1
    return NOPAGE


@jit(inline=True)
def _vma_ok(R: Ranges, V: Vmas, s: int) -> bool:
    v = R.vma[s // HPAGE]
    return bool(V.merge[v] != 0 and V.anon[v] != 0)


@jit(inline=True)
def _head(S: Slots, P: Pool, i: int) -> int:
    """item.head, or -1 (an item of a removed node counts as unlinked)."""
    if S.iflags[i] & STABLE and not P.ndead[S.ileft[i]]:
        return int(S.ileft[i])
    return -1


@jit(inline=True)
def _scan_thp(G: I64) -> bool:
    return bool((G[SCAN_THP_P] if G[PRESSURE] > 0 else G[SCAN_THP_NP]) != 0)


@jit(inline=True)
def _is_candidate(P: Pool, G: I64, n: int, offset: int) -> bool:
    c = P.nhl[n]
    return bool(c > 0 and c + offset < G[K_MPS])


# ---- stable nodes ---------------------------------------------------------
@jit()
def _remove_node(S: Slots, P: Pool, G: I64, n: int) -> None:
    c = P.nhl[n]
    if c > 0:
        G[PAGES_SHARING] -= c - 1
        G[PAGES_SHARED] -= 1
    P.nhl[n] = 0
    ch = P.nchainof[n]
    if ch >= 0:
        _dup_unlink(P, ch, n)
        P.ndups[ch] -= 1
        P.nchainof[n] = -1
        G[DUPS] -= 1
    else:
        rb.erase(G, ROOT_S, P.nleft, P.nright, P.npar, P.nred, n)
    P.ndead[n] = 1


@jit()
def _dup_unlink(P: Pool, ch: int, n: int) -> None:
    pv = P.nprev[n]
    nx = P.nnext[n]
    if pv >= 0:
        P.nnext[pv] = nx
    else:
        P.nfirst[ch] = nx
    if nx >= 0:
        P.nprev[nx] = pv
    P.nprev[n] = -1
    P.nnext[n] = -1


@jit()
def _dup_push_front(P: Pool, ch: int, n: int) -> None:
    f = P.nfirst[ch]
    P.nnext[n] = f
    P.nprev[n] = -1
    if f >= 0:
        P.nprev[f] = n
    P.nfirst[ch] = n


@jit(inline=True)
def ksm_get_folio(S: Slots, P: Pool, G: I64, n: int) -> int:
    kp = P.nkpage[n]
    if kp < 0 or P.kmap[kp] <= 0 or P.knode[kp] != n:
        _remove_node(S, P, G, n)
        return -1
    return int(kp)


@jit(inline=True)
def remove_rmap_item_from_tree(S: Slots, P: Pool, G: I64, i: int) -> None:
    f = S.iflags[i]
    if f & STABLE:
        n = S.ileft[i]
        if P.ndead[n]:
            S.iflags[i] = EXISTS
            S.ileft[i] = -1
            return
        if ksm_get_folio(S, P, G, n) < 0:
            S.iflags[i] = EXISTS
            S.ileft[i] = -1
            return
        P.nhl[n] -= 1
        if P.nhl[n] > 0:
            G[PAGES_SHARING] -= 1
        else:
            G[PAGES_SHARED] -= 1
        S.ileft[i] = -1
        S.iflags[i] = EXISTS
    elif f & UNSTABLE:
        age = (G[SEQNR] - S.iseq[i]) & 0xFF
        if age == 0:
            rb.erase(G, ROOT_U, S.ileft, S.iright, S.ipar, S.ired, i)
        G[PAGES_UNSHARED] -= 1
        S.iflags[i] = EXISTS


@jit()
def _alloc_node(P: Pool, G: I64, kp: int, chain: bool) -> int:
    n = G[NN]
    G[NN] += 1
    P.nkpage[n] = kp
    P.nchain[n] = 1 if chain else 0
    P.nhl[n] = 0
    P.ndead[n] = 0
    P.nchainof[n] = -1
    P.nfirst[n] = -1
    P.nnext[n] = -1
    P.nprev[n] = -1
    P.ndups[n] = 0
    P.nprune[n] = 0.0
    P.nleft[n] = -1
    P.nright[n] = -1
    P.npar[n] = -1
    P.nred[n] = 0
    return int(n)


@jit()
def _stable_node_dup(S: Slots, P: Pool, G: I64, F: F64, C: F64, chain: int,
                     prune: bool) -> tuple[int, int, int]:
    interval = G[K_PRUNE] / 1000.0
    if not prune or F[NOW] < P.nprune[chain] + interval:
        prune = False
    else:
        P.nprune[chain] = F[NOW]
    found = -1
    found_len = 0
    tree_page = -1
    d = P.nfirst[chain]
    visited = 0
    while d >= 0:
        nx = P.nnext[d]
        visited += 1
        kp = ksm_get_folio(S, P, G, d)
        if kp >= 0 and (found < 0 or (_is_candidate(P, G, d, 0) and (
                not _is_candidate(P, G, found, 0) or P.nhl[d] > found_len))):
            found = int(d)
            found_len = P.nhl[d]
            tree_page = kp
            if not prune and _is_candidate(P, G, found, 0):
                break
        d = nx
    charge(F, C, C_DUP_VISIT, visited)
    if found < 0:
        rb.erase(G, ROOT_S, P.nleft, P.nright, P.npar, P.nred, chain)
        P.ndead[chain] = 1
        G[CHAINS] -= 1
        return -1, -1, chain
    if P.ndups[chain] == 1:
        rb.replace_node(G, ROOT_S, P.nleft, P.nright, P.npar, P.nred, chain, found)
        P.nchainof[found] = -1
        P.nnext[found] = -1
        P.nprev[found] = -1
        P.nfirst[chain] = -1
        P.ndups[chain] = 0
        P.ndead[chain] = 1
        G[CHAINS] -= 1
        G[DUPS] -= 1
        return tree_page, found, found
    if P.nfirst[chain] != found and _is_candidate(P, G, found, 1):
        _dup_unlink(P, chain, found)
        _dup_push_front(P, chain, found)
    return tree_page, found, chain


@jit(inline=True)
def _chain(S: Slots, P: Pool, G: I64, F: F64, C: F64, n: int,
           prune: bool) -> tuple[int, int, int]:
    if not P.nchain[n]:
        return ksm_get_folio(S, P, G, n), n, n
    return _stable_node_dup(S, P, G, F, C, n, prune)


@jit(inline=True)
def _stable_tree_search(S: Slots, P: Pool, G: I64, F: F64, C: F64, h: int) -> int:
    if h >= 0 and P.knode[h] >= 0:
        return h
    c = _cid(S, P, h)
    levels = 0
    result = NOPAGE
    while True:
        n = int(G[ROOT_S])
        restart = False
        while n >= 0:
            levels += 1
            kp, dup, cur = _chain(S, P, G, F, C, n, True)
            if kp < 0 or dup < 0:
                restart = True
                break
            kc = int(P.kcid[kp])
            if c < kc:
                n = int(P.nleft[cur])
            elif c > kc:
                n = int(P.nright[cur])
            else:
                if not _is_candidate(P, G, dup, 0):
                    result = NOPAGE
                    break
                kp2 = ksm_get_folio(S, P, G, dup)
                if kp2 < 0:
                    restart = True
                    break
                result = kp2
                break
        if not restart:
            break
    charge(F, C, C_STABLE_LEVEL, levels)
    return result


@jit()
def _chain_add_dup(P: Pool, G: I64, dup: int, chain: int) -> None:
    P.nchainof[dup] = chain
    _dup_push_front(P, chain, dup)
    P.ndups[chain] += 1
    G[DUPS] += 1


@jit()
def _stable_tree_insert(S: Slots, P: Pool, G: I64, F: F64, C: F64, kp: int) -> int:
    c = int(P.kcid[kp])
    levels = 0
    while True:
        parent = -1
        left = False
        n = int(G[ROOT_S])
        match = -1
        restart = False
        while n >= 0:
            levels += 1
            kp2, _dup, cur = _chain(S, P, G, F, C, n, False)
            if kp2 < 0:
                restart = True
                break
            parent = cur
            kc = int(P.kcid[kp2])
            if c < kc:
                n = int(P.nleft[cur])
                left = True
            elif c > kc:
                n = int(P.nright[cur])
                left = False
            else:
                match = cur
                break
        if not restart:
            break
    charge(F, C, C_STABLE_LEVEL, levels)
    new = _alloc_node(P, G, kp, False)
    if match < 0:
        rb.link_node(G, ROOT_S, P.nleft, P.nright, P.npar, P.nred, new, parent, left)
        rb.insert_color(G, ROOT_S, P.nleft, P.nright, P.npar, P.nred, new)
    else:
        chain = match
        if not P.nchain[match]:
            chain = _alloc_node(P, G, -1, True)
            P.nprune[chain] = F[NOW]
            rb.replace_node(G, ROOT_S, P.nleft, P.nright, P.npar, P.nred, match, chain)
            G[CHAINS] += 1
            _chain_add_dup(P, G, match, chain)
        _chain_add_dup(P, G, new, chain)
    P.knode[kp] = new
    return new


@jit(inline=True)
def _stable_tree_append(S: Slots, P: Pool, G: I64, i: int, n: int) -> None:
    P.nhl[n] += 1
    S.ileft[i] = n
    S.iflags[i] = EXISTS | STABLE
    if P.nhl[n] > 1:
        G[PAGES_SHARING] += 1
    else:
        G[PAGES_SHARED] += 1


# ---- unstable tree ----------------------------------------------------------
@jit(inline=True)
def _unstable_search_insert(S: Slots, R: Ranges, V: Vmas, P: Pool, G: I64, F: F64, C: F64,
                            i: int, h: int) -> tuple[int, int]:
    """(tree item slot, its page) or (-1, NOPAGE)."""
    c = _cid(S, P, h)
    levels = 0
    res_i = -1
    res_h = NOPAGE
    while True:
        parent = -1
        left = False
        n = int(G[ROOT_U])
        restart = False
        done = False
        while n >= 0:
            levels += 1
            tp = _handle_at(S, n) if _vma_ok(R, V, n) else NOPAGE
            if tp == NOPAGE:
                if G[SKIP_ZP] and (S.pte[n] == ZERO or S.pte[n] == KZERO):
                    remove_rmap_item_from_tree(S, P, G, n)
                    restart = True
                    break
                done = True
                break
            if tp == h:
                done = True
                break
            parent = n
            tc = _cid(S, P, tp)
            if c < tc:
                n = int(S.ileft[n])
                left = True
            elif c > tc:
                n = int(S.iright[n])
                left = False
            else:
                charge(F, C, C_MEMCMP, 1.0)
                res_i = n
                res_h = tp
                done = True
                break
        if restart:
            continue
        if not done:
            S.iflags[i] = EXISTS | UNSTABLE
            S.iseq[i] = G[SEQNR] & 0xFF
            rb.link_node(G, ROOT_U, S.ileft, S.iright, S.ipar, S.ired, i, parent, left)
            rb.insert_color(G, ROOT_U, S.ileft, S.iright, S.ipar, S.ired, i)
            G[PAGES_UNSHARED] += 1
        break
    charge(F, C, C_UNSTABLE_LEVEL, levels)
    return res_i, res_h


# ---- merging ----------------------------------------------------------------
@jit()
def _ksm_split(S: Slots, R: Ranges, G: I64, C: F64, F: F64, r: int, keep: int,
               extra: int) -> bool:
    budget = max(0, G[BUDGET])
    ok, zt, dt, rem, krem = split_folio(S, R, G, r, G[REMAP_KSM], extra, keep, budget)
    if not ok:
        charge(F, C, C_SPLIT_FAILED, 1.0)
        return False
    # CpuMeter.charge() one cost at a time (the float sum's order matters)
    charge(F, C, C_SPLIT, 1.0)
    charge(F, C, C_ZT_ZERO, zt)
    charge(F, C, C_ZT_DATA, dt)
    charge(F, C, C_REMAP_PTE, 512)
    charge(F, C, C_FREE_PAGE, rem)
    if krem:
        G[BUDGET] -= krem
        G[PAGES_SCANNED] += krem
    return True


@jit(inline=True)
def _put_mapping(P: Pool, h: int) -> None:
    if h >= 0:
        P.kmap[h] -= 1


@jit()
def _merge_one_page(S: Slots, R: Ranges, P: Pool, G: I64, F: F64, C: F64, s: int, h: int,
                    kpage: int, extra: int) -> int:
    """try_to_merge_one_page() for the item at slot ``s``: 0 or -1."""
    if h == kpage:
        return 0
    if _in_thp(S, R, h):
        if not _scan_thp(G):
            return -1
        if not _ksm_split(S, R, G, C, F, (-h - 1) // HPAGE, -h - 1, extra):
            return -1
    if not _maps(S, s, h):
        return -1
    if kpage == NULLK:
        if h >= 0:
            P.knode[h] = -1
        else:
            k = G[NK]
            G[NK] += 1
            P.kcid[k] = S.scid[s]
            P.kmap[k] = 1
            P.knode[k] = -1
            S.pte[s] = k
        return 0
    charge(F, C, C_MEMCMP, 1.0)
    if kpage == ZEROPAGE:
        if _cid(S, P, h) != 0:
            return -1
        charge(F, C, C_ZERO_MERGE, 1.0)
        S.pte[s] = KZERO
        G[KSM_ZERO] += 1
        G[ANON_RSS] -= 1
        _put_mapping(P, h)
        return 0
    if _cid(S, P, h) != P.kcid[kpage]:
        return -1
    charge(F, C, C_MERGE, 1.0)
    S.pte[s] = kpage
    P.kmap[kpage] += 1
    _put_mapping(P, h)
    return 0


@jit()
def _merge_with_ksm_page(S: Slots, R: Ranges, V: Vmas, P: Pool, G: I64, F: F64, C: F64,
                         s: int, h: int, kpage: int, extra: int) -> int:
    if not _vma_ok(R, V, s):
        return -1
    err = _merge_one_page(S, R, P, G, F, C, s, h, kpage, extra)
    if err:
        return err
    remove_rmap_item_from_tree(S, P, G, s)
    return 0


@jit(inline=True)
def _cmp_and_merge_page(S: Slots, R: Ranges, V: Vmas, P: Pool, G: I64, F: F64, C: F64,
                        i: int) -> None:
    h = _handle_at(S, i)
    node = int(P.knode[h]) if h >= 0 else -1
    if node >= 0:
        if _head(S, P, i) == node:
            return
    else:
        remove_rmap_item_from_tree(S, P, G, i)
        charge(F, C, C_CHECKSUM, 1.0)
        checksum = _cid(S, P, h) + 1
        if S.ichk[i] != checksum:
            S.ichk[i] = checksum
            return
        # try_to_merge_with_zero_page(): 0 (merged, or no vma) ends here
        if G[K_UZP] and S.ichk[i] == 1:
            if not _vma_ok(R, V, i):
                return
            if _merge_one_page(S, R, P, G, F, C, i, h, ZEROPAGE, 0) == 0:
                return
        if G[SKIP_ZP] and (S.pte[i] == ZERO or S.pte[i] == KZERO):
            return
    kpage = _stable_tree_search(S, P, G, F, C, h)
    if kpage == h and _head(S, P, i) == node:
        return
    remove_rmap_item_from_tree(S, P, G, i)
    if kpage != NOPAGE:
        if _merge_with_ksm_page(S, R, V, P, G, F, C, i, h, kpage, 0) == 0:
            _stable_tree_append(S, P, G, i, int(P.knode[kpage]))
        return
    ti, th = _unstable_search_insert(S, R, V, P, G, F, C, i, h)
    if ti < 0:
        return
    # try_to_merge_two_pages()
    extra = 1 if _same_folio(S, R, h, th) else 0
    kp = NOPAGE
    err = _merge_with_ksm_page(S, R, V, P, G, F, C, i, h, NULLK, extra)
    if not err:
        h2 = int(S.pte[i])
        err = _merge_with_ksm_page(S, R, V, P, G, F, C, ti, th, h2, 0)
        if err:
            if _vma_ok(R, V, i):  # break_cow()
                break_ksm(S, P, G, i)
                charge(F, C, C_BREAK_COW, 1.0)
        else:
            kp = h2
    split = _same_folio(S, R, h, th)
    if kp != NOPAGE:
        n2 = _stable_tree_insert(S, P, G, F, C, kp)
        _stable_tree_append(S, P, G, ti, n2)
        _stable_tree_append(S, P, G, i, n2)
    elif split and _in_thp(S, R, h):
        _ksm_split(S, R, G, C, F, (-h - 1) // HPAGE, -h - 1, 0)


# ---- the cursor ---------------------------------------------------------------
@jit(inline=True)
def _flush_frees(G: I64, F: F64, C: F64) -> None:
    for _ in range(G[PENDING_FREE]):
        charge(F, C, C_RMAP_FREE, 1.0)
    G[PENDING_FREE] = 0


@jit(inline=True)
def _drop_item(S: Slots, P: Pool, G: I64, i: int) -> None:
    """An item passed over: unlinked now, its free charged at the next flush."""
    remove_rmap_item_from_tree(S, P, G, i)
    S.iflags[i] = 0
    G[RMAP_ITEMS] -= 1
    G[PENDING_FREE] += 1


@jit(inline=True)
def _should_skip(S: Slots, P: Pool, G: I64, i: int, h: int) -> bool:
    if not G[K_SMART] or h >= 0:
        return False
    age = S.iage[i]
    if age != 255:
        S.iage[i] = age + 1
    if age < 3:
        return False
    if not S.iskip[i]:
        S.iskip[i] = _skip_age(age)
        return False
    G[PAGES_SKIPPED] += 1
    S.iskip[i] -= 1
    remove_rmap_item_from_tree(S, P, G, i)
    return True


@jit(inline=True)
def _scan_mm(S: Slots, R: Ranges, V: Vmas, P: Pool, G: I64, F: F64, C: F64, m: int) -> int:
    scan_thp = _scan_thp(G)
    first = V.mm_first[m]
    for v in range(first, first + V.mm_count[m]):
        vbase = V.base[v]
        vend = vbase + V.n[v]
        if not V.merge[v] or vend <= G[CUR_ADDR]:
            continue
        if G[CUR_ADDR] < vbase:
            G[CUR_ADDR] = vbase
        if not V.anon[v]:
            G[CUR_ADDR] = vend
            continue
        i = G[CUR_ADDR]
        skipped = 0
        while i < vend:
            p = S.pte[i]
            if (p >= 0 or p == OWN) and (scan_thp or p >= 0
                                         or R.pmd[i // HPAGE] != PMD_THP):
                _flush_frees(G, F, C)
                if not S.iflags[i] & EXISTS:
                    S.iflags[i] = EXISTS
                    S.ichk[i] = 0
                    S.iage[i] = 0
                    S.iskip[i] = 0
                    S.iseq[i] = 0
                    S.ileft[i] = -1
                    S.iright[i] = -1
                    S.ipar[i] = -1
                    G[RMAP_ITEMS] += 1
                    charge(F, C, C_RMAP_ALLOC, 1.0)
                G[CUR_PREV] = i
                h = int(p) if p >= 0 else -i - 1
                if _should_skip(S, P, G, i, h):
                    charge(F, C, C_SMART_SKIP, 1.0)
                    i += 1
                    continue
                charge(F, C, C_PTE_SKIP, skipped)
                G[CUR_ADDR] = i + 1
                return int(i)
            if S.iflags[i] & EXISTS:
                _drop_item(S, P, G, i)
            skipped += 1
            i += 1
        charge(F, C, C_PTE_SKIP, skipped)
        G[CUR_ADDR] = vend
    return -1


@jit(inline=True)
def _scan_get_next(S: Slots, R: Ranges, V: Vmas, P: Pool, G: I64, F: F64, C: F64) -> int:
    if G[NSLOTS] == 0:
        return -1
    if G[CUR_SLOT] < 0:
        charge(F, C, C_SCAN_START, 1.0)
        G[ROOT_U] = -1
        G[CUR_SLOT] = 0
        G[CUR_ADDR] = -1
        G[CUR_PREV] = -1
    while True:
        cs = G[CUR_SLOT]
        m = V.ksm_slots[cs]
        found = _scan_mm(S, R, V, P, G, F, C, m)
        if found >= 0:
            return found
        _flush_frees(G, F, C)  # _remove_trailing_rmap_items()
        if G[CUR_ADDR] < 0:
            for k in range(cs, G[NSLOTS] - 1):
                V.ksm_slots[k] = V.ksm_slots[k + 1]
            G[NSLOTS] -= 1
        else:
            G[CUR_SLOT] += 1
        G[CUR_ADDR] = -1
        G[CUR_PREV] = -1
        if G[CUR_SLOT] >= G[NSLOTS]:
            G[CUR_SLOT] = -1
            G[SEQNR] += 1
            if G[PRESSURE] > 0:
                G[PRESSURE] -= 1
            return -1


@jit()
def do_scan(S: Slots, R: Ranges, V: Vmas, P: Pool, G: I64, F: F64, C: F64) -> bool:
    G[BUDGET] = G[K_PTS]
    while G[BUDGET] > 0:
        G[BUDGET] -= 1
        i = _scan_get_next(S, R, V, P, G, F, C)
        if i < 0:
            return True
        charge(F, C, C_VISIT, 1.0)
        _cmp_and_merge_page(S, R, V, P, G, F, C, i)
        G[PAGES_SCANNED] += 1
    return False


@jit()
def ksmd_until(S: Slots, R: Ranges, V: Vmas, P: Pool, G: I64, F: F64, C: F64, t_next: float,
               inclusive: bool, t_end: float, room_k: int, room_n: int) -> int:
    """Run ksmd's batches while its wake-up time is before ``t_next`` (the next
    other action; at ``t_next`` too when ``inclusive``: that action's heap priority
    is after ksmd's) and not after ``t_end``.  KSMD_GROW: the pools need room;
    KSMD_SCAN_END: the last batch ended a full scan, at F[T_SCAN_END]."""
    t = F[T_KSMD]
    need = G[K_PTS]
    while (t < t_next or (inclusive and t == t_next)) and t <= t_end:
        if G[RUN] != 1 or G[NSLOTS] == 0:
            return KSMD_IDLE
        if G[NK] + need > room_k or G[NN] + 2 * need > room_n:
            return KSMD_GROW
        before = F[CPU]
        scans = G[SEQNR]
        F[NOW] = t
        do_scan(S, R, V, P, G, F, C)
        charge(F, C, C_BATCH, 1.0)
        charge(F, C, C_COLD, min(F[CPU] - before, C[C_COLD_WINDOW]))
        G[BATCHES] += 1
        busy = (F[CPU] - before) / 1e9
        F[T_SCAN_END] = t + busy
        t = _wake(t, busy, G[K_SLEEP], C[C_SLACK], C[C_TICK])
        F[T_KSMD] = t
        if G[SEQNR] > scans:
            return KSMD_SCAN_END
    return KSMD_OK
