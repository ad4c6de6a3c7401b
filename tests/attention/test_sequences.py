"""Per-sequence lengths and starts, integer and per-sequence alignment, negative and int windows,
chunks, sink tokens and the logits at each stage (``specs/sdpa.md``, "Sequences, alignment and
structure"), each property with the broken variant it must catch.

The peers' own mask constructors are transcribed to NumPy here, line for line, as independent
arbiters: flash-attn's ``hopper/test_util.py`` ``construct_local_mask`` and ``construct_chunk_mask``
(FA3: ``key_leftpad``, ``sink_token_length``, ``attention_chunk``, padding masks that set ``sk``/``sq``
per sequence) and its ``attention_ref``'s zeroing of padded query rows.
"""

import dataclasses
import re

import numpy as np
from hypothesis import strategies as st

import refattn
from refattn import masks as masks_mod
from refattn.attention import loops
from refattn.attention import sdpa as sdpa_mod
from refattn.testing.strategies import Case
from tests.mutation import property_table

CLOSE = dict(rtol=1e-12, atol=1e-13)


# ---- cases: padded batches of a few sequences -----------------------------------------------------


@st.composite
def padded_batches(draw, *, structure=True):
    """``Case((q (B, H, Lq, D), k, v), options)`` with per-sequence ``q_lengths``, ``k_starts``,
    ``k_lengths`` (B in 1..3), and, when ``structure``, causal / window (sides -3..4 or None) / chunk /
    sink tokens with a bottom-right, top-left or int alignment."""
    b, h = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    lq, lk, d = draw(st.integers(1, 6)), draw(st.integers(1, 7)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((b, h, n, d)) for n in (lq, lk, lk))
    starts = np.array([draw(st.integers(0, lk)) for _ in range(b)])
    opts = {
        "q_lengths": np.array([draw(st.integers(0, lq)) for _ in range(b)]),
        "k_starts": starts,
        "k_lengths": np.array([draw(st.integers(0, lk - s)) for s in starts]),
        "empty_rows": draw(st.sampled_from(["zero", "nan", "uniform"])),
        "align": draw(st.one_of(st.sampled_from(["bottom_right", "top_left"]), st.integers(-4, 4))),
    }
    if structure:
        if draw(st.booleans()):
            opts["causal"] = True
        if draw(st.booleans()):
            side = st.one_of(st.none(), st.integers(-3, 4))
            opts["window"] = draw(st.one_of(st.tuples(side, side), st.integers(0, 3)))
            opts["sink_tokens"] = draw(st.integers(0, 3))
        if draw(st.booleans()):
            opts["chunk"] = draw(st.integers(1, 4))
    if draw(st.booleans()):
        opts["sinks"] = rng.standard_normal(h)
    return Case((q, k, v), opts)


def _offset(align, q_length, k_length):
    if align == "bottom_right":
        return k_length - q_length
    return 0 if align == "top_left" else int(align)


# ---- the peers' constructors, transcribed -----------------------------------------------------------


def fa3_local_mask(seqlen_q, seqlen_k, window_size, sink_token_length, sq, sk, key_leftpad):
    """flash-attn ``hopper/test_util.py`` ``construct_local_mask`` for one sequence (True = masked):
    ``sk``/``sq`` the real lengths (``key_padding_mask.sum(-1)``), ``col_idx`` shifted by the left
    padding (``2**32`` before it); ``window_size`` sides None = unbounded (FA4's convention)."""
    row_idx = np.arange(seqlen_q)[:, None]
    col_idx = np.arange(seqlen_k)
    col_idx = np.where(col_idx >= key_leftpad, col_idx - key_leftpad, 2**32)
    if window_size[0] is None:
        return col_idx > row_idx + sk - sq + window_size[1]
    local_mask_left = (
        col_idx > sk if window_size[1] is None else col_idx > np.minimum(row_idx + sk - sq + window_size[1], sk)
    )
    return np.logical_or(
        local_mask_left,
        np.logical_and(col_idx < row_idx + sk - sq - window_size[0], col_idx >= sink_token_length),
    )


def fa3_chunk_mask(seqlen_q, seqlen_k, attention_chunk, sq, sk, key_leftpad):
    """flash-attn ``hopper/test_util.py`` ``construct_chunk_mask`` for one sequence (True = masked)."""
    row_idx = np.arange(seqlen_q)[:, None]
    col_idx = np.arange(seqlen_k)
    col_idx = np.where(col_idx >= key_leftpad, col_idx - key_leftpad, 2**32)
    # Subtract remainder instead of divide and then multiply to take care of negative values
    col_limit_left_chunk = row_idx + sk - sq - (row_idx + sk - sq) % attention_chunk
    return np.logical_or(col_idx < col_limit_left_chunk, col_idx >= col_limit_left_chunk + attention_chunk)


