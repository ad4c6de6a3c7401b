"""Head detectors against TransformerLens' ``head_detector.py``: ``pattern_score`` for custom patterns,
both error measures (``"mul"``, ``"abs"``), the rounding TransformerLens applies to ``"abs"`` only, the
built-in detectors as ``pattern_score`` with their pattern, and the ``heads`` subset.

The reference is a line-by-line NumPy transcription of TransformerLens'
``compute_head_attention_similarity_score`` and ``detect_head``'s ``heads`` handling
(TransformerLensOrg/TransformerLens, ``transformer_lens/head_detector.py``).
"""

import importlib

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import refattn
from refattn import metrics
from refattn.testing.strategies import Case, map_cases
from tests.mutation import property_table

det_mod = importlib.import_module("refattn.metrics.detectors")

CLOSE = dict(rtol=1e-13, atol=1e-15)


# ---- TransformerLens, transcribed -----------------------------------------------------------------


def tl_similarity_score(attention_pattern, detection_pattern, *, exclude_bos, exclude_current_token, error_measure):
    """``compute_head_attention_similarity_score`` in NumPy, line by line.  For "abs" it returns the pair
    (TL's value, the same before ``round(·, 3)``); for "mul" TL's value (which TL never rounds)."""
    attention_pattern = attention_pattern.copy()  # TL writes into the cache's tensor (exclude_bos, "mul")
    assert attention_pattern.shape[0] == attention_pattern.shape[1]
    if error_measure == "mul":
        if exclude_bos:
            attention_pattern[:, 0] = 0
        if exclude_current_token:
            np.fill_diagonal(attention_pattern, 0)
        score = attention_pattern * detection_pattern
        return score.sum() / attention_pattern.sum()
    abs_diff = np.abs(attention_pattern - detection_pattern)
    assert (abs_diff - np.tril(abs_diff)).sum() == 0
    size = len(abs_diff)
    if exclude_bos:
        abs_diff[:, 0] = 0
    if exclude_current_token:
        np.fill_diagonal(abs_diff, 0)
    return 1 - round(abs_diff.mean() * size, 3), 1 - abs_diff.mean() * size


def tl_detect_head(patterns_by_layer, detection_pattern, heads=None, **options):
    """``detect_head``'s loop over ``heads`` (a list of (layer, head) or {layer: [head, ...]}) on
    per-layer patterns ``(n_layers, n_heads, n, n)``: unselected heads score -1."""
    n_layers, n_heads = patterns_by_layer.shape[:2]
    if heads is None:
        layer2heads = {layer: list(range(n_heads)) for layer in range(n_layers)}
    elif isinstance(heads, list):
        layer2heads = {}
        for layer, head in heads:
            layer2heads.setdefault(layer, []).append(head)
    else:
        layer2heads = heads
    matches = -np.ones((n_layers, n_heads))
    for layer, layer_heads in layer2heads.items():
        for head in layer_heads:
            s = tl_similarity_score(patterns_by_layer[layer, head], detection_pattern, **options)
            matches[layer, head] = s if options["error_measure"] == "mul" else s[0]
    return matches


def _causal(p):
    """A map made lower-triangular (TransformerLens' "abs" asserts it), rows renormalised."""
    q = np.tril(p)
    return q / q.sum(axis=-1, keepdims=True)


@st.composite
def causal_cases(draw):
    """Causal square maps (no mask), a lower-triangular pattern (0/1 or in [0, 1]) and TL's options."""
    case = draw(map_cases(square=True))
    p = _causal(case.inputs[0])
    n = p.shape[-1]
    values = st.sampled_from([0.0, 1.0]) if draw(st.booleans()) else st.floats(0.0, 1.0, allow_subnormal=False)
    pattern = np.tril(draw(hnp.arrays(np.float64, (n, n), elements=values)))
    opts = {
        "exclude_bos": draw(st.booleans()),
        "exclude_current_token": draw(st.booleans()),
        "error_measure": draw(st.sampled_from(["mul", "abs"])),
    }
    return Case((p, pattern), opts)


def _each_map(p):
    return np.ndindex(*p.shape[:-2])


# ---- properties ----------------------------------------------------------------------------------


