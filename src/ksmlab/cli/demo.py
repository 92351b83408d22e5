"""``ksmlab demo``: the seed scenarios under every policy (ksmlab.demo runs it)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from .common import OutOpt, check_out, err, profile


def demo(out: OutOpt = None,
         live: Annotated[bool, typer.Option(help="also run live where possible")] = True) -> None:
    """The main job: the seed scenarios under every policy, table and plots."""
    from ..demo import run_demo

    out = out or Path("ksmlab-out") / time.strftime("demo-%Y%m%d-%H%M%S")
    check_out(out)
    run_demo(out, live, err, profile(None))
