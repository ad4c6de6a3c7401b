"""Softmax family: values, empty-row policies, agreement with SciPy, and mutation checks."""

import numpy as np
import pytest
import scipy.special

import refattn
from refattn import softmax_family as softmax_mod
from refattn.testing import gradcheck
from refattn.testing.strategies import logsumexp_b_cases, softmax_axes_cases, softmax_cases
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


# ---- issue 13: rows over several axes (axis = a tuple, or None) ---------------------------------


def _flat_reference(x, axis):
    """x with the axes of ``axis`` moved last and flattened: the rows as one axis, the independent
    definition of a joint normalisation."""
    nd = x.ndim
    axes = tuple(range(nd)) if axis is None else tuple(sorted(a % nd for a in np.atleast_1d(axis)))
    moved = np.moveaxis(x, axes, tuple(range(nd - len(axes), nd)))
    return moved.reshape(moved.shape[: nd - len(axes)] + (-1,)), axes, moved.shape


def check_axes_match_scipy_and_the_flattened_rows(case):
    """Over a tuple of axes (or all), the three ops agree with SciPy's ``axis=`` on the rows that are
    not empty, and with the same op over the flattened row (the definition of a joint row)."""
    x = _masked(case)
    ax = case.options["axis"]
    flat, axes, moved_shape = _flat_reference(x, ax)
    empty = np.isneginf(flat).all(axis=-1)  # (...,) the rows, in the remaining dims' order
    with np.errstate(divide="ignore", invalid="ignore"):
        want_p = scipy.special.softmax(x, axis=ax)
        want_lse = scipy.special.logsumexp(x, axis=ax)
    p = refattn.softmax(*case.inputs, **case.options)
    keep = ~np.moveaxis(np.broadcast_to(empty[..., None], flat.shape).reshape(moved_shape), range(-len(axes), 0), axes)
    np.testing.assert_allclose(np.where(keep, p, 0), np.where(keep, want_p, 0), rtol=1e-13, atol=1e-15)
    lse = refattn.logsumexp(*case.inputs, **case.options)
    assert np.shape(lse) == np.shape(want_lse)
    np.testing.assert_allclose(np.where(empty, 0, lse), np.where(empty, 0, want_lse), rtol=1e-13, atol=1e-14)
    options = {k: v for k, v in case.options.items() if k not in ("axis", "mask")}
    p_flat = refattn.softmax(flat, axis=-1, **options)
    back = np.moveaxis(p_flat.reshape(moved_shape), range(-len(axes), 0), axes)
    np.testing.assert_array_equal(p, back)
    logp_flat = refattn.log_softmax(flat, axis=-1, **options)
    logp = refattn.log_softmax(*case.inputs, **case.options)
    np.testing.assert_array_equal(logp, np.moveaxis(logp_flat.reshape(moved_shape), range(-len(axes), 0), axes))


def _last_axis_only(mp):
    """Mutant: a tuple of axes normalised over its last axis only (each axis its own softmax)."""
    real = softmax_mod._as_axes
    mp.setattr(softmax_mod, "_as_axes", lambda axis, ndim: real(axis, ndim)[-1:])


def test_tuple_axes_are_joint_and_their_order_does_not_matter():
    x = np.random.default_rng(11).standard_normal((2, 3, 4))
    p = refattn.softmax(x, axis=(0, 2))
    np.testing.assert_allclose(p.sum(axis=(0, 2)), 1.0, rtol=1e-14)
    np.testing.assert_array_equal(p, refattn.softmax(x, axis=(2, -3)))
    np.testing.assert_allclose(p, scipy.special.softmax(x, axis=(0, 2)), rtol=1e-14)
    assert refattn.logsumexp(x, axis=None).shape == ()
    assert refattn.logsumexp(x, axis=None) == pytest.approx(scipy.special.logsumexp(x), rel=1e-15)
    np.testing.assert_array_equal(refattn.softmax(x, axis=(1,)), refattn.softmax(x, axis=1))
    np.testing.assert_allclose(refattn.softmax(x, axis=None).sum(), 1.0, rtol=1e-14)


