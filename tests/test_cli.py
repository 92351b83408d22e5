"""The command line: bad input is one line and exit code 2, with knobs untouched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ksmlab.live.kernelfs import KernelFS
from ksmlab.live.knobs import read_all

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
    d = ksmlab("doctor", "--json", user="65534")
    assert d.returncode == 0
    doc = json.loads(d.stdout)
    assert doc["live_ok"] is False and doc["root"] is False


def test_scenarios_and_help() -> None:
    r = ksmlab("scenarios", "--json")
    assert r.returncode == 0
    names = [s["name"] for s in json.loads(r.stdout)["scenarios"]]
    assert "seed-uzp1" in names
    h = ksmlab("--help")
    assert h.returncode == 0 and "Examples:" in h.stdout
    assert all(len(line) <= 80 for line in h.stdout.splitlines())


@pytest.mark.skipif(not Path("/sys/kernel/mm/ksm/run").exists(), reason="no KSM")
def test_doctor_reads_knobs() -> None:
    r = ksmlab("doctor", "--json")
    assert r.returncode == 0
    d = json.loads(r.stdout)
    assert d["knobs"]["ksm/pages_to_scan"] == KernelFS().read("sys/kernel/mm/ksm/pages_to_scan")
    assert d["kernel"] == os.uname().release
