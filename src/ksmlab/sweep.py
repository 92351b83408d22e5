"""Sweeps: policies x a grid of scenario fields x scenarios, one model run a point,
on Dask (a LocalCluster here, or any scheduler), cached point by point.

A spec (TOML)::

    scenarios = ["seed-uzp0", "mixed", "my-host.toml"]   # built-ins or files
    policies = "all"                                      # or ["mainline", "v1"]
    engine = "auto"                                       # the model engine
    [grid]                                                # dotted scenario fields
    ksm.pages_to_scan = [100, 1000, 5000]
    ksm.use_zero_pages = [0, 1]
    [report]
    curves = [{ "ksm.pages_to_scan" = 1000 }]             # settings to draw over time

Each point is cached in ``DIR/points/KEY.json``, KEY a hash of (scenario after the
overrides, policy, cost profile, ksmlab version): an interrupted sweep resumes, a
repeated one does no model work.  ``DIR/results.parquet`` is the tidy table.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import __version__
from . import scenario as scenario_mod
from .model.costs import CostProfile
from .scenario import FOLIO_ORDERS, Scenario, ScenarioError
from .trace import write_atomic

if TYPE_CHECKING:
    import pandas as pd
    from distributed import Client
    from rich.console import Console

Value = int | float | str
CURVE_SAMPLES = 300  # memory-over-time points kept per run: enough for a plot
RESULTS = "results.parquet"
META = "sweep.json"


class SweepError(ValueError):
    """A spec or sweep folder that cannot be used; the message is one line."""


class ReportSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # settings drawn over time, each a subset of grid values ({} = every setting)
    curves: list[dict[str, Value]] | None = None


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    scenarios: list[str] = Field(min_length=1)
    policies: list[str] | Literal["all"] = "all"
    engine: Literal["auto", "fast", "exact"] = "auto"
    grid: dict[str, list[Value]] = Field(default_factory=dict)
    report: ReportSpec = ReportSpec()

    @field_validator("grid", mode="before")
    @classmethod
    def _flatten(cls, v: Any) -> Any:
        # `ksm.pages_to_scan = [...]` in TOML is a nested table: back to dotted names;
        # a single value is a grid of one
        if not isinstance(v, dict):
            return v
        flat: dict[str, Any] = {}

        def walk(prefix: str, d: dict[str, Any]) -> None:
            for k, x in d.items():
                name = f"{prefix}{k}"
                if isinstance(x, dict):
                    walk(name + ".", x)
                else:
                    flat[name] = x if isinstance(x, list) else [x]
        walk("", v)
        for name, values in flat.items():
            if not values:
                raise ValueError(f"{name}: an empty list of values")
        return flat

    @field_validator("policies")
    @classmethod
    def _known(cls, v: list[str] | str) -> list[str] | str:
        from .model import POLICIES

        for p in [] if v == "all" else v:
            if p not in POLICIES:
                raise ValueError(f"unknown policy {p!r}; known: {', '.join(POLICIES)}")
        return v

    def policy_names(self) -> list[str]:
        from .model import POLICIES

        return list(POLICIES) if self.policies == "all" else list(self.policies)

    def settings(self) -> list[dict[str, Value]]:
        """Every combination of grid values, the first field varying slowest."""
        names = list(self.grid)
        return [dict(zip(names, vals, strict=True))
                for vals in itertools.product(*self.grid.values())]


def need_extra() -> None:
    """The sweep's libraries are an extra (``ksmlab[sweep]``): say so in one line."""
    import importlib.util

    missing = [m for m in ("distributed", "pandas", "pyarrow")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise SweepError(f"{', '.join(missing)} missing: pip install 'ksmlab[sweep]'")


def load_spec(path: Path) -> tuple[Spec, Path]:
    """The spec, and the folder its scenario files are found from."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise SweepError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise SweepError(f"{path}: not valid TOML: {e}") from None
    try:
        return Spec.model_validate(data), path.parent
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "(top level)"
        msg = str(first["msg"]).removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = "unknown field (scenarios, policies, engine, grid, report)"
        raise SweepError(f"{path}: {loc}: {msg}") from None


EXAMPLES = "sweeps"  # example specs shipped in the package (ksmlab sweep --example)


def examples() -> dict[str, tuple[Path, str]]:
    """The example specs shipped with ksmlab: name -> (file, what it sweeps: its
    opening comment).  Scenario files beside them (host-16g.toml) are not specs."""
    from importlib import resources

    root = Path(str(resources.files("ksmlab") / EXAMPLES))
    out: dict[str, tuple[Path, str]] = {}
    for f in sorted(root.glob("*.toml")):
        text = f.read_text()
        if "scenarios" not in tomllib.loads(text):
            continue
        about = []
        for line in text.splitlines():
            if not line.startswith("#") or line.startswith("#   "):
                break
            about.append(line.lstrip("# "))
        out[f.stem] = (f, " ".join(about))
    return out


def example_spec(name: str) -> Path:
    """An example spec's file; a SweepError naming the examples for another name."""
    found = examples()
    if name not in found:
        raise SweepError(f"no example sweep {name!r}; examples: {', '.join(found)}")
    return found[name][0]


@dataclass(frozen=True)
class Point:
    scenario: str  # the name the spec gave (a built-in or a file)
    policy: str
    setting: dict[str, Value]
    sc: Scenario  # after the overrides
    key: str


def override(sc: Scenario, setting: dict[str, Value], where: str) -> Scenario:
    """``sc`` with dotted fields set; a field it lacks or a value it rejects is a
    SweepError naming both."""
    data = sc.model_dump(mode="json")
    for name, value in setting.items():
        node = data
        *parents, leaf = name.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                node = {}
                break
            node = node[p]
        # thp.hugepages lists only the sizes a scenario sets: any size may be added
        size_knob = parents == ["thp", "hugepages"] and leaf in FOLIO_ORDERS
        if (leaf not in node and not size_knob) or isinstance(node.get(leaf), dict | list):
            raise SweepError(f"{where}: grid field {name!r} is not a scenario value "
                             "(e.g. duration, ksm.pages_to_scan, thp.khugepaged.max_ptes_none, "
                             "thp.hugepages.64kB)")
        node[leaf] = value
    try:
        return Scenario.model_validate(data)
    except ValidationError as e:
        shown = ", ".join(f"{k}={v}" for k, v in setting.items())
        raise SweepError(scenario_mod._one_line(e, f"{where} with {shown}")) from None


def point_key(sc: Scenario, policy: str, profile: CostProfile) -> str:
    doc = {"scenario": sc.model_dump(mode="json"), "policy": policy,
           "profile": profile.to_json(), "ksmlab": __version__}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]


