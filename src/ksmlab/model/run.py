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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import content, image
from ..scenario import (
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
from ..trace import VMSTAT_COUNTERS, Trace
from .advisor import Advisor
from .costs import DEFAULT_PROFILE, CostProfile, CpuMeter, ksmd_wake
from .khugepaged import Khugepaged, khugepaged_enter_passes
from .ksm import Ksm
from .memory import PMD_THP, Mm, Page, System, Thp, Vma
from .policies import get_policy
from .scope import ModelUnsupported, check_supported, image_span
from .thp import deferred_split_scan, fill_fresh_vma, fill_from_image, write_fault
from .timeline import (
    KSMD_IDLE,
    KSMD_OK,
    KSMD_SCAN_END,
    Engine,
    Timeline,
    kernel_stream,
    knobs_after,
    sample_row,
    volatile_burst,
)

__all__ = ["ENGINES", "ModelUnsupported", "Simulation", "check_supported", "image_span",
           "memory_estimate", "run_model", "simulate"]


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


class Simulation(Engine):
    khugepaged: Khugepaged

    def __init__(self, sc: Scenario, policy: str, profile: CostProfile,
                 pins: Sequence[tuple[str, int]] = (),
                 khugepaged_enter_passes: int | None = None,
                 kernel_events: bool = False,
                 shrinker: Sequence[Mapping[str, Any]] = (),
                 advisor: Sequence[int] = (), ksmd_runtime0_ns: int = 0) -> None:
        check_supported(sc)
        self.sc = sc
        self.policy = get_policy(policy)
        self.profile = profile
        self.sys = System(self.policy, sc.thp)
        self.sys.ksm_use_zero_pages = sc.ksm.use_zero_pages
        self.cpu = CpuMeter(profile)
        self.advisor = Advisor(sc.ksm, ksmd_runtime0_ns, advisor)
        self.ksm = Ksm(self.sys, sc.ksm, self.cpu, self.advisor)
        if kernel_events:
            self.ksm.trace = []  # KSM's tracepoints, as the kernel fires them (ksm.py)
        self.khugepaged = Khugepaged(self.sys, sc.thp.khugepaged)
        self.regions: list[_Region] = []
        self.fresh = 0  # next fresh content id index
        self.tags = {id(e): i + 1 for i, e in enumerate(sc.event)}  # names written ids
        self.n_batches = 0  # ksmd batches so far (each followed by a sleep)
        self.t_ksmd = 0.0  # ksmd's next batch
        self.t_scan_end = 0.0  # when the last batch that ended a full scan ended
        self.timeline = Timeline(self, pins)
        self.enter_passes = khugepaged_enter_passes
        self.shrinker = list(shrinker)  # a replay: what each pressure event's shrinker did
        self.notes: list[str] = []
        self.image_vmas: dict[Mm, list[tuple[Vma, int]]] = {}
        self._setup()

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
            self.fill()
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

    def fill(self) -> None:
        for reg in self.regions:
            fill_fresh_vma(self.sys, reg.vma, reg.ids)
        self._register_khugepaged()

    # ---- actions ---------------------------------------------------------
    def apply(self, e: object, t: float) -> None:
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
            pass  # scan_sleep_millisecs_store(): the timeline's khugepaged_pass()
        else:  # pragma: no cover - check_supported() refuses these
            raise ModelUnsupported(f"event {e!r} is not modelled")

    def _set_knob(self, e: SetKnob) -> None:
        """A knob written mid-run: every component sees the new value."""
        ksm, sys = self.ksm, self.sys
        ksm.knobs, sys.thp = knobs_after(e, ksm.knobs, sys.thp,
                                         bool(ksm.pages_shared or ksm.pages_sharing))
        sys.ksm_use_zero_pages = ksm.knobs.use_zero_pages
        self.khugepaged.knobs = sys.thp.khugepaged
        if e.knob == "ksm.pages_to_scan":  # (refused by the scenario with the advisor on)
            ksm.pages_to_scan = ksm.knobs.pages_to_scan
        self.advisor.set_knobs(ksm.knobs)

    def volatile_scan(self, step: int) -> None:
        """volatile_pages_per_scan: the writes at the ``step``-th full-scan end."""
        for reg in self.regions:
            if reg.spec.volatile_pages_per_scan:
                idx = content.volatile_targets(reg.ref, step)
                ids = content.written_ids(reg.ref, content.VOLATILE_TAG + step, idx)
                for i, cid in zip(idx.tolist(), ids.tolist(), strict=True):
                    write_fault(self.sys, reg.vma, int(i), int(cid))

    def volatile(self, t: float) -> None:
        for reg in self.regions:
            targets = volatile_burst(reg.rng, reg.spec.volatile_pages_per_s, reg.spec.pages)
            if targets is None:
                continue
            cids = content.fresh_ids(self.fresh, len(targets))
            self.fresh += len(targets)
            for i, cid in zip(targets.tolist(), cids.tolist(), strict=True):
                write_fault(self.sys, reg.vma, int(i), int(cid))

    # ---- samples ---------------------------------------------------------
    def sample(self, t: float, full_scan_end: bool) -> dict[str, float]:
        sys, ksm, mms = self.sys, self.ksm, self.sys.mms
        raw: dict[str, float] = {
            "pages_scanned": ksm.pages_scanned, "pages_shared": ksm.pages_shared,
            "pages_sharing": ksm.pages_sharing, "pages_unshared": ksm.pages_unshared,
            "pages_skipped": ksm.pages_skipped, "rmap_items": ksm.rmap_items,
            "ksm_zero_pages": sys.ksm_zero_pages, "full_scans": ksm.seqnr,
            "stable_node_chains": ksm.stable_node_chains,
            "stable_node_dups": ksm.stable_node_dups,
            **{k: sys.vmstat[k] for k in VMSTAT_COUNTERS
               if k != "nr_anon_transparent_hugepages"},
            "nr_anon_transparent_hugepages": sys.nr_anon_thp,
            "khugepaged_full_scans": self.khugepaged.full_scans,
            "khugepaged_pages_collapsed": self.khugepaged.pages_collapsed,
            "anon_rss": sum(mm.anon_rss for mm in mms),
            "thps_mapped": sum(sum(1 for s in v.pmd if s == PMD_THP)
                               for mm in mms for v in mm.vmas),
            "ksm_rmap_items": sum(mm.ksm_rmap_items for mm in mms),
            "ksm_merging_pages": sum(mm.ksm_merging_pages for mm in mms),
            "proc_ksm_zero_pages": sum(mm.ksm_zero_pages for mm in mms),
            "ksmd_cpu_ns": self.cpu.ns,
        }
        # the per-size counters of multi-size THP, where the scenario enables a size
        return {**sample_row(t, full_scan_end, raw), **sys.mthp}

    # ---- ksmd, as the timeline drives it ---------------------------------
    def should_run(self) -> bool:
        return self.ksm.should_run()

    def full_scans(self) -> int:
        return self.ksm.seqnr

    def wake_ksmd(self, t: float) -> None:
        self.t_ksmd = t

    def ksmd_wake_time(self) -> float:
        return self.t_ksmd

    def scan_end_time(self) -> float:
        return self.t_scan_end

    def cost_counts(self) -> dict[str, float]:
        return dict(self.cpu.counts)

    def batches(self) -> int:
        return self.n_batches

    def ksmd_until(self, t_next: float, inclusive: bool, t_end: float) -> int:
        """ksm_scan_thread(): batches while ksmd wakes before ``t_next`` (at it too when
        ``inclusive``) and not after ``t_end``; KSMD_SCAN_END after a batch that ended
        a full scan, KSMD_IDLE once it waits for run=1 (wait_event_freezable())."""
        t = self.t_ksmd
        while (t < t_next or (inclusive and t == t_next)) and t <= t_end:
            if not self.ksm.should_run():
                return KSMD_IDLE
            before = self.cpu.ns
            scans = self.ksm.seqnr
            self.ksm.now = t
            self.cpu.batch0 = before
            self.ksm.do_scan()
            self.cpu.charge("batch_overhead_ns")
            self.cpu.charge("cold_start", min(self.cpu.ns - before,
                                              self.profile.cold_window_ns))
            self.n_batches += 1
            busy = (self.cpu.ns - before) / 1e9
            self.t_scan_end = t + busy
            prof = self.profile  # sleep_millisecs: a `set` event may change it
            t = ksmd_wake(t, busy, self.ksm.knobs.sleep_millisecs, prof.sleep_slack_ns,
                          prof.tick_ns)
            self.t_ksmd = t
            if self.ksm.seqnr > scans:
                return KSMD_SCAN_END
        return KSMD_OK

    # ---- the run -----------------------------------------------------------
    def run(self, progress: Callable[[float], None] | None = None) -> Trace:
        tr = super().run(progress)
        if self.ksm.trace is not None:
            tr.kernel_events = kernel_stream(self.ksm.trace)
        return tr


ENGINES = ("auto", "fast", "exact")


# Resident bytes per simulated page, measured (benchmarks/model_speed.py, and peak RSS
# after full scans of mixed/thp-z50-unique/seed-uzp0-nothp: 336-425 B with the exact
# engine's objects, 29.8 B with the fast engine's arrays at host-1t), with a margin;
# plus the interpreter, numpy and numba
BYTES_PER_PAGE = {"exact": 512, "fast": 32}
# the fast engine's arrays for KSM's event stream (fast/events.py): 9 B per page, with a
# margin (the stream itself, per event, is the same on both engines)
EVENTS_BYTES_PER_PAGE = {"exact": 0, "fast": 16}
BASE_BYTES = 512 << 20


def memory_estimate(sc: Scenario, engine: str = "auto", events: bool = False
                    ) -> tuple[int, str]:
    """(bytes, engine) a model run of ``sc`` needs at most, before it starts: the
    engine ``simulate()`` would choose, times the pages the scenario maps."""
    if engine == "auto":
        from .fast import unsupported

        engine = "exact" if unsupported(sc) is not None else "fast"
    pages = sc.total_mib * 256
    per_page = BYTES_PER_PAGE[engine] + (EVENTS_BYTES_PER_PAGE[engine] if events else 0)
    return BASE_BYTES + pages * per_page, engine


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
    advisor: Sequence[int] = (),
    ksmd_runtime0_ns: int = 0,
) -> Trace:
    """Run ``scenario`` under kernel ``policy``; deterministic.

    ``engine``: ``"fast"`` (arrays + compiled ksmd, :mod:`ksmlab.model.fast`),
    ``"exact"`` (this module's objects), or ``"auto"``: the fast engine unless
    the scenario is outside what it represents.  Both give the same trace.
    ``pins``: (action, full_scans) of events to apply at those full-scan ends rather
    than at the first one after their time (a kernel trace's ``fidelity.pins()``);
    a replay of a kernel run (either engine).
    ``khugepaged_enter_passes``: khugepaged passes while the workload is set up (a
    kernel trace's ``khugepaged_enter_passes``); None: what the kernel does when
    no other mm is registered with khugepaged (:func:`khugepaged_enter_passes`).
    ``kernel_events``: also record KSM's tracepoints as the kernel fires them
    (``Trace.kernel_events``, :mod:`ksmlab.events`); either engine, the same stream.
    ``shrinker``: per pressure event of a kernel trace, the THPs its shrinker left
    whole (``thps_kept``) and the failures it counted; a replay (either engine).
    ``advisor``: the kernel's scan-time advisor decisions (pages_to_scan), set at the
    model's full-scan ends in order; ``ksmd_runtime0_ns``: ksmd's CPU time before the
    run (the first decision sees it: model/advisor.py); a replay (either engine).
    """
    return run_model(scenario.with_duration(duration), policy, profile, engine, progress,
                     kernel_events, pins=pins, khugepaged_enter_passes=khugepaged_enter_passes,
                     shrinker=shrinker, advisor=advisor,
                     ksmd_runtime0_ns=ksmd_runtime0_ns)[1]


