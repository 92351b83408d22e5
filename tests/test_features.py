"""The kernel feature table: probed on fake sysfs/procfs trees, never by version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from ksmlab.live import features
from ksmlab.live.features import FEATURES, Feature, policy_for_host, probe, remap_expected
from ksmlab.live.kernelfs import KernelFS
from ksmlab.live.knobs import KNOBS
from ksmlab.scenario import KsmKnobs

from .conftest import make_fake_tree

VMSTAT_612 = "thp_fault_alloc 1\nthp_split_page 7\nthp_underused_split_page 0\n"
VMSTAT_61 = "thp_fault_alloc 1\nthp_split_page 7\nthp_deferred_split_page 2\n"


def tree(root: Path, files: dict[str, str]) -> KernelFS:
    make_fake_tree(root)
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return KernelFS(root)


def state(rows: list[features.Presence], name: str) -> bool | None:
    [r] = [r for r in rows if r.feature.name == name]
    return r.present


def test_every_feature_is_dated_and_named_once() -> None:
    seen = set()
    for f in FEATURES:
        assert (f.kind, f.name) not in seen
        seen.add((f.kind, f.name))
        assert len(f.commit) == 12 and int(f.commit, 16) >= 0, f
        assert f.release[0].isdigit() and f.subject, f
    # the remap and the shrinker: the thread's commits
    assert features.feature("zero-page remap on THP split").commit == "b1f202060afe"
    assert features.feature("transparent_hugepage/shrink_underused").commit == "dafff3f4c850"


def test_one_knob_list() -> None:
    """Every knob the lab may write has a feature row, and a scenario's KSM knobs are
    knobs the lab knows (the sampler and run.py take theirs from these)."""
    dated = {f.name for f in FEATURES if f.kind == "knob"}
    per_size = {n for n in KNOBS if "hugepages-" in n}
    assert set(KNOBS) - per_size - dated <= {"transparent_hugepage/khugepaged/max_ptes_swap"}
    assert {f"ksm/{n}" for n in KsmKnobs.model_fields} <= set(KNOBS)
    from ksmlab.live.run import scenario_knobs
    from ksmlab.live.sampler import KSM_KNOB_FILES
    from ksmlab.scenario import load

    written = [n for n, _ in scenario_knobs(load("seed-uzp1"))]
    assert [n for n in written if n.startswith("ksm/") and n not in ("ksm/run",
            "ksm/advisor_mode")] == [f"ksm/{n}" for n in KsmKnobs.model_fields
                                     if n != "advisor_mode"]
    assert written.count("ksm/advisor_mode") == 2  # none first, the scenario's last
    assert {n.removeprefix("ksm/") for n in KNOBS if n.startswith("ksm/")} == KSM_KNOB_FILES


def test_probe_a_612_tree(tmp_path: Path) -> None:
    fs = tree(tmp_path / "root", {
        "sys/kernel/mm/transparent_hugepage/shrink_underused": "1\n",
        "sys/kernel/mm/ksm/ksm_zero_pages": "0\n",
        "proc/vmstat": VMSTAT_612,
        "proc/self/ksm_stat": "ksm_rmap_items 0\nksm_zero_pages 0\n",
        "sys/kernel/tracing/events/ksm/ksm_merge_one_page/enable": "0\n",
    })
    rows = probe(fs)
    assert state(rows, "transparent_hugepage/shrink_underused") is True
    assert state(rows, "thp_underused_split_page") is True
    assert state(rows, "ksm/ksm_zero_pages") is True
    assert state(rows, "ksm/smart_scan") is True  # in the fake tree
    assert state(rows, "ksm/general_profit") is False  # not in it
    assert state(rows, "ksm_merge_one_page") is True
    assert state(rows, "ksm_process_profit") is False
    assert state(rows, "PR_SET_MEMORY_MERGE") is None  # a fake root: not asked
    assert state(rows, "zero-page remap on THP split") is True
    assert remap_expected(fs) is True and policy_for_host(fs) == "mainline"
    # the probe's own answer wins over the files
    assert state(probe(fs, remaps=False), "zero-page remap on THP split") is False
    assert policy_for_host(fs, remaps=False) == "pre-6.12"


def test_probe_a_61_tree(tmp_path: Path) -> None:
    """A 6.1 kernel (the kernel lab's pre-6.12 guest): no shrinker, no smart scan, no
    advisor, so no remap; the release string is not read at all."""
    fs = tree(tmp_path / "root", {"proc/vmstat": VMSTAT_61,
                                  "proc/sys/kernel/osrelease": "6.12.0-backports\n"})
    for rel in ("ksm/smart_scan", "ksm/advisor_mode", "transparent_hugepage/shrink_underused"):
        fs.path(f"sys/kernel/mm/{rel}").unlink(missing_ok=True)
    rows = probe(fs)
    assert state(rows, "ksm/smart_scan") is False
    assert state(rows, "thp_underused_split_page") is False
    assert state(rows, "thp_deferred_split_page") is True
    assert state(rows, "ksm_merge_one_page") is None  # tracefs not mounted: unknown
    assert state(rows, "ksm_rmap_items") is False  # no /proc/self/ksm_stat
    assert state(rows, "underused-THP shrinker") is False
    assert remap_expected(fs) is False
    assert policy_for_host(fs) == "pre-6.12"  # though osrelease says 6.12
    assert features.release(fs) == "6.12.0-backports"


def test_without_thp_the_remap_is_unknown(tmp_path: Path) -> None:
    fs = KernelFS(tmp_path)
    assert remap_expected(fs) is None and policy_for_host(fs) == "mainline"
    rows = probe(fs)
    assert state(rows, "thp_split_page") is None  # no /proc/vmstat: unknown


def test_table_fits_80_columns(tmp_path: Path) -> None:
    fs = tree(tmp_path / "root", {"proc/vmstat": VMSTAT_612})
    lines = features.table(probe(fs))
    assert max(len(x) for x in lines) <= 80
    assert any("stable_node_chains_prune_millisecs" in x for x in lines)  # whole names
    assert any(x.strip() == "/sys/kernel/mm/transparent_hugepage" for x in lines)
    assert isinstance(FEATURES[0], Feature)


def test_cli_choices_copy_the_lists() -> None:
    from ksmlab.cli.common import Engine, Format, PolicyName
    from ksmlab.model.policies import POLICIES
    from ksmlab.model.run import ENGINES

    assert list(get_args(PolicyName)) == list(POLICIES)
    assert get_args(Engine) == ENGINES
    assert get_args(Format) == ("text", "markdown", "json")


KSMLAB = [sys.executable, "-m", "ksmlab"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KSMLAB, *args], capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.mark.skipif(not Path("/sys/kernel/mm/ksm/run").exists(), reason="no KSM")
def test_doctor_prints_the_table_without_the_probe() -> None:
    """--no-probe --no-advice reads sysfs and procfs only (no THP split, no model)."""
    r = run("doctor", "--no-probe", "--no-advice", "--all")  # the table: --all
    assert r.returncode in (0, 1, 3), r.stderr
    out = r.stdout.splitlines()
    assert max(len(x) for x in out) <= 80, [x for x in out if len(x) > 80]
    assert any("b1f202060afe" in x for x in out) and "not probed" in r.stdout
    d = json.loads(run("doctor", "--no-probe", "--no-advice", "--json").stdout)
    rows = {f["name"]: f for f in d["features"]}
    assert rows["ksm/run"]["present"] is True and rows["ksm/run"]["release"] == "2.6.32"
    assert d["remap"]["probed"] is False
    assert rows["zero-page remap on THP split"]["present"] == remap_expected(KernelFS())


def test_bad_choice_is_one_line() -> None:
    r = run("sim", "seed-uzp1", "-p", "v9")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'v9' is not one of" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run("compare", "seed-uzp1", "-f", "yaml")
    assert r.returncode == 2 and "'yaml' is not one of" in r.stderr


SCRIPT = Path(sys.executable).parent / "ksmlab"  # the console script pip installed


@pytest.mark.skipif(not SCRIPT.exists(), reason="ksmlab's console script is not installed")
def test_completion_is_switched_on() -> None:
    r = subprocess.run([str(SCRIPT), "--show-completion", "bash"], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0 and "_KSMLAB_COMPLETE=complete_bash" in r.stdout, r.stdout
    env = {**os.environ, "_KSMLAB_COMPLETE": "complete_bash", "COMP_WORDS": "ksmlab si",
           "COMP_CWORD": "1"}
    r = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.stdout.split() == ["sim"] and r.stderr == "", (r.stdout, r.stderr)
    env["COMP_WORDS"], env["COMP_CWORD"] = "ksmlab sim seed-uzp1 --policy ", "4"
    r = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60,
                       check=False)
    assert "mainline" in r.stdout.split() and "v1-p3" in r.stdout.split(), r.stdout
