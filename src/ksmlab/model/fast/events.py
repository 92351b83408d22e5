"""KSM's tracepoints on the fast engine: a record buffer filled by the compiled ksmd,
turned into the exact engine's event dicts (:mod:`ksmlab.model.ksm`) after the run.

The compiled code appends fixed-width int64 records (:data:`W` fields: event code,
the full scan in progress, then the event's fields) and the time of each (ksmd's
batch, ``Ksm.now``) where the exact engine calls ``Ksm._event``; pages and rmap
items are recorded as slots and named here (``[instance, index]``, the live lab's
names).  What the names need and the arrays do not otherwise keep:

- ``orig`` (per slot): the slot maps the page it mapped at time 0 (the exact
  engine's ``Ksm.pages``: pages by identity, which a write to a private page keeps
  and a fault, a COW copy or a collapse does not);
- ``Pool.kname`` (per KSM page): the slot whose time-0 page became it, or -1;
- the stable nodes' hlists in the kernel's order (newest first): ``Pool.nhead``
  per node, ``hnext``/``hprev`` per rmap item (slot).  The engine otherwise keeps
  only their lengths.

With events off the arrays are one-element placeholders of a type of their own,
:class:`NoEvents`.  Numba compiles the code that takes the pool once per type, and
there :func:`ev_on` is a constant of the type: without events the compiled ksmd holds
none of the event code, not even its tests (a runtime flag, tested in the inlined hot
path, made ksmd's loop 2-6 % slower; the pool's size did not matter).  An events-on
run compiles its own copy once (numba's cache keeps both).  The buffer cannot grow
inside a compiled call: ksmd asks for room before each batch (:func:`need`, ``KSMD_GROW``) and the
engine grows it between calls, as it grows the pool.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from numba.extending import overload

from .jit import jit
from .state import F64, I32, I64, KZERO, OWN, PMD_THP, U8

# event codes, in the order of include/trace/events/ksm.h
(E_START_SCAN, E_STOP_SCAN, E_MERGE_ONE_PAGE, E_MERGE_WITH_KSM_PAGE, E_REMOVE_KSM_PAGE,
 E_REMOVE_RMAP_ITEM) = range(6)
NAMES = ("ksm_start_scan", "ksm_stop_scan", "ksm_merge_one_page", "ksm_merge_with_ksm_page",
         "ksm_remove_ksm_page", "ksm_remove_rmap_item")
# a record: code, scan (-1: None), then per event (-1: no page)
#   start/stop scan:        seq, rmap_entries
#   merge_one_page:         item slot, err (the page is the zero page)
#   merge_with_ksm_page:    item slot, err, page (slot of its time-0 page), ksm_page
#   remove_ksm_page:        -, -, page
#   remove_rmap_item:       item slot, -, page
W = 6
# ctl: records so far, on, the full scan in progress (-1: None), records lost
EV_N, EV_ON, EV_SCAN, EV_LOST = range(4)


class Events(NamedTuple):
    ctl: I64
    rec: I64  # (capacity, W)
    t: F64  # per record: ksmd's batch time
    clock: F64  # [0]: the current batch's time (Ksm.now)
    orig: U8  # per slot
    hnext: I32  # per slot: the next older item in its stable node's hlist
    hprev: I32  # per slot: the next newer one


class NoEvents(Events):
    """KSM's event stream off: the one-element placeholders (a type of their own)."""

    __slots__ = ()


def ev_on(ev: Events) -> bool:
    """Whether KSM's event stream is on; in compiled code, a constant of ``ev``'s type."""
    return not isinstance(ev, NoEvents)


@overload(ev_on, inline="always")
def _ev_on_typed(ev):  # type: ignore[no-untyped-def]  # (numba: no annotations)
    on = getattr(ev, "instance_class", None) is not NoEvents  # ev: a numba type
    return lambda ev: on


