"""KV cache (issue 13): ONNX's past/present append, empty sequences in decode, ONNX's short masks.

The ONNX semantics are written out independently below (:func:`onnx_attention`, from the Attention-24
operator text and its reference ``onnx/reference/ops/op_attention.py``) and compared with refattn's
``append`` + ``extend_mask`` + ``sdpa`` / ``decode``.
"""

import numpy as np
import pytest
from hypothesis import strategies as st

import refattn
from refattn.attention import cache
from refattn.testing import gradcheck
from refattn.testing.strategies import append_cases, decode_ragged_cases, extend_mask_cases
from tests.mutation import property_table

CLOSE = dict(rtol=1e-13, atol=1e-14)


def onnx_attention(q, k, v, *, past_k=None, past_v=None, attn_mask=None, is_causal=False):
    """ONNX Attention for 4-D inputs, step by step as the operator defines it: ``present = concat(past,
    new)`` on axis 2; an ``attn_mask`` shorter than the total length padded at its end with False (bool)
    or ``-inf`` (float); a bool mask becomes 0 / ``-inf``; ``is_causal`` allows ``j <= i + past_len``;
    kv heads repeated for GQA; softmax(scale q kᵀ + bias) v with scale 1/sqrt(D).  Returns
    ``(out, present_k, present_v)``."""
    present_k = k if past_k is None else np.concatenate([past_k, k], axis=2)
    present_v = v if past_v is None else np.concatenate([past_v, v], axis=2)
    lq, total = q.shape[2], present_k.shape[2]
    bias = np.zeros((lq, total))
    if attn_mask is not None:
        missing = total - attn_mask.shape[-1]
        if missing > 0:
            fill = np.full(attn_mask.shape[:-1] + (missing,), False if attn_mask.dtype == bool else -np.inf)
            attn_mask = np.concatenate([attn_mask, fill.astype(attn_mask.dtype)], axis=-1)
        bias = bias + (np.where(attn_mask, 0.0, -np.inf) if attn_mask.dtype == bool else attn_mask)
    if is_causal:
        past = 0 if past_k is None else past_k.shape[2]
        i, j = np.arange(lq)[:, None], np.arange(total)[None, :]
        bias = bias + np.where(j <= i + past, 0.0, -np.inf)
    groups = q.shape[1] // present_k.shape[1]
    kk, vv = np.repeat(present_k, groups, axis=1), np.repeat(present_v, groups, axis=1)
    s = q @ np.swapaxes(kk, -1, -2) / np.sqrt(q.shape[-1]) + bias
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)) @ vv, present_k, present_v


def _qkv(rng, b=2, hq=4, hk=2, lq=3, lp=4, d=3, dv=2):
    q = rng.standard_normal((b, hq, lq, d))
    past = rng.standard_normal((b, hk, lp, d)), rng.standard_normal((b, hk, lp, dv))
    new = rng.standard_normal((b, hk, lq, d)), rng.standard_normal((b, hk, lq, dv))
    return q, past, new


# ---- append ---------------------------------------------------------------------------------------


def test_append_and_a_short_mask_reproduce_onnx_attention():
    """ONNX with past_key/past_value, a bool or float attn_mask of fewer columns than past + new, causal
    or not == sdpa on append's present keys with extend_mask's mask (bias), the causal band offset by
    the past length (ONNX's offset; bottom-right here, Lq = Ln) -- and == decode on the present cache."""
    rng = np.random.default_rng(0)
    q, (pk, pv), (k, v) = _qkv(rng)
    present_k, present_v = cache.append(pk, pv, k, v)
    total = present_k.shape[2]  # 4 past + 3 new
    bool_mask = rng.random((2, 1, 3, 5)) > 0.3
    bool_mask[..., 0] = True  # every row keeps a key (ONNX's softmax of an empty row is NaN)
    float_mask = np.where(rng.random((3, 5)) > 0.3, 0.4 * rng.standard_normal((3, 5)), -np.inf)
    float_mask[:, 0] = 0.1
    for is_causal in (False, True):
        for attn_mask in (None, bool_mask, float_mask):
            want, want_k, want_v = onnx_attention(
                q, k, v, past_k=pk, past_v=pv, attn_mask=attn_mask, is_causal=is_causal
            )
            np.testing.assert_array_equal(present_k, want_k)
            np.testing.assert_array_equal(present_v, want_v)
            options = {"causal": is_causal, "align": "bottom_right" if is_causal else None}
            if attn_mask is not None:
                name = "mask" if attn_mask.dtype == bool else "bias"
                options[name] = cache.extend_mask(attn_mask, total)
            got = refattn.sdpa(q, present_k, present_v, **options)
            np.testing.assert_allclose(got, want, **CLOSE, err_msg=f"causal={is_causal} {options.keys()}")
            if is_causal:  # ONNX's offset is the past length: align=Lp
                np.testing.assert_allclose(
                    refattn.sdpa(q, present_k, present_v, **{**options, "align": 4}), want, **CLOSE
                )
            short = {n: attn_mask for n in ("mask", "bias") if n in options}  # decode pads them itself
            decoded = cache.decode(q, present_k, present_v, cache_lengths=[total, total], causal=is_causal, **short)
            np.testing.assert_allclose(decoded, want, **CLOSE)


