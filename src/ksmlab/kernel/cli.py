"""``ksmlab kernel``: build patched kernels, run scenarios inside them, validate.

Registered in ksmlab/cli/application.py with ``app.add_typer(kernel_app, name="kernel")``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..cli.common import DurationOpt, JsonOpt, dump, err, fail
from ..scenario import ScenarioError
from ..trace import Trace, TraceError
from .build import VARIANTS, KernelBuildError, build, list_images
from .qemu import KernelRunError
from .rootfs import RootfsError
from .validate import Validation

EXAMPLES = """\b
Examples:
  ksmlab kernel variants                         the kernels and their patches
  ksmlab kernel build ksm-split-no-remap         build (or find in the cache)
  ksmlab kernel run seed-uzp1-64m --kernel 6.12  the live lab inside a 6.12 guest
  ksmlab kernel validate seed-uzp0-64m --kernel v1
  ksmlab kernel results                          what patched kernels confirmed
  ksmlab kernel selftest --kernel 6.12           the kselftest inside the guest
"""

kernel_app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None,
    help="Patched kernels under qemu (TCG): build, run a scenario inside, validate the model.",
    epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]},
)
KernelOpt = Annotated[str, typer.Option("--kernel", "-k", help="variant (ksmlab kernel variants)")]
ScenarioArg = Annotated[str, typer.Argument(
    help="built-in name, a name in kernel/data/scenarios/ (scaled for the guest), or a .toml")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="folder for the trace")]

_ERRORS = (KernelBuildError, KernelRunError, RootfsError, ScenarioError, TraceError, ValueError)


def _log(msg: str) -> None:
    err.print(f"ksmlab: {msg}", markup=False, soft_wrap=True)


@kernel_app.command()
def variants(json_out: JsonOpt = False) -> None:
    """The kernel variants: source, patch, and the model policy each implements."""
    items = [{"variant": v.name, "policy": v.policy, "source": v.source.package,
              "patch": f"kernel/data/patches/{v.patch}" + (
                  "/" if (p := v.patch_path()) is not None and p.is_dir() else "")
              if v.patch else None}
             for v in VARIANTS.values()]
    if json_out:
        dump({"variants": items})
        return
    for it in items:  # 80 columns: the patch by its file name (in kernel/data/patches)
        patch = it["patch"].removeprefix("kernel/data/patches/") if it["patch"] \
            else "(no patch)"
        print(f"{it['variant']:<24} {it['source']:<19} {patch}"[:80])


@kernel_app.command("build")
def build_cmd(variant: Annotated[str, typer.Argument(help="variant, or 'all'")],
              jobs: Annotated[int, typer.Option("--jobs", "-j")] = 2,
              json_out: JsonOpt = False) -> None:
    """Build a variant's bzImage into the cache (free if already there)."""
    names = list(VARIANTS) if variant == "all" else [variant]
    out = []
    for n in names:
        try:
            b = build(n, log=_log, jobs=jobs)
        except _ERRORS as e:
            fail(str(e))
        out.append({"variant": n, "key": b.key, "bzimage": str(b.bzimage), "cached": b.cached,
                    "seconds": round(b.seconds, 1), "release": b.meta.get("release")})
        if not json_out:
            how = "cached" if b.cached else f"built in {b.seconds:.0f} s"
            print(f"{n}: {b.meta.get('release')} {how}: {b.bzimage}")
    if json_out:
        dump({"builds": out})


@kernel_app.command()
def images(json_out: JsonOpt = False) -> None:
    """The images in the cache."""
    ims = list_images()
    if json_out:
        dump({"images": ims})
        return
    for m in ims:
        print(f"{str(m['key'])[:12]} {m['variant']:<20} {str(m['release'])[:24]:<24} "
              f"{str(m['built'])[:16]}"[:80])


