"""Address spaces: mms, VMAs, page tables, folios, the zero pages.

Addresses are virtual page numbers (4 KiB units).  A VMA's page table is a
list with one entry per page:

- ``None``: pte_none (never touched, or PMD not populated)
- :data:`ZERO_PTE` / :data:`KSM_ZERO_PTE`: a PTE mapping the shared zero page;
  the KSM one stands for the dirty bit that replace_page() sets
  (is_ksm_zero_pte()), the clean one for read faults and split remaps
- a :class:`Page`: a present anon page.  If ``page.folio`` is a :class:`Thp`
  whose ``pmd_mapped`` is set, the entry is a subpage of a PMD mapping.

RSS is the mm's MM_ANONPAGES counter, kept at every (un)map like the kernel.
"""

from __future__ import annotations

from bisect import bisect_right

from ..constants import HPAGE_PMD_NR, KSM_RMAP_ITEM_SIZE
from ..scenario import PMD_ORDER, ThpKnobs, folio_size_name
from ..trace import MTHP_STATS, mthp_column
from .policies import Policy


class ZeroPte:
    """A PTE that maps the shared zero page (pte_pfn == zero_pfn)."""

    __slots__ = ("ksm",)

    def __init__(self, ksm: bool) -> None:
        self.ksm = ksm

    def __repr__(self) -> str:
        return "KSM_ZERO_PTE" if self.ksm else "ZERO_PTE"


ZERO_PTE = ZeroPte(False)
KSM_ZERO_PTE = ZeroPte(True)


class Thp:
    """A large anon folio: PMD order (512 subpages, PMD-mapped when faulted), or a
    smaller multi-size THP order (PTE-mapped, never on the underused queue)."""

    __slots__ = ("alive", "index", "order", "pages", "partially_mapped", "pmd_mapped",
                 "queued", "vma")

    def __init__(self, vma: Vma, index: int, pages: list[Page], order: int = PMD_ORDER
                 ) -> None:
        self.vma = vma
        self.index = index  # page offset of the first subpage in the VMA
        self.pages = pages
        self.order = order
        self.pmd_mapped = order == PMD_ORDER
        self.queued = False  # on the deferred split queue
        self.partially_mapped = False
        self.alive = True


class Page:
    """A 4 KiB page (order-0 folio, or a subpage of a :class:`Thp`)."""

    __slots__ = ("cid", "folio", "freed", "ksm", "mapcount", "stable_node")

    def __init__(self, cid: int, folio: Thp | None = None) -> None:
        self.cid = cid
        self.folio = folio
        self.mapcount = 1
        self.ksm = False  # folio_test_ksm(): mapping points at a stable node
        self.stable_node: object | None = None  # the keyhole (ksm.StableNode)
        self.freed = False

    def __repr__(self) -> str:
        kind = "thp" if self.folio is not None else ("ksm" if self.ksm else "page")
        return f"<{kind} cid={self.cid} map={self.mapcount}>"


Pte = Page | ZeroPte | None

# PMD states of a VMA's 2 MiB ranges
PMD_NONE, PMD_THP, PMD_TABLE = 0, 1, 2


