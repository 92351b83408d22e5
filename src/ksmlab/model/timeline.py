"""The timeline of a run, shared by both engines (and its order by the live lab).

It owns what happens when: the samples, the scenario's actions (fill, KSM start,
events, the lab's khugepaged wake-ups), the volatile writer's ticks, khugepaged's
timer, ksmd's wake-ups, full-scan ends, events held for a scan end
(``align_events``) and events pinned to one (a replay of a kernel run).  An engine
is a :class:`Backend`: it applies an action, runs ksmd's batches up to a time and
reads its counters; :meth:`Timeline.run` does the rest, so the two engines cannot order
anything differently.

Order at equal times (:class:`Prio`, lowest first; then the order things were
scheduled in): a sample sees the state before any action due at its time; the
fill, then KSM's start, then the scenario's events in their order (the live lab
applies them in this order too: ``live/run.py``); the volatile writer; khugepaged's
own timer; ksmd's batch; last the lab's khugepaged wake-ups.  At a full-scan end
(ksmd then sleeps) the live lab samples first, then does the per-scan writes, the
pinned and the held events.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence
from enum import IntEnum
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from ..constants import KSM_RMAP_ITEM_SIZE
from ..scenario import KhugepagedWake, KsmKnobs, KsmStart, Scenario, SetKnob, ThpKnobs
from ..trace import COLUMNS, FULL_SCAN_END, VMSTAT_COUNTERS, Trace, is_monotonic
from .advisor import Advisor
from .costs import CostProfile
from .khugepaged import KhugepagedWalk, timer_period_s
from .policies import Policy

VOLATILE_TICK = 0.01  # seconds between the volatile writer's bursts
EPS = 1e-9  # times within this of the duration are in the run


class Prio(IntEnum):
    """What goes first among things due at the same time (lowest first)."""

    SAMPLE = 0
    FILL = 1
    KSM_START = 2
    EVENT = 3
    VOLATILE = 4
    KHUGEPAGED_TIMER = 5
    KSMD = 6
    KHUGEPAGED_WAKE = 7


class Action(NamedTuple):
    """A scenario action at its time: ``kind`` "fill" or "event" (``payload``: the event)."""

    at: float
    prio: Prio
    kind: str
    payload: object
    tag: int  # 1 + a scenario event's index (names the ids a write writes); else 0


def actions(sc: Scenario) -> list[Action]:
    """The scenario's actions, in the order they happen (the live lab's order too)."""
    out = []
    if sc.fill_at is not None:
        out.append(Action(sc.fill_at, Prio.FILL, "fill", None, 0))
    if sc.ksm_start_at is not None:
        out.append(Action(sc.ksm_start_at, Prio.KSM_START, "event",
                          KsmStart(action="ksm_start", at=sc.ksm_start_at), 0))
    out += [Action(e.at, Prio.EVENT, "event", e, i + 1) for i, e in enumerate(sc.event)]
    # the lab's wake-ups (drive_khugepaged)
    out += [Action(at, Prio.KHUGEPAGED_WAKE, "event",
                   KhugepagedWake(action="khugepaged", at=at), 0)
            for at in sc.khugepaged_wakes()]
    return sorted(out, key=lambda a: (a.at, a.prio))  # stable: events keep their order


# ksmd_until() results (both engines)
KSMD_OK, KSMD_IDLE, KSMD_GROW, KSMD_SCAN_END = 0, 1, 2, 3


class Backend(Protocol):
    """An engine, as the timeline drives it."""

    sc: Scenario
    notes: list[str]

    def fill(self) -> None: ...
    def apply(self, e: object, t: float) -> None: ...
    def volatile(self, t: float) -> None: ...
    def volatile_scan(self, step: int) -> None: ...
    def has_volatile(self) -> tuple[bool, bool]: ...  # (per second, per scan)
    def khugepaged_scan(self) -> None: ...
    def khugepaged_period(self) -> float: ...
    def should_run(self) -> bool: ...
    def full_scans(self) -> int: ...
    def wake_ksmd(self, t: float) -> None: ...
    def ksmd_until(self, t_next: float, inclusive: bool, t_end: float) -> int: ...
    def ksmd_wake_time(self) -> float: ...
    def scan_end_time(self) -> float: ...
    def cost_counts(self) -> dict[str, float]: ...
    def batches(self) -> int: ...
    def sample(self, t: float, full_scan_end: bool) -> dict[str, float]: ...


def take_pinned(queue: list[tuple[float, int, int, str, object]],
                pins: Sequence[tuple[str, int]]) -> dict[int, list[tuple[str, object]]]:
    """Move the fill/events that ``pins`` place at a full scan out of ``queue`` (a heap).

    ``pins`` (from a kernel trace: fidelity.pins()) lists (action, full_scans) of
    each event the kernel applied at a full-scan end, in order; the n-th event of
    an action here is matched with the n-th pin of that action."""
    out: dict[int, list[tuple[str, object]]] = {}
    if not pins:
        return out
    wanted: dict[tuple[str, int], int] = {}
    seen: dict[str, int] = {}
    for action, scans in pins:
        wanted[(action, seen.get(action, 0))] = scans
        seen[action] = seen.get(action, 0) + 1
    keep, count = [], dict.fromkeys(seen, 0)
    for item in sorted(queue):
        _t, _prio, _seq, kind, payload = item
        action = "fill" if kind == "fill" else str(getattr(payload, "action", ""))
        if kind in ("fill", "event") and action in count:
            n = count[action]
            count[action] += 1
            if (action, n) in wanted:
                out.setdefault(wanted[(action, n)], []).append((kind, payload))
                continue
        keep.append(item)
    queue[:] = keep
    heapq.heapify(queue)
    return out


def volatile_burst(rng: np.random.Generator, rate: float, pages: int
                   ) -> npt.NDArray[np.int64] | None:
    """The pages the volatile writer rewrites in one tick of a region (``rate`` pages
    a second): a whole number each tick, one more with the fraction's probability."""
    if rate <= 0:
        return None
    n = int(rate * VOLATILE_TICK)
    frac = rate * VOLATILE_TICK - n
    if frac > 0 and rng.random() < frac:
        n += 1
    if n <= 0:
        return None
    return np.asarray(rng.choice(pages, size=min(n, pages), replace=False), np.int64)


