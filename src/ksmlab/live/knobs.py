"""Typed KSM and THP knobs, and a session that always puts them back.

Save before set, restore in reverse (as tuned does), with two kernel rules on
top:
- ``max_page_sharing`` and ``merge_across_nodes`` are refused with EBUSY while
  KSM pages exist (``max_page_sharing_store``/``merge_across_nodes_store`` in
  mm/ksm.c), so the restore unmerges first with ``run=2``;
- writing ``advisor_mode`` resets ``pages_to_scan`` (``advisor_mode_store``,
  since 6.8), so setting it also saves ``pages_to_scan``.
``run`` is restored last, so KSM never runs with half-restored settings.
The saved values reach a journal file before the first change, so a run
killed with SIGKILL can be undone by the next ``ksmlab`` (``ksmlab restore``).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .journal import Journal
from .kernelfs import KernelFS, KernelWriteError

KSM = "sys/kernel/mm/ksm"
THP = "sys/kernel/mm/transparent_hugepage"


class KnobError(ValueError):
    """A knob name or value we refuse before touching the kernel (one line)."""


@dataclass(frozen=True)
class Knob:
    """One sysfs knob. ``name`` is its path below /sys/kernel/mm (``ksm/run``)."""

    name: str
    lo: int | None = None
    hi: int | None = None
    choices: tuple[str, ...] = ()

    @property
    def rel(self) -> str:
        return f"sys/kernel/mm/{self.name}"

    @property
    def bracketed(self) -> bool:
        # THP mode files and advisor_mode print "a [b] c" with the current value bracketed
        return bool(self.choices)

    def parse(self, raw: str) -> str:
        """The current value from what the file shows."""
        if self.bracketed and "[" in raw:
            return raw[raw.index("[") + 1 : raw.index("]")]
        return raw.strip()

    def check(self, value: object) -> str:
        text = str(value).strip()
        if self.choices:
            if text not in self.choices:
                raise KnobError(f"{self.name}: {text!r} is not one of {', '.join(self.choices)}")
            return text
        try:
            n = int(text)
        except ValueError:
            raise KnobError(f"{self.name}: {text!r} is not an integer") from None
        if self.lo is not None and n < self.lo:
            raise KnobError(f"{self.name}: {n} is below the minimum {self.lo}")
        if self.hi is not None and n > self.hi:
            raise KnobError(f"{self.name}: {n} is above the maximum {self.hi}")
        return str(n)


U32 = (1 << 32) - 1
_THP_MODES = ("always", "madvise", "never")
_SIZE_MODES = ("always", "inherit", "madvise", "never")

# Ranges as the kernel's store functions accept them (mm/ksm.c, mm/huge_memory.c,
# mm/khugepaged.c); the kernel still has the last word at the write.
KNOBS: dict[str, Knob] = {
    k.name: k
    for k in (
        Knob("ksm/run", 0, 2),
        Knob("ksm/pages_to_scan", 0, U32),
        Knob("ksm/sleep_millisecs", 0, U32),
        Knob("ksm/use_zero_pages", 0, 1),
        Knob("ksm/smart_scan", 0, 1),
        Knob("ksm/max_page_sharing", 2, (1 << 31) - 1),
        Knob("ksm/merge_across_nodes", 0, 1),
        Knob("ksm/stable_node_chains_prune_millisecs", 0, U32),
        Knob("ksm/advisor_mode", choices=("none", "scan-time")),
        Knob("ksm/advisor_max_cpu", 1, 100),
        Knob("ksm/advisor_min_pages_to_scan", 1, U32),
        Knob("ksm/advisor_max_pages_to_scan", 1, U32),
        Knob("ksm/advisor_target_scan_time", 1, U32),
        Knob("transparent_hugepage/enabled", choices=_THP_MODES),
        Knob(
            "transparent_hugepage/defrag",
            choices=("always", "defer", "defer+madvise", "madvise", "never"),
        ),
        Knob("transparent_hugepage/use_zero_page", 0, 1),
        Knob("transparent_hugepage/shrink_underused", 0, 1),
        Knob("transparent_hugepage/khugepaged/defrag", 0, 1),
        Knob("transparent_hugepage/khugepaged/max_ptes_none", 0, 511),
        Knob("transparent_hugepage/khugepaged/max_ptes_swap", 0, 511),
        Knob("transparent_hugepage/khugepaged/max_ptes_shared", 0, 511),
        Knob("transparent_hugepage/khugepaged/pages_to_scan", 1, U32),
        Knob("transparent_hugepage/khugepaged/scan_sleep_millisecs", 0, U32),
        Knob("transparent_hugepage/khugepaged/alloc_sleep_millisecs", 0, U32),
    )
}
BUSY_WHILE_MERGED = ("ksm/max_page_sharing", "ksm/merge_across_nodes")


def knob(name: str) -> Knob:
    """A knob by name; per-size ``transparent_hugepage/hugepages-<N>kB/enabled`` too."""
    if name in KNOBS:
        return KNOBS[name]
    parts = name.split("/")
    if (
        len(parts) == 3
        and parts[0] == "transparent_hugepage"
        and parts[1].startswith("hugepages-")
        and parts[1].endswith("kB")
        and parts[2] == "enabled"
    ):
        return Knob(name, choices=_SIZE_MODES)
    raise KnobError(f"{name}: not a KSM or THP knob ksmlab knows")


def all_knobs(fs: KernelFS) -> list[Knob]:
    """Every known knob present on this kernel, per-size THP knobs included."""
    out = [k for k in KNOBS.values() if fs.exists(k.rel)]
    for d in fs.listdir(THP):
        if d.startswith("hugepages-") and fs.exists(f"{THP}/{d}/enabled"):
            out.append(knob(f"transparent_hugepage/{d}/enabled"))
    return out


def read_knob(fs: KernelFS, name: str) -> str:
    k = knob(name)
    return k.parse(fs.read(k.rel))


def read_all(fs: KernelFS) -> dict[str, str]:
    return {k.name: k.parse(fs.read(k.rel)) for k in all_knobs(fs)}


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def signals_blocked() -> Iterator[None]:
    """Hold off SIGINT/SIGTERM/SIGHUP while knobs are being put back."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class RestoreError(RuntimeError):
    pass


