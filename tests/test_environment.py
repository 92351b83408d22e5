"""The test process itself, as the live tests need it (see conftest.py)."""

from __future__ import annotations

from pathlib import Path


def test_numpy_leaves_this_process_off_khugepageds_list() -> None:
    """A large array without MADV_HUGEPAGE: pytest's mm never joins khugepaged's list,
    where it would take passes the live tests' model gives to the workload."""
    import numpy as np

    a = np.ones(1 << 22)  # 32 MiB: numpy madvises from 4 MiB unless told not to
    a[::512] = 2.0
    flags = [line for line in Path("/proc/self/smaps").read_text().splitlines()
             if line.startswith("VmFlags:")]
    assert not [f for f in flags if " hg" in f]
    del a
