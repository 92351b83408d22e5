"""DAMON schemes beside the lab: found where they can touch THPs, ignored otherwise."""

from __future__ import annotations

from pathlib import Path

from ksmlab.live.damon import ADMIN, active_schemes
from ksmlab.live.kernelfs import KernelFS


def kdamond(root: Path, kd: int, state: str, action: str, age: int, aggr_us: int) -> None:
    base = root / ADMIN / str(kd)
    ctx = base / "contexts" / "0"
    (ctx / "schemes" / "0" / "access_pattern" / "age").mkdir(parents=True)
    (ctx / "monitoring_attrs" / "intervals").mkdir(parents=True)
    (base / "state").write_text(state + "\n")
    (ctx / "operations").write_text("paddr\n")
    (ctx / "monitoring_attrs" / "intervals" / "aggr_us").write_text(f"{aggr_us}\n")
    (ctx / "schemes" / "0" / "action").write_text(action + "\n")
    (ctx / "schemes" / "0" / "access_pattern" / "age" / "min").write_text(f"{age}\n")


def test_running_schemes_that_act_on_thps(tmp_path: Path) -> None:
    kdamond(tmp_path, 0, "on", "pageout", 12, 5_000_000)  # as on these machines
    kdamond(tmp_path, 1, "off", "pageout", 0, 100_000)  # not running
    kdamond(tmp_path, 2, "on", "stat", 0, 100_000)  # only counts
    found = active_schemes(KernelFS(tmp_path))
    assert [str(s) for s in found] == ["kdamond 0 (paddr): pageout for regions aged 60 s"]
    assert found[0].min_age_s == 60.0


def test_no_damon_is_nothing(tmp_path: Path) -> None:
    assert active_schemes(KernelFS(tmp_path)) == []
