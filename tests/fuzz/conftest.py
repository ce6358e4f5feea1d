"""Hypothesis profiles for the fuzz harnesses.

``HYPOTHESIS_PROFILE`` picks one:

* ``smoke`` (the default, what ``make test`` runs): ten examples per
  harness, derandomised so the suite is the same on every run; the whole
  directory takes a few seconds.
* ``long`` (``make fuzz``): many examples, random each run, failures kept in
  ``.hypothesis/`` and replayed first next time. ``FUZZ_EXAMPLES`` sets the
  number of examples per harness (default 5000).

Every harness asserts one thing: whatever the input, only the parser's
documented error type escapes.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "smoke",
    max_examples=10,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long",
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "5000")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "smoke"))
