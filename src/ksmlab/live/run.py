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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from ..scenario import Event, KsmStart, KsmStop, KsmUnmerge, Pressure, Scenario, SetKnob, Write
from ..trace import Trace
from .journal import Journal, LockBusy, RunLock
from .kernelfs import KernelFS, KernelWriteError
from .knobs import KSM, THP, KnobError, KnobSession, read_all, restore_values
from .sampler import Sampler
from .workload import Workload, WorkloadError

MEMORY_MARGIN_MIB = 256


# Knobs that older or smaller kernels lack; a run goes on without them (with a note):
# the kernel then behaves as the comment says.  (Guest kernels of `ksmlab kernel`:
# 6.1 has none of the first three, and a kernel without CONFIG_NUMA has no
# merge_across_nodes.)
OPTIONAL_KNOBS = {
    "ksm/advisor_mode": "no advisor (6.8+), pages_to_scan is fixed",
    "ksm/smart_scan": "no smart scan (6.7+): every page is scanned every time",
    "transparent_hugepage/shrink_underused": "no underused-THP shrinker (6.12+)",
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
    """
    k, t = sc.ksm, sc.thp
    out: list[tuple[str, object]] = [("ksm/run", 2), ("ksm/advisor_mode", "none")]
    for name in ("pages_to_scan", "sleep_millisecs", "use_zero_pages", "smart_scan",
                 "max_page_sharing", "merge_across_nodes", "stable_node_chains_prune_millisecs"):
        out.append((f"ksm/{name}", getattr(k, name)))
    for name in ("enabled", "defrag", "use_zero_page", "shrink_underused"):
        out.append((f"transparent_hugepage/{name}", getattr(t, name)))
    for name, value in t.khugepaged.model_dump().items():
        out.append((f"transparent_hugepage/khugepaged/{name}", value))
    return out


def restore_journal(fs: KernelFS, journal: Journal, lock: RunLock) -> list[tuple[str, str]]:
    """Put back what a killed run left changed; return what the journal held."""
    rec = journal.read()
    if rec is None:
        journal.remove()
        return []
    holder = lock.holder()
    if holder is not None and holder != os.getpid():
        raise LiveError(f"a live run (pid {holder}) is in progress; its own restore will run")
    failures = restore_values(fs, rec.saved)
    if failures:
        raise LiveError("restore incomplete: " + "; ".join(failures))
    journal.remove()
    return rec.saved


@dataclass
class _Timed:
    at: float
    order: int
    event: Event | str  # a scenario event, or "ksm_start" / "fill" from the timeline


def _timeline(sc: Scenario) -> list[_Timed]:
    items = [_Timed(e.at, i + 2, e) for i, e in enumerate(sc.event)]
    if sc.fill_at is not None:
        items.append(_Timed(sc.fill_at, 0, "fill"))
    if sc.ksm_start_at is not None:
        items.append(_Timed(sc.ksm_start_at, 1, "ksm_start"))
    return sorted(items, key=lambda x: (x.at, x.order))


Progress = Callable[[dict[str, float]], None]


class LiveRun:
    def __init__(self, sc: Scenario, fs: KernelFS | None = None,
                 progress: Progress | None = None, log: Callable[[str], None] | None = None
                 ) -> None:
        self.sc = sc
        self.fs = fs or KernelFS()
        self.progress = progress
        self.log = log or (lambda s: None)
        self.journal = Journal()
        self.lock = RunLock()
        self.events: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def check(self) -> None:
        """Refuse (LiveError) before anything is touched if the run cannot work here."""
        why = problems(self.fs, self.sc)
        if why:
            raise LiveError(why[0])

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
            with _terminate_unwinds():
                return self._run_locked()
        finally:
            self.lock.release()

    def _run_locked(self) -> Trace:
        sampler = Sampler(self.fs)
        baseline = sampler.sample(0.0)
        with KnobSession(self.fs, self.journal) as ks:
            try:
                for name, value in scenario_knobs(self.sc):
                    if name in OPTIONAL_KNOBS and not self.fs.exists(f"sys/kernel/mm/{name}"):
                        self.notes.append(f"this kernel has no {name}: {OPTIONAL_KNOBS[name]}")
                        continue
                    ks.set(name, value)
            except (KernelWriteError, KnobError) as e:
                raise LiveError(str(e)) from None
            knobs = read_all(self.fs)
            workloads: list[Workload] = []
            try:
                for pi, k, _ in self.sc.instances():
                    workloads.append(Workload(self.sc, pi, k, fill_now=self.sc.fill_at is None))
                base_rss = {"RssAnon": 0.0, "Rss": 0.0}
                for w in workloads:
                    ready = w.wait_ready()
                    for key in base_rss:
                        base_rss[key] += float(ready["base"][key])
                sampler.pids = [w.pid for w in workloads]
                rows = self._loop(ks, sampler, workloads)
            except (WorkloadError, KernelWriteError, KnobError) as e:
                raise LiveError(str(e)) from None
            finally:
                for w in workloads:
                    w.stop()
        baseline.update(base_rss)
        for key in ("AnonHugePages", "ksm_rmap_items", "ksm_merging_pages",
                    "ksm_process_profit", "proc_ksm_zero_pages"):
            baseline[key] = 0.0
        self._check_setup(rows)
        meta = {
            "source": "live",
            "kernel": os.uname().release,
            "machine": {"cpus": os.cpu_count(), "mem_total_mib": _mem_total_mib(self.fs)},
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "scenario": self.sc.model_dump(mode="json"),
            "knobs": knobs,
            "sample_interval": self.sc.sample_interval,
            "baseline": baseline,
            "notes": self.notes,
        }
        return Trace.from_rows(meta, rows, self.events)

    def _apply(self, item: _Timed, ks: KnobSession, workloads: list[Workload], t: float) -> None:
        ev = item.event
        if ev == "ksm_start" or isinstance(ev, KsmStart):
            ks.set("ksm/run", 1)
        elif isinstance(ev, KsmStop):
            ks.set("ksm/run", 0)
        elif isinstance(ev, KsmUnmerge):
            ks.set("ksm/run", 2)
        elif ev == "fill":
            for w in workloads:
                w.command("fill")
        elif isinstance(ev, Write):
            idx = next(i for i, (p, k, _) in enumerate(self.sc.instances())
                       if p == ev.process and k == 0)
            workloads[idx].command("write", region=ev.region, fraction=ev.fraction,
                                   content=ev.content, seed=ev.seed)
        elif isinstance(ev, SetKnob):
            ks.set(ev.sysfs_name, ev.value)
        elif isinstance(ev, Pressure):
            # drop_caches runs shrink_slab, which includes the deferred-split shrinker
            self.fs.write("proc/sys/vm/drop_caches", "2")
        name = ev if isinstance(ev, str) else ev.action
        self.events.append({"t": round(t, 4), "action": name, "planned": item.at})

    def _loop(self, ks: KnobSession, sampler: Sampler, workloads: list[Workload]
              ) -> list[dict[str, float]]:
        sc = self.sc
        pending = _timeline(sc)
        rows: list[dict[str, float]] = []
        t0 = time.monotonic()
        k = 0  # next sample index
        while True:
            now = time.monotonic() - t0
            while pending and pending[0].at <= now:
                self._apply(pending.pop(0), ks, workloads, time.monotonic() - t0)
            if k * sc.sample_interval <= now:
                row = sampler.sample(round(time.monotonic() - t0, 4))
                rows.append(row)
                if self.progress:
                    self.progress(row)
                k = int(now / sc.sample_interval) + 1  # skip ticks missed, never bunch up
            next_t = k * sc.sample_interval
            if next_t > sc.duration + 1e-9 and not pending:
                return rows
            if pending:
                next_t = min(next_t, pending[0].at)
            time.sleep(max(0.0, next_t - (time.monotonic() - t0)))

    def _check_setup(self, rows: list[dict[str, float]]) -> None:
        """Record what the kernel did not give us (THPs it could not allocate, ...)."""
        if not rows:
            return
        huge_mib = sum(
            p.count * sum(r.size_mib for r in p.region if r.thp == "hugepage")
            for p in self.sc.process
        )
        if self.sc.fill_at is None and huge_mib:
            got = rows[0].get("AnonHugePages", 0.0) / 1024
            if got < huge_mib:
                self.notes.append(
                    f"only {got:.0f} of {huge_mib} MiB were THPs at time 0 "
                    "(THP allocation fell back to 4 KiB pages)"
                )


def _mem_total_mib(fs: KernelFS) -> int | None:
    for line in (fs.read_or_none("proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return None


