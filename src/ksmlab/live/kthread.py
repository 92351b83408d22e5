"""Kernel threads the lab waits on: find them, and tell when khugepaged's pass ends.

khugepaged runs at nice 19 on a machine with two CPUs: a pass the lab wakes right
after a full-scan end can outlast ksmd's sleep, and then ksmd scans the range while
khugepaged collapses it.  The model has each pass whole between two ksmd batches,
so the lab waits for the pass to end (and holds ksmd meanwhile, see run.py).

A pass has ended when khugepaged sleeps again in khugepaged_wait_work(), which is
inlined in khugepaged() (mm/khugepaged.c): its voluntary context switches went up
since the wake, its state is S and its wchan is ``khugepaged``.  A pass that
sleeps elsewhere on the way (direct compaction, a lock) shows another wchan.
"""

from __future__ import annotations

import time

from .kernelfs import KernelFS, KernelReader
from .knobs import THP

PASS_TIMEOUT_S = 5.0
POLL_S = 0.0005


def find_kthread(fs: KernelReader, comm: str) -> int | None:
    for d in fs.listdir("proc"):
        if d.isdigit() and fs.read_or_none(f"proc/{d}/comm") == comm:
            return int(d)
    return None


def _status(fs: KernelFS, pid: int) -> tuple[str, int] | None:
    """(state letter, voluntary_ctxt_switches) of ``pid``."""
    text = fs.read_or_none(f"proc/{pid}/status")
    if text is None:
        return None
    state, switches = "", -1
    for line in text.splitlines():
        if line.startswith("State:"):
            state = line.split()[1]
        elif line.startswith("voluntary_ctxt_switches:"):
            switches = int(line.split()[1])
    return state, switches


class Khugepaged:
    """Wakes khugepaged for one pass and waits for the pass to end."""

    def __init__(self, fs: KernelFS) -> None:
        self.fs = fs
        self.pid = find_kthread(fs, "khugepaged")

    def wake(self) -> None:
        """scan_sleep_millisecs_store() (mm/khugepaged.c) sets khugepaged_sleep_expire
        to 0 and wakes khugepaged even when the value is unchanged: it scans now and
        then every scan_sleep_millisecs.  The value was saved by the knob session."""
        name = f"{THP}/khugepaged/scan_sleep_millisecs"
        self.fs.write(name, self.fs.read(name))

    def _waiting(self, state: str) -> bool:
        """Asleep in khugepaged() itself.  /proc/PID/wchan exists only with
        CONFIG_KALLSYMS (not in the kernel lab's tinyconfig guests): without it
        the state is all there is to go by."""
        wchan = self.fs.read_or_none(f"proc/{self.pid}/wchan")
        return state == "S" and wchan in (None, "khugepaged")

    def asleep_after(self, switches: int) -> bool:
        st = _status(self.fs, self.pid) if self.pid is not None else None
        if st is None:
            return True  # no such thread to wait for
        state, now = st
        return now > switches and self._waiting(state)

    def settle(self, timeout: float = PASS_TIMEOUT_S) -> int | None:
        """Wait until khugepaged sleeps in khugepaged() again; its voluntary context
        switches then (None: not to be seen, or still busy after ``timeout``)."""
        if self.pid is None:
            return None
        t0 = time.monotonic()
        while True:
            st = _status(self.fs, self.pid)
            if st is None:
                return None
            if self._waiting(st[0]):
                return st[1]
            if time.monotonic() - t0 > timeout:
                return None
            time.sleep(POLL_S)

    def one_pass(self, timeout: float = PASS_TIMEOUT_S) -> float | None:
        """Wake khugepaged and wait until its pass has ended: the seconds it took,
        or None when it had not ended after ``timeout`` (or is not to be seen)."""
        st = _status(self.fs, self.pid) if self.pid is not None else None
        self.wake()
        if st is None:
            return None
        t0 = time.monotonic()
        while not self.asleep_after(st[1]):
            if time.monotonic() - t0 > timeout:
                return None
            time.sleep(POLL_S)
        return time.monotonic() - t0