def fa3_reference_weights(case):
    """P as FA3's ``attention_ref`` masks it (bottom-right, real lengths, left padding, sinks, chunks),
    padded query rows zeroed; one sequence at a time."""
    q, k, _ = case.inputs
    o = case.options
    window = o.get("window", (None, None))
    if o.get("causal"):
        window = (window[0], 0)
    s = np.einsum("bhid,bhjd->bhij", q, k) / np.sqrt(q.shape[-1])
    p = np.zeros(s.shape)
    for b in range(q.shape[0]):
        ql, ks, kl = (int(o[n][b]) for n in ("q_lengths", "k_starts", "k_lengths"))
        key_pad = ~((np.arange(k.shape[-2]) >= ks) & (np.arange(k.shape[-2]) < ks + kl))
        masked = np.broadcast_to(key_pad, s.shape[-2:])
        if window != (None, None):
            masked = masked | fa3_local_mask(q.shape[-2], k.shape[-2], window, o.get("sink_tokens", 0), ql, kl, ks)
        if o.get("chunk"):
            masked = masked | fa3_chunk_mask(q.shape[-2], k.shape[-2], o["chunk"], ql, kl, ks)
        logits = np.where(masked, -np.inf, s[b])
        m = logits.max(axis=-1, keepdims=True)
        e = np.exp(logits - np.where(np.isneginf(m), 0.0, m))
        total = e.sum(axis=-1, keepdims=True)
        p[b] = np.where(total > 0, e / np.where(total > 0, total, 1.0), 0.0)
        p[b, :, ql:] = 0.0  # output.masked_fill_(~query_padding_mask, 0)
    return p


# ---- the properties -------------------------------------------------------------------------------


def check_padded_batch_equals_each_sequence_alone(case):
    """sdpa on a padded batch = sdpa of each sequence's real queries and keys alone (padded rows 0)."""
    q, k, v = case.inputs
    o = case.options
    seq_opts = {n: x for n, x in o.items() if n not in ("q_lengths", "k_starts", "k_lengths", "align")}
    out, lse = refattn.sdpa(q, k, v, return_lse=True, **o)
    for b in range(q.shape[0]):
        ql, ks, kl = (int(o[n][b]) for n in ("q_lengths", "k_starts", "k_lengths"))
        assert (out[b, :, ql:] == 0).all() and np.isneginf(lse[b, :, ql:]).all(), b
        if ql == 0 or kl == 0:
            continue  # nothing real to compare (a real row without keys follows empty_rows; tested below)
        align = _offset(o["align"], ql, kl)
        alone, alone_lse = refattn.sdpa(
            q[b, :, :ql], k[b, :, ks : ks + kl], v[b, :, ks : ks + kl], align=align, return_lse=True, **seq_opts
        )
        # a real row without keys: the "uniform" fill is the mean over all Lk keys, padding included
        keep = ~np.isneginf(alone_lse) if o["empty_rows"] == "uniform" else np.ones(alone_lse.shape, bool)
        np.testing.assert_allclose(out[b, :, :ql][keep], alone[keep], **CLOSE)


def check_padded_rows_are_zero_under_every_policy_with_no_gradient(case):
    """Padded query rows: out 0 and lse -inf whatever empty_rows says, and no gradient to q (their
    rows), k, v (through them) or sinks."""
    q, k, v = case.inputs
    o = case.options
    out, lse = refattn.sdpa(q, k, v, return_lse=True, **o)
    pad = np.arange(q.shape[-2]) >= o["q_lengths"][:, None, None]  # (B, 1, Lq)
    assert (out[np.broadcast_to(pad, out.shape[:-1])] == 0).all()
    assert np.isneginf(lse[np.broadcast_to(pad, lse.shape)]).all()
    rng = np.random.default_rng(0)
    d_out = np.where(pad[..., None], rng.standard_normal(out.shape), 0.0)  # a cotangent on padded rows only
    d_lse = np.where(pad, rng.standard_normal(lse.shape), 0.0)
    # (a real row without keys under "nan" makes its head's gradients NaN whatever the cotangent)
    g = refattn.sdpa_backward(
        d_out, q, k, v, d_lse=d_lse, **{**o, "empty_rows": o["empty_rows"].replace("nan", "zero")}
    )
    for name, x in zip(("dq", "dk", "dv", "dbias", "dsinks"), g):
        assert x is None or (x == 0).all(), name


