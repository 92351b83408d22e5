"""The test process itself, as the live tests need it (see conftest.py)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest


def _hugepage_vmas() -> list[tuple[str, str]]:
    """(VMA, VmFlags) of this process's VMAs with VM_HUGEPAGE ("hg")."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    heads = [ln for ln in lines if ln[:1].isalnum() and "-" in ln.split()[0]
             and not ln.split()[0].endswith(":")]
    flags = [ln for ln in lines if ln.startswith("VmFlags:")]
    return [(h, f) for h, f in zip(heads, flags, strict=True) if " hg" in f]


def test_numpy_leaves_this_process_off_khugepageds_list() -> None:
    """A large array without MADV_HUGEPAGE: pytest's mm never joins khugepaged's list,
    where it would take passes the live tests' model gives to the workload."""
    import numpy as np

    a = np.ones(1 << 22)  # 32 MiB: numpy madvises from 4 MiB unless told not to
    a[::512] = 2.0
    assert _hugepage_vmas() == []
    del a


def test_parquet_leaves_this_process_off_khugepageds_list() -> None:
    pd = pytest.importorskip("pandas", reason="the sweep extra is not installed")
    buf = io.BytesIO()
    pd.DataFrame({"a": range(100_000)}).to_parquet(buf)
    buf.seek(0)
    assert len(pd.read_parquet(buf)) == 100_000
    assert _hugepage_vmas() == []  # mimalloc, pyarrow's default pool, would reserve one
