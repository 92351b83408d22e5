"""Scenario files: parse, validate, defaults, built-ins.

A scenario is a TOML file read with ``tomllib`` and validated by pydantic
(unknown fields are errors).  The live lab and the model read the same file;
knob names are the kernel's own (``/sys/kernel/mm/ksm/*``,
``/sys/kernel/mm/transparent_hugepage/*``).
"""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .constants import HPAGE_PMD_NR as HPAGE_PMD_NR  # re-exported: scenarios speak in them
from .constants import HPAGE_PMD_SIZE as HPAGE_PMD_SIZE
from .constants import PAGE_SIZE as PAGE_SIZE

MiB = 1 << 20
U32 = (1 << 32) - 1
KHUGEPAGED_PARKED_MS = 86_400_000  # a day: khugepaged's own timer never fires in a run


class ScenarioError(ValueError):
    """A scenario that cannot be read or is not valid; the message is one line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ContentMix(_Strict):
    """Contents of each 2 MiB chunk: fractions of its 512 pages.

    ``zero`` pages are all-zero (content id 0); ``duplicate`` pages take ids from
    a pool shared by every region of the scenario, so they repeat across chunks,
    regions and processes; the rest are unique.  ``weight`` picks a mix per chunk
    when a region lists several (for example a bimodal fill).
    """

    zero: float = Field(0.0, ge=0.0, le=1.0)
    duplicate: float = Field(0.0, ge=0.0, le=1.0)
    weight: float = Field(1.0, gt=0.0)

    @model_validator(mode="after")
    def _sums(self) -> ContentMix:
        if self.zero + self.duplicate > 1.0 + 1e-9:
            raise ValueError("zero + duplicate must not exceed 1")
        return self

    @property
    def unique(self) -> float:
        return max(0.0, 1.0 - self.zero - self.duplicate)

    def counts(self) -> tuple[int, int, int]:
        """(zero, duplicate, unique) page counts in one 2 MiB chunk."""
        nz = round(self.zero * HPAGE_PMD_NR)
        nd = min(round(self.duplicate * HPAGE_PMD_NR), HPAGE_PMD_NR - nz)
        return nz, nd, HPAGE_PMD_NR - nz - nd


class Region(_Strict):
    """One anonymous mapping, 2 MiB aligned, filled page by page from content ids."""

    size_mib: int = Field(gt=0, description="size in MiB, a multiple of 2")
    # MADV_HUGEPAGE, MADV_NOHUGEPAGE, or no advice (THP per transparent_hugepage/enabled)
    thp: Literal["hugepage", "nohugepage", "default"] = "hugepage"
    # MADV_MERGEABLE on this region (ignored when the process uses prctl or none)
    mergeable: bool = True
    content: list[ContentMix] = Field(default_factory=lambda: [ContentMix(zero=1.0)], min_length=1)
    seed: int = Field(0, ge=0)
    # the workload rewrites this many random pages per second with fresh unique ids
    # (its timing against ksmd's cursor is not reproducible: see volatile_pages_per_scan)
    volatile_pages_per_s: float = Field(0.0, ge=0.0)
    # ... or this many at every full-scan end, while ksmd sleeps: reproducible
    volatile_pages_per_scan: int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _one_mix(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("content"), dict):
            data = {**data, "content": [data["content"]]}
        return data

    @model_validator(mode="after")
    def _aligned(self) -> Region:
        if self.size_mib % 2:
            raise ValueError("size_mib must be a multiple of 2 (whole THPs)")
        return self

    @property
    def pages(self) -> int:
        return self.size_mib * MiB // PAGE_SIZE

    @property
    def chunks(self) -> int:
        return self.pages // HPAGE_PMD_NR


class Process(_Strict):
    """A workload process (a guest, say); ``count`` identical copies of it."""

    name: str = "workload"
    count: int = Field(1, ge=1)
    # how merging is enabled: madvise(MADV_MERGEABLE) per region, or
    # prctl(PR_SET_MEMORY_MERGE) for the whole process before it maps anything
    merge: Literal["madvise", "prctl", "none"] = "madvise"
    region: list[Region] = Field(default_factory=list)
    # instead of regions: the memory of a captured process (`ksmlab capture`): the
    # folder, and which of its processes
    image: str | None = None
    image_process: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _memory(self) -> Process:
        if (self.image is None) == (not self.region):
            raise ValueError("a process has regions or an image (one of them)")
        if self.image is not None:
            from .image import ImageError, load_meta

            try:
                meta = load_meta(self.image)
            except ImageError as e:
                raise ValueError(str(e)) from None
            if self.image_process >= len(meta.processes):
                raise ValueError(f"image_process {self.image_process}: the image holds "
                                 f"{len(meta.processes)} process(es)")
        return self

    @property
    def pages(self) -> int:
        """4 KiB pages of one copy: its regions, or the captured VMAs of its image."""
        if self.image is not None:
            from .image import load_meta

            return load_meta(self.image).processes[self.image_process].pages
        return sum(r.pages for r in self.region)


class KsmKnobs(_Strict):
    """/sys/kernel/mm/ksm knobs a scenario sets; defaults are the kernel's."""

    pages_to_scan: int = Field(100, ge=1, le=1_000_000)
    sleep_millisecs: int = Field(20, ge=0, le=60_000)
    use_zero_pages: Literal[0, 1] = 0
    smart_scan: Literal[0, 1] = 1
    max_page_sharing: int = Field(256, ge=2, le=1_000_000)
    merge_across_nodes: Literal[0, 1] = 1
    stable_node_chains_prune_millisecs: int = Field(2000, ge=1)
    # the scan-time advisor (Linux 6.8): ksmd sets pages_to_scan itself after every
    # full scan (scan_time_advisor() in mm/ksm.c, model/advisor.py).  Switching it on
    # sets pages_to_scan to advisor_min_pages_to_scan (advisor_mode_store()), so with
    # "scan-time" pages_to_scan is that value here too: leave it out (_advisor_pages)
    advisor_mode: Literal["none", "scan-time"] = "none"
    advisor_max_cpu: int = Field(70, ge=1, le=100)  # percent of a CPU
    advisor_min_pages_to_scan: int = Field(500, ge=1, le=1_000_000)  # as pages_to_scan
    advisor_max_pages_to_scan: int = Field(30000, ge=1, le=U32)
    advisor_target_scan_time: int = Field(200, ge=1, le=U32)  # seconds

    @model_validator(mode="before")
    @classmethod
    def _advisor_pages(cls, data: Any) -> Any:
        """With advisor_mode scan-time the kernel starts at advisor_min_pages_to_scan
        and then decides pages_to_scan itself; a scenario cannot set it."""
        if not isinstance(data, dict) or data.get("advisor_mode") != "scan-time":
            return data
        start = data.get("advisor_min_pages_to_scan", 500)
        given = data.get("pages_to_scan")
        if given is not None and given != start:
            raise ValueError(f"pages_to_scan {given} with advisor_mode scan-time: the advisor "
                             f"sets it, starting at advisor_min_pages_to_scan ({start}; "
                             "advisor_mode_store()): leave pages_to_scan out")
        return {**data, "pages_to_scan": start}


