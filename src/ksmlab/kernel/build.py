"""Build a patched guest kernel (bzImage) for one variant, into a cache.

Layout of the cache (``KSMLAB_KERNEL_CACHE``, default /var/cache/ksmlab)::

    trees/<version>-<id>/        one build tree per installed source (in-place build)
      .ksmlab-applied.patch      the patch now applied to the tree (if any)
      .ksmlab-config             hash of the config fragment the tree is configured with
    trees/<version>-<id>.lock    flock: one build per tree at a time
    kernels/<key>/bzImage        published images, key = hash(source, config, patch)
    kernels/<key>/meta.json
    logs/<variant>-<key>.log     the make output of the last build of that key

A build applies the variant's patch to the tree after reversing the one left
applied by the previous build, so switching variants recompiles only the files
the two patches touch.  The image is copied to a temporary folder and renamed
into ``kernels/`` only once complete: an interrupted or failed build leaves
no entry there, and the tree is put right by the next build (the patch marker
is written before a patch is applied and removed only after it is reversed).

The patches are written on one point release and applied to whichever Debian
ships now: with offsets (lines moved), never with fuzz (context changed), and
every image's meta.json names the point release it was built from.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BUILD_FORMAT = "ksmlab-kernel-build/1"  # part of every key: bump to rebuild everything
NICE = ["nice", "-n", "19"]


class KernelBuildError(RuntimeError):
    """A build that cannot be done; the message is one line."""


def cache_dir() -> Path:
    """Built trees and images: /var/cache/ksmlab for root, else the user's cache (qemu
    under TCG needs no root), or $KSMLAB_KERNEL_CACHE."""
    env = os.environ.get("KSMLAB_KERNEL_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/ksmlab")
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "ksmlab" / "kernel"


def kernel_dir() -> Path:
    """The kernel lab's data (config fragments, patches, scaled scenarios), packaged
    with ksmlab (ksmlab/kernel/data), or $KSMLAB_KERNEL_DIR."""
    env = os.environ.get("KSMLAB_KERNEL_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class Source:
    """A Debian linux-source package.  Debian's archive keeps only the current point
    release of a series (6.12.117 gave way to 6.12.118), so the kernel lab builds on
    whichever is installed and every build names the one it used."""

    series: str  # "6.12"
    package: str  # "linux-source-6.12"

    @property
    def tarball(self) -> Path:
        return Path(f"/usr/src/{self.package}.tar.xz")

    def package_version(self) -> str | None:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", self.package],
                           capture_output=True, text=True)
        return r.stdout.strip() or None if r.returncode == 0 else None

    def version(self) -> str:
        """Upstream version, e.g. 6.12.118 (from the installed package)."""
        pv = self.package_version()
        if pv is None or not self.tarball.exists():
            raise KernelBuildError(
                f"{self.package} is not installed: apt-get install {self.package}")
        return pv.split("-")[0].split("+")[0]

    def identity(self) -> str:
        """What names this exact source: the package version and the tarball's size and
        time, so a tarball replaced by another point release (by apt or by hand) gets a
        tree and images of its own."""
        st = self.tarball.stat()
        return f"{self.package_version()}:{st.st_size}:{st.st_mtime_ns}"

    def tree_name(self) -> str:
        return f"{self.version()}-{_sha(self.identity())[:8]}"


def tree_version(tree: Path) -> str:
    """The point release a build tree holds, from its top Makefile (VERSION,
    PATCHLEVEL, SUBLEVEL): the source's own word, whatever the package says."""
    fields: dict[str, str] = {}
    for line in (tree / "Makefile").read_text().splitlines()[:12]:
        m = re.match(r"(VERSION|PATCHLEVEL|SUBLEVEL)\s*=\s*(\d+)", line)
        if m:
            fields[m.group(1)] = m.group(2)
    if len(fields) != 3:
        raise KernelBuildError(f"{tree}/Makefile does not name its version")
    return f"{fields['VERSION']}.{fields['PATCHLEVEL']}.{fields['SUBLEVEL']}"


SOURCES = {
    "6.12": Source("6.12", "linux-source-6.12"),
    "6.1": Source("6.1", "linux-source-6.1"),
}


COVER_LETTER = "0000-cover-letter.patch"


