"""The same sweep on a LocalCluster and on a scheduler with two workers started as
separate processes on loopback (as a user starts them: `dask scheduler`, `dask
worker`) gives the same table; a rerun of a finished sweep does no model work."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("distributed")

SPEC = """\
scenarios = ["seed-uzp0", "mixed"]
policies = ["mainline", "v1", "rfc"]
[grid]
duration = 2.0
ksm.pages_to_scan = [100, 1000]
ksm.use_zero_pages = [0, 1]
"""
DASK = str(Path(sys.executable).parent / "dask")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def env() -> dict[str, str]:
    # the workers import ksmlab from this tree, as the client does
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": SRC + (os.pathsep + path if path else "")}


def ksmlab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ksmlab", *args], capture_output=True,
                          text=True, timeout=300, check=False, env=env())


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[str]:
    """A scheduler and two single-thread workers, each its own process group, all
    killed at the end whatever happens."""
    if not Path(DASK).exists():
        pytest.skip(f"no dask command beside {sys.executable}")
    sched_file = tmp_path / "scheduler.json"
    log = (tmp_path / "dask.log").open("w")
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> None:
        procs.append(subprocess.Popen([DASK, *args], stdout=log, stderr=log, env=env(),
                                      start_new_session=True))
    try:
        start("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
              "--scheduler-file", str(sched_file))
        for _ in range(2):
            start("worker", "--scheduler-file", str(sched_file), "--nthreads", "1",
                  "--nworkers", "1", "--no-dashboard", "--host", "127.0.0.1")
        from distributed import Client

        deadline = time.monotonic() + 60
        while not sched_file.exists():
            assert time.monotonic() < deadline, (tmp_path / "dask.log").read_text()
            time.sleep(0.2)
        with Client(scheduler_file=str(sched_file), timeout="30s") as c:
            c.wait_for_workers(2, timeout=60)
            address = c.scheduler.address
        yield address
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
        log.close()


@pytest.mark.slow  # two clusters start: about 20 s on a quiet 2-core machine
def test_local_cluster_and_remote_workers_give_one_table(tmp_path: Path,
                                                         cluster: str) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    local, remote = tmp_path / "local", tmp_path / "remote"
    r = ksmlab("sweep", str(spec), "-o", str(local), "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "24 points: 0 cached, 24 run, 0 failed" in r.stdout
    r = ksmlab("sweep", str(spec), "-o", str(remote), "--scheduler", cluster)
    assert r.returncode == 0, r.stderr
    a = pd.read_parquet(local / "results.parquet")
    b = pd.read_parquet(remote / "results.parquet")
    assert len(a) == 24
    pd.testing.assert_frame_equal(a, b)
    # finished: a rerun runs nothing (and starts no cluster)
    t0 = time.monotonic()
    r = ksmlab("sweep", str(spec), "-o", str(local))
    assert r.returncode == 0 and "24 cached, 0 run" in r.stdout, r.stderr
    assert time.monotonic() - t0 < 30
    pd.testing.assert_frame_equal(a, pd.read_parquet(local / "results.parquet"))


def test_unreachable_scheduler_is_one_line() -> None:
    from ksmlab.sweep import SweepError, dask_client

    with pytest.raises(SweepError, match=r"^--scheduler tcp://127.0.0.1:9: cannot connect"), \
            dask_client("tcp://127.0.0.1:9", None, timeout="1s"):
        pass
