"""Page contents as integer ids, and the bytes that stand for an id.

KSM's trees are ordered by ``memcmp`` of whole pages (``memcmp_pages`` in
mm/ksm.c).  A page for id ``n`` holds ``n`` as a big-endian u64 in its first 8
bytes and zeros after, so memcmp order equals numeric id order and id 0 is the
all-zero page (the minimum key).  The model orders its trees by id and meets
the same nodes as the kernel.

Id layout of a scenario (deterministic from the scenario alone):
  0                       the zero page
  1 .. duplicate_pool     duplicate pages (the same ids in every chunk)
  UNIQUE_BASE + g         the unique page at global page index g
  FRESH_BASE + k          the k-th page written by a run (events, volatile writer)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .scenario import HPAGE_PMD_NR, PAGE_SIZE, Region, Scenario

ZERO = 0
UNIQUE_BASE = 1 << 32
FRESH_BASE = 1 << 48

Ids = npt.NDArray[np.uint64]


def page_bytes(cid: int) -> bytes:
    """The 4 KiB page that stands for content id ``cid``."""
    return int(cid).to_bytes(8, "big") + bytes(PAGE_SIZE - 8)


def id_of(page: bytes) -> int:
    """Inverse of :func:`page_bytes` (for pages the workload wrote)."""
    return int.from_bytes(page[:8], "big")


@dataclass(frozen=True)
class RegionRef:
    """Where a region sits in the scenario's global page numbering."""

    process: int  # index in scenario.process
    replica: int  # 0 .. count-1
    region: int  # index in process.region
    first_page: int  # global page index of its first page
    spec: Region


def layout(sc: Scenario) -> Iterator[RegionRef]:
    """Every region of every process instance, in global page order."""
    g = 0
    for pi, k, proc in sc.instances():
        for ri, reg in enumerate(proc.region):
            yield RegionRef(pi, k, ri, g, reg)
            g += reg.pages


def mergeable(sc: Scenario, ref: RegionRef) -> bool:
    """Whether KSM may scan this region (VM_MERGEABLE once the workload is set up)."""
    merge = sc.process[ref.process].merge
    return merge == "prctl" or (merge == "madvise" and ref.spec.mergeable)


def region_ids(sc: Scenario, ref: RegionRef) -> Ids:
    """Content id of every 4 KiB page of one region (length ``ref.spec.pages``)."""
    reg = ref.spec
    rng = np.random.default_rng([reg.seed, ref.process, ref.replica, ref.region])
    n = reg.chunks
    weights = np.array([m.weight for m in reg.content], dtype=np.float64)
    choice = (
        rng.choice(len(reg.content), size=n, p=weights / weights.sum())
        if len(reg.content) > 1
        else np.zeros(n, dtype=np.int64)
    )
    # One template row per mix: zeros, duplicate ids, then a marker for unique.
    marker = np.uint64(np.iinfo(np.uint64).max)
    templates = np.empty((len(reg.content), HPAGE_PMD_NR), dtype=np.uint64)
    for i, mix in enumerate(reg.content):
        nz, nd, _ = mix.counts()
        templates[i, :nz] = ZERO
        templates[i, nz : nz + nd] = 1 + (np.arange(nd, dtype=np.uint64) % sc.duplicate_pool)
        templates[i, nz + nd :] = marker
    rows = rng.permuted(templates[choice], axis=1)
    ids = rows.reshape(-1)
    uniq = ids == marker
    ids[uniq] = UNIQUE_BASE + ref.first_page + np.flatnonzero(uniq).astype(np.uint64)
    return ids


def fresh_ids(start: int, count: int) -> Ids:
    """Ids for pages written during a run: never equal to any other page."""
    return FRESH_BASE + np.arange(start, start + count, dtype=np.uint64)


VOLATILE_TAG = 1 << 14


def written_ids(ref: RegionRef, tag: int, idx: npt.NDArray[np.int64]) -> Ids:
    """New ids for the pages ``idx`` of a region written by write number ``tag``.

    The same function serves the live workload and the model, so both write the
    same contents (and KSM's trees get the same shape).  Unique across regions
    (global page index) and writes (``tag`` above bit 40)."""
    return (FRESH_BASE + (np.uint64(tag) << np.uint64(40)) + np.uint64(ref.first_page)
            + idx.astype(np.uint64))


def write_targets(fraction: float, pages: int, seed: int, salt: int) -> npt.NDArray[np.int64]:
    """Which pages of a region a ``write`` event rewrites (sorted page indices)."""
    rng = np.random.default_rng([seed, salt, 0x77])
    k = max(1, round(fraction * pages))
    return np.sort(rng.choice(pages, size=k, replace=False)).astype(np.int64)


def volatile_targets(ref: RegionRef, step: int) -> npt.NDArray[np.int64]:
    """Pages rewritten at the ``step``-th full-scan end (``volatile_pages_per_scan``)."""
    reg = ref.spec
    rng = np.random.default_rng([reg.seed, ref.process, ref.replica, ref.region, step, 0x7A])
    k = min(reg.volatile_pages_per_scan, reg.pages)
    return np.sort(rng.choice(reg.pages, size=k, replace=False)).astype(np.int64)


def _mix_choice(sc: Scenario, ref: RegionRef) -> npt.NDArray[np.int64]:
    """Which content mix each 2 MiB chunk of the region uses (as region_ids draws it)."""
    reg = ref.spec
    rng = np.random.default_rng([reg.seed, ref.process, ref.replica, ref.region])
    n = reg.chunks
    if len(reg.content) == 1:
        return np.zeros(n, dtype=np.int64)
    weights = np.array([m.weight for m in reg.content], dtype=np.float64)
    return np.asarray(rng.choice(len(reg.content), size=n, p=weights / weights.sum()),
                      dtype=np.int64)


def expected_mergeable_pages(sc: Scenario) -> int:
    """Pages KSM could free if it merged every zero and duplicate page.

    Zero pages all go (to the zero page or one KSM page); duplicates keep one
    copy per distinct id.  Metrics use it to judge a merge rate.  Counted from
    each chunk's mix (the first draw of :func:`region_ids`), without
    generating page ids: cheap even for a 1 TiB host.
    """
    zero = dup = 0
    distinct = 0  # duplicate ids are 1..distinct (each chunk uses 1..min(nd, pool))
    for ref in layout(sc):
        if not mergeable(sc, ref):
            continue
        counts = np.array([m.counts() for m in ref.spec.content], dtype=np.int64)
        used = np.bincount(_mix_choice(sc, ref), minlength=len(counts))
        zero += int(used @ counts[:, 0])
        dup += int(used @ counts[:, 1])
        nd = counts[used > 0, 1]
        if nd.size:
            distinct = max(distinct, min(int(nd.max()), sc.duplicate_pool))
    return zero + dup - distinct
