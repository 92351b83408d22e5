"""Scenario -> live trace, on the running kernel.

Order of a run: preflight checks (nothing touched yet) -> take the run lock ->
undo a killed run's journal if one is left -> baseline sample -> knobs (KSM
reset with run=2 first) -> workload processes ready (time 0) -> events and
samples until the duration -> workloads stopped -> knobs restored.  The
restore runs on every way out: normal end, exception, Ctrl-C, SIGTERM/SIGHUP;
after SIGKILL the journal is there for ``ksmlab restore`` or the next run.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from types import FrameType
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import events as kevents
from ..model.timeline import Prio
from ..model.timeline import actions as timeline_actions
from ..scenario import (
    FOLIO_ORDERS,
    KHUGEPAGED_PARKED_MS,
    PMD_ORDER,
    Event,
    KhugepagedWake,
    KsmStart,
    KsmStop,
    KsmUnmerge,
    Pressure,
    Scenario,
    SetKnob,
    Write,
    folio_size_name,
)
from ..trace import BUSY_PCT, Trace, is_monotonic, mthp_column, others_cpu_pct
from . import machine
from .attach import Attach, Attached
from .capture import Captured
from .damon import active_schemes
from .features import release_of
from .journal import BootValues, Journal, JournalDamaged, LockBusy, RunLock
from .kernelfs import KernelFS, KernelWriteError
from .knobs import (
    KSM,
    THP,
    KnobError,
    KnobSession,
    foreign_changes,
    knob,
    read_all,
    restore_values,
)
from .kthread import PASS_TIMEOUT_S, Khugepaged
from .pagemap import pagemap_pfns, thp_heads
from .sampler import Sampler
from .tracefs import KernelEvents, TracingError, restore_tracing
from .workload import Workload, WorkloadError, how_it_ended, thp_disable

MEMORY_MARGIN_MIB = 256
WATCH_S = 1.0  # how often a run looks for knobs someone else changed
# counters a pressure event records the change of (its own work: ksmd is held)
_SHRINKER_COUNTERS = ("thp_split_page", "thp_split_page_failed", "thp_underused_split_page",
                      "thp_split_pmd")
POLL_S = 0.001  # full_scans poll period: well inside ksmd's sleep after a full scan
ADVISOR_BUFFER_KB = 256  # per CPU, for ksm_advisor alone: one event per full scan


# Knobs that older or smaller kernels lack; a run goes on without them (with a note):
# the kernel then behaves as the comment says.  (Guest kernels of `ksmlab kernel`:
# 6.1 has none of the first three, and a kernel without CONFIG_NUMA has no
# merge_across_nodes.)  The release each came in: live/features.py.
OPTIONAL_KNOBS = {
    "ksm/advisor_mode": f"no advisor ({release_of('ksm/advisor_mode')}+), pages_to_scan "
    "is fixed",
    # the advisor's limits: noted once, with advisor_mode (a scenario with the advisor on
    # is refused on such a kernel: problems())
    **{f"ksm/advisor_{k}": "" for k in ("max_cpu", "min_pages_to_scan", "max_pages_to_scan",
                                        "target_scan_time")},
    "ksm/smart_scan": f"no smart scan ({release_of('ksm/smart_scan')}+): every page is "
    "scanned every time",
    "transparent_hugepage/shrink_underused": "no underused-THP shrinker "
    f"({release_of('transparent_hugepage/shrink_underused')}+)",
    "ksm/merge_across_nodes": "one NUMA node (CONFIG_NUMA=n): nothing to merge across",
}


class LiveError(RuntimeError):
    """A live run that cannot start or go on; the message is one line (exit code 2)."""


class Interrupted(BaseException):
    """SIGTERM or SIGHUP: unwinds like KeyboardInterrupt so every restore runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def _terminate_unwinds() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    # a process started in the background by a shell (or under nohup) inherits SIGINT
    # ignored, and Python then raises no KeyboardInterrupt: a live run must still end
    # (and restore) on Ctrl-C, so it takes SIGINT back for its duration
    old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def mem_available_mib(fs: KernelFS) -> int | None:
    for line in (fs.read_or_none("proc/meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return None


def problems(fs: KernelFS, sc: Scenario | None = None) -> list[str]:
    """Why a live run cannot work here (empty if it can); nothing is changed."""
    out: list[str] = []
    if os.geteuid() != 0:
        out.append("live runs need root: KSM and THP knobs in /sys/kernel/mm are root-only")
    if not fs.exists(f"{KSM}/run"):
        out.append("this kernel has no KSM (/sys/kernel/mm/ksm is missing: CONFIG_KSM=n)")
    if not fs.exists(f"{THP}/enabled"):
        out.append("this kernel has no THP (/sys/kernel/mm/transparent_hugepage is missing)")
    if sc is not None:
        if sc.ksm.advisor_mode != "none" and not fs.exists(f"{KSM}/advisor_mode"):
            out.append(f"scenario {sc.name} has advisor_mode {sc.ksm.advisor_mode}, which this "
                       f"kernel has not (the advisor: Linux {release_of('ksm/advisor_mode')}+)")
        for name, value in scenario_knobs(sc):
            if value not in ("never", "inherit") and _size_knob_missing(fs, name):
                out.append(f"scenario {sc.name} enables {name.split('/')[1]} folios, which "
                           "this kernel has not (multi-size THP: Linux 6.8+)")
        avail = mem_available_mib(fs)
        need = sc.total_mib + MEMORY_MARGIN_MIB
        if avail is not None and need > avail:
            out.append(
                f"scenario {sc.name} needs {sc.total_mib} MiB (+{MEMORY_MARGIN_MIB} MiB margin) "
                f"but MemAvailable is {avail} MiB"
            )
    return out


def scenario_knobs(sc: Scenario) -> list[tuple[str, object]]:
    """Knob writes that set a scenario up, in order.

    run=2 first: it unmerges everything, frees all rmap items and resets
    full_scans to 0 (``unmerge_and_remove_all_rmap_items``), so each run starts
    from the same KSM state, and max_page_sharing may then be written.
    advisor_mode=none next: pages_to_scan_store() refuses a write while the advisor
    is on (EINVAL), and switching it on later zeroes its context
    (set_advisor_defaults()).  The scenario's advisor_mode comes last of KSM's: the
    switch sets pages_to_scan to advisor_min_pages_to_scan (advisor_mode_store()), the
    value the scenario then has for it (scenario.KsmKnobs).
    """
    k, t = sc.ksm, sc.thp
    out: list[tuple[str, object]] = [("ksm/run", 2), ("ksm/advisor_mode", "none")]
    for name, value in k.model_dump().items():  # scenario.KsmKnobs, in its order
        if name != "advisor_mode":
            out.append((f"ksm/{name}", value))
    out.append(("ksm/advisor_mode", k.advisor_mode))
    for name in ("enabled", "defrag", "use_zero_page", "shrink_underused"):
        out.append((f"transparent_hugepage/{name}", getattr(t, name)))
    for name, value in t.khugepaged.model_dump().items():
        if name == "scan_sleep_millisecs":
            value = sc.khugepaged_kernel_sleep_ms()  # parked while the lab drives it
        out.append((f"transparent_hugepage/khugepaged/{name}", value))
    # every anon folio size, so a host's own mTHP settings never leak into a run
    for size, order in FOLIO_ORDERS.items():
        out.append((f"transparent_hugepage/hugepages-{size}/enabled", t.size_mode(order)))
    return out


def _size_knob_missing(fs: KernelFS, name: str) -> bool:
    return name.startswith("transparent_hugepage/hugepages-") and not fs.exists(
        f"sys/kernel/mm/{name}")


def restore_journal(fs: KernelFS, journal: Journal, lock: RunLock) -> list[tuple[str, str]]:
    """Put back what a killed run left changed; return what the journal held.  The
    journal goes only when every entry is back (else LiveError, journal kept)."""
    try:
        rec = journal.read()
    except JournalDamaged as e:
        raise LiveError(str(e)) from None
    if rec is None:
        return []
    holder = lock.holder()
    if holder is not None and holder != os.getpid():
        raise LiveError(f"a live run (pid {holder}) is in progress; its own restore will run")
    done: list[tuple[str, str]] = []
    if rec.tracing:
        # tracefs first: its files live on a mount the lab may have made
        journal.tracing = rec.tracing
        journal.saved = rec.saved
        failures = restore_tracing(fs, rec.tracing)
        if failures:
            raise LiveError("tracefs restore incomplete: " + "; ".join(failures))
        done += [(str(n), str(v)) for n, v in rec.tracing.get("saved", [])]
        if rec.tracing.get("instance"):
            done.append((str(rec.tracing["instance"]), "removed"))
        if rec.tracing.get("mount"):
            done.append(("sys/kernel/tracing", "unmounted"))
        journal.clear_tracing()
    left: list[str] = []
    failures = restore_values(fs, rec.saved, rec.wrote, left)
    if failures:
        raise LiveError("restore incomplete: " + "; ".join(failures))
    for line in left:  # not failures: someone's own setting since the run was killed
        print(f"ksmlab: note: {line}", file=sys.stderr)
    journal.remove()
    return rec.saved + done


@dataclass
class _Timed:
    at: float
    order: int
    event: Event | str  # a scenario event, or "ksm_start" / "fill" from the timeline
    tag: int = 0  # 1 + the event's index in the scenario (names the ids a write writes)


def _timeline(sc: Scenario) -> list[_Timed]:
    # the model's actions in the model's order at equal times (ksmlab.model.timeline)
    return [_Timed(a.at, n, "fill" if a.prio == Prio.FILL else "ksm_start"
                   if a.prio == Prio.KSM_START else a.payload, a.tag)  # type: ignore[arg-type]
            for n, a in enumerate(timeline_actions(sc))]


Progress = Callable[[dict[str, float]], None]


class LiveRun:
    @cached_property
    def sampler(self) -> Sampler:
        """The run's sampler (_loop() sets it); events read counters through it."""
        return Sampler(self.fs)

    def __init__(self, sc: Scenario, fs: KernelFS | None = None,
                 progress: Progress | None = None, log: Callable[[str], None] | None = None,
                 kernel_events: bool = False, attach: Attach | None = None) -> None:
        self.sc = sc
        self.attach = attach  # a process already running (validate --pid), not a workload
        self.fs = fs or KernelFS()
        self.progress = progress
        self.log = log or (lambda s: None)
        self.journal = Journal()
        self.lock = RunLock()
        self.events: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.ksm_running = False
        self.competitors: list[int] = []
        self.ksm_others: list[int] = []
        self.khugepaged = Khugepaged(self.fs)
        self.slow_passes = 0  # khugepaged passes not seen to end (PASS_TIMEOUT_S)
        self.enter_passes: int | None = None
        self.foreign: list[dict[str, Any]] = []  # knobs someone else changed mid-run
        self._next_watch = 0.0
        self._hold_since: float | None = None  # ksmd held at a full-scan end since
        self._hold_events = 0
        self._hold_late: int | None = None
        self.attach_paused = False
        self.captured: Captured | None = None
        self.changed_pages: int | None = None  # of an attached process still running
        # KSM's tracepoints recorded into the trace (live/tracefs.py); off by default
        self.kernel_events = kernel_events
        self.t0 = 0.0  # time 0 on time.monotonic()
        # pagemap snapshots while the stream is recorded: (full_scans or None, changes)
        self._snaps: list[tuple[int | None, dict[int, list[tuple[int, int]]]]] | None = None
        self._last: dict[int, tuple[npt.NDArray[np.int64], npt.NDArray[np.uint64]]] = {}
        self._advisor_raw: list[dict[str, Any]] | None = None  # tracefs events, if recorded

    def check(self) -> None:
        """Refuse (LiveError) before anything is touched if the run cannot work here."""
        why = problems(self.fs, self.sc)
        if why:
            raise LiveError(why[0])
        if self.attach is None and any(p.image is not None for p in self.sc.process):
            raise LiveError(f"{self.sc.name}: an image process is memory that was captured; "
                            "`ksmlab validate --pid PID` runs KSM on a process live")

    def run(self) -> Trace:
        self.check()
        try:
            self.lock.acquire()
        except LockBusy as e:
            raise LiveError(str(e)) from None
        try:
            left = restore_journal(self.fs, self.journal, self.lock)
            if left:
                self.log(f"restored {len(left)} knobs left changed by a killed run")
            crashed_without_journal(self.fs)
            BootValues().record(read_all(self.fs))  # once a boot, before any change
            thp_was_disabled = thp_disable(True)
            try:
                with _terminate_unwinds():
                    return self._run_locked()
            finally:
                thp_disable(thp_was_disabled)
        finally:
            self.lock.release()

    def _run_locked(self) -> Trace:
        sampler = Sampler(self.fs, mthp_sizes=[folio_size_name(o)
                                               for o in self.sc.thp.mthp_orders])
        baseline = sampler.sample(0.0)
        with KnobSession(self.fs, self.journal) as ks:
            try:
                for name, value in scenario_knobs(self.sc):
                    if name in OPTIONAL_KNOBS and not self.fs.exists(f"sys/kernel/mm/{name}"):
                        note = f"this kernel has no {name}: {OPTIONAL_KNOBS[name]}"
                        if OPTIONAL_KNOBS[name] and note not in self.notes:
                            self.notes.append(note)
                        continue
                    if _size_knob_missing(self.fs, name):
                        continue  # problems() refused a size the scenario enables
                    ks.set(name, value)
            except (KernelWriteError, KnobError) as e:
                raise LiveError(str(e)) from None
            knobs = read_all(self.fs)
            workloads: list[Workload] = []
            # the scan-time advisor's decisions (the ksm_advisor tracepoint) are recorded
            # whenever it is on: alone when KSM's event stream is not asked for
            advised = self.sc.ksm.advisor_mode == "scan-time"
            tracer = KernelEvents(self.fs, self.journal) if self.kernel_events else (
                KernelEvents(self.fs, self.journal, ADVISOR_BUFFER_KB, only=("ksm_advisor",))
                if advised else None)
            stream: dict[str, Any] | None = None
            try:
                if tracer is not None:
                    tracer.start()  # before the workloads: their ksm_enter is wanted
                kh_before = self.khugepaged.settle()
                if self.attach is not None:
                    base_rss = self._attach(self.attach, workloads)
                else:
                    base_rss = start_in_order(self.sc, workloads)
                self.enter_passes = _passes(kh_before, self.khugepaged.settle())
                sampler.pids = [w.pid for w in workloads]
                ours = {os.getpid(), *sampler.pids}
                self.competitors = thp_competitors(self.fs, ours)
                self.ksm_others = ksm_competitors(self.fs, ours)
                pfns = self._pagemap(workloads) if self.kernel_events and tracer is not None \
                    and tracer.available else {}
                if self.sc.khugepaged_wakes_at_start:
                    self._wake_khugepaged()
                rows = self._loop(ks, sampler, workloads)
                if self.attach is not None and not self.attach_paused:
                    self._changed_during_run(self.attach.pid)
                if tracer is not None and self.kernel_events:
                    stream = self._stream(tracer, workloads, pfns)
                elif tracer is not None:
                    self._advisor_raw = tracer.stop() if tracer.available else None
                    self.notes.extend(tracer.notes)
            except (WorkloadError, KernelWriteError, KnobError) as e:
                raise LiveError(str(e)) from None
            finally:
                if tracer is not None:
                    try:
                        tracer.restore()
                    except TracingError as e:
                        self.notes.append(str(e))
                for w in workloads:
                    w.stop()
                # unmerge_and_remove_all_rmap_items(): free what KSM kept of the dead
                # workload, so the machine's KSM state is left as clean as it was found
                ks.set("ksm/run", 2)
        # only counters the kernel never resets have a baseline; gauges such as
        # pages_unshared describe KSM's state before run=2 and mean nothing here
        self.notes.extend(ks.left)  # knobs someone else set, left as they set them
        baseline = {k: v for k, v in baseline.items() if is_monotonic(k)}
        baseline.update(base_rss)  # the workload's own interpreter before it mapped anything
        self._check_setup(rows, baseline)
        meta = {
            "source": "live",
            "kernel": os.uname().release,
            "machine": {"cpus": os.cpu_count(), "mem_total_mib": _mem_total_mib(self.fs)},
            # what keys a cost profile (ksmlab.profiles): calibrate knows whose traces
            "identity": machine.identity(self.fs),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "scenario": self.sc.model_dump(mode="json"),
            "knobs": knobs,
            "sample_interval": self.sc.sample_interval,
            "baseline": baseline,
            "notes": self.notes,
            # khugepaged passes while the workload was set up (the model replays them)
            "khugepaged_enter_passes": self.enter_passes,
            "foreign_knob_changes": self.foreign,
        }
        if advised:
            meta["advisor"] = self._advisor_record(knobs)
        if self.attach is not None:
            meta["attached"] = {"pid": self.attach.pid, "paused": self.attach_paused,
                                "image": str(self.attach.folder),
                                "changed_pages": self.changed_pages}
        tr = Trace.from_rows(meta, rows, self.events)
        tr.kernel_events = stream
        busy = others_cpu_pct(tr)
        meta["others_cpu_pct"] = None if busy is None else round(busy, 1)
        if busy is not None and busy > BUSY_PCT:
            self.notes.append(
                f"the machine was busy: other work used {busy:.0f} % of a CPU beside this run "
                "(ksmd's CPU and the full-scan times are skewed; counters are not)")
        return tr

    def _pages(self, workloads: list[Workload]
               ) -> dict[int, tuple[npt.NDArray[np.int64], npt.NDArray[np.uint64]]]:
        """instance -> (page index in its regions, pfn) of every page, in address order,
        from /proc/PID/pagemap (pfn 0: not present); {} if a pagemap cannot be read."""
        out = {}
        for inst, w in enumerate(workloads):
            spans, base = [], 0
            for addr, size in w.ready.get("regions", []):
                spans.append((int(addr), int(size), base))
                base += int(size) // 4096
            idx, pfn = [], []
            for addr, size, first in sorted(spans):  # address order (top-down mmap)
                try:
                    pfn.append(pagemap_pfns(self.fs, w.pid, addr, size))
                except OSError as e:
                    self.notes.append(f"no pagemap of workload {w.pid}: {e}")
                    self._snaps = None
                    return {}
                idx.append(np.arange(first, first + size // 4096, dtype=np.int64))
            if idx:
                out[inst] = (np.concatenate(idx), np.concatenate(pfn))
        return out

    def _thps(self, workloads: list[Workload]) -> dict[str, list[int]] | None:
        """instance -> page index of each THP of the workload not split yet, or None
        if a pagemap or /proc/kpageflags cannot be read."""
        pages = self._pages(workloads)
        if not pages:
            return None
        try:
            return {str(inst): thp_heads(self.fs, idx, pfn) for inst, (idx, pfn) in pages.items()}
        except OSError as e:
            self.notes.append(f"no THP map of the workload after the event: {e}")
            return None

    def _pagemap(self, workloads: list[Workload]) -> dict[int, tuple[int, int]]:
        """pfn -> (instance, page index in its regions) of every workload page at time 0
        (a pfn mapped more than once, the zero page, is left out); starts the snapshots
        events.name_by_snapshots() names pages from."""
        out: dict[int, tuple[int, int]] = {}
        twice: set[int] = set()
        self._snaps = []
        self._last = self._pages(workloads)
        for inst, (idx, pfns) in self._last.items():
            for i, pfn in zip(idx.tolist(), pfns.tolist(), strict=True):
                if pfn:
                    if pfn in out:
                        twice.add(pfn)
                    out[pfn] = (inst, i)
        for pfn in twice:
            del out[pfn]
        return out

    def _snapshot(self, workloads: list[Workload], scans: int | None) -> None:
        """The pages whose pfn changed since the last snapshot (at a full-scan end, while
        ksmd sleeps, or when tracing stopped: ``scans`` None)."""
        if self._snaps is None:
            return
        now = self._pages(workloads)
        if self._snaps is None:
            return
        changed: dict[int, list[tuple[int, int]]] = {}
        for inst, (idx, pfns) in now.items():
            old = self._last[inst][1]
            m = pfns != old
            changed[inst] = list(zip(idx[m].tolist(), pfns[m].tolist(), strict=True))
        self._snaps.append((scans, changed))
        self._last = now

    def _stream(self, tracer: KernelEvents, workloads: list[Workload],
                pfns: dict[int, tuple[int, int]]) -> dict[str, Any]:
        """Stop the tracepoints and name what they saw in the lab's names."""
        if not tracer.available:
            self.notes.extend(tracer.notes)
            return {"source": "tracefs", "recorded": False, "events": [], "notes": tracer.notes}
        raw = tracer.stop()
        self._advisor_raw = raw
        self._snapshot(workloads, None)  # where each page maps now
        known: dict[str, int] = {}
        if self.attach is not None and not self.ksm_others:
            # it entered KSM before the stream began; no other process has mergeable
            # memory, so the one mm in the stream is its
            seen = {str(e["mm"]) for e in raw if e.get("mm") is not None}
            if len(seen) == 1:
                known = {seen.pop(): 0}
        labelled, notes = kevents.label(raw, {w.pid: i for i, w in enumerate(workloads)},
                                        pfns, self.t0, known)
        named = kevents.name_by_snapshots(labelled, self._snaps or [])
        self.notes.extend(tracer.notes + notes)
        counts: dict[str, int] = {}
        for e in labelled:
            counts[e["event"]] = counts.get(e["event"], 0) + 1
        # each workload's mm pointer, from its own ksm_enter during set-up (in order)
        mms = {str(e["proc"]): e["mm"] for e in labelled
               if e["event"] == "ksm_enter" and e.get("proc") is not None}
        return {"source": "tracefs", "events": labelled, "counts": counts, "mms": mms,
                "lost": tracer.lost, "recorded": True,
                "enabled": tracer.names, "pages_identified": len(pfns),
                "named_by_pagemap": named, "snapshots": len(self._snaps or []),
                "pipe_reads": tracer.reads}

    def _advisor_record(self, knobs: dict[str, str]) -> dict[str, Any]:
        """The scan-time advisor's decisions, from its ksm_advisor tracepoint (fired by
        scan_time_advisor() at every full-scan end); the trace's ``meta["advisor"]``."""
        raw = self._advisor_raw
        decisions = [{"t": round(float(e["ts"]) - self.t0, 6), "scan_time": int(e["scan_time"]),
                      "pages_to_scan": int(e["pages_to_scan"]),
                      "cpu_percent": int(e["cpu_percent"])}
                     for e in raw or [] if e["event"] == "ksm_advisor" and "scan_time" in e]
        if raw is None:
            self.notes.append("the scan-time advisor's decisions were not recorded (no "
                              "ksm_advisor tracepoint): validate cannot replay them")
        return {"mode": "scan-time", "recorded": raw is not None,
                "knobs": {n.removeprefix("ksm/"): v for n, v in knobs.items()
                          if n.startswith("ksm/advisor_")},
                # advisor_mode_store() set it to advisor_min_pages_to_scan
                "pages_to_scan_at_switch": int(knobs.get("ksm/pages_to_scan", 0)),
                "decisions": decisions}

    def _wake_khugepaged(self) -> float | None:
        """One khugepaged pass, whole: wake it and wait until it sleeps again.

        Waking it at time 0 starts its timer as the model's is.  Waiting makes each
        pass happen between two ksmd batches, as in the model (kthread.py says why).
        """
        took = self.khugepaged.one_pass()
        if took is None and self.khugepaged.pid is not None:
            self.slow_passes += 1
        return took

    @contextmanager
    def _ksmd_held(self, ks: KnobSession) -> Iterator[dict[str, float]]:
        """ksmd waits (run=0) while an event's kernel work runs, so that the work is
        whole between two batches, as in the model.

        run_store() takes ksm_thread_mutex, so run=0 waits for a batch in progress; a
        sleeping ksmd finishes its sleep_millisecs and then waits on ksm_thread_wait
        until run=1 wakes it (ksm_scan_thread(), mm/ksm.c).  Work shorter than the
        sleep therefore changes nothing; longer work delays the next batch by the
        excess, which the event records as ``ksmd_held_s``.
        """
        held: dict[str, float] = {}
        if not self.ksm_running or self._hold_since is not None:
            yield held  # held since the full-scan end (_hold_at_boundary())
            return
        ks.set("ksm/run", 0)
        t = time.monotonic()
        try:
            yield held
        finally:
            ks.set("ksm/run", 1)
            held["ksmd_held_s"] = round(time.monotonic() - t, 4)

    def _attach(self, at: Attach, workloads: list[Workload]) -> dict[str, float]:
        """Capture the process now that KSM is unmerged (run=2) and khugepaged parked,
        so the image is the state KSM starts from; its scenario becomes the run's."""
        from .capture import CaptureError, capture

        self.attach_paused = self.fs.proc_state(at.pid) in ("T", "t")
        try:
            self.captured = capture([at.pid], at.folder, self.fs)
        except CaptureError as e:
            raise LiveError(str(e)) from None
        im = self.captured.image
        self.sc = at.scenario(at.folder)
        w = Attached(self.fs, at.pid, im)
        workloads.append(w)  # type: ignore[arg-type]  # the parts of Workload a run uses
        self.notes.extend(im.meta.notes)
        return dict(w.ready["base"])

    def _changed_during_run(self, pid: int) -> None:
        """A running process changes its memory while KSM runs; the model runs the
        image as captured.  Read it again and say how much changed."""
        from .capture import CaptureError, changed_pages

        assert self.captured is not None
        try:
            n = changed_pages(pid, self.captured, self.fs)
        except CaptureError as e:
            self.notes.append(f"the process kept running; its change is unknown: {e}")
            return
        self.changed_pages = n
        self.notes.append(f"the process kept running: {n} of its pages "
                          f"({n * 4 / 1024:.1f} MiB) changed during the run, which the "
                          "model, running the image as captured, does not see")

    def _hold_at_boundary(self, ks: KnobSession, sampler: Sampler) -> None:
        """Hold ksmd (run=0) the moment a full scan ends with events due there.

        ksmd sleeps only sleep_millisecs (20 ms) after the batch that ended the scan;
        the checkpoint sample and the pagemap snapshot before the events take about as
        long, and on a slower machine longer: ksmd then ran a batch of the next scan
        before the event (it split a THP the shrinker was to split), which the model,
        applying the event at the scan end, does not.  So run=0 comes first; a batch
        that started anyway shows as ``ksmd_ran_pages`` on the events.  The same for
        the writes of ``volatile_pages_per_scan``.  A hold shorter than the sleep
        changes nothing: ksmd ends its sleep, then waits for run=1.
        """
        before = sampler.pages_scanned()
        ks.set("ksm/run", 0)  # journalled in advance (KnobSession.expect)
        self._hold_since = time.monotonic()
        self._hold_events = len(self.events)
        after = sampler.pages_scanned()
        self._hold_late = None if before is None or after is None else after - before

    def _release_at_boundary(self, ks: KnobSession) -> None:
        if self._hold_since is None:
            return
        if self.ksm_running:  # not if an event stopped KSM (run=0 or 2) meanwhile
            ks.set("ksm/run", 1)
        took = round(time.monotonic() - self._hold_since, 4)
        for e in self.events[self._hold_events:]:
            e["ksmd_held_s"] = took
            e["ksmd_ran_pages"] = self._hold_late
        if self._hold_late:
            self.notes.append(f"ksmd scanned {self._hold_late} pages of the next scan before "
                              "the events due at a full-scan end: the lab was late")
        self._hold_since = None

    def _apply(self, item: _Timed, ks: KnobSession, workloads: list[Workload], t: float,
               scans: int | None = None, aligned: bool = False) -> None:
        ev = item.event
        extra: dict[str, Any] = {}
        if ev == "ksm_start" or isinstance(ev, KsmStart):
            ks.set("ksm/run", 1)
            self.ksm_running = True
        elif isinstance(ev, KsmStop):
            ks.set("ksm/run", 0)
            self.ksm_running = False
        elif isinstance(ev, KsmUnmerge):
            ks.set("ksm/run", 2)
            self.ksm_running = False
        elif isinstance(ev, KhugepagedWake):
            with self._ksmd_held(ks) as held:
                took = self._wake_khugepaged()
            extra.update(held, khugepaged_pass_s=None if took is None else round(took, 4))
        elif ev == "fill":
            for w in workloads:
                w.command("fill")
        elif isinstance(ev, Write):
            idx = next(i for i, (p, k, _) in enumerate(self.sc.instances())
                       if p == ev.process and k == 0)
            workloads[idx].command("write", region=ev.region, fraction=ev.fraction,
                                   content=ev.content, seed=ev.seed, tag=item.tag)
        elif isinstance(ev, SetKnob):
            try:
                ks.set(ev.sysfs_name, ev.value)
            except KernelWriteError as e:
                # max_page_sharing_store()/merge_across_nodes_store(): EBUSY while KSM
                # pages exist.  The kernel keeps the old value and goes on, and so does
                # the run (the model refuses the same set): the samples are kept
                extra["refused"] = os.strerror(e.errno or 0)
                self.notes.append(f"{e} at {t:.1f} s: the knob kept its value")
        elif isinstance(ev, Pressure):
            # drop_caches: bit 2 runs drop_slab(), which includes the deferred-split
            # shrinker; bit 1 first does lru_add_drain_all() (fs/drop_caches.c), so no
            # THP still sits in a per-CPU LRU batch, whose reference would make
            # split_folio() fail the refcount check at random (ksmd drains the same
            # way at every full-scan start).  ksmd is held meanwhile: it would find
            # the THPs the shrinker has pinned (deferred_split_scan() takes a
            # reference on every queued folio first) and fail to split them.
            others = foreign_thps(self.fs, [w.pid for w in workloads])
            if others:
                self.notes.append(
                    f"{others} THPs of other processes were mapped at the pressure event at "
                    f"{t:.1f} s: the shrinker splits theirs too, and thp_split_page counts them")
            with self._ksmd_held(ks) as held:
                before = self.sampler.vmstat()
                self.fs.write("proc/sys/vm/drop_caches", "3")
                after = self.sampler.vmstat()
                kept = self._thps(workloads)
            extra.update(held)
            # what the shrinker did, while ksmd was held: a THP it found underused
            # but could not split (another reference, or its lock, held for that
            # moment) leaves the queue for good (deferred_split_scan(), 6.12-6.18);
            # the model replays which THPs stayed (fidelity.replay())
            extra["vmstat"] = {k: int(after[k] - before[k]) for k in _SHRINKER_COUNTERS
                               if k in after and k in before}
            if kept is not None:
                extra["thps_kept"] = kept
        name = ev if isinstance(ev, str) else ev.action
        # full_scans when applied: the model can replay an aligned event at the same scan
        self.events.append({"t": round(t, 4), "action": name, "planned": item.at,
                            "full_scans": scans, "aligned": aligned, **extra})

    def _loop(self, ks: KnobSession, sampler: Sampler, workloads: list[Workload]
              ) -> list[dict[str, float]]:
        """Samples every sample_interval, plus one at each full-scan end.

        full_scans is polled every POLL_S; when it moves, ksmd has just ended a
        batch and sleeps sleep_millisecs (ksm_scan_thread()), so a sample taken now
        holds the exact counters at that boundary.
        """
        sc = self.sc
        self.sampler = sampler
        pending = _timeline(sc)
        held: list[_Timed] = []  # align_events: due, waiting for a full-scan end
        per_scan = any(r.volatile_pages_per_scan for p in sc.process for r in p.region)
        rows: list[dict[str, float]] = []
        t0 = self.t0 = time.monotonic()
        k = 0  # next regular sample index
        last_scans = sampler.full_scans()
        if (sc.align_events and pending) or per_scan:
            ks.expect("ksm/run", 0)  # the boundary hold then writes no journal

        def take(boundary: bool) -> None:
            row = sampler.sample(round(time.monotonic() - t0, 4), boundary)
            rows.append(row)
            if self.progress:
                self.progress(row)
            check_alive(workloads, row["t"])

        while True:
            now = time.monotonic() - t0
            while pending and pending[0].at <= now:
                item = pending.pop(0)
                if sc.align_events and self.ksm_running:
                    held.append(item)
                else:
                    self._apply(item, ks, workloads, time.monotonic() - t0, last_scans)
            scans = sampler.full_scans()
            if scans != last_scans:
                last_scans = scans
                boundary = scans is not None and scans > 0
                if boundary and (held or per_scan) and self.ksm_running:
                    self._hold_at_boundary(ks, sampler)  # first: ksmd sleeps 20 ms only
                take(boundary)
                if boundary and scans is not None:
                    if self._snaps is not None:
                        self._snapshot(workloads, scans)  # names merged pages (events.py)
                    # ksmd sleeps sleep_millisecs now: the model does these at the
                    # same point, right after the checkpoint, in this order
                    if per_scan:
                        for w in workloads:
                            w.command("volatile_scan", step=scans)
                    for item in held:
                        self._apply(item, ks, workloads, time.monotonic() - t0, scans, True)
                    held.clear()
                    self._release_at_boundary(ks)
            elif k * sc.sample_interval <= now:
                take(boundary=False)
                if now >= self._next_watch:  # ~20 sysfs reads: once a second, not a sample
                    self._next_watch = now + WATCH_S
                    self._watch_knobs(ks, rows[-1]["t"])
                    self._watch_ksm(workloads, rows[-1]["t"])
                k = int(now / sc.sample_interval) + 1  # skip ticks missed, never bunch up
            next_t = k * sc.sample_interval
            if next_t > sc.duration + 1e-9 and not pending:
                return rows
            if pending:
                next_t = min(next_t, pending[0].at)
            time.sleep(max(0.0, min(next_t - (time.monotonic() - t0), POLL_S)))

    def _watch_knobs(self, ks: KnobSession, t: float) -> None:
        """Note a knob someone else changes while the run goes on (once per knob): the
        run no longer measures its scenario, and restore will leave that knob alone."""
        seen = {c["knob"] for c in self.foreign}
        for name, _orig, ours, now in foreign_changes(self.fs, ks.saved, ks.wrote):
            if name not in seen:
                self.foreign.append({"knob": name, "ours": ours, "now": now, "t": t})
                self.notes.append(f"{name} was set to {now} by someone else at {t:.1f} s "
                                  f"(the run set {ours}): this run's verdicts do not hold")

    def _watch_ksm(self, workloads: list[Workload], t: float) -> None:
        """Note a process that makes memory mergeable while the run goes on (a QEMU
        guest started beside it): ksmd scans it in the same full scans, and the global
        counters (pages_scanned, full_scans' pace) count its pages too."""
        ours = {os.getpid(), *(w.pid for w in workloads)}
        for pid in ksm_competitors(self.fs, ours):
            if pid not in self.ksm_others:
                self.ksm_others.append(pid)
                self.notes.append(f"process {pid} made memory mergeable at {t:.1f} s: ksmd "
                                  "scans it too, so the global counters (pages_scanned) "
                                  "count its pages from then on")

    def _check_setup(self, rows: list[dict[str, float]], baseline: dict[str, float]
                     ) -> None:
        """Record what the kernel did not give us (THPs it could not allocate, ...)."""
        if not rows:
            return
        thp = self.sc.thp
        mib_by_order: dict[int, int] = {}
        for p in self.sc.process:
            for r in p.region:
                order = thp.fault_order(r.thp)
                mib_by_order[order] = mib_by_order.get(order, 0) + p.count * r.size_mib
        huge_mib = mib_by_order.get(PMD_ORDER, 0)
        if self.sc.fill_at is None and huge_mib:
            got = rows[0].get("AnonHugePages", 0.0) / 1024
            if got < huge_mib:
                self.notes.append(
                    f"only {got:.0f} of {huge_mib} MiB were THPs at time 0 "
                    "(THP allocation fell back to 4 KiB pages)"
                )
        for order, mib in mib_by_order.items():
            if self.sc.fill_at is not None or order in (0, PMD_ORDER):
                continue
            size = folio_size_name(order)
            # the per-size count is global: more means someone else faulted some too
            column = mthp_column(size, "anon_fault_alloc")
            got = rows[0].get(column, 0.0) - baseline.get(column, 0.0)
            want = mib * 1024 // (4 << order)
            if got < want:
                self.notes.append(f"only {got:.0f} of {want} {size} folios were faulted "
                                  "before time 0 (allocation fell back to smaller ones)")
        stall = _longest_stall(rows, self.sc)
        if stall > STALL_S:
            self.notes.append(
                f"ksmd made no progress for {stall:.1f} s while KSM ran (the machine was busy: "
                "full_scans and pages_scanned both stood still)"
            )
        for scheme in active_schemes(self.fs):
            if scheme.min_age_s is None or scheme.min_age_s <= self.sc.duration:
                self.notes.append(f"DAMON {scheme} ran beside this run: THPs it split or "
                                  "collapsed are in the counters, and the model has no DAMON")
        if self.ksm_others:
            self.notes.append(
                "ksmd also scans other processes with mergeable memory (pids "
                + ", ".join(str(p) for p in self.ksm_others[:8])
                + "): full scans take longer and KSM's global counters include their pages"
            )
        if self.slow_passes:
            self.notes.append(
                f"{self.slow_passes} khugepaged pass(es) were not seen to end within "
                f"{PASS_TIMEOUT_S:g} s: ksmd ran beside them"
            )
        if self.competitors:
            self.notes.append(
                "khugepaged also tracks processes with THP-eligible memory (pids "
                + ", ".join(str(p) for p in self.competitors[:8])
                + "): its pages_to_scan per pass is shared with them"
            )
        elif self.enter_passes == 0 and huge_mib and self.attach is None:
            # __khugepaged_enter() wakes khugepaged only when it adds an mm to an empty
            # list; an mm stays on it until it exits, even once its THP-eligible VMAs
            # are gone (numpy madvises MADV_HUGEPAGE on large arrays and frees them)
            self.notes.append(
                "khugepaged made no pass when the workload registered: another process "
                "was on its mm list (one that once had MADV_HUGEPAGE memory stays there "
                "until it exits), so its passes walk that process too; the model's do not"
            )


def check_alive(workloads: list[Workload], t: float) -> None:
    """End the run if a workload process died (the OOM killer, say): its memory left
    with it, so "freed" would count the dead process's pages as KSM's work."""
    for w in workloads:
        rc = w.proc.poll()
        if rc is not None:
            raise LiveError(f"workload process {w.pid} died at {t:.1f} s, "
                            f"{how_it_ended(rc)}: the run is void; knobs restored")


def restore_to_boot(fs: KernelFS, journal: Journal, boot: BootValues
                    ) -> list[tuple[str, str]]:
    """Every knob back as this boot had it before the lab's first change, for a journal
    that is damaged or lost; the journal goes once every knob is back."""
    values = boot.read()
    if values is None:
        raise LiveError("no record of this boot's values (a run records them before its "
                        f"first change): set the knobs by hand, then delete {journal.path}")
    saved = [(n, v) for n, v in values.items() if fs.exists(knob(n).rel)]
    failures = restore_values(fs, saved)
    if failures:
        raise LiveError("restore incomplete: " + "; ".join(failures))
    journal.path.unlink(missing_ok=True)
    return saved


def crashed_without_journal(fs: KernelFS) -> None:
    """Refuse to take the machine's values as its own when they carry the lab's mark:
    khugepaged parked at the lab's day-long sleep means a run was killed and its
    journal lost (deleted, or /run/ksmlab overridden); a baseline read now would make
    the next restore put the parked value back."""
    sleep = fs.read_or_none(f"{THP}/khugepaged/scan_sleep_millisecs")
    if sleep == str(KHUGEPAGED_PARKED_MS):
        raise LiveError(
            f"khugepaged/scan_sleep_millisecs is {sleep}, the value the lab parks it at, but "
            "no journal says so: a killed run's journal is lost; `ksmlab restore --to-boot` "
            "puts the knobs back as this boot had them")


def start_in_order(sc: Scenario, workloads: list[Workload],
                   start: Callable[..., Workload] = Workload) -> dict[str, float]:
    """Start the scenario's processes one at a time, each ready before the next.

    Their MADV_MERGEABLE/prctl then reach __ksm_enter() (and khugepaged_enter())
    in the scenario's order, and the mm_slot list is the one the model builds
    (__ksm_enter() appends while ksmd's cursor is at the list head).  Started
    together, the order was a race: one scenario split 1 THP in its second full
    scan in one run and 64 in the next.  Each process joins ``workloads`` as it
    starts, so the caller stops it whatever fails later.  Returns the summed
    baseline RSS of their interpreters."""
    base = {"RssAnon": 0.0, "Rss": 0.0}
    for pi, k, _ in sc.instances():
        w = start(sc, pi, k, fill_now=sc.fill_at is None)
        workloads.append(w)
        ready = w.wait_ready()
        for key in base:
            base[key] += float(ready["base"][key])
    return base


STALL_S = 1.0


def _passes(before: int | None, after: int | None) -> int | None:
    """khugepaged passes between two settled moments.  Only __khugepaged_enter() into
    an empty list wakes it during set-up, so there was one pass or none; a pass
    may sleep more than once (lru_add_drain_all() waits for per-CPU work)."""
    if before is None or after is None:
        return None
    return 1 if after > before else 0


def _longest_stall(rows: list[dict[str, float]], sc: Scenario) -> float:
    """Longest time with KSM running and neither full_scans nor pages_scanned moving."""
    if sc.ksm.sleep_millisecs * 10 > STALL_S * 1000 or sc.ksm_start_at is None:
        return 0.0
    longest, since, last = 0.0, None, None
    for r in rows:
        if r["t"] < sc.ksm_start_at:
            continue
        key = (r.get("full_scans"), r.get("pages_scanned"))
        if key != last:
            last, since = key, r["t"]
        elif since is not None:
            longest = max(longest, r["t"] - since)
    return longest


def ksm_competitors(fs: KernelFS, exclude: set[int]) -> list[int]:
    """Other processes with mergeable memory: ksmd scans them in the same full scans
    (QEMU marks guest RAM MADV_MERGEABLE by default).  From /proc/PID/ksm_stat (6.14+)."""
    out = []
    for d in fs.listdir("proc"):
        if d.isdigit() and int(d) not in exclude:
            stat = fs.read_or_none(f"proc/{d}/ksm_stat") or ""
            if "ksm_mergeable: yes" in stat or "ksm_merge_any: yes" in stat:
                out.append(int(d))
    return out


def thp_competitors(fs: KernelFS, exclude: set[int]) -> list[int]:
    """Other processes with THP-eligible anonymous memory: khugepaged scans them too."""
    out = []
    for d in fs.listdir("proc"):
        if not d.isdigit() or int(d) in exclude:
            continue
        smaps = fs.read_or_none(f"proc/{d}/smaps") or ""
        if "THPeligible:    1" in smaps and "AnonHugePages" in smaps:
            size = 0
            for line in smaps.splitlines():
                if line.startswith("Size:"):
                    size = int(line.split()[1])
                elif line.startswith("THPeligible:") and line.split()[1] == "1" and size >= 2048:
                    out.append(int(d))
                    break
    return out


def foreign_thps(fs: KernelFS, pids: list[int]) -> int:
    """PMD-mapped THPs on the machine that are not the workload's: the global
    nr_anon_transparent_hugepages less the workload's AnonHugePages."""
    total = 0
    for line in (fs.read_or_none("proc/vmstat") or "").splitlines():
        if line.startswith("nr_anon_transparent_hugepages "):
            total = int(line.split()[1])
    ours = 0
    for pid in pids:
        for line in (fs.read_or_none(f"proc/{pid}/smaps_rollup") or "").splitlines():
            if line.startswith("AnonHugePages:"):
                ours += int(line.split()[1]) // 2048
    return max(0, total - ours)


def _mem_total_mib(fs: KernelFS) -> int | None:
    for line in (fs.read_or_none("proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return None


