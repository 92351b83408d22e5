"""The kernel lab without building a kernel: patches apply to the installed 6.12
point release (and to a moved one), the guest root filesystem assembles and its
Python imports ksmlab, the build cache logic, validation and the results index.
The full build-and-boot tests are marked ``kernel`` and run only with KSMLAB_KERNEL_TESTS=1.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ksmlab.kernel import build as kbuild
from ksmlab.kernel import rootfs, validate
from ksmlab.kernel.build import VARIANTS, KernelBuildError, Variant
from ksmlab.model import POLICIES

REQUIRE_LIVE = os.environ.get("KSMLAB_REQUIRE_LIVE") == "1"
PATCHED = [v for v in VARIANTS.values() if v.patch is not None]
ROOT = Path(__file__).resolve().parents[1]


def _unavailable(reason: str) -> None:
    if REQUIRE_LIVE:
        pytest.fail(f"{reason} (KSMLAB_REQUIRE_LIVE=1)")
    pytest.skip(reason)


def _touched(text: str) -> list[str]:
    return kbuild.touched_files(text)


@pytest.fixture(scope="module")
def source_612(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files the patches touch and the top Makefile (its version), extracted from
    whatever linux-source-6.12 is installed."""
    src = kbuild.SOURCES["6.12"]
    if not src.tarball.exists() and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", src.package],
                       capture_output=True, timeout=600)
    if not src.tarball.exists():
        _unavailable(f"{src.tarball} is missing and {src.package} could not be installed "
                     "(needs root and Debian's package registry)")
    files = sorted({f for v in PATCHED for f in _touched(v.patch_text())})
    out = tmp_path_factory.mktemp("linux")
    top = "linux-source-6.12"
    r = subprocess.run(["tar", "xJf", str(src.tarball), "-C", str(out), f"{top}/Makefile",
                        *[f"{top}/{f}" for f in files]], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out / top


@pytest.mark.slow
@pytest.mark.parametrize("variant", [v.name for v in PATCHED])
def test_patch_applies_to_the_installed_point_release(source_612: Path, variant: str) -> None:
    """Whatever 6.12.y Debian ships now: offsets are fine, fuzz and rejects are not."""
    check = kbuild.check_patch(source_612, VARIANTS[variant].patch_text())
    assert check.ok, (kbuild.tree_version(source_612), check.failed)
    assert "fuzz" not in check.output


def _shift(tree: Path, rel: str, lines: int) -> None:
    """Another point release, as far as a patch can tell: ``lines`` new lines at the
    top of ``rel`` (after its SPDX line), so every hunk below moves."""
    f = tree / rel
    head, rest = f.read_text().split("\n", 1)
    f.write_text(head + "\n" + "/* moved by a later point release */\n" * lines + rest)


@pytest.mark.slow
def test_a_moved_point_release_still_takes_every_patch(source_612: Path,
                                                       tmp_path: Path) -> None:
    """Lines added above the patched functions (as 6.12.117 -> 6.12.118 did) only
    move the hunks; the build names the new sublevel."""
    tree = tmp_path / "moved"
    shutil.copytree(source_612, tree)
    for rel in sorted({f for v in PATCHED for f in _touched(v.patch_text())}):
        _shift(tree, rel, 37)
    mk = tree / "Makefile"
    mk.write_text(re.sub(r"^SUBLEVEL = \d+", "SUBLEVEL = 999", mk.read_text(), flags=re.M))
    assert kbuild.tree_version(tree) == "6.12.999"
    for v in PATCHED:
        check = kbuild.check_patch(tree, v.patch_text())
        assert check.ok, (v.name, check.failed)
        assert check.moved and all("offset" in m for m in check.moved), v.name


@pytest.mark.slow
def test_a_changed_hunk_is_refused_in_one_line(source_612: Path, tmp_path: Path) -> None:
    """A point release that changed a patched line: no fuzz, and the error names the
    hunk and what to do."""
    tree = tmp_path / "changed"
    shutil.copytree(source_612, tree)
    v = VARIANTS["ksm-split-no-remap"]
    ksm_diff = v.patch_text().split("+++ b/mm/ksm.c", 1)[1].split("\ndiff --git", 1)[0]
    hunk = next(ln for ln in ksm_diff.splitlines()
                if ln.startswith(" ") and len(ln.strip()) > 12)
    f = tree / "mm" / "ksm.c"
    f.write_text(f.read_text().replace(hunk[1:], hunk[1:] + " /* changed */"))
    check = kbuild.check_patch(tree, v.patch_text())
    assert not check.ok and check.failed and check.failed[0].startswith("mm/ksm.c hunk #")
    msg = kbuild.does_not_apply(v, "6.12.999", check)
    assert "\n" not in msg
    assert "ksm-split-no-remap.patch does not apply to Linux 6.12.999" in msg
    assert "port the patch" in msg and f"written on ({v.written_on()})" in msg
    with pytest.raises(KernelBuildError, match=r"does not apply to Linux 6\.12\.999"):
        kbuild.set_patch(tree, v.patch_text(), print,
                         lambda c: kbuild.does_not_apply(v, "6.12.999", c))
    assert not (tree / ".ksmlab-applied.patch").exists()


def test_the_source_is_named_by_what_is_installed(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A replaced tarball (apt's next point release, or one put there by hand) gets a
    tree and an image key of its own; nothing pins a version."""
    tar = tmp_path / "linux-source-6.12.tar.xz"
    tar.write_bytes(b"one")
    monkeypatch.setattr(kbuild.Source, "tarball", property(lambda self: tar))
    monkeypatch.setattr(kbuild.Source, "package_version", lambda self: "6.12.118-1~deb12u1")
    src = kbuild.SOURCES["6.12"]
    v = Variant("v1", "v1", src, "v1")
    assert src.version() == "6.12.118" and src.tree_name().startswith("6.12.118-")
    first = (src.tree_name(), kbuild.build_key(v))
    tar.write_bytes(b"another point release")
    assert src.tree_name() != first[0] and kbuild.build_key(v) != first[1]
    monkeypatch.setattr(kbuild.Source, "package_version", lambda self: "6.12.119-1~deb12u1")
    assert src.tree_name().startswith("6.12.119-")


def test_tree_version_reads_the_makefile(tmp_path: Path) -> None:
    (tmp_path / "Makefile").write_text("# SPDX\nVERSION = 6\nPATCHLEVEL = 12\n"
                                       "SUBLEVEL = 118\nEXTRAVERSION =\n")
    assert kbuild.tree_version(tmp_path) == "6.12.118"
    (tmp_path / "Makefile").write_text("all:\n")
    with pytest.raises(KernelBuildError, match="does not name its version"):
        kbuild.tree_version(tmp_path)


@pytest.mark.parametrize("variant", [v.name for v in PATCHED])
def test_patch_header_names_its_policy_and_base(variant: str) -> None:
    v = VARIANTS[variant]
    head = v.patch_text().split("\n--- a/", 1)[0]
    assert f"policy `{v.policy}`" in head
    assert "Against: Linux 6.12.y (Debian linux-source-6.12)" in head
    assert v.written_on() is not None and v.written_on().startswith("6.12.")  # type: ignore[union-attr]
    assert v.policy in POLICIES


def test_every_kernel_changing_policy_has_a_variant() -> None:
    need = set(POLICIES) - {"mainline", "ksm-skip-zeropage", "ksm-huge-under-pressure"}
    assert need <= {v.policy for v in VARIANTS.values()}


# ---- the build cache ---------------------------------------------------------------

@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KSMLAB_KERNEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_variant(monkeypatch: pytest.MonkeyPatch) -> Iterator[Variant]:
    src = kbuild.SOURCES["6.12"]
    monkeypatch.setattr(kbuild.Source, "version", lambda self: "6.12.118")
    monkeypatch.setattr(kbuild.Source, "identity", lambda self: "6.12.118-1~deb12u1:1:1")
    yield Variant("v1", "v1", src, "v1")


def test_key_depends_on_patch_and_config(fake_variant: Variant, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    k1 = kbuild.build_key(fake_variant)
    assert k1 == kbuild.build_key(fake_variant)
    kdir = tmp_path / "kernel"
    shutil.copytree(kbuild.kernel_dir(), kdir)
    monkeypatch.setenv("KSMLAB_KERNEL_DIR", str(kdir))
    assert kbuild.build_key(fake_variant) == k1
    p = sorted((kdir / "patches" / "v1").glob("0002-*.patch"))[0]  # a series' 2nd patch
    p.write_text(p.read_text().replace("Nico Pache", "Nico  Pache", 1))
    k2 = kbuild.build_key(fake_variant)
    assert k2 != k1
    c = kdir / "config" / "ksmlab-guest.config"
    c.write_text(c.read_text() + "CONFIG_DEBUG_VM=y\n")
    assert kbuild.build_key(fake_variant) not in (k1, k2)


def test_cached_image_is_free(cache: Path, fake_variant: Variant,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    d = cache / "kernels" / kbuild.build_key(fake_variant)
    d.mkdir(parents=True)
    (d / "bzImage").write_bytes(b"x")
    (d / "meta.json").write_text(json.dumps({"release": "6.12.118-ksmlab-v1"}))
    monkeypatch.setitem(kbuild.VARIANTS, "v1", fake_variant)

    def no_build(*a: object, **k: object) -> None:
        raise AssertionError("must not touch a tree")

    monkeypatch.setattr(kbuild, "ensure_tree", no_build)
    b = kbuild.build("v1")
    assert b.cached and b.bzimage == d / "bzImage"
    # a half-published entry (no meta.json) is not an image
    (d / "meta.json").unlink()
    assert kbuild.cached_image(fake_variant) is None


def test_a_cover_letter_is_text_only() -> None:
    """A series' cover letter is neither applied nor part of the patch's hash."""
    v = VARIANTS["ksm-accounted-remap"]
    cover = v.cover_letter()
    assert cover is not None and cover not in v.patch_files()
    assert len(v.patch_files()) == 2 and "Subject: [PATCH 0/2]" in cover.read_text()
    assert "*** SUBJECT HERE ***" not in cover.read_text()
    assert "*** BLURB HERE ***" not in cover.read_text()
    assert cover.read_text() not in v.patch_text()


def _tree(tmp_path: Path) -> Path:
    t = tmp_path / "tree"
    (t / "mm").mkdir(parents=True)
    (t / "mm" / "a.c").write_text("one\ntwo\nthree\n")
    return t


def _diff(old: str, new: str) -> str:
    return (f"--- a/mm/a.c\n+++ b/mm/a.c\n@@ -1,3 +1,3 @@\n one\n-{old}\n+{new}\n three\n")


def test_set_patch_switches_and_reverses(tmp_path: Path) -> None:
    t = _tree(tmp_path)
    p1, p2 = _diff("two", "TWO"), _diff("two", "deux")
    kbuild.set_patch(t, p1, print)
    assert (t / "mm/a.c").read_text() == "one\nTWO\nthree\n"
    kbuild.set_patch(t, p2, print)  # reverses p1 first
    assert (t / "mm/a.c").read_text() == "one\ndeux\nthree\n"
    kbuild.set_patch(t, "", print)  # the unpatched variant
    assert (t / "mm/a.c").read_text() == "one\ntwo\nthree\n"
    assert not (t / ".ksmlab-applied.patch").exists()


def _mail(n: int, diff: str) -> str:
    return (f"From {'0' * 40} Mon Sep 17 00:00:00 2001\nFrom: ksmlab <k@example.invalid>\n"
            f"Subject: [PATCH {n}/2] mm: step {n}\n\nWhy.\n---\n{diff}-- \n2.39.5\n\n")


def test_a_series_goes_on_in_order_and_comes_off_backwards(tmp_path: Path) -> None:
    """The second patch of a series changes a line the first one made: each is
    checked, applied and reversed in turn (a dry run of both at once cannot)."""
    t = _tree(tmp_path)
    series = _mail(1, _diff("two", "TWO")) + _mail(2, _diff("TWO", "deux"))
    assert len(kbuild.split_series(series)) == 2
    assert kbuild.check_patch(t, series).ok
    assert not kbuild.check_patch(t, series, reverse=True).ok
    assert (t / "mm/a.c").read_text() == "one\ntwo\nthree\n"  # checks touch nothing
    kbuild.set_patch(t, series, print)
    assert (t / "mm/a.c").read_text() == "one\ndeux\nthree\n"
    assert kbuild.check_patch(t, series, reverse=True).ok
    kbuild.set_patch(t, _diff("two", "zwei"), print)  # the series comes off first
    assert (t / "mm/a.c").read_text() == "one\nzwei\nthree\n"
    bad = _mail(1, _diff("two", "TWO")) + _mail(2, _diff("three-ish", "x"))
    c = kbuild.check_patch(_tree(tmp_path / "b"), bad)
    assert not c.ok and c.failed == ["mm/a.c hunk #1 at line 1"]


def test_set_patch_after_an_interruption_before_applying(tmp_path: Path) -> None:
    t = _tree(tmp_path)
    (t / ".ksmlab-applied.patch").write_text(_diff("two", "TWO"))  # marker, not applied
    kbuild.set_patch(t, _diff("two", "deux"), print)
    assert (t / "mm/a.c").read_text() == "one\ndeux\nthree\n"


def test_set_patch_refuses_a_tree_in_an_unknown_state(tmp_path: Path) -> None:
    t = _tree(tmp_path)
    (t / ".ksmlab-applied.patch").write_text(_diff("zwei", "TWO"))
    with pytest.raises(KernelBuildError, match="neither"):
        kbuild.set_patch(t, _diff("two", "deux"), print)


def test_patch_that_does_not_apply_leaves_the_tree_alone(tmp_path: Path) -> None:
    t = _tree(tmp_path)
    with pytest.raises(KernelBuildError, match="does not apply"):
        kbuild.set_patch(t, _diff("zwei", "deux"), print)
    assert (t / "mm/a.c").read_text() == "one\ntwo\nthree\n"
    assert not (t / ".ksmlab-applied.patch").exists()


# ---- the guest root filesystem -------------------------------------------------------

def _rootfs_plan() -> rootfs.Plan:
    try:
        return rootfs.plan()
    except rootfs.RootfsError as e:
        _unavailable(str(e))
        raise


@pytest.mark.slow
def test_rootfs_stages_and_debian_python_imports_ksmlab(tmp_path: Path) -> None:
    p = _rootfs_plan()
    dsts = {d for _, d in p.files}
    assert {"bin/busybox", "usr/bin/python3.11"} <= dsts
    assert f"{rootfs.GUEST_SITE}/ksmlab/kernel/guest.py" in dsts
    assert not any("/matplotlib/" in d or "/llvmlite/" in d or "/scipy/" in d for d in dsts)
    # the guest unpacks the image into RAM (896 MiB, beside the workload)
    assert sum(src.stat().st_size for src, _ in p.files) < 200 << 20
    root = rootfs.stage(tmp_path / "root", p)
    site = root / rootfs.GUEST_SITE
    code = (f"import sys; sys.path.insert(0, {str(site)!r}); import numpy, pydantic, typer, "
            "rich; import ksmlab.kernel.guest, ksmlab.live.run; print(ksmlab.__file__)")
    r = subprocess.run([str(rootfs.PYTHON), "-S", "-c", code], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-500:]
    assert r.stdout.startswith(str(site))
    assert os.access(root / "init", os.X_OK)


@pytest.mark.slow
def test_rootfs_image_is_a_newc_cpio(cache: Path) -> None:
    _rootfs_plan()
    path, size = rootfs.ensure_rootfs()
    assert path.parent == cache / "rootfs" and size > 10 << 20
    with gzip.open(path) as f:
        head = f.read(6)
    assert head == b"070701"  # newc
    r = subprocess.run(f"zcat {path} | cpio -t --quiet", shell=True, capture_output=True,
                       text=True)
    names = set(r.stdout.split())
    assert {"init", "usr/bin/python3.11", "bin/busybox"} <= names
    assert rootfs.ensure_rootfs()[0] == path  # cached
    assert not tarfile.is_tarfile(path)


def test_guest_too_small_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    big.write_text('name = "big"\nduration = 5.0\n[[process]]\nmerge = "madvise"\n'
                   '[[process.region]]\nsize_mib = 4096\nthp = "hugepage"\n'
                   "content = { zero = 1.0 }\n")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86 is not installed")
    _rootfs_plan()
    r = subprocess.run([sys.executable, "-m", "ksmlab", "kernel", "run", str(big),
                        "--kernel", "6.12"], capture_output=True, text=True)
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("ksmlab: error")]
    assert len(errors) == 1 and "more than" in errors[0]  # (a journal warning may precede)


# ---- validation and the results index ------------------------------------------------

@pytest.fixture
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The package's shipped results, replaced by a file of the test's own."""
    path = tmp_path / "confirmed.json"
    monkeypatch.setattr(validate, "shipped_path", lambda: path)
    return path


def _result(variant: str, scenario: str, date: str, ok: bool = True,
            patch: str | None = "today") -> dict[str, object]:
    v = VARIANTS[variant]
    return {"variant": variant, "policy": v.policy, "scenario": scenario,
            "stands_for": validate.stands_for(scenario), "confirmed": ok, "date": date,
            "release": f"6.12.118-ksmlab-{variant}", "checkpoints": 6, "agreement": 1.0,
            "verdicts_kernel": [], "verdicts_model": [],
            "patch_sha256": kbuild.patch_sha256(v) if patch == "today" else patch}


@pytest.mark.slow
def test_model_trace_labelled_as_guest_validates_itself(cache: Path, shipped: Path) -> None:
    from ksmlab.kernel.qemu import resolve_scenario
    from ksmlab.model import simulate

    sc, _ = resolve_scenario("seed-uzp1-64m")
    tr = simulate(sc, "ksm-split-no-remap")
    variant = VARIANTS["ksm-split-no-remap"]
    tr.meta["guest"] = {"variant": variant.name, "policy": variant.policy,
                        "release": "model", "accelerator": "none", "source_version": "6.12.118",
                        "patch_sha256": kbuild.patch_sha256(variant)}
    v = validate.validate(tr)
    assert v.confirmed and v.agreement == 1.0 and len(v.checkpoints) > 3
    assert v.stands_for == "seed-uzp1" and v.source_version == "6.12.118"
    assert validate.confirmed("ksm-split-no-remap", "seed-uzp1") is None
    validate.record(v)
    c = validate.confirmed("ksm-split-no-remap", "seed-uzp1")
    assert c is not None and c.confirmed and not c.shipped
    assert validate.confirmed("ksm-split-no-remap", "seed-uzp1-64m") == c
    assert validate.confirmed("6.12", "seed-uzp1") is None
    # a policy that does not hold: the same trace under a different label
    tr.meta["guest"]["policy"] = "6.12"
    assert not validate.validate(tr).confirmed


def test_shipped_results_count_until_a_run_here_replaces_them(cache: Path,
                                                              shipped: Path) -> None:
    shipped.write_text(json.dumps({"format": validate.RESULTS_FORMAT, "recorded_on": "m",
                                   "results": {
        "v1|seed-uzp1-64m": _result("v1", "seed-uzp1-64m", "2026-12-08"),
        "rfc|seed-uzp1-64m": _result("rfc", "seed-uzp1-64m", "2026-12-08", patch="old"),
        "6.12|seed-uzp1-64m": _result("6.12", "seed-uzp1-64m", "2026-12-08", patch=None)}}))
    c = validate.confirmed("v1", "seed-uzp1")
    assert c is not None and c.confirmed and c.shipped
    assert validate.confirmed("rfc", "seed-uzp1") is None  # its patch has changed since
    c612 = validate.confirmed("6.12", "seed-uzp1")
    assert c612 is not None and c612.shipped  # unpatched: recorded with no patch
    # a run here wins over the shipped record, even an older one
    idx = validate.index_path()
    idx.parent.mkdir(parents=True)
    idx.write_text(json.dumps({"results": {
        "v1|seed-uzp1-64m": _result("v1", "seed-uzp1-64m", "2026-01-01", ok=False)}}))
    c = validate.confirmed("v1", "seed-uzp1")
    assert c is not None and not c.confirmed and not c.shipped
    rows = validate.read_results()
    assert rows["v1|seed-uzp1-64m"]["origin"] == "here"
    assert rows["rfc|seed-uzp1-64m"]["origin"] == "shipped"
    assert not validate.current(rows["rfc|seed-uzp1-64m"])


def test_results_export_ships_only_todays_patches(cache: Path, tmp_path: Path) -> None:
    idx = validate.index_path()
    idx.parent.mkdir(parents=True)
    idx.write_text(json.dumps({"results": {
        "v1|seed-uzp1-64m": {**_result("v1", "seed-uzp1-64m", "2026-12-08"), "trace": "/x"},
        "rfc|seed-uzp1-64m": _result("rfc", "seed-uzp1-64m", "2026-12-08", patch="old")}}))
    out = tmp_path / "ship.json"
    assert validate.export(out, "a test machine") == 1
    data = json.loads(out.read_text())
    assert data["recorded_on"] == "a test machine" and list(data["results"]) == [
        "v1|seed-uzp1-64m"]
    assert "trace" not in data["results"]["v1|seed-uzp1-64m"]  # a path on that machine


def test_the_shipped_record_covers_every_variant_on_both_seeds() -> None:
    """What ships is complete and current: every variant confirmed on both scaled seed
    scenarios with today's patch, on a point release it names.  A patch edited
    without re-running its validations fails here: `ksmlab kernel validate`, then
    `ksmlab kernel results --export src/ksmlab/kernel/data/confirmed.json`."""
    data = json.loads(validate.shipped_path().read_text())
    assert data["format"] == validate.RESULTS_FORMAT and data["recorded_on"]
    res = data["results"]
    for v in VARIANTS.values():
        for sc in ("seed-uzp1-64m", "seed-uzp0-64m"):
            r = res.get(f"{v.name}|{sc}")
            assert r is not None, f"no shipped result for {v.name} on {sc}"
            assert validate.current(r), f"{v.name} on {sc}: recorded with another patch"
            assert r["confirmed"] and r["agreement"] >= validate.AGREE_FRACTION, (v.name, sc)
            assert re.match(r"\d+\.\d+\.\d+-ksmlab-", r["release"]), r["release"]
            assert r["source_version"] and r["release"].startswith(r["source_version"])


# ---- build and boot (minutes) ------------------------------------------------------

@pytest.mark.kernel
@pytest.mark.parametrize("variant,scenario", [("6.12", "seed-uzp1-64m"),
                                              ("ksm-split-no-remap", "seed-uzp1-64m")])
def test_build_boot_and_confirm(variant: str, scenario: str) -> None:
    r = subprocess.run([sys.executable, "-m", "ksmlab", "kernel", "validate", scenario,
                        "--kernel", variant, "--json"], capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stderr[-800:]
    v = json.loads(r.stdout)
    assert v["confirmed"] and v["agreement"] >= 0.95
    assert v["accelerator"] == "tcg" and "ksmlab" in v["release"]


def test_the_kernel_lab_data_ships_in_the_package(tmp_path: Path) -> None:
    """Issue 17: installed with pip (no source tree beside it), the kernel lab finds its
    config fragments, patches and scaled scenarios (they failed through parents[3])."""
    tree = tmp_path / "tree"  # a copy: building writes build/ beside the sources
    shutil.copytree(ROOT / "src", tree / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, tree / f)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                        "-w", str(tmp_path), str(tree)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-800:]
    [wheel] = tmp_path.glob("ksmlab-*.whl")
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    data = kbuild.kernel_dir()
    assert data.is_relative_to(ROOT / "src" / "ksmlab")
    for f in data.rglob("*"):
        if f.is_file():
            assert f"ksmlab/kernel/data/{f.relative_to(data)}" in names, f


@pytest.mark.kernel
def test_an_installed_ksmlab_builds_and_validates(tmp_path: Path) -> None:
    """Issue 17: ``pip install`` of the wheel into a fresh venv, run from a folder with
    no source tree, builds 6.12 and confirms the model on seed-uzp1-64m."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "src", tree / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, tree / f)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    r = subprocess.run([sys.executable, "-m", "uv", "pip", "install", "-q", "--python",
                        str(venv / "bin" / "python"), f"{tree}[model]"],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-800:]
    shutil.rmtree(tree)  # nothing of the source is left to be found
    away = tmp_path / "elsewhere"
    away.mkdir()
    ksmlab = str(venv / "bin" / "ksmlab")
    for argv in (["kernel", "build", "6.12"],
                 ["kernel", "validate", "seed-uzp1-64m", "--kernel", "6.12", "--json"]):
        r = subprocess.run([ksmlab, *argv], cwd=away, capture_output=True, text=True,
                           timeout=3600)
        assert r.returncode == 0, (argv, r.stderr[-800:])
    v = json.loads(r.stdout)
    assert v["confirmed"] and v["accelerator"] == "tcg"


def test_an_unprivileged_user_caches_in_its_own_home(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.delenv("KSMLAB_KERNEL_CACHE", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kbuild.cache_dir() == tmp_path / "ksmlab" / "kernel"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert kbuild.cache_dir() == Path("/var/cache/ksmlab")
