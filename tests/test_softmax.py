"""Softmax family: values, empty-row policies, agreement with SciPy, and mutation checks."""

import numpy as np
import pytest
import scipy.special

import refattn
from refattn import softmax_family as softmax_mod
from refattn.testing.strategies import softmax_cases
from tests.mutation import property_table, violates


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


def check_logsumexp_is_neg_inf_on_empty_rows_under_every_policy(case):
    """One empty-row lse convention (sdpa's): ``y = -inf`` on an empty row whatever ``empty_rows`` says,
    its gradient 0 there; the policy changes nothing of logsumexp, which equals the ``"zero"`` one."""
    x = _masked(case)
    ax = case.options["axis"]
    empty = np.isneginf(x).all(axis=ax)
    y = softmax_mod.logsumexp(*case.inputs, **case.options)
    assert np.isneginf(y[empty]).all(), y
    d_y = np.random.default_rng(3).standard_normal(y.shape)  # random, never all ones
    dx = softmax_mod.logsumexp_backward(d_y, *case.inputs, **case.options).dx
    assert (dx[np.broadcast_to(np.expand_dims(empty, ax), dx.shape)] == 0).all(), dx
    zero = {**case.options, "empty_rows": "zero"}
    np.testing.assert_array_equal(y, softmax_mod.logsumexp(*case.inputs, **zero))
    np.testing.assert_array_equal(dx, softmax_mod.logsumexp_backward(d_y, *case.inputs, **zero).dx)


@pytest.mark.parametrize("policy", ["zero", "nan", "uniform"])
def test_logsumexp_of_an_empty_row_is_sdpas_lse(policy):
    """sdpa's lse and logsumexp of the same scores agree on a kept row and are both -inf on an empty one."""
    rng = np.random.default_rng(4)
    q, k, v = rng.standard_normal((1, 2, 3)), rng.standard_normal((1, 4, 3)), rng.standard_normal((1, 4, 2))
    mask = np.array([[True, False, True, True], [False] * 4])  # query 1: every key masked
    _, lse = refattn.sdpa(q, k, v, mask=mask, empty_rows=policy, return_lse=True)
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(3.0)
    y = refattn.logsumexp(scores, mask=mask, empty_rows=policy)
    assert np.isneginf(lse[0, 1]) and np.isneginf(y[0, 1])
    assert y[0, 0] == pytest.approx(lse[0, 0], rel=1e-15, abs=0.0)
    d_y = rng.standard_normal(y.shape)
    dx = refattn.logsumexp_backward(d_y, scores, mask=mask, empty_rows=policy).dx
    np.testing.assert_array_equal(dx[0, 1], 0.0)


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
    with pytest.raises(refattn.RefAttnError, match=r"d_y: expected shape \(2,\)"):
        refattn.logsumexp_backward(np.zeros(3), np.ones((2, 3)))


# ---- unmasked -inf inputs: the gradient is the limit x_j -> -inf (PyTorch, JAX) ------------------

X_ISSUE = np.array([0.3, -np.inf, 1.2, -0.4])
DY_ISSUE = np.array([0.5, 2.0, -1.0, 0.25])


def _issue_limit():
    """log_softmax's gradient at the issue's input from the limit formula: with p the softmax over the
    finite entries (p_1 = 0), dx = dy − p Σ_j dy_j — every cotangent, dy_1 included, in the sum."""
    finite = np.isfinite(X_ISSUE)
    e = np.where(finite, np.exp(np.where(finite, X_ISSUE, 0.0) - 1.2), 0.0)
    p = e / e.sum()
    return DY_ISSUE - p * DY_ISSUE.sum()


def test_log_softmax_backward_at_an_unmasked_neg_inf_is_the_limit():
    want = _issue_limit()
    dx = refattn.log_softmax_backward(DY_ISSUE, X_ISSUE).dx
    np.testing.assert_allclose(dx, want, rtol=1e-15, atol=1e-16)
    assert dx[1] == 2.0  # the entry keeps its own cotangent: dx_1 = dy_1
    # issue 11 quotes PyTorch's and JAX's gradient to three decimals
    np.testing.assert_allclose(dx, [0.058, 2.0, -2.088, 0.030], rtol=0.0, atol=5e-4)
    for far, tol in ((-30.0, 1e-12), (-50.0, 1e-15)):  # the gradient at a finite x_1 tends to it
        x = X_ISSUE.copy()
        x[1] = far
        np.testing.assert_allclose(refattn.log_softmax_backward(DY_ISSUE, x).dx, dx, rtol=0.0, atol=tol)


def test_a_masked_entry_keeps_a_zero_gradient_and_drops_its_cotangent():
    """mask=False is not a limit: the entry takes no part, its cotangent is ignored."""
    mask = np.array([True, False, True, True])
    dx = refattn.log_softmax_backward(DY_ISSUE, X_ISSUE, mask=mask).dx
    finite = np.isfinite(X_ISSUE)
    e = np.where(finite, np.exp(np.where(finite, X_ISSUE, 0.0) - 1.2), 0.0)
    p = e / e.sum()
    want = np.where(mask, DY_ISSUE - p * (DY_ISSUE * mask).sum(), 0.0)
    np.testing.assert_allclose(dx, want, rtol=1e-15, atol=1e-16)
    assert dx[1] == 0.0


