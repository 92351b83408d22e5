"""A cost profile per machine: identity, where it is kept, which one a command uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ksmlab import calibrate, profiles
from ksmlab.cli import app
from ksmlab.live import machine
from ksmlab.live.kernelfs import KernelFS
from ksmlab.model import simulate
from ksmlab.model.costs import CostProfile, shipped_profile
from ksmlab.scenario import load
from ksmlab.trace import Trace

CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor
cpu family\t: 6
model\t\t: 106
stepping\t: 6
bogomips\t: {bogomips}
flags\t\t: fpu hypervisor

processor\t: 1
model name\t: Intel(R) Xeon(R) Processor
"""


def fake_machine(root: Path, bogomips: str = "4589.21", boot: str = "b1") -> KernelFS:
    (root / "proc/sys/kernel/random").mkdir(parents=True, exist_ok=True)
    (root / "proc/cpuinfo").write_text(CPUINFO.format(bogomips=bogomips))
    (root / "proc/sys/kernel/random/boot_id").write_text(boot + "\n")
    return KernelFS(root)


def test_identity_keys_the_host_cpu_not_the_boot(tmp_path: Path) -> None:
    a = machine.identity(fake_machine(tmp_path / "a", "4589.21", "b1"))
    assert a["cpu"] == {"model name": "Intel(R) Xeon(R) Processor", "cpu family": "6",
                        "model": "106", "stepping": "6", "bogomips": "4590"}
    same_host = machine.identity(fake_machine(tmp_path / "b", "4591.02", "b2"))
    other_host = machine.identity(fake_machine(tmp_path / "c", "5187.80", "b1"))
    assert machine.key(a) == machine.key(same_host)  # TSC jitter and a new boot: same
    assert machine.key(a) != machine.key(other_host)  # the VM's host CPU changed
    assert machine.key(a).startswith(a["kernel"])