@kernel_app.command("run")
def run_cmd(scenario: ScenarioArg, kernel: KernelOpt, duration: DurationOpt = None,
            out: OutOpt = None, json_out: JsonOpt = False) -> None:
    """Boot the variant under qemu and run the live lab inside on the scenario."""
    from .. import metrics
    from .qemu import run

    try:
        gr = run(scenario, kernel, duration, out, log=_log)
    except _ERRORS as e:
        fail(str(e))
    s = metrics.summarize(gr.trace)
    g = gr.trace.meta["guest"]
    if json_out:
        dump({"scenario": gr.trace.meta["scenario"]["name"], **g,
              **s.to_json(), "files": {"trace": str(gr.trace_path),
                                       "console": str(gr.console)}})
        return
    from ..report import summary_text

    print(summary_text(s, f"{gr.trace.meta['scenario']['name']} on Linux {g['release']} "
                          f"(guest, {kernel}, TCG)"))
    print(f"timings: {gr.timings}")
    if gr.dmesg_problems:
        print("dmesg: " + " | ".join(gr.dmesg_problems))
    print(f"trace: {gr.trace_path}")


def _latest_trace(scenario: str, variant: str) -> Path:
    from .build import cache_dir
    from .qemu import resolve_scenario

    name = resolve_scenario(scenario)[0].name
    found = sorted((cache_dir() / "runs").glob(f"*-{variant}-{name}-*/"
                                               f"{name}-kernel-{variant}.trace.json.gz"))
    if not found:  # ValueError is one of _ERRORS: reported per scenario by the caller
        raise ValueError(f"no trace of {name} on {variant} in the cache: run "
                         "`ksmlab kernel run`")
    return found[-1]


def _validate_one(scenario: str, kernel: str, trace: Path | None = None,
                  duration: float | None = None) -> Validation:
    """Run (or load) the kernel's trace and compare; raises one of ``_ERRORS``."""
    from .qemu import run
    from .validate import validate

    if trace is None:
        gr = run(scenario, kernel, duration, None, log=_log)
        tr, path = gr.trace, gr.trace_path
    else:
        if str(trace) == "latest":
            trace = _latest_trace(scenario, kernel)
        tr, path = Trace.load(trace), trace
    if tr.meta.get("guest", {}).get("variant") != kernel:
        raise ValueError(f"{path} is not a trace of variant {kernel}")
    return validate(tr, str(path))


def _show(v: Validation, json_out: bool) -> None:
    if json_out:
        dump(v.to_json())
        return
    n = len(v.checkpoints)
    print(f"{v.scenario} on {v.release} ({v.accelerator}) vs model `{v.policy}`")
    print(f"  checkpoints (full-scan boundaries): {n}, agreeing: "
          f"{round(v.agreement * n)} ({v.agreement:.0%}), tolerance {v.tolerance_mib} MiB")
    print(f"  verdicts: kernel {v.verdicts_kernel or ['none']}, model "
          f"{v.verdicts_model or ['none']}")
    for note in v.verdict_notes:
        print(f"  {note}")
    print(f"  first full scan: {v.seconds_per_scan['kernel']} s in the guest (TCG), "
          f"{v.seconds_per_scan['model']} s in the model; compared in full-scan units")
    for c in [c for c in v.checkpoints if not c.agree][:5]:
        print(f"  disagree at scan {c.k}: freed {c.freed} ksm {c.ksm} thp {c.thp} "
              "(kernel, model MiB)")
    print(f"  {'CONFIRMED' if v.confirmed else 'NOT CONFIRMED'}")


@kernel_app.command("validate")
def validate_cmd(scenario: ScenarioArg, kernel: KernelOpt,
                 trace: Annotated[Path | None, typer.Option(
                     "--trace", help="a trace from `ksmlab kernel run`, or 'latest' (the newest "
                     "in the cache); default: run now")
                 ] = None,
                 duration: DurationOpt = None, json_out: JsonOpt = False) -> None:
    """The model under the variant's policy against the patched kernel's trace, at every
    full-scan boundary (time in full-scan units: the guest runs under emulation).
    Exit code 1 when NOT CONFIRMED, 2 when it could not run."""
    from .validate import record

    try:
        v = _validate_one(scenario, kernel, trace, duration)
    except _ERRORS as e:
        fail(str(e))
    record(v)
    _show(v, json_out)
    if not v.confirmed:
        raise typer.Exit(1)


