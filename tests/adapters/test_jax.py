"""The JAX adapter: jax.nn.dot_product_attention (xla) judged by refattn, option by option.

JAX's softmax is float32 whatever the inputs (jax/_src/nn/functions.py), so every verdict is at the
float32 rule or coarser; the translations are checked by verdicts, and two mutants (a dropped window,
dropped key lengths) must fail.
"""

import re

import numpy as np
import pytest

import refattn
from refattn.testing import AttentionMismatch

jax = pytest.importorskip("jax")
from refattn.adapters import jax as ja  # noqa: E402

pytestmark = pytest.mark.jax


def _qkv(seed, batch=(2,), hq=4, hk=2, lq=5, lk=7, d=8):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal(batch + (hq, lq, d)),
        rng.standard_normal(batch + (hk, lk, d)),
        rng.standard_normal(batch + (hk, lk, d)),
        rng,
    )


# Each translated option of refattn, in float32 (JAX's own precision): name -> (input seed/shape, options)
TRANSLATED = {
    "gqa": (dict(), {}),
    "scale": (dict(), {"scale": 0.3}),
    "causal_top_left": (dict(), {"causal": True, "align": "top_left"}),
    "window": (dict(lq=6, lk=6), {"window": (2, 1)}),
    "window_unbounded_left_causal": (dict(lq=6, lk=6), {"window": (None, 0), "causal": True}),
    "negative_window_side": (dict(lq=6, lk=6), {"window": (3, -1), "empty_rows": "uniform"}),
    "lengths_causal": (
        dict(lq=6, lk=6),
        {"q_lengths": np.array([4, 6]), "k_lengths": np.array([4, 6]), "causal": True, "return_lse": True},
    ),
    "key_lengths_cross": (dict(), {"k_lengths": np.array([3, 7]), "return_lse": True}),
    "mask_and_bias": (dict(), "mask_and_bias"),
    "batch_dims_bias": (dict(batch=(2, 3)), "batch_bias"),
    "empty_rows_uniform": (dict(), "empty_uniform"),
}


def _options(kind, q, k, rng):
    hq, lq, lk = q.shape[-3], q.shape[-2], k.shape[-2]
    if kind == "mask_and_bias":
        mask = rng.random((hq, lq, lk)) < 0.7
        mask[..., 0] = True  # no empty row
        return {"mask": mask, "bias": rng.standard_normal((lk,))}
    if kind == "batch_bias":
        return {"bias": rng.standard_normal((3, 1, lq, lk)), "causal": True, "align": "top_left"}
    if kind == "empty_uniform":
        mask = rng.random((2, 1, lq, lk)) < 0.6
        mask[0, :, 1] = False  # a real row without keys: JAX averages every value
        return {"mask": mask, "empty_rows": "uniform", "k_lengths": np.array([7, 0])}
    return kind


@pytest.mark.parametrize("name", list(TRANSLATED))
def test_every_translated_option_passes_in_float32(name):
    shape, kind = TRANSLATED[name]
    q, k, v, rng = _qkv(1, **shape)
    options = _options(kind, q, k, rng)
    verdict = ja.check_jax(q, k, v, dtype="float32", **options)
    assert verdict.status == "pass", verdict.report()
    judged = {j.quantity for j in verdict.judgements}
    expected = {"out", "dq", "dk", "dv"} | ({"dbias"} if "bias" in options else set())
    assert judged == expected | ({"lse"} if options.get("return_lse") else set())


@pytest.mark.parametrize("dtype", ["float64", "bfloat16", "float16"])
def test_dtypes_pass_and_are_judged_at_least_at_float32(dtype):
    q, k, v, rng = _qkv(2)
    verdict = ja.check_jax(q, k, v, dtype=dtype, causal=True, align="top_left", bias=rng.standard_normal((4, 5, 7)))
    assert verdict.status == "pass", verdict.report()
    assert verdict["out"].dtype == ja.judged_dtype(dtype) == ("float32" if dtype == "float64" else dtype)
    assert "softmax in float32" in verdict.report()


