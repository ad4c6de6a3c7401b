"""The Numba kernels against their NumPy definition, determinism across thread counts, backend choice."""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings

import refattn
from refattn import kernels
from refattn.testing.strategies import rollout_cases, sdpa_cases
from tests.mutation import assert_catches

needs_numba = pytest.mark.skipif(not kernels.numba_available(), reason="numba is not installed")


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert np.array_equal(np.isnan(a), np.isnan(b)) and np.array_equal(np.isinf(a), np.isinf(b))
    finite = np.isfinite(b)
    scale = max(float(np.max(np.abs(b[finite]), initial=0.0)), 1e-300)
    return float(np.max(np.abs(a[finite] - b[finite]), initial=0.0)) / scale


@needs_numba
@settings(max_examples=40)
@given(sdpa_cases())
def test_kernel_equals_numpy_definition_for_every_option(case):
    opts = {k: v for k, v in case.options.items() if k != "return_lse"}
    fast = refattn.sdpa(*case.inputs, return_lse=True, backend="numba", **opts)
    ref = refattn.sdpa(*case.inputs, return_lse=True, backend="numpy", **opts)
    for a, b in zip(fast, ref):
        assert _rel(a, b) <= 1e-12
    rng = np.random.default_rng(0)
    d_out, d_lse = rng.standard_normal(ref[0].shape), rng.standard_normal(ref[1].shape)
    g_fast = refattn.sdpa_backward(d_out, *case.inputs, d_lse=d_lse, backend="numba", **opts)
    g_ref = refattn.sdpa_backward(d_out, *case.inputs, d_lse=d_lse, backend="numpy", **opts)
    g_saved = refattn.sdpa_backward(d_out, *case.inputs, d_lse=d_lse, backend="numba", saved=fast, **opts)
    for a, b in zip(g_saved, g_fast):  # the saved forward is the one the kernel would recompute
        assert (a is None and b is None) or np.array_equal(a, b, equal_nan=True)
    for name, a, b in zip(g_ref._fields, g_fast, g_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            assert _rel(a, b) <= 1e-12, name


@needs_numba
def test_kernel_at_tile_boundaries():
    rng = np.random.default_rng(1)
    for lq, lk in [(127, 129), (128, 128), (129, 255), (1, 300)]:
        q, k, v = (
            rng.standard_normal((1, 2, lq, 8)),
            rng.standard_normal((1, 1, lk, 8)),
            rng.standard_normal((1, 1, lk, 4)),
        )
        bias = rng.standard_normal((lq, lk))
        for opts in (
            {},
            {"bias": bias},
            {"causal": True, "align": "bottom_right", "bias": bias},
            {"window": (30, 5), "align": "top_left"},
        ):
            fast = refattn.sdpa(q, k, v, backend="numba", return_lse=True, **opts)
            ref = refattn.sdpa(q, k, v, backend="numpy", return_lse=True, **opts)
            for a, b in zip(fast, ref):
                assert _rel(a, b) <= 1e-12, (lq, lk, opts)


_DETERMINISM = """
import hashlib, numpy as np, refattn
rng = np.random.default_rng(0)
q = rng.standard_normal((2, 4, 200, 16))
k, v = rng.standard_normal((2, 2, 300, 16)), rng.standard_normal((2, 2, 300, 8))
opts = dict(causal=True, align="bottom_right", softcap=3.0, sinks=np.zeros(4), bias=rng.standard_normal((200, 300)))
out, lse = refattn.sdpa(q, k, v, return_lse=True, backend="numba", **opts)
g = refattn.sdpa_backward(rng.standard_normal(out.shape), q, k, v, backend="numba", **opts)
h = hashlib.sha256()
maps = [refattn.softmax(rng.standard_normal((3, 4, 64, 64))).astype(np.float32) for _ in range(5)]
r = refattn.rollout(maps, backend="numba")
r0 = refattn.rollout(maps, rows=[0, 5], backend="numba")
for a in (out, lse) + tuple(g) + (r, r0):
    h.update(np.ascontiguousarray(a).tobytes())
print(h.hexdigest())
"""


@needs_numba
def test_bitwise_identical_for_one_and_two_threads():
    digests = []
    for threads in ("1", "2", "2"):
        env = {**os.environ, "NUMBA_NUM_THREADS": threads}
        run = subprocess.run([sys.executable, "-c", _DETERMINISM], capture_output=True, text=True, env=env, check=True)
        digests.append(run.stdout.strip())
    assert len(set(digests)) == 1, digests


def test_backend_choice():
    assert kernels.resolve_backend("numpy", 10**9) == "numpy"
    assert kernels.resolve_backend("auto", 10) == "numpy"
    with pytest.raises(refattn.RefAttnError, match="backend"):
        refattn.sdpa(np.ones((1, 2, 2)), np.ones((1, 2, 2)), np.ones((1, 2, 2)), backend="gpu")
    if kernels.numba_available():
        assert kernels.resolve_backend("auto", kernels.AUTO_MIN_SCORES) == "numba"
    else:
        assert kernels.resolve_backend("auto", 10**9) == "numpy"
        with pytest.raises(refattn.RefAttnError, match="numba is not installed"):
            kernels.resolve_backend("numba", 1)


def test_kernel_catches_a_wrong_alignment(monkeypatch):
    """Mutation check: the agreement test fails when the kernel's alignment offset is off by one."""
    if not kernels.numba_available():
        pytest.skip("numba is not installed")
    real = kernels._Flat.__init__

    def shifted(self, a):
        real(self, a)
        g = list(self.geometry)
        g[5] += 1
        self.geometry = tuple(g)

    monkeypatch.setattr(kernels._Flat, "__init__", shifted)
    rng = np.random.default_rng(2)
    q, k, v = rng.standard_normal((1, 4, 3)), rng.standard_normal((1, 6, 3)), rng.standard_normal((1, 6, 2))
    fast = refattn.sdpa(q, k, v, causal=True, align="bottom_right", backend="numba")
    ref = refattn.sdpa(q, k, v, causal=True, align="bottom_right", backend="numpy")
    assert _rel(fast, ref) > 1e-3


def _exp_ulp_errors(exp_fn, x):
    """Error of ``exp_fn(x)`` in ulps of the exact value (150-bit mpmath), on the points where it
    differs most from NumPy's exp (a screen: NumPy's exp is itself within ~0.5 ulp)."""
    mpmath = pytest.importorskip("mpmath")
    got = exp_fn(x)
    ref = np.exp(x)
    screen = np.abs(got - ref) / np.spacing(ref)
    worst = np.argsort(-screen)[:400]
    errors = []
    with mpmath.workprec(150):
        for i in worst:
            exact = mpmath.exp(mpmath.mpf(float(x[i])))
            errors.append(float(abs(mpmath.mpf(float(got[i])) - exact) / mpmath.mpf(float(np.spacing(float(exact))))))
    return max(errors)


def _exp_points():
    rng = np.random.default_rng(7)
    return np.concatenate(
        [
            rng.uniform(-745.0, 0.0, 100_000),  # the kernels' domain: x − max ≤ 0
            rng.uniform(-1.0, 0.0, 50_000),
            rng.uniform(-40.0, 0.0, 50_000),
            rng.uniform(-708.0, -700.0, 5_000),
            rng.uniform(0.0, 709.7, 20_000),
        ]
    )


@needs_numba
def test_fast_exp_is_within_one_ulp_and_keeps_special_values():
    import numba as nb

    from refattn.kernels.fastexp import exp

    @nb.njit(fastmath={"contract"})  # compiled as the kernels compile it
    def exp_array(x):
        out = np.empty_like(x)
        for i in range(x.size):
            out[i] = exp(x[i])
        return out

    assert _exp_ulp_errors(exp_array, _exp_points()) <= 1.0
    special = np.array([0.0, -0.0, -np.inf, np.inf, -746.0, -745.13, 709.78, 709.79, 5e-324])
    got = exp_array(special)
    with np.errstate(over="ignore"):
        assert np.array_equal(got, np.exp(special))
    assert np.isnan(exp_array(np.array([np.nan]))[0])
    subnormal = np.linspace(-745.1, -708.5, 2001)  # rounded once: within one subnormal step
    assert np.max(np.abs(exp_array(subnormal) - np.exp(subnormal))) <= 5e-324


def test_exp_ulp_check_catches_a_two_ulp_error():
    x = _exp_points()[:20_000]
    assert _exp_ulp_errors(lambda y: np.exp(y) * (1.0 + 4.5e-16), x) > 1.0


def test_saved_forward_is_shape_checked():
    q = k = v = np.ones((1, 2, 3, 4))
    out, lse = refattn.sdpa(q, k, v, return_lse=True)
    with pytest.raises(refattn.RefAttnError, match="saved: expected the pair"):
        refattn.sdpa_backward(out, q, k, v, saved=out)
    with pytest.raises(refattn.RefAttnError, match=r"saved lse: expected shape \(1, 2, 3\)"):
        refattn.sdpa_backward(out, q, k, v, saved=(out, lse[..., :2]))
    g = refattn.sdpa_backward(out, q, k, v, saved=(out, lse), backend="numpy")
    np.testing.assert_array_equal(g.dq, refattn.sdpa_backward(out, q, k, v, backend="numpy").dq)


def _rollout_kernel_matches(case):
    opts = {k: v for k, v in case.options.items() if k not in ("return_all",)}
    layers = case.inputs[0]
    for maps in (layers, [np.asarray(a, dtype=np.float32) for a in layers]):
        ref = refattn.rollout(maps, backend="numpy", **opts)
        fast = refattn.rollout(maps, backend="numba", **opts)
        assert _rel(fast, ref) <= 1e-12
        rows = refattn.rollout(maps, rows=[0, -1], backend="numba", **opts)
        assert _rel(rows, ref[..., [0, -1], :]) <= 1e-12


@needs_numba
@settings(max_examples=40)
@given(rollout_cases())
def test_rollout_kernel_equals_numpy_definition(case):
    _rollout_kernel_matches(case)


@needs_numba
def test_rollout_kernel_property_catches_a_missing_residual(monkeypatch):
    """Mutant: the kernel path called with residual 0 (the identity term forgotten)."""
    real = kernels.rollout_fuse_mean
    monkeypatch.setattr(kernels, "rollout_fuse_mean", lambda a, residual, renormalize: real(a, 0.0, renormalize))
    assert_catches(rollout_cases(), _rollout_kernel_matches)


@needs_numba
def test_rollout_kernel_reads_strided_maps_and_rejects_non_finite():
    rng = np.random.default_rng(3)
    base = refattn.softmax(rng.standard_normal((2, 3, 40, 40))).astype(np.float32)
    layers = [base, base[..., ::-1, :], base[:, ::-1]]  # negative strides, no copies
    ref = refattn.rollout(layers, backend="numpy")
    assert _rel(refattn.rollout(layers, backend="numba"), ref) <= 1e-12
    assert _rel(refattn.rollout(layers, rows=[3, 0], backend="numba"), ref[..., [3, 0], :]) <= 1e-12
    bad = base.copy()
    bad[1, 2, 5, 7] = np.nan
    with pytest.raises(refattn.RefAttnError, match=r"attentions\[1\]: expected finite values"):
        refattn.rollout([base, bad], backend="numba")
    with pytest.raises(refattn.RefAttnError, match=r"attentions\[1\]: expected finite values"):
        refattn.rollout([base, bad], rows=0, backend="numba")


@needs_numba
def test_entropy_kernel_equals_numpy_definition():
    rng = np.random.default_rng(4)
    p = refattn.softmax(3 * rng.standard_normal((2, 3, 50, 50)))
    p[0, 0, 0, :10] = 0.0  # 0 log 0 = 0
    for maps in (p, p.astype(np.float32), p[:, :, ::2]):
        for normalize in (False, True):
            fast = refattn.metrics.entropy(maps, normalize=normalize, backend="numba")
            ref = refattn.metrics.entropy(maps, normalize=normalize, backend="numpy")
            assert _rel(fast, ref) <= 1e-12
    bad = p.copy()
    bad[1, 2, 3, 4] = np.inf
    with pytest.raises(refattn.RefAttnError, match="expected finite values"):
        refattn.metrics.entropy(bad, backend="numba")
