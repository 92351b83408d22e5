"""Scenario -> trace on the fast engine: the timeline of
:class:`ksmlab.model.run.Simulation` over the array state.

ksmd's batches between two other actions run in one compiled call; samples,
events, khugepaged and the volatile writers run here, in the same order as
in the exact model (same heap priorities, same float time arithmetic).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping
from typing import Any

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
)
from ...trace import COLUMNS, FULL_SCAN_END, VMSTAT_COUNTERS, Trace
from ..costs import CostProfile
from ..khugepaged import khugepaged_enter_passes as enter_passes
from ..khugepaged import timer_period_s
from ..policies import Remap, get_policy, ksm_scans_thp, remap_on_split
from ..run import (
    VOLATILE_TICK,
    ModelUnsupported,
    _event_dict,
    check_supported,
    image_span,
    model_trace,
)
from .khugepaged import FastKhugepaged
from .ksmd import KSMD_GROW, KSMD_IDLE, KSMD_SCAN_END, ksmd_until
from .pages import (
    deferred_split_scan,
    queued_order,
    store_codes,
    thp_allowed,
    write_many,
)
from .state import (
    ANON_RSS,
    CHAINS,
    COST_FIELDS,
    CPU,
    CUR_ADDR,
    CUR_PREV,
    CUR_SLOT,
    DEFER_ON,
    DEFER_SEQ,
    DUP_MAX,
    DUPS,
    FRESH_CODE,
    K_MPS,
    K_PRUNE,
    K_PTS,
    K_SLEEP,
    K_SMART,
    K_UZP,
    KSM_ZERO,
    MAX_FRESH,
    MAX_UNIQUE,
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
    Ranges,
    Vmas,
    code_of,
    grow_pool,
    new_pool,
    new_slots,
)
from .unmerge import unmerge_all

_REMAP = {Remap.NONE: R_NONE, Remap.CLEAN: R_CLEAN, Remap.KSM_ACCOUNTED: R_KSM}
KSM_RMAP_ITEM_SIZE = 64


def unsupported(sc: Scenario) -> str | None:
    """Why the fast engine cannot run ``sc`` exactly (None: it can)."""
    if sc.duplicate_pool >= DUP_MAX:
        return "duplicate_pool too large for 32-bit content codes"
    if sc.thp.hugepages and (sc.thp.mthp_orders or sc.thp.size_mode(PMD_ORDER) != "inherit"):
        return "per-size THP knobs (thp.hugepages): multi-size THP is in the exact model only"
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


class FastSimulation:
    def __init__(self, sc: Scenario, policy: str, profile: CostProfile,
                 progress_setup: Callable[[int, int], None] | None = None,
                 khugepaged_enter_passes: int | None = None) -> None:
        check_supported(sc)
        why = unsupported(sc)
        if why is not None:
            raise ModelUnsupported(f"fast engine: {why}")
        self.sc = sc
        self.policy = get_policy(policy)
        self.profile = profile
        self.ksm_knobs = sc.ksm
        self.thp = sc.thp
        self.ksm_running = False
        self.fresh = 0
        self.events: list[dict[str, Any]] = []
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
        self.heap: list[tuple[float, int, int, str, object]] = []
        self.seq = 0
        self.khd_generation = 0
        self.C = np.array([getattr(profile, f) for f in COST_FIELDS], np.float64)
        self.G = np.zeros(N_G, np.int64)
        self.F = np.zeros(N_F, np.float64)
        G = self.G
        for k in (CUR_SLOT, CUR_ADDR, CUR_PREV, ROOT_S, ROOT_U):
            G[k] = -1
        self._build(progress_setup)
        self.khugepaged = FastKhugepaged(self.S, self.R, self.V, G, sc.thp.khugepaged,
                                         self.policy.khugepaged_needs_writable,
                                         self.hstart, self.hend)
        self.khugepaged.P = self.P
        self._params()
        self._map_images()
        self._register_khugepaged()
        for _ in range(enter_passes(self.khugepaged.slots, khugepaged_enter_passes)):
            self.khugepaged.do_scan()
        if sc.fill_at is None:
            self._fill(progress_setup)

    def _register_khugepaged(self) -> None:
        # khugepaged_enter_vma(): at mmap or MADV_HUGEPAGE, and at a THP fault (an
        # image's THPs, even in a VMA where THPs are no longer allowed)
        V, G = self.V, self.G
        for m in range(self.n_mms):
            first = int(V.mm_first[m])
            if self.mm_thp[m] or any(thp_allowed(V, G, vv)
                                     for vv in range(first, first + int(V.mm_count[m]))):
                self.khugepaged.register(m)

    def full_scans(self) -> int:
        return int(self.G[SEQNR])

    def pages_scanned(self) -> int:
        return int(self.G[PAGES_SCANNED])

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
        self.G[NSLOTS] = len(ksm_slots)
        self.V = Vmas(base=base, n=npg, merge=merge, anon=np.zeros(n_vma, np.uint8), huge=huge,
                      nohuge=nohuge, mm_first=mm_first, mm_count=mm_count, ksm_slots=ks)
        nr = s // HPAGE_PMD_NR
        rvma = np.empty(nr, np.int32)
        for vi in range(n_vma):
            rvma[base[vi] // HPAGE_PMD_NR : (base[vi] + npg[vi]) // HPAGE_PMD_NR] = vi
        self.R = Ranges(pmd=np.zeros(nr, np.uint8), qseq=np.zeros(nr, np.int64), vma=rvma)
        self.S = new_slots(s)
        self.P = new_pool(1024, 2048)
        self.n_mms = len(insts)

    def _params(self) -> None:
        """Knob- and policy-derived switches the compiled code reads."""
        G, kn, thp, pol = self.G, self.ksm_knobs, self.thp, self.policy
        G[K_PTS] = int(kn.pages_to_scan)
        G[K_UZP] = int(kn.use_zero_pages)
        G[K_SMART] = int(kn.smart_scan)
        G[K_MPS] = int(kn.max_page_sharing)
        G[K_SLEEP] = int(kn.sleep_millisecs)
        G[K_PRUNE] = int(kn.stable_node_chains_prune_millisecs)
        G[THP_ALLOWED_ALWAYS] = thp.enabled == "always"
        G[THP_ALLOWED_MADV] = thp.enabled == "madvise"
        G[DEFER_ON] = bool(thp.shrink_underused and pol.underused_shrinker)
        G[SKIP_ZP] = pol.ksm_skip_zeropage
        G[SCAN_THP_P] = ksm_scans_thp(pol, True)
        G[SCAN_THP_NP] = ksm_scans_thp(pol, False)
        G[REMAP_KSM] = self._remap("ksm", True)

    def _remap(self, caller: str, mergeable: bool) -> int:
        return _REMAP[remap_on_split(self.policy, caller, mergeable,  # type: ignore[arg-type]
                                     self.ksm_running, int(self.ksm_knobs.use_zero_pages),
                                     int(self.thp.shrink_underused))]

    def _fill(self, progress: Callable[[int, int], None] | None = None) -> None:
        """fill_fresh_vma() for every region (streamed: one region's ids at a time)."""
        S, R, V, G = self.S, self.R, self.V, self.G
        done = 0
        for v, ref, _rng in self.regions:
            b, n = int(V.base[v]), int(V.n[v])
            V.anon[v] = 1
            S.pte[b : b + n] = OWN
            store_codes(content.region_ids(self.sc, ref), S.scid[b : b + n])
            rs = slice(b // HPAGE_PMD_NR, (b + n) // HPAGE_PMD_NR)
            nr = n // HPAGE_PMD_NR
            if thp_allowed(V, G, v):
                R.pmd[rs] = PMD_THP
                G[V_FAULT_ALLOC] += nr
                G[NR_THP] += nr
                G[THP_RANGES] += nr
                if G[DEFER_ON]:
                    R.qseq[rs] = G[DEFER_SEQ] + 1 + np.arange(nr, dtype=np.int64)
                    G[DEFER_SEQ] += nr
            else:
                R.pmd[rs] = PMD_TABLE
            G[ANON_RSS] += n
            done += n
            if progress is not None:
                progress(done, self.n)
        self._register_khugepaged()

    def _map_images(self) -> None:
        """fill_from_image() for every captured VMA: its THPs (whole 2 MiB ranges whose
        first page was in one), 4 KiB pages, zero-page PTEs; pte_none elsewhere."""
        S, R, V, G = self.S, self.R, self.V, self.G
        for m, v, lo, cids, flags in self.images:
            b, n = int(V.base[v]), int(V.n[v])
            hi = lo + len(cids)
            cid, fl = np.asarray(cids), np.asarray(flags)  # read from the .npy files here
            V.anon[v] = 1
            zero = (fl & image.ZERO_PTE) != 0
            own = ((fl & image.PRESENT) != 0) & ~zero
            pte, scid = S.pte[b + lo : b + hi], S.scid[b + lo : b + hi]
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
            used = (S.pte[b : b + n] != NONE).reshape(nr, HPAGE_PMD_NR).any(axis=1)
            R.pmd[rs] = np.where(thp, PMD_THP, np.where(used, PMD_TABLE, PMD_NONE))
            k = int(thp.sum())
            G[NR_THP] += k
            G[THP_RANGES] += k
            G[ANON_RSS] += int(np.count_nonzero(pte == OWN))
            if k:  # a THP from before time 0: no thp_fault_alloc, queued as its fault did
                self.mm_thp[m] = True
                if G[DEFER_ON]:
                    q = R.qseq[rs]
                    q[thp] = G[DEFER_SEQ] + 1 + np.arange(k, dtype=np.int64)
                    G[DEFER_SEQ] += k

    # ---- actions -------------------------------------------------------------
    def _region(self, process: int, replica: int, region: int) -> tuple[int, int]:
        for v, ref, _rng in self.regions:
            if (ref.process, ref.replica, ref.region) == (process, replica, region):
                return v, int(self.V.base[v])
        raise ModelUnsupported(f"no region {process}/{region}")  # pragma: no cover

    def _write(self, slots: np.ndarray[Any, Any], cids: np.ndarray[Any, Any]) -> None:
        codes = code_of(np.asarray(cids, dtype=np.uint64)).astype(np.int64)
        write_many(self.S, self.R, self.V, self.P, self.G, slots.astype(np.int64), codes)

    def _apply(self, e: object, t: float) -> None:
        G = self.G
        if isinstance(e, KsmStart):
            G[RUN] = 1
            self.ksm_running = True
        elif isinstance(e, KsmStop):
            G[RUN] = 0
            self.ksm_running = False
        elif isinstance(e, KsmUnmerge):
            G[RUN] = 2
            self.ksm_running = False
            unmerge_all(self.S, self.V, self.P, G, self.F, self.C)
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
            write_many(self.S, self.R, self.V, self.P, G, (targets + b).astype(np.int64),
                       codes)
        elif isinstance(e, Pressure):
            self._params()
            deferred_split_scan(self.S, self.R, self.V, G, queued_order(self.R),
                                int(self.thp.khugepaged.max_ptes_none),
                                self._remap("shrinker", True), self._remap("shrinker", False))
            G[PRESSURE] = 2 if G[CUR_SLOT] < 0 else 3
        elif isinstance(e, SetKnob):
            self._set_knob(e)
        elif isinstance(e, KhugepagedWake):
            self._khugepaged_pass(t)
        else:  # pragma: no cover - check_supported() refuses these
            raise ModelUnsupported(f"event {e!r} is not modelled")
        self._params()

    def _set_knob(self, e: SetKnob) -> None:
        parts = e.knob.split(".")
        G = self.G
        if parts[0] == "ksm":
            if parts[1] == "max_page_sharing" and (G[PAGES_SHARED] or G[PAGES_SHARING]):
                return
            self.ksm_knobs = self.ksm_knobs.model_copy(update={parts[1]: e.value})
        elif len(parts) == 3:
            khd = self.thp.khugepaged.model_copy(update={parts[2]: e.value})
            self.thp = self.thp.model_copy(update={"khugepaged": khd})
            self.khugepaged.knobs = khd
        else:
            self.thp = self.thp.model_copy(update={parts[1]: e.value})

    def _volatile(self) -> None:
        for v, ref, rng in self.regions:
            rate = ref.spec.volatile_pages_per_s
            if rate <= 0:
                continue
            n = int(rate * VOLATILE_TICK)
            frac = rate * VOLATILE_TICK - n
            if frac > 0 and rng.random() < frac:
                n += 1
            if n <= 0:
                continue
            pages = ref.spec.pages
            targets = rng.choice(pages, size=min(n, pages), replace=False)
            cids = content.fresh_ids(self.fresh, len(targets))
            self.fresh += len(targets)
            self._write(np.asarray(targets, np.int64) + int(self.V.base[v]), cids)

    def _volatile_scan(self, step: int) -> None:
        """volatile_pages_per_scan: the writes at the ``step``-th full-scan end."""
        slots: list[np.ndarray[Any, Any]] = []
        keys: list[np.ndarray[Any, Any]] = []
        for v, ref, _rng in self.regions:
            if ref.spec.volatile_pages_per_scan:
                idx = content.volatile_targets(ref, step)
                slots.append(idx + int(self.V.base[v]))
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
        write_many(self.S, self.R, self.V, self.P, self.G, at, codes)

    def _khugepaged_pass(self, t: float) -> None:
        if self.khugepaged.slots:
            self.khugepaged.do_scan()
        self.khd_generation += 1
        period = timer_period_s(self.sc, self.khugepaged.knobs)
        self.push(t + period, 5, "khugepaged", self.khd_generation)

    def push(self, t: float, prio: int, kind: str, payload: object = None) -> None:
        heapq.heappush(self.heap, (t, prio, self.seq, kind, payload))
        self.seq += 1

    # ---- samples -------------------------------------------------------------
    def _sample(self, t: float, full_scan_end: bool = False) -> dict[str, float]:
        G = self.G
        shared, sharing = int(G[PAGES_SHARED]), int(G[PAGES_SHARING])
        unshared, rmap = int(G[PAGES_UNSHARED]), int(G[RMAP_ITEMS])
        zero = int(G[KSM_ZERO])
        anon = int(G[ANON_RSS])
        merging = shared + sharing
        row: dict[str, float] = {
            "t": round(t, 9),
            FULL_SCAN_END: float(full_scan_end),
            "pages_scanned": int(G[PAGES_SCANNED]),
            "pages_shared": shared,
            "pages_sharing": sharing,
            "pages_unshared": unshared,
            "pages_volatile": max(0, rmap - shared - sharing - unshared),
            "pages_skipped": int(G[PAGES_SKIPPED]),
            "ksm_zero_pages": zero,
            "full_scans": int(G[SEQNR]),
            "stable_node_chains": int(G[CHAINS]),
            "stable_node_dups": int(G[DUPS]),
            "general_profit": (sharing + zero) * 4096 - rmap * KSM_RMAP_ITEM_SIZE,
        }
        for k in VMSTAT_COUNTERS:
            row[k] = int(G[NR_THP]) if k == "nr_anon_transparent_hugepages" else int(
                G[VMSTAT_G[k]])
        row["khugepaged_full_scans"] = self.khugepaged.full_scans
        row["khugepaged_pages_collapsed"] = self.khugepaged.pages_collapsed
        row["RssAnon"] = anon * 4
        row["Rss"] = anon * 4
        row["AnonHugePages"] = int(G[THP_RANGES]) * 2048
        row["ksm_rmap_items"] = rmap
        row["ksm_merging_pages"] = merging
        row["ksm_process_profit"] = (merging + zero) * 4096 - rmap * KSM_RMAP_ITEM_SIZE
        row["proc_ksm_zero_pages"] = zero
        row["ksmd_cpu_ns"] = int(self.F[CPU])
        return {c: row[c] for c in COLUMNS}

    # ---- ksmd ----------------------------------------------------------------
    def _ksmd(self, t_next: float, inclusive: bool, t_end: float) -> int:
        """ksmd's batches up to the next action (KSMD_OK), or to the end of a full
        scan (KSMD_SCAN_END); KSMD_IDLE once it waits for run=1."""
        while True:
            G = self.G
            pts = int(G[K_PTS])
            room_k, room_n = len(self.P.kcid), len(self.P.nkpage)
            if G[NK] + pts > room_k or G[NN] + 2 * pts > room_n:
                self.P = grow_pool(self.P, max(2 * room_k, int(G[NK]) + 2 * pts),
                                   max(2 * room_n, int(G[NN]) + 4 * pts))
                self.khugepaged.P = self.P
            res = _direct(ksmd_until)(self.S, self.R, self.V, self.P, G, self.F, self.C,
                                      t_next, inclusive, t_end, len(self.P.kcid),
                                      len(self.P.nkpage))
            if res == KSMD_GROW:
                continue
            return int(res)

    # ---- the timeline ----------------------------------------------------------
    def run(self, progress: Callable[[float], None] | None = None) -> Trace:
        sc = self.sc
        G, F = self.G, self.F
        dur = sc.duration
        t_end = dur + 1e-9
        n_samples = int(dur / sc.sample_interval + 1e-9) + 1
        heap, push = self.heap, self.push
        # samples (priority 0) are generated lazily (a 1 TiB host has many of them)
        next_sample = 0
        if sc.fill_at is not None:
            push(sc.fill_at, 1, "fill")
        if sc.ksm_start_at is not None:
            push(sc.ksm_start_at, 2, "event", KsmStart(action="ksm_start", at=sc.ksm_start_at))
        for e in sc.event:
            push(e.at, 3, "event", e)
        for at in sc.khugepaged_wakes():  # the lab's wake-ups (drive_khugepaged)
            push(at, 7, "event", KhugepagedWake(action="khugepaged", at=at))
        if any(ref.spec.volatile_pages_per_s > 0 for _v, ref, _r in self.regions):
            push(0.0 if sc.fill_at is None else sc.fill_at, 4, "volatile")
        if sc.khugepaged_wakes_at_start:  # as Simulation.run()
            push(0.0, 5, "khugepaged", self.khd_generation)
        per_scan = any(ref.spec.volatile_pages_per_scan for _v, ref, _r in self.regions)
        held: list[tuple[str, object]] = []  # align_events: due, waiting for a scan end
        ksmd_pending = False  # ksmd's entry (priority 6) is at F[T_KSMD]
        rows: list[Mapping[str, float]] = []

        def act(kind: str, payload: object, t: float, aligned: bool = False) -> None:
            nonlocal ksmd_pending
            mark = {"full_scans": int(G[SEQNR]), "aligned": aligned}  # as the exact model
            if kind == "fill":
                self._fill()
                self.events.append({"t": round(t, 9), "action": "fill", **mark})
                return
            self._apply(payload, t)
            self.events.append({"t": round(t, 9), **_event_dict(payload), **mark})
            if G_should_run(G) and not ksmd_pending:
                F[T_KSMD] = t  # writing run wakes ksmd at once
                ksmd_pending = True

        while True:
            ts = next_sample * sc.sample_interval if next_sample < n_samples else None
            th = heap[0][0] if heap else None
            if th is None or (ts is not None and ts <= th):
                nxt, prio = ts, 0  # a sample (priority 0) goes first at equal times
            else:
                nxt, prio = th, heap[0][1]
            if ksmd_pending:
                t_next = float("inf") if nxt is None else nxt
                res = self._ksmd(t_next, prio > 6, t_end)
                ksmd_pending = res != KSMD_IDLE
                if res == KSMD_SCAN_END:
                    end = float(F[T_SCAN_END])
                    if end <= t_end:
                        # the live lab samples right at each full-scan end, then does
                        # the per-scan writes and the held events
                        rows.append(self._sample(end, full_scan_end=True))
                        if per_scan:
                            self._volatile_scan(int(G[SEQNR]))
                        for kind_, payload_ in held:
                            act(kind_, payload_, end, aligned=True)
                        held.clear()
                    continue
                if ksmd_pending and F[T_KSMD] > t_end and (nxt is None or nxt > t_end):
                    break
            if nxt is None or nxt > t_end:
                break
            if prio == 0 and ts is not None:
                rows.append(self._sample(ts))
                next_sample += 1
                if progress is not None:
                    progress(ts)
                continue
            t, _prio, _s, kind, payload = heapq.heappop(heap)
            if kind in ("fill", "event"):
                if sc.align_events and G_should_run(G):
                    held.append((kind, payload))
                else:
                    act(kind, payload, t)
            elif kind == "volatile":
                self._volatile()
                push(t + VOLATILE_TICK, 4, "volatile")
            elif kind == "khugepaged" and payload == self.khd_generation:
                self._khugepaged_pass(t)  # (a stale entry: re-armed by a wake-up since)
        return model_trace(sc, self.policy.name, self.profile, rows, self.events)


def _direct(disp: Any) -> Any:
    """The compiled entry point of a numba dispatcher with one signature: calls
    skip numba's per-call type dispatch (slow on tuples of arrays)."""
    hit = _ENTRY.get(id(disp))
    if hit is not None:
        return hit
    ov = getattr(disp, "overloads", None)
    if ov is not None and len(ov) == 1:
        _ENTRY[id(disp)] = next(iter(ov.values())).entry_point
        return _ENTRY[id(disp)]
    return disp


_ENTRY: dict[int, Any] = {}


def G_should_run(G: np.ndarray[Any, Any]) -> bool:
    return bool(G[RUN] == 1 and G[NSLOTS] > 0)
