"""What folio size changes, measured on the running kernel (issue 13, before the model
covers multi-size THP).

For each anon folio size and each ``use_zero_pages`` value: a child process maps
64 MiB (MADV_HUGEPAGE, MADV_MERGEABLE) with only that size enabled
(``hugepages-<N>kB/enabled`` = madvise, every other size never), writes one zero
byte in every 4 KiB page (a write fault allocates a zeroed folio of that size),
then KSM runs at 100 pages per 20 ms.  Every knob goes through the lab's
KnobSession (journalled, restored in reverse, ``ksmlab restore`` after a
SIGKILL) under the lab's run lock; khugepaged is parked for the run.  Reported
per case: the folio count the faults made, what was freed and by KSM's account,
the per-size ``split``/``split_failed``/``split_deferred`` counters, full scans,
and the peak freeing rate against KSM's budget.  The per-size counters are
global, so another process faulting folios of the same size shows in
``anon_fault_alloc`` (not used here) but not in the workload's RSS.

Root, KSM and multi-size THP (Linux 6.8+) needed; about 2 minutes.  Usage:

    python benchmarks/mthp_live.py [--sizes 64,1024,2048] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from ksmlab.live.journal import Journal, RunLock
from ksmlab.live.kernelfs import KernelFS
from ksmlab.live.knobs import KnobSession

THP = "sys/kernel/mm/transparent_hugepage"
KSM = "sys/kernel/mm/ksm"
MIB = 64
PAGES_TO_SCAN, SLEEP_MS = 100, 20
STATS = ("split", "split_failed", "split_deferred")
CHILD = r"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL: never outlives the benchmark
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
size, pmd = int(sys.argv[1]) << 20, 2 << 20
a = libc.mmap(None, size + pmd, 3, 0x22, -1, 0)  # PROT_READ|WRITE, MAP_PRIVATE|ANON
a = (a + pmd - 1) & ~(pmd - 1)
assert libc.madvise(a, size, 14) == 0 and libc.madvise(a, size, 12) == 0
buf = (ctypes.c_char * size).from_address(a)
for off in range(0, size, 4096):
    buf[off] = b"\0"
print("ready", flush=True)
sys.stdin.read()
"""


def _rss_kb(fs: KernelFS, pid: int) -> int:
    return int(fs.fields(f"proc/{pid}/status").get("RssAnon", "0 kB").split()[0])


def run_case(fs: KernelFS, size_kb: int, uzp: int, duration: float) -> dict[str, Any]:
    stats = f"{THP}/hugepages-{size_kb}kB/stats"

    def read() -> dict[str, int]:
        out = {s: int(fs.read(f"{stats}/{s}")) for s in (*STATS, "anon_fault_alloc")}
        for c in ("pages_sharing", "ksm_zero_pages", "full_scans", "pages_scanned"):
            out[c] = int(fs.read(f"{KSM}/{c}"))
        return out

    child = None
    with KnobSession(fs, Journal()) as ks:
        ks.set("ksm/run", 2)
        for d in sorted(fs.listdir(THP)):
            if d.startswith("hugepages-") and fs.exists(f"{THP}/{d}/enabled"):
                mode = "madvise" if d == f"hugepages-{size_kb}kB" else "never"
                ks.set(f"transparent_hugepage/{d}/enabled", mode)
        ks.set("transparent_hugepage/khugepaged/scan_sleep_millisecs", 86_400_000)
        ks.set("ksm/pages_to_scan", PAGES_TO_SCAN)
        ks.set("ksm/sleep_millisecs", SLEEP_MS)
        ks.set("ksm/use_zero_pages", uzp)
        try:
            child = subprocess.Popen([sys.executable, "-c", CHILD, str(MIB)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            s0, rss0 = read(), _rss_kb(fs, child.pid)
            t0 = time.monotonic()
            ks.set("ksm/run", 1)
            rows: list[tuple[float, int, dict[str, int]]] = []
            while (t := time.monotonic() - t0) < duration:
                rows.append((t, _rss_kb(fs, child.pid), read()))
                time.sleep(0.02)
            ks.set("ksm/run", 0)
        finally:
            if child is not None:
                child.kill()
                child.wait()
            ks.set("ksm/run", 2)
    d = {k: rows[-1][2][k] - s0[k] for k in s0}
    freed = [(t, (rss0 - rss) / 1024) for t, rss, _ in rows]
    peak = max((b[1] - a[1]) / (b[0] - a[0]) for a, b in itertools.pairwise(freed))
    budget = PAGES_TO_SCAN * 1000 / SLEEP_MS * 4096 / 2**20
    scans = d["full_scans"]
    return {
        "size_kb": size_kb, "use_zero_pages": uzp, "mib": MIB,
        "folios": MIB * 1024 // size_kb, "duration_s": duration,
        "freed_mib": round(freed[-1][1], 2),
        "by_ksm_mib": round((d["pages_sharing"] + d["ksm_zero_pages"]) * 4 / 1024, 2),
        **{s: d[s] for s in STATS},
        "full_scans": scans, "pages_scanned": d["pages_scanned"],
        "freed_per_full_scan_kib": round(freed[-1][1] * 1024 / scans, 1) if scans else None,
        "peak_rate_mib_s": round(peak, 1), "budget_mib_s": round(budget, 2),
        "peak_ratio": round(peak / budget, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,1024,2048", help="folio sizes in kB")
    ap.add_argument("--duration", type=float, default=14.0, help="seconds of KSM per case")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    fs = KernelFS()
    sizes = [int(s) for s in args.sizes.split(",")]
    for kb in sizes:
        if not fs.exists(f"{THP}/hugepages-{kb}kB/enabled"):
            sys.exit(f"mthp_live: this kernel has no anon {kb} kB folios "
                     f"(/{THP}/hugepages-{kb}kB/enabled)")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    lock = RunLock()
    lock.acquire()
    try:
        results = [run_case(fs, kb, uzp, args.duration) for kb in sizes for uzp in (1, 0)]
    finally:
        lock.release()
    out = {"kernel": os.uname().release, "cases": results}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{'size':>7} uzp folios freed  byKSM split fail  scans  /scan KiB  peak x")
    for r in results:
        print(f"{r['size_kb']:>5}kB {r['use_zero_pages']:>3} {r['folios']:>6} "
              f"{r['freed_mib']:>6} {r['by_ksm_mib']:>6} {r['split']:>5} {r['split_failed']:>4} "
              f"{r['full_scans']:>6} {r['freed_per_full_scan_kib'] or '-':>10} "
              f"{r['peak_ratio']:>6}")


if __name__ == "__main__":
    main()