def validate_many(scenarios: list[str], kernel: str, json_out: bool = False) -> int:
    """``ksmlab validate --kernel``: every scenario runs whatever the ones before gave
    (a guest run takes minutes: one failure should not waste the rest). Returns the
    exit code: 2 if any could not run (as `kernel validate` gives), else 1 if any was
    NOT CONFIRMED, else 0."""
    from .validate import record

    failed: list[str] = []
    unconfirmed: list[str] = []
    for name in scenarios:
        try:
            v = _validate_one(name, kernel)
        except _ERRORS as e:
            err.print(f"ksmlab: error: {name}: {e}", markup=False, soft_wrap=True)
            failed.append(name)
            continue
        record(v)
        _show(v, json_out)
        if not v.confirmed:
            unconfirmed.append(name)
    if failed or unconfirmed:
        _log(f"{kernel}: {len(scenarios) - len(failed) - len(unconfirmed)} of "
             f"{len(scenarios)} confirmed; not confirmed: {', '.join(unconfirmed) or 'none'}; "
             f"could not run: {', '.join(failed) or 'none'}")
    return 2 if failed else 1 if unconfirmed else 0


@kernel_app.command()
def results(json_out: JsonOpt = False,
            markdown: Annotated[bool, typer.Option("--markdown", help="a markdown table")
                                ] = False,
            export: Annotated[Path | None, typer.Option(
                "--export", help="write the results recorded here, of today's patches, as "
                "a file to ship (kernel/data/confirmed.json)")] = None) -> None:
    """Recorded validations: those run here, and those shipped with ksmlab (recorded on
    another machine; a run here replaces them). A result whose patch has changed
    since is listed as stale and confirms nothing. Nothing is built."""
    from .validate import current, read_results, shipped_origin
    from .validate import export as export_results

    if export is not None:
        from datetime import UTC, datetime

        from ..live.machine import identity

        ident = identity()
        machine = (f"a machine with {ident['cpus']} CPUs ({ident['cpu'].get('model name', '?')}) "
                 f"running Linux {ident['kernel']}, guests under qemu TCG, "
                 f"{datetime.now(UTC):%Y-%m-%d}")
        n = export_results(export, machine)
        print(f"{n} results of today's patches written to {export}")
        return
    idx = read_results()
    rows = sorted(idx.values(), key=lambda r: (str(r.get("scenario")), str(r.get("variant"))))
    for r in rows:
        r["stale"] = not current(r)
    if json_out:
        dump({"results": idx, "shipped_recorded_on": shipped_origin()})
        return

    def where(r: dict[str, Any]) -> str:
        return ("here" if r["origin"] == "here" else "shipped") + (
            ", stale" if r["stale"] else "")

    if markdown:
        print("| scenario | variant (policy) | guest kernel | verdict kernel | verdict model "
              "| checkpoints agreeing | confirmed | recorded |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            n = r["checkpoints"]
            print(f"| {r['scenario']} | `{r['variant']}` | {r['release']} | "
                  f"{', '.join(r['verdicts_kernel']) or 'none'} | "
                  f"{', '.join(r['verdicts_model']) or 'none'} | "
                  f"{round(r['agreement'] * n)}/{n} ({r['agreement']:.0%}) | "
                  f"{'yes' if r['confirmed'] else 'NO'} | "
                  f"{str(r.get('date', ''))[:10]}, {where(r)} |")
        return
    for r in rows:
        print(f"{r['scenario']:<14} {r['variant']:<19} {str(r['release'])[:22]:<22} "
              f"{r['agreement']:>4.0%} {'yes' if r['confirmed'] else 'NO':<3} "
              f"{where(r)}"[:80])
    if any(r["origin"] == "shipped" for r in rows):
        print(f"shipped: recorded on {shipped_origin()}"[:80])


@kernel_app.command("selftest")
def selftest_cmd(kernel: Annotated[str | None, typer.Option(
                     "--kernel", "-k", help="variant to boot and run the selftest in")] = None,
                 results_: Annotated[bool, typer.Option(
                     "--results", help="the recorded results of every variant; runs nothing")
                 ] = False,
                 markdown: Annotated[bool, typer.Option("--markdown", help="with --results: "
                                                        "a markdown table")] = False,
                 export: Annotated[Path | None, typer.Option(
                     "--export", help="write the results recorded here, of today's patches, "
                     "as a file to ship (kernel/data/selftest.json)")] = None,
                 json_out: JsonOpt = False) -> None:
    """The kselftest ksm_thp_split inside a variant's guest: compiled against the
    variant's kselftest.h, statically, and run under qemu (TCG).  Exit code 1 when a
    check fails, 2 when it could not run.

    \b
    Examples:
      ksmlab kernel selftest --kernel 6.12       fails: names the property broken
      ksmlab kernel selftest --kernel v1 --json
      ksmlab kernel selftest --results --markdown   the table of every variant
    """
    from . import selftest as st

    if export is not None:
        from ..live.machine import identity

        ident = identity()
        n = st.export(export, f"a machine with {ident['cpus']} CPUs running Linux "
                              f"{ident['kernel']}, guests under qemu TCG")
        print(f"{n} selftest results of today's patches written to {export}")
        return
    if results_ or kernel is None:
        rows = st.read_results()
        if json_out:
            dump({"results": rows})
            return
        for line in selftest_table(rows, markdown):
            print(line)
        return
    try:
        res = qemu_selftest(kernel)
    except (*_ERRORS, st.SelftestError) as e:
        fail(str(e))
    st.record(res)
    if json_out:
        dump(res.to_json(tap=True))
    else:
        print("\n".join(st.summary_lines(res)))
    if not res.passed:
        raise typer.Exit(1)


def qemu_selftest(kernel: str) -> Any:
    from .qemu import run_selftest

    return run_selftest(kernel, log=_log)


def selftest_table(rows: dict[str, dict[str, Any]], markdown: bool = False) -> list[str]:
    """One row per variant: the outcome of each property and the figures behind them."""
    from .selftest import PROPERTIES

    order = [v for v in VARIANTS if v in rows]
    out = []
    if markdown:
        out += ["| variant | guest kernel | rate (peak/budget) | merge (merged/pages) | "
                "zero pages counted | result |", "|---|---|---|---|---|---|"]
    for v in order:
        r = rows[v]
        oc = {c["prop"]: c["outcome"] for c in r.get("cases", [])}
        f = r.get("figures", {})
        rate = f"{oc.get('rate', '?')} ({f.get('rate.peak_ratio', float('nan')):.2f})"
        merge = (f"{oc.get('merge', '?')} ({f.get('merge.merged', 0):.0f}/"
                 f"{f.get('merge.pages', 0):.0f})")
        zero = oc.get("zero-counted", "?")
        verdict = "PASS" if r.get("passed") else "FAIL"
        if markdown:
            out.append(f"| `{v}` | {r.get('release')} | {rate} | {merge} | {zero} | {verdict} |")
        else:
            out.append(f"{v:<20} {rate:<16} {merge:<22} {zero:<5} {verdict}"[:80])
    if not order:
        out.append(f"no selftest results ({', '.join(PROPERTIES)}): run "
                   "`ksmlab kernel selftest --kernel VARIANT`")
    return out


def main() -> None:  # pragma: no cover - `python -m ksmlab.kernel.cli`
    kernel_app()
    sys.exit(0)
