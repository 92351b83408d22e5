"""The figures and live verdicts of ``ksmlab watch``, from successive readings of a
host (:class:`ksmlab.live.watch.Reading`); like :mod:`ksmlab.metrics` for a
trace, it never knows where a reading came from.

**Memory freed outside KSM's account.**  Of KSM's own account only
``ksm_zero_pages`` lowers a process's RSS (replace_page() maps the zero page
and decrements MM_ANONPAGES); an ordinary merge maps a KSM page in place of
the process's page and RSS stays as it was, so ``pages_sharing`` and
``ksm_merging_pages`` are memory freed that RSS never shows.  RSS also falls
when the process frees memory itself (munmap, MADV_DONTNEED, MADV_FREE, the
balloon or free page reporting of a guest), when pages are swapped out, and
when a THP split remaps zero-filled subpages to the shared zero page
(try_to_map_unused_to_zeropage(), mm/migrate.c, b1f202060afe): that last is
the freeing no KSM counter shows.

The three leave different page-table entries, and PAGEMAP_SCAN counts them per
VMA: the remap leaves a present PTE mapping the zero page, a process's own
freeing leaves none (or no VMA at all), a swap-out a swap entry.  So for each
mergeable VMA whose bounds did not change between two readings::

    zeroed = max(0, min(present pages lost, zero-page mappings gained))

and per process, for the interval::

    freed outside KSM = max(0, sum(zeroed) - ksm_zero_pages gained)

A VMA unmapped, shrunk or moved counts nothing (the process's own unmapping);
MADV_DONTNEED loses present pages but gains no zero-page mapping; KSM's own
zero-page merges gain both and are taken out by ``ksm_zero_pages``.  A remap
happens only inside a folio split, so the host's sum is also bounded by what the
interval's splits could free (512 pages per ``thp_split_page``, the folio's pages
per multi-size ``split``; what the splits counted in one interval could free but
the pages showed only in the next is carried over one interval).

Limits: zero-page mappings a process gains by reading memory it never wrote
(a read fault maps the zero page) in the same VMA and interval as it frees
memory itself, while a split happens on the host, count as freed outside KSM,
up to what the splits could free; what a process faults in (or khugepaged
collapses) in the same VMA and interval as a remap is netted against it; a VMA
whose bounds change misses that interval; PMD-mapped THPs only count as THPs
(the merge-collapse's evidence).
Without PAGEMAP_SCAN (before Linux 6.7, which also has no remap) nothing is
measured.

**KSM's budget** is ``pages_to_scan`` (the advisor's current value when
``advisor_mode=scan-time``, as the file shows it) per ``sleep_millisecs``,
while ``run=1``.

**Verdicts as live states**, with :mod:`ksmlab.metrics`' thresholds:
  rate-limit-bypass  an episode runs while each interval frees more than
                     BYPASS_RATIO x the budget, more than BYPASS_SIDE_SHARE of
                     it outside KSM's account: start, end, bytes, peak ratio (a
                     burst within one interval is averaged over it, so the peak
                     is a lower bound of metrics' 0.2 s one);
  merge-collapse     over the last two full scans (merging needs two visits),
                     memory was freed at under COLLAPSE_FRACTION of what a KSM
                     that merges every zero page it scans would free: the THPs
                     left in mergeable memory x the share of zero subpages the
                     scans' KSM splits found, per full scan; with KSM splits and
                     freeing outside KSM's account in the window.
A figure within BORDERLINE_MARGIN of its threshold is borderline.  Splits
counted by the underused-THP shrinker (``thp_underused_split_page``) or by
reclaim (``thp_swpout_fallback``) are not KSM's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .live.watch import PAGE, ProcReading, Reading
from .metrics import (
    BORDERLINE_MARGIN,
    BYPASS_RATIO,
    BYPASS_SIDE_SHARE,
    COLLAPSE_FRACTION,
    within_margin,
)

HPAGE_PMD_NR = 512
MIB = 1 << 20
EPISODES_KEPT = 20


def folio_pages(size: str) -> int:
    """``"64kB"`` -> 16."""
    return max(1, int(size.removesuffix("kB")) * 1024 // PAGE)


def iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds")


@dataclass
class Episode:
    """One rate-limit bypass: consecutive intervals above the threshold."""

    start: float  # wall clock, the start of its first interval
    end: float | None  # the end of its last interval; None while it goes on
    bytes: int  # freed outside KSM's account during it
    peak_ratio: float
    splits: int  # thp_split_page (+ multi-size splits) during it
    pids: list[int] = field(default_factory=list)

    @property
    def borderline(self) -> bool:
        return within_margin(self.peak_ratio, BYPASS_RATIO)

    def to_json(self) -> dict[str, Any]:
        return {"start": iso(self.start), "end": None if self.end is None else iso(self.end),
                "bytes": self.bytes, "peak_ratio": round(self.peak_ratio, 2),
                "splits": self.splits, "pids": self.pids, "borderline": self.borderline}


@dataclass
class Collapse:
    active: bool = False
    evidence: str = ""
    share: float | None = None  # freeing rate / what a healthy KSM would free
    borderline: bool = False
    since: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"active": self.active, "evidence": self.evidence,
                "share": None if self.share is None else round(self.share, 4),
                "borderline": self.borderline,
                "since": None if self.since is None else iso(self.since)}


@dataclass
class Proc:
    """A process with mergeable memory, as watched."""

    pid: int
    comm: str
    started: int
    first_seen: float
    reading: ProcReading
    outside_pages: int = 0  # freed outside KSM's account since first seen
    interval_pages: int = 0  # ... in the last interval
    interval_s: float = 0.0
    _first_iso: str | None = None

    def to_json(self) -> dict[str, Any]:
        r = self.reading
        p = r.pages if r.vmas is not None else None
        return {
            "pid": self.pid, "comm": self.comm, "merge_any": r.merge_any,
            "rss_anon_bytes": int(r.rss_anon_kib * 1024),
            "anon_huge_bytes": int(r.rollup.get("AnonHugePages", 0) * 1024),
            "mergeable_present_bytes": None if p is None else p.present * PAGE,
            "mergeable_thp_bytes": None if p is None else p.huge * PAGE,
            "mergeable_zero_page_bytes": None if p is None else p.zero * PAGE,
            "ksm_zero_pages": r.ksm.get("ksm_zero_pages", 0),
            "ksm_merging_pages": r.ksm.get("ksm_merging_pages", 0),
            "ksm_process_profit": r.ksm.get("ksm_process_profit", 0),
            "freed_outside_ksm_bytes_total": self.outside_pages * PAGE,
            "freed_outside_ksm_bytes": self.interval_pages * PAGE,
            "freed_outside_ksm_bytes_per_s": (self.interval_pages * PAGE / self.interval_s
                                              if self.interval_s > 0 else 0.0),
            "first_seen": self.first_seen_iso,
        }

    @property
    def first_seen_iso(self) -> str:
        if self._first_iso is None:
            self._first_iso = iso(self.first_seen)
        return self._first_iso


@dataclass
class Snapshot:
    """Everything one interval shows (text, JSON lines, Prometheus)."""

    wall: float
    dt: float | None  # seconds since the previous reading (None: the first)
    reading: Reading
    run: int
    budget_pages_s: float | None  # None: KSM not running (or sleep_millisecs 0)
    outside_pages: int  # this interval, host
    ksm_pages: int  # KSM's account gained this interval (pages_sharing + ksm_zero_pages)
    ratio: float | None  # this interval's freeing / the budget
    splits: int  # thp_split_page + multi-size splits, this interval
    ksm_splits: int  # of them, not the shrinker's or reclaim's
    outside_total_pages: int  # since watch started, host (processes gone included)
    bypass_active: bool
    episodes_total: int
    episodes: list[Episode]
    collapse: Collapse
    ksmd_cpu_pct: float | None
    watch_cpu_pct: float | None
    procs: list[Proc]
    capped: bool  # the splits bounded this interval's figure
    notes: list[str]
    interval_count: int = 0  # readings so far
    traced: dict[str, Any] | None = None  # --tracepoints (live/watchtrace.py)

    @property
    def states(self) -> list[str]:
        return ([n for n, on in (("rate-limit-bypass", self.bypass_active),
                                 ("merge-collapse", self.collapse.active)) if on])

    def to_json(self) -> dict[str, Any]:
        r = self.reading
        ksm = {k: (int(v) if float(v).is_integer() else v) for k, v in sorted(r.ksm.items())}
        return {
            "time": iso(self.wall),
            "interval_s": None if self.dt is None else round(self.dt, 3),
            "ksm": {**ksm, "advisor_mode": r.advisor_mode},
            "budget_bytes_per_s": None if self.budget_pages_s is None
            else round(self.budget_pages_s * PAGE),
            "freed_outside_ksm_bytes_total": self.outside_total_pages * PAGE,
            "interval": {
                "freed_outside_ksm_bytes": self.outside_pages * PAGE,
                "ksm_accounted_bytes": self.ksm_pages * PAGE,
                "freeing_rate_bytes_per_s": None if not self.dt else
                round((self.outside_pages + self.ksm_pages) * PAGE / self.dt),
                "budget_ratio": None if self.ratio is None else round(self.ratio, 3),
                "thp_split_page": self.splits, "ksm_splits": self.ksm_splits,
                "bounded_by_splits": self.capped,
            },
            "verdicts": {
                "rate-limit-bypass": {
                    "active": self.bypass_active, "episodes_total": self.episodes_total,
                    "episodes": [e.to_json() for e in self.episodes]},
                "merge-collapse": self.collapse.to_json(),
            },
            "states": self.states,
            "ksmd_cpu_pct": None if self.ksmd_cpu_pct is None else round(self.ksmd_cpu_pct, 2),
            "watch": {"cpu_pct": None if self.watch_cpu_pct is None
                      else round(self.watch_cpu_pct, 3),
                      "rss_mib": round(r.self_rss_kib / 1024, 1),
                      "read_ms": round(r.read_s * 1000, 2), "processes": len(self.procs),
                      "unreadable": r.unreadable},
            "processes": [p.to_json() for p in self.procs],
            **({"tracepoints": self.traced} if self.traced is not None else {}),
            "notes": self.notes,
        }


@dataclass
class _Boundary:
    """The host's cumulative figures at the reading where a full scan was seen to end."""

    t: float
    freed: int
    outside: int
    ksm_splits: int
    capacity: int  # pages the KSM splits could free
    split_failed: float