def knobs_after(e: SetKnob, ksm: KsmKnobs, thp: ThpKnobs, ksm_pages: bool
                ) -> tuple[KsmKnobs, ThpKnobs]:
    """The knobs after a ``set`` event (``ksm_pages``: KSM pages exist now)."""
    parts = e.knob.split(".")
    if parts[0] == "ksm":
        if parts[1] == "max_page_sharing" and ksm_pages:
            return ksm, thp  # max_page_sharing_store(): -EBUSY while KSM pages exist
        return ksm.model_copy(update={parts[1]: e.value}), thp
    if len(parts) == 3:
        khd = thp.khugepaged.model_copy(update={parts[2]: e.value})
        return ksm, thp.model_copy(update={"khugepaged": khd})
    return ksm, thp.model_copy(update={parts[1]: e.value})


def event_dict(e: object) -> dict[str, Any]:
    """An applied event as the trace records it."""
    dump = getattr(e, "model_dump", None)
    return dict(dump(mode="json")) if dump is not None else {"action": repr(e)}


class Timeline:
    """A run's queue of timed actions and its record: samples, events, scan ends."""

    def __init__(self, engine: Backend, pins: Sequence[tuple[str, int]] = ()) -> None:
        self.engine = engine
        self.queue: list[tuple[float, int, int, str, object]] = []
        self.seq = 0
        self.pins = list(pins)
        self.events: list[dict[str, Any]] = []
        self.rows: list[Mapping[str, float]] = []
        self.khd_generation = 0  # a khugepaged wake-up re-arms its timer
        # full_scans -> (cost counts, batches) at that full-scan end: for calibration
        self.at_scan_end: dict[int, tuple[dict[str, float], int]] = {}
        self.ksmd_pending = False

    def push(self, t: float, prio: int, kind: str, payload: object = None) -> None:
        heapq.heappush(self.queue, (t, prio, self.seq, kind, payload))
        self.seq += 1

    def khugepaged_pass(self, t: float) -> None:
        """A khugepaged pass now; its timer restarts after it (scan_sleep_millisecs_store()
        wakes it the same way)."""
        self.engine.khugepaged_scan()
        self.khd_generation += 1
        self.push(t + self.engine.khugepaged_period(), Prio.KHUGEPAGED_TIMER, "khugepaged",
                  self.khd_generation)

    def act(self, kind: str, payload: object, t: float, aligned: bool = False) -> None:
        eng = self.engine
        mark = {"full_scans": eng.full_scans(), "aligned": aligned}
        if kind == "fill":
            eng.fill()
            self.events.append({"t": round(t, 9), "action": "fill", **mark})
            return
        if isinstance(payload, KhugepagedWake):
            self.khugepaged_pass(t)
        eng.apply(payload, t)
        self.events.append({"t": round(t, 9), **event_dict(payload), **mark})
        if eng.should_run() and not self.ksmd_pending:
            eng.wake_ksmd(t)  # writing run wakes ksmd at once
            self.ksmd_pending = True

    def run(self, progress: Callable[[float], None] | None = None) -> list[Mapping[str, float]]:
        eng, sc = self.engine, self.engine.sc
        t_end = sc.duration + EPS
        n_samples = int(sc.duration / sc.sample_interval + EPS) + 1
        next_sample = 0  # samples are generated lazily (a 1 TiB host has many of them)
        for a in actions(sc):
            self.push(a.at, a.prio, a.kind, a.payload)
        per_s, per_scan = eng.has_volatile()
        if per_s:
            self.push(0.0 if sc.fill_at is None else sc.fill_at, Prio.VOLATILE, "volatile")
        if sc.khugepaged_wakes_at_start:
            # the live lab wakes khugepaged at time 0 (rewriting scan_sleep_millisecs)
            self.push(0.0, Prio.KHUGEPAGED_TIMER, "khugepaged", self.khd_generation)
        held: list[tuple[str, object]] = []  # align_events: due, waiting for a scan end
        at_scan = take_pinned(self.queue, self.pins)  # at the full scan the kernel applied them
        queue, rows = self.queue, self.rows
        while True:
            ts = next_sample * sc.sample_interval if next_sample < n_samples else None
            th = queue[0][0] if queue else None
            if th is None or (ts is not None and ts <= th):
                nxt, prio = ts, int(Prio.SAMPLE)
            else:
                nxt, prio = th, queue[0][1]
            if self.ksmd_pending:
                res = eng.ksmd_until(float("inf") if nxt is None else nxt, prio > Prio.KSMD,
                                     t_end)
                self.ksmd_pending = res != KSMD_IDLE  # else woken by the next run=1
                if res == KSMD_SCAN_END:
                    end = eng.scan_end_time()
                    if end <= t_end:
                        # the live lab samples right at each full-scan end (ksmd then
                        # sleeps), then does the per-scan writes and the held events
                        scans = eng.full_scans()
                        rows.append(eng.sample(end, True))
                        self.at_scan_end.setdefault(scans, (eng.cost_counts(), eng.batches()))
                        if per_scan:
                            eng.volatile_scan(scans)
                        for kind_, payload_ in at_scan.pop(scans, []) + held:
                            self.act(kind_, payload_, end, aligned=True)
                        held.clear()
                    continue
                if self.ksmd_pending and eng.ksmd_wake_time() > t_end and (
                        nxt is None or nxt > t_end):
                    break
            if nxt is None or nxt > t_end:
                break
            if prio == Prio.SAMPLE and ts is not None:
                rows.append(eng.sample(ts, False))
                next_sample += 1
                if progress is not None:
                    progress(ts)
                continue
            t, _prio, _s, kind, payload = heapq.heappop(queue)
            if kind in ("fill", "event"):
                if sc.align_events and eng.should_run():
                    held.append((kind, payload))
                else:
                    self.act(kind, payload, t)
            elif kind == "volatile":
                eng.volatile(t)
                self.push(t + VOLATILE_TICK, Prio.VOLATILE, "volatile")
            elif kind == "khugepaged" and payload == self.khd_generation:
                self.khugepaged_pass(t)  # (a stale entry: re-armed by a wake-up since)
        return rows