@pytest.fixture
def no_pin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's view: no $KSMLAB_PROFILE, an empty cache of one's own."""
    monkeypatch.delenv("KSMLAB_PROFILE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def doc(profile: CostProfile, ident: dict[str, object]) -> dict[str, object]:
    return {"fitted": "2026-11-30T06:00:00+00:00", "machine": ident,
            "scenarios": ["thp-z50-unique"], "profile": profile.to_json()}


def test_resolve_order_and_warnings(no_pin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ident = machine.identity(fake_machine(no_pin / "m"))
    key = machine.key(ident)
    shipped = profiles.resolve(None, ident, key)
    assert shipped.source == "shipped" and shipped.profile == shipped_profile()
    assert shipped.warning and "calibrate --quick" in shipped.warning

    mine = CostProfile(visit_ns=968.0)
    path = profiles.save_machine(doc(mine, ident), key)
    assert path.parent == no_pin / "cache" / "ksmlab" / "profiles"
    got = profiles.resolve(None, ident, key)
    assert (got.source, got.profile, got.warning) == ("machine", mine, None)
    assert got.scenarios == ("thp-z50-unique",)
    assert "this machine's, fitted 2026-11-30 06:00" in got.label()

    # the same machine after a reboot: used, with a warning; another machine: not found
    rebooted = {**ident, "boot_id": "b9"}
    assert "earlier boot" in (profiles.resolve(None, rebooted, key).warning or "")
    other = machine.identity(fake_machine(no_pin / "o", "5187.80"))
    assert profiles.resolve(None, other, machine.key(other)).source == "shipped"

    pinned = no_pin / "pinned.json"
    pinned.write_text(json.dumps({"profile": CostProfile(visit_ns=1.0).to_json()}))
    monkeypatch.setenv("KSMLAB_PROFILE", str(pinned))
    assert profiles.resolve(None, ident, key).source == "env"
    explicit = profiles.resolve(path, ident, key)
    assert (explicit.source, explicit.profile) == ("file", mine)


def test_a_broken_profile_is_refused(no_pin: Path) -> None:
    bad = no_pin / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(profiles.ProfileError, match="not a cost profile"):
        profiles.resolve(bad, None, None)


def test_commands_name_the_profile_they_used(no_pin: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["sim", "seed-uzp1-nothp", "-p", "mainline", "-d", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["profile"]["source"] == "shipped"

    ident = machine.identity()
    profiles.save_machine(doc(CostProfile(visit_ns=2000.0), ident), machine.key(ident))
    res = runner.invoke(app, ["sim", "seed-uzp1-nothp", "-p", "mainline", "-d", "2", "--json"])
    d = json.loads(res.stdout)
    assert d["profile"]["source"] == "machine" and d["profile"]["warning"] is None
    res = runner.invoke(app, ["compare", "seed-uzp1-nothp", "--policies", "mainline",
                              "-d", "2", "-f", "json"])
    assert json.loads(res.stdout)["profile"]["source"] == "machine"
    res = runner.invoke(app, ["doctor", "--json"])
    assert json.loads(res.stdout)["profile"]["source"] == "machine"


def test_quick_fit_finds_this_machines_speed() -> None:
    """A machine 3.3x slower than the shipped profile, in every price but one: the
    quick fit on two scenarios predicts ksmd's CPU of a third within a few per cent.
    (Model traces stand in for the kernel's: the fit never knows where they came from.)"""
    base = shipped_profile()
    true = calibrate.scaled(base, 3.3)
    true = CostProfile.from_dict({**true.to_json(), "checksum_ns": base.checksum_ns * 2.5})

    def kernel(name: str) -> tuple[str, Trace]:
        return name, simulate(load(name).with_duration(8), "mainline", profile=true)

    fit_on = [kernel("thp-z50-unique"), kernel("seed-uzp0-nothp")]
    data = [iv for n, tr in fit_on for iv in calibrate.intervals(n, tr, "mainline", base)]
    assert calibrate.speed_factor(data, base) == pytest.approx(3.1, rel=0.15)
    fitted, _ = calibrate.fit_kernels(fit_on, "mainline", base=base)
    judge = load("thp-z90-dup").with_duration(8)
    want = simulate(judge, "mainline", profile=true).since_start("ksmd_cpu_ns")[-1]
    got = simulate(judge, "mainline", profile=fitted).since_start("ksmd_cpu_ns")[-1]
    shipped = simulate(judge, "mainline", profile=base).since_start("ksmd_cpu_ns")[-1]
    assert abs(got - want) / want < 0.1
    assert abs(shipped - want) / want > 0.5  # what a profile fitted elsewhere gets wrong


def test_calibrate_refuses_another_machines_traces_without_out(
        no_pin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tr = simulate(load("thp-z50-unique").with_duration(4), "mainline")
    tr.meta["identity"] = {"cpu": {"model name": "elsewhere"}, "kernel": "6.1", "cpus": 64}
    tr.save(no_pin / "thp-z50-unique.kernel.trace.json.gz")
    res = CliRunner().invoke(app, ["calibrate", "thp-z50-unique", "--traces", str(no_pin)])
    assert res.exit_code == 2
    assert "another machine" in res.output
    res = CliRunner().invoke(app, ["calibrate", "thp-z50-unique", "--traces", str(no_pin),
                                   "--out", str(no_pin / "theirs.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((no_pin / "theirs.json").read_text())["scenarios"] == ["thp-z50-unique"]
    assert not (no_pin / "cache").exists()  # this machine's profile untouched


def busy_trace(others_pct: float) -> Trace:
    """Two samples 10 s apart: ksmd 0.2 s, workload 0.1 s, lab 0.3 s of CPU, and other
    work ``others_pct`` % of one CPU."""
    rows = [{"t": 0.0, "cpu_busy_ns": 0.0, "ksmd_cpu_ns": 0.0, "workload_cpu_ns": 0.0,
             "lab_cpu_ns": 0.0},
            {"t": 10.0, "cpu_busy_ns": (0.6 + others_pct / 10) * 1e9, "ksmd_cpu_ns": 0.2e9,
             "workload_cpu_ns": 0.1e9, "lab_cpu_ns": 0.3e9}]
    return Trace.from_rows({"others_cpu_pct": others_pct}, rows)


def test_other_work_beside_a_run_is_measured() -> None:
    from ksmlab.trace import others_cpu_pct

    assert others_cpu_pct(busy_trace(0.0)) == pytest.approx(0.0, abs=1e-9)
    assert others_cpu_pct(busy_trace(87.0)) == pytest.approx(87.0)
    assert others_cpu_pct(simulate(load("seed-uzp1").with_duration(2), "mainline")) is None


def test_calibrate_runs_a_busy_scenario_again_then_refuses(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ksmlab.errors import UserError
    from ksmlab.orchestrate import quiet_run

    seen: list[float] = []
    said: list[str] = []

    def live(sc: object, kernel_events: bool, attach: object) -> Trace:
        seen.append(busy)
        return busy_trace(busy)

    busy = 50.0
    with pytest.raises(UserError, match="stayed busy"):
        quiet_run(load("seed-uzp1"), live, said.append)
    assert seen == [50.0, 50.0] and len(said) == 2
    seen.clear()
    busy = 3.0
    assert quiet_run(load("seed-uzp1"), live, said.append).meta["others_cpu_pct"] == 3.0
    assert seen == [3.0]
