"""``ksmlab capture``: a memory image of running processes (ksmlab/image.py).

What KSM would scan: each VMA with VM_MERGEABLE (/proc/PID/smaps ``mg``), page by
page from /proc/PID/pagemap (present, swapped, page-cache) and /proc/kpageflags
(THP, the zero page, KSM), and the contents of present anonymous pages from
/proc/PID/mem.  Only present pages are read: a read of an absent page through
/proc/PID/mem would fault it in (the zero page, or the huge zero page), so the
target's mappings and contents stay as they were.  A running target changes while
it is read; pause it (SIGSTOP, or QEMU's ``stop``) for an exact image.  MAP_SHARED
mappings (shmem, memfd, a guest's shared RAM) are never VM_MERGEABLE: a note says
which were left out (:func:`shared_note`).

Contents become ids in ``memcmp`` order: each distinct page is known by a 128-bit
BLAKE2b digest, ordered by its first 32 bytes, and pages that tie there are read
again whole and compared as bytes.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

from .. import image as img
from ..scenario import HPAGE_PMD_NR, PAGE_SIZE
from .kernelfs import KernelFS
from .pagemap import (
    KPF_COMPOUND_HEAD,
    KPF_KSM,
    KPF_THP,
    KPF_ZERO_PAGE,
    PFN_MASK,
    PM_FILE,
    PM_PRESENT,
    PM_SWAP,
    kpageflags,
    pagemap_entries,
)
from .smaps import Mapping, parse_smaps

READ_PAGES = 4096  # pages per /proc/PID/mem read (16 MiB)
PREFIX_WORDS = 4  # the first 32 bytes order contents; ties are read whole


class CaptureError(RuntimeError):
    """A process that cannot be captured; one line (exit code 2)."""


@dataclass
class _Contents:
    """Distinct non-zero contents met so far, by digest."""

    ids: dict[bytes, int] = field(default_factory=dict)
    fingerprint: list[int] = field(default_factory=list)  # the digest's first 8 bytes
    prefix: list[npt.NDArray[np.uint64]] = field(default_factory=list)
    where: list[tuple[int, int]] = field(default_factory=list)  # (process, address)

    def add(self, digest: bytes, prefix: npt.NDArray[np.uint64], proc: int, addr: int) -> int:
        k = self.ids.get(digest)
        if k is None:
            k = self.ids[digest] = len(self.where)
            self.fingerprint.append(int.from_bytes(digest[:8], "little") | 1)
            self.prefix.append(prefix)
            self.where.append((proc, addr))
        return k


def shared_note(pid: int, vmas: list[Mapping]) -> str | None:
    """What the image leaves out of ``pid``'s memory: its MAP_SHARED mappings (smaps
    ``sh`` VM_SHARED, ``ms`` VM_MAYSHARE: shmem, memfd, shared files).  KSM merges
    only private anonymous memory: vma_ksm_compatible() ignores MADV_MERGEABLE and
    PR_SET_MEMORY_MERGE on them, so none is VM_MERGEABLE."""
    shared = [v for v in vmas if {"sh", "ms"} & set(v.flags) and "mg" not in v.flags]
    if not shared:
        return None
    rss = sum(v.kb.get("Rss", 0) for v in shared) / 1024
    big = max(shared, key=lambda v: v.size)
    return (f"process {pid}: {len(shared)} MAP_SHARED mapping{'s' * (len(shared) > 1)} "
            f"skipped ({sum(v.size for v in shared) / 2**20:.1f} MiB mapped, {rss:.1f} MiB "
            f"resident; the largest {big.size / 2**20:.1f} MiB at {big.start:#x} "
            f"{big.path or '(anonymous shared)'}): KSM merges only private anonymous "
            "memory (vma_ksm_compatible() refuses VM_SHARED)")


def _kib(v: str | None) -> int:
    return int(v.split()[0]) if v else 0


class Capture:
    def __init__(self, fs: KernelFS | None = None) -> None:
        self.fs = fs or KernelFS()
        self.contents = _Contents()
        self.fds: list[int] = []
        self.bytes_read = 0
        self.notes: list[str] = []

    def _check(self, pid: int) -> list[Mapping]:
        if not self.fs.exists(f"proc/{pid}"):
            raise CaptureError(f"no process {pid}")
        try:
            vmas = parse_smaps(self.fs.read(f"proc/{pid}/smaps"))
            self.fs.read_bytes(f"proc/{pid}/pagemap", 0, 8)
            os.close(os.open(self.fs.path("proc/kpageflags"), os.O_RDONLY))
        except PermissionError:
            raise CaptureError(f"process {pid} is not ours to read: its pagemap pfns, "
                               "/proc/kpageflags and /proc/PID/mem need root") from None
        except FileNotFoundError:
            raise CaptureError(f"no process {pid}") from None
        mergeable = [v for v in vmas if "mg" in v.flags]
        skipped = shared_note(pid, vmas)
        if not mergeable:
            raise CaptureError(
                f"process {pid} has nothing mergeable (no VMA with VM_MERGEABLE: it needs "
                "madvise(MADV_MERGEABLE), or prctl(PR_SET_MEMORY_MERGE) as "
                "`ksmlab exec --merge-any` sets)" + (f"; {skipped}" if skipped else ""))
        if skipped:
            self.notes.append(skipped)
        return mergeable

    def process(self, proc: int, pid: int) -> tuple[img.ImageProcess, npt.NDArray[np.uint32],
                                                    npt.NDArray[np.uint8]]:
        vmas = self._check(pid)
        try:
            fd = os.open(self.fs.path(f"proc/{pid}/mem"), os.O_RDONLY)
        except OSError as e:
            raise CaptureError(f"process {pid}: cannot read its memory: {e.strerror}") from None
        self.fds.append(fd)
        st = self.fs.fields(f"proc/{pid}/status")
        rollup = self.fs.fields(f"proc/{pid}/smaps_rollup")
        # "ksm_merge_any: yes" in /proc/PID/ksm_stat (6.8+): prctl(PR_SET_MEMORY_MERGE)
        merge_any = "ksm_merge_any: yes" in (self.fs.read_or_none(f"proc/{pid}/ksm_stat") or "")
        out_vmas: list[img.ImageVma] = []
        cids, flags = [], []
        first = 0
        for v in vmas:
            c, f = self._vma(proc, pid, fd, v)
            thp_kib = int((f[::HPAGE_PMD_NR] & img.THP != 0).sum()) * 2048
            smaps_kib = v.kb.get("AnonHugePages", 0)
            if thp_kib != smaps_kib:
                self.notes.append(f"process {pid} VMA {v.start:#x}: {thp_kib} KiB seen in THPs, "
                                  f"smaps AnonHugePages {smaps_kib} KiB")
            out_vmas.append(img.ImageVma(
                start=v.start, pages=(v.end - v.start) // PAGE_SIZE, first=first,
                hugepage="hg" in v.flags, nohugepage="nh" in v.flags, name=v.path))
            first += len(c)
            cids.append(c)
            flags.append(f)
        cmdline = (self.fs.read_or_none(f"proc/{pid}/cmdline") or "").replace("\0", " ").strip()
        meta = img.ImageProcess(
            pid=pid, comm=st.get("Name", "?"), cmdline=cmdline[:400],
            merge_any=merge_any, rss_anon_kib=_kib(st.get("RssAnon")),
            anon_huge_kib=_kib(rollup.get("AnonHugePages")), vmas=out_vmas)
        return meta, np.concatenate(cids), np.concatenate(flags)

    def _vma(self, proc: int, pid: int, fd: int, v: Mapping
             ) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint8]]:
        n = (v.end - v.start) // PAGE_SIZE
        ent = pagemap_entries(self.fs, pid, v.start, v.end - v.start)
        present = (ent & np.uint64(PM_PRESENT)) != 0
        swapped = (ent & np.uint64(PM_SWAP)) != 0
        file = present & ((ent & np.uint64(PM_FILE)) != 0)
        pfn = np.where(present, ent & np.uint64(PFN_MASK), np.uint64(0))
        kpf = kpageflags(self.fs, pfn)
        zero_pte = present & ((kpf >> np.uint64(KPF_ZERO_PAGE)) & np.uint64(1) != 0)
        ksm = present & ((kpf >> np.uint64(KPF_KSM)) & np.uint64(1) != 0)
        anon = present & ~file
        flags = np.zeros(n, dtype=np.uint8)
        flags[anon & ~zero_pte] |= img.PRESENT  # a page of its own (not the zero page)
        flags[file] |= img.FILE
        flags[zero_pte] |= img.ZERO_PTE
        flags[ksm] |= img.KSM
        self._thps(v, pfn, kpf, anon, flags)
        if ksm.any():
            self.notes.append(f"process {pid}: {int(ksm.sum())} pages were KSM pages (merged "
                              "already); the model starts from them unmerged, as run=2 leaves "
                              "them")
        if swapped.any():
            self.notes.append(f"process {pid}: {int(swapped.sum())} pages swapped out "
                              "(not read: absent in the image)")
        cid = np.zeros(n, dtype=np.uint32)
        tmp = np.full(n, -1, dtype=np.int64)
        readable = anon & ~zero_pte
        idx = np.flatnonzero(readable)
        if len(idx):
            runs = np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1)
            for run in runs:
                for lo in range(0, len(run), READ_PAGES):
                    part = run[lo:lo + READ_PAGES]
                    self._read(proc, fd, v.start, part, tmp)
        cid[tmp >= 0] = tmp[tmp >= 0].astype(np.uint32) + 1  # renumbered in finish()
        return cid, flags

    def _thps(self, v: Mapping, pfn: npt.NDArray[np.uint64], kpf: npt.NDArray[np.uint64],
              anon: npt.NDArray[np.bool_], flags: npt.NDArray[np.uint8]) -> None:
        """2 MiB ranges inside the VMA held by one PMD-order THP: its head first, 512
        present anon pages on consecutive pfns."""
        off = (-(v.start // PAGE_SIZE)) % HPAGE_PMD_NR
        n = len(pfn)
        head = np.uint64((1 << KPF_THP) | (1 << KPF_COMPOUND_HEAD))
        for lo in range(off, n - HPAGE_PMD_NR + 1, HPAGE_PMD_NR):
            hi = lo + HPAGE_PMD_NR
            if (kpf[lo] & head) != head or not anon[lo:hi].all():
                continue
            if np.array_equal(pfn[lo:hi] - pfn[lo], np.arange(HPAGE_PMD_NR, dtype=np.uint64)):
                flags[lo:hi] |= img.THP

    def _read(self, proc: int, fd: int, start: int, pages: npt.NDArray[np.int64],
              tmp: npt.NDArray[np.int64]) -> None:
        addr = start + int(pages[0]) * PAGE_SIZE
        size = len(pages) * PAGE_SIZE
        try:
            buf = os.pread(fd, size, addr)
        except OSError as e:
            raise CaptureError(f"reading {size} bytes at {addr:#x}: {e.strerror}") from None
        if len(buf) != size:
            raise CaptureError(f"short read at {addr:#x}: the process changed its mappings")
        self.bytes_read += size
        words = np.frombuffer(buf, dtype=">u8").reshape(len(pages), PAGE_SIZE // 8)
        nonzero = np.flatnonzero(words.any(axis=1))
        tmp[pages] = -1
        mv = memoryview(buf)
        for i in nonzero.tolist():
            page = mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
            digest = hashlib.blake2b(page, digest_size=16).digest()
            tmp[pages[i]] = self.contents.add(
                digest, words[i, :PREFIX_WORDS].astype(np.uint64), proc,
                addr + i * PAGE_SIZE)

    def order(self) -> npt.NDArray[np.uint32]:
        """rank[k]: the memcmp rank (1..) of the k-th distinct content met."""
        c = self.contents
        u = len(c.where)
        rank = np.zeros(u + 1, dtype=np.uint32)
        if not u:
            return rank
        pre = np.stack(c.prefix)
        order = np.lexsort(tuple(pre[:, k] for k in reversed(range(PREFIX_WORDS))))
        sp = pre[order]
        tie = np.r_[False, (sp[1:] == sp[:-1]).all(axis=1)]
        i = 0
        while i < u:
            j = i + 1
            while j < u and tie[j]:
                j += 1
            if j - i > 1:  # equal first 32 bytes: compare whole pages
                group = order[i:j]
                pages = [self._page(*c.where[k]) for k in group.tolist()]
                order[i:j] = group[sorted(range(len(group)), key=pages.__getitem__)]
            i = j
        rank[1:][order] = np.arange(1, u + 1, dtype=np.uint32)
        return rank

    def _page(self, proc: int, addr: int) -> bytes:
        return os.pread(self.fds[proc], PAGE_SIZE, addr)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _take(pids: list[int], fs: KernelFS | None, ordered: bool
          ) -> tuple[Capture, list[img.ImageProcess], list[npt.NDArray[np.uint32]],
                     list[npt.NDArray[np.uint8]], npt.NDArray[np.uint32]]:
    cap = Capture(fs)
    procs, cids, flags = [], [], []
    try:
        for i, pid in enumerate(pids):
            meta, c, f = cap.process(i, pid)
            procs.append(meta)
            cids.append(c)
            flags.append(f)
        rank = cap.order() if ordered else np.zeros(0, dtype=np.uint32)
    finally:
        cap.close()
    return cap, procs, cids, flags, rank


def _fingerprints(cap: Capture, cids: list[npt.NDArray[np.uint32]]
                  ) -> list[npt.NDArray[np.uint64]]:
    """Per page, 64 bits of its content's digest (0: zero-filled or absent)."""
    fp = np.array([0, *cap.contents.fingerprint], dtype=np.uint64)
    return [fp[c] for c in cids]


