"""Low-precision rounding and the SDPA twin."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import refattn
from refattn import lowp
from refattn.testing import check_vjp
from refattn.testing.strategies import sdpa_cases
from tests.mutation import assert_catches

ml_dtypes = pytest.importorskip("ml_dtypes")

ML = {
    "bfloat16": ml_dtypes.bfloat16,
    "float8_e4m3": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "float16": np.float16,
    "float32": np.float32,
}
doubles = hnp.arrays(np.float64, st.integers(1, 64), elements=st.floats(allow_nan=False, width=64))
finite_doubles = hnp.arrays(np.float64, st.integers(1, 64), elements=st.floats(allow_nan=False, allow_infinity=False))


def _is_rne(x, r, fmt):
    """Independent check of round-to-nearest-even on finite results: r is on the format's grid,
    within half a quantum of x, and a tie goes to the even neighbour."""
    mag = np.abs(x)
    e = np.maximum(np.frexp(mag)[1] - 1, fmt.min_exponent)  # exact (log2 rounds up just below 2^k)
    quantum = np.ldexp(1.0, e - fmt.fraction_bits)
    ok = np.isfinite(r) & (np.abs(r) <= fmt.max_finite)
    steps = r[ok] / quantum[ok]
    with np.errstate(over="ignore"):  # 2^(e+1) may overflow for float64's top binade: never equal then
        next_binade = np.ldexp(1.0, e[ok] + 1)
    on_grid = (steps == np.round(steps)) | (np.abs(r[ok]) == next_binade)
    twice = 2.0 * np.abs(r[ok] - x[ok])  # compared with the quantum (half a float64 subnormal step is 0)
    even = np.mod(np.round(np.abs(r[ok]) / quantum[ok]), 2) == 0
    tie_even = (twice < quantum[ok]) | ((twice == quantum[ok]) & even)
    return bool(np.all(on_grid) and np.all(twice <= quantum[ok]) and np.all(tie_even))


def _equals_numpy_cast(args):
    x, name = args
    with np.errstate(over="ignore"):
        expected = x.astype(ML[name]).astype(np.float64)
    np.testing.assert_array_equal(lowp.round_to(x, name), expected)


@settings(max_examples=60)
@given(st.tuples(doubles, st.sampled_from(["float16", "float32"])))
def test_round_to_equals_numpy_casts_from_float64(args):
    _equals_numpy_cast(args)


def test_cast_property_catches_rounding_toward_zero(monkeypatch):
    """Mutant: the quotient truncated instead of rounded to nearest even."""
    monkeypatch.setattr(lowp.np, "round", np.trunc)  # undone by monkeypatch after the test
    assert_catches(st.tuples(doubles, st.sampled_from(["float16", "float32"])), _equals_numpy_cast)


@settings(max_examples=60)
@given(
    hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(allow_nan=False, width=32)),
    st.sampled_from(["bfloat16", "float8_e4m3", "float8_e5m2"]),
)
def test_round_to_equals_ml_dtypes_on_float32_inputs(x, name):
    """ml_dtypes converts through float32, so on float32 inputs it rounds once, as we do."""
    with np.errstate(over="ignore", invalid="ignore"):
        expected = x.astype(ML[name]).astype(np.float64)
    np.testing.assert_array_equal(lowp.round_to(x.astype(np.float64), name), expected)


@settings(max_examples=60)
@given(finite_doubles, st.sampled_from(sorted(lowp.FORMATS)))
def test_round_to_is_round_to_nearest_even(x, name):
    fmt = lowp.FORMATS[name]
    assert _is_rne(x, lowp.round_to(x, name), fmt)


def test_rne_check_catches_truncation_and_ties_away():
    fmt = lowp.FORMATS["bfloat16"]
    x = np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-7 + 2**-9])  # two ties and a round-up
    assert _is_rne(x, lowp.round_to(x, "bfloat16"), fmt)
    assert not _is_rne(x, np.trunc(x * 128) / 128, fmt)  # truncation
    assert not _is_rne(x, np.floor(x * 128 + 0.5) / 128, fmt)  # ties away from zero


def test_round_to_rounds_once_from_float64():
    """A float64 just above a bfloat16 tie becomes an exact tie if it is first rounded to float32
    (older ml_dtypes did that; 0.7.0 rounds once). The RNE predicate, not any library, is the arbiter."""
    fmt = lowp.FORMATS["bfloat16"]
    x = np.array([1 + 2**-8 + 2**-30, -(1 + 3 * 2**-8 - 2**-30)])
    r = lowp.round_to(x, "bfloat16")
    np.testing.assert_array_equal(r, [1 + 2**-7, -(1 + 2**-7)])
    assert _is_rne(x, r, fmt)
    through_float32 = np.array([1.0, -(1 + 2 * 2**-7)])  # what a float32 detour gives: ties to even
    assert not _is_rne(x, through_float32, fmt)


def test_round_to_special_values_and_overflow():
    x = np.array([np.nan, np.inf, -np.inf, 70000.0, 65519.0, 65520.0, 500.0, 464.0, -0.0, 1e-320])
    f16 = lowp.round_to(x, "float16")
    assert np.isnan(f16[0]) and f16[1] == np.inf and f16[2] == -np.inf and f16[3] == np.inf
    assert f16[4] == 65504.0 and f16[5] == np.inf  # 65520 is the tie with 2^16: to even = overflow
    e4m3 = lowp.round_to(x, "float8_e4m3")
    assert np.isnan(e4m3[1]) and np.isnan(e4m3[6]) and e4m3[7] == 448.0  # no inf in E4M3fn
    assert np.signbit(lowp.round_to(x, "bfloat16")[8]) and lowp.round_to(x, "bfloat16")[9] == 0.0


def test_format_names_and_errors():
    assert lowp.format_of("bf16").name == "bfloat16"
    assert lowp.format_of(np.float16).name == "float16"
    assert lowp.format_of(ml_dtypes.float8_e4m3fn).name == "float8_e4m3"
    with pytest.raises(refattn.RefAttnError, match="dtype: expected one of"):
        lowp.format_of("float12")
    with pytest.raises(refattn.RefAttnError, match="accumulate"):
        lowp.sdpa_twin(np.ones((1, 2, 2)), np.ones((1, 2, 2)), np.ones((1, 2, 2)), dtype="bf16", accumulate="int8")


def _twin_matches_sdpa(case, choices=None):
    opts = {k: v for k, v in case.options.items() if k != "return_lse"}
    twin_kw = dict(dtype="float64", accumulate="float64", **(choices or {}))
    out, lse = refattn.sdpa(*case.inputs, return_lse=True, backend="numpy", **opts)
    t_out, t_lse = lowp.sdpa_twin(*case.inputs, return_lse=True, **twin_kw, **opts)
    np.testing.assert_allclose(t_out, out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(t_lse, lse, rtol=1e-12, atol=1e-12)
    rng = np.random.default_rng(0)
    d_out, d_lse = rng.standard_normal(out.shape), rng.standard_normal(lse.shape)
    g = refattn.sdpa_backward(d_out, *case.inputs, d_lse=d_lse, backend="numpy", **opts)
    tg = lowp.sdpa_twin_backward(d_out, *case.inputs, d_lse=d_lse, **twin_kw, **opts)
    for name, a, b in zip(g._fields, g, tg):
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-11, err_msg=name)


@settings(max_examples=40)
@given(sdpa_cases())
def test_float64_twin_equals_sdpa_for_every_option(case):
    _twin_matches_sdpa(case)


@settings(max_examples=15)
@given(sdpa_cases(), st.sampled_from(sorted(lowp.TWIN_VARIANTS)), st.sampled_from([1, 3, 64]))
def test_every_admissible_twin_in_float64_equals_sdpa(case, variant, block_k):
    """Each implementation choice is the same maths: in float64 every variant is the golden."""
    choices = dict(lowp.TWIN_VARIANTS[variant])
    if "block_k" in choices:
        choices["block_k"] = block_k
    _twin_matches_sdpa(case, choices)


def test_variant_property_catches_a_missing_online_rescale(monkeypatch):
    """Mutant: the online softmax forgets to rescale its accumulators when the row max grows."""
    monkeypatch.setattr(lowp, "_rescale_factor", lambda m_old, m_new, pr, exp2: np.where(np.isneginf(m_old), 0.0, 1.0))
    flash2 = dict(lowp.TWIN_VARIANTS["flash2"], block_k=3)
    assert_catches(sdpa_cases(), lambda case: _twin_matches_sdpa(case, flash2))


def test_twin_choices_are_validated():
    q = np.ones((1, 2, 4))
    with pytest.raises(refattn.RefAttnError, match="scale_at: expected one of"):
        lowp.sdpa_twin(q, q, q, dtype="bf16", scale_at="v")
    with pytest.raises(refattn.RefAttnError, match="reorder_ops=True moves the scale to k"):
        lowp.sdpa_twin(q, q, q, dtype="bf16", reorder_ops=True, scale_at="q")
    with pytest.raises(refattn.RefAttnError, match="block_k: expected a positive int"):
        lowp.sdpa_twin_backward(q, q, q, q, dtype="bf16", block_k=0)


def test_twin_property_catches_a_tiled_gqa_head_map(monkeypatch):
    """Mutant: kv heads tiled (head i uses kv head i % Hk) instead of repeated (i // g)."""
    monkeypatch.setattr(lowp, "expand_kv", lambda x, g: x if g == 1 else np.concatenate([x] * g, axis=-3))
    assert_catches(sdpa_cases(), _twin_matches_sdpa)


def _qkv(seed=0, shape=(2, 3, 40, 16)):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape) for _ in range(3))


