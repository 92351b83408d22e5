"""Tables (text that fits 80 columns for mailing lists, markdown, JSON) and plots."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .metrics import KIB_PER_PAGE, Summary, freed_pages, ksm_accounted_pages
from .trace import MTHP_PREFIX, Trace, write_atomic

WIDTH = 80


def _f(v: float | int | None, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def summary_text(s: Summary, title: str) -> str:
    """A run's figures and verdicts, for a terminal or an email (80 columns)."""
    rows: list[tuple[str, str]] = [
        ("KSM budget", f"{_f(s.budget_mib_s)} MiB/s ({_f(s.budget_pages_per_s, '.0f')} pages/s)"),
        ("memory freed", f"{s.freed_mib:.1f} MiB of {s.expected_mergeable_mib:.1f} MiB mergeable"),
        ("  by KSM's account", f"{s.ksm_accounted_mib:.1f} MiB (pages_sharing + ksm_zero_pages)"),
        ("  as a side effect", f"{s.side_effect_mib:.1f} MiB"),
        ("peak freeing rate", f"{s.freed_rate_peak_mib_s:.1f} MiB/s = "
                              f"{_f(s.budget_ratio_peak)}x the budget (over "
                              f"{s.peak_window_s:g} s or more)"),
        ("rate after scan 1", f"{_f(s.merge_rate_mib_s, '.2f')} MiB/s"
                              + (" (from {:.1f} s, the end of full scan 1, to {:.1f} s)".format(
                                  *s.merge_rate_span_s) if s.merge_rate_span_s else "")),
        ("90 % of that after", f"{_f(s.time_to_90pct_s)} s (of what it freed, not of what"
                               " it could)"),
        ("ksmd CPU", f"{_f(s.ksmd_cpu_pct)} % mean, {_f(s.ksmd_cpu_pct_peak)} % peak (1 s)"),
        ("THPs", f"{s.thps_start:.0f} at start, {s.thps_kept:.0f} kept"),
        ("thp_split_page", f"{s.thp_split_page} (failed {s.thp_split_page_failed})"),
        *((f"hugepages-{k}", f"{m['start']} at start, {m['kept']} kept, split "
           f"{m.get('split', 0)} (failed {m.get('split_failed', 0)})")
          for k, m in s.mthp.items()),
        ("full_scans", f"{s.full_scans} ({s.pages_scanned} pages scanned)"),
    ]
    out = [title, "-" * min(WIDTH, len(title))]
    out += [f"{k:<20} {v}" for k, v in rows]
    out.append("")
    if s.verdicts:
        for v in s.verdicts:
            out += textwrap.wrap(f"VERDICT {v.name}: {v.evidence}", WIDTH,
                                 subsequent_indent="  ")
    else:
        out.append("VERDICT none: neither regression shows in this run")
    for v in s.near_misses:  # not a verdict, but too close to leave out
        out += textwrap.wrap(f"NEAR MISS {v.name}: {v.evidence}", WIDTH,
                             subsequent_indent="  ")
    for c in s.caveats:
        out += textwrap.wrap(f"CAVEAT {c}", WIDTH, subsequent_indent="  ")
    for u in s.undetermined:
        out += textwrap.wrap(f"undetermined {u}", WIDTH, subsequent_indent="  ")
    return "\n".join(out)


COMPARE_COLUMNS = (  # header, key, width (0: last, free), format; 80 columns in all
    ("policy", "policy", 23, None),
    ("freed", "freed_mib", 6, ".1f"),
    ("by KSM", "ksm_accounted_mib", 6, ".1f"),
    ("t90%", "time_to_90pct_s", 5, ".1f"),
    ("ratio", "budget_ratio_peak", 5, ".1f"),
    ("cpu%", "ksmd_cpu_pct", 4, ".1f"),
    ("THPs", "thps_kept_all", 4, ".0f"),
    ("splits", "splits_all", 6, "d"),
    ("krnl", "kernel", 4, None),
    ("verdict", "verdict", 0, None),
)


class KernelCheck(Protocol):
    """A patched kernel's word on a policy (ksmlab.kernel.validate.Confirmation)."""

    @property
    def confirmed(self) -> bool: ...

    @property
    def shipped(self) -> bool: ...  # recorded on another machine, shipped with ksmlab


Confirmed = Callable[[str], KernelCheck | None]


