"""Hypothesis profiles for the fuzz tests, and the counter of inputs tried.

``GATEWAY_FUZZ_PROFILE``: ``ci`` (the default; bounded so that ``pytest -m fuzz`` takes a
minute or two on two cores) or ``long`` (``scripts/fuzz``). ``GATEWAY_FUZZ_EXAMPLES``
overrides the number of examples per test.
"""

from __future__ import annotations

import os
from collections import Counter

from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,
}
settings.register_profile(
    "ci", max_examples=int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "50")), **_COMMON
)
settings.register_profile(
    "long", max_examples=int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "3000")), **_COMMON
)
PROFILE = os.environ.get("GATEWAY_FUZZ_PROFILE", "ci")
FUZZ = settings(settings.get_profile(PROFILE))

# Inputs tried per target (requests sent, or examples run), printed at the end of the run
# and written to $GATEWAY_FUZZ_STATS as JSON for scripts/fuzz.
TRIED: Counter[str] = Counter()