def test_append_without_or_with_an_empty_past_and_empty_new():
    rng = np.random.default_rng(1)
    k, v = rng.standard_normal((2, 1, 3, 4)), rng.standard_normal((2, 1, 3, 2))
    present_k, present_v = cache.append(None, None, k, v)
    np.testing.assert_array_equal(present_k, k)
    assert present_k is not k and not np.shares_memory(present_k, k) and present_v.dtype == np.float64
    empty_k, empty_v = np.zeros((2, 1, 0, 4)), np.zeros((2, 1, 0, 2))
    np.testing.assert_array_equal(cache.append(empty_k, empty_v, k, v)[1], v)
    np.testing.assert_array_equal(cache.append(k, v, empty_k, empty_v)[0], k)
    present_k, _ = cache.append(k.astype(np.float32), v, k[:, :, :1], v[:, :, :1])
    assert present_k.dtype == np.float64 and present_k.shape == (2, 1, 4, 4)
    present_k[0, 0, 0, 0] = 99.0
    assert k[0, 0, 0, 0] != 99.0  # a new array: the inputs never change


def test_append_backward_splits_the_cotangents_and_passes_gradcheck():
    rng = np.random.default_rng(2)
    _, (pk, pv), (k, v) = _qkv(rng, lp=2)
    d_k, d_v = rng.standard_normal((2, 2, 5, 3)), rng.standard_normal((2, 2, 5, 2))  # random, never all ones
    g = cache.append_backward(d_k, pk, pv, k, v, d_present_v=d_v)
    np.testing.assert_array_equal(g.dpast_k, d_k[:, :, :2])
    np.testing.assert_array_equal(g.dk, d_k[:, :, 2:])
    np.testing.assert_array_equal(g.dpast_v, d_v[:, :, :2])
    np.testing.assert_array_equal(g.dv, d_v[:, :, 2:])
    without_v = cache.append_backward(d_k, pk, pv, k, v)
    np.testing.assert_array_equal(without_v.dv, 0.0)
    none = cache.append_backward(d_k[:, :, 2:], None, None, k, v)
    assert none.dpast_k is None and none.dpast_v is None
    assert gradcheck(cache.append, cache.append_backward, (pk, pv, k, v)).passed


def test_append_refuses_shapes_that_disagree_with_clear_messages():
    k, v = np.zeros((2, 3, 4, 5)), np.zeros((2, 3, 4, 6))
    with pytest.raises(refattn.RefAttnError, match=r"past_v: expected an array since past_k is given"):
        cache.append(k, None, k, v)
    with pytest.raises(refattn.RefAttnError, match=r"past_k: expected shape \(2, 3, Lp, 5\) .* got \(2, 3, 1, 4\)"):
        cache.append(np.zeros((2, 3, 1, 4)), np.zeros((2, 3, 1, 6)), k, v)
    with pytest.raises(refattn.RefAttnError, match=r"past_v: expected shape \(2, 3, Lp, 6\) .* got \(2, 2, 1, 6\)"):
        cache.append(np.zeros((2, 3, 1, 5)), np.zeros((2, 2, 1, 6)), k, v)
    with pytest.raises(refattn.RefAttnError, match=r"past_v: expected the past length Lp = 1 of past_k"):
        cache.append(np.zeros((2, 3, 1, 5)), np.zeros((2, 3, 2, 6)), k, v)
    with pytest.raises(
        refattn.RefAttnError, match=r"v: expected shape \(B, Hk, Ln, Dv\) with \(B, Hk, Ln\) = \(2, 3, 4\)"
    ):
        cache.append(None, None, k, np.zeros((2, 3, 3, 6)))
    with pytest.raises(refattn.RefAttnError, match=r"k: expected a \(B, Hk, Ln, D\) array, got shape \(3, 4, 5\)"):
        cache.append(None, None, k[0], v)
    with pytest.raises(refattn.RefAttnError, match=r"d_present_k: expected shape \(2, 3, 5, 5\)"):
        cache.append_backward(np.zeros((2, 3, 4, 5)), np.zeros((2, 3, 1, 5)), np.zeros((2, 3, 1, 6)), k, v)


