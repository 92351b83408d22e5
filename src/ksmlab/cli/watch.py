"""``ksmlab watch``: a production host as it runs, read-only (live/watch.py reads,
monitor.py judges, watchview.py shows, exporter.py serves Prometheus)."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer

from .. import __version__
from .common import err, fail

if TYPE_CHECKING:
    from ..exporter import Exporter
    from ..live.kernelfs import KernelFS
    from ..live.watch import HostReader
    from ..live.watchtrace import WatchTracing
    from ..monitor import Monitor, Snapshot

EXAMPLES = """\b
Examples:
  ksmlab watch                         the live table (80 columns)
  ksmlab watch --once --json           one JSON object after one interval
  ksmlab watch --json -i 5 >> w.jsonl  a JSON line every 5 s, for logs
  ksmlab watch --prometheus 127.0.0.1:9867 -q
                                       /metrics (pip install 'ksmlab[watch]')
  ksmlab watch --textfile /var/lib/node_exporter/ksmlab.prom -q
                                       node_exporter's textfile collector
  ksmlab watch --tracepoints           + which merge attempt freed what
"""
WATCH_EXTRA = "prometheus-client is not installed: pip install 'ksmlab[watch]'"


def kernel() -> KernelFS:
    """The kernel's files (tests hand in the fake tree of tests/conftest.py)."""
    from ..live.kernelfs import KernelFS

    return KernelFS()


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9867`` for IPv6) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        fail(f"--prometheus {text}: give HOST:PORT, e.g. 127.0.0.1:9867")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def check_textfile(path: Path) -> None:
    if path.suffix != ".prom":
        fail(f"--textfile {path}: node_exporter's textfile collector reads *.prom files only")
    if not path.parent.is_dir():
        fail(f"--textfile {path}: {path.parent} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".ksmlab-probe-"):
            pass
    except OSError as e:
        fail(f"--textfile {path}: cannot write in {path.parent}: {e.strerror or e}")


def watch(
    interval: Annotated[float, typer.Option(
        "--interval", "-i", min=0.1, max=3600.0, help="seconds between readings")] = 1.0,
    once: Annotated[bool, typer.Option(
        "--once", help="one interval, print it, exit (1 if a verdict state is active)")]
    = False,
    json_out: Annotated[bool, typer.Option(
        "--json", help="a JSON object per interval on stdout (JSON lines)")] = False,
    duration: Annotated[float | None, typer.Option(
        "--duration", "-d", min=0.0, help="stop after this many seconds")] = None,
    prometheus: Annotated[str | None, typer.Option(
        "--prometheus", metavar="HOST:PORT", help="serve /metrics for Prometheus")] = None,
    textfile: Annotated[Path | None, typer.Option(
        "--textfile", metavar="PATH", help="write node_exporter's textfile format to PATH "
        "(*.prom) each interval, atomically")] = None,
    tracepoints: Annotated[bool, typer.Option(
        "--tracepoints", help="attribute each merge attempt's freeing from KSM's "
        "tracepoints and rss_stat, in trace instance ksmlab-watch (root)")] = False,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="nothing on stdout (with --prometheus or --textfile)")] = False,
) -> None:
    """Watch this host as it runs, changing nothing: memory freed outside KSM's
    account per process, the freeing rate against KSM's budget, the
    rate-limit-bypass and merge-collapse as live states, ksmd's CPU.

    It reads only: no KSM, THP or tracing knob is written (--tracepoints adds a
    trace instance of its own, removed at the end), no process is signalled or
    paused.  Root is needed to read other users' processes.  Outside a terminal
    the text output is one line per verdict state change.
    """
    from ..live.kernelfs import ReadOnly
    from ..live.watch import HostReader
    from ..monitor import Monitor

    if json_out and quiet:
        fail("--json and --quiet: choose one")
    exporter: Exporter | None = None
    if prometheus is not None or textfile is not None:
        try:
            from ..exporter import Exporter

            exporter = Exporter()
        except ImportError:
            fail(WATCH_EXTRA)
    if textfile is not None:
        check_textfile(textfile)
    if tracepoints and os.geteuid() != 0:
        fail("--tracepoints needs root (tracefs)")
    if os.geteuid() != 0 and not quiet and not json_out:
        err.print("note: not root: only this user's processes can be read", markup=False)

    stop = threading.Event()
    got: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        got.append(signum)
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP,
                                                     signal.SIGINT)}
    tracer: WatchTracing | None = None
    try:
        if tracepoints:
            from ..live.watchtrace import WatchError, WatchTracing

            tracer = WatchTracing(kernel())
            try:
                tracer.start()
            except WatchError as e:
                tracer = None
                fail(str(e))
            for n in tracer.notes:
                err.print(f"note: {n}", markup=False)
        if exporter is not None and prometheus is not None:
            host, port = parse_listen(prometheus)
            try:
                exporter.serve(host, port)
            except OSError as e:
                fail(f"--prometheus {prometheus}: {e.strerror or e}")
        reader = HostReader(ReadOnly(kernel()))
        mon = Monitor()
        code = _loop(reader, mon, exporter, textfile, tracer, stop, interval, once, json_out,
                     duration, quiet)
    finally:
        if tracer is not None:
            tracer.restore()
        for s, h in old.items():
            signal.signal(s, h)
    raise typer.Exit(code)


def _emit_json(s: Snapshot) -> None:
    print(json.dumps({"ksmlab": __version__, **s.to_json()}), flush=True)


def _loop(reader: HostReader, mon: Monitor, exporter: Exporter | None, textfile: Path | None,
          tracer: WatchTracing | None, stop: threading.Event, interval: float, once: bool,
          json_out: bool, duration: float | None, quiet: bool) -> int:
    from rich.console import Console
    from rich.live import Live

    from ..watchview import Changes, plain, render

    snap = mon.update(reader.read())
    if tracer is not None:
        tracer.attribute(snap)
    start = time.monotonic()
    live: Live | None = None
    changes = Changes()
    tty = sys.stdout.isatty()
    if tty and not (quiet or json_out or once):
        live = Live(render(snap), console=Console(width=80), auto_refresh=False)
        live.start()
    elif not (quiet or json_out or once):
        print(f"ksmlab watch: every {interval:g} s; {len(snap.procs)} processes with "
              "mergeable memory; a line per verdict state change", flush=True)
    textfile_failed = False
    try:
        due = start + interval
        while not stop.wait(max(0.0, due - time.monotonic())):
            now = time.monotonic()
            due = due + interval if due + interval > now else now + interval
            snap = mon.update(reader.read())
            if tracer is not None:
                tracer.attribute(snap)
            if exporter is not None:
                exporter.publish(snap)
                if textfile is not None:
                    try:
                        exporter.write(textfile)
                    except OSError as e:
                        if not textfile_failed:
                            err.print(f"ksmlab: warning: --textfile {textfile}: "
                                      f"{e.strerror or e}", markup=False)
                        textfile_failed = True
            if json_out:
                _emit_json(snap)
            elif once and not quiet:
                print(plain(snap), flush=True)
            elif live is not None:
                live.update(render(snap), refresh=True)
            elif not quiet:
                for line in changes.lines(snap):
                    print(line, flush=True)
            if once:
                return 1 if snap.states else 0
            if duration is not None and time.monotonic() - start >= duration:
                break
    finally:
        if live is not None:
            live.stop()
    return 0
