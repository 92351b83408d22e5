"""Kernel constants the lab and the model share (x86-64), defined once."""

from __future__ import annotations

PAGE_SIZE = 4096
HPAGE_PMD_NR = 512  # subpages of a PMD-mapped THP on x86-64 (1 << HPAGE_PMD_ORDER)
HPAGE_PMD_SIZE = PAGE_SIZE * HPAGE_PMD_NR
# sizeof(struct ksm_rmap_item) on x86-64 in 6.12-6.18 (mm/ksm.c; general_profit
# charges it per rmap item, Documentation/admin-guide/mm/ksm.rst)
KSM_RMAP_ITEM_SIZE = 64
