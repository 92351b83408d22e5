"""KSM's tracepoints in a live run (root + KSM; tracefs and events/ksm, else skipped).

The stream is recorded and agrees with the model's; tracing is left as found, and
tracefs unmounted if it was not mounted before, also after a SIGKILL and
``ksmlab restore``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ksmlab import events, fidelity
from ksmlab.live.journal import Journal, RunLock
from ksmlab.live.kernelfs import KernelFS
from ksmlab.live.knobs import read_all
from ksmlab.model import simulate
from ksmlab.scenario import load
from ksmlab.trace import Trace

from .conftest import run_ksmlab, workload_pids

pytestmark = pytest.mark.live
KSMLAB = [sys.executable, "-m", "ksmlab"]
TRACING = Path("/sys/kernel/tracing")

SMALL = """
name = "trace-small"
duration = {duration}
[ksm]
pages_to_scan = 1000
[[process]]
count = 2
[[process.region]]
size_mib = 4
thp = "nohugepage"
seed = 3
content = {{ zero = 0.0, duplicate = 0.5 }}
"""


def tracing_state() -> dict[str, str] | None:
    """What a run may change: None if tracefs is not mounted at /sys/kernel/tracing."""
    if KernelFS().mounted("sys/kernel/tracing") != "tracefs":
        return None
    out = {f: (TRACING / f).read_text().strip()
           for f in ("tracing_on", "buffer_size_kb", "trace_clock")}
    for d in sorted((TRACING / "events" / "ksm").glob("*/enable")):
        out[str(d.relative_to(TRACING))] = d.read_text().strip()
    return out


def same_state(before: dict[str, str] | None, after: dict[str, str] | None) -> None:
    if before is None:
        assert after is None, "tracefs left mounted"
        return
    assert after is not None
    b, a = dict(before), dict(after)
    if "expanded" in b["buffer_size_kb"]:  # a buffer never used shows its future size
        b["buffer_size_kb"] = b["buffer_size_kb"].split("expanded:")[1].strip(" )")
    assert a == b


def lock_free(timeout: float = 300) -> None:
    """Wait for another engineer's live run to end (runs cannot overlap)."""
    end = time.monotonic() + timeout
    while RunLock().holder() is not None:
        if time.monotonic() > end:
            pytest.skip("another live run held the lock throughout")
        time.sleep(2)


def ksm_events_unavailable() -> str | None:
    if KernelFS().mounted("sys/kernel/tracing") == "tracefs":
        return None if (TRACING / "events" / "ksm").exists() else "no events/ksm"
    return None if TRACING.exists() else "no /sys/kernel/tracing"


def prepared(tmp_path: Path, name: str, duration: float
             ) -> tuple[Path, dict[str, str], dict[str, str] | None]:
    """The scenario file, and the knobs and tracing state before the run (skips where
    the kernel has no KSM events; waits for another live run to end)."""
    why = ksm_events_unavailable()
    if why:
        pytest.skip(why)
    f = tmp_path / f"{name}.toml"
    f.write_text(SMALL.format(duration=duration))
    lock_free()
    return f, read_all(KernelFS()), tracing_state()


def test_run_records_the_stream_and_leaves_tracing_as_found(tmp_path: Path) -> None:
    f, knobs, before = prepared(tmp_path, "trace-small", 4.0)
    r = run_ksmlab(["run", str(f), "--kernel-events", "--json", "--out", str(tmp_path)],
                   timeout=120)
    assert r.returncode == 0, r.stderr
    same_state(before, tracing_state())
    assert read_all(KernelFS()) == knobs
    assert Journal().read() is None
    d = json.loads(r.stdout)
    if not d["kernel_events"]["recorded"]:
        pytest.skip(f"this kernel gave no KSM events: {d['notes']}")
    tr = Trace.load(tmp_path / "trace-small-live.trace.json.gz")
    ke = tr.kernel_events
    assert ke is not None and ke["lost"] == 0
    # the reader sleeps on an empty pipe (a spinning one would read thousands of times)
    assert ke["pipe_reads"] < 1000, ke["pipe_reads"]
    evs = ke["events"]
    # the workloads' mms, in the scenario's order, from their own ksm_enter
    assert [e["proc"] for e in evs if e["event"] == "ksm_enter" and e["proc"] is not None
            ] == [0, 1]
    assert sorted(ke["mms"]) == ["0", "1"] and len(set(ke["mms"].values())) == 2
    seqs = [e["seq"] for e in evs if e["event"] == "ksm_start_scan"]
    assert seqs[:3] == [0, 1, 2]
    ms = events.merges(evs)
    assert len(ms) == tr["pages_sharing"][-1] > 0  # nothing unmerged in this scenario
    assert all(m.proc in (0, 1) and isinstance(m.into, list) for m in ms)
    # the model's stream, replaying this run
    sc = load(str(f))
    cand = simulate(sc, "mainline", kernel_events=True, **fidelity.replay(tr))
    fit = fidelity.streams(tr, cand)
    assert fit is not None and fit["merges_kernel"] == fit["merges_model"], fit
    assert fit["identical_share"] >= 0.95, fit
    # pagemap snapshots at each full-scan end name the merged pages
    assert ke["named_by_pagemap"] > 0 and fit["page_known_share"] >= 0.9, fit


def test_sigkill_then_restore_puts_tracing_back(tmp_path: Path) -> None:
    f, knobs, before = prepared(tmp_path, "trace-slow", 60.0)
    p = subprocess.Popen([*KSMLAB, "run", str(f), "--kernel-events"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        rec = Journal().read()
        if (rec is not None and rec.pid == p.pid and rec.tracing
                and (rec.tracing.get("saved") or [])
                and (Path("/sys/kernel/mm/ksm/run").read_text().strip() == "1")):
            break
        if p.poll() is not None:
            pytest.fail(f"the run ended: {p.stderr.read() if p.stderr else ''}")
        time.sleep(0.05)
    else:
        p.terminate()
        p.wait(timeout=60)
        pytest.fail("the run never reached KSM running with tracing on")
    p.kill()
    p.wait(timeout=10)
    end = time.monotonic() + 5
    while workload_pids() and time.monotonic() < end:
        time.sleep(0.05)
    rec = Journal().read()
    assert rec is not None and rec.tracing is not None
    assert (TRACING / "events/ksm/ksm_merge_with_ksm_page/enable").read_text().strip() == "1"
    r = subprocess.run([*KSMLAB, "restore"], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    same_state(before, tracing_state())
    assert read_all(KernelFS()) == knobs
    assert Journal().read() is None
