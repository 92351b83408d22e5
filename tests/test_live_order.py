"""Workload processes register with KSM in the scenario's order (issue 11)."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from ksmlab.live.run import start_in_order
from ksmlab.model.costs import DEFAULT_PROFILE
from ksmlab.model.run import Simulation
from ksmlab.scenario import Scenario, load


class FakeWorkload:
    """Records when each process starts and when the lab waits for it."""

    log: ClassVar[list[str]] = []

    def __init__(self, sc: Scenario, process: int, replica: int, fill_now: bool) -> None:
        self.name = f"{sc.process[process].name}.{replica}"
        self.log.append(f"start {self.name}")

    def wait_ready(self) -> dict[str, Any]:
        self.log.append(f"ready {self.name}")
        return {"base": {"RssAnon": 10, "Rss": 20}}


def test_each_process_is_ready_before_the_next_starts() -> None:
    sc = load("three-procs-uzp0")
    FakeWorkload.log = []
    started: list[Any] = []
    base = start_in_order(sc, started, FakeWorkload)
    names = ["thp-dup.0", "thp-unique.0", "small-pages.0"]
    assert FakeWorkload.log == [f"{what} {n}" for n in names for what in ("start", "ready")]
    assert [w.name for w in started] == names
    assert base == {"RssAnon": 30.0, "Rss": 60.0}


def test_a_failing_process_leaves_the_started_ones_to_stop() -> None:
    class Dies(FakeWorkload):
        def wait_ready(self) -> dict[str, Any]:
            if self.name == "thp-unique.0":
                raise RuntimeError("workload died")
            return super().wait_ready()

    started: list[Any] = []
    with pytest.raises(RuntimeError, match="workload died"):
        start_in_order(load("three-procs-uzp0"), started, Dies)
    # the caller's finally stops both; the third was never started
    assert [w.name for w in started] == ["thp-dup.0", "thp-unique.0"]


def test_the_model_registers_them_in_the_same_order() -> None:
    sim = Simulation(load("three-procs-uzp0"), "mainline", DEFAULT_PROFILE)
    assert [mm.name for mm in sim.ksm.slots] == ["thp-dup.0", "thp-unique.0", "small-pages.0"]


def test_an_mm_entering_mid_scan_goes_behind_the_cursor() -> None:
    """__ksm_enter(): list_add_tail() before ksm_scan.mm_slot, so an mm that
    registers while ksmd is inside another is first scanned in the next full scan."""
    from ksmlab.model.memory import Mm

    from .model_helpers import unique, world

    w = world(unique(1024), thp=False, pages_to_scan=100)
    w.ksm.do_scan()  # one batch: the cursor is inside the first mm
    assert w.ksm.cur_slot == 0
    late = Mm(2, "late")
    w.sys.mms.append(late)
    w.ksm.enter(late)
    assert [m.name for m in w.ksm.slots] == ["late", "test"]
    assert w.ksm.slots[w.ksm.cur_slot].name == "test"  # the cursor stays where it was


def test_ksmd_is_held_first_thing_at_a_full_scan_end_with_events_due(tmp_path: Any) -> None:
    """ksmd sleeps sleep_millisecs (20 ms) after the batch that ends a full scan.  The
    lab writes run=0 before the checkpoint sample and the events, or a slower machine
    lets ksmd run a batch of the next scan first (it split the THP the shrinker was to
    split: pressure-409 failed CI twice so).  The exact sequence, as damo's tests do."""
    from ksmlab.live.kernelfs import KernelFS
    from ksmlab.live.run import LiveRun

    log: list[str] = []

    class Fs(KernelFS):
        def write(self, rel: str, value: str) -> None:
            log.append(f"write {rel}={value}")
            super().write(rel, value)

    class Ks:
        saved: ClassVar[list[tuple[str, str]]] = []
        wrote: ClassVar[dict[str, list[str]]] = {}

        def set(self, name: str, value: object) -> None:
            log.append(f"set {name}={value}")

        def expect(self, name: str, value: object) -> None:
            log.append(f"expect {name}={value}")

    class Sampler:
        scans = iter([0, 0, 0, 1])

        def full_scans(self) -> int:
            return next(self.scans, 1)

        def vmstat(self) -> dict[str, float]:
            return {}

        def pages_scanned(self) -> int:
            log.append("read pages_scanned")
            return 100

        def sample(self, t: float, boundary: bool = False) -> dict[str, float]:
            if boundary:
                log.append("checkpoint sample")
            return {"t": t}

    for d in ("proc/sys/vm", "sys/kernel/mm/ksm"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "proc/sys/vm/drop_caches").touch()
    sc = Scenario.model_validate({
        "name": "hold", "duration": 0.2, "sample_interval": 0.1,
        "process": [{"region": [{"size_mib": 2, "content": {"zero": 1.0}}]}],
        "event": [{"at": 0.0, "action": "pressure"}]})
    run = LiveRun(sc, fs=Fs(tmp_path))
    run._loop(Ks(), Sampler(), [])  # type: ignore[arg-type]
    assert log == ["expect ksm/run=0", "set ksm/run=1",
                   "read pages_scanned", "set ksm/run=0", "read pages_scanned",
                   "checkpoint sample", "write proc/sys/vm/drop_caches=3", "set ksm/run=1"]
    [pressure] = [e for e in run.events if e["action"] == "pressure"]
    assert pressure["aligned"] and pressure["full_scans"] == 1
    assert pressure["ksmd_ran_pages"] == 0 and pressure["ksmd_held_s"] >= 0
