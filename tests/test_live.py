"""Live tests on the running kernel (root + KSM).

Skipped with the reason where they cannot run; under KSMLAB_REQUIRE_LIVE=1 they
fail instead.  One live run at a time (the run lock enforces it anyway).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ksmlab.live.journal import Journal
from ksmlab.live.kernelfs import KernelFS
from ksmlab.live.knobs import read_all
from ksmlab.scenario import Scenario
from ksmlab.trace import Trace

from .conftest import end_run, run_ksmlab, workload_pids
from .test_live_tracefs import ksm_events_unavailable

pytestmark = pytest.mark.live
KSMLAB = [sys.executable, "-m", "ksmlab"]
KSM = Path("/sys/kernel/mm/ksm")


def run_json(*args: str) -> tuple[dict[str, object], float]:
    t0 = time.monotonic()
    r = run_ksmlab(["run", *args, "--json"], timeout=180)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), time.monotonic() - t0


def test_seed_uzp1_bypasses_the_rate_limit() -> None:
    before = read_all(KernelFS())
    d, took = run_json("seed-uzp1")
    assert d["verdicts"] == ["rate-limit-bypass"], d
    assert float(d["budget_ratio_peak"]) > 10  # type: ignore[arg-type]
    assert float(d["ksm_accounted_mib"]) < 1  # type: ignore[arg-type]
    assert float(d["freed_mib"]) > 120  # type: ignore[arg-type]
    assert d["thp_split_page"] == 64
    assert took < 60
    assert read_all(KernelFS()) == before


def test_seed_uzp0_merge_collapses() -> None:
    d, took = run_json("seed-uzp0")
    assert d["verdicts"] == ["merge-collapse"], d
    assert float(d["ksm_accounted_mib"]) == 0  # type: ignore[arg-type]
    # the same-THP pair: every split preceded by a failed one (live-findings.md)
    assert d["thp_split_page"] == d["thp_split_page_failed"]
    assert took < 60


@pytest.mark.parametrize("name", ["seed-uzp1-nothp", "seed-uzp0-nothp"])
def test_nohugepage_baselines_show_neither(name: str) -> None:
    d, took = run_json(name)
    assert d["verdicts"] == [], d
    assert float(d["ksm_accounted_mib"]) > 120  # type: ignore[arg-type]
    assert d["thp_split_page"] == 0
    assert took < 60


SLOW = """
name = "kill-me"
duration = 60
[ksm]
pages_to_scan = 123
sleep_millisecs = 37
use_zero_pages = 1
max_page_sharing = 64
[[process]]
[[process.region]]
size_mib = 8
"""


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_slow(tmp_path: Path) -> subprocess.Popen[str]:
    f = tmp_path / "kill-me.toml"
    f.write_text(SLOW)
    p = subprocess.Popen([*KSMLAB, "run", str(f)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (KSM / "run").read_text().strip() == "1" and bool(workload_pids()), 30,
             "the run to start KSM and its workload")
    assert (KSM / "pages_to_scan").read_text().strip() == "123"
    return p


def test_sigkill_then_restore(tmp_path: Path) -> None:
    before = read_all(KernelFS())
    p = start_slow(tmp_path)
    p.kill()
    p.wait(timeout=10)
    # the workload dies with its parent (PR_SET_PDEATHSIG)
    wait_for(lambda: not workload_pids(), 5, "the workload to die with its parent")
    assert (KSM / "pages_to_scan").read_text().strip() == "123"  # left changed
    assert Journal().read() is not None
    doc = subprocess.run([*KSMLAB, "doctor"], capture_output=True, text=True, check=False)
    assert "killed run" in doc.stderr  # the next invocation notices
    r = subprocess.run([*KSMLAB, "restore"], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert "restored" in r.stdout
    assert read_all(KernelFS()) == before
    assert Journal().read() is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_the_run_and_restores(tmp_path: Path, sig: signal.Signals) -> None:
    before = read_all(KernelFS())
    p = start_slow(tmp_path)
    end_run(p, sig)
    assert p.returncode == 128 + sig, p.stderr.read() if p.stderr else ""
    assert read_all(KernelFS()) == before
    assert not workload_pids()
    assert Journal().read() is None


def test_a_workload_killed_mid_run_ends_it(tmp_path: Path) -> None:
    # issue 16 item 4: an OOM-killed workload went unnoticed (exit 0, a false verdict)
    before = read_all(KernelFS())
    p = start_slow(tmp_path)
    os.kill(workload_pids()[0], signal.SIGKILL)
    _out, errs = p.communicate(timeout=60)
    assert p.returncode == 2, errs
    assert "died at" in errs and "SIGKILL" in errs and "knobs restored" in errs
    assert read_all(KernelFS()) == before
    assert not workload_pids()
    assert Journal().read() is None


def test_a_knob_changed_by_hand_mid_run_is_noted_and_left(tmp_path: Path) -> None:
    # issue 16 item 2: the run reported the scenario's budget and then set 100 back
    before = read_all(KernelFS())
    f = tmp_path / "by-hand.toml"
    f.write_text(SLOW.replace("duration = 60", "duration = 5"))
    p = subprocess.Popen([*KSMLAB, "run", str(f), "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (KSM / "pages_to_scan").read_text().strip() == "123"
                 and bool(workload_pids()), 30, "the run to set its knobs")
        (KSM / "pages_to_scan").write_text("500")  # an operator, by hand
        out, errs = p.communicate(timeout=60)
        assert p.returncode == 0, errs
        d = json.loads(out)
        assert any("ksm/pages_to_scan was set to 500 by someone else" in n
                   for n in d["notes"]), d["notes"]
        assert any("left as it is" in n for n in d["notes"]), d["notes"]
        assert d["caveats"], d
        assert (KSM / "pages_to_scan").read_text().strip() == "500"  # theirs, kept
    finally:
        if p.poll() is None:
            end_run(p)
        (KSM / "pages_to_scan").write_text(before["ksm/pages_to_scan"])  # ours to undo
    assert read_all(KernelFS()) == before


def test_second_live_run_is_refused(tmp_path: Path) -> None:
    p = start_slow(tmp_path)
    try:
        r = run_ksmlab(["run", "seed-uzp1"], timeout=30)
        assert r.returncode == 2
        assert "another live run" in r.stderr
    finally:
        end_run(p)


def test_value_the_kernel_refuses(tmp_path: Path) -> None:
    # max_page_sharing_store() answers EBUSY while KSM pages exist: the schema cannot
    # know whether pages will exist.  The run used to end at the write, its samples
    # lost (issue 16 item 7); now, as the kernel keeps the old value and goes on, the
    # run goes on too, records the refusal, and the model refuses the same set.
    from ksmlab import fidelity
    from ksmlab.model import simulate

    f = tmp_path / "refused.toml"
    f.write_text(SLOW.replace("use_zero_pages = 1", "use_zero_pages = 0")
                 .replace("duration = 60", "duration = 6")
                 .replace("[[process.region]]", '[[process.region]]\nthp = "nohugepage"')
                 + '[[event]]\nat = 4.0\naction = "set"\nknob = "ksm.max_page_sharing"\n'
                 + "value = 32\n")
    before = read_all(KernelFS())
    r = run_ksmlab(["run", str(f), "--json", "--out", str(tmp_path)], timeout=120)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert any("refused '32' for /sys/kernel/mm/ksm/max_page_sharing: Device or resource "
               "busy at" in n for n in d["notes"]), d["notes"]
    tr = Trace.load(Path(d["files"]["trace"]))
    [ev] = [e for e in tr.events if e["action"] == "set"]
    assert ev["refused"] == "Device or resource busy"
    assert read_all(KernelFS()) == before
    assert not workload_pids()
    # the model keeps max_page_sharing too: the same counters at every full-scan end
    sc = Scenario.model_validate(tr.meta["scenario"])
    fit = fidelity.compare("refused", tr, simulate(sc, "mainline", **fidelity.replay(tr)))
    assert fit.checkpoints > 0 and fit.agreement == 1.0, fit


def _why(s: dict[str, Any]) -> str:
    """A failed scenario in a few lines: the counters that differ, where first, the
    event streams' first divergence and the notes (the whole dict is cut by pytest)."""
    off = {c: (v["exact_share"], v["worst_checkpoint"]) for c, v in s["counters"].items()
           if v["exact_share"] < 1.0}
    return (f"{s['name']}: agreement {s['agreement']:.3f}; counters off (share exact, "
            f"worst full scan): {off}; events: {(s.get('events') or {}).get('first_divergence')}"
            f"; notes: {s['notes']}")


