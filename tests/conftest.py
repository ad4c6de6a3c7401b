"""Hypothesis profiles: 'dev' (fast, the default), 'ci' (derandomized, no deadline) and 'stress'
(randomized, 200 examples: run locally with HYPOTHESIS_PROFILE=stress to shake out flaky cases).

The 'ci' profile is loaded when the CI environment variable is set (tox passes it through).
"""

import os

from hypothesis import HealthCheck, settings

# The first-compile notice goes to stderr; tests that read stderr expect only their own lines.
os.environ.setdefault("REFATTN_QUIET", "1")

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=25, **_common)
settings.register_profile("stress", max_examples=200, **_common)  # local: randomized, to shake out flaky cases
settings.register_profile("ci", max_examples=40, derandomize=True, database=None, print_blob=True, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))
