"""Every bad argument to sdpa raises RefAttnError naming the argument, the expectation and the value."""

import tracemalloc
from fractions import Fraction

import numpy as np
import pytest

import refattn
from refattn import RefAttnError, RefAttnTypeError, kernels
from refattn.attention import sdpa as sdpa_core

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
    (dict(causal=True, window=(-1, 2), align="sideways"), RefAttnError, ["align", "top_left", "sideways"]),
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


# ---- non-finite entries: the argument, the first offending index and its value (issue 11) ----


@pytest.mark.parametrize(
    "name, value, allowed",
    [("q", np.nan, "finite values"), ("k", -np.inf, "finite values"), ("v", np.inf, "finite values")]
    + [("bias", np.nan, "finite values or -inf"), ("bias", np.inf, "finite values or -inf")]
    + [("sinks", np.nan, "finite values or -inf")],
)
def test_non_finite_entries_are_named_with_their_first_index(name, value, allowed):
    args = dict(q=Q.copy(), k=K.copy(), v=V.copy(), bias=np.zeros((2, 4, 3, 6)), sinks=np.zeros((2, 4)))
    where = {"q": (0, 1, 2, 3), "k": (1, 0, 5, 2), "v": (0, 1, 3, 0), "bias": (1, 2, 0, 4), "sinks": (0, 2)}[name]
    args[name][where] = value
    later = tuple(n - 1 for n in args[name].shape)  # a second bad entry, after the first in C order
    args[name][later] = np.nan
    with pytest.raises(RefAttnError) as info:
        refattn.sdpa(args.pop("q"), args.pop("k"), args.pop("v"), **args)
    assert str(info.value) == f"{name}: expected {allowed}, got {value} at index {where}"


def test_non_finite_cotangents_are_named_with_their_first_index():
    d_out = np.zeros((2, 4, 3, 4))
    d_out[1, 2, 0, 3] = np.nan
    with pytest.raises(RefAttnError, match=r"^d_out: expected finite values, got nan at index \(1, 2, 0, 3\)$"):
        refattn.sdpa_backward(d_out, Q, K, V)
    d_lse = np.zeros((2, 4, 3))
    d_lse[0, 3, 1] = -np.inf
    with pytest.raises(RefAttnError, match=r"^d_lse: expected finite values, got -inf at index \(0, 3, 1\)$"):
        refattn.sdpa_backward(np.zeros((2, 4, 3, 4)), Q, K, V, d_lse=d_lse)


# ---- scalar options: any real scalar or 0-d real array, nothing else (issue 11) -------------

ACCEPTED_SCALARS = [
    ("scale", 0.5, [np.float64(0.5), np.float32(0.5), np.array(0.5), np.array(0.5, dtype=np.float32), Fraction(1, 2)]),
    ("scale", 2, [np.int64(2), np.array(2), np.uint8(2), 2.0]),
    ("softcap", 3.0, [np.float64(3.0), np.array(3.0), np.array(3), 3]),
    ("dropout_p", 0.25, [np.float64(0.25), np.array(0.25), Fraction(1, 4)]),
    ("causal", True, [np.True_, np.array(True)]),
    ("window", (2, None), [(np.int64(2), None), (np.array(2), None), [np.uint16(2), None]]),
]


@pytest.mark.parametrize("name, plain, alternatives", ACCEPTED_SCALARS, ids=lambda x: x if isinstance(x, str) else "")
def test_scalar_options_take_numpy_scalars_and_0d_arrays(name, plain, alternatives):
    opts = dict(align="top_left", dropout_mask=rng.random((2, 4, 3, 6)) > 0.3)
    ref = refattn.sdpa(Q, K, V, **opts, **{name: plain}, return_lse=True)
    for value in alternatives:
        got = refattn.sdpa(Q, K, V, **opts, **{name: value}, return_lse=np.array(True))
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b)


