"""What the running kernel has, found by looking, not by parsing its version.

One table (:data:`FEATURES`) of every knob, counter and behaviour the lab or the
model relies on, each with the mainline release and commit that introduced it,
and a probe that asks the kernel itself: the sysfs file exists, the counter is a
line of /proc/vmstat or /proc/PID/ksm_stat, the tracepoint is in tracefs, the
prctl is accepted.  A distribution kernel with backports (or without a config
option) answers for itself; the release and commit say where to read the code.
damo keeps such a registry of DAMON features (``_damo_features``); drgn comments
each version branch with the commit it follows.

Sources: Documentation/ABI/testing/sysfs-kernel-mm-ksm and mm/vmstat.c of
linux-source-6.12; the commit lists of mainline (git.kernel.org, torvalds/linux)
for the KSM commits; ../shared/reference (the remap thread, prior-art.md) for
b1f202060afe and dafff3f4c850.  Hashes marked "recalled" were not re-read here.

The one behaviour with a runtime probe of its own is the zero-page remap on THP
split (:mod:`ksmlab.live.probe`: it splits a THP of a child process, root only);
without it, :func:`remap_expected` infers it from the underused-THP shrinker's
files, which came in the same series (both 6.12).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import asdict, dataclass
from typing import Any, Literal

from .kernelfs import KernelFS

KSM = "sys/kernel/mm/ksm"
THP = "sys/kernel/mm/transparent_hugepage"
TRACEFS = ("sys/kernel/tracing", "sys/kernel/debug/tracing")

Kind = Literal["knob", "counter", "vmstat", "ksm_stat", "tracepoint", "prctl", "behaviour"]

PR_GET_MEMORY_MERGE = 68  # include/uapi/linux/prctl.h (6.4)


@dataclass(frozen=True)
class Feature:
    """One thing the lab or the model relies on, as the kernel names it."""

    name: str  # sysfs path below /sys/kernel/mm, counter or tracepoint name, behaviour
    kind: Kind
    release: str  # first mainline release with it
    commit: str  # the commit that introduced it (12 hex digits)
    subject: str  # its subject line
    uses: str = ""  # what the lab or the model does with it, where not obvious

    @property
    def where(self) -> str:
        """What the probe looks at."""
        return {"knob": f"/sys/kernel/mm/{self.name}", "counter": f"/sys/kernel/mm/{self.name}",
                "vmstat": "/proc/vmstat", "ksm_stat": "/proc/self/ksm_stat",
                "tracepoint": "tracefs events/ksm", "prctl": "prctl(PR_GET_MEMORY_MERGE)",
                "behaviour": "ksmlab.live.probe"}[self.kind]


# Commits, once each
_KSM = ("2.6.32", "31dbd01f3143", "ksm: Kernel SamePage Merging")  # recalled
_NUMA = ("3.9", "90bd6fd31c80", "ksm: allow trees per NUMA node")  # recalled
_UZP = ("4.11", "e86c59b1b12d",
        "mm/ksm: improve deduplication of zero pages with colouring")  # recalled
_CHAINS = ("4.13", "2c653d0ee2ae",
           "ksm: introduce ksm_max_page_sharing per page deduplication limit")  # recalled
_PROFIT = ("6.4", "d21077fbc2fc", "mm: add new KSM process and sysfs knobs")
_ZERO = ("6.6", "e2942062e01d", "ksm: count all zero pages placed by KSM")
_SCANNED = ("6.6", "b348b5fe2b5f", "mm/ksm: add pages scanned metric")
_SMART = ("6.7", "5e924ff54d08", 'mm/ksm: add "smart" page scanning mode')
_SKIPPED = ("6.7", "e5a689912689", "mm/ksm: add pages_skipped metric")
_ADVISOR = ("6.8", "66790e9a735b", "mm/ksm: add sysfs knobs for advisor")
_THP = ("2.6.38", "71e3aac0724f", "thp: transparent hugepage core")  # recalled
_KHUGEPAGED = ("2.6.38", "ba76149f47d8", "thp: khugepaged")  # recalled
_HZP = ("3.8", "79da5407eead",
        "thp: introduce sysfs knob to disable huge zero page")  # recalled
_SHARED = ("5.8", "71a2c112a0f6", "khugepaged: introduce 'max_ptes_shared' tunable")  # recalled
_MTHP = ("6.8", "3485b88390b0",
         "mm: thp: introduce multi-size THP sysfs interface")  # recalled
_UNDERUSED = ("6.12", "dafff3f4c850", "mm: split underused THPs")
_REMAP = ("6.12", "b1f202060afe",
          "mm: remap unused subpages to shared zeropage when splitting isolated thp")
_VMSTAT = ("2.6.39", "81ab4201fb7d",
           "mm: add vm counters for transparent bugepages")  # recalled
_SPLIT = ("4.5", "122afea9626a", "mm, vmstats: new THP splitting event")  # hash recalled
_DEFERRED = ("4.5", "9a982250f773", "thp: introduce deferred_split_huge_page()")  # recalled
_HZP_EVENTS = ("3.8", "d8a8e1f0da3d",
               "thp, vmstat: implement HZP_ALLOC and HZP_ALLOC_FAILED events")  # recalled
_SWPOUT = ("4.14", "fe490cc0fe9e", "mm, THP, swap: add THP swapping out fallback counting")
_RMAP_STAT = ("6.1", "cb4df4cae4f2", "ksm: count allocated ksm rmap_items for each process")
_PROC_ZERO = ("6.6", "6080d19f0704", "ksm: add ksm zero pages for each process")
_TRACE = ("6.4", "739100c88f49", "mm: add tracepoints to ksm")
_PRCTL = ("6.4", "d7597f59d1d3", "mm: add new api to enable ksm per process")


def _f(name: str, kind: Kind, since: tuple[str, str, str], uses: str = "") -> Feature:
    return Feature(name, kind, *since, uses)


FEATURES: tuple[Feature, ...] = (
    # /sys/kernel/mm/ksm knobs (the lab sets them; live/knobs.py has their ranges)
    _f("ksm/run", "knob", _KSM),
    _f("ksm/pages_to_scan", "knob", _KSM),
    _f("ksm/sleep_millisecs", "knob", _KSM),
    _f("ksm/merge_across_nodes", "knob", _NUMA, "absent without CONFIG_NUMA"),
    _f("ksm/use_zero_pages", "knob", _UZP, "the thread's two claims hang on it"),
    _f("ksm/max_page_sharing", "knob", _CHAINS),
    _f("ksm/stable_node_chains_prune_millisecs", "knob", _CHAINS),
    _f("ksm/smart_scan", "knob", _SMART, "the model's skip schedule"),
    _f("ksm/advisor_mode", "knob", _ADVISOR, "set to none: it rewrites pages_to_scan"),
    _f("ksm/advisor_max_cpu", "knob", _ADVISOR),
    _f("ksm/advisor_min_pages_to_scan", "knob", _ADVISOR),
    _f("ksm/advisor_max_pages_to_scan", "knob", _ADVISOR),
    _f("ksm/advisor_target_scan_time", "knob", _ADVISOR),
    # /sys/kernel/mm/ksm counters
    _f("ksm/full_scans", "counter", _KSM, "checkpoints of validate"),
    _f("ksm/pages_shared", "counter", _KSM),
    _f("ksm/pages_sharing", "counter", _KSM),
    _f("ksm/pages_unshared", "counter", _KSM),
    _f("ksm/pages_volatile", "counter", _KSM),
    _f("ksm/stable_node_chains", "counter", _CHAINS),
    _f("ksm/stable_node_dups", "counter", _CHAINS),
    _f("ksm/general_profit", "counter", _PROFIT),
    _f("ksm/ksm_zero_pages", "counter", _ZERO, "does not count the split's zero PTEs"),
    _f("ksm/pages_scanned", "counter", _SCANNED),
    _f("ksm/pages_skipped", "counter", _SKIPPED),
    # /sys/kernel/mm/transparent_hugepage knobs
    _f("transparent_hugepage/enabled", "knob", _THP),
    _f("transparent_hugepage/defrag", "knob", _THP),
    _f("transparent_hugepage/use_zero_page", "knob", _HZP),
    _f("transparent_hugepage/shrink_underused", "knob", _UNDERUSED),
    _f("transparent_hugepage/khugepaged/defrag", "knob", _KHUGEPAGED),
    _f("transparent_hugepage/khugepaged/max_ptes_none", "knob", _KHUGEPAGED,
       "also the shrinker's threshold (6.12)"),
    _f("transparent_hugepage/khugepaged/max_ptes_shared", "knob", _SHARED),
    _f("transparent_hugepage/khugepaged/pages_to_scan", "knob", _KHUGEPAGED),
    _f("transparent_hugepage/khugepaged/scan_sleep_millisecs", "knob", _KHUGEPAGED),
    _f("transparent_hugepage/khugepaged/alloc_sleep_millisecs", "knob", _KHUGEPAGED),
    _f("transparent_hugepage/khugepaged/full_scans", "counter", _KHUGEPAGED),
    _f("transparent_hugepage/khugepaged/pages_collapsed", "counter", _KHUGEPAGED),
    _f("transparent_hugepage/hugepages-2048kB/enabled", "knob", _MTHP),
    # /proc/vmstat
    _f("thp_fault_alloc", "vmstat", _VMSTAT),
    _f("thp_collapse_alloc", "vmstat", _VMSTAT),
    _f("thp_split_page", "vmstat", _SPLIT, "where the kernel remaps, each freed zeros"),
    _f("thp_split_page_failed", "vmstat", _SPLIT),
    _f("thp_split_pmd", "vmstat", _SPLIT),
    _f("thp_deferred_split_page", "vmstat", _DEFERRED),
    _f("thp_underused_split_page", "vmstat", _UNDERUSED),
    _f("thp_zero_page_alloc", "vmstat", _HZP_EVENTS),
    _f("thp_swpout_fallback", "vmstat", _SWPOUT, "the remap probe's split"),
    # /proc/PID/ksm_stat (the workload's own)
    _f("ksm_rmap_items", "ksm_stat", _RMAP_STAT),
    _f("ksm_merging_pages", "ksm_stat", _PROFIT),
    _f("ksm_process_profit", "ksm_stat", _PROFIT),
    _f("ksm_zero_pages", "ksm_stat", _PROC_ZERO),
    # what validate --kernel-events records; exec --merge-any
    _f("ksm_merge_one_page", "tracepoint", _TRACE),
    _f("PR_SET_MEMORY_MERGE", "prctl", _PRCTL, "ksmlab exec --merge-any"),
    # behaviours
    _f("zero-page remap on THP split", "behaviour", _REMAP,
       "mainline policy vs pre-6.12"),
    _f("underused-THP shrinker", "behaviour", _UNDERUSED, "the pressure scenarios"),
)


def feature(name: str, kind: Kind | None = None) -> Feature:
    """A feature by name (and kind, where a name is both a counter and a stat)."""
    found = [f for f in FEATURES if f.name == name and kind in (None, f.kind)]
    if len(found) != 1:
        raise KeyError(name)
    return found[0]


def release_of(name: str) -> str:
    """The release a feature came in, for a note ("no smart scan (6.7+)")."""
    return feature(name).release


def _lines(fs: KernelFS, rel: str) -> set[str] | None:
    text = fs.read_or_none(rel)
    if text is None:
        return None
    return {line.partition(" ")[0].rstrip(":") for line in text.splitlines()}


def _prctl_memory_merge() -> bool | None:
    """prctl(PR_GET_MEMORY_MERGE) is accepted (>= 0) where the kernel has it, EINVAL
    where not; it only reads this process's flag."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None
    rc = libc.prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0)
    return bool(rc >= 0)