# ---- extend_mask ----------------------------------------------------------------------------------


def test_extend_mask_pads_the_missing_columns_as_onnx():
    m = np.array([[True, False], [False, True]])
    np.testing.assert_array_equal(cache.extend_mask(m, 4), [[True, False, False, False], [False, True, False, False]])
    f = np.array([[0.5, -np.inf]])
    np.testing.assert_array_equal(cache.extend_mask(f, 3), [[0.5, -np.inf, -np.inf]])
    assert cache.extend_mask(f.astype(np.float32), 3).dtype == np.float64
    same = cache.extend_mask(m, 2)
    np.testing.assert_array_equal(same, m)
    assert same is not m
    # ONNX pads a one-column mask too (no broadcasting): only key 0 stays
    np.testing.assert_array_equal(cache.extend_mask(np.array([[True]]), 3), [[True, False, False]])


def test_extend_mask_refusals_are_named():
    with pytest.raises(refattn.RefAttnError, match=r"total_length: expected at least the 3 columns of mask \(1, 3\)"):
        cache.extend_mask(np.ones((1, 3), dtype=bool), 2)
    with pytest.raises(refattn.RefAttnTypeError, match="mask: expected a bool mask .* or a float additive mask"):
        cache.extend_mask(np.ones((1, 3), dtype=np.int64), 4)
    with pytest.raises(refattn.RefAttnError, match=r"mask: expected at least 1 dimension"):
        cache.extend_mask(np.array(True), 4)
    with pytest.raises(refattn.RefAttnError, match="mask: expected finite values or -inf"):
        cache.extend_mask(np.array([np.nan]), 4)
    with pytest.raises(refattn.RefAttnTypeError, match="mask: a bool mask has no gradient"):
        cache.extend_mask_backward(np.zeros((1, 4)), np.ones((1, 3), dtype=bool), 4)


def test_extend_mask_backward_keeps_the_mask_columns():
    rng = np.random.default_rng(3)
    f = rng.standard_normal((2, 3))
    d = rng.standard_normal((2, 5))
    np.testing.assert_array_equal(cache.extend_mask_backward(d, f, 5).dmask, d[:, :3])
    assert gradcheck(cache.extend_mask, cache.extend_mask_backward, (f, 5)).passed


# ---- decode: empty sequences and short masks --------------------------------------------------------


@pytest.mark.parametrize("policy", ["zero", "nan", "uniform"])
def test_a_zero_length_gives_zero_rows_and_neg_inf_lse_whatever_empty_rows(policy):
    rng = np.random.default_rng(4)
    q, kc, vc = rng.standard_normal((2, 2, 3, 4)), rng.standard_normal((2, 1, 5, 4)), rng.standard_normal((2, 1, 5, 2))
    out, lse = cache.decode(q, kc, vc, cache_lengths=[0, 4], causal=True, empty_rows=policy, return_lse=True)
    np.testing.assert_array_equal(out[0], 0.0)
    assert np.isneginf(lse[0]).all()
    want, want_lse = refattn.sdpa(
        q[1], kc[1, :, :4], vc[1, :, :4], causal=True, align="bottom_right", empty_rows=policy, return_lse=True
    )
    np.testing.assert_allclose(out[1], want, **CLOSE)
    np.testing.assert_allclose(lse[1], want_lse, **CLOSE)
    d_out = rng.standard_normal(out.shape)
    g = cache.decode_backward(d_out, q, kc, vc, cache_lengths=[0, 4], causal=True, empty_rows=policy)
    np.testing.assert_array_equal(g.dq[0], 0.0)
    np.testing.assert_array_equal(g.dk_cache[0], 0.0)
    np.testing.assert_array_equal(g.dv_cache[0], 0.0)


