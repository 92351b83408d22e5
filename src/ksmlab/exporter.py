"""``ksmlab watch`` as Prometheus metrics (the ``watch`` extra: prometheus-client).

A custom collector hands Prometheus the latest :class:`ksmlab.monitor.Snapshot` at
each scrape (``--prometheus HOST:PORT``, the library's HTTP server in a thread), or
writes it in node_exporter's textfile-collector format (``--textfile PATH``: the
library writes a temporary file and renames it, so node_exporter never reads half a
file).  Names follow Prometheus' conventions: the ``ksmlab_`` prefix, base units
(bytes, seconds), ``_total`` for counters; the kernel's own counters keep the
kernel's names (``ksmlab_ksm_zero_pages``, ``ksmlab_thp_split_page_total``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .live.watch import PAGE

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from .monitor import Proc, Snapshot

# /sys/kernel/mm/ksm files that count up (the rest are levels or knobs)
KSM_COUNTERS = ("full_scans", "pages_scanned")
KSM_LEVELS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
              "pages_skipped", "ksm_zero_pages", "stable_node_chains", "stable_node_dups")
KSM_KNOBS = ("run", "pages_to_scan", "use_zero_pages", "smart_scan", "max_page_sharing",
             "merge_across_nodes")


class WatchCollector:
    """The latest snapshot, as metric families (``collect()`` runs at each scrape)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snap: Snapshot | None = None

    def publish(self, s: Snapshot) -> None:
        with self._lock:
            self._snap = s

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self._lock:
            s = self._snap
        if s is None:
            return
        r = s.reading

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"ksmlab_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"ksmlab_{name}", doc, value=value)

        yield counter("host_freed_outside_ksm_bytes", "Memory freed outside KSM's account "
                      "(zero-filled THP subpages remapped to the zero page) in mergeable "
                      "memory since the watch started, processes gone included",
                      s.outside_total_pages * PAGE)
        per = CounterMetricFamily("ksmlab_freed_outside_ksm_bytes", "Memory freed outside "
                                  "KSM's account in the process's mergeable memory since "
                                  "the watch first saw it", labels=["pid", "comm"])
        labels = [(str(p.pid), p.comm) for p in s.procs]
        for (pid, comm), p in zip(labels, s.procs, strict=True):
            per.add_metric([pid, comm], p.outside_pages * PAGE)
        yield per
        yield gauge("ksm_budget_bytes_per_second", "KSM's scan budget: pages_to_scan per "
                    "sleep_millisecs (0 while KSM is not running)",
                    (s.budget_pages_s or 0.0) * PAGE)
        yield gauge("freeing_budget_ratio", "Memory freed in the last interval (outside KSM's "
                    "account and by it) over KSM's budget for it (NaN: KSM not running)",
                    float("nan") if s.ratio is None else s.ratio)
        yield counter("bypass_episodes", "Rate-limit bypass episodes: intervals freeing over "
                      "2x KSM's budget, mostly outside its account", s.episodes_total)
        yield gauge("bypass_active", "1 while a rate-limit bypass episode goes on",
                    float(s.bypass_active))
        yield gauge("bypass_last_peak_ratio", "Peak budget ratio of the last bypass episode",
                    s.episodes[-1].peak_ratio if s.episodes else 0.0)
        yield gauge("merge_collapse", "1 while KSM merges far below what its budget "
                    "would merge zero-filled THP subpages (merge-collapse)",
                    float(s.collapse.active))
        yield gauge("merge_collapse_share", "Freeing rate over the last two full scans / "
                    "what a KSM merging every zero page it scans would free (NaN: not "
                    "evaluated)", float("nan") if s.collapse.share is None
                    else s.collapse.share)
        for k in KSM_LEVELS:
            if k in r.ksm:  # ksm_zero_pages keeps the kernel's name: ksmlab_ksm_zero_pages
                yield gauge(k if k.startswith("ksm_") else f"ksm_{k}",
                            f"/sys/kernel/mm/ksm/{k}", r.ksm[k])
        if "general_profit" in r.ksm:
            yield gauge("ksm_general_profit_bytes", "/sys/kernel/mm/ksm/general_profit",
                        r.ksm["general_profit"])
        for k in KSM_COUNTERS:
            if k in r.ksm:
                yield counter(f"ksm_{k}", f"/sys/kernel/mm/ksm/{k}", r.ksm[k])
        for k in KSM_KNOBS:
            if k in r.ksm:
                yield gauge(f"ksm_{k}", f"/sys/kernel/mm/ksm/{k} (knob)", r.ksm[k])
        if "sleep_millisecs" in r.ksm:
            yield gauge("ksm_sleep_seconds", "/sys/kernel/mm/ksm/sleep_millisecs (knob)",
                        r.ksm["sleep_millisecs"] / 1000)
        for k, v in sorted(r.vmstat.items()):
            if k.startswith("thp_"):
                yield counter(k, f"/proc/vmstat {k}", v)
        if "nr_anon_transparent_hugepages" in r.vmstat:
            yield gauge("nr_anon_transparent_hugepages", "/proc/vmstat",
                        r.vmstat["nr_anon_transparent_hugepages"])
        if r.ksmd_cpu_s is not None:
            yield counter("ksmd_cpu_seconds", "ksmd's CPU time (/proc/<ksmd>/stat utime + "
                          "stime)", r.ksmd_cpu_s)
        fams: dict[str, tuple[str, Callable[[Proc], float]]] = {
            "rss_anon_bytes": ("RssAnon", lambda p: p.reading.rss_anon_kib * 1024),
            "mergeable_thp_bytes": ("Present pages of mergeable VMAs mapped by a PMD",
                                    lambda p: p.reading.pages.huge * PAGE),
            "mergeable_zero_page_bytes": ("Mergeable memory mapping the shared zero page",
                                          lambda p: p.reading.pages.zero * PAGE),
            "ksm_zero_pages": ("ksm_stat ksm_zero_pages",
                               lambda p: p.reading.ksm.get("ksm_zero_pages", 0)),
            "ksm_merging_pages": ("ksm_stat ksm_merging_pages",
                                  lambda p: p.reading.ksm.get("ksm_merging_pages", 0)),
            "ksm_profit_bytes": ("ksm_stat ksm_process_profit",
                                 lambda p: p.reading.ksm.get("ksm_process_profit", 0)),
        }
        for name, (doc, fn) in fams.items():
            g = GaugeMetricFamily(f"ksmlab_process_{name}", doc, labels=["pid", "comm"])
            for (pid, comm), p in zip(labels, s.procs, strict=True):
                if p.reading.vmas is None and name.startswith("mergeable_"):
                    continue
                g.add_metric([pid, comm], float(fn(p)))
            yield g
        if s.traced is not None:
            t = s.traced
            yield counter("traced_merge_attempts", "KSM merge attempts seen by the "
                          "tracepoints (--tracepoints)", t["merge_attempts"])
            yield counter("traced_merge_attempts_freeing", "Merge attempts whose THP split "
                          "freed memory outside KSM's account", t["attempts_freeing_outside_ksm"])
            by = CounterMetricFamily("ksmlab_traced_ksmd_freed_bytes", "Freed outside KSM's "
                                     "account by ksmd's merge attempts, per process (pid "
                                     "\"\": not matched)", labels=["pid", "comm"])
            comms = {str(p.pid): p.comm for p in s.procs}
            for key, v in t["freed_by_ksmd_bytes"].items():
                by.add_metric([key, comms.get(key, "?")], v)
            by.add_metric(["", ""], t["freed_by_ksmd_unattributed_bytes"])
            yield by
            ot = CounterMetricFamily("ksmlab_traced_kthread_freed_bytes", "Freed from "
                                     "other processes' RSS by kernel threads other than "
                                     "ksmd (kswapd, khugepaged: THP splits)",
                                     labels=["comm"])
            for c, v in t["freed_by_kernel_threads_bytes"].items():
                ot.add_metric([c], v)
            yield ot
            yield counter("traced_events_lost", "Trace events the kernel or the reader "
                          "dropped", t["events_lost"])
        yield counter("watch_cpu_seconds", "CPU time of the watch itself", r.self_cpu_s)
        yield gauge("watch_max_rss_bytes", "Peak RSS of the watch itself",
                    r.self_rss_kib * 1024)
        yield gauge("watch_read_seconds", "How long the last reading of the host took",
                    r.read_s)
        yield gauge("watch_processes", "Processes with mergeable memory watched",
                    len(s.procs))
        yield counter("watch_intervals", "Readings of the host", float(s.interval_count))


class Exporter:
    """The registry behind ``--prometheus`` and ``--textfile``."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry

        self.collector = WatchCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)

    def serve(self, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        start_http_server(port, addr=host, registry=self.registry)

    def publish(self, s: Snapshot) -> None:
        self.collector.publish(s)

    def write(self, path: Path) -> None:
        from prometheus_client import write_to_textfile

        write_to_textfile(str(path), self.registry)

    def text(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()