@dataclass(frozen=True)
class Variant:
    """A kernel of the lab.  Its patch is in kernel/data/patches/ as ``git format-patch``
    mail: one file (``<variant>.patch``) or, for a series, a folder (``<variant>/``) of
    numbered patches applied in order, with an optional ``0000-cover-letter.patch`` that
    is text only (not applied, not part of the patch's hash)."""

    name: str
    policy: str  # the model's policy this kernel implements
    source: Source
    patch: str | None  # file or folder name in kernel/data/patches/

    def patch_path(self) -> Path | None:
        return None if self.patch is None else kernel_dir() / "patches" / self.patch

    def patch_files(self) -> list[Path]:
        """The patches to apply, in order (the cover letter of a series is not one)."""
        p = self.patch_path()
        if p is None:
            return []
        if p.is_dir():
            files = sorted(f for f in p.glob("[0-9][0-9][0-9][0-9]-*.patch")
                           if f.name != COVER_LETTER)
            if not files:
                raise KernelBuildError(f"patch series {p} holds no patch")
            return files
        if not p.exists():
            raise KernelBuildError(f"patch {p} is missing")
        return [p]

    def cover_letter(self) -> Path | None:
        p = self.patch_path()
        c = None if p is None else p / COVER_LETTER
        return c if c is not None and c.exists() else None

    def patch_text(self) -> str:
        """Every patch of the variant, in order, as one text (what is applied and hashed)."""
        return "".join(f.read_text() for f in self.patch_files())

    def written_on(self) -> str | None:
        """The point release the patch was written on (its header's "written on")."""
        m = re.search(r"written on (\d+\.\d+\.\d+)", self.patch_text().split("\n--- ", 1)[0])
        return m.group(1) if m else None


def _patch_of(name: str) -> str:
    """``<name>/`` for a series, else ``<name>.patch``."""
    return name if (kernel_dir() / "patches" / name).is_dir() else f"{name}.patch"


_PATCHED = ("v1", "v1-p2", "v1-p3", "rfc", "ksm-split-no-remap", "ksm-skip-huge",
            "ksm-accounted-remap")
VARIANTS: dict[str, Variant] = {
    "6.12": Variant("6.12", "6.12", SOURCES["6.12"], None),
    "pre-6.12": Variant("pre-6.12", "pre-6.12", SOURCES["6.1"], None),
    **{n: Variant(n, n, SOURCES["6.12"], _patch_of(n)) for n in _PATCHED},
}


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise KernelBuildError(
            f"unknown kernel variant {name!r}; known: {', '.join(VARIANTS)}") from None


def patch_sha256(variant: Variant) -> str | None:
    """Hash of the variant's patch as it is today (None: no patch)."""
    return _sha(variant.patch_text()) if variant.patch else None


def config_fragment() -> Path:
    return kernel_dir() / "config" / "ksmlab-guest.config"


def config_text(src: Source) -> str:
    """The fragment for a source: ksmlab-guest.config, then ksmlab-guest-<series>.config
    if there is one (options only that series needs)."""
    text = config_fragment().read_text()
    extra = kernel_dir() / "config" / f"ksmlab-guest-{src.series}.config"
    return text + extra.read_text() if extra.exists() else text


def fragment_options(text: str) -> dict[str, str]:
    """CONFIG_X=v lines of a fragment (comments and blank lines ignored)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    return out


def _sha(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


def build_key(variant: Variant) -> str:
    """Hash of the exact source, config fragment and patch: the image's cache key."""
    return _sha(BUILD_FORMAT, variant.source.package, variant.source.identity(),
                config_text(variant.source), variant.patch_text())[:16]


def image_dir(variant: Variant) -> Path:
    return cache_dir() / "kernels" / build_key(variant)


@dataclass(frozen=True)
class Built:
    variant: str
    key: str
    bzimage: Path
    meta: dict[str, Any]
    cached: bool  # True: found in the cache, nothing built
    seconds: float


def cached_image(variant: Variant) -> Built | None:
    d = image_dir(variant)
    img, meta = d / "bzImage", d / "meta.json"
    if img.exists() and meta.exists():
        return Built(variant.name, d.name, img, json.loads(meta.read_text()), True, 0.0)
    return None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


Log = Callable[[str], None]


def _run(cmd: list[str], cwd: Path, log_file: Path | None = None, stdin: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    if log_file is not None:
        with open(log_file, "a") as lf:
            lf.write(f"$ {' '.join(cmd)}\n")
            lf.flush()
            return subprocess.run(cmd, cwd=cwd, stdout=lf, stderr=subprocess.STDOUT, text=True,
                                  input=stdin)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, input=stdin)


def ensure_tree(src: Source, log: Log) -> Path:
    """The build tree of the installed source, unpacked from the Debian tarball if needed."""
    version = src.tree_name()
    tree = cache_dir() / "trees" / version
    if (tree / "Makefile").exists():
        return tree
    log(f"unpacking {src.tarball} (about 15 s)")
    tree.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".unpack-{version}-", dir=tree.parent))
    try:
        r = _run([*NICE, "tar", "xJf", str(src.tarball), "-C", str(tmp)], tree.parent)
        if r.returncode != 0:
            raise KernelBuildError(f"unpacking {src.tarball} failed: {r.stderr.strip()[:200]}")
        (top,) = list(tmp.iterdir())
        top.rename(tree)  # atomic publish of a complete tree
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tree


