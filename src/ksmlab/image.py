"""Memory images: what ``ksmlab capture`` read of running processes, as a workload.

An image is a folder:

- ``image.json``: :class:`ImageMeta` (the processes, their VMAs, how it was taken)
- ``p<N>.cid.npy``: per captured page of process N (its VMAs in address order), a
  content id, ``uint32``: 0 for an all-zero page, 1.. for the distinct non-zero
  contents in ``memcmp`` order (KSM's trees order pages by ``memcmp_pages()``, so
  the model's trees take the kernel's shape)
- ``p<N>.flags.npy``: per page, ``uint8`` bits :data:`PRESENT` (an anon page of
  its own), :data:`THP`
  (in a PMD-mapped THP), :data:`ZERO_PTE` (maps the shared zero page),
  :data:`KSM` (a KSM page at capture), :data:`FILE` (a page-cache page of a
  private file mapping: KSM skips it)

5 bytes per captured 4 KiB page; ``numpy.load(mmap_mode="r")`` reads tens of GiB
without loading them.  This module never touches the kernel (``live/capture.py``
writes images).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .units import HPAGE_PMD_NR

FORMAT = "ksmlab-image/1"
PRESENT, THP, ZERO_PTE, KSM, FILE = 1, 2, 4, 8, 16
BYTES_PER_PAGE = 5  # cid (4) + flags (1)


class ImageError(ValueError):
    """An image folder that cannot be read; one line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageVma(_Strict):
    """A VMA KSM may scan (VM_MERGEABLE at capture), as /proc/PID/smaps showed it."""

    start: int = Field(ge=0, description="virtual address")
    pages: int = Field(gt=0)
    first: int = Field(ge=0, description="index of its first page in the process's arrays")
    hugepage: bool = False  # VM_HUGEPAGE ("hg")
    nohugepage: bool = False  # VM_NOHUGEPAGE ("nh")
    name: str = ""  # the smaps header's path or [heap]/[stack], "" for anonymous

    @property
    def aligned(self) -> bool:
        """Both ends on 2 MiB: the model maps it as it is."""
        return self.start % (HPAGE_PMD_NR * 4096) == 0 and self.pages % HPAGE_PMD_NR == 0


class ImageProcess(_Strict):
    pid: int
    comm: str
    cmdline: str = ""
    merge_any: bool = False  # prctl(PR_SET_MEMORY_MERGE): /proc/PID/ksm_stat
    rss_anon_kib: int = 0  # RssAnon at capture: the whole process, not only its VMAs here
    anon_huge_kib: int = 0  # AnonHugePages at capture (smaps_rollup)
    vmas: list[ImageVma]

    @property
    def pages(self) -> int:
        return sum(v.pages for v in self.vmas)


class ImageMeta(_Strict):
    format: str = FORMAT
    captured: str
    kernel: str
    contents: int = Field(ge=0, description="distinct non-zero page contents")
    processes: list[ImageProcess] = Field(min_length=1)
    capture_s: float = 0.0
    bytes_read: int = 0
    notes: list[str] = Field(default_factory=list)


@dataclass(frozen=True)
class Image:
    path: Path
    meta: ImageMeta
    cid: list[npt.NDArray[np.uint32]]  # per process
    flags: list[npt.NDArray[np.uint8]]

    def stats(self) -> dict[str, int]:
        """Page counts over every process: captured, present, zero-filled, in THPs,
        mapping the zero page, KSM pages, distinct non-zero contents."""
        out = dict.fromkeys(("pages", "present", "zero", "thp", "zero_pte", "ksm"), 0)
        for cid, fl in zip(self.cid, self.flags, strict=True):
            present = (fl & PRESENT) != 0
            out["pages"] += len(fl)
            out["present"] += int(present.sum())
            out["zero"] += int((present & (cid == 0) & ((fl & ZERO_PTE) == 0)).sum())
            out["thp"] += int(((fl & THP) != 0).sum()) // HPAGE_PMD_NR
            out["zero_pte"] += int(((fl & ZERO_PTE) != 0).sum())
            out["ksm"] += int(((fl & KSM) != 0).sum())
        out["contents"] = self.meta.contents
        return out


def save(folder: Path, meta: ImageMeta, cid: list[npt.NDArray[np.uint32]],
         flags: list[npt.NDArray[np.uint8]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (c, f) in enumerate(zip(cid, flags, strict=True)):
        np.save(folder / f"p{i}.cid.npy", c.astype(np.uint32, copy=False))
        np.save(folder / f"p{i}.flags.npy", f.astype(np.uint8, copy=False))
    tmp = folder / "image.json.tmp"
    tmp.write_text(json.dumps(meta.model_dump(mode="json"), indent=1) + "\n")
    tmp.replace(folder / "image.json")  # last: a folder with image.json is whole


@functools.lru_cache(maxsize=64)
def _meta(folder: Path, mtime: float) -> ImageMeta:
    try:
        meta = ImageMeta.model_validate_json((folder / "image.json").read_text())
    except (OSError, ValidationError, ValueError) as e:
        first = str(e).splitlines()[0]
        raise ImageError(f"{folder}/image.json: {first}") from None
    if meta.format != FORMAT:
        raise ImageError(f"{folder}: format {meta.format!r}, this ksmlab reads {FORMAT!r}")
    return meta


def load_meta(folder: Path | str) -> ImageMeta:
    """The image's description alone (a scenario's validation reads only this)."""
    folder = Path(folder)
    try:
        mtime = (folder / "image.json").stat().st_mtime
    except OSError:
        raise ImageError(f"{folder}: not a memory image (no image.json; "
                         "`ksmlab capture PID -o DIR` makes one)") from None
    return _meta(folder, mtime)


def load(folder: Path | str) -> Image:
    folder = Path(folder)
    meta = load_meta(folder)
    cid, flags = [], []
    for i, p in enumerate(meta.processes):
        try:
            c = np.load(folder / f"p{i}.cid.npy", mmap_mode="r")
            f = np.load(folder / f"p{i}.flags.npy", mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ImageError(f"{folder}: process {p.pid}: {e}") from None
        if len(c) != p.pages or len(f) != p.pages:
            raise ImageError(f"{folder}: process {p.pid}: {len(c)} pages stored, "
                             f"{p.pages} in its VMAs")
        cid.append(c)
        flags.append(f)
    return Image(folder, meta, cid, flags)
