"""DAMON schemes that act on memory beside a live run (reads only).

A kdamond with a DAMOS scheme can split or collapse THPs no KSM knob controls:
``pageout`` reclaims cold folios, and with no swap shrink_folio_list() splits an
anonymous THP it cannot swap (thp_swpout_fallback), and the split remaps its
zero subpages (b1f202060afe); ``hugepage``/``nohugepage``/``collapse`` change
what khugepaged and the fault path do.  Some VM images start one (these machines:
a physical-address ``pageout`` scheme for regions idle 12 aggregation intervals,
60 s), so the lab says so instead of letting its THPs vanish unexplained.
"""

from __future__ import annotations

from dataclasses import dataclass

from .kernelfs import KernelFS

ADMIN = "sys/kernel/mm/damon/admin/kdamonds"
# DAMOS actions that change THPs or free anonymous memory (damos_action in damon.h)
ACTS_ON_THP = ("pageout", "hugepage", "nohugepage", "collapse", "migrate_cold",
               "migrate_hot")


@dataclass(frozen=True)
class Scheme:
    kdamond: str
    operations: str  # "paddr" (physical) or "vaddr"/"fvaddr" (processes)
    action: str
    min_age_s: float | None  # how long a region must be idle/unchanged first

    def __str__(self) -> str:
        age = "" if self.min_age_s is None else f" for regions aged {self.min_age_s:g} s"
        return f"kdamond {self.kdamond} ({self.operations}): {self.action}{age}"


def active_schemes(fs: KernelFS) -> list[Scheme]:
    """Schemes of running kdamonds whose action can touch the lab's THPs."""
    out = []
    for kd in fs.listdir(ADMIN):
        if not kd.isdigit() or fs.read_or_none(f"{ADMIN}/{kd}/state") != "on":
            continue
        for ctx in fs.listdir(f"{ADMIN}/{kd}/contexts"):
            base = f"{ADMIN}/{kd}/contexts/{ctx}"
            if not ctx.isdigit():
                continue
            ops = fs.read_or_none(f"{base}/operations") or "?"
            aggr_us = _int(fs.read_or_none(f"{base}/monitoring_attrs/intervals/aggr_us"))
            for sc in fs.listdir(f"{base}/schemes"):
                if not sc.isdigit():
                    continue
                action = fs.read_or_none(f"{base}/schemes/{sc}/action") or "?"
                if action not in ACTS_ON_THP:
                    continue
                age = _int(fs.read_or_none(f"{base}/schemes/{sc}/access_pattern/age/min"))
                min_age = None if age is None or aggr_us is None else age * aggr_us / 1e6
                out.append(Scheme(kd, ops, action, min_age))
    return out


def _int(raw: str | None) -> int | None:
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None