def check_fa3_masks_agree(case):
    """attention_weights with lengths, k_starts (FA's key_leftpad), bottom-right causal/window, sink
    tokens and chunks = FA3's attention_ref masks, row by row (padded rows zero)."""
    o = {**case.options, "align": "bottom_right"}
    o.pop("sinks", None)
    window = o.get("window")
    if isinstance(window, int):
        o["window"] = (window, window)
    if any(w is not None and w < 0 for w in o.get("window", ())):
        return  # flash-attn's sides are >= 0 (-1 means unbounded)
    p = refattn.attention_weights(*case.inputs[:2], **{**o, "empty_rows": "zero"})
    np.testing.assert_allclose(p, fa3_reference_weights(Case(case.inputs, o)), **CLOSE)


def check_loops_twin_agrees(case):
    """The per-element loops twin (its own scalar rule per option) = the vectorised definition."""
    q, k, v = case.inputs
    a = refattn.sdpa(q, k, v, return_lse=True, backend="numpy", **case.options)
    b = loops.sdpa(q, k, v, return_lse=True, **case.options)
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.nan_to_num(x, nan=7.0), np.nan_to_num(y, nan=7.0), **CLOSE)


def check_logits_are_the_explicit_scores(case):
    """attention_logits at each stage = the scores composed by hand, and "masked" = -inf exactly where
    attention_weights gives no weight to a real row (the softmax's input)."""
    q, k, _ = case.inputs
    o = {n: x for n, x in case.options.items() if n not in ("sinks", "empty_rows")}
    rng = np.random.default_rng(1)
    bias = rng.standard_normal(q.shape[-3:-1] + (k.shape[-2],))
    s0 = np.einsum("bhid,bhjd->bhij", q, k) / np.sqrt(q.shape[-1])
    s1 = 1.5 * np.tanh(s0 / 1.5)
    expected = {"scaled": s0, "softcapped": s1, "biased": s1 + bias}
    for stage, want in expected.items():
        got = refattn.attention_logits(q, k, stage=stage, softcap=1.5, bias=bias, **o)
        np.testing.assert_allclose(got, want, **CLOSE)
    masked = refattn.attention_logits(q, k, stage="masked", softcap=1.5, bias=bias, **o)
    p = refattn.attention_weights(q, k, softcap=1.5, bias=bias, **o)
    assert np.array_equal(np.isneginf(masked), p == 0)


padded = padded_batches()
plain = padded_batches(structure=False)

PROPERTIES = [
    # (property, strategy, the broken variant it must catch)
    (check_padded_batch_equals_each_sequence_alone, padded, "offset_from_padded_lengths"),
    (check_padded_rows_are_zero_under_every_policy_with_no_gradient, plain, "padded_rows_follow_empty_rows"),
    (check_fa3_masks_agree, padded, ("sink_tokens_exempt_from_the_right", "chunk_truncates_toward_zero")),
    (check_loops_twin_agrees, padded, "key_start_ignored"),
    (check_logits_are_the_explicit_scores, padded, "logits_softcap_after_bias"),
]


# ---- the broken variants ----------------------------------------------------------------------------


def _offset_from_padded_lengths(real):
    """Mutant: bottom-right aligns on the padded Lk - Lq, not each sequence's lengths."""

    def sequences(batch, lq, lk, *, align=None, **lengths):
        seqs = real(batch, lq, lk, align=align, **lengths)
        return seqs._replace(offsets=np.full(seqs.offsets.shape, lk - lq)) if align == "bottom_right" else seqs

    return sequences


def _sinks_exempt_from_the_right(real):
    """Mutant: sink tokens are always allowed (also past the diagonal and the right side)."""

    def allowed(lq, lk, seqs, *, causal=False, window=(None, None), chunk=None, sink_tokens=0):
        keep = real(lq, lk, seqs, causal=causal, window=window, chunk=chunk, sink_tokens=sink_tokens)
        if keep is None or not sink_tokens or window[0] is None:
            return keep
        jr = np.arange(lk) - seqs.k_starts[..., None, None, None]
        real_key = (jr >= 0) & (jr < seqs.k_lengths[..., None, None, None])
        real_row = np.arange(lq)[:, None] < seqs.q_lengths[..., None, None, None]
        return keep | ((jr < sink_tokens) & real_key & real_row)

    return allowed


