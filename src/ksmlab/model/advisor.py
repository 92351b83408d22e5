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

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

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


def decide(scan_time: int, cpu_percent: int, prev_scan_time: int, prev_change: int,
           pages_to_scan: int, knobs: AdvisorKnobs) -> tuple[int, int]:
    """scan_time_advisor()'s arithmetic on its inputs: (new pages_to_scan, new change).

    ``prev_scan_time``/``prev_change``: the context's (0: no scan yet).  What the
    ksm_advisor tracepoint records (scan_time, cpu_percent) is all it needs besides
    the context and the knobs, so a kernel's recorded decisions can be checked."""
    last_scan_time = prev_scan_time or scan_time  # prev_scan_time()
    factor = knobs.target_scan_time * 100 // scan_time or 1
    change = _ewma(prev_change, scan_time * 100 // last_scan_time or 1)
    pages = pages_to_scan * 100 // factor
    pages = pages * change // 100
    per_page_cost = pages_to_scan // cpu_percent or 1
    pages = min(pages, per_page_cost * knobs.max_cpu)
    pages = max(pages, per_page_cost * KSM_ADVISOR_MIN_CPU)
    pages = min(pages, knobs.max_pages_to_scan)
    return pages, change


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
    pages, change = decide(scan_time, cpu_percent, ctx.scan_time, ctx.change, pages_to_scan,
                           knobs)
    new = AdvisorCtx(start_scan_ns=ctx.start_scan_ns, scan_time=scan_time, change=change,
                     cpu_time_ns=ksmd_runtime_ns)
    return new, AdvisorDecision(scan_time, pages, cpu_percent)


def check_decisions(decisions: Sequence[Mapping[str, Any]], pages_at_switch: int,
                    knobs: AdvisorKnobs | Sequence[AdvisorKnobs]) -> list[int]:
    """The pages_to_scan :func:`decide` gives for each recorded decision (the kernel's
    ksm_advisor tracepoints: scan_time, cpu_percent), fed what the kernel had: its
    previous decision (``pages_at_switch`` first) and the context they leave.
    ``knobs``: one for all, or one per decision (a ``set`` event changed them)."""
    out: list[int] = []
    pages, prev_time, prev_change = pages_at_switch, 0, 0
    for i, d in enumerate(decisions):
        kn = knobs if isinstance(knobs, AdvisorKnobs) else knobs[i]
        scan_time, cpu_percent = int(d["scan_time"]), int(d["cpu_percent"])
        mine, prev_change = decide(scan_time, cpu_percent, prev_time, prev_change, pages, kn)
        out.append(mine)
        prev_time = scan_time
        pages = int(d["pages_to_scan"])  # the kernel's own, whatever ours was
    return out


def knobs_of(ksm: Any) -> AdvisorKnobs:
    """The advisor_* knobs of a scenario's ``KsmKnobs``."""
    return AdvisorKnobs(max_cpu=int(ksm.advisor_max_cpu),
                        min_pages_to_scan=int(ksm.advisor_min_pages_to_scan),
                        max_pages_to_scan=int(ksm.advisor_max_pages_to_scan),
                        target_scan_time=int(ksm.advisor_target_scan_time))


def scan_clock(t_batch: float, cpu_ns: float, cpu_batch0: float) -> float:
    """The model's clock (seconds) inside a batch that began at ``t_batch``: ksmd's CPU
    since the batch began is the time that passed (both engines; compiled by the fast
    one, so the float arithmetic is the same)."""
    return t_batch + (cpu_ns - cpu_batch0) / 1e9


class Advisor:
    """The advisor as the model's ksmd runs it (both engines): advisor_start_scan() at
    a full scan's start, advisor_stop_scan() at its end (scan_get_next_rmap_item()).

    ``runtime0_ns``: ksmd's task_sched_runtime() when the model's CPU meter reads 0 (a
    live trace's baseline ksmd_cpu_ns; 0 for a pure model run).  ``replay``: the
    kernel's decisions (pages_to_scan), in order: the i-th full-scan end sets the
    i-th of them, so the counters follow the kernel's run; the model's own decision
    is recorded beside it (``predicted``)."""

    def __init__(self, ksm: Any, runtime0_ns: int = 0, replay: Sequence[int] = ()) -> None:
        self.mode: AdvisorMode = ksm.advisor_mode
        self.knobs = knobs_of(ksm)
        self.ctx = AdvisorCtx()  # set_advisor_defaults(): zeroed when the mode is switched on
        self.runtime0_ns = int(runtime0_ns)
        self.replay = [int(x) for x in replay]
        self.decisions: list[dict[str, Any]] = []

    @property
    def on(self) -> bool:
        return self.mode == "scan-time"

    def start(self, t: float) -> None:
        """advisor_start_scan(): ``t`` the model's clock (scan_clock())."""
        if self.on:
            self.ctx = start_scan(self.ctx, int(t * 1e9))

    def stop(self, t: float, cpu_ns: float, pages_to_scan: int, full_scans: int) -> int:
        """advisor_stop_scan(): the pages_to_scan after this full scan (unchanged when the
        advisor is off); ``cpu_ns`` the model's meter of ksmd's CPU."""
        if not self.on:
            return pages_to_scan
        runtime = self.runtime0_ns + int(cpu_ns)
        self.ctx, dec = scan_time_advisor(self.ctx, int(t * 1e9), runtime, pages_to_scan,
                                          self.knobs)
        n = len(self.decisions)
        used = self.replay[n] if n < len(self.replay) else dec.pages_to_scan
        self.decisions.append({"t": round(t, 9), "full_scans": full_scans,
                               "scan_time": dec.scan_time, "cpu_percent": dec.cpu_percent,
                               "pages_to_scan": used, "predicted": dec.pages_to_scan})
        return used

    def set_knobs(self, ksm: Any) -> None:
        """A ``set`` event changed an advisor_* limit: read at the next decision."""
        self.knobs = knobs_of(ksm)

    def record(self) -> dict[str, Any] | None:
        """What a trace's ``meta["advisor"]`` holds (None: the advisor was off)."""
        if not self.on:
            return None
        replayed = min(len(self.replay), len(self.decisions))
        return {"mode": self.mode, "knobs": asdict(self.knobs),
                "runtime0_ns": self.runtime0_ns, "replayed": replayed,
                "decisions": self.decisions}
