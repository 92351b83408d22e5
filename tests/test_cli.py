"""The command line: bad input is one line and exit code 2, with knobs untouched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Literal

import pytest
import typer

from ksmlab.live.kernelfs import KernelFS
from ksmlab.live.knobs import read_all
from ksmlab.scenario import Scenario
from ksmlab.trace import Trace

KSMLAB = [sys.executable, "-m", "ksmlab"]
MINIMAL = 'name = "x"\nduration = 5\n[[process]]\n[[process.region]]\nsize_mib = 4\n'


def ksmlab(*args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [*KSMLAB, *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def knobs_now() -> dict[str, str]:
    return read_all(KernelFS()) if Path("/sys/kernel/mm/ksm/run").exists() else {}


def one_line_error(r: subprocess.CompletedProcess[str], match: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("ksmlab: error: ")
    assert match in lines[0]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("name = [\n", "not valid TOML"),
        (MINIMAL + "colour = 1\n", "colour: unknown field"),
        (MINIMAL.replace("size_mib = 4", "size_mib = -4"), "size_mib"),
        (MINIMAL.replace("size_mib = 4", "size_mib = 4000000"), "MemAvailable"),
    ],
    ids=["malformed", "unknown-field", "negative-size", "too-large"],
)
def test_bad_scenario_refused_before_anything_changes(tmp_path: Path, text: str,
                                                      match: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    before = knobs_now()
    r = ksmlab("run", str(f))
    if match == "MemAvailable" and os.geteuid() != 0:
        match = "root"
    one_line_error(r, match)
    assert knobs_now() == before


def test_unknown_scenario_and_policy() -> None:
    one_line_error(ksmlab("run", "no-such"), "no such built-in scenario")
    one_line_error(ksmlab("run"), "Missing argument")


@pytest.mark.parametrize(
    ("profile", "match"),
    [
        ({"cold_strt": 1}, "unknown cost profile field(s): cold_strt"),
        ({"cold_start": "x"}, "could not convert"),
        ({"cold_start": -0.5, "visit_ns": -1}, "out of range (prices >= 0, tick_ns > 0): "
                                               "cold_start, visit_ns"),
        ({"tick_ns": 0}, "out of range"),
    ],
    ids=["unknown", "not-a-number", "negative", "zero-tick"],
)
def test_bad_profile_is_one_line(tmp_path: Path, profile: dict[str, object],
                                 match: str) -> None:
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"profile": profile}))
    one_line_error(ksmlab("sim", "seed-uzp1", "--policy", "mainline", "--profile", str(f)),
                   match)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root to drop to another user with setpriv")
def test_without_root_is_one_line(tmp_path: Path) -> None:
    before = knobs_now()
    r = ksmlab("run", "seed-uzp1", user="65534")
    one_line_error(r, "live runs need root")
    assert knobs_now() == before
    d = ksmlab("doctor", "--json", "--no-advice", user="65534")
    assert d.returncode == 3  # live runs cannot work here
    doc = json.loads(d.stdout)
    assert doc["live_ok"] is False and doc["root"] is False
    assert doc["remap"]["remaps"] is None and "root" in doc["remap"]["how"]


def test_scenarios_and_help() -> None:
    r = ksmlab("scenarios", "--json")
    assert r.returncode == 0
    names = [s["name"] for s in json.loads(r.stdout)["scenarios"]]
    assert "seed-uzp1" in names
    h = ksmlab("--help")
    assert h.returncode == 0 and "Examples:" in h.stdout
    assert all(len(line) <= 80 for line in h.stdout.splitlines())


@pytest.mark.live  # the remap probe splits a THP on the real kernel
@pytest.mark.skipif(not Path("/sys/kernel/mm/ksm/run").exists(), reason="no KSM")
def test_doctor_reads_knobs() -> None:
    r = ksmlab("doctor", "--json")
    d = json.loads(r.stdout)
    # 1 only when KSM runs here with a regression in the model (or a journal is left)
    assert r.returncode == (1 if d["exposed"] or d["journal"] else 0) == d["exit_code"]
    assert d["knobs"]["ksm/pages_to_scan"] == KernelFS().read("sys/kernel/mm/ksm/pages_to_scan")
    assert d["kernel"] == os.uname().release
    assert set(d["ksm_now"]) >= {"pages_sharing", "ksm_zero_pages", "general_profit",
                                 "thp_split_page"}
    assert d["advice"]["policy"] == ("pre-6.12" if d["remap"]["remaps"] is False
                                     else "mainline")


@pytest.mark.live
@pytest.mark.skipif(os.geteuid() != 0 or not Path("/sys/kernel/mm/ksm/run").exists(),
                    reason="needs root and KSM (pagemap pfns for the remap probe)")
def test_doctor_probes_the_remap_and_fits_80_columns() -> None:
    """6.12+ (b1f202060afe): the probe's split THP maps its zero subpages to the zero
    page; every line of the operator's report fits 80 columns."""
    r = ksmlab("doctor")
    assert r.returncode in (0, 1), r.stderr
    assert all(len(line) <= 80 for line in r.stdout.splitlines()), r.stdout
    from ksmlab.live.features import remap_expected

    if remap_expected(KernelFS()):  # the shrinker's files: the series with the remap
        assert "remap       yes: a split THP's 511 zero-filled subpages" in r.stdout
    assert "exposure" in r.stdout and "advice" in r.stdout