def foreign_changes(fs: KernelFS, saved: list[tuple[str, str]],
                    wrote: dict[str, list[str]]) -> list[tuple[str, str, str, str]]:
    """(knob, saved value, value the lab last wrote, value now) of every knob the lab
    wrote that is now at its saved value nor any the lab wrote (a refused write too:
    the journal has it before the kernel answers): someone else changed it."""
    out = []
    # the scan-time advisor rewrites pages_to_scan after every full scan (scan_time_advisor())
    advised = "scan-time" in wrote.get("ksm/advisor_mode", [])
    for name, orig in saved:
        values = wrote.get(name)
        if not values or (advised and name == "ksm/pages_to_scan"):
            continue
        try:
            now = read_knob(fs, name)
        except (KnobError, OSError):
            continue
        if now != orig and now not in values:
            out.append((name, orig, values[-1], now))
    return out


def restore_values(fs: KernelFS, saved: list[tuple[str, str]],
                   wrote: dict[str, list[str]] | None = None,
                   left: list[str] | None = None) -> list[str]:
    """Write back ``saved`` (in the order first changed) and return the failures.

    Unmerge first (run=2) if a knob that is busy while merged must change; then
    every knob but ``run`` in reverse order; ``run`` last.  With ``wrote`` (what the
    lab wrote), a knob someone else changed since is left as it is and named in
    ``left``: their setting, not the lab's to undo.
    """
    failures: list[str] = []
    for name, orig, ours, now in foreign_changes(fs, saved, wrote or {}):
        if left is not None:
            left.append(f"{name} was set to {now} by someone else (saved {orig}, the lab "
                        f"wrote {ours}): left as it is")
        saved = [(n, v) for n, v in saved if n != name]

    def put(name: str, value: str) -> None:
        try:
            fs.write(knob(name).rel, value)
        except KernelWriteError as e:
            failures.append(str(e))

    # a name this version does not know (a newer lab's journal, a damaged one) is
    # reported and left alone; it must not stop the others from going back
    unknown = []
    for n, _ in saved:
        try:
            knob(n)
        except KnobError:
            unknown.append(n)
    failures += [f"{n}: not a knob ksmlab knows, left alone" for n in unknown]
    saved = [(n, v) for n, v in saved if n not in unknown]
    original = dict(saved)
    run = original.get("ksm/run") or read_knob(fs, "ksm/run")
    todo = [(n, v) for n, v in saved if n != "ksm/run" and read_knob(fs, n) != v]
    if any(n in BUSY_WHILE_MERGED for n, _ in todo):
        put("ksm/run", "2")
    for name, value in reversed(todo):
        put(name, value)
    if read_knob(fs, "ksm/run") != run:
        put("ksm/run", run)
    return failures


class KnobSession:
    """Set knobs for one run; every change is journalled first and undone at exit.

    Use as a context manager: ``__exit__`` restores on normal exit, on any
    exception (KeyboardInterrupt and the SIGTERM exception included).
    """

    def __init__(self, fs: KernelFS, journal: Journal) -> None:
        self.fs = fs
        self.journal = journal
        self.saved: list[tuple[str, str]] = []
        self.wrote: dict[str, list[str]] = {}  # every value the lab wrote, per knob
        self.left: list[str] = []  # knobs someone else changed, left as they were

    def _save(self, name: str) -> None:
        if any(n == name for n, _ in self.saved):
            return
        self.saved.append((name, read_knob(self.fs, name)))
        self.journal.write(self.saved, self.wrote)  # on disk before the kernel sees it

    def expect(self, name: str, value: object) -> None:
        """Journal now a value this session will write later, so that the write itself
        does no file I/O (holding ksmd must land inside its sleep_millisecs)."""
        k = knob(name)
        text = k.check(value)
        self._save(name)
        values = self.wrote.setdefault(name, [])
        if text not in values:
            values.append(text)
            self.journal.write(self.saved, self.wrote)

    def set(self, name: str, value: object) -> None:
        k = knob(name)
        text = k.check(value)
        if not self.fs.exists(k.rel):
            raise KnobError(f"{name}: this kernel has no /{k.rel}")
        if name == "ksm/advisor_mode":
            self._save("ksm/pages_to_scan")
        self._save(name)
        values = self.wrote.setdefault(name, [])
        if text not in values:
            values.append(text)
            self.journal.write(self.saved, self.wrote)
        if name != "ksm/run" and read_knob(self.fs, name) == text:
            return
        self.fs.write(k.rel, text)

    def restore(self) -> None:
        if not self.saved:
            self.journal.remove()
            return
        with signals_blocked():
            failures = restore_values(self.fs, self.saved, self.wrote, self.left)
            if failures:
                raise RestoreError(
                    "could not restore every knob (journal kept for `ksmlab restore`): "
                    + "; ".join(failures)
                )
            self.saved = []
            self.journal.remove()

    def __enter__(self) -> KnobSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()
