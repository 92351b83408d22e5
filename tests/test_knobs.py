"""Knobs, the restoring session and the journal, against a fake /sys tree.

Every write is recorded (KernelFS.writes) and the exact sequence asserted.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ksmlab.live.journal import Journal, LockBusy, RunLock
from ksmlab.live.kernelfs import KernelWriteError
from ksmlab.live.knobs import (
    KnobError,
    KnobSession,
    RestoreError,
    knob,
    read_all,
    read_knob,
    restore_values,
)
from ksmlab.live.run import restore_journal, scenario_knobs
from ksmlab.scenario import load

from .conftest import FakeKernel

KSM = "sys/kernel/mm/ksm"
THP = "sys/kernel/mm/transparent_hugepage"


def test_parse_bracketed_and_plain(fake: FakeKernel) -> None:
    assert read_knob(fake, "transparent_hugepage/enabled") == "madvise"
    assert read_knob(fake, "transparent_hugepage/hugepages-2048kB/enabled") == "inherit"
    assert read_knob(fake, "ksm/advisor_mode") == "none"
    assert read_knob(fake, "ksm/pages_to_scan") == "100"
    assert "transparent_hugepage/hugepages-2048kB/enabled" in read_all(fake)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ksm/run", 3, "above the maximum 2"),
        ("ksm/max_page_sharing", 1, "below the minimum 2"),
        ("ksm/use_zero_pages", "yes", "not an integer"),
        ("transparent_hugepage/enabled", "sometimes", "not one of always, madvise, never"),
        ("transparent_hugepage/khugepaged/max_ptes_none", 512, "above the maximum 511"),
        ("ksm/nonsense", 1, "not a KSM or THP knob"),
    ],
)
def test_values_refused_before_the_kernel(fake: FakeKernel, name: str, value: object,
                                          message: str) -> None:
    with pytest.raises(KnobError, match=message), KnobSession(fake, Journal()) as s:
        s.set(name, value)
    assert fake.writes == []


def test_session_saves_journals_then_writes_and_restores_in_reverse(fake: FakeKernel) -> None:
    journal = Journal()
    seen_at_first_write: list[object] = []
    real_write = fake.write

    def spy(rel: str, value: str) -> None:
        if not seen_at_first_write:
            seen_at_first_write.append(json.loads(journal.path.read_text())["saved"])
        real_write(rel, value)

    fake.write = spy  # type: ignore[method-assign]
    with KnobSession(fake, journal) as s:
        s.set("ksm/pages_to_scan", 1000)
        s.set("transparent_hugepage/enabled", "always")
        s.set("ksm/sleep_millisecs", 20)  # unchanged: saved, not written
        s.set("ksm/run", 1)
        assert journal.path.exists()
    # the journal held the original before the kernel saw the first change
    assert seen_at_first_write == [[["ksm/pages_to_scan", "100"]]]
    assert fake.writes == [
        (f"{KSM}/pages_to_scan", "1000"),
        (f"{THP}/enabled", "always"),
        (f"{KSM}/run", "1"),
        # restore: reverse order, run last
        (f"{THP}/enabled", "madvise"),
        (f"{KSM}/pages_to_scan", "100"),
        (f"{KSM}/run", "0"),
    ]
    assert not journal.path.exists()


def test_busy_knobs_restored_after_unmerge(fake: FakeKernel) -> None:
    with KnobSession(fake, Journal()) as s:
        s.set("ksm/run", 2)
        s.set("ksm/max_page_sharing", 16)
        s.set("ksm/run", 1)
        fake.path(f"{KSM}/pages_shared").write_text("7")  # KSM merged something
    assert fake.writes == [
        (f"{KSM}/run", "2"),
        (f"{KSM}/max_page_sharing", "16"),
        (f"{KSM}/run", "1"),
        (f"{KSM}/run", "2"),  # unmerge first, or max_page_sharing is EBUSY
        (f"{KSM}/max_page_sharing", "256"),
        (f"{KSM}/run", "0"),
    ]
    assert fake.value(f"{KSM}/max_page_sharing") == "256"


def test_restored_on_exception(fake: FakeKernel) -> None:
    with pytest.raises(RuntimeError, match="boom"), KnobSession(fake, Journal()) as s:
        s.set("ksm/use_zero_pages", 1)
        raise RuntimeError("boom")
    assert fake.value(f"{KSM}/use_zero_pages") == "0"


def test_kernel_refusal_surfaces_at_the_write_and_everything_is_restored(
        fake: FakeKernel) -> None:
    fake.path(f"{KSM}/pages_shared").write_text("3")
    with pytest.raises(KernelWriteError, match="Device or resource busy"), \
            KnobSession(fake, Journal()) as s:
        s.set("ksm/pages_to_scan", 500)
        s.set("ksm/max_page_sharing", 8)  # EBUSY: pages are shared
    assert fake.value(f"{KSM}/pages_to_scan") == "100"
    assert fake.value(f"{KSM}/max_page_sharing") == "256"


def test_advisor_mode_also_saves_pages_to_scan(fake: FakeKernel) -> None:
    with KnobSession(fake, Journal()) as s:
        s.set("ksm/advisor_mode", "scan-time")
        fake.path(f"{KSM}/pages_to_scan").write_text("500")  # advisor_mode_store() does this
    assert fake.value(f"{KSM}/advisor_mode") == "none"
    assert fake.value(f"{KSM}/pages_to_scan") == "100"


def test_restore_failure_keeps_the_journal(fake: FakeKernel) -> None:
    journal = Journal()
    s = KnobSession(fake, journal)
    s.set("ksm/pages_to_scan", 7)
    s.set("ksm/use_zero_pages", 1)
    fake.refuse[f"{KSM}/pages_to_scan"] = errno.EIO
    with pytest.raises(RestoreError, match="journal kept"):
        s.restore()
    assert fake.value(f"{KSM}/use_zero_pages") == "0"  # the others are still put back
    assert journal.read() is not None


def test_scenario_knob_order_starts_with_unmerge() -> None:
    order = [n for n, _ in scenario_knobs(load("seed-uzp1"))]
    assert order[0] == "ksm/run"
    assert order.index("ksm/max_page_sharing") > 0
    assert dict(scenario_knobs(load("seed-uzp1")))["ksm/use_zero_pages"] == 1


def test_lock_refuses_a_second_run(tmp_path: Path) -> None:
    a, b = RunLock(tmp_path), RunLock(tmp_path)
    a.acquire()
    try:
        assert b.holder() == os.getpid()
        with pytest.raises(LockBusy, match="another live run"):
            b.acquire()
    finally:
        a.release()
    assert b.holder() is None


def test_journal_of_another_boot_is_ignored(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.write([("ksm/run", "0")])
    data = json.loads(j.path.read_text())
    data["boot_id"] = "not-this-boot"
    j.path.write_text(json.dumps(data))
    assert j.read() is None


def test_restore_values_order_without_run(fake: FakeKernel) -> None:
    fake.path(f"{KSM}/merge_across_nodes").write_text("0")
    fake.path(f"{KSM}/run").write_text("1")
    failures = restore_values(fake, [("ksm/merge_across_nodes", "1")])
    assert failures == []
    assert fake.writes == [
        (f"{KSM}/run", "2"),
        (f"{KSM}/merge_across_nodes", "1"),
        (f"{KSM}/run", "1"),  # run was not saved: put back what it was
    ]


_CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from conftest import FakeKernel
    from ksmlab.live.journal import Journal
    from ksmlab.live.knobs import KnobSession
    from ksmlab.live.run import _terminate_unwinds
    fs = FakeKernel({root!r})
    with _terminate_unwinds(), KnobSession(fs, Journal()) as s:
        s.set("ksm/pages_to_scan", 1234)
        s.set("ksm/use_zero_pages", 1)
        s.set("ksm/run", 1)
        print("set", flush=True)
        time.sleep(60)
""")


