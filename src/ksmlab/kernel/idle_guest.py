"""An idle QEMU guest: a real workload whose memory ksmlab can capture and merge.

The guest boots a plain x86-64 kernel (the kernel lab's 6.12 image if one is
cached, else Debian's cloud kernel) with a tiny busybox initramfs whose /init
runs a small allocate-fill-free job and then idles.  With ``init_on_free=1``
the guest kernel zeroes every page it frees (and all of RAM at boot), so the
guest's RAM ends up mostly zero pages, plus some unique, some duplicated and
some repeated-content pages: what an idle VM looks like to the host's KSM.

QEMU runs with ``mem-merge=on``, so guest RAM is MADV_MERGEABLE (``mg`` in
VmFlags) as well as MADV_HUGEPAGE (``hg``).  Note: while the guest runs, a host
ksmd with ``run=1`` scans that RAM, beside whatever else it is merging.

    with IdleGuest(mem_mib=1024, job_mib=256) as g:
        start, size = g.guest_ram()
        g.pause()
        ...  # read /proc/<g.pid>/pagemap, run KSM, ...
        g.resume()

Nothing here writes to /sys: it starts, controls (QMP) and ends one qemu process.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from ..live.smaps import Mapping, parse_smaps
from .build import NICE, KernelBuildError, cache_dir, cached_image, get_variant
from .qemu import QEMU
from .rootfs import Plan, RootfsError, assemble, busybox_path

DEBIAN_KERNEL_META = "linux-image-cloud-amd64"  # depends on the versioned image package
LAB_VARIANT = "6.12"
MARKER = "ksmlab-guest: idle"
APPEND = "console=ttyS0 init_on_free=1 rdinit=/init panic=-1 quiet"
BOOT_TIMEOUT_S = 180.0
STOP_GRACE_S = 5.0
GUEST_RESERVE_MIB = 256  # kernel, initramfs and page tables beside the job's tmpfs files


class GuestError(RuntimeError):
    """The idle guest cannot be built, started or controlled; the message is one line."""


# ---------------------------------------------------------------------------------
# the kernel


def guest_kernel() -> Path:
    """A bootable x86-64 bzImage: the kernel lab's cached 6.12 image, else Debian's
    cloud kernel (downloaded once into ``<cache>/guest-kernel``)."""
    try:
        hit = cached_image(get_variant(LAB_VARIANT))
    except (KernelBuildError, OSError):  # no linux-source-6.12 or kernel/ folder: no lab
        hit = None
    if hit is not None:
        return hit.bzimage
    try:
        return _debian_kernel()
    except (GuestError, OSError) as e:
        raise GuestError(
            f"no guest kernel: no kernel-lab image ({LAB_VARIANT}) and Debian's "
            f"{DEBIAN_KERNEL_META} could not be fetched ({e})") from None


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)


def _last_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = (r.stderr.strip() or r.stdout.strip()).splitlines()
    return lines[-1][:200] if lines else f"exit code {r.returncode}"


def debian_image_package() -> str:
    """The versioned package behind the metapackage, e.g. linux-image-6.1.0-57-cloud-amd64."""
    if shutil.which("apt-cache") is None:
        raise GuestError("apt-cache is missing (not Debian)")
    r = _run(["apt-cache", "depends", DEBIAN_KERNEL_META])
    for line in r.stdout.splitlines():
        m = re.match(r"\s*\|?Depends:\s*(linux-image-\S+)", line)
        if m:
            return m.group(1)
    raise GuestError(f"apt-cache knows no {DEBIAN_KERNEL_META}: {_last_line(r)}; "
                     "run apt-get update")


def _debian_kernel() -> Path:
    d = cache_dir() / "guest-kernel"
    img = d / "vmlinuz"
    if img.exists():  # published only when complete (rename below)
        return img
    pkg = debian_image_package()
    d.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=d))
    try:
        r = _run(["apt-get", "download", pkg], cwd=tmp)
        if r.returncode != 0 and os.geteuid() == 0:
            # stale package lists name a version the mirror no longer has: refresh once
            _run(["apt-get", "update", "-qq"])
            r = _run(["apt-get", "download", pkg], cwd=tmp)
        debs = sorted(tmp.glob("*.deb"))
        if r.returncode != 0 or not debs:
            raise GuestError(f"apt-get download {pkg} failed: {_last_line(r)}")
        r = _run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "x")])
        found = sorted((tmp / "x" / "boot").glob("vmlinuz-*"))
        if r.returncode != 0 or not found:
            raise GuestError(f"no /boot/vmlinuz-* in {debs[0].name}: {_last_line(r)}")
        shutil.copy2(found[0], tmp / "vmlinuz")
        (d / "meta.json").write_text(json.dumps(
            {"package": pkg, "deb": debs[0].name, "image": found[0].name}, indent=1) + "\n")
        os.rename(tmp / "vmlinuz", img)  # publish atomically
        return img
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------
# the initramfs


INIT = r"""#!/bin/busybox sh
# ksmlab idle guest /init: a small allocate-fill-free job, then idle forever.
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs -o size=90% tmp /tmp
# churn: random data written, then freed; init_on_free=1 zeroes the pages as they go
dd if=/dev/urandom of=/tmp/churn bs=1M count={job} iflag=fullblock 2>/dev/null
rm /tmp/churn
# kept: unique pages, a copy of them (duplicate pairs), and pages of one repeated byte
dd if=/dev/urandom of=/tmp/unique bs=1M count={keep} iflag=fullblock 2>/dev/null
cp /tmp/unique /tmp/copy
tr '\0' k < /dev/zero | head -c {keep_bytes} > /tmp/same
echo "ksmlab-guest: job {job} MiB done at $(cut -d' ' -f1 /proc/uptime) s"
echo "{marker}"
while true; do sleep 3600; done
"""


def keep_mib(job_mib: int) -> int:
    """MiB of each kept file (unique, its copy, repeated byte): an eighth of the job."""
    return max(1, job_mib // 8)


def init_script(job_mib: int) -> str:
    if job_mib < 1:
        raise GuestError(f"job_mib must be at least 1, not {job_mib}")
    keep = keep_mib(job_mib)
    return INIT.format(job=job_mib, keep=keep, keep_bytes=keep << 20, marker=MARKER)


def guest_initrd(job_mib: int) -> Path:
    """The idle guest's initramfs (static busybox + /init), cached by its content under
    ``<cache>/idle-guest``."""
    try:
        p = Plan([(busybox_path(), "bin/busybox")], init_script(job_mib))
        dest = cache_dir() / "idle-guest" / f"{p.key()}.cpio.gz"
        return dest if dest.exists() else assemble(dest, p)
    except (RootfsError, OSError) as e:
        raise GuestError(f"cannot build the idle guest's initramfs: {e}") from None


# ---------------------------------------------------------------------------------
# QMP


class QMPError(GuestError):
    """QMP failed: no connection, a closed socket, or an ``error`` reply."""


class QMPClient:
    """A minimal QMP client over a unix socket: one command at a time, events skipped."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.greeting: dict[str, Any] = {}
        self._sock: socket.socket | None = None
        self._buf = b""

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(str(self.path))
        except OSError as e:
            s.close()
            raise QMPError(f"cannot connect to QMP at {self.path}: {e}") from None
        self._sock = s
        self.greeting = self._read()
        if "QMP" not in self.greeting:
            self.close()
            raise QMPError(f"not a QMP greeting: {str(self.greeting)[:200]}")
        self.execute("qmp_capabilities")  # leaves negotiation mode; commands work after

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf = b""

    def __enter__(self) -> QMPClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(65536)
            except OSError as e:
                raise QMPError(f"QMP read failed: {e}") from None
            if not chunk:
                raise QMPError("QMP connection closed by qemu")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            raise QMPError(f"QMP sent no JSON: {line[:200]!r}") from None
        if not isinstance(msg, dict):
            raise QMPError(f"QMP sent no JSON object: {line[:200]!r}")
        return msg

    def execute(self, command: str, arguments: dict[str, Any] | None = None
                ) -> dict[str, Any]:
        """Send a command; its reply (``{"return": ...}``).  An ``error`` reply raises."""
        if self._sock is None:
            raise QMPError("QMP is not connected")
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(req).encode() + b"\n")
        except OSError as e:
            raise QMPError(f"QMP write failed: {e}") from None
        while True:
            msg = self._read()
            if "event" in msg:  # asynchronous (STOP, RESUME, ...): not our reply
                continue
            if "error" in msg:
                err = msg["error"]
                desc = err.get("desc", err) if isinstance(err, dict) else err
                raise QMPError(f"QMP {command}: {desc}")
            return msg