class KhugepagedKnobs(_Strict):
    max_ptes_none: int = Field(511, ge=0, le=511)
    pages_to_scan: int = Field(4096, ge=1)
    scan_sleep_millisecs: int = Field(10000, ge=0)
    alloc_sleep_millisecs: int = Field(60000, ge=0)
    defrag: Literal[0, 1] = 1


# Anonymous large-folio sizes on x86-64, orders 2..9 (THP_ORDERS_ALL_ANON in
# include/linux/huge_mm.h): hugepages-<N>kB/enabled, multi-size THP (Linux 6.8)
PMD_ORDER = 9
FOLIO_ORDERS: dict[str, int] = {f"{4 << order}kB": order for order in range(2, PMD_ORDER + 1)}
SizeMode = Literal["always", "inherit", "madvise", "never"]


def folio_size_name(order: int) -> str:
    """The kernel's name of an order's size (``hugepages-<this>``): 4 -> ``64kB``."""
    return f"{4 << order}kB"


class ThpKnobs(_Strict):
    """/sys/kernel/mm/transparent_hugepage knobs; defaults as these machines boot."""

    enabled: Literal["always", "madvise", "never"] = "madvise"
    defrag: Literal["always", "defer", "defer+madvise", "madvise", "never"] = "madvise"
    use_zero_page: Literal[0, 1] = 1
    shrink_underused: Literal[0, 1] = 1
    khugepaged: KhugepagedKnobs = KhugepagedKnobs()
    # hugepages-<size>/enabled by size ("64kB" = "always"); a size left out is as
    # these machines boot: 2048kB "inherit" (follows `enabled`), the others "never"
    hugepages: dict[str, SizeMode] = Field(default_factory=dict)

    @field_validator("hugepages")
    @classmethod
    def _anon_sizes(cls, v: dict[str, SizeMode]) -> dict[str, SizeMode]:
        for size in v:
            if size not in FOLIO_ORDERS:
                raise ValueError(f"{size!r} is not an anonymous folio size here (one of "
                                 f"{', '.join(FOLIO_ORDERS)})")
        return v

    def size_mode(self, order: int) -> SizeMode:
        default: SizeMode = "inherit" if order == PMD_ORDER else "never"
        return self.hugepages.get(folio_size_name(order), default)

    @property
    def mthp_orders(self) -> list[int]:
        """Orders below PMD that some VMA may get (mode not never), highest first."""
        return [o for o in range(PMD_ORDER - 1, 1, -1) if self.size_mode(o) != "never"]

    def order_allowed(self, order: int, hugepage: bool, nohugepage: bool) -> bool:
        """thp_vma_allowable_orders() for one order of an anon VMA with VM_HUGEPAGE /
        VM_NOHUGEPAGE as given: the per-size mode, "inherit" following `enabled`
        (huge_anon_orders_always/madvise/inherit)."""
        if nohugepage:
            return False
        mode = self.size_mode(order)
        if mode == "inherit":
            return self.enabled == "always" or (self.enabled == "madvise" and hugepage)
        return mode == "always" or (mode == "madvise" and hugepage)

    def fault_order(self, thp: Literal["hugepage", "nohugepage", "default"]) -> int:
        """The folio order a write fault gets in a fresh region with this advice (0:
        4 KiB pages): PMD first (do_huge_pmd_anonymous_page()), else the highest
        allowed smaller order (alloc_anon_folio()); allocation never fails here."""
        for order in (PMD_ORDER, *self.mthp_orders):
            if self.order_allowed(order, thp == "hugepage", thp == "nohugepage"):
                return order
        return 0


