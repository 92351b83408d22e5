"""``ksmlab watch`` for people: the live table (80 columns), the one-line state
changes for logs, from :class:`ksmlab.monitor.Snapshot`."""

from __future__ import annotations

import os
import textwrap
from datetime import datetime

from rich.console import Group
from rich.table import Table
from rich.text import Text

from .live.watch import PAGE
from .monitor import MIB, Snapshot

WIDTH = 80
ROWS = 12  # processes shown; the rest are counted


def _mib(pages: float | None) -> str:
    return "-" if pages is None else f"{pages * PAGE / MIB:.1f}"


def _clock(wall: float | None) -> str:
    return "-" if wall is None else datetime.fromtimestamp(wall).strftime("%H:%M:%S")


def header(s: Snapshot) -> list[str]:
    """The host's lines, each within 80 columns."""
    r = s.reading
    k = r.ksm
    out = [f"ksmlab watch  Linux {os.uname().release}  "
           f"{datetime.fromtimestamp(s.wall).strftime('%Y-%m-%d %H:%M:%S')}"]
    scans = f"full_scans {k.get('full_scans', 0):.0f}"
    if s.budget_pages_s is not None:
        adv = " (advisor)" if r.advisor_mode == "scan-time" else ""
        state = (f"running: {k.get('pages_to_scan', 0):.0f} pages{adv} / "
                 f"{k.get('sleep_millisecs', 0):.0f} ms = "
                 f"{s.budget_pages_s * PAGE / MIB:.1f} MiB/s budget; {scans}")
    else:
        state = {0: "stopped", 2: "stopped, unmerged (run=2)"}.get(s.run, f"run={s.run}")
        state += f"; no budget; {scans}"
    out.append(f"KSM       {state}")
    out.append(f"          pages_sharing {k.get('pages_sharing', 0):.0f}, ksm_zero_pages "
               f"{k.get('ksm_zero_pages', 0):.0f}, use_zero_pages "
               f"{k.get('use_zero_pages', 0):.0f}")
    if s.dt:
        rate = (s.outside_pages + s.ksm_pages) * PAGE / MIB / s.dt
        ratio = "" if s.ratio is None else f" = {s.ratio:.1f}x the budget"
        out.append(f"freeing   {rate:.1f} MiB/s{ratio} (last {s.dt:.1f} s: "
                   f"{_mib(s.outside_pages)} MiB outside KSM's account, "
                   f"+{s.splits} splits)")
    else:
        out.append("freeing   - (a rate needs two readings)")
    out.append(f"outside   {_mib(s.outside_total_pages)} MiB freed outside KSM's account "
               "since the watch started")
    if s.bypass_active and s.episodes:
        e = s.episodes[-1]
        byp = (f"ACTIVE since {_clock(e.start)}: {e.bytes / MIB:.1f} MiB, peak "
               f"{e.peak_ratio:.1f}x")
    elif s.episodes:
        e = s.episodes[-1]
        byp = (f"no; last {_clock(e.start)}-{_clock(e.end)}: {e.bytes / MIB:.1f} MiB, "
               f"peak {e.peak_ratio:.1f}x")
    else:
        byp = "no"
    out.append(f"bypass    {byp} ({s.episodes_total} episodes)")
    c = s.collapse
    if c.active:
        col = f"ACTIVE since {_clock(c.since)}: {c.share * 100 if c.share else 0:.1f} % " \
              "of a healthy rate"
    elif c.share is not None:
        col = f"no ({c.share * 100:.0f} % of a healthy rate)"
    else:
        col = "no" if s.budget_pages_s is not None else "- (KSM not running)"
    out.append(f"collapse  {col}")
    cpu = "-" if s.ksmd_cpu_pct is None else f"{s.ksmd_cpu_pct:.1f} %"
    own = "-" if s.watch_cpu_pct is None else f"{s.watch_cpu_pct:.1f} %"
    out.append(f"ksmd      CPU {cpu}    watch: CPU {own}, RSS {r.self_rss_kib / 1024:.0f} MiB, "
               f"read {r.read_s * 1000:.0f} ms")
    return [line[:WIDTH] for line in out]


