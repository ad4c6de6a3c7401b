"""Equivalences and properties of the attention variants, each with a broken variant it must catch."""

import numpy as np
import pytest
from hypothesis import given

import refattn
from refattn.attention import cache, loops, tiled
from refattn.attention import linear as linear_mod
from refattn.attention import multihead as mh_mod
from refattn.attention import position as position_mod
from refattn.testing.strategies import (
    STRUCTURAL_OPTIONS as STRUCTURE,
)
from refattn.testing.strategies import (
    Case,
    chunked_cases,
    decode_cases,
    linear_cases,
    multihead_cases,
    online_cases,
    rope_cases,
    sdpa_cases,
)
from tests.mutation import property_table

CLOSE = dict(rtol=1e-12, atol=1e-13)


def _drop(options, *names):
    return {k: v for k, v in options.items() if k not in names}


# ---- multi-head ------------------------------------------------------------------------------


def check_heads_equal_separate_sdpa_calls(case):
    x, p = case.inputs
    o = case.options
    hq, hk = o["num_heads"], o["num_kv_heads"]
    src = o.get("kv", x)
    dk, dv = p.w_q.shape[1] // hq, p.w_v.shape[1] // hk
    sdpa_opts = _drop(o, "num_heads", "num_kv_heads", "kv", "head_mask")
    y = 0.0 if p.b_o is None else p.b_o
    for h in range(hq):
        g = h // (hq // hk)

        def proj(t, w, b, cols):
            return t @ w[:, cols] + (0.0 if b is None else b[cols])

        qh = proj(x, p.w_q, p.b_q, slice(h * dk, (h + 1) * dk))[..., None, :, :]
        kh = proj(src, p.w_k, p.b_k, slice(g * dk, (g + 1) * dk))[..., None, :, :]
        vh = proj(src, p.w_v, p.b_v, slice(g * dv, (g + 1) * dv))[..., None, :, :]
        head_opts = {k: (v[..., :1, :, :] if k == "mask" else v) for k, v in sdpa_opts.items()}
        oh = refattn.sdpa(qh, kh, vh, **head_opts)[..., 0, :, :]
        if "head_mask" in o:
            oh = oh * o["head_mask"][h]
        y = y + oh @ p.w_o[h * dv : (h + 1) * dv]
    np.testing.assert_allclose(refattn.multihead_attention(x, p, **o), y, **CLOSE)


def check_loops_equal_vectorized_multihead(case):
    np.testing.assert_allclose(
        refattn.multihead_attention(*case.inputs, **case.options),
        loops.multihead_attention(*case.inputs, **case.options),
        **CLOSE,
    )


def test_single_head_identity_projections_equal_sdpa():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 4))
    eye = np.eye(4)
    y = refattn.multihead_attention(x, refattn.MHAParams(eye, eye, eye, eye), num_heads=1, causal=True)
    np.testing.assert_allclose(y, refattn.sdpa(x[:, None], x[:, None], x[:, None], causal=True)[:, 0], **CLOSE)


