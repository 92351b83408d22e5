"""The one place that reads and writes the kernel's files (/sys and /proc).

Everything is addressed relative to a root (``/`` on a real machine, a
temporary folder in tests), and every write is recorded in ``writes`` so tests
can assert the exact sequence, as damo's tests do.  Writes go through
``os.write`` so that the kernel's refusal (EINVAL, EBUSY, ...) surfaces at the
write itself instead of at a later flush.
"""

from __future__ import annotations

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
