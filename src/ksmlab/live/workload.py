"""The workload: a child process that maps and fills memory as a scenario says.

Parent side: :class:`Workload` starts ``python -m ksmlab.live.workload``, sends
the scenario and which process instance to be on stdin (one JSON line), waits
for a ``ready`` line, then sends commands (``fill``, ``write``, ``exit``).
Child side: :func:`main`.  The child asks the kernel to SIGKILL it when its
parent dies (``PR_SET_PDEATHSIG``) and exits on EOF, so it never outlives a run.

Each region is an anonymous private mapping, 2 MiB aligned (map 2 MiB more,
unmap the slack), advised ``MADV_HUGEPAGE``/``MADV_NOHUGEPAGE`` and
``MADV_MERGEABLE`` (or the whole process is made mergeable first with
``prctl(PR_SET_MEMORY_MERGE)``), then every 4 KiB page is written in address
order with its content id (see :mod:`ksmlab.content`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from .. import content
from ..scenario import HPAGE_PMD_SIZE, PAGE_SIZE, Scenario

PR_SET_PDEATHSIG = 1
PR_SET_THP_DISABLE, PR_GET_THP_DISABLE = 41, 42
PR_SET_MEMORY_MERGE = 67
PROT_READ, PROT_WRITE = 0x1, 0x2
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20
MADV_MERGEABLE, MADV_UNMERGEABLE, MADV_HUGEPAGE, MADV_NOHUGEPAGE = 12, 13, 14, 15
U64_PER_PAGE = PAGE_SIZE // 8


class WorkloadError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- child


def load_libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]
    return libc


def thp_disable(on: bool) -> bool:
    """prctl(PR_SET_THP_DISABLE) for this process; returns the previous setting.

    The live run's own process sets it so khugepaged drops its mm at once
    (khugepaged_scan_mm_slot(): MMF_DISABLE_THP) instead of sharing each pass's
    pages_to_scan with numpy's MADV_HUGEPAGE arrays; the flag is inherited across
    fork and exec, so the workload clears it again."""
    libc = load_libc()
    before = bool(libc.prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0))
    _check(libc.prctl(PR_SET_THP_DISABLE, int(on), 0, 0, 0), "prctl(PR_SET_THP_DISABLE)")
    return before


def exec_merge_any(argv: list[str]) -> None:
    """prctl(PR_SET_MEMORY_MERGE, 1), then exec ``argv``: every VMA of the program is
    mergeable (MMF_VM_MERGE_ANY survives execve since 6.7, 3c6f33b7273a), as
    systemd's MemoryKSM= does.  Returns only on failure (OSError)."""
    _check(load_libc().prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0), "prctl(PR_SET_MEMORY_MERGE)")
    os.execvp(argv[0], argv)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise WorkloadError(f"{what}: {os.strerror(err)}")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


@dataclass
class _Region:
    addr: int
    pages: int
    first_page: int
    ids: npt.NDArray[np.uint64] | None
    view: npt.NDArray[np.uint64]  # one big-endian u64 per page: the page's first 8 bytes


