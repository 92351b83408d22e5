"""Sizes of x86-64 memory management the whole package counts in (no imports, so any
module can use them without an import cycle)."""

PAGE_SIZE = 4096
HPAGE_PMD_NR = 512  # subpages of a PMD-mapped THP on x86-64