def remap_expected(fs: KernelFS) -> bool | None:
    """Does this kernel remap zero-filled subpages on a THP split, by its files?

    b1f202060afe (the remap) and dafff3f4c850 (the underused-THP shrinker, with
    ``shrink_underused`` and ``thp_underused_split_page``) are one series, both in
    6.12: a kernel with the shrinker's files has the remap.  None without THP (or
    without /proc/vmstat).  The remap probe (live/probe.py) looks at the split
    itself; prefer it where it can run (root)."""
    if fs.exists(f"{THP}/shrink_underused"):
        return True
    vmstat = _lines(fs, "proc/vmstat")
    if vmstat is None or not fs.exists(f"{THP}/enabled"):
        return None
    return "thp_underused_split_page" in vmstat


def policy_for_remap(remaps: bool | None) -> str:
    """The model policy that stands for a kernel that remaps (``mainline``) or not
    (``pre-6.12``); unknown is taken as the remap, which every kernel since 6.12 has."""
    return "pre-6.12" if remaps is False else "mainline"


def policy_for_host(fs: KernelFS, remaps: bool | None = None) -> str:
    """The model policy for the running kernel: from the remap probe's answer when
    given, else from the kernel's files (:func:`remap_expected`)."""
    return policy_for_remap(remap_expected(fs) if remaps is None else remaps)


