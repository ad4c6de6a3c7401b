"""Softmax family: values, empty-row policies, agreement with SciPy, and mutation checks."""

import importlib

import numpy as np
import pytest
import scipy.special
from hypothesis import given

import refattn
from refattn.testing.strategies import softmax_cases
from tests.mutation import assert_catches, violates

softmax_mod = importlib.import_module("refattn.softmax")


def _masked(case):
    x = case.inputs[0]
    m = case.options.get("mask", True)
    return np.where(m, x, -np.inf)


def check_matches_scipy(case):
    x = _masked(case)
    ax = case.options["axis"]
    empty = np.isneginf(x).all(axis=ax)
    opts = case.options
    with np.errstate(divide="ignore", invalid="ignore"):
        want_p = scipy.special.softmax(x, axis=ax)
        want_lse = scipy.special.logsumexp(x, axis=ax)
        want_log = x - np.expand_dims(want_lse, ax)
    keep = ~np.expand_dims(empty, ax)
    p = refattn.softmax(*case.inputs, **opts)
    np.testing.assert_allclose(np.where(keep, p, 0), np.where(keep, want_p, 0), rtol=1e-13, atol=1e-15)
    logp = refattn.log_softmax(*case.inputs, **opts)
    np.testing.assert_allclose(np.where(keep, logp, 0), np.where(keep, want_log, 0), rtol=1e-13, atol=1e-14)
    lse = refattn.logsumexp(*case.inputs, **opts)
    np.testing.assert_allclose(np.where(empty, 0, lse), np.where(empty, 0, want_lse), rtol=1e-13, atol=1e-14)


def check_empty_rows_follow_policy(case):
    x = _masked(case)
    ax = case.options["axis"]
    policy = case.options["empty_rows"]
    empty = np.expand_dims(np.isneginf(x).all(axis=ax), ax)
    n = x.shape[ax]
    p = refattn.softmax(*case.inputs, **case.options)
    expected = {"zero": 0.0, "nan": np.nan, "uniform": 1.0 / n}[policy]
    np.testing.assert_array_equal(p[np.broadcast_to(empty, p.shape)], expected)
    sums = p.sum(axis=ax, keepdims=True)
    np.testing.assert_allclose(sums[~empty], 1.0, rtol=1e-14)
    assert (p[np.broadcast_to(~empty, p.shape) & np.isneginf(x)] == 0).all()


@given(softmax_cases())
def test_matches_scipy(case):
    check_matches_scipy(case)


@given(softmax_cases())
def test_empty_rows_follow_policy(case):
    check_empty_rows_follow_policy(case)


def test_scipy_check_catches_missing_max_shift_overflow(monkeypatch):
    real = softmax_mod.normalize_last_axis

    def unnormalised(s, empty_rows, sink=None):
        nz = real(s, empty_rows, sink)
        return nz._replace(p=nz.p * s.shape[-1] / 2.0)

    monkeypatch.setattr(softmax_mod, "normalize_last_axis", unnormalised)
    assert_catches(softmax_cases(), check_matches_scipy)


def test_policy_check_catches_nan_leaking_into_zero_policy(monkeypatch):
    real = softmax_mod.normalize_last_axis

    def leaky(s, empty_rows, sink=None):
        nz = real(s, empty_rows, sink)
        return nz._replace(p=np.where(nz.empty[..., None], np.nan, nz.p))

    monkeypatch.setattr(softmax_mod, "normalize_last_axis", leaky)
    assert_catches(softmax_cases().filter(lambda c: c.options["empty_rows"] != "nan"), check_empty_rows_follow_policy)


def test_large_logits_do_not_overflow():
    x = np.array([[1000.0, 999.0, -1000.0]])
    p = refattn.softmax(x)
    np.testing.assert_allclose(p, [[1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1)), 0.0]], rtol=1e-15)
    assert refattn.logsumexp(x)[0] == pytest.approx(1000 + np.log1p(np.exp(-1)), rel=1e-15)


# Random, never all ones: softmax's backward of a constant cotangent is identically zero, so an
# all-ones dy cannot tell a zeroed empty-row gradient from one that flows through the fill.
DY = np.random.default_rng(7).standard_normal((2, 2))


def check_fully_masked_row_backward(dy):
    """softmax_backward on a kept row and a fully masked row, under each policy, for cotangent dy (2, 2)."""
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    mask = np.array([[True, True], [False, False]])
    p = refattn.softmax(x[0])
    kept = p * (dy[0] - p @ dy[0])  # p (dy - Σ p dy)
    for policy in ("zero", "uniform", "nan"):
        dx = refattn.softmax_backward(dy, x, mask=mask, empty_rows=policy).dx
        np.testing.assert_allclose(dx[0], kept, rtol=1e-14, atol=1e-16, err_msg=policy)
        if policy == "nan":
            assert np.isnan(dx[1]).all()
        else:  # 0 (zero) and a constant fill (uniform) do not depend on x
            np.testing.assert_array_equal(dx[1], 0.0, err_msg=policy)


def test_policies_on_a_fully_masked_row():
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    mask = np.array([[True, True], [False, False]])
    assert refattn.softmax(x, mask=mask)[1].tolist() == [0.0, 0.0]
    assert np.isnan(refattn.softmax(x, mask=mask, empty_rows="nan")[1]).all()
    assert refattn.softmax(x, mask=mask, empty_rows="uniform")[1].tolist() == [0.5, 0.5]
    assert refattn.log_softmax(x, mask=mask, empty_rows="uniform")[1].tolist() == [-np.log(2)] * 2
    assert np.isneginf(refattn.logsumexp(x, mask=mask)[1])
    check_fully_masked_row_backward(DY)


def test_fully_masked_row_check_catches_a_gradient_through_the_uniform_fill(monkeypatch):
    """Mutant: the 'uniform' empty row is differentiated as if its 1/n fill were a softmax."""
    monkeypatch.setattr(softmax_mod, "_empty_rows_grad", lambda dx, empty, empty_rows: dx)
    assert violates(check_fully_masked_row_backward, DY)
    # the all-ones cotangent the test used before is blind to this bug
    assert not violates(check_fully_masked_row_backward, np.full((2, 2), 1.0))


def test_bad_arguments_are_named():
    with pytest.raises(refattn.RefAttnError, match="axis: expected an axis in"):
        refattn.softmax(np.ones((2, 3)), axis=2)
    with pytest.raises(refattn.RefAttnTypeError, match="mask: expected a bool array"):
        refattn.softmax(np.ones((2, 3)), mask=np.ones((2, 3)))
    with pytest.raises(refattn.RefAttnError, match=r"mask: expected a shape broadcastable to x.shape \(2, 3\)"):
        refattn.softmax(np.ones((2, 3)), mask=np.ones((3, 3), dtype=bool))
    with pytest.raises(refattn.RefAttnError, match="x: expected finite values or -inf"):
        refattn.softmax(np.array([1.0, np.inf]))
    with pytest.raises(refattn.RefAttnError, match=r"dy: expected shape \(2,\)"):
        refattn.logsumexp_backward(np.zeros(3), np.ones((2, 3)))
