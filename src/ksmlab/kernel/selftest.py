"""The kselftest ``ksm_thp_split``: compile, read its TAP, record its results.

The test (``kernel/data/selftest/ksm_thp_split.c``, in the style of
tools/testing/selftests/mm) maps THP-backed memory, runs KSM for a bounded
number of full scans and checks three properties that commit b1f202060afe
breaks (docs/kernel-lab.md).  It is compiled against the kselftest header of
a kernel source (``tools/testing/selftests/kselftest.h`` of the variant's
tree, or of the installed linux-source-6.12 for the host), statically, so
the guest's initramfs can run it without a C library of its own.

Where it runs: inside a variant's guest (:func:`ksmlab.kernel.qemu.run_selftest`,
``ksmlab kernel selftest``) or on the live host (:mod:`ksmlab.live.selftest`,
``ksmlab selftest``).  Results of the guest runs go to
``<cache>/results/selftest.json``; the package ships the ones recorded on the
machine that made the release (``kernel/data/selftest.json``), as for
``confirmed.json``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .build import KernelBuildError, Source, cache_dir, get_variant, kernel_dir, patch_sha256

NAME = "ksm_thp_split"
HEADER = "tools/testing/selftests/kselftest.h"
RESULTS_FORMAT = "ksmlab-selftest-results/1"
# the three tests, in the order the binary reports them (its ksft_test_result_*)
PROPERTIES = ("rate", "merge", "zero-counted")
PROPERTY_TEXT = {
    "rate": "memory freed within pages_to_scan per sleep_millisecs (use_zero_pages=1)",
    "merge": "merging progresses at KSM's rate (use_zero_pages=0)",
    "zero-counted": "zero pages freed are counted in ksm_zero_pages (use_zero_pages=1)",
}


class SelftestError(RuntimeError):
    """The selftest cannot be compiled or run here; one line."""


def source_file() -> Path:
    return kernel_dir() / "selftest" / f"{NAME}.c"


def parameters() -> dict[str, float]:
    """The test's #define'd numbers (NR_THPS, FULL_SCANS, MAX_BUDGET_RATIO, ...), read
    from its source so that no text about the test repeats them by hand."""
    out = {}
    for m in re.finditer(r"^#define\s+([A-Z_]+)\s+([0-9.]+)\b", source_file().read_text(),
                         re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def source_sha256() -> str:
    """Hash of the test's C source: a result counts only for the test as it is today."""
    return hashlib.sha256(source_file().read_bytes()).hexdigest()


