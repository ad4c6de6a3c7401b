"""Properties of sdpa / attention_weights, each shown to fail on a deliberately broken variant."""

import zlib

import numpy as np
from hypothesis import given
from scipy.special import logsumexp as scipy_logsumexp

import refattn
from refattn import masks as masks_mod
from refattn.attention import loops
from refattn.attention import sdpa as sdpa_mod
from refattn.testing.strategies import STRUCTURAL_OPTIONS as STRUCTURE
from refattn.testing.strategies import Case, sdpa_cases, weights_cases
from tests.mutation import property_table

CLOSE = dict(rtol=1e-12, atol=1e-13)


def _opts(case, *drop):
    return {k: v for k, v in case.options.items() if k not in drop}


def _weights(case):
    return refattn.attention_weights(*case.inputs[:2], **_opts(case, "dropout_p", "dropout_mask", "return_lse"))


def _sdpa(case, **more):
    return refattn.sdpa(*case.inputs, **{**_opts(case, "return_lse"), **more})


def _sequence(o, batch, name, default):
    x = o.get(name)
    return np.broadcast_to(default if x is None else np.asarray(x), batch)


def disallowed(case):
    """Independent index arithmetic: bool (..., Hq, Lq, Lk), True where a key must get weight 0
    (padding, causal, window with sink tokens, chunk, mask, a -inf bias), per sequence."""
    q, k = case.inputs[:2]
    o = case.options
    lq, lk = q.shape[-2], k.shape[-2]
    batch = np.broadcast_shapes(q.shape[:-3], k.shape[:-3])
    ql = _sequence(o, batch, "q_lengths", lq)
    ks = _sequence(o, batch, "k_starts", 0)
    kl = _sequence(o, batch, "k_lengths", lk - ks)
    ql, ks, kl = (x[..., None, None, None] for x in (ql, ks, kl))  # (..., 1, 1, 1): heads, rows, keys
    align = o.get("align")
    off = kl - ql if align == "bottom_right" else (align if isinstance(align, (int, np.integer)) else 0)
    i = np.arange(lq)[:, None]
    pos = i + off  # the query's key position
    jr = np.arange(lk)[None, :] - ks  # the key's position in its sequence
    bad = (i >= ql) | (jr < 0) | (jr >= kl)
    if o.get("causal"):
        bad = bad | (jr > pos)
    window = o.get("window")
    left, right = (window, window) if isinstance(window, int) else (window or (None, None))
    if left is not None:
        bad = bad | ((jr < pos - left) & (jr >= o.get("sink_tokens", 0)))
    if right is not None:
        bad = bad | (jr > pos + right)
    if o.get("chunk"):
        bad = bad | (np.floor_divide(pos, o["chunk"]) != np.floor_divide(jr, o["chunk"]))
    if "mask" in o:
        bad = bad | ~o["mask"]
    if "bias" in o:
        bad = bad | np.isneginf(o["bias"])
    return bad


def padded_rows(case):
    """bool (..., 1, Lq) or a scalar False: the query rows past each sequence's q_length."""
    o = case.options
    if o.get("q_lengths") is None:
        return False
    lq = case.inputs[0].shape[-2]
    return np.arange(lq) >= np.asarray(o["q_lengths"])[..., None, None]


# ---- the properties -----------------------------------------------------------------------------


def check_rows_sum_to_one(case):
    p = _weights(case)
    _, lse = _sdpa(case, return_lse=True)
    sinks = case.options.get("sinks")
    sink_mass = 0.0 if sinks is None else np.exp(np.asarray(sinks)[..., None] - np.where(np.isfinite(lse), lse, 0))
    total = p.sum(axis=-1) + np.where(np.isfinite(lse), sink_mass, 0.0)
    empty = np.isneginf(lse)
    policy = case.options["empty_rows"]
    expected = np.where(empty, {"zero": 0.0, "uniform": 1.0, "nan": np.nan}[policy], 1.0)
    expected = np.where(padded_rows(case), 0.0, expected)  # padded query rows are 0 under every policy
    np.testing.assert_allclose(total, expected, **CLOSE)
    assert (p[~np.isnan(p)] >= 0).all()


def check_disallowed_entries_are_zero(case):
    p = _weights(case)
    lse = _sdpa(case, return_lse=True)[1]
    bad = np.broadcast_to(disallowed(case), p.shape) & np.isfinite(lse)[..., None]
    assert (p[bad] == 0.0).all()


def check_row_constant_in_bias_changes_nothing(case):
    q = case.inputs[0]
    shift = np.random.default_rng(0).uniform(-3, 3, size=q.shape[:-1] + (1,))  # (..., Hq, Lq, 1)
    bias = case.options.get("bias", 0.0)
    base = _sdpa(case)
    shifted = refattn.sdpa(*case.inputs, **{**_opts(case, "return_lse"), "bias": bias + shift})
    np.testing.assert_allclose(shifted, base, rtol=1e-11, atol=1e-12)


