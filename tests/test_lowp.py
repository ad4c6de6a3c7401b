"""Low-precision rounding and the SDPA twin."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import refattn
from refattn import lowp
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