class Engine:
    """What both engines share: their timeline, and the trace of a run."""

    sc: Scenario
    profile: CostProfile
    policy: Policy
    notes: list[str]
    timeline: Timeline

    khugepaged: KhugepagedWalk[Any, Any]

    def khugepaged_scan(self) -> None:
        if self.khugepaged.slots:
            self.khugepaged.do_scan()

    def khugepaged_period(self) -> float:
        return timer_period_s(self.sc, self.khugepaged.knobs)

    def has_volatile(self) -> tuple[bool, bool]:
        """Whether any region has a volatile writer (per second, per full scan)."""
        regions = [r for p in self.sc.process for r in p.region]
        return (any(r.volatile_pages_per_s > 0 for r in regions),
                any(r.volatile_pages_per_scan > 0 for r in regions))

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.timeline.events

    @property
    def at_scan_end(self) -> dict[int, tuple[dict[str, float], int]]:
        """full_scans -> (cost counts, batches) at that full-scan end: for calibration."""
        return self.timeline.at_scan_end

    advisor: Advisor

    def run(self, progress: Callable[[float], None] | None = None) -> Trace:
        rows = self.timeline.run(progress)
        rec = self.advisor.record()
        if rec is not None and self.advisor.replay:
            n, k = len(rec["decisions"]), len(self.advisor.replay)
            if n != k:
                self.notes.append(f"advisor: the kernel made {k} decisions, the model {n} "
                                  f"(replayed {min(n, k)}; the rest are the model's own)")
        tr = model_trace(self.sc, self.policy.name, self.profile, rows, self.events,
                         self.notes)
        if rec is not None:
            tr.meta["advisor"] = rec  # the scan-time advisor's decisions (model/advisor.py)
        return tr