def new_events(n_slots: int, on: bool, capacity: int = 4096) -> Events:
    """Events for ``n_slots`` slots (on), or the one-element placeholders (off)."""
    n, cap = (n_slots, capacity) if on else (1, 1)
    ctl = np.zeros(4, np.int64)
    ctl[EV_ON] = int(on)
    ctl[EV_SCAN] = -1
    return (Events if on else NoEvents)(
        ctl=ctl, rec=np.zeros((cap, W), np.int64), t=np.zeros(cap, np.float64),
        clock=np.zeros(1, np.float64), orig=np.zeros(n, np.uint8),
        hnext=np.full(n, -1, np.int32), hprev=np.full(n, -1, np.int32))


def need(pts: int, shared: int, sharing: int, nodes: int) -> int:
    """Records one ksmd batch (or run=2) may append at most: a scan's end and the
    next one's start, three merge attempts per page visited, and the removal of
    every stable node (``nodes``: allocated so far, and two per page) with every
    rmap item in their hlists (``shared + sharing``, and two per page)."""
    return 4 + 3 * pts + nodes + 2 * pts + shared + sharing + 2 * pts


need_jit = jit(inline=True)(need)


def with_room(ev: Events, more: int) -> Events:
    """``ev`` with room for ``more`` records beyond those it holds (grown: copied)."""
    n, cap = int(ev.ctl[EV_N]), len(ev.t)
    if n + more <= cap:
        return ev
    cap = max(2 * cap, n + more)
    rec = np.zeros((cap, W), np.int64)
    rec[:n] = ev.rec[:n]
    t = np.zeros(cap, np.float64)
    t[:n] = ev.t[:n]
    return ev._replace(rec=rec, t=t)


# ---- compiled: emission ------------------------------------------------------
@jit(inline=True)
def emit(ev: Events, code: int, a: int, b: int, page: int, d: int) -> None:
    """Append one record at ksmd's current time (dropped and counted if full: the
    engine then refuses the stream)."""
    n = ev.ctl[EV_N]
    if n >= len(ev.t):
        ev.ctl[EV_LOST] += 1
        return
    ev.rec[n, 0] = code
    ev.rec[n, 1] = ev.ctl[EV_SCAN]
    ev.rec[n, 2] = a
    ev.rec[n, 3] = b
    ev.rec[n, 4] = page
    ev.rec[n, 5] = d
    ev.t[n] = ev.clock[0]
    ev.ctl[EV_N] = n + 1


@jit(inline=True)
def own_name(ev: Events, s: int) -> int:
    """The name (slot) of slot ``s``'s private page: -1 unless it is its time-0 page."""
    return s if ev.orig[s] else -1


@jit(inline=True)
def hlist_add(ev: Events, nhead: I32, n: int, i: int) -> None:
    """hlist_add_head(&rmap_item->hlist, &stable_node->hlist)"""
    f = nhead[n]
    ev.hnext[i] = f
    ev.hprev[i] = -1
    if f >= 0:
        ev.hprev[f] = i
    nhead[n] = i


@jit(inline=True)
def hlist_del(ev: Events, nhead: I32, n: int, i: int) -> None:
    """hlist_del(&rmap_item->hlist)"""
    pv = ev.hprev[i]
    nx = ev.hnext[i]
    if pv >= 0:
        ev.hnext[pv] = nx
    else:
        nhead[n] = nx
    if nx >= 0:
        ev.hprev[nx] = pv


@jit(inline=True)
def removed_node(ev: Events, nhead: I32, n: int, kpage_name: int) -> None:
    """remove_node_from_stable_tree(): ksm_remove_rmap_item for each item of the
    hlist (newest first) but the last, which was the pages_shared; then
    ksm_remove_ksm_page."""
    i = nhead[n]
    while i >= 0:
        nx = ev.hnext[i]
        if nx >= 0:
            emit(ev, E_REMOVE_RMAP_ITEM, i, 0, kpage_name, 0)
        i = nx
    nhead[n] = -1
    emit(ev, E_REMOVE_KSM_PAGE, 0, 0, kpage_name, 0)


