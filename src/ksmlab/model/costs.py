"""CPU cost model of ksmd: one profile (all parameters) and a meter.

Simulated time advances by ksmd's sleeps plus the CPU cost of each batch, and
ksmd's CPU time (the trace's ``ksmd_cpu_ns``) is the same sum.  Every number
is a parameter of :class:`CostProfile` so that it can be calibrated from live
traces and loaded from a JSON file.

Defaults, from reference/live-findings.md and kernel-behavior.md §5:
- ~3 µs of CPU per page visit at 1000 pages/20 ms with unique content (16 %
  of a CPU), at most 7 % with zero or duplicate content: visit + checksum +
  an unstable-tree walk of ~16 levels for unique pages.
- xxhash of 4 KiB ≈ 860 cycles ≈ 0.3 µs (btrfs hash-speedtest).
- A full scan of 256 MiB (65536 pages) at 100 pages/20 ms took 15.6 s against
  13.1 s ideal: ~4 ms per batch beyond sleep_millisecs, one jiffy at HZ=250
  (:func:`ksmd_wake`).
- THP split: rmap walk + 512 migration entries + 512 restores, each preceded by
  a zero test that reads the whole 4 KiB of a zero subpage (estimate).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class CostProfile:
    """Nanoseconds per elementary step of ksmd (and of the threads it races)."""

    # scan_get_next_rmap_item() + cmp_and_merge_page() entry, per page handed over
    visit_ns: float = 1000.0
    # page-table walk over a PTE that yields no page (none, zero pfn, skipped THP)
    pte_skip_ns: float = 8.0
    # alloc_rmap_item() / free_rmap_item()
    rmap_alloc_ns: float = 80.0
    rmap_free_ns: float = 60.0
    # calc_checksum(): xxhash over 4 KiB
    checksum_ns: float = 300.0
    # one level of stable_tree_search()/stable_tree_insert(): keyhole + memcmp
    stable_level_ns: float = 90.0
    # one level of unstable_tree_search_insert(): get_mergeable_page() + memcmp
    unstable_level_ns: float = 110.0
    # memcmp of two equal pages (the full 4 KiB is read)
    memcmp_equal_ns: float = 150.0
    # try_to_merge_one_page() reaching write_protect_page() + replace_page()
    merge_ns: float = 1500.0
    # ... the same with the zero page (try_to_merge_with_zero_page(), use_zero_pages=1):
    # no KSM page to lock or map, no stable node, so priced apart.  Fits differ: 390
    # against 720 ns on one day's traces, 748 against 727 in the final quick fit
    zero_merge_ns: float = 1500.0
    # break_cow(): unshare fault + copy
    break_cow_ns: float = 1500.0
    # split_huge_page(): fixed part (rmap walk, freeze, 512 struct pages, TLB)
    split_ns: float = 25000.0
    # zero test of one subpage during the remap: all-zero pages are read whole
    zero_test_zero_ns: float = 90.0
    # ... a data page stops at its first non-zero byte
    zero_test_data_ns: float = 8.0
    # restoring one PTE from a migration entry (or installing a zero PTE)
    remap_pte_ns: float = 25.0
    # freeing one subpage remapped to the zero page
    free_page_ns: float = 40.0
    # a failed split (refcount check) costs the unmap/remap of the PMD
    split_failed_ns: float = 6000.0
    # each full-scan start: lru_add_drain_all() and friends
    scan_start_ns: float = 20000.0
    # per batch: ksm_thread_mutex, cond_resched(), wake-up (CPU)
    batch_overhead_ns: float = 2000.0
    # one dup of a stable chain looked at by stable_node_dup(): ksm_get_folio()
    # (folio_try_get() and the mapping checks) and the folio_put() after it
    dup_visit_ns: float = 40.0
    # a page smart scan passes over (should_skip_rmap_item() true): the page walk,
    # get_next_rmap_item() and the age test; not counted in pages_scanned, nor in
    # the batch's pages_to_scan, so a scan of skipped pages ends in one batch
    smart_skip_ns: float = 100.0
    # a batch starts cold after ksmd's sleep (caches, TLB, clock): its first
    # cold_window_ns of work cost cold_start times more.  Measured here: the same
    # 32768 first visits cost 26-45 us more per batch at pages_to_scan=100
    # (seed-uzp0, ~100 us of work a batch) than at 1000 (uzp0-1000); a user-space
    # loop of 4 KiB checksums after a 20 ms sleep shows the same slow start
    cold_start: float = 0.35
    cold_window_ns: float = 250_000.0
    # wall time, not CPU: where in its jiffy ksmd wakes (timer interrupt and wake-up
    # latency); with the batch's CPU it decides whether the sleep ends a tick later
    sleep_slack_ns: float = 500_000.0
    # one jiffy: 1/CONFIG_HZ (250 on these machines)
    tick_ns: float = 4_000_000.0

    def to_json(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostProfile:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown cost profile field(s): {', '.join(unknown)}")
        values = {k: float(v) for k, v in data.items()}
        if "merge_ns" in values and "zero_merge_ns" not in values:
            values["zero_merge_ns"] = values["merge_ns"]  # fitted when one price was both
        bad = sorted(k for k, v in values.items() if not v >= 0 or (k == "tick_ns" and v == 0))
        if bad:
            raise ValueError(f"out of range (prices >= 0, tick_ns > 0): {', '.join(bad)}")
        return cls(**values)

    @classmethod
    def load(cls, path: Path) -> CostProfile:
        return cls.from_dict(json.loads(path.read_text()))


COST_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(CostProfile))


def ksmd_wake(t: float, busy: float, sleep_ms: int, slack_ns: float, tick_ns: float) -> float:
    """When ksmd starts its next batch: it started one at ``t`` and ran ``busy`` s.

    ksm_scan_thread() sleeps msecs_to_jiffies(sleep_millisecs) jiffies
    (wait_event_freezable_timeout(); 5 at HZ=250 for 20 ms).  The timer counts from
    the jiffy the batch ends in and fires on a tick, so the period is whole jiffies:
    the sleep's, plus the one the batch ran in, plus one more whenever the batch
    (begun ``slack_ns`` after a tick) crosses a tick.  Measured: 24.0 ms per batch
    for 0.1 ms of CPU, 25.1 ms for 2.9 ms (smart-scan-off).  Compiled unchanged by
    the fast engine, so both engines add the same floats.
    """
    if sleep_ms <= 0:
        return t + busy
    jiffies = math.ceil(sleep_ms * 1e6 / tick_ns)
    ticks = jiffies + math.ceil((busy * 1e9 + slack_ns) / tick_ns)
    return t + ticks * (tick_ns / 1e9)


def shipped_profile() -> CostProfile:
    """The profile shipped in the package (``ksmlab calibrate`` on one machine of this
    kind); the field defaults above are the hand-set priors it was fitted from."""
    path = resources.files("ksmlab.model") / "profiles" / "default.json"
    return CostProfile.from_dict(json.loads(path.read_text())["profile"])


def default_profile() -> CostProfile:
    """What a model run takes when given none: the file named by $KSMLAB_PROFILE
    (the test suite pins its own, so a refit of the shipped one never moves a
    test), else the shipped profile.  Commands choose this machine's profile
    before falling back here (ksmlab.profiles)."""
    env = os.environ.get("KSMLAB_PROFILE")
    return load_profile(Path(env)) if env else shipped_profile()


class CpuMeter:
    """Accumulates ksmd's CPU nanoseconds, and how often each cost was charged.

    The counts make calibration a linear fit: CPU = sum(count[p] * profile[p]).
    """

    __slots__ = ("batch0", "counts", "ns", "p", "price")

    def __init__(self, profile: CostProfile) -> None:
        self.p = profile
        self.price = profile.to_json()
        self.ns = 0.0
        self.batch0 = 0.0  # ns when ksmd's batch in progress began (the advisor's clock)
        self.counts: dict[str, float] = dict.fromkeys(self.price, 0.0)

    def charge(self, name: str, n: float = 1.0) -> None:
        self.counts[name] += n
        self.ns += n * self.price[name]


def load_profile(path: Path | None) -> CostProfile:
    """The profile in ``path``, or the one shipped for this machine kind."""
    if path is None:
        return DEFAULT_PROFILE
    try:
        data = json.loads(path.read_text())
        # a file written by `ksmlab calibrate` holds the profile under "profile"
        return CostProfile.from_dict(data.get("profile", data))
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise ValueError(f"{path}: not a cost profile: {e}") from None


DEFAULT_PROFILE = default_profile()
