"""khugepaged's pass, waited for, and ksmd held around an event's kernel work,
against a fake /proc and /sys (every write recorded, the sequence asserted)."""

from __future__ import annotations

import pytest

from ksmlab.live.journal import Journal
from ksmlab.live.knobs import KnobSession
from ksmlab.live.kthread import Khugepaged, find_kthread
from ksmlab.live.run import LiveRun, _Timed
from ksmlab.scenario import KhugepagedWake, Pressure, load

from .conftest import FakeKernel

KSM = "sys/kernel/mm/ksm"
SLEEP = "sys/kernel/mm/transparent_hugepage/khugepaged/scan_sleep_millisecs"


class PassingKernel(FakeKernel):
    """khugepaged (pid 38) sleeps in khugepaged_wait_work(); a write to
    scan_sleep_millisecs wakes it, and it sleeps there again after ``reads``
    more reads of its status (None: never)."""

    def __init__(self, root: object, reads: int | None) -> None:
        super().__init__(root)  # type: ignore[arg-type]
        self.reads = reads
        self.left: int | None = None
        self.switches = 100
        for rel, text in {"proc/38/comm": "khugepaged", "proc/37/comm": "ksmd",
                          "proc/38/wchan": "khugepaged", SLEEP: "86400000",
                          "proc/sys/vm/drop_caches": "0"}.items():
            p = self.path(rel)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
        self._status("S")

    def _status(self, state: str) -> None:
        self.path("proc/38/status").write_text(
            f"Name:\tkhugepaged\nState:\t{state} (x)\nvoluntary_ctxt_switches:\t{self.switches}\n")
        self.path("proc/38/wchan").write_text("khugepaged" if state == "S" else "0")

    def write(self, rel: str, value: str) -> None:
        super().write(rel, value)
        if rel == SLEEP:
            self.left = self.reads
            self._status("R")

    def read(self, rel: str) -> str:
        if rel == "proc/38/status" and self.left is not None:
            if self.left == 0:
                self.switches += 1
                self.left = None
                self._status("S")
            else:
                self.left -= 1
        return super().read(rel)


@pytest.fixture
def kernel(fake: FakeKernel) -> PassingKernel:
    return PassingKernel(fake.root, reads=3)


def test_find_kthread(kernel: PassingKernel) -> None:
    assert find_kthread(kernel, "khugepaged") == 38
    assert find_kthread(kernel, "ksmd") == 37
    assert find_kthread(kernel, "kswapd0") is None


def test_one_pass_wakes_by_rewriting_the_value_and_waits_for_the_sleep(
        kernel: PassingKernel) -> None:
    took = Khugepaged(kernel).one_pass()
    assert took is not None and took >= 0
    assert kernel.writes == [(SLEEP, "86400000")]
    assert kernel.left is None  # the status was read until khugepaged slept again


def test_without_wchan_the_state_decides(kernel: PassingKernel) -> None:
    # tinyconfig guests (no CONFIG_KALLSYMS) have no /proc/PID/wchan
    kernel.path("proc/38/wchan").unlink()
    real = kernel._status
    kernel._status = lambda state: (real(state),  # type: ignore[method-assign]
                                    kernel.path("proc/38/wchan").unlink(missing_ok=True))
    assert Khugepaged(kernel).one_pass(timeout=1.0) is not None
    assert kernel.left is None


def test_one_pass_that_never_ends_times_out(fake: FakeKernel) -> None:
    kernel = PassingKernel(fake.root, reads=None)
    assert Khugepaged(kernel).one_pass(timeout=0.01) is None


def test_no_khugepaged_no_wait(fake: FakeKernel) -> None:
    fake.path(SLEEP).write_text("10000")
    assert Khugepaged(fake).one_pass() is None
    assert fake.writes == [(SLEEP, "10000")]


def _apply(kernel: PassingKernel, event: object, running: bool) -> LiveRun:
    lr = LiveRun(load("pressure-409"), fs=kernel)
    lr.ksm_running = running
    with KnobSession(kernel, Journal()) as ks:
        if running:
            ks.set("ksm/run", 1)
        kernel.writes.clear()
        lr._apply(_Timed(5.0, 2, event), ks, [], 7.5, 2, True)  # type: ignore[arg-type]
        during = list(kernel.writes)
    assert kernel.read(f"{KSM}/run") == "0"  # the session restored it
    kernel.writes[:] = during
    return lr


def test_pressure_holds_ksmd_around_drop_caches(kernel: PassingKernel) -> None:
    lr = _apply(kernel, Pressure(at=5.0, action="pressure"), running=True)
    assert kernel.writes == [(f"{KSM}/run", "0"), ("proc/sys/vm/drop_caches", "3"),
                             (f"{KSM}/run", "1")]
    assert lr.events[-1]["full_scans"] == 2 and lr.events[-1]["ksmd_held_s"] >= 0


def test_khugepaged_pass_holds_ksmd_until_it_sleeps(kernel: PassingKernel) -> None:
    lr = _apply(kernel, KhugepagedWake(at=5.0, action="khugepaged"), running=True)
    assert kernel.writes == [(f"{KSM}/run", "0"), (SLEEP, "86400000"), (f"{KSM}/run", "1")]
    assert kernel.left is None  # run=1 only after khugepaged slept again
    assert lr.events[-1]["khugepaged_pass_s"] is not None
    assert lr.slow_passes == 0


def test_other_processes_thps_at_pressure_are_noted(kernel: PassingKernel) -> None:
    kernel.path("proc/vmstat").write_text("nr_anon_transparent_hugepages 40\n")
    lr = _apply(kernel, Pressure(at=5.0, action="pressure"), running=True)
    assert lr.notes and lr.notes[0].startswith("40 THPs of other processes")


def test_nothing_held_while_ksm_is_not_running(kernel: PassingKernel) -> None:
    lr = _apply(kernel, Pressure(at=5.0, action="pressure"), running=False)
    assert kernel.writes == [("proc/sys/vm/drop_caches", "3")]
    assert "ksmd_held_s" not in lr.events[-1]