def map_region(libc: ctypes.CDLL, size: int, thp: str, madv_mergeable: bool) -> int:
    raw = libc.mmap(None, size + HPAGE_PMD_SIZE, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if raw in (None, ctypes.c_void_p(-1).value):
        raise WorkloadError(f"mmap of {size >> 20} MiB: {os.strerror(ctypes.get_errno())}")
    addr = (raw + HPAGE_PMD_SIZE - 1) & ~(HPAGE_PMD_SIZE - 1)
    if addr > raw:
        _check(libc.munmap(raw, addr - raw), "munmap")
    tail = raw + size + HPAGE_PMD_SIZE - (addr + size)
    if tail:
        _check(libc.munmap(addr + size, tail), "munmap")
    if thp == "hugepage":
        _check(libc.madvise(addr, size, MADV_HUGEPAGE), "madvise(MADV_HUGEPAGE)")
    elif thp == "nohugepage":
        _check(libc.madvise(addr, size, MADV_NOHUGEPAGE), "madvise(MADV_NOHUGEPAGE)")
    if madv_mergeable:
        _check(libc.madvise(addr, size, MADV_MERGEABLE), "madvise(MADV_MERGEABLE)")
    return int(addr)


def _be_view(addr: int, pages: int) -> npt.NDArray[np.uint64]:
    buf = (ctypes.c_uint64 * (pages * U64_PER_PAGE)).from_address(addr)
    arr: npt.NDArray[np.uint64] = np.frombuffer(memoryview(buf).cast("B"), dtype=">u8")
    return arr.reshape(pages, U64_PER_PAGE)[:, 0]


def _fill(r: _Region) -> None:
    assert r.ids is not None
    r.view[:] = r.ids  # page by page in address order: write faults allocate THPs
    r.ids = None


class _Child:
    def __init__(self, sc: Scenario, process: int, replica: int) -> None:
        self.sc = sc
        self.instance = next(
            i for i, (pi, k, _) in enumerate(sc.instances()) if (pi, k) == (process, replica)
        )
        self.proc = sc.process[process]
        self.refs = [r for r in content.layout(sc) if (r.process, r.replica) == (process, replica)]
        self.regions: list[_Region] = []
        self.fresh = 0
        self.rng = np.random.default_rng([self.instance, 0xF00D])

    def fresh_ids(self, n: int) -> npt.NDArray[np.uint64]:
        # per-instance id space so two processes never write the same new content
        ids = content.fresh_ids((self.instance << 32) + self.fresh, n)
        self.fresh += n
        return ids

    def setup(self, fill_now: bool) -> dict[str, Any]:
        libc = load_libc()
        if self.proc.merge == "prctl":
            _check(libc.prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0), "prctl(PR_SET_MEMORY_MERGE)")
        for ref in self.refs:
            size = ref.spec.pages * PAGE_SIZE
            madv = self.proc.merge == "madvise" and ref.spec.mergeable
            addr = map_region(libc, size, ref.spec.thp, madv)
            ids = content.region_ids(self.sc, ref)
            self.regions.append(_Region(addr, ref.spec.pages, ref.first_page, ids,
                                        _be_view(addr, ref.spec.pages)))
        if self.proc.merge == "prctl":
            self._unmerge_own_vmas(libc)
        self._warm_up()
        base = {"RssAnon": _status_kb("RssAnon"), "Rss": _status_kb("VmRSS")}
        if fill_now:
            self.fill()
        return {"ready": True, "pid": os.getpid(), "base": base,
                "regions": [[r.addr, r.pages * PAGE_SIZE] for r in self.regions]}

    def _warm_up(self) -> None:
        """Do once (twice: glibc raises its mmap threshold after the first free) what
        commands do later, so the interpreter's heap stops growing before the baseline
        RssAnon is read: the regions' RSS is then RssAnon minus a constant."""
        for _ in range(2):
            json.loads(json.dumps({"op": "volatile_scan", "step": 0, "tag": 1}))
            for ref in self.refs:
                content.write_targets(0.5, ref.spec.pages, 0, 0)
                content.volatile_targets(ref, 0)

    def _unmerge_own_vmas(self, libc: ctypes.CDLL) -> None:
        """prctl(PR_SET_MEMORY_MERGE) made the interpreter's own memory mergeable
        too (ksm_enable_merge_any() marks every compatible VMA); clear VM_MERGEABLE
        there again so ksmd scans the scenario's regions only, as the model does."""
        ours = [(r.addr, r.addr + r.pages * PAGE_SIZE) for r in self.regions]
        with open("/proc/self/maps") as f:
            spans = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in f]
        for lo, hi in spans:
            if not any(a <= lo and hi <= b for a, b in ours):
                libc.madvise(lo, hi - lo, MADV_UNMERGEABLE)  # EINVAL on special VMAs: fine

    def fill(self) -> None:
        for r in self.regions:
            if r.ids is not None:
                _fill(r)

    def write(self, cmd: dict[str, Any]) -> None:
        r = self.regions[int(cmd["region"])]
        ref = self.refs[int(cmd["region"])]
        idx = content.write_targets(float(cmd["fraction"]), r.pages, int(cmd["seed"]),
                                    ref.process * 1000 + ref.region)
        if cmd["content"] == "zero":
            r.view[idx] = 0
        else:
            r.view[idx] = content.written_ids(ref, int(cmd["tag"]), idx)

    def volatile_scan(self, step: int) -> None:
        """volatile_pages_per_scan: the writes of one full-scan end (ksmd sleeps now)."""
        for r, ref in zip(self.regions, self.refs, strict=True):
            if ref.spec.volatile_pages_per_scan:
                idx = content.volatile_targets(ref, step)
                r.view[idx] = content.written_ids(ref, content.VOLATILE_TAG + step, idx)

    def volatile_step(self, dt: float, debt: list[float]) -> None:
        for i, ref in enumerate(self.refs):
            rate = ref.spec.volatile_pages_per_s
            if rate <= 0:
                continue
            debt[i] += rate * dt
            n = int(debt[i])
            if n:
                debt[i] -= n
                r = self.regions[i]
                r.view[self.rng.integers(0, r.pages, size=n)] = self.fresh_ids(n)

    def serve(self, inp: IO[str], out: IO[str]) -> None:
        debt = [0.0] * len(self.refs)
        volatile = any(r.spec.volatile_pages_per_s > 0 for r in self.refs)
        last = time.monotonic()
        while True:
            ready, _, _ = select.select([inp], [], [], 0.01 if volatile else None)
            now = time.monotonic()
            if volatile:
                self.volatile_step(now - last, debt)
            last = now
            if not ready:
                continue
            line = inp.readline()
            if not line:
                return  # parent gone or done
            cmd = json.loads(line)
            op = cmd.get("op")
            if op == "exit":
                return
            if op == "fill":
                self.fill()
            elif op == "write":
                self.write(cmd)
            elif op == "volatile_scan":
                self.volatile_scan(int(cmd["step"]))
            out.write(json.dumps({"done": op}) + "\n")
            out.flush()