def compare_rows(results: Sequence[tuple[str, Summary]],
                 confirmed: Confirmed | None = None) -> list[dict[str, Any]]:
    rows = []
    for name, s in results:
        d = s.to_json()
        d["policy"] = name
        # THPs of every size: PMD-mapped (AnonHugePages) and multi-size (nr_anon)
        d["thps_kept_all"] = s.thps_kept + sum(m["kept"] for m in s.mthp.values())
        d["splits_all"] = s.thp_split_page + s.mthp_split
        ok = confirmed(name) if confirmed else None
        d["kernel_confirmed"] = None if ok is None else ok.confirmed
        d["kernel_confirmed_where"] = None if ok is None else (
            "shipped" if ok.shipped else "here")
        d["kernel"] = "-" if ok is None else (
            ("yes" if ok.confirmed else "NO") + ("*" if ok.shipped else ""))
        # borderline verdicts carry a "~"; near misses are shown in parentheses
        d["verdict"] = ",".join(
            [_abbrev(v.name) + ("~" if v.borderline else "") for v in s.verdicts]
            + [f"({_abbrev(v.name)}~)" for v in s.near_misses]) or "-"
        rows.append(d)
    return rows


def _abbrev(v: str) -> str:
    return {"rate-limit-bypass": "bypass", "merge-collapse": "collapse"}.get(v, v)


def compare_table(results: Sequence[tuple[str, Summary]], fmt: str, title: str = "",
                  confirmed: Confirmed | None = None) -> str:
    """One row per policy; ``confirmed(policy)`` says whether a patched kernel agreed
    with the model on this scenario (cached `ksmlab kernel validate` results)."""
    rows = compare_rows(results, confirmed)
    if fmt == "json":  # numbers or null: the text columns "kernel" and "verdict" are
        # kernel_confirmed and verdicts there
        return json.dumps({"title": title, "rows": [
            {k: v for k, v in r.items() if k not in ("kernel", "verdict")} for r in rows]},
            indent=1)
    if fmt == "markdown":
        head = "| " + " | ".join(h for h, *_ in COMPARE_COLUMNS) + " |"
        sep = "|" + "|".join("---" for _ in COMPARE_COLUMNS) + "|"
        body = [
            "| " + " | ".join(_cell(r, key, f) for _, key, _, f in COMPARE_COLUMNS) + " |"
            for r in rows
        ]
        return "\n".join(([f"**{title}**", ""] if title else []) + [head, sep, *body])
    # the policy name is the one cell that may not be cut: it names a kernel
    pad = max([COMPARE_COLUMNS[0][2], *(len(r["policy"]) for r in rows)])
    lines = textwrap.wrap(title, WIDTH) if title else []
    lines.append(" ".join(f"{h:<{pad if i == 0 else w}}" if w else h
                          for i, (h, _, w, _) in enumerate(COMPARE_COLUMNS)))
    for r in rows:
        cells = []
        for i, (_, key, w, f) in enumerate(COMPARE_COLUMNS):
            c = _cell(r, key, f)
            w = pad if i == 0 else w
            cells.append(f"{c[:w]:<{w}}" if w else c)
        lines.append(" ".join(cells).rstrip())
    lines.append("freed/by KSM in MiB; t90% s to free 90 %; ratio = peak freeing rate / KSM")
    lines.append("budget; cpu% = ksmd; THPs (any size) kept at the end, splits of any size;")
    lines.append("krnl: a patched kernel confirmed the model (ksmlab kernel validate): yes")
    lines.append("run here, yes* shipped with ksmlab (recorded elsewhere: ksmlab kernel")
    lines.append("results), - none recorded for this patch; verdict: bypass = rate-limit")
    lines.append("bypass, collapse = merge collapse; ~ borderline, (~) near miss.")
    lines += folio_note([s for _, s in results])
    return "\n".join(line[:WIDTH] for line in lines)


