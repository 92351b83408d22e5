"""The error a user can fix: bad input, or a machine that cannot do what was asked.

Library code (the orchestration of ``validate`` and ``calibrate`` in
:mod:`ksmlab.orchestrate`) raises it; the command line prints it as one line and
exits with code 2.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a machine that cannot do it: one line, exit code 2."""
