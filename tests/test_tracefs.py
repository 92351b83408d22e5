"""KSM's tracepoints (live/tracefs.py) against a fake tracefs tree, the parser on
lines in the kernel's format, the labelling in the lab's names (events.py) and the
journal's tracing part.

Every write (and mount/umount) is recorded in ``fs.writes``; the exact sequence is
asserted, and that every file is back as found.
"""

from __future__ import annotations

import errno
import json
import time
from pathlib import Path

import pytest

from ksmlab import events
from ksmlab.live.journal import Journal, RunLock
from ksmlab.live.kernelfs import KernelWriteError
from ksmlab.live.run import restore_journal
from ksmlab.live.tracefs import TRACING, KernelEvents, parse, parse_line
from ksmlab.trace import Trace

from .conftest import FakeKernel

T = TRACING
INST = f"{T}/instances/ksmlab"  # the lab's own instance
EV = f"{INST}/events/ksm"
KSM_EVENTS = ("ksm_advisor", "ksm_enter", "ksm_exit", "ksm_merge_one_page",
              "ksm_merge_with_ksm_page", "ksm_remove_ksm_page", "ksm_remove_rmap_item",
              "ksm_start_scan", "ksm_stop_scan")
# lines as trace_pipe prints them (6.18, default options: irq-info on)
LINES = (Path(__file__).parent / "data" / "ksm_trace_pipe.txt").read_text()


class FakeTracefs(FakeKernel):
    """FakeKernel plus a tracefs that appears at mount and goes at umount."""

    def __init__(self, root: Path, mounted: bool = False, ksm_events: bool = True,
                 pipe: str = LINES, missing: tuple[str, ...] = ()) -> None:
        super().__init__(root)
        self.ksm_events = ksm_events
        self.missing = missing  # events/ksm events this kernel lacks
        self.pipe = pipe
        self.path(T).mkdir(parents=True, exist_ok=True)
        self.path("proc/self").mkdir(parents=True, exist_ok=True)
        self.path("proc/self/mounts").write_text("sysfs /sys sysfs rw 0 0\n")
        if mounted:
            self._populate()
            self._mounts(add=True)

    def _mounts(self, add: bool) -> None:
        p = self.path("proc/self/mounts")
        lines = [x for x in p.read_text().splitlines() if "tracefs" not in x]
        if add:
            lines.append(f"tracefs /{T} tracefs rw 0 0")
        p.write_text("\n".join(lines) + "\n")

    def _populate(self, base: str = T, top: bool = True) -> None:
        files = {
            "tracing_on": "1",
            "buffer_size_kb": "7 (expanded: 1408)",
            "trace_clock": "[local] global counter uptime perf mono mono_raw boot",
            "current_tracer": "nop",
            "set_event": "",
            "trace": "",
            "trace_pipe": self.pipe,
            "per_cpu/cpu0/stats": "entries: 0\noverrun: 0\ncommit overrun: 0\n",
            "per_cpu/cpu1/stats": "entries: 0\noverrun: 2\ncommit overrun: 0\n",
        }
        if self.ksm_events:
            files["events/ksm/enable"] = "0"
            for e in KSM_EVENTS:
                if e not in self.missing:
                    files[f"events/ksm/{e}/enable"] = "0"
        files["events/kmem/rss_stat/enable"] = "0"
        files["events/kmem/rss_stat/filter"] = "none"
        if not top:  # an instance: its own buffer and events, no tracer of its own
            del files["current_tracer"]
            files["tracing_on"] = "1"
            files["trace_pipe"] = self.pipe
        for rel, text in files.items():
            p = self.path(f"{base}/{rel}")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text + "\n")
        if top:
            self.path(f"{base}/instances").mkdir(exist_ok=True)
            self.path(f"{base}/trace_pipe").write_text("")  # the top level: not ours

    def mkdir(self, rel: str) -> None:
        self.writes.append((rel, "mkdir"))
        if self.path(rel).exists():
            raise KernelWriteError(rel, "mkdir", errno.EEXIST)
        self.path(rel).mkdir()
        self._populate(rel, top=False)

    def rmdir(self, rel: str) -> None:
        self.writes.append((rel, "rmdir"))
        _rmtree(self.path(rel))

    def write(self, rel: str, value: str) -> None:
        if rel.endswith("trace_clock") and rel not in self.refuse:
            choices = self.read(rel).replace("[", "").replace("]", "").split()
            super().write(rel, " ".join(f"[{c}]" if c == value else c for c in choices))
            self.writes[-1] = (rel, value)
            return
        super().write(rel, value)

    def mount(self, rel: str, fstype: str) -> None:
        self.writes.append((rel, f"mount {fstype}"))
        self._populate()
        self._mounts(add=True)

    def umount(self, rel: str) -> None:
        self.writes.append((rel, "umount"))
        if any(self.path(f"{rel}/instances").iterdir()):
            raise KernelWriteError(rel, "umount", errno.EBUSY)  # as an instance pins it
        for p in sorted(self.path(rel).iterdir()):
            _rmtree(p)
        self._mounts(add=False)

    def snapshot(self) -> dict[str, str]:
        base = self.path(T)
        return {str(p.relative_to(base)): p.read_text().strip() for p in base.rglob("*")
                if p.is_file()}