def check_pattern_score_matches_transformerlens(case):
    """Unrounded, and TL's "abs" value is ``1 − round(1 − score, 3)``; "mul" is never rounded."""
    p, pattern = case.inputs
    o = case.options
    got = metrics.pattern_score(p, pattern, **o)
    for idx in _each_map(p):
        if o["error_measure"] == "mul":
            kept = p[idx].copy()
            kept[:, 0] *= not o["exclude_bos"]
            if o["exclude_current_token"]:
                np.fill_diagonal(kept, 0.0)
            if kept.sum() <= 0:
                continue  # TL divides 0 by 0 there (NaN); refattn scores 0
            want = tl_similarity_score(p[idx], pattern, **o)
            assert got[idx] == pytest.approx(want, rel=1e-13, abs=1e-15), (idx, got[idx], want)
        else:
            rounded, raw = tl_similarity_score(p[idx], pattern, **o)
            assert got[idx] == pytest.approx(raw, rel=1e-13, abs=1e-14), (idx, got[idx], raw)
            if abs((1 - raw) * 1000 % 1 - 0.5) > 1e-6:  # off a rounding boundary, where sums in another order agree
                assert 1 - round(1 - got[idx], 3) == pytest.approx(rounded, rel=0, abs=1e-12), (idx, got[idx])


def _tl_patterns(tokens):
    """TransformerLens' get_*_detection_pattern, in NumPy line by line."""
    n = len(tokens)
    prev = np.zeros((n, n))
    prev[1:, :-1] = np.eye(n - 1)
    eq = np.equal(np.tile(tokens, (n, 1)), np.tile(tokens, (n, 1)).T).astype(int)
    np.fill_diagonal(eq, 0)
    dup = np.tril(eq).astype(float)
    shifted = np.roll(dup, 1, axis=1)
    ind = np.tril(np.concatenate([np.zeros((n, 1)), shifted[:, 1:]], axis=1))
    return np.tril(prev), dup, ind


@st.composite
def detector_cases(draw):
    """Square maps (with a key mask or not), shared token ids, TL's options, both measures."""
    case = draw(map_cases(square=True))
    n = case.inputs[0].shape[-1]
    tokens = np.array(draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)))
    opts = {
        **case.options,
        "exclude_bos": draw(st.booleans()),
        "exclude_current_token": draw(st.booleans()),
        "error_measure": draw(st.sampled_from(["mul", "abs"])),
    }
    return Case((case.inputs[0], tokens), opts)


def check_builtin_detectors_are_pattern_score(case):
    """Each built-in equals pattern_score with TL's pattern (restricted to real keys), bit for bit."""
    p, tokens = case.inputs
    o = case.options
    prev, dup, ind = _tl_patterns(tokens)
    real = o.get("mask", np.ones(p.shape[:-3] + p.shape[-1:], dtype=bool))[..., None, None, :]  # (..., 1, 1, L)
    for got, pattern in (
        (metrics.previous_token_score(p, **o), prev),
        (metrics.duplicate_token_score(p, tokens, **o), dup * real),
        (metrics.induction_score(p, tokens, **o), ind * np.concatenate([real[..., :1] * 0, real[..., :-1]], axis=-1)),
    ):
        np.testing.assert_array_equal(got, metrics.pattern_score(p, np.broadcast_to(pattern, p.shape), **o))


def check_heads_select_axis_minus_3(case):
    """``heads`` = the full result indexed on its last axis; its backward = the full backward of the
    scattered cotangent (repeats summed)."""
    p, tokens = case.inputs
    o = case.options
    h = p.shape[-3]
    rng = np.random.default_rng(h)
    heads = [h - 1, 0, h - 1]
    full = metrics.duplicate_token_score(p, tokens, **o)
    np.testing.assert_array_equal(metrics.duplicate_token_score(p, tokens, heads=heads, **o), full[..., heads])
    np.testing.assert_array_equal(metrics.duplicate_token_score(p, tokens, heads=-1, **o), full[..., h - 1])
    d = rng.standard_normal(full.shape[:-1] + (3,))  # random cotangent, never all ones
    scattered = np.zeros(full.shape)
    for k, head in enumerate(heads):
        scattered[..., head] += d[..., k]
    got = metrics.duplicate_token_score_backward(d, p, tokens, heads=heads, **o).dP
    want = metrics.duplicate_token_score_backward(scattered, p, tokens, **o).dP
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=0.0)