def test_twin_values_lie_on_the_format_grid_and_error_grows_with_coarser_formats():
    q, k, v = _qkv()
    golden = refattn.sdpa(q, k, v, causal=True)
    errors = {}
    for name in ("float32", "float16", "bfloat16", "float8_e4m3"):
        twin = lowp.sdpa_twin(q, k, v, dtype=name, causal=True)
        np.testing.assert_array_equal(lowp.round_to(twin, name), twin)
        errors[name] = np.max(np.abs(twin - golden))
    assert errors["float32"] < errors["float16"] < errors["bfloat16"] < errors["float8_e4m3"]
    assert errors["float32"] < 1e-5 and errors["bfloat16"] < 0.1


def test_twin_backward_is_close_to_the_float64_gradient_at_its_precision():
    q, k, v = _qkv(1)
    d_out = np.random.default_rng(2).standard_normal(q.shape)
    g = refattn.sdpa_backward(d_out, q, k, v)
    for name, tol in (("float32", 1e-5), ("bfloat16", 0.15)):
        t = lowp.sdpa_twin_backward(d_out, q, k, v, dtype=name)
        for a, b in zip(g[:3], t[:3]):
            assert np.max(np.abs(a - b)) < tol * max(1.0, np.max(np.abs(a)))


# ---- the kernel's data path: P's intermediate format and FA3's fp8 descales ------------------------------


