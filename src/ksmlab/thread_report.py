"""``ksmlab thread-report``: a plain-text reply for the zero-page remap thread.

Everything in it is computed when it runs: the model under every policy on the
seed scenarios (and on a captured real guest when one is given), the patched
kernels' confirmations and the selftest results from the records (shipped with
ksmlab, or recorded here).  No figure is written down anywhere else, so the
command it names reproduces each one.  72 columns, no Markdown: mail.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

from . import __version__, metrics
from .scenario import Scenario

WIDTH = 72
SEEDS = ("seed-uzp1", "seed-uzp0")
THREAD_SUBJECT = ("Re: [PATCH mm-unstable v1 0/3] MM: Tighten control over zero-page "
                  "remapping")
# the stored thread (shared/reference/zero-page-remap-thread.txt) gives no Message-ID
# for its cover letter, only the RFC's: the reply's In-Reply-To must be given
RFC_MESSAGE_ID = "20260508170509.640851-1-npache@redhat.com"
FROM = "ksmlab kernel lab <ksmlab@example.invalid>"
COMMAND = "ksmlab thread-report"


@dataclass(frozen=True)
class Row:
    workload: str  # short label: uzp1, uzp0, guest0, guest1
    policy: str
    freed_mib: float
    ksm_mib: float
    peak_ratio: float | None
    cpu_pct: float | None
    kernel: str  # "yes" (a patched kernel confirmed), "NO", "model"


@dataclass
class ReportData:
    rows: list[Row]
    workloads: dict[str, str]  # label -> what it is
    selftest: dict[str, dict[str, Any]]
    kernels: list[str]  # guest kernel releases of the confirmations
    recorded_on: str
    generated: str
    has_shipped: bool
    notes: list[str] = field(default_factory=list)


def _rows(sc: Scenario, label: str, scenario_key: str | None,
          results: dict[str, dict[str, Any]]) -> list[Row]:
    from .kernel.validate import confirmed
    from .model import POLICIES, simulate

    out = []
    for policy in POLICIES:
        s = metrics.summarize(simulate(sc, policy))
        c = confirmed(policy, scenario_key, results) if scenario_key else None
        out.append(Row(label, policy, round(s.freed_mib, 1), round(s.ksm_accounted_mib, 1),
                       None if s.budget_ratio_peak is None else round(s.budget_ratio_peak, 1),
                       None if s.ksmd_cpu_pct is None else round(s.ksmd_cpu_pct, 1),
                       "model" if c is None else "yes" if c.confirmed else "NO"))
    return out


def guest_scenarios(image: Path) -> list[Scenario]:
    """A captured real guest (``ksmlab capture``) under both use_zero_pages values."""
    from .orchestrate import pid_base

    out = []
    for uzp in (0, 1):
        base = pid_base(0, uzp, 20.0, 2000)
        base["name"] = f"guest-uzp{uzp}"
        out.append(Scenario.model_validate(
            {**base, "process": [{"name": "guest", "image": str(image)}]}))
    return out


def compute(guest_image: Path | None = None) -> ReportData:
    from .kernel import selftest
    from .kernel.validate import current, read_results, shipped_origin
    from .scenario import load

    results = read_results()
    rows: list[Row] = []
    workloads = {}
    for name in SEEDS:
        sc = load(name)
        label = name.removeprefix("seed-")
        workloads[label] = (f"{name}: {sc.description}; pages_to_scan "
                            f"{sc.ksm.pages_to_scan}, sleep_millisecs "
                            f"{sc.ksm.sleep_millisecs}, {sc.duration:g} s")
        rows += _rows(sc, label, name, results)
    notes = []
    if guest_image is not None:
        for sc in guest_scenarios(guest_image):
            label = f"guest{sc.ksm.use_zero_pages}"
            workloads[label] = (f"the captured guest {guest_image.name}, use_zero_pages="
                                f"{sc.ksm.use_zero_pages}; pages_to_scan "
                                f"{sc.ksm.pages_to_scan}, sleep_millisecs "
                                f"{sc.ksm.sleep_millisecs}, {sc.duration:g} s")
            rows += _rows(sc, label, None, results)
    else:
        notes.append("No real guest: run with --guest-image IMAGE, a capture of a paused "
                     "QEMU guest (ksmlab capture PID -o DIR), for its rows.")
    kernels = sorted({str(r.get("release")) for r in results.values()
                      if r.get("stands_for") in SEEDS and current(r)})
    return ReportData(rows, workloads, selftest.read_results(), kernels, shipped_origin(),
                      datetime.now(UTC).strftime("%Y-%m-%d"),
                      any(r.get("origin") == "shipped" for r in results.values()), notes)


def _para(text: str, indent: str = "") -> list[str]:
    return [*textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent,
                           break_on_hyphens=False), ""]


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def table_lines(rows: list[Row]) -> list[str]:
    head = [f"{'load':<6}{'proposal':<24}{'freed':>6}{'by KSM':>8}{'peak/':>8}"
            f"{'ksmd':>7}  kernel",
            f"{'':<6}{'':<24}{'MiB':>6}{'MiB':>8}{'budget':>8}{'CPU%':>7}"]
    out = [*head, "-" * WIDTH]
    last = None
    for r in rows:
        if last is not None and r.workload != last:
            out.append("")
        last = r.workload
        out.append(f"{r.workload:<6}{r.policy:<24}{r.freed_mib:>6.1f}{r.ksm_mib:>8.1f}"
                   f"{_fmt(r.peak_ratio):>8}{_fmt(r.cpu_pct):>7}  {r.kernel}")
    return out


def selftest_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    from .kernel.build import VARIANTS

    if not results:
        return _para("No selftest result is recorded for today's patches and test: "
                     "ksmlab kernel selftest --kernel VARIANT runs one.")
    out = [f"{'kernel':<21}{'rate':>13}{'merged':>18}{'zero':>8}  result",
           f"{'':<21}{'(peak/budget)':>13}{'(of pages)':>18}{'count':>8}",
           "-" * WIDTH]
    for v in [v for v in VARIANTS if v in results]:
        r = results[v]
        oc = {c["prop"]: c["outcome"] for c in r.get("cases", [])}
        f = r.get("figures", {})
        rate = f"{oc.get('rate', '?')} {_fmt(f.get('rate.peak_ratio'))}"
        merged = f"{oc.get('merge', '?')} {f.get('merge.merged', 0):.0f}/" \
                 f"{f.get('merge.pages', 0):.0f}"
        out.append(f"{v:<21}{rate:>13}{merged:>18}{oc.get('zero-counted', '?'):>8}  "
                   f"{'PASS' if r.get('passed') else 'FAIL'}")
    return [*out, ""]


def selftest_parameters() -> dict[str, float]:
    from .kernel.selftest import parameters

    return parameters()


def render(d: ReportData) -> str:
    from .kernel.validate import AGREE_FRACTION
    from .metrics import BYPASS_RATIO, PEAK_WINDOW_S

    L: list[str] = []
    L += _para("Hi,")
    L += _para(
        "here are measurements of every proposal in this thread, as kernel policies "
        "in a model of KSM and THP and as patched 6.12 kernels, with a kselftest "
        "that catches the regression of commit b1f202060afe (\"mm: remap unused "
        "subpages to shared zeropage when splitting isolated thp\").")
    L += ["What was measured", ""]
    L += _para(
        "Memory freed (RssAnon drop + pages_sharing), how much of it KSM's own "
        "counters account for (pages_sharing + ksm_zero_pages), the peak rate of "
        "freeing over KSM's budget of pages_to_scan per sleep_millisecs (over "
        f"windows of {PEAK_WINDOW_S:g} s or more; above {BYPASS_RATIO:g} the rate "
        "limit is bypassed) and ksmd's mean CPU, for each proposal on these "
        "workloads:")
    for label, what in d.workloads.items():
        L += _para(f"{label}: {what}", "  ")[:-1]
    L += [""]
    L += ["On what", ""]
    L += _para(
        f"The figures in the table are the model's (ksmlab {__version__}, computed "
        f"on {d.generated}); 'kernel' says whether a patched kernel confirmed the "
        "model on the workload, scaled to 64 MiB: the kernel's trace agreed with "
        f"the model's at {AGREE_FRACTION:.0%} or more of the full-scan boundaries, "
        "with the same "
        "verdicts. The kernels: " + (", ".join(d.kernels) or "none recorded")
        + ", under qemu (TCG, 2 vCPUs), "
        + (f"recorded on {d.recorded_on}, or on this machine."
           if d.has_shipped else "recorded on this machine."))
    L += [*table_lines(d.rows), ""]
    L += _para("'model': no kernel implements that proposal here (mainline is "
               "6.12's behaviour; ksm-skip-zeropage and ksm-huge-under-pressure are "
               "ideas from the thread without a patch), or it was not run.")
    L += ["The selftest", ""]
    p = selftest_parameters()
    L += _para(
        "ksm_thp_split (a kselftest in the style of tools/testing/selftests/mm) maps "
        f"{p['NR_THPS']:.0f} THPs, half zero-filled and half mixed, runs KSM for "
        f"{p['FULL_SCANS']:.0f} full scans with use_zero_pages=1 and then 0, and "
        f"checks: memory freed stays within {p['MAX_BUDGET_RATIO']:g}x pages_to_scan "
        "per sleep_millisecs; with use_zero_pages=0 KSM's account covers "
        f"{p['MIN_MERGED']:.0%} of the duplicate pages; with use_zero_pages=1 the zero "
        "pages freed are counted in ksm_zero_pages. Each kernel below ran it in a "
        "qemu guest:")
    L += selftest_lines(d.selftest)
    L += ["How to reproduce", ""]
    L += _para(f"Every figure above: {COMMAND} (pip install ksmlab). One kernel's "
               "confirmation or selftest: ksmlab kernel validate seed-uzp1-64m "
               "--kernel ksm-accounted-remap, or ksmlab kernel selftest --kernel "
               "6.12 (needs linux-source-6.12, gcc and qemu-system-x86; builds "
               "the kernel).")
    L += ["What is not known", ""]
    unknown = [
        *d.notes,
        "Guest time runs under TCG emulation, so kernels are compared with the "
        "model in full-scan units, and ksmd's CPU in the table is the model's "
        "cost profile, not a measurement on the patched kernels.",
        "Only x86-64 with 4 KiB pages and 2 MiB THPs, one 6.12 point release, and "
        "workloads of 64 MiB in the guests; no memory pressure, so the underused "
        "THP shrinker never ran.",
        "The selftest reads KSM's global counters, so it ran in guests where "
        "nothing else is mergeable; on a busy host other processes' merges "
        "count too.",
        "ksm-accounted-remap marks a remapped subpage as a KSM zero page also in "
        "an mm that KSM does not scan (a child forked without MADV_MERGEABLE).",
    ]
    for u in unknown:
        L += _para("- " + u, "")
    body = "\n".join(ln.rstrip() for ln in "\n".join(L).rstrip().splitlines())
    # the signature separator keeps its trailing space (RFC 3676)
    return body + "\n\n-- \nksmlab kernel lab (generated; figures by the command above)\n"


def mbox(text: str, in_reply_to: str, date: datetime | None = None) -> str:
    msgid = in_reply_to.strip().strip("<>")
    when = format_datetime(date or datetime.now(UTC))
    head = [f"From ksmlab {(date or datetime.now(UTC)).strftime('%a %b %d %H:%M:%S %Y')}",
            f"From: {FROM}", *textwrap.wrap(f"Subject: {THREAD_SUBJECT}", WIDTH,
                                            subsequent_indent=" "),
            f"Date: {when}",
            f"In-Reply-To: <{msgid}>", f"References: <{msgid}>",
            "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit"]
    # mbox: a body line starting with "From " is quoted
    body = "\n".join(">" + ln if ln.startswith("From ") else ln for ln in text.splitlines())
    return "\n".join(head) + "\n\n" + body + "\n"