def folio_note(summaries: Sequence[Summary]) -> list[str]:
    """What the run's folio sizes mean for the regressions (80 columns), when it had
    multi-size THPs: KSM splits a whole large folio before it merges a page of it
    (try_to_merge_one_page()), and the split remaps the folio's zero subpages, so
    one merge attempt can free a whole folio; with use_zero_pages=0 a full scan
    merges about one folio (the one split's subpages become KSM pages next scan)."""
    if not summaries or not any(s.mthp for s in summaries):
        return []
    first = summaries[0]
    sizes = [(k, v["start"]) for k, v in sorted(
        first.mthp.items(), key=lambda kv: int(kv[0].removesuffix("kB")))]
    if first.thps_start:
        sizes.append(("2048kB", int(first.thps_start)))
    shown = ", ".join(f"{k.removesuffix('kB')} KiB x{n}" for k, n in sizes if n)
    if not shown:
        return []
    bursts = ", ".join(f"{k.removesuffix('kB')} KiB ({int(k.removesuffix('kB')) // 4} pages)"
                       for k, n in sizes if n)
    text = (f"Large folios at the start: {shown}. KSM splits a whole folio before it "
            f"merges a page of it and the split remaps its zero subpages: with "
            f"use_zero_pages=1 one merge attempt frees up to {bursts}; with "
            "use_zero_pages=0 a kernel that remaps merges about one folio a full scan, "
            "so smaller folios merge slower (ksmlab compare --json: mthp per size and policy).")
    return textwrap.wrap(text, WIDTH)


def _cell(row: dict[str, Any], key: str, fmt: str | None) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    return format(v, fmt) if fmt else str(v)


# One colour per policy, by name: the same in every figure and the sweep's report,
# whichever policies a figure draws (matplotlib's tab10/tab20 and Tableau hues); the
# live kernel is black.  A test keeps every policy here and every colour distinct.
POLICY_COLOURS = {
    "pre-6.12": "#1f77b4",
    "6.12": "#ff7f0e",
    "mainline": "#d62728",
    "v1": "#2ca02c",
    "v1-p2": "#98df8a",
    "v1-p3": "#c49c94",
    "rfc": "#9467bd",
    "ksm-split-no-remap": "#8c564b",
    "ksm-skip-zeropage": "#e377c2",
    "ksm-skip-huge": "#17becf",
    "ksm-huge-under-pressure": "#bcbd22",
    "ksm-accounted-remap": "#393b79",
}
LIVE_COLOUR = "black"
EVENT_COLOUR = "0.35"  # events and the first full-scan end: no policy's colour
BURST_SPLITS = 16  # THPs split in one sample that plot_freed counts in words
# a scenario event marked on the curve of the run it happened in (plot_freed)
EVENT_MARKERS = {"khugepaged": "D", "pressure": "v", "write": "s", "set": "P",
                 "ksm_stop": "X", "ksm_unmerge": "X"}


def policy_colour(name: str) -> str:
    """The same colour for a policy in every plot; the live kernel in black."""
    return POLICY_COLOURS.get(name, LIVE_COLOUR)


def _first_scan_end(tr: Trace) -> float | None:
    """When merging can start: KSM needs two visits, so not before the first
    full scan ends (the unstable tree is filled in the first)."""
    if "full_scans" not in tr.columns or not len(tr.t):
        return None
    done = np.flatnonzero(tr.since_start("full_scans") >= 1)
    return float(tr.t[done[0]]) if len(done) else None


def split_times(tr: Trace) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The samples at which THPs of any size were split (thp_split_page and the
    multi-size THP ``split`` counters rose), and how many were split in each."""
    cols = [c for c in tr.columns if c == "thp_split_page"
            or (c.startswith(MTHP_PREFIX) and c.endswith("/split"))]
    if not cols or len(tr.t) < 2:
        return np.zeros(0), np.zeros(0)
    rise = np.diff(sum(tr.since_start(c) for c in cols))
    at = rise > 0
    return np.asarray(tr.t[1:][at], dtype=np.float64), rise[at]


def spread(ys: Sequence[float], gap: float, lo: float, hi: float) -> list[float]:
    """Label heights near ``ys`` (same order) at least ``gap`` apart, within
    [lo, hi] where there is room: end labels that do not stack."""
    order = sorted(range(len(ys)), key=lambda k: ys[k])
    pos = [min(max(ys[k], lo), hi) for k in order]
    for k in range(1, len(pos)):  # upwards: each at least a gap above the one below
        pos[k] = max(pos[k], pos[k - 1] + gap)
    over = pos[-1] - hi if pos else 0.0
    if over > 0:  # then down from the top, as far as the bottom allows
        pos[-1] = hi
        for k in range(len(pos) - 2, -1, -1):
            pos[k] = min(pos[k], pos[k + 1] - gap)
        under = lo - pos[0]
        if under > 0:
            pos = [y + under for y in pos]
    out = [0.0] * len(ys)
    for k, y in zip(order, pos, strict=True):
        out[k] = y
    return out


def peak_at(t: npt.NDArray[np.float64], y: npt.NDArray[np.float64],
            window: float) -> tuple[float, float, float] | None:
    """Where ``y`` rose fastest over a span of ``window`` or more (as
    metrics.peak_rate measures it): (rate, t, y) at the span's middle."""
    if len(t) < 2:
        return None
    j = np.searchsorted(t, t + window)
    i = np.flatnonzero(j < len(t))
    if not len(i):
        return None
    rates = (y[j[i]] - y[i]) / (t[j[i]] - t[i])
    k = int(np.argmax(rates))
    a, b = int(i[k]), int(j[i[k]])
    return float(rates[k]), float(t[a] + t[b]) / 2, float(y[a] + y[b]) / 2