class _Event(_Strict):
    at: float = Field(ge=0.0, description="seconds after the workload is ready")


class KsmStart(_Event):
    action: Literal["ksm_start"]


class KsmStop(_Event):
    action: Literal["ksm_stop"]


class KsmUnmerge(_Event):
    """run=2: unmerge everything and free all rmap items (full_scans -> 0)."""

    action: Literal["ksm_unmerge"]


class Write(_Event):
    """Rewrite a fraction of one region's pages with new content."""

    action: Literal["write"]
    process: int = Field(0, ge=0)
    region: int = Field(0, ge=0)
    fraction: float = Field(gt=0.0, le=1.0)
    content: Literal["zero", "unique"] = "unique"
    seed: int = Field(0, ge=0)


class Pressure(_Event):
    """Memory pressure: ``echo 3 > /proc/sys/vm/drop_caches`` drains the per-CPU LRU
    batches and runs the shrinkers (the underused-THP one among them)."""

    action: Literal["pressure"]


class KhugepagedWake(_Event):
    """One khugepaged pass now: rewriting khugepaged/scan_sleep_millisecs wakes it
    (scan_sleep_millisecs_store() in mm/khugepaged.c) and restarts its timer."""

    action: Literal["khugepaged"]


class SetKnob(_Event):
    """Change one knob mid-run, named as in the scenario: ``ksm.pages_to_scan``,
    ``thp.shrink_underused``, ``thp.khugepaged.max_ptes_none``."""

    action: Literal["set"]
    knob: str
    value: int | str

    @model_validator(mode="after")
    def _known(self) -> SetKnob:
        parts = self.knob.split(".")
        owners: dict[str, type[BaseModel]] = {"ksm": KsmKnobs, "thp": ThpKnobs}
        owner = owners.get(parts[0])
        if owner is ThpKnobs and len(parts) == 3 and parts[1] == "khugepaged":
            owner, parts = KhugepagedKnobs, parts[1:]
        if owner is None or len(parts) != 2 or parts[1] not in owner.model_fields:
            raise ValueError(f"{self.knob} is not a scenario knob (ksm.*, thp.*, "
                             "thp.khugepaged.*)")
        owner.model_validate({parts[1]: self.value})  # the field's own type and range
        return self

    @property
    def sysfs_name(self) -> str:
        """The knob's path below /sys/kernel/mm (``ksm/pages_to_scan``)."""
        head, *rest = self.knob.split(".")
        return "/".join(["ksm" if head == "ksm" else "transparent_hugepage", *rest])


