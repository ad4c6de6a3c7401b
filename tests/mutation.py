"""Mutation checks: show that a property fails on a deliberately broken implementation.

``assert_catches(strategy, check)`` searches the property's own strategy for a
case where ``check(case)`` raises AssertionError; it fails when none is found,
so a property that cannot fail is reported.
"""

from hypothesis import HealthCheck, Phase, find, settings
from hypothesis.errors import NoSuchExample

# No shrinking: only the existence of a failing case matters here.
_SEARCH = settings(
    max_examples=400,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


def violates(check, case):
    try:
        check(case)
    except AssertionError:
        return True
    return False


def assert_catches(strategy, check):
    """Assert that ``check`` fails for some case drawn from ``strategy``; returns that case."""
    try:
        return find(strategy, lambda case: violates(check, case), settings=_SEARCH)
    except NoSuchExample:
        raise AssertionError("the property never failed on the mutant: it cannot catch this bug") from None
