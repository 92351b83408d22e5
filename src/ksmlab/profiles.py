"""Which cost profile a model run uses, and where each machine's profile is kept.

Counters and verdicts do not depend on the machine; ksmd's CPU and the time of
a full scan do (291 against 968 ns per page visit on two machines of one kind).
So a profile belongs to the machine it was fitted on: ``ksmlab calibrate``
stores it in the user's cache, keyed by the machine's identity
(:mod:`ksmlab.live.machine`), and every command that runs the model takes, in
this order:

1. ``--profile FILE``;
2. ``$KSMLAB_PROFILE`` (a file: scripts and the test suite pin theirs);
3. this machine's profile in ``$XDG_CACHE_HOME/ksmlab/profiles/`` (default
   ``~/.cache``);
4. the profile shipped in the package, fitted on another machine.

Every output names the choice (:meth:`ProfileChoice.label`, ``to_json``).
Nothing here reads the kernel: the caller passes the machine's identity.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .model.costs import CostProfile, load_profile
from .trace import write_atomic

ENV = "KSMLAB_PROFILE"


class ProfileError(ValueError):
    """A profile file that cannot be used (one line)."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ksmlab" / "profiles"


def machine_path(key: str) -> Path:
    return cache_dir() / f"{key}.json"


@dataclass(frozen=True)
class ProfileChoice:
    profile: CostProfile
    source: str  # "file", "env", "machine" or "shipped"
    path: str
    fitted: str | None = None  # when (ISO 8601, UTC)
    fitted_on: dict[str, Any] = field(default_factory=dict)  # machine identity
    scenarios: tuple[str, ...] = ()
    warning: str | None = None  # why its CPU and time figures may not be this machine's

    def label(self) -> str:
        """One line for text output."""
        when = f", fitted {self.fitted[:16].replace('T', ' ')}" if self.fitted else ""
        where = {"machine": "this machine's", "shipped": "shipped (fitted elsewhere)",
                 "env": f"${ENV}", "file": "--profile"}[self.source]
        return f"profile: {where}{when}: {self.path}"

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "path": self.path, "fitted": self.fitted,
                "fitted_on": self.fitted_on, "scenarios": list(self.scenarios),
                "warning": self.warning}


def _document(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ProfileError(f"{path}: not a cost profile: {e}") from None
    return doc if isinstance(doc, dict) else {}


def _choice(path: Path, source: str, ident: dict[str, Any] | None) -> ProfileChoice:
    try:
        profile = load_profile(path)
    except ValueError as e:
        raise ProfileError(str(e)) from None
    doc = _document(path)
    on = doc.get("machine") if isinstance(doc.get("machine"), dict) else {}
    return ProfileChoice(profile, source, str(path), doc.get("fitted"), on or {},
                         tuple(doc.get("scenarios", ())), _warning(source, on or {}, ident))


def _warning(source: str, on: dict[str, Any], ident: dict[str, Any] | None) -> str | None:
    if ident is None:
        return None
    if source == "shipped":
        return ("the shipped profile was fitted on another machine: ksmd CPU and full-scan "
                "times are not this machine's (ksmlab calibrate --quick fits this one's)")
    if not on:
        return None
    if on.get("cpu") != ident.get("cpu") or on.get("kernel") != ident.get("kernel"):
        return "fitted on another machine or kernel (see fitted_on)"
    if on.get("boot_id") and ident.get("boot_id") and on["boot_id"] != ident["boot_id"]:
        return ("fitted in an earlier boot: a VM may since run on another host "
                "(ksmlab calibrate --quick refits)")
    return None


def shipped_path() -> Path:
    return Path(str(resources.files("ksmlab.model") / "profiles" / "default.json"))


def resolve(explicit: Path | None, ident: dict[str, Any] | None, key: str | None
            ) -> ProfileChoice:
    """The profile a command uses (the order in the module docstring).

    ``ident``/``key``: this machine's identity and key, or None where the caller
    cannot read them (then only 1, 2 and 4 apply)."""
    if explicit is not None:
        return _choice(explicit, "file", ident)
    env = os.environ.get(ENV)
    if env:
        return _choice(Path(env), "env", ident)
    if key is not None:
        mine = machine_path(key)
        if mine.exists():
            return _choice(mine, "machine", ident)
    return _choice(shipped_path(), "shipped", ident)


def save_machine(doc: dict[str, Any], key: str) -> Path:
    """Store a fitted profile document as this machine's (atomically: a run killed
    mid-write leaves the old profile, never half a file)."""
    return write_atomic(machine_path(key), (json.dumps(doc, indent=1) + "\n").encode())
