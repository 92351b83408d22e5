"""The sweep's page: ``DIR/report.html``, one self-contained file (every figure a
base64 PNG, the style inline: it works offline and fetches nothing), and the
plain-text table for the mailing list beside it (``DIR/report.txt``).

Per scenario: policy x setting heat maps of memory freed, of the peak budget
ratio, of the verdicts and of ksmd's CPU, then memory freed over time for the
settings the spec's ``[report] curves`` chose (default: the first six).
"""

from __future__ import annotations

import base64
import html
import io
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from . import __version__
from .metrics import BYPASS_RATIO
from .report import curve_groups, draw_group, legend
from .sweep import RESULTS, SweepError, Value, need_extra, points_of, read_meta
from .trace import write_atomic

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MAX_CURVE_PANELS = 6
LOG_SPAN = 2  # the budget ratio's scale: 1/100 to 100 times the budget
CPU_SPAN = (0.1, 100.0)  # ksmd's CPU scale (% of a CPU, log): a throttled ksmd to a busy one
CPU_TICKS = [0.1, 1.0, 10.0, 100.0]
TEXT_WIDTH = 80
# verdict map: one colour per outcome (colour-blind safe, from Okabe-Ito)
OUTCOMES = (("none", "#e8e8e8"), ("rate-limit bypass", "#e69f00"),
            ("merge collapse", "#56b4e9"), ("both", "#cc79a7"), ("failed", "#555555"))
NOT_RUN = ("not run yet", "#ffffff")


def _failed(error: Any) -> bool:
    # None, or NaN where a whole column of errors was empty when Parquet typed it
    return isinstance(error, str) and bool(error)


def _setting_label(setting: dict[str, Value], sep: str = "\n") -> str:
    # the knob's own name (its last part) keeps the labels short and the kernel's
    return sep.join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in setting.items()) or "as given"


def _settings(meta: dict[str, Any]) -> list[dict[str, Value]]:
    from .sweep import Spec

    return Spec.model_validate(meta["spec"]).settings()


def _matrix(df: pd.DataFrame, policies: Sequence[str], settings: Sequence[dict[str, Value]],
            fields: Sequence[str], column: str) -> npt.NDArray[np.float64]:
    m = np.full((len(policies), len(settings)), np.nan)
    for j, st in enumerate(settings):
        sel = df
        for f in fields:
            sel = sel[sel[f] == st[f]]
        for i, p in enumerate(policies):
            v = sel.loc[sel["policy"] == p, column]
            if len(v) and v.iloc[0] is not None and not np.isnan(float(v.iloc[0])):
                m[i, j] = float(v.iloc[0])
    return m


