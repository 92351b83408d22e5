"""Captured memory as a workload (issue 12): an image runs in the model exactly as
the scenario whose memory it holds, and bad images are refused in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from ksmlab import content
from ksmlab import image as img
from ksmlab.model import run
from ksmlab.model.fast import unsupported
from ksmlab.model.run import memory_estimate, simulate
from ksmlab.scenario import HPAGE_PMD_NR, Scenario, ScenarioError, load, parse
from tests.test_model_fast import assert_same


def _image_of(sc: Scenario, folder: Path, start: int = 0x7F0000000000) -> None:
    """The image a capture of ``sc``'s filled workload would give: one VMA per region,
    in address order, every page present, THPs where the region has them."""
    procs, cids, flags = [], [], []
    refs = list(content.layout(sc))
    all_ids = np.concatenate([content.region_ids(sc, r) for r in refs])
    ranks = {int(v): k for k, v in enumerate(np.unique(all_ids[all_ids != 0]), start=1)}
    for inst, (pi, k, _) in enumerate(sc.instances()):
        vmas, c, f = [], [], []
        first = 0
        mine = [r for r in refs if (r.process, r.replica) == (pi, k)]
        for r in mine:
            ids = content.region_ids(sc, r)
            vmas.append(img.ImageVma(start=start + first * 4096, pages=r.spec.pages,
                                     first=first, hugepage=r.spec.thp == "hugepage",
                                     nohugepage=r.spec.thp == "nohugepage"))
            c.append(np.array([ranks.get(int(x), 0) for x in ids], dtype=np.uint32))
            fl = np.full(r.spec.pages, img.PRESENT, dtype=np.uint8)
            if r.spec.thp == "hugepage" and sc.thp.enabled != "never":
                fl |= img.THP
            f.append(fl)
            first += r.spec.pages + HPAGE_PMD_NR  # a hole between them, as mmap leaves
        procs.append(img.ImageProcess(pid=100 + inst, comm="w", vmas=vmas))
        cids.append(np.concatenate(c))
        flags.append(np.concatenate(f))
    img.save(folder, img.ImageMeta(captured="now", kernel="test", contents=len(ranks),
                                   processes=procs), cids, flags)


COUNTERS = ("pages_scanned", "pages_sharing", "pages_shared", "pages_unshared",
            "ksm_zero_pages", "thp_split_page", "RssAnon", "AnonHugePages",
            "ksm_rmap_items", "ksm_merging_pages", "full_scans")


@pytest.mark.parametrize("name", ["seed-uzp1", "seed-uzp0", "thp-z50-unique",
                                  "two-procs-dup", "pressure-409"])
def test_an_image_runs_as_the_scenario_it_holds(name: str, tmp_path: Path) -> None:
    sc = load(name).with_duration(8.0)
    as_image = _as_image(sc, tmp_path / "im")
    a = simulate(sc, "mainline", engine="exact")
    b = simulate(as_image, "mainline")
    assert b.meta["scenario"]["process"][0]["image"] == str(tmp_path / "im")
    for c in COUNTERS:
        assert np.array_equal(a.since_start(c), b.since_start(c)), c


def _as_image(sc: Scenario, folder: Path) -> Scenario:
    _image_of(sc, folder)
    return Scenario.model_validate({
        **sc.model_dump(exclude={"process"}),
        "process": [{"name": p.name, "image": str(folder), "image_process": i}
                    for i, (_, _, p) in enumerate(sc.instances())]})


def _one_vma(folder: Path, offset: int) -> Scenario:
    """412 present pages with repeating contents, then 1124 never touched, in a
    MADV_HUGEPAGE VMA ``offset`` pages into a 2 MiB range."""
    pages = 3 * HPAGE_PMD_NR
    cid = np.zeros(pages, dtype=np.uint32)
    cid[:412] = np.arange(412) % 7 + 1
    flags = np.zeros(pages, dtype=np.uint8)
    flags[:412] = img.PRESENT
    vma = img.ImageVma(start=(1 << 40) + offset * 4096, pages=pages, first=0, hugepage=True)
    proc = img.ImageProcess(pid=1, comm="h", vmas=[vma])
    img.save(folder, img.ImageMeta(captured="now", kernel="test", contents=7,
                                   processes=[proc]), [cid], [flags])
    return Scenario.model_validate({
        "name": "vma", "duration": 12.0, "thp": {"khugepaged": {"scan_sleep_millisecs": 1000}},
        "process": [{"image": str(folder)}]})


def test_an_unaligned_vma_is_scanned_but_not_collapsed_where_not_whole(tmp_path: Path
                                                                      ) -> None:
    """A VMA 100 pages into a 2 MiB range (a heap, say): only the 2 MiB ranges whole
    inside it are khugepaged's (hstart/hend in khugepaged_scan_mm_slot()); KSM scans
    its present pages wherever they are."""
    aligned = simulate(_one_vma(tmp_path / "a", 0), "mainline")
    assert aligned.since_start("thp_collapse_alloc")[-1] > 0  # 412 present, 100 none
    moved = simulate(_one_vma(tmp_path / "u", 100), "mainline")
    assert moved.since_start("thp_collapse_alloc")[-1] == 0  # pages 100..511: not whole
    for tr in (aligned, moved):
        assert tr.since_start("pages_scanned")[-1] > 0 and tr["pages_sharing"][-1] > 0


def test_bad_images_are_one_line(tmp_path: Path) -> None:
    def toml(image: str, extra: str = "") -> str:
        return (f'name = "x"\nduration = 5\n[[process]]\nimage = "{image}"\n{extra}')

    with pytest.raises(ScenarioError, match="not a memory image"):
        parse(toml("nowhere"), "x.toml", tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "image.json").write_text("{}")
    with pytest.raises(ScenarioError, match=r"image\.json"):
        parse(toml("bad"), "x.toml", tmp_path)
    sc = load("seed-uzp1")
    _image_of(sc, tmp_path / "im")
    with pytest.raises(ScenarioError, match="image_process 3"):
        parse(toml("im", "image_process = 3\n"), "x.toml", tmp_path)
    with pytest.raises(ScenarioError, match="regions or an image"):
        parse(toml("im", "[[process.region]]\nsize_mib = 2\n"), "x.toml", tmp_path)
    # relative to the scenario file's folder
    assert parse(toml("im"), "x.toml", tmp_path).process[0].image == str(tmp_path / "im")


# ---- the fast engine runs images as the exact one does ----------------------------

IMAGE_POLICIES = ["mainline", "pre-6.12", "ksm-skip-huge"]


@pytest.mark.parametrize("name", ["seed-uzp1", "two-procs-dup", "pressure-409",
                                  "khugepaged-recollapse", "three-procs-uzp1"])
@pytest.mark.parametrize("policy", IMAGE_POLICIES)
def test_fast_engine_runs_images_of_builtins_exactly(name: str, policy: str,
                                                     tmp_path: Path) -> None:
    sc = _as_image(load(name).with_duration(8.0), tmp_path / "im")
    assert unsupported(sc) is None
    assert_same(simulate(sc, policy, engine="exact"), simulate(sc, policy, engine="fast"))


def _mixed_image(folder: Path, offset: int, thp: str, khd_pages: int = 4096,
                 both: bool = True) -> Scenario:
    """Two captured processes: unaligned VMAs (``offset`` pages into a 2 MiB range)
    with present, absent and zero-page-PTE pages, THPs in whole ranges only, THPs in
    VMAs where THP is no longer allowed; the first one run twice; with events."""
    rng = np.random.default_rng(offset)
    P = HPAGE_PMD_NR
    Pages = tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint8]]

    def pages(n: int, thps: tuple[int, ...]) -> Pages:
        # data, zero-filled, absent (pte_none), zero-page PTE (a read fault)
        kind = rng.choice(4, size=n, p=[0.5, 0.2, 0.2, 0.1])
        cid = np.where(kind == 0, rng.integers(1, 60, size=n), 0).astype(np.uint32)
        rare = (kind == 0) & (rng.random(n) < 0.3)
        cid[rare] = rng.integers(60, 1000, size=int(rare.sum()))  # mostly unique
        flags = np.where(kind < 2, img.PRESENT, np.where(kind == 3, img.ZERO_PTE, 0))
        flags = flags.astype(np.uint8)
        for t in thps:  # page offsets (in the VMA) of whole THPs: 90 % zero, underused
            cid[t : t + P] = np.where(rng.random(P) < 0.9, 0, rng.integers(1, 60, size=P))
            flags[t : t + P] = img.PRESENT | img.THP
        return cid, flags

    def proc(pid: int, specs: list[tuple[int, int, tuple[int, ...], dict[str, bool]]]
             ) -> tuple[img.ImageProcess, npt.NDArray[Any], npt.NDArray[Any]]:
        vmas: list[img.ImageVma] = []
        cids, flags = [], []
        first = 0
        for k, (off, n, thps, madv) in enumerate(specs):
            start = (1 << 40) + k * (8 << 20) + off * 4096
            c, f = pages(n, thps)
            vmas.append(img.ImageVma(start=start, pages=n, first=first, **madv))
            cids.append(c)
            flags.append(f)
            first += n
        return (img.ImageProcess(pid=pid, comm="m", vmas=vmas), np.concatenate(cids),
                np.concatenate(flags))

    whole = -(-offset // P) * P - offset  # first whole 2 MiB range in an offset VMA
    p0 = proc(1, [(offset, 3 * P + 37, (whole,), {"hugepage": True}),
                  (0, 2 * P, (0, P), {}),
                  (offset + 5, 200, (), {"nohugepage": True})])
    p1 = proc(2, [(offset, 300, (), {}), (0, P, (0,), {})])
    img.save(folder, img.ImageMeta(captured="now", kernel="test", contents=1000,
                                   processes=[p0[0], p1[0]]), [p0[1], p1[1]], [p0[2], p1[2]])
    return Scenario.model_validate({
        "name": "mixed-image", "duration": 4.0, "sample_interval": 0.1,
        "ksm": {"pages_to_scan": 200, "sleep_millisecs": 10, "max_page_sharing": 3},
        "thp": {"enabled": thp, "shrink_underused": 1,
                "khugepaged": {"max_ptes_none": 409, "scan_sleep_millisecs": 500,
                               "pages_to_scan": khd_pages}},
        "process": [{"image": str(folder), "count": 2},
                    {"image": str(folder), "image_process": 1, "merge": "prctl"}][
                        0 if both else 1:],
        "event": [{"action": "pressure", "at": 0.7},
                  {"action": "set", "at": 1.2, "knob": "ksm.use_zero_pages", "value": 1},
                  {"action": "set", "at": 1.4, "knob": "thp.khugepaged.max_ptes_none",
                   "value": 511},
                  {"action": "ksm_unmerge", "at": 2.0}, {"action": "ksm_start", "at": 2.4},
                  {"action": "pressure", "at": 3.0}]})


# khugepaged's pages_to_scan 1027: one unit of progress (a VMA skipped: no whole 2 MiB
# range in it, THP not allowed) moves where a pass stops; the second process alone:
# khugepaged knows its mm only through its THPs (madvise, no MADV_HUGEPAGE VMA)
@pytest.mark.parametrize(("offset", "thp", "khd_pages", "both"), [
    (0, "always", 1027, True), (100, "madvise", 1027, True), (300, "never", 4096, True),
    (100, "madvise", 4096, False)])
@pytest.mark.parametrize("policy", IMAGE_POLICIES)
def test_fast_engine_runs_unaligned_images_exactly(offset: int, thp: str, khd_pages: int,
                                                   both: bool, policy: str,
                                                   tmp_path: Path) -> None:
    sc = _mixed_image(tmp_path / "im", offset, thp, khd_pages, both)
    assert_same(simulate(sc, policy, engine="exact"), simulate(sc, policy, engine="fast"))


@pytest.mark.parametrize("offset", [0, 100])
@pytest.mark.parametrize("policy", ["mainline", "pre-6.12"])
def test_fast_engine_runs_one_vma_exactly(offset: int, policy: str, tmp_path: Path) -> None:
    sc = _one_vma(tmp_path / "im", offset)
    assert_same(simulate(sc, policy, engine="exact"), simulate(sc, policy, engine="fast"))


def test_auto_runs_images_on_the_fast_engine(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    sc = _as_image(load("seed-uzp1").with_duration(2.0), tmp_path / "im")
    assert unsupported(sc) is None
    assert memory_estimate(sc)[1] == "fast"

    def exact(*a: object, **k: object) -> None:
        raise AssertionError("the exact engine ran")

    monkeypatch.setattr(run, "Simulation", exact)
    assert simulate(sc, "mainline").since_start("pages_scanned")[-1] > 0


SMAPS = """\
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
Rss:                4096 kB
VmFlags: rd wr mr mw me ac mg hg
7f1000000000-7f1040000000 rw-s 00000000 00:01 7                  /memfd:guest-ram (deleted)
Rss:             1048576 kB
VmFlags: rd wr sh mr mw me ms sd
7f2000000000-7f2000001000 r--s 00000000 08:01 99                 /usr/share/x.cache
Rss:                   4 kB
VmFlags: rd mr me ms sd
"""


def _proc(root: Path, pid: int, smaps: str) -> None:
    d = root / "proc" / str(pid)
    d.mkdir(parents=True)
    (d / "smaps").write_text(smaps)
    (d / "pagemap").write_bytes(bytes(8))
    (root / "proc" / "kpageflags").write_bytes(bytes(8))


def test_capture_says_which_shared_mappings_it_leaves_out(tmp_path: Path) -> None:
    """MAP_SHARED memory (a guest's memfd RAM) is never VM_MERGEABLE
    (vma_ksm_compatible()): the capture says so, and an error names it when that was
    all the process had."""
    from ksmlab.live.capture import Capture, CaptureError
    from ksmlab.live.kernelfs import KernelFS

    _proc(tmp_path, 41, SMAPS)
    cap = Capture(KernelFS(tmp_path))
    assert [v.start for v in cap._check(41)] == [0x7F0000000000]
    [note] = cap.notes
    assert note.startswith("process 41: 2 MAP_SHARED mappings skipped (1024.0 MiB mapped, "
                           "1024.0 MiB resident; the largest 1024.0 MiB at 0x7f1000000000 "
                           "/memfd:guest-ram (deleted))")
    assert "KSM merges only private anonymous memory" in note
    only_shared = "\n".join(SMAPS.splitlines()[3:]) + "\n"
    _proc(tmp_path, 42, only_shared)
    with pytest.raises(CaptureError, match=r"nothing mergeable .*; process 42: 2 MAP_SHARED"):
        Capture(KernelFS(tmp_path))._check(42)
    _proc(tmp_path, 43, "\n".join(SMAPS.splitlines()[:3]) + "\n")
    cap = Capture(KernelFS(tmp_path))
    cap._check(43)
    assert cap.notes == []