def header_for(src: Source) -> Path:
    """kselftest.h of a source: from its build tree when one is unpacked in the cache,
    else extracted from the installed tarball (cached per source identity)."""
    tree_name = src.tree_name()  # KernelBuildError when the package is missing
    tree = cache_dir() / "trees" / tree_name / HEADER
    if tree.exists():
        return tree
    dest = cache_dir() / "selftest" / tree_name / "kselftest.h"
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        top = f"{src.package}/{HEADER}"
        r = subprocess.run(["tar", "xJf", str(src.tarball), "-C", tmp, top],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SelftestError(f"{src.tarball} holds no {HEADER}: {r.stderr.strip()[:160]}")
        os.replace(Path(tmp) / top, dest)
    return dest


def compile_selftest(src: Source) -> Path:
    """The static binary for a source's kselftest.h (cached by the hash of both)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise SelftestError("no C compiler: apt-get install gcc libc6-dev")
    header = header_for(src)
    code = source_file().read_text()
    key = hashlib.sha256(code.encode() + b"\0" + header.read_bytes()).hexdigest()[:16]
    out = cache_dir() / "selftest" / "bin" / f"{NAME}-{key}"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        # the layout of tools/testing/selftests: the test includes "../kselftest.h"
        (Path(tmp) / "mm").mkdir()
        shutil.copy(header, Path(tmp) / "kselftest.h")
        shutil.copy(source_file(), Path(tmp) / "mm" / f"{NAME}.c")
        r = subprocess.run([cc, "-static", "-O2", "-Wall", "-o", NAME, f"{NAME}.c"],
                           cwd=Path(tmp) / "mm", capture_output=True, text=True)
        if r.returncode != 0:
            first = next((ln for ln in r.stderr.splitlines() if "error" in ln),
                         r.stderr.strip()[:200])
            raise SelftestError(f"compiling {NAME}.c failed: {first} (static linking needs "
                                "libc6-dev)")
        os.replace(Path(tmp) / "mm" / NAME, out)
    return out


@dataclass
class Case:
    number: int
    prop: str  # one of PROPERTIES
    outcome: str  # "pass" | "fail" | "skip"
    message: str


@dataclass
class SelftestResult:
    where: str  # "guest" | "host"
    release: str  # uname -r of the kernel it ran on
    variant: str | None  # the kernel lab's variant (None on the host)
    cases: list[Case]
    figures: dict[str, float]
    exit_code: int
    seconds: float
    patch_sha256: str | None = None
    source_version: str | None = None
    selftest_sha256: str | None = None
    date: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    tap: str = ""

    @property
    def passed(self) -> bool:
        """ksft's verdict: no test failed (skips allowed) and the binary said so."""
        return self.exit_code == 0 and all(c.outcome != "fail" for c in self.cases) \
            and len(self.cases) == len(PROPERTIES)

    def outcome(self, prop: str) -> str:
        return next((c.outcome for c in self.cases if c.prop == prop), "missing")

    def to_json(self, tap: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        if not tap:
            d.pop("tap")
        return d


_RESULT = re.compile(r"^(not ok|ok) (\d+)\s*(.*?)(?:\s*# (SKIP)\s*(.*))?$")
_FIGURE = re.compile(r"([A-Za-z0-9_.]+)=(-?[0-9.]+)")


def parse_tap(text: str) -> tuple[list[Case], dict[str, float]]:
    """The test lines and the ``# ksmlab: key=value`` figures of the binary's output."""
    cases: list[Case] = []
    figures: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# ksmlab:"):
            figures.update((k, float(v)) for k, v in _FIGURE.findall(line))
            continue
        m = _RESULT.match(line.strip())
        if m:
            n = int(m.group(2))
            prop = PROPERTIES[n - 1] if 0 < n <= len(PROPERTIES) else f"test-{n}"
            outcome = "skip" if m.group(4) else "pass" if m.group(1) == "ok" else "fail"
            msg = m.group(5) if m.group(4) else m.group(3)
            cases.append(Case(n, prop, outcome, msg.strip()))
    return cases, figures


def result_from(tap: str, exit_code: int, where: str, release: str, seconds: float,
                variant: str | None = None, **extra: Any) -> SelftestResult:
    cases, figures = parse_tap(tap)
    return SelftestResult(where, release, variant, cases, figures, exit_code,
                          round(seconds, 1), tap=tap, selftest_sha256=source_sha256(),
                          **extra)


def summary_lines(r: SelftestResult) -> list[str]:
    """What the run found, one line per property (80 columns)."""
    head = f"{NAME} on Linux {r.release} ({r.where}" + (
        f", {r.variant})" if r.variant else ")")
    out = [head, f"  {'PASS' if r.passed else 'FAIL'} in {r.seconds:.0f} s"]
    for c in r.cases:
        out.append(f"  {c.outcome.upper():<4} {c.message}"[:80])
    return out


# ---- the record of guest runs ----------------------------------------------------------

def index_path() -> Path:
    return cache_dir() / "results" / "selftest.json"


def shipped_path() -> Path:
    return kernel_dir() / "selftest.json"


def _load(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    res = data.get("results") if isinstance(data, dict) else None
    return {k: v for k, v in res.items() if isinstance(v, dict)} if isinstance(res, dict) \
        else {}


def record(r: SelftestResult) -> None:
    """Add (or replace) the guest result of a variant in the cache's index."""
    if r.variant is None:
        return
    p = index_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = _load(p)
        results[r.variant] = r.to_json()
        tmp = p.with_name(f".selftest.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": RESULTS_FORMAT, "results": results},
                                  indent=1, sort_keys=True) + "\n")
        os.replace(tmp, p)


def current(r: dict[str, Any]) -> bool:
    """Did the result run the variant's patch and the test as they are today?"""
    try:
        return bool(r.get("patch_sha256", "absent") ==
                    patch_sha256(get_variant(str(r["variant"])))
                    and r.get("selftest_sha256") == source_sha256())
    except (KeyError, ValueError, KernelBuildError, OSError):
        return False


def read_results() -> dict[str, dict[str, Any]]:
    """Per variant: the shipped result, replaced by one recorded here; only those of
    today's patches."""
    out = {k: {**r, "origin": "shipped"} for k, r in _load(shipped_path()).items()}
    out.update({k: {**r, "origin": "here"} for k, r in _load(index_path()).items()})
    return {k: r for k, r in out.items() if current(r)}


def export(dest: Path, recorded_on: str) -> int:
    """The results of today's patches recorded here, as a file to ship."""
    results = {k: r for k, r in _load(index_path()).items() if current(r)}
    dest.write_text(json.dumps({"format": RESULTS_FORMAT, "recorded_on": recorded_on,
                                "results": results}, indent=1, sort_keys=True) + "\n")
    return len(results)
