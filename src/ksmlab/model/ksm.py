"""ksmd: scan cursor, rmap items, stable and unstable trees (mm/ksm.c).

Follows the 6.12-6.18 code path by path; see reference/kernel-behavior.md §1.
Content ids stand for page contents: ``memcmp_pages`` is id comparison and the
checksum is ``cid + 1`` (never equal to the initial oldchecksum 0, like
xxhash of a real page in practice).

With ``Ksm.trace`` a list (off: None), ksmd appends the events of KSM's
tracepoints where the kernel fires them (include/trace/events/ksm.h), in the
lab's names of :mod:`ksmlab.events`: pages as ``[process instance, page index]``
(``Ksm.pages``: the workload's pages at time 0, as the live lab's pagemap
snapshot), rmap items as their page, mms as the process instance.
"""

from __future__ import annotations

from typing import Any

from ..constants import KSM_RMAP_ITEM_SIZE
from ..scenario import KsmKnobs
from .advisor import Advisor, scan_clock
from .costs import CpuMeter
from .memory import KSM_ZERO_PTE, Mm, Page, System, Vma, ZeroPte, put_mapping
from .policies import ksm_scans_thp
from .rbtree import RbNode, RbRoot, rb_erase, rb_insert_color, rb_link_node, rb_replace_node
from .rules import skip_age
from .thp import split_folio

UNSTABLE_FLAG = 0x100
STABLE_FLAG = 0x200
SEQNR_MASK = 0xFF


class _ZeroPage:
    """ZERO_PAGE(addr) as a merge target."""


ZERO_PAGE = _ZeroPage()


class RmapItem(RbNode):
    """struct ksm_rmap_item"""

    __slots__ = (
        "addr", "age", "flags", "head", "mm", "next", "oldchecksum", "remaining_skips", "seqnr",
        "vma",
    )

    def __init__(self, mm: Mm, vma: Vma, addr: int) -> None:
        super().__init__()
        self.mm = mm
        self.vma = vma
        self.addr = addr
        self.next: RmapItem | None = None
        self.oldchecksum = 0
        self.age = 0
        self.remaining_skips = 0
        self.flags = 0
        self.seqnr = 0
        self.head: StableNode | None = None

    def __repr__(self) -> str:
        return f"<rmap_item {self.addr:#x} flags={self.flags:#x}>"


class StableNode(RbNode):
    """struct ksm_stable_node: a KSM page, or a chain of dups (``is_chain``)."""

    __slots__ = ("chain", "dead", "dups", "hlist", "is_chain", "kpage", "prune_time")

    def __init__(self, kpage: Page | None, is_chain: bool = False) -> None:
        super().__init__()
        self.kpage = kpage
        self.is_chain = is_chain
        self.hlist: dict[RmapItem, None] = {}  # rmap_hlist (dups: their mappings)
        self.dups: list[StableNode] = []  # chain only, head first
        self.chain: StableNode | None = None  # the chain a dup hangs off
        self.prune_time = 0.0
        self.dead = False


def _checksum(cid: int) -> int:
    return cid + 1  # calc_checksum(); 0 is never a checksum