def expand(spec: Spec, base: Path, profile: CostProfile) -> list[Point]:
    """Every point of the sweep, in the table's order (scenario, setting, policy);
    every override is validated here, before any model work."""
    points: list[Point] = []
    seen: set[str] = set()
    for name in spec.scenarios:
        path = base / name
        try:
            sc = scenario_mod.load(str(path) if name.endswith(".toml") else name)
        except ScenarioError as e:
            raise SweepError(str(e)) from None
        label = sc.name if name.endswith(".toml") else name
        if label in seen:
            raise SweepError(f"scenario {label!r} is named twice in the spec")
        seen.add(label)
        for setting in spec.settings():
            over = override(sc, setting, label)
            points += [Point(label, p, setting, over, point_key(over, p, profile))
                       for p in spec.policy_names()]
    return points


def run_point(scenario: dict[str, Any], policy: str, profile: CostProfile,
              engine: str) -> dict[str, Any]:
    """One model run, on a worker.  A failure is returned, not raised: the model's
    errors are deterministic, so the point is recorded (and cached) with its error."""
    from .metrics import freed_pages, ksm_accounted_pages, summarize
    from .model import simulate

    t0 = time.perf_counter()
    try:
        tr = simulate(Scenario.model_validate(scenario), policy, profile=profile,
                      engine=engine)
        s = summarize(tr)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "wall_s": time.perf_counter() - t0}
    idx = np.unique(np.linspace(0, len(tr.t) - 1, min(len(tr.t), CURVE_SAMPLES)).astype(int))
    mib = 4096 / 2**20
    curve = {"t": tr.t[idx].round(3).tolist(),
             "freed_mib": (freed_pages(tr)[idx] * mib).round(3).tolist(),
             "ksm_mib": (ksm_accounted_pages(tr)[idx] * mib).round(3).tolist()}
    return {"summary": s.to_json(), "curve": curve, "error": None,
            "wall_s": time.perf_counter() - t0}