def _png(fig: Figure) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _heat_axes(ax: Axes, m: npt.NDArray[np.float64], policies: Sequence[str],
               cols: Columns, texts: Sequence[Sequence[str]], rgba: Any, title: str) -> None:
    ax.imshow(rgba, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(cols.ticks)), cols.ticks, fontsize=8)
    ax.set_yticks(range(len(policies)), policies, fontsize=9)
    ax.tick_params(length=0)
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    ax.set_xlabel(cols.name, fontsize=8, color="#444")
    lines = max(t.count("\n") for t in cols.ticks) + 1
    ax.set_title(title, fontsize=10, loc="left", pad=14 + 11 * lines + 12 * bool(cols.name))
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            r, g, b = rgba[i, j][:3]
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            ax.text(j, i, texts[i][j], ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    ax.set_xticks(np.arange(-0.5, len(cols.ticks)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(policies)), minor=True)
    ax.grid(which="minor", color="white", lw=1.5)
    ax.tick_params(which="minor", length=0)
    for s in ax.spines.values():
        s.set_visible(False)


@dataclass(frozen=True)
class Columns:
    ticks: list[str]  # one a setting: the values of the fields that vary, a line each
    name: str  # those fields, as the kernel names them


def _figure(ncols: int, nrows: int) -> tuple[Figure, Axes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # sized to be shown at about its own size in half the page (no shrunk type)
    fig, ax = plt.subplots(figsize=(1.9 + 0.62 * ncols, 0.9 + 0.27 * nrows))
    return fig, ax


def heat_scale(m: npt.NDArray[np.float64], scale: Literal["linear", "ratio", "cpu"],
               span: tuple[float, float] = (0.0, 1.0)) -> tuple[Any, npt.NDArray[np.float64]]:
    """The colour scale of a heat map (see :func:`heat_map`) and the values it maps."""
    from matplotlib import colors

    norm: colors.Normalize
    if scale == "cpu":  # ksmd's CPU spans orders of magnitude
        norm = colors.LogNorm(*CPU_SPAN)
        vals = np.clip(np.nan_to_num(m, nan=CPU_SPAN[0]), *CPU_SPAN)
    elif scale == "ratio":  # 1 white: above red, below blue
        norm = colors.TwoSlopeNorm(0.0, -LOG_SPAN, LOG_SPAN)
        vals = np.clip(np.log10(np.clip(np.nan_to_num(m), 10.0 ** -LOG_SPAN, None)),
                       -LOG_SPAN, LOG_SPAN)
    else:
        lo, hi = span
        norm = colors.Normalize(lo, hi if hi > lo else lo + 1)
        vals = np.nan_to_num(m)
    return norm, vals


def heat_map(m: npt.NDArray[np.float64], policies: Sequence[str], cols: Columns,
             title: str, unit: str, fmt: str, cmap: str,
             scale: Literal["linear", "ratio", "cpu"] = "linear",
             span: tuple[float, float] = (0.0, 1.0)) -> str:
    """A policy x setting heat map with each cell's value written in it; NaN (a failed
    point, or a figure that does not apply) grey.  Colours on a fixed scale, never
    the data's own range (116 and 128 MiB of 128 look alike, as they are):
    ``linear`` from ``span``, ``ratio`` the budget ratio's 1/100 to 100 (log, 1
    white), ``cpu`` CPU_SPAN (log)."""
    import matplotlib
    from matplotlib import colors

    fig, ax = _figure(len(cols.ticks), len(policies))
    norm, vals = heat_scale(m, scale, span)
    rgba = matplotlib.colormaps[cmap](norm(vals))
    rgba[~np.isfinite(m)] = colors.to_rgba("#bbbbbb")
    texts = [["–" if not np.isfinite(v) else format(v, fmt) for v in r] for r in m]
    _heat_axes(ax, m, policies, cols, texts, rgba, title)
    sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    bar = fig.colorbar(sm, ax=ax, fraction=0.04, pad=0.02)
    if scale == "ratio":
        ticks = np.arange(-LOG_SPAN, LOG_SPAN + 1)
        bar.set_ticks(ticks.tolist(), labels=[f"{10.0 ** t:g}" for t in ticks])
    elif scale == "cpu":
        bar.set_ticks(CPU_TICKS, labels=[f"{t:g}" for t in CPU_TICKS])
    bar.set_label(unit, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return _png(fig)


def verdict_map(df: pd.DataFrame, policies: Sequence[str],
                settings: Sequence[dict[str, Value]], fields: Sequence[str],
                cols: Columns, title: str) -> str:
    """Which verdict each point reached; ~ marks a borderline one, ! a failed point."""
    from matplotlib import colors
    from matplotlib.patches import Patch

    fig, ax = _figure(len(cols.ticks), len(policies))
    codes = np.zeros((len(policies), len(settings)))
    texts = [["" for _ in settings] for _ in policies]
    for j, st in enumerate(settings):
        sel = df
        for f in fields:
            sel = sel[sel[f] == st[f]]
        for i, p in enumerate(policies):
            r = sel[sel["policy"] == p]
            if not len(r):  # not run yet (a sweep still going, or interrupted)
                codes[i, j] = 5
                continue
            if _failed(r["error"].iloc[0]):
                codes[i, j], texts[i][j] = 4, "!"
                continue
            b, c = bool(r["rate_limit_bypass"].iloc[0]), bool(r["merge_collapse"].iloc[0])
            codes[i, j] = 3 if b and c else 1 if b else 2 if c else 0
            texts[i][j] = "~" if r["borderline"].iloc[0] else ""
    rgba = np.array([[colors.to_rgba((*OUTCOMES, NOT_RUN)[int(c)][1]) for c in row]
                     for row in codes])
    _heat_axes(ax, codes, policies, cols, texts, rgba, title)
    shown = OUTCOMES + ((NOT_RUN,) if (codes == 5).any() else ())
    handles = [Patch(color=c, label=n) for n, c in shown] + [
        Patch(color="white", label="~ borderline")]
    # below the map, so that the image is as wide as its neighbours and not shrunk
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(0.0, -0.02),
              ncol=3, frameon=False)
    return _png(fig)


def curves(recs: Sequence[dict[str, Any]], policies: Sequence[str],
           settings: Sequence[dict[str, Value]], labels: Sequence[str], title: str) -> str:
    """Memory freed over time, one panel a setting, one line a policy (the colours
    of every other ksmlab plot); policies on one curve share it, dashed in their
    colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(settings)
    ncol = 2 if n in (2, 4) else min(n, 3)
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.9 * nrow),
                             squeeze=False, sharey=False)
    for ax, st, lab in zip(axes.flat, settings, labels, strict=False):
        drawn = [(p, rec["curve"]) for p in policies
                 for rec in [next((r for r in recs if r["policy"] == p and r["setting"] == st
                                   and r.get("curve")), None)] if rec is not None]
        groups = curve_groups(drawn, lambda a, b: a["freed_mib"] == b["freed_mib"])
        entries = []
        for k, (names, c) in enumerate(groups):
            lw = 1.4 + 2.0 * (len(groups) - 1 - k) / max(len(groups) - 1, 1)
            entries.append(draw_group(ax, c["t"], c["freed_mib"], names, lw,
                                      "\n".join(textwrap.wrap(", ".join(names), 30,
                                                               break_on_hyphens=False))))
        ax.set_title(lab, fontsize=9)
        ax.set_xlabel("time (s)", fontsize=8)
        ax.set_ylabel("memory freed (MiB)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))  # nothing freed: a line at 0, not mid-air
        # below the panel: inside, it hid the curves it names
        legend(ax, entries, fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.2), ncol=2,
               frameon=False)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    fig.tight_layout()
    return _png(fig)


def _chosen(settings: Sequence[dict[str, Value]], wanted: list[dict[str, Value]] | None
            ) -> list[dict[str, Value]]:
    if wanted is None:
        return list(settings[:MAX_CURVE_PANELS])
    return [s for s in settings if any(all(s.get(k) == v for k, v in w.items())
                                       for w in wanted)]


def text_table(df: pd.DataFrame, scenario: str, policies: Sequence[str],
               settings: Sequence[dict[str, Value]], fields: Sequence[str],
               labels: Sequence[str]) -> str:
    """Memory freed (MiB) and verdicts per policy and setting, in blocks of columns
    that fit 80 characters (plain text, for a mail)."""
    freed = _matrix(df, policies, settings, fields, "freed_mib")
    name_w = max(len(p) for p in policies) + 1
    cell_w = 9
    per_block = max(1, (TEXT_WIDTH - name_w) // cell_w)
    lines = [f"{scenario}: memory freed (MiB)",
             "  B rate-limit bypass, C merge collapse, ~ borderline, ! failed"]
    lines += [f"  S{j + 1}: {lab}" for j, lab in enumerate(labels)]
    for start in range(0, len(settings), per_block):
        cols = range(start, min(start + per_block, len(settings)))
        lines.append("")
        lines.append(" " * name_w + "".join(f"{'S' + str(j + 1):>{cell_w - 3}}   "
                                            for j in cols).rstrip())
        for i, p in enumerate(policies):
            cells = []
            for j in cols:
                st = settings[j]
                sel = df[df["policy"] == p]
                for f in fields:
                    sel = sel[sel[f] == st[f]]
                if not len(sel):
                    cells.append(f"{'':>{cell_w}}")
                    continue
                r = sel.iloc[0]
                if _failed(r["error"]):
                    cells.append(f"{'!':>{cell_w}}")
                    continue
                mark = ("B" if r["rate_limit_bypass"] else "") + (
                    "C" if r["merge_collapse"] else "") + ("~" if r["borderline"] else "")
                cells.append(f"{freed[i, j]:>{cell_w - 3}.0f} {mark:<2}")
            lines.append(f"{p:<{name_w}}" + "".join(cells).rstrip())
    return "\n".join(lines)


VERDICT_WORDS = (("rate_limit_bypass", "the rate-limit bypass"),
                 ("merge_collapse", "the merge collapse"))
NOTHING_SHARE = 0.01  # freed under 1 % of the mergeable memory: "frees nothing"


def _outcomes(d: pd.DataFrame, policy: str, settings: Sequence[dict[str, Value]],
              fields: Sequence[str]) -> list[tuple[str, ...] | None]:
    """Per setting, the verdict columns a point reached (None: failed or not run)."""
    out: list[tuple[str, ...] | None] = []
    for st in settings:
        sel = d[d["policy"] == policy]
        for f in fields:
            sel = sel[sel[f] == st[f]]
        if not len(sel) or _failed(sel["error"].iloc[0]):
            out.append(None)
            continue
        out.append(tuple(c for c, _ in VERDICT_WORDS if bool(sel[c].iloc[0])))
    return out


def _where(sub: Sequence[dict[str, Value]], settings: Sequence[dict[str, Value]],
           varying: Sequence[str]) -> str:
    """Settings in words, as short as they allow: every one; the values of each
    field they take, when they are every combination of those; else each listed."""
    if len(sub) == len(settings):
        return "at every setting"
    took = {f: list(dict.fromkeys(s[f] for s in sub)) for f in varying}
    box = [s for s in settings if all(s[f] in took[f] for f in varying)]
    if len(box) != len(sub):
        return "at " + "; ".join(_setting_label({f: s[f] for f in varying}, ", ")
                                 for s in sub)
    words = []
    for f, vals in took.items():
        if len(vals) == len({s[f] for s in settings}):
            continue  # every value of the field: it does not matter
        name = f.rsplit(".", 1)[-1]
        shown = [str(v) for v in vals]
        words.append(f"{name}={shown[0]}" if len(shown) == 1 else
                     f"{name} {', '.join(shown[:-1])} or {shown[-1]}")
    return "with " + " and ".join(words)


def summary(d: pd.DataFrame, scenario: str, policies: Sequence[str],
            settings: Sequence[dict[str, Value]], fields: Sequence[str],
            varying: Sequence[str]) -> str:
    """One paragraph: how many points reached each verdict, then the policies
    grouped by where they reached them; those with neither, those that free
    nothing."""
    n_b = int(d["rate_limit_bypass"].fillna(False).astype(bool).sum())
    n_c = int(d["merge_collapse"].fillna(False).astype(bool).sum())
    failed = int(d["error"].map(_failed).sum())
    parts = [f"{scenario}, {len(d)} points: the rate-limit bypass in {n_b}, the merge "
             f"collapse in {n_c}" + (f", {failed} failed" if failed else "") + "."]
    groups: dict[tuple[Any, ...], list[str]] = {}
    for p in policies:
        groups.setdefault(tuple(_outcomes(d, p, settings, fields)), []).append(p)
    clean: list[str] = []
    for pattern, names in groups.items():
        said = []
        for col, words in VERDICT_WORDS:
            sub = [st for st, o in zip(settings, pattern, strict=True) if o and col in o]
            if sub:
                said.append(f"{words} {_where(sub, settings, varying)}")
        missing = sum(o is None for o in pattern)
        if missing:  # failed or not run: not "at any setting"
            said.append(f"{missing} of {len(settings)} settings without a result")
        if said:
            parts.append(f"{', '.join(names)}: {'; '.join(said)}.")
        else:
            clean.extend(names)
    if clean:
        parts.append(f"Neither at any setting: {', '.join(clean)}.")
    mergeable = float(d["expected_mergeable_mib"].max() or 0)
    nothing = [p for p in policies
               if mergeable > 0 and (d.loc[d["policy"] == p, "freed_mib"].fillna(0)
                                     < NOTHING_SHARE * mergeable).all()]
    if nothing:
        parts.append(f"Freeing nothing at any setting: {', '.join(nothing)}.")
    return " ".join(parts)


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
 color:#222;background:#fafafa}
header{background:#24292f;color:#fff;padding:14px 28px}
header h1{margin:0 0 4px;font-size:20px} header p{margin:0;font-size:13px;color:#ccd}
main{padding:8px 28px 40px;max-width:1500px}
section{background:#fff;border:1px solid #ddd;border-radius:6px;margin:18px 0;padding:4px 18px 14px}
h2{font-size:17px;margin:12px 0 2px} .desc{color:#555;font-size:13px;margin:0 0 8px}
.summary{font-size:14px;max-width:1100px;margin:6px 0 12px;line-height:1.45}
.grid{display:flex;flex-wrap:wrap;gap:14px 28px;align-items:flex-start}
figure{margin:0;flex:0 1 calc(50% - 14px)} figure.wide{flex-basis:100%}
figure img{max-width:100%;height:auto;display:block}
figcaption{font-size:12px;color:#555;max-width:560px}
pre{font-size:12px;background:#f4f4f4;padding:10px;overflow-x:auto;border-radius:4px}
nav a{margin-right:14px;color:#0969da;font-size:13px}
table.fail{font-size:12px;border-collapse:collapse} table.fail td{padding:2px 8px;
 border-bottom:1px solid #eee}
"""


def _fig(fid: str, png: str, alt: str, caption: str, wide: bool = False) -> str:
    cls = ' class="wide"' if wide else ""
    return (f'<figure id="{html.escape(fid)}"{cls}><img alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{png}"><figcaption>{html.escape(caption)}'
            "</figcaption></figure>")


def _profile_text(label: str) -> str:
    """The profile's label (ProfileChoice.label(): "... : PATH") with the file's name
    only: a folder of the machine that ran the sweep means nothing to a reader."""
    head, sep, path = label.rpartition(": ")
    return f"{head}{sep}{Path(path).name}" if sep and path.startswith("/") else label


def write_report(out: Path) -> Path:
    """Write ``out/report.html`` and ``out/report.txt``; the page's path."""
    need_extra()
    import pandas as pd

    meta = read_meta(out)
    try:
        df = pd.read_parquet(out / RESULTS)
    except (OSError, ValueError) as e:
        raise SweepError(f"{out / RESULTS}: cannot read: {e}") from None
    if not len(df):
        raise SweepError(f"{out}: the sweep has no finished point yet")
    recs = points_of(out)
    fields: list[str] = meta["fields"]
    settings = _settings(meta)
    varying = [f for f in fields if len({s[f] for s in settings}) > 1]
    cols = Columns(["\n".join(str(s[f]) for f in varying) or "as given" for s in settings],
                   " / ".join(f.rsplit(".", 1)[-1] for f in varying))
    labels = [_setting_label({f: s[f] for f in varying}, ", ") for s in settings]
    chosen = _chosen(settings, meta["spec"]["report"]["curves"])
    policies = [p for p in meta["policies"] if p in set(df["policy"])]
    failed = df[df["error"].notna()]
    body, texts, nav = [], [], []
    for k, sc in enumerate(meta["scenarios"]):
        d = df[df["scenario"] == sc]
        if not len(d):
            continue
        sid = f"s{k}"
        nav.append(f'<a href="#{sid}">{html.escape(sc)}</a>')
        mat = {c: _matrix(d, policies, settings, fields, c)
               for c in ("freed_mib", "budget_ratio_peak", "ksmd_cpu_pct")}
        mergeable = float(d["expected_mergeable_mib"].max() or 0) or float(
            np.nanmax(mat["freed_mib"], initial=1.0))
        para = summary(d, sc, policies, settings, fields, varying)
        figs = [
            _fig(f"freed-{sc}", heat_map(mat["freed_mib"], policies, cols,
                                         f"{sc}: memory freed", "MiB", ".0f", "viridis",
                                         span=(0.0, mergeable)),
                 f"{sc} memory freed", "Memory freed at the end of the run (MiB): drop of "
                 f"RssAnon from its peak plus pages_sharing; colours from 0 to the "
                 f"{mergeable:.0f} MiB the scenario makes mergeable."),
            _fig(f"budget-{sc}", heat_map(mat["budget_ratio_peak"], policies, cols,
                                          f"{sc}: peak budget ratio", "x KSM's budget",
                                          ".2g", "RdBu_r", scale="ratio"),
                 f"{sc} budget ratio", "Peak rate of freeing over KSM's budget "
                 f"(pages_to_scan per sleep_millisecs); above {BYPASS_RATIO:g}x with most "
                 "of it outside KSM's counters is the rate-limit bypass."),
            _fig(f"verdicts-{sc}", verdict_map(d, policies, settings, fields, cols,
                                               f"{sc}: verdicts"),
                 f"{sc} verdicts", "The verdicts each point reached (ksmlab.metrics)."),
            _fig(f"cpu-{sc}", heat_map(mat["ksmd_cpu_pct"], policies, cols,
                                       f"{sc}: ksmd CPU", "% of a CPU", ".1f", "magma_r",
                                       scale="cpu"),
                 f"{sc} ksmd CPU", "ksmd's mean CPU over the run (the cost profile's "
                 "figure: another machine's unless calibrated here); colours on a fixed "
                 f"log scale, {CPU_SPAN[0]:g} to {CPU_SPAN[1]:g} %."),
        ]
        if chosen:
            figs.append(_fig(f"curves-{sc}", curves([r for r in recs if r["scenario"] == sc],
                                                   policies, chosen,
                                                   [labels[settings.index(c)] for c in chosen],
                                                   f"{sc}: memory freed over time"),
                             f"{sc} memory over time", "Memory freed over time per policy; "
                             "policies with the same curve share one line.", wide=True))
        first = d.iloc[0]
        fixed = [f"{f}={settings[0][f]}" for f in fields if f not in varying]
        desc = ", ".join(varying + fixed) or "no grid"
        body.append(f'<section id="{sid}"><h2>{html.escape(sc)}</h2><p class="desc">'
                    f"{len(d)} points: {len(policies)} policies x {len(settings)} settings "
                    f"({html.escape(desc)}); duration {first['duration_s']:.0f} s</p>"
                    f'<p class="summary">{html.escape(para)}</p>'
                    f'<div class="grid">{"".join(figs)}</div></section>')
        texts.append("\n".join(textwrap.wrap(para, TEXT_WIDTH, break_on_hyphens=False))
                     + "\n\n" + text_table(d, sc, policies, settings, fields,
                                            [c.replace(",", "") for c in labels]))
    text = "\n\n".join(texts) + "\n"
    write_atomic(out / "report.txt", text.encode())
    fail_html = ""
    if len(failed):
        rows = "".join(f"<tr><td>{html.escape(str(r.scenario))}</td><td>"
                       f"{html.escape(str(r.policy))}</td><td>"
                       f"{html.escape(_setting_label({f: r[f] for f in fields}, ' '))}"
                       f"</td><td>{html.escape(str(r.error))}</td></tr>"
                       for _, r in failed.iterrows())
        fail_html = (f'<section id="failed"><h2>Failed points ({len(failed)})</h2>'
                     f'<table class="fail">{rows}</table></section>')
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ksmlab sweep: {html.escape(out.name)}</title><style>{STYLE}</style></head>
<body><header><h1>ksmlab sweep: {len(df)} points, {len(failed)} failed</h1>
<p>{len(meta['scenarios'])} scenarios x {len(policies)} policies x {len(settings)} settings
({html.escape(', '.join(fields) or 'no grid')}); model, ksmlab {__version__};
{html.escape(_profile_text(str(meta['profile'])))}</p></header>
<main><nav>{''.join(nav)}<a href="#text">text table</a></nav>
{''.join(body)}{fail_html}
<section id="text"><h2>Text table (for the mailing list)</h2>
<pre>{html.escape(text)}</pre></section></main></body></html>
"""
    return write_atomic(out / "report.html", page.encode())
