"""The journal of saved knob values, and the lock that allows one live run.

Both live in a state folder (``/run/ksmlab`` by default, ``$KSMLAB_STATE_DIR``
to override).  /run is a tmpfs: it empties at boot, exactly when the kernel's
knobs go back to their boot values, so a journal never outlives its meaning.
The lock is a bound abstract unix socket (:class:`RunLock`): the kernel drops it
when the holder dies, SIGKILL included, while the journal stays for
``ksmlab restore``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def state_dir() -> Path:
    return Path(os.environ.get("KSMLAB_STATE_DIR", "/run/ksmlab"))


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


class LockBusy(RuntimeError):
    pass


class JournalDamaged(RuntimeError):
    """A journal that exists but cannot be read: the knobs a killed run changed are
    unknown, so nothing may treat the machine's values as its own (one line)."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(
            f"the journal {path} is damaged ({why}): a killed run changed knobs and their "
            "saved values are lost; `ksmlab restore --to-boot` puts every knob back as this "
            "boot had it before the lab's first change")
        self.path = path


@dataclass
class JournalRecord:
    pid: int
    boot_id: str
    started: float
    saved: list[tuple[str, str]]
    # tracefs state a run changed (live/tracefs.py): {"mount": "pending"|"mounted"|None,
    # "saved": [[file, value], ...]} in the order changed; None: tracing untouched
    tracing: dict[str, Any] | None = None
    # every value the run wrote (or was about to write) to each knob: a knob found at
    # none of them nor its saved value was set by someone else; restore leaves it alone
    # value nor this one was changed by someone else, and restore leaves it alone
    wrote: dict[str, list[str]] = field(default_factory=dict)


class Journal:
    """Saved values, written atomically (tmp + fsync + rename) before each change.

    Two parts share the file: the knobs (:meth:`write`, :meth:`remove`) and the
    tracing state (:meth:`write_tracing`, :meth:`clear_tracing`); the file goes
    when both are empty.
    """

    def __init__(self, folder: Path | None = None, name: str = "journal.json") -> None:
        self.folder = folder or state_dir()
        self.path = self.folder / name  # watch-journal.json: ``watch --tracepoints``'s
        self.saved: list[tuple[str, str]] = []
        self.tracing: dict[str, Any] | None = None
        self.wrote: dict[str, list[str]] = {}

    def write(self, saved: list[tuple[str, str]], wrote: dict[str, list[str]] | None = None
              ) -> None:
        self.saved = list(saved)
        if wrote is not None:
            self.wrote = {k: list(v) for k, v in wrote.items()}
        self._flush()

    def write_tracing(self, tracing: dict[str, Any]) -> None:
        self.tracing = tracing
        self._flush()

    def clear_tracing(self) -> None:
        self.tracing = None
        self._flush()

    def _flush(self) -> None:
        if not self.saved and not self.tracing:
            self.path.unlink(missing_ok=True)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        rec: dict[str, Any] = {
            "pid": os.getpid(),
            "boot_id": boot_id(),
            "started": time.time(),
            "saved": [list(x) for x in self.saved],
            "wrote": self.wrote,
        }
        if self.tracing:
            rec["tracing"] = self.tracing
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(rec, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def read(self) -> JournalRecord | None:
        """The journal left by a run; None if there is none or it is from another boot.

        Raises JournalDamaged for a file that is there but cannot be read (empty,
        half-written, not ours): never "nothing to restore" while knobs may be changed.
        """
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise JournalDamaged(self.path, e.strerror or str(e)) from None
        try:
            data = json.loads(text)
            tracing = data.get("tracing")
            rec = JournalRecord(
                int(data["pid"]), str(data["boot_id"]), float(data["started"]),
                [(str(n), str(v)) for n, v in data["saved"]],
                dict(tracing) if tracing else None,
                {str(k): [str(x) for x in v] for k, v in data.get("wrote", {}).items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            why = "empty" if not text.strip() else f"{type(e).__name__}: {e}"
            raise JournalDamaged(self.path, why[:120]) from None
        if rec.boot_id != boot_id():
            return None  # the knobs went back to their boot values with the reboot
        return rec

    def remove(self) -> None:
        """The knobs are back: drop their part (the file, unless tracing is pending)."""
        self.saved = []
        self.wrote = {}
        self._flush()


class BootValues:
    """The knobs as this boot had them before the lab first changed one.

    Written once per boot (atomically), by the first live run, before its first
    change and only when no journal is left: the fallback when a journal is lost or
    damaged (``ksmlab restore --to-boot``).  /run empties at boot, as the knobs do.
    """

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or state_dir()
        self.path = self.folder / "boot-knobs.json"

    def read(self) -> dict[str, str] | None:
        try:
            data = json.loads(self.path.read_text())
            if data["boot_id"] != boot_id():
                return None
            return {str(k): str(v) for k, v in data["knobs"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def record(self, knobs: dict[str, str]) -> bool:
        """Keep ``knobs`` as this boot's unless some are kept already; True if written."""
        if self.read() is not None:
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"boot_id": boot_id(), "recorded": time.time(), "knobs": knobs}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return True


class RunLock:
    """One live run at a time on this machine (KSM and THP state are global).

    The lock is a name in the abstract unix-socket namespace, bound by the run: no
    file operation can remove it (deleting the old lock file let a second run start
    beside the first, which then "restored" the first run's knobs under it), and the
    kernel releases it when the holder dies, SIGKILL included.  The name is per state
    folder, so tests with their own folder do not meet a real run.  The file beside
    the journal only tells the holder's pid.
    """

    def __init__(self, folder: Path | None = None, kind: str = "run") -> None:
        self.folder = folder or state_dir()
        # kind "watch": one ``watch --tracepoints`` at a time, beside any live run
        self.path = self.folder / ("lock" if kind == "run" else f"{kind}.lock")
        self.sock: socket.socket | None = None
        digest = hashlib.sha256(str(self.folder.resolve()).encode()).hexdigest()[:16]
        self.name = f"\0ksmlab-{kind}-{digest}"

    def _bind(self) -> socket.socket | None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(self.name)
        except OSError as e:
            s.close()
            if e.errno == errno.EADDRINUSE:
                return None
            raise
        return s

    def holder(self) -> int | None:
        """Pid of the run holding the lock (-1 if it cannot be told), or None if free."""
        s = self._bind()
        if s is not None:
            s.close()
            return None
        try:
            return int(self.path.read_text().strip() or "0") or -1
        except (OSError, ValueError):
            return -1

    def acquire(self) -> None:
        s = self._bind()
        if s is None:
            raise LockBusy(
                f"another live run (pid {self.holder()}) holds the lab's lock; KSM state is "
                "global, so runs cannot overlap"
            )
        s.set_inheritable(False)  # a workload child must not keep the lock alive
        self.sock = s
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, self.path)

    def release(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
