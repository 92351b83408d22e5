"""``ksmlab watch`` on the real kernel (root + KSM).

A real Prometheus server (Debian's ``prometheus``, started here on a free port with
a generated config and the shipped rules, in a temporary folder, killed at the end)
scrapes ``watch --prometheus`` while ``ksmlab run`` runs the regressions and their
baselines in another process: PromQL through the HTTP API sees the bypass on
``seed-uzp1``, the collapse on ``seed-uzp0``, and neither on the no-THP baselines
nor with KSM stopped.  Every KSM/THP knob and the tracing state are as before after
the watch is stopped by SIGINT, SIGTERM or SIGKILL (with ``--tracepoints``, after
``ksmlab restore`` for SIGKILL).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ksmlab.live.journal import Journal
from ksmlab.live.kernelfs import KernelFS
from ksmlab.live.knobs import read_all
from ksmlab.live.watchtrace import INSTANCE, JOURNAL

from .conftest import REQUIRE_LIVE, run_ksmlab
from .test_live_tracefs import TRACING, lock_free, same_state, tracing_state

pytestmark = pytest.mark.live
KSMLAB = [sys.executable, "-m", "ksmlab"]
RULES = Path(__file__).parents[1] / "contrib" / "prometheus" / "ksmlab.rules.yml"
MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # loopback only
        data: bytes = r.read()
        return data


def wait_for(url: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            get(url)
            return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.2)


class Prometheus:
    """A Prometheus server of the test's own on 127.0.0.1, scraping one target."""

    def __init__(self, folder: Path, target: str) -> None:
        self.port = free_port()
        cfg = folder / "prometheus.yml"
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {RULES}\n"
            "scrape_configs:\n  - job_name: ksmlab\n    static_configs:\n"
            f"      - targets: ['{target}']\n")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=(folder / "prometheus.log").open("w"),
            cwd=folder)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_for(f"{self.url}/-/ready")

    def query(self, promql: str) -> list[dict[str, Any]]:
        q = urllib.parse.urlencode({"query": promql})
        d = json.loads(get(f"{self.url}/api/v1/query?{q}"))
        assert d["status"] == "success", d
        out: list[dict[str, Any]] = d["data"]["result"]
        return out

    def value(self, promql: str) -> float | None:
        res = self.query(promql)
        return max(float(r["value"][1]) for r in res) if res else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def prometheus_bin() -> str:
    tool = shutil.which("prometheus")
    if tool is None:
        if REQUIRE_LIVE:
            pytest.fail("prometheus is missing (Debian's prometheus package: make system-deps)")
        pytest.skip("prometheus is missing (Debian's prometheus package)")
    pytest.importorskip("prometheus_client")
    return tool


