"""Tiny sdpa cases against 50-digit mpmath values stored as data (tests/data/sdpa_mpmath.json)."""

import json
import pathlib

import numpy as np
import pytest

import refattn

TABLE = json.loads((pathlib.Path(__file__).parents[1] / "data" / "sdpa_mpmath.json").read_text())


def _decode(x):
    if isinstance(x, dict) and "bool" in x:
        return np.array(x["bool"], dtype=bool)
    if isinstance(x, dict):
        return np.array([float(v) for v in x["values"]]).reshape(x["shape"])
    if isinstance(x, list):
        return tuple(x)
    return x


def _expected(values):
    return np.array([np.nan if v is None else float(v) for v in values])


def _rel_error(actual, expected):
    actual, expected = np.ravel(actual), np.ravel(expected)
    finite = np.isfinite(expected)
    assert np.array_equal(actual[~finite], expected[~finite]), "non-finite entries differ"
    scale = np.max(np.abs(expected[finite]), initial=0.0)
    return np.max(np.abs(actual[finite] - expected[finite]), initial=0.0) / (scale or 1.0)


@pytest.mark.parametrize("case", TABLE["cases"], ids=[c["name"] for c in TABLE["cases"]])
def test_forward_and_backward_match_mpmath(case):
    inputs = {n: _decode(a) for n, a in case["inputs"].items()}
    options = {n: _decode(a) for n, a in case["options"].items()}
    out, lse = refattn.sdpa(inputs["q"], inputs["k"], inputs["v"], return_lse=True, **options)
    tol = TABLE["tolerance"]
    assert _rel_error(out, _expected(case["expected"]["out"])) <= tol["forward"]
    assert _rel_error(lse, _expected(case["expected"]["lse"])) <= tol["forward"]
    grads = refattn.sdpa_backward(
        _decode(case["d_out"]), inputs["q"], inputs["k"], inputs["v"], d_lse=_decode(case["d_lse"]), **options
    )
    checked = 0
    for field, values in case["expected"].items():
        if field.startswith("d"):
            assert _rel_error(getattr(grads, field), _expected(values)) <= tol["backward"], field
            checked += 1
    assert checked >= 3


def test_table_is_the_mpmath_evaluation_of_its_inputs():
    """Recompute the first two cases' forward with mpmath: the stored data is not stale."""
    mp = pytest.importorskip("mpmath")
    from tests.data.make_mpmath_tables import _flat, _mp, mp_sdpa

    for case in TABLE["cases"][:2]:
        inputs = {n: _decode(a) for n, a in case["inputs"].items()}
        options = {
            n: _mp(a) if isinstance(a, np.ndarray) else a
            for n, a in ((n, _decode(a)) for n, a in case["options"].items())
        }
        out, _ = mp_sdpa(*(_mp(inputs[n]) for n in "qkv"), options)
        for got, want in zip(_flat(out), case["expected"]["out"]):
            assert abs(got - mp.mpf(want)) <= mp.mpf("1e-20") * (1 + abs(got))
