"""The kselftest ``ksm_thp_split`` on the running kernel, under the live lab's rules.

The binary sets and restores its own knobs (also on SIGINT/SIGTERM/SIGHUP),
but a SIGKILL would leave them changed; so, as for a live run, ksmlab holds
the run lock, journals every knob the binary may write before it starts
(:meth:`KnobSession.expect`), and puts back whatever it left changed.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from ..kernel.selftest import SelftestResult, result_from
from .features import release
from .journal import Journal, LockBusy, RunLock
from .kernelfs import KernelFS
from .knobs import KnobSession
from .run import LiveError, crashed_without_journal, restore_journal

TIMEOUT_S = 420.0  # the binary's own alarm is 360 s
# every knob the binary may write, with every value it may write (ksm_thp_split.c)
WRITES: list[tuple[str, list[object]]] = [
    ("ksm/run", [0, 1]),
    ("ksm/advisor_mode", ["none"]),
    ("ksm/pages_to_scan", [100]),
    ("ksm/sleep_millisecs", [20]),
    ("ksm/use_zero_pages", [1, 0]),
    ("transparent_hugepage/enabled", ["madvise"]),
]


def run_on_host(binary: Path, fs: KernelFS | None = None) -> SelftestResult:
    """Run the compiled selftest here; LiveError when another live run holds the lock."""
    fs = fs or KernelFS()
    lock = RunLock()
    try:
        lock.acquire()
    except LockBusy as e:
        raise LiveError(str(e)) from None
    try:
        journal = Journal()
        restore_journal(fs, journal, lock)
        crashed_without_journal(fs)
        with KnobSession(fs, journal) as ks:
            for name, values in WRITES:
                if not fs.exists(f"sys/kernel/mm/{name}"):
                    continue
                for v in values:
                    ks.expect(name, v)
            t0 = time.monotonic()
            try:
                r = subprocess.run([str(binary)], capture_output=True, text=True,
                                   timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired as e:
                raise LiveError(f"{binary.name} did not finish in {TIMEOUT_S:.0f} s") from e
            seconds = time.monotonic() - t0
        rel = release(fs)
        return result_from(r.stdout, r.returncode, "host", rel, seconds)
    finally:
        lock.release()