def test_uniform_policy_on_a_joint_empty_row_is_one_over_the_row_size():
    x = np.zeros((2, 3, 2))
    mask = np.zeros((2, 3, 2), dtype=bool)
    mask[1] = True  # rows over axes (1, 2): batch 0 empty (6 entries), batch 1 kept
    p = refattn.softmax(x, axis=(1, 2), mask=mask, empty_rows="uniform")
    np.testing.assert_array_equal(p[0], 1.0 / 6.0)
    np.testing.assert_allclose(p[1], 1.0 / 6.0, rtol=1e-15)
    assert np.isneginf(refattn.logsumexp(x, axis=(1, 2), mask=mask, empty_rows="uniform")[0])


def test_backward_over_tuple_axes_matches_finite_differences():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 3, 2))
    mask = rng.random((3, 2)) > 0.3
    for name in ("softmax", "log_softmax", "logsumexp"):
        for axis in ((0, 2), None, (-1, 0, 1)):
            options = {"axis": axis, "mask": mask}
            report = gradcheck(getattr(refattn, name), getattr(refattn, name + "_backward"), (x,), options=options)
            assert report.passed, (name, axis)


def test_bad_tuple_axes_are_named():
    x = np.ones((2, 3))
    with pytest.raises(refattn.RefAttnError, match=r"axis: expected distinct axes of the 2-D x, got \(1, -1\)"):
        refattn.softmax(x, axis=(1, -1))
    with pytest.raises(refattn.RefAttnError, match=r"axis: expected an int, a non-empty tuple .* got \(\)"):
        refattn.logsumexp(x, axis=())
    with pytest.raises(refattn.RefAttnTypeError, match=r"axis: .* got the list \[0, 1\] \(pass a tuple\)"):
        refattn.log_softmax(x, axis=[0, 1])
    with pytest.raises(refattn.RefAttnError, match=r"axis: expected an axis in \[-2, 2\), got 2"):
        refattn.softmax_backward(x, x, axis=(0, 2))


# ---- issue 13: logsumexp's scale factors b and return_sign (scipy.special.logsumexp) --------------