def _chunk_truncates_toward_zero(real):
    """Mutant: the chunk index of a negative position truncates toward zero (C division)."""

    def allowed(lq, lk, seqs, *, causal=False, window=(None, None), chunk=None, sink_tokens=0):
        keep = real(lq, lk, seqs, causal=causal, window=window, chunk=None, sink_tokens=sink_tokens)
        if not chunk:
            return keep
        pos = np.arange(lq)[:, None] + seqs.offsets[..., None, None, None]
        jr = np.arange(lk) - seqs.k_starts[..., None, None, None]
        same = np.trunc(pos / chunk) == np.floor_divide(jr, chunk)
        base = np.ones(same.shape, bool) if keep is None else keep
        return base & same

    return allowed


def _softcap_after_bias(real):
    """Mutant: the logits cap the biased scores (ONNX's order), not the scaled ones."""

    def logits(a, upto):
        s, ke, t = real(a, 1)
        if upto >= 2 and a.bias is not None:
            s0 = a.scale * (a.q @ np.swapaxes(ke, -1, -2))
            s = np.broadcast_to(a.softcap * np.tanh((s0 + a.bias) / a.softcap), a.score_shape).copy()
        if upto >= 3 and a.allowed is not None:
            s = np.where(a.allowed, s, -np.inf)
        return s, ke, t

    return logits


MUTANTS = {
    "offset_from_padded_lengths": lambda mp: mp.setattr(
        masks_mod, "sequences", _offset_from_padded_lengths(masks_mod.sequences)
    ),
    "padded_rows_follow_empty_rows": lambda mp: mp.setattr(masks_mod, "padded_queries", lambda lq, seqs: None),
    "sink_tokens_exempt_from_the_right": lambda mp: mp.setattr(
        masks_mod, "allowed_positions", _sinks_exempt_from_the_right(masks_mod.allowed_positions)
    ),
    "chunk_truncates_toward_zero": lambda mp: mp.setattr(
        masks_mod, "allowed_positions", _chunk_truncates_toward_zero(masks_mod.allowed_positions)
    ),
    "key_start_ignored": lambda mp: mp.setattr(loops, "validate", _loops_validate_without_starts(loops.validate)),
    "logits_softcap_after_bias": lambda mp: mp.setattr(sdpa_mod, "_logits", _softcap_after_bias(sdpa_mod._logits)),
}


def _loops_validate_without_starts(real):
    """Mutant (loops twin): keys are counted from 0, not from the sequence's start."""

    def validate(*args, **kwargs):
        a = real(*args, **kwargs)
        return dataclasses.replace(a, seqs=a.seqs._replace(k_starts=np.zeros_like(a.seqs.k_starts)))

    return validate


test_property, test_property_catches_its_mutant = property_table(PROPERTIES, MUTANTS)


# ---- examples: the peers' own cases ------------------------------------------------------------------


def test_onnx_past_length_offset_is_an_int_align():
    """ONNX puts query i at past_sequence_length + i: with 3 new queries over 2 past + 5 new keys
    (the new key block longer than the queries), causal allows j <= 2 + i — neither top-left (j <= i)
    nor bottom-right (j <= 4 + i)."""
    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((1, 1, 3, 4)), rng.standard_normal((1, 1, 7, 4)), rng.standard_normal((1, 1, 7, 2))
    p = refattn.attention_weights(q, k, causal=True, align=2)
    expected = np.arange(7)[None, :] <= np.arange(3)[:, None] + 2
    assert np.array_equal(p[0, 0] > 0, expected)
    out = refattn.sdpa(q, k, v, causal=True, align=2)
    np.testing.assert_allclose(out, refattn.sdpa(q, k, v, mask=expected), **CLOSE)


def test_jax_negative_and_int_windows():
    """JAX local_window_size=(-1, 2): keys i+1 .. i+2 (the diagonal excluded); an int w is (w, w)."""
    rng = np.random.default_rng(4)
    q, k = rng.standard_normal((1, 6, 3)), rng.standard_normal((1, 6, 3))
    i, j = np.arange(6)[:, None], np.arange(6)[None, :]
    p = refattn.attention_weights(q, k, window=(-1, 2), empty_rows="zero")
    assert np.array_equal(p[0] > 0, (j >= i + 1) & (j <= i + 2))
    assert np.array_equal(refattn.attention_weights(q, k, window=2), refattn.attention_weights(q, k, window=(2, 2)))


