"""The one place that reads and writes the kernel's files (/sys and /proc).

Everything is addressed relative to a root (``/`` on a real machine, a
temporary folder in tests), and every write is recorded in ``writes`` so tests
can assert the exact sequence, as damo's tests do.  Writes go through
``os.write`` so that the kernel's refusal (EINVAL, EBUSY, ...) surfaces at the
write itself instead of at a later flush.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
from pathlib import Path
from typing import Protocol

# PAGEMAP_SCAN (include/uapi/linux/fs.h, Linux 6.7): _IOWR('f', 16, struct pm_scan_arg)
PAGEMAP_SCAN = (3 << 30) | (12 * 8 << 16) | (ord("f") << 8) | 16
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5  # maps the shared zero page (or the huge zero page)
PAGE_IS_HUGE = 1 << 6  # mapped by a PMD


class _ScanArg(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


class _Region(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64),
                ("categories", ctypes.c_uint64)]


SCAN_VEC = 1024  # page_region entries per PAGEMAP_SCAN call


class KernelWriteError(OSError):
    """The kernel refused a write; ``str()`` is one line naming file and value."""

    def __init__(self, rel: str, value: str, err: int) -> None:
        super().__init__(err, os.strerror(err))
        self.rel = rel
        self.value = value

    def __str__(self) -> str:
        return f"the kernel refused {self.value!r} for /{self.rel}: {os.strerror(self.errno or 0)}"


class KernelFS:
    def __init__(self, root: Path | str = "/") -> None:
        self.root = Path(root)
        self._prefix = str(self.root).rstrip("/") + "/"  # slurp() joins strings: no pathlib
        self.writes: list[tuple[str, str]] = []

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def read(self, rel: str) -> str:
        return self.path(rel).read_text().strip()

    def read_or_none(self, rel: str) -> str | None:
        try:
            return self.read(rel)
        except OSError:
            return None

    def fields(self, rel: str) -> dict[str, str]:
        """A "Key: value" file (/proc/PID/status, smaps_rollup) as a dict; {} if gone."""
        out = {}
        for line in (self.read_or_none(rel) or "").splitlines():
            key, _, value = line.partition(":")
            out[key] = value.strip()
        return out

    def slurp(self, rel: str) -> str | None:
        """A small /proc or /sys file whole, or None if it cannot be read: read() with
        os.read (a fifth of pathlib's cost, which matters to ``watch``)."""
        try:
            fd = os.open(self._prefix + rel.lstrip("/"), os.O_RDONLY)
        except OSError:
            return None
        try:
            chunks = []
            while True:
                b = os.read(fd, 65536)
                if not b:
                    break
                chunks.append(b)
        except OSError:
            return None
        finally:
            os.close(fd)
        return b"".join(chunks).decode(errors="replace")

    def scan_pages(self, pid: int, spans: list[tuple[int, int]], anyof: int, mask: int
                   ) -> list[tuple[int, int, int]]:
        """PAGEMAP_SCAN (Linux 6.7) of /proc/PID/pagemap over ``spans`` [(start, end)]:
        each run of pages with any category of ``anyof``, as (start, end, its categories
        of ``mask``).  The kernel walks the page tables itself (nothing is faulted in,
        nothing written: no PM_SCAN_WP_MATCHING).  OSError (ENOTTY/EINVAL) where the
        kernel has no PAGEMAP_SCAN; ProcessLookupError-like OSError when it is gone."""
        out: list[tuple[int, int, int]] = []
        fd = os.open(self.path(f"proc/{pid}/pagemap"), os.O_RDONLY)
        try:
            vec = (_Region * SCAN_VEC)()
            for start, end in spans:
                at = start
                while at < end:
                    arg = _ScanArg(size=ctypes.sizeof(_ScanArg), start=at, end=end,
                                   vec=ctypes.addressof(vec), vec_len=SCAN_VEC,
                                   category_anyof_mask=anyof, return_mask=mask)
                    n = fcntl.ioctl(fd, PAGEMAP_SCAN, arg)
                    out.extend((r.start, r.end, r.categories) for r in vec[:n])
                    if arg.walk_end <= at:
                        break
                    at = arg.walk_end
        finally:
            os.close(fd)
        return out

    def proc_state(self, pid: int) -> str | None:
        """The state letter of /proc/PID/stat (R, S, T stopped, Z zombie...); None if
        the process is gone."""
        stat = (self.read_or_none(f"proc/{pid}/stat") or "").rsplit(")", 1)[-1].split()
        return stat[0] if stat else None

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(os.listdir(self._prefix + rel.strip("/")))
        except OSError:
            return []

    def write(self, rel: str, value: str) -> None:
        self.writes.append((rel, value))
        data = value.encode()
        # A fake tree of plain files needs O_TRUNC; sysfs and procfs files do not.
        flags = os.O_WRONLY | (os.O_TRUNC if self.root != Path("/") else 0)
        try:
            fd = os.open(self.path(rel), flags)
        except OSError as e:
            raise KernelWriteError(rel, value, e.errno or errno.EIO) from None
        try:
            if os.write(fd, data) != len(data):
                raise KernelWriteError(rel, value, errno.EIO)
        except KernelWriteError:
            raise
        except OSError as e:
            raise KernelWriteError(rel, value, e.errno or errno.EIO) from None
        finally:
            os.close(fd)

    def truncate(self, rel: str) -> None:
        """Open with O_TRUNC and write nothing (tracefs ``trace``: clears the buffer)."""
        self.writes.append((rel, ""))
        try:
            os.close(os.open(self.path(rel), os.O_WRONLY | os.O_TRUNC))
        except OSError as e:
            raise KernelWriteError(rel, "", e.errno or errno.EIO) from None

    def read_bytes(self, rel: str, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of a binary file (/proc/PID/pagemap)."""
        fd = os.open(self.path(rel), os.O_RDONLY)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def mkdir(self, rel: str) -> None:
        """mkdir(2) (a tracefs instance); recorded in ``writes``."""
        self.writes.append((rel, "mkdir"))
        try:
            os.mkdir(self.path(rel))
        except OSError as e:
            raise KernelWriteError(rel, "mkdir", e.errno or errno.EIO) from None

    def rmdir(self, rel: str) -> None:
        """rmdir(2) (a tracefs instance: the kernel frees its buffers and events);
        recorded in ``writes``."""
        self.writes.append((rel, "rmdir"))
        try:
            os.rmdir(self.path(rel))
        except OSError as e:
            raise KernelWriteError(rel, "rmdir", e.errno or errno.EIO) from None

    # ---- mounts (tracefs) ----------------------------------------------
    def mounted(self, rel: str) -> str | None:
        """The filesystem type mounted at ``/rel`` (from /proc/self/mounts), or None."""
        where = "/" + rel.strip("/")
        found = None
        for line in (self.read_or_none("proc/self/mounts") or "").splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] == where:
                found = parts[2]  # the last mount on a point is the visible one
        return found

    def mount(self, rel: str, fstype: str) -> None:
        """mount(2) of a pseudo filesystem (``nodev``) at ``/rel``; recorded in ``writes``."""
        self.writes.append((rel, f"mount {fstype}"))
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.mount(b"nodev", str(self.path(rel)).encode(), fstype.encode(), 0, None) != 0:
            raise KernelWriteError(rel, f"mount {fstype}", ctypes.get_errno() or errno.EIO)

    def umount(self, rel: str) -> None:
        """umount(2) of ``/rel``; recorded in ``writes``."""
        self.writes.append((rel, "umount"))
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.umount2(str(self.path(rel)).encode(), 0) != 0:
            raise KernelWriteError(rel, "umount", ctypes.get_errno() or errno.EIO)


class KernelReader(Protocol):
    """What reading the kernel takes: the part of :class:`KernelFS` without a single
    write.  ``ksmlab watch`` holds only this (:class:`ReadOnly`), so it cannot change
    anything by construction."""

    root: Path

    def path(self, rel: str) -> Path: ...
    def exists(self, rel: str) -> bool: ...
    def read(self, rel: str) -> str: ...
    def read_or_none(self, rel: str) -> str | None: ...
    def slurp(self, rel: str) -> str | None: ...
    def fields(self, rel: str) -> dict[str, str]: ...
    def listdir(self, rel: str) -> list[str]: ...
    def mounted(self, rel: str) -> str | None: ...
    def scan_pages(self, pid: int, spans: list[tuple[int, int]], anyof: int, mask: int
                   ) -> list[tuple[int, int, int]]: ...


class ReadOnly:
    """A :class:`KernelReader` over a KernelFS: its reads, and no way to write."""

    def __init__(self, fs: KernelFS) -> None:
        self._fs = fs
        self.root = fs.root

    def path(self, rel: str) -> Path:
        return self._fs.path(rel)

    def exists(self, rel: str) -> bool:
        return self._fs.exists(rel)

    def read(self, rel: str) -> str:
        return self._fs.read(rel)

    def read_or_none(self, rel: str) -> str | None:
        return self._fs.read_or_none(rel)

    def slurp(self, rel: str) -> str | None:
        return self._fs.slurp(rel)

    def fields(self, rel: str) -> dict[str, str]:
        return self._fs.fields(rel)

    def listdir(self, rel: str) -> list[str]:
        return self._fs.listdir(rel)

    def mounted(self, rel: str) -> str | None:
        return self._fs.mounted(rel)

    def scan_pages(self, pid: int, spans: list[tuple[int, int]], anyof: int, mask: int
                   ) -> list[tuple[int, int, int]]:
        return self._fs.scan_pages(pid, spans, anyof, mask)
