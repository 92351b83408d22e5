"""Where a process's pages are and what they are: /proc/PID/pagemap and
/proc/kpageflags (Documentation/admin-guide/mm/pagemap.rst).  Both show pfns and
flags to root only (CAP_SYS_ADMIN); reading them never faults a page in."""

from __future__ import annotations

import os

import numpy as np
import numpy.typing as npt

from ..scenario import HPAGE_PMD_NR
from .kernelfs import KernelFS

PFN_MASK = (1 << 55) - 1  # pagemap bits 0-54
PM_FILE = 1 << 61  # a page-cache page (or shared anon)
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63
# include/uapi/linux/kernel-page-flags.h
KPF_COMPOUND_HEAD = 15
KPF_NOPAGE = 20
KPF_KSM = 21
KPF_THP = 22  # any page of an anon (or file) THP/large folio
KPF_ZERO_PAGE = 24


def pagemap_entries(fs: KernelFS, pid: int, addr: int, size: int) -> npt.NDArray[np.uint64]:
    """The raw pagemap word of each 4 KiB page of [addr, addr + size)."""
    raw = fs.read_bytes(f"proc/{pid}/pagemap", (addr // 4096) * 8, (size // 4096) * 8)
    return np.frombuffer(raw, dtype="<u8").copy()


def pagemap_pfns(fs: KernelFS, pid: int, addr: int, size: int) -> npt.NDArray[np.uint64]:
    """The pfn of each 4 KiB page of [addr, addr + size) of process ``pid`` (0 where
    not present)."""
    n = size // 4096
    raw = fs.read_bytes(f"proc/{pid}/pagemap", (addr // 4096) * 8, n * 8)
    v = np.frombuffer(raw, dtype="<u8")
    out: npt.NDArray[np.uint64] = np.where(v & np.uint64(PM_PRESENT), v & np.uint64(PFN_MASK),
                                           np.uint64(0)).astype(np.uint64)
    return out


def kpageflags(fs: KernelFS, pfns: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The /proc/kpageflags word of each pfn (0 for pfn 0: not present); one read per
    run of consecutive pfns (a THP's 512 are one)."""
    out = np.zeros(len(pfns), dtype=np.uint64)
    want = pfns != 0
    if not want.any():
        return out
    uniq, inverse = np.unique(pfns[want], return_inverse=True)
    words = np.empty(len(uniq), dtype=np.uint64)
    breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
    fd = os.open(fs.path("proc/kpageflags"), os.O_RDONLY)
    try:
        for lo, hi in zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(uniq)].tolist(),
                          strict=True):
            raw = os.pread(fd, (hi - lo) * 8, int(uniq[lo]) * 8)
            words[lo:hi] = np.frombuffer(raw, dtype="<u8")
    finally:
        os.close(fd)
    out[want] = words[inverse]
    return out


def thp_heads(fs: KernelFS, idx: npt.NDArray[np.int64], pfns: npt.NDArray[np.uint64]
              ) -> list[int]:
    """Of pages ``idx`` (page index in a process's regions, each region 2 MiB aligned as
    the workload maps it) at ``pfns``, the index of each 2 MiB range whose first page is
    still the head of a THP: one no split has reached (split_huge_page() leaves order-0
    pages, which kpageflags shows without KPF_THP)."""
    first = idx % HPAGE_PMD_NR == 0
    flags = kpageflags(fs, pfns[first])
    bits = np.uint64((1 << KPF_THP) | (1 << KPF_COMPOUND_HEAD))
    return sorted(idx[first][(flags & bits) == bits].tolist())