def test_a_zero_length_with_sinks_has_the_sink_as_its_whole_denominator():
    """No key but a sink: out 0, lse = the sink's logit (sdpa's with every key masked), d lse / d sink = 1."""
    rng = np.random.default_rng(5)
    q, kc, vc = rng.standard_normal((1, 2, 2, 3)), rng.standard_normal((1, 2, 3, 3)), rng.standard_normal((1, 2, 3, 2))
    sinks = np.array([0.3, -np.inf])
    out, lse = cache.decode(q, kc, vc, cache_lengths=[0], sinks=sinks, return_lse=True)
    np.testing.assert_array_equal(out, 0.0)
    np.testing.assert_array_equal(lse[0], [[0.3, 0.3], [-np.inf, -np.inf]])
    masked = refattn.sdpa(q[0], kc[0], vc[0], sinks=sinks, mask=np.zeros(3, dtype=bool), return_lse=True)[1]
    np.testing.assert_array_equal(lse[0], masked)
    d_lse = rng.standard_normal(lse.shape)
    g = cache.decode_backward(np.zeros(out.shape), q, kc, vc, cache_lengths=[0], sinks=sinks, d_lse=d_lse)
    np.testing.assert_allclose(g.dsinks, [d_lse[0, 0].sum(), 0.0], rtol=1e-15)


def test_decode_gradcheck_with_zero_lengths_and_a_short_bias():
    rng = np.random.default_rng(6)
    q, kc, vc = rng.standard_normal((3, 2, 2, 3)), rng.standard_normal((3, 1, 5, 3)), rng.standard_normal((3, 1, 5, 2))
    bias = rng.standard_normal((3, 1, 2, 3))  # 3 < Lc = 5 columns: padded with -inf
    options = {"cache_lengths": np.array([0, 5, 2]), "bias": bias, "sinks": rng.standard_normal(2), "causal": True}
    assert gradcheck(cache.decode, cache.decode_backward, (q, kc, vc), options={**options, "return_lse": True}).passed
    g = cache.decode_backward(rng.standard_normal((3, 2, 2, 2)), q, kc, vc, **options)
    assert g.dbias.shape == bias.shape
    np.testing.assert_array_equal(g.dbias[0], 0.0)


def test_a_one_column_mask_still_broadcasts_in_decode():
    """refattn's rule (a last dim of 1 broadcasts) is kept in decode; ONNX's one-column padding is
    extend_mask's, applied explicitly."""
    rng = np.random.default_rng(7)
    q, kc, vc = rng.standard_normal((1, 1, 2, 3)), rng.standard_normal((1, 1, 4, 3)), rng.standard_normal((1, 1, 4, 2))
    one = np.array([True, False])[:, None]  # (Lq, 1): query 1 sees nothing
    out = cache.decode(q, kc, vc, cache_lengths=[4], mask=one)
    np.testing.assert_allclose(out[0, :, :1], refattn.sdpa(q[0, :, :1], kc[0], vc[0]), **CLOSE)
    np.testing.assert_array_equal(out[0, 0, 1], 0.0)
    padded = cache.decode(q, kc, vc, cache_lengths=[4], mask=cache.extend_mask(one, 4))
    np.testing.assert_allclose(padded[0, 0, 0], vc[0, 0, 0], **CLOSE)  # only key 0


# ---- properties and their mutants -----------------------------------------------------------------


def _padded(x, lc, fill):
    """``x (..., m)`` with ``lc - m`` columns of ``fill`` appended (the test's own padding)."""
    x = np.asarray(x)
    if x.shape[-1] in (1, lc):
        return x
    return np.concatenate([x, np.full(x.shape[:-1] + (lc - x.shape[-1],), fill, dtype=x.dtype)], axis=-1)


def check_ragged_decode_is_sdpa_per_sequence(case):
    """A sequence of length 0 gives zero rows and lse -inf (the sinks' logits with sinks) under every
    policy; the others are sdpa on their prefix with the short mask/bias padded by masked columns."""
    q, kc, vc = case.inputs
    o = dict(case.options)
    lens = o.pop("cache_lengths")
    out, lse = cache.decode(q, kc, vc, cache_lengths=lens, return_lse=True, **o)
    lc = kc.shape[2]
    full = {}
    if "mask" in o:
        full["mask"] = np.broadcast_to(_padded(o.pop("mask"), lc, False), q.shape[:3] + (lc,))
    if "bias" in o:
        full["bias"] = np.broadcast_to(_padded(o.pop("bias"), lc, -np.inf), q.shape[:3] + (lc,))
    for b, n in enumerate(lens):
        if n == 0:
            np.testing.assert_array_equal(out[b], 0.0)
            sink = np.full(q.shape[1], -np.inf) if "sinks" not in o else np.asarray(o["sinks"], dtype=float)
            np.testing.assert_array_equal(lse[b], np.broadcast_to(sink[:, None], lse[b].shape))
            continue
        per = {name: x[b, ..., :n] for name, x in full.items()}
        want, want_lse = refattn.sdpa(
            q[b], kc[b, :, :n], vc[b, :, :n], align="bottom_right", return_lse=True, **per, **o
        )
        np.testing.assert_allclose(out[b], want, **CLOSE)
        np.testing.assert_allclose(lse[b], want_lse, **CLOSE)


