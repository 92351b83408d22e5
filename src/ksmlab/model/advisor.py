"""KSM's scan-time advisor (``advisor_mode=scan-time``, Linux 6.8), as mm/ksm.c has it.

After every full scan (``advisor_stop_scan()``, just before ``seqnr`` moves on)
``scan_time_advisor()`` sets ``pages_to_scan`` from how long the scan took
against ``advisor_target_scan_time``, smoothed by an EWMA of the change, and
capped by the CPU ksmd used in the scan:

    scan_time  = whole seconds the scan took (at least 1)
    cpu_pct    = ksmd's CPU ms in the scan * 100 / (scan_time * 1000), at least 1
    factor     = target_scan_time * 100 / scan_time
    change     = ewma(prev change, scan_time * 100 / prev scan_time)
    pages      = pages_to_scan * 100 / factor * change / 100
    cost       = pages_to_scan / cpu_pct            (pages per 1 % of a CPU)
    pages      = min(max(min(pages, cost * max_cpu), cost * 10), max_pages_to_scan)

All in unsigned integer arithmetic, which this module keeps (Python ``//`` on
values that are never negative).  Two consequences worth knowing:
- ``advisor_min_pages_to_scan`` is only the value set when the mode is switched
  on (``set_advisor_defaults()``); the floor after a scan is 10 % of a CPU.
- Switching the mode zeroes the context, ``cpu_time`` included, so the first
  scan's CPU is ksmd's ``task_sched_runtime()`` since it started: on a host
  where ksmd ever ran, the first decision sees a large ``cpu_pct`` and a small
  ``cost``.  The model takes that runtime as an input (the live trace's
  baseline of ``ksmd_cpu_ns``).

The model never touches the kernel; the caller passes the clock and ksmd's CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

DEFAULT_PAGES_TO_SCAN = 100  # ksm_thread_pages_to_scan's default (mm/ksm.c)
KSM_ADVISOR_MIN_CPU = 10  # percent of a CPU: the floor after every scan
EWMA_WEIGHT = 30  # percent given to the newest change

AdvisorMode = Literal["none", "scan-time"]


@dataclass(frozen=True)
class AdvisorKnobs:
    """/sys/kernel/mm/ksm/advisor_*; defaults are the kernel's."""

    max_cpu: int = 70  # advisor_max_cpu, percent
    min_pages_to_scan: int = 500  # advisor_min_pages_to_scan
    max_pages_to_scan: int = 30000  # advisor_max_pages_to_scan
    target_scan_time: int = 200  # advisor_target_scan_time, seconds


@dataclass(frozen=True)
class AdvisorCtx:
    """struct advisor_ctx."""

    start_scan_ns: int = 0  # ktime_get() when the scan started
    scan_time: int = 0  # seconds the previous scan took (0: none yet)
    change: int = 0  # percent, the EWMA of scan-time changes
    cpu_time_ns: int = 0  # ksmd's task_sched_runtime() at the previous scan's end


@dataclass(frozen=True)
class AdvisorDecision:
    """What one scan_time_advisor() call did (the ksm_advisor tracepoint's fields)."""

    scan_time: int
    pages_to_scan: int
    cpu_percent: int


def pages_on_switch(mode: AdvisorMode, knobs: AdvisorKnobs) -> int:
    """set_advisor_defaults(): pages_to_scan when advisor_mode changes."""
    return knobs.min_pages_to_scan if mode == "scan-time" else DEFAULT_PAGES_TO_SCAN


def start_scan(ctx: AdvisorCtx, now_ns: int) -> AdvisorCtx:
    """advisor_start_scan(), at the start of a full scan."""
    return replace(ctx, start_scan_ns=now_ns)


def _ewma(prev: int, curr: int) -> int:
    return ((100 - EWMA_WEIGHT) * prev + EWMA_WEIGHT * curr) // 100


def scan_time_advisor(ctx: AdvisorCtx, now_ns: int, ksmd_runtime_ns: int,
                      pages_to_scan: int, knobs: AdvisorKnobs
                      ) -> tuple[AdvisorCtx, AdvisorDecision]:
    """scan_time_advisor() at the end of a full scan: the new context and decision.

    ``ksmd_runtime_ns`` is ksmd's CPU time since it started (task_sched_runtime()),
    not since the scan began: the context keeps the previous value.
    """
    # ktime_ms_delta() / MSEC_PER_SEC: whole seconds, truncated
    scan_time = max(0, now_ns - ctx.start_scan_ns) // 1_000_000 // 1000 or 1
    cpu_diff_ms = max(0, ksmd_runtime_ns - ctx.cpu_time_ns) // 1000 // 1000
    cpu_percent = (cpu_diff_ms * 100) // (scan_time * 1000) or 1
    last_scan_time = ctx.scan_time or scan_time  # prev_scan_time()
    factor = knobs.target_scan_time * 100 // scan_time or 1
    change = _ewma(ctx.change, scan_time * 100 // last_scan_time or 1)
    pages = pages_to_scan * 100 // factor
    pages = pages * change // 100
    per_page_cost = pages_to_scan // cpu_percent or 1
    pages = min(pages, per_page_cost * knobs.max_cpu)
    pages = max(pages, per_page_cost * KSM_ADVISOR_MIN_CPU)
    pages = min(pages, knobs.max_pages_to_scan)
    new = AdvisorCtx(start_scan_ns=ctx.start_scan_ns, scan_time=scan_time, change=change,
                     cpu_time_ns=ksmd_runtime_ns)
    return new, AdvisorDecision(scan_time, pages, cpu_percent)