def curve_groups(curves: Sequence[tuple[str, Any]],
                 same: Callable[[Any, Any], bool]) -> list[tuple[list[str], Any]]:
    """Policies whose curves are the same share one line: (names, first curve)."""
    groups: list[tuple[list[str], Any]] = []
    for name, c in curves:
        g = next((g for g in groups if same(g[1], c)), None)
        if g is not None:
            g[0].append(name)
        else:
            groups.append(([name], c))
    return groups


def draw_group(ax: Any, t: Any, y: Any, names: Sequence[str], lw: float,
               label: str | None = None) -> Any:
    """One line for policies with the same curve, dashed in each one's colour in
    turn (one colour: solid); the legend handle shows every colour."""
    from matplotlib.lines import Line2D

    k = len(names)
    seg = 3.0  # dash length, in line widths
    for m, n in enumerate(names):
        style: Any = "-" if k == 1 else (m * seg, (seg, (k - 1) * seg))
        ax.plot(t, y, color=policy_colour(n), lw=lw, ls=style, solid_capstyle="butt",
                dash_capstyle="butt", gid=n)
    handle = tuple(Line2D([], [], color=policy_colour(n), lw=3.0) for n in names)
    return handle, label


def legend(ax: Any, entries: Sequence[tuple[Any, str]], **kw: Any) -> None:
    """A legend whose policy entries show each colour of their line side by side."""
    from matplotlib.legend_handler import HandlerTuple

    if entries:
        ax.legend([h for h, _ in entries], [lab for _, lab in entries],
                  handler_map={tuple: HandlerTuple(ndivide=None, pad=0.0)},
                  handlelength=2.6, **kw)


def _wrap(text: str, width: int = 30) -> str:
    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False))