def _start_child(fake: FakeKernel) -> subprocess.Popen[str]:
    code = _CHILD.format(tests=str(Path(__file__).parent), root=str(fake.root))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env=os.environ.copy())
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "set"
    assert fake.value(f"{KSM}/pages_to_scan") == "1234"
    return p


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_restores(fake: FakeKernel, sig: signal.Signals) -> None:
    p = _start_child(fake)
    p.send_signal(sig)
    p.wait(timeout=60)
    assert p.returncode != 0
    assert fake.value(f"{KSM}/pages_to_scan") == "100"
    assert fake.value(f"{KSM}/use_zero_pages") == "0"
    assert fake.value(f"{KSM}/run") == "0"
    assert Journal().read() is None


def test_sigkill_leaves_a_journal_that_restore_undoes(fake: FakeKernel) -> None:
    p = _start_child(fake)
    p.kill()
    p.wait(timeout=60)
    time.sleep(0.05)
    assert fake.value(f"{KSM}/run") == "1"  # left changed ...
    rec = Journal().read()
    assert rec is not None and rec.pid == p.pid
    saved = restore_journal(fake, Journal(), RunLock())  # ... until restore
    assert dict(saved) == {"ksm/pages_to_scan": "100", "ksm/use_zero_pages": "0",
                           "ksm/run": "0"}
    assert fake.value(f"{KSM}/pages_to_scan") == "100"
    assert fake.value(f"{KSM}/use_zero_pages") == "0"
    assert fake.value(f"{KSM}/run") == "0"
    assert Journal().read() is None


