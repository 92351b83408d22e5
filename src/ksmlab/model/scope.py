"""What the model represents: scenarios it refuses, and where it maps a captured VMA
(both engines)."""

from __future__ import annotations

from .. import image
from ..scenario import (
    HPAGE_PMD_NR,
    PAGE_SIZE,
    KhugepagedWake,
    KsmStart,
    KsmStop,
    KsmUnmerge,
    Pressure,
    Scenario,
    SetKnob,
    Write,
)


class ModelUnsupported(ValueError):
    """A scenario feature the model cannot represent (one-line message)."""


def check_supported(sc: Scenario) -> None:
    if sc.ksm.merge_across_nodes == 0:
        raise ModelUnsupported(
            "ksm.merge_across_nodes=0: the model has one NUMA node and no per-node trees"
        )
    if sc.thp.enabled != "never" and sc.thp.khugepaged.scan_sleep_millisecs == 0:
        raise ModelUnsupported(
            "thp.khugepaged.scan_sleep_millisecs=0: khugepaged without sleeps is not modelled"
        )
    for e in sc.event:
        if not isinstance(e, KsmStart | KsmStop | KsmUnmerge | Write | Pressure | SetKnob
                          | KhugepagedWake):
            raise ModelUnsupported(f"event {getattr(e, 'action', e)!r} is not modelled")


def image_span(iv: image.ImageVma) -> tuple[int, int]:
    """(lo, npages): a captured VMA's first page in the whole 2 MiB ranges the model
    maps it in, and their pages (both engines)."""
    lo = (iv.start // PAGE_SIZE) % HPAGE_PMD_NR
    return lo, -(-(lo + iv.pages) // HPAGE_PMD_NR) * HPAGE_PMD_NR