def test_float64_leaves_the_global_x64_setting_alone():
    q, k, v, _ = _qkv(3)
    before = jax.config.jax_enable_x64
    got = ja.jax_sdpa(q, k, v, dtype="float64")
    assert jax.config.jax_enable_x64 == before
    assert got["out"].dtype == np.float64
    # the inputs reached JAX as float64: its only rounding is the float32 softmax
    np.testing.assert_allclose(got["out"], refattn.sdpa(q, k, v), rtol=0, atol=1e-6)


def test_jit_runs_the_compiled_call():
    q, k, v, _ = _qkv(4)
    assert ja.check_jax(q, k, v, dtype="float32", jit=True, window=(1, 1), align="top_left").passed


def test_translation_uses_jaxs_own_arguments():
    q, k, v, _ = _qkv(5, lq=6, lk=6)
    kw = ja.translate_options(q, k, v, causal=True, window=(None, 2), align="top_left", q_lengths=np.array([3, 6]))
    assert kw["is_causal"] is True
    assert kw["local_window_size"] == (12, 2)
    assert kw["query_seq_lengths"].dtype == np.int32 and kw["query_seq_lengths"].tolist() == [3, 6]
    assert "mask" not in kw and kw["scale"] == pytest.approx(8**-0.5, rel=1e-15)


UNSUPPORTED = [
    ({"softcap": 2.0}, "softcap"),
    ({"sinks": np.zeros(4)}, "sinks"),
    ({"chunk": 2, "causal": True, "align": "top_left"}, "chunk"),
    ({"k_starts": np.array([1, 0])}, "k_starts"),
    ({"causal": True, "align": "bottom_right"}, "offsets are [2]"),
    ({"mask": np.zeros((5, 7), bool)}, "empty_rows='zero': 40 real query rows"),
]


@pytest.mark.parametrize("options, fragment", UNSUPPORTED)
def test_what_jax_lacks_is_reported_unsupported(options, fragment):
    q, k, v, _ = _qkv(6)
    verdict = ja.check_jax(q, k, v, **options)
    assert verdict.status == "unsupported" and not verdict
    assert fragment in verdict.report()
    with pytest.raises(refattn.Unsupported, match=re.escape(fragment.split(":")[0])):
        ja.check_jax(q, k, v, raise_on="unsupported", **options)


def test_other_shapes_and_dtypes_jax_lacks_are_unsupported():
    q, k, _, _ = _qkv(7)
    assert "Dv = 3" in ja.check_jax(q, k, np.zeros(k.shape[:-1] + (3,))).unsupported[0]
    assert "float8_e4m3" in ja.check_jax(q, k, k, dtype="float8_e4m3").unsupported[0]


def test_a_dropped_window_is_caught(monkeypatch):
    """Mutant: the translation forgets local_window_size."""
    q, k, v, _ = _qkv(8, lq=6, lk=6)
    translate = ja._translate

    def no_window(a, options):
        kw = translate(a, options)
        kw.pop("local_window_size")
        return kw

    monkeypatch.setattr(ja, "_translate", no_window)
    verdict = ja.check_jax(q, k, v, dtype="float32", window=(1, 0))
    assert verdict.status == "FAIL"
    with pytest.raises(AttentionMismatch):
        ja.check_jax(q, k, v, dtype="float32", window=(1, 0), raise_on="mismatch")


def test_dropped_key_lengths_are_caught(monkeypatch):
    """Mutant: the translation forgets key_value_seq_lengths."""
    q, k, v, _ = _qkv(9)
    translate = ja._translate

    def no_lengths(a, options):
        kw = translate(a, options)
        kw.pop("key_value_seq_lengths")
        return kw

    monkeypatch.setattr(ja, "_translate", no_lengths)
    assert not ja.check_jax(q, k, v, dtype="float32", k_lengths=np.array([3, 7])).passed
