"""/proc/PID/smaps parsed: each VMA with its sizes (kB) and VmFlags (``mg``
VM_MERGEABLE, ``hg`` VM_HUGEPAGE, ``nh`` VM_NOHUGEPAGE).  Text in, no I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Mapping:
    """One VMA of /proc/PID/smaps: sizes in kB as the kernel gives them."""

    start: int
    end: int
    perms: str
    path: str  # "" for anonymous memory
    kb: dict[str, int] = field(default_factory=dict)
    flags: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return self.end - self.start


_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+)\s+(\S+)\s+\S+\s+\S+\s+\d+\s*(.*)$")
_FIELD = re.compile(r"^(\w+):\s+(\d+) kB$")


def parse_smaps(text: str) -> list[Mapping]:
    out: list[Mapping] = []
    cur: dict[str, Any] | None = None

    def flush() -> None:
        if cur is not None:
            out.append(Mapping(**cur))

    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            flush()
            cur = {"start": int(m.group(1), 16), "end": int(m.group(2), 16),
                   "perms": m.group(3), "path": m.group(4).strip(), "kb": {}, "flags": ()}
            continue
        if cur is None:
            continue
        if line.startswith("VmFlags:"):
            cur["flags"] = tuple(line.split()[1:])
            continue
        f = _FIELD.match(line)
        if f:
            cur["kb"][f.group(1)] = int(f.group(2))
    flush()
    return out
