"""``ksmlab doctor``: this kernel for an operator, and whether live runs work here."""

from __future__ import annotations

import textwrap
from typing import Annotated, Any

import typer

from ..live.kernelfs import KernelFS
from .common import JsonOpt, dump, missing_extra


def doctor(json_out: JsonOpt = False,
           advice: Annotated[bool, typer.Option(
               "--advice/--no-advice", help="run the model on the host's settings (a few s)")]
           = True,
           probe: Annotated[bool, typer.Option(
               "--probe/--no-probe", help="split one THP of a child process to see whether "
               "this kernel remaps (root; MADV_PAGEOUT of the child's own 2 MiB)")]
           = True,
           full: Annotated[bool, typer.Option(
               "--all", "--verbose", "-v", help="also every knob, the kernel feature table "
               "and what live runs would share the machine with")] = False) -> None:
    """This kernel for an operator: does it remap, what KSM does now, what the
    settings expose the host to, what to set; and whether live runs work here
    (--all: every knob and the table of kernel features the lab relies on).

    Exit code 0: nothing to act on; 1: KSM runs here with settings under which the
    model of this kernel shows a regression, or a killed run left knobs changed;
    3: live runs cannot work here (no root, KSM or THP)."""
    from ..live import features
    from ..live.doctor import diagnose, ksm_now
    from ..live.probe import RemapProbe, probe_remap

    fs = KernelFS()
    d = diagnose(fs)
    if probe:
        remap = probe_remap()
    else:  # what the kernel's files say instead (live/features.py)
        expected = features.remap_expected(fs)
        remap = RemapProbe(expected, {
            True: "this kernel has the underused-THP shrinker, which came with the remap "
                  "(6.12), so the model takes it to remap",
            False: "this kernel has no underused-THP shrinker, which came with the remap "
                   "(6.12), so the model takes it not to remap",
            None: "no THP files to tell; the model takes it to remap, as every kernel "
                  "since 6.12 does"}[expected])
    d["remap"] = {"remaps": remap.remaps, "how": remap.how, "probed": probe}
    feats = features.probe(fs, remap.remaps if probe else None, remap.how)
    d["features"] = [f.to_json() for f in feats]
    d["ksm_now"] = now = ksm_now(fs)
    knobs = d["knobs"]  # as diagnose() read them: "ksm/pages_to_scan" -> "100"
    adv = None
    if advice and d["ksm"]:
        try:  # the exact engine: numpy only, but a trimmed install may lack the model
            from ..advice import advise

            adv = advise(knobs, remap.remaps)
            d["advice"] = adv.to_json()
        except ImportError as e:
            d["advice"] = None
            d["advice_missing"] = missing_extra(e)
    thp_on = knobs.get("transparent_hugepage/enabled", "never") != "never"
    exposed = bool(adv and adv.current.verdicts and now.get("run") == 1 and thp_on)
    d["exposed"] = exposed
    code = 3 if not d["live_ok"] and not d["journal"] else 1 if exposed or d["journal"] else 0
    d["exit_code"] = code
    if json_out:
        dump(d)
        raise typer.Exit(code)
    row("kernel", f"{d['kernel']}   root {'yes' if d['root'] else 'no'}   KSM "
        f"{'yes' if d['ksm'] else 'no'}   THP {'yes' if d['thp'] else 'no'}   ksmd pid "
        f"{d['ksmd_pid']}")
    row("memory", f"{d['mem_available_mib']} MiB available")
    say_remap(remap.remaps, remap.how, probe)
    say_ksm_now(now)
    row("knobs", "ksm " + " ".join(f"{k}={knobs[f'ksm/{k}']}" for k in SHOWN_KNOBS
                                   if f"ksm/{k}" in knobs)
        + f"; THP enabled={knobs.get('transparent_hugepage/enabled', '-')}")
    if d.get("advice_missing"):
        row("exposure", f"not judged: {d['advice_missing']}")
    if adv is not None:
        verdict = ", ".join(adv.current.verdicts) or "neither regression"
        row("exposure", f"{'now' if exposed else 'if KSM ran'}: {verdict} (the model of "
            f"this kernel, {adv.policy}, on {adv.workload}: 128 MiB of zero-filled THPs "
            f"with this host's knobs, {adv.seconds:.0f} s)")
        for line in adv.say:
            row("advice", f"- {line}", "  ")
    if full:
        for name, value in d["knobs"].items():
            print(f"  {name:<48} {value}"[:80])
        row("features", "what the lab and the model rely on: here or not (probed, not "
            "read from the version), the first release with it, its commit")
        for line in features.table(feats):
            print(line)
    prof = d["profile"]
    if prof["source"] == "machine":
        row("profile", f"this machine's, fitted {str(prof['fitted'])[:16]}: {prof['path']}")
    elif prof["source"] == "shipped":
        row("profile", "none for this machine; the shipped one is fitted elsewhere "
            "(ksmlab calibrate --quick fits this machine's, ~3 min live)")
    else:
        row("profile", f"{prof['source']}: {prof.get('path')}")
    if prof.get("warning") and prof["source"] != "shipped":
        row("", prof["warning"])
    if full:
        row("events", d["kernel_events"])
    if d["journal"]:
        row("journal", f"a killed run left knobs changed: {d['journal']} (ksmlab restore)")
    if full and d["ksm_mergeable_pids"]:
        row("note", f"ksmd would also scan pids {d['ksm_mergeable_pids'][:8]} "
            "(mergeable memory)")
    if full and d["thp_eligible_pids"]:
        row("note", f"khugepaged shares its passes with pids {d['thp_eligible_pids'][:8]}")
    for scheme in d["damon"]:
        row("note", f"DAMON {scheme}: it can split THPs no KSM knob controls")
    if d["lock_holder"]:
        row("lock", f"a live run is in progress (pid {d['lock_holder']})")
    if d["live_ok"]:
        row("live runs", "can work here")
    else:
        for p in d["problems"]:
            row("live runs", f"cannot work: {p}")
    if not full:
        print("(ksmlab doctor --all: every knob, the kernel features the lab relies on)")
    raise typer.Exit(code)


