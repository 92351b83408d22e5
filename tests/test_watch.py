"""``ksmlab watch`` on the fake tree: it writes nothing and signals nothing, and its
figures follow the page tables: the zero-page remap counts as freed outside KSM's
account; a process's own munmap or MADV_DONTNEED, swap-out and KSM's own
zero-page merges do not; the verdicts come and go as live states."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ksmlab.live.kernelfs import (
    PAGE_IS_HUGE,
    PAGE_IS_PFNZERO,
    PAGE_IS_PRESENT,
    PAGE_IS_SWAPPED,
    ReadOnly,
)
from ksmlab.live.watch import HostReader, VmaPages, bucket
from ksmlab.monitor import Monitor, Snapshot

from .conftest import FakeKernel

MIB = 1 << 20
PAGES_2M = 512
KSMD = 40
BASE = 0x7F0000000000


class FakeHost(FakeKernel):
    """FakeKernel plus processes with mergeable VMAs whose page tables the test sets,
    ksmd, /proc/vmstat and PAGEMAP_SCAN answered from those page tables."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.pages: dict[int, dict[tuple[int, int], VmaPages]] = {}
        self.vmstat = {"thp_split_page": 0, "thp_split_page_failed": 0,
                       "thp_underused_split_page": 0, "thp_swpout_fallback": 0,
                       "nr_anon_transparent_hugepages": 0}
        self.write_file(f"proc/{KSMD}/comm", "ksmd")
        self.write_file(f"proc/{KSMD}/stat", self._stat(KSMD, "ksmd", 0))
        self.write_file("sys/kernel/mm/ksm/ksm_zero_pages", "0")
        self.write_file("sys/kernel/mm/ksm/pages_scanned", "0")
        self.flush()

    def write_file(self, rel: str, text: str) -> None:
        p = self.path(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text + "\n")

    @staticmethod
    def _stat(pid: int, comm: str, started: int, ticks: int = 0, vsize: int = 0,
              rss: int = 0) -> str:
        rest = (["S"] + ["0"] * 10 + [str(ticks), "0"] + ["0"] * 6
                + [str(started), str(vsize), str(rss)] + ["0"] * 20)
        return f"{pid} ({comm}) " + " ".join(rest)

    def ksm(self, **values: int) -> None:
        for k, v in values.items():
            self.write_file(f"sys/kernel/mm/ksm/{k}", str(v))

    def ksmd_ticks(self, ticks: int) -> None:
        self.write_file(f"proc/{KSMD}/stat", self._stat(KSMD, "ksmd", 0, ticks))

    def split(self, n: int = 1, **others: int) -> None:
        self.vmstat["thp_split_page"] += n
        for k, v in others.items():
            self.vmstat[k] += v
        self.flush()

    def flush(self) -> None:
        self.write_file("proc/vmstat", "\n".join(f"{k} {v}" for k, v in self.vmstat.items()))

    def process(self, pid: int, vmas: dict[tuple[int, int], VmaPages], comm: str = "qemu",
                started: int = 100, kzp: int = 0, merge_any: bool = False,
                mergeable: bool = True) -> None:
        self.pages[pid] = dict(vmas)
        d = f"proc/{pid}"
        self.write_file(f"{d}/comm", comm)
        present = sum(v.present for v in vmas.values())
        self.write_file(f"{d}/stat", self._stat(pid, comm, started,
                                                vsize=sum(e - s for s, e in vmas),
                                                rss=present))
        self.write_file(f"{d}/status", f"Name:\t{comm}\nRssAnon:\t{present * 4} kB")
        self.write_file(f"{d}/smaps_rollup",
                        f"Rss: {present * 4} kB\nAnonHugePages: "
                        f"{sum(v.huge for v in vmas.values()) * 4} kB")
        self.write_file(f"{d}/ksm_stat",
                        f"ksm_rmap_items 0\nksm_zero_pages {kzp}\nksm_merging_pages 0\n"
                        f"ksm_process_profit 0\nksm_merge_any: {'yes' if merge_any else 'no'}\n"
                        f"ksm_mergeable: {'yes' if mergeable else 'no'}")
        maps, smaps = [], []
        for s, e in sorted(vmas):
            line = f"{s:x}-{e:x} rw-p 00000000 00:00 0"
            maps.append(line)
            smaps += [line, f"Size: {(e - s) >> 10} kB", "VmFlags: rd wr mr mw me ac hg mg"]
        self.write_file(f"{d}/maps", "\n".join(maps))
        self.write_file(f"{d}/smaps", "\n".join(smaps))

    def gone(self, pid: int) -> None:
        shutil.rmtree(self.path(f"proc/{pid}"))
        self.pages.pop(pid, None)

    def scan_pages(self, pid: int, spans: list[tuple[int, int]], anyof: int, mask: int
                   ) -> list[tuple[int, int, int]]:
        """Each VMA laid out as: huge present, other present, zero, swapped, none."""
        out = []
        for (s, _e), v in sorted(self.pages.get(pid, {}).items()):
            at = s
            for n, cat in ((v.huge, PAGE_IS_PRESENT | PAGE_IS_HUGE),
                           (v.present - v.huge, PAGE_IS_PRESENT),
                           (v.zero, PAGE_IS_PRESENT | PAGE_IS_PFNZERO),
                           (v.swapped, PAGE_IS_SWAPPED)):
                if n:
                    out.append((at, at + n * 4096, cat & mask))
                    at += n * 4096
        return out


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHost:
    from .conftest import make_fake_tree

    root = tmp_path / "root"
    make_fake_tree(root)
    monkeypatch.setenv("KSMLAB_STATE_DIR", str(tmp_path / "state"))
    return FakeHost(root)


