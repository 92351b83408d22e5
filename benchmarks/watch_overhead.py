"""What ``ksmlab watch`` costs: its CPU and memory while it watches N processes
with mergeable memory (root; run it under the machine lock: it starts processes).

    sudo .venv/bin/python benchmarks/watch_overhead.py --json
    sudo .venv/bin/python benchmarks/watch_overhead.py --processes 20 --seconds 60

The processes are forked from this one: each maps ``--mib`` MiB, advises it
MADV_HUGEPAGE and MADV_MERGEABLE, writes every page (a quarter of it zero, the rest
unique) and waits; KSM is left as it is (no knob is touched: with run=0 they
are registered with KSM and nothing merges).  ``ksmlab watch --json`` then runs
for ``--seconds`` and its CPU time is read from /proc/PID/stat after a warm-up
(its imports and first readings), its peak RSS from its last JSON line.

Target: cpu_pct <= 1 % of one CPU at a 1 s interval with 100 processes.  An idle
host's 10 minutes (no false alarm) is ``--seconds 600 --processes 0 --check-quiet``:
it also fails if any verdict state was active.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import signal
import subprocess
import sys
import tempfile
import time

from ksmlab.live.kernelfs import KernelFS

PR_SET_PDEATHSIG = 1
WARMUP_S = 5.0


def child(mib: int, seed: int, ready_w: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    size = mib << 20
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    m.madvise(mmap.MADV_MERGEABLE)
    page = bytearray(4096)
    for i in range(0, size, 4096):
        if (i // 4096) % 4:
            page[:16] = (seed * 1_000_003 + i).to_bytes(16, "little")
            m[i:i + 4096] = page
        else:
            m[i] = 0  # a zero page, written
    os.write(ready_w, b"x")
    while True:
        signal.pause()


def spawn(n: int, mib: int) -> list[int]:
    r, w = os.pipe()
    pids = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                child(mib, i, w)
            finally:
                os._exit(0)
        pids.append(pid)
    os.close(w)
    got = 0
    while got < n:
        got += len(os.read(r, n - got))
    os.close(r)
    return pids


def cpu_s(fs: KernelFS, pid: int) -> float:
    stat = (fs.read_or_none(f"proc/{pid}/stat") or "").rsplit(")", 1)[-1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=100)
    ap.add_argument("--mib", type=int, default=4, help="mergeable MiB per process")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--check-quiet", action="store_true",
                    help="exit 1 if any verdict state was active (no false alarm)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("watch_overhead: needs root (other processes' page tables)", file=sys.stderr)
        return 2
    fs = KernelFS()
    pids = spawn(a.processes, a.mib)
    # the JSON lines to a file: a pipe nobody reads fills and stops the watch
    with tempfile.TemporaryFile("w+") as sink:
        try:
            w = subprocess.Popen([sys.executable, "-m", "ksmlab", "watch", "--json", "-i",
                                  str(a.interval), "-d", str(a.seconds + WARMUP_S)],
                                 stdout=sink, text=True)
            time.sleep(WARMUP_S)
            c0, t0 = cpu_s(fs, w.pid), time.monotonic()
            time.sleep(a.seconds)
            c1, t1 = cpu_s(fs, w.pid), time.monotonic()
            w.wait(timeout=60)
        finally:
            for p in pids:
                os.kill(p, signal.SIGKILL)
            for p in pids:
                os.waitpid(p, 0)
        sink.seek(0)
        out = sink.read()
    lines = [json.loads(x) for x in out.splitlines() if x.strip()]
    last = lines[-1]
    if w.returncode != 0 or len(lines) < a.seconds / a.interval:
        print(f"watch_overhead: the watch ended with {w.returncode} after {len(lines)} "
              "readings", file=sys.stderr)
        return 1
    alarms = sorted({s for x in lines for s in x["states"]})
    res = {
        "processes": a.processes,
        "watched": last["watch"]["processes"],
        "mib_per_process": a.mib,
        "interval_s": a.interval,
        "seconds": round(t1 - t0, 1),
        "cpu_pct": round((c1 - c0) / (t1 - t0) * 100, 2),
        "rss_mib": last["watch"]["rss_mib"],
        "read_ms_mean": round(sum(x["watch"]["read_ms"] for x in lines) / len(lines), 2),
        "intervals": len(lines),
        "states_seen": alarms,
        "freed_outside_ksm_bytes_total": last["freed_outside_ksm_bytes_total"],
    }
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:<28} {v}")
    if a.check_quiet and alarms:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