def check_abs_is_one_on_its_own_pattern_and_at_most_one(case):
    """``"abs"``: a map scored against itself gives 1, any other pattern at most 1 (all ones: 1 minus
    the mean over real rows of their real keys but one); ``"mul"`` of a probability map on a 0/1
    pattern lies in [0, 1]."""
    (p,) = case.inputs
    mask = case.options.get("mask")
    np.testing.assert_array_equal(metrics.pattern_score(p, p, mask=mask, error_measure="abs"), 1.0)
    ones = np.ones(p.shape[-2:])
    keys = p.shape[-1] if mask is None else mask.sum(axis=-1)[..., None]  # real keys per map
    got = metrics.pattern_score(p, ones, mask=mask, error_measure="abs")
    assert (got <= 1.0 + 1e-15).all()
    want = np.broadcast_to(1.0 - (keys - 1.0), got.shape)  # each real row: Σ_j (1 − P_ij) = keys − 1
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)
    mul = metrics.pattern_score(p, np.eye(p.shape[-1], k=-1), mask=mask)
    assert ((mul >= 0) & (mul <= 1 + 1e-15)).all()


# ---- examples -------------------------------------------------------------------------------------


def test_tl_rounds_abs_only_and_refattn_never():
    # a map whose "abs" value has more than three decimals: TL rounds it, refattn does not
    p = np.array([[1.0, 0.0, 0.0], [0.3, 0.7, 0.0], [0.123, 0.456, 0.421]])
    pattern = np.eye(3, k=-1)
    raw = 1 - (1.0 + 0.7 + 0.7 + 0.123 + 0.544 + 0.421) / 3  # 1 − Σ|P − D| / L
    got = metrics.pattern_score(p, pattern, error_measure="abs")
    assert got == pytest.approx(raw, rel=1e-14, abs=0.0)  # 9 terms summed in another order: a few ulps
    rounded, unrounded = tl_similarity_score(
        p, pattern, exclude_bos=False, exclude_current_token=False, error_measure="abs"
    )
    assert rounded == 1 - round(1 - raw, 3) and rounded != pytest.approx(raw, rel=1e-6)
    assert unrounded == pytest.approx(got, rel=1e-14)
    mul = tl_similarity_score(p, pattern, exclude_bos=False, exclude_current_token=False, error_measure="mul")
    assert metrics.pattern_score(p, pattern) == pytest.approx(mul, rel=1e-15)  # "mul": unrounded in TL too


def test_heads_follow_tl_detect_head_per_layer():
    rng = np.random.default_rng(3)
    layers = _causal(refattn.softmax(rng.standard_normal((2, 4, 5, 5))))  # (n_layers, n_heads, n, n)
    pattern = np.eye(5, k=-1)
    o = dict(exclude_bos=True, exclude_current_token=False, error_measure="abs")
    pairs = [(0, 3), (1, 0), (1, 2)]
    tl = tl_detect_head(layers, pattern, pairs, **o)
    got = np.full((2, 4), -1.0)
    for layer in range(2):
        picked = [h for lay, h in pairs if lay == layer]
        # TL rounds "abs"; refattn's unrounded score rounds to it
        got[layer, picked] = 1 - np.round(1 - metrics.pattern_score(layers[layer], pattern, heads=picked, **o), 3)
    np.testing.assert_allclose(got, tl, rtol=0, atol=1e-12)
    as_dict = tl_detect_head(layers, pattern, {0: [3], 1: [0, 2]}, **o)
    np.testing.assert_array_equal(as_dict, tl)


def test_pattern_score_is_not_mutating_and_accepts_any_pattern():
    rng = np.random.default_rng(4)
    p = refattn.softmax(rng.standard_normal((2, 3, 4, 4)))
    pattern = rng.uniform(-1.0, 2.0, (3, 4, 4))  # not 0/1, not lower-triangular: TL would refuse or warn
    p0, d0 = p.copy(), pattern.copy()
    got = metrics.pattern_score(p, pattern, exclude_bos=True)
    want = (p[..., 1:] * pattern[..., 1:]).sum(axis=(-2, -1)) / p[..., 1:].sum(axis=(-2, -1))
    np.testing.assert_allclose(got, want, **CLOSE)
    np.testing.assert_array_equal(p, p0)
    np.testing.assert_array_equal(pattern, d0)


def test_abs_under_padding_counts_the_real_rows():
    rng = np.random.default_rng(5)
    p = _causal(refattn.softmax(rng.standard_normal((1, 3, 3))))
    padded = np.zeros((1, 5, 5))
    padded[:, 2:, 2:] = p
    padded[:, :2, :] = 0.2  # padded query rows: exempt
    real = np.array([False, False, True, True, True])
    pattern = np.zeros((5, 5))
    pattern[2:, 2:] = np.eye(3, k=-1)
    pattern[:2] = 1.0  # on padded rows: ignored
    want = metrics.pattern_score(p, np.eye(3, k=-1), error_measure="abs", exclude_bos=True)
    got = metrics.pattern_score(padded, pattern, mask=real, error_measure="abs", exclude_bos=True)
    assert got[0] == pytest.approx(want[0], rel=1e-15, abs=1e-16)


