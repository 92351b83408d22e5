"""The package's import graph: no cycles, no private names taken across modules.

Read from the source with ast (every import, at module level or in a function, since
a lazy import still ties the two modules), so it needs no third-party tool."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ksmlab"
# cli.py and demo.py import each other (lazily); the cli package of issue 15 part 4
# removes it
KNOWN_CYCLES = [{"ksmlab.cli", "ksmlab.demo"}]


def modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = list(f.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """module -> modules it imports; and (importer, module, name) of private names."""
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for m, f in mods.items():
        pkg = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg[: len(pkg) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                names = [a.name for a in node.names]
                subs = {f"{target}.{n}" for n in names} & mods.keys()
                if len(subs) < len(names) and target in mods:
                    edges[m].add(target)  # names the module (or package) defines
                edges[m] |= subs
                private += [(m, target, n) for n in names
                            if n.startswith("_") and not n.startswith("__")
                            and f"{target}.{n}" not in mods]
            elif isinstance(node, ast.Import):
                edges[m] |= {a.name for a in node.names} & mods.keys()
        edges[m].discard(m)
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    found = [c for c in cycles(graph()[0]) if c not in KNOWN_CYCLES]
    assert found == []


def test_the_engines_do_not_import_each_other() -> None:
    edges, _ = graph()
    fast = {m for m in edges if m.startswith("ksmlab.model.fast")}
    assert not any(m in fast for m in edges["ksmlab.model.timeline"])
    assert not any("ksmlab.model.run" in edges[m] for m in fast)


def test_no_private_names_across_the_model() -> None:
    _, private = graph()
    assert [p for p in private if p[0].startswith("ksmlab.model")] == []


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
