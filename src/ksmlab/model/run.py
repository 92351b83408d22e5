"""Scenario -> model trace: the timeline of the live lab, simulated.

Before time 0: KSM reset (run=2), knobs set, workload processes started; each
one does prctl(PR_SET_MEMORY_MERGE) first if asked, mmaps each region 2 MiB
aligned (top-down, as mmap places them), madvises MADV_HUGEPAGE/NOHUGEPAGE and
MADV_MERGEABLE (khugepaged, woken by the first mm entering its empty list, makes
one pass here), then writes every page in address order (or at ``fill_at``).
Time 0 = all workloads ready.  ksmd runs batches of pages_to_scan separated by
sleep_millisecs rounded to whole jiffies (costs.ksmd_wake) plus each batch's CPU cost;
khugepaged wakes at time 0 and then as the lab drives it (or its own timer);
samples are taken every sample_interval from 0 to duration inclusive (a sample
due at the same time as an action sees the state before it).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import content, image
from ..scenario import (
    HPAGE_PMD_NR,
    PAGE_SIZE,
    KhugepagedWake,
    KsmStart,
    KsmStop,
    KsmUnmerge,
    Pressure,
    Process,
    Region,
    Scenario,
    SetKnob,
    Write,
)
from ..trace import COLUMNS, FULL_SCAN_END, VMSTAT_COUNTERS, Trace, is_monotonic
from .costs import DEFAULT_PROFILE, CostProfile, CpuMeter, ksmd_wake
from .khugepaged import Khugepaged, khugepaged_enter_passes, timer_period_s
from .ksm import Ksm
from .memory import PMD_THP, Mm, Page, System, Thp, Vma
from .policies import get_policy
from .thp import deferred_split_scan, fill_fresh_vma, fill_from_image, write_fault


class ModelUnsupported(ValueError):
    """A scenario feature the model cannot represent (one-line message)."""


VOLATILE_TICK = 0.01  # seconds between the volatile writer's bursts


def check_supported(sc: Scenario) -> None:
    if sc.ksm.merge_across_nodes == 0:
        raise ModelUnsupported(
            "ksm.merge_across_nodes=0: the model has one NUMA node and no per-node trees"
        )
    if sc.thp.enabled != "never" and sc.thp.khugepaged.scan_sleep_millisecs == 0:
        raise ModelUnsupported(
            "thp.khugepaged.scan_sleep_millisecs=0: khugepaged without sleeps is not modelled"
        )
    for e in sc.event:
        if not isinstance(e, KsmStart | KsmStop | KsmUnmerge | Write | Pressure | SetKnob
                          | KhugepagedWake):
            raise ModelUnsupported(f"event {getattr(e, 'action', e)!r} is not modelled")


@dataclass
class _Region:
    process: int
    replica: int
    region: int
    spec: Region
    vma: Vma
    ids: list[int]
    rng: np.random.Generator
    ref: content.RegionRef


def image_span(iv: image.ImageVma) -> tuple[int, int]:
    """(lo, npages): a captured VMA's first page in the whole 2 MiB ranges the model
    maps it in, and their pages (both engines)."""
    lo = (iv.start // PAGE_SIZE) % HPAGE_PMD_NR
    return lo, -(-(lo + iv.pages) // HPAGE_PMD_NR) * HPAGE_PMD_NR


class Simulation:
    def __init__(self, sc: Scenario, policy: str, profile: CostProfile,
                 pins: Sequence[tuple[str, int]] = (),
                 khugepaged_enter_passes: int | None = None,
                 kernel_events: bool = False,
                 shrinker: Sequence[Mapping[str, Any]] = ()) -> None:
        check_supported(sc)
        self.sc = sc
        self.policy = get_policy(policy)
        self.profile = profile
        self.sys = System(self.policy, sc.thp)
        self.sys.ksm_use_zero_pages = sc.ksm.use_zero_pages
        self.cpu = CpuMeter(profile)
        self.ksm = Ksm(self.sys, sc.ksm, self.cpu)
        if kernel_events:
            self.ksm.trace = []  # KSM's tracepoints, as the kernel fires them (ksm.py)
        self.khugepaged = Khugepaged(self.sys, sc.thp.khugepaged)
        self.regions: list[_Region] = []
        self.fresh = 0  # next fresh content id index
        self.events: list[dict[str, Any]] = []
        self.tags = {id(e): i + 1 for i, e in enumerate(sc.event)}  # names written ids
        self.khd_generation = 0  # a khugepaged wake-up re-arms its timer
        self.batches = 0  # ksmd batches so far (each followed by a sleep)
        # full_scans -> (cost counts, batches) at that full-scan end: for calibration
        self.at_scan_end: dict[int, tuple[dict[str, float], int]] = {}
        self.heap: list[tuple[float, int, int, str, object]] = []
        self.pins = list(pins)
        self.enter_passes = khugepaged_enter_passes
        self.shrinker = list(shrinker)  # a replay: what each pressure event's shrinker did
        self.notes: list[str] = []
        self.image_vmas: dict[Mm, list[tuple[Vma, int]]] = {}
        self.seq = 0
        self._setup()

    def _take_pinned(self) -> dict[int, list[tuple[str, object]]]:
        """Move the fill/events that ``pins`` place at a full scan out of the clock.

        ``pins`` (from a kernel trace: fidelity.pins()) lists (action, full_scans) of
        each event the kernel applied at a full-scan end, in order; the n-th event of
        an action here is matched with the n-th pin of that action."""
        out: dict[int, list[tuple[str, object]]] = {}
        if not self.pins:
            return out
        wanted: dict[tuple[str, int], int] = {}
        seen: dict[str, int] = {}
        for action, scans in self.pins:
            wanted[(action, seen.get(action, 0))] = scans
            seen[action] = seen.get(action, 0) + 1
        keep, count = [], dict.fromkeys(seen, 0)
        for item in sorted(self.heap):
            _t, _prio, _seq, kind, payload = item
            action = "fill" if kind == "fill" else str(getattr(payload, "action", ""))
            if kind in ("fill", "event") and action in count:
                n = count[action]
                count[action] += 1
                if (action, n) in wanted:
                    out.setdefault(wanted[(action, n)], []).append((kind, payload))
                    continue
            keep.append(item)
        self.heap[:] = keep
        heapq.heapify(self.heap)
        return out

    def push(self, t: float, prio: int, kind: str, payload: object = None) -> None:
        heapq.heappush(self.heap, (t, prio, self.seq, kind, payload))
        self.seq += 1

    # ---- before time 0 ----------------------------------------------------
    def _setup(self) -> None:
        sc = self.sc
        sys = self.sys
        refs = list(content.layout(sc))
        r = 0
        for pid, (pi, k, proc) in enumerate(sc.instances(), start=1):
            mm = Mm(pid, f"{proc.name}.{k}")
            sys.mms.append(mm)
            if proc.merge == "prctl":
                mm.merge_any = True  # PR_SET_MEMORY_MERGE before any mmap
                self.ksm.enter(mm)
            if proc.image is not None:
                self._map_image(mm, proc)
                continue
            for ri, reg in enumerate(proc.region):
                ref = refs[r]
                r += 1
                assert (ref.process, ref.replica, ref.region) == (pi, k, ri)
                vma = sys.mmap(mm, reg.pages)
                vma.mergeable = mm.merge_any  # ksm_vma_flags() at mmap time
                if reg.thp == "hugepage":
                    vma.hugepage = True
                elif reg.thp == "nohugepage":
                    vma.nohugepage = True
                if content.mergeable(sc, ref) and proc.merge == "madvise":
                    vma.mergeable = True  # MADV_MERGEABLE -> __ksm_enter()
                    self.ksm.enter(mm)
                ids = [int(x) for x in content.region_ids(sc, ref)]
                rng = np.random.default_rng([reg.seed, pi, k, ri, 0x5EED])
                self.regions.append(_Region(pi, k, ri, reg, vma, ids, rng, ref))
        self._vma_bases()
        self._register_khugepaged()
        for _ in range(khugepaged_enter_passes(self.khugepaged.slots, self.enter_passes)):
            self.khugepaged.do_scan()
        if sc.fill_at is None:
            self._fill()
        if self.ksm.trace is not None:
            self._name_pages()

    def _map_image(self, mm: Mm, proc: Process) -> None:
        """A captured process's VMAs (ksmlab capture), in its address order, each in
        whole 2 MiB ranges of the model's address space, with its pages as they were."""
        assert proc.image is not None
        im = image.load(proc.image)
        ip = im.meta.processes[proc.image_process]
        cid, flags = im.cid[proc.image_process], im.flags[proc.image_process]
        made = []
        for iv in reversed(ip.vmas):  # mmap() places each below the one before
            lo, npages = image_span(iv)
            vma = self.sys.mmap(mm, npages, lo, lo + iv.pages)
            vma.hugepage, vma.nohugepage, vma.mergeable = iv.hugepage, iv.nohugepage, True
            fill_from_image(self.sys, vma, cid[iv.first:iv.first + iv.pages],
                            flags[iv.first:iv.first + iv.pages])
            made.append((vma, iv.first - lo))
        self.image_vmas[mm] = made
        mm.merge_any = ip.merge_any
        self.ksm.enter(mm)

    def _vma_bases(self) -> None:
        """Each VMA's (instance, index of its first page in the instance's regions): the
        names the live lab gives pages (pagemap) and THPs (kpageflags)."""
        inst_of = {(pi, k): inst for inst, (pi, k, _) in enumerate(self.sc.instances())}
        first = 0
        last: tuple[int, int] | None = None
        for reg in self.regions:
            if (reg.process, reg.replica) != last:
                first, last = 0, (reg.process, reg.replica)
            self.ksm.vma_base[reg.vma] = (inst_of[(reg.process, reg.replica)], first)
            first += reg.spec.pages
        for inst, mm in enumerate(self.sys.mms):  # image pages: index in its arrays
            for vma, base in self.image_vmas.get(mm, []):
                self.ksm.vma_base[vma] = (inst, base)

    def _name_pages(self) -> None:
        """The pages at time 0 by [instance, index in its regions], as the live lab's
        pagemap snapshot names them (a page mapped twice is left out, like a pfn)."""
        seen: set[Page] = set()
        for vma, (inst, first) in self.ksm.vma_base.items():
            for i, pte in enumerate(vma.pte):
                if isinstance(pte, Page):
                    if pte in self.ksm.pages:
                        seen.add(pte)
                    self.ksm.pages[pte] = [inst, first + i]
        for pg in seen:
            del self.ksm.pages[pg]

    def _kernel_kept(self) -> Callable[[Thp], bool] | None:
        """A replay's next pressure event: the THPs the kernel's shrinker left whole
        (``thps_kept``), as a test on the model's folios; None: no record of it."""
        if not self.shrinker:
            return None
        kept = self.shrinker.pop(0).get("thps_kept")
        if kept is None:
            return None
        names = {(int(inst), int(i)) for inst, idx in kept.items() for i in idx}

        def held(folio: Thp) -> bool:
            inst, first = self.ksm.vma_base[folio.vma]
            return (inst, first + folio.index) in names

        return held

    def _register_khugepaged(self) -> None:
        # khugepaged_enter_vma(): at mmap (THP "always") or MADV_HUGEPAGE, and at a THP fault
        for mm in self.sys.mms:
            if mm.khugepaged or any(self.sys.thp_allowed(v) for v in mm.vmas):
                self.khugepaged.register(mm)

    def _fill(self) -> None:
        for reg in self.regions:
            fill_fresh_vma(self.sys, reg.vma, reg.ids)
        self._register_khugepaged()

    # ---- actions ---------------------------------------------------------
    def _apply(self, e: object, t: float) -> None:
        ksm = self.ksm
        if isinstance(e, KsmStart):
            ksm.run = 1
            self.sys.ksm_running = True
        elif isinstance(e, KsmStop):
            ksm.run = 0
            self.sys.ksm_running = False
        elif isinstance(e, KsmUnmerge):
            ksm.run = 2
            self.sys.ksm_running = False
            ksm.unmerge_all()
        elif isinstance(e, Write):
            reg = next(x for x in self.regions
                       if (x.process, x.replica, x.region) == (e.process, 0, e.region))
            targets = content.write_targets(e.fraction, reg.spec.pages, e.seed,
                                            salt=e.process * 1000 + e.region)
            if e.content == "zero":
                cids = [0] * len(targets)
            else:  # the same ids the live workload writes
                cids = [int(x) for x in content.written_ids(reg.ref, self.tags[id(e)], targets)]
            for i, cid in zip(targets.tolist(), cids, strict=True):
                write_fault(self.sys, reg.vma, i, cid)
        elif isinstance(e, Pressure):
            failed = (self.shrinker[0].get("vmstat") or {}).get("thp_split_page_failed", 0) \
                if self.shrinker else 0
            kept = self._kernel_kept()
            held: list[Thp] = []

            def kernel_held(folio: Thp) -> bool:
                if kept is not None and kept(folio):
                    held.append(folio)
                    return True
                return False

            deferred_split_scan(self.sys, kernel_held, int(failed))
            if held:
                self.notes.append(
                    f"replayed: at the pressure event at {t:.1f} s the kernel's shrinker "
                    f"left {len(held)} underused THP(s) whole (held by another reference "
                    "for that moment); the model kept them too")
            # ksm-huge-under-pressure: pressure lasts until two full scans begun
            # after the event have ended (KSM needs two visits to merge a page)
            ksm.pressure_scans = 2 if ksm.at_scan_start() else 3
        elif isinstance(e, SetKnob):
            self._set_knob(e)
        elif isinstance(e, KhugepagedWake):
            # scan_sleep_millisecs_store(): a pass now, the timer restarts after it
            self._khugepaged_pass(t)
        else:  # pragma: no cover - check_supported() refuses these
            raise ModelUnsupported(f"event {e!r} is not modelled")

    def _set_knob(self, e: SetKnob) -> None:
        """A knob written mid-run: every component sees the new value."""
        parts = e.knob.split(".")
        sys, ksm = self.sys, self.ksm
        if parts[0] == "ksm":
            if parts[1] == "max_page_sharing" and (ksm.pages_shared or ksm.pages_sharing):
                return  # max_page_sharing_store(): -EBUSY while KSM pages exist
            ksm.knobs = ksm.knobs.model_copy(update={parts[1]: e.value})
            sys.ksm_use_zero_pages = ksm.knobs.use_zero_pages
        elif len(parts) == 3:
            khd = sys.thp.khugepaged.model_copy(update={parts[2]: e.value})
            sys.thp = sys.thp.model_copy(update={"khugepaged": khd})
            self.khugepaged.knobs = khd
        else:
            sys.thp = sys.thp.model_copy(update={parts[1]: e.value})

    def _volatile_scan(self, step: int) -> None:
        """volatile_pages_per_scan: the writes at the ``step``-th full-scan end."""
        for reg in self.regions:
            if reg.spec.volatile_pages_per_scan:
                idx = content.volatile_targets(reg.ref, step)
                ids = content.written_ids(reg.ref, content.VOLATILE_TAG + step, idx)
                for i, cid in zip(idx.tolist(), ids.tolist(), strict=True):
                    write_fault(self.sys, reg.vma, int(i), int(cid))

    def _khugepaged_pass(self, t: float) -> None:
        if self.khugepaged.slots:
            self.khugepaged.do_scan()
        self.khd_generation += 1
        period = timer_period_s(self.sc, self.khugepaged.knobs)
        self.push(t + period, 5, "khugepaged", self.khd_generation)

    def _volatile(self, t: float) -> None:
        for reg in self.regions:
            rate = reg.spec.volatile_pages_per_s
            if rate <= 0:
                continue
            n = int(rate * VOLATILE_TICK)
            frac = rate * VOLATILE_TICK - n
            if frac > 0 and reg.rng.random() < frac:
                n += 1
            if n <= 0:
                continue
            targets = reg.rng.choice(reg.spec.pages, size=min(n, reg.spec.pages), replace=False)
            cids = content.fresh_ids(self.fresh, len(targets))
            self.fresh += len(targets)
            for i, cid in zip(targets.tolist(), cids.tolist(), strict=True):
                write_fault(self.sys, reg.vma, int(i), int(cid))

    # ---- samples ---------------------------------------------------------
    def _sample(self, t: float, full_scan_end: bool = False) -> dict[str, float]:
        sys = self.sys
        row: dict[str, float] = {"t": round(t, 9), FULL_SCAN_END: float(full_scan_end)}
        row.update(self.ksm.counters())
        for k in VMSTAT_COUNTERS:
            row[k] = sys.nr_anon_thp if k == "nr_anon_transparent_hugepages" else sys.vmstat[k]
        row["khugepaged_full_scans"] = self.khugepaged.full_scans
        row["khugepaged_pages_collapsed"] = self.khugepaged.pages_collapsed
        anon = sum(mm.anon_rss for mm in sys.mms)
        row["RssAnon"] = anon * 4
        row["Rss"] = anon * 4  # file/shmem RSS of the workload binary is not modelled
        thps = sum(sum(1 for s in v.pmd if s == PMD_THP) for mm in sys.mms for v in mm.vmas)
        row["AnonHugePages"] = thps * 2048
        row["ksm_rmap_items"] = sum(mm.ksm_rmap_items for mm in sys.mms)
        row["ksm_merging_pages"] = sum(mm.ksm_merging_pages for mm in sys.mms)
        row["ksm_process_profit"] = sum(mm.ksm_process_profit() for mm in sys.mms)
        row["proc_ksm_zero_pages"] = sum(mm.ksm_zero_pages for mm in sys.mms)
        row["ksmd_cpu_ns"] = int(self.cpu.ns)
        return {**{c: row[c] for c in COLUMNS}, **sys.mthp}

    # ---- the timeline ----------------------------------------------------
    def run(self, progress: Callable[[float], None] | None = None) -> Trace:
        sc = self.sc
        dur = sc.duration
        n_samples = int(dur / sc.sample_interval + 1e-9) + 1
        push, heap = self.push, self.heap  # (time, priority, seq, kind, payload)
        for k in range(n_samples):
            push(k * sc.sample_interval, 0, "sample")
        if sc.fill_at is not None:
            push(sc.fill_at, 1, "fill")
        if sc.ksm_start_at is not None:
            push(sc.ksm_start_at, 2, "event", KsmStart(action="ksm_start", at=sc.ksm_start_at))
        for e in sc.event:
            push(e.at, 3, "event", e)
        for at in sc.khugepaged_wakes():  # the lab's wake-ups (drive_khugepaged)
            push(at, 7, "event", KhugepagedWake(action="khugepaged", at=at))
        if any(r.spec.volatile_pages_per_s > 0 for r in self.regions):
            push(0.0 if sc.fill_at is None else sc.fill_at, 4, "volatile")
        if sc.khugepaged_wakes_at_start:
            # the live lab wakes khugepaged at time 0 (rewriting scan_sleep_millisecs)
            push(0.0, 5, "khugepaged", self.khd_generation)
        per_scan = any(r.spec.volatile_pages_per_scan for r in self.regions)
        held: list[tuple[str, object]] = []  # align_events: due, waiting for a scan end
        at_scan = self._take_pinned()  # replayed at the full scan the kernel applied them
        ksmd_pending = False
        rows: list[Mapping[str, float]] = []

        def act(kind: str, payload: object, t: float, aligned: bool = False) -> None:
            nonlocal ksmd_pending
            mark = {"full_scans": self.ksm.seqnr, "aligned": aligned}
            if kind == "fill":
                self._fill()
                self.events.append({"t": round(t, 9), "action": "fill", **mark})
                return
            self._apply(payload, t)
            self.events.append({"t": round(t, 9), **_event_dict(payload), **mark})
            if self.ksm.should_run() and not ksmd_pending:
                push(t, 6, "ksmd")  # writing run wakes ksmd at once
                ksmd_pending = True

        while heap:
            t, _prio, _s, kind, payload = heapq.heappop(heap)
            if t > dur + 1e-9:
                break
            if kind == "sample":
                rows.append(self._sample(t))
                if progress is not None:
                    progress(t)
            elif kind in ("fill", "event"):
                if sc.align_events and self.ksm.should_run():
                    held.append((kind, payload))
                else:
                    act(kind, payload, t)
            elif kind == "volatile":
                self._volatile(t)
                push(t + VOLATILE_TICK, 4, "volatile")
            elif kind == "khugepaged":
                if payload == self.khd_generation:  # else re-armed by a wake-up since
                    self._khugepaged_pass(t)
            elif kind == "ksmd":
                ksmd_pending = False
                if not self.ksm.should_run():
                    continue  # wait_event_freezable(): woken by the next run=1
                before = self.cpu.ns
                scans = self.ksm.seqnr
                self.ksm.now = t
                self.ksm.do_scan()
                self.cpu.charge("batch_overhead_ns")
                self.cpu.charge("cold_start", min(self.cpu.ns - before,
                                                  self.profile.cold_window_ns))
                self.batches += 1
                busy = (self.cpu.ns - before) / 1e9
                ms = self.ksm.knobs.sleep_millisecs  # a `set` event may change it
                prof = self.profile
                push(ksmd_wake(t, busy, ms, prof.sleep_slack_ns, prof.tick_ns), 6, "ksmd")
                ksmd_pending = True
                end = t + busy
                if self.ksm.seqnr > scans and end <= dur + 1e-9:
                    # the live lab samples right at each full-scan end (ksmd then
                    # sleeps), then does the per-scan writes and the held events
                    rows.append(self._sample(end, full_scan_end=True))
                    self.at_scan_end.setdefault(
                        self.ksm.seqnr, (dict(self.cpu.counts), self.batches))
                    if per_scan:
                        self._volatile_scan(self.ksm.seqnr)
                    for kind_, payload_ in at_scan.pop(self.ksm.seqnr, []) + held:
                        act(kind_, payload_, end, aligned=True)
                    held.clear()
        tr = model_trace(sc, self.policy.name, self.profile, rows, self.events)
        if self.notes:
            tr.meta["notes"] = self.notes
        if self.ksm.trace is not None:
            counts: dict[str, int] = {}
            for ke in self.ksm.trace:
                counts[ke["event"]] = counts.get(ke["event"], 0) + 1
            tr.kernel_events = {"source": "model", "recorded": True, "events": self.ksm.trace,
                                "counts": counts, "lost": 0}
        return tr