def _rmtree(p: Path) -> None:
    if p.is_dir():
        for c in p.iterdir():
            _rmtree(c)
        p.rmdir()
    else:
        p.unlink()


@pytest.fixture
def tfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeTracefs:
    from .conftest import make_fake_tree

    root = tmp_path / "root"
    make_fake_tree(root)
    monkeypatch.setenv("KSMLAB_STATE_DIR", str(tmp_path / "state"))
    return FakeTracefs(root)


def _setup_writes(mount: bool) -> list[tuple[str, str]]:
    out = [(T, "mount tracefs")] if mount else []
    out += [(INST, "mkdir"), (f"{INST}/tracing_on", "0"), (f"{INST}/buffer_size_kb", "8192"),
            (f"{INST}/trace_clock", "mono")]
    out += [(f"{EV}/{e}/enable", "1") for e in KSM_EVENTS]
    out += [(f"{INST}/tracing_on", "1")]
    return out


def test_mounts_creates_its_instance_reads_and_puts_everything_back(tfs: FakeTracefs
                                                                    ) -> None:
    journal = Journal()
    with KernelEvents(tfs, journal) as kev:
        assert kev.start()
        assert tfs.writes == _setup_writes(mount=True)
        rec = journal.read()
        assert rec is not None and rec.tracing is not None
        assert rec.tracing == {"mount": "mounted", "instance": INST, "saved": []}
        time.sleep(0.05)
        got = kev.stop()
        assert [e["event"] for e in got][:3] == ["ksm_enter", "ksm_enter", "ksm_start_scan"]
        assert kev.lost == 2 + 5  # per_cpu overrun + the pipe's LOST line
        assert any("lost 7" in n for n in kev.notes)
    # restore: tracing_on off at stop, then the instance goes whole, then umount
    tail = tfs.writes[len(_setup_writes(True)):]
    assert tail == [(f"{INST}/tracing_on", "0"), (INST, "rmdir"), (T, "umount")]
    assert tfs.mounted(T) is None
    assert journal.read() is None and not journal.path.exists()


