"""Scenario -> trace on the fast engine: the timeline of
:class:`ksmlab.model.run.Simulation` over the array state.

ksmd's batches between two other actions run in one compiled call; samples,
events, khugepaged and the volatile writers run here, in the same order as
in the exact model (same heap priorities, same float time arithmetic).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numba
import numpy as np

from ... import content, image
from ...scenario import (
    HPAGE_PMD_NR,
    PMD_ORDER,
    KhugepagedWake,
    KsmStart,
    KsmStop,
    KsmUnmerge,
    Pressure,
    Process,
    Scenario,
    SetKnob,
    Write,
    folio_size_name,
)
from ...trace import MTHP_STATS, VMSTAT_COUNTERS, Trace, mthp_column
from ..advisor import Advisor
from ..costs import COST_FIELDS, CostProfile
from ..khugepaged import khugepaged_enter_passes as enter_passes
from ..policies import Remap, get_policy, ksm_scans_thp, remap_on_split
from ..scope import ModelUnsupported, check_supported, image_span
from ..timeline import (
    KSMD_GROW,
    KSMD_SCAN_END,
    VOLATILE_TICK,
    Engine,
    Timeline,
    kernel_stream,
    knobs_after,
    sample_row,
    volatile_burst,
)
from . import events as kev
from .khugepaged import FastKhugepaged
from .ksmd import ksmd_until
from .pages import (
    deferred_split_scan,
    mthp_orders,
    queued_order,
    store_codes,
    thp_allowed,
    write_many,
)
from .state import (
    ADV_CPU_END,
    ADV_T_END,
    ADV_T_START,
    ANON_RSS,
    BATCHES,
    CHAINS,
    CPU,
    CUR_ADDR,
    CUR_PREV,
    CUR_SLOT,
    DEFER_ON,
    DEFER_SEQ,
    DUP_MAX,
    DUPS,
    F_COUNTS,
    FRESH_CODE,
    K_MPS,
    K_PRUNE,
    K_PTS,
    K_SLEEP,
    K_SMART,
    K_UZP,
    KSM_ZERO,
    M_FAULT_ALLOC,
    M_NR_ANON,
    MAX_FRESH,
    MAX_UNIQUE,
    MTHP_ORDERS_MADV,
    MTHP_ORDERS_PLAIN,
    N_F,
    N_G,
    NK,
    NN,
    NONE,
    NR_THP,
    NSLOTS,
    OWN,
    PAGES_SCANNED,
    PAGES_SHARED,
    PAGES_SHARING,
    PAGES_SKIPPED,
    PAGES_UNSHARED,
    PMD_NONE,
    PMD_TABLE,
    PMD_THP,
    PRESSURE,
    R_CLEAN,
    R_KSM,
    R_NONE,
    REMAP_KSM,
    RMAP_ITEMS,
    ROOT_S,
    ROOT_U,
    RUN,
    SCAN_THP_NP,
    SCAN_THP_P,
    SEQNR,
    SKIP_ZP,
    T_KSMD,
    T_SCAN_END,
    THP_ALLOWED_ALWAYS,
    THP_ALLOWED_MADV,
    THP_RANGES,
    V_FAULT_ALLOC,
    VMSTAT_G,
    ZERO,
    Pool,
    Ranges,
    Vmas,
    code_of,
    grow_pool,
    mthp_g,
    new_pool,
    new_slots,
)
from .unmerge import unmerge_all

_REMAP = {Remap.NONE: R_NONE, Remap.CLEAN: R_CLEAN, Remap.KSM_ACCOUNTED: R_KSM}


def unsupported(sc: Scenario) -> str | None:
    """Why the fast engine cannot run ``sc`` exactly (None: it can)."""
    if sc.duplicate_pool >= DUP_MAX:
        return "duplicate_pool too large for 32-bit content codes"
    if sum(p.count * _mapped_pages(p) for p in sc.process) >= min(
            MAX_UNIQUE, 1 << 31) - HPAGE_PMD_NR:
        return "too many pages for 32-bit slot numbers"
    images = {p.image for p in sc.process if p.image is not None}
    # an image's ids are the codes (checksum cid + 1 must fit 32 bits; no writes)
    if any(image.load_meta(f).contents >= FRESH_CODE for f in images):
        return "too many distinct page contents in the image for 32-bit content codes"
    if sc.fill_at is not None and any(
            r.volatile_pages_per_scan or (sc.align_events and r.volatile_pages_per_s)
            for p in sc.process for r in p.region):
        # the exact model may write volatile pages before the fill (a scan end's
        # writes; or the writer starts at fill_at while align_events holds the fill)
        # and then fails in fill_fresh_vma(): there is nothing to match
        return "volatile pages with fill_at (the exact model writes them before the fill)"
    if len(sc.event) >= content.VOLATILE_TAG:
        return "so many events that write tags meet the volatile_pages_per_scan tags"
    fresh = _fresh_room(sc)
    for e in sc.event:
        if isinstance(e, Write):
            fresh += _write_count(sc, e)
            if sc.fill_at is not None and e.at < sc.fill_at:
                return "a write event before fill_at"
    if fresh >= MAX_FRESH:
        return "too many fresh page contents for 32-bit content codes"
    return None


def _mapped_pages(p: Process) -> int:
    """Slots of one copy: an image's VMAs in the whole 2 MiB ranges they touch."""
    if p.image is None:
        return p.pages
    return sum(image_span(iv)[1] for iv in image.load_meta(p.image).processes[
        p.image_process].vmas)