def test_num_kv_heads_equals_repeated_kv_heads():
    rng = np.random.default_rng(1)
    hq, hk, dk, dv, dm = 4, 2, 3, 2, 5
    x = rng.standard_normal((2, 3, dm))
    w_k, w_v = rng.standard_normal((dm, hk * dk)), rng.standard_normal((dm, hk * dv))
    p = refattn.MHAParams(rng.standard_normal((dm, hq * dk)), w_k, w_v, rng.standard_normal((hq * dv, dm)))
    heads = [h // 2 for h in range(hq)]

    def repeat(w, e):
        return np.concatenate([w[:, g * e : (g + 1) * e] for g in heads], axis=1)

    full = p._replace(w_k=repeat(w_k, dk), w_v=repeat(w_v, dv))
    np.testing.assert_allclose(
        refattn.multihead_attention(x, p, num_heads=hq, num_kv_heads=hk),
        refattn.multihead_attention(x, full, num_heads=hq),
        **CLOSE,
    )


# ---- tiled -----------------------------------------------------------------------------------


def _both(fn, case, **more):
    return fn(*case.inputs, return_lse=True, **_drop(case.options, "return_lse"), **more)


def check_online_equals_sdpa(case):
    extra = {k: case.options[k] for k in ("block_q", "block_k")}
    ref = _both(refattn.sdpa, Case(case.inputs, _drop(case.options, *extra)))
    for a, b in zip(_both(tiled.sdpa_online, case), ref):
        np.testing.assert_allclose(a, b, **CLOSE)


def check_chunked_equals_sdpa(case):
    ref = _both(refattn.sdpa, Case(case.inputs, _drop(case.options, "chunk_size")))
    for a, b in zip(_both(tiled.sdpa_chunked, case), ref):
        np.testing.assert_allclose(a, b, **CLOSE)


def check_combined_halves_equal_full(case):
    q, k, v = case.inputs
    o = _drop(case.options, "return_lse", "dropout_p", "dropout_mask", "sinks", *STRUCTURE)
    lk = k.shape[-2]
    split = lk // 2
    score = refattn.attention_weights(q, k, **_drop(o, "empty_rows")).shape
    parts = []
    for cols in (slice(0, split), slice(split, lk)):
        po = {n: np.broadcast_to(a, score)[..., cols] if n in ("mask", "bias") else a for n, a in o.items()}
        parts.append(refattn.sdpa(q, k[..., cols, :], v[..., cols, :], return_lse=True, **{**po, "empty_rows": "zero"}))
    outs = np.stack([np.broadcast_to(p[0], parts[0][0].shape) for p in parts])
    lses = np.stack([np.broadcast_to(p[1], parts[0][1].shape) for p in parts])
    out, lse = tiled.combine_partials(outs, lses)
    ref_out, ref_lse = refattn.sdpa(q, k, v, return_lse=True, **{**o, "empty_rows": "zero"})
    np.testing.assert_allclose(out, ref_out, **CLOSE)
    np.testing.assert_allclose(lse, ref_lse, **CLOSE)


def test_combine_partials_of_all_empty_rows_is_the_empty_result():
    out, lse = tiled.combine_partials(np.ones((2, 1, 3, 2)), np.full((2, 1, 3), -np.inf))
    assert (out == 0).all() and np.isneginf(lse).all()


# ---- sparse, linear, cache -----------------------------------------------------------------


@given(sdpa_cases())
def test_topk_with_k_at_least_lk_is_dense(case):
    q, k, v = case.inputs
    o = _drop(case.options, "return_lse")
    np.testing.assert_allclose(
        refattn.topk_attention(q, k, v, top_k=k.shape[-2], **o), refattn.sdpa(q, k, v, **o), **CLOSE
    )


def test_topk_ties_keep_the_lower_key_index():
    q = np.ones((1, 1, 1))
    k = np.ones((1, 4, 1))
    v = np.arange(4.0).reshape(1, 4, 1)
    assert refattn.topk_attention(q, k, v, top_k=2)[0, 0, 0] == 0.5  # keys 0 and 1


def test_local_mask_wider_than_twice_the_length_is_dense():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 6, 3)) for _ in range(3))
    np.testing.assert_array_equal(refattn.masks.local(6, 12), np.ones((6, 6), dtype=bool))
    np.testing.assert_allclose(refattn.sdpa(q, k, v, mask=refattn.masks.local(6, 12)), refattn.sdpa(q, k, v), **CLOSE)