@dataclass(frozen=True)
class Captured:
    image: img.Image
    fingerprints: list[npt.NDArray[np.uint64]]  # per process, per page


def capture(pids: list[int], out: Path, fs: KernelFS | None = None) -> Captured:
    """Capture ``pids`` into the image folder ``out``; CaptureError for a PID that is
    gone, not ours to read, or has nothing mergeable."""
    t = time.monotonic()
    cap, procs, cids, flags, rank = _take(pids, fs, ordered=True)
    fps = _fingerprints(cap, cids)
    cids = [rank[c] for c in cids]  # tmp+1 -> memcmp rank; 0 stays 0
    meta_all = img.ImageMeta(
        captured=datetime.now(UTC).isoformat(timespec="seconds"), kernel=os.uname().release,
        contents=len(cap.contents.where), processes=procs,
        capture_s=round(time.monotonic() - t, 3), bytes_read=cap.bytes_read, notes=cap.notes)
    img.save(out, meta_all, cids, flags)
    return Captured(img.load(out), fps)


def changed_pages(pid: int, before: Captured, fs: KernelFS | None = None) -> int:
    """Pages of the captured VMAs whose content (or presence) is not what the capture
    read: what a running process wrote while KSM ran.  KSM's own work (a merge, a
    split, the zero remap) keeps every page's content, so it is not counted.  VMAs
    mapped or unmapped since are not compared (their count would need an address map)."""
    cap, procs, cids, flags, _ = _take([pid], fs, ordered=False)
    old_vmas = [(v.start, v.pages) for v in before.image.meta.processes[0].vmas]
    if [(v.start, v.pages) for v in procs[0].vmas] != old_vmas:
        raise CaptureError(f"process {pid} changed its mappings during the run")
    now = _fingerprints(cap, cids)[0]
    was = before.fingerprints[0]
    mask = img.PRESENT | img.ZERO_PTE
    here = (flags[0] & mask) != 0
    there = (before.image.flags[0] & mask) != 0
    return int(((now != was) | (here != there)).sum())
