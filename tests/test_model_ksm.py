"""ksmd mechanisms on small hand-built cases; expected counters are worked
out by hand in each test from mm/ksm.c's update points."""

from __future__ import annotations

from ksmlab.model.ksm import RmapItem
from ksmlab.model.memory import KSM_ZERO_PTE, ZERO_PTE, Page
from ksmlab.model.thp import write_fault
from tests.model_helpers import unique, world

THP = 512


def test_first_scan_only_records_checksums() -> None:
    w = world([0] * THP, use_zero_pages=1)
    w.full_scan()
    assert w.c("full_scans") == 1
    assert w.c("pages_scanned") == THP
    assert w.c("ksm_zero_pages") == 0 and w.sys.vmstat["thp_split_page"] == 0
    assert w.c("pages_volatile") == THP  # items in no tree
    assert w.mm.ksm_rmap_items == THP


def test_uzp1_one_budgeted_page_frees_a_whole_thp() -> None:
    # mainline: zero merge -> split -> all 512 zero subpages remapped (clean) ->
    # write_protect_page() misses -> the orphan is inserted as a stale node
    w = world([0] * (2 * THP), use_zero_pages=1)
    w.full_scan()
    w.full_scan()
    assert w.sys.vmstat["thp_split_page"] == 2
    assert w.sys.vmstat["thp_split_pmd"] == 2
    assert w.c("pages_scanned") == 2 * THP + 2  # one budgeted page per THP
    assert w.rss_pages == 0
    assert w.c("ksm_zero_pages") == 0 and w.c("pages_sharing") == 0
    assert w.c("general_profit") < 0
    assert w.c("pages_unshared") == 1  # the first orphan; the second met it and stopped
    assert all(p is ZERO_PTE for p in w.vma.pte)


def test_stale_zero_node_blocks_the_rest_of_the_scan() -> None:
    # use_zero_pages=0, two all-zero THPs.  Scan 2: sp0 of THP0 inserted; sp1 is
    # its same-THP match -> split fails (ksmd's two refs), retry split succeeds,
    # both remapped -> the root of the unstable tree maps the zero page; every
    # zero page of THP1 meets it and is neither merged nor inserted.
    w = world([0] * (2 * THP))
    w.full_scan()
    w.full_scan()
    vm = w.sys.vmstat
    assert (vm["thp_split_page"], vm["thp_split_page_failed"]) == (1, 1)
    assert w.c("pages_scanned") == 2 * THP + 2 + (THP)  # THP0: 2 pages, THP1: all
    assert w.c("pages_unshared") == 1
    root = w.ksm.unstable.node
    assert isinstance(root, RmapItem) and root.rb_left is None and root.rb_right is None
    assert w.vma.pte[root.addr - w.vma.start] is ZERO_PTE
    assert w.rss_pages == THP
    # scan 3: the old node's item dies lazily (pages_unshared -1), THP1's pair splits
    w.full_scan()
    assert (vm["thp_split_page"], vm["thp_split_page_failed"]) == (2, 2)
    assert w.rss_pages == 0
    assert w.c("pages_unshared") == 1 and w.c("pages_sharing") == 0


def test_tree_shape_decides_who_is_blocked() -> None:
    # unstable tree built from contents 5, 3, 8 (root 5); then 3's page becomes a
    # zero PTE.  A search for 1 walks 5 -> 3 and aborts; one for 9 walks 5 -> 8
    # and is inserted.
    w = world([0] * THP, thp=False)
    ksm = w.ksm
    items = []
    for i, cid in enumerate([5, 3, 8, 1, 9]):
        page = w.vma.pte[i]
        assert isinstance(page, Page)
        page.cid = cid
        items.append(RmapItem(w.mm, w.vma, w.vma.start + i))
    for it, page_i in zip(items[:3], range(3), strict=True):
        p = w.vma.pte[page_i]
        assert isinstance(p, Page)
        assert ksm._unstable_tree_search_insert(it, p) is None
    assert ksm.pages_unshared == 3
    w.vma.pte[1] = ZERO_PTE  # as a split remap would
    p1, p9 = w.vma.pte[3], w.vma.pte[4]
    assert isinstance(p1, Page) and isinstance(p9, Page)
    assert ksm._unstable_tree_search_insert(items[3], p1) is None
    assert items[3].flags == 0 and ksm.pages_unshared == 3  # blocked, not inserted
    assert ksm._unstable_tree_search_insert(items[4], p9) is None
    assert items[4].flags != 0 and ksm.pages_unshared == 4  # inserted right of 8


def test_same_thp_pair_merges_one_full_scan_later() -> None:
    # two subpages of one THP share content 7; the rest is unique
    ids = unique(THP)
    ids[10] = ids[20] = 7
    w = world(ids, policy="pre-6.12")
    w.full_scan()
    w.full_scan()
    vm = w.sys.vmstat
    assert (vm["thp_split_page"], vm["thp_split_page_failed"]) == (1, 1)
    assert w.c("pages_shared") == 0 and w.c("pages_sharing") == 0
    w.full_scan()
    assert w.c("pages_shared") == 1 and w.c("pages_sharing") == 1
    assert w.mm.ksm_merging_pages == 2
    assert w.rss_pages == THP  # an ordinary KSM merge leaves MM_ANONPAGES alone
    assert w.c("general_profit") == 1 * 4096 - THP * 64  # sharing x 4 KiB - items


