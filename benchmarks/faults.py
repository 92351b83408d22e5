"""Fault injection on the real kernel: every way a live run can be cut short or
misused, end to end, and what it left behind.

Each case starts from the machine as found and checks, after it: every KSM/THP
knob as before (``knobs_left_changed``), no workload process left (``orphans``),
and, where a run finished, its result printed (``results_lost``).  A case that
leaves a knob changed is repaired before the next one (``ksmlab restore``, then
``--to-boot``) and counted.  Root, KSM and THP needed; about a minute; one live
run at a time (the lab's lock).  Usage:

    python benchmarks/faults.py [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ksmlab.live.journal import Journal
from ksmlab.live.kernelfs import KernelFS
from ksmlab.live.knobs import read_all

KSMLAB = [sys.executable, "-m", "ksmlab"]
KSM = Path("/sys/kernel/mm/ksm")
SLOW = """name = "fault"
duration = {duration}
[ksm]
pages_to_scan = 123
sleep_millisecs = 37
use_zero_pages = 1
[[process]]
[[process.region]]
size_mib = 8
"""
BIG = 'name = "big"\nduration = 2\n[[process]]\n[[process.region]]\nsize_mib = 10485760\n'


def knobs() -> dict[str, str]:
    return read_all(KernelFS())


def orphans() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ksmlab.live.workload"], capture_output=True,
                         text=True, check=False).stdout
    return [int(x) for x in out.split()]


def ksmlab(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KSMLAB, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def wait_for(cond: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


class Case:
    """One fault: ``run`` returns (passed, detail, result printed or None if no run
    was meant to finish)."""

    def __init__(self, name: str, run: Callable[[Path], tuple[bool, str, bool | None]]
                 ) -> None:
        self.name, self.run = name, run


def start(folder: Path, duration: float = 60, *extra: str) -> subprocess.Popen[str]:
    f = folder / "fault.toml"
    f.write_text(SLOW.format(duration=duration))
    p = subprocess.Popen([*KSMLAB, "run", str(f), *extra], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    ok = wait_for(lambda: (KSM / "pages_to_scan").read_text().strip() == "123"
                  and bool(orphans()), 30)
    if not ok:
        p.terminate()
        p.wait(60)
        raise RuntimeError("the run did not start")
    return p


def signal_case(sig: signal.Signals) -> Case:
    def run(folder: Path) -> tuple[bool, str, bool | None]:
        p = start(folder)
        p.send_signal(sig)
        p.wait(timeout=60)
        return p.returncode == 128 + sig, f"exit {p.returncode}", None
    return Case(f"{sig.name.lower()}-mid-run", run)


def sigkill_restore(folder: Path) -> tuple[bool, str, bool | None]:
    p = start(folder)
    p.kill()
    p.wait(timeout=10)
    gone = wait_for(lambda: not orphans(), 10)  # PR_SET_PDEATHSIG
    r = ksmlab("restore")
    return gone and r.returncode == 0 and "restored" in r.stdout, r.stdout.strip()[:60], None


def sigkill_damaged_journal(folder: Path) -> tuple[bool, str, bool | None]:
    p = start(folder)
    p.kill()
    p.wait(timeout=10)
    wait_for(lambda: not orphans(), 10)
    Journal().path.write_text('{"pid": 1, "sav')  # half-written
    refused = ksmlab("restore")
    run = ksmlab("run", "seed-uzp1")
    kept = Journal().path.exists()
    to_boot = ksmlab("restore", "--to-boot")
    ok = (refused.returncode == 2 and "damaged" in refused.stderr and run.returncode == 2
          and kept and to_boot.returncode == 0)
    return ok, f"restore {refused.returncode}, run {run.returncode}, --to-boot " \
               f"{to_boot.returncode}", None


def lock_file_deleted(folder: Path) -> tuple[bool, str, bool | None]:
    p = start(folder)
    try:
        (Journal().folder / "lock").unlink(missing_ok=True)
        second = ksmlab("run", "seed-uzp1", timeout=30)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    ok = second.returncode == 2 and "another live run" in second.stderr
    return ok, f"second run exit {second.returncode}", None


def workload_dies(folder: Path) -> tuple[bool, str, bool | None]:
    p = start(folder)
    os.kill(orphans()[0], signal.SIGKILL)  # as the OOM killer would
    _out, err = p.communicate(timeout=60)
    return p.returncode == 2 and "died" in err and "SIGKILL" in err, err.strip()[-60:], None


def knob_by_hand(folder: Path) -> tuple[bool, str, bool | None]:
    before = (KSM / "pages_to_scan").read_text().strip()
    p = start(folder, 4, "--json")
    (KSM / "pages_to_scan").write_text("500")
    out, _err = p.communicate(timeout=60)
    left = (KSM / "pages_to_scan").read_text().strip() == "500"
    (KSM / "pages_to_scan").write_text(before)  # the operator's change, undone by us
    printed = bool(out.strip()) and "caveats" in json.loads(out)
    return p.returncode == 0 and left, "left at 500, caveat", printed


def disk_full(folder: Path) -> tuple[bool, str, bool | None]:
    mnt = folder / "full"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "ksmlab-faults", str(mnt)],
                   check=True)
    try:
        r = ksmlab("run", "seed-uzp1", "--out", str(mnt))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    return r.returncode == 2 and "free" in r.stderr, r.stderr.strip()[-60:], None


def out_not_a_folder(folder: Path) -> tuple[bool, str, bool | None]:
    f = folder / "a-file"
    f.write_text("x")
    r = ksmlab("run", "seed-uzp1", "--out", str(f))
    return r.returncode == 2 and "not a folder" in r.stderr, "refused first", None


def memory_guard(folder: Path) -> tuple[bool, str, bool | None]:
    f = folder / "big.toml"
    f.write_text(BIG)
    t = time.monotonic()
    r = ksmlab("sim", str(f), "-p", "mainline", timeout=60)
    took = time.monotonic() - t
    return r.returncode == 2 and "MemAvailable" in r.stderr, f"refused in {took:.1f} s", None


CASES = [
    *(signal_case(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)),
    Case("sigkill-then-restore", sigkill_restore),
    Case("sigkill-damaged-journal", sigkill_damaged_journal),
    Case("lock-file-deleted", lock_file_deleted),
    Case("workload-oom-killed", workload_dies),
    Case("knob-set-by-hand", knob_by_hand),
    Case("disk-full", disk_full),
    Case("out-not-a-folder", out_not_a_folder),
    Case("model-too-big", memory_guard),
]


def repair(before: dict[str, str]) -> None:
    """Put the machine back after a failed case, whatever it takes."""
    for pid in orphans():
        os.kill(pid, signal.SIGKILL)
    if knobs() != before:
        ksmlab("restore")
    if knobs() != before:
        ksmlab("restore", "--to-boot")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args()
    if os.geteuid() != 0 or not KSM.exists():
        print("faults.py: error: needs root and KSM", file=sys.stderr)
        sys.exit(2)
    rows: list[dict[str, Any]] = []
    for case in CASES:
        before = knobs()
        with tempfile.TemporaryDirectory(prefix="ksmlab-faults-") as d:
            try:
                ok, detail, printed = case.run(Path(d))
            except Exception as e:  # a case that broke is a failed case, never a crash
                ok, detail, printed = False, f"{type(e).__name__}: {e}", None
        wait_for(lambda: not orphans(), 5)
        changed = sorted(k for k, v in knobs().items() if before.get(k) != v)
        left = orphans()
        row = {"case": case.name, "passed": ok and not changed and not left,
               "detail": detail, "knobs_left_changed": changed, "orphans": left,
               "result_lost": printed is False}
        rows.append(row)
        if changed or left:
            repair(before)
        if not args.json:
            print(f"{case.name:<26} {'ok' if row['passed'] else 'FAILED':<6} {detail}"[:80])
    summary = {
        "cases": rows,
        "knobs_left_changed": sum(len(r["knobs_left_changed"]) for r in rows),
        "orphans": sum(len(r["orphans"]) for r in rows),
        "results_lost": sum(bool(r["result_lost"]) for r in rows),
        "passed": all(r["passed"] for r in rows),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{sum(r['passed'] for r in rows)} of {len(rows)} cases passed; knobs left "
              f"changed {summary['knobs_left_changed']}, orphans {summary['orphans']}, "
              f"results lost {summary['results_lost']}")
    sys.exit(0 if summary["passed"] else 1)


if __name__ == "__main__":
    main()
