"""Captured memory as a workload (issue 12): an image runs in the model exactly as
the scenario whose memory it holds, and bad images are refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ksmlab import content
from ksmlab import image as img
from ksmlab.model.run import simulate
from ksmlab.scenario import HPAGE_PMD_NR, Scenario, ScenarioError, load, parse


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
    _image_of(sc, tmp_path / "im")
    as_image = Scenario.model_validate({
        **sc.model_dump(exclude={"process"}),
        "process": [{"name": p.name, "image": str(tmp_path / "im"), "image_process": i}
                    for i, (_, _, p) in enumerate(sc.instances())]})
    a = simulate(sc, "mainline", engine="exact")
    b = simulate(as_image, "mainline")
    assert b.meta["scenario"]["process"][0]["image"] == str(tmp_path / "im")
    for c in COUNTERS:
        assert np.array_equal(a.since_start(c), b.since_start(c)), c


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