def test_per_size_knob_names() -> None:
    assert knob("transparent_hugepage/hugepages-64kB/enabled").check("inherit") == "inherit"
    with pytest.raises(KnobError):
        knob("transparent_hugepage/hugepages-64kB/defrag")


def test_advisor_scenario_writes_limits_then_mode_and_restores(fake: FakeKernel) -> None:
    """advisor_mode none first (pages_to_scan is writable only then), the advisor_*
    limits, advisor_mode scan-time last: its switch sets pages_to_scan to
    advisor_min_pages_to_scan, the scenario's value.  The advisor's own changes of
    pages_to_scan are not someone else's: the restore puts everything back."""
    sc = load("advisor-healthy")
    s = KnobSession(fake, Journal())
    with s:
        for name, value in scenario_knobs(sc):
            if fake.exists(knob(name).rel):  # the fake tree has not every THP knob
                s.set(name, value)
        assert fake.value(f"{KSM}/advisor_mode") == "scan-time"
        assert fake.value(f"{KSM}/pages_to_scan") == "500" == str(sc.ksm.pages_to_scan)
        assert fake.value(f"{KSM}/advisor_target_scan_time") == "2"
        fake.path(f"{KSM}/pages_to_scan").write_text("2000\n")  # scan_time_advisor()
        setup = [w for w in fake.writes if w[0].startswith(KSM)]
        fake.writes.clear()
    assert setup == [
        (f"{KSM}/run", "2"),
        (f"{KSM}/pages_to_scan", "500"),
        (f"{KSM}/advisor_max_pages_to_scan", "2000"),
        (f"{KSM}/advisor_target_scan_time", "2"),
        (f"{KSM}/advisor_mode", "scan-time"),
    ]
    assert [w for w in fake.writes if w[0].startswith(KSM)] == [
        (f"{KSM}/advisor_target_scan_time", "200"),
        (f"{KSM}/advisor_max_pages_to_scan", "30000"),
        (f"{KSM}/advisor_mode", "none"),  # before pages_to_scan: else EINVAL
        (f"{KSM}/pages_to_scan", "100"),
        (f"{KSM}/run", "0"),
    ]
    assert s.left == []
    assert read_all(fake)["ksm/pages_to_scan"] == "100"


def test_pages_to_scan_is_refused_while_the_advisor_is_on(fake: FakeKernel) -> None:
    with pytest.raises(KernelWriteError, match="Invalid argument"), \
            KnobSession(fake, Journal()) as s:
        s.set("ksm/advisor_mode", "scan-time")
        s.set("ksm/pages_to_scan", 1000)  # pages_to_scan_store(): EINVAL
    assert fake.value(f"{KSM}/advisor_mode") == "none"
    assert fake.value(f"{KSM}/pages_to_scan") == "100"


def test_a_scenario_without_the_advisor_leaves_its_mode_alone(fake: FakeKernel) -> None:
    knobs = scenario_knobs(load("seed-uzp1"))
    assert knobs[1] == ("ksm/advisor_mode", "none") and knobs[-1][0] != "ksm/advisor_mode"
    assert [n for n, _ in knobs].count("ksm/advisor_mode") == 2
    with KnobSession(fake, Journal()) as s:
        for name, value in knobs:
            if fake.exists(knob(name).rel):
                s.set(name, value)
    assert not any(w[0].endswith("advisor_mode") for w in fake.writes)


def test_a_kernel_without_the_advisor(fake: FakeKernel) -> None:
    """6.1 (the guest lab's old kernel) has no advisor: its knobs are skipped with one
    note, and a scenario with the advisor on is refused before anything is touched."""
    from ksmlab.live.run import problems

    for name in ("mode", "max_cpu", "min_pages_to_scan", "max_pages_to_scan",
                 "target_scan_time"):
        fake.path(f"{KSM}/advisor_{name}").unlink()
    assert any("advisor_mode scan-time, which this kernel has not (the advisor: Linux 6.8+)"
               in p for p in problems(fake, load("advisor-healthy")))
    assert not any("advisor" in p for p in problems(fake, load("seed-uzp1")))