# ---------------------------------------------------------------------------------
# /proc/PID/smaps


def find_guest_ram(maps: list[Mapping], mem_mib: int) -> Mapping:
    """Guest RAM: the anonymous read-write mapping of exactly ``mem_mib`` (qemu maps the
    RAM block as one VMA between PROT_NONE guards), else the largest one at least as big."""
    want = mem_mib << 20
    anon = [m for m in maps if not m.path and m.perms.startswith("rw")]
    exact = [m for m in anon if m.size == want]
    if exact:
        return exact[0]
    big = sorted((m for m in anon if m.size >= want), key=lambda m: m.size, reverse=True)
    if big:
        return big[0]
    raise GuestError(f"no anonymous mapping of {mem_mib} MiB in qemu's smaps")


# ---------------------------------------------------------------------------------
# the guest


def qemu_command(kernel: Path, initrd: Path, mem_mib: int, console: Path, qmp: Path
                 ) -> list[str]:
    return [
        # nice 19: TCG eats a host CPU; live experiments on this host come first
        *NICE, QEMU, "-machine", "pc,mem-merge=on", "-accel", "tcg",
        "-m", str(mem_mib), "-smp", "1", "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", APPEND, "-display", "none", "-monitor", "none",
        "-serial", f"file:{console}", "-qmp", f"unix:{qmp},server=on,wait=off",
        "-nic", "none", "-no-reboot",
    ]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    # PR_SET_PDEATHSIG(SIGKILL): if this Python process dies without __exit__ (SIGKILL),
    # qemu goes too; it survives exec of nice and of qemu
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (/proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class IdleGuest:
    """A qemu TCG guest that runs its job and idles; a context manager that always ends
    qemu (SIGTERM, SIGKILL after 5 s) and removes its temporary folder."""

    def __init__(self, mem_mib: int = 1024, job_mib: int = 256,
                 boot_timeout: float = BOOT_TIMEOUT_S) -> None:
        if job_mib < 1 or job_mib > mem_mib - GUEST_RESERVE_MIB:
            raise GuestError(f"job_mib {job_mib} must be 1..{mem_mib - GUEST_RESERVE_MIB} "
                             f"for a {mem_mib} MiB guest")
        self.mem_mib = mem_mib
        self.job_mib = job_mib
        self.boot_timeout = boot_timeout
        self.boot_seconds: float | None = None
        self.kernel: Path | None = None
        self.dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QMPClient | None = None

    @property
    def console(self) -> Path:
        assert self.dir is not None, "the guest is not started"
        return self.dir / "console.log"

    @property
    def qmp_path(self) -> Path:
        assert self.dir is not None, "the guest is not started"
        return self.dir / "qmp.sock"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise GuestError("the guest is not running")
        return self._proc.pid  # nice execs qemu: the same pid

    def __enter__(self) -> IdleGuest:
        if shutil.which(QEMU) is None:
            raise GuestError(f"{QEMU} is missing: apt-get install qemu-system-x86")
        self.kernel = guest_kernel()
        initrd = guest_initrd(self.job_mib)  # both before the temp folder: nothing to undo
        # short path in /tmp: a unix socket path must fit in 108 bytes
        self.dir = Path(tempfile.mkdtemp(prefix="ksmlab-idle-guest-"))
        try:
            cmd = qemu_command(self.kernel, initrd, self.mem_mib, self.console,
                               self.qmp_path)
            (self.dir / "qemu.cmd").write_text(" ".join(cmd) + "\n")
            t0 = time.monotonic()
            with open(self.dir / "qemu.err", "wb") as err:
                self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                              stdout=subprocess.DEVNULL, stderr=err,
                                              preexec_fn=_die_with_parent)
            self._wait_idle(t0)
            self.boot_seconds = time.monotonic() - t0
            return self
        except BaseException:  # also KeyboardInterrupt: __exit__ is not called for us
            self.stop()
            raise

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _tail(self, path: Path, n: int = 2) -> str:
        text = path.read_text(errors="replace").strip() if path.exists() else ""
        return " | ".join(text.splitlines()[-n:])[:300]

    def _wait_idle(self, t0: float) -> None:
        assert self._proc is not None
        while True:
            if self.console.exists() and MARKER in self.console.read_text(errors="replace"):
                return
            if self._proc.poll() is not None:
                raise GuestError(
                    f"qemu exited ({self._proc.returncode}) before the guest idled: "
                    f"{self._tail(self.console.with_name('qemu.err'))} "
                    f"console: {self._tail(self.console)}")
            if time.monotonic() - t0 > self.boot_timeout:
                raise GuestError(f"the guest did not print {MARKER!r} within "
                                 f"{self.boot_timeout:.0f} s; console: "
                                 f"{self._tail(self.console)}")
            time.sleep(0.2)

    def stop(self) -> None:
        """End qemu (our own child, by pid) and remove the temporary folder; idempotent."""
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        p, self._proc = self._proc, None
        if p is not None:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    p.kill()
            p.wait()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    # -- control -------------------------------------------------------------------

    def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run a QMP command on the guest (one connection, opened on first use)."""
        if self._proc is None:
            raise GuestError("the guest is not running")
        if self._qmp is None:
            client = QMPClient(self.qmp_path)
            client.connect()
            self._qmp = client
        return self._qmp.execute(command, arguments)

    def pause(self) -> dict[str, Any]:
        """Stop the vCPU (QMP ``stop``): guest memory no longer changes."""
        return self.qmp("stop")

    def resume(self) -> dict[str, Any]:
        return self.qmp("cont")

    def status(self) -> str:
        """``running``, ``paused``, ... (QMP ``query-status``)."""
        return str(self.qmp("query-status")["return"]["status"])

    # -- memory --------------------------------------------------------------------

    def ram_mapping(self) -> Mapping:
        """The guest-RAM VMA of qemu, with its smaps fields and VmFlags."""
        maps = parse_smaps(Path(f"/proc/{self.pid}/smaps").read_text())
        return find_guest_ram(maps, self.mem_mib)

    def guest_ram(self) -> tuple[int, int]:
        """(start address, size in bytes) of guest RAM in qemu's address space."""
        m = self.ram_mapping()
        return m.start, m.size
