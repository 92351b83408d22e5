"""Real workloads (issue 12): a QEMU guest and a server, captured from the live
process, run in the model, and checked live against the kernel.

1. A QEMU guest (``kernel/idle_guest.py``: 1 GiB, ``mem-merge=on``, guest
   ``init_on_free=1``, a job that fills and frees memory, then idles) is paused
   (QMP ``stop``), captured, and validated with ``use_zero_pages=0`` and ``=1``
   (``ksmlab validate --pid``); then resumed and validated running, where the
   model runs the image as captured and the report says how much memory changed.
2. memcached from Debian, started under ``ksmlab exec --merge-any``, loaded with
   20000 values (a third the same, a third zero, a third random), paused and
   validated the same way.

Root, KSM, qemu-system-x86 and memcached needed (``make system-deps``); a few
minutes; one live experiment at a time.  Usage:

    python benchmarks/real_workloads.py [--json] [--guest-mib 1024] [--skip-guest]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ksmlab.trace import Trace

KSMLAB = [sys.executable, "-m", "ksmlab"]
MC_PORT = 11299


def ksmlab(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KSMLAB, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def validate(pid: int, out: Path, uzp: str, duration: float, pages_to_scan: int
             ) -> dict[str, Any]:
    r = ksmlab("validate", "--pid", str(pid), "--use-zero-pages", uzp, "-d", str(duration),
               "--pages-to-scan", str(pages_to_scan), "--json", "--out", str(out))
    if r.returncode not in (0, 1):
        raise SystemExit(f"validate --pid {pid}: {r.stderr.strip()}")
    d: dict[str, Any] = json.loads(r.stdout)
    return d


def freed_fit(out: Path, name: str) -> dict[str, Any]:
    """Memory freed (RssAnon below its start) in the kernel and in the model at every
    full-scan end: the largest difference, relative to what the kernel freed."""
    k = Trace.load(out / f"{name}.kernel.trace.json.gz")
    m = Trace.load(out / f"{name}.model.trace.json.gz")
    ck, cm = k.checkpoints(), m.checkpoints()
    scans = sorted(set(ck) & set(cm))
    fk = -k.since_start("RssAnon")[[ck[s] for s in scans]]
    fm = -m.since_start("RssAnon")[[cm[s] for s in scans]]
    fk, fm = fk - min(0.0, float(fk.min())), fm - min(0.0, float(fm.min()))
    denom = np.maximum(np.abs(fk), 1024.0)  # KiB; below 1 MiB freed, 1 MiB
    rel = np.abs(fk - fm) / denom
    return {"checkpoints": len(scans), "freed_max_rel_diff": round(float(rel.max()), 4),
            "freed_kernel_mib": round(float(fk[-1]) / 1024, 1),
            "freed_model_mib": round(float(fm[-1]) / 1024, 1),
            "changed_pages": k.meta.get("attached", {}).get("changed_pages")}


def summary(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for s in d["scenarios"]:
        uzp = s["name"].rsplit("-", 1)[-1]
        out[uzp] = {"agreement": s["agreement"], "checkpoints": s["checkpoints"],
                    "verdicts": s["verdicts"], "verdicts_agree": s["verdicts_agree"],
                    "events_identical": (s.get("events") or {}).get("identical_share")}
    return out


def guest(res: dict[str, Any], work: Path, mib: int) -> None:
    """A fresh guest for each run: a run leaves the guest changed (KSM split its THPs
    and run=2 unmerged what it merged), so uzp0 and uzp1 each start from a new boot."""
    from ksmlab.kernel.idle_guest import IdleGuest

    res["guest_mib"] = mib
    with IdleGuest(mem_mib=mib) as g:
        g.pause()
        r = ksmlab("capture", str(g.pid), "-o", str(work / "guest.image"), "--json")
        if r.returncode != 0:
            raise SystemExit(f"capture: {r.stderr.strip()}")
        cap = json.loads(r.stdout)
        res["capture_s"] = cap["capture_s"]
        res["capture_mib_s"] = cap["read_mib_s"]
        res["bytes_per_page"] = cap["bytes_per_page"]
        res["guest_pages"] = {k: cap[k] for k in ("pages", "present", "zero", "thp",
                                                 "contents")}
        for uzp in (0, 1):
            cmp = ksmlab("compare", "--pid", str(g.pid), "-d", "20", "--pages-to-scan",
                         "2000", "--use-zero-pages", str(uzp), "--format", "json")
            res[f"compare_uzp{uzp}"] = json.loads(cmp.stdout) if cmp.returncode == 0 \
                else cmp.stderr.strip()
    for uzp in (0, 1):
        with IdleGuest(mem_mib=mib) as g:
            g.pause()
            d = validate(g.pid, work / f"paused{uzp}", str(uzp), 20.0, 2000)
        [s] = summary(d).values()
        res[f"agreement_uzp{uzp}"] = s["agreement"]
        res[f"verdicts_uzp{uzp}"] = s["verdicts"]
        res[f"paused_uzp{uzp}"] = s
    with IdleGuest(mem_mib=mib) as g:  # running: the model runs the image as captured
        d = validate(g.pid, work / "running", "1", 20.0, 2000)
    [s] = summary(d).values()
    res["running_uzp1"] = {**s, **freed_fit(work / "running", d["scenarios"][0]["name"])}


def memcached(res: dict[str, Any], work: Path) -> None:
    p = subprocess.Popen([*KSMLAB, "exec", "--merge-any", "--", "memcached", "-u", "root",
                          "-m", "128", "-p", str(MC_PORT), "-l", "127.0.0.1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", MC_PORT), timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("memcached did not start") from None
                time.sleep(0.1)
        load(conn, 20000)
        os.kill(p.pid, signal.SIGSTOP)
        d = validate(p.pid, work / "memcached", "0,1", 10.0, 1000)
        res["program"] = "memcached 128 MiB, 20000 values (ksmlab exec --merge-any)"
        s = summary(d)
        res["program_agreement"] = min(v["agreement"] for v in s.values())
        res["program_runs"] = s
    finally:
        p.kill()
        p.wait()


def load(conn: socket.socket, n: int) -> None:
    f = conn.makefile("rwb")
    dup = b"D" * 4000
    rng = np.random.default_rng(12)
    for i in range(n):
        v = dup if i % 3 == 0 else bytes(4000) if i % 3 == 1 else rng.bytes(4000)
        f.write(b"set k%d 0 0 %d\r\n" % (i, len(v)) + v + b"\r\n")
        if i % 100 == 99:
            f.flush()
            for _ in range(100):
                if f.readline() != b"STORED\r\n":
                    raise SystemExit("memcached refused a value")
    f.flush()
    conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--guest-mib", type=int, default=1024)
    ap.add_argument("--skip-guest", action="store_true")
    args = ap.parse_args()
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"),
                           "kernel": os.uname().release}
    with tempfile.TemporaryDirectory(prefix="ksmlab-real-") as tmp:
        work = Path(tmp)
        if not args.skip_guest:
            guest(res, work, args.guest_mib)
        memcached(res, work)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