def _fresh_room(sc: Scenario) -> int:
    """Codes reserved for the volatile writer's fresh ids (volatile_pages_per_s)."""
    ticks = int(sc.duration / VOLATILE_TICK) + 2
    per_tick = sum(p.count * sum(min(r.pages, math.ceil(r.volatile_pages_per_s * VOLATILE_TICK))
                                 for r in p.region) for p in sc.process)
    return ticks * per_tick


def _write_count(sc: Scenario, e: Write) -> int:
    """Pages a ``write`` event rewrites (content.write_targets())."""
    return max(1, round(e.fraction * sc.process[e.process].region[e.region].pages))


class FastSimulation(Engine):
    khugepaged: FastKhugepaged

    def __init__(self, sc: Scenario, policy: str, profile: CostProfile,
                 progress_setup: Callable[[int, int], None] | None = None,
                 khugepaged_enter_passes: int | None = None,
                 pins: Sequence[tuple[str, int]] = (),
                 shrinker: Sequence[Mapping[str, Any]] = (),
                 advisor: Sequence[int] = (), ksmd_runtime0_ns: int = 0,
                 kernel_events: bool = False) -> None:
        check_supported(sc)
        why = unsupported(sc)
        if why is not None:
            raise ModelUnsupported(f"fast engine: {why}")
        self.sc = sc
        self.policy = get_policy(policy)
        self.profile = profile
        self.ksm_knobs = sc.ksm
        self.thp = sc.thp
        # ksm_thread_pages_to_scan: the knob, or the advisor's after each full scan
        self.pages_to_scan = sc.ksm.pages_to_scan
        self.advisor = Advisor(sc.ksm, ksmd_runtime0_ns, advisor)
        self.ksm_running = False
        self.fresh = 0
        self.shrinker = list(shrinker)  # a replay: what each pressure event's shrinker did
        self.notes: list[str] = []
        self.timeline = Timeline(self, pins)
        self.kernel_events = kernel_events  # KSM's tracepoints (fast/events.py)
        # 32-bit codes of written ids (content.written_ids(): FRESH_BASE + tag << 40 +
        # page), in id order: after the volatile writer's fresh ids, one block per
        # write event in tag order, then one block per volatile_pages_per_scan step
        # (steps come in increasing order)
        code = _fresh_room(sc)
        self.write_code: dict[int, int] = {}  # id(event) -> its block
        for e in sc.event:
            if isinstance(e, Write) and e.content != "zero":
                self.write_code[id(e)] = code
                code += _write_count(sc, e)
        self.next_code = code
        self.price = np.array([getattr(profile, f) for f in COST_FIELDS], np.float64)
        self.glob = np.zeros(N_G, np.int64)
        self.meter = np.zeros(N_F, np.float64)
        glob = self.glob
        for k in (CUR_SLOT, CUR_ADDR, CUR_PREV, ROOT_S, ROOT_U):
            glob[k] = -1
        self._build(progress_setup)
        self.khugepaged = FastKhugepaged(self.page, self.ranges, self.vmas, glob, sc.thp.khugepaged,
                                         self.policy.khugepaged_needs_writable,
                                         self.hstart, self.hend)
        self.khugepaged.pool = self.pool
        self._params()
        self._map_images()
        self._register_khugepaged()
        for _ in range(enter_passes(self.khugepaged.slots, khugepaged_enter_passes)):
            self.khugepaged.do_scan()
        if sc.fill_at is None:
            self.fill(progress_setup)
        if kernel_events:
            # the pages at time 0, as the live lab's pagemap snapshot names them
            self.pool.ev.orig[:] = self.page.pte <= OWN  # own pages (OWN - order: of an mTHP)

    def _register_khugepaged(self) -> None:
        # khugepaged_enter_vma(): at mmap or MADV_HUGEPAGE, and at a THP fault (an
        # image's THPs, even in a VMA where THPs are no longer allowed)
        vmas, glob = self.vmas, self.glob
        for m in range(self.n_mms):
            first = int(vmas.mm_first[m])
            if self.mm_thp[m] or any(thp_allowed(vmas, glob, vv)
                                     for vv in range(first, first + int(vmas.mm_count[m]))):
                self.khugepaged.register(m)

    def full_scans(self) -> int:
        return int(self.glob[SEQNR])

    def pages_scanned(self) -> int:
        return int(self.glob[PAGES_SCANNED])

    # ---- set-up --------------------------------------------------------------
    def _build(self, progress: Callable[[int, int], None] | None) -> None:
        sc = self.sc
        refs = {(r.process, r.replica, r.region): r for r in content.layout(sc)}
        insts = sc.instances()
        # one image at most (scenario.py refuses a mix)
        im = next((image.load(p.image) for p in sc.process if p.image is not None), None)
        n_vma = sum(len(p.region) if p.image is None or im is None
                    else len(im.meta.processes[p.image_process].vmas) for _, _, p in insts)
        base = np.zeros(n_vma, np.int64)
        npg = np.zeros(n_vma, np.int64)
        merge = np.zeros(n_vma, np.uint8)
        lim = np.zeros((n_vma, 2), np.int64)  # [lo, hi) of the real VMA, as slots
        huge = np.zeros(n_vma, np.uint8)
        nohuge = np.zeros(n_vma, np.uint8)
        mm_first = np.zeros(len(insts), np.int64)
        mm_count = np.zeros(len(insts), np.int64)
        # each VMA's instance and the index its first slot has among the instance's pages
        # (Simulation._vma_bases(): the live lab's names of pages and THPs)
        self.vma_mm = np.zeros(n_vma, np.int64)
        self.name_first = np.zeros(n_vma, np.int64)
        ksm_slots: list[int] = []
        # (vma index, ref) in fill order (process, replica, region)
        self.regions: list[tuple[int, content.RegionRef, np.random.Generator]] = []
        # (mm, vma index, its lo, its cids, its flags) in Simulation._map_image()'s order
        self.images: list[tuple[int, int, int, np.ndarray[Any, Any],
                                np.ndarray[Any, Any]]] = []
        by_key: dict[tuple[int, int, int], int] = {}
        v = 0
        s = 0
        for m, (pi, k, proc) in enumerate(insts):
            mm_first[m] = v
            if proc.image is not None and im is not None:
                ip = im.meta.processes[proc.image_process]
                cid, flags = im.cid[proc.image_process], im.flags[proc.image_process]
                mm_count[m] = len(ip.vmas)
                mapped = []
                for iv in ip.vmas:  # address order (mapped top-down, last first)
                    lo, npages = image_span(iv)
                    base[v], npg[v], merge[v] = s, npages, 1
                    huge[v], nohuge[v] = iv.hugepage, iv.nohugepage
                    lim[v] = (s + lo, s + lo + iv.pages)
                    self.vma_mm[v], self.name_first[v] = m, iv.first - lo
                    mapped.append((m, v, lo, cid[iv.first:iv.first + iv.pages],
                                   flags[iv.first:iv.first + iv.pages]))
                    s += npages
                    v += 1
                self.images += reversed(mapped)
                ksm_slots.append(m)  # _map_image(): every image mm enters KSM
                continue
            mm_count[m] = len(proc.region)
            entered = proc.merge == "prctl"
            # mmap is top-down: the mm's VMAs in address order are its regions reversed
            for ri in reversed(range(len(proc.region))):
                reg = proc.region[ri]
                ref = refs[(pi, k, ri)]
                base[v] = s
                npg[v] = reg.pages
                lim[v] = (s, s + reg.pages)
                merge[v] = proc.merge == "prctl" or content.mergeable(sc, ref)
                huge[v] = reg.thp == "hugepage"
                nohuge[v] = reg.thp == "nohugepage"
                if content.mergeable(sc, ref) and proc.merge == "madvise":
                    entered = True
                by_key[(pi, k, ri)] = v
                self.vma_mm[v] = m
                self.name_first[v] = sum(r.pages for r in proc.region[:ri])
                s += reg.pages
                v += 1
            if entered:
                ksm_slots.append(m)
            for ri in range(len(proc.region)):
                rng = np.random.default_rng([proc.region[ri].seed, pi, k, ri, 0x5EED])
                self.regions.append((by_key[(pi, k, ri)], refs[(pi, k, ri)], rng))
        self.n = s
        # khugepaged's hstart/hend: the whole 2 MiB ranges inside [lo, hi)
        self.hstart = -(-lim[:, 0] // HPAGE_PMD_NR) * HPAGE_PMD_NR
        self.hend = lim[:, 1] // HPAGE_PMD_NR * HPAGE_PMD_NR
        self.mm_thp = np.zeros(len(insts), np.bool_)  # mm.khugepaged (a THP fault)
        ks = np.zeros(max(1, len(ksm_slots)), np.int64)
        ks[: len(ksm_slots)] = ksm_slots
        self.glob[NSLOTS] = len(ksm_slots)
        self.entered = list(ksm_slots)  # __ksm_enter() before time 0, in order
        self.vmas = Vmas(base=base, n=npg, merge=merge, anon=np.zeros(n_vma, np.uint8), huge=huge,
                         nohuge=nohuge, mm_first=mm_first, mm_count=mm_count, ksm_slots=ks)
        nr = s // HPAGE_PMD_NR
        rvma = np.empty(nr, np.int32)
        for vi in range(n_vma):
            rvma[base[vi] // HPAGE_PMD_NR : (base[vi] + npg[vi]) // HPAGE_PMD_NR] = vi
        self.ranges = Ranges(pmd=np.zeros(nr, np.uint8), qseq=np.zeros(nr, np.int64), vma=rvma,
                             nitems=np.zeros(nr, np.int32))
        self.page = new_slots(s)
        self.pool = new_pool(1024, 2048, kev.new_events(s, self.kernel_events))
        self.n_mms = len(insts)

    def _params(self) -> None:
        """Knob- and policy-derived switches the compiled code reads."""
        glob, kn, thp, pol = self.glob, self.ksm_knobs, self.thp, self.policy
        glob[K_PTS] = int(self.pages_to_scan)
        glob[K_UZP] = int(kn.use_zero_pages)
        glob[K_SMART] = int(kn.smart_scan)
        glob[K_MPS] = int(kn.max_page_sharing)
        glob[K_SLEEP] = int(kn.sleep_millisecs)
        glob[K_PRUNE] = int(kn.stable_node_chains_prune_millisecs)
        # thp_vma_allowable_orders() (ThpKnobs.order_allowed()): PMD order in a VMA
        # without / with VM_HUGEPAGE (the first implies the second), and the smaller ones
        glob[THP_ALLOWED_ALWAYS] = thp.order_allowed(PMD_ORDER, False, False)
        glob[THP_ALLOWED_MADV] = thp.order_allowed(PMD_ORDER, True, False)
        glob[MTHP_ORDERS_PLAIN] = sum(1 << o for o in thp.mthp_orders
                                      if thp.order_allowed(o, False, False))
        glob[MTHP_ORDERS_MADV] = sum(1 << o for o in thp.mthp_orders
                                     if thp.order_allowed(o, True, False))
        glob[DEFER_ON] = bool(thp.shrink_underused and pol.underused_shrinker)
        glob[SKIP_ZP] = pol.ksm_skip_zeropage
        glob[SCAN_THP_P] = ksm_scans_thp(pol, True)
        glob[SCAN_THP_NP] = ksm_scans_thp(pol, False)
        glob[REMAP_KSM] = self._remap("ksm", True)

    def _remap(self, caller: str, mergeable: bool) -> int:
        return _REMAP[remap_on_split(self.policy, caller, mergeable,  # type: ignore[arg-type]
                                     self.ksm_running, int(self.ksm_knobs.use_zero_pages),
                                     int(self.thp.shrink_underused))]

    def fill(self, progress: Callable[[int, int], None] | None = None) -> None:
        """fill_fresh_vma() for every region (streamed: one region's ids at a time)."""
        page, ranges, vmas, glob = self.page, self.ranges, self.vmas, self.glob
        done = 0
        for v, ref, _rng in self.regions:
            b, n = int(vmas.base[v]), int(vmas.n[v])
            vmas.anon[v] = 1
            page.pte[b : b + n] = OWN
            store_codes(content.region_ids(self.sc, ref), page.scid[b : b + n])
            rs = slice(b // HPAGE_PMD_NR, (b + n) // HPAGE_PMD_NR)
            nr = n // HPAGE_PMD_NR
            if thp_allowed(vmas, glob, v):
                ranges.pmd[rs] = PMD_THP
                glob[V_FAULT_ALLOC] += nr
                glob[NR_THP] += nr
                glob[THP_RANGES] += nr
                if glob[DEFER_ON]:
                    ranges.qseq[rs] = glob[DEFER_SEQ] + 1 + np.arange(nr, dtype=np.int64)
                    glob[DEFER_SEQ] += nr
            else:
                ranges.pmd[rs] = PMD_TABLE
                mask = mthp_orders(vmas, glob, v)
                if mask:  # a fresh range: every aligned folio of the highest order fits
                    o = mask.bit_length() - 1
                    page.pte[b : b + n] = OWN - o
                    glob[mthp_g(o, M_FAULT_ALLOC)] += n >> o
                    glob[mthp_g(o, M_NR_ANON)] += n >> o
            glob[ANON_RSS] += n
            done += n
            if progress is not None:
                progress(done, self.n)
        self._register_khugepaged()

    def _map_images(self) -> None:
        """fill_from_image() for every captured VMA: its THPs (whole 2 MiB ranges whose
        first page was in one), 4 KiB pages, zero-page PTEs; pte_none elsewhere."""
        page, ranges, vmas, glob = self.page, self.ranges, self.vmas, self.glob
        for m, v, lo, cids, flags in self.images:
            b, n = int(vmas.base[v]), int(vmas.n[v])
            hi = lo + len(cids)
            cid, fl = np.asarray(cids), np.asarray(flags)  # read from the .npy files here
            vmas.anon[v] = 1
            zero = (fl & image.ZERO_PTE) != 0
            own = ((fl & image.PRESENT) != 0) & ~zero
            pte, scid = page.pte[b + lo : b + hi], page.scid[b + lo : b + hi]
            pte[zero] = ZERO
            pte[own] = OWN
            scid[own] = cid[own]  # an image's ids are codes: 0 zero-filled, memcmp order
            nr = n // HPAGE_PMD_NR
            thp = np.zeros(nr, np.bool_)
            j0, j1 = -(-lo // HPAGE_PMD_NR), hi // HPAGE_PMD_NR
            if j1 > j0:
                thp[j0:j1] = (fl[j0 * HPAGE_PMD_NR - lo : j1 * HPAGE_PMD_NR - lo
                                 : HPAGE_PMD_NR] & image.THP) != 0
            whole = np.repeat(thp, HPAGE_PMD_NR)[lo:hi]
            pte[whole] = OWN  # every subpage of a THP, whatever its flags
            scid[whole] = cid[whole]
            rs = slice(b // HPAGE_PMD_NR, b // HPAGE_PMD_NR + nr)
            used = (page.pte[b : b + n] != NONE).reshape(nr, HPAGE_PMD_NR).any(axis=1)
            ranges.pmd[rs] = np.where(thp, PMD_THP, np.where(used, PMD_TABLE, PMD_NONE))
            k = int(thp.sum())
            glob[NR_THP] += k
            glob[THP_RANGES] += k
            glob[ANON_RSS] += int(np.count_nonzero(pte <= OWN))
            if k:  # a THP from before time 0: no thp_fault_alloc, queued as its fault did
                self.mm_thp[m] = True
                if glob[DEFER_ON]:
                    q = ranges.qseq[rs]
                    q[thp] = glob[DEFER_SEQ] + 1 + np.arange(k, dtype=np.int64)
                    glob[DEFER_SEQ] += k

    # ---- actions -------------------------------------------------------------
    def _region(self, process: int, replica: int, region: int) -> tuple[int, int]:
        for v, ref, _rng in self.regions:
            if (ref.process, ref.replica, ref.region) == (process, replica, region):
                return v, int(self.vmas.base[v])
        raise ModelUnsupported(f"no region {process}/{region}")  # pragma: no cover

    def _write(self, slots: np.ndarray[Any, Any], cids: np.ndarray[Any, Any]) -> None:
        codes = code_of(np.asarray(cids, dtype=np.uint64)).astype(np.int64)
        self._write_many(slots.astype(np.int64), codes)

    def _write_many(self, slots: np.ndarray[Any, Any], codes: np.ndarray[Any, Any]) -> None:
        kev.renew(self.pool.ev, self.page.pte, slots)  # which pages the writes replace
        write_many(self.page, self.ranges, self.vmas, self.pool, self.glob, slots, codes)

    def apply(self, e: object, t: float) -> None:
        glob = self.glob
        if isinstance(e, KsmStart):
            glob[RUN] = 1
            self.ksm_running = True
        elif isinstance(e, KsmStop):
            glob[RUN] = 0
            self.ksm_running = False
        elif isinstance(e, KsmUnmerge):
            glob[RUN] = 2
            self.ksm_running = False
            kev.renew_unmerged(self.pool.ev, self.page.pte)
            self._event_room(0)
            unmerge_all(self.page, self.vmas, self.pool, glob, self.meter, self.price)
            self.ranges.nitems[:] = 0  # every rmap item is gone
        elif isinstance(e, Write):
            _v, b = self._region(e.process, 0, e.region)
            pages = self.sc.process[e.process].region[e.region].pages
            targets = content.write_targets(e.fraction, pages, e.seed,
                                            salt=e.process * 1000 + e.region)
            if e.content == "zero":
                codes = np.zeros(len(targets), np.int64)
            else:  # content.written_ids(ref, tag, targets): increasing with the target
                codes = FRESH_CODE + self.write_code[id(e)] + np.arange(
                    len(targets), dtype=np.int64)
            self._write_many((targets + b).astype(np.int64), codes)
        elif isinstance(e, Pressure):
            self._params()
            self._pressure(t)
            glob[PRESSURE] = 2 if glob[CUR_SLOT] < 0 else 3
        elif isinstance(e, SetKnob):
            self._set_knob(e)
        elif isinstance(e, KhugepagedWake):
            pass  # the timeline's khugepaged_pass()
        else:  # pragma: no cover - check_supported() refuses these
            raise ModelUnsupported(f"event {e!r} is not modelled")
        self._params()

    def _pressure(self, t: float) -> None:
        """deferred_split_scan() over the queue; a replay's record (``shrinker``) says
        which THPs the kernel's shrinker left whole and how many failures it counted."""
        ranges, vmas = self.ranges, self.vmas
        held = np.zeros(len(ranges.pmd), np.uint8)
        failed = 0
        if self.shrinker:
            rec = self.shrinker.pop(0)
            failed = int((rec.get("vmstat") or {}).get("thp_split_page_failed", 0))
            kept = rec.get("thps_kept")
            if kept is not None:
                names = {(int(inst), int(i)) for inst, idx in kept.items() for i in idx}
                for r in np.flatnonzero(ranges.qseq).tolist():
                    v = int(ranges.vma[r])
                    name = (int(self.vma_mm[v]),
                            int(self.name_first[v]) + r * HPAGE_PMD_NR - int(vmas.base[v]))
                    held[r] = name in names
        deferred_split_scan(self.page, ranges, vmas, self.glob, queued_order(ranges),
                            int(self.thp.khugepaged.max_ptes_none),
                            self._remap("shrinker", True), self._remap("shrinker", False),
                            held, failed)
        n = int(np.count_nonzero(held == 2))
        if n:
            self.notes.append(
                f"replayed: at the pressure event at {t:.1f} s the kernel's shrinker "
                f"left {n} underused THP(s) whole (held by another reference "
                "for that moment); the model kept them too")

    def _set_knob(self, e: SetKnob) -> None:
        glob = self.glob
        self.ksm_knobs, self.thp = knobs_after(e, self.ksm_knobs, self.thp,
                                               bool(glob[PAGES_SHARED] or glob[PAGES_SHARING]))
        self.khugepaged.knobs = self.thp.khugepaged
        if e.knob == "ksm.pages_to_scan":  # (refused by the scenario with the advisor on)
            self.pages_to_scan = self.ksm_knobs.pages_to_scan
        self.advisor.set_knobs(self.ksm_knobs)

    def volatile(self, t: float) -> None:
        for v, ref, rng in self.regions:
            targets = volatile_burst(rng, ref.spec.volatile_pages_per_s, ref.spec.pages)
            if targets is None:
                continue
            cids = content.fresh_ids(self.fresh, len(targets))
            self.fresh += len(targets)
            self._write(np.asarray(targets, np.int64) + int(self.vmas.base[v]), cids)

    def volatile_scan(self, step: int) -> None:
        """volatile_pages_per_scan: the writes at the ``step``-th full-scan end."""
        slots: list[np.ndarray[Any, Any]] = []
        keys: list[np.ndarray[Any, Any]] = []
        for v, ref, _rng in self.regions:
            if ref.spec.volatile_pages_per_scan:
                idx = content.volatile_targets(ref, step)
                slots.append(idx + int(self.vmas.base[v]))
                keys.append(idx + ref.first_page)
        if not slots:
            return
        # the ids written_ids(ref, VOLATILE_TAG + step, idx) within one step are in
        # the order of the global page index ref.first_page + idx: code them by rank
        # (a step's block: steps are 1, 2, ... and start again after run=2; each
        # writes the same number of pages)
        at = np.concatenate(slots).astype(np.int64)
        k = len(at)
        first = self.next_code + (step - 1) * k
        if first + k >= MAX_FRESH:
            raise ModelUnsupported("fast engine: volatile_pages_per_scan wrote more "
                                   "contents than 32-bit content codes hold")
        rank = np.empty(k, np.int64)
        rank[np.argsort(np.concatenate(keys), kind="stable")] = np.arange(k, dtype=np.int64)
        codes = FRESH_CODE + first + rank
        self._write_many(at, codes)

    # ---- samples -------------------------------------------------------------
    def sample(self, t: float, full_scan_end: bool) -> dict[str, float]:
        glob = self.glob
        rmap, zero = int(glob[RMAP_ITEMS]), int(glob[KSM_ZERO])
        raw: dict[str, float] = {
            "pages_scanned": int(glob[PAGES_SCANNED]), "pages_shared": int(glob[PAGES_SHARED]),
            "pages_sharing": int(glob[PAGES_SHARING]), "pages_unshared": int(glob[PAGES_UNSHARED]),
            "pages_skipped": int(glob[PAGES_SKIPPED]), "rmap_items": rmap,
            "ksm_zero_pages": zero, "full_scans": int(glob[SEQNR]),
            "stable_node_chains": int(glob[CHAINS]), "stable_node_dups": int(glob[DUPS]),
            **{k: int(glob[VMSTAT_G[k]]) for k in VMSTAT_COUNTERS
               if k != "nr_anon_transparent_hugepages"},
            "nr_anon_transparent_hugepages": int(glob[NR_THP]),
            "khugepaged_full_scans": self.khugepaged.full_scans,
            "khugepaged_pages_collapsed": self.khugepaged.pages_collapsed,
            "anon_rss": int(glob[ANON_RSS]), "thps_mapped": int(glob[THP_RANGES]),
            # every rmap item, KSM page and KSM zero page belongs to a workload process
            "ksm_rmap_items": rmap,
            "ksm_merging_pages": int(glob[PAGES_SHARED] + glob[PAGES_SHARING]),
            "proc_ksm_zero_pages": zero, "ksmd_cpu_ns": float(self.meter[CPU]),
        }
        # the per-size counters of multi-size THP, where the scenario enables a size
        # (System.mthp: the sizes of the knobs at the start, highest first)
        return {**sample_row(t, full_scan_end, raw), **{
            mthp_column(folio_size_name(o), st): int(glob[mthp_g(o, k)])
            for o in self.sc.thp.mthp_orders for k, st in enumerate(MTHP_STATS)}}

    # ---- ksmd, as the timeline drives it ------------------------------------
    def should_run(self) -> bool:
        return bool(self.glob[RUN] == 1 and self.glob[NSLOTS] > 0)  # ksmd_should_run()

    def wake_ksmd(self, t: float) -> None:
        self.meter[T_KSMD] = t

    def ksmd_wake_time(self) -> float:
        return float(self.meter[T_KSMD])

    def scan_end_time(self) -> float:
        return float(self.meter[T_SCAN_END])

    def cost_counts(self) -> dict[str, float]:
        return {k: float(self.meter[F_COUNTS + i]) for i, k in enumerate(COST_FIELDS)}

    def batches(self) -> int:
        return int(self.glob[BATCHES])

    def khugepaged_scan(self) -> None:
        before = self.ranges.pmd.copy() if self.kernel_events else None
        super().khugepaged_scan()
        if before is not None:
            kev.renew_collapsed(self.pool.ev, before, self.ranges.pmd, HPAGE_PMD_NR)

    def _event_room(self, pts: int) -> None:
        """Room in KSM's event buffer for one batch of ``pts`` pages (or run=2)."""
        if not self.kernel_events:
            return
        g = self.glob
        ev = kev.with_room(self.pool.ev, kev.need(pts, int(g[PAGES_SHARED]),
                                                  int(g[PAGES_SHARING]), int(g[NN])))
        if ev is not self.pool.ev:
            self.pool = self.pool._replace(ev=ev)
            self.khugepaged.pool = self.pool

    def ksmd_until(self, t_next: float, inclusive: bool, t_end: float) -> int:
        """ksmd's batches up to the next action (KSMD_OK), or to the end of a full
        scan (KSMD_SCAN_END); KSMD_IDLE once it waits for run=1.  One compiled call
        between two growths of the pools (and of KSM's event buffer)."""
        while True:
            glob = self.glob
            pts = int(glob[K_PTS])
            self._event_room(pts)
            room_k, room_n = len(self.pool.kcid), len(self.pool.nkpage)
            if glob[NK] + pts > room_k or glob[NN] + 2 * pts > room_n:
                self.pool = grow_pool(self.pool, max(2 * room_k, int(glob[NK]) + 2 * pts),
                                   max(2 * room_n, int(glob[NN]) + 4 * pts))
                self.khugepaged.pool = self.pool
            res = _direct(ksmd_until, self.pool)(self.page, self.ranges, self.vmas, self.pool, glob,
                          self.meter, self.price,
                                      t_next, inclusive, t_end, len(self.pool.kcid),
                                      len(self.pool.nkpage))
            if res == KSMD_GROW:
                continue
            if res == KSMD_SCAN_END and self.advisor.on:
                self._advise()
            return int(res)

    def _advise(self) -> None:
        """advisor_start_scan()/advisor_stop_scan() of the full scan that just ended, from
        the clocks the compiled ksmd kept; the next batch's pages_to_scan."""
        meter, adv = self.meter, self.advisor
        adv.start(float(meter[ADV_T_START]))
        self.pages_to_scan = adv.stop(float(meter[ADV_T_END]), float(meter[ADV_CPU_END]),
                                      self.pages_to_scan, int(self.glob[SEQNR]))
        self.glob[K_PTS] = self.pages_to_scan

    # ---- the run -------------------------------------------------------------
    def run(self, progress: Callable[[float], None] | None = None) -> Trace:
        tr = super().run(progress)
        if self.kernel_events:
            tr.kernel_events = kernel_stream(kev.stream(self.pool.ev, self.entered, self._names))
        return tr

    def _names(self, slots: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any],
                                                          np.ndarray[Any, Any]]:
        """Slots -> (instance, index among the instance's pages): the live lab's names."""
        v = self.ranges.vma[slots // HPAGE_PMD_NR]
        return self.vma_mm[v], self.name_first[v] + slots - self.vmas.base[v]


def _direct(disp: Any, pool: Pool) -> Any:
    """The compiled entry point of a numba dispatcher for ``pool``'s type: calls skip
    numba's per-call type dispatch (slow on tuples of arrays).  There is one per type
    of ``pool.ev`` (KSM's event stream on or off: :mod:`.events`)."""
    key = (id(disp), type(pool.ev))
    hit = _ENTRY.get(key)
    if hit is not None:
        return hit
    ov = getattr(disp, "overloads", None)
    if ov:
        want = numba.typeof(pool)  # type: ignore[no-untyped-call]
        for sig, cres in ov.items():
            if want in sig:
                _ENTRY[key] = cres.entry_point
                return cres.entry_point
    return disp


_ENTRY: dict[tuple[int, type], Any] = {}
