"""Every bad argument to sdpa raises RefAttnError naming the argument, the expectation and the value."""

import numpy as np
import pytest

import refattn
from refattn import RefAttnError, RefAttnTypeError

rng = np.random.default_rng(0)
Q = rng.standard_normal((2, 4, 3, 5))
K = rng.standard_normal((2, 2, 6, 5))
V = rng.standard_normal((2, 2, 6, 4))

BAD = [
    # (kwargs replacing q/k/v or adding options, exception, words the message must contain)
    (dict(q=Q[0, 0]), RefAttnError, ["q", "at least 3", "(3, 5)"]),
    (dict(k=rng.standard_normal((2, 2, 6, 4))), RefAttnError, ["k", "D=5"]),
    (dict(v=rng.standard_normal((2, 2, 5, 4))), RefAttnError, ["v", "Lk=6"]),
    (dict(k=rng.standard_normal((2, 3, 6, 5)), v=rng.standard_normal((2, 3, 6, 4))), RefAttnError, ["Hq=4", "Hk=3"]),
    (dict(q=rng.standard_normal((3, 4, 3, 5))), RefAttnError, ["batch", "(3,)", "(2,)"]),
    (dict(mask=np.ones((3, 6))), RefAttnTypeError, ["mask", "bool", "bias="]),
    (dict(mask=np.ones((3, 5), dtype=bool)), RefAttnError, ["mask", "(2, 4, 3, 6)", "(3, 5)"]),
    (dict(bias=np.ones((5, 3, 6))), RefAttnError, ["bias", "(5, 3, 6)"]),
    (dict(bias=np.full((3, 6), np.nan)), RefAttnError, ["bias", "nan"]),
    (dict(bias=np.full((3, 6), np.inf)), RefAttnError, ["bias", "inf"]),
    (dict(q=np.where(Q > 2, np.nan, Q)), RefAttnError, ["q", "finite", "nan"]),
    (dict(k=np.where(K > 2, -np.inf, K)), RefAttnError, ["k", "finite", "-inf"]),
    (dict(v=np.where(V > 2, np.inf, V)), RefAttnError, ["v", "finite", "inf"]),
    (dict(softcap=0.0), RefAttnError, ["softcap", "> 0", "0.0"]),
    (dict(softcap=-1), RefAttnError, ["softcap", "> 0", "-1"]),
    (dict(dropout_p=1.0, dropout_mask=np.ones((3, 6), dtype=bool)), RefAttnError, ["dropout_p", "[0, 1)", "1.0"]),
    (dict(dropout_p=-0.1), RefAttnError, ["dropout_p", "[0, 1)"]),
    (dict(dropout_p=0.1), RefAttnError, ["dropout_mask", "refattn.masks.dropout_mask"]),
    (dict(dropout_mask=np.ones((3, 6))), RefAttnTypeError, ["dropout_mask", "bool", "float64"]),
    (dict(causal=True, window=(-1, 2), align="top_left"), RefAttnError, ["window[0]", ">= 0", "-1"]),
    (dict(window=(1, 2, 3)), RefAttnError, ["window", "pair"]),
    (dict(causal=True), RefAttnError, ["align", "lq=3 != lk=6", "top_left", "bottom_right"]),
    (dict(window=(1, 1)), RefAttnError, ["align", "window", "ambiguous"]),
    (dict(causal=True, align="bottom"), RefAttnError, ["align", "'bottom'"]),
    (dict(empty_rows="zeros"), RefAttnError, ["empty_rows", "'zero'", "'zeros'"]),
    (dict(sinks=np.zeros(3)), RefAttnError, ["sinks", "(2, 4)", "(3,)"]),
    (dict(sinks=np.array([0.0, np.nan, 0, 0])), RefAttnError, ["sinks", "nan"]),
    (dict(scale=float("nan")), RefAttnError, ["scale", "finite"]),
    (dict(scale="0.5"), RefAttnTypeError, ["scale", "real number"]),
    (dict(causal=1), RefAttnTypeError, ["causal", "True or False"]),
    (dict(q=[["a"]]), RefAttnTypeError, ["q", "dtype"]),
    (dict(q=Q.astype(complex)), RefAttnTypeError, ["q", "complex"]),
    (dict(q=np.full(Q.shape, 1e200), k=np.full(K.shape, 1e200)), RefAttnError, ["q, k, scale", "overflow float64"]),
    (dict(q=Q * 1e160, k=K * 1e160, scale=1e-300), RefAttnError, ["q, k, scale", "overflow float64", "scale = 1e-300"]),
    (dict(bias=np.full((3, 6), 1e308)), RefAttnError, ["bias", "<= 2**1022", "1e+308"]),
]


