"""The idle QEMU guest (issue 12): its /init, qemu command line, QMP client and smaps
lookup without qemu (a shell script stands in for it); one live test that boots the
real guest (TCG, 1 GiB, about 15 s)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ksmlab.kernel import idle_guest as ig
from ksmlab.kernel import rootfs
from ksmlab.kernel.idle_guest import (
    MARKER,
    GuestError,
    IdleGuest,
    QMPClient,
    QMPError,
    find_guest_ram,
    parse_smaps,
)
from ksmlab.kernel.rootfs import RootfsError

REQUIRE_LIVE = os.environ.get("KSMLAB_REQUIRE_LIVE") == "1"


def _unavailable(reason: str) -> None:
    if REQUIRE_LIVE:
        pytest.fail(f"{reason} (KSMLAB_REQUIRE_LIVE=1)")
    pytest.skip(reason)


def test_init_runs_the_job_then_idles() -> None:
    text = ig.init_script(256)
    assert text.startswith("#!/bin/busybox sh\n")
    for want in ("mount -t proc", "mount -t sysfs", "mount -t devtmpfs", "mount -t tmpfs",
                 "of=/tmp/churn bs=1M count=256", "rm /tmp/churn",
                 "count=32 ", "cp /tmp/unique /tmp/copy", f"head -c {32 << 20}"):
        assert want in text, want
    # the marker comes after the job, and the guest then never ends (PID 1 exiting panics)
    assert text.index(f'echo "{MARKER}"') > text.index("rm /tmp/churn")
    assert text.rstrip().endswith("while true; do sleep 3600; done")


def test_init_refuses_an_empty_job() -> None:
    with pytest.raises(GuestError):
        ig.init_script(0)


def test_initrd_holds_busybox_and_init(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("cpio") is None:
        pytest.skip("cpio is not installed")
    try:
        rootfs.busybox_path()
    except RootfsError as e:
        pytest.skip(str(e))
    monkeypatch.setenv("KSMLAB_KERNEL_CACHE", str(tmp_path))
    img = ig.guest_initrd(64)
    assert img == ig.guest_initrd(64)  # cached by content
    assert ig.guest_initrd(128) != img
    names = subprocess.run(["cpio", "-t", "--quiet"], input=gzip.decompress(img.read_bytes()),
                           capture_output=True, check=True).stdout.decode().split()
    assert {"init", "bin/busybox"} <= set(names)
    assert "usr/bin/python3" not in names  # no dangling link to a Python it lacks


def test_qemu_command_line() -> None:
    cmd = ig.qemu_command(Path("/k/bzImage"), Path("/k/initrd"), 1024, Path("/t/console.log"),
                          Path("/t/qmp.sock"))
    assert cmd[:3] == ["nice", "-n", "19"]
    assert cmd[3] == "qemu-system-x86_64"
    assert cmd[cmd.index("-machine") + 1] == "pc,mem-merge=on"
    assert cmd[cmd.index("-accel") + 1] == "tcg"
    assert cmd[cmd.index("-m") + 1] == "1024"
    assert cmd[cmd.index("-smp") + 1] == "1"
    append = cmd[cmd.index("-append") + 1].split()
    assert {"console=ttyS0", "init_on_free=1", "rdinit=/init", "panic=-1"} <= set(append)
    assert cmd[cmd.index("-qmp") + 1] == "unix:/t/qmp.sock,server=on,wait=off"
    assert cmd[cmd.index("-serial") + 1] == "file:/t/console.log"
    assert "-no-reboot" in cmd and cmd[cmd.index("-nic") + 1] == "none"


def test_job_must_fit_the_guest() -> None:
    with pytest.raises(GuestError, match="job_mib"):
        IdleGuest(mem_mib=512, job_mib=400)


def test_missing_qemu_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(GuestError, match="apt-get install qemu-system-x86") as e, IdleGuest():
        pass
    assert "\n" not in str(e.value)


def test_no_kernel_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KSMLAB_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(ig, "cached_image", lambda v: None)

    def no_apt() -> str:
        raise GuestError("apt-cache is missing (not Debian)")

    monkeypatch.setattr(ig, "debian_image_package", no_apt)
    with pytest.raises(GuestError, match="no guest kernel") as e:
        ig.guest_kernel()
    assert isinstance(e.value, RuntimeError) and "\n" not in str(e.value)


def test_cached_debian_kernel_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KSMLAB_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(ig, "cached_image", lambda v: None)
    (tmp_path / "guest-kernel").mkdir()
    (tmp_path / "guest-kernel" / "vmlinuz").write_bytes(b"MZ")

    def no_lookup() -> str:
        raise AssertionError("a cached kernel needs no apt")

    monkeypatch.setattr(ig, "debian_image_package", no_lookup)
    assert ig.guest_kernel() == tmp_path / "guest-kernel" / "vmlinuz"


SMAPS = """\
55d0c0000000-55d0c0200000 r-xp 00000000 08:01 1234    /usr/bin/qemu-system-x86_64
Size:               2048 kB
Rss:                1024 kB
VmFlags: rd ex mr mw me
7f0000000000-7f0000200000 ---p 00000000 00:00 0
Size:               2048 kB
VmFlags: mr mw me
7f0000200000-7f0040200000 rw-p 00000000 00:00 0
Size:            1048576 kB
KernelPageSize:        4 kB
Rss:             1040000 kB
AnonHugePages:    983040 kB
VmFlags: rd wr mr mw me ac hg mg
7f0040200000-7f0040300000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                  12 kB
VmFlags: rd wr mr mw me ac
"""


def test_smaps_finds_guest_ram() -> None:
    maps = parse_smaps(SMAPS)
    assert len(maps) == 4
    assert maps[0].path == "/usr/bin/qemu-system-x86_64"
    ram = find_guest_ram(maps, 1024)
    assert (ram.start, ram.size) == (0x7F0000200000, 1 << 30)
    assert ram.kb["Rss"] == 1040000 and ram.kb["AnonHugePages"] == 983040
    assert {"mg", "hg"} <= set(ram.flags)
    with pytest.raises(GuestError, match="2048 MiB"):
        find_guest_ram(maps, 2048)


def test_cpu_seconds_of_this_process() -> None:
    t0 = ig.cpu_seconds(os.getpid())
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    assert ig.cpu_seconds(os.getpid()) >= t0


class FakeQMP:
    """A QMP server on a unix socket, in a thread: greeting, capabilities negotiation,
    events before some replies, an error for unknown commands."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.received: list[dict[str, Any]] = []
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.srv.accept()
        with conn:
            def send(msg: dict[str, Any]) -> None:
                conn.sendall(json.dumps(msg).encode() + b"\r\n")

            send({"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": ["oob"]}})
            negotiated = False
            buf = b""
            while True:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    req = json.loads(line)
                    self.received.append(req)
                    cmd = req["execute"]
                    if cmd == "qmp_capabilities":
                        negotiated = True
                        send({"return": {}})
                    elif not negotiated:
                        send({"error": {"class": "CommandNotFound", "desc": "negotiate"}})
                    elif cmd in ("stop", "cont"):
                        event = "STOP" if cmd == "stop" else "RESUME"
                        send({"timestamp": {"seconds": 1}, "event": event})
                        send({"return": {}})
                    elif cmd == "query-status":
                        send({"return": {"status": "paused", "running": False}})
                    else:
                        send({"error": {"class": "CommandNotFound",
                                        "desc": f"The command {cmd} has not been found"}})

    def close(self) -> None:
        self.srv.close()
        self.thread.join(timeout=5)