def model_trace(sc: Scenario, policy: str, profile: CostProfile,
                rows: list[Mapping[str, float]], events: list[dict[str, Any]]) -> Trace:
    """The trace of a model run (either engine): samples in time order, the meta
    the live lab writes too, counters starting from 0 (a zero baseline)."""
    meta = {
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
    return Trace.from_rows(meta, rows, events)


def _event_dict(e: object) -> dict[str, Any]:
    dump = getattr(e, "model_dump", None)
    return dict(dump(mode="json")) if dump is not None else {"action": repr(e)}


ENGINES = ("auto", "fast", "exact")


# Resident bytes per simulated page, measured (benchmarks/model_speed.py, and peak RSS
# after full scans of mixed/thp-z50-unique/seed-uzp0-nothp: 336-425 B with the exact
# engine's objects, 29.8 B with the fast engine's arrays at host-1t), with a margin;
# plus the interpreter, numpy and numba
BYTES_PER_PAGE = {"exact": 512, "fast": 32}
BASE_BYTES = 512 << 20


def memory_estimate(sc: Scenario, engine: str = "auto", pinned: bool = False
                    ) -> tuple[int, str]:
    """(bytes, engine) a model run of ``sc`` needs at most, before it starts: the
    engine ``simulate()`` would choose, times the pages the scenario maps."""
    if engine == "auto":
        from .fast import unsupported

        engine = "exact" if pinned or unsupported(sc) is not None else "fast"
    pages = sc.total_mib * 256
    return BASE_BYTES + pages * BYTES_PER_PAGE[engine], engine


def simulate(
    scenario: Scenario,
    policy: str,
    duration: float | None = None,
    profile: CostProfile | None = None,
    progress: Callable[[float], None] | None = None,
    pins: Sequence[tuple[str, int]] = (),
    engine: str = "auto",
    khugepaged_enter_passes: int | None = None,
    kernel_events: bool = False,
    shrinker: Sequence[Mapping[str, Any]] = (),
) -> Trace:
    """Run ``scenario`` under kernel ``policy``; deterministic.

    ``engine``: ``"fast"`` (arrays + compiled ksmd, :mod:`ksmlab.model.fast`),
    ``"exact"`` (this module's objects), or ``"auto"``: the fast engine unless
    the scenario is outside what it represents.  Both give the same trace.
    ``pins``: (action, full_scans) of events to apply at those full-scan ends rather
    than at the first one after their time (a kernel trace's ``fidelity.pins()``);
    a replay of a kernel run, done by the exact engine.
    ``khugepaged_enter_passes``: khugepaged passes while the workload is set up (a
    kernel trace's ``khugepaged_enter_passes``); None: what the kernel does when
    no other mm is registered with khugepaged (:func:`khugepaged_enter_passes`).
    ``kernel_events``: also record KSM's tracepoints as the kernel fires them
    (``Trace.kernel_events``, :mod:`ksmlab.events`); done by the exact engine.
    ``shrinker``: per pressure event of a kernel trace, the THPs its shrinker left
    whole (``thps_kept``) and the failures it counted; a replay, on the exact engine.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    sc = scenario.with_duration(duration)
    prof = profile or DEFAULT_PROFILE
    get_policy(policy)
    check_supported(sc)
    if engine != "exact":
        from .fast import FastSimulation, unsupported

        why = ("pinned events (a replay of a kernel run)" if pins or shrinker
               else "KSM's event stream" if kernel_events else unsupported(sc))
        if why is None:
            try:
                return FastSimulation(sc, policy, prof,
                                      khugepaged_enter_passes=khugepaged_enter_passes
                                      ).run(progress)
            except ModelUnsupported:
                # a limit met only while running (32-bit content codes used up)
                if engine == "fast":
                    raise
        elif engine == "fast":
            raise ModelUnsupported(f"fast engine: {why}")
    return Simulation(sc, policy, prof, pins, khugepaged_enter_passes,
                      kernel_events, shrinker).run(progress)