def _gqa(seed=0, batch=2, hq=4, hk=2, lq=7, lk=9, d=8):
    """GQA inputs (B, Hq, Lq, D), (B, Hk, Lk, D) and float32-representable descales (B, Hk) in [0, 2)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, hq, lq, d))
    k, v = rng.standard_normal((batch, hk, lk, d)), rng.standard_normal((batch, hk, lk, d))
    descales = tuple((2 * rng.random((batch, hk))).astype(np.float32).astype(np.float64) for _ in range(3))
    return (q, k, v), descales, rng.standard_normal((batch, hq, lq, d))


def _variants():
    """Every admissible variant, the online one on blocks of 4 (several blocks per row)."""
    return {n: dict(c, block_k=4) if "block_k" in c else dict(c) for n, c in lowp.TWIN_VARIANTS.items()}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("variant", sorted(lowp.TWIN_VARIANTS))
def test_an_intermediate_format_at_least_as_fine_as_dtype_is_the_plain_twin(dtype, variant):
    """P is on dtype's grid already: rounding it to float32 (or to dtype itself) changes nothing."""
    (q, k, v), _, d_out = _gqa(1)
    choices, opts = _variants()[variant], {"causal": True, "align": "bottom_right"}
    out, lse = lowp.sdpa_twin(q, k, v, dtype=dtype, return_lse=True, **choices, **opts)
    g = lowp.sdpa_twin_backward(d_out, q, k, v, dtype=dtype, **choices, **opts)
    for inter in ("float32", dtype):
        kw = dict(dtype=dtype, intermediate_dtype=inter, **choices, **opts)
        i_out, i_lse = lowp.sdpa_twin(q, k, v, return_lse=True, **kw)
        np.testing.assert_array_equal(i_out, out)
        np.testing.assert_array_equal(i_lse, lse)
        ig = lowp.sdpa_twin_backward(d_out, q, k, v, **kw)
        for name in ("dq", "dk", "dv"):
            np.testing.assert_array_equal(getattr(ig, name), getattr(g, name), err_msg=name)