@pytest.fixture
def watched(tmp_path: Path, prometheus_bin: str) -> Iterator[tuple[Prometheus, str]]:
    """watch --prometheus on a free port, and a Prometheus server scraping it."""
    lock_free()
    port = free_port()
    w = subprocess.Popen([*KSMLAB, "watch", "--prometheus", f"127.0.0.1:{port}", "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    prom: Prometheus | None = None
    try:
        wait_for(f"http://127.0.0.1:{port}/metrics", timeout=60)
        prom = Prometheus(tmp_path, f"127.0.0.1:{port}")
        yield prom, f"http://127.0.0.1:{port}/metrics"
    finally:
        if prom is not None:
            prom.stop()
        w.send_signal(signal.SIGTERM)
        _, err = w.communicate(timeout=30)
        assert w.returncode == 0, err


def run(name: str) -> tuple[float, float]:
    """``ksmlab run NAME`` in another process: (start, end) on the wall clock."""
    t0 = time.time()
    r = run_ksmlab(["run", name, "--json"], timeout=240)
    assert r.returncode == 0, r.stderr
    return t0, time.time()


def settle(prom: Prometheus, end: float) -> None:
    """Until Prometheus has scraped past ``end``."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        last = prom.query("timestamp(ksmlab_watch_intervals_total)")
        if last and float(last[0]["value"][1]) > end + 2:
            return
        time.sleep(0.5)
    pytest.fail("Prometheus stopped scraping the watch")


def over(prom: Prometheus, fn: str, metric: str, start: float, end: float) -> float | None:
    """``fn_over_time(metric[...])`` over [start, end], evaluated now."""
    span = int(time.time() - start) + 1
    return prom.value(f"{fn}_over_time({metric}[{span}s])")


@pytest.mark.slow
def test_prometheus_sees_bypass_and_collapse_and_no_false_alarm(
        watched: tuple[Prometheus, str]) -> None:
    prom, _metrics = watched
    knobs = read_all(KernelFS())
    t0, t1 = run("seed-uzp1")
    settle(prom, t1)
    freed = over(prom, "max", "ksmlab_freed_outside_ksm_bytes_total", t0, t1)
    assert freed is not None and freed >= 120 * MIB, freed
    assert (over(prom, "max", "ksmlab_host_freed_outside_ksm_bytes_total", t0, t1) or 0
            ) >= 120 * MIB
    assert over(prom, "max", "ksmlab_bypass_episodes_total", t0, t1) == 1
    assert prom.value('ALERTS{alertname="KsmRateLimitBypass"}') == 1
    episodes = prom.value("ksmlab_bypass_episodes_total")

    t0, t1 = run("seed-uzp0")
    settle(prom, t1)
    assert over(prom, "max", "ksmlab_merge_collapse", t0, t1) == 1

    for name in ("seed-uzp1-nothp", "seed-uzp0-nothp"):
        t0, t1 = run(name)
        settle(prom, t1)
        assert over(prom, "max", "ksmlab_merge_collapse", t0 + 2, t1) == 0, name
        assert prom.value("ksmlab_bypass_episodes_total") == episodes, name
    # KSM stopped (as the runs leave it): nothing fires
    t0 = time.time()
    time.sleep(10)
    settle(prom, time.time() - 2)
    assert over(prom, "max", "ksmlab_merge_collapse", t0, time.time()) == 0
    assert over(prom, "max", "ksmlab_bypass_active", t0, time.time()) == 0
    assert prom.value("ksmlab_bypass_episodes_total") == episodes
    assert read_all(KernelFS()) == knobs


# ---- stopped by a signal: everything as before ---------------------------------------------


def watch_state() -> dict[str, Any]:
    return {"knobs": read_all(KernelFS()), "tracing": tracing_state()}


@pytest.mark.parametrize("tracepoints", [False, True], ids=["plain", "tracepoints"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
                         ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_a_stopped_watch_leaves_knobs_and_tracing_as_found(sig: int, tracepoints: bool
                                                           ) -> None:
    if tracepoints and not TRACING.exists():
        pytest.skip("no /sys/kernel/tracing")
    lock_free()
    before = watch_state()
    cmd = [*KSMLAB, "watch", "--json", "-i", "0.5", *(["--tracepoints"] if tracepoints
                                                      else [])]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()  # the first interval: set up and reading
    assert line, p.stderr.read() if p.stderr else ""
    first = json.loads(line)
    inst = TRACING / "instances" / INSTANCE
    if tracepoints:
        assert "tracepoints" in first, first.get("notes")
        assert inst.is_dir()
        assert Journal(name=JOURNAL).read() is not None
    p.send_signal(sig)
    p.communicate(timeout=30)
    if sig == signal.SIGKILL:
        assert p.returncode == -signal.SIGKILL
        if tracepoints:
            assert inst.is_dir()  # left: the journal says what to undo
            r = subprocess.run([*KSMLAB, "restore"], capture_output=True, text=True,
                               timeout=60, check=False)
            assert r.returncode == 0, r.stderr
            assert "killed watch" in r.stdout
    else:
        assert p.returncode == 0
    after = watch_state()
    assert after["knobs"] == before["knobs"]
    same_state(before["tracing"], after["tracing"])
    assert Journal(name=JOURNAL).read() is None


# ---- opt-in (KSMLAB_LONG_TESTS=1, make test-all) ---------------------------------------------


@pytest.mark.long
def test_no_false_alarm_in_ten_minutes_of_an_idle_host() -> None:
    """The host as it is (KSM as found, no workload of the lab's): no verdict state in
    10 minutes (benchmarks/watch_overhead.py --processes 0 --seconds 600 --check-quiet
    is the same check)."""
    lock_free()
    knobs = read_all(KernelFS())
    r = run_ksmlab(["watch", "--json", "-d", "600"], timeout=700)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
    assert len(lines) >= 590
    assert not {s for x in lines for s in x["states"]}
    assert read_all(KernelFS()) == knobs


@pytest.mark.long
def test_watch_agrees_with_validate_pid_on_a_qemu_guest() -> None:
    """A paused QEMU guest under KSM (benchmarks/watch_guest.py): watch attributes the
    freeing to the QEMU process, within 1 % of validate --pid's side effect."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86 is missing")
    lock_free()
    bench = Path(__file__).parents[1] / "benchmarks" / "watch_guest.py"
    r = subprocess.run([sys.executable, str(bench), "--json", "--use-zero-pages", "1"],
                       capture_output=True, text=True, timeout=900, check=False)
    assert r.stdout, r.stderr
    d = json.loads(r.stdout)
    for run_ in d["runs"]:
        assert run_["validate_side_effect_mib"] > 100, run_
        assert run_["watch_other_processes_mib"] < 1, run_
    assert d["max_diff_pct"] is not None and d["max_diff_pct"] <= 1.0, d
