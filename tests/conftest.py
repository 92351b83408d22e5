"""Shared fixtures: a fake /sys tree for knob tests, and the gate for live tests.

Live tests need root and KSM.  Without them they are skipped with the reason,
unless KSMLAB_REQUIRE_LIVE=1, where a missing capability is a failure (as
drgn's kernel tests do).  Around the whole session every KSM/THP knob is read
before and compared after, and no workload process may be left.
"""

from __future__ import annotations

import atexit
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before ksmlab is imported: model tests run on a pinned cost profile (a refit of the
# shipped one, or this machine's, must never move them), and no test reads or writes
# the user's own profile cache.  Tests of the profile choice unset these themselves.
TEST_PROFILE = os.path.join(os.path.dirname(__file__), "data", "test-profile.json")
os.environ["KSMLAB_PROFILE"] = TEST_PROFILE
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="ksmlab-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)

# This process must not join khugepaged's mm list: an mm stays on it until it exits,
# so every khugepaged pass of a live test would walk pytest's mm too, which the model
# cannot know (two CI runs' three-procs-uzp0: the kernel's pass at 10 s collapsed
# nothing, the model's 8 ranges).  Two libraries madvise MADV_HUGEPAGE in-process:
# numpy on arrays of 4 MiB and more, and pyarrow's default pool (mimalloc reserves
# 1 GiB with it; the export and sweep tests read Parquet).  Both read these at import,
# and children (the lab, its workloads) inherit them.
os.environ["NUMPY_MADVISE_HUGEPAGE"] = "0"
os.environ["ARROW_DEFAULT_MEMORY_POOL"] = "system"

# the differential tests' examples new each run (tests/test_model_fast.py): a seed
# chosen here, printed in the header; set it to replay a run
os.environ.setdefault("KSMLAB_FAST_SEED", str(int.from_bytes(os.urandom(4), "little")))

from ksmlab.live.journal import RunLock  # noqa: E402
from ksmlab.live.kernelfs import KernelFS, KernelWriteError  # noqa: E402
from ksmlab.live.knobs import read_all  # noqa: E402

REQUIRE_LIVE = os.environ.get("KSMLAB_REQUIRE_LIVE") == "1"

FAKE_FILES = {
    "sys/kernel/mm/ksm/run": "0",
    "sys/kernel/mm/ksm/pages_to_scan": "100",
    "sys/kernel/mm/ksm/sleep_millisecs": "20",
    "sys/kernel/mm/ksm/use_zero_pages": "0",
    "sys/kernel/mm/ksm/smart_scan": "1",
    "sys/kernel/mm/ksm/max_page_sharing": "256",
    "sys/kernel/mm/ksm/merge_across_nodes": "1",
    "sys/kernel/mm/ksm/stable_node_chains_prune_millisecs": "2000",
    "sys/kernel/mm/ksm/advisor_mode": "[none] scan-time",
    "sys/kernel/mm/ksm/advisor_max_cpu": "70",
    "sys/kernel/mm/ksm/advisor_min_pages_to_scan": "500",
    "sys/kernel/mm/ksm/advisor_max_pages_to_scan": "30000",
    "sys/kernel/mm/ksm/advisor_target_scan_time": "200",
    "sys/kernel/mm/ksm/pages_shared": "0",
    "sys/kernel/mm/ksm/pages_sharing": "0",
    "sys/kernel/mm/ksm/full_scans": "0",
    "sys/kernel/mm/transparent_hugepage/enabled": "always [madvise] never",
    "sys/kernel/mm/transparent_hugepage/defrag": "always defer defer+madvise [madvise] never",
    "sys/kernel/mm/transparent_hugepage/use_zero_page": "1",
    "sys/kernel/mm/transparent_hugepage/shrink_underused": "1",
    "sys/kernel/mm/transparent_hugepage/khugepaged/max_ptes_none": "511",
    "sys/kernel/mm/transparent_hugepage/khugepaged/pages_to_scan": "4096",
    "sys/kernel/mm/transparent_hugepage/hugepages-2048kB/enabled": "always [inherit] madvise never",
    "proc/meminfo": "MemTotal: 24000000 kB\nMemAvailable: 20000000 kB\n",
}
BRACKETED = ("enabled", "defrag", "advisor_mode")


class FakeKernel(KernelFS):
    """A /sys tree of plain files that behaves like the kernel where it matters:
    bracketed mode files, EINVAL for out-of-range values, EBUSY for
    max_page_sharing/merge_across_nodes while pages are shared, run=2 unmerging,
    advisor_mode switches setting pages_to_scan and pages_to_scan refused (EINVAL)
    while the advisor is on (advisor_mode_store(), pages_to_scan_store())."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.refuse: dict[str, int] = {}  # rel -> errno, to make any write fail

    def write(self, rel: str, value: str) -> None:
        name = rel.rsplit("/", 1)[-1]
        if rel in self.refuse:
            self.writes.append((rel, value))
            raise KernelWriteError(rel, value, self.refuse[rel])
        if name in ("max_page_sharing", "merge_across_nodes") and self.read(
            "sys/kernel/mm/ksm/pages_shared") != "0":
            self.writes.append((rel, value))
            raise KernelWriteError(rel, value, errno.EBUSY)
        if name == "pages_to_scan" and rel.endswith("ksm/pages_to_scan") and self.value(
                "sys/kernel/mm/ksm/advisor_mode") != "none":
            self.writes.append((rel, value))
            raise KernelWriteError(rel, value, errno.EINVAL)
        if name == "advisor_mode" and value != self.value(rel) and value in (
                "none", "scan-time"):
            # set_advisor_defaults(): on a switch, pages_to_scan starts over
            start = self.read("sys/kernel/mm/ksm/advisor_min_pages_to_scan") \
                if value == "scan-time" else "100"
            self.path("sys/kernel/mm/ksm/pages_to_scan").write_text(start.strip() + "\n")
        if name == "run" and value not in ("0", "1", "2"):
            self.writes.append((rel, value))
            raise KernelWriteError(rel, value, errno.EINVAL)
        if name in BRACKETED:
            choices = self.read(rel).replace("[", "").replace("]", "").split()
            if value not in choices:
                self.writes.append((rel, value))
                raise KernelWriteError(rel, value, errno.EINVAL)
            super().write(rel, " ".join(f"[{c}]" if c == value else c for c in choices))
            self.writes[-1] = (rel, value)
            return
        super().write(rel, value)
        if name == "run" and value == "2":
            self.path("sys/kernel/mm/ksm/pages_shared").write_text("0")
            self.path("sys/kernel/mm/ksm/pages_sharing").write_text("0")
            self.path("sys/kernel/mm/ksm/full_scans").write_text("0")

    def value(self, rel: str) -> str:
        raw = self.read(rel)
        return raw[raw.index("[") + 1 : raw.index("]")] if "[" in raw else raw


def make_fake_tree(root: Path) -> None:
    for rel, text in FAKE_FILES.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text + "\n")


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    root = tmp_path / "root"
    make_fake_tree(root)
    monkeypatch.setenv("KSMLAB_STATE_DIR", str(tmp_path / "state"))
    return FakeKernel(root)


def live_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "live tests need root (KSM and THP knobs are root-only)"
    if not Path("/sys/kernel/mm/ksm/run").exists():
        return "this kernel has no KSM (/sys/kernel/mm/ksm missing)"
    if not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists():
        return "this kernel has no THP"
    return None


# Opt-in suites, left out of `make test` (CI) and run by `make test-all`: each marker,
# the variable that turns it on, and why it is opt-in.
OPT_IN = {
    "kernel": ("KSMLAB_KERNEL_TESTS",
               "builds and boots a patched kernel under qemu TCG (minutes)"),
    "long": ("KSMLAB_LONG_TESTS", "a live suite of minutes (guests, long idles)"),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for marker, (var, what) in OPT_IN.items():
        if os.environ.get(var) == "1":
            continue
        skip = pytest.mark.skip(reason=f"{what}: set {var}=1 (make test-all)")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)
    why = live_unavailable()
    if why is None:
        return
    for item in items:
        if "live" in item.keywords:
            if REQUIRE_LIVE:
                item.add_marker(pytest.mark.usefixtures("_live_required"))
            else:
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture
def _live_required() -> None:
    why = live_unavailable()
    if why is not None:
        pytest.fail(f"KSMLAB_REQUIRE_LIVE=1 but {why}")


def run_ksmlab(args: list[str], timeout: float, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    """``python -m ksmlab ARGS``; past the timeout it gets SIGTERM (never SIGKILL, which
    subprocess.run would send), so its own restore puts the knobs back.  ``env``:
    variables to set (an empty value unsets one)."""
    cmd = [sys.executable, "-m", "ksmlab", *args]
    full = dict(os.environ)
    for k, v in (env or {}).items():
        if v:
            full[k] = v
        else:
            full.pop(k, None)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=full)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
        pytest.fail(f"ksmlab {' '.join(args)} took over {timeout:.0f} s (ended by SIGTERM)")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def end_run(p: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 90) -> None:
    """Send ``sig`` to a live run and wait; if it does not end, SIGTERM, then SIGKILL and
    the journal's restore, so a failing test never leaves a run holding the lock."""
    p.send_signal(sig)
    try:
        p.wait(timeout=timeout)
        return
    except subprocess.TimeoutExpired:
        p.terminate()
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        from ksmlab.live.journal import Journal, RunLock
        from ksmlab.live.run import restore_journal

        restore_journal(KernelFS(), Journal(Path("/run/ksmlab")), RunLock(Path("/run/ksmlab")))
    pytest.fail(f"the run did not end within {timeout:.0f} s of signal {sig}")


def workload_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ksmlab.live.workload"], capture_output=True,
                         text=True, check=False).stdout
    return [int(x) for x in out.split()]


@pytest.fixture(scope="session", autouse=True)
def _machine_left_as_found() -> Iterator[None]:
    """After the whole suite every knob is as before, and no workload is left.

    Not judged while another process holds the live-run lock (its run owns the
    knobs then, and its own restore answers for them)."""
    real = KernelFS()
    lock = RunLock(Path("/run/ksmlab"))
    before = read_all(real) if Path("/sys/kernel/mm/ksm/run").exists() else {}
    busy = lock.holder() is not None
    yield
    if busy or lock.holder() is not None:
        return
    after = read_all(real) if before else {}
    changed = {k: (v, after.get(k)) for k, v in before.items() if after.get(k) != v}
    if changed:  # fail, but do not leave the machine so: undo it from the journal
        from ksmlab.live.journal import Journal
        from ksmlab.live.run import restore_journal

        restore_journal(real, Journal(Path("/run/ksmlab")), lock)
    assert not changed, f"the test suite left knobs changed: {changed}"
    assert not workload_pids(), f"workload processes left: {workload_pids()}"


def pytest_report_header() -> str:
    seed = os.environ["KSMLAB_FAST_SEED"]
    return f"ksmlab differential tests: seed {seed} (replay: KSMLAB_FAST_SEED={seed})"
