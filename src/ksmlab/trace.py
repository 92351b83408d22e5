"""One trace format for live and model runs.

A trace is a table of samples over time, one column per counter, named after
the kernel's own counters, plus metadata (where it came from, the scenario,
the kernel release or model policy, the knob values) and the events applied.
A trace may also carry KSM's own event stream (``kernel_events``: the kernel's
tracepoints in a live trace, the same events emitted by the model; see
:mod:`ksmlab.events`); traces without it load with ``kernel_events`` None.
Counters that the kernel never resets (``pages_scanned``, the ``thp_*`` events
of /proc/vmstat) are stored raw; ``meta["baseline"]`` holds their values just
before the workload started, and :meth:`Trace.since_start` gives the increase.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

FORMAT = "ksmlab-trace/1"

# /sys/kernel/mm/ksm (read-only counters)
KSM_COUNTERS = (
    "pages_scanned",
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "pages_skipped",
    "ksm_zero_pages",
    "full_scans",
    "stable_node_chains",
    "stable_node_dups",
    "general_profit",
)
# /proc/vmstat (THP events and the THP gauge)
VMSTAT_COUNTERS = (
    "thp_fault_alloc",
    "thp_fault_fallback",
    "thp_collapse_alloc",
    "thp_split_page",
    "thp_split_page_failed",
    "thp_deferred_split_page",
    "thp_underused_split_page",
    "thp_split_pmd",
    "thp_zero_page_alloc",
    "thp_swpout_fallback",
    "nr_anon_transparent_hugepages",
)
# /sys/kernel/mm/transparent_hugepage/khugepaged (prefixed: full_scans exists twice)
KHUGEPAGED_COUNTERS = ("khugepaged_full_scans", "khugepaged_pages_collapsed")
# the workload processes, summed: /proc/PID/status and smaps_rollup (kB), ksm_stat
PROC_COUNTERS = (
    "Rss",
    "RssAnon",
    "AnonHugePages",
    "ksm_rmap_items",
    "ksm_merging_pages",
    "ksm_process_profit",
    "proc_ksm_zero_pages",  # ksm_stat's ksm_zero_pages (global one is in KSM_COUNTERS)
)
# ksmd's CPU time, nanoseconds (first field of /proc/PID/schedstat)
KSMD_COUNTERS = ("ksmd_cpu_ns",)

# 1 on a sample taken at the end of a full scan (while ksmd sleeps after it), else 0.
# ksmd always sleeps sleep_millisecs after a full-scan end (the end ends a batch), so
# such a sample is the kernel's exact state at that boundary: the fidelity checkpoints.
FULL_SCAN_END = "full_scan_end"

COLUMNS = ("t", FULL_SCAN_END, *KSM_COUNTERS, *VMSTAT_COUNTERS, *KHUGEPAGED_COUNTERS,
           *PROC_COUNTERS, *KSMD_COUNTERS)
# Never reset by the kernel: compare as increases since the start of a run.
MONOTONIC = frozenset(
    {"pages_scanned", "pages_skipped", "ksmd_cpu_ns", *KHUGEPAGED_COUNTERS}
    | {c for c in VMSTAT_COUNTERS if c != "nr_anon_transparent_hugepages"}
)
# Per-size counters of multi-size THP (hugepages-<N>kB/stats/, Linux 6.8+), a column
# each for the sizes below PMD a scenario enables, named by path below
# transparent_hugepage/ ("hugepages-64kB/split"); nr_anon is a gauge
MTHP_PREFIX = "hugepages-"
MTHP_STATS = ("anon_fault_alloc", "split", "split_failed", "split_deferred", "nr_anon")


def mthp_column(size: str, stat: str) -> str:
    """``mthp_column("64kB", "split")`` -> ``hugepages-64kB/split``."""
    return f"{MTHP_PREFIX}{size}/{stat}"


def is_monotonic(name: str) -> bool:
    """A counter the kernel never resets (compared as an increase since the start)."""
    return name in MONOTONIC or (name.startswith(MTHP_PREFIX) and not name.endswith("/nr_anon"))


def write_atomic(path: Path, data: bytes | None = None,
                 writer: Callable[[Path], object] | None = None) -> Path:
    """Write ``data`` (or call ``writer`` on a temporary path) and rename it into place:
    a full disk or a kill leaves the old file or none, never a truncated one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if writer is not None:
            writer(tmp)
        else:
            tmp.write_bytes(data or b"")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class TraceError(ValueError):
    pass