def _zero_length_follows_empty_rows(mp):
    """Mutant: a sequence without keys treated as an empty row, NaN under empty_rows="nan"."""
    real = cache._no_keys

    def with_policy(a, o):
        out, lse = real(a, o)
        return (np.full(out.shape, np.nan) if o["empty_rows"] == "nan" else out), lse

    mp.setattr(cache, "_no_keys", with_policy)


def _missing_columns_attended(mp):
    """Mutant: the short mask's missing columns padded with True / 0 (the keys attended)."""
    real = cache._extend

    def attended(mask, total_length, name, kind=None):
        out = real(mask, total_length, name, kind)
        if out is mask:
            return out
        out = out.copy()
        out[..., np.shape(mask)[-1] :] = True if out.dtype == bool else 0.0
        return out

    mp.setattr(cache, "_extend", attended)


def check_append_is_onnx_concatenation(case):
    """present = concat(past, new) along axis 2 (the new positions last), float64, a new array; its
    backward splits the cotangent at Lp."""
    pk, pv, k, v = case.inputs
    present_k, present_v = cache.append(*case.inputs)
    want_k = k if pk is None else np.concatenate([pk, k], axis=2)
    want_v = v if pv is None else np.concatenate([pv, v], axis=2)
    np.testing.assert_array_equal(present_k, want_k)
    np.testing.assert_array_equal(present_v, want_v)
    assert present_k.dtype == present_v.dtype == np.float64
    assert not any(np.shares_memory(present_k, x) for x in (pk, k) if x is not None)
    d = np.random.default_rng(present_k.size).standard_normal(present_k.shape)
    g = cache.append_backward(d, *case.inputs)
    lp = 0 if pk is None else pk.shape[2]
    np.testing.assert_array_equal(g.dk, d[:, :, lp:])
    if pk is not None:
        np.testing.assert_array_equal(g.dpast_k, d[:, :, :lp])


def _new_before_past(mp):
    """Mutant: the new keys/values placed before the past ones."""

    def swapped(past_k, past_v, k, v):
        if past_k is None:
            return cache.as_float(k, "k"), cache.as_float(v, "v")
        return np.concatenate((k, past_k), axis=2), np.concatenate((v, past_v), axis=2)

    mp.setattr(cache, "append", swapped)


def check_extend_mask_masks_the_missing_columns(case):
    """The first m columns are the mask's, the others False (bool) or -inf (float)."""
    mask, total = case.inputs
    out = cache.extend_mask(mask, total)
    m = mask.shape[-1]
    assert out.shape == mask.shape[:-1] + (total,)
    np.testing.assert_array_equal(out[..., :m], mask)
    np.testing.assert_array_equal(out[..., m:], False if mask.dtype == bool else -np.inf)


def _padded_in_front(mp):
    """Mutant: the padding put before the mask's columns."""
    real = cache._extend

    def front(mask, total_length, name, kind=None):
        out = real(mask, total_length, name, kind)
        m = np.shape(mask)[-1]
        return np.concatenate([out[..., m:], out[..., :m]], axis=-1)

    mp.setattr(cache, "_extend", front)


_masks = st.one_of(extend_mask_cases(), extend_mask_cases(additive=True))
PROPERTIES = [
    (
        check_ragged_decode_is_sdpa_per_sequence,
        decode_ragged_cases(),
        ("zero_length_follows_empty_rows", "missing_columns_attended"),
    ),
    (check_append_is_onnx_concatenation, append_cases(), "new_before_past"),
    (check_extend_mask_masks_the_missing_columns, _masks, "padded_in_front"),
]
MUTANTS = {
    "zero_length_follows_empty_rows": _zero_length_follows_empty_rows,
    "missing_columns_attended": _missing_columns_attended,
    "new_before_past": _new_before_past,
    "padded_in_front": _padded_in_front,
}
test_property, test_property_catches_its_mutant = property_table(PROPERTIES, MUTANTS)
