"""The guest's root filesystem: an initramfs (newc cpio, gzip).

It holds Debian's static busybox (as /bin/* and the /init script), Debian's own
/usr/bin/python3.11 with the shared libraries it and its extension modules
need, the standard library without its tests, and ksmlab with the packages it
imports in the guest (pydantic, typer, rich, numpy, ...: copied from the
installed distributions; their cp311 wheels load in Debian's 3.11).
matplotlib is left out: the guest never plots.

The image is cached under ``<cache>/rootfs/<key>.cpio.gz``; the key hashes
the list of files with their sizes and mtimes and the /init script, so a change
to ksmlab's source makes a new image (about 5 s).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .build import NICE, cache_dir

PYTHON = Path("/usr/bin/python3.11")  # Debian's, not a pyenv build on PATH
STDLIB = Path("/usr/lib/python3.11")
BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
GUEST_SITE = "usr/lib/python3/dist-packages"  # on Debian python3.11's default sys.path
SKIP_STDLIB = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
               "pydoc_data", "distutils", "unittest", "config-3.11-x86_64-linux-gnu",
               "venv", "tests"}
# distributions whose import trees the guest does not need: the plots, and the
# model's (numba, llvmlite, scipy: 280 MB unpacked, more than the guest's RAM holds
# next to the workload: the initramfs would not unpack)
SKIP_DISTS = {"matplotlib", "contourpy", "cycler", "fonttools", "kiwisolver", "pillow",
              "pyparsing", "python-dateutil", "six", "packaging", "numba", "llvmlite",
              "scipy"}

INIT = r"""#!/bin/busybox sh
# ksmlab guest /init: mount, run /share/job.sh, power off.
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin HOME=/root
mkdir -p /proc /sys /dev /tmp /run /share /root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
echo "ksmlab-guest: $(uname -r) up $(cut -d' ' -f1 /proc/uptime) s"
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 share /share; then
    if [ -f /share/job.sh ]; then
        sh /share/job.sh > /share/job.out 2> /share/job.err
        echo $? > /share/job.rc
    else
        echo "ksmlab-guest: no /share/job.sh"
    fi
    dmesg > /share/dmesg.txt
    sync
    umount /share
else
    echo "ksmlab-guest: no 9p share"
