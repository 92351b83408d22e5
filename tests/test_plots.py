"""Plots: a fixed colour per policy whichever are drawn, end labels that do not stack,
the first full-scan end, THP splits and the budget multiple marked on the figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from ksmlab import report
from ksmlab.model import POLICIES, simulate
from ksmlab.scenario import load
from ksmlab.trace import Trace


@pytest.fixture(scope="module")
def traces() -> dict[str, Trace]:
    sc = load("seed-uzp1")
    return {p: simulate(sc, p, engine="fast") for p in
            ("mainline", "v1", "ksm-split-no-remap", "ksm-skip-huge", "6.12")}


def _figure(monkeypatch: pytest.MonkeyPatch, traces: list[tuple[str, Trace]],
            path: Path) -> Any:
    import matplotlib.pyplot as plt

    kept: list[Any] = []
    monkeypatch.setattr(plt, "close", kept.append)
    report.plot_freed(traces, path, "t")
    assert path.stat().st_size > 0
    return kept[-1]


def _colours(fig: Any) -> dict[str, str]:
    from matplotlib.colors import to_hex

    return {ln.get_gid(): to_hex(ln.get_color()) for ln in fig.axes[0].lines
            if ln.get_gid()}


def test_every_policy_has_its_own_colour() -> None:
    assert set(report.POLICY_COLOURS) == set(POLICIES)
    assert len(set(report.POLICY_COLOURS.values())) == len(POLICIES)
    assert report.LIVE_COLOUR not in report.POLICY_COLOURS.values()
    assert report.policy_colour("live 6.18.44") == report.LIVE_COLOUR


def test_a_policy_keeps_its_colour_whichever_are_drawn(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, traces: dict[str, Trace]) -> None:
    # 6.12 and mainline lie on one curve: drawn together, each keeps its colour
    # (dashed in turn); drawn alone or with others, the same colour
    subsets = [["mainline"], ["6.12", "mainline", "v1"], ["ksm-skip-huge", "mainline"],
               ["v1", "ksm-split-no-remap", "6.12"]]
    seen: dict[str, set[str]] = {}
    for k, names in enumerate(subsets):
        fig = _figure(monkeypatch, [(n, traces[n]) for n in names], tmp_path / f"{k}.png")
        for name, colour in _colours(fig).items():
            seen.setdefault(name, set()).add(colour)
        assert set(_colours(fig)) == set(names)
    assert {n: c.pop() for n, c in seen.items() if len(c) == 1} == {
        n: report.POLICY_COLOURS[n] for n in seen}


def test_the_figure_marks_scan_end_splits_and_the_budget_multiple(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, traces: dict[str, Trace]) -> None:
    fig = _figure(monkeypatch, [(n, traces[n]) for n in ("mainline", "v1", "ksm-skip-huge")],
                  tmp_path / "f.png")
    top = fig.axes[0]
    texts = " | ".join(t.get_text() for t in top.texts)
    assert "full scan 1 ends: merging can start" in texts
    assert "64 THPs split" in texts  # the burst at the second scan's start
    assert "= 32.8x KSM's budget" in texts
    legend = [t.get_text() for t in top.get_legend().get_texts()]
    # khugepaged's pass: a line where every run had it then, else a mark on its curve
    assert "khugepaged" in texts or "khugepaged: an event of that curve's run" in legend
    assert "mainline\npeak 32.8x the budget" in legend
    assert "THP split in that sample" in legend
    assert any(lab.startswith("KSM's budget: 19.5 MiB/s") for lab in legend)
    # the end values of the lower panel: one label a line, none on top of another
    bottom = fig.axes[1]
    ys = sorted(t.get_position()[1] for t in bottom.texts)
    assert len(ys) == 3
    lo, hi = bottom.get_ylim()
    assert min(np.diff(ys)) >= 0.07 * (hi - lo)


def test_spread_keeps_order_gap_and_bounds() -> None:
    ys = [0.0, 0.0, 0.0, 116.0, 1.0]
    out = report.spread(ys, 10.0, 0.0, 138.0)
    assert [sorted(range(5), key=lambda k: out[k])] == [sorted(range(5), key=lambda k: ys[k])]
    assert min(np.diff(sorted(out))) >= 10.0 - 1e-9
    assert all(0.0 <= y <= 138.0 for y in out) and out[3] == 116.0
    crowded = report.spread([130.0, 131.0, 132.0], 10.0, 0.0, 138.0)
    assert max(crowded) <= 138.0 and min(np.diff(sorted(crowded))) >= 10.0 - 1e-9