def check_permuting_keys_and_values_changes_nothing(case):
    q, k, v = case.inputs
    perm = np.random.default_rng(zlib.crc32(k.tobytes() + v.tobytes())).permutation(k.shape[-2])
    opts = _opts(case, "return_lse")
    score_shape = np.broadcast_shapes(q.shape[:-1], k.shape[:-3] + (1, 1))[:-1] + (q.shape[-2], k.shape[-2])

    def permute_keys(a):
        return (
            np.broadcast_to(a, np.broadcast_shapes(np.shape(a), (1,) * (len(score_shape) - 1) + (1,)))[..., perm]
            if np.shape(a)[-1] == k.shape[-2]
            else a
        )

    for name in ("mask", "bias", "dropout_mask"):
        if name in opts:
            opts[name] = permute_keys(opts[name])
    np.testing.assert_allclose(refattn.sdpa(q, k[..., perm, :], v[..., perm, :], **opts), _sdpa(case), **CLOSE)


def check_gqa_equals_repeated_heads(case):
    q, k, v = case.inputs
    g = q.shape[-3] // k.shape[-3]
    heads = [h // g for h in range(q.shape[-3])]
    repeated = refattn.sdpa(q, k[..., heads, :, :], v[..., heads, :, :], **_opts(case, "return_lse"))
    np.testing.assert_allclose(repeated, _sdpa(case), **CLOSE)


def check_alignments_agree_when_lengths_match(case):
    opts = _opts(case, "return_lse", "align")
    top = refattn.sdpa(*case.inputs, align="top_left", **opts)
    bottom = refattn.sdpa(*case.inputs, align="bottom_right", **opts)
    np.testing.assert_array_equal(top, bottom)


def check_wide_window_equals_no_window(case):
    q, k = case.inputs[:2]
    n = q.shape[-2] + k.shape[-2]
    rng = np.random.default_rng(2)
    wide = tuple(None if rng.random() < 0.5 else n + int(rng.integers(0, 3)) for _ in range(2))
    opts = _opts(case, "return_lse", "window", "causal")
    if q.shape[-2] != k.shape[-2]:
        opts.setdefault("align", "top_left")
    np.testing.assert_array_equal(refattn.sdpa(*case.inputs, window=wide, **opts), refattn.sdpa(*case.inputs, **opts))


def check_neg_inf_sinks_equal_no_sinks(case):
    q = case.inputs[0]
    opts = _opts(case, "return_lse", "sinks")
    none = refattn.sdpa(*case.inputs, return_lse=True, **opts)
    inf = refattn.sdpa(*case.inputs, return_lse=True, sinks=np.full(q.shape[-3], -np.inf), **opts)
    for a, b in zip(none, inf):
        np.testing.assert_array_equal(a, b)


def check_loops_equal_vectorized(case):
    fast = refattn.sdpa(*case.inputs, **_opts(case, "return_lse"), return_lse=True)
    slow = loops.sdpa(*case.inputs, **_opts(case, "return_lse"), return_lse=True)
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a, b, **CLOSE)