@pytest.fixture
def fake_qmp(tmp_path: Path) -> Iterator[FakeQMP]:
    server = FakeQMP(tmp_path / "qmp.sock")
    yield server
    server.close()


def test_qmp_client_against_a_fake_server(fake_qmp: FakeQMP) -> None:
    with QMPClient(fake_qmp.path, timeout=5) as q:
        assert "QMP" in q.greeting
        assert q.execute("stop") == {"return": {}}  # the STOP event before it is skipped
        assert q.execute("query-status")["return"]["status"] == "paused"
        assert q.execute("cont") == {"return": {}}
        with pytest.raises(QMPError, match="has not been found"):
            q.execute("no-such-command")
    assert [r["execute"] for r in fake_qmp.received] == [
        "qmp_capabilities", "stop", "query-status", "cont", "no-such-command"]


def test_qmp_client_without_a_server(tmp_path: Path) -> None:
    with pytest.raises(QMPError, match="cannot connect"):
        QMPClient(tmp_path / "none.sock", timeout=1).connect()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True  # (an unreaped zombie would count as alive: stop() must wait for it)


@pytest.mark.live
@pytest.mark.slow
def test_idle_guest_boots_pauses_and_ends() -> None:
    """Boots the real guest (TCG, 1 GiB): the marker, guest RAM mergeable and THP-advised,
    QMP stop/cont, and no qemu left after the block."""
    if shutil.which(ig.QEMU) is None:
        _unavailable(f"{ig.QEMU} is missing: apt-get install qemu-system-x86")
    try:
        ig.guest_kernel()
    except GuestError as e:
        _unavailable(str(e))
    t0 = time.monotonic()
    with IdleGuest(mem_mib=1024, job_mib=256) as g:
        pid = g.pid
        assert MARKER in g.console.read_text(errors="replace")
        ram = g.ram_mapping()
        assert g.guest_ram() == (ram.start, 1 << 30)
        assert {"mg", "hg"} <= set(ram.flags), ram.flags
        assert g.pause() == {"return": {}}
        assert g.status() == "paused"
        assert g.resume() == {"return": {}}
        assert g.status() == "running"
        tmp = g.dir
    assert not _pid_alive(pid)
    assert tmp is not None and not tmp.exists()
    assert time.monotonic() - t0 < 180