def kernel_stream(events: list[dict[str, Any]]) -> dict[str, Any]:
    """A model run's KSM event stream as ``Trace.kernel_events`` (either engine)."""
    counts: dict[str, int] = {}
    for ke in events:
        counts[ke["event"]] = counts.get(ke["event"], 0) + 1
    return {"source": "model", "recorded": True, "events": events, "counts": counts, "lost": 0}


def model_trace(sc: Scenario, policy: str, profile: CostProfile,
                rows: list[Mapping[str, float]], events: list[dict[str, Any]],
                notes: Sequence[str] = ()) -> Trace:
    """The trace of a model run (either engine): samples in time order, the meta
    the live lab writes too, counters starting from 0 (a zero baseline)."""
    meta: dict[str, Any] = {
        "source": "model",
        "policy": policy,
        "scenario": sc.model_dump(mode="json"),
        "kernel": f"model:{policy}",
        "knobs": {"ksm": sc.ksm.model_dump(mode="json"), "thp": sc.thp.model_dump(mode="json")},
        "sample_interval": sc.sample_interval,
        "profile": profile.to_json(),
        "baseline": {c: 0 for c in (rows[0] if rows else COLUMNS)
                     if is_monotonic(c) or c in VMSTAT_COUNTERS},
    }
    rows.sort(key=lambda r: r["t"])  # boundary samples were taken between ticks
    tr = Trace.from_rows(meta, rows, events)
    if notes:
        tr.meta["notes"] = list(notes)
    return tr


def sample_row(t: float, full_scan_end: bool, c: Mapping[str, float]) -> dict[str, float]:
    """One sample from an engine's raw counts ``c``: the counters KSM, vmstat and
    /proc derive from them (mm/ksm.c: general_profit_show(), ksm_process_profit();
    both written here once)."""
    shared, sharing, unshared = c["pages_shared"], c["pages_sharing"], c["pages_unshared"]
    rmap, zero = c["rmap_items"], c["ksm_zero_pages"]
    row: dict[str, float] = {
        "t": round(t, 9),
        FULL_SCAN_END: float(full_scan_end),
        "pages_scanned": c["pages_scanned"],
        "pages_shared": shared,
        "pages_sharing": sharing,
        "pages_unshared": unshared,
        "pages_volatile": max(0, rmap - shared - sharing - unshared),
        "pages_skipped": c["pages_skipped"],
        "ksm_zero_pages": zero,
        "full_scans": c["full_scans"],
        "stable_node_chains": c["stable_node_chains"],
        "stable_node_dups": c["stable_node_dups"],
        "general_profit": (sharing + zero) * 4096 - rmap * KSM_RMAP_ITEM_SIZE,
    }
    for k in VMSTAT_COUNTERS:
        row[k] = c[k]
    anon = c["anon_rss"]
    row["khugepaged_full_scans"] = c["khugepaged_full_scans"]
    row["khugepaged_pages_collapsed"] = c["khugepaged_pages_collapsed"]
    row["RssAnon"] = anon * 4
    row["Rss"] = anon * 4  # file/shmem RSS of the workload binary is not modelled
    row["AnonHugePages"] = c["thps_mapped"] * 2048
    # /proc/<pid>/ksm_stat summed over the workload's processes (ksm_process_profit())
    row["ksm_rmap_items"] = c["ksm_rmap_items"]
    row["ksm_merging_pages"] = c["ksm_merging_pages"]
    row["ksm_process_profit"] = (c["ksm_merging_pages"] + c["proc_ksm_zero_pages"]) * 4096 \
        - c["ksm_rmap_items"] * KSM_RMAP_ITEM_SIZE
    row["proc_ksm_zero_pages"] = c["proc_ksm_zero_pages"]
    row["ksmd_cpu_ns"] = int(c["ksmd_cpu_ns"])
    return {k: row[k] for k in COLUMNS}