@contextmanager
def dask_client(scheduler: str | None, workers: int | None,
                timeout: str = "10s") -> Iterator[Client]:
    """A client of ``scheduler``, or of a LocalCluster of ``workers`` processes
    (one thread each: a model run holds the GIL outside numba)."""
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=timeout)
        except (OSError, TimeoutError, ValueError) as e:
            raise SweepError(f"--scheduler {scheduler}: cannot connect: {e}") from None
        with client:
            yield client
        return
    n = workers or os.cpu_count() or 1
    with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        yield client


@dataclass
class Outcome:
    points: int
    cached: int
    ran: int = 0
    failed: list[str] = field(default_factory=list)  # "scenario/policy setting: error"


def _record(p: Point, res: dict[str, Any]) -> dict[str, Any]:
    return {"key": p.key, "scenario": p.scenario, "policy": p.policy,
            "setting": p.setting, "ksmlab": __version__, **res}


def _read_point(path: Path) -> dict[str, Any] | None:
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent, or cut short by a kill: run it again
    return rec if isinstance(rec, dict) else None


Runner = Callable[[Sequence[Point], Callable[[Point, dict[str, Any]], None]], None]


def run(spec: Spec, base: Path, out: Path, profile: CostProfile, profile_label: str,
        runner: Runner, console: Console | None = None) -> Outcome:
    """Every point of ``spec`` not cached in ``out``, through ``runner``; then the table."""
    points = expand(spec, base, profile)
    pdir = out / "points"
    pdir.mkdir(parents=True, exist_ok=True)
    todo = [p for p in points if _read_point(pdir / f"{p.key}.json") is None]
    outcome = Outcome(len(points), len(points) - len(todo))
    write_atomic(out / META, json.dumps({
        "ksmlab": __version__, "spec": spec.model_dump(mode="json"),
        "fields": list(spec.grid), "scenarios": list(dict.fromkeys(p.scenario for p in points)),
        "policies": spec.policy_names(), "profile": profile_label,
        "keys": [p.key for p in points]}, indent=1).encode())
    try:
        if todo:
            _run_todo(todo, pdir, outcome, runner, console)
    finally:  # interrupted too: the table of what finished
        write_results(out)
    return outcome


def _run_todo(todo: Sequence[Point], pdir: Path, outcome: Outcome, runner: Runner,
              console: Console | None) -> None:
    with _progress(console, len(todo)) as tick:
        def done(p: Point, res: dict[str, Any]) -> None:
            transient = res.pop("transient", False)
            rec = _record(p, res)
            # a lost worker is not the model's doing: that point runs again next time
            name = f"{p.key}.failed.json" if transient else f"{p.key}.json"
            write_atomic(pdir / name, json.dumps(rec).encode())
            if not transient:
                (pdir / f"{p.key}.failed.json").unlink(missing_ok=True)
            outcome.ran += 1
            if rec.get("error"):
                shown = " ".join(f"{k}={v}" for k, v in p.setting.items())
                outcome.failed.append(f"{p.scenario}/{p.policy} {shown}: {rec['error']}")
            tick(bool(rec.get("error")))
        runner(todo, done)


@contextmanager
def _progress(console: Console | None, total: int) -> Iterator[Callable[[bool], None]]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    failed = 0
    with Progress(TextColumn("points"), BarColumn(bar_width=28), MofNCompleteColumn(),
                  TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(),
                  TextColumn("left"), TimeRemainingColumn(), console=console,
                  disable=console is None or not console.is_terminal,
                  transient=True) as prog:
        task = prog.add_task("points", total=total, failed=0)

        def tick(bad: bool) -> None:
            nonlocal failed
            failed += bad
            prog.update(task, advance=1, failed=failed)
        yield tick


def dask_runner(client: Client, engine: str, profile: CostProfile) -> Runner:
    """Submit every point, record each as it ends (in whatever order)."""
    from distributed import as_completed

    def runner(todo: Sequence[Point], done: Callable[[Point, dict[str, Any]], None]) -> None:
        futures = {client.submit(run_point, p.sc.model_dump(mode="json"), p.policy,
                                 profile, engine, key=f"ksmlab-point-{p.key}",
                                 pure=False): p for p in todo}
        try:
            for fut in as_completed(futures):
                try:
                    res = fut.result()
                except Exception as e:  # the worker died (KilledWorker) or was lost
                    res = {"error": f"{type(e).__name__}: {e}", "transient": True}
                done(futures[fut], res)
        finally:
            client.cancel(list(futures))
    return runner


