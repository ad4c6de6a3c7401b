"""Properties of the metrics, agreement with TransformerLens' detector definitions, and mutation checks."""

import importlib

import numpy as np
import pytest

import refattn
from refattn import metrics
from refattn.testing.strategies import Case, map_cases
from tests.mutation import property_table

dist_mod = importlib.import_module("refattn.metrics.distribution")
pos_mod = importlib.import_module("refattn.metrics.position")
det_mod = importlib.import_module("refattn.metrics.detectors")
maps_mod = importlib.import_module("refattn.metrics._maps")


def _real(case):
    p = case.inputs[0]
    return case.options.get("mask", np.ones(p.shape[:-3] + p.shape[-1:], dtype=bool))


square_maps = map_cases(square=True)


def _right_padded(case):
    """The same maps with padding moved to the end (a contiguous run of real tokens, as padding is)."""
    (p,) = case.inputs
    if "mask" not in case.options:
        return case
    count = case.options["mask"].sum(axis=-1, keepdims=True)
    real = np.arange(p.shape[-1]) < count
    q = p + 1e-3  # keep every key's weight positive before re-masking
    q = q * real[..., None, None, :]
    return Case((q / q.sum(axis=-1, keepdims=True),), {**case.options, "mask": real})


padded_maps = square_maps.map(_right_padded)
two_maps = map_cases(second_map=True)


# ---- properties --------------------------------------------------------------------------------


def check_entropy_in_range(case):
    (p,) = case.inputs
    mask = case.options.get("mask")
    h = metrics.entropy(p, mask=mask)
    n = maps_mod.attention_map(p, mask)
    counts = maps_mod.key_counts(n)
    assert np.isfinite(h).all()
    assert (h >= -1e-12).all() and (h <= np.log(np.maximum(counts, 1)) + 1e-12).all()
    hn = metrics.entropy(p, mask=mask, normalize=True)
    assert np.isfinite(hn).all() and (hn <= 1 + 1e-12).all()


def check_per_example_metrics_equal_cropped_maps(case):
    """Padding handled: the metrics of a padded map equal those of the map cropped to its real tokens
    (contiguous padding; distances are measured in raw positions)."""
    (p,) = case.inputs
    real = _real(case)
    lead = p.shape[:-3]
    for idx in np.ndindex(*lead):
        keep = real[idx]
        crop = p[idx][..., keep, :][..., keep]
        for name in ("head_confidence", "diagonal_strength", "self_context_balance", "attention_to"):
            fn = getattr(metrics, name)
            args = ([0],) if name == "attention_to" else ()
            full = fn(p[idx], *args, mask=keep)
            np.testing.assert_allclose(full, fn(crop, *args), rtol=1e-12, atol=1e-13, err_msg=name)
        np.testing.assert_allclose(
            metrics.entropy(p[idx], mask=keep)[..., keep], metrics.entropy(crop), rtol=1e-12, atol=1e-13
        )
        np.testing.assert_allclose(
            metrics.locality_score(p[idx], mask=keep)[..., keep], metrics.locality_score(crop), rtol=1e-12, atol=1e-13
        )


def check_js_symmetric_zero_iff_equal_and_sqrt_is_a_metric(case):
    p1, p2 = case.inputs
    js = metrics.js_divergence(p1, p2)
    np.testing.assert_allclose(js, metrics.js_divergence(p2, p1), rtol=1e-12, atol=1e-15)
    assert (js >= 0).all() and (js <= np.log(2) + 1e-12).all()
    np.testing.assert_allclose(metrics.js_divergence(p1, p1), 0.0, rtol=0.0, atol=1e-15)
    third = np.roll(p1, 1, axis=-1)
    d12, d23, d13 = metrics.js_distance(p1, p2), metrics.js_distance(p2, third), metrics.js_distance(p1, third)
    assert (d13 <= d12 + d23 + 1e-12).all()


def check_detectors_and_confidence_in_range(case):
    (p,) = case.inputs
    n = p.shape[-1]
    tokens = np.arange(n) % 2
    for score in (
        metrics.previous_token_score(p),
        metrics.duplicate_token_score(p, tokens),
        metrics.induction_score(p, tokens),
    ):
        assert ((score >= -1e-15) & (score <= 1 + 1e-15)).all()
    c = metrics.head_confidence(p)
    assert ((c >= 1 / n - 1e-15) & (c <= 1 + 1e-15)).all()