# ---- Python: page identity outside ksmd, and the stream ------------------------
def renew(ev: Events, pte: I32, slots: I64) -> None:
    """Slots about to be written: those not mapping a private page (none, zero, KSM)
    get a new page (do_anonymous_page(), wp_page_copy()); a private page is written
    in place and keeps its name."""
    if ev.ctl[EV_ON]:
        ev.orig[slots[pte[slots] > OWN]] = 0  # not own (<= OWN: own, of any order)


def renew_unmerged(ev: Events, pte: I32) -> None:
    """run=2: break_ksm() gives every KSM-mapped slot (and KSM zero PTE) a new page."""
    if ev.ctl[EV_ON]:
        ev.orig[(pte >= 0) | (pte == KZERO)] = 0


def renew_collapsed(ev: Events, pmd_before: U8, pmd: U8, hpage: int) -> None:
    """khugepaged's collapse_huge_page(): every page of a collapsed range is new."""
    if ev.ctl[EV_ON]:
        r = np.flatnonzero((pmd_before != PMD_THP) & (pmd == PMD_THP))
        if len(r):
            ev.orig[(r[:, None] * hpage + np.arange(hpage)).ravel()] = 0


def stream(ev: Events, entered: list[int], names: Callable[[I64], tuple[I64, I64]]
           ) -> list[dict[str, Any]]:
    """The exact engine's ``Ksm.trace``: ``entered`` the mms that did __ksm_enter()
    before time 0, in order; ``names``: slots -> (instance, index among its pages).
    Built with the cyclic garbage collector paused: the dicts hold no cycles, and its
    full passes over a process holding another stream (validate's kernel trace)
    would take two thirds of the time."""
    was = gc.isenabled()
    gc.disable()
    try:
        return _stream(ev, entered, names)
    finally:
        if was:
            gc.enable()


def _stream(ev: Events, entered: list[int], names: Callable[[I64], tuple[I64, I64]]
            ) -> list[dict[str, Any]]:
    if ev.ctl[EV_LOST]:
        raise RuntimeError(f"fast engine: {int(ev.ctl[EV_LOST])} KSM events lost (no room)")
    n = int(ev.ctl[EV_N])
    rec = ev.rec[:n]
    out: list[dict[str, Any]] = [{"event": "ksm_enter", "t": 0.0, "scan": None, "proc": m}
                                 for m in entered]  # __ksm_enter()
    code = rec[:, 0]
    is_item = (code == E_MERGE_ONE_PAGE) | (code == E_MERGE_WITH_KSM_PAGE) | (
        code == E_REMOVE_RMAP_ITEM)
    i_inst, i_idx = names(np.where(is_item, rec[:, 2], 0))
    # a page: the slot of its time-0 page (-1: none)
    known = rec[:, 4] >= 0
    p_inst, p_idx = names(np.where(known, rec[:, 4], 0))
    item_inst, item_idx = i_inst.tolist(), i_idx.tolist()
    page_inst = np.where(known, p_inst, -1).tolist()
    page_idx = p_idx.tolist()
    ts = np.round(ev.t[:n], 9).tolist()
    for k, (c, scan, a, b, _p, d) in enumerate(rec.tolist()):
        name, t, sc = NAMES[c], ts[k], None if scan < 0 else scan
        page = [page_inst[k], page_idx[k]] if page_inst[k] >= 0 else None
        if c <= E_STOP_SCAN:
            out.append({"event": name, "t": t, "scan": sc, "seq": a, "rmap_entries": b})
        elif c == E_MERGE_ONE_PAGE:
            out.append({"event": name, "t": t, "scan": sc, "page": "zero",
                        "item": [item_inst[k], item_idx[k]], "proc": item_inst[k], "err": b})
        elif c == E_MERGE_WITH_KSM_PAGE:
            out.append({"event": name, "t": t, "scan": sc, "ksm_page": bool(d), "page": page,
                        "item": [item_inst[k], item_idx[k]], "proc": item_inst[k], "err": b})
        elif c == E_REMOVE_RMAP_ITEM:
            out.append({"event": name, "t": t, "scan": sc, "page": page,
                        "item": [item_inst[k], item_idx[k]], "proc": item_inst[k]})
        else:
            out.append({"event": name, "t": t, "scan": sc, "page": page})
    return out