BAD_SCALARS = [
    # (option, value, exception, words the message must contain)
    ("scale", True, RefAttnTypeError, ["scale", "real number", "bool"]),
    ("scale", np.True_, RefAttnTypeError, ["scale", "real number", "bool"]),
    ("scale", np.array(True), RefAttnTypeError, ["scale", "real number", "bool"]),
    ("scale", 0.5 + 0j, RefAttnTypeError, ["scale", "real number", "complex"]),
    ("scale", np.array(0.5 + 0j), RefAttnTypeError, ["scale", "real number", "complex"]),
    ("scale", np.array([0.5]), RefAttnTypeError, ["scale", "0-d array", "shape (1,)"]),
    ("scale", np.ones((2, 2)), RefAttnTypeError, ["scale", "0-d array", "shape (2, 2)"]),
    ("scale", [0.5], RefAttnTypeError, ["scale", "real number", "list"]),
    ("scale", np.array(np.nan), RefAttnError, ["scale", "finite", "nan"]),
    ("scale", np.float64(np.inf), RefAttnError, ["scale", "finite", "inf"]),
    ("scale", 10**400, RefAttnError, ["scale", "finite", "beyond float64"]),
    ("scale", np.array("0.5"), RefAttnTypeError, ["scale", "real number", "str"]),
    ("softcap", np.array([2.0]), RefAttnTypeError, ["softcap", "0-d array", "shape (1,)"]),
    ("softcap", np.array(-1.0), RefAttnError, ["softcap", "> 0", "-1.0"]),
    ("softcap", np.array(np.inf), RefAttnError, ["softcap", "finite", "inf"]),
    ("softcap", False, RefAttnTypeError, ["softcap", "real number", "bool"]),
    ("softcap", 2j, RefAttnTypeError, ["softcap", "real number", "complex"]),
    ("dropout_p", np.array(1.0), RefAttnError, ["dropout_p", "[0, 1)", "1.0"]),
    ("dropout_p", np.array([0.1]), RefAttnTypeError, ["dropout_p", "0-d array", "shape (1,)"]),
    ("dropout_p", True, RefAttnTypeError, ["dropout_p", "real number", "bool"]),
    ("dropout_p", None, RefAttnError, ["dropout_p", "real number", "None"]),
    ("dropout_p", np.float64(np.nan), RefAttnError, ["dropout_p", "finite", "nan"]),
    ("causal", np.array([True]), RefAttnTypeError, ["causal", "0-d array", "shape (1,)"]),
    ("causal", np.array(1), RefAttnTypeError, ["causal", "True or False", "int64"]),
    ("causal", 1.0, RefAttnTypeError, ["causal", "True or False", "float"]),
    ("return_lse", np.array([True]), RefAttnTypeError, ["return_lse", "0-d array"]),
    ("return_lse", "yes", RefAttnTypeError, ["return_lse", "True or False", "'yes'"]),
    ("window", (np.array([2]), None), RefAttnTypeError, ["window[0]", "integer", "shape (1,)"]),
    ("window", (2.0, None), RefAttnTypeError, ["window[0]", "integer", "float"]),
    ("window", (None, True), RefAttnTypeError, ["window[1]", "integer", "bool"]),
    ("window", (None, 1.5), RefAttnTypeError, ["window[1]", "integer", "1.5"]),
    ("align", np.array("top_left"), RefAttnError, ["align", "'top_left'"]),
    ("empty_rows", 0, RefAttnError, ["empty_rows", "'zero'", "0"]),
    ("backend", None, RefAttnError, ["backend", "'numpy'", "None"]),
]


@pytest.mark.parametrize("name, value, exc, words", BAD_SCALARS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_SCALARS)])
def test_bad_scalar_options_are_named(name, value, exc, words):
    opts = {"align": "top_left", "dropout_mask": np.ones((3, 6), dtype=bool), name: value}
    with pytest.raises(exc) as info:
        refattn.sdpa(Q, K, V, **opts)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    if name != "return_lse":  # the backward validates the same way
        with pytest.raises(exc):
            refattn.sdpa_backward(np.zeros((2, 4, 3, 4)), Q, K, V, **opts)


# ---- the NumPy path refuses score-sized intermediates over its limit (issue 11) ----------------

L_HUGE = 1 << 20  # 2**40 scores: 8 TiB per score-sized float64 array


def _huge(shape):
    """A read-only broadcast view of one number: no memory of its shape."""
    return np.broadcast_to(np.float64(0.25), shape)


def _peak_mib(fn):
    tracemalloc.start()
    try:
        fn()
    except RefAttnError as exc:
        return tracemalloc.get_traced_memory()[1] / 2**20, str(exc)
    finally:
        tracemalloc.stop()
    raise AssertionError("no RefAttnError")


