"""Which machine this is, as far as ksmd's costs are concerned (reads only).

ksmd's CPU per page visit was measured at 291 ns on one machine of this kind
and 968 ns on another with the same kernel and the same "model name" (a VM
shows its host's CPU only through the family/model/stepping numbers and the
TSC-derived bogomips), so a cost profile is kept per machine identity: the
CPU as the guest sees it, the kernel release and the CPU count.  The boot is
recorded beside it, not in the key: a VM can land on another host at boot,
which is worth a warning, not a silent refit.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from .kernelfs import KernelFS

CPU_FIELDS = ("model name", "cpu family", "model", "stepping", "bogomips")


def identity(fs: KernelFS | None = None) -> dict[str, Any]:
    """What keys a machine's cost profile, and what is recorded beside it."""
    fs = fs or KernelFS()
    cpu: dict[str, str] = {}
    for line in (fs.read_or_none("proc/cpuinfo") or "").splitlines():
        name, _, value = line.partition(":")
        name = name.strip()
        if name in CPU_FIELDS and name not in cpu:
            cpu[name] = value.strip()
        if not line.strip() and cpu:
            break  # the first CPU is enough: a VM's vCPUs are alike
    if "bogomips" in cpu:  # the TSC rate, rounded: it jitters by a few in the last digits
        cpu["bogomips"] = f"{round(float(cpu['bogomips']), -1):.0f}"
    return {
        "cpu": cpu,
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "boot_id": fs.read_or_none("proc/sys/kernel/random/boot_id"),
    }


def key(ident: dict[str, Any]) -> str:
    """A file name for the identity's profile: readable, and a hash of the rest."""
    cpu = ident.get("cpu", {})
    blob = repr((sorted(cpu.items()), ident.get("kernel"), ident.get("cpus")))
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return f"{ident.get('kernel')}-{ident.get('cpus')}cpu-{digest}"