class Vma:
    __slots__ = (
        "anon_vma", "hi", "hugepage", "lo", "mergeable", "mm", "nohugepage", "npages", "pmd",
        "pte", "start",
    )

    def __init__(self, mm: Mm, start: int, npages: int, lo: int = 0, hi: int | None = None
                 ) -> None:
        assert start % HPAGE_PMD_NR == 0 and npages % HPAGE_PMD_NR == 0
        self.mm = mm
        self.start = start
        self.npages = npages
        # a VMA of a captured process need not be 2 MiB aligned: the model keeps it in
        # whole 2 MiB ranges and these bound the real one (pages outside stay pte_none)
        self.lo = lo
        self.hi = npages if hi is None else hi
        self.mergeable = False  # VM_MERGEABLE
        self.hugepage = False  # VM_HUGEPAGE
        self.nohugepage = False  # VM_NOHUGEPAGE
        self.anon_vma = False  # set by the first fault
        self.pte: list[Pte] = [None] * npages
        self.pmd: list[int] = [PMD_NONE] * (npages // HPAGE_PMD_NR)

    @property
    def end(self) -> int:
        return self.start + self.npages


class Mm:
    __slots__ = (
        "anon_rss", "khugepaged", "ksm_merging_pages", "ksm_rmap_items", "ksm_zero_pages",
        "merge_any", "name", "pid", "vmas",
    )

    def __init__(self, pid: int, name: str) -> None:
        self.pid = pid
        self.name = name
        self.vmas: list[Vma] = []  # sorted by start
        self.anon_rss = 0  # MM_ANONPAGES
        self.merge_any = False  # MMF_VM_MERGE_ANY (prctl)
        self.khugepaged = False  # registered with khugepaged
        self.ksm_rmap_items = 0
        self.ksm_merging_pages = 0
        self.ksm_zero_pages = 0

    def add_vma(self, vma: Vma) -> None:
        self.vmas.append(vma)
        self.vmas.sort(key=lambda v: v.start)

    def find_vma(self, addr: int) -> Vma | None:
        """vma_lookup()"""
        starts = [v.start for v in self.vmas]
        i = bisect_right(starts, addr) - 1
        if i >= 0 and addr < self.vmas[i].end:
            return self.vmas[i]
        return None

    def thp_count(self) -> int:
        return sum(1 for v in self.vmas for s in v.pmd if s == PMD_THP)

    def ksm_process_profit(self) -> int:
        # ksm_process_profit()
        return (self.ksm_merging_pages + self.ksm_zero_pages) * 4096 - (
            self.ksm_rmap_items * KSM_RMAP_ITEM_SIZE
        )


VMSTAT_EVENTS = (
    "thp_fault_alloc", "thp_fault_fallback", "thp_collapse_alloc", "thp_split_page",
    "thp_split_page_failed", "thp_deferred_split_page", "thp_underused_split_page",
    "thp_split_pmd", "thp_zero_page_alloc", "thp_swpout_fallback",
)


class System:
    """Global state shared by ksmd, the THP code and khugepaged."""

    def __init__(self, policy: Policy, thp: ThpKnobs) -> None:
        self.policy = policy
        self.thp = thp
        self.mms: list[Mm] = []
        self.vmstat: dict[str, int] = dict.fromkeys(VMSTAT_EVENTS, 0)
        self.nr_anon_thp = 0  # nr_anon_transparent_hugepages
        self.ksm_zero_pages = 0  # the global atomic ksm_zero_pages
        self.ksm_running = False  # ksm_run & KSM_RUN_MERGE
        self.ksm_use_zero_pages = 0
        # deferred split queue (insertion-ordered set)
        self.deferred: dict[Thp, None] = {}
        self.next_vpn = 1 << 30  # top-down mmap cursor (page numbers)
        # count_mthp_stat()/mod_mthp_stat() for the multi-size orders in use
        self.mthp: dict[str, int] = {mthp_column(folio_size_name(o), st): 0
                                     for o in thp.mthp_orders for st in MTHP_STATS}

    def mmap(self, mm: Mm, npages: int, lo: int = 0, hi: int | None = None) -> Vma:
        """A 2 MiB-aligned anon mapping below the previous one (top-down mmap)."""
        self.next_vpn -= npages + HPAGE_PMD_NR
        self.next_vpn -= self.next_vpn % HPAGE_PMD_NR
        vma = Vma(mm, self.next_vpn, npages, lo, hi)
        mm.add_vma(vma)
        return vma

    def order_allowed(self, vma: Vma, order: int) -> bool:
        """thp_vma_allowable_orders() for one order of this VMA."""
        return self.thp.order_allowed(order, vma.hugepage, vma.nohugepage)

    def thp_allowed(self, vma: Vma) -> bool:
        """PMD order allowed (faults, khugepaged_enter_vma(), khugepaged's scan)."""
        return self.order_allowed(vma, PMD_ORDER)

    def mthp_orders(self, vma: Vma) -> list[int]:
        """Orders below PMD a fault may allocate in this VMA, highest first
        (alloc_anon_folio())."""
        return [o for o in self.thp.mthp_orders if self.order_allowed(vma, o)]

    def count_mthp(self, order: int, stat: str, n: int = 1) -> None:
        key = mthp_column(folio_size_name(order), stat)
        if key in self.mthp:
            self.mthp[key] += n

    def zap_ksm_zero(self, mm: Mm) -> None:
        # ksm_might_unmap_zero_page(): eager decrement
        self.ksm_zero_pages -= 1
        mm.ksm_zero_pages -= 1


def put_mapping(page: Page) -> None:
    """Drop one mapping of ``page``; it is freed with its last mapping."""
    page.mapcount -= 1
    if page.mapcount <= 0:
        page.freed = True