@dataclass
class Trace:
    meta: dict[str, Any]
    columns: dict[str, npt.NDArray[np.float64]]
    events: list[dict[str, Any]] = field(default_factory=list)
    # {"source": "tracefs"|"model", "recorded": bool, "events": [...], ...} or None
    kernel_events: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if "t" not in self.columns:
            raise TraceError("a trace needs a 't' column")
        n = len(self.columns["t"])
        for k, v in self.columns.items():
            if len(v) != n:
                raise TraceError(f"column {k} has {len(v)} samples, t has {n}")

    def __len__(self) -> int:
        return len(self.columns["t"])

    def __getitem__(self, name: str) -> npt.NDArray[np.float64]:
        try:
            return self.columns[name]
        except KeyError:
            raise TraceError(f"trace has no column {name!r}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    @property
    def t(self) -> npt.NDArray[np.float64]:
        return self.columns["t"]

    def checkpoints(self) -> dict[int, int]:
        """full_scans value -> index of the sample taken right at that full-scan end."""
        if FULL_SCAN_END not in self.columns:
            return {}
        out: dict[int, int] = {}
        marks = self.columns[FULL_SCAN_END]
        scans = self.columns["full_scans"]
        for i in np.flatnonzero(marks > 0).tolist():
            out.setdefault(int(scans[i]), i)
        return out

    def since_start(self, name: str) -> npt.NDArray[np.float64]:
        """A counter as an increase since the run started (baseline subtracted)."""
        col = self[name]
        base = self.meta.get("baseline", {}).get(name)
        if base is None:
            return col - col[0] if is_monotonic(name) and len(col) else col
        return col - float(base)

    @classmethod
    def from_rows(
        cls, meta: dict[str, Any], rows: Sequence[Mapping[str, float]],
        events: list[dict[str, Any]] | None = None,
    ) -> Trace:
        names: list[str] = []
        for r in rows:
            names.extend(k for k in r if k not in names)
        cols = {k: np.array([r.get(k, np.nan) for r in rows], dtype=np.float64) for k in names}
        if not rows:
            cols = {"t": np.zeros(0)}
        return cls(meta, cols, events or [])

    def table(self, since_start: bool = True) -> dict[str, npt.NDArray[np.float64]]:
        """The samples column by column for export: ``t`` first, then :data:`COLUMNS`
        order, then any other (per-size counters); counters the kernel never resets
        as increases since the start (their raw values are the baseline in ``meta``
        plus these) unless ``since_start`` is False; NaN for a missing value."""
        names = [c for c in COLUMNS if c in self.columns]
        names += sorted(c for c in self.columns if c not in names)
        return {c: self.since_start(c) if since_start and c != "t" else self[c] for c in names}

    def to_csv(self, since_start: bool = True) -> str:
        """:meth:`table` as CSV, one row a sample, empty for a missing value."""
        table = self.table(since_start)
        lines = [",".join(table)]
        for row in zip(*table.values(), strict=True):
            lines.append(",".join("" if np.isnan(v) else _num(float(v)) for v in row))
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        out = {
            "format": FORMAT,
            "meta": self.meta,
            "events": self.events,
            "columns": {k: _plain(v) for k, v in self.columns.items()},
        }
        if self.kernel_events is not None:
            out["kernel_events"] = self.kernel_events
        return out

    def save(self, path: Path) -> Path:
        data = json.dumps(self.to_json(), separators=(",", ":")).encode()
        return write_atomic(path, gzip.compress(data) if path.suffix == ".gz" else data)

    @classmethod
    def load(cls, path: Path) -> Trace:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise TraceError(f"{path}: not a trace: {e}") from None
        if data.get("format") != FORMAT:
            raise TraceError(f"{path}: not a {FORMAT} file")
        cols = {k: np.array(v, dtype=np.float64) for k, v in data["columns"].items()}
        return cls(data["meta"], cols, data.get("events", []), data.get("kernel_events"))


def _plain(v: npt.NDArray[np.float64]) -> list[float | int | None]:
    out: list[float | int | None] = []
    for x in v.tolist():
        if x != x:  # NaN: not sampled
            out.append(None)
        elif float(x).is_integer():
            out.append(int(x))
        else:
            out.append(x)
    return out


# Other work beside a live run, in % of one CPU, above which its ksmd CPU and times
# are not this machine's quiet costs: a test suite on the other core doubled ksmd's
# CPU for the same first full scan (64 against 33 ms, seed-uzp1-nothp, 2026-11-30)
BUSY_PCT = 10.0


def others_cpu_pct(tr: Trace) -> float | None:
    """Mean CPU, in % of one CPU, that work other than ksmd, the workload and the lab
    used while the run went on (None for a trace without the machine's CPU columns,
    such as a model's)."""
    cols = ("cpu_busy_ns", "ksmd_cpu_ns", "workload_cpu_ns", "lab_cpu_ns")
    if any(c not in tr for c in cols) or len(tr) < 2:
        return None
    i, j = 0, len(tr) - 1
    span = float(tr.t[j] - tr.t[i])
    if span <= 0:
        return None
    d = {c: float(tr[c][j] - tr[c][i]) for c in cols}
    others = d["cpu_busy_ns"] - d["ksmd_cpu_ns"] - d["workload_cpu_ns"] - d["lab_cpu_ns"]
    return max(0.0, others / (span * 1e9) * 100)


def _num(v: float) -> str:
    """The shortest text that reads back as the same float (ns counters keep every
    digit); whole numbers without a decimal point."""
    return str(int(v)) if v.is_integer() else repr(v)