VMA = (BASE, BASE + 128 * MIB)
THPS = VmaPages(present=64 * PAGES_2M, zero=0, swapped=0, huge=64 * PAGES_2M)


def remapped(n_thp: int, zero_share: float = 1.0) -> VmaPages:
    """THPS after ``n_thp`` splits whose zero subpages were remapped."""
    z = int(n_thp * PAGES_2M * zero_share)
    return VmaPages(present=THPS.present - z, zero=z, swapped=0,
                    huge=THPS.huge - n_thp * PAGES_2M)


class Clock:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import ksmlab.live.watch as w

        self.now = 1000.0
        monkeypatch.setattr(w.time, "monotonic", lambda: self.now)
        monkeypatch.setattr(w.time, "time", lambda: self.now + 1.7e9)


def step(mon: Monitor, reader: HostReader, clock: Clock, dt: float = 1.0) -> Snapshot:
    clock.now += dt
    return mon.update(reader.read())


@pytest.fixture
def watched(host: FakeHost, monkeypatch: pytest.MonkeyPatch
            ) -> tuple[FakeHost, HostReader, Monitor, Clock]:
    clock = Clock(monkeypatch)
    return host, HostReader(ReadOnly(host)), Monitor(), clock


# ---- read-only by construction ----------------------------------------------------------


