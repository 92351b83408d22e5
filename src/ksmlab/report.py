"""Tables (text that fits 80 columns for mailing lists, markdown, JSON) and plots."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .metrics import KIB_PER_PAGE, Summary, freed_pages, ksm_accounted_pages
from .trace import Trace, write_atomic

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
                              f"{_f(s.budget_ratio_peak)}x the budget"),
        ("rate after scan 1", f"{_f(s.merge_rate_mib_s, '.2f')} MiB/s"),
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


def policy_colour(name: str) -> str:
    """The same colour for a policy in every plot; the live kernel in black."""
    from .model import POLICIES

    names = list(POLICIES)
    if name not in names:
        return "black"
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    rgba = cmap((names.index(name) * 2 % 20 + names.index(name) * 2 // 20) / 19)
    return str(matplotlib.colors.to_hex(rgba))


def _first_scan_end(tr: Trace) -> float | None:
    """When merging can start: KSM needs two visits, so not before the first
    full scan ends (the unstable tree is filled in the first)."""
    if "full_scans" not in tr.columns or not len(tr.t):
        return None
    done = np.flatnonzero(tr.since_start("full_scans") >= 1)
    return float(tr.t[done[0]]) if len(done) else None


def plot_freed(traces: Sequence[tuple[str, Trace]], path: Path, title: str) -> Path:
    """Two panels over time: memory freed (top) and freed by KSM's own account
    (pages_sharing + ksm_zero_pages, bottom; zero where the remap freed it all
    unseen), a fixed colour per policy, KSM's budget from the first full-scan end,
    the scenario's events marked, the legend beside the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    mib = KIB_PER_PAGE / 1024
    tmax, budget, start = 0.0, None, None
    # policies with the same curves share one line (and one legend entry)
    groups: list[tuple[list[str], Trace]] = []
    for label, tr in traces:
        same = next((g for g in groups if len(g[1]) == len(tr)
                     and np.array_equal(freed_pages(g[1]), freed_pages(tr))
                     and np.array_equal(ksm_accounted_pages(g[1]), ksm_accounted_pages(tr))), None)
        if same is not None:
            same[0].append(label)
        else:
            groups.append(([label], tr))
    top_mib = 1.0
    for i, (labels, tr) in enumerate(groups):
        colour = policy_colour(labels[0])
        label = "\n".join(textwrap.wrap(", ".join(labels), 28, break_on_hyphens=False))
        freed = freed_pages(tr) * mib
        # earlier lines wider: a curve another one lies on (often at 0) stays seen
        lw = 1.6 + 2.4 * (len(groups) - 1 - i) / max(len(groups) - 1, 1)
        top.plot(tr.t, freed, label=label, lw=lw, color=colour)
        acct = ksm_accounted_pages(tr) * mib
        bottom.plot(tr.t, acct, lw=lw, color=colour)
        if len(acct):
            bottom.annotate(f"{acct[-1]:.0f}", (float(tr.t[-1]), float(acct[-1])),
                            xytext=(4, 3 * i), textcoords="offset points", fontsize=7,
                            color=colour)
        top_mib = max(top_mib, float(np.nanmax(freed)) if len(freed) else 0.0)
        tmax = max(tmax, float(tr.t[-1]))
        k = tr.meta["scenario"]["ksm"]
        if k["sleep_millisecs"] > 0:
            budget = k["pages_to_scan"] * 1000 / k["sleep_millisecs"] * mib
        start = start if start is not None else _first_scan_end(tr)
    if budget and start is not None and tmax > start:
        tt = np.array([start, tmax])
        for ax in (top, bottom):
            ax.plot(tt, budget * (tt - start), color="grey", ls=":", lw=1.4,
                    label=f"KSM's budget: {budget:.1f} MiB/s\nfrom the first full-scan end"
                    if ax is top else None)
    for ax in (top, bottom):
        ax.set_ylim(0, top_mib * 1.08)
        ax.grid(alpha=0.3)
    events = [e for e in traces[0][1].events if e.get("action") not in ("ksm_start", None)]
    for e in events:
        for ax in (top, bottom):
            # neutral: no policy's colour (tab20 holds red) may be read as an event
            ax.axvline(float(e["t"]), color="0.3", lw=0.8, ls="--", alpha=0.7)
        top.annotate(str(e["action"]), (float(e["t"]), top_mib * 1.02), fontsize=7,
                     color="0.3", rotation=90, va="top", ha="right")
    top.set_ylabel("memory freed (MiB)")
    bottom.set_ylabel("freed by KSM's account\n(MiB)")
    bottom.set_xlabel("time since the workload was ready (s)")
    # the scenario's own one-line description, so the plot reads without the text
    desc = str(traces[0][1].meta.get("scenario", {}).get("description", "")) if traces else ""
    top.set_title("\n".join(textwrap.wrap(f"{title}: {desc}" if desc else title, 90)))
    top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
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
    for ax, (col, label, scale) in zip(axes.flat, VALIDATION_PANELS, strict=True):
        for tr, style, who in ((ref, "-", labels[0]), (cand, "--", labels[1])):
            if col in tr:
                ax.plot(tr.t, tr.since_start(col) * scale, style, lw=1.4, label=who)
                ends = sorted(tr.checkpoints().values())
                ax.plot(tr.t[ends], tr.since_start(col)[ends] * scale, "o" if style == "-"
                        else "x", ms=3, color=ax.lines[-1].get_color())
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
