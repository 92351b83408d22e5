"""/proc/PID/pagemap and /proc/kpageflags as the lab reads them (live/pagemap.py),
on a fake /proc: the record formats of Documentation/admin-guide/mm/pagemap.rst."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ksmlab.live.kernelfs import KernelFS
from ksmlab.live.pagemap import (
    KPF_COMPOUND_HEAD,
    KPF_THP,
    PM_PRESENT,
    kpageflags,
    pagemap_pfns,
    thp_heads,
)

THP_HEAD = (1 << KPF_THP) | (1 << KPF_COMPOUND_HEAD)
THP_TAIL = 1 << KPF_THP


def _fake_proc(root: Path, pid: int, pfns: list[int], flags: dict[int, int]) -> KernelFS:
    (root / "proc" / str(pid)).mkdir(parents=True)
    words = [(PM_PRESENT | p) if p else 0 for p in pfns]
    (root / "proc" / str(pid) / "pagemap").write_bytes(np.array(words, dtype="<u8").tobytes())
    table = np.zeros(max(flags) + 1, dtype="<u8")
    for pfn, f in flags.items():
        table[pfn] = f
    (root / "proc" / "kpageflags").write_bytes(table.tobytes())
    return KernelFS(root)


def test_pagemap_gives_pfns_and_zero_where_not_present(tmp_path: Path) -> None:
    fs = _fake_proc(tmp_path, 7, [0, 0, 11, 0, 13], {13: 1})
    assert pagemap_pfns(fs, 7, 4096, 3 * 4096).tolist() == [0, 11, 0]
    assert kpageflags(fs, np.array([13, 0], dtype=np.uint64)).tolist() == [1, 0]


def test_thp_heads_names_the_ranges_still_whole(tmp_path: Path) -> None:
    # three 2 MiB ranges: a THP, one split (order-0 pages), one THP; a region of one
    # range after them, not present
    pfns = [1024 + i for i in range(512)] + [5000 + i for i in range(512)] \
        + [2048 + i for i in range(512)] + [0] * 512
    flags = {1024: THP_HEAD, 1025: THP_TAIL, 5000: 0, 2048: THP_HEAD}
    fs = _fake_proc(tmp_path, 9, pfns, flags)
    pf = pagemap_pfns(fs, 9, 0, len(pfns) * 4096)
    idx = np.arange(len(pfns), dtype=np.int64)
    assert thp_heads(fs, idx, pf) == [0, 1024]
    # the lab names pages by their index in the process's regions, in any address order
    order = np.r_[1024:2048, 0:1024]
    assert thp_heads(fs, idx[order], pf[order]) == [0, 1024]