def test_watch_on_the_fake_tree_writes_nothing_and_signals_nothing(
        host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command against the fake tree: zero writes (the fake records every write,
    mount, mkdir and truncate), no signal sent to any process."""
    from ksmlab.cli import app
    from ksmlab.cli import watch as cli_watch

    host.ksm(run=1)
    host.process(4321, {VMA: THPS})
    monkeypatch.setattr(cli_watch, "kernel", lambda: host)

    def refuse(*a: object, **k: object) -> None:
        raise AssertionError(f"watch sent a signal: {a}")

    for name in ("kill", "killpg"):
        monkeypatch.setattr(os, name, refuse)
    monkeypatch.setattr(signal, "pthread_kill", refuse)
    res = CliRunner().invoke(app, ["watch", "--once", "--json", "-i", "0.1"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert [p["pid"] for p in d["processes"]] == [4321]
    assert host.writes == []
    assert not hasattr(ReadOnly(host), "write")


def test_the_reader_has_no_way_to_write(host: FakeHost) -> None:
    ro = ReadOnly(host)
    for name in ("write", "truncate", "mount", "umount", "mkdir", "rmdir"):
        assert not hasattr(ro, name)


# ---- what the page tables say -------------------------------------------------------------


def test_bucket_clips_runs_to_vmas() -> None:
    vmas = [(0, 8 * 4096), (8 * 4096, 16 * 4096)]
    regions = [(0, 4 * 4096, PAGE_IS_PRESENT | PAGE_IS_HUGE),
               (4 * 4096, 12 * 4096, PAGE_IS_PRESENT | PAGE_IS_PFNZERO),
               (12 * 4096, 13 * 4096, PAGE_IS_SWAPPED)]
    got = bucket(vmas, regions)
    assert got[vmas[0]] == VmaPages(present=4, zero=4, swapped=0, huge=4)
    assert got[vmas[1]] == VmaPages(present=0, zero=4, swapped=1, huge=0)


def test_the_remap_counts_as_freed_outside_ksm(watched: tuple[FakeHost, HostReader,
                                                                Monitor, Clock]) -> None:
    host, reader, mon, clock = watched
    host.ksm(run=1)
    host.process(10, {VMA: THPS})
    first = mon.update(reader.read())
    assert first.dt is None and first.outside_pages == 0
    host.process(10, {VMA: remapped(64)})
    host.split(64)
    s = step(mon, reader, clock)
    assert s.outside_pages == 64 * PAGES_2M  # 128 MiB
    assert s.procs[0].outside_pages == 64 * PAGES_2M
    assert not s.capped


def test_a_processs_own_freeing_swap_and_ksm_zero_merges_do_not_count(
        watched: tuple[FakeHost, HostReader, Monitor, Clock]) -> None:
    host, reader, mon, clock = watched
    host.ksm(run=1)
    other = (BASE + 512 * MIB, BASE + 520 * MIB)
    small = VmaPages(present=2048, zero=0, swapped=0, huge=0)
    host.process(10, {VMA: THPS, other: small})
    mon.update(reader.read())
    # MADV_DONTNEED of 16 MiB: present pages go, no zero-page mapping comes
    host.process(10, {VMA: VmaPages(THPS.present - 4096, 0, 0, THPS.huge - 4096),
                      other: small})
    host.split(8)  # even with splits elsewhere on the host
    assert step(mon, reader, clock).outside_pages == 0
    # munmap of a whole VMA
    host.process(10, {VMA: VmaPages(THPS.present - 4096, 0, 0, THPS.huge - 4096)})
    assert step(mon, reader, clock).outside_pages == 0
    # swapped out
    host.process(10, {VMA: VmaPages(THPS.present - 5096, 0, 1000, THPS.huge - 4096)})
    host.split(2)
    assert step(mon, reader, clock).outside_pages == 0
    # KSM's own zero-page merges (use_zero_pages=1 on 4 KiB pages): in ksm_zero_pages
    host.process(10, {VMA: VmaPages(THPS.present - 5196, 100, 1000, THPS.huge - 4096)},
                 kzp=100)
    assert step(mon, reader, clock).outside_pages == 0


def test_zero_page_mappings_without_a_split_are_not_freeing(
        watched: tuple[FakeHost, HostReader, Monitor, Clock]) -> None:
    """A read fault maps the zero page; with MADV_DONTNEED in the same interval the page
    tables look like a remap, but no split happened on the host: nothing counted."""
    host, reader, mon, clock = watched
    host.ksm(run=1)
    host.process(10, {VMA: THPS})
    mon.update(reader.read())
    host.process(10, {VMA: VmaPages(THPS.present - 512, 512, 0, THPS.huge - 512)})
    s = step(mon, reader, clock)
    assert s.outside_pages == 0 and s.capped


def test_a_split_counted_before_its_pages_show_is_carried_one_interval(
        watched: tuple[FakeHost, HostReader, Monitor, Clock]) -> None:
    host, reader, mon, clock = watched
    host.ksm(run=1)
    host.process(10, {VMA: THPS})
    mon.update(reader.read())
    host.split(1)
    assert step(mon, reader, clock).outside_pages == 0
    host.process(10, {VMA: remapped(1)})
    assert step(mon, reader, clock).outside_pages == PAGES_2M
    host.process(10, {VMA: remapped(2)})
    assert step(mon, reader, clock).outside_pages == 0  # carried once only


def test_a_reused_pid_is_a_new_process(watched: tuple[FakeHost, HostReader, Monitor, Clock]
                                       ) -> None:
    host, reader, mon, clock = watched
    host.process(10, {VMA: THPS}, started=100)
    mon.update(reader.read())
    host.process(10, {VMA: remapped(64)}, started=999)
    host.split(64)
    s = step(mon, reader, clock)
    assert s.outside_pages == 0 and s.procs[0].started == 999


def test_processes_without_mergeable_memory_are_not_watched(
        watched: tuple[FakeHost, HostReader, Monitor, Clock]) -> None:
    host, reader, mon, _clock = watched
    host.process(10, {VMA: THPS}, mergeable=False)
    host.process(11, {VMA: THPS}, mergeable=False, merge_any=True)
    s = mon.update(reader.read())
    assert [p.pid for p in s.procs] == [11]


# ---- the verdicts as states ----------------------------------------------------------------


def test_bypass_episode_starts_and_ends_with_its_evidence(
        watched: tuple[FakeHost, HostReader, Monitor, Clock]) -> None:
    host, reader, mon, clock = watched
    host.ksm(run=1, pages_to_scan=100, sleep_millisecs=20)  # 19.5 MiB/s
    host.process(10, {VMA: THPS})
    mon.update(reader.read())
    host.process(10, {VMA: remapped(32)})
    host.split(32)
    a = step(mon, reader, clock)  # 64 MiB in 1 s: 3.3x the budget
    assert a.bypass_active and a.episodes_total == 1
    assert a.ratio == pytest.approx(64 / 19.53125, rel=1e-3)
    host.process(10, {VMA: remapped(64)})
    host.split(32)
    b = step(mon, reader, clock, dt=0.5)  # 64 MiB in 0.5 s: 6.6x
    assert b.bypass_active and b.episodes_total == 1
    c = step(mon, reader, clock)
    assert not c.bypass_active and c.episodes_total == 1
    e = c.episodes[0].to_json()
    assert e["bytes"] == 128 * MIB and e["peak_ratio"] == pytest.approx(6.55, abs=0.01)
    assert e["pids"] == [10] and e["splits"] == 64 and e["end"] is not None
    assert not e["borderline"]


def test_no_bypass_at_the_budget_or_by_ksms_account(
        watched: tuple[FakeHost, HostReader, Monitor, Clock]) -> None:
    host, reader, mon, clock = watched
    host.ksm(run=1, pages_to_scan=100, sleep_millisecs=20)
    host.process(10, {VMA: THPS})
    mon.update(reader.read())
    host.process(10, {VMA: remapped(4)})  # 8 MiB in 1 s: 0.4x
    host.split(4)
    assert not step(mon, reader, clock).bypass_active
    host.ksm(pages_sharing=100000)  # 390 MiB merged by KSM's account in 1 s
    s = step(mon, reader, clock)
    assert s.ratio is not None and s.ratio > 2 and not s.bypass_active


def test_ksm_stopped_gives_no_verdict(watched: tuple[FakeHost, HostReader, Monitor, Clock]
                                      ) -> None:
    host, reader, mon, clock = watched
    host.process(10, {VMA: THPS})  # run=0
    mon.update(reader.read())
    host.process(10, {VMA: remapped(64)})
    host.split(64, thp_underused_split_page=64)
    s = step(mon, reader, clock)
    assert s.outside_pages == 64 * PAGES_2M  # still freed outside KSM's account ...
    assert s.budget_pages_s is None and s.ratio is None and s.states == []  # ... no verdict


def collapse_run(host: FakeHost, reader: HostReader, mon: Monitor, clock: Clock,
                 splits_per_scan: int, scans: int, scan_s: float = 6.5) -> Snapshot:
    """seed-uzp0's shape: each full scan of 128 MiB (6.5 s at 100 pages/20 ms) ends
    with ``splits_per_scan`` THP splits that free their zero subpages."""
    host.ksm(run=1, pages_to_scan=100, sleep_millisecs=20, full_scans=0)
    host.process(10, {VMA: THPS})
    s = mon.update(reader.read())
    done = 0
    for scan in range(1, scans + 1):
        for _ in range(int(scan_s)):
            s = step(mon, reader, clock)
        done = min(64, done + splits_per_scan)
        host.process(10, {VMA: remapped(done)})
        host.split(splits_per_scan, thp_split_page_failed=splits_per_scan)
        host.ksm(full_scans=scan)
        s = step(mon, reader, clock, dt=scan_s - int(scan_s))
    return s


def test_merge_collapse_is_a_state_with_its_evidence(
        watched: tuple[FakeHost, HostReader, Monitor, Clock]) -> None:
    host, reader, mon, clock = watched
    s = collapse_run(host, reader, mon, clock, splits_per_scan=1, scans=4)
    c = s.collapse
    assert c.active and c.share is not None and c.share < 0.1
    assert "thp_split_page_failed +2" in c.evidence and "KSM's 2 splits" in c.evidence
    assert not s.bypass_active
    # KSM stopped: the state goes
    host.ksm(run=0)
    assert not step(mon, reader, clock).collapse.active


def test_no_collapse_when_ksm_frees_at_its_budget(
        watched: tuple[FakeHost, HostReader, Monitor, Clock]) -> None:
    host, reader, mon, clock = watched
    s = collapse_run(host, reader, mon, clock, splits_per_scan=16, scans=3)
    assert not s.collapse.active
    assert s.collapse.share is not None and s.collapse.share > 0.1


def test_no_collapse_without_thps(watched: tuple[FakeHost, HostReader, Monitor, Clock]
                                  ) -> None:
    """The no-THP baseline: KSM merges zero pages at its budget, nothing splits."""
    host, reader, mon, clock = watched
    host.ksm(run=1, pages_to_scan=100, sleep_millisecs=20, full_scans=0)
    flat = VmaPages(present=32768, zero=0, swapped=0, huge=0)
    host.process(10, {VMA: flat})
    mon.update(reader.read())
    merged = 0
    for scan in range(1, 5):
        for _ in range(6):
            merged = min(32768, merged + 5000)
            host.process(10, {VMA: VmaPages(32768 - merged, merged, 0, 0)}, kzp=merged)
            host.ksm(ksm_zero_pages=merged)
            s = step(mon, reader, clock)
            assert s.states == [] and s.outside_pages == 0
        host.ksm(full_scans=scan)
        assert step(mon, reader, clock).states == []


# ---- output ------------------------------------------------------------------------------


def test_text_fits_80_columns_and_json_has_the_figures(
        watched: tuple[FakeHost, HostReader, Monitor, Clock]) -> None:
    from ksmlab.watchview import plain

    host, reader, mon, clock = watched
    host.ksm(run=1)
    for pid in range(100, 130):
        host.process(pid, {VMA: THPS}, comm=f"a-very-long-process-name-{pid}")
    mon.update(reader.read())
    host.process(100, {VMA: remapped(64)})
    host.split(64)
    s = step(mon, reader, clock)
    text = plain(s)
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert "ACTIVE" in text and "18 more processes" in text
    d = s.to_json()
    assert d["freed_outside_ksm_bytes_total"] == 128 * MIB
    assert d["states"] == ["rate-limit-bypass"]
    assert d["processes"][0]["freed_outside_ksm_bytes_total"] == 128 * MIB
    assert d["ksmd_cpu_pct"] == 0.0 and d["watch"]["processes"] == 30


def test_ksmd_cpu_from_its_stat(watched: tuple[FakeHost, HostReader, Monitor, Clock]) -> None:
    host, reader, mon, clock = watched
    mon.update(reader.read())
    host.ksmd_ticks(os.sysconf("SC_CLK_TCK") // 10)  # 0.1 s of CPU in 2 s
    s = step(mon, reader, clock, dt=2.0)
    assert s.ksmd_cpu_pct == pytest.approx(5.0)


# ---- Prometheus -----------------------------------------------------------------------------


def exported(watched: tuple[FakeHost, HostReader, Monitor, Clock]) -> str:
    pytest.importorskip("prometheus_client")
    from ksmlab.exporter import Exporter

    host, reader, mon, clock = watched
    host.ksm(run=1)
    host.process(10, {VMA: THPS})
    mon.update(reader.read())
    host.process(10, {VMA: remapped(64)})
    host.split(64)
    ex = Exporter()
    ex.publish(step(mon, reader, clock))
    return ex.text()


def test_metrics_have_the_names_the_rules_use(
        watched: tuple[FakeHost, HostReader, Monitor, Clock]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    text = exported(watched)
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(text) for s in f.samples}
    assert got[("ksmlab_freed_outside_ksm_bytes_total", (("comm", "qemu"), ("pid", "10")))
               ] == 128 * MIB
    assert got[("ksmlab_host_freed_outside_ksm_bytes_total", ())] == 128 * MIB
    assert got[("ksmlab_bypass_episodes_total", ())] == 1
    assert got[("ksmlab_merge_collapse", ())] == 0
    assert got[("ksmlab_freeing_budget_ratio", ())] == pytest.approx(6.55, abs=0.01)
    assert got[("ksmlab_ksm_zero_pages", ())] == 0
    assert got[("ksmlab_thp_split_page_total", ())] == 64
    assert ("ksmlab_ksmd_cpu_seconds_total", ()) in got
    assert ("ksmlab_watch_cpu_seconds_total", ()) in got
    rules = (Path(__file__).parents[1] / "contrib/prometheus/ksmlab.rules.yml").read_text()
    import re

    used = set(re.findall(r"ksmlab_[a-z_]+", rules))
    have = set(re.findall(r"^(ksmlab_[a-z_]+)", text, re.M))
    assert used <= have, used - have


def promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        if os.environ.get("KSMLAB_REQUIRE_LIVE") == "1":
            pytest.fail("promtool is missing (Debian's prometheus package: make system-deps)")
        pytest.skip("promtool is missing (Debian's prometheus package)")
    return tool


def test_promtool_lints_the_metrics(watched: tuple[FakeHost, HostReader, Monitor, Clock]
                                    ) -> None:
    text = exported(watched)
    r = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_checks_the_alerting_rules() -> None:
    rules = Path(__file__).parents[1] / "contrib/prometheus/ksmlab.rules.yml"
    r = subprocess.run([promtool(), "check", "rules", str(rules)], capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_textfile_is_written_whole(watched: tuple[FakeHost, HostReader, Monitor, Clock],
                                   tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    from ksmlab.exporter import Exporter

    _host, reader, mon, _clock = watched
    ex = Exporter()
    ex.publish(mon.update(reader.read()))
    (tmp_path / "tf").mkdir()
    f = tmp_path / "tf" / "ksmlab.prom"
    ex.write(f)
    assert "ksmlab_merge_collapse 0.0" in f.read_text()
    assert [p.name for p in f.parent.iterdir()] == ["ksmlab.prom"]  # no temporary left


def test_the_systemd_unit_runs_a_valid_watch() -> None:
    """ExecStart names options the command has, and the unit reads only."""
    import configparser

    import typer

    from ksmlab.cli import app

    unit = Path(__file__).parents[1] / "contrib/systemd/ksmlab-watch.service"
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(unit.read_text())
    args = cp["Service"]["ExecStart"].split()
    assert args[1] == "watch"
    cmd = typer.main.get_command(app).commands["watch"]  # type: ignore[attr-defined]
    opts = {o for p in cmd.params for o in p.opts}
    assert {a for a in args[2:] if a.startswith("-")} <= opts
    assert cp["Service"]["ProtectKernelTunables"] == "yes"
    assert cp["Service"]["ProtectSystem"] == "strict"


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "match"), [
    (["--prometheus", "nowhere"], "HOST:PORT"),
    (["--prometheus", "127.0.0.1:99999"], "HOST:PORT"),
    (["--textfile", "/nonexistent/x.prom"], "not a folder"),
    (["--textfile", "/tmp/x.txt"], "*.prom"),
    (["--json", "--quiet"], "choose one"),
    (["--interval", "0"], "interval"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], match: str) -> None:
    import sys

    r = subprocess.run([sys.executable, "-m", "ksmlab", "watch", "--once", *args],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], r.stderr
    assert r.stdout == ""


# ---- --tracepoints ----------------------------------------------------------------------------


def ev(pid: int, event: str, ts: float, **f: object) -> dict[str, object]:
    return {"event": event, "ts": ts, "cpu": 0, "pid": pid, **f}


def test_each_merge_attempt_is_credited_with_the_remap_before_it() -> None:
    from ksmlab.live.watchtrace import Attribution, attribute

    size = 128 * MIB
    events: list[dict[str, object]] = []
    t = 1.0
    for _thp in range(2):  # two attempts, each splitting a zero-filled THP (512 decrements)
        for _ in range(512):
            size -= 4096
            events.append(ev(KSMD, "rss_stat", t, mm_id=7, curr=0, type="MM_ANONPAGES",
                             size=size))
        events.append(ev(KSMD, "ksm_merge_one_page", t, pfn=1, mm="a", err=-14))
    # a zero-page merge of its own: one decrement, in ksm_zero_pages, credits nothing
    events.append(ev(KSMD, "rss_stat", t, mm_id=7, curr=0, type="MM_ANONPAGES",
                     size=size - 4096))
    events.append(ev(KSMD, "ksm_merge_one_page", t, pfn=1, mm="a", err=0))
    # the underused-THP shrinker in another task splitting another process's THP
    for i in range(1, 101):
        events.append(ev(555, "rss_stat", t, mm_id=9, curr=0, type="MM_ANONPAGES",
                         size=64 * MIB - i * 4096))
    acc = Attribution()
    pending: dict[int, dict[int, list[int]]] = {}
    attribute(events[:700], KSMD, acc, pending)  # a batch ends mid-attempt: carried
    attribute(events[700:], KSMD, acc, pending)
    assert acc.attempts == 3 and acc.freeing == 2
    assert acc.by_mm == {7: 1024}
    assert acc.others == {"555": 100}
    assert [a.freed_pages for a in acc.recent] == [512, 512]
    assert acc.last_size[7] == 124 * MIB - 4096


def test_tracepoints_restore_after_a_kill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    """watch --tracepoints: its own instance, its own journal; killed, `restore`
    removes the instance and unmounts; the top level is never written."""
    from ksmlab.live.watchtrace import INSTANCE, JOURNAL, WatchTracing, restore_watch

    from .conftest import make_fake_tree
    from .test_tracefs import FakeTracefs

    make_fake_tree(tmp_path / "root")
    monkeypatch.setenv("KSMLAB_STATE_DIR", str(tmp_path / "state"))
    fs = FakeTracefs(tmp_path / "root")
    wt = WatchTracing(fs)
    wt.start()
    inst = f"sys/kernel/tracing/instances/{INSTANCE}"
    assert fs.path(inst).is_dir() and wt.events.available
    assert (f"{inst}/events/kmem/rss_stat/filter", "member == 1 && curr == 0") in fs.writes
    assert not any(r.startswith("sys/kernel/tracing/") and not r.startswith(inst)
                   for r, _ in fs.writes)
    wt.events._close_pipe()  # "SIGKILL": no restore
    wt.lock.release()
    assert (tmp_path / "state" / JOURNAL).exists()
    done = restore_watch(fs)
    assert done == [(inst, "removed"), ("sys/kernel/tracing", "unmounted")]
    assert not fs.path(inst).exists() and fs.mounted("sys/kernel/tracing") is None
    assert not (tmp_path / "state" / JOURNAL).exists()
    assert restore_watch(fs) == []


def test_a_running_watch_is_not_restored_under_it(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from ksmlab.live.watchtrace import WatchError, WatchTracing, restore_watch

    from .conftest import make_fake_tree
    from .test_tracefs import FakeTracefs

    make_fake_tree(tmp_path / "root")
    monkeypatch.setenv("KSMLAB_STATE_DIR", str(tmp_path / "state"))
    fs = FakeTracefs(tmp_path / "root")
    wt = WatchTracing(fs)
    wt.start()
    try:
        assert restore_watch(fs) == []  # it holds its lock
        with pytest.raises(WatchError, match="another"):
            WatchTracing(fs).start()
    finally:
        wt.restore()
    assert fs.mounted("sys/kernel/tracing") is None


def test_a_process_turning_mergeable_late_is_found_within_a_few_readings(
        watched: tuple[FakeHost, HostReader, Monitor, Clock]) -> None:
    from ksmlab.live.watch import RECHECK, YOUNG

    host, reader, _mon, _clock = watched
    host.process(10, {VMA: THPS}, mergeable=False)
    for _ in range(YOUNG + 2):
        assert reader.read().procs == {}
    host.process(10, {VMA: THPS})
    found = next(i for i in range(1, RECHECK + 2) if reader.read().procs)
    assert found <= RECHECK


def test_rss_stat_lines_parse() -> None:
    from ksmlab.live.tracefs import parse_line

    e = parse_line("            ksmd-40      [001] ..... 1234.500001: rss_stat: mm_id=3054411842 "
                   "curr=0 type=MM_ANONPAGES size=134213632B")
    assert e == {"event": "rss_stat", "ts": 1234.500001, "cpu": 1, "pid": 40,
                 "mm_id": 3054411842, "curr": 0, "type": "MM_ANONPAGES", "size": 134213632}


def test_collapse_seen_two_full_scans_after_ksm_starts(
        watched: tuple[FakeHost, HostReader, Monitor, Clock]) -> None:
    """KSM seen to start: its first full scan begins there, so the state can come at
    the second full-scan end (seed-uzp0's 25 s hold three)."""
    host, reader, mon, clock = watched
    host.process(10, {VMA: THPS})
    mon.update(reader.read())  # KSM stopped
    host.ksm(run=1, pages_to_scan=100, sleep_millisecs=20, full_scans=0)
    step(mon, reader, clock)
    for scan in (1, 2):
        for _ in range(7):
            s = step(mon, reader, clock)
        host.process(10, {VMA: remapped(scan)})
        host.split(1, thp_split_page_failed=1)
        host.ksm(full_scans=scan)
        s = step(mon, reader, clock)
    assert s.collapse.active, s.collapse


def test_page_tables_are_walked_when_a_cheap_figure_moves(
        watched: tuple[FakeHost, HostReader, Monitor, Clock],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A quiet process costs no PAGEMAP_SCAN and no smaps_rollup between REFRESH
    readings; a remap lowers RssAnon, so it is read (and counted) at once."""
    from ksmlab.live.watch import REFRESH

    host, reader, mon, clock = watched
    host.ksm(run=1)
    host.process(10, {VMA: THPS})
    scans: list[int] = []
    real = host.scan_pages

    def counting(pid: int, spans: list[tuple[int, int]], anyof: int, mask: int
                 ) -> list[tuple[int, int, int]]:
        scans.append(pid)
        return real(pid, spans, anyof, mask)

    monkeypatch.setattr(host, "scan_pages", counting)
    mon.update(reader.read())
    for _ in range(REFRESH - 2):
        step(mon, reader, clock)
    assert scans == [10]
    host.process(10, {VMA: remapped(8)})
    host.split(8)
    assert step(mon, reader, clock).outside_pages == 8 * PAGES_2M
    assert scans == [10, 10]
    for _ in range(REFRESH):
        step(mon, reader, clock)
    assert scans == [10, 10, 10]  # once more after REFRESH quiet readings


def test_mergeable_spans_agree_with_the_smaps_parser() -> None:
    from ksmlab.live.smaps import parse_smaps
    from ksmlab.live.watch import mergeable_spans

    text = ("55d0a0000000-55d0a0021000 rw-p 00000000 00:00 0                  [heap]\n"
            "Size:                132 kB\nRss:                   4 kB\n"
            "VmFlags: rd wr mr mw me ac sd\n"
            "7f0000000000-7f0008000000 rw-p 00000000 00:00 0 \n"
            "Size:             131072 kB\nAnonHugePages:    131072 kB\n"
            "VmFlags: rd wr mr mw me ac sd hg mg\n"
            "7f0008000000-7f0008001000 r--p 00000000 08:01 1234   /usr/lib/x.so\n"
            "Size:                  4 kB\nVmFlags: rd mr mw me sd mg\n")
    want = sorted((m.start, m.end) for m in parse_smaps(text) if "mg" in m.flags)
    assert mergeable_spans(text) == want and len(want) == 2