def serial_runner(engine: str, profile: CostProfile) -> Runner:
    """In this process, one point after another (the benchmark's baseline)."""
    def runner(todo: Sequence[Point], done: Callable[[Point, dict[str, Any]], None]) -> None:
        for p in todo:
            done(p, run_point(p.sc.model_dump(mode="json"), p.policy, profile, engine))
    return runner


SUMMARY_COLUMNS = (
    "duration_s", "budget_mib_s", "freed_mib", "ksm_accounted_mib", "side_effect_mib",
    "freed_rate_peak_mib_s", "ksm_rate_peak_mib_s", "budget_ratio_peak", "budget_ratio_mean",
    "time_to_90pct_s", "merge_rate_mib_s", "ksmd_cpu_pct", "ksmd_cpu_pct_peak", "thps_start",
    "thps_kept", "thp_split_page", "thp_split_page_failed", "full_scans", "pages_scanned",
    "expected_mergeable_mib")
VERDICTS = ("rate-limit-bypass", "merge-collapse")


def row(rec: dict[str, Any], fields: Sequence[str], profile: str) -> dict[str, Any]:
    """One point as one tidy row."""
    s = rec.get("summary") or {}
    r: dict[str, Any] = {"scenario": rec["scenario"], "policy": rec["policy"]}
    r.update({f: rec["setting"].get(f) for f in fields})
    r.update({c: (float(s[c]) if s.get(c) is not None else None) for c in SUMMARY_COLUMNS})
    for v in VERDICTS:
        r[v.replace("-", "_")] = (v in s["verdicts"]) if s else None
    r["verdicts"] = ",".join(s.get("verdicts", []))
    r["borderline"] = ",".join(s.get("borderline", []))
    r["undetermined"] = "; ".join(s.get("undetermined", []))
    r["profile"] = profile
    r["error"] = rec.get("error")
    r["key"] = rec["key"]
    return r


def read_meta(out: Path) -> dict[str, Any]:
    try:
        meta = json.loads((out / META).read_text())
    except (OSError, ValueError):
        raise SweepError(f"{out}: not a sweep folder (no {META}; run `ksmlab sweep`)") from None
    return meta if isinstance(meta, dict) else {}


def points_of(out: Path) -> list[dict[str, Any]]:
    """The records of this sweep's points, in its order (a point a kill lost has
    none: it is absent from the table until the sweep is run again)."""
    recs = []
    for key in read_meta(out)["keys"]:
        rec = (_read_point(out / "points" / f"{key}.json")
               or _read_point(out / "points" / f"{key}.failed.json"))
        if rec is not None:
            recs.append(rec)
    return recs


def write_results(out: Path) -> pd.DataFrame:
    import pandas as pd

    meta = read_meta(out)
    rows = [row(r, meta["fields"], meta["profile"]) for r in points_of(out)]
    df = pd.DataFrame(rows)
    if not rows:  # nothing finished yet: no table (Parquet needs a column)
        (out / RESULTS).unlink(missing_ok=True)
        return df
    write_atomic(out / RESULTS, writer=lambda tmp: df.to_parquet(tmp, index=False))
    return df


def sweep(spec_path: Path, out: Path, scheduler: str | None, workers: int | None,
          profile: CostProfile, profile_label: str, console: Console | None,
          fits: Callable[[Scenario, str], None] | None = None) -> Outcome:
    """`ksmlab sweep`: ``fits`` refuses a scenario this machine has no memory for
    (a local cluster only: a remote worker's memory is not ours to know)."""
    need_extra()
    spec, base = load_spec(spec_path)
    points = expand(spec, base, profile)  # bad input fails here, before Dask starts
    if fits is not None and scheduler is None:
        for sc in {p.scenario: p.sc for p in points}.values():
            fits(sc, spec.engine)
    if out.exists() and not out.is_dir():
        raise SweepError(f"-o {out}: exists and is not a folder")
    todo = sum(_read_point(out / "points" / f"{p.key}.json") is None for p in points)
    if not todo:  # a finished sweep: no cluster, no model work
        return run(spec, base, out, profile, profile_label, serial_runner(spec.engine, profile),
                   console)
    with dask_client(scheduler, workers) as client:
        return run(spec, base, out, profile, profile_label,
                   dask_runner(client, spec.engine, profile), console)
