"""The import graph: no cycles among ksmlab's modules, no private names imported
across modules, and the base install (no ``model`` extra) enough for the live lab
and ``doctor``: importing the command line pulls in neither numba nor scipy."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MODEL_ONLY = ("numba", "llvmlite", "scipy", "matplotlib")


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports(top_level_only: bool) -> dict[str, set[str]]:
    """module -> the ksmlab modules it imports (at import time, or anywhere)."""
    files = {_module(p): p for p in SRC.joinpath("ksmlab").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        out: set[str] = set()

        def visit(body: list[ast.stmt], mod: str = mod, package: str = package,
                  out: set[str] = out) -> None:
            for node in body:
                if isinstance(node, ast.If) and _type_checking(node):
                    continue
                if isinstance(node, ast.Import):
                    out.update(a.name for a in node.names if a.name.startswith("ksmlab"))
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        anchor = package.split(".")
                        anchor = anchor[: len(anchor) - node.level + 1]
                        base = ".".join([*anchor, *([base] if base else [])])
                    if not base.startswith("ksmlab"):
                        continue
                    for a in node.names:  # `from . import x` may name a module
                        sub = f"{base}.{a.name}"
                        out.add(sub if sub in files else base)
                elif top_level_only and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef
                                                   | ast.ClassDef):
                    continue
                for field in ("body", "orelse", "finalbody", "handlers"):
                    inner = getattr(node, field, None)
                    if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt
                                                                       | ast.excepthandler):
                        visit([s for s in inner if isinstance(s, ast.stmt)])
                for h in getattr(node, "handlers", []) or []:
                    visit(h.body)

        visit(tree.body)
        graph[mod] = {m for m in out if m in files and m != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_no_import_cycles_at_import_time() -> None:
    """What runs when a module is imported forms no cycle (a cycle there breaks
    whichever module is imported first)."""
    assert cycles(imports(top_level_only=True)) == []


def test_the_command_line_imports_nothing_back() -> None:
    """Including imports inside functions: no library module imports ksmlab.cli
    (demo.py did), and the cli package is a leaf of the graph."""
    graph = imports(top_level_only=False)
    back = sorted(m for m, deps in graph.items() if not m.startswith("ksmlab.cli")
                  and m != "ksmlab.__main__" and m != "ksmlab.kernel.cli"
                  and any(d.startswith("ksmlab.cli") for d in deps))
    assert back == []
    assert not [c for c in cycles(graph) if any(m.startswith("ksmlab.cli") for m in c)]


def test_no_private_names_across_the_command_line() -> None:
    """The cli package and the modules it uses share public names only."""
    bad = []
    for path in SRC.joinpath("ksmlab", "cli").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or "ksmlab" in (node.module or "")):
                bad += [f"{path.name}: {a.name}" for a in node.names
                        if a.name.startswith("_") and a.name != "__version__"]
    assert bad == []


@pytest.mark.parametrize("args", [["--version"], ["doctor", "--help"], ["--help"],
                                  ["scenarios"], ["kernel", "--help"]])
def test_base_install_needs_no_model_extra(args: list[str]) -> None:
    """`pip install ksmlab` (no [model]) runs the live lab and doctor: the command line
    and these commands import neither numba nor scipy nor matplotlib."""
    code = ("import sys\nsys.argv = ['ksmlab', *sys.argv[1:]]\nfrom ksmlab.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({MODEL_ONLY!r})),"
            " file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.stderr.strip().splitlines()[-1] == "[]", r.stderr


BLOCK = f"""
import sys


class Block:  # the base install: the model extra's modules are not there
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {MODEL_ONLY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)