def _tl_patterns(tokens):
    """TransformerLens' get_*_detection_pattern, re-expressed in NumPy line by line."""
    n = len(tokens)
    prev = np.zeros((n, n))
    prev[1:, :-1] = np.eye(n - 1)
    eq = np.equal(np.tile(tokens, (n, 1)), np.tile(tokens, (n, 1)).T).astype(int)
    np.fill_diagonal(eq, 0)
    dup = np.tril(eq).astype(float)
    shifted = np.roll(dup, 1, axis=1)
    ind = np.tril(np.concatenate([np.zeros((n, 1)), shifted[:, 1:]], axis=1))
    return np.tril(prev), dup, ind


def check_detectors_match_transformerlens(case):
    (p,) = case.inputs
    n = p.shape[-1]
    tokens = (np.arange(n) * 7 + 3) % 3
    prev, dup, ind = _tl_patterns(tokens)
    for fn, pattern in (
        (lambda a: metrics.previous_token_score(a), prev),
        (lambda a: metrics.duplicate_token_score(a, tokens), dup),
        (lambda a: metrics.induction_score(a, tokens), ind),
    ):
        want = (p * pattern).sum(axis=(-2, -1)) / p.sum(axis=(-2, -1))  # TL "mul", unrounded
        np.testing.assert_allclose(fn(p), want, rtol=1e-13, atol=1e-15)


def test_entropy_values():
    assert metrics.entropy(np.eye(4)[None])[0].tolist() == [0.0] * 4
    np.testing.assert_allclose(metrics.entropy(np.full((1, 5, 5), 0.2)), np.log(5), rtol=1e-15)
    masked = np.array([[0.5, 0.5, 0.0]])
    # log 2 / log 2: the same float divided by itself
    normalized = metrics.entropy(masked, mask=np.array([[True, True, False]]), normalize=True)[0]
    assert normalized == pytest.approx(1.0, rel=1e-15, abs=0.0)


def test_entropy_from_logits_is_finite_where_entropy_is_not():
    s = np.array([[[0.0, 1.0, -np.inf, 2.0]]])
    dh = np.random.default_rng(4).standard_normal((1, 1))  # random cotangent, never all ones
    g = metrics.entropy_from_logits_backward(dh, s).ds
    assert np.isfinite(g).all() and g[0, 0, 2] == 0.0
    p = refattn.softmax(s)
    # different formulas (lse - Σ p s against -Σ p log p) of 3 terms: a few ulps apart (5e-16 measured)
    assert metrics.entropy_from_logits(s)[0, 0] == pytest.approx(metrics.entropy(p)[0, 0], rel=1e-14, abs=0.0)
    assert np.isinf(metrics.entropy_backward(dh, p).dP[0, 0, 2])


def test_head_importance_conventions():
    g = np.array([[[1.0, -2.0]], [[-1.0, 2.0]]])  # (N=2, L=1, H=2)
    # small integers: exact
    np.testing.assert_array_equal(metrics.head_importance(g, normalize=None), [[1.0, 2.0]])
    per_token = np.array([[[[1.0, -2.0]], [[-1.0, 2.0]]]])  # (N=1, T=2, L=1, H=2): cancels per example
    np.testing.assert_array_equal(metrics.head_importance(per_token, normalize=None), [[0.0, 0.0]])
    np.testing.assert_array_equal(metrics.head_importance(per_token, per="token", normalize=None), [[1.0, 2.0]])
    # x / |x| then |.| again: a rounding or two
    np.testing.assert_allclose(np.linalg.norm(metrics.head_importance(g), axis=-1), 1.0, rtol=1e-15, atol=0.0)


def test_weight_norm_importance_uses_each_heads_slices():
    p = refattn.MHAParams(np.ones((2, 4)), np.ones((2, 2)) * 2, np.ones((2, 2)), np.ones((4, 2)))
    # two query heads of width 2 share one kv head (GQA): |w_q^h|² = 4, |w_k|² = 16, |w_v|² = 4
    got = metrics.weight_norm_importance(p, num_heads=2)
    np.testing.assert_allclose(got, [np.sqrt(24.0)] * 2, rtol=1e-15, atol=0.0)