@pytest.mark.parametrize("op", ["sdpa", "sdpa_backward", "attention_weights", "attention_weights_backward"])
def test_numpy_path_refuses_huge_score_tensors_before_allocating(op, monkeypatch):
    monkeypatch.delenv("REFATTN_NUMPY_MAX_BYTES", raising=False)
    q = k = v = _huge((1, 1, L_HUGE, 1))  # validated copies: 8 MiB each; the scores would be 8 TiB
    calls = {
        "sdpa": lambda: refattn.sdpa(q, k, v, causal=True, backend="numpy"),
        "sdpa_backward": lambda: refattn.sdpa_backward(_huge(q.shape), q, k, v, softcap=5.0, backend="numpy"),
        "attention_weights": lambda: refattn.attention_weights(q, k),
        "attention_weights_backward": lambda: refattn.attention_weights_backward(_huge((1, 1, L_HUGE, L_HUGE)), q, k),
    }
    peak, message = _peak_mib(calls[op])
    assert peak < 64, peak
    a = sdpa_core.validate(q, k, None, causal=op == "sdpa", softcap=5.0 if op == "sdpa_backward" else None)
    nbytes = sdpa_core.numpy_bytes(a, backward=op.endswith("backward")) + (op == "attention_weights_backward") * 2**43
    assert f"{nbytes / 2**30:,.1f} GiB" in message, message
    assert nbytes >= 3 * 2**43  # three 8 TiB arrays at least
    for word in (
        "score-sized",
        "(scores (1, 1, 1048576, 1048576))",
        "over the limit of 8.0 GiB",
        "REFATTN_NUMPY_MAX_BYTES",
    ):
        assert word in message, (word, message)
    if op.startswith("sdpa"):
        assert message.startswith(f"backend: the NumPy path of {op} needs ")
        assert 'use backend="numba" (O(N·D) memory)' in message
    else:
        assert message.startswith(f"q, k: {op} needs ")
        assert 'sdpa(..., return_lse=True, backend="numba")' in message


def test_huge_scores_from_broadcast_batch_dims_are_refused_too():
    """Leading dims that broadcast between q and k multiply the scores: (1024, 1) x (1, 1024) batches."""
    q = _huge((1024, 1, 1, 512, 1))
    k = v = _huge((1, 1024, 1, 512, 1))
    with pytest.raises(RefAttnError, match=r"needs 6,144\.0 GiB .*\(scores \(1024, 1024, 1, 512, 512\)\)"):
        refattn.sdpa(q, k, v, backend="numpy")


def test_auto_never_takes_numpy_over_the_limit(monkeypatch):
    q = k = v = _huge((1, 1, L_HUGE, 1))
    monkeypatch.setattr(kernels, "AUTO_MIN_SCORES", 2**62)  # only the memory limit can send auto to the kernel
    monkeypatch.setattr(kernels, "numba_available", lambda: True)
    taken = []
    monkeypatch.setattr(kernels, "sdpa_forward", lambda a: taken.append(a.score_shape) or (None, None))
    refattn.sdpa(q, k, v, backend="auto")
    assert taken == [(1, 1, L_HUGE, L_HUGE)]
    assert kernels.resolve_backend("auto", 10, numpy_bytes=2**40) == "numba"
    assert kernels.resolve_backend("auto", 10, numpy_bytes=2**20) == "numpy"
    monkeypatch.setattr(kernels, "numba_available", lambda: False)
    with pytest.raises(RefAttnError, match=r'backend="numba" \(O\(N·D\) memory\) would do it: pip install numba'):
        refattn.sdpa(q, k, v, backend="auto")
    with pytest.raises(RefAttnError, match=r'use backend="numba" \(O\(N·D\) memory\) \(pip install numba\)'):
        refattn.sdpa_backward(_huge(q.shape), q, k, v, backend="numpy")


