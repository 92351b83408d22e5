"""Boot a variant's kernel under qemu (TCG) and run the live lab inside it.

The guest gets the initramfs of :mod:`ksmlab.kernel.rootfs` and a 9p shared
folder holding the scenario and ``job.sh``; it writes the trace, the summary
and its dmesg back there and powers off (``reboot -f`` with ``-no-reboot``).
The trace is then labelled (``meta["guest"]``: guest kernel release, variant,
policy, accelerator ``tcg``, image key, timings) and saved.

KVM is not used: on these machines /dev/kvm is PVM and a stock guest hangs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import scenario as scenario_mod
from ..live.run import MEMORY_MARGIN_MIB
from ..scenario import Scenario
from ..trace import Trace
from .build import NICE, Log, build, cache_dir, get_variant, kernel_dir
from .rootfs import ensure_rootfs, plan, staged_size

if TYPE_CHECKING:
    from .selftest import SelftestResult

QEMU = "qemu-system-x86_64"
GUEST_OVERHEAD_MIB = 192  # kernel, the initramfs while it unpacks, CPython + numpy
DEFAULT_MAX_GUEST_MIB = 1024
BOOT_TIMEOUT_S = 120.0  # from qemu start to the end of the job, beyond the run itself


class KernelRunError(RuntimeError):
    """A guest run that cannot start or failed; one line (exit code 2)."""


def max_guest_mib() -> int:
    return int(os.environ.get("KSMLAB_GUEST_MAX_MIB", DEFAULT_MAX_GUEST_MIB))


def resolve_scenario(name: str) -> tuple[Scenario, str]:
    """A scenario by path, by name in kernel/data/scenarios/ (scaled for the guest), or built-in;
    with its TOML text (copied into the guest)."""
    path = Path(name)
    if not path.exists() and path.suffix != ".toml":
        scaled = kernel_dir() / "scenarios" / f"{name}.toml"
        if scaled.exists():
            path = scaled
    if path.exists():
        return scenario_mod.load(str(path)), path.read_text()
    sc = scenario_mod.load(name)  # built-in (or ScenarioError naming the choices)
    text = (resources.files("ksmlab") / "scenarios" / f"{name}.toml").read_text()
    return sc, text


def guest_mib(sc: Scenario, rootfs_bytes: int) -> int:
    """Guest RAM for a scenario: its memory, the live lab's margin, the unpacked
    root filesystem and the guest's own overhead; rounded up to 64 MiB."""
    need = sc.total_mib + MEMORY_MARGIN_MIB + rootfs_bytes // (1 << 20) + GUEST_OVERHEAD_MIB
    return -(-need // 64) * 64


@dataclass(frozen=True)
class GuestRun:
    trace: Trace
    trace_path: Path
    summary: dict[str, Any]
    timings: dict[str, float]
    console: Path
    dmesg_problems: list[str]


def qemu_command(bzimage: Path, initrd: Path, share: Path, mem_mib: int, console: Path,
                 smp: int = 2) -> list[str]:
    return [
        # mem-merge=off: QEMU otherwise marks guest RAM MADV_MERGEABLE, and the host's
        # ksmd would scan it beside any host live run (and skew that run's full scans)
        *NICE, QEMU, "-machine", "pc,mem-merge=off", "-accel", "tcg,thread=multi",
        "-cpu", "max", "-m", str(mem_mib),
        "-smp", str(smp), "-kernel", str(bzimage), "-initrd", str(initrd),
        "-append", "console=ttyS0 rdinit=/init panic=-1 loglevel=4",
        "-virtfs", f"local,path={share},mount_tag=share,security_model=none,id=share",
        "-display", "none", "-monitor", "none", "-serial", f"file:{console}",
        "-no-reboot", "-nic", "none",
    ]


def _problems(dmesg: str) -> list[str]:
    keys = ("BUG:", "WARNING:", "Oops", "Kernel panic", "general protection", "RIP:")
    return [ln.strip() for ln in dmesg.splitlines() if any(k in ln for k in keys)][:10]


def run(scenario: str, variant_name: str, duration: float | None = None,
        out: Path | None = None, log: Log | None = None) -> GuestRun:
    say: Log = log or (lambda s: None)
    variant = get_variant(variant_name)
    sc, text = resolve_scenario(scenario)
    sc = sc.with_duration(duration)
    if shutil.which(QEMU) is None:
        raise KernelRunError(f"{QEMU} is missing: apt-get install qemu-system-x86")
    mem = guest_mib(sc, staged_size(plan()))
    if mem > max_guest_mib():
        raise KernelRunError(
            f"scenario {sc.name} ({sc.total_mib} MiB) needs a {mem} MiB guest, more than "
            f"{max_guest_mib()} MiB (KSMLAB_GUEST_MAX_MIB); scale it down "
            "(see kernel/data/scenarios/)")
    initrd, _ = ensure_rootfs()
    t_build = time.monotonic()
    built = build(variant.name, log=say)
    build_s = time.monotonic() - t_build
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    rundir = cache_dir() / "runs" / f"{stamp}-{variant.name}-{sc.name}-{os.getpid()}"
    share = rundir / "share"
    share.mkdir(parents=True)
    (share / "scenario.toml").write_text(text)
    dur = "" if duration is None else repr(float(duration))
    (share / "job.sh").write_text(
        "export KSMLAB_STATE_DIR=/run/ksmlab PYTHONDONTWRITEBYTECODE=1\n"
        "cd /share\n"
        "echo \"job start $(cut -d' ' -f1 /proc/uptime)\" > /share/job.times\n"
        f"python3 -m ksmlab.kernel.guest /share/scenario.toml /share {dur}\n"
        "rc=$?\n"
        "echo \"job end $(cut -d' ' -f1 /proc/uptime)\" >> /share/job.times\n"
        "exit $rc\n")
    console = rundir / "console.log"
    cmd = qemu_command(built.bzimage, initrd, share, mem, console)
    (rundir / "qemu.cmd").write_text(" ".join(cmd) + "\n")
    say(f"booting {built.meta['release']} under qemu (TCG, {mem} MiB, 2 vCPUs); "
        f"{sc.name} runs {sc.duration:.0f} s inside")
    t0 = time.monotonic()
    timeout = BOOT_TIMEOUT_S + 3 * sc.duration
    with open(rundir / "qemu.err", "w") as qerr:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=qerr)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # our own child, by pid
            proc.wait()
            raise KernelRunError(f"the guest did not finish in {timeout:.0f} s; see {console}"
                                 ) from None
    wall = time.monotonic() - t0
    rc_file = share / "job.rc"
    if not rc_file.exists():
        tail = " | ".join(console.read_text(errors="replace").strip().splitlines()[-3:]) \
            if console.exists() else ""
        raise KernelRunError(f"the guest ended without running the job: {tail[:300]}")
    rc = int(rc_file.read_text().strip() or "1")
    if rc != 0 or not (share / "trace.json.gz").exists():
        err = (share / "job.err").read_text(errors="replace").strip().splitlines()[-1:]
        raise KernelRunError(f"the live run in the guest failed (rc {rc}): "
                             f"{err[0] if err else ''} (see {share})")
    times = dict(
        (parts[1], float(parts[2]))
        for parts in (ln.split() for ln in (share / "job.times").read_text().splitlines())
        if len(parts) == 3)
    timings = {"build_s": round(build_s, 1), "qemu_wall_s": round(wall, 1),
               "boot_s": round(times.get("start", 0.0), 1),
               "job_s": round(times.get("end", 0.0) - times.get("start", 0.0), 1)}
    dmesg = (share / "dmesg.txt").read_text(errors="replace") \
        if (share / "dmesg.txt").exists() else ""
    problems = _problems(dmesg)
    tr = Trace.load(share / "trace.json.gz")
    summary = json.loads((share / "summary.json").read_text())
    tr.meta["guest"] = {
        "release": tr.meta.get("kernel"), "variant": variant.name, "policy": variant.policy,
        "accelerator": "tcg", "image_key": built.key,
        "source_version": built.meta.get("source_version"),
        "source_package_version": built.meta.get("source_package_version"),
        "patch_sha256": built.meta.get("patch_sha256"), "memory_mib": mem, "vcpus": 2,
        "timings": timings, "dmesg_problems": problems,
        "note": "time under TCG emulation: compare in full-scan units",
    }
    dest_dir = out or rundir
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = tr.save(dest_dir / f"{sc.name}-kernel-{variant.name}.trace.json.gz")
    return GuestRun(tr, path, summary, timings, console, problems)


