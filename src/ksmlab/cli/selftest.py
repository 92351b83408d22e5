"""``ksmlab selftest``: the kselftest ksm_thp_split on the running kernel."""

from __future__ import annotations

import os

import typer

from .common import JsonOpt, dump, fail


def selftest(json_out: JsonOpt = False) -> None:
    """Compile the kselftest ksm_thp_split (kernel/data/selftest, against the installed
    linux-source-6.12's kselftest.h) and run it on this machine's kernel, under the live
    lab's lock with every knob journalled and put back.  It checks that KSM frees memory
    within pages_to_scan per sleep_millisecs, that merging progresses at KSM's rate
    with use_zero_pages=0, and that the zero pages it frees are counted in
    ksm_zero_pages.  Exit code 1 when a check fails, 2 when it could not run.

    \b
    Examples:
      sudo ksmlab selftest           TAP-like summary, one line per property
      sudo ksmlab selftest --json    figures and outcomes, one JSON object
    """
    from ..kernel.build import SOURCES, KernelBuildError
    from ..kernel.selftest import SelftestError, compile_selftest, summary_lines
    from ..live.run import LiveError
    from ..live.selftest import run_on_host

    if os.geteuid() != 0:
        fail("the selftest sets KSM and THP knobs: run it as root")
    try:
        binary = compile_selftest(SOURCES["6.12"])
        res = run_on_host(binary)
    except (KernelBuildError, SelftestError, LiveError) as e:
        fail(str(e))
    if json_out:
        dump(res.to_json(tap=True))
    else:
        print("\n".join(summary_lines(res)))
    if not res.passed:
        raise typer.Exit(1)
