"""Kernel variants as data: the decisions consulted where kernels differ.

A :class:`Policy` is a frozen set of switches.  The model asks it a few
questions (through the functions at the bottom, which read only the switches,
never the name):

- does this THP split remap zero-filled subpages to the shared zero page,
  given who started the split (``ksm``, ``shrinker`` or ``other``), the VMA,
  KSM's ``run`` and the knobs?  (``remap_on_split``)
- may KSM split this THP, and does its scanner look at THP subpages at all?
  (``ksm_scans_thp``)
- does KSM skip pages that a split has just mapped to the zero page?
- is the underused-THP shrinker there at all?

Each policy records where every rule comes from (``sources``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

Caller = Literal["ksm", "shrinker", "other"]


class Remap(Enum):
    """What a split does with its zero-filled subpages."""

    NONE = "none"  # restore every PTE (pre-6.12)
    CLEAN = "clean"  # clean zero PTE, uncounted (b1f202060afe)
    KSM_ACCOUNTED = "ksm-accounted"  # KSM-marked zero PTE, counted, budget-charged


@dataclass(frozen=True)
class Policy:
    name: str
    description: str
    # remove_migration_ptes(..., RMP_USE_SHARED_ZEROPAGE) at the end of a split
    remap: bool = True
    # only these callers' splits remap (when ``remap``)
    remap_callers: frozenset[str] = frozenset({"ksm", "shrinker", "other"})
    # "Tighten" v1 patch 2/3: no remap in a VM_MERGEABLE VMA while run has the merge bit
    no_remap_if_ksm_running_and_mergeable: bool = False
    # "Tighten" v1 patch 3/3: no remap at all when shrink_underused=0
    remap_needs_shrink_underused: bool = False
    # our design: a KSM-started split remaps only with use_zero_pages=1, as
    # KSM zero PTEs (counted in ksm_zero_pages), charged to pages_to_scan
    ksm_accounted_remap: bool = False
    # does ksmd look at subpages of PMD-mapped THPs (and so split them)?
    ksm_thp: Literal["always", "never", "under-pressure"] = "always"
    # xu xin: skip merging when the page (or tree partner) maps the zero page
    ksm_skip_zeropage: bool = False
    # the underused-THP shrinker and fault-time queueing (new in 6.12)
    underused_shrinker: bool = True
    # hpage_collapse_scan_pmd() refuses a range without a writable PTE (SCAN_PAGE_RO)
    # up to 6.12; later trees (collapse_scan_pmd()) dropped the check, and 6.18 was
    # measured collapsing ranges of read-only KSM pages and zero PTEs
    khugepaged_needs_writable: bool = False
    sources: dict[str, str] = field(default_factory=dict)


_B1F = "commit b1f202060afe (6.12): remap in __folio_split() for every anon split"
_RO_612 = "mm/khugepaged.c (6.12) hpage_collapse_scan_pmd(): !writable -> SCAN_PAGE_RO"
_RO_NEW = ("collapse_scan_pmd() in later trees has no SCAN_PAGE_RO check; measured on 6.18.44 "
           "(ksmlab validate thp-z90-dup): read-only KSM pages + zero PTEs collapse")
_SHRINK = "mm/huge_memory.c thp_underused(): early return at max_ptes_none=511 (6.12-6.18)"

POLICIES: dict[str, Policy] = {
    p.name: p
    for p in [
        Policy(
            "pre-6.12",
            "before b1f202060afe: a split never remaps zero subpages; no underused shrinker",
            remap=False,
            underused_shrinker=False,
            khugepaged_needs_writable=True,
            sources={
                "remap": "mm/huge_memory.c before b1f202060afe: remap_page() without zero flag",
                "underused_shrinker": "thp_underused()/split_underused_thp added by the same "
                "series (6.12)",
            },
        ),
        Policy(
            "6.12",
            "every anon split remaps zero subpages; shrinker inert at max_ptes_none=511",
            khugepaged_needs_writable=True,
            sources={"remap": _B1F, "underused_shrinker": _SHRINK,
                     "khugepaged_needs_writable": _RO_612},
        ),
        Policy(
            "mainline",
            "what these 6.18 machines do: as 6.12 (remap on every split, shrinker inert at 511)",
            sources={
                "remap": _B1F + "; live-findings: shrink_underused=0 changes nothing on 6.18",
                "underused_shrinker": _SHRINK + "; live-findings: inert at 511 even for all-zero",
                "khugepaged_needs_writable": _RO_NEW,
            },
        ),
        Policy(
            "v1",
            "Tighten v1 series: no remap in VM_MERGEABLE VMAs while KSM runs, none if "
            "shrink_underused=0",
            no_remap_if_ksm_running_and_mergeable=True,
            remap_needs_shrink_underused=True,
            sources={
                "no_remap_if_ksm_running_and_mergeable": "[PATCH mm-unstable v1 2/3] "
                "try_to_map_unused_to_zeropage(): ksm_is_running() && VM_MERGEABLE",
                "remap_needs_shrink_underused": "[PATCH mm-unstable v1 3/3] __folio_split(): "
                "&& split_underused_thp",
            },
        ),
        Policy(
            "v1-p2",
            "Tighten v1 patch 2/3 alone: no remap in VM_MERGEABLE VMAs while KSM runs",
            no_remap_if_ksm_running_and_mergeable=True,
            sources={
                "no_remap_if_ksm_running_and_mergeable": "[PATCH mm-unstable v1 2/3]",
            },
        ),
        Policy(
            "v1-p3",
            "Tighten v1 patch 3/3 alone: no remap at all when shrink_underused=0",
            remap_needs_shrink_underused=True,
            sources={"remap_needs_shrink_underused": "[PATCH mm-unstable v1 3/3] (D. Hildenbrand)"},
        ),
        Policy(
            "rfc",
            "RFC 2026-05: only splits by the underused shrinker remap zero subpages",
            remap_callers=frozenset({"shrinker"}),
            sources={
                "remap_callers": "[RFC] mm: restrict zero-page remapping to underused THP "
                "splits (folio_split_underused)",
            },
        ),
        Policy(
            "ksm-split-no-remap",
            "only splits that KSM starts skip the remap (Lance Yang; the thread's direction)",
            remap_callers=frozenset({"shrinker", "other"}),
            sources={
                "remap_callers": "thread: Lance Yang 2026-06-09 13:06, Nico Pache's v2 direction",
            },
        ),
        Policy(
            "ksm-skip-zeropage",
            "xu xin: after a failed merge KSM stops if the page now maps the zero page, and "
            "erases unstable nodes that map it",
            ksm_skip_zeropage=True,
            sources={
                "ksm_skip_zeropage": "thread: xu xin 2026-06-09 13:47 ('check for the shared "
                "zeropage in cmp_and_merge_page'); exact rule: ksmlab (see docstring)",
            },
        ),
        Policy(
            "ksm-skip-huge",
            "xu xin's skip_huge_page: ksmd walks over subpages of THPs (never merges nor "
            "splits them)",
            ksm_thp="never",
            sources={"ksm_thp": "thread: xu xin 2026-06-09 13:47 (skip_huge_page knob)"},
        ),
        Policy(
            "ksm-huge-under-pressure",
            "Zi Yan: ksmd skips THPs unless under pressure (a pressure event until two full "
            "scans begun after it end)",
            ksm_thp="under-pressure",
            sources={
                "ksm_thp": "thread: Zi Yan 2026-06-09 14:07; pressure window: ksmlab",
            },
        ),
        Policy(
            "ksm-accounted-remap",
            "ksmlab: a KSM split remaps zeros only if use_zero_pages=1, as counted KSM zero "
            "PTEs within pages_to_scan",
            ksm_accounted_remap=True,
            sources={
                "ksm_accounted_remap": "ksmlab design (README): other splits remap as mainline",
            },
        ),
    ]
}

# xu xin's check, the exact rule chosen (policy ``ksm-skip-zeropage``):
# The scanner never hands a zero-pfn PTE to cmp_and_merge_page() (folio_walk /
# ksm_next_page_pmd_entry skip it), so a literal "skip the scanned page if it is
# the zero page" check at the top of cmp_and_merge_page() never fires.  Where
# the zero page does meet KSM is after a split inside a merge attempt:
#  (1) the scanned page itself was zero and the split remapped it; mainline then
#      falls through into stable/unstable tree work with an orphaned page and may
#      insert it as an already-stale unstable node (the use_zero_pages=1 path).
#      Rule: cmp_and_merge_page() returns as soon as a failed merge left the
#      scanned address mapped to the shared zero page.
#  (2) the unstable-tree partner was remapped (same-THP pair, use_zero_pages=0);
#      mainline's get_mergeable_page() then aborts every search that reaches the
#      node.  Rule: unstable_tree_search_insert() treats a node whose address maps
#      the shared zero page as already merged: rb_erase() it (pages_unshared-1)
#      and restart the search from the root.
# Both are what "skip merging when a shared zeropage is detected" can mean in
# code that runs; neither changes what the split frees.


def get_policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown policy {name!r}; known: {', '.join(POLICIES)}"
        ) from None


def remap_on_split(
    policy: Policy,
    caller: Caller,
    vma_mergeable: bool,
    ksm_running: bool,
    use_zero_pages: int,
    shrink_underused: int,
) -> Remap:
    """How a successful split of an anon THP treats its zero subpages."""
    if not policy.remap:
        return Remap.NONE
    if caller == "ksm" and policy.ksm_accounted_remap:
        return Remap.KSM_ACCOUNTED if use_zero_pages else Remap.NONE
    if caller not in policy.remap_callers:
        return Remap.NONE
    if policy.remap_needs_shrink_underused and not shrink_underused:
        return Remap.NONE
    if policy.no_remap_if_ksm_running_and_mergeable and ksm_running and vma_mergeable:
        return Remap.NONE
    return Remap.CLEAN


def ksm_scans_thp(policy: Policy, under_pressure: bool) -> bool:
    """Does ksmd hand subpages of PMD-mapped THPs to cmp_and_merge_page()?"""
    if policy.ksm_thp == "always":
        return True
    if policy.ksm_thp == "never":
        return False
    return under_pressure
