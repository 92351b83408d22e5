"""KSM's event stream in the lab's names, and the kernel's stream against the model's.

The kernel's tracepoints (include/trace/events/ksm.h; read by
:mod:`ksmlab.live.tracefs`) name pages by pfn and everything else by hashed
pointers.  :func:`label` turns them into the lab's names, which the model
(``simulate(..., kernel_events=True)``, either engine) emits directly:

- ``proc``: the workload process instance (index in ``Scenario.instances()``)
  of the event's ``mm``.  The lab starts the workloads one at a time, so each
  ``ksm_enter`` (fired in ``__ksm_enter()`` by the process's own madvise or
  prctl) carries the pid of one workload: its mm pointer is that instance's.
  Other processes' mms (QEMU's guest RAM, ...) get ``proc`` None and a note.
- ``scan``: the full scan in progress, the ``seq`` of the last ``ksm_start_scan``
  (``scan_get_next_rmap_item()``); ``ksm_stop_scan`` ends it (full_scans is
  then ``seq + 1``).  None before the first scan.
- ``page``: the page a ``pfn`` names, ``[proc, index]`` with ``index`` the
  page's number in its process's regions (in the scenario's order), from a
  /proc/PID/pagemap snapshot at time 0; ``"zero"`` for ksm_merge_one_page (its
  pfn is the zero page's); None for a pfn not in the snapshot.
- ``item``: the page of the event's ``rmap_item``.  The kernel never prints an
  rmap item's address, so it is known only from an earlier event whose pfn was
  the item's own page: ksm_merge_with_ksm_page without a KSM page (the first
  half of ``try_to_merge_two_pages()``, or a failed attempt of it).

What cannot be identified on the kernel side (``item`` None):
- pages merged into the zero page (ksm_merge_one_page: the pfn is the zero
  page's), unless the same rmap item was named before;
- the tree page of a two-page merge (second ksm_merge_with_ksm_page: the pfn
  is the scanned page, now the KSM page) and a page merged into a KSM page
  found in the stable tree (the pfn is the KSM page's), for the same reason;
- pages faulted in after time 0 (write events, ``fill_at``, khugepaged's
  collapses, which copy into a new THP): their pfns are not in the snapshot;
- an rmap item freed and its memory reused for another page: the item keeps the
  old page until a new event names its pfn (a changed ``mm`` drops it).
A merge's KSM page (``into``) is known whenever it was a workload page at time 0.
:func:`name_by_snapshots` then names most of the rest from /proc/PID/pagemap
snapshots taken at every full-scan end (where each page maps then), and says
which it could not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

EFAULT = -14
Page = list[int] | str | None  # [proc, index], "zero", or unknown


def label(raw: Sequence[Mapping[str, Any]], mm_pids: Mapping[int, int],
          pfns: Mapping[int, tuple[int, int]], t0: float,
          known_mms: Mapping[str, int] | None = None
          ) -> tuple[list[dict[str, Any]], list[str]]:
    """Kernel events (tracefs.parse) -> events in the lab's names.

    ``mm_pids``: workload pid -> instance; ``pfns``: pfn -> (instance, page index)
    at time 0; ``t0``: time 0 on the trace clock (``time.monotonic()``);
    ``known_mms``: mm pointer -> instance for processes whose ksm_enter came before
    the stream (a captured process)."""
    mms: dict[str, int] = dict(known_mms or {})
    foreign: set[str] = set()
    items: dict[str, tuple[str, list[int]]] = {}
    scan: int | None = None
    out: list[dict[str, Any]] = []
    for e in raw:
        ev = str(e["event"])
        d: dict[str, Any] = {"event": ev, "t": round(float(e["ts"]) - t0, 6)}
        mm = e.get("mm")
        if ev == "ksm_enter" and mm is not None and int(e.get("pid", -1)) in mm_pids:
            mms.setdefault(str(mm), mm_pids[int(e["pid"])])
        if ev == "ksm_start_scan":
            scan = int(e["seq"])
        d["scan"] = scan
        if ev == "ksm_stop_scan":
            scan = None
        for k in ("seq", "rmap_entries", "err", "ksm_page", "pfn", "rmap_item", "mm"):
            if k in e:
                d[k] = e[k]
        if mm is not None:
            d["proc"] = mms.get(str(mm))
            if d["proc"] is None:
                foreign.add(str(mm))
        if "pfn" in e:
            if ev == "ksm_merge_one_page":
                d["page"] = "zero"
            else:
                p = pfns.get(int(e["pfn"]))
                d["page"] = list(p) if p is not None else None
        ri = e.get("rmap_item")
        if ri is not None:
            key = str(ri)
            if ev == "ksm_merge_with_ksm_page" and not e.get("ksm_page") and d["page"]:
                items[key] = (str(mm), d["page"])  # the pfn is the item's own page
            known = items.get(key)
            if known is not None and known[0] != str(mm):
                del items[key]  # freed and reused by another mm
                known = None
            d["item"] = known[1] if known is not None else None
        out.append(d)
    notes = []
    if foreign:
        notes.append(f"kernel events of {len(foreign)} mm(s) not the workload's (other "
                     "processes with mergeable memory) are kept with proc None")
    return out, notes


def _merged(e: Mapping[str, Any]) -> bool:
    return e.get("err") == 0 and (e["event"] == "ksm_merge_one_page" or (
        e["event"] == "ksm_merge_with_ksm_page" and bool(e.get("ksm_page"))))


Changes = Mapping[int, Sequence[tuple[int, int]]]  # instance -> [(page index, new pfn)]


def name_by_snapshots(events: Sequence[dict[str, Any]],
                      windows: Sequence[tuple[int | None, Changes]]) -> int:
    """Name the page of merges the kernel left unnamed, from pagemap snapshots; returns
    how many were named (they get ``item_from: "pagemap"``).

    ``windows``: in time order, (full_scans when the snapshot was taken, or None for
    the last one, taken when tracing stopped; the pages whose pfn changed since the
    previous snapshot, in address order).  The live lab snapshots at time 0 and at
    every full-scan end (ksmd sleeps then), so a window is one full scan.

    A merged page maps its KSM page's pfn (or the zero page's) from its merge on.  For
    each (target pfn, process) the pages that came to map it within the window, less
    the KSM page itself and pages already named, are the candidates.  Within one full
    scan ksmd meets a process's merges into one KSM page in address order (a stable
    merge at the scanned page; the tree page of a two-page merge just before the
    scanned page, which becomes the KSM page), so where the unnamed merges of a group
    fall in one full scan and number as many as the candidates, the n-th merge is the
    n-th candidate.  Other groups stay unnamed: a window over several scans with
    merges in more than one, a page merged and unmerged within the window, or pages
    the zero page took for other reasons (a THP split's remap)."""
    named = 0
    lo = 0
    by_scan: dict[int, list[dict[str, Any]]] = {}
    for e in events:
        if (_merged(e) and e.get("scan") is not None and e.get("proc") is not None
                and "pfn" in e):
            by_scan.setdefault(int(e["scan"]), []).append(e)
    for key, changes in windows:
        hi = max(by_scan, default=-1) if key is None else key - 1  # window: scans lo..hi
        groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for sc in range(lo, hi + 1):
            for e in by_scan.get(sc, []):
                groups.setdefault((int(e["pfn"]), int(e["proc"])), []).append(e)
        if key is not None:
            lo = key
        came: dict[tuple[int, int], list[int]] = {}
        for inst, pages in changes.items():
            for idx, pfn in pages:
                came.setdefault((pfn, inst), []).append(idx)
        for (pfn, proc), evs in groups.items():
            unknown = [e for e in evs if e.get("item") is None]
            if not unknown or len({e.get("scan") for e in unknown}) != 1:
                continue
            taken = {tuple(e["item"]) for e in evs if isinstance(e.get("item"), list)}
            own = evs[0].get("page")
            cands = [i for i in came.get((pfn, proc), [])
                     if (proc, i) not in taken and [proc, i] != own]
            if len(cands) != len(unknown):
                continue
            for e, i in zip(unknown, cands, strict=True):
                e["item"] = [proc, i]
                e["item_from"] = "pagemap"
                named += 1
    return named


def changes(before: Mapping[int, Sequence[tuple[int, int]]],
            after: Mapping[int, Sequence[tuple[int, int]]]) -> dict[int, list[tuple[int, int]]]:
    """The pages whose pfn differs between two snapshots (instance -> [(index, pfn)]
    in address order), in the form :func:`name_by_snapshots` takes."""
    out: dict[int, list[tuple[int, int]]] = {}
    for inst, pages in after.items():
        old = dict(before.get(inst, []))
        out[inst] = [(i, pfn) for i, pfn in pages if old.get(i) != pfn]
    return out


@dataclass(frozen=True)
class Merge:
    """One successful merge: ``page`` (of process ``proc``) now maps ``into``."""

    scan: int | None
    proc: int | None
    page: Page
    into: Page

    def matches(self, other: Merge) -> bool:
        """Equal where this (kernel) side knows: an unknown page is not compared."""
        return (self.scan == other.scan and self.proc == other.proc
                and self.into == other.into
                and (self.page is None or self.page == other.page))


def attempts(events: Sequence[Mapping[str, Any]]) -> list[tuple[Merge, int]]:
    """Every merge attempt with its err, failed ones (-EFAULT: the page changed, its
    THP did not split, ...) too: into the zero page, into a KSM page, and the first
    half of a two-page merge (the scanned page made a KSM page: ``into`` "new")."""
    out = []
    for e in events:
        ev = e["event"]
        if ev == "ksm_merge_one_page":
            into: Page = "zero"
        elif ev == "ksm_merge_with_ksm_page":
            into = e.get("page") if e.get("ksm_page") else "new"
        else:
            continue
        out.append((Merge(e.get("scan"), e.get("proc"), e.get("item"), into),
                    int(e.get("err", 0))))
    return out


def merges(events: Sequence[Mapping[str, Any]]) -> list[Merge]:
    """The successful merges of a stream, in order.

    ksm_merge_one_page with err 0: a page now maps the zero page
    (try_to_merge_with_zero_page()); ksm_merge_with_ksm_page with a KSM page and
    err 0: the rmap item's page now maps that KSM page (a stable-tree match in
    cmp_and_merge_page(), or the tree page in try_to_merge_two_pages()).  The
    first half of a two-page merge (no KSM page) only makes the scanned page a KSM
    page and is not a merge."""
    return [m for m, err in attempts(events) if err == 0 and m.into != "new"]


def completed_scans(events: Sequence[Mapping[str, Any]]) -> int:
    """Full scans a stream saw end (ksm_stop_scan): the last seq + 1, or 0."""
    seqs = [int(e["seq"]) for e in events if e["event"] == "ksm_stop_scan"]
    return max(seqs) + 1 if seqs else 0


@dataclass
class StreamFit:
    merges_kernel: int
    merges_model: int
    identical_share: float  # position by position within each full scan
    page_known_share: float  # kernel merges whose page the kernel names
    scans: int  # full scans compared: those both streams saw end
    first_divergence: dict[str, Any] | None
    # every attempt (failed ones too), compared the same way with its error
    attempts_kernel: int = 0
    attempts_model: int = 0
    attempts_identical_share: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _plain(m: Merge | None, err: int = 0) -> dict[str, Any] | None:
    if m is None:
        return None
    return {**asdict(m), **({"err": err} if err else {})}


def compare(kernel: Sequence[Mapping[str, Any]], model: Sequence[Mapping[str, Any]]
            ) -> StreamFit:
    """Per full scan, the kernel's merges against the model's, position by position.

    Only full scans both streams saw end are compared (the two clocks differ by a
    few per cent, so one side may have run a few more in the same time).  A pair is
    identical when scan, process, KSM page and (where the kernel names it) page
    agree; ``identical_share`` is identical pairs over the larger count.
    ``first_divergence``: the first scan and position where they differ, with
    what each side did (None: a side made no merge there)."""
    scans = min(completed_scans(kernel), completed_scans(model))

    def upto(ms: list[Merge]) -> list[Merge]:
        return [m for m in ms if m.scan is not None and m.scan < scans]

    mk, mm = upto(merges(kernel)), upto(merges(model))
    same, _, first = _pairs([(m, 0) for m in mk], [(m, 0) for m in mm])
    ak = [(m, err) for m, err in attempts(kernel) if m.scan is not None and m.scan < scans]
    am = [(m, err) for m, err in attempts(model) if m.scan is not None and m.scan < scans]
    a_same, _, _ = _pairs(ak, am)
    n, na = max(len(mk), len(mm)), max(len(ak), len(am))
    return StreamFit(
        merges_kernel=len(mk), merges_model=len(mm),
        identical_share=same / n if n else 1.0,
        page_known_share=sum(1 for m in mk if m.page is not None) / len(mk) if mk else 0.0,
        scans=scans, first_divergence=first,
        attempts_kernel=len(ak), attempts_model=len(am),
        attempts_identical_share=a_same / na if na else 1.0,
    )


def _pairs(kernel: list[tuple[Merge, int]], model: list[tuple[Merge, int]]
           ) -> tuple[int, int, dict[str, Any] | None]:
    """(identical pairs, full scans with any, first divergence), scan by scan."""
    by_k: dict[int | None, list[tuple[Merge, int]]] = {}
    by_m: dict[int | None, list[tuple[Merge, int]]] = {}
    for kx in kernel:
        by_k.setdefault(kx[0].scan, []).append(kx)
    for mx in model:
        by_m.setdefault(mx[0].scan, []).append(mx)
    same = 0
    first: dict[str, Any] | None = None
    scans = sorted(set(by_k) | set(by_m), key=lambda s: -1 if s is None else s)
    for s in scans:
        a, b = by_k.get(s, []), by_m.get(s, [])
        for i in range(max(len(a), len(b))):
            x = a[i] if i < len(a) else None
            y = b[i] if i < len(b) else None
            if x is not None and y is not None and x[1] == y[1] and x[0].matches(y[0]):
                same += 1
            elif first is None:
                first = {"scan": s, "index": i,
                         "kernel": _plain(x[0] if x else None, x[1] if x else 0),
                         "model": _plain(y[0] if y else None, y[1] if y else 0),
                         "kernel_in_scan": len(a), "model_in_scan": len(b)}
    return same, len(scans), first


def text(fit: StreamFit) -> str:
    """One or two lines for `ksmlab validate`."""
    line = (f"events ({fit.scans} full scans): merges kernel {fit.merges_kernel}, model "
            f"{fit.merges_model}; identical "
            f"{fit.identical_share * 100:.1f} % (kernel names the page in "
            f"{fit.page_known_share * 100:.0f} %); attempts {fit.attempts_kernel} / "
            f"{fit.attempts_model}, identical {fit.attempts_identical_share * 100:.1f} %")
    d = fit.first_divergence
    if d is None:
        return line
    return line + (f"\n  first divergence: full scan {d['scan']}, merge #{d['index']}: "
                   f"kernel {_short(d['kernel'])}, model {_short(d['model'])}")


def _short(m: dict[str, Any] | None) -> str:
    if m is None:
        return "none"
    err = f" err {m['err']}" if m.get("err") else ""
    return f"proc {m['proc']} page {m['page']} into {m['into']}{err}"
