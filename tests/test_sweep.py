"""ksmlab sweep: the spec, the grid, the point cache, failed points (no cluster
processes here: those are in test_sweep_cluster.py)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("distributed")

from ksmlab import scenario, sweep  # noqa: E402
from ksmlab.model.costs import CostProfile, load_profile  # noqa: E402

from .conftest import TEST_PROFILE  # noqa: E402

SPEC = """\
scenarios = ["seed-uzp0", "seed-uzp1"]
policies = ["mainline", "v1"]
[grid]
duration = 2.0
ksm.pages_to_scan = [100, 1000]
ksm.use_zero_pages = [0, 1]
"""
PROFILE = load_profile(Path(TEST_PROFILE))


def spec_file(tmp_path: Path, text: str = SPEC) -> Path:
    f = tmp_path / "spec.toml"
    f.write_text(text)
    return f


def test_grid_expands_in_order_with_overrides(tmp_path: Path) -> None:
    spec, base = sweep.load_spec(spec_file(tmp_path))
    assert list(spec.grid) == ["duration", "ksm.pages_to_scan", "ksm.use_zero_pages"]
    assert spec.settings() == [
        {"duration": 2.0, "ksm.pages_to_scan": 100, "ksm.use_zero_pages": 0},
        {"duration": 2.0, "ksm.pages_to_scan": 100, "ksm.use_zero_pages": 1},
        {"duration": 2.0, "ksm.pages_to_scan": 1000, "ksm.use_zero_pages": 0},
        {"duration": 2.0, "ksm.pages_to_scan": 1000, "ksm.use_zero_pages": 1}]
    points = sweep.expand(spec, base, PROFILE)
    assert len(points) == 2 * 4 * 2
    assert [(p.scenario, p.policy) for p in points[:3]] == [
        ("seed-uzp0", "mainline"), ("seed-uzp0", "v1"), ("seed-uzp0", "mainline")]
    p = points[-1]
    assert (p.sc.duration, p.sc.ksm.pages_to_scan, p.sc.ksm.use_zero_pages) == (2.0, 1000, 1)
    assert len({p.key for p in points}) == len(points)
    # the key is the point's content: the same again, another for another profile
    assert [q.key for q in sweep.expand(spec, base, PROFILE)] == [q.key for q in points]
    other = CostProfile(visit_ns=PROFILE.visit_ns + 1)
    assert sweep.expand(spec, base, other)[0].key != points[0].key


def test_all_policies_files_and_nested_fields(tmp_path: Path) -> None:
    from ksmlab.model import POLICIES

    (tmp_path / "tiny.toml").write_text(
        'name = "tiny"\nduration = 3\n[[process]]\n[[process.region]]\nsize_mib = 4\n')
    spec, base = sweep.load_spec(spec_file(tmp_path, """\
scenarios = ["tiny.toml"]
[grid]
thp.khugepaged.max_ptes_none = [511, 409]
"""))
    points = sweep.expand(spec, base, PROFILE)
    assert len(points) == 2 * len(POLICIES)
    assert {p.scenario for p in points} == {"tiny"}
    assert points[-1].sc.thp.khugepaged.max_ptes_none == 409


def test_folio_sizes_are_grid_fields() -> None:
    # thp.hugepages lists only the sizes a scenario sets: a grid may add any size
    spec, base = sweep.load_spec(sweep.example_spec("folio-sizes"))
    assert len(spec.settings()) == 16
    orders = {(p.sc.ksm.use_zero_pages, p.sc.thp.fault_order("hugepage"))
              for p in sweep.expand(spec, base, PROFILE)}
    # 4 KiB pages (order 0), 64 KiB, 1 MiB, 2 MiB, each use_zero_pages
    assert orders == {(u, o) for u in (0, 1) for o in (0, 4, 8, 9)}
    with pytest.raises(sweep.SweepError, match="not a scenario value"):
        sweep.override(base_sc(), {"thp.hugepages.3kB": "always"}, "x")


def base_sc() -> scenario.Scenario:
    return scenario.load("mthp-64k-uzp0")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ksmlab", *args], capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.parametrize(("text", "match"), [
    (SPEC.replace("ksm.pages_to_scan", "ksm.pages_to_scn"),
     "grid field 'ksm.pages_to_scn' is not a scenario value"),
    (SPEC.replace("[0, 1]", "[0, 2]"), "seed-uzp0 with duration=2.0, ksm.pages_to_scan=100, "
     "ksm.use_zero_pages=2: ksm.use_zero_pages"),
    (SPEC.replace('"seed-uzp1"', '"nothere.toml"'), "cannot read"),
    (SPEC.replace('"v1"', '"v9"'), "unknown policy 'v9'"),
    ("colour = 1\n" + SPEC, "colour: unknown field"),
    ("scenarios = [\n", "not valid TOML"),
    (SPEC.replace("[0, 1]", "[]"), "an empty list of values"),
], ids=["field-name", "value", "scenario-file", "policy", "spec-field", "toml", "empty"])
def test_bad_spec_is_one_line_and_exit_2(tmp_path: Path, text: str, match: str) -> None:
    out = tmp_path / "out"
    r = run_cli("sweep", str(spec_file(tmp_path, text)), "-o", str(out))
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ksmlab: error: "), r.stderr
    assert match in lines[0]
    assert "Traceback" not in r.stderr
    assert not out.exists()  # refused before any work


def test_missing_spec_file(tmp_path: Path) -> None:
    r = run_cli("sweep", str(tmp_path / "none.toml"), "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "none.toml: cannot read" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


class Counting:
    """The serial runner, counting model runs; optionally stopping (as a kill
    would) after ``stop_after`` points."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.ran = 0
        self.stop_after = stop_after

    def __call__(self, todo: Sequence[sweep.Point],
                 done: Callable[[sweep.Point, dict[str, Any]], None]) -> None:
        inner = sweep.serial_runner("auto", PROFILE)

        def counted(p: sweep.Point, res: dict[str, Any]) -> None:
            if self.stop_after is not None and self.ran >= self.stop_after:
                raise KeyboardInterrupt
            self.ran += 1
            done(p, res)
        inner(todo, counted)