def run_model(sc: Scenario, policy: str, profile: CostProfile | None = None,
              engine: str = "auto", progress: Callable[[float], None] | None = None,
              kernel_events: bool = False, **replay: Any) -> tuple[Engine, Trace]:
    """:func:`simulate`, and the engine that ran (its ``at_scan_end``: calibration).
    ``replay``: what :func:`ksmlab.fidelity.replay` takes from a kernel trace."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    prof = profile or DEFAULT_PROFILE
    get_policy(policy)
    check_supported(sc)
    why: str | None = None  # why the exact engine runs where "auto" asked
    if engine != "exact":
        from .fast import FastSimulation, unsupported

        why = unsupported(sc)
        if why is None:
            try:
                fast = FastSimulation(sc, policy, prof, kernel_events=kernel_events, **replay)
                tr = fast.run(progress)
                tr.meta["engine"] = "fast"
                return fast, tr
            except ModelUnsupported:
                # a limit met only while running (32-bit content codes used up)
                if engine == "fast":
                    raise
        elif engine == "fast":
            raise ModelUnsupported(f"fast engine: {why}")
    exact = Simulation(sc, policy, prof, kernel_events=kernel_events, **replay)
    tr = exact.run(progress)
    # which engine ran: both give the same trace (and KSM's event stream), but not at
    # the same speed
    tr.meta["engine"] = "exact"
    tr.meta["engine_why"] = why
    return exact, tr