def release(fs: KernelFS) -> str:
    """The running kernel's release, as data (a trace's meta, a report's title): no
    decision is taken on it."""
    return fs.read_or_none("proc/sys/kernel/osrelease") or "unknown"


@dataclass(frozen=True)
class Presence:
    feature: Feature
    present: bool | None  # None: could not tell (tracefs not mounted, no /proc/vmstat)
    how: str = ""

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self.feature), "where": self.feature.where,
                "present": self.present, "how": self.how}


def probe(fs: KernelFS, remaps: bool | None = None, remap_how: str = "") -> list[Presence]:
    """Every feature's presence on the kernel behind ``fs`` (reads only).  ``remaps``:
    the remap probe's answer (live/probe.py), if it ran."""
    vmstat = _lines(fs, "proc/vmstat")
    ksm_stat = _lines(fs, "proc/self/ksm_stat")
    tracefs = next((t for t in TRACEFS if fs.exists(f"{t}/events")), None)
    out = []
    for f in FEATURES:
        present: bool | None
        how = ""
        if f.kind in ("knob", "counter"):
            present = fs.exists(f"sys/kernel/mm/{f.name}")
        elif f.kind == "vmstat":
            present = None if vmstat is None else f.name in vmstat
        elif f.kind == "ksm_stat":
            present = ksm_stat is not None and f.name in ksm_stat  # no file: before 6.1
        elif f.kind == "tracepoint":
            present = None if tracefs is None else fs.exists(f"{tracefs}/events/ksm/{f.name}")
            how = "tracefs not mounted" if tracefs is None else ""
        elif f.kind == "prctl":
            present = _prctl_memory_merge() if fs.root.as_posix() == "/" else None
        elif f.name == "zero-page remap on THP split":
            if remaps is not None:
                present, how = remaps, remap_how or "the remap probe"
            else:
                present = remap_expected(fs)
                how = "by the shrinker's files (same series)"
        else:  # the underused-THP shrinker: its knob and its counter
            present = fs.exists(f"{THP}/shrink_underused") or (
                None if vmstat is None else "thp_underused_split_page" in vmstat)
        out.append(Presence(f, present, how))
    return out