def check_linear_equals_quadratic_form(case):
    q, k, v = case.inputs
    o = case.options
    g = q.shape[-3] // k.shape[-3]
    heads = [h // g for h in range(q.shape[-3])]
    phi = (
        (lambda x: np.where(x > 0, x + 1, np.exp(np.minimum(x, 0))))
        if o["feature_map"] == "elu+1"
        else (lambda x: np.maximum(x, 0))
    )
    a = np.einsum("...id,...jd->...ij", phi(q), phi(k[..., heads, :, :]))
    if o["causal"]:
        a = a * np.tril(np.ones(a.shape[-2:]))
    den = a.sum(axis=-1, keepdims=True) + o.get("eps", 1e-6)
    want = np.where(den == 0, 0.0, (a @ v[..., heads, :, :]) / np.where(den == 0, 1.0, den))
    np.testing.assert_allclose(refattn.linear_attention(q, k, v, **o), want, rtol=1e-11, atol=1e-12)


def check_decode_equals_sdpa_bottom_right(case):
    q, kc, vc = case.inputs
    o = case.options
    lens = o["cache_lengths"]
    out = cache.decode(q, kc, vc, **o)
    rest = _drop(o, "cache_lengths")
    for b, n in enumerate(lens):
        want = refattn.sdpa(q[b], kc[b, :, :n], vc[b, :, :n], align="bottom_right", **rest)
        np.testing.assert_allclose(out[b], want, **CLOSE)


def test_paged_gather_equals_the_dense_concatenation():
    rng = np.random.default_rng(3)
    pages = rng.standard_normal((5, 2, 3, 4))
    table = np.array([[4, 0, -1], [1, 2, 3]])
    dense, valid = cache.paged_gather(pages, table, [5, 9])
    np.testing.assert_array_equal(
        dense[0, :, :6], np.concatenate([pages[4], pages[0]], axis=1)[:, :6] * [[1]] * (np.arange(6) < 5)[None, :, None]
    )
    np.testing.assert_array_equal(dense[1], np.concatenate([pages[1], pages[2], pages[3]], axis=1))
    assert valid.sum(axis=1).tolist() == [5, 9] and (dense[0, :, 5:] == 0).all()


# ---- RoPE, ALiBi, sinusoidal ---------------------------------------------------------------


def check_rope_preserves_norms(case):
    (x,) = case.inputs
    np.testing.assert_allclose(
        np.linalg.norm(refattn.rope(x, **case.options), axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12, atol=1e-13
    )


def check_rope_scores_depend_on_offset_only(case):
    (x,) = case.inputs
    o = _drop(case.options, "positions")
    q, k = x[..., :1, :], x[..., -1:, :]
    shift = 7.0
    m, n = np.array([3.0]), np.array([1.0])
    a = np.sum(refattn.rope(q, m, **o) * refattn.rope(k, n, **o), axis=-1)
    b = np.sum(refattn.rope(q, m + shift, **o) * refattn.rope(k, n + shift, **o), axis=-1)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-11)


def check_rope_backward_is_the_inverse_rotation(case):
    (x,) = case.inputs
    y = refattn.rope(x, **case.options)
    np.testing.assert_allclose(refattn.rope_backward(y, x, **case.options).dx, x, rtol=1e-12, atol=1e-13)


def test_rope_styles_pair_the_documented_dims():
    x = np.zeros((1, 4))
    x[0, 0] = 1.0
    theta = 1.0  # position 1, frequency base^0 = 1
    half = refattn.rope(x, [1.0], style="half")
    inter = refattn.rope(x, [1.0], style="interleaved")
    np.testing.assert_allclose(half[0], [np.cos(theta), 0, np.sin(theta), 0], rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(inter[0], [np.cos(theta), np.sin(theta), 0, 0], rtol=1e-15, atol=1e-15)
    np.testing.assert_array_equal(refattn.rope(np.ones((2, 6)), rotary_dim=4)[:, 4:], 1.0)


def _press_reference_slopes(n):
    """Press et al.'s recursion (the published get_slopes), written independently."""
    import math

    def p2(m):
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start**i for i in range(m)]

    if math.log2(n).is_integer():
        return p2(n)
    c = 2 ** math.floor(math.log2(n))
    return p2(c) + _press_reference_slopes(2 * c)[0::2][: n - c]


@pytest.mark.parametrize("n", [1, 2, 3, 6, 8, 12, 16, 20])
def test_alibi_slopes_match_the_reference_recursion(n):
    # ours are exact powers of two; the recursion's repeated products are off by a few ulps
    np.testing.assert_allclose(refattn.alibi_slopes(n), _press_reference_slopes(n), rtol=4e-15)
    np.testing.assert_array_equal(refattn.alibi_slopes(8), 2.0 ** -np.arange(1.0, 9.0))


def test_alibi_bias_styles_and_alignment():
    s = np.array([0.5])
    np.testing.assert_array_equal(
        refattn.alibi_bias(s, 2, 3, align="bottom_right")[0], -0.5 * np.array([[1, 0, 1], [2, 1, 0]])
    )
    np.testing.assert_array_equal(
        refattn.alibi_bias(s, 2, 3, style="signed", align="top_left")[0], 0.5 * np.array([[0, 1, 2], [-1, 0, 1]])
    )
    with pytest.raises(refattn.RefAttnError, match="align"):
        refattn.alibi_bias(s, 2, 3)


def test_sinusoidal_positions_formula():
    pe = refattn.sinusoidal_positions(5, 7)
    p, i = 3, 2
    assert pe[p, 2 * i] == pytest.approx(np.sin(p / 10000 ** (2 * i / 7)), rel=1e-15)
    assert pe[p, 2 * i + 1] == pytest.approx(np.cos(p / 10000 ** (2 * i / 7)), rel=1e-15)
    assert pe.shape == (5, 7) and pe[0, 0] == 0 and pe[0, 1] == 1


def test_relative_attention_matches_its_definition_by_loops():
    rng = np.random.default_rng(4)
    q, k, v = rng.standard_normal((1, 3, 2)), rng.standard_normal((1, 4, 2)), rng.standard_normal((1, 4, 3))
    m = 1
    rk, rv = rng.standard_normal((3, 2)), rng.standard_normal((3, 3))
    out = refattn.relative_attention(q, k, v, rk, rv, max_distance=m)
    for i in range(3):
        idx = [min(max(j - i, -m), m) + m for j in range(4)]
        s = np.array([(q[0, i] @ k[0, j] + q[0, i] @ rk[idx[j]]) / np.sqrt(2) for j in range(4)])
        p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        want = sum(p[j] * (v[0, j] + rv[idx[j]]) for j in range(4))
        np.testing.assert_allclose(out[0, i], want, rtol=1e-13)


def test_allocation_gate_of_one_is_plain_sdpa():
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 2))
    gate = refattn.AllocationGate(rng.standard_normal((4, 3)), np.zeros(3), np.zeros(3), np.array(50.0))
    np.testing.assert_allclose(refattn.allocation_attention(q, k, v, gate), refattn.sdpa(q, k, v), rtol=1e-12)
    half = gate._replace(b2=np.array(0.0))  # g = 1/2 halves the scale
    np.testing.assert_allclose(
        refattn.allocation_attention(q, k, v, half), refattn.sdpa(q, k, v, scale=0.25), rtol=1e-12
    )