sys.meta_path.insert(0, Block())
sys.argv = ["ksmlab", *sys.argv[1:]]
from ksmlab.cli import main
main()
"""


def without_model(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK, *args], capture_output=True,
                          text=True, timeout=300, check=False)


def test_without_the_model_extra(tmp_path: Path) -> None:
    """A model command says in one line what to install; the exact engine (doctor's
    advice uses it) runs on numpy alone, and a run's trace is written without its plot."""
    r = without_model("sim", "seed-uzp1-nothp", "-p", "mainline", "-d", "2", "--engine",
                      "fast")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "ksmlab: error: numba is not installed: pip install 'ksmlab[model]' (the model's "
        "fast engine, calibrate and plots)"]
    r = without_model("sim", "seed-uzp1-nothp", "-p", "mainline", "-d", "2", "--engine",
                      "exact", "-o", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "note: no plot: matplotlib is not installed" in r.stderr
    assert list(tmp_path.glob("*.trace.json.gz")) and not list(tmp_path.glob("*.png"))
    r = subprocess.run([sys.executable, "-c", BLOCK.split("sys.argv")[0]
                        + "import ksmlab.advice, ksmlab.cli.doctor, ksmlab.live.run"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_base_install_from_the_wheel(tmp_path: Path) -> None:
    """`pip install ksmlab` for real: the wheel into a fresh venv (uv, from its cache:
    no network), then --version, doctor --help and scenarios run, and neither numba
    nor scipy nor matplotlib was installed."""
    import shutil

    uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    if not Path(uv).exists():
        pytest.skip("no uv to make a fresh venv")
    tree = tmp_path / "tree"  # a copy: building writes build/ beside the sources
    shutil.copytree(SRC, tree / "src", ignore=shutil.ignore_patterns("__pycache__",
                                                                      "*.egg-info"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(SRC.parent / f, tree / f)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                        str(tmp_path), str(tree)], capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-800:]
    [wheel] = tmp_path.glob("ksmlab-*.whl")
    venv = tmp_path / "venv"
    # uv's own cache, not the one conftest.py points XDG_CACHE_HOME at for ksmlab
    env = {k: v for k, v in os.environ.items() if k != "XDG_CACHE_HOME"}
    subprocess.run([uv, "venv", "-q", "-p", sys.executable, str(venv)], check=True,
                   timeout=120, env=env)
    r = subprocess.run([uv, "pip", "install", "-q", "--offline", "--python",
                        str(venv / "bin" / "python"), str(wheel)], capture_output=True,
                       text=True, timeout=300, check=False, env=env)
    if r.returncode != 0:
        pytest.skip(f"the base dependencies are not in uv's cache: {r.stderr[-600:]}")
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert not [m for m in MODEL_ONLY if (site / m).exists()]
    # sweep --example: the example specs are in the wheel, listed without the extra
    for args in (["--version"], ["doctor", "--help"], ["scenarios"], ["sweep", "--example"]):
        r = subprocess.run([str(venv / "bin" / "ksmlab"), *args], capture_output=True,
                           text=True, timeout=120, check=False, cwd=tmp_path,
                           env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
        assert r.returncode == 0 and r.stdout, (args, r.stderr)
    assert "thread" in r.stdout and (site / "ksmlab" / "sweeps" / "host-16g.toml").exists()


def test_no_import_cycles_at_all() -> None:
    """Counting imports inside functions too: a lazy import still ties two modules
    (the exact and the fast engine imported each other that way)."""
    assert cycles(imports(top_level_only=False)) == []


def test_the_engines_do_not_import_each_other() -> None:
    """Both engines are backends of model/timeline.py; neither imports the other."""
    graph = imports(top_level_only=False)
    fast = {m for m in graph if m.startswith("ksmlab.model.fast")}
    assert not graph["ksmlab.model.timeline"] & fast
    assert not any("ksmlab.model.run" in graph[m] for m in fast)


def test_no_private_names_across_modules() -> None:
    files = {_module(p) for p in SRC.joinpath("ksmlab").rglob("*.py")}
    bad = []
    for path in SRC.joinpath("ksmlab").rglob("*.py"):
        mod = _module(path)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if not base.startswith("ksmlab"):
                continue
            bad += [f"{mod}: {base}.{a.name}" for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                    and f"{base}.{a.name}" not in files]
    assert bad == []


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