_SECTIONS = (  # (kind, prefix the rows drop, heading)
    ("ksm", f"/{KSM}/", f"/{KSM}"),
    ("thp", f"/{THP}/", f"/{THP}"),
    ("vmstat", "", "/proc/vmstat"),
    ("ksm_stat", "", "/proc/PID/ksm_stat"),
    ("tracepoint", "", "tracefs events/ksm"),
    ("prctl", "", "prctl(2)"),
    ("behaviour", "", "behaviours"),
)


def _section(f: Feature) -> str:
    if f.kind in ("knob", "counter"):
        return "ksm" if f.name.startswith("ksm/") else "thp"
    return f.kind


def table(rows: list[Presence]) -> list[str]:
    """The table for a terminal (80 columns): each feature under the folder or file
    it is found in, here or not, the first release with it, its commit."""
    state = {True: "yes", False: "no", None: "?"}
    lines = [f"  {'':<50} {'here':<4} {'since':>6} commit"]
    for kind, prefix, heading in _SECTIONS:
        part = [r for r in rows if _section(r.feature) == kind]
        if not part:
            continue
        lines.append(f"  {heading}")
        for r in part:
            f = r.feature
            name = ("/sys/kernel/mm/" + f.name).removeprefix(prefix) if prefix else f.name
            lines.append(f"    {name[:48]:<48} {state[r.present]:<4} {f.release:>6} "
                         f"{f.commit}")
    return lines
