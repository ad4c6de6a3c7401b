"""Mutation checks: show that a property fails on a deliberately broken implementation.

``assert_catches(strategy, check)`` searches the property's own strategy for a case where
``check(case)`` raises AssertionError; it fails when none is found, so a property that cannot fail
is reported.

``property_table(properties, mutants)`` builds a module's two tests from one declaration: each row
``(check, strategy, mutant)`` is a property ``check(case)`` (raises AssertionError when it fails),
the strategy of its cases and the name of the broken variant it must catch (or a tuple of names);
``mutants`` maps each name to ``patch(monkeypatch)``, which installs that variant.  It returns
``test_property`` (the property holds on cases drawn from its strategy, one test per row, id the
check's name) and ``test_property_catches_its_mutant`` (with the mutant installed,
``assert_catches`` finds a counterexample in the same strategy, one test per mutant, id its name);
assign them to module-level names::

    test_property, test_property_catches_its_mutant = property_table(PROPERTIES, MUTANTS)

The table is checked when it is built: every row names a mutant of ``mutants``, every mutant is
used, and no mutant is caught twice (one row per broken variant).
"""

from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st
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


class Property(NamedTuple):
    """One row of a property table: the property, its cases and the broken variants it catches."""

    check: object
    strategy: object
    mutants: tuple


def property_table(properties, mutants):
    """``(test_property, test_property_catches_its_mutant)`` for the rows ``properties``
    (``(check, strategy, mutant name or names)``) and the patches ``mutants``
    (``{name: patch(monkeypatch)}``)."""
    rows = [Property(check, strategy, (m,) if isinstance(m, str) else tuple(m)) for check, strategy, m in properties]
    caught = [(row, name) for row in rows for name in row.mutants]
    names = [name for _, name in caught]
    unknown = [n for n in names if n not in mutants]
    unused = sorted(set(mutants) - set(names))
    twice = sorted({n for n in names if names.count(n) > 1})
    if unknown or unused or twice or not all(row.mutants for row in rows):
        raise ValueError(
            f"property table: unknown mutants {unknown}, unused {unused}, caught twice {twice}"
            + ("" if all(row.mutants for row in rows) else ", a row without a mutant")
        )

    @pytest.mark.parametrize("row", rows, ids=[row.check.__name__ for row in rows])
    @given(data=st.data())
    def test_property(row, data):
        row.check(data.draw(row.strategy))

    @pytest.mark.parametrize(("row", "mutant"), caught, ids=names)
    def test_property_catches_its_mutant(row, mutant, monkeypatch):
        mutants[mutant](monkeypatch)
        assert_catches(row.strategy, row.check)

    return test_property, test_property_catches_its_mutant