# -F0: offsets are fine (a new point release moves lines), fuzz is not: a hunk whose
# context changed may land on code that means something else now
PATCH = ["patch", "-p1", "--batch", "--no-backup-if-mismatch", "-F0"]


# git format-patch's first line of every mail: where one patch of a series begins
_MAIL_START = re.compile(r"^From [0-9a-f]{40} Mon Sep 17 00:00:00 2001$", re.M)


def split_series(text: str) -> list[str]:
    """The patches of a series (one text of several mails), in order; a plain diff or a
    single mail is a series of one."""
    starts = [m.start() for m in _MAIL_START.finditer(text)]
    if len(starts) < 2:
        return [text] if text else []
    starts[0] = 0
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]


def touched_files(text: str) -> list[str]:
    """The files a patch changes (its ``+++ b/`` lines)."""
    return sorted({m.group(1) for m in re.finditer(r"^\+\+\+ b/(\S+)", text, re.M)})


@dataclass(frozen=True)
class PatchCheck:
    """A dry run of ``patch``: does it apply, and which hunks moved or failed."""

    ok: bool
    moved: list[str]  # "mm/ksm.c hunk #1 (offset 50 lines)"
    failed: list[str]  # "mm/ksm.c hunk #2 at line 2968"
    output: str


def check_patch(tree: Path, text: str, reverse: bool = False) -> PatchCheck:
    """Would ``text`` apply (or, ``reverse``, come off) without fuzz?  A series is
    tried patch by patch on a scratch copy of the files it touches, since a later
    patch may change what an earlier one changed."""
    pieces = split_series(text)
    if len(pieces) < 2:
        r = _run([*PATCH, "--dry-run", "-f", "-R" if reverse else "-N"], tree, stdin=text)
        return _parse_patch_output(r)
    with tempfile.TemporaryDirectory(prefix="ksmlab-series-") as scratch:
        for rel in touched_files(text):
            if (tree / rel).exists():
                (Path(scratch) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(tree / rel, Path(scratch) / rel)
        outputs, moved = [], []
        for piece in reversed(pieces) if reverse else pieces:
            r = _run([*PATCH, "-f", "-R" if reverse else "-N"], Path(scratch), stdin=piece)
            c = _parse_patch_output(r)
            outputs.append(c.output)
            moved += c.moved
            if not c.ok:
                return PatchCheck(False, moved, c.failed, "\n".join(outputs))
        return PatchCheck(True, moved, [], "\n".join(outputs))


def _parse_patch_output(r: subprocess.CompletedProcess[str]) -> PatchCheck:
    out = (r.stdout + r.stderr).strip()
    moved, failed, current = [], [], "?"
    for line in out.splitlines():
        if line.startswith(("checking file ", "patching file ")):
            current = line.split(" file ", 1)[1].strip()
        elif m := re.match(r"Hunk #(\d+) succeeded at \d+ \((offset [^)]*)\)", line):
            moved.append(f"{current} hunk #{m.group(1)} ({m.group(2)})")
        elif m := re.match(r"Hunk #(\d+) FAILED at (\d+)", line):
            failed.append(f"{current} hunk #{m.group(1)} at line {m.group(2)}")
    if r.returncode != 0 and not failed:  # a missing file, a malformed patch
        failed.append(out.splitlines()[-1] if out else f"patch exited {r.returncode}")
    return PatchCheck(r.returncode == 0, moved, failed, out)


def patch_applies(tree: Path, text: str, reverse: bool = False) -> tuple[bool, str]:
    c = check_patch(tree, text, reverse)
    return c.ok, c.output


def does_not_apply(variant: Variant, version: str, check: PatchCheck) -> str:
    """One line: which hunk failed, against what, and what to do."""
    more = f" (and {len(check.failed) - 1} more)" if len(check.failed) > 1 else ""
    base = variant.written_on()
    return (f"{variant.patch} does not apply to Linux {version} "
            f"({variant.source.package} {variant.source.package_version()}): "
            f"{check.failed[0]}{more} failed without fuzz; port the patch to {version} "
            f"(kernel/data/patches/{variant.patch}; offsets are fine) or install the point "
            f"release it was written on ({base or 'see its header'})")


def set_patch(tree: Path, text: str, log: Log,
              refused: Callable[[PatchCheck], str] | None = None) -> None:
    """Leave exactly ``text`` applied to the tree (reversing the previous patch).
    ``refused`` words the error when ``text`` does not apply."""
    marker = tree / ".ksmlab-applied.patch"
    if marker.exists():
        old = marker.read_text()
        if old == text:
            return
        ok, _ = patch_applies(tree, old, reverse=True)
        if ok:
            log("reversing the previous variant's patch")
            for piece in reversed(split_series(old)):  # a series comes off last patch first
                r = _run([*PATCH, "-R"], tree, stdin=piece)
                if r.returncode != 0:
                    raise KernelBuildError(f"reversing the patch in {tree} failed: "
                                           f"{r.stdout.strip()[:200]}")
        elif not patch_applies(tree, old)[0]:
            raise KernelBuildError(
                f"{tree} is neither with nor without its recorded patch; remove the tree "
                "and build again")
        # else: an interrupted build had not applied it yet
        marker.unlink()
    if not text:
        return
    check = check_patch(tree, text)
    if not check.ok:
        raise KernelBuildError(refused(check) if refused else
                               f"the patch does not apply: {check.failed[0]}")
    marker.write_text(text)  # before applying: an interruption is then undone next time
    for piece in split_series(text):  # a series goes on in order
        r = _run(PATCH, tree, stdin=piece)
        if r.returncode != 0:
            raise KernelBuildError(f"applying the patch failed: {r.stdout.strip()[:200]}")


def configure(tree: Path, src: Source, log: Log, log_file: Path) -> None:
    """tinyconfig + the fragment, unless the tree already has this configuration."""
    frag = config_text(src)
    marker = tree / ".ksmlab-config"
    want = _sha(frag)
    if marker.exists() and marker.read_text() == want and (tree / ".config").exists():
        return
    log("configuring: make tinyconfig + kernel/data/config/ksmlab-guest.config")
    marker.unlink(missing_ok=True)
    for step in (["make", "tinyconfig"], None, ["make", "olddefconfig"]):
        if step is None:
            with open(tree / ".config", "a") as f:
                f.write("\n# ksmlab-guest.config\n" + frag)
            continue
        r = _run([*NICE, *step], tree, log_file)
        if r.returncode != 0:
            raise KernelBuildError(f"{' '.join(step)} failed (see {log_file})")
    have = (tree / ".config").read_text().splitlines()
    missing = [f"{k}={v}" for k, v in fragment_options(frag).items()
               if v != "n" and f"{k}={v}" not in have]
    if missing:
        raise KernelBuildError(f"the config lost {', '.join(missing[:4])} (dependencies?)")
    marker.write_text(want)


def build(name: str, log: Log | None = None, jobs: int = 2) -> Built:
    """The bzImage of a variant: from the cache, or built (incrementally) and published."""
    say: Log = log or (lambda s: None)
    variant = get_variant(name)
    hit = cached_image(variant)
    if hit is not None:
        return hit
    key = build_key(variant)
    src = variant.source
    logs = cache_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_file = logs / f"{variant.name}-{key}.log"
    log_file.write_text("")
    t0 = time.monotonic()
    with _locked(cache_dir() / "trees" / f"{src.tree_name()}.lock"):
        hit = cached_image(variant)  # another build may have made it meanwhile
        if hit is not None:
            return hit
        tree = ensure_tree(src, say)
        version = tree_version(tree)
        set_patch(tree, variant.patch_text(), say,
                  lambda c: does_not_apply(variant, version, c))
        configure(tree, src, say, log_file)
        local = f"-ksmlab-{variant.name}"
        say(f"make -j{jobs} bzImage (nice 19; log {log_file})")
        r = _run([*NICE, "make", f"-j{jobs}", f"LOCALVERSION={local}", "bzImage"], tree,
                 log_file)
        if r.returncode != 0:
            tail = log_file.read_text().strip().splitlines()[-3:]
            raise KernelBuildError(f"build of {variant.name} failed: {' | '.join(tail)}")
        release = (tree / "include" / "config" / "kernel.release").read_text().strip()
        seconds = time.monotonic() - t0
        meta = {
            "format": BUILD_FORMAT, "variant": variant.name, "policy": variant.policy,
            "key": key, "source_package": src.package,
            "source_package_version": src.package_version(), "source_version": version,
            "patch_written_on": variant.written_on() if variant.patch else None,
            "release": release, "patch": variant.patch,
            "patch_sha256": patch_sha256(variant),
            "config_sha256": _sha(config_text(src)),
            "build_seconds": round(seconds, 1),
            "built": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        final = cache_dir() / "kernels" / key
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
        try:
            shutil.copy2(tree / "arch" / "x86" / "boot" / "bzImage", tmp / "bzImage")
            shutil.copy2(tree / ".config", tmp / "config")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
            os.rename(tmp, final)  # publish: the entry exists only when complete
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (final / "meta.json").exists():
                raise
        return Built(variant.name, key, final / "bzImage", meta, False, seconds)


def list_images() -> list[dict[str, Any]]:
    """Every published image, newest first (meta.json of each)."""
    out = []
    for m in (cache_dir() / "kernels").glob("*/meta.json"):
        try:
            out.append(json.loads(m.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda m: str(m.get("built", "")), reverse=True)