def test_a_coarser_intermediate_format_rounds_p_before_the_pv_product():
    """In float64 the only rounding is ri: out = rd_i(P)·keep/(1−p) @ v, P = sdpa's weights; the
    backward is straight-through (dq, dk are sdpa's; dv = rd_i(P̃)ᵀ dO summed over the group)."""
    (q, k, v), _, d_out = _gqa(2)
    keep = np.random.default_rng(3).random((2, 4, 7, 9)) > 0.25
    opts = {"dropout_p": 0.25, "dropout_mask": keep}
    twin = dict(dtype="float64", accumulate="float64", intermediate_dtype="bfloat16")
    p = refattn.attention_weights(q, k)  # (B, Hq, Lq, Lk)
    pd = lowp.round_to(p, "bfloat16") * keep / 0.75
    ve = np.repeat(v, 2, axis=-3)
    np.testing.assert_allclose(lowp.sdpa_twin(q, k, v, **twin, **opts), pd @ ve, rtol=1e-12, atol=1e-14)
    g = refattn.sdpa_backward(d_out, q, k, v, **opts)
    tg = lowp.sdpa_twin_backward(d_out, q, k, v, **twin, **opts)
    np.testing.assert_allclose(tg.dq, g.dq, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(tg.dk, g.dk, rtol=1e-10, atol=1e-12)
    dv = (np.swapaxes(pd, -1, -2) @ d_out).reshape(2, 2, 2, 9, 8).sum(axis=-3)
    np.testing.assert_allclose(tg.dv, dv, rtol=1e-10, atol=1e-12)


def test_an_fp8_intermediate_moves_the_twin_at_fp8_precision():
    (q, k, v), _, _ = _gqa(4)
    plain = lowp.sdpa_twin(q, k, v, dtype="bfloat16", reorder_ops=True)
    fp8 = lowp.sdpa_twin(q, k, v, dtype="bfloat16", reorder_ops=True, intermediate_dtype="float8_e4m3")
    gap = np.max(np.abs(fp8 - plain))
    assert 2.0**-10 < gap < 2.0**-3  # more than bf16 noise, within E4M3's relative spacing 2^-3 of |out| <~ 1


def _prescaled(x, descale, groups=1):
    """rd(ra(rd(x) · descale)) in bfloat16 with float32 products: what the twin does to a descaled input."""
    factor = np.repeat(descale, groups, axis=-1)[..., None, None]
    return lowp.round_to((lowp.round_to(x, "bfloat16") * factor).astype(np.float32), "bfloat16")


def _descales_equal_prescaling(case):
    """The descaled twin is the twin of the pre-scaled inputs, bit for bit, forward and backward."""
    (q, k, v), (qd, kd, vd), d_out, choices = case
    desc = {"q_descale": qd, "k_descale": kd, "v_descale": vd}
    qp, kp, vp = _prescaled(q, qd, q.shape[-3] // k.shape[-3]), _prescaled(k, kd), _prescaled(v, vd)
    opts = dict(dtype="bfloat16", causal=True, align="bottom_right", **choices)
    out, lse = lowp.sdpa_twin(q, k, v, return_lse=True, **desc, **opts)
    p_out, p_lse = lowp.sdpa_twin(qp, kp, vp, return_lse=True, **opts)
    np.testing.assert_array_equal(out, p_out)
    np.testing.assert_array_equal(lse, p_lse)
    g = lowp.sdpa_twin_backward(d_out, q, k, v, **desc, **opts)
    pg = lowp.sdpa_twin_backward(d_out, qp, kp, vp, **opts)
    # the chain rule, rounded as autograd of (x.float() * descale).to(x.dtype) rounds it
    np.testing.assert_array_equal(g.dq, _prescaled(pg.dq, qd, q.shape[-3] // k.shape[-3]))
    np.testing.assert_array_equal(g.dk, _prescaled(pg.dk, kd))
    np.testing.assert_array_equal(g.dv, _prescaled(pg.dv, vd))


_descale_cases = st.builds(
    lambda seed, variant: (*_gqa(seed), _variants()[variant]),
    st.integers(0, 2**16),
    st.sampled_from(sorted(lowp.TWIN_VARIANTS)),
)


@settings(max_examples=8, deadline=None)
@given(_descale_cases)
def test_descales_are_the_twin_of_the_prescaled_inputs(case):
    _descales_equal_prescaling(case)


def test_descale_property_catches_a_q_descale_tiled_over_the_group(monkeypatch):
    """Mutant: q_descale tiled (query head h uses factor h % Hk) instead of repeated (h // g)."""
    real = lowp.expand_kv

    def tiled_for_factors(x, g):  # only the (..., Hk, 1, 1) factor arrays are tiled
        return np.concatenate([x] * g, axis=-3) if g > 1 and x.shape[-2:] == (1, 1) else real(x, g)

    monkeypatch.setattr(lowp, "expand_kv", tiled_for_factors)
    assert_catches(_descale_cases, _descales_equal_prescaling)


def test_float64_descales_are_sdpa_of_the_descaled_inputs_and_the_backward_is_its_derivative():
    (q, k, v), (qd, kd, vd), d_out = _gqa(5)
    desc = {"q_descale": qd, "k_descale": kd, "v_descale": vd}
    f64 = dict(dtype="float64", accumulate="float64", causal=True, align="bottom_right")
    qs, ks, vs = q * np.repeat(qd, 2, axis=-1)[..., None, None], k * kd[..., None, None], v * vd[..., None, None]
    expected = refattn.sdpa(qs, ks, vs, causal=True, align="bottom_right")
    np.testing.assert_allclose(lowp.sdpa_twin(q, k, v, **desc, **f64), expected, rtol=1e-12, atol=1e-13)
    report = check_vjp(lowp.sdpa_twin, lowp.sdpa_twin_backward, (q, k, v), options={**desc, **f64})
    assert report.passed


def test_bad_descales_and_intermediate_formats_are_named():
    (q, k, v), (qd, kd, vd), d_out = _gqa(6)
    with pytest.raises(refattn.RefAttnError, match=r"q_descale: expected a shape broadcastable to \(\.\.\., Hk\)"):
        lowp.sdpa_twin(q, k, v, dtype="bf16", q_descale=np.ones((2, 4)))  # (B, Hq): FA3's is (B, Hk)
    with pytest.raises(refattn.RefAttnError, match=r"v_descale: .*\(2, 2\), got \(3,\)"):
        lowp.sdpa_twin_backward(d_out, q, k, v, dtype="bf16", v_descale=np.ones(3))
    bad = kd.copy()
    bad[1, 0] = np.inf
    with pytest.raises(refattn.RefAttnError, match=r"k_descale: expected finite values, got inf at index \(1, 0\)"):
        lowp.sdpa_twin(q, k, v, dtype="bf16", k_descale=bad)
    with pytest.raises(refattn.RefAttnError, match="intermediate_dtype: expected one of"):
        lowp.sdpa_twin(q, k, v, dtype="bf16", intermediate_dtype="float7")
    with pytest.raises(refattn.RefAttnError, match="intermediate_dtype: expected one of"):
        lowp.sdpa_twin_backward(d_out, q, k, v, dtype="bf16", intermediate_dtype="int8")