def _run(spec_path: Path, out: Path, runner: Counting) -> sweep.Outcome:
    spec, base = sweep.load_spec(spec_path)
    return sweep.run(spec, base, out, PROFILE, "test profile", runner)


def test_interrupted_sweep_resumes_and_rerun_does_no_model_work(tmp_path: Path) -> None:
    f, out = spec_file(tmp_path), tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _run(f, out, Counting(stop_after=5))
    assert len(list((out / "points").glob("*.json"))) == 5
    assert len(pd.read_parquet(out / "results.parquet")) == 5  # the table of what finished
    first = Counting()
    res = _run(f, out, first)
    assert (res.points, res.cached, res.ran, first.ran) == (16, 5, 11, 11)
    again = Counting()
    res = _run(f, out, again)
    assert (res.cached, res.ran, again.ran) == (16, 0, 0)
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 16 and df["error"].isna().all()
    for col in ("scenario", "policy", "duration", "ksm.pages_to_scan", "ksm.use_zero_pages",
                "freed_mib", "budget_ratio_peak", "ksmd_cpu_pct", "rate_limit_bypass",
                "merge_collapse", "verdicts", "profile"):
        assert col in df.columns
    # the bypass is where the thread found it: mainline, seed-uzp1 at 1000 pages
    hit = df[(df["policy"] == "mainline") & (df["scenario"] == "seed-uzp1")
             & (df["ksm.pages_to_scan"] == 1000) & (df["ksm.use_zero_pages"] == 1)]
    assert bool(hit["rate_limit_bypass"].iloc[0])
    # a changed grid reuses the points it shares with the old one
    bigger = spec_file(tmp_path, SPEC.replace("[100, 1000]", "[100, 1000, 2000]"))
    more = Counting()
    res = _run(bigger, out, more)
    assert (res.points, res.cached, more.ran) == (24, 16, 8)


def test_failed_point_is_recorded_and_the_sweep_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distributed import Client

    import ksmlab.model

    real = ksmlab.model.simulate

    def flaky(sc: Any, policy: str, **kw: Any) -> Any:
        if policy == "v1" and sc.ksm.pages_to_scan == 1000:
            raise RuntimeError("boom")
        return real(sc, policy, **kw)

    monkeypatch.setattr(ksmlab.model, "simulate", flaky)
    spec, base = sweep.load_spec(spec_file(tmp_path, SPEC.replace('"seed-uzp1"', "")))
    out = tmp_path / "out"
    # the Dask path, in this process (threads): the patched model is the one run
    with Client(processes=False, n_workers=1, threads_per_worker=2,
                dashboard_address=None) as client:
        res = sweep.run(spec, base, out, PROFILE, "p", sweep.dask_runner(client, "auto",
                                                                         PROFILE))
    assert res.ran == 8 and len(res.failed) == 2
    assert all("RuntimeError: boom" in f for f in res.failed)
    df = pd.read_parquet(out / "results.parquet")
    bad = df[df["error"].notna()]
    assert set(bad["policy"]) == {"v1"} and set(bad["ksm.pages_to_scan"]) == {1000}
    assert bad["freed_mib"].isna().all()
    assert df[df["error"].isna()]["freed_mib"].notna().all()
    # the model's own failure is deterministic: cached like any result
    assert sweep.run(spec, base, out, PROFILE, "p", Counting()).ran == 0


def test_report_of_a_folder_that_is_no_sweep(tmp_path: Path) -> None:
    r = run_cli("report", str(tmp_path))
    assert r.returncode == 2 and "not a sweep folder" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_help_fits_80_columns() -> None:
    for cmd in ("sweep", "report"):
        h = run_cli(cmd, "--help")
        assert h.returncode == 0 and "--help" in h.stdout, cmd
        assert all(len(line) <= 80 for line in h.stdout.splitlines()), (cmd, h.stdout)


def test_examples_ship_in_the_package_and_run_by_name() -> None:
    """The example specs are package data (a wheel has them): --example NAME runs one,
    --example alone and a bare `ksmlab sweep` list them, another name lists them in
    its one-line error."""
    ex = sweep.examples()
    assert set(ex) == {"seeds", "thread", "folio-sizes"}  # host-16g.toml: a scenario
    for name, (path, about) in ex.items():
        assert "src/ksmlab/sweeps/" in path.as_posix() and about, name
        spec, base = sweep.load_spec(sweep.example_spec(name))
        assert sweep.expand(spec, base, PROFILE)  # its scenario files are beside it
    for args in (["--example"], [], ["--example", "--workers", "1"]):
        r = run_cli("sweep", *args)
        assert r.returncode == 0, (args, r.stderr)
        assert all(n in r.stdout for n in ex) and "seed workloads" in r.stdout
        assert all(len(line) <= 80 for line in r.stdout.splitlines())
    r = run_cli("sweep", "--example", "nope", "-o", "x")
    assert r.returncode == 2 and r.stderr.strip() == (
        "ksmlab: error: no example sweep 'nope'; examples: folio-sizes, seeds, thread")
    r = run_cli("sweep", "--example", "seeds")
    assert r.returncode == 2 and "--out" in r.stderr
    assert "sweep --example" in run_cli("--help").stdout
    assert "--example NAME" in run_cli("sweep", "--help").stdout