# the KSM knobs the one-line summary shows: the ones the regressions depend on
SHOWN_KNOBS = ("run", "pages_to_scan", "sleep_millisecs", "use_zero_pages", "advisor_mode")


def say_remap(remaps: bool | None, how: str, probed: bool) -> None:
    """The probe's answer, or, not probed, what the kernel's files suggest, never
    worded as an answer."""
    if probed:
        row("remap", f"{ {True: 'yes', False: 'no', None: 'unknown'}[remaps]}: {how}")
    else:
        row("remap", f"not probed (--no-probe); {how}")


def row(label: str, text: str, hang: str = "") -> None:
    """One labelled line of doctor's report, wrapped at 80 columns."""
    for i, line in enumerate(textwrap.wrap(text, 68, subsequent_indent=hang,
                                           break_on_hyphens=False) or [""]):
        print(f"{label if i == 0 else '':<12}{line}")


def say_ksm_now(now: dict[str, Any]) -> None:
    def mib(pages: int | None) -> str:
        return "-" if pages is None else f"{pages * 4 / 1024:.1f} MiB"

    state = {0: "stopped", 1: "running", 2: "unmerging"}.get(now.get("run") or 0, "?")
    profit = now.get("general_profit")
    row("KSM now", f"{state}: pages_sharing {now.get('pages_sharing')} "
        f"({mib(now.get('pages_sharing'))} saved), ksm_zero_pages "
        f"{now.get('ksm_zero_pages')}, general_profit "
        f"{'-' if profit is None else f'{profit / 2**20:.1f} MiB'}, full_scans "
        f"{now.get('full_scans')}")
    row("THP splits", f"{now.get('thp_split_page')} since boot; where the kernel remaps, "
        "each freed its zero-filled subpages, which no KSM counter shows")