Event = Annotated[
    KsmStart | KsmStop | KsmUnmerge | Write | Pressure | KhugepagedWake | SetKnob,
    Field(discriminator="action"),
]


class Scenario(_Strict):
    # names files the lab writes (trace, plot): a plain file name, never a path, so
    # `name = "../../x"` cannot write outside -o DIR (as root, in a live run)
    name: str = Field(min_length=1, max_length=100)
    description: str = ""
    # up to a day: a model run of a large host needs hours of simulated time
    duration: float = Field(gt=0.0, le=86400.0, description="seconds after the workload is ready")
    sample_interval: float = Field(0.1, ge=0.01, le=1.0)
    # KSM's run=1 at this time (None: only by a ksm_start event)
    ksm_start_at: float | None = Field(0.0, ge=0.0)
    # None: every region is filled before time 0; else mapped (and made
    # mergeable) before time 0 and filled at this time
    fill_at: float | None = Field(None, ge=0.0)
    # true: while KSM runs, an event that falls due waits for the next full-scan end
    # and is applied while ksmd sleeps after it (fill_at too), so it meets the same
    # cursor position in the kernel and in the model; false: applied at its time
    align_events: bool = True
    # true: the lab drives khugepaged.  The kernel's own timer is parked (its
    # scan_sleep_millisecs set to a day for the run) and the lab wakes it every
    # thp.khugepaged.scan_sleep_millisecs instead (aligned like events): the kernel's
    # timer fires up to one timer-wheel granule late (256 ms at HZ=250 for 10 s) at a
    # phase nobody can know, so its passes could not be placed against ksmd's scans.
    drive_khugepaged: bool = True
    # duplicate pages take ids 1..duplicate_pool (cyclically within a chunk)
    duplicate_pool: int = Field(512, ge=1, le=1 << 20)
    ksm: KsmKnobs = KsmKnobs()
    thp: ThpKnobs = ThpKnobs()
    process: list[Process] = Field(min_length=1)
    event: list[Event] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _file_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", v):
            raise ValueError(f"{v!r} is not a plain file name (letters, digits, . _ + -; "
                             "it names the files a run writes)")
        return v

    @model_validator(mode="after")
    def _one_content_space(self) -> Scenario:
        # an image's content ids are its own (memcmp ranks of what it holds): they
        # mean nothing beside synthetic ids or another capture's
        images = {p.image for p in self.process}
        if len(images) > 1:
            raise ValueError("image processes cannot be mixed with region processes or "
                             "with other images (each capture numbers its own contents)")
        return self

    @model_validator(mode="after")
    def _events_fit(self) -> Scenario:
        for e in self.event:
            if isinstance(e, SetKnob) and e.knob == "ksm.advisor_mode":
                raise ValueError("ksm.advisor_mode cannot change mid-run (set it in [ksm])")
            if (isinstance(e, SetKnob) and e.knob == "ksm.pages_to_scan"
                    and self.ksm.advisor_mode == "scan-time"):
                raise ValueError("ksm.pages_to_scan cannot be set with advisor_mode scan-time "
                                 "(pages_to_scan_store() refuses it: EINVAL)")
            if (isinstance(e, SetKnob) and self.drive_khugepaged
                    and e.knob == "thp.khugepaged.scan_sleep_millisecs"):
                raise ValueError("thp.khugepaged.scan_sleep_millisecs cannot change mid-run "
                                 "while the lab drives khugepaged (drive_khugepaged)")
            if e.at > self.duration:
                raise ValueError(
                    f"event {e.action} at {e.at} s is after duration {self.duration} s"
                )
            if isinstance(e, Write):
                if e.process < len(self.process) and self.process[e.process].image:
                    raise ValueError(f"write event names process {e.process}, an image "
                                     "(its memory is what was captured)")
                if e.process >= len(self.process):
                    raise ValueError(f"write event names process {e.process}, which does not exist")
                if e.region >= len(self.process[e.process].region):
                    raise ValueError(f"write event names region {e.region}, which does not exist")
        return self

    def khugepaged_wakes(self) -> list[float]:
        """Times the lab wakes khugepaged (besides time 0), when it drives it."""
        period = self.thp.khugepaged.scan_sleep_millisecs / 1000.0
        if not self.drive_khugepaged or period <= 0:
            return []
        return [k * period for k in range(1, int(self.duration / period) + 1)]

    @property
    def khugepaged_wakes_at_start(self) -> bool:
        """The lab wakes khugepaged at time 0 (and the model makes that pass): not with
        a captured process, where khugepaged's cursor (somewhere in an mm it has
        scanned since the process began) cannot be known; validate --pid parks it."""
        return self.thp.enabled != "never" and all(p.image is None for p in self.process)

    def khugepaged_kernel_sleep_ms(self) -> int:
        """What khugepaged/scan_sleep_millisecs is in the kernel during the run."""
        return KHUGEPAGED_PARKED_MS if self.drive_khugepaged else (
            self.thp.khugepaged.scan_sleep_millisecs)

    @property
    def total_pages(self) -> int:
        return sum(p.count * p.pages for p in self.process)

    @property
    def total_mib(self) -> int:
        return -(-self.total_pages * PAGE_SIZE // MiB)

    def instances(self) -> list[tuple[int, int, Process]]:
        """(process index, replica, process) for every workload process to start."""
        return [(i, k, p) for i, p in enumerate(self.process) for k in range(p.count)]

    def with_duration(self, duration: float | None) -> Scenario:
        if duration is None:
            return self
        try:
            return Scenario.model_validate({**self.model_dump(), "duration": duration})
        except ValidationError as e:
            raise ScenarioError(_one_line(e, "--duration")) from None


def _one_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"]) or "(top level)"
    msg = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def builtin_names() -> list[str]:
    root = resources.files("ksmlab") / "scenarios"
    return sorted(p.name.removesuffix(".toml") for p in root.iterdir() if p.name.endswith(".toml"))


def parse(text: str, source: str = "<scenario>", base: Path | None = None) -> Scenario:
    """``base``: the folder a relative ``image`` is found from (the file's)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{source}: not valid TOML: {e}") from None
    for proc in data.get("process", []) if isinstance(data.get("process"), list) else []:
        if isinstance(proc, dict) and isinstance(proc.get("image"), str) and base is not None:
            proc["image"] = str((base / proc["image"]).resolve())
    try:
        return Scenario.model_validate(data)
    except ValidationError as e:
        raise ScenarioError(_one_line(e, source)) from None


def load(name_or_path: str) -> Scenario:
    """A built-in by name, or a TOML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        try:
            text = path.read_text()
        except OSError as e:
            raise ScenarioError(f"{name_or_path}: cannot read: {e.strerror}") from None
        return parse(text, str(path), path.parent)
    if name_or_path in builtin_names():
        text = (resources.files("ksmlab") / "scenarios" / f"{name_or_path}.toml").read_text()
        return parse(text, name_or_path)
    raise ScenarioError(
        f"{name_or_path}: no such built-in scenario or file (see `ksmlab scenarios`)"
    )
