"""The metric kernel (``refattn/kernels/metric_kernels.py``) against the metrics' NumPy definitions.

Every metric with ``backend=`` and ``summarize`` equal their NumPy path to 1e-12 on random maps with
every kind of mask (key padding left, right and with holes, per-map key padding, full masks, none),
float32 and float64, odd sizes (rows across the kernel's row blocks, ``Lq != Lk``, one key, one head),
strided and integer inputs; the same errors as the NumPy path; bitwise identical results for one and
two threads; the vectorised ``log`` within 1 ulp.
"""

import functools
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings

import refattn
from refattn import kernels, metrics
from refattn.testing.strategies import Case, map_cases
from tests.mutation import property_table

maps_mod = importlib.import_module("refattn.metrics._maps")
needs_numba = pytest.mark.skipif(not kernels.numba_available(), reason="numba is not installed")

# The metrics with a kernel path: (name, call(P, mask, backend)).
METRICS = {
    "entropy": lambda p, mask, b: metrics.entropy(p, mask=mask, backend=b, check_probabilities=False),
    "normalized_entropy": lambda p, mask, b: metrics.entropy(
        p, mask=mask, normalize=True, backend=b, check_probabilities=False
    ),
    "head_confidence": lambda p, mask, b: metrics.head_confidence(p, mask=mask, backend=b, check_probabilities=False),
    "mean_distance": lambda p, mask, b: metrics.mean_distance(p, mask=mask, backend=b, check_probabilities=False),
    "locality_score": lambda p, mask, b: metrics.locality_score(p, mask=mask, backend=b, check_probabilities=False),
    "diagonal_strength": lambda p, mask, b: metrics.diagonal_strength(
        p, mask=mask, backend=b, check_probabilities=False
    ),
    "head_diversity": lambda p, mask, b: metrics.head_diversity(p, mask=mask, backend=b, check_probabilities=False),
}


def _assert_close(fast, ref, what, tol=1e-12):
    """``|fast − ref| ≤ tol · max(1, |ref|)`` entrywise, NaN where NumPy has NaN (a row with no key)."""
    fast, ref = np.asarray(fast), np.asarray(ref)
    assert fast.shape == ref.shape, (what, fast.shape, ref.shape)
    assert np.array_equal(np.isnan(fast), np.isnan(ref)), what
    ok = ~np.isnan(ref)
    err = np.abs(fast[ok] - ref[ok]) / np.maximum(1.0, np.abs(ref[ok]))
    assert float(np.max(err, initial=0.0)) <= tol, (what, float(np.max(err, initial=0.0)))


def _probabilities(rng, shape, mask=None, sharp=2.0):
    """Row-stochastic maps of ``shape`` (over the allowed keys of ``mask``; rows without one are 0)."""
    p = refattn.softmax(sharp * rng.standard_normal(shape))
    if mask is None:
        return p
    allowed = maps_mod.interpret_mask(shape, mask)[0]
    p = np.where(allowed, p, 0.0)
    total = p.sum(axis=-1, keepdims=True)
    return np.where(total > 0, p / np.where(total > 0, total, 1.0), 0.0)


def _masks(rng, shape):
    """Every kind of mask for maps ``(B, H, Lq, Lk)``: none, key padding (holes, left, right), per-map
    key padding, a full mask, a mask of one row per query ``(Lq, 1)``."""
    b, h, lq, lk = shape
    holes = rng.random((b, lk)) > 0.3
    holes[:, 0] = True
    start = rng.integers(0, lk, b)
    left = np.arange(lk) >= start[:, None]
    right = np.arange(lk) < (lk - start)[:, None]
    per_map = rng.random((b, h, lk)) > 0.3
    full = rng.random(shape) > 0.4
    rows = np.broadcast_to(rng.random((lq, 1)) > 0.3, (lq, 1)).copy()
    return {
        "none": None,
        "holes": holes,
        "left": left,
        "right": right,
        "per_map": per_map,
        "full": full,
        "rows": rows,
    }


