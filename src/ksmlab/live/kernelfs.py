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
import os
from pathlib import Path


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

    def proc_state(self, pid: int) -> str | None:
        """The state letter of /proc/PID/stat (R, S, T stopped, Z zombie...); None if
        the process is gone."""
        stat = (self.read_or_none(f"proc/{pid}/stat") or "").rsplit(")", 1)[-1].split()
        return stat[0] if stat else None

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(p.name for p in self.path(rel).iterdir())
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