class Monitor:
    """Feed it readings (``update``); each returns the interval's :class:`Snapshot`."""

    def __init__(self) -> None:
        self.prev: Reading | None = None
        self.procs: dict[int, Proc] = {}
        self.outside_total = 0
        self.freed_total = 0  # outside + KSM's account gained, host
        self.ksm_splits_total = 0
        self.capacity_total = 0
        self.carry = 0  # split capacity one interval left unused
        self.episodes: list[Episode] = []
        self.episodes_total = 0
        self.open: Episode | None = None
        self.collapse = Collapse()
        self.scans: dict[int, _Boundary] = {}  # full_scans -> where it was first seen
        self.first_scan: int | None = None
        self.prev_run: int | None = None
        self.start_mark: _Boundary | None = None
        self.count = 0

    # ---- per process ---------------------------------------------------------------
    @staticmethod
    def _zeroed(prev: ProcReading, now: ProcReading) -> int | None:
        if prev.vmas is None or now.vmas is None:
            return None
        z = 0
        for key, a in now.vmas.items():
            b = prev.vmas.get(key)
            if b is not None:
                z += max(0, min(b.present - a.present, a.zero - b.zero))
        kzp = max(0, now.ksm.get("ksm_zero_pages", 0) - prev.ksm.get("ksm_zero_pages", 0))
        return max(0, z - kzp)

    # ---- the host --------------------------------------------------------------------
    def update(self, r: Reading) -> Snapshot:
        prev = self.prev
        self.prev = r
        self.count += 1
        dt = r.t - prev.t if prev is not None else None
        run = int(r.ksm.get("run", 0))
        budget = self._budget(prev, r)

        raw: dict[int, int] = {}
        seen: dict[int, Proc] = {}
        for pid, pr in r.procs.items():
            p = self.procs.get(pid)
            if p is None or p.started != pr.started:
                p = Proc(pid, pr.comm, pr.started, r.wall, pr)
            elif prev is not None:
                z = self._zeroed(p.reading, pr)
                if z:
                    raw[pid] = z
                p.reading = pr
            seen[pid] = p
        self.procs = seen

        splits = ksm_splits = capacity = ksm_capacity = 0
        if prev is not None:
            d = {k: max(0.0, r.vmstat.get(k, 0.0) - prev.vmstat.get(k, 0.0))
                 for k in ("thp_split_page", "thp_underused_split_page", "thp_swpout_fallback",
                           "thp_split_page_failed")}
            mthp = {s: max(0.0, v - prev.mthp_split.get(s, v)) for s, v in r.mthp_split.items()}
            splits = int(d["thp_split_page"] + sum(mthp.values()))
            pmd_ksm = max(0.0, d["thp_split_page"] - d["thp_underused_split_page"]
                          - d["thp_swpout_fallback"])
            ksm_splits = int(pmd_ksm + sum(mthp.values()))
            small = sum(n * folio_pages(s) for s, n in mthp.items())
            capacity = int(d["thp_split_page"] * HPAGE_PMD_NR + small)
            ksm_capacity = int(pmd_ksm * HPAGE_PMD_NR + small)
        avail = capacity + self.carry
        total = sum(raw.values())
        capped = total > avail
        if capped:  # more than the splits could free: scale every process down
            scaled = {pid: v * avail // total for pid, v in raw.items()}
            raw = {pid: v for pid, v in scaled.items() if v}
            total = sum(raw.values())
        self.carry = max(0, min(capacity, avail - total))
        for pid, p in self.procs.items():
            p.interval_pages = raw.get(pid, 0)
            p.outside_pages += p.interval_pages
            p.interval_s = dt or 0.0
        outside = total
        acc_now = r.ksm.get("pages_sharing", 0.0) + r.ksm.get("ksm_zero_pages", 0.0)
        acc_prev = (prev.ksm.get("pages_sharing", 0.0) + prev.ksm.get("ksm_zero_pages", 0.0)
                    if prev is not None else acc_now)
        ksm_pages = int(max(0.0, acc_now - acc_prev))
        self.outside_total += outside
        self.freed_total += outside + ksm_pages
        self.ksm_splits_total += ksm_splits
        self.capacity_total += ksm_capacity  # what KSM's own splits could free

        ratio = None
        if budget and dt:
            ratio = (outside + ksm_pages) / (budget * dt)
        self._bypass(r, prev, dt, ratio, outside, ksm_pages, splits, raw)
        self._collapse(r, budget, run)

        cpu = ((r.ksmd_cpu_s - prev.ksmd_cpu_s) / dt * 100
               if prev is not None and dt and r.ksmd_cpu_s is not None
               and prev.ksmd_cpu_s is not None else None)
        own = (r.self_cpu_s - prev.self_cpu_s) / dt * 100 if prev is not None and dt else None
        notes = list(r.notes)
        return Snapshot(
            wall=r.wall, dt=dt, reading=r, run=run, budget_pages_s=budget,
            outside_pages=outside, ksm_pages=ksm_pages, ratio=ratio, splits=splits,
            ksm_splits=ksm_splits, outside_total_pages=self.outside_total,
            bypass_active=self.open is not None, episodes_total=self.episodes_total,
            episodes=list(self.episodes), collapse=Collapse(**vars(self.collapse)),
            ksmd_cpu_pct=cpu, watch_cpu_pct=own,
            procs=sorted(self.procs.values(), key=lambda p: -p.outside_pages),
            capped=capped, notes=notes, interval_count=self.count)

    @staticmethod
    def _budget(prev: Reading | None, r: Reading) -> float | None:
        """Pages a second KSM may scan, over the interval (both ends: the advisor moves
        pages_to_scan), or None when KSM was not running at both ends."""
        ends = [x for x in (prev, r) if x is not None]
        out = []
        for x in ends:
            sleep = x.ksm.get("sleep_millisecs", 0.0)
            if int(x.ksm.get("run", 0)) != 1 or sleep <= 0:
                return None
            out.append(x.ksm.get("pages_to_scan", 0.0) * 1000.0 / sleep)
        return sum(out) / len(out) if out else None

    def _bypass(self, r: Reading, prev: Reading | None, dt: float | None,
                ratio: float | None, outside: int, ksm_pages: int, splits: int,
                by_pid: dict[int, int]) -> None:
        freed = outside + ksm_pages
        on = (ratio is not None and ratio > BYPASS_RATIO and freed > 0
              and outside / freed > BYPASS_SIDE_SHARE)
        if on and prev is not None and ratio is not None:
            if self.open is None:
                self.open = Episode(start=prev.wall, end=None, bytes=0, peak_ratio=0.0,
                                    splits=0)
                self.episodes.append(self.open)
                self.episodes = self.episodes[-EPISODES_KEPT:]
                self.episodes_total += 1
            e = self.open
            e.bytes += outside * PAGE
            e.peak_ratio = max(e.peak_ratio, ratio)
            e.splits += splits
            e.pids = sorted(set(e.pids) | set(by_pid))
        elif self.open is not None:
            self.open.end = prev.wall if prev is not None else r.wall
            self.open = None

    def _collapse(self, r: Reading, budget: float | None, run: int) -> None:
        scans = int(r.ksm.get("full_scans", -1))
        if run == 1 and self.prev_run is not None and self.prev_run != 1 and scans == 0:
            # KSM seen to start: its first full scan began in the last interval, a
            # boundary like a full-scan end (the interval itself has no budget)
            self.start_mark = _Boundary(r.t, self.freed_total, self.outside_total,
                                        self.ksm_splits_total, self.capacity_total,
                                        r.vmstat.get("thp_split_page_failed", 0.0))
        self.prev_run = run
        if run != 1 or budget is None or scans < 0:
            if run != 1:
                self.start_mark = None
            self.scans.clear()
            self.first_scan = None
            self.collapse = Collapse()
            return
        if self.first_scan is None or scans < max(self.scans, default=self.first_scan):
            self.scans.clear()  # run=2 starts full_scans over
            self.first_scan = scans
            self.collapse = Collapse()
            if self.start_mark is not None:
                self.scans[0] = self.start_mark
            self.start_mark = None
        if scans not in self.scans and scans != self.first_scan:  # first seen mid-scan
            self.scans[scans] = _Boundary(r.t, self.freed_total, self.outside_total,
                                          self.ksm_splits_total, self.capacity_total,
                                          r.vmstat.get("thp_split_page_failed", 0.0))
        # the window: from the latest full-scan end at least two scans back (a fast
        # scan can end several times within one interval)
        back = [k for k in self.scans if k <= scans - 2]
        if not back:
            return  # not two full scans seen yet: the state stays as it was
        start = max(back)
        for k in [k for k in self.scans if k < start]:
            del self.scans[k]
        w = self.scans[start]
        n_scans = scans - start
        dt = r.t - w.t
        if dt <= 0:
            return
        freed = self.freed_total - w.freed
        outside = self.outside_total - w.outside
        ksm_splits = self.ksm_splits_total - w.ksm_splits
        capacity = self.capacity_total - w.capacity
        thp = sum(p.reading.pages.huge for p in self.procs.values()
                  if p.reading.vmas is not None)
        was = self.collapse
        if not (ksm_splits > 0 and outside > 0 and thp > 0 and capacity > 0):
            self.collapse = Collapse()
            return
        zero_share = min(1.0, outside / capacity)
        healthy = min(budget, thp * zero_share / (dt / n_scans))
        rate = freed / dt
        share = rate / healthy if healthy > 0 else float("inf")
        reached = share < COLLAPSE_FRACTION
        borderline = within_margin(share, COLLAPSE_FRACTION)
        failed = int(r.vmstat.get("thp_split_page_failed", 0.0) - w.split_failed)
        evidence = (
            f"over the last {n_scans} full scans ({dt:.1f} s) memory was freed at "
            f"{rate * PAGE / MIB:.2f} MiB/s, {share * 100:.1f} % of the "
            f"{healthy * PAGE / MIB:.2f} MiB/s KSM would free merging every zero page it "
            f"scans ({thp * PAGE / MIB:.1f} MiB of THPs in mergeable memory; KSM's "
            f"{ksm_splits} splits freed {zero_share * 100:.0f} % of their pages as zero "
            f"pages); thp_split_page_failed +{failed}; freed outside KSM's account "
            f"{outside * PAGE / MIB:.1f} MiB")
        if borderline:
            evidence += (f"; borderline: within the {BORDERLINE_MARGIN:.0%} margin of "
                         f"{COLLAPSE_FRACTION:.0%}")
        self.collapse = Collapse(active=reached, evidence=evidence, share=share,
                                 borderline=borderline,
                                 since=(was.since if was.active else r.wall) if reached
                                 else None)
