"""What the running kernel offers for live runs (reads only)."""

from __future__ import annotations

import os
from typing import Any

from ..profiles import ProfileError, resolve
from . import machine
from .damon import active_schemes
from .journal import Journal, JournalDamaged, RunLock
from .kernelfs import KernelFS
from .knobs import all_knobs
from .run import ksm_competitors, mem_available_mib, problems, thp_competitors
from .sampler import find_ksmd
from .tracefs import tracefs_status


def ksm_now(fs: KernelFS) -> dict[str, Any]:
    """What KSM is doing now, and what THP splits freed beside it since boot: each
    split of an anonymous THP maps its zero-filled subpages to the zero page (6.12+),
    memory no KSM counter shows."""
    out: dict[str, Any] = {}
    for name in ("run", "pages_shared", "pages_sharing", "pages_unshared", "ksm_zero_pages",
                 "general_profit", "full_scans"):
        raw = fs.read_or_none(f"sys/kernel/mm/ksm/{name}")
        out[name] = int(raw) if raw is not None and raw.lstrip("-").isdigit() else None
    for line in (fs.read_or_none("proc/vmstat") or "").splitlines():
        key, _, value = line.partition(" ")
        if key in ("thp_split_page", "thp_underused_split_page", "thp_swpout_fallback",
                   "nr_anon_transparent_hugepages"):
            out[key] = int(value)
    return out


def diagnose(fs: KernelFS) -> dict[str, Any]:
    knobs = {}
    for k in all_knobs(fs):
        raw = fs.read_or_none(k.rel)
        if raw is not None:
            knobs[k.name] = k.parse(raw)
    why = problems(fs)
    holder = RunLock().holder()
    try:
        rec = Journal().read() if holder is None else None  # a run's own journal is live
        damaged = None
    except JournalDamaged as e:
        rec, damaged = None, str(e)
        why.append(damaged)
    ident = machine.identity(fs)
    try:
        profile: dict[str, Any] = resolve(None, ident, machine.key(ident)).to_json()
    except ProfileError as e:
        profile = {"source": "error", "warning": str(e)}
    return {
        "kernel": os.uname().release,
        "root": os.geteuid() == 0,
        "ksm": fs.exists("sys/kernel/mm/ksm/run"),
        "thp": fs.exists("sys/kernel/mm/transparent_hugepage/enabled"),
        "ksmd_pid": find_ksmd(fs),
        "mem_available_mib": mem_available_mib(fs),
        "knobs": knobs,
        "journal": ({**dict(rec.saved), **({"tracefs": "to restore"} if rec.tracing else {})}
                    if rec else None),
        # KSM's tracepoints (ksmlab validate / run --kernel-events); not mounted here
        "kernel_events": tracefs_status(fs),
        "lock_holder": holder,
        "journal_damaged": damaged,
        # processes a live run would share ksmd (and khugepaged) with
        "ksm_mergeable_pids": ksm_competitors(fs, {os.getpid()}),
        "thp_eligible_pids": thp_competitors(fs, {os.getpid()}),
        # the cost profile model runs take here (ksmlab calibrate --quick fits one)
        # DAMON schemes that can split or collapse THPs beside the lab's runs
        "damon": [str(x) for x in active_schemes(fs)],
        "machine_key": machine.key(ident),
        "profile": profile,
        "live_ok": not why,
        "problems": why,
    }