@pytest.mark.parametrize("kwargs, exc, words", BAD, ids=[",".join(b[0]) + f"-{i}" for i, b in enumerate(BAD)])
def test_bad_argument_is_named(kwargs, exc, words):
    args = dict(q=Q, k=K, v=V)
    opts = {key: kwargs[key] for key in kwargs if key not in args}
    args.update({key: kwargs[key] for key in kwargs if key in args})
    with pytest.raises(exc) as info:
        refattn.sdpa(args["q"], args["k"], args["v"], **opts)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert isinstance(info.value, ValueError)


def test_bad_cotangents_are_named():
    with pytest.raises(RefAttnError, match=r"d_out: expected shape \(2, 4, 3, 4\)"):
        refattn.sdpa_backward(np.zeros((2, 4, 3, 5)), Q, K, V)
    with pytest.raises(RefAttnError, match=r"d_lse: expected shape \(2, 4, 3\)"):
        refattn.sdpa_backward(np.zeros((2, 4, 3, 4)), Q, K, V, d_lse=np.zeros((2, 4, 6)))


def test_array_likes_are_accepted_and_converted_once():
    class ArrayLike:
        def __init__(self, a):
            self.a = a

        def __array__(self, dtype=None, copy=None):
            return self.a

    out = refattn.sdpa(Q.tolist(), ArrayLike(K), V.astype(np.float32))
    np.testing.assert_allclose(out, refattn.sdpa(Q, K, V.astype(np.float32).astype(np.float64)), rtol=1e-15)
    assert out.dtype == np.float64
    ints = refattn.sdpa(np.ones((1, 2, 3), dtype=np.int32), np.ones((1, 2, 3)), np.arange(6.0).reshape(1, 2, 3))
    np.testing.assert_array_equal(ints, np.full((1, 2, 3), [1.5, 2.5, 3.5]))


def test_lengths_equal_needs_no_align_and_align_is_ignored_without_structure():
    q = Q[:, :, :3]
    k, v = K[:, :, :3], V[:, :, :3]
    np.testing.assert_array_equal(
        refattn.sdpa(q, k, v, causal=True), refattn.sdpa(q, k, v, causal=True, align="top_left")
    )
    np.testing.assert_array_equal(refattn.sdpa(Q, K, V, align="bottom_right"), refattn.sdpa(Q, K, V))


def test_window_sides_of_any_size_mean_unbounded():
    """Sides are clipped to Lq + Lk at validation (beyond it a side excludes nothing): the same
    results as ``None``, bitwise, and no integer overflow downstream."""
    for huge, same in (((0, 2**63), (0, None)), ((2**200, 2), (None, 2)), ((2**64, 2**64), None)):
        out = refattn.sdpa(Q, K, V, window=huge, align="bottom_right", return_lse=True, backend="numpy")
        ref = refattn.sdpa(Q, K, V, window=same, align="bottom_right", return_lse=True, backend="numpy")
        for a, b in zip(out, ref):
            np.testing.assert_array_equal(a, b)
    assert refattn.masks.clip_window((2**63, None), 3, 6) == (9, None)
    assert refattn.masks.clip_window((4, 9), 3, 6) == (4, 9)


def test_overflow_check_is_exact_when_the_cheap_bound_fails():
    """``D · max|q| · max|k|`` overflows, but no q row meets a large k entry: accepted, finite."""
    q, k = Q.copy(), K.copy()
    q[..., 0], k[..., 1] = 0.0, 0.0
    q[0, 1, 2, 1], k[1, 0, 3, 0] = 1e160, 1e160
    out, lse = refattn.sdpa(q, k, V, return_lse=True, backend="numpy")
    assert np.isfinite(out).all() and np.isfinite(lse).all()
