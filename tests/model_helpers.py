"""Small hand-built worlds for the model's mechanism tests."""

from __future__ import annotations

from dataclasses import dataclass

from ksmlab.model.costs import DEFAULT_PROFILE, CpuMeter
from ksmlab.model.khugepaged import Khugepaged
from ksmlab.model.ksm import Ksm
from ksmlab.model.memory import Mm, System, Vma
from ksmlab.model.policies import get_policy
from ksmlab.model.thp import fill_fresh_vma
from ksmlab.scenario import KhugepagedKnobs, KsmKnobs, ThpKnobs


@dataclass
class World:
    sys: System
    ksm: Ksm
    mm: Mm
    vma: Vma
    khugepaged: Khugepaged

    def full_scan(self) -> None:
        """Run ksmd batches until one full scan ends."""
        for _ in range(100_000):
            if self.ksm.do_scan():
                return
        raise AssertionError("full scan never ended")

    @property
    def rss_pages(self) -> int:
        return self.mm.anon_rss

    def c(self, name: str) -> int:
        return self.ksm.counters()[name]


def world(
    ids: list[int],
    *,
    thp: bool = True,
    policy: str = "mainline",
    use_zero_pages: int = 0,
    pages_to_scan: int = 100,
    smart_scan: int = 1,
    max_page_sharing: int = 256,
    max_ptes_none: int = 511,
    shrink_underused: int = 1,
    hugepages: dict[str, str] | None = None,
) -> World:
    thp_knobs = ThpKnobs(
        enabled="madvise",
        shrink_underused=shrink_underused,  # type: ignore[arg-type]
        khugepaged=KhugepagedKnobs(max_ptes_none=max_ptes_none),
        hugepages=hugepages or {},  # type: ignore[arg-type]
    )
    sys = System(get_policy(policy), thp_knobs)
    sys.ksm_use_zero_pages = use_zero_pages
    knobs = KsmKnobs(
        pages_to_scan=pages_to_scan,
        use_zero_pages=use_zero_pages,  # type: ignore[arg-type]
        smart_scan=smart_scan,  # type: ignore[arg-type]
        max_page_sharing=max_page_sharing,
    )
    ksm = Ksm(sys, knobs, CpuMeter(DEFAULT_PROFILE))
    mm = Mm(1, "test")
    sys.mms.append(mm)
    vma = sys.mmap(mm, len(ids))
    vma.hugepage = thp
    vma.nohugepage = not thp
    vma.mergeable = True
    ksm.enter(mm)
    fill_fresh_vma(sys, vma, ids)
    khd = Khugepaged(sys, thp_knobs.khugepaged)
    khd.register(mm)
    ksm.run = 1
    sys.ksm_running = True
    return World(sys, ksm, mm, vma, khd)


def unique(n: int, base: int = 1 << 32) -> list[int]:
    return [base + i for i in range(n)]