# ---- the property table with its mutants -----------------------------------------------------

square_decode = decode_cases()
PROPERTIES = [
    (check_heads_equal_separate_sdpa_calls, multihead_cases(), "heads_split_in_the_wrong_order"),
    (check_loops_equal_vectorized_multihead, multihead_cases(), "output_projection_of_ungated_heads"),
    (check_online_equals_sdpa, online_cases(), "online_without_rescaling"),
    (check_chunked_equals_sdpa, chunked_cases(), "chunks_aligned_locally"),
    (
        check_combined_halves_equal_full,
        sdpa_cases().filter(lambda c: c.inputs[1].shape[-2] >= 2),
        "combine_without_renormalisation",
    ),
    (check_linear_equals_quadratic_form, linear_cases(), "exclusive_prefix_sum"),
    (check_decode_equals_sdpa_bottom_right, square_decode, "decode_aligned_top_left"),
    (check_rope_preserves_norms, rope_cases(), "rope_without_the_sine_term"),
    (check_rope_scores_depend_on_offset_only, rope_cases(), "rope_angle_squared"),
    (check_rope_backward_is_the_inverse_rotation, rope_cases(), "rope_backward_not_transposed"),
]


def _rope_mutant(change):
    def patch(mp):
        real = position_mod._rope_setup

        def mutant(x, positions, base, style, rotary_dim):
            return change(*real(x, positions, base, style, rotary_dim))

        mp.setattr(position_mod, "_rope_setup", mutant)

    return patch


def _online_without_rescaling(mp):
    def run(q, k, v, *, block_q, block_k, return_lse=False, **options):  # the running sum is never rescaled
        a = tiled._sdpa.validate(q, k, v, **options)
        tiles = tiled._Tiles(a)
        out = np.zeros(a.score_shape[:-1] + (a.v.shape[-1],))
        lse = np.zeros(a.score_shape[:-1])
        for i0, i1 in tiled._blocks(a.q.shape[-2], block_q):
            rows = a.score_shape[:-2] + (i1 - i0,)
            m = np.full(rows, -np.inf) if tiles.sink is None else tiles.sink[..., i0:i1].copy()
            l_ = np.where(np.isfinite(m), 1.0, 0.0)
            acc = np.zeros(rows + (a.v.shape[-1],))
            for j0, j1 in tiled._blocks(a.k.shape[-2], block_k):
                s, _ = tiles.scores(i0, i1, j0, j1)
                m = np.maximum(m, s.max(axis=-1))
                ms = np.where(np.isneginf(m), 0.0, m)
                p = np.exp(s - ms[..., None])
                l_ = l_ + p.sum(axis=-1)
                acc = acc + tiles.keep_tile(p, i0, i1, j0, j1) @ tiles.ve[..., j0:j1, :]
            e = l_ == 0
            out[..., i0:i1, :] = acc / np.where(e, 1.0, l_)[..., None]
            with np.errstate(divide="ignore"):
                lse[..., i0:i1] = np.where(e, -np.inf, m + np.log(np.where(e, 1.0, l_)))
        return (out, lse) if return_lse else out

    mp.setattr(tiled, "sdpa_online", run)