def test_value_norms_match_the_explicit_per_head_formula():
    rng = np.random.default_rng(0)
    h, dv, d = 2, 3, 4
    p = refattn.softmax(rng.standard_normal((h, 3, 5)))
    x, w_v, b_v, w_o = (
        rng.standard_normal((5, d)),
        rng.standard_normal((d, h * dv)),
        rng.standard_normal(h * dv),
        rng.standard_normal((h * dv, d)),
    )
    out = metrics.value_norms(p, x, w_v, b_v, w_o)
    for head in range(h):
        cols = slice(head * dv, (head + 1) * dv)
        f = (x @ w_v[:, cols] + b_v[cols]) @ w_o[cols]
        np.testing.assert_allclose(out[head], p[head] * np.linalg.norm(f, axis=-1), rtol=1e-13)


def test_summarize_gives_a_layer_by_head_table():
    rng = np.random.default_rng(1)
    maps = [refattn.softmax(rng.standard_normal((2, 3, 4, 4))) for _ in range(2)]
    table = metrics.summarize(maps, tokens=np.array([1, 2, 1, 2]))
    assert set(table) >= {
        "entropy",
        "normalized_entropy",
        "confidence",
        "mean_distance",
        "locality",
        "diagonal_strength",
        "attention_to_first",
        "diversity",
        "induction",
    }
    assert table["entropy"].shape == (2, 3) and table["diversity"].shape == (2,)
    np.testing.assert_allclose(
        table["confidence"][1], metrics.head_confidence(maps[1]).mean(axis=0), rtol=1e-15, atol=1e-16
    )


def test_linguistic_heuristics():
    p = np.eye(4)[None] * 0.5 + np.full((1, 4, 4), 0.125)
    # dyadic values: the means are exact
    assert metrics.pair_attention(p, [(0, 0), (1, 2)])[0] == pytest.approx((0.625 + 0.125) / 2, rel=1e-15, abs=0.0)
    assert metrics.phrases_from_tags(["DET", "NOUN", "VERB", "ADJ", "NOUN", "NOUN"]) == [[0, 1], [3, 4, 5]]
    assert metrics.group_attention(p, [[0, 1]])[0] == pytest.approx(0.125, rel=1e-15, abs=0.0)


# ---- the property table and its mutants ---------------------------------------------------------

PROPERTIES = [
    (check_entropy_in_range, map_cases(), "entropy_without_the_zero_log_zero_guard"),
    (check_per_example_metrics_equal_cropped_maps, padded_maps, "padded_rows_counted"),
    (check_js_symmetric_zero_iff_equal_and_sqrt_is_a_metric, two_maps, "js_distance_without_sqrt"),
    (check_detectors_and_confidence_in_range, square_maps, "detector_not_normalised"),
    (check_detectors_match_transformerlens, square_maps, "induction_without_the_shift"),
]


def _unguarded_xlogx(p):
    with np.errstate(divide="ignore", invalid="ignore"):
        return p * np.log(p)


MUTANTS = {
    "entropy_without_the_zero_log_zero_guard": lambda mp: mp.setattr(dist_mod, "_xlogx", _unguarded_xlogx),
    "padded_rows_counted": lambda mp: (
        mp.setattr(maps_mod, "row_mean", lambda values, rows: np.asarray(values).mean(axis=-1))
        or mp.setattr(dist_mod, "row_mean", maps_mod.row_mean)
        or mp.setattr(pos_mod, "row_mean", maps_mod.row_mean)
        or mp.setattr(importlib.import_module("refattn.metrics.tokens"), "row_mean", maps_mod.row_mean)
    ),
    "js_distance_without_sqrt": lambda mp: mp.setattr(metrics, "js_distance", metrics.js_divergence),
    "detector_not_normalised": lambda mp: mp.setattr(
        det_mod,
        "_pattern_for",
        (lambda real: lambda *args: 3.0 * real(*args))(det_mod._pattern_for),
    ),
    "induction_without_the_shift": lambda mp: mp.setattr(det_mod, "induction_pattern", det_mod.duplicate_token_pattern),
}


test_property, test_property_catches_its_mutant = property_table(PROPERTIES, MUTANTS)


def test_crop_property_holds_for_case_objects():
    # the strategy's key-padding masks always keep key 0, so a crop is never empty
    real = np.array([[True, False]])
    case = Case((refattn.softmax(np.zeros((1, 1, 2, 2)), mask=real[:, None, None, :]),), {"mask": real})
    check_per_example_metrics_equal_cropped_maps(case)