def test_softmax_and_logsumexp_backward_limits_are_zero_at_neg_inf():
    """p_1 → 0: softmax's dx_1 = p_1 (dy_1 − Σ p dy) → 0 and logsumexp's dx_1 = dy p_1 → 0; the other
    entries are those of the row without x_1."""
    d_lse = np.array(0.7)
    p = refattn.softmax(X_ISSUE)
    sm = refattn.softmax_backward(DY_ISSUE, X_ISSUE).dx
    np.testing.assert_allclose(sm, p * (DY_ISSUE - p @ DY_ISSUE), rtol=1e-14, atol=1e-16)
    assert sm[1] == 0.0
    lse = refattn.logsumexp_backward(d_lse, X_ISSUE).dx
    np.testing.assert_allclose(lse, 0.7 * p, rtol=1e-15, atol=0.0)
    assert lse[1] == 0.0
    x = X_ISSUE.copy()
    x[1] = -50.0
    np.testing.assert_allclose(refattn.softmax_backward(DY_ISSUE, x).dx, sm, rtol=0.0, atol=1e-15)
    np.testing.assert_allclose(refattn.logsumexp_backward(d_lse, x).dx, lse, rtol=0.0, atol=1e-15)


def check_neg_inf_backward_is_the_limit(case):
    """Every backward at an unmasked -inf input equals the backward with that input at -1e4, a logit
    whose weight is exactly 0 in float64: the limit x_j → -inf.  Rows with no allowed entry keep the
    empty-row policy (their limit depends on how every entry goes to -inf)."""
    (x,) = case.inputs
    ax = case.options["axis"]
    empty = np.isneginf(_masked(case)).all(axis=ax, keepdims=True)
    far = np.where(np.isneginf(x) & ~empty, -1e4, x)
    rng = np.random.default_rng(int(np.isneginf(x).sum()))
    for name in ("softmax", "log_softmax", "logsumexp"):
        out = getattr(softmax_mod, name)(x, **case.options)
        backward = getattr(softmax_mod, name + "_backward")
        dy = rng.standard_normal(np.shape(out))  # random, never all ones
        got = backward(dy, x, **case.options).dx
        np.testing.assert_allclose(got, backward(dy, far, **case.options).dx, rtol=1e-14, atol=1e-15, err_msg=name)


def _with_an_unmasked_neg_inf(case):
    (x,) = case.inputs
    x = x.copy()
    x.flat[0] = -np.inf
    return type(case)((x,), case.options)


# ---- the property table and its mutants ---------------------------------------------------------


def _normalize_mutant(change):
    def patch(mp):
        real = softmax_mod.normalize_last_axis
        mp.setattr(
            softmax_mod, "normalize_last_axis", lambda s, empty_rows, sink=None: change(real(s, empty_rows, sink), s)
        )

    return patch


def _nan_policy_leaking_into_logsumexp(mp):
    """logsumexp as before issue 12: NaN on an empty row under ``empty_rows="nan"``."""
    real = softmax_mod.logsumexp

    def nan_on_empty(x, *, axis=-1, mask=None, empty_rows="zero"):
        y = real(x, axis=axis, mask=mask, empty_rows=empty_rows)
        return np.where(np.isneginf(y) & (empty_rows == "nan"), np.nan, y)

    mp.setattr(softmax_mod, "logsumexp", nan_on_empty)


def _nan_gradient_of_logsumexp(mp):
    """logsumexp_backward as before issue 12: a NaN gradient on an empty row under "nan"."""
    real, real_backward = softmax_mod.logsumexp, softmax_mod.logsumexp_backward

    def nan_gradient(d_y, x, *, axis=-1, mask=None, empty_rows="zero"):
        dx = real_backward(d_y, x, axis=axis, mask=mask, empty_rows=empty_rows).dx
        y = np.expand_dims(real(x, axis=axis, mask=mask), axis)
        return softmax_mod.LogSumExpGrads(np.where(np.isneginf(y) & (empty_rows == "nan"), np.nan, dx))

    mp.setattr(softmax_mod, "logsumexp_backward", nan_gradient)


def _log_softmax_backward_dropping_the_cotangent(mp):
    """log_softmax_backward as before issue 11: the cotangent of an unmasked -inf dropped."""
    real = softmax_mod.log_softmax_backward
    mp.setattr(
        softmax_mod, "log_softmax_backward", lambda d_y, x, **o: real(np.where(np.isneginf(x), 0.0, d_y), x, **o)
    )


PROPERTIES = [
    (check_matches_scipy, softmax_cases(), "unnormalised_by_n_over_2"),
    (check_empty_rows_follow_policy, softmax_cases(), "nan_leaking_into_zero_policy"),
    (
        check_logsumexp_is_neg_inf_on_empty_rows_under_every_policy,
        softmax_cases(),
        ("nan_policy_leaking_into_logsumexp", "nan_gradient_of_logsumexp"),
    ),
    (
        check_neg_inf_backward_is_the_limit,
        softmax_cases().map(_with_an_unmasked_neg_inf),
        "log_softmax_backward_dropping_the_cotangent",
    ),
]
MUTANTS = {
    "unnormalised_by_n_over_2": _normalize_mutant(lambda nz, s: nz._replace(p=nz.p * s.shape[-1] / 2.0)),
    "nan_leaking_into_zero_policy": _normalize_mutant(
        lambda nz, s: nz._replace(p=np.where(nz.empty[..., None], np.nan, nz.p))
    ),
    "nan_policy_leaking_into_logsumexp": _nan_policy_leaking_into_logsumexp,
    "nan_gradient_of_logsumexp": _nan_gradient_of_logsumexp,
    "log_softmax_backward_dropping_the_cotangent": _log_softmax_backward_dropping_the_cotangent,
}
test_property, test_property_catches_its_mutant = property_table(PROPERTIES, MUTANTS)
