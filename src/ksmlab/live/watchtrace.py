"""``ksmlab watch --tracepoints``: which KSM merge attempt freed what.

Recorded in a trace instance of its own, ``instances/ksmlab-watch``
(:class:`~ksmlab.live.tracefs.KernelEvents`: tracefs mounted only if nothing is,
the instance journalled in ``watch-journal.json`` and removed at the end, by
``ksmlab restore`` after a SIGKILL; every other tracing state untouched).  One
``watch --tracepoints`` at a time (its own lock, beside any live run).  Events:

- ``ksm/ksm_merge_one_page`` (a merge with the zero page, use_zero_pages=1) and
  ``ksm/ksm_merge_with_ksm_page`` (every other merge attempt), fired after the
  attempt (try_to_merge_with_zero_page(), try_to_merge_with_ksm_page(),
  mm/ksm.c), with ``ksm_start_scan``/``ksm_stop_scan``;
- ``kmem/rss_stat`` filtered to ``member == 1 && curr == 0``: an mm's
  MM_ANONPAGES changed by a task that is not the mm's own (curr is 0 in kernel
  threads; include/trace/events/kmem.h), with the counter's exact new value.

The zero-page remap decrements MM_ANONPAGES once per remapped subpage
(try_to_map_unused_to_zeropage(), mm/migrate.c) in the task that splits: when
KSM splits a THP in try_to_merge_one_page(), those events come on ksmd's pid
just before the attempt's merge event.  So an attempt is credited with the run
of falling sizes on ksmd's pid since its previous attempt (an attempt with one
decrement, a zero-page merge's own, credits nothing: that page is in
``ksm_zero_pages``).  Falling sizes in another kernel thread are the split path
outside KSM (kswapd, khugepaged, kcompactd), by comm; in other tasks they are
mostly an exiting process's teardown (its mm is no longer current), and left out.

rss_stat names an mm by mm_ptr_to_hash(), so the process is found by value:
rss_stat's size is MM_ANONPAGES summed exactly, /proc/PID/status's RssAnon the
same counter read from its per-CPU parts; the mm is the process, among those
whose mergeable memory lost pages, whose RssAnon is nearest the last size
reported, within the per-CPU slack (and 2 MiB).  An mm matched to none stays
"unattributed".
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .journal import Journal, JournalDamaged, RunLock, state_dir
from .kernelfs import KernelFS
from .kthread import find_kthread
from .tracefs import KernelEvents, TracingError, parse, restore_tracing

if TYPE_CHECKING:
    from ..monitor import Snapshot

INSTANCE = "ksmlab-watch"
JOURNAL = "watch-journal.json"
EVENTS = ("ksm_merge_one_page", "ksm_merge_with_ksm_page", "ksm_start_scan", "ksm_stop_scan")
RSS_FILTER = "member == 1 && curr == 0"  # MM_ANONPAGES, changed by another task
BUFFER_KB = 4096
PAGE = 4096
ATTEMPTS_KEPT = 20
PF_KTHREAD = 0x00200000  # include/linux/sched.h


class WatchError(RuntimeError):
    """--tracepoints cannot start (one line)."""


@dataclass
class Attempt:
    t: float
    event: str
    err: int
    pfn: int
    mm: str  # KSM's %p of the mm
    mm_id: int | None  # rss_stat's of the same mm
    freed_pages: int

    def to_json(self, pid: int | None) -> dict[str, Any]:
        return {"t": self.t, "event": self.event, "err": self.err, "pfn": self.pfn,
                "pid": pid, "freed_bytes": self.freed_pages * PAGE}


@dataclass
class Attribution:
    attempts: int = 0
    freeing: int = 0  # attempts that freed pages outside KSM's account
    by_mm: dict[int, int] = field(default_factory=dict)  # mm_id -> pages, ksmd's attempts
    others: dict[str, int] = field(default_factory=dict)  # comm -> pages, other tasks
    last_size: dict[int, int] = field(default_factory=dict)  # mm_id -> bytes
    recent: list[Attempt] = field(default_factory=list)


def _fallen(sizes: list[int]) -> int:
    """Pages a run of rss_stat sizes fell by, the first event's own page included;
    a single event cannot be told from a rise and counts nothing."""
    if len(sizes) < 2 or sizes[-1] >= sizes[0]:
        return 0
    return (sizes[0] - sizes[-1]) // PAGE + 1


def attribute(events: list[dict[str, Any]], ksmd: int | None, acc: Attribution,
              pending: dict[int, dict[int, list[int]]]) -> None:
    """Fold parsed events (time order) into ``acc``; ``pending`` holds per pid the
    rss_stat sizes per mm since that pid's last merge attempt (carried between
    batches)."""
    for e in events:
        ev = e["event"]
        pid = int(e["pid"])
        if ev == "rss_stat" and e.get("curr") == 0 and "size" in e:
            pending.setdefault(pid, {}).setdefault(int(e["mm_id"]), []).append(int(e["size"]))
            acc.last_size[int(e["mm_id"])] = int(e["size"])
        elif ev in ("ksm_merge_one_page", "ksm_merge_with_ksm_page") and pid == ksmd:
            runs = pending.pop(pid, {})
            freed = {mm: _fallen(s) for mm, s in runs.items()}
            best = max(freed, key=lambda m: freed[m], default=None)
            pages = sum(freed.values())
            acc.attempts += 1
            if pages:
                acc.freeing += 1
                for mm, n in freed.items():
                    if n:
                        acc.by_mm[mm] = acc.by_mm.get(mm, 0) + n
                acc.recent.append(Attempt(float(e["ts"]), ev, int(e.get("err", 0)),
                                          int(e.get("pfn", 0)), str(e.get("mm", "")),
                                          best, pages))
                acc.recent = acc.recent[-ATTEMPTS_KEPT:]
    for pid in [p for p in pending if p != ksmd]:  # the split path outside KSM
        for sizes in pending.pop(pid).values():
            n = _fallen(sizes)
            if n:
                acc.others[str(pid)] = acc.others.get(str(pid), 0) + n


class WatchTracing:
    """The tracepoints of one ``watch --tracepoints``: start, attribute, restore."""

    def __init__(self, fs: KernelFS, folder: Path | None = None) -> None:
        self.fs = fs
        self.folder = folder or state_dir()
        self.journal = Journal(self.folder, JOURNAL)
        self.lock = RunLock(self.folder, kind="watch")
        self.events = KernelEvents(fs, self.journal, BUFFER_KB, only=EVENTS,
                                   instance=INSTANCE, extra={"kmem/rss_stat": RSS_FILTER},
                                   max_text=64 << 20)
        self.ksmd = find_kthread(fs, "ksmd")
        self.acc = Attribution()
        self._pending: dict[int, dict[int, list[int]]] = {}
        self.pids: dict[int, int] = {}  # mm_id -> pid, of processes alive
        self.known: dict[int, int] = {}  # every match made (names past attempts)
        self.credited: dict[int, int] = {}  # pid -> pages its mm was matched with
        self.comm: dict[str, str] = {}  # task -> comm of a kernel thread, "" otherwise
        self.lost = 0
        self._lost_lines = 0
        self.notes: list[str] = []

    def start(self) -> None:
        from .journal import LockBusy

        try:
            self.lock.acquire()
        except LockBusy:
            raise WatchError("another `ksmlab watch --tracepoints` (pid "
                             f"{self.lock.holder()}) is running") from None
        left = restore_watch(self.fs, self.folder, locked=True)
        if left:
            self.notes.append("removed the trace instance a killed watch left")
        if not self.events.start():
            self.notes.extend(self.events.notes)
            self.notes.append("--tracepoints: no per-merge attribution")

    def attribute(self, snap: Snapshot) -> None:
        """Fold what the tracepoints saw since the last call into ``snap.traced``."""
        if not self.events.available:
            return
        text, dropped = self.events.take()
        events, lost = parse(text)
        self._lost_lines += lost + dropped
        self.lost = self.events.overrun() + self._lost_lines
        attribute(events, self.ksmd, self.acc, self._pending)
        self._match(snap)
        for mm in [m for m in self.acc.by_mm if m in self.pids]:  # credited for good
            pid = self.pids[mm]
            self.credited[pid] = self.credited.get(pid, 0) + self.acc.by_mm.pop(mm)
        for task in self.acc.others:
            if task not in self.comm:
                self.comm[task] = self._kthread(int(task))
        others: dict[str, int] = {}
        for task, n in self.acc.others.items():
            c = self.comm[task]
            if c:  # a kernel thread (kswapd, khugepaged, ...), not a task's own exit
                others[c] = others.get(c, 0) + n * PAGE
        snap.traced = {
            "merge_attempts": self.acc.attempts,
            "attempts_freeing_outside_ksm": self.acc.freeing,
            "freed_by_ksmd_bytes": {str(p): n * PAGE for p, n in sorted(self.credited.items())},
            "freed_by_ksmd_unattributed_bytes": sum(self.acc.by_mm.values()) * PAGE,
            "freed_by_kernel_threads_bytes": others,
            "recent_attempts": [a.to_json(self.known.get(a.mm_id) if a.mm_id else None)
                                for a in self.acc.recent],
            "events_lost": self.lost,
        }

    def _kthread(self, pid: int) -> str:
        """The comm of a kernel thread, "" for any other task (or one gone): falling
        sizes in a task's own context at its exit are no split."""
        stat = (self.fs.slurp(f"proc/{pid}/stat") or "")
        head, _, rest = stat.rpartition(")")
        fields = rest.split()
        if len(fields) < 7 or not int(fields[6]) & PF_KTHREAD:  # field 9, flags
            return ""
        return head.partition("(")[2]

    def _match(self, snap: Snapshot) -> None:
        """rss_stat's mm ids to pids (the module docstring says how)."""
        ncpu = os.cpu_count() or 1
        slack = max(ncpu * max(32, 2 * ncpu) * PAGE, 2 << 20)
        alive = {p.pid for p in snap.procs}
        self.pids = {mm: pid for mm, pid in self.pids.items() if pid in alive}
        taken = set(self.pids.values())
        for mm in self.acc.by_mm:
            if mm in self.pids or mm not in self.acc.last_size:
                continue
            size = self.acc.last_size[mm]
            cands = [(abs(p.reading.rss_anon_kib * 1024 - size), p.pid) for p in snap.procs
                     if p.outside_pages > 0 and p.pid not in taken]
            if cands:
                d, pid = min(cands)
                if d <= slack:
                    self.pids[mm] = self.known[mm] = pid
                    taken.add(pid)

    def restore(self) -> None:
        try:
            self.events.restore()
        except TracingError as e:
            self.notes.append(str(e))
            raise
        finally:
            self.lock.release()


def restore_watch(fs: KernelFS, folder: Path | None = None, locked: bool = False
                  ) -> list[tuple[str, str]]:
    """Undo what a killed ``watch --tracepoints`` left (its instance, its mount);
    nothing while a watch holds its lock (unless ``locked``: the caller holds it)."""
    folder = folder or state_dir()
    journal = Journal(folder, JOURNAL)
    try:
        rec = journal.read()
    except JournalDamaged as e:
        raise WatchError(str(e)) from None
    if rec is None or not rec.tracing:
        return []
    if not locked and RunLock(folder, kind="watch").holder() is not None:
        return []  # a watch is running: its own restore will run
    failures = restore_tracing(fs, rec.tracing)
    if failures:
        raise WatchError("watch's tracefs restore incomplete: " + "; ".join(failures))
    journal.clear_tracing()
    done = []
    if rec.tracing.get("instance"):
        done.append((str(rec.tracing["instance"]), "removed"))
    if rec.tracing.get("mount"):
        done.append(("sys/kernel/tracing", "unmounted"))
    return done