def test_advice_follows_the_models_verdicts() -> None:
    from ksmlab.advice import advise

    # as doctor reads them from sysfs: text
    knobs = {"ksm/pages_to_scan": "100", "ksm/sleep_millisecs": "20",
             "ksm/use_zero_pages": "1", "ksm/smart_scan": "1", "ksm/max_page_sharing": "256"}
    a = advise(knobs, remaps=True)
    assert a.policy == "mainline" and a.current.verdicts == ["rate-limit-bypass"]
    assert a.other.verdicts == ["merge-collapse"]  # the thread's two claims, one each
    assert "v1" in a.fixes and "mainline" not in a.fixes and "6.12" not in a.fixes
    assert any("no value avoids both" in s for s in a.say)
    b = advise(knobs, remaps=False)  # before the remap: nothing to change
    assert b.policy == "pre-6.12" and not b.current.verdicts and not b.fixes
    assert b.say and "nothing to change" in b.say[0]


# ---- validate's exit code (no live run: the kernel's side is a model trace) -----------

class FakeLiveRun:
    """Stands in for ksmlab.live.run.LiveRun: its "kernel" trace is the model's under
    ``POLICY`` (set per test), so no knob is touched and no root is needed."""

    POLICY = "mainline"

    def __init__(self, sc: Scenario, **_: object) -> None:
        self.sc = sc

    def check(self) -> None:
        pass

    def run(self) -> Trace:
        from ksmlab.model import simulate

        return simulate(self.sc, self.POLICY)


@pytest.mark.parametrize(
    ("scenario", "kernel_policy", "code", "why"),
    [("seed-uzp1", "mainline", 0, "the same policy on both sides"),
     ("seed-uzp1", "pre-6.12", 1, "targets met, but only the model finds the bypass"),
     ("seed-uzp0", "pre-6.12", 1, "targets missed (and the verdicts differ)")],
    ids=["passes", "verdicts-disagree", "targets-missed"])
def test_validate_exit_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scenario: str,
                            kernel_policy: str, code: int, why: str) -> None:
    from typer.testing import CliRunner

    from ksmlab.cli import app

    monkeypatch.setattr(FakeLiveRun, "POLICY", kernel_policy)
    monkeypatch.setattr("ksmlab.live.run.LiveRun", FakeLiveRun)
    for extra in ([], ["--json"]):
        res = CliRunner().invoke(app, ["validate", scenario, "--policy", "mainline",
                                       "--out", str(tmp_path), *extra])
        assert res.exit_code == code, (why, res.output)
        # the full output comes first, whatever the exit code
        if extra:
            d = json.loads(res.stdout)
            assert d["targets_met"] is (scenario == "seed-uzp1")
            assert d["verdicts_agree"] is (code == 0)
            assert d["scenarios"][0]["verdicts_agree"] is (code == 0)
        else:
            assert "targets: exact >=" in res.stdout and f"{scenario}: verdicts" in res.stdout


