"""``ksmlab scenarios`` and ``ksmlab policies``: what the lab knows."""

from __future__ import annotations

import textwrap

from .. import scenario as scenario_mod
from .common import JsonOpt, dump


def scenarios(json_out: JsonOpt = False) -> None:
    """List the built-in scenarios."""
    items = []
    for name in scenario_mod.builtin_names():
        sc = scenario_mod.load(name)
        items.append({"name": name, "mib": sc.total_mib, "duration": sc.duration,
                      "description": sc.description})
    if json_out:
        dump({"scenarios": items})
        return
    for it in items:  # 80 columns: the description wraps under itself, never cut
        head = f"{it['name']:<22} {it['mib']:>7} MiB {it['duration']:>5.0f} s  "
        print(textwrap.fill(str(it["description"]), 80, initial_indent=head,
                            subsequent_indent=" " * len(head)))


def policies(json_out: JsonOpt = False) -> None:
    """List the kernel variants the model knows (policies)."""
    from ..model.policies import POLICIES

    if json_out:
        dump({"policies": [
            {"name": p.name, "description": p.description, "sources": p.sources}
            for p in POLICIES.values()]})
        return
    for p in POLICIES.values():
        print(textwrap.fill(f"{p.name}: {p.description}", 80, subsequent_indent="  "))
        for rule, src in p.sources.items():
            print(textwrap.fill(f"{rule}: {src}", 80, initial_indent="    ",
                                subsequent_indent="      "))