def table(s: Snapshot, rows: int = ROWS) -> Table:
    t = Table(box=None, pad_edge=False, show_edge=False, width=WIDTH, padding=(0, 1))
    for name, just, w in (("PID", "right", 7), ("COMM", "left", 15), ("RssAnon", "right", 8),
                          ("THP", "right", 7), ("zero pg", "right", 8), ("KSM", "right", 7),
                          ("outside", "right", 8), ("MiB/s", "right", 7)):
        t.add_column(name, justify=just, width=w, no_wrap=True)  # type: ignore[arg-type]
    for p in s.procs[:rows]:
        r = p.reading
        pages = r.pages if r.vmas is not None else None
        ksm = r.ksm.get("ksm_merging_pages", 0) + r.ksm.get("ksm_zero_pages", 0)
        rate = p.interval_pages * PAGE / MIB / p.interval_s if p.interval_s else 0.0
        t.add_row(str(p.pid), p.comm[:15], f"{r.rss_anon_kib / 1024:.1f}",
                  _mib(pages.huge if pages else None), _mib(pages.zero if pages else None),
                  _mib(ksm), _mib(p.outside_pages), f"{rate:.1f}")
    return t


def render(s: Snapshot) -> Group:
    """The live display: the host's lines, then one row per process (MiB)."""
    parts: list[Text | Table] = [Text("\n".join(header(s)))]
    if s.procs:
        parts.append(Text(""))
        parts.append(table(s))
        if len(s.procs) > ROWS:
            parts.append(Text(f"  ... {len(s.procs) - ROWS} more processes"))
        parts.append(Text("MiB; zero pg: zero-page mappings in mergeable memory; KSM: "
                          "ksm_merging_pages\n+ ksm_zero_pages; outside: freed outside "
                          "KSM's account since first seen"))
    else:
        parts.append(Text("\nno process has mergeable memory (MADV_MERGEABLE or "
                          "PR_SET_MEMORY_MERGE)"))
    for n in s.notes:
        parts.append(Text(textwrap.fill(f"note: {n}", WIDTH, subsequent_indent="  ")))
    return Group(*parts)


def plain(s: Snapshot) -> str:
    """The same as text (``--once`` outside a terminal)."""
    from io import StringIO

    from rich.console import Console

    buf = StringIO()
    Console(file=buf, width=WIDTH, color_system=None, highlight=False).print(render(s))
    return buf.getvalue().rstrip("\n")


class Changes:
    """One line per verdict state change, for logs (stdout that is not a terminal)."""

    def __init__(self) -> None:
        self.bypass = False
        self.collapse = False
        self.episodes = 0

    def lines(self, s: Snapshot) -> list[str]:
        out: list[str] = []
        stamp = datetime.fromtimestamp(s.wall).strftime("%Y-%m-%d %H:%M:%S")
        if s.bypass_active and not self.bypass and s.episodes:
            e = s.episodes[-1]
            out.append(f"{stamp} rate-limit-bypass started: {e.bytes / MIB:.1f} MiB outside "
                       f"KSM's account at {e.peak_ratio:.1f}x the budget, pids "
                       f"{','.join(map(str, e.pids)) or '-'}")
        if not s.bypass_active and self.bypass and s.episodes:
            e = s.episodes[-1]
            out.append(f"{stamp} rate-limit-bypass ended: {e.bytes / MIB:.1f} MiB, peak "
                       f"{e.peak_ratio:.1f}x, {_clock(e.start)}-{_clock(e.end)}")
        if s.collapse.active and not self.collapse:
            out.append(f"{stamp} merge-collapse: {s.collapse.evidence}")
        if not s.collapse.active and self.collapse:
            out.append(f"{stamp} merge-collapse ended")
        self.bypass, self.collapse = s.bypass_active, s.collapse.active
        return out