def test_validate_kernel_runs_every_scenario(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """validate --kernel: a scenario that fails (or is not confirmed) does not stop the
    ones after it; the exit code is decided at the end."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from ksmlab.cli import app
    from ksmlab.kernel import qemu
    from ksmlab.kernel import validate as kvalidate

    monkeypatch.setenv("KSMLAB_KERNEL_CACHE", str(tmp_path / "cache"))
    outcome: dict[str, str] = {}  # scenario -> "error", "confirmed" or "not"
    ran: list[str] = []

    def fake_run(scenario: str, variant: str, *_: object, **__: object) -> SimpleNamespace:
        ran.append(scenario)
        if outcome[scenario] == "error":
            raise qemu.KernelRunError(f"qemu died on {scenario}")
        tr = Trace.from_rows({"guest": {"variant": variant}, "scenario": scenario},
                             [{"t": 0.0}])
        return SimpleNamespace(trace=tr, trace_path=tmp_path / f"{scenario}.trace.json.gz")

    def fake_validate(tr: Trace, path: str = "") -> kvalidate.Validation:
        name = tr.meta["scenario"]
        return kvalidate.Validation(
            scenario=name, stands_for=name, variant="v1", policy="v1", release="x",
            accelerator="tcg", checkpoints=[], agreement=1.0, verdicts_kernel=[],
            verdicts_model=[], tolerance_mib=2.0, seconds_per_scan={"kernel": 1, "model": 1},
            confirmed=outcome[name] == "confirmed", trace=path)

    monkeypatch.setattr(qemu, "run", fake_run)
    monkeypatch.setattr(kvalidate, "validate", fake_validate)
    for first, second, code in (("error", "confirmed", 2), ("not", "confirmed", 1),
                                ("confirmed", "not", 1), ("confirmed", "confirmed", 0)):
        outcome.update(a=first, b=second)
        ran.clear()
        res = CliRunner().invoke(app, ["validate", "a", "b", "--kernel", "v1"])
        assert ran == ["a", "b"], res.output
        assert res.exit_code == code, res.output
        assert res.stdout.count("CONFIRMED") == (first != "error") + 1
        if first == "error":
            assert "ksmlab: error: a: qemu died on a" in res.stderr


@pytest.mark.parametrize("cmd", [["sim", "-p", "mainline"], ["compare"], ["validate"]])
def test_a_model_too_big_for_this_machine_is_refused(tmp_path: Path, cmd: list[str]) -> None:
    # issue 16 item 8: a 10 TiB region was accepted and OOM-killed at 24 GB resident;
    # now refused before anything runs (validate: before any live run)
    f = tmp_path / "big.toml"
    f.write_text(MINIMAL.replace("size_mib = 4", "size_mib = 10485760"))
    before = knobs_now()
    r = ksmlab(cmd[0], str(f), *cmd[1:])
    one_line_error(r, "the model needs about 1280.5 GiB")
    assert "MemAvailable" in r.stderr
    assert knobs_now() == before


def test_memory_estimate_follows_the_engine() -> None:
    from ksmlab.model.run import BASE_BYTES, memory_estimate
    from ksmlab.scenario import load

    sc = load("seed-uzp1")  # 128 MiB: 32768 pages
    assert memory_estimate(sc) == (BASE_BYTES + 32768 * 32, "fast")
    # KSM's event stream runs on the fast engine too (its arrays: 9 B a page)
    assert memory_estimate(sc, events=True) == (BASE_BYTES + 32768 * 48, "fast")
    assert memory_estimate(sc, "exact", events=True) == (BASE_BYTES + 32768 * 512, "exact")


@pytest.mark.parametrize("cmd", [["run"], ["sim", "-p", "mainline"], ["validate"]])
def test_an_output_that_cannot_be_written_is_refused_first(tmp_path: Path,
                                                           cmd: list[str]) -> None:
    # issue 16 item 5: the live run's results were lost after it (NotADirectoryError)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    before = knobs_now()
    for out, match in ((not_a_folder, "exists and is not a folder"),
                       (not_a_folder / "sub", "cannot write there")):
        r = ksmlab(cmd[0], "seed-uzp1", *cmd[1:], "--out", str(out))
        one_line_error(r, match)
    assert knobs_now() == before


def test_a_failed_write_keeps_the_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    import errno

    from typer.testing import CliRunner

    from ksmlab.cli import app

    def full(self: Trace, path: Path) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Trace, "save", full)
    res = CliRunner().invoke(app, ["sim", "seed-uzp1", "-p", "mainline", "-d", "2", "--json",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 1
    assert json.loads(res.stdout.splitlines()[0])["scenario"] == "seed-uzp1"
    assert "No space left on device (the summary above is the run's result)" in res.output
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_writes_are_atomic(tmp_path: Path) -> None:
    from ksmlab.trace import write_atomic

    target = tmp_path / "t.bin"
    target.write_bytes(b"old")

    def dies(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(target, writer=dies)
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_conventions_version_bare_command_and_80_columns() -> None:
    from ksmlab import __version__

    r = ksmlab("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"ksmlab {__version__}"
    r = ksmlab()
    assert r.returncode == 0 and "Commands:" in r.stdout and r.stderr == ""
    for cmd in (["policies"], ["scenarios"], ["kernel", "variants"], ["kernel", "results"],
                ["kernel", "images"], ["restore", "--help"],
                # reads sysfs and procfs only: no THP split (--no-probe), no model
                ["doctor", "--no-probe", "--no-advice"]):
        out = ksmlab(*cmd).stdout.splitlines()
        assert max((len(line) for line in out), default=0) <= 80, (cmd, out)
    assert ksmlab("policies").stdout and ksmlab("kernel", "variants").stdout
    # a description wraps under itself, whole: no word cut at the edge
    assert "stable chains of many dups" in " ".join(ksmlab("scenarios").stdout.split())


def test_json_carries_the_version_and_compare_takes_json() -> None:
    from ksmlab import __version__

    r = ksmlab("compare", "seed-uzp1-nothp", "--policies", "mainline", "-d", "2", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["ksmlab"] == __version__ and d["engine"] == "auto" and d["rows"]
    for args in (["scenarios", "--json"], ["policies", "--json"], ["kernel", "variants",
                                                                    "--json"],
                 ["sim", "seed-uzp1-nothp", "-p", "mainline", "-d", "2", "--json"]):
        r = ksmlab(*args)
        assert r.returncode == 0 and json.loads(r.stdout)["ksmlab"] == __version__, args


def test_export_gives_csv_pandas_reads(tmp_path: Path) -> None:
    r = ksmlab("sim", "seed-uzp1-nothp", "-p", "mainline", "-d", "3", "-o", str(tmp_path))
    assert r.returncode == 0, r.stderr
    [trace] = tmp_path.glob("*.trace.json.gz")
    r = ksmlab("export", str(trace), "-o", str(tmp_path / "t.csv"))
    assert r.returncode == 0, r.stderr
    import csv

    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    tr = Trace.load(trace)
    assert len(rows) == len(tr.t) and list(rows[0])[:2] == ["t", "full_scan_end"]
    assert float(rows[-1]["pages_scanned"]) == tr.since_start("pages_scanned")[-1]
    # every digit of ksmd's CPU ns, not ten significant ones
    assert float(rows[-1]["ksmd_cpu_ns"]) == tr.since_start("ksmd_cpu_ns")[-1]
    raw = ksmlab("export", str(trace), "--raw").stdout.splitlines()
    assert raw[0] == ",".join(rows[0]) and len(raw) == len(rows) + 1
    one_line_error(ksmlab("export", str(tmp_path / "nope.json.gz")), "nope.json.gz")
    pd = pytest.importorskip("pandas", reason="the sweep extra (pandas, pyarrow) is not "
                             "installed")
    r = ksmlab("export", str(trace), "-o", str(tmp_path / "t.parquet"))
    assert r.returncode == 0, r.stderr
    frame = pd.read_parquet(tmp_path / "t.parquet")
    assert list(frame.columns) == list(rows[0])
    assert frame["pages_scanned"].iloc[-1] == tr.since_start("pages_scanned")[-1]


def test_help_names_the_choices_and_fits_80_columns() -> None:
    from ksmlab.model import POLICIES

    for cmd in ("sim", "validate", "compare", "capture", "export", "doctor", "watch"):
        h = ksmlab(cmd, "--help")
        assert h.returncode == 0, cmd
        assert all(len(line) <= 80 for line in h.stdout.splitlines()), (cmd, h.stdout)
    flat = " ".join(ksmlab("sim", "--help").stdout.split())
    assert all(p.split("-")[-1] in flat for p in POLICIES)
    assert "text, markdown, json" in " ".join(ksmlab("compare", "--help").stdout.split())


def test_doctor_is_short_and_never_answers_what_it_did_not_probe() -> None:
    r = ksmlab("doctor", "--no-probe", "--no-advice")
    assert r.returncode in (0, 1, 3), r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) <= 25, r.stdout  # the knob and feature tables only with --all
    assert "behaviours" not in r.stdout and "ksmlab doctor --all" in lines[-1]
    remap = next(line for line in lines if line.startswith("remap"))
    assert remap.startswith("remap       not probed (--no-probe); ")
    full = ksmlab("doctor", "--no-probe", "--no-advice", "--all").stdout
    assert "behaviours" in full and "zero-page remap on THP split" in full
    assert len(full.splitlines()) > len(lines) + 40


@pytest.mark.skipif(not Path("/sys/kernel/mm/ksm/run").exists(), reason="no KSM")
@pytest.mark.parametrize("uzp", [0, 1])
def test_doctor_names_the_workload_its_exposure_ran(monkeypatch: pytest.MonkeyPatch,
                                                    uzp: int) -> None:
    """The exposure line names the seed scenario of the host's use_zero_pages, the
    one whose regression it reports (seed-uzp0: the merge collapse)."""
    from typer.testing import CliRunner

    import ksmlab.advice
    from ksmlab.advice import Advice, Outcome
    from ksmlab.cli import app

    verdict = {0: "merge-collapse", 1: "rate-limit-bypass"}
    adv = Advice("mainline", 20.0, Outcome(uzp, 6.0, 0.0, 0.5, [verdict[uzp]]),
                 Outcome(1 - uzp, 128.0, 0.0, 32.8, [verdict[1 - uzp]]))
    monkeypatch.setattr(ksmlab.advice, "advise", lambda knobs, remaps: adv)
    res = CliRunner().invoke(app, ["doctor", "--no-probe"])
    flat = " ".join(res.stdout.split())
    assert (f"{verdict[uzp]} (the model of this kernel, mainline, on seed-uzp{uzp}: "
            "128 MiB of zero-filled THPs with this host's knobs, 20 s)") in flat
    assert adv.to_json()["workload"] == f"seed-uzp{uzp}"
    assert ksmlab.advice._seed({}, uzp).name == f"seed-uzp{uzp}"  # the one it runs


def test_compare_pid_takes_both_use_zero_pages_values_as_its_help_says() -> None:
    assert "0, 1 or 0,1" in " ".join(ksmlab("compare", "--help").stdout.split())
    gone = subprocess.Popen(["true"])
    gone.wait()
    # 0,1 is accepted: the command goes on to the capture, which finds no process
    one_line_error(ksmlab("compare", "--pid", str(gone.pid), "--use-zero-pages", "0,1"),
                   f"no process {gone.pid}")
    one_line_error(ksmlab("compare", "--pid", str(gone.pid), "--use-zero-pages", "2"),
                   "--use-zero-pages 2: use 0, 1 or 0,1")


def test_compare_pid_makes_one_table_a_value(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    """One capture, then a comparison for each use_zero_pages value (the capture
    stubbed with an image of a scenario's memory: no process, no root)."""
    from typer.testing import CliRunner

    import ksmlab.live.capture
    from ksmlab.cli import app
    from tests.test_image import _image_of

    class Captured:
        def __init__(self, folder: Path) -> None:
            from ksmlab import image as img

            self.image = img.load(folder)

    def fake_capture(pids: list[int], out: Path) -> Captured:
        _image_of(Scenario.model_validate(
            {"name": "x", "duration": 2, "process": [{"region": [{"size_mib": 4}]}]}), out)
        return Captured(out)

    monkeypatch.setattr(ksmlab.live.capture, "capture", fake_capture)
    res = CliRunner().invoke(app, ["compare", "--pid", "4242", "--use-zero-pages", "0,1",
                                   "--policies", "mainline,pre-6.12", "-d", "2", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert [c["title"].split(":")[0] for c in d["comparisons"]] == ["pid4242-uzp0",
                                                                     "pid4242-uzp1"]
    assert all([r["policy"] for r in c["rows"]] == ["mainline", "pre-6.12"]
               for c in d["comparisons"])
    text = CliRunner().invoke(app, ["compare", "--pid", "4242", "--use-zero-pages", "0,1",
                                    "--policies", "mainline", "-d", "2"]).stdout
    assert "pid4242-uzp0: process 4242 as captured, use_zero_pages=0" in text
    assert "pid4242-uzp1: process 4242 as captured, use_zero_pages=1" in text


def test_sim_without_a_policy_takes_this_kernels() -> None:
    from ksmlab.live.features import policy_for_host

    pol = policy_for_host(KernelFS())
    r = ksmlab("sim", "seed-uzp1-nothp", "-d", "2", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["policy"] == pol and d["policy_why"]
    r = ksmlab("sim", "seed-uzp1-nothp", "-d", "2")
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[0].startswith(f"policy {pol} (")
    assert f"seed-uzp1-nothp under {pol} (model)" in r.stdout


def test_a_usage_error_listing_choices_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """click lists a missing choice option's values one per line: ksmlab joins them."""
    import typer

    import ksmlab.cli.application as application

    demo = typer.Typer()
    demo.command(name="pick")(_pick)
    demo.command(name="other")(lambda: None)
    monkeypatch.setattr(application, "app", demo)
    monkeypatch.setattr(sys, "argv", ["ksmlab", "pick"])
    with pytest.raises(SystemExit) as e:
        application.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "Missing option '--colour'. Choose from: red, green, blue" in err


def _pick(colour: Annotated[Literal["red", "green", "blue"], typer.Option()]) -> None:
    """A command with a required choice (test_a_usage_error_listing_choices_is_one_line)."""


def test_the_compiling_notice_is_said_when_not_a_terminal(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import ksmlab.model.fast.jit as jit
    from ksmlab.cli import common
    from ksmlab.scenario import load

    assert not common.err.is_terminal  # pytest captures stderr: as when piped
    sc = load("seed-uzp1")
    monkeypatch.setattr(jit, "compiled_before", lambda: False)
    with common.model_progress(sc, "x") as progress:
        assert progress is None  # no bar off a terminal ...
    assert "compiling the fast engine (numba) on its first run" in capsys.readouterr().err
    with common.model_progress(sc, "x", "exact"):
        pass
    assert capsys.readouterr().err == ""  # ... and no notice where numba does not run
    monkeypatch.setattr(jit, "compiled_before", lambda: True)
    with common.model_progress(sc, "x"):
        pass
    assert capsys.readouterr().err == ""