def test_flash_attn_window_translation_keeps_zero_sides():
    """flash-attn's window_size=(0, 0) is the diagonal alone: the translation (None if l < 0 else l)
    keeps it (``(0 or None)`` would make it no window)."""

    def translate(window_size):
        return tuple(None if w < 0 else w for w in window_size)

    rng = np.random.default_rng(5)
    q, k = rng.standard_normal((1, 5, 3)), rng.standard_normal((1, 5, 3))
    p = refattn.attention_weights(q, k, window=translate((0, 0)))
    np.testing.assert_array_equal(p[0], np.eye(5))
    assert translate((-1, -1)) == (None, None)


def test_jax_zeroes_padded_query_rows_while_other_empty_rows_stay_uniform():
    """q_lengths zero the padded rows; a real row without keys follows empty_rows="uniform"."""
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((2, 1, 4, 3)) for _ in range(3))
    out = refattn.sdpa(q, k, v, q_lengths=[2, 4], k_lengths=[0, 4], empty_rows="uniform")
    np.testing.assert_array_equal(out[0, 0, 2:], 0.0)
    np.testing.assert_allclose(out[0, 0, :2], np.broadcast_to(v[0, 0].mean(axis=0), (2, 3)), **CLOSE)


def test_bad_sequence_options_are_refused_with_their_names():
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((2, 1, 3, 2)) for _ in range(3))
    cases = [
        ({"q_lengths": [4, 1]}, r"q_lengths: expected values in \[0, 3\], got 4 at batch index \(0,\)"),
        ({"k_starts": [0, 1], "k_lengths": [3, 3]}, r"k_lengths: expected values in \[0, 2\], got 3"),
        ({"k_lengths": [1, 2, 3]}, r"k_lengths: expected integers broadcastable to the batch shape \(2,\)"),
        ({"q_lengths": [1.0, 2.0]}, r"q_lengths: expected integers"),
        ({"chunk": 0}, r"chunk: expected an integer >= 1, got 0"),
        ({"sink_tokens": -1}, r"sink_tokens: expected an integer >= 0"),
        ({"causal": True, "q_lengths": [1, 3]}, r"align: causal with q_length 1 != k_length 3 at batch \(0,\)"),
        ({"causal": True, "align": 2**41}, r"align: expected an int offset with \|o\| <= 2\*\*40"),
        ({"window": (1, 2, 3)}, r"window: expected an int w or a pair"),
    ]
    for options, message in cases:
        try:
            refattn.sdpa(q, k, v, **options)
        except refattn.RefAttnError as e:
            assert re.search(message, str(e)), (options, str(e))
        else:
            raise AssertionError(f"{options} was accepted")
    assert isinstance(_error(lambda: refattn.sdpa(q, k, v, q_lengths=[1.0, 2.0])), refattn.RefAttnTypeError)


def _error(fn):
    try:
        fn()
    except refattn.RefAttnError as e:
        return e
    return None


def test_alibi_on_a_padded_batch_is_flash_attn_s():
    """flash-attn's ``attn_bias_from_alibi_slopes`` (``tests/test_flash_attn.py``, non-causal branch):
    ``-slope · |row + sk − sq − col|`` with each sequence's real lengths and left padding; refattn's
    alibi_bias with the same lengths, starts and ``align="bottom_right"`` gives it on every real key."""
    lq, lk = 4, 7
    slopes = np.array([[0.5, 0.125], [0.25, 1.0]])  # (B, H)
    q_lengths, k_lengths, k_starts = np.array([3, 4]), np.array([5, 2]), np.array([1, 4])
    bias = refattn.alibi_bias(
        slopes, lq, lk, align="bottom_right", q_lengths=q_lengths, k_lengths=k_lengths, k_starts=k_starts
    )
    assert bias.shape == (2, 2, lq, lk)
    for b in range(2):
        row_idx = np.arange(lq)[:, None]
        col_idx = np.arange(lk)
        col_idx = np.where(col_idx >= k_starts[b], col_idx - k_starts[b], 2**32)  # key_leftpad
        sk, sq = k_lengths[b], q_lengths[b]
        relative_pos = np.abs(row_idx + sk - sq - col_idx)
        expected = -slopes[b][:, None, None] * relative_pos
        real = (np.arange(lk) >= k_starts[b]) & (np.arange(lk) < k_starts[b] + sk)
        np.testing.assert_array_equal(bias[b][..., real], expected[..., real])
