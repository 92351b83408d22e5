"""Shipped text says what is, not how it came to be: no issue numbers, no "before
this change", no figure against the one it replaced (HELPERS.md).  Commit
messages carry the history."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = {".py", ".md", ".toml", ".json", ".txt", ".config", ".patch", ".rst", ".cfg"}
HISTORY = [
    r"\bissues? #?\d+\b",  # "(issue 13)", "issue 14's done-when sweep"
    r"\b(?:before|after) (?:this|the) (?:change|fix|commit|rewrite)\b",
    r"\bthan before\b",
    r"\d(?:[.,]\d+)? ?(?:s|ms|ns|us|µs|%|MiB|MB|GiB|x) before\b",  # "655 ns before"
    r"\b(?:it|the lab|the model|ksmlab|this code) used to\b",
    r"\bthe old (?:lab|code|engine|version|model|behaviou?r)\b",
    r"\bformerly\b",
    r"\bno longer falls back\b",
]
PATTERN = re.compile("|".join(f"(?:{h})" for h in HISTORY), re.IGNORECASE)


def shipped() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted(p for p in (ROOT / "src" / "ksmlab").rglob("*")
                    if p.is_file() and p.suffix in TEXT and "__pycache__" not in p.parts)
    return files


def test_the_scan_covers_what_ships() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in shipped()}
    assert {"README.md", "docs/sweeps.md", "src/ksmlab/sweeps/thread.toml",
            "src/ksmlab/metrics.py", "src/ksmlab/kernel/__init__.py"} <= names


@pytest.mark.parametrize("text", [
    "Patched guest kernels under qemu (issue 6).",
    "# The thread's question (issue 14's done-when sweep):",
    "the suite's model side in 2.3 s against 22.9 s before",
    "The cold-start term took some of it (655 ns before)",
    "faster than before", "before this change it split", "The lab used to start",
    "formerly `S R V P G F C`",
])
def test_history_words_are_found(text: str) -> None:
    assert PATTERN.search(text)


@pytest.mark.parametrize("text", [
    "as before 6.12", "a split before time 0", "the remap came in 6.12",
    "before the first full scan ends", "counters used to decide",
    "the patches in issue order",
])
def test_what_is_passes(text: str) -> None:
    assert not PATTERN.search(text)


def test_shipped_text_has_no_history_words() -> None:
    found = []
    for p in shipped():
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            m = PATTERN.search(line)
            if m:
                found.append(f"{p.relative_to(ROOT)}:{n}: {m.group(0)!r}: {line.strip()}")
    assert not found, "history in shipped text (write what is):\n" + "\n".join(found)
