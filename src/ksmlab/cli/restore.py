"""``ksmlab restore``: put back knobs a killed live run left changed."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from ..live.journal import Journal, RunLock
from ..live.kernelfs import KernelFS
from .common import JsonOpt, dump, fail, say


def restore(
    json_out: JsonOpt = False,
    to_boot: Annotated[bool, typer.Option(
        "--to-boot", help="put every knob back as this boot had it before the lab's first "
        "change (when a journal is damaged or lost)")] = False,
) -> None:
    """Put back knobs left changed by a killed live run (from its journal), and the
    trace instance a killed `ksmlab watch --tracepoints` left."""
    from ..live.journal import BootValues, JournalDamaged
    from ..live.run import LiveError, restore_journal, restore_to_boot
    from ..live.watchtrace import WatchError, restore_watch

    if os.geteuid() == 0:
        try:
            watch_left = restore_watch(KernelFS())
        except WatchError as e:
            fail(str(e))
        if watch_left and not json_out:
            say("restored what a killed watch left: "
                + ", ".join(f"{n} {v}" for n, v in watch_left))

    if os.geteuid() != 0:
        try:
            left = Journal().read() is not None
        except JournalDamaged:
            left = True
        if left or to_boot:
            fail("restoring knobs needs root")
        said(json_out, [], "nothing to restore: no journal of a killed run")
        return
    lock = RunLock()
    try:
        lock.acquire()
    except Exception as e:
        fail(str(e))
    try:
        if to_boot:
            boot = restore_to_boot(KernelFS(), Journal(), BootValues())
            said(json_out, boot, "restored as this boot had them: "
                 + ", ".join(f"{n}={v}" for n, v in boot))
            return
        saved = restore_journal(KernelFS(), Journal(), lock)
    except LiveError as e:
        fail(str(e))
    finally:
        lock.release()
    if saved:
        said(json_out, saved, "restored: " + ", ".join(f"{n}={v}" for n, v in saved))
    else:
        said(json_out, [], "nothing to restore: no journal of a killed run")


def said(json_out: bool, knobs: list[tuple[str, str]], text: str) -> None:
    """What was put back: a JSON object (knob -> value) or a wrapped line."""
    if json_out:
        dump({"restored": dict(knobs)})
    else:
        say(text)
