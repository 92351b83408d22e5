"""A process the lab did not start, as a run's workload (``ksmlab validate --pid``).

The lab captures it (live/capture.py) once KSM is unmerged and khugepaged parked,
runs KSM on it, and leaves it running: it is never signalled or stopped.  Its
baseline RSS is what the captured VMAs do not hold, so the run's counters and the
model's run of the image count the same pages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..image import PRESENT, THP, Image
from ..scenario import HPAGE_PMD_NR, PAGE_SIZE, Scenario
from .kernelfs import KernelFS


@dataclass(frozen=True)
class Attach:
    pid: int
    folder: Path  # where the image goes
    scenario: Callable[[Path], Scenario]  # the run's scenario, given the image folder


class _Alive:
    """``poll()`` as subprocess.Popen's, for a process that is not our child."""

    def __init__(self, fs: KernelFS, pid: int) -> None:
        self.fs, self.pid = fs, pid

    def poll(self) -> int | None:
        return None if self.fs.proc_state(self.pid) not in (None, "Z", "X") else 0


class Attached:
    def __init__(self, fs: KernelFS, pid: int, im: Image) -> None:
        self.pid = pid
        self.proc = _Alive(fs, pid)
        [ip] = im.meta.processes
        fl = im.flags[0]
        present = int(((fl & PRESENT) != 0).sum())
        thp_kib = int(((fl[::HPAGE_PMD_NR] & THP) != 0).sum()) * 2048
        status = fs.fields(f"proc/{pid}/status")
        rollup = fs.fields(f"proc/{pid}/smaps_rollup")
        kib = present * PAGE_SIZE // 1024

        def num(d: dict[str, str], key: str) -> float:  # "123 kB"
            return float(d[key].split()[0]) if d.get(key) else 0.0

        self.ready: dict[str, Any] = {
            "regions": [[v.start, v.pages * PAGE_SIZE] for v in ip.vmas],
            "base": {"RssAnon": num(status, "RssAnon") - kib, "Rss": num(status, "VmRSS") - kib,
                     "AnonHugePages": num(rollup, "AnonHugePages") - thp_kib},
        }

    def wait_ready(self) -> dict[str, Any]:
        return self.ready

    def command(self, op: str, **args: Any) -> None:
        raise RuntimeError(f"{op}: a captured process takes no commands")

    def stop(self) -> None:
        """Not ours: left running as it was found."""