fi
echo "ksmlab-guest: done"
reboot -f
"""


class RootfsError(RuntimeError):
    """The root filesystem cannot be assembled here; one line."""


def busybox_path() -> Path:
    for p in BUSYBOX_CANDIDATES:
        if p.exists():
            r = subprocess.run(["file", "-L", str(p)], capture_output=True, text=True)
            if r.returncode != 0 or "static" in r.stdout or "dynamic" not in r.stdout:
                return p
    raise RootfsError("no static busybox: apt-get install busybox-static")


_LDD_LINE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")


def shared_libs(binaries: list[Path]) -> set[Path]:
    """The shared libraries (and loader) ``ldd`` lists for these ELF files."""
    out: set[Path] = set()
    for chunk in range(0, len(binaries), 50):
        r = subprocess.run(["ldd", *map(str, binaries[chunk:chunk + 50])],
                           capture_output=True, text=True)
        for line in r.stdout.splitlines():
            m = _LDD_LINE.search(line)
            if m:
                out.add(Path(m.group(1)))
    return out


def _dist_tree(root: str) -> list[md.Distribution]:
    """``root`` and what it requires (installed), without SKIP_DISTS and extras."""
    seen: dict[str, md.Distribution] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen or key in SKIP_DISTS:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen[key] = dist
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            m = re.match(r"[A-Za-z0-9_.\-]+", req)
            if m:
                todo.append(m.group(0))
    return list(seen.values())


def python_packages() -> Iterator[tuple[Path, str]]:
    """(source file, path below the guest's site folder) for ksmlab and its deps."""
    import ksmlab

    pkg = Path(ksmlab.__file__).resolve().parent
    for f in sorted(pkg.rglob("*")):
        if f.is_file() and "__pycache__" not in f.parts:
            yield f, f"ksmlab/{f.relative_to(pkg)}"
    for dist in _dist_tree("ksmlab"):
        if dist.metadata["Name"].lower() == "ksmlab":
            continue
        for rel in dist.files or []:
            s = str(rel)
            if (s.startswith("..") or "__pycache__" in s or s.endswith((".pyc", ".pyi"))
                    or "/tests/" in s):
                continue
            src = Path(str(dist.locate_file(rel)))
            if src.is_file():
                yield src, s


def stdlib_files() -> Iterator[tuple[Path, str]]:
    for f in sorted(STDLIB.rglob("*")):
        rel = f.relative_to(STDLIB)
        if rel.parts[0] in SKIP_STDLIB or "test" in rel.parts or "tests" in rel.parts:
            continue
        if rel.parts[0] in ("site-packages", "dist-packages"):
            continue
        if f.is_file() and not f.is_symlink():
            yield f, str(rel)


@dataclass(frozen=True)
class Plan:
    """What goes into the image: (host file, path in the guest) and the /init text."""

    files: list[tuple[Path, str]]
    init: str

    def key(self) -> str:
        h = hashlib.sha256(self.init.encode())
        for src, dst in self.files:
            st = src.stat()
            h.update(f"{src}\0{dst}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


def plan() -> Plan:
    if not PYTHON.exists():
        raise RootfsError(f"{PYTHON} is missing: apt-get install python3.11")
    files: list[tuple[Path, str]] = [(busybox_path(), "bin/busybox"),
                                     (PYTHON, "usr/bin/python3.11")]
    std = list(stdlib_files())
    files += [(s, f"usr/lib/python3.11/{d}") for s, d in std]
    site = list(python_packages())
    files += [(s, f"{GUEST_SITE}/{d}") for s, d in site]
    elves = [PYTHON] + [s for s, d in std + site if s.name.endswith(".so") or ".so." in s.name]
    have = {s.resolve() for s, _ in site}
    for lib in sorted(shared_libs(elves)):
        real = lib.resolve()
        if real not in have:  # numpy.libs/* come with the wheel (found by RPATH)
            files.append((real, str(lib).lstrip("/")))
    return Plan(files, INIT)


def stage(root: Path, p: Plan) -> Path:
    """Write the guest's file tree under ``root`` (what the initramfs holds)."""
    for d in ("bin", "usr/bin", "proc", "sys", "dev", "tmp", "run", "share", "root",
              "etc", "lib64"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for src, dst in p.files:
        t = root / dst
        t.parent.mkdir(parents=True, exist_ok=True)
        if not t.exists():
            shutil.copy2(src, t)
    if (root / "usr/bin/python3.11").exists():  # images without Python (the idle guest's)
        (root / "usr/bin/python3").symlink_to("python3.11")
    (root / "init").write_text(p.init)
    (root / "init").chmod(0o755)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    return root


def assemble(dest: Path, p: Plan) -> Path:
    """Stage the tree and pack it (cpio newc, gzip) into ``dest``, atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=".rootfs-", dir=dest.parent))
    try:
        stage(root, p)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as out:
            find = subprocess.Popen(["find", ".", "-mindepth", "1"], cwd=root,
                                    stdout=subprocess.PIPE)
            cpio = subprocess.Popen([*NICE, "cpio", "-o", "-H", "newc", "--quiet"], cwd=root,
                                    stdin=find.stdout, stdout=subprocess.PIPE)
            assert find.stdout is not None and cpio.stdout is not None
            find.stdout.close()
            gz = subprocess.run([*NICE, "gzip", "-1"], stdin=cpio.stdout, stdout=out)
            cpio.stdout.close()
            if find.wait() or cpio.wait() or gz.returncode:
                tmp.unlink(missing_ok=True)
                raise RootfsError("packing the initramfs failed (find | cpio | gzip)")
        os.rename(tmp, dest)
        return dest
    finally:
        shutil.rmtree(root, ignore_errors=True)


def staged_size(p: Plan) -> int:
    """Bytes of the files in the image (what the guest holds in RAM once unpacked)."""
    seen: set[str] = set()
    total = 0
    for src, dst in p.files:
        if dst not in seen:
            seen.add(dst)
            total += src.stat().st_size
    return total


def ensure_rootfs() -> tuple[Path, int]:
    """The cached initramfs for the current ksmlab and Python (built if needed), and
    its unpacked size in bytes."""
    p = plan()
    dest = cache_dir() / "rootfs" / f"{p.key()}.cpio.gz"
    if not dest.exists():
        assemble(dest, p)
    return dest, staged_size(p)