def test_smart_scan_ages() -> None:
    # never-merging pages are processed at ages 0,1,2,3,5,8,13,22,31
    w = world(unique(THP), thp=False)
    processed = []
    for visit in range(36):
        before = w.c("pages_scanned")
        w.full_scan()
        if w.c("pages_scanned") - before == THP:
            processed.append(visit)
        else:
            assert w.c("pages_scanned") == before
    assert processed == [0, 1, 2, 3, 5, 8, 13, 22, 31]
    assert w.c("pages_skipped") == THP * (36 - 9)


def test_lazy_decrements_after_cow() -> None:
    w = world([7] * THP, thp=False, max_page_sharing=1000)
    w.full_scan()
    w.full_scan()
    assert (w.c("pages_shared"), w.c("pages_sharing")) == (1, THP - 1)
    assert w.mm.ksm_merging_pages == THP
    write_fault(w.sys, w.vma, 5, 1234)  # COW of a KSM page
    assert (w.c("pages_shared"), w.c("pages_sharing")) == (1, THP - 1)  # lazy
    assert w.mm.ksm_merging_pages == THP
    assert w.rss_pages == THP
    w.full_scan()  # ksmd revisits the address: stable item unlinked
    assert (w.c("pages_shared"), w.c("pages_sharing")) == (1, THP - 2)
    assert w.mm.ksm_merging_pages == THP - 1


def test_ksm_zero_pages_are_eager() -> None:
    w = world([0] * THP, thp=False, use_zero_pages=1)
    w.full_scan()
    w.full_scan()
    assert w.c("ksm_zero_pages") == THP and w.mm.ksm_zero_pages == THP
    assert w.rss_pages == 0 and all(p is KSM_ZERO_PTE for p in w.vma.pte)
    # the items of zero-merged addresses die when the cursor next passes them
    assert w.c("general_profit") == THP * 4096 - THP * 64
    w.full_scan()
    assert w.c("general_profit") == THP * 4096 and w.mm.ksm_rmap_items == 0
    write_fault(w.sys, w.vma, 3, 99)
    assert w.c("ksm_zero_pages") == THP - 1 and w.rss_pages == 1


def test_run2_unmerges_and_resets() -> None:
    w = world([7] * 256 + [0] * 256, thp=False, use_zero_pages=1)
    w.full_scan()
    w.full_scan()
    assert w.c("pages_shared") == 1 and w.c("pages_sharing") == 255
    assert w.c("ksm_zero_pages") == 256 and w.rss_pages == 256
    w.ksm.unmerge_all()
    for k in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
              "ksm_zero_pages", "full_scans", "stable_node_chains", "stable_node_dups"):
        assert w.c(k) == 0, k
    assert w.mm.ksm_rmap_items == 0 and w.mm.ksm_merging_pages == 0
    assert w.rss_pages == THP  # every KSM mapping and KSM zero PTE unshared
    assert w.ksm.stable.node is None


def test_run2_does_not_restore_split_remapped_zero_ptes() -> None:
    w = world([0] * THP, use_zero_pages=1)
    w.full_scan()
    w.full_scan()
    assert w.rss_pages == 0
    w.ksm.unmerge_all()
    assert w.rss_pages == 0 and w.c("full_scans") == 0


def test_stable_chains_with_small_max_page_sharing() -> None:
    # 10 pages of content 7, max_page_sharing=3 (a dup takes 3 mappings):
    # p0+p1 -> A, p2 -> A; p3 unstable, p4 -> B (chain: A, B), p5 -> B;
    # p6 unstable, p7 -> C, p8 -> C; p9 left in the unstable tree
    ids = [7] * 10 + unique(THP - 10)
    w = world(ids, thp=False, max_page_sharing=3)
    w.full_scan()
    w.full_scan()
    assert w.c("stable_node_chains") == 1
    assert w.c("stable_node_dups") == 3
    assert w.c("pages_shared") == 3
    assert w.c("pages_sharing") == 6
    # p9 plus every unique page
    assert w.c("pages_unshared") == 1 + (THP - 10)
    assert w.mm.ksm_merging_pages == 9


def test_ksmd_state_keeps_a_shared_key_instance_dict() -> None:
    # CPython (3.11+) shares an instance dict's keys between instances up to 30 keys;
    # past that, every self.<attr> load in ksmd's per-page loop loses its specialised
    # form: 31 attributes made the exact engine 8 % slower (benchmarks/model_speed.py,
    # exact_16GiB, identical call counts).  Put new state elsewhere (CpuMeter, Advisor).
    w = world(unique(1024))
    w.ksm.run = 1
    w.ksm.do_scan()  # (attributes a scan may add count too)
    assert len(vars(w.ksm)) <= 30, sorted(vars(w.ksm))