def _chunks_aligned_locally(mp):
    """Each chunk gets causal/window relative to its own first row instead of the global one."""
    real = tiled._chunk_options

    def mutant(a, o, i0, i1):
        structure = {k: o[k] for k in ("causal", "window") if k in o}
        plain_opts = _drop(o, *STRUCTURE, "chunk_size")
        plain = tiled._sdpa.validate(a.q, a.k, a.v, **plain_opts)
        return {**real(plain, plain_opts, i0, i1), **structure, "align": o.get("align") or "top_left"}

    mp.setattr(tiled, "_chunk_options", mutant)


MUTANTS = {
    "heads_split_in_the_wrong_order": lambda mp: mp.setattr(
        mh_mod,
        "split_heads",
        lambda t, h: np.swapaxes(t.reshape(t.shape[:-1] + (t.shape[-1] // h, h)), -1, -2).swapaxes(-2, -3),
    ),
    "output_projection_of_ungated_heads": lambda mp: (
        mp.setattr(
            mh_mod,
            "multihead_attention",
            (lambda real: lambda x, params, **o: real(x, params, **_drop(o, "head_mask")))(mh_mod.multihead_attention),
        )
        or mp.setattr(refattn, "multihead_attention", mh_mod.multihead_attention)
    ),
    "online_without_rescaling": _online_without_rescaling,
    "chunks_aligned_locally": _chunks_aligned_locally,
    "combine_without_renormalisation": lambda mp: mp.setattr(
        tiled,
        "_combine_setup",
        (lambda real: lambda outs, lses: (lambda r: (r[0], r[1], np.exp(r[1]), r[3]))(real(outs, lses)))(
            tiled._combine_setup
        ),
    ),
    "exclusive_prefix_sum": lambda mp: mp.setattr(
        linear_mod, "prefix_sum", lambda x, axis: np.cumsum(x, axis=axis) - x
    ),
    "decode_aligned_top_left": lambda mp: mp.setattr(cache, "DECODE_ALIGN", "top_left"),
    "rope_without_the_sine_term": _rope_mutant(lambda x, r, cos, sin: (x, r, cos, 0 * sin)),
    "rope_angle_squared": _rope_mutant(
        lambda x, r, cos, sin: (x, r, np.cos(np.arccos(cos) ** 2), np.sin(np.arccos(cos) ** 2))
    ),
    "rope_backward_not_transposed": lambda mp: (
        mp.setattr(
            position_mod,
            "rope_backward",
            lambda dy, x, positions=None, **o: position_mod.RopeGrads(position_mod.rope(dy, positions, **o)),
        )
        or mp.setattr(refattn, "rope_backward", position_mod.rope_backward)
    ),
}

test_property, test_property_catches_its_mutant = property_table(PROPERTIES, MUTANTS)


def test_multihead_blames_the_input_whose_last_dim_disagrees_with_the_weights():
    rng = np.random.default_rng(11)
    p = refattn.MHAParams(*(rng.standard_normal(s) for s in ((16, 8), (10, 8), (10, 8), (8, 16))))
    x, kv = rng.standard_normal((2, 5, 12)), rng.standard_normal((2, 7, 10))
    before = x.copy()
    with pytest.raises(refattn.RefAttnError, match=r"^x: expected last dim d_model = 16 \(the rows of params.w_q") as e:
        refattn.multihead_attention(x, p, num_heads=2, kv=kv)
    assert str(e.value).endswith("got last dim 12")
    np.testing.assert_array_equal(x, before)
    x_ok, kv_bad = rng.standard_normal((2, 5, 16)), rng.standard_normal((2, 7, 9))
    with pytest.raises(refattn.RefAttnError, match=r"^kv: expected last dim d_kv = 10 \(the rows of params.w_k") as e:
        refattn.multihead_attention(x_ok, p, num_heads=2, kv=kv_bad)
    assert str(e.value).endswith("got last dim 9")
    with pytest.raises(refattn.RefAttnError, match=r"^x: expected last dim d_model = 16"):
        refattn.multihead_attention_backward(rng.standard_normal((2, 5, 16)), x, p, num_heads=2, kv=kv)
