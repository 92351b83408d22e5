"""ksmlab report: report.html is one offline page that headless Chromium renders
without a console error, with every expected figure; report.txt fits 80 columns."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pandas")
pytest.importorskip("distributed")

from ksmlab import sweep
from ksmlab.model.costs import load_profile
from ksmlab.report_html import write_report

from .conftest import TEST_PROFILE

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (Makefile SYSTEM_DEBS)
SPEC = """\
scenarios = ["seed-uzp0", "seed-uzp1"]
policies = ["mainline", "pre-6.12", "v1"]
[grid]
duration = 3.0
ksm.pages_to_scan = [100, 1000]
ksm.use_zero_pages = [0, 1]
[report]
curves = [{ "ksm.pages_to_scan" = 1000 }]
"""
SCENARIOS = ("seed-uzp0", "seed-uzp1")
FIGURES = ("freed", "budget", "verdicts", "cpu", "curves")


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A small sweep, in this process, with one point failing (made once)."""
    import ksmlab.model

    real = ksmlab.model.simulate

    def flaky(sc: Any, policy: str, **kw: Any) -> Any:
        if policy == "v1" and sc.ksm.pages_to_scan == 100 and sc.ksm.use_zero_pages == 1:
            raise RuntimeError("a failure the report must show")
        return real(sc, policy, **kw)

    tmp_path = tmp_path_factory.mktemp("report")
    (tmp_path / "spec.toml").write_text(SPEC)
    spec, base = sweep.load_spec(tmp_path / "spec.toml")
    profile = load_profile(Path(TEST_PROFILE))
    out = tmp_path / "sw"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ksmlab.model, "simulate", flaky)
        sweep.run(spec, base, out, profile, "test profile",
                  sweep.serial_runner("auto", profile))
    yield out


def test_report_is_self_contained_and_the_text_fits_80_columns(swept: Path) -> None:
    page = write_report(swept).read_text()
    # nothing to fetch: every figure inline, no link or script elsewhere
    assert not re.findall(r'(?:src|href)="(?!data:|#)', page)
    assert "<script" not in page and "@import" not in page and "url(" not in page
    for sc in SCENARIOS:
        for f in FIGURES:
            assert f'id="{f}-{sc}"' in page
    assert 'id="failed"' in page and "a failure the report must show" in page
    text = (swept / "report.txt").read_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "mainline" in text and "!" in text


def test_report_command(swept: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "ksmlab", "report", str(swept)],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(swept / "report.html")


def test_report_renders_in_headless_chromium(swept: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} missing: apt-get install chromium (make test does, as root)")
    playwright = pytest.importorskip("playwright.sync_api",
                                     reason="playwright missing: pip install playwright")
    path = write_report(swept)
    errors: list[str] = []
    fetched: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: None if r.url.startswith(("file:", "data:"))
                    else fetched.append(r.url))
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            ids = page.eval_on_selector_all("figure", "fs => fs.map(f => f.id)")
            widths = page.eval_on_selector_all("figure img", "is => is.map(i => i.naturalWidth)")
            pre = page.inner_text("#text pre")
        finally:
            browser.close()
    assert errors == []
    assert fetched == []
    assert sorted(ids) == sorted(f"{f}-{sc}" for sc in SCENARIOS for f in FIGURES)
    assert len(widths) == len(ids) and all(w > 200 for w in widths)
    assert "seed-uzp1: memory freed (MiB)" in pre


def test_report_opens_with_a_summary(swept: Path) -> None:
    page = write_report(swept).read_text()
    assert page.count('<p class="summary">') == len(SCENARIOS)
    text = (swept / "report.txt").read_text()
    first = text.split("\n\n")[0]
    assert first.startswith("seed-uzp0, 12 points: the rate-limit bypass in ")
    assert "1 failed" in " ".join(text.split())  # the fixture's failing point
    # the policies are named where they reached a verdict, or as reaching none
    for sc in SCENARIOS:
        para = next(p for p in text.split("\n\n") if p.startswith(f"{sc}, "))
        flat = " ".join(para.split())
        assert all(p in flat for p in ("mainline", "pre-6.12", "v1")), flat


def test_where_says_settings_in_few_words() -> None:
    from ksmlab.report_html import _where

    fields = ["ksm.pages_to_scan", "ksm.use_zero_pages"]
    grid = [{"ksm.pages_to_scan": p, "ksm.use_zero_pages": u}
            for p in (100, 1000, 5000) for u in (0, 1)]
    assert _where(grid, grid, fields) == "at every setting"
    assert _where([s for s in grid if s["ksm.use_zero_pages"] == 1], grid,
                  fields) == "with use_zero_pages=1"
    assert _where([s for s in grid if s["ksm.pages_to_scan"] < 5000], grid,
                  fields) == "with pages_to_scan 100 or 1000"
    assert _where(grid[:1] + grid[-1:], grid, fields) == (
        "at pages_to_scan=100, use_zero_pages=0; pages_to_scan=5000, use_zero_pages=1")


def test_colour_scales_are_fixed() -> None:
    """The colours do not stretch over the data's range: 116 and 128 MiB of 128
    mergeable look alike, as do 0.6 and 0.7 % of a CPU."""
    import numpy as np

    from ksmlab.report_html import heat_scale

    m = np.array([[116.0, 128.0]])
    norm, vals = heat_scale(m, "linear", (0.0, 128.0))
    a, b = norm(vals)[0]
    assert b == 1.0 and a > 0.9
    norm, vals = heat_scale(np.array([[0.6, 0.7]]), "cpu")
    a, b = norm(vals)[0]
    assert abs(b - a) < 0.05


def test_report_names_no_folder_of_the_machine() -> None:
    from ksmlab.report_html import _profile_text

    label = "profile: shipped (fitted elsewhere), fitted 2026-11-27 00:23: /tmp/x/default.json"
    assert _profile_text(label) == ("profile: shipped (fitted elsewhere), fitted "
                                    "2026-11-27 00:23: default.json")
    assert _profile_text("test profile") == "test profile"