def test_someone_elses_tracing_and_buffer_are_never_touched(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """Another user's tracer, events and top-level buffer (with a marker in it): the run
    records in its own instance and leaves every top-level file as it was."""
    from .conftest import make_fake_tree

    make_fake_tree(tmp_path / "root")
    monkeypatch.setenv("KSMLAB_STATE_DIR", str(tmp_path / "state"))
    fs = FakeTracefs(tmp_path / "root", mounted=True)
    fs.path(f"{T}/set_event").write_text("sched:sched_switch\n")
    fs.path(f"{T}/current_tracer").write_text("function\n")
    fs.path(f"{T}/trace").write_text("  bash-1 [000] ..... 1.0: tracing_mark_write: theirs\n")
    fs.path(f"{T}/instances/theirs").mkdir()
    before = fs.snapshot()
    with KernelEvents(fs, Journal()) as kev:
        assert kev.start()
        kev.stop()
    assert not any(rel.startswith(f"{T}/") and not rel.startswith(INST) for rel, _ in fs.writes)
    assert fs.snapshot() == before
    assert fs.mounted(T) == "tracefs"


def test_no_ksm_events_records_nothing_and_unmounts(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from .conftest import make_fake_tree

    make_fake_tree(tmp_path / "root")
    monkeypatch.setenv("KSMLAB_STATE_DIR", str(tmp_path / "state"))
    fs = FakeTracefs(tmp_path / "root", ksm_events=False)
    kev = KernelEvents(fs, Journal())
    assert not kev.start()
    assert kev.stop() == []
    assert fs.writes == [(T, "mount tracefs"), (T, "umount")]
    assert kev.notes == ["no kernel events: this kernel has no KSM tracepoints "
                         "(events/ksm is missing)"]
    assert not Journal().path.exists()


def test_no_tracefs_at_all(fake: FakeKernel) -> None:
    kev = KernelEvents(fake, Journal())
    assert not kev.start()
    kev.restore()
    assert fake.writes == []
    assert "CONFIG_TRACING=n" in kev.notes[0]


def test_an_instance_of_that_name_not_ours_is_left_alone(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    from .conftest import make_fake_tree

    make_fake_tree(tmp_path / "root")
    monkeypatch.setenv("KSMLAB_STATE_DIR", str(tmp_path / "state"))
    fs = FakeTracefs(tmp_path / "root", mounted=True)
    fs.path(INST).mkdir()
    kev = KernelEvents(fs, Journal())
    assert not kev.start()
    assert fs.writes == []
    assert "instances/ksmlab exists" in kev.notes[0]
    assert fs.path(INST).exists()


def test_a_refused_write_removes_the_instance(tfs: FakeTracefs) -> None:
    tfs.refuse[f"{EV}/ksm_enter/enable"] = errno.EPERM
    kev = KernelEvents(tfs, Journal())
    assert not kev.start()
    assert "tracefs set-up failed" in kev.notes[0]
    assert tfs.writes == [
        (T, "mount tracefs"), (INST, "mkdir"), (f"{INST}/tracing_on", "0"),
        (f"{INST}/buffer_size_kb", "8192"), (f"{INST}/trace_clock", "mono"),
        (f"{EV}/ksm_advisor/enable", "1"), (f"{EV}/ksm_enter/enable", "1"),
        (INST, "rmdir"), (T, "umount"),
    ]
    assert not Journal().path.exists()


def test_killed_run_journal_removes_the_instance_and_unmounts(tfs: FakeTracefs) -> None:
    journal = Journal()
    kev = KernelEvents(tfs, journal)
    assert kev.start()
    kev._close_pipe()  # the process "dies": no stop, no restore
    rec = json.loads(journal.path.read_text())
    assert rec["tracing"]["mount"] == "mounted" and rec["saved"] == []
    n = len(tfs.writes)
    done = restore_journal(tfs, Journal(), RunLock())
    assert tfs.writes[n:] == [(INST, "rmdir"), (T, "umount")]
    assert (T, "unmounted") in done
    assert tfs.mounted(T) is None
    assert not journal.path.exists()


def test_a_journal_listing_top_level_files_puts_them_back(tfs: FakeTracefs) -> None:
    """A journal may list top-level files under ``saved``: they are written back."""
    tfs.mount(T, "tracefs")
    tfs.writes.clear()
    tfs.path(f"{T}/tracing_on").write_text("0\n")
    Journal().write_tracing({"mount": "mounted", "saved": [[f"{T}/tracing_on", "1"]]})
    restore_journal(tfs, Journal(), RunLock())
    assert tfs.writes == [(f"{T}/tracing_on", "1"), (T, "umount")]


def test_knob_restore_keeps_a_pending_tracing_journal(tfs: FakeTracefs) -> None:
    from ksmlab.live.knobs import KnobSession

    journal = Journal()
    with KnobSession(tfs, journal) as ks:
        ks.set("ksm/pages_to_scan", 1000)
        kev = KernelEvents(tfs, journal)
        assert kev.start()
        kev._close_pipe()
    rec = journal.read()  # the knobs are back; tracing still to undo
    assert rec is not None and rec.saved == [] and rec.tracing is not None
    restore_journal(tfs, Journal(), RunLock())
    assert not journal.path.exists()
    assert tfs.mounted(T) is None


def test_failed_rmdir_keeps_the_journal_and_the_mount(tfs: FakeTracefs) -> None:
    from ksmlab.live.tracefs import TracingError

    journal = Journal()
    kev = KernelEvents(tfs, journal)
    assert kev.start()

    def busy(rel: str) -> None:
        raise KernelWriteError(rel, "rmdir", errno.EBUSY)

    tfs.rmdir = busy  # type: ignore[method-assign]
    with pytest.raises(TracingError, match="rmdir"):
        kev.restore()
    rec = journal.read()
    assert rec is not None and rec.tracing is not None
    assert tfs.mounted(T) == "tracefs"


def test_take_hands_over_whole_lines(tfs: FakeTracefs) -> None:
    kev = KernelEvents(tfs, Journal())
    kev._chunks = [b"a\nb", b"c\nd"]
    assert kev.take() == ("a\nbc\n", 0)
    assert kev._chunks == [b"d"]


# ---- the parser ---------------------------------------------------------------------


def test_parse_lines_in_the_kernels_format() -> None:
    evs, lost = parse(LINES)
    assert lost == 5
    assert len(evs) == 15
    assert evs[0] == {"event": "ksm_enter", "ts": 812.100001, "cpu": 0, "pid": 3101,
                      "mm": "00000000a1b2c3d4"}
    assert evs[2] == {"event": "ksm_start_scan", "ts": 813.00001, "cpu": 1, "pid": 41,
                      "seq": 0, "rmap_entries": 0}
    assert evs[5] == {"event": "ksm_merge_with_ksm_page", "ts": 813.020011, "cpu": 1,
                      "pid": 41, "ksm_page": False, "pfn": 1000,
                      "rmap_item": "00000000deadbeef", "mm": "00000000a1b2c3d4", "err": 0}
    assert evs[6]["ksm_page"] is True and evs[7]["err"] == -14
    assert evs[8]["event"] == "ksm_merge_one_page" and evs[8]["pfn"] == 77
    assert evs[11]["event"] == "ksm_remove_rmap_item" and "err" not in evs[11]
    assert evs[12] == {"event": "ksm_remove_ksm_page", "ts": 813.500001, "cpu": 0, "pid": 41,
                       "pfn": 1000}
    assert evs[13]["scan_time"] == 12 and evs[13]["cpu_percent"] == 3


def test_parse_without_irq_info_and_with_tgid() -> None:
    a = parse_line("            ksmd-41    [001]   813.000010: ksm_start_scan: seq 2 rmap size 9")
    b = parse_line("            ksmd-41    (     41) [001] d..1.   813.000010: ksm_stop_scan: "
                   "seq 2 rmap size 9")
    assert a is not None and b is not None
    assert a["seq"] == b["seq"] == 2 and b["rmap_entries"] == 9
    c = parse_line("  ksmd-41 [000] ..... 1.000000: ksm_new_event: something else")
    assert c is not None and c["raw"] == "something else"
    assert parse_line("# tracer: nop") is None


# ---- in the lab's names -------------------------------------------------------------


def test_label_names_processes_scans_pages_and_rmap_items() -> None:
    raw, _ = parse(LINES)
    pfns = {1000: (0, 5), 2000: (1, 7)}
    out, notes = events.label(raw, {3101: 0, 3102: 1}, pfns, t0=812.0)
    assert [e.get("proc") for e in out[:2]] == [0, 1]
    assert out[0]["t"] == pytest.approx(0.100001)
    assert out[2]["scan"] == 0 and out[4]["scan"] == 1 and out[10]["scan"] == 1
    assert out[11]["scan"] is None  # between scans
    first, second, _failed, zero, again = out[5:10]
    assert first["page"] == [0, 5] and first["item"] == [0, 5]  # pfn is the item's page
    assert second["page"] == [0, 5] and second["item"] is None  # pfn is the KSM page's
    assert zero["page"] == "zero" and zero["proc"] == 1
    assert again["item"] == [0, 5]  # the rmap item named before
    assert out[-1]["proc"] is None and "not the workload's" in notes[0]
    ms = events.merges(out)
    assert ms == [events.Merge(1, 1, None, [0, 5]), events.Merge(1, 1, None, "zero"),
                  events.Merge(1, 0, [0, 5], [0, 5])]


def test_compare_streams_position_by_position() -> None:
    def m(scan: int, proc: int, page: list[int] | None, into: object, err: int = 0
          ) -> dict[str, object]:
        return {"event": "ksm_merge_with_ksm_page", "scan": scan, "proc": proc, "item": page,
                "page": into, "ksm_page": True, "err": err}

    stop2 = {"event": "ksm_stop_scan", "seq": 2}
    kernel = [m(1, 0, None, [0, 1]), m(1, 0, [0, 3], [0, 1]), m(1, 0, [0, 4], [0, 1], -14),
              m(2, 1, None, [1, 0]), stop2]
    # the model ran one full scan more in the same time: not compared
    model = [m(1, 0, [0, 2], [0, 1]), m(1, 0, [0, 3], [0, 1]), m(2, 1, [1, 9], [0, 0]), stop2,
             m(3, 1, [1, 5], [0, 0]), {"event": "ksm_stop_scan", "seq": 3}]
    fit = events.compare(kernel, model)
    assert fit.scans == 3
    assert (fit.merges_kernel, fit.merges_model) == (3, 3)
    assert (fit.attempts_kernel, fit.attempts_model) == (4, 3)
    assert fit.identical_share == pytest.approx(2 / 3)
    assert fit.page_known_share == pytest.approx(1 / 3)
    d = fit.first_divergence
    assert d is not None and d["scan"] == 2 and d["index"] == 0
    assert d["kernel"]["into"] == [1, 0] and d["model"]["into"] == [0, 0]
    assert "first divergence: full scan 2" in events.text(fit)


def test_trace_keeps_the_stream_and_old_traces_load(tmp_path: Path) -> None:
    tr = Trace.from_rows({"source": "live"}, [{"t": 0.0, "full_scans": 0.0}])
    tr.kernel_events = {"source": "tracefs", "recorded": True, "events": [{"event": "x"}]}
    back = Trace.load(tr.save(tmp_path / "a.trace.json.gz"))
    assert back.kernel_events == tr.kernel_events
    old = Trace.from_rows({"source": "live"}, [{"t": 0.0}])
    data = old.to_json()
    assert "kernel_events" not in data
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert Trace.load(tmp_path / "old.json").kernel_events is None


def test_doctor_status_reads_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  fake: FakeKernel) -> None:
    from ksmlab.live.tracefs import tracefs_status

    assert "CONFIG_TRACING=n" in tracefs_status(fake)
    from .conftest import make_fake_tree

    make_fake_tree(tmp_path / "r2")
    fs = FakeTracefs(tmp_path / "r2")
    assert "not mounted" in tracefs_status(fs)
    fs = FakeTracefs(tmp_path / "r2", mounted=True)
    assert tracefs_status(fs) == "tracefs mounted, events/ksm present"
    assert fs.writes == []


def test_the_advisor_alone_enables_only_ksm_advisor(tfs: FakeTracefs) -> None:
    """A run with the scan-time advisor but without KSM's event stream records the
    ksm_advisor tracepoint alone (one event per full scan: a small buffer), with the
    same mount, journal and restore rules."""
    with KernelEvents(tfs, Journal(), 256, only=("ksm_advisor",)) as kev:
        assert kev.start()
        assert kev.names == ["ksm_advisor"]
        assert tfs.writes == [
            (T, "mount tracefs"), (INST, "mkdir"), (f"{INST}/tracing_on", "0"),
            (f"{INST}/buffer_size_kb", "256"), (f"{INST}/trace_clock", "mono"),
            (f"{EV}/ksm_advisor/enable", "1"), (f"{INST}/tracing_on", "1")]
        time.sleep(0.05)
        got = [e for e in kev.stop() if e["event"] == "ksm_advisor"]
        assert got[0]["scan_time"] == 12 and got[0]["pages_to_scan"] == 100
    assert tfs.writes[7:] == [(f"{INST}/tracing_on", "0"), (INST, "rmdir"), (T, "umount")]
    assert tfs.mounted(T) is None and not Journal().path.exists()


def test_a_kernel_without_ksm_advisor_records_no_decisions(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    from .conftest import make_fake_tree

    make_fake_tree(tmp_path / "root")
    monkeypatch.setenv("KSMLAB_STATE_DIR", str(tmp_path / "state"))
    fs = FakeTracefs(tmp_path / "root", mounted=True, missing=("ksm_advisor",))
    kev = KernelEvents(fs, Journal(), only=("ksm_advisor",))
    assert not kev.start()
    assert "none of events/ksm/ksm_advisor" in kev.notes[0]
    assert fs.writes == [(INST, "mkdir"), (INST, "rmdir")]
    assert not fs.path(INST).exists()


def test_extra_events_get_their_filter_in_the_instance(tfs: FakeTracefs) -> None:
    with KernelEvents(tfs, Journal(), only=("ksm_merge_one_page",), instance="ksmlab-watch",
                      extra={"kmem/rss_stat": "curr == 0"}) as kev:
        assert kev.start()
        w = f"{T}/instances/ksmlab-watch"
        assert (f"{w}/events/kmem/rss_stat/filter", "curr == 0") in tfs.writes
        assert (f"{w}/events/kmem/rss_stat/enable", "1") in tfs.writes
        assert not any(rel.startswith(f"{T}/events") for rel, _ in tfs.writes)
