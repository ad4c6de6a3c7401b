"""The public gradient checker: passes right backwards, reports and raises on wrong ones."""

import numpy as np
import pytest

import refattn
from refattn.testing import GradcheckError, gradcheck


def square(x, *, c=1.0):
    return c * x**2


def square_backward(dy, x, *, c=1.0):
    from typing import NamedTuple

    class Grads(NamedTuple):
        dx: np.ndarray

    return Grads(2 * c * x * dy)


def wrong_backward(dy, x, *, c=1.0):
    return square_backward(dy, x, c=c)._replace(dx=2 * x * dy)


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
