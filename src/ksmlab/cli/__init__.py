"""The ``ksmlab`` command: one module per command (or group) in this package,
the application in :mod:`ksmlab.cli.application`, shared options and the error helper in
:mod:`ksmlab.cli.common` (``ksmlab kernel``, ksmlab/kernel/cli.py, uses them too).

This file imports nothing of its own: ksmlab/kernel/cli.py imports
``ksmlab.cli.common``, which runs this file first, and the application imports
ksmlab/kernel/cli.py; the application is loaded on first use of ``app`` or
``main`` instead, so that no import cycle exists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import __version__

if TYPE_CHECKING:
    from .application import app


def main() -> None:
    """The ``ksmlab`` entry point (pyproject: ``ksmlab = "ksmlab.cli:main"``)."""
    from .application import main as run

    run()


def __getattr__(name: str) -> Any:  # PEP 562: ``from ksmlab.cli import app``
    if name == "app":
        from .application import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__", "app", "main"]
