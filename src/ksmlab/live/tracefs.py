"""The one place that touches tracefs: KSM's own tracepoints during a live run.

:class:`KernelEvents` records into a trace instance of its own
(``instances/ksmlab``; ``ksmlab watch --tracepoints`` uses
``instances/ksmlab-watch``), never the top-level buffer: someone else's tracing,
its settings and the contents of its buffers are never touched.  It mounts
tracefs at /sys/kernel/tracing if nothing is mounted there (and unmounts it at
the end only then), creates the instance, sets its per-CPU buffer
(``buffer_size_kb``) and clock (``trace_clock=mono``, the clock of
``time.monotonic()``, so a kernel timestamp is a time of the run), enables the
events it records in the instance only, and turns the instance's
``tracing_on`` on.  Removing the instance (rmdir) frees its buffers and
disables its events at once.  The mount and the instance reach the journal
(:class:`~ksmlab.live.journal.Journal`, its ``tracing`` part) before the
kernel sees them; the restore removes the instance, then unmounts; after a
SIGKILL, ``ksmlab restore`` (:func:`restore_tracing`) does the same from the
journal.

How nothing is lost: a background thread reads the instance's ``trace_pipe``
while the run goes on (non-blocking reads; when the pipe is empty it sleeps 50
ms; each read consumes what it returns), so the ring buffer only has to hold
what arrives between two reads.  A 128 MiB scenario at pages_to_scan=1000 gives
ksmd at most ~40,000 page visits a second and at most two events per visit (a
merge of two pages fires ksm_merge_with_ksm_page twice); 8 MiB per CPU
(``BUFFER_KB``) holds ~150,000 events of ~56 bytes, several seconds of that.
Reading the ``trace`` file after the run instead would need the whole run in the
buffer (a merge-collapse run retries the same failing merge every full scan:
millions of events in 30 s).  The kernel's own count of what it dropped
(``per_cpu/cpuN/stats``, ``overrun``) is read at the end and reported
(``lost``), with a note.

Nothing here may break a live run: a kernel without tracefs, without trace
instances or without ``events/ksm``, an instance of that name that is not
ours, or any error while setting up records nothing and leaves a note.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
from typing import Any

from .journal import Journal
from .kernelfs import KernelFS, KernelWriteError
from .knobs import signals_blocked

TRACING = "sys/kernel/tracing"
EVENTS = f"{TRACING}/events/ksm"
INSTANCE = "ksmlab"  # instances/ksmlab: the lab's own buffer, events and settings
BUFFER_KB = 8192  # per CPU; see the module docstring
CLOCK = "mono"
MAX_TEXT = 64 << 20  # trace_pipe text kept (~600,000 events); beyond, events are counted only
READ_CHUNK = 1 << 16
POLL_S = 0.05


class TracingError(RuntimeError):
    """tracefs could not be put back (the journal keeps it for ``ksmlab restore``)."""


def _bracketed(raw: str) -> str:
    """``a [b] c`` -> ``b`` (trace_clock); other values as they are."""
    m = re.search(r"\[([^\]]*)\]", raw)
    return m.group(1) if m else raw.strip()


def _restorable(rel: str, raw: str) -> str:
    """The value to write back for what a tracefs file showed."""
    name = rel.rsplit("/", 1)[-1]
    if name == "trace_clock":
        return _bracketed(raw)
    if name == "buffer_size_kb":
        # "7 (expanded: 1408)": a buffer never used yet; it is the expanded size as soon as
        # any event is enabled, and cannot be shrunk back to "unexpanded"
        m = re.search(r"expanded:\s*(\d+)", raw)
        return m.group(1) if m else raw.split()[0]
    if name == "enable":
        return raw.strip()[:1]  # "0", "1"; "0*"/"1*" when soft-disabled by a trigger
    return raw.strip()


def restore_tracing(fs: KernelFS, rec: dict[str, Any]) -> list[str]:
    """Put back a journal's tracing part: remove the instance it created, write back
    any top-level file it lists under ``saved``, then unmount if the lab mounted;
    returns the failures (empty: all back)."""
    failures: list[str] = []
    mounted = fs.mounted(TRACING) == "tracefs"
    if mounted:
        inst = rec.get("instance")
        if isinstance(inst, str) and inst.startswith(f"{TRACING}/instances/") \
                and fs.exists(inst):
            try:
                fs.rmdir(inst)
            except KernelWriteError as e:
                failures.append(str(e))
        for rel, value in reversed([(str(a), str(b)) for a, b in rec.get("saved", [])]):
            try:
                if fs.exists(rel) and _restorable(rel, fs.read(rel)) != value:
                    fs.write(rel, value)
            except (KernelWriteError, OSError) as e:
                failures.append(str(e))
    if rec.get("mount") in ("pending", "mounted") and mounted and not failures:
        try:
            fs.umount(TRACING)
        except KernelWriteError as e:
            failures.append(str(e))
    return failures


def tracefs_status(fs: KernelFS) -> str:
    """What a run with kernel events would find (reads only, mounts nothing)."""
    if not fs.exists(TRACING):
        return "no /sys/kernel/tracing (CONFIG_TRACING=n)"
    kind = fs.mounted(TRACING)
    if kind is None:
        return "tracefs not mounted: a run mounts it and unmounts it after"
    if kind != "tracefs":
        return f"{kind} is mounted at /{TRACING}: no kernel events"
    if not fs.exists(f"{EVENTS}/enable"):
        return "no KSM tracepoints (events/ksm)"
    return "tracefs mounted, events/ksm present"


class KernelEvents:
    """KSM's tracepoints for one live run: ``start()``, ``stop()``, ``restore()``.

    ``start()`` and ``stop()`` never raise for a kernel that cannot give the
    events; they leave ``notes`` (and ``available`` False) instead.  ``extra``
    adds events of other systems (``"kmem/rss_stat"``) with a filter (or None).
    """

    def __init__(self, fs: KernelFS, journal: Journal, buffer_kb: int = BUFFER_KB,
                 only: tuple[str, ...] | None = None, instance: str = INSTANCE,
                 extra: dict[str, str | None] | None = None,
                 max_text: int = MAX_TEXT) -> None:
        self.fs = fs
        self.journal = journal
        self.buffer_kb = buffer_kb
        self.only = only  # enable just these events/ksm events (None: every one)
        self.extra = dict(extra or {})
        self.dir = f"{TRACING}/instances/{instance}"
        self.max_text = max_text
        self.notes: list[str] = []
        self.available = False
        self.mount: str | None = None  # "pending" / "mounted": the lab's own mount
        self.created: str | None = None  # "pending" / "created": the lab's own instance
        self.events: list[dict[str, Any]] = []
        self.lost = 0
        self.names: list[str] = []  # the events/ksm events enabled
        self._chunks: list[bytes] = []
        self._kept = 0
        self._dropped = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self.reads = 0  # read(2) calls on trace_pipe (a spinning reader would show here)

    # ---- journalled changes ----------------------------------------------
    def _journal(self) -> None:
        self.journal.write_tracing({"mount": self.mount,
                                    "instance": self.dir if self.created else None,
                                    "saved": []})

    # ---- set-up ------------------------------------------------------------
    def start(self) -> bool:
        """Mount, create the instance, enable its events, start reading; False (with a
        note) where the kernel cannot give the events."""
        fs = self.fs
        try:
            if not fs.exists(TRACING):
                self.notes.append("no kernel events: /sys/kernel/tracing is missing "
                                  "(CONFIG_TRACING=n)")
                return False
            kind = fs.mounted(TRACING)
            if kind is None:
                self.mount = "pending"  # journalled before the mount: a kill in between
                self._journal()         # leaves nothing the restore cannot undo
                fs.mount(TRACING, "tracefs")
                self.mount = "mounted"
                self._journal()
            elif kind != "tracefs":
                self.notes.append(f"no kernel events: {kind} is mounted at /{TRACING}")
                return False
            if not fs.exists(f"{EVENTS}/enable"):
                self.notes.append("no kernel events: this kernel has no KSM tracepoints "
                                  "(events/ksm is missing)")
                self.restore()
                return False
            if not fs.exists(f"{TRACING}/instances"):
                self.notes.append("no kernel events: this kernel has no trace instances "
                                  f"(/{TRACING}/instances)")
                self.restore()
                return False
            if fs.exists(self.dir):
                self.notes.append(f"no kernel events: /{self.dir} exists and is not this "
                                  "run's (another ksmlab? `ksmlab restore` removes one a "
                                  "killed ksmlab left)")
                self.restore()
                return False
            self.created = "pending"
            self._journal()
            fs.mkdir(self.dir)
            self.created = "created"
            self._journal()
            ev = f"{self.dir}/events/ksm"
            self.names = [d for d in fs.listdir(ev) if fs.exists(f"{ev}/{d}/enable")
                          and (self.only is None or d in self.only)]
            if not self.names:
                self.notes.append("no kernel events: this kernel has none of events/ksm/"
                                  + ", ".join(self.only or ()))
                self.restore()
                return False
            # a new instance traces at once: off while it is set up
            fs.write(f"{self.dir}/tracing_on", "0")
            fs.write(f"{self.dir}/buffer_size_kb", str(self.buffer_kb))
            clocks = fs.read(f"{self.dir}/trace_clock").replace("[", " ").replace("]", " ")
            if CLOCK in clocks.split():
                fs.write(f"{self.dir}/trace_clock", CLOCK)
            else:
                self.notes.append(f"trace_clock has no {CLOCK}: kernel timestamps are not "
                                  "times of the run")
            for name in self.names:
                fs.write(f"{ev}/{name}/enable", "1")
            for name, filt in self.extra.items():
                if not fs.exists(f"{self.dir}/events/{name}/enable"):
                    self.notes.append(f"this kernel has no {name} tracepoint")
                    continue
                if filt:
                    fs.write(f"{self.dir}/events/{name}/filter", filt)
                fs.write(f"{self.dir}/events/{name}/enable", "1")
            self._open_pipe()
            fs.write(f"{self.dir}/tracing_on", "1")
        except (KernelWriteError, OSError) as e:
            self.notes.append(f"no kernel events: tracefs set-up failed: {e}")
            self._close_pipe()
            with contextlib.suppress(TracingError):
                self.restore()
            return False
        self.available = True
        return True

    def _open_pipe(self) -> None:
        self._fd = os.open(self.fs.path(f"{self.dir}/trace_pipe"), os.O_RDONLY | os.O_NONBLOCK)
        self._stop.clear()
        self._thread = threading.Thread(target=self._reader, name="ksmlab-trace_pipe",
                                        daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        """Drain trace_pipe until told to stop and the pipe is empty.

        An empty pipe answers EAGAIN; the thread then sleeps POLL_S rather than
        poll(2), which may report trace_pipe readable while it is empty (a spin that
        takes CPU from ksmd on a 2-CPU machine)."""
        fd = self._fd
        assert fd is not None
        while True:
            stopping = self._stop.is_set()
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                data = b""
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                return
            self.reads += 1
            if data:
                with self._lock:
                    if self._kept < self.max_text:
                        self._chunks.append(data)
                        self._kept += len(data)
                    else:
                        self._dropped += data.count(b"\n")
                continue
            if stopping:
                return
            self._stop.wait(POLL_S)

    def _close_pipe(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=30)
            self._thread = None
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    # ---- the end -------------------------------------------------------------
    def take(self) -> tuple[str, int]:
        """What the reader has kept since the last call (whole lines), and how many
        lines it could not keep: for a reader that runs for hours (``watch``)."""
        with self._lock:
            data = b"".join(self._chunks)
            self._chunks = []
            cut = data.rfind(b"\n") + 1
            if cut < len(data):
                self._chunks = [data[cut:]]  # a line the pipe has not finished
            self._kept = len(data) - cut
            dropped, self._dropped = self._dropped, 0
        return data[:cut].decode(errors="replace"), dropped

    def stop(self) -> list[dict[str, Any]]:
        """Stop tracing, drain the pipe, count what the kernel dropped; the parsed events."""
        if not self.available:
            return []
        with contextlib.suppress(KernelWriteError, OSError):
            self.fs.write(f"{self.dir}/tracing_on", "0")
        self._close_pipe()
        text = b"".join(self._chunks).decode(errors="replace")
        self._chunks = []
        events, lost_lines = parse(text)
        overrun = self.overrun() + lost_lines
        self.lost = overrun + self._dropped
        if overrun:
            self.notes.append(f"the kernel's trace buffer lost {overrun} KSM events "
                              f"(buffer {self.buffer_kb} KiB per CPU)")
        if self._dropped:
            self.notes.append(f"{self._dropped} KSM events beyond the first "
                              f"{self.max_text >> 20} MiB of trace text were not kept")
        self.events = events
        self.available = False
        return events

    def overrun(self) -> int:
        """Events the ring buffer overwrote before they were read (per_cpu/cpuN/stats)."""
        total = 0
        for cpu in self.fs.listdir(f"{self.dir}/per_cpu"):
            for line in (self.fs.read_or_none(f"{self.dir}/per_cpu/{cpu}/stats") or ""
                         ).splitlines():
                if line.startswith("overrun:"):
                    total += int(line.split()[1])
        return total

    def restore(self) -> None:
        """The instance removed, then tracefs unmounted if ours."""
        self._close_pipe()
        self.available = False
        if self.created is None and self.mount is None:
            return
        with signals_blocked():  # as the knobs' restore: Ctrl-C cannot cut it in half
            failures = restore_tracing(self.fs, {"mount": self.mount,
                                                 "instance": self.dir if self.created
                                                 else None})
        if failures:
            raise TracingError("could not restore tracefs (journal kept for `ksmlab restore`): "
                               + "; ".join(failures))
        self.created = None
        self.mount = None
        self.journal.clear_tracing()

    def __enter__(self) -> KernelEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


# ---- parsing -------------------------------------------------------------------

# "  ksmd-41  [001] d..1.  1234.567890: ksm_start_scan: seq 3 rmap size 65536";
# the flags column is absent without the irq-info option, a "(tgid)" may follow the pid
_LINE = re.compile(
    r"^\s*(?P<comm>.*?)-(?P<pid>\d+)\s+(?:\(\s*[\d-]+\)\s+)?\[(?P<cpu>\d+)\]\s+"
    r"(?:\S+\s+)?(?P<ts>\d+\.\d+):\s+(?P<event>\w+):\s?(?P<body>.*)$"
)
_LOST = re.compile(r"CPU:(\d+) \[LOST (\d+) EVENTS\]")
# TP_printk() of include/trace/events/ksm.h (6.12-6.18), field names as the kernel's
_BODIES: dict[str, re.Pattern[str]] = {
    "ksm_start_scan": re.compile(r"seq (?P<seq>-?\d+) rmap size (?P<rmap_entries>\d+)"),
    "ksm_stop_scan": re.compile(r"seq (?P<seq>-?\d+) rmap size (?P<rmap_entries>\d+)"),
    "ksm_enter": re.compile(r"mm (?P<mm>\S+)"),
    "ksm_exit": re.compile(r"mm (?P<mm>\S+)"),
    "ksm_merge_one_page": re.compile(
        r"ksm pfn (?P<pfn>\d+) rmap_item (?P<rmap_item>\S+) mm (?P<mm>\S+) error (?P<err>-?\d+)"),
    "ksm_merge_with_ksm_page": re.compile(
        r"(?P<ksm_page>ksm )?pfn (?P<pfn>\d+) rmap_item (?P<rmap_item>\S+) mm (?P<mm>\S+) "
        r"error (?P<err>-?\d+)"),
    "ksm_remove_ksm_page": re.compile(r"pfn (?P<pfn>\d+)"),
    "ksm_remove_rmap_item": re.compile(
        r"pfn (?P<pfn>\d+) rmap_item (?P<rmap_item>\S+) mm (?P<mm>\S+)"),
    # include/trace/events/kmem.h: an mm's RSS counter after a change (mm_trace_rss_stat())
    "rss_stat": re.compile(
        r"mm_id=(?P<mm_id>\d+) curr=(?P<curr>\d+) type=(?P<type>\w+) size=(?P<size>-?\d+)B"),
    "ksm_advisor": re.compile(
        r"ksm scan time (?P<scan_time>-?\d+) pages_to_scan (?P<pages_to_scan>\d+) "
        r"cpu percent (?P<cpu_percent>\d+)"),
}
_INTS = ("seq", "rmap_entries", "pfn", "err", "scan_time", "pages_to_scan", "cpu_percent",
         "mm_id", "curr", "size")


def parse_line(line: str) -> dict[str, Any] | None:
    """One trace_pipe line -> {"event", "ts" (kernel seconds), "cpu", "pid", fields...};
    None for a line that is not an event.  ``ksm_page`` (printed only as "ksm " when
    set) is a bool; pointers stay the kernel's hashed ``%p`` text."""
    m = _LINE.match(line)
    if m is None:
        return None
    ev = m.group("event")
    out: dict[str, Any] = {"event": ev, "ts": float(m.group("ts")), "cpu": int(m.group("cpu")),
                           "pid": int(m.group("pid"))}
    body = m.group("body")
    pat = _BODIES.get(ev)
    fm = pat.match(body) if pat is not None else None
    if fm is None:
        out["raw"] = body
        return out
    for k, v in fm.groupdict().items():
        if k == "ksm_page":
            out[k] = v is not None
        elif k in _INTS:
            out[k] = int(v)
        else:
            out[k] = v
    return out


def parse(text: str) -> tuple[list[dict[str, Any]], int]:
    """trace_pipe text -> (events, events the kernel reported lost in it)."""
    events: list[dict[str, Any]] = []
    lost = 0
    for line in text.splitlines():
        e = parse_line(line)
        if e is not None:
            events.append(e)
            continue
        m = _LOST.search(line)
        if m is not None:
            lost += int(m.group(2))
    return events, lost