def test_the_limit_is_set_by_the_environment_or_the_module(monkeypatch):
    q, k, v = (rng.standard_normal((1, 1, 256, 4)) for _ in range(3))  # 3 arrays of 0.5 MiB forward
    monkeypatch.setenv("REFATTN_NUMPY_MAX_BYTES", "1MiB")
    with pytest.raises(RefAttnError, match=r"needs 1\.5 MiB .* over the limit of 1\.0 MiB"):
        refattn.sdpa(q, k, v, backend="numpy")
    for fine in ("2MiB", "2097152", "2e6", "inf", " 1.5 G "):
        monkeypatch.setenv("REFATTN_NUMPY_MAX_BYTES", fine)
        refattn.sdpa(q, k, v, backend="numpy")
    monkeypatch.setattr(kernels, "NUMPY_MAX_BYTES", 2**19)  # the module setting wins over the environment
    with pytest.raises(RefAttnError, match=r"over the limit of 0\.5 MiB"):
        refattn.sdpa(q, k, v, backend="numpy")
    monkeypatch.setattr(kernels, "NUMPY_MAX_BYTES", None)
    for bad in ("lots", "-1", "0", "1.2.3", "5 XB"):
        monkeypatch.setenv("REFATTN_NUMPY_MAX_BYTES", bad)
        with pytest.raises(RefAttnError, match=rf"REFATTN_NUMPY_MAX_BYTES: expected a number of bytes > 0.*{bad!r}"):
            refattn.sdpa(q, k, v, backend="numpy")
    monkeypatch.setattr(kernels, "NUMPY_MAX_BYTES", "lots")
    with pytest.raises(RefAttnError, match="refattn.kernels.NUMPY_MAX_BYTES: expected a number of bytes"):
        refattn.sdpa(q, k, v, backend="numpy")


COUNT_CASES = {
    "plain": {},
    "softcap": dict(softcap=2.0),
    "bias": dict(bias="full"),
    "row bias": dict(bias="row"),
    "mask, nan rows": dict(mask=True, empty_rows="nan"),
    "causal, uniform rows": dict(causal=True, mask=True, empty_rows="uniform"),
    "dropout": dict(dropout_p=0.1),
    "everything": dict(
        softcap=2.0, bias="full", mask=True, causal=True, dropout_p=0.1, sinks=True, empty_rows="uniform"
    ),
}


@pytest.mark.parametrize("name", COUNT_CASES)
def test_the_counted_intermediates_bound_the_measured_peak(name):
    """``score_arrays`` (what the limit multiplies) is an upper bound of the NumPy path's peak, measured
    by tracemalloc, and not a loose one: at most 2.5 score arrays above it.  A change that holds one more
    score-sized array fails here until the count is updated."""
    n = 512
    r = np.random.default_rng(5)
    q, k, v = (r.standard_normal((1, 1, n, 2)) for _ in range(3))
    spec = COUNT_CASES[name]
    opts = {key: val for key, val in spec.items() if key not in ("bias", "mask", "sinks", "dropout_p")}
    if "bias" in spec:
        opts["bias"] = r.standard_normal((n, n) if spec["bias"] == "full" else (n,))
    if "mask" in spec:
        mask = r.random((n, n)) > 0.3
        mask[::3] = False  # rows that are empty: the empty-row policies run
        opts["mask"] = mask
    if "sinks" in spec:
        opts["sinks"] = np.zeros(1)
    if "dropout_p" in spec:
        opts.update(dropout_p=spec["dropout_p"], dropout_mask=r.random((n, n)) > 0.1)
    a = sdpa_core.validate(q, k, v, **opts)
    d_out, d_lse = r.standard_normal((1, 1, n, 2)), r.standard_normal((1, 1, n))
    d_o = sdpa_core.as_cotangent(d_out, d_out.shape, "d_out")
    score_bytes = 8 * n * n
    for backward, fn in (
        (False, lambda: sdpa_core.run_forward(a, True)),
        (True, lambda: sdpa_core.run_backward(a, d_o, d_lse)),
    ):
        tracemalloc.start()
        try:
            fn()
            peak = tracemalloc.get_traced_memory()[1] / score_bytes
        finally:
            tracemalloc.stop()
        counted = sdpa_core.score_arrays(a, backward)
        assert peak <= counted + 0.1, (backward, peak, counted)  # 0.1: the (..., Lq) and (..., L, D) arrays
        assert counted <= peak + 2.5, (backward, peak, counted)


def test_a_0d_nan_option_is_a_refattn_error_naming_it():
    """Regression: a 0-d array holding NaN raised a plain TypeError inside check_finite."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 3)) for _ in range(3))
    with pytest.raises(refattn.RefAttnError, match=r"sinks: expected finite values or -inf, got nan"):
        refattn.sdpa(q, k, v, sinks=np.array(np.nan))