class Ksm:
    """ksmd and the global KSM state."""

    def __init__(self, sys: System, knobs: KsmKnobs, cpu: CpuMeter,
                 advisor: Advisor | None = None) -> None:
        self.sys = sys
        self.knobs = knobs
        # ksm_thread_pages_to_scan: the knob, or the advisor's after each full scan
        self.pages_to_scan = knobs.pages_to_scan
        self.advisor = advisor or Advisor(knobs)
        self.cpu = cpu
        self.run = 0
        self.slots: list[Mm] = []  # ksm_mm_head list order
        self.rmap_head: dict[Mm, RmapItem | None] = {}
        # ksm_scan
        self.cur_slot: int | None = None  # None: at ksm_mm_head
        self.cur_addr = 0
        self.cur_prev: RmapItem | None = None  # *rmap_list: the item before the cursor
        self.seqnr = 0
        self.unstable = RbRoot()
        self.stable = RbRoot()
        self.now = 0.0  # simulated seconds (chain pruning)
        self.pressure_scans = 0  # ksm-huge-under-pressure: full-scan ends left
        self.budget_left = 0
        # counters
        self.pages_scanned = 0
        self.pages_shared = 0
        self.pages_sharing = 0
        self.pages_unshared = 0
        self.pages_skipped = 0
        self.rmap_items = 0
        self.stable_node_chains = 0
        self.stable_node_dups = 0
        # KSM's tracepoints (see the module docstring); None: not recorded
        self.trace: list[dict[str, Any]] | None = None
        self.pages: dict[Page, list[int]] = {}  # page at time 0 -> [instance, index]
        self.vma_base: dict[Vma, tuple[int, int]] = {}  # vma -> (instance, first index)
        self.scan_open: int | None = None  # the full scan in progress (its seq)

    # ---- tracepoints ---------------------------------------------------
    def _event(self, name: str, **fields: Any) -> None:
        assert self.trace is not None
        self.trace.append({"event": name, "t": round(self.now, 9), "scan": self.scan_open,
                           **fields})

    def _item_page(self, item: RmapItem) -> list[int] | None:
        base = self.vma_base.get(item.vma)
        return None if base is None else [base[0], base[1] + item.addr - item.vma.start]

    def _trace_merge(self, name: str, item: RmapItem, page: list[int] | str | None,
                     err: int, ksm_page: bool | None = None) -> None:
        """ksm_merge_one_page / ksm_merge_with_ksm_page (try_to_merge_with_zero_page(),
        try_to_merge_with_ksm_page()); err as the kernel's (-EFAULT)."""
        extra = {} if ksm_page is None else {"ksm_page": ksm_page}
        self._event(name, **extra, page=page, item=self._item_page(item),
                    proc=item.mm.pid - 1, err=0 if err == 0 else -14)

    # ---- registration -------------------------------------------------
    def enter(self, mm: Mm) -> None:
        """__ksm_enter(): new mms go just before the cursor (next full scan)."""
        if mm in self.rmap_head:
            return
        self.rmap_head[mm] = None
        if self.trace is not None:
            self._event("ksm_enter", proc=mm.pid - 1)  # __ksm_enter()
        if self.cur_slot is None:
            self.slots.append(mm)
        else:
            self.slots.insert(self.cur_slot, mm)
            self.cur_slot += 1

    def should_run(self) -> bool:
        # ksmd_should_run()
        return self.run == 1 and bool(self.slots)

    # ---- counters ------------------------------------------------------
    def counters(self) -> dict[str, int]:
        volatile = max(
            0, self.rmap_items - self.pages_shared - self.pages_sharing - self.pages_unshared
        )
        zero = self.sys.ksm_zero_pages
        return {
            "pages_scanned": self.pages_scanned,
            "pages_shared": self.pages_shared,
            "pages_sharing": self.pages_sharing,
            "pages_unshared": self.pages_unshared,
            "pages_volatile": volatile,
            "pages_skipped": self.pages_skipped,
            "ksm_zero_pages": zero,
            "full_scans": self.seqnr,
            "stable_node_chains": self.stable_node_chains,
            "stable_node_dups": self.stable_node_dups,
            "general_profit": (self.pages_sharing + zero) * 4096
            - self.rmap_items * KSM_RMAP_ITEM_SIZE,
        }

    # ---- ksm_do_scan ---------------------------------------------------
    def do_scan(self) -> bool:
        """ksm_do_scan(pages_to_scan); True if a full scan ended (batch cut short)."""
        self.budget_left = self.pages_to_scan
        while self.budget_left > 0:
            self.budget_left -= 1
            nxt = self._scan_get_next_rmap_item()
            if nxt is None:
                return True
            page, item = nxt
            self.cpu.charge("visit_ns")
            self._cmp_and_merge_page(page, item)
            self.pages_scanned += 1
        return False

    def clock(self) -> float:
        """The model's time now, inside the batch that began at ``now``."""
        return scan_clock(self.now, self.cpu.ns, self.cpu.batch0)

    def at_scan_start(self) -> bool:
        return self.cur_slot is None

    # ---- the cursor ----------------------------------------------------
    def _scan_get_next_rmap_item(self) -> tuple[Page, RmapItem] | None:
        if not self.slots:
            return None
        if self.cur_slot is None:
            # start of a full scan: advisor_start_scan(), lru_add_drain_all(), unstable
            # roots = RB_ROOT
            self.advisor.start(self.clock())
            self.cpu.charge("scan_start_ns")
            if self.trace is not None:
                self.scan_open = self.seqnr
                self._event("ksm_start_scan", seq=self.seqnr, rmap_entries=self.rmap_items)
            self.unstable.reset()
            self.cur_slot = 0
            self.cur_addr = 0
            self.cur_prev = None
        while True:
            mm = self.slots[self.cur_slot]
            found = self._scan_mm(mm)
            if found is not None:
                return found
            # end of this mm: nuke the rmap items above the cursor
            self._remove_trailing_rmap_items(mm)
            if self.cur_addr == 0:
                # no VM_MERGEABLE vma: the mm_slot is freed
                del self.slots[self.cur_slot]
                del self.rmap_head[mm]
            else:
                self.cur_slot += 1
            self.cur_addr = 0
            self.cur_prev = None
            if self.cur_slot >= len(self.slots):
                self.cur_slot = None
                # advisor_stop_scan(): the next batch's pages_to_scan (this one ends here)
                self.pages_to_scan = self.advisor.stop(self.clock(), self.cpu.ns,
                                                       self.pages_to_scan, self.seqnr + 1)
                if self.trace is not None:
                    self._event("ksm_stop_scan", seq=self.seqnr, rmap_entries=self.rmap_items)
                    self.scan_open = None
                self.seqnr += 1  # full_scans
                if self.pressure_scans > 0:
                    self.pressure_scans -= 1
                return None

    def _scan_mm(self, mm: Mm) -> tuple[Page, RmapItem] | None:
        scan_thp = ksm_scans_thp(self.sys.policy, self.pressure_scans > 0)
        for vma in mm.vmas:
            if not vma.mergeable or vma.end <= self.cur_addr:
                continue
            if self.cur_addr < vma.start:
                self.cur_addr = vma.start
            if not vma.anon_vma:
                self.cur_addr = vma.end
                continue
            ptes = vma.pte
            i = self.cur_addr - vma.start
            n = vma.npages
            skipped = 0
            while i < n:
                pte = ptes[i]
                # ksm_next_page_pmd_entry(): present, normal (not zero pfn), anon
                # (a policy that skips THPs skips PMD-mapped ones: the walker's PMD
                # leaf; PTE-mapped multi-size THPs are scanned as the kernel does)
                if isinstance(pte, Page) and (scan_thp or pte.folio is None
                                              or not pte.folio.pmd_mapped):
                    addr = vma.start + i
                    item = self._get_next_rmap_item(mm, vma, addr)
                    self.cur_prev = item
                    if self._should_skip_rmap_item(pte, item):
                        self.cpu.charge("smart_skip_ns")
                        i += 1
                        continue
                    self.cpu.charge("pte_skip_ns", skipped)
                    self.cur_addr = addr + 1
                    return pte, item
                skipped += 1
                i += 1
            self.cpu.charge("pte_skip_ns", skipped)
            self.cur_addr = vma.end
        return None

    def _get_next_rmap_item(self, mm: Mm, vma: Vma, addr: int) -> RmapItem:
        prev = self.cur_prev
        cur = prev.next if prev is not None else self.rmap_head[mm]
        while cur is not None:
            if cur.addr == addr:
                return cur
            if cur.addr > addr:
                break
            # passed over: its address no longer yields a page
            nxt = cur.next
            self._remove_rmap_item_from_tree(cur)
            self._free_rmap_item(cur)
            if prev is None:
                self.rmap_head[mm] = nxt
            else:
                prev.next = nxt
            cur = nxt
        item = RmapItem(mm, vma, addr)
        item.next = cur
        if prev is None:
            self.rmap_head[mm] = item
        else:
            prev.next = item
        mm.ksm_rmap_items += 1
        self.rmap_items += 1
        self.cpu.charge("rmap_alloc_ns")
        return item

    def _free_rmap_item(self, item: RmapItem) -> None:
        item.mm.ksm_rmap_items -= 1
        self.rmap_items -= 1
        self.cpu.charge("rmap_free_ns")

    def _remove_trailing_rmap_items(self, mm: Mm) -> None:
        prev = self.cur_prev
        cur = prev.next if prev is not None else self.rmap_head[mm]
        while cur is not None:
            nxt = cur.next
            self._remove_rmap_item_from_tree(cur)
            self._free_rmap_item(cur)
            cur = nxt
        if prev is None:
            self.rmap_head[mm] = None
        else:
            prev.next = None

    def _should_skip_rmap_item(self, page: Page, item: RmapItem) -> bool:
        # should_skip_rmap_item(): smart scan
        if not self.knobs.smart_scan or page.ksm:
            return False
        age = item.age
        if age != 255:
            item.age += 1
        if age < 3:
            return False
        if not item.remaining_skips:
            item.remaining_skips = skip_age(age)
            return False
        self.pages_skipped += 1
        item.remaining_skips -= 1
        self._remove_rmap_item_from_tree(item)
        return True

    # ---- tree membership ----------------------------------------------
    def _remove_rmap_item_from_tree(self, item: RmapItem) -> None:
        if item.flags & STABLE_FLAG:
            node = item.head
            assert node is not None
            if self._ksm_get_folio(node) is None:
                return  # stale node: removed with all its items
            del node.hlist[item]
            self._unlink_stable(item, last=not node.hlist)
        elif item.flags & UNSTABLE_FLAG:
            age = (self.seqnr - item.seqnr) & SEQNR_MASK
            assert age <= 1
            if age == 0:
                rb_erase(self.unstable, item)
            self.pages_unshared -= 1
            item.flags = 0

    def _unlink_stable(self, item: RmapItem, last: bool) -> None:
        """The counters of one item leaving a stable node: the node's last item was
        its pages_shared, any other a pages_sharing (remove_rmap_item_from_tree(),
        remove_node_from_stable_tree())."""
        if last:
            self.pages_shared -= 1
        else:
            self.pages_sharing -= 1
        item.mm.ksm_merging_pages -= 1
        item.head = None
        item.flags = 0

    def _ksm_get_folio(self, node: StableNode) -> Page | None:
        """ksm_get_folio(): the keyhole check; a stale node is removed."""
        kp = node.kpage
        if kp is None or kp.freed or kp.stable_node is not node:
            self._remove_node_from_stable_tree(node)
            return None
        return kp

    def _remove_node_from_stable_tree(self, node: StableNode) -> None:
        items = list(node.hlist)
        if self.trace is not None:
            # the hlist is newest first; every item but the oldest was a pages_sharing
            kp = self.pages.get(node.kpage) if node.kpage is not None else None
            for it in reversed(items[1:]):
                self._event("ksm_remove_rmap_item", page=kp, item=self._item_page(it),
                            proc=it.mm.pid - 1)
            self._event("ksm_remove_ksm_page", page=kp)
        for k, it in enumerate(items):
            self._unlink_stable(it, last=k == len(items) - 1)
        node.hlist.clear()
        if node.chain is not None:
            # stable_node_dup_del()
            node.chain.dups.remove(node)
            node.chain = None
            self.stable_node_dups -= 1
        else:
            rb_erase(self.stable, node)
        node.dead = True

    # ---- cmp_and_merge_page -------------------------------------------
    def _cmp_and_merge_page(self, page: Page, item: RmapItem) -> None:
        node = page.stable_node if page.ksm else None
        bypass = False
        if node is not None:
            assert isinstance(node, StableNode)
            if item.head is node:
                return
            bypass = not self._is_candidate(node)
        else:
            self._remove_rmap_item_from_tree(item)
            self.cpu.charge("checksum_ns")
            checksum = _checksum(page.cid)
            if item.oldchecksum != checksum:
                item.oldchecksum = checksum
                return
            if not self._try_to_merge_with_zero_page(item, page):
                return
            if self.sys.policy.ksm_skip_zeropage and isinstance(
                item.vma.pte[item.addr - item.vma.start], ZeroPte
            ):
                return  # ksm-skip-zeropage rule (1)

        kpage = self._stable_tree_search(page)
        if kpage is page and item.head is node:
            return
        self._remove_rmap_item_from_tree(item)
        if kpage is not None:
            if not self._try_to_merge_with_ksm_page(item, page, kpage):
                snode = kpage.stable_node
                assert isinstance(snode, StableNode)
                self._stable_tree_append(item, snode, bypass)
            return

        found = self._unstable_tree_search_insert(item, page)
        if found is None:
            return
        titem, tpage = found
        kp = self._try_to_merge_two_pages(item, page, titem, tpage)
        split = page.folio is not None and page.folio is tpage.folio
        if kp is not None:
            snode2 = self._stable_tree_insert(kp)
            self._stable_tree_append(titem, snode2, False)
            self._stable_tree_append(item, snode2, False)
        elif split and page.folio is not None:
            # same large folio: the split failed on our two refs; retry without merging
            self._split(page.folio, page, 0)

    # ---- merging primitives -------------------------------------------
    def _split(self, folio: object, page: Page, extra: int) -> bool:
        from .memory import Thp

        assert isinstance(folio, Thp)
        budget = max(0, self.budget_left)
        res = split_folio(self.sys, folio, "ksm", extra, keep=page, budget=budget)
        if not res.ok:
            self.cpu.charge("split_failed_ns")
            return False
        cpu = self.cpu
        cpu.charge("split_ns")
        cpu.charge("zero_test_zero_ns", res.zero_tested)
        cpu.charge("zero_test_data_ns", res.data_tested)
        cpu.charge("remap_pte_ns", len(folio.pages))  # remap_page(): each PTE of the folio
        cpu.charge("free_page_ns", res.remapped)
        if res.ksm_remapped:
            # ksm-accounted-remap: each remapped subpage is a page scanned
            self.budget_left -= res.ksm_remapped
            self.pages_scanned += res.ksm_remapped
        return True

    def _find_mergeable_vma(self, item: RmapItem) -> Vma | None:
        vma = item.vma
        if not vma.mergeable or not vma.anon_vma:
            return None
        return vma

    def _try_to_merge_one_page(
        self, vma: Vma, addr: int, page: Page, kpage: Page | _ZeroPage | None, extra: int
    ) -> int:
        """try_to_merge_one_page(): 0 on success, -1 (EFAULT) otherwise."""
        if page is kpage:
            return 0
        if page.folio is not None:
            if not ksm_scans_thp(self.sys.policy, self.pressure_scans > 0):
                return -1  # the policy forbids KSM to split THPs
            if not self._split(page.folio, page, extra):
                return -1
        i = addr - vma.start
        # write_protect_page(): the PTE must still map this page
        if vma.pte[i] is not page:
            return -1
        if kpage is None:
            page.ksm = True  # folio_set_stable_node(folio, NULL)
            page.stable_node = None
            return 0
        self.cpu.charge("memcmp_equal_ns")
        if isinstance(kpage, _ZeroPage):
            if page.cid != 0:
                return -1
            # replace_page() with the zero page: dirty special PTE, counted
            self.cpu.charge("zero_merge_ns")
            vma.pte[i] = KSM_ZERO_PTE
            self.sys.ksm_zero_pages += 1
            vma.mm.ksm_zero_pages += 1
            vma.mm.anon_rss -= 1
            put_mapping(page)
            return 0
        if page.cid != kpage.cid:
            return -1
        self.cpu.charge("merge_ns")
        vma.pte[i] = kpage  # replace_page(): MM_ANONPAGES unchanged
        kpage.mapcount += 1
        put_mapping(page)
        return 0

    def _try_to_merge_with_zero_page(self, item: RmapItem, page: Page) -> int:
        if self.knobs.use_zero_pages and item.oldchecksum == _checksum(0):
            vma = self._find_mergeable_vma(item)
            if vma is None:
                return 0
            err = self._try_to_merge_one_page(vma, item.addr, page, ZERO_PAGE, 0)
            if self.trace is not None:
                self._trace_merge("ksm_merge_one_page", item, "zero", err)
            return err
        return -1

    def _try_to_merge_with_ksm_page(
        self, item: RmapItem, page: Page, kpage: Page | None, extra: int = 0
    ) -> int:
        vma = self._find_mergeable_vma(item)
        err = -1
        if vma is not None:
            err = self._try_to_merge_one_page(vma, item.addr, page, kpage, extra)
            if not err:
                self._remove_rmap_item_from_tree(item)
        if self.trace is not None:
            # the pfn is kpage's if there is one, else the page's
            self._trace_merge("ksm_merge_with_ksm_page", item,
                              self.pages.get(kpage if kpage is not None else page), err,
                              ksm_page=kpage is not None)
        return err

    def _try_to_merge_two_pages(
        self, item: RmapItem, page: Page, titem: RmapItem, tpage: Page
    ) -> Page | None:
        # ksmd holds a reference on tpage too: if it is in page's THP, the split fails
        extra = 1 if page.folio is not None and page.folio is tpage.folio else 0
        err = self._try_to_merge_with_ksm_page(item, page, None, extra)
        if not err:
            err = self._try_to_merge_with_ksm_page(titem, tpage, page)
            if err:
                self._break_cow(item)
        return None if err else page

    def _break_cow(self, item: RmapItem) -> None:
        vma = self._find_mergeable_vma(item)
        if vma is not None:
            self.break_ksm(vma, item.addr - vma.start)
            self.cpu.charge("break_cow_ns")

    def break_ksm(self, vma: Vma, i: int) -> None:
        """break_ksm(): unshare a KSM page or a KSM zero PTE at page ``i``."""
        pte = vma.pte[i]
        if isinstance(pte, Page):
            if pte.ksm:
                vma.pte[i] = Page(pte.cid)
                put_mapping(pte)
        elif pte is KSM_ZERO_PTE:
            self.sys.zap_ksm_zero(vma.mm)
            vma.pte[i] = Page(0)
            vma.mm.anon_rss += 1

    # ---- stable tree ---------------------------------------------------
    def _is_candidate(self, node: StableNode, offset: int = 0) -> bool:
        n = len(node.hlist)
        return n > 0 and n + offset < self.knobs.max_page_sharing

    def _stable_node_dup(
        self, chain: StableNode, prune: bool
    ) -> tuple[Page | None, StableNode | None, StableNode]:
        """stable_node_dup(): pick a dup of a chain; may collapse or free it."""
        interval = self.knobs.stable_node_chains_prune_millisecs / 1000.0
        if not prune or self.now < chain.prune_time + interval:
            prune = False
        else:
            chain.prune_time = self.now
        found: StableNode | None = None
        found_len = 0
        tree_page: Page | None = None
        visited = 0
        for dup in list(chain.dups):
            visited += 1
            kp = self._ksm_get_folio(dup)
            if kp is None:
                continue
            if found is None or (
                self._is_candidate(dup)
                and (not self._is_candidate(found) or len(dup.hlist) > found_len)
            ):
                found, found_len, tree_page = dup, len(dup.hlist), kp
                if not prune and self._is_candidate(found):
                    break
        self.cpu.charge("dup_visit_ns", visited)
        if found is None:
            rb_erase(self.stable, chain)  # free_stable_node_chain()
            chain.dead = True
            self.stable_node_chains -= 1
            return None, None, chain
        if len(chain.dups) == 1:
            # a single dup left: the chain collapses back into a plain node
            rb_replace_node(self.stable, chain, found)
            found.chain = None
            chain.dups.clear()
            chain.dead = True
            self.stable_node_chains -= 1
            self.stable_node_dups -= 1
            return tree_page, found, found
        if chain.dups[0] is not found and self._is_candidate(found, 1):
            chain.dups.remove(found)
            chain.dups.insert(0, found)
        return tree_page, found, chain

    def _chain(
        self, node: StableNode, prune: bool
    ) -> tuple[Page | None, StableNode | None, StableNode]:
        if not node.is_chain:
            return self._ksm_get_folio(node), node, node
        return self._stable_node_dup(node, prune)

    def _stable_tree_search(self, page: Page) -> Page | None:
        if page.ksm and page.stable_node is not None:
            return page  # already a KSM page
        levels = 0
        try:
            while True:  # "goto again" restarts
                n = self.stable.node
                restart = False
                while n is not None:
                    levels += 1
                    assert isinstance(n, StableNode)
                    kp, dup, cur = self._chain(n, prune=True)
                    if kp is None or dup is None:
                        restart = True
                        break
                    if page.cid < kp.cid:
                        n = cur.rb_left
                    elif page.cid > kp.cid:
                        n = cur.rb_right
                    else:
                        if not self._is_candidate(dup):
                            return None  # every dup is full: make a new KSM page
                        kp2 = self._ksm_get_folio(dup)
                        if kp2 is None:
                            restart = True
                            break
                        return kp2
                if not restart:
                    return None
        finally:
            self.cpu.charge("stable_level_ns", levels)

    def _stable_tree_insert(self, kpage: Page) -> StableNode:
        levels = 0
        while True:
            parent: StableNode | None = None
            left = False
            n = self.stable.node
            match: StableNode | None = None
            restart = False
            while n is not None:
                levels += 1
                assert isinstance(n, StableNode)
                kp, _dup, cur = self._chain(n, prune=False)
                if kp is None:
                    restart = True
                    break
                parent = cur
                if kpage.cid < kp.cid:
                    n, left = cur.rb_left, True
                elif kpage.cid > kp.cid:
                    n, left = cur.rb_right, False
                else:
                    match = cur
                    break
            if not restart:
                break
        self.cpu.charge("stable_level_ns", levels)
        new = StableNode(kpage)
        if match is None:
            rb_link_node(self.stable, new, parent, left)
            rb_insert_color(self.stable, new)
        else:
            chain = match
            if not match.is_chain:
                # alloc_stable_node_chain(): the old node becomes the first dup
                chain = StableNode(None, is_chain=True)
                chain.prune_time = self.now
                rb_replace_node(self.stable, match, chain)
                self.stable_node_chains += 1
                self._chain_add_dup(match, chain)
            self._chain_add_dup(new, chain)
        kpage.stable_node = new
        return new

    def _chain_add_dup(self, dup: StableNode, chain: StableNode) -> None:
        dup.chain = chain
        chain.dups.insert(0, dup)
        self.stable_node_dups += 1

    def _stable_tree_append(self, item: RmapItem, node: StableNode, bypass: bool) -> None:
        del bypass  # only silences a WARN in the kernel
        node.hlist[item] = None
        item.head = node
        item.flags = STABLE_FLAG
        if len(node.hlist) > 1:
            self.pages_sharing += 1
        else:
            self.pages_shared += 1
        item.mm.ksm_merging_pages += 1

    # ---- unstable tree -------------------------------------------------
    def _get_mergeable_page(self, item: RmapItem) -> Page | None:
        vma = self._find_mergeable_vma(item)
        if vma is None:
            return None
        pte = vma.pte[item.addr - vma.start]
        # folio_walk_start(flags=0): the zero page and none PTEs yield nothing
        return pte if isinstance(pte, Page) else None

    def _unstable_tree_search_insert(
        self, item: RmapItem, page: Page
    ) -> tuple[RmapItem, Page] | None:
        levels = 0
        try:
            while True:
                parent: RmapItem | None = None
                left = False
                n = self.unstable.node
                restart = False
                while n is not None:
                    assert isinstance(n, RmapItem)
                    levels += 1
                    tpage = self._get_mergeable_page(n)
                    if tpage is None:
                        if self.sys.policy.ksm_skip_zeropage and isinstance(
                            n.vma.pte[n.addr - n.vma.start], ZeroPte
                        ):
                            # ksm-skip-zeropage rule (2): already merged, drop the node
                            self._remove_rmap_item_from_tree(n)
                            restart = True
                            break
                        return None  # stale node: no match, not inserted
                    if tpage is page:
                        return None
                    parent = n
                    if page.cid < tpage.cid:
                        n, left = n.rb_left, True
                    elif page.cid > tpage.cid:
                        n, left = n.rb_right, False
                    else:
                        self.cpu.charge("memcmp_equal_ns")
                        return n, tpage
                if restart:
                    continue
                item.flags = UNSTABLE_FLAG
                item.seqnr = self.seqnr & SEQNR_MASK
                rb_link_node(self.unstable, item, parent, left)
                rb_insert_color(self.unstable, item)
                self.pages_unshared += 1
                return None
        finally:
            self.cpu.charge("unstable_level_ns", levels)

    # ---- run=2 -----------------------------------------------------------
    def unmerge_all(self) -> None:
        """unmerge_and_remove_all_rmap_items(): break every KSM mapping, free
        every rmap item, drop the stable tree; full_scans (seqnr) := 0."""
        for mm in self.slots:
            for vma in mm.vmas:
                if not vma.mergeable or not vma.anon_vma:
                    continue
                for i in range(vma.npages):
                    self.break_ksm(vma, i)
            self.cur_prev = None
            self._remove_trailing_rmap_items(mm)
        # remove_all_stable_nodes(): every KSM page is gone now, nodes are stale
        for node in list(self.stable):
            assert isinstance(node, StableNode)
            if node.is_chain:
                for dup in list(node.dups):
                    self._ksm_get_folio(dup)
                if not node.dead:
                    rb_erase(self.stable, node)
                    node.dead = True
                    self.stable_node_chains -= 1
            else:
                self._ksm_get_folio(node)
        self.stable.reset()
        self.unstable.reset()
        self.cur_slot = None
        self.cur_addr = 0
        self.cur_prev = None
        self.seqnr = 0
