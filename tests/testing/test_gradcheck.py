"""The public gradient checkers: pass right backwards, report and raise on wrong ones."""

import functools
from typing import NamedTuple

import numpy as np
import pytest

import refattn
from refattn.testing import GradcheckError, VjpError, check_vjp, gradcheck


def square(x, *, c=1.0):
    return c * x**2


class SquareGrads(NamedTuple):
    dx: np.ndarray


def square_backward(dy, x, *, c=1.0):
    return SquareGrads(2 * c * x * dy)


def wrong_backward(dy, x, *, c=1.0):
    return square_backward(dy, x, c=c)._replace(dx=2 * x * dy)


class Pair(NamedTuple):
    dx: np.ndarray
    dy: np.ndarray


def matmul(x, y):
    return x @ y


def matmul_backward(d, x, y):
    return Pair(d @ y.T, x.T @ d)


def _scaled(backward, field, factor=1 + 3e-7):
    @functools.wraps(backward)
    def scaled(*args, **kwargs):
        grads = backward(*args, **kwargs)
        return grads._replace(**{field: getattr(grads, field) * factor})

    return scaled


def _failed(report):
    return {c.name for c in report.checks if not c.passed}


def test_passes_a_right_backward_and_reports_each_input():
    x = np.random.default_rng(0).standard_normal((3, 2))
    report = gradcheck(square, square_backward, (x,), options={"c": 3.0})
    assert report.passed and report.max_rel_error < 1e-9
    assert [c.name for c in report.checks] == ["x"]
    assert "passed" in str(report)


def test_raises_a_readable_report_on_a_wrong_backward():
    x = np.random.default_rng(0).standard_normal((3, 2))
    with pytest.raises(GradcheckError) as info:
        gradcheck(square, wrong_backward, (x,), c=3.0)
    text = str(info.value)
    assert "FAILED" in text and "<-- FAIL" in text and "x" in text
    assert info.value.report.checks[0].rel_error > 0.5


def test_checks_keyword_array_options_and_extra_cotangents():
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((2, 3, 2)), rng.standard_normal((2, 4, 2)), rng.standard_normal((2, 4, 3))
    bias = rng.standard_normal((3, 4))
    report = gradcheck(
        refattn.sdpa,
        refattn.sdpa_backward,
        (q, k, v),
        options=dict(bias=bias, sinks=np.array([0.1, -0.3]), return_lse=True),
    )
    assert [c.name for c in report.checks] == ["q", "k", "v", "bias", "sinks"]
    assert report.max_rel_error < 1e-8


def test_does_not_mutate_its_inputs():
    x = np.random.default_rng(0).standard_normal(4)
    x0 = x.copy()
    gradcheck(square, square_backward, (x,))
    np.testing.assert_array_equal(x, x0)


def test_an_nan_gradient_fails():
    def nan_backward(dy, x, *, c=1.0):
        return square_backward(dy, x, c=c)._replace(dx=np.full_like(x, np.nan))

    report = gradcheck(square, nan_backward, (np.ones(3),), raise_on_failure=False)
    assert not report.passed


def test_a_gradient_off_by_3e_7_fails_the_default_and_passed_the_old_rtol():
    x = np.random.default_rng(0).standard_normal((3, 2))
    off = _scaled(square_backward, "dx")
    assert gradcheck(square, off, (x,), rtol=1e-6).passed
    with pytest.raises(GradcheckError):
        gradcheck(square, off, (x,))


def test_a_zero_gradient_is_judged_by_the_absolute_error_it_can_resolve():
    def fn(x, y):
        return x**2 + y**2 - y**2  # dy = 0; the difference quotient sees only rounding noise

    def fn_backward(d, x, y):
        return Pair(2 * x * d, np.zeros_like(y))

    rng = np.random.default_rng(2)
    report = gradcheck(fn, fn_backward, (rng.standard_normal(4), 3 * rng.standard_normal(4)))
    dy = report.checks[1]
    assert dy.scale < 1e-9 and dy.rel_error <= report.rtol  # not 1.0: the floor atol / rtol applies
    assert dy.allowed == report.atol > 0


