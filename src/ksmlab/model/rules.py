"""Small scalar rules of the kernel, written once: the exact engine calls them, the
fast engine compiles them unchanged (``jit(inline=True)(rule)``), so both decide
alike by construction.  Each works on plain ints and on anything indexable."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy.typing as npt

from ..scenario import HPAGE_PMD_NR


def skip_age(age: int) -> int:
    """mm/ksm.c skip_age(): how many scans smart scan skips an unchanged page of this
    age (should_skip_rmap_item() sets remaining_skips from it)."""
    if age <= 3:
        return 1
    if age <= 5:
        return 2
    if age <= 8:
        return 4
    return 8


def thp_underused(cids: Sequence[int] | npt.NDArray[Any], first: int, max_none: int
                  ) -> bool:
    """mm/huge_memory.c thp_underused(): more than max_ptes_none zero subpages among
    the HPAGE_PMD_NR content ids from ``first`` (0: a zero-filled page); it stops as
    soon as the answer is known, and returns early at max_ptes_none=511 (6.12-6.18)."""
    if max_none == HPAGE_PMD_NR - 1:
        return False
    zero = 0
    filled = 0
    for s in range(first, first + HPAGE_PMD_NR):
        if cids[s] == 0:
            zero += 1
            if zero > max_none:
                return True
        else:
            filled += 1
            if filled >= HPAGE_PMD_NR - max_none:
                return False
    return False
