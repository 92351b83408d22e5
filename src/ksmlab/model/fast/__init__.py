"""The fast engine: the exact model's mechanisms on arrays, ksmd compiled with numba.

It gives the same trace as :mod:`ksmlab.model.run` (checked by the differential
tests in tests/test_model_fast.py) at tens of millions of page visits per
second and about 30 bytes per simulated page.  :func:`unsupported` says when
a scenario is outside what it represents; ``simulate()`` then uses the exact
engine.
"""

from .engine import FastSimulation, unsupported

__all__ = ["FastSimulation", "unsupported"]
