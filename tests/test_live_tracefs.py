"""KSM's tracepoints in a live run (root + KSM; tracefs and events/ksm, else skipped).

The stream is recorded and agrees with the model's; tracing is left as found, and
tracefs unmounted if it was not mounted before, also after a SIGKILL and
``ksmlab restore``.  The run records in its own trace instance: a top-level
buffer someone else is using keeps its settings and its contents.
"""

from __future__ import annotations

import json
import os
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


TOP_FILES = ("tracing_on", "buffer_size_kb", "trace_clock", "current_tracer", "set_event",
             "tracing_cpumask", "trace_options")


def tracing_state() -> dict[str, str] | None:
    """The top-level tracing state and the instances: None if tracefs is not mounted at
    /sys/kernel/tracing."""
    if KernelFS().mounted("sys/kernel/tracing") != "tracefs":
        return None
    out = {f: (TRACING / f).read_text().strip() for f in TOP_FILES if (TRACING / f).exists()}
    for d in sorted((TRACING / "events" / "ksm").glob("*/enable")):
        out[str(d.relative_to(TRACING))] = d.read_text().strip()
    out["instances"] = " ".join(sorted(p.name for p in (TRACING / "instances").iterdir()))
    return out


def same_state(before: dict[str, str] | None, after: dict[str, str] | None) -> None:
    if before is None:
        assert after is None, "tracefs left mounted"
        return
    assert after == before


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
                and rec.tracing.get("instance")
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
    inst = TRACING / "instances" / "ksmlab"
    assert (inst / "events/ksm/ksm_merge_with_ksm_page/enable").read_text().strip() == "1"
    r = subprocess.run([*KSMLAB, "restore"], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    same_state(before, tracing_state())
    assert read_all(KernelFS()) == knobs
    assert Journal().read() is None


def test_someone_elses_top_level_buffer_and_marker_survive(tmp_path: Path) -> None:
    """A top-level buffer in use (tracing on, a marker written) keeps its marker and
    every setting through a run with kernel events; tracefs is mounted by the test if
    it was not (and unmounted after).  Writing the marker expands a top-level buffer
    never used before (1.4 MiB per CPU, as any first use does); the marker is cleared
    after only when the buffer held nothing else."""
    why = ksm_events_unavailable()
    if why:
        pytest.skip(why)
    lock_free()
    fs = KernelFS()
    mounted_here = fs.mounted("sys/kernel/tracing") is None
    if mounted_here:
        fs.mount("sys/kernel/tracing", "tracefs")
    try:
        if not (TRACING / "instances").exists():
            pytest.skip("no trace instances")
        was_empty = not [x for x in (TRACING / "trace").read_text().splitlines()
                         if not x.startswith("#")]
        marker = f"ksmlab-test-marker-{os.getpid()}-{time.time_ns()}"
        on = (TRACING / "tracing_on").read_text().strip()
        if on != "1":
            (TRACING / "tracing_on").write_text("1")
        with open(TRACING / "trace_marker", "w") as fh:
            fh.write(marker)
        if on != "1":
            (TRACING / "tracing_on").write_text(on)
        assert marker in (TRACING / "trace").read_text()
        before = tracing_state()
        knobs = read_all(fs)
        f = tmp_path / "trace-marker.toml"
        f.write_text(SMALL.format(duration=2.0))
        r = run_ksmlab(["run", str(f), "--kernel-events", "--json"], timeout=120)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["kernel_events"]["recorded"], r.stdout
        assert marker in (TRACING / "trace").read_text(), "the top-level buffer was wiped"
        same_state(before, tracing_state())
        assert read_all(fs) == knobs
        if was_empty:
            with open(TRACING / "trace", "w"):
                pass  # O_TRUNC clears it: only the marker was there
    finally:
        if mounted_here:
            fs.umount("sys/kernel/tracing")