SELFTEST_GUEST_MIB = 512  # the test's 32 MiB, the unpacked rootfs, the guest kernel
SELFTEST_TIMEOUT_S = 600.0  # boot and both phases under TCG, with room


def run_selftest(variant_name: str, log: Log | None = None) -> SelftestResult:
    """Build the variant (or take it from the cache), compile ksm_thp_split against the
    variant's kselftest.h, boot the guest and run it there; its TAP output parsed."""
    from .selftest import NAME, compile_selftest, result_from

    say: Log = log or (lambda s: None)
    variant = get_variant(variant_name)
    if shutil.which(QEMU) is None:
        raise KernelRunError(f"{QEMU} is missing: apt-get install qemu-system-x86")
    initrd, _ = ensure_rootfs()
    built = build(variant.name, log=say)
    binary = compile_selftest(variant.source)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    rundir = cache_dir() / "runs" / f"{stamp}-{variant.name}-selftest-{os.getpid()}"
    share = rundir / "share"
    share.mkdir(parents=True)
    shutil.copy2(binary, share / NAME)
    # from /tmp: a binary on the 9p share may not be executable in every setup
    (share / "job.sh").write_text(
        "echo \"job start $(cut -d' ' -f1 /proc/uptime)\" > /share/job.times\n"
        f"cp /share/{NAME} /tmp/{NAME} && chmod +x /tmp/{NAME}\n"
        f"/tmp/{NAME} > /share/selftest.tap 2> /share/selftest.err\n"
        "echo $? > /share/selftest.rc\n"
        "uname -r > /share/release\n"
        "echo \"job end $(cut -d' ' -f1 /proc/uptime)\" >> /share/job.times\n")
    console = rundir / "console.log"
    mem = SELFTEST_GUEST_MIB
    cmd = qemu_command(built.bzimage, initrd, share, mem, console)
    (rundir / "qemu.cmd").write_text(" ".join(cmd) + "\n")
    say(f"booting {built.meta['release']} under qemu (TCG, {mem} MiB, 2 vCPUs); "
        f"{NAME} runs inside")
    t0 = time.monotonic()
    with open(rundir / "qemu.err", "w") as qerr:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=qerr)
        try:
            proc.wait(timeout=SELFTEST_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()  # our own child, by pid
            proc.wait()
            raise KernelRunError(f"the guest did not finish in {SELFTEST_TIMEOUT_S:.0f} s; "
                                 f"see {console}") from None
    rc_file = share / "selftest.rc"
    if not rc_file.exists():
        tail = " | ".join(console.read_text(errors="replace").strip().splitlines()[-3:]) \
            if console.exists() else ""
        raise KernelRunError(f"the guest ended without running {NAME}: {tail[:300]}")
    times = dict(
        (parts[1], float(parts[2]))
        for parts in (ln.split() for ln in (share / "job.times").read_text().splitlines())
        if len(parts) == 3)
    dmesg = (share / "dmesg.txt").read_text(errors="replace") \
        if (share / "dmesg.txt").exists() else ""
    problems = _problems(dmesg)
    if problems:
        say("dmesg: " + " | ".join(problems))
    res = result_from(
        (share / "selftest.tap").read_text(errors="replace"),
        int(rc_file.read_text().strip() or "1"), "guest",
        (share / "release").read_text().strip() if (share / "release").exists()
        else str(built.meta.get("release")),
        times.get("end", 0.0) - times.get("start", 0.0), variant.name,
        patch_sha256=built.meta.get("patch_sha256"),
        source_version=built.meta.get("source_version"))
    res.figures["qemu_wall_s"] = round(time.monotonic() - t0, 1)
    return res
