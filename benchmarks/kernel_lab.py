"""Kernel lab timings: build from scratch, incremental rebuild, boot, runs under TCG.

- from-scratch build: unpack Debian's linux-source-6.12, tinyconfig + the
  fragment, ``make -j2 bzImage`` of the unpatched 6.12 variant, in a throw-away
  cache (``--scratch``; minutes, so opt-in);
- incremental rebuild: in the real cache, a copy of kernel/ whose
  ksm-split-no-remap patch has one code line changed (a comment inside the
  hunk), so the key changes and only mm/ksm.c + mm/migrate.c + the link rerun;
- boot: the guest's uptime when /init starts the job, and qemu's wall time for
  the whole run;
- each scenario's run under emulation (wall time of ``ksmlab kernel run``).

Everything runs under ``nice -n 19``.  Usage:
  python benchmarks/kernel_lab.py [--scratch] [--variant 6.12] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ksmlab.kernel import build as kbuild
from ksmlab.kernel import qemu

SCENARIOS = ("seed-uzp1-64m", "seed-uzp0-64m")


def from_scratch(variant: str) -> float:
    with tempfile.TemporaryDirectory(prefix="ksmlab-bench-", dir="/var/tmp") as d:
        old = os.environ.get("KSMLAB_KERNEL_CACHE")
        os.environ["KSMLAB_KERNEL_CACHE"] = d
        try:
            t0 = time.monotonic()
            kbuild.build(variant, log=lambda m: print(m, file=sys.stderr))
            return time.monotonic() - t0
        finally:
            if old is None:
                os.environ.pop("KSMLAB_KERNEL_CACHE")
            else:
                os.environ["KSMLAB_KERNEL_CACHE"] = old


def incremental() -> dict[str, float]:
    """Build ksm-split-no-remap (cached or not), then with a one-line change to its patch."""
    kbuild.build("ksm-split-no-remap")  # the starting point
    with tempfile.TemporaryDirectory(prefix="ksmlab-kdir-") as d:
        kdir = Path(d) / "kernel"
        shutil.copytree(kbuild.kernel_dir(), kdir)
        p = kdir / "patches" / "ksm-split-no-remap.patch"
        text = p.read_text()
        one = "+\t/* ksmlab ksm-split-no-remap: a split KSM started never remaps */"
        assert one in text
        p.write_text(text.replace(one, one[:-3] + "(bench) */"))
        os.environ["KSMLAB_KERNEL_DIR"] = str(kdir)
        try:
            t0 = time.monotonic()
            b = kbuild.build("ksm-split-no-remap")
            changed = time.monotonic() - t0
            t0 = time.monotonic()
            kbuild.build("ksm-split-no-remap")
            again = time.monotonic() - t0
        finally:
            os.environ.pop("KSMLAB_KERNEL_DIR")
        shutil.rmtree(b.bzimage.parent, ignore_errors=True)  # the bench image is not kept
    return {"one_line_change_s": round(changed, 1), "second_build_s": round(again, 3)}


def runs(variant: str) -> dict[str, dict[str, float]]:
    out = {}
    for sc in SCENARIOS:
        t0 = time.monotonic()
        gr = qemu.run(sc, variant)
        out[sc] = {"wall_s": round(time.monotonic() - t0, 1), **gr.timings,
                   "scenario_duration_s": float(gr.trace.meta["scenario"]["duration"])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scratch", action="store_true", help="also time a from-scratch build")
    ap.add_argument("--variant", default="6.12")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    res: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}}
    if a.scratch:
        res["from_scratch_build_s"] = round(from_scratch(a.variant), 1)
    res["incremental"] = incremental()
    res["runs"] = runs(a.variant)
    if a.json:
        print(json.dumps(res))
        return
    if "from_scratch_build_s" in res:
        print(f"from-scratch build ({a.variant}): {res['from_scratch_build_s']} s")
    inc = res["incremental"]
    print(f"rebuild after a one-line patch change: {inc['one_line_change_s']} s; "
          f"same build again (cache): {inc['second_build_s']} s")
    for sc, r in res["runs"].items():
        print(f"{sc} on {a.variant}: boot {r['boot_s']} s (guest uptime at job start), "
              f"job {r['job_s']} s for a {r['scenario_duration_s']:.0f} s scenario, "
              f"qemu {r['qemu_wall_s']} s, total {r['wall_s']} s")


if __name__ == "__main__":
    main()