@pytest.fixture
def fake_guest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """IdleGuest with qemu replaced by a shell script (set the list's one item):
    no kernel, no initrd, no qemu needed."""
    script = [f'echo "{MARKER}" > "$1"; exec sleep 600']
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/true")
    monkeypatch.setattr(ig, "guest_kernel", lambda: tmp_path / "bzImage")
    monkeypatch.setattr(ig, "guest_initrd", lambda job: tmp_path / "initrd")
    monkeypatch.setattr(ig, "qemu_command",
                        lambda k, i, m, console, q: ["sh", "-c", script[0], "sh", str(console)])
    yield script


def test_exception_in_the_block_ends_the_process(fake_guest: list[str]) -> None:
    with pytest.raises(ValueError), IdleGuest() as g:
        pid, tmp = g.pid, g.dir
        assert _pid_alive(pid) and g.boot_seconds is not None
        raise ValueError("boom")
    assert not _pid_alive(pid)
    assert tmp is not None and not tmp.exists()


def test_sigterm_ignored_means_sigkill(fake_guest: list[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ig, "STOP_GRACE_S", 0.5)
    fake_guest[0] = f'trap "" TERM; echo "{MARKER}" > "$1"; while :; do sleep 1; done'
    t0 = time.monotonic()
    with IdleGuest() as g:
        pid = g.pid
    assert not _pid_alive(pid)
    assert time.monotonic() - t0 < 10


def test_early_exit_is_reported(fake_guest: list[str]) -> None:
    fake_guest[0] = 'echo "Kernel panic - not syncing" > "$1"; echo "qemu: bad" >&2; exit 1'
    g = IdleGuest()
    with pytest.raises(GuestError, match=r"exited .* qemu: bad .*Kernel panic"), g:
        pass
    assert g.dir is None


def test_boot_timeout_ends_the_process(fake_guest: list[str]) -> None:
    fake_guest[0] = "exec sleep 600"
    g = IdleGuest(boot_timeout=0.5)
    with pytest.raises(GuestError, match="did not print"), g:
        pass
    assert g.dir is None and g._proc is None
