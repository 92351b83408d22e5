"""``ksmlab demo``: the seed scenarios under every policy (ksmlab.demo runs it)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from .common import OutOpt, check_out, err, profile, say_compiling


def demo(out: OutOpt = None,
         live: Annotated[bool, typer.Option(help="also run live where possible")] = True) -> None:
    """The main job: the seed scenarios under every policy, table and plots."""
    from .. import scenario as scenario_mod
    from ..demo import SEEDS, run_demo

    out = out or Path("ksmlab-out") / time.strftime("demo-%Y%m%d-%H%M%S")
    check_out(out)
    say_compiling(scenario_mod.load(SEEDS[0]))
    run_demo(out, live, err, profile(None))
