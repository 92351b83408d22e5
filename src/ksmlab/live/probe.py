"""Does this kernel remap zero-filled subpages when it splits an anonymous THP?

A probe, not a version parse (distribution kernels carry backports): a child
process faults one THP in a MADV_HUGEPAGE mapping, writes one byte of its first
page (the other 511 stay zero-filled), and asks for it to be paged out
(MADV_PAGEOUT).  With no swap to take it, shrink_folio_list() splits the THP
(thp_swpout_fallback) and a kernel with b1f202060afe (6.12) maps the zero
subpages to the shared zero page on the way (remap_page(...,
RMP_USE_SHARED_ZEROPAGE)); an older kernel leaves 511 zero-filled pages of their
own.  Only the child's own memory is touched; no knob is read or written.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

from ..scenario import HPAGE_PMD_NR, HPAGE_PMD_SIZE
from .kernelfs import KernelFS
from .pagemap import (
    KPF_COMPOUND_HEAD,
    KPF_THP,
    KPF_ZERO_PAGE,
    PFN_MASK,
    PM_PRESENT,
    PM_SWAP,
    kpageflags,
    pagemap_entries,
)

MADV_PAGEOUT = 21


@dataclass(frozen=True)
class RemapProbe:
    remaps: bool | None  # None: the probe could not tell
    how: str  # what it saw, one line


def _child() -> None:
    """In the probe's child: one THP, one byte written, paged out; print what its
    pages are now (read through pagemap and kpageflags by the child itself)."""
    from .workload import load_libc, map_region

    libc = load_libc()
    addr = map_region(libc, HPAGE_PMD_SIZE, "hugepage", False)
    ctypes.c_char.from_address(addr).value = b"\x01"
    fs = KernelFS()
    pid = os.getpid()

    def look() -> dict[str, int]:
        ent = pagemap_entries(fs, pid, addr, HPAGE_PMD_SIZE)
        present = (ent & np.uint64(PM_PRESENT)) != 0
        pfn = np.where(present, ent & np.uint64(PFN_MASK), np.uint64(0))
        kpf = kpageflags(fs, pfn)
        head = np.uint64((1 << KPF_THP) | (1 << KPF_COMPOUND_HEAD))
        return {"thp": int((kpf[0] & head) == head),
                "zero_pfn": int(((kpf[1:] >> np.uint64(KPF_ZERO_PAGE)) & np.uint64(1)).sum()),
                "own": int((present[1:] & (((kpf[1:] >> np.uint64(KPF_ZERO_PAGE))
                                             & np.uint64(1)) == 0)).sum()),
                "swapped": int(((ent[1:] & np.uint64(PM_SWAP)) != 0).sum())}

    before = look()
    rc = libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(HPAGE_PMD_SIZE), MADV_PAGEOUT)
    print(json.dumps({"before": before, "after": look(), "madvise": rc}), flush=True)


def probe_remap(timeout: float = 20.0) -> RemapProbe:
    if os.geteuid() != 0:
        return RemapProbe(None, "needs root (pagemap pfns and /proc/kpageflags)")
    r = subprocess.run([sys.executable, "-c", "from ksmlab.live.probe import _child; _child()"],
                       capture_output=True, text=True, timeout=timeout, check=False)
    try:
        d = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return RemapProbe(None, f"the probe failed: {r.stderr.strip()[-200:]}")
    before, after = d["before"], d["after"]
    rest = HPAGE_PMD_NR - 1
    if not before["thp"]:
        return RemapProbe(None, "no THP to split (transparent_hugepage/enabled is never, "
                          "or none could be allocated)")
    if after["swapped"]:
        return RemapProbe(None, f"the probe's THP went to swap ({after['swapped']} pages): "
                          "no split to look at")
    if after["thp"]:
        return RemapProbe(None, "MADV_PAGEOUT left the probe's THP whole")
    if after["zero_pfn"] == rest:
        return RemapProbe(True, f"a split THP's {rest} zero-filled subpages now map the "
                          "shared zero page (b1f202060afe, 6.12)")
    if after["own"] == rest:
        return RemapProbe(False, f"a split THP's {rest} zero-filled subpages kept pages of "
                          "their own (before 6.12)")
    return RemapProbe(None, f"after the split {after['zero_pfn']} map the zero page and "
                      f"{after['own']} have pages of their own")
