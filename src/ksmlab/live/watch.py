"""What ``ksmlab watch`` reads every interval, through a reader that cannot write.

The host: every file of /sys/kernel/mm/ksm (counters and knobs, the advisor's
current ``pages_to_scan`` included), /proc/vmstat's ``thp_*`` counters, the
``split`` count of each multi-size THP size, and ksmd's CPU time
(/proc/<ksmd>/stat, utime + stime, in clock ticks).

The processes with mergeable memory: every process whose /proc/PID/ksm_stat says
``ksm_mergeable: yes`` (registered with KSM by MADV_MERGEABLE) or
``ksm_merge_any: yes`` (PR_SET_MEMORY_MERGE).  For each, every reading: its
ksm_stat and /proc/PID/stat; RssAnon (/proc/PID/status) and smaps_rollup; and per
``VM_MERGEABLE`` VMA (``mg`` in smaps' VmFlags; every private mapping of a
merge-any process, from maps) how many of its pages are present, map the zero
page, are swapped out or are mapped by a PMD, from one PAGEMAP_SCAN ioctl
(Linux 6.7) per process: the kernel walks the page tables and returns runs of
pages by category, nothing is faulted in.  The zero-page count is what tells the
remap apart from a process's own freeing (:mod:`ksmlab.monitor` says how).

What costs more than the two is read when a cheap figure moved: status,
smaps_rollup and the page counts when stat's rss changed or any folio split
happened on the host since the last reading (the remap happens in a split and
lowers RSS), the VMAs when the address space's size
(stat's vsize) or maps changed; and whatever happened the pages every REFRESH
readings, maps every VMA_REFRESH, smaps every FLAGS_REFRESH (a read fault
mapping the zero page moves neither figure; an madvise can change a VMA without
its size, and a whole VMA's flags without a line of maps).

Nothing here writes, signals or pauses anything: the reader is a
:class:`~ksmlab.live.kernelfs.KernelReader`.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from functools import cached_property

from .kernelfs import (
    PAGE_IS_HUGE,
    PAGE_IS_PFNZERO,
    PAGE_IS_PRESENT,
    PAGE_IS_SWAPPED,
    KernelReader,
)
from .knobs import KSM, THP
from .kthread import find_kthread

PAGE = 4096
PMD_SIZE_NAME = "2048kB"  # counted by thp_split_page; the other sizes by their own stats
REFRESH = 10  # readings after which the pages are counted even if nothing moved
VMA_REFRESH = 60  # ... maps compared (a VMA can change without vsize moving)
FLAGS_REFRESH = 600  # ... and smaps read (a whole VMA made mergeable changes no maps line)
YOUNG = 30  # readings a process without mergeable memory is asked every time
RECHECK = 5  # then every RECHECK-th reading
_KSM_STAT_INTS = ("ksm_rmap_items", "ksm_zero_pages", "ksm_merging_pages",
                  "ksm_process_profit")
_ROLLUP = ("Rss", "Anonymous", "AnonHugePages", "Swap", "KSM")


@dataclass(frozen=True)
class VmaPages:
    """Pages of one mergeable VMA by what maps them."""

    present: int  # present and not the zero page: what RSS counts
    zero: int  # the shared zero page (a PTE each, 512 for the huge zero page's PMD)
    swapped: int
    huge: int  # present pages mapped by a PMD (THPs), zero page excluded


@dataclass
class ProcReading:
    pid: int
    comm: str
    started: int  # /proc/PID/stat starttime: a reused pid is another process
    rss_anon_kib: float
    merge_any: bool
    ksm: dict[str, int]  # ksm_stat's numbers
    rollup: dict[str, float]  # smaps_rollup, kB
    vmas: dict[tuple[int, int], VmaPages] | None  # None: pages not readable

    @cached_property
    def pages(self) -> VmaPages:
        v = list((self.vmas or {}).values())
        return VmaPages(sum(x.present for x in v), sum(x.zero for x in v),
                        sum(x.swapped for x in v), sum(x.huge for x in v))


@dataclass
class Reading:
    t: float  # time.monotonic()
    wall: float  # time.time()
    ksm: dict[str, float]
    advisor_mode: str | None
    vmstat: dict[str, float]
    mthp_split: dict[str, float]  # folio size below PMD -> its stats/split
    ksmd_cpu_s: float | None
    procs: dict[int, ProcReading]
    self_cpu_s: float
    self_rss_kib: float
    read_s: float  # how long this reading took
    unreadable: int = 0  # processes whose ksm_stat could not be read (not root)
    notes: list[str] = field(default_factory=list)


def _num(text: str) -> float | None:
    t = text.strip()
    try:
        return float(t)
    except ValueError:
        return None


def _bracketed(raw: str) -> str:
    return raw[raw.index("[") + 1: raw.index("]")] if "[" in raw else raw.strip()


def parse_ksm_stat(text: str) -> tuple[dict[str, int], bool, bool]:
    """/proc/PID/ksm_stat -> (numbers, ksm_merge_any, ksm_mergeable)."""
    nums: dict[str, int] = {}
    any_ = mergeable = False
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key in _KSM_STAT_INTS:
            if value.lstrip("-").isdigit():
                nums[key] = int(value)
        elif key == "ksm_merge_any:":
            any_ = value == "yes"
        elif key == "ksm_mergeable:":
            mergeable = value == "yes"
    return nums, any_, mergeable


def bucket(vmas: list[tuple[int, int]], regions: list[tuple[int, int, int]]
           ) -> dict[tuple[int, int], VmaPages]:
    """PAGEMAP_SCAN's runs (start, end, categories), both sorted by address, counted
    per VMA (a run may cross from one VMA into the next: it is clipped)."""
    out: dict[tuple[int, int], list[int]] = {v: [0, 0, 0, 0] for v in vmas}
    i = 0
    for start, end, cat in regions:
        while i < len(vmas) and vmas[i][1] <= start:
            i += 1
        j = i
        while j < len(vmas) and vmas[j][0] < end:
            lo, hi = max(start, vmas[j][0]), min(end, vmas[j][1])
            if hi > lo:
                n = (hi - lo) // PAGE
                c = out[vmas[j]]
                if cat & PAGE_IS_PFNZERO:
                    c[1] += n
                elif cat & PAGE_IS_PRESENT:
                    c[0] += n
                    if cat & PAGE_IS_HUGE:
                        c[3] += n
                elif cat & PAGE_IS_SWAPPED:
                    c[2] += n
            j += 1
    return {v: VmaPages(*c) for v, c in out.items()}


_HEX = frozenset("0123456789abcdef")


def mergeable_spans(smaps: str) -> list[tuple[int, int]]:
    """The ``mg`` (VM_MERGEABLE) VMAs of /proc/PID/smaps: headers and VmFlags only
    (smaps.parse_smaps() reads every field; a large process has thousands)."""
    out: list[tuple[int, int]] = []
    span: tuple[int, int] | None = None
    for line in smaps.splitlines():
        if line[:1] in _HEX:
            lo, _, rest = line.partition("-")
            span = (int(lo, 16), int(rest.split(" ", 1)[0], 16))
        elif line.startswith("VmFlags:") and span is not None:
            if " mg" in line:
                out.append(span)
            span = None
    return sorted(out)


_SPECIAL = ("[vvar]", "[vdso]", "[vsyscall]", "[vvar_vclock]")


def _private_span(line: str) -> tuple[int, int] | None:
    """A /proc/PID/maps line -> its span, if a private mapping KSM may scan."""
    parts = line.split(maxsplit=5)
    if len(parts) < 5 or not parts[1].endswith("p"):
        return None
    if len(parts) == 6 and parts[5].strip() in _SPECIAL:
        return None
    lo, _, hi = parts[0].partition("-")
    return int(lo, 16), int(hi, 16)


@dataclass
class _Cached:
    """What was last read of a process, and when (readings)."""

    started: int
    comm: str
    rss: float = -1.0  # RssAnon, kB
    rss_pages: int = -1  # stat's rss
    nums: dict[str, int] = field(default_factory=dict)
    rollup: dict[str, float] | None = None
    vsize: int = -1
    merge_any: bool = False
    vmas: list[tuple[int, int]] | None = None
    maps: str | None = None  # /proc/PID/maps when vmas were checked
    mapped: int = 0  # the reading that checked maps
    listed: int = 0  # the reading that read smaps
    pages: dict[tuple[int, int], VmaPages] | None = None
    scanned: int = 0  # the reading that counted pages


class HostReader:
    """Reads the host for ``watch``; ``read()`` is one interval's :class:`Reading`."""

    def __init__(self, fs: KernelReader) -> None:
        self.fs = fs
        self.ksmd = find_kthread(fs, "ksmd")
        self.hz = os.sysconf("SC_CLK_TCK")
        self.mthp_sizes = [d.removeprefix("hugepages-") for d in fs.listdir(THP)
                           if d.startswith("hugepages-") and d != f"hugepages-{PMD_SIZE_NAME}"]
        self.scan_ok = True  # False: this kernel has no PAGEMAP_SCAN
        self._cache: dict[int, _Cached] = {}  # per process with mergeable memory
        self._splits = -1.0  # splits counted at the last reading's start
        self._split = True  # ... and whether they moved since the one before
        # pids without mergeable memory -> the reading that first saw them: asked again
        # every reading while young, then every RECHECK-th (a process rarely turns
        # mergeable late; a new one madvises right after it maps)
        self._plain: dict[int, int] = {}
        self.count = 0
        self.notes: list[str] = []

    # ---- the host ----------------------------------------------------------------
    def ksm(self) -> tuple[dict[str, float], str | None]:
        out: dict[str, float] = {}
        advisor = None
        for f in self.fs.listdir(KSM):
            raw = self.fs.slurp(f"{KSM}/{f}")
            if raw is None:
                continue
            if f == "advisor_mode":
                advisor = _bracketed(raw)
                continue
            v = _num(raw)
            if v is not None:
                out[f] = v
        return out, advisor

    def vmstat(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in (self.fs.slurp("proc/vmstat") or "").splitlines():
            name, _, value = line.partition(" ")
            if name.startswith("thp_") or name == "nr_anon_transparent_hugepages":
                v = _num(value)
                if v is not None:
                    out[name] = v
        return out

    def mthp_split(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for size in self.mthp_sizes:
            v = self.fs.slurp(f"{THP}/hugepages-{size}/stats/split")
            n = _num(v) if v is not None else None
            if n is not None:
                out[size] = n
        return out

    def ksmd_cpu_s(self) -> float | None:
        if self.ksmd is None:
            return None
        stat = (self.fs.slurp(f"proc/{self.ksmd}/stat") or "").rsplit(")", 1)[-1].split()
        if len(stat) < 13:
            return None
        return (int(stat[11]) + int(stat[12])) / self.hz  # utime, stime (proc_pid_stat(5))

    # ---- the processes -------------------------------------------------------------
    def _stat(self, pid: int) -> tuple[int, int, int] | None:
        """(starttime, vsize, rss): fields 22-24 of /proc/PID/stat; None if gone."""
        stat = (self.fs.slurp(f"proc/{pid}/stat") or "").rsplit(")", 1)[-1].split()
        return (int(stat[19]), int(stat[20]), int(stat[21])) if len(stat) > 21 else None

    def _mergeable_vmas(self, pid: int, merge_any: bool, maps: str | None
                        ) -> list[tuple[int, int]] | None:
        if maps is None:
            return None
        if merge_any:
            # PR_SET_MEMORY_MERGE marks every private mapping KSM can scan (ksm_add_vma(),
            # vma_ksm_compatible()): from maps, without smaps' page-table walk
            return sorted(v for v in map(_private_span, maps.splitlines()) if v is not None)
        smaps = self.fs.slurp(f"proc/{pid}/smaps")
        if smaps is None:
            return None
        return mergeable_spans(smaps)

    def _pages(self, pid: int, vmas: list[tuple[int, int]]
               ) -> dict[tuple[int, int], VmaPages] | None:
        if not self.scan_ok:
            return None
        spans: list[tuple[int, int]] = []
        for s, e in vmas:  # adjacent VMAs: one span
            if spans and spans[-1][1] == s:
                spans[-1] = (spans[-1][0], e)
            else:
                spans.append((s, e))
        try:
            regions = self.fs.scan_pages(
                pid, spans, PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO | PAGE_IS_HUGE)
        except OSError as e:
            import errno

            if e.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                self.scan_ok = False
                self.notes.append("this kernel has no PAGEMAP_SCAN (Linux 6.7): zero-page "
                                  "mappings cannot be counted, memory freed outside KSM's "
                                  "account is not measured")
            return None
        return bucket(vmas, regions)

    def process(self, pid: int, ksm_text: str) -> ProcReading | None:
        """One process with mergeable memory, or None.  What costs a page-table walk
        is read only when a cheap figure says it may have changed (the module
        docstring says which)."""
        nums, merge_any, mergeable = parse_ksm_stat(ksm_text)
        if not (merge_any or mergeable):
            return None
        st = self._stat(pid)
        if st is None:
            return None  # gone
        started, vsize, rss_pages = st
        c = self._cache.get(pid)
        if c is None or c.started != started:
            comm = (self.fs.slurp(f"proc/{pid}/comm") or "?").strip()
            c = self._cache[pid] = _Cached(started, comm)
        # stat's rss (anon + file + shmem) moves whenever RssAnon does, a split's remap
        # too; but a few pages can stay in a per-CPU counter delta, so any split on
        # the host since the last reading counts as a move for every process
        moved = rss_pages != c.rss_pages or self._split

        if moved or c.rss < 0:
            c.rss = 0.0
            for line in (self.fs.slurp(f"proc/{pid}/status") or "").splitlines():
                if line.startswith("RssAnon:"):
                    c.rss = float(line.split()[1])
                    break
        rss = c.rss
        if moved or c.rollup is None:
            rollup: dict[str, float] = {}
            for line in (self.fs.slurp(f"proc/{pid}/smaps_rollup") or "").splitlines():
                key, _, rest = line.partition(":")
                if key in _ROLLUP:
                    v = _num(rest.replace("kB", ""))
                    if v is not None:
                        rollup[key] = v
            c.rollup = rollup
        if c.vmas is None or vsize != c.vsize or self.count - c.mapped >= VMA_REFRESH \
                or merge_any != c.merge_any:
            maps = self.fs.slurp(f"proc/{pid}/maps")
            if c.vmas is None or maps != c.maps or vsize != c.vsize \
                    or merge_any != c.merge_any or self.count - c.listed >= FLAGS_REFRESH:
                c.vmas = self._mergeable_vmas(pid, merge_any, maps)
                c.listed = self.count
                c.pages = None
            c.vsize, c.mapped, c.merge_any, c.maps = vsize, self.count, merge_any, maps
        if c.vmas is not None and (moved or c.pages is None
                                   or self.count - c.scanned >= REFRESH):
            c.pages = self._pages(pid, c.vmas)
            c.scanned = self.count
        c.rss_pages, c.nums = rss_pages, nums
        return ProcReading(pid, c.comm, started, rss, merge_any, nums, c.rollup, c.pages)

    def splits(self) -> float:
        """thp_split_page and every multi-size split count, summed."""
        n = 0.0
        for line in (self.fs.slurp("proc/vmstat") or "").splitlines():
            if line.startswith("thp_split_page "):
                n += float(line.split()[1])
                break
        return n + sum(self.mthp_split().values())

    def read(self) -> Reading:
        t0 = time.monotonic()
        self.count += 1
        # splits since the last reading's end, when its pages had been counted
        self._split = self.splits() != self._splits
        ksm, advisor = self.ksm()
        procs: dict[int, ProcReading] = {}
        unreadable = 0
        listed = set()
        for d in self.fs.listdir("proc"):
            if not d.isdigit():
                continue
            pid = int(d)
            listed.add(pid)
            seen = self._plain.get(pid)
            if seen is not None and self.count - seen > YOUNG and (pid + self.count) % RECHECK:
                continue
            text = self.fs.slurp(f"proc/{d}/ksm_stat")
            if text is None:
                if self.fs.exists(f"proc/{d}/ksm_stat"):
                    unreadable += 1
                continue
            r = self.process(pid, text)
            if r is not None:
                procs[r.pid] = r
                self._plain.pop(pid, None)
            elif seen is None:  # at the first reading none is new: all are asked less
                self._plain[pid] = self.count if self.count > 1 else -YOUNG
        self._plain = {p: c for p, c in self._plain.items() if p in listed}
        self._cache = {p: c for p, c in self._cache.items() if p in procs}
        # the split counters after the pages: a split the pages show is counted by now
        vmstat = self.vmstat()
        mthp = self.mthp_split()
        self._splits = vmstat.get("thp_split_page", 0.0) + sum(mthp.values())
        ru = resource.getrusage(resource.RUSAGE_SELF)
        notes, self.notes = self.notes, []
        return Reading(
            t=time.monotonic(), wall=time.time(), ksm=ksm, advisor_mode=advisor,
            vmstat=vmstat, mthp_split=mthp, ksmd_cpu_s=self.ksmd_cpu_s(), procs=procs,
            self_cpu_s=ru.ru_utime + ru.ru_stime, self_rss_kib=float(ru.ru_maxrss),
            read_s=time.monotonic() - t0, unreadable=unreadable, notes=notes)