def test_gradients_of_both_measures():
    from refattn.testing import gradcheck

    rng = np.random.default_rng(6)
    p = refattn.softmax(rng.standard_normal((2, 3, 4, 4)))
    pattern = rng.uniform(0.0, 1.0, (4, 4))  # |P − D| > 0 almost surely: off the kink
    for measure in ("mul", "abs"):
        opts = dict(error_measure=measure, heads=[2, 0, 2], exclude_current_token=True, check_probabilities=False)
        assert gradcheck(metrics.pattern_score, metrics.pattern_score_backward, (p, pattern), options=opts).passed


def test_bad_arguments_are_named():
    p = np.full((2, 3, 3), 1 / 3)
    with pytest.raises(refattn.RefAttnError, match="error_measure"):
        metrics.previous_token_score(p, error_measure="sq")
    with pytest.raises(refattn.RefAttnError, match=r"heads: expected indices in \[-2, 2\)"):
        metrics.previous_token_score(p, heads=[2])
    with pytest.raises(refattn.RefAttnTypeError, match="heads"):
        metrics.previous_token_score(p, heads=[0.5])
    with pytest.raises(refattn.RefAttnError, match="heads"):
        metrics.previous_token_score(p[0], heads=0)  # a single map has no head axis
    with pytest.raises(refattn.RefAttnError, match="pattern"):
        metrics.pattern_score(p, np.zeros((3, 4)))
    with pytest.raises(refattn.RefAttnError, match="pattern"):
        metrics.pattern_score(p, np.full((3, 3), np.nan))
    with pytest.raises(refattn.RefAttnError, match="d_score"):
        metrics.pattern_score_backward(np.zeros(2), p, np.eye(3), heads=[0, 1, 1])


# ---- the property table and its mutants ---------------------------------------------------------

PROPERTIES = [
    (check_pattern_score_matches_transformerlens, causal_cases(), "abs_averaged_over_every_entry"),
    (check_builtin_detectors_are_pattern_score, detector_cases(), "previous_token_on_the_diagonal"),
    (
        check_heads_select_axis_minus_3,
        detector_cases().filter(lambda c: c.inputs[0].shape[-3] > 1),
        ("heads_off_by_one", "repeated_heads_overwrite"),
    ),
    (check_abs_is_one_on_its_own_pattern_and_at_most_one, map_cases(square=True), "abs_without_the_absolute_value"),
]


def _scores_mutant(change):
    def patch(mp):
        real = det_mod._scores
        mp.setattr(det_mod, "_scores", lambda parts: change(real, parts))

    return patch


def _abs_over_every_entry(real, parts):
    """TL's mean over the L² entries without its ``· size``: Σ|P − D| / (n_rows · L)."""
    score, norm = real(parts)
    if parts.measure == "abs":
        score = 1.0 - (1.0 - score) / parts.m.p.shape[-1]
    return score, norm


def _abs_signed(real, parts):
    if parts.measure != "abs":
        return real(parts)
    rows = np.broadcast_to(parts.m.rows, parts.m.p.shape[:-1]).sum(axis=-1)
    err = (parts.kept * (parts.m.p - parts.d)).sum(axis=(-2, -1))
    return np.where(rows > 0, 1.0 - err / np.maximum(rows, 1), 0.0), rows


def _previous_on_the_diagonal(mp):
    real = det_mod._pattern_for
    mp.setattr(
        det_mod,
        "_pattern_for",
        lambda kind, shape, tokens, r=None: np.eye(shape[-1]) if kind == "previous" else real(kind, shape, tokens, r),
    )


def _heads_off_by_one(mp):
    real = det_mod._heads_index
    mp.setattr(
        det_mod, "_heads_index", lambda heads, shape: None if heads is None else (real(heads, shape) + 1) % shape[-3]
    )


def _overwrite(g_heads, heads, shape):
    g = np.zeros(shape)
    g[..., heads] = g_heads
    return g


MUTANTS = {
    "abs_averaged_over_every_entry": _scores_mutant(_abs_over_every_entry),
    "previous_token_on_the_diagonal": _previous_on_the_diagonal,
    "heads_off_by_one": _heads_off_by_one,
    "repeated_heads_overwrite": lambda mp: mp.setattr(det_mod, "_scatter_heads", _overwrite),
    "abs_without_the_absolute_value": _scores_mutant(_abs_signed),
}


test_property, test_property_catches_its_mutant = property_table(PROPERTIES, MUTANTS)