SHAPES = [(2, 3, 17, 17), (1, 4, 33, 33), (3, 1, 5, 9), (2, 2, 9, 4), (1, 2, 1, 1), (2, 3, 16, 1)]


@needs_numba
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_metric_equals_its_numpy_definition(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    for kind, mask in _masks(rng, shape).items():
        p = _probabilities(rng, shape, mask).astype(dtype)
        for name, call in METRICS.items():
            with np.errstate(invalid="ignore", divide="ignore"):  # locality of a real row without a key: NaN
                fast, ref = call(p, mask, "numba"), call(p, mask, "numpy")
            _assert_close(fast, ref, (name, kind))


@needs_numba
def test_strided_integer_and_batched_inputs():
    rng = np.random.default_rng(7)
    p = _probabilities(rng, (2, 3, 4, 20, 20))  # two batch dims
    mask = rng.random((2, 3, 20)) > 0.2
    mask[..., 0] = True
    for name, call in METRICS.items():
        _assert_close(call(p, mask, "numba"), call(p, mask, "numpy"), name)
        strided = p[..., ::2, :]  # not contiguous: copied for the kernel
        _assert_close(call(strided, None, "numba"), call(strided, None, "numpy"), name)
        one_map = p[0, 0, 0]  # (Lq, Lk): no head axis
        if name != "head_diversity":
            _assert_close(call(one_map, mask[0, 0], "numba"), call(one_map, mask[0, 0], "numpy"), name)
    ints = np.zeros((1, 2, 5, 5), dtype=np.int64)
    ints[..., 2] = 1  # one-hot rows: probabilities as integers
    for name, call in METRICS.items():
        _assert_close(call(ints, None, "numba"), call(ints, None, "numpy"), name)


@needs_numba
def test_zero_entries_subnormals_and_peaked_rows():
    rng = np.random.default_rng(3)
    p = _probabilities(rng, (2, 2, 8, 8), sharp=30.0)  # entries down to ~1e-100 and below
    p[0, 0, 0] = [0.0, 5e-324, 1e-310, 1.0 - 1e-12, 1e-12, 0.0, 0.0, 0.0]
    p[0, 0, 1] = np.eye(8)[3]  # one-hot: entropy 0, max 1
    p[0, 0, 2] = [1.0, 5e-324, 1e-310, 0.0, 0.0, 0.0, 0.0, 0.0]  # entropy 7e-308: the subnormal terms are it
    p[0, 0, 3] = [0.5, 0.5 - 1e-300, 1e-300, 3e-320, 0.0, 0.0, 0.0, 0.0]  # a subnormal beside normal terms
    for name, call in METRICS.items():
        _assert_close(call(p, None, "numba"), call(p, None, "numpy"), name)
    fast, ref = metrics.entropy(p, backend="numba")[0, 0], metrics.entropy(p, backend="numpy")[0, 0]
    assert fast[1] == ref[1] == 0.0
    np.testing.assert_allclose(fast, ref, rtol=1e-12, atol=0)  # relative, however small the entropy


@needs_numba
@pytest.mark.parametrize("tokens_kind", ["ids", "strings", "per_example"])
def test_summarize_kernel_equals_numpy(tokens_kind):
    rng = np.random.default_rng(11)
    shape = (3, 4, 21, 21)
    tokens = {
        "ids": rng.integers(0, 4, 21),
        "strings": rng.choice(["a", "b", "the", "cat"], 21),
        "per_example": rng.integers(0, 3, (3, 21)),
    }[tokens_kind]
    for kind, mask in _masks(rng, shape).items():
        layers = [_probabilities(rng, shape, mask) for _ in range(2)]
        check = kind not in ("rows",)  # a row mask leaves real rows without keys: not probabilities
        with np.errstate(invalid="ignore", divide="ignore"):
            fast = metrics.summarize(layers, tokens, mask=mask, backend="numba", check_probabilities=check)
            ref = metrics.summarize(layers, tokens, mask=mask, backend="numpy", check_probabilities=check)
        assert list(fast) == list(ref)
        for key in ref:
            _assert_close(fast[key], ref[key], (key, kind))
    float32 = _probabilities(rng, shape).astype(np.float32)
    no_tokens = metrics.summarize([float32], backend="numba")
    ref = metrics.summarize([float32], backend="numpy")
    assert list(no_tokens) == list(ref)
    for key in ref:
        _assert_close(no_tokens[key], ref[key], key)


@needs_numba
def test_summarize_of_non_square_maps_without_tokens_and_refusal_with_them():
    rng = np.random.default_rng(5)
    layers = [_probabilities(rng, (2, 3, 6, 9))]
    fast, ref = metrics.summarize(layers, backend="numba"), metrics.summarize(layers, backend="numpy")
    for key in ref:
        _assert_close(fast[key], ref[key], key)
    for backend in ("numba", "numpy"):
        with pytest.raises(refattn.RefAttnError, match="tokens: expected shape"):
            metrics.summarize(layers, np.arange(6), backend=backend)
        with pytest.raises(refattn.RefAttnError, match="square"):
            metrics.summarize(layers, np.arange(9), backend=backend)


def _error(call):
    try:
        call()
    except (refattn.RefAttnError, refattn.RefAttnTypeError) as err:
        return type(err), str(err)
    return None


@needs_numba
def test_the_kernel_path_raises_the_numpy_paths_errors():
    rng = np.random.default_rng(2)
    p = _probabilities(rng, (2, 3, 6, 6))
    mask = np.ones((2, 6), dtype=bool)
    mask[1, 4:] = False
    nan_masked = p.copy()
    nan_masked[1, 0, 2, 5] = np.nan  # a NaN in a masked entry is still refused
    logits = 3 * rng.standard_normal((2, 3, 6, 6))
    short = p * 0.9
    over_masked = _probabilities(rng, (2, 3, 6, 6))  # sums to 1 over all keys, not the allowed ones
    cases = {
        "nan": (nan_masked, mask),
        "inf": (np.where(p > 0.5, np.inf, p), None),
        "logits": (logits, None),
        "short rows": (short, None),
        "weight on masked keys": (over_masked, mask),
        "bool": (p > 0.1, None),
        "one dim": (p[0, 0, 0], None),
        "strings": (np.array([["a", "b"], ["c", "d"]]), None),
    }
    for what, (maps, m) in cases.items():
        for name in METRICS:
            if name == "head_diversity" and np.ndim(maps) < 3:
                continue
            fast = _error(functools.partial(_checked, name, maps, m, "numba"))
            ref = _error(functools.partial(_checked, name, maps, m, "numpy"))
            assert fast is not None and fast == ref, (what, name, fast, ref)
        fast = _error(functools.partial(metrics.summarize, [maps], mask=m, backend="numba"))
        ref = _error(functools.partial(metrics.summarize, [maps], mask=m, backend="numpy"))
        assert fast is not None and fast == ref, (what, "summarize", fast, ref)
    with pytest.raises(refattn.RefAttnError, match="backend"):
        metrics.mean_distance(p, backend="fast")


def _checked(name, maps, mask, backend):
    """The metric ``name`` with the probability check on (its default)."""
    fn = {"normalized_entropy": metrics.entropy}.get(name, getattr(metrics, name, None))
    options = {"normalize": True} if name == "normalized_entropy" else {}
    return fn(maps, mask=mask, backend=backend, **options)


@needs_numba
def test_float32_rows_get_the_float32_tolerance():
    rng = np.random.default_rng(9)
    p = _probabilities(rng, (1, 2, 4, 300)).astype(np.float32)
    p[0, 0, 0] *= np.float32(1 + 5e-6)  # off by 5e-6 > 1e-6, within 300 · eps(float32) = 3.6e-5
    for name in METRICS:
        _assert_close(_checked(name, p, None, "numba"), _checked(name, p, None, "numpy"), name)


@needs_numba
def test_auto_takes_the_kernel_from_the_threshold_on(monkeypatch):
    calls = []
    real = kernels.metric_rows
    monkeypatch.setattr(kernels, "metric_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = np.random.default_rng(1)
    small = _probabilities(rng, (1, 2, 8, 8))
    metrics.mean_distance(small)
    assert calls == []
    monkeypatch.setattr(kernels, "AUTO_MIN_SCORES", small.size)
    metrics.mean_distance(small)
    metrics.summarize([small])
    assert calls == [1, 1]


def test_without_numba_auto_is_numpy_and_numba_is_refused(monkeypatch):
    monkeypatch.setattr(kernels, "numba_available", lambda: False)
    monkeypatch.setattr(kernels, "AUTO_MIN_SCORES", 1)
    p = _probabilities(np.random.default_rng(0), (1, 2, 4, 4))
    ref = metrics.summarize([p], backend="numpy")
    auto = metrics.summarize([p])
    for key in ref:
        np.testing.assert_array_equal(auto[key], ref[key])
    for name, call in METRICS.items():
        np.testing.assert_array_equal(call(p, None, "auto"), call(p, None, "numpy"), name)
        with pytest.raises(refattn.RefAttnError, match="numba is not installed"):
            call(p, None, "numba")


_THREADS = """
import hashlib, sys, numba, numpy as np, refattn
from refattn import metrics
rng = np.random.default_rng(4)
p = refattn.softmax(2 * rng.standard_normal((2, 4, 40, 40)))
mask = rng.random((2, 40)) > 0.2
tokens = rng.integers(0, 5, 40)
out = []
for threads in (1, 2):
    numba.set_num_threads(threads)
    h = hashlib.sha256()
    for m in (None, mask):
        for value in metrics.summarize([p], tokens, mask=m, backend="numba", check_probabilities=False).values():
            h.update(np.ascontiguousarray(value).tobytes())
        for f in (metrics.entropy, metrics.mean_distance, metrics.head_diversity):
            h.update(f(p, mask=m, backend="numba", check_probabilities=False).tobytes())
    out.append(h.hexdigest())
print(out[0] == out[1], out[0][:16])
"""


@needs_numba
def test_results_are_bitwise_identical_for_one_and_two_threads():
    env = {**os.environ, "NUMBA_NUM_THREADS": "2", "REFATTN_QUIET": "1"}
    run = subprocess.run([sys.executable, "-c", _THREADS], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[0] == "True", run.stdout


@needs_numba
def test_log_is_within_one_ulp():
    import mpmath
    import numba

    from refattn.kernels.metric_kernels import log

    @numba.njit(fastmath={"reassoc", "contract"})  # the kernel's flags
    def logs(x, out):
        for i in range(x.shape[0]):
            out[i] = log(x[i])

    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.random(20000),
            np.exp(rng.uniform(-744, 709, 20000)),
            1 + rng.uniform(-1e-3, 1e-3, 4000),
            1 + rng.uniform(-1e-12, 1e-12, 1000),
            np.sqrt(2) * (1 + rng.uniform(-1e-6, 1e-6, 1000)),
            rng.uniform(5e-324, 2.3e-308, 2000),  # subnormal
            [5e-324, 1e-310, 2.2250738585072014e-308, 0.5, 2.0, np.nextafter(1.0, 0), np.nextafter(1.0, 2), 1.7e308],
        ]
    )
    out = np.empty_like(x)
    logs(x, out)
    assert out[x == 1.0].tolist() == [0.0] * int((x == 1.0).sum())
    # screen against NumPy's log, then the largest differences against 120-bit mpmath
    ulp = np.spacing(np.abs(np.log(x)))
    diff = np.abs(out - np.log(x)) / np.where(ulp > 0, ulp, 1.0)
    assert float(diff.max()) <= 2.0
    mpmath.mp.prec = 120
    worst = 0.0
    for i in np.argsort(diff)[-300:]:
        exact = mpmath.log(mpmath.mpf(float(x[i])))
        if exact == 0:
            continue
        worst = max(worst, abs(float(mpmath.mpf(float(out[i])) - exact)) / float(np.spacing(abs(float(exact)))))
    assert worst < 1.0, worst


# ---- properties and their mutants (hypothesis maps with key-padding masks) -----------------------


def _with_tokens(case):
    p = case.inputs[0]
    ids = np.random.default_rng(int(1e6 * p.ravel()[0])).integers(0, 3, p.shape[-1])
    return Case(case.inputs, {**case.options, "tokens": ids})


def _left_padded(case):
    """The maps with their padding moved to the front (the first real token is no longer key 0)."""
    (p,) = case.inputs
    if "mask" not in case.options:
        return case
    count = case.options["mask"].sum(axis=-1, keepdims=True)
    real = np.arange(p.shape[-1]) >= p.shape[-1] - count
    q = (p + 1e-3) * real[..., None, None, :]
    return Case((q / q.sum(axis=-1, keepdims=True),), {**case.options, "mask": real})


metric_cases = map_cases()
summary_cases = map_cases(square=True).map(_left_padded).map(_with_tokens)


def check_metrics_equal_numpy(case):
    (p,) = case.inputs
    mask = case.options.get("mask")
    for name, call in METRICS.items():
        _assert_close(call(p, mask, "numba"), call(p, mask, "numpy"), name)


def check_summarize_equals_numpy(case):
    (p,) = case.inputs
    opts = dict(mask=case.options.get("mask"), check_probabilities=False)
    fast = metrics.summarize([p], case.options["tokens"], backend="numba", **opts)
    ref = metrics.summarize([p], case.options["tokens"], backend="numpy", **opts)
    for key in ref:
        _assert_close(fast[key], ref[key], key)


def _patch_kernel_rows(monkeypatch, change):
    """Install a kernel path whose arguments to the kernel are changed by ``change(kwargs)``."""
    real = kernels.metric_rows

    def broken(**kwargs):
        change(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(kernels, "metric_rows", broken)


def _keys_ignored(kwargs):
    kwargs["keys"] = np.ones_like(kwargs["keys"])


def _real_keys_ignored(kwargs):
    kwargs["real"] = np.ones_like(kwargs["real"])


def _first_is_key_zero(monkeypatch):
    real = maps_mod._real_and_first
    monkeypatch.setattr(maps_mod, "_real_and_first", lambda *a: (real(*a)[0], np.zeros_like(real(*a)[1])))


PROPERTIES = [
    (check_metrics_equal_numpy, metric_cases, "mask_ignored"),
    (check_summarize_equals_numpy, summary_cases, ("first_is_key_zero", "induction_ignores_padding")),
]
MUTANTS = {
    "mask_ignored": lambda mp: _patch_kernel_rows(mp, _keys_ignored),
    "first_is_key_zero": _first_is_key_zero,
    "induction_ignores_padding": lambda mp: _patch_kernel_rows(mp, _real_keys_ignored),
}
test_property, test_property_catches_its_mutant = property_table(PROPERTIES, MUTANTS)
test_property = needs_numba(settings(max_examples=30, deadline=None)(test_property))
test_property_catches_its_mutant = needs_numba(test_property_catches_its_mutant)


@needs_numba
@settings(max_examples=20, deadline=None)
@given(case=metric_cases)
def test_the_kernels_row_sums_are_the_rows_sums(case):
    """The kernel's ``sum`` field is each real row's sum over its allowed keys (1 for these maps)."""
    (p,) = case.inputs
    r = maps_mod.kernel_rows(p, case.options.get("mask"))
    assert np.all(np.abs(np.where(r.rows, r.total, 1.0) - 1.0) <= 1e-12)