def explicit_scores(case):
    """Scores after softcap, bias and masks, composed step by step: (..., Hq, Lq, Lk)."""
    q, k = case.inputs[:2]
    o = case.options
    g = q.shape[-3] // k.shape[-3]
    ke = k[..., [h // g for h in range(q.shape[-3])], :, :]
    scale = o.get("scale") or 1 / np.sqrt(q.shape[-1])
    s = np.einsum("...id,...jd->...ij", q, ke) * scale
    if o.get("softcap"):
        s = o["softcap"] * np.tanh(s / o["softcap"])
    s = s + o.get("bias", 0.0)
    return np.where(disallowed(case), -np.inf, s)


def check_lse_is_log_sum_exp_of_scores(case):
    s = explicit_scores(case)
    if "sinks" in case.options:
        sinks = np.broadcast_to(np.asarray(case.options["sinks"])[..., None, None], s.shape[:-1] + (1,))
        s = np.concatenate([s, sinks], axis=-1)
    with np.errstate(divide="ignore"):
        expected = scipy_logsumexp(s, axis=-1)
    expected = np.where(padded_rows(case), -np.inf, expected)  # a padded row's lse is -inf, sink or not
    lse = _sdpa(case, return_lse=True)[1]
    np.testing.assert_allclose(lse, expected, **CLOSE)


# ---- strategies per property --------------------------------------------------------------------

square = sdpa_cases().filter(lambda c: c.inputs[0].shape[-2] == c.inputs[1].shape[-2])
no_sinks = sdpa_cases().map(lambda c: Case(c.inputs, _opts(c, "sinks")))
with_softcap = no_sinks.map(lambda c: Case(c.inputs, {**c.options, "softcap": c.options.get("softcap", 1.0)}))
gqa = sdpa_cases().filter(lambda c: c.inputs[0].shape[-3] > c.inputs[1].shape[-3] > 1)
no_structure = sdpa_cases().map(lambda c: Case(c.inputs, _opts(c, *STRUCTURE)))
finite_rows = sdpa_cases().map(lambda c: Case(c.inputs, {**c.options, "empty_rows": "zero"}))

PROPERTIES = [
    # (property, strategy, the broken variant it must catch)
    (check_rows_sum_to_one, sdpa_cases(), "unnormalised"),
    (check_disallowed_entries_are_zero, sdpa_cases(), "causal_off_by_one"),
    (check_row_constant_in_bias_changes_nothing, with_softcap, "stray_zero_logit"),
    (check_permuting_keys_and_values_changes_nothing, no_structure, "probabilities_misaligned_with_values"),
    (check_gqa_equals_repeated_heads, gqa, "gqa_tile"),
    (check_alignments_agree_when_lengths_match, square, "bottom_right_off_by_one"),
    (check_wide_window_equals_no_window, sdpa_cases(), "window_none_as_zero"),
    (check_neg_inf_sinks_equal_no_sinks, sdpa_cases(), "neg_inf_sink_as_zero"),
    (check_loops_equal_vectorized, sdpa_cases(), "sinks_ignored"),
    (check_lse_is_log_sum_exp_of_scores, finite_rows, "lse_without_max"),
]


# ---- the broken variants ------------------------------------------------------------------------


def _causal_off_by_one(real):
    """Mutant: causal lets each query see one key past its diagonal."""

    def allowed(lq, lk, seqs, *, causal=False, window=(None, None), chunk=None, sink_tokens=0):
        if causal:
            left, right = window
            window, causal = (left, (0 if right is None else min(right, 0)) + 1), False
        return real(lq, lk, seqs, causal=causal, window=window, chunk=chunk, sink_tokens=sink_tokens)

    return allowed


def _bottom_right_off_by_one(real):
    """Mutant: the bottom-right offset is k_length - q_length + 1."""

    def sequences(batch, lq, lk, *, align=None, **lengths):
        seqs = real(batch, lq, lk, align=align, **lengths)
        return seqs._replace(offsets=seqs.offsets + 1) if align == "bottom_right" else seqs

    return sequences


def _patch_normalize(monkeypatch, change):
    real = sdpa_mod.normalize_last_axis

    def mutant(s, empty_rows, sink=None):
        return change(real, s, empty_rows, sink)

    monkeypatch.setattr(sdpa_mod, "normalize_last_axis", mutant)


def _unnormalised(real, s, empty_rows, sink):
    nz = real(s, empty_rows, sink)
    m = np.where(nz.empty, 0.0, s.max(axis=-1))
    return nz._replace(p=np.exp(s - m[..., None]))


def _lse_without_max(real, s, empty_rows, sink):
    nz = real(s, empty_rows, sink)
    return nz._replace(lse=nz.lse - np.where(nz.empty, 0.0, s.max(axis=-1)))


MUTANTS = {
    "unnormalised": lambda mp: _patch_normalize(mp, _unnormalised),
    "lse_without_max": lambda mp: _patch_normalize(mp, _lse_without_max),
    "stray_zero_logit": lambda mp: _patch_normalize(
        mp, lambda real, s, e, sink: real(s, e, np.zeros(s.shape[:-1]) if sink is None else sink)
    ),
    "neg_inf_sink_as_zero": lambda mp: _patch_normalize(
        mp, lambda real, s, e, sink: real(s, e, None if sink is None else np.where(np.isneginf(sink), 0.0, sink))
    ),
    "sinks_ignored": lambda mp: _patch_normalize(mp, lambda real, s, e, sink: real(s, e, None)),
    "probabilities_misaligned_with_values": lambda mp: _patch_normalize(
        mp, lambda real, s, e, sink: (lambda nz: nz._replace(p=np.roll(nz.p, 1, axis=-1)))(real(s, e, sink))
    ),
    "gqa_tile": lambda mp: mp.setattr(
        sdpa_mod, "expand_kv", lambda x, g: x if g == 1 else np.tile(x, (1,) * (x.ndim - 3) + (g, 1, 1))
    ),
    "causal_off_by_one": lambda mp: mp.setattr(
        masks_mod, "allowed_positions", _causal_off_by_one(masks_mod.allowed_positions)
    ),
    "bottom_right_off_by_one": lambda mp: mp.setattr(
        masks_mod, "sequences", _bottom_right_off_by_one(masks_mod.sequences)
    ),
    "window_none_as_zero": lambda mp: mp.setattr(
        masks_mod,
        "check_window",
        lambda w, name="window": tuple(0 if x is None else x for x in ((w, w) if isinstance(w, int) else w)),
    ),
}

test_property, test_property_catches_its_mutant = property_table(PROPERTIES, MUTANTS)


@given(weights_cases())
def test_attention_weights_times_v_equals_sdpa(case):
    q, k = case.inputs
    v = np.random.default_rng(3).standard_normal(k.shape[:-1] + (2,))
    p = refattn.attention_weights(q, k, **case.options)
    g = q.shape[-3] // k.shape[-3]
    ve = v[..., [h // g for h in range(q.shape[-3])], :, :]
    out = refattn.sdpa(q, k, v, **case.options)
    np.testing.assert_allclose(np.nan_to_num(p @ ve, nan=7.0), np.nan_to_num(out, nan=7.0), **CLOSE)
