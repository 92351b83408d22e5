"""``ksmlab capture`` and ``ksmlab exec``: real processes as workloads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import JsonOpt, dump, fail, say


def capture(
    pids: Annotated[list[int], typer.Argument(help="processes to read (root)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="image folder to write")],
    json_out: JsonOpt = False,
) -> None:
    """A memory image of running processes: what KSM would scan, page by page.

    Reads the VMAs with VM_MERGEABLE through /proc/PID/smaps, pagemap, kpageflags
    and mem (present pages only: nothing is faulted in, nothing written). Pause a
    process first (kill -STOP, or QEMU's `stop`) for an exact image."""
    from ..live.capture import capture as do_capture

    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / "image.json").exists())):
        fail(f"--out {out}: exists and is not an empty folder or an image")
    im = do_capture(pids, out).image
    st = im.stats()
    mib = st["pages"] * 4096 / 2**20
    rate = im.meta.bytes_read / 2**20 / max(im.meta.capture_s, 1e-9)
    disk = sum(f.stat().st_size for f in out.iterdir())
    if json_out:
        dump({"folder": str(out), **st,
              "capture_s": im.meta.capture_s,
              "read_mib_s": round(rate, 1), "disk_bytes": disk,
              "bytes_per_page": round(disk / max(st["pages"], 1), 2),
              "processes": [p.model_dump(mode="json", exclude={"vmas"})
                            for p in im.meta.processes],
              "notes": im.meta.notes})
        return
    n = len(im.meta.processes)
    who = ", ".join(f"{p.pid} {p.comm}" for p in im.meta.processes)
    say(f"captured {n} process{'es' if n > 1 else ''} ({who}): {mib:.0f} MiB mergeable "
        f"in {sum(len(p.vmas) for p in im.meta.processes)} VMAs")
    present = max(st["present"], 1)
    say(f"  {st['present']} pages present: {st['zero'] / present * 100:.1f} % zero-filled, "
        f"{st['thp']} THPs, {st['zero_pte']} zero-page PTEs, {st['ksm']} KSM pages, "
        f"{st['contents']} distinct contents", "    ")
    say(f"  read {im.meta.bytes_read / 2**20:.0f} MiB in {im.meta.capture_s:.2f} s "
        f"({rate:.0f} MiB/s); {disk / 2**20:.1f} MiB on disk "
        f"({disk / max(st['pages'], 1):.1f} B/page) in {out}/", "    ")
    for note in im.meta.notes:
        say(f"note: {note}")


def exec_(ctx: typer.Context,
          merge_any: Annotated[bool, typer.Option(
              "--merge-any", help="prctl(PR_SET_MEMORY_MERGE): all its memory mergeable")]
          = False) -> None:
    """Run a program with all its memory mergeable (ksmlab exec --merge-any -- CMD ...).

    A program that does not madvise(MADV_MERGEABLE) itself becomes a workload KSM
    scans (capture, compare --pid, validate --pid), as systemd's MemoryKSM= does."""
    from ..live.workload import exec_merge_any

    argv = [a for a in ctx.args if a != "--"] if ctx.args[:1] == ["--"] else list(ctx.args)
    if not merge_any:
        fail("exec needs --merge-any (what it is for)")
    if not argv:
        fail("exec --merge-any -- CMD [ARGS...]: no command")
    try:
        exec_merge_any(argv)
    except OSError as e:
        fail(f"{argv[0]}: {e.strerror or e}")
