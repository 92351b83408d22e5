"""Read the kernel's counters: /sys/kernel/mm/ksm, /proc/vmstat, the workload's
/proc/PID/{status,smaps_rollup,ksm_stat}, and ksmd's /proc/PID/schedstat.

One sample is a flat dict named after the kernel's counters (see
:mod:`ksmlab.trace`); every KSM file is read, not only the ones the trace
format lists, so a newer kernel's counters are kept too.
"""

from __future__ import annotations

import os
import time

from ..trace import MTHP_STATS, mthp_column
from .kernelfs import KernelFS
from .knobs import KNOBS, KSM, THP
from .kthread import find_kthread

# not counters: knobs that live in the same folder (live/knobs.py has every one)
KSM_KNOB_FILES = frozenset(n.removeprefix("ksm/") for n in KNOBS if n.startswith("ksm/"))
_KSM_STAT = {
    "ksm_rmap_items": "ksm_rmap_items",
    "ksm_merging_pages": "ksm_merging_pages",
    "ksm_process_profit": "ksm_process_profit",
    "ksm_zero_pages": "proc_ksm_zero_pages",
}


def find_ksmd(fs: KernelFS) -> int | None:
    return find_kthread(fs, "ksmd")


class Sampler:
    def __init__(self, fs: KernelFS, pids: list[int] | None = None,
                 mthp_sizes: list[str] | None = None) -> None:
        self.fs = fs
        self.pids = list(pids or [])
        self.ksm_files = [f for f in fs.listdir(KSM) if f not in KSM_KNOB_FILES]
        self.ksmd = find_ksmd(fs)
        # multi-size THP sizes whose per-size stats are read ("64kB"): the scenario's
        self.mthp_sizes = list(mthp_sizes or [])

    def mthp(self) -> dict[str, float]:
        """hugepages-<size>/stats/* (count_mthp_stat()), global like /proc/vmstat."""
        out: dict[str, float] = {}
        for size in self.mthp_sizes:
            for stat in MTHP_STATS:
                v = self.fs.read_or_none(f"{THP}/hugepages-{size}/stats/{stat}")
                if v is not None and v.isdigit():
                    out[mthp_column(size, stat)] = float(v)
        return out

    def ksm(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for f in self.ksm_files:
            v = self.fs.read_or_none(f"{KSM}/{f}")
            if v is not None and v.lstrip("-").isdigit():
                out[f] = float(v)
        return out

    def vmstat(self) -> dict[str, float]:
        out: dict[str, float] = {}
        text = self.fs.read_or_none("proc/vmstat") or ""
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name.startswith("thp_") or name == "nr_anon_transparent_hugepages":
                out[name] = float(value)
        for f in ("full_scans", "pages_collapsed"):
            v = self.fs.read_or_none(f"{THP}/khugepaged/{f}")
            if v is not None:
                out[f"khugepaged_{f}"] = float(v)
        return out

    def processes(self) -> dict[str, float]:
        out = {k: 0.0 for k in ("Rss", "RssAnon", "AnonHugePages", *_KSM_STAT.values())}
        for pid in self.pids:
            status = self.fs.read_or_none(f"proc/{pid}/status") or ""
            for line in status.splitlines():
                key, _, rest = line.partition(":")
                if key == "VmRSS":
                    out["Rss"] += float(rest.split()[0])
                elif key == "RssAnon":
                    out["RssAnon"] += float(rest.split()[0])
            rollup = self.fs.read_or_none(f"proc/{pid}/smaps_rollup") or ""
            for line in rollup.splitlines():
                if line.startswith("AnonHugePages:"):
                    out["AnonHugePages"] += float(line.split()[1])
            stat = self.fs.read_or_none(f"proc/{pid}/ksm_stat") or ""
            for line in stat.splitlines():
                key, _, rest = line.partition(" ")
                if key in _KSM_STAT and rest.strip().lstrip("-").isdigit():
                    out[_KSM_STAT[key]] += float(rest)
        return out

    def ksmd_cpu_ns(self) -> dict[str, float]:
        if self.ksmd is None:
            return {}
        v = self.fs.read_or_none(f"proc/{self.ksmd}/schedstat")
        return {"ksmd_cpu_ns": float(v.split()[0])} if v else {}

    def cpu_use(self) -> dict[str, float]:
        """CPU time of the whole machine (/proc/stat: user, nice, system, irq, softirq),
        of the VM's host taking it back (steal), of the workload and of the lab itself:
        what is left is other work beside the run, which skews ksmd's CPU and times."""
        hz = os.sysconf("SC_CLK_TCK")
        out: dict[str, float] = {"lab_cpu_ns": float(time.process_time_ns())}
        line = (self.fs.read_or_none("proc/stat") or "").split("\n", 1)[0].split()
        if line[:1] == ["cpu"] and len(line) >= 9:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, line[1:9])
            out["cpu_busy_ns"] = (user + nice + system + irq + softirq) * 1e9 / hz
            out["cpu_steal_ns"] = steal * 1e9 / hz
        work = 0.0
        for pid in self.pids:
            stat = self.fs.read_or_none(f"proc/{pid}/stat") or ""
            fields = stat.rsplit(")", 1)[-1].split()
            if len(fields) > 12:  # utime and stime: fields 14 and 15 of proc_pid_stat(5)
                work += (int(fields[11]) + int(fields[12])) * 1e9 / hz
        out["workload_cpu_ns"] = work
        return out

    def full_scans(self) -> int | None:
        """The one cheap read polled between samples to catch full-scan ends."""
        v = self.fs.read_or_none(f"{KSM}/full_scans")
        return int(v) if v is not None and v.isdigit() else None

    def pages_scanned(self) -> int | None:
        v = self.fs.read_or_none(f"{KSM}/pages_scanned")
        return int(v) if v is not None and v.isdigit() else None

    def sample(self, t: float, full_scan_end: bool = False) -> dict[str, float]:
        return {"t": t, "full_scan_end": float(full_scan_end), **self.ksm(), **self.vmstat(),
                **self.mthp(), **self.processes(), **self.ksmd_cpu_ns(), **self.cpu_use()}
