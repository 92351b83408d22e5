"""``ksmlab run``: a scenario on the running kernel (the live lab)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from .. import metrics
from .common import DurationOpt, JsonOpt, OutOpt, ScenarioArg, check_out, emit, live_run, load


def run(scenario: ScenarioArg, duration: DurationOpt = None, out: OutOpt = None,
        json_out: JsonOpt = False,
        kernel_events: Annotated[bool, typer.Option(
            "--kernel-events", help="also record KSM's tracepoints (tracefs) in the trace")]
        = False) -> None:
    """Run a scenario on the running kernel (root): knobs set and always restored."""
    sc = load(scenario, duration)
    check_out(out)
    tr = live_run(sc, kernel_events=kernel_events, name_errors=False)
    summary = metrics.summarize(tr)
    extra: dict[str, Any] = {}
    if tr.kernel_events is not None:
        ke = tr.kernel_events
        extra["kernel_events"] = {k: ke.get(k) for k in ("recorded", "counts", "lost")}
    emit(tr, summary, f"{sc.name} on Linux {tr.meta['kernel']} (live)", json_out, out, extra)