def plot_freed(traces: Sequence[tuple[str, Trace]], path: Path, title: str) -> Path:
    """Two panels over time: memory freed (top) and freed by KSM's own account
    (pages_sharing + ksm_zero_pages, bottom; zero where the remap freed it all
    unseen).  A fixed colour per policy (policies on one curve share it, dashed in
    their colours); KSM's budget from the first full-scan end, that end marked,
    each curve's peak as a multiple of the budget, THP splits and the scenario's
    events marked; the legend beside the data, end values in the lower panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import BYPASS_RATIO, PEAK_WINDOW_S

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7.4), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    mib = KIB_PER_PAGE / 1024
    tmax, budget, start = 0.0, None, None
    for _, tr in traces:
        k = tr.meta["scenario"]["ksm"]
        if budget is None and k["sleep_millisecs"] > 0:
            budget = k["pages_to_scan"] * 1000 / k["sleep_millisecs"] * mib
        start = start if start is not None else _first_scan_end(tr)
        tmax = max(tmax, float(tr.t[-1]) if len(tr.t) else 0.0)
    window = max(PEAK_WINDOW_S, 2 * float(traces[0][1].meta["scenario"].get(
        "sample_interval", 0.1))) if traces else PEAK_WINDOW_S
    groups = curve_groups(traces, lambda a, b: len(a) == len(b)
                          and np.array_equal(freed_pages(a), freed_pages(b))
                          and np.array_equal(ksm_accounted_pages(a), ksm_accounted_pages(b)))
    top_mib = 1.0
    entries: list[tuple[Any, str]] = []
    ends: list[tuple[float, float, str]] = []  # lower panel: (t, MiB, colour) per line
    steepest: tuple[float, float, float] | None = None
    splits_drawn = False
    for i, (names, tr) in enumerate(groups):
        freed = freed_pages(tr) * mib
        acct = ksm_accounted_pages(tr) * mib
        # earlier lines wider: a curve another one lies on (often at 0) stays seen
        lw = 1.6 + 2.4 * (len(groups) - 1 - i) / max(len(groups) - 1, 1)
        peak = peak_at(tr.t, freed, window)
        ratio = peak[0] / budget if peak and budget else None
        label = _wrap(", ".join(names)) + (f"\npeak {ratio:.1f}x the budget"
                                           if ratio is not None else "")
        entries.append(draw_group(top, tr.t, freed, names, lw, label))
        draw_group(bottom, tr.t, acct, names, lw)
        if len(acct):
            ends.append((float(tr.t[-1]), float(acct[-1]), policy_colour(names[0])))
        st, n = split_times(tr)
        if len(st):  # where THPs were split: a tick on the curve
            top.plot(st, np.interp(st, tr.t, freed), ls="none", marker="|", ms=7, mew=0.9,
                     color=EVENT_COLOUR, zorder=5)
            splits_drawn = True
            k = int(np.argmax(n))
            if n[k] >= BURST_SPLITS:  # a burst: the count, where a tick says little
                top.annotate(f"{n[k]:.0f} THPs split", (st[k], float(np.interp(
                    st[k], tr.t, freed))), xytext=(6, -4), textcoords="offset points",
                    fontsize=7, color=EVENT_COLOUR, va="top")
        if peak and ratio is not None and ratio > BYPASS_RATIO and (
                steepest is None or peak[0] > steepest[0]):
            steepest = peak
        top_mib = max(top_mib, float(np.nanmax(freed)) if len(freed) else 0.0)
    if budget and start is not None and tmax > start:
        tt = np.array([start, tmax])
        for ax in (top, bottom):
            ax.plot(tt, budget * (tt - start), color="grey", ls=":", lw=1.4)
        entries.append((matplotlib.lines.Line2D([], [], color="grey", ls=":", lw=1.4),
                        f"KSM's budget: {budget:.1f} MiB/s\nfrom the first full-scan end"))
    if start is not None:
        for ax in (top, bottom):
            ax.axvline(start, color=EVENT_COLOUR, lw=0.9, ls=(0, (1, 2)))
        top.annotate("full scan 1 ends: merging can start", (start, 1.0),
                     xycoords=("data", "axes fraction"), xytext=(-3, -3),
                     textcoords="offset points", fontsize=7, color=EVENT_COLOUR,
                     rotation=90, va="top", ha="right")
    if splits_drawn:
        entries.append((matplotlib.lines.Line2D([], [], ls="none", marker="|", ms=7,
                                                mew=0.9, color=EVENT_COLOUR),
                        "THP split in that sample"))
    if steepest is not None and budget:
        rate, t_at, y_at = steepest
        top.annotate(f"{rate:.0f} MiB/s\n= {rate / budget:.1f}x KSM's budget",
                     (t_at, y_at), xytext=(-14, -34), textcoords="offset points",
                     ha="right", va="center", fontsize=8,
                     bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "0.7"},
                     arrowprops={"arrowstyle": "->", "color": "0.3", "lw": 0.8})
    for ax in (top, bottom):
        ax.set_ylim(0, top_mib * 1.08)
        ax.set_xlim(0, tmax * 1.0 if tmax else 1.0)
        ax.grid(alpha=0.3)
    if ends:  # end values beside the lower panel, spread so that none stack
        gap = top_mib * 1.08 * 0.075
        ys = spread([y for _, y, _ in ends], gap, 0.0, top_mib * 1.08)
        for (t_end, y, colour), y_text in zip(ends, ys, strict=True):
            # a leader from the label's left edge to the curve's end: they fan out
            # from the labels and never cross one
            bottom.annotate(f"{y:.0f} MiB", (t_end, y), xytext=(tmax * 1.03, y_text),
                            textcoords="data", fontsize=7, color=colour, va="center",
                            annotation_clip=False,
                            arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.6,
                                        "shrinkA": 1, "shrinkB": 1, "relpos": (0.0, 0.5)})
    # events every run had at the same time: a line across both panels; the others
    # (aligned to a full-scan end, which differs by policy): a mark on their curve
    def at(tr: Trace) -> list[tuple[str, float]]:
        return [(str(e["action"]), float(e["t"])) for e in tr.events
                if e.get("action") not in ("ksm_start", None)]

    def has(evs: list[tuple[str, float]], e: tuple[str, float]) -> bool:
        return any(a == e[0] and abs(t - e[1]) < 0.05 for a, t in evs)

    runs = [at(tr) for _, tr in traces]
    shared = [e for e in runs[0] if all(has(r, e) for r in runs)] if runs else []
    marked: set[str] = set()
    for _, tr in groups:
        own = [e for e in at(tr) if not has(shared, e)]
        freed = freed_pages(tr) * mib
        for action, t_e in own:
            top.plot([t_e], [float(np.interp(t_e, tr.t, freed))], ls="none",
                     marker=EVENT_MARKERS.get(action, "D"), ms=6, mfc="white",
                     mec=EVENT_COLOUR, mew=1.0, zorder=6)
            marked.add(action)
    for action in sorted(marked):
        entries.append((matplotlib.lines.Line2D(
            [], [], ls="none", marker=EVENT_MARKERS.get(action, "D"), ms=6, mfc="white",
            mec=EVENT_COLOUR, mew=1.0), f"{action}: an event of that curve's run"))
    for action, t_e in shared:
        for ax in (top, bottom):
            ax.axvline(t_e, color=EVENT_COLOUR, lw=0.8, ls="--", alpha=0.8)
        top.annotate(action, (t_e, 1.0),
                     xycoords=("data", "axes fraction"), xytext=(-3, -3),
                     textcoords="offset points", fontsize=7, color=EVENT_COLOUR,
                     rotation=90, va="top", ha="right",
                     bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none",
                           "alpha": 0.8})
    top.set_ylabel("memory freed (MiB)")
    bottom.set_ylabel("freed by KSM's account\n(MiB)")
    bottom.set_xlabel("time since the workload was ready (s)")
    # the scenario's own one-line description, so the plot reads without the text
    desc = str(traces[0][1].meta.get("scenario", {}).get("description", "")) if traces else ""
    top.set_title("\n".join(textwrap.wrap(f"{title}: {desc}" if desc else title, 90)))
    legend(top, entries, fontsize=8, loc="upper left", bbox_to_anchor=(1.07, 1.0),
           borderaxespad=0)
    fig.tight_layout()
    write_atomic(path, writer=lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


VALIDATION_PANELS = (
    ("RssAnon", "RssAnon (MiB)", 1 / 1024),
    ("pages_sharing", "pages_sharing", 1.0),
    ("ksm_zero_pages", "ksm_zero_pages", 1.0),
    ("pages_unshared", "pages_unshared", 1.0),
    ("thp_split_page", "thp_split_page", 1.0),
    ("full_scans", "full_scans", 1.0),
)


def plot_validation(name: str, ref: Trace, cand: Trace, path: Path,
                    labels: tuple[str, str] = ("kernel", "model")) -> Path:
    """Kernel and model side by side, counter by counter, full-scan ends marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), sharex=True)
    # the kernel in black, the model in its policy's colour (as every other plot)
    colours = [LIVE_COLOUR, policy_colour(str(cand.meta.get("kernel", "")).removeprefix(
        "model:"))]
    if colours[1] == LIVE_COLOUR:
        colours[1] = "#d62728"
    for ax, (col, label, scale) in zip(axes.flat, VALIDATION_PANELS, strict=True):
        for tr, style, who, colour in ((ref, "-", labels[0], colours[0]),
                                       (cand, "--", labels[1], colours[1])):
            if col in tr:
                ax.plot(tr.t, tr.since_start(col) * scale, style, lw=1.4, label=who,
                        color=colour)
                ends = sorted(tr.checkpoints().values())
                ax.plot(tr.t[ends], tr.since_start(col)[ends] * scale, "o" if style == "-"
                        else "x", ms=3, color=colour)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("time (s)")
    fig.suptitle(f"{name}: {labels[0]} (solid, o = full-scan end) vs {labels[1]} (dashed, x)")
    fig.tight_layout()
    write_atomic(path, writer=lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path