def main() -> None:
    # Ctrl-C reaches the whole foreground process group: the parent handles it (and
    # ends this process); a KeyboardInterrupt here only printed a traceback per child
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    libc = load_libc()
    parent = int(sys.argv[1]) if len(sys.argv) > 1 else os.getppid()
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    _check(libc.prctl(PR_SET_THP_DISABLE, 0, 0, 0, 0), "prctl(PR_SET_THP_DISABLE)")
    if os.getppid() != parent:  # the parent died before we asked
        os._exit(1)
    try:
        spec = json.loads(sys.stdin.readline())
        sc = Scenario.model_validate(spec["scenario"])
        child = _Child(sc, int(spec["process"]), int(spec["replica"]))
        ready = child.setup(fill_now=bool(spec["fill_now"]))
    except Exception as e:  # reported to the parent as one line
        sys.stdout.write(json.dumps({"error": str(e)}) + "\n")
        sys.stdout.flush()
        os._exit(1)
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    child.serve(sys.stdin, sys.stdout)
    os._exit(0)


# ----------------------------------------------------------------------------- parent


def how_it_ended(rc: int) -> str:
    """A child's end, said as a person would look for it (the OOM killer: SIGKILL)."""
    if rc >= 0:
        return f"exit code {rc}"
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        name = f"signal {-rc}"
    return f"killed by {name}" + (" (the OOM killer sends SIGKILL)"
                                  if rc == -signal.SIGKILL else "")


class Workload:
    """A running workload process, seen from the parent."""

    def __init__(self, sc: Scenario, process: int, replica: int, fill_now: bool,
                 timeout: float = 120.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ksmlab.live.workload", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.timeout = timeout
        self._send({"scenario": sc.model_dump(mode="json"), "process": process,
                    "replica": replica, "fill_now": fill_now})
        self.ready: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            rc = self.proc.poll()
            if rc is None:
                raise WorkloadError(f"workload process {self.pid} did not answer in "
                                    f"{self.timeout:.0f} s")
            raise WorkloadError(f"workload process {self.pid} died, {how_it_ended(rc)}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise WorkloadError(f"workload: {reply['error']}")
        return reply

    def wait_ready(self) -> dict[str, Any]:
        self.ready = self._reply()
        return self.ready

    def command(self, op: str, **args: Any) -> None:
        self._send({"op": op, **args})
        self._reply()

    def stop(self) -> None:
        """End the process whatever state it is in, and reap it."""
        if self.proc.poll() is None:
            try:
                self._send({"op": "exit"})
                self.proc.wait(timeout=2.0)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


if __name__ == "__main__":
    main()
