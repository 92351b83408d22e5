"""The kselftest ksm_thp_split: its TAP read back, compiled against a kernel source's
kselftest.h, run on the live host (knobs put back, also on a signal) and in the
guests (``kernel`` marker)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ksmlab.kernel import build as kbuild
from ksmlab.kernel import selftest as st

REQUIRE_LIVE = os.environ.get("KSMLAB_REQUIRE_LIVE") == "1"
KNOBS = ["ksm/run", "ksm/pages_to_scan", "ksm/sleep_millisecs", "ksm/use_zero_pages",
         "ksm/advisor_mode", "transparent_hugepage/enabled"]

TAP = """TAP version 13
1..3
# ksmlab: shrink_underused=1
# ksmlab: uzp1.pages=8192 uzp1.thp_pages=8192 uzp1.full_scans=4 uzp1.seconds=3.57
# ksmlab: rate.peak_ratio=6.12 rate.peak_window_pages=6144 rate.budget_pages_s=5000
not ok 1 memory freed outruns pages_to_scan per sleep_millisecs (use_zero_pages=1): peak \
6.12x the budget, at most 2.0x allowed
# ksmlab: merge.merged=8190 merge.pages=8192 merge.freed_outside_ksm=0
ok 2 merging progresses at KSM's rate (use_zero_pages=0): 8190 of 8192 duplicate pages \
merged in 4 full scans
ok 3 # SKIP zero pages freed are counted in ksm_zero_pages: this kernel has no \
ksm_zero_pages
# Totals: pass:1 fail:1 xfail:0 xpass:0 skip:1 error:0
"""


def _unavailable(reason: str) -> None:
    if REQUIRE_LIVE:
        pytest.fail(f"{reason} (KSMLAB_REQUIRE_LIVE=1)")
    pytest.skip(reason)


def test_tap_is_read_back() -> None:
    cases, figures = st.parse_tap(TAP)
    assert [(c.prop, c.outcome) for c in cases] == [
        ("rate", "fail"), ("merge", "pass"), ("zero-counted", "skip")]
    assert cases[0].message.startswith("memory freed outruns pages_to_scan")
    assert cases[2].message.startswith("zero pages freed are counted in ksm_zero_pages")
    assert figures["rate.peak_ratio"] == 6.12 and figures["merge.merged"] == 8190
    r = st.result_from(TAP, 1, "host", "6.18.0", 12.0)
    assert not r.passed and r.outcome("merge") == "pass"
    ok = TAP.replace("not ok 1", "ok 1")
    assert st.result_from(ok, 0, "host", "6.18.0", 12.0).passed
    # a binary that died half-way reported fewer than three tests: not a pass
    assert not st.result_from("\n".join(ok.splitlines()[:6]), 0, "host", "x", 1.0).passed


def test_a_result_counts_for_todays_patch_and_test(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KSMLAB_KERNEL_CACHE", str(tmp_path / "cache"))
    shutil.copytree(kbuild.kernel_dir(), tmp_path / "kdir")
    (tmp_path / "kdir" / "selftest.json").unlink(missing_ok=True)  # nothing shipped
    monkeypatch.setenv("KSMLAB_KERNEL_DIR", str(tmp_path / "kdir"))
    v = kbuild.VARIANTS["v1"]
    st.record(st.result_from(TAP, 1, "guest", "6.12.118-ksmlab-v1", 30.0, "v1",
                             patch_sha256=kbuild.patch_sha256(v)))
    st.record(st.result_from(TAP, 1, "guest", "6.12.118-ksmlab-rfc", 30.0, "rfc",
                             patch_sha256="an older patch"))
    assert set(st.read_results()) == {"v1"}
    data = json.loads(st.index_path().read_text())
    data["results"]["v1"]["selftest_sha256"] = "an older test"
    st.index_path().write_text(json.dumps(data))
    assert st.read_results() == {}


@pytest.fixture(scope="module")
def binary() -> Path:
    src = kbuild.SOURCES["6.12"]
    if shutil.which("gcc") is None:
        _unavailable("gcc is missing (apt-get install gcc libc6-dev)")
    if not src.tarball.exists():
        _unavailable(f"{src.tarball} is missing (apt-get install {src.package})")
    return st.compile_selftest(src)


@pytest.mark.slow
def test_compiles_static_against_the_sources_kselftest_h(binary: Path) -> None:
    out = subprocess.run(["file", str(binary)], capture_output=True, text=True).stdout
    assert "statically linked" in out
    # without root it skips the whole plan, as kselftests do
    if os.geteuid() == 0:
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            str(binary)], capture_output=True, text=True, timeout=30)
    else:
        r = subprocess.run([str(binary)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 4  # KSFT_SKIP
    assert "needs root" in r.stdout or "not available" in r.stdout


def _knobs() -> dict[str, str]:
    out = {}
    for k in KNOBS:
        p = Path("/sys/kernel/mm") / k
        if p.exists():
            out[k] = p.read_text().strip()
    return out


@pytest.mark.live
@pytest.mark.slow
def test_live_host_selftest_restores_every_knob() -> None:
    """``ksmlab selftest`` on this kernel: three outcomes that agree with their own
    figures, messages that name the property, and every knob as it was."""
    before = _knobs()
    r = subprocess.run([sys.executable, "-m", "ksmlab", "selftest", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert _knobs() == before
    assert r.returncode in (0, 1), r.stderr[-800:]
    res = json.loads(r.stdout)
    outcomes = {c["prop"]: c for c in res["cases"]}
    assert set(outcomes) == set(st.PROPERTIES)
    f = res["figures"]
    if outcomes["rate"]["outcome"] != "skip":
        assert (outcomes["rate"]["outcome"] == "fail") == (f["rate.peak_ratio"] > 2.0)
        word = "outruns" if outcomes["rate"]["outcome"] == "fail" else "within"
        assert f"memory freed {word} pages_to_scan per sleep_millisecs" in \
            outcomes["rate"]["message"]
    if outcomes["merge"]["outcome"] == "fail":
        assert "merging does not progress at KSM's rate" in outcomes["merge"]["message"]
    assert (r.returncode == 0) == res["passed"]


@pytest.mark.live
def test_a_signal_puts_the_knobs_back(binary: Path) -> None:
    before = _knobs()
    p = subprocess.Popen([str(binary)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until KSM runs with the test's settings
        if Path("/sys/kernel/mm/ksm/run").read_text().strip() == "1":
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == -signal.SIGTERM
    assert _knobs() == before


# ---- in the guests (minutes) ----------------------------------------------------------

@pytest.mark.kernel
@pytest.mark.parametrize("variant,passes", [("6.12", False), ("v1", True),
                                            ("ksm-accounted-remap", True)])
def test_selftest_in_the_guest(variant: str, passes: bool) -> None:
    r = subprocess.run([sys.executable, "-m", "ksmlab", "kernel", "selftest", "--kernel",
                        variant, "--json"], capture_output=True, text=True, timeout=1800)
    assert r.returncode == (0 if passes else 1), r.stderr[-800:]
    res = json.loads(r.stdout)
    assert res["passed"] is passes and res["where"] == "guest"
    if not passes:
        failed = [c for c in res["cases"] if c["outcome"] == "fail"]
        assert any("outruns pages_to_scan" in c["message"] for c in failed)
        assert any("merging does not progress at KSM's rate" in c["message"]
                   for c in failed)