def test_model_follows_the_kernel_on_the_ci_subset(tmp_path: Path) -> None:
    """Issue 11: counters and verdicts exactly, as on any machine; ksmd CPU and
    full-scan times only against a profile fitted in this same run, on this machine,
    on scenarios disjoint from those judged (fit on one set, judge another)."""
    from ksmlab import fidelity
    from ksmlab.live import machine
    from ksmlab.profiles import machine_path

    assert not set(fidelity.CALIBRATION_SET) & set(fidelity.CI_SUBSET)
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "KSMLAB_PROFILE": ""}
    r = run_ksmlab(["calibrate", "--quick"], timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    mine = machine_path(machine.key(machine.identity())).name
    assert (tmp_path / "cache" / "ksmlab" / "profiles" / mine).exists(), r.stdout
    fitted = json.loads((tmp_path / "cache" / "ksmlab" / "profiles" / mine).read_text())
    assert sorted(fitted["scenarios"]) == sorted(fidelity.CALIBRATION_SET)

    out = tmp_path / "val"
    r = run_ksmlab(["validate", *fidelity.CI_SUBSET, "--json", "--out", str(out)],
                   timeout=900, env=env)
    # 1: a scenario missed a per-scenario target (said on stderr); judged below
    assert r.returncode in (0, 1), r.stderr
    d = json.loads(r.stdout)
    assert d["profile"]["source"] == "machine" and d["profile"]["warning"] is None, d["profile"]
    by_name = {s["name"]: s for s in d["scenarios"]}
    assert set(by_name) == set(fidelity.CI_SUBSET)
    # the lab held ksmd in time at every full-scan end with events due (an event
    # after a batch of the next scan is what failed pressure-409 on a slower machine)
    for f in sorted(out.glob("*.kernel.trace.json.gz")):
        late = [e for e in Trace.load(f).events if e.get("ksmd_ran_pages")]
        assert not late, (f.name, late)
    assert d["verdicts_agree"], d
    for s in d["scenarios"]:
        # machine-independent: every counter at every full-scan end, and the verdicts
        assert s["agreement"] >= fidelity.EXACT_TARGET, _why(s)
        assert s["max_rel_diff"] <= fidelity.REL_TARGET, s
        assert s["verdicts_agree"] is not False, s
        # this machine's costs, fitted above on other scenarios.  One run's ksmd CPU
        # moves from the next by up to a third on these VMs, so each scenario is held
        # to twice the target and their sum to the target (suite_cpu_rel_err())
        assert s["time_rel_err"] <= 2 * fidelity.TIME_TARGET, s
        assert s["cpu_rel_err"] <= 2 * fidelity.CPU_TARGET, s
    assert d["cpu_rel_err_total"] <= fidelity.CPU_TARGET, d["cpu_rel_err_total"]
    times = [s["time_rel_err"] for s in d["scenarios"]]
    assert sum(times) / len(times) <= fidelity.TIME_TARGET, times
    # the thread's two claims, in the kernel and in the model of the same run
    assert by_name["seed-uzp1"]["verdicts"] == {"kernel": ["rate-limit-bypass"],
                                                "model": ["rate-limit-bypass"]}
    assert by_name["uzp0-1000"]["verdicts"] == {"kernel": ["merge-collapse"],
                                                "model": ["merge-collapse"]}
    # three processes of three kinds, registered in the scenario's order: exact
    assert by_name["three-procs-uzp0"]["agreement"] == 1.0, by_name["three-procs-uzp0"]
    assert (out / "seed-uzp1.validate.png").exists()
    # the kernel's side of the races the lab controls: ksmd held around drop_caches,
    # each khugepaged pass waited for, and the set-up pass recorded for the replay
    p409 = Trace.load(out / "pressure-409.kernel.trace.json.gz")
    pressure = [e for e in p409.events if e["action"] == "pressure"]
    assert len(pressure) == 1 and pressure[0]["aligned"] and pressure[0]["ksmd_held_s"] > 0
    kh = Trace.load(out / "khugepaged-recollapse.kernel.trace.json.gz")
    assert kh.meta["khugepaged_enter_passes"] in (0, 1)
    passes = [e for e in kh.events if e["action"] == "khugepaged"]
    assert len(passes) >= 5 and all(e["khugepaged_pass_s"] is not None for e in passes)
    # the finer judge: KSM's own tracepoints, merge by merge (page, partner, full scan)
    if ksm_events_unavailable() is not None:
        return  # a kernel without KSM's tracepoints (6.12+): counters are the judge
    streams = [s["events"] for s in d["scenarios"] if s.get("events")]
    assert len(streams) == len(d["scenarios"]), "validate recorded no kernel event stream"
    for s in d["scenarios"]:
        ev = s["events"]
        assert ev["merges_kernel"] == ev["merges_model"], (s["name"], ev)
        assert ev["identical_share"] >= 0.99, (s["name"], ev)
        assert ev["attempts_identical_share"] >= 0.99, (s["name"], ev)
    assert by_name["three-procs-uzp0"]["events"]["merges_kernel"] > 1000


def test_multi_size_thp_counters_follow_the_kernel(tmp_path: Path) -> None:
    """64 KiB folios alone and beside PMD THPs (issue 13): every counter, the per-size
    splits included, at every full-scan end, and the verdicts.  Counters only: the
    profile's costs were fitted on PMD THPs."""
    names = ["mthp-64k-uzp1", "mthp-mixed-uzp1"]
    before = read_all(KernelFS())
    r = run_ksmlab(["validate", *names, "--json", "--out", str(tmp_path)], timeout=600)
    assert r.returncode in (0, 1), r.stderr
    d = json.loads(r.stdout)
    assert read_all(KernelFS()) == before  # per-size knobs back as they were
    by_name = {s["name"]: s for s in d["scenarios"]}
    for name in names:
        s = by_name[name]
        assert s["agreement"] >= 0.99 and s["verdicts_agree"] is not False, _why(s)
        assert s["verdicts"]["kernel"] == ["rate-limit-bypass"], s["verdicts"]
    k = Trace.load(tmp_path / "mthp-64k-uzp1.kernel.trace.json.gz")
    # each of the 1024 folios split once by KSM; none of it by KSM's account
    assert k.since_start("hugepages-64kB/split")[-1] == 1024
    assert k.since_start("thp_split_page")[-1] == 0 and k["pages_sharing"][-1] == 0


def test_the_advisor_decides_as_the_models_arithmetic(tmp_path: Path) -> None:
    """advisor-healthy live (advisor_mode=scan-time): every ksm_advisor decision the
    kernel records is what model/advisor.py's arithmetic gives on the kernel's inputs,
    and with the decisions replayed the model's counters are the kernel's at every
    full-scan end.  Times and ksmd's CPU hang on the machine (not judged here)."""
    before = read_all(KernelFS())
    mounts = Path("/proc/self/mounts")
    traced = " /sys/kernel/tracing tracefs " in mounts.read_text()
    out = tmp_path / "val"
    r = run_ksmlab(["validate", "advisor-healthy", "--no-kernel-events", "--json", "--out",
                    str(out)], timeout=400)
    assert r.returncode in (0, 1), r.stderr  # 1: a time or CPU target on a busy machine
    d = json.loads(r.stdout)
    [s] = d["scenarios"]
    a = s["advisor"]
    assert a["recorded"] and a["decisions"] >= 5, a
    assert a["arithmetic_equal"] == a["decisions"], a
    assert a["replayed"] == min(a["decisions"], a["model_decisions"]), a
    assert s["advisor_ok"] and d["advisor_ok"]
    assert s["agreement"] >= 0.99 and s["max_rel_diff"] <= 0.01, _why(s)
    tr = Trace.load(out / "advisor-healthy.kernel.trace.json.gz")
    assert tr.meta["advisor"]["pages_to_scan_at_switch"] == 500
    assert tr.meta["advisor"]["knobs"]["advisor_target_scan_time"] == "2"
    assert read_all(KernelFS()) == before
    assert not workload_pids()
    assert (" /sys/kernel/tracing tracefs " in mounts.read_text()) == traced  # as found