# ---- check_vjp -----------------------------------------------------------------------------------


def _attention_inputs(rng, lq=5, lk=7):
    q, k, v = rng.standard_normal((2, 4, lq, 8)), rng.standard_normal((2, 2, lk, 8)), rng.standard_normal((2, 2, lk, 4))
    bias = np.where(rng.random((lq, lk)) < 0.2, -np.inf, rng.standard_normal((lq, lk)))
    return (q, k, v), dict(bias=bias, sinks=rng.standard_normal(4), causal=True, align="bottom_right", return_lse=True)


def test_check_vjp_passes_right_backwards_and_names_every_input():
    rng = np.random.default_rng(3)
    inputs, options = _attention_inputs(rng)
    report = check_vjp(refattn.sdpa, refattn.sdpa_backward, inputs, options=options)
    assert [c.name for c in report.checks] == ["all", "q", "k", "v", "bias", "sinks"]
    assert report.passed and report.max_rel_error < 1e-10 and "passed" in str(report)
    x, y = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    assert check_vjp(matmul, matmul_backward, (x, y)).passed
    assert [c.name for c in check_vjp(square, square_backward, (x,), c=2.0).checks] == ["x"]


def test_check_vjp_reads_namedtuple_inputs_field_by_field():
    rng = np.random.default_rng(4)
    d, h = 8, 2
    params = refattn.MHAParams(*(0.3 * rng.standard_normal((d, d)) for _ in range(4)))
    x = rng.standard_normal((2, 5, d))
    report = check_vjp(refattn.multihead_attention, refattn.multihead_attention_backward, (x, params), num_heads=h)
    assert {"x", "params.w_q", "params.w_o"} <= {c.name for c in report.checks}


@pytest.mark.parametrize("field", ["dq", "dk", "dv", "dbias", "dsinks"])
def test_check_vjp_catches_a_gradient_off_by_3e_7_and_names_it(field):
    inputs, options = _attention_inputs(np.random.default_rng(5))
    off = _scaled(refattn.sdpa_backward, field)
    report = check_vjp(refattn.sdpa, off, inputs, options=options, raise_on_failure=False)
    assert _failed(report) - {"all"} == {field[1:]}
    with pytest.raises(VjpError) as info:
        check_vjp(refattn.sdpa, off, inputs, options=options)
    assert isinstance(info.value, GradcheckError) and "<-- FAIL" in str(info.value)


def test_check_vjp_catches_a_wrong_sign_and_a_transposed_gradient():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((4, 4)), rng.standard_normal((4, 3))

    def wrong_sign(d, x, y):
        return matmul_backward(d, x, y)._replace(dy=-(x.T @ d))

    def transposed(d, x, y):
        return matmul_backward(d, x, y)._replace(dx=(d @ y.T).T)

    assert _failed(check_vjp(matmul, wrong_sign, (x, y), raise_on_failure=False)) == {"all", "y"}
    assert _failed(check_vjp(matmul, transposed, (x, y), raise_on_failure=False)) == {"all", "x"}


def test_check_vjp_costs_eight_calls_per_direction():
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return refattn.sdpa(*args, **kwargs)

    inputs, options = _attention_inputs(np.random.default_rng(7), lq=130, lk=257)
    check_vjp(counted, refattn.sdpa_backward, inputs, options=options)
    assert len(calls) == 1 + 8 * 6  # the first call, then eight per direction: all, q, k, v, bias, sinks
    calls.clear()
    check_vjp(counted, refattn.sdpa_backward, inputs, options=options, per_input=False)
    assert len(calls) == 1 + 8


def test_check_vjp_fails_on_nan_and_does_not_mutate():
    x = np.random.default_rng(8).standard_normal(5)
    x0 = x.copy()
    nan = _scaled(square_backward, "dx", np.nan)
    assert not check_vjp(square, nan, (x,), raise_on_failure=False).passed
    np.testing.assert_array_equal(x, x0)