def check_logsumexp_b_matches_scipy(case):
    """``log|Σ b e^x|`` and its sign as SciPy gives them (the masked entries dropped): equal to 1e-13
    where finite, the same -inf / NaN pattern elsewhere, the same sign."""
    x = _masked(case)
    o = case.options
    b = np.broadcast_to(o["b"], x.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = scipy.special.logsumexp(x, axis=o["axis"], b=b, return_sign=o["return_sign"])
    got = refattn.logsumexp(*case.inputs, **o)
    want, got = (want, got) if o["return_sign"] else ((want,), (got,))
    # a row where nothing takes part sums to exactly 0: refattn's convention, -inf and sign 0 (SciPy
    # releases differ there: 1.15 gives sign 1 for b > 0 and NaN for b < 0)
    nothing = ~np.any(np.isfinite(x) & (b != 0), axis=o["axis"])
    want = [np.where(nothing, v, w) for w, v in zip(want, (-np.inf, 0.0), strict=False)]
    for w, g in zip(want, got, strict=True):
        w, g = np.asarray(w), np.asarray(g)
        assert g.shape == w.shape and g.dtype == np.float64
        finite = np.isfinite(w)
        np.testing.assert_array_equal(np.isfinite(g), finite)
        np.testing.assert_array_equal(g[~finite], w[~finite])
        np.testing.assert_allclose(g[finite], w[finite], rtol=1e-13, atol=1e-14)


def _unsigned_b(mp):
    """Mutant: the factors' signs dropped (``log Σ |b| e^x``)."""
    real = softmax_mod._scaled_sum
    mp.setattr(softmax_mod, "_scaled_sum", lambda s, w: real(s, np.abs(w)))


def check_logsumexp_b_gradients(case):
    """dx and db against central finite differences (random cotangents, negative factors included)."""
    report = gradcheck(refattn.logsumexp, refattn.logsumexp_backward, case.inputs, options=case.options)
    assert report.passed, report


def _gradient_over_abs_sum(mp):
    """Mutant: the gradients divided by ``|S|`` instead of the signed ``S``."""
    real = softmax_mod._scaled_sum
    mp.setattr(softmax_mod, "_scaled_sum", lambda s, w: real(s, w)._replace(total=np.abs(real(s, w).total)))


def test_logsumexp_b_values_signs_and_nan_as_scipy():
    x = np.array([[0.0, 1.0], [0.0, 0.0], [2.0, 3.0]])
    b = np.array([[1.0, -2.0], [1.0, -1.0], [0.5, 0.0]])
    y, sign = refattn.logsumexp(x, b=b, return_sign=True)
    np.testing.assert_allclose(y[0], np.log(2 * np.e - 1), rtol=1e-15)
    np.testing.assert_array_equal(sign, [-1.0, 0.0, 1.0])  # S < 0, S = 0, S > 0
    assert np.isneginf(y[1])  # a zero sum: -inf with sign 0, as SciPy
    assert y[2] == pytest.approx(2.0 + np.log(0.5), rel=1e-15)
    plain = refattn.logsumexp(x, b=b)
    assert np.isnan(plain[0]) and np.isneginf(plain[1]) and plain[2] == y[2]  # NaN without return_sign
    want = scipy.special.logsumexp(x, b=b, axis=-1, return_sign=True)
    np.testing.assert_allclose(y[[0, 2]], want[0][[0, 2]], rtol=1e-15)
    np.testing.assert_array_equal(sign, want[1])


def test_a_zero_factor_does_not_set_the_scale():
    """``[1000, 0]`` with ``b = [0, 1]`` is log(e^0) = 0: the shift is the largest term with b != 0."""
    assert refattn.logsumexp(np.array([1000.0, 0.0]), b=np.array([0.0, 1.0])) == 0.0
    assert scipy.special.logsumexp([1000.0, 0.0], b=[0.0, 1.0]) == 0.0


def test_b_of_ones_is_no_b_bit_for_bit_and_keeps_a_tiny_tail():
    x = np.random.default_rng(13).standard_normal((3, 5))
    np.testing.assert_array_equal(refattn.logsumexp(x, b=np.ones(5)), refattn.logsumexp(x))
    assert refattn.logsumexp(np.array([0.0, -50.0]), b=np.array([1.0, 1.0])) == pytest.approx(np.exp(-50), rel=1e-15)
    # log(2 - e^{-50}) = log 2 + log1p(-e^{-50}/2): the tail's digits survive a negative factor
    y = refattn.logsumexp(np.array([0.0, -50.0]), b=np.array([2.0, -1.0]))
    assert y - np.log(2.0) == pytest.approx(-np.exp(-50) / 2, rel=1e-6)


def _lse_b_grads(x, b, d_y):
    """The derivation of specs/softmax.md for one row: S = Σ b e^x, dx = d_y b e^x / S, db = d_y e^x / S."""
    e = np.exp(x)
    s = np.sum(b * e)
    return d_y * b * e / s, d_y * e / s


def test_logsumexp_b_backward_is_the_derivation_with_a_negative_sum():
    rng = np.random.default_rng(14)
    x, b = rng.standard_normal(4), np.array([0.7, -8.0, 0.3, 0.0])
    d_y = np.array(rng.standard_normal())
    assert np.sum(b * np.exp(x)) < 0
    g = refattn.logsumexp_backward(d_y, x, b=b, return_sign=True)
    want_dx, want_db = _lse_b_grads(x, b, d_y)
    np.testing.assert_allclose(g.dx, want_dx, rtol=1e-14, atol=0.0)
    np.testing.assert_allclose(g.db, want_db, rtol=1e-14, atol=0.0)
    assert g.dx[3] == 0.0 and g.db[3] != 0.0  # a zero factor: no dx, but db = d_y e^x / S
    nan = refattn.logsumexp_backward(d_y, x, b=b)  # y = NaN without return_sign: so is its gradient
    assert np.isnan(nan.dx).all() and np.isnan(nan.db).all()


def test_logsumexp_b_gradcheck_with_broadcast_b_tuple_axes_and_masks():
    rng = np.random.default_rng(15)
    x = rng.standard_normal((2, 3, 4))
    mask = rng.random((3, 4)) > 0.25
    mask[:, 0] = True
    cases = ((np.array([1.5, -0.5, 0.8, -1.2]), -1), (np.array([[2.0], [-0.4], [1.1]]), (1, 2)), (np.array(-0.7), None))
    for b, axis in cases:
        report = gradcheck(
            refattn.logsumexp,
            refattn.logsumexp_backward,
            (x,),
            options={"axis": axis, "mask": mask, "b": b, "return_sign": True},
        )
        assert report.passed, (b, axis)
        assert refattn.logsumexp_backward(
            np.zeros(np.shape(refattn.logsumexp(x, axis=axis))), x, axis=axis, b=b
        ).db.shape == np.shape(b)


def test_logsumexp_b_singular_and_empty_rows():
    """S = 0 with entries taking part: y = -inf and NaN gradients (log|S| is singular); a row with no
    entry taking part: -inf and zero gradients, as without b."""
    x = np.array([[0.0, 0.0], [1.0, 2.0]])
    b = np.array([[1.0, -1.0], [3.0, 1.0]])
    mask = np.array([[True, True], [False, False]])
    y, sign = refattn.logsumexp(x, b=b, mask=mask, return_sign=True)
    assert np.isneginf(y).all() and (sign == 0).all()
    g = refattn.logsumexp_backward(np.array([0.3, -0.8]), x, b=b, mask=mask, return_sign=True)
    assert np.isnan(g.dx[0]).all() and np.isnan(g.db[0]).all()
    np.testing.assert_array_equal(g.dx[1], 0.0)
    np.testing.assert_array_equal(g.db[1], 0.0)
    without_b = refattn.logsumexp(x, mask=mask, return_sign=True)
    np.testing.assert_array_equal(without_b[1], [1.0, 0.0])  # sign 1, and 0 on the empty row
    assert refattn.logsumexp_backward(np.array([0.3, -0.8]), x, mask=mask).db is None


def test_logsumexp_b_and_d_sign_arguments_are_named():
    x = np.ones((2, 3))
    with pytest.raises(refattn.RefAttnError, match=r"b: expected a shape broadcastable to x.shape \(2, 3\)"):
        refattn.logsumexp(x, b=np.ones((4, 3)))
    with pytest.raises(refattn.RefAttnError, match="b: expected finite values"):
        refattn.logsumexp(x, b=np.array(np.inf))
    with pytest.raises(refattn.RefAttnError, match="d_sign: a cotangent of sign"):
        refattn.logsumexp_backward(np.zeros(2), x, b=np.ones(3), d_sign=np.zeros(2))
    with pytest.raises(refattn.RefAttnError, match=r"d_sign: expected shape \(2,\)"):
        refattn.logsumexp_backward(np.zeros(2), x, b=np.ones(3), return_sign=True, d_sign=np.zeros(3))
    g = refattn.logsumexp_backward(np.array([0.4, -1.1]), x, return_sign=True, d_sign=np.array([5.0, 7.0]))
    np.testing.assert_allclose(g.dx, np.outer([0.4, -1.1], np.full(3, 1 / 3)), rtol=1e-15)  # the sign adds nothing


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
    (check_axes_match_scipy_and_the_flattened_rows, softmax_axes_cases(), "last_axis_only"),
    (check_logsumexp_b_matches_scipy, logsumexp_b_cases(), "unsigned_b"),
    (check_logsumexp_b_gradients, logsumexp_b_cases(for_gradcheck=True), "gradient_over_abs_sum"),
]
MUTANTS = {
    "unnormalised_by_n_over_2": _normalize_mutant(lambda nz, s: nz._replace(p=nz.p * s.shape[-1] / 2.0)),
    "nan_leaking_into_zero_policy": _normalize_mutant(
        lambda nz, s: nz._replace(p=np.where(nz.empty[..., None], np.nan, nz.p))
    ),
    "nan_policy_leaking_into_logsumexp": _nan_policy_leaking_into_logsumexp,
    "nan_gradient_of_logsumexp": _nan_gradient_of_logsumexp,
    "log_softmax_backward_dropping_the_cotangent": _log_softmax_backward_dropping_the_cotangent,
    "last_axis_only": _last_axis_only,
    "unsigned_b": _unsigned_b,
    "gradient_over_abs_sum": _gradient_over_abs_sum,
}
test_property, test_property_catches_its_mutant = property_table(PROPERTIES, MUTANTS)
