"""``ksmlab thread-report``: mail-shaped (72 columns, no Markdown) and every figure in
it what a fresh computation gives."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ksmlab import metrics
from ksmlab import thread_report as tr
from ksmlab.kernel import build as kbuild
from ksmlab.kernel import selftest as st
from ksmlab.model import POLICIES, simulate
from ksmlab.scenario import load


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KSMLAB_KERNEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The report with this machine's cache out of the way (runs recorded meanwhile
    would change it); the shipped record stays."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KSMLAB_KERNEL_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield tr.render(tr.compute())


def report_cache_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="ksmlab-empty-cache-")


def _table(text: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^(uzp[01]|guest[01])\s+(\S+)\s+([\d.]+)\s+([\d.]+)\s+(\S+)\s+(\S+)\s+"
                     r"(yes|NO|model)$", line)
        if m:
            rows[(m.group(1), m.group(2))] = list(m.groups()[2:])
    return rows


@pytest.mark.slow
def test_fits_72_columns_without_markdown(report: str) -> None:
    for line in report.splitlines():
        assert len(line) <= tr.WIDTH, line
        assert not line.startswith(("#", "|", "```", "* ", "> ")), line
        assert "**" not in line and "`" not in line, line
    assert report.endswith("\n-- \nksmlab kernel lab (generated; figures by the command "
                           "above)\n")


@pytest.mark.slow
def test_every_figure_is_a_fresh_computation(report: str) -> None:
    """The table holds one row per policy and seed, each figure what the model gives
    now (computed here independently), and names the command that made it."""
    rows = _table(report)
    assert len(rows) == 2 * len(POLICIES)
    for name in tr.SEEDS:
        sc = load(name)
        for policy in ("6.12", "ksm-accounted-remap", "ksm-skip-huge"):
            s = metrics.summarize(simulate(sc, policy))
            got = rows[(name.removeprefix("seed-"), policy)]
            assert float(got[0]) == round(s.freed_mib, 1)
            assert float(got[1]) == round(s.ksm_accounted_mib, 1)
            ratio = "-" if s.budget_ratio_peak is None else f"{s.budget_ratio_peak:.1f}"
            assert got[2] == ratio
            assert got[3] == ("-" if s.ksmd_cpu_pct is None else f"{s.ksmd_cpu_pct:.1f}")
    assert "ksmlab thread-report" in report
    # the same command, run again, gives the same text (no figure depends on the run)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KSMLAB_KERNEL_CACHE", str(Path(report_cache_dir())))
        assert tr.render(tr.compute()) == report


@pytest.mark.slow
def test_the_kernel_column_follows_the_record(cache: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """'yes' only where a result of today's patch confirmed the policy on that seed."""
    import shutil

    from ksmlab.kernel import validate

    shutil.copytree(kbuild.kernel_dir(), tmp_path / "kdir")
    (tmp_path / "kdir" / "confirmed.json").unlink(missing_ok=True)  # nothing shipped
    monkeypatch.setenv("KSMLAB_KERNEL_DIR", str(tmp_path / "kdir"))
    v = kbuild.VARIANTS["v1"]
    idx = validate.index_path()
    idx.parent.mkdir(parents=True)
    idx.write_text(json.dumps({"results": {"v1|seed-uzp1-64m": {
        "variant": "v1", "policy": "v1", "scenario": "seed-uzp1-64m",
        "stands_for": "seed-uzp1", "confirmed": True, "release": "6.12.118-ksmlab-v1",
        "date": "2026-12-07", "patch_sha256": kbuild.patch_sha256(v)}}}))
    rows = _table(tr.render(tr.compute()))
    assert rows[("uzp1", "v1")][4] == "yes"
    assert rows[("uzp0", "v1")][4] == "model"
    assert rows[("uzp1", "mainline")][4] == "model"


def test_shipped_selftest_covers_every_variant_with_todays_patches() -> None:
    """The shipped record (kernel/data/selftest.json) has a result of today's patch and
    test for every variant: fails on 6.12 and v1-p3, and on ksm-skip-huge for merging
    nothing; passes on the others."""
    shipped = {k: r for k, r in st._load(st.shipped_path()).items() if st.current(r)}
    assert set(shipped) == set(kbuild.VARIANTS)
    failing = {v for v, r in shipped.items() if not r["passed"]}
    assert failing == {"6.12", "v1-p3", "ksm-skip-huge"}
    skip_huge = {c["prop"]: c["outcome"] for c in shipped["ksm-skip-huge"]["cases"]}
    assert skip_huge == {"rate": "pass", "merge": "fail", "zero-counted": "skip"}


def test_selftest_section_lists_recorded_results(cache: Path) -> None:
    v = kbuild.VARIANTS["6.12"]
    r = st.result_from(SAMPLE_FAIL, 1, "guest", "6.12.118-ksmlab-6.12", 30.0, "6.12",
                       patch_sha256=kbuild.patch_sha256(v))
    st.record(r)
    lines = tr.selftest_lines(st.read_results())
    assert any(ln.startswith("6.12 ") and ln.endswith("FAIL") and "fail 6.4" in ln
               for ln in lines), lines
    assert all(len(ln) <= tr.WIDTH for ln in lines)


def test_mbox_replies_in_the_thread() -> None:
    text = tr.mbox("Hi,\nFrom here on\n", "<id@example.org>")
    head, body = text.split("\n\n", 1)
    assert "\nIn-Reply-To: <id@example.org>" in head
    assert "\nReferences: <id@example.org>" in head
    assert re.search(r"^Subject: Re: \[PATCH mm-unstable v1 0/3\] MM: Tighten", head, re.M)
    assert all(len(ln) <= tr.WIDTH for ln in head.splitlines()[1:])
    assert body == "Hi,\n>From here on\n"


def test_mbox_without_a_message_id_is_refused() -> None:
    r = subprocess.run([sys.executable, "-m", "ksmlab", "thread-report", "--format", "mbox"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "--in-reply-to" in r.stderr


SAMPLE_FAIL = """TAP version 13
1..3
# ksmlab: shrink_underused=1
# ksmlab: uzp1.pages=8192 uzp1.freed=8184 uzp1.rss_drop=6144
# ksmlab: rate.peak_ratio=6.40 rate.peak_window_pages=6400 rate.budget_pages_s=5000
not ok 1 memory freed outruns pages_to_scan per sleep_millisecs (use_zero_pages=1): peak 6.40x
# ksmlab: merge.merged=0 merge.pages=8192 merge.freed_outside_ksm=1536
not ok 2 merging does not progress at KSM's rate (use_zero_pages=0): 0 of 8192 merged
ok 3 # SKIP zero pages freed are counted in ksm_zero_pages: this kernel has no ksm_zero_pages
# Totals: pass:0 fail:2 xfail:0 xpass:0 skip:1 error:0
"""
