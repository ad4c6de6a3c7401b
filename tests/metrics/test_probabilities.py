"""Maps must be probabilities: every metric, detector, rollout and flow refuses a map whose real rows
are not non-negative and summing to 1 (within 1e-6) over their allowed keys, naming the argument,
the first offending row, its sum and minimum, and saying so when the values look like logits;
``check_probabilities=False`` measures the map as it is.  Bad flags and token ids are refused too."""

import importlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from refattn import metrics
from tests.metrics.test_padding import NAMES, _call, padded_cases
from tests.mutation import assert_catches

maps_mod = importlib.import_module("refattn.metrics._maps")

CHECKED = [n for n in NAMES if n != "entropy_from_logits"]  # that one takes logits


def _target(name, case):
    """(input position, the map, argument name, index of its first real row) of a case."""
    inputs = case.inputs
    if name in ("rollout", "attention_flow"):
        p, arg = inputs[0][0], "attentions[0]"
    elif name == "summarize":
        p, arg = inputs[0][0], "attentions[0]"
    else:
        p, arg = inputs[0], {"js_divergence": "P1", "js_distance": "P1", "head_diversity": "P_heads"}.get(name, "P")
        if name == "diversity_regularizer":
            arg = "P_heads"
    lq, lk = p.shape[-2:]
    mask = case.options.get("mask")
    first = 0
    if mask is not None and lq == lk:  # a key-padding mask of a square map marks the padded rows
        real = np.asarray(mask).reshape(-1, lk)[0]
        first = int(np.argmax(real))
    return p, arg, (0,) * (p.ndim - 2) + (first,)


def _with_row_scaled(name, case, factor):
    """The case with the first real row of its (first) map multiplied by ``factor``."""
    p, arg, row = _target(name, case)
    q = p.copy()
    q[row] *= factor
    if name in ("rollout", "attention_flow"):
        layers = case.inputs[0].copy()
        layers[0] = q
        inputs = (layers,)
    elif name == "summarize":
        inputs = ([q] + list(case.inputs[0][1:]),)
    else:
        inputs = (q,) + tuple(case.inputs[1:])
    return type(case)(inputs, case.options), arg, row


def _row_text(row):
    return f"row {row}" if len(row) > 1 else f"row {row[0]}"


@st.composite
def scaled_cases(draw, name):
    pc = draw(padded_cases(name))
    factor = draw(st.sampled_from([1.0 + 1e-4, 1.8, 0.2, -1.0]))
    return name, pc.case, pc.extra, factor


def check_non_probabilities_are_refused(drawn):
    name, case, extra, factor = drawn
    bad, arg, row = _with_row_scaled(name, case, factor)
    opts = {**bad.options, **extra}
    try:
        _call(name, bad.inputs, opts)
    except refattn.RefAttnError as err:
        text = str(err)
    else:
        raise AssertionError(f"{name}: a map with row {row} scaled by {factor} was accepted")
    assert text.startswith(f"{arg}: expected probabilities"), text
    assert f"got {_row_text(row)} with sum" in text, text
    assert ("these look like logits" in text) == (factor < 0 or abs(factor - 1) > 0.5), text
    if name != "attention_flow" or factor > 0:  # negative capacities: no max-flow to measure
        _call(name, bad.inputs, {**opts, "check_probabilities": False})  # measured as it is


@pytest.mark.parametrize("name", CHECKED)
@given(data=st.data())
def test_non_probabilities_are_refused(name, data):
    check_non_probabilities_are_refused(data.draw(scaled_cases(name)))


def test_refusal_check_catches_a_missing_check(monkeypatch):
    for module in ("refattn.metrics._maps", "refattn.metrics.norms", "refattn.rollout_flow"):  # every importer
        monkeypatch.setattr(importlib.import_module(module), "check_probability_rows", lambda *a, **k: None)
    assert_catches(scaled_cases("entropy"), check_non_probabilities_are_refused)
    assert_catches(scaled_cases("rollout"), check_non_probabilities_are_refused)


# ---- examples -----------------------------------------------------------------------------------


def _maps(shape=(2, 3, 4, 4), seed=0):
    return refattn.softmax(np.random.default_rng(seed).standard_normal(shape))


def test_logits_are_named_with_the_row_and_a_hint():
    logits = np.random.default_rng(1).standard_normal((2, 3, 4, 4)) * 3
    with pytest.raises(refattn.RefAttnError, match="these look like logits: apply softmax first") as err:
        metrics.entropy(logits)
    text = str(err.value)
    assert text.startswith("P: expected probabilities")
    row = logits[0, 0, 0]
    assert f"row (0, 0, 0) with sum {row.sum():.10g} and min {row.min():.10g}" in text
    with pytest.raises(refattn.RefAttnError, match=r"attentions\[0\]: .* these look like logits"):
        refattn.rollout(logits[None])
    with pytest.raises(refattn.RefAttnError, match=r"attentions\[0\]: .* these look like logits"):
        refattn.attention_flow(logits[:1, :, :3, :3][None])
    # positive scores far from normalised: also a logit-like mistake
    with pytest.raises(refattn.RefAttnError, match="these look like logits"):
        metrics.entropy(np.exp(logits))


def test_tolerance_is_1e_6_in_float64_and_n_eps_in_low_precision():
    p = _maps()
    metrics.entropy(p * (1 + 5e-7))
    with pytest.raises(refattn.RefAttnError, match="within 1e-06") as err:
        metrics.entropy(p * (1 + 2e-6))
    assert "look like logits" not in str(err.value)
    long_rows = refattn.softmax(np.random.default_rng(2).standard_normal((1, 2, 300)) * 4).astype(np.float32)
    metrics.entropy(long_rows)  # float32 rows of 300 keys: tolerance 300 · eps(float32) = 3.6e-5
    assert maps_mod.probability_tolerance(300, np.float32) == pytest.approx(300 * 2.0**-23, rel=1e-15)
    assert maps_mod.probability_tolerance(4, np.float64) == 1e-6
    assert maps_mod.probability_tolerance(10**6, np.float16) == 1e-2


def test_padded_and_fully_masked_rows_are_exempt():
    p = _maps((1, 2, 4, 4))
    real = np.array([[True, True, True, False]])
    p = refattn.softmax(np.random.default_rng(3).standard_normal((1, 2, 4, 4)), mask=real[:, None, None, :])
    p[..., 3, :] = 7.0  # a padded query row: anything
    metrics.entropy(p, mask=real)
    refattn.rollout(p, mask=real[0])
    full = np.ones((4, 4), dtype=bool)
    full[2] = False  # a fully masked row under a full mask
    q = _maps((1, 4, 4))
    q[0, 2] = -3.0
    metrics.entropy(q, mask=full)


def test_weight_on_masked_keys_is_explained():
    p = _maps((1, 1, 4, 4))  # softmax over all four keys
    with pytest.raises(refattn.RefAttnError, match="puts weight on masked keys"):
        metrics.entropy(p, mask=np.array([True, True, True, False]))
    with pytest.raises(refattn.RefAttnError, match="puts weight on masked keys"):
        refattn.rollout(p[None], mask=np.array([True, True, True, False]))


def test_an_empty_real_row_is_explained():
    with pytest.raises(refattn.RefAttnError, match="a row without any weight") as err:
        metrics.entropy(np.array([[0.5, 0.5], [0.0, 0.0]]))
    assert "row 1 with sum 0" in str(err.value)


def test_check_probabilities_false_measures_sinks_and_logits_as_they_are():
    p = _maps((1, 4, 4)) * 0.9  # 10% of each row on a sink
    np.testing.assert_allclose(metrics.attention_given(p, check_probabilities=False), 0.9, rtol=1e-15, atol=0.0)
    assert np.isfinite(refattn.rollout(p[None], check_probabilities=False)).all()
    with pytest.raises(refattn.RefAttnTypeError, match="check_probabilities"):
        metrics.entropy(p, check_probabilities="no")


def test_non_bool_normalize_and_float_tokens_are_refused():
    p = _maps()
    with pytest.raises(refattn.RefAttnTypeError, match="normalize: expected True or False, got str 'yes'"):
        metrics.entropy(p, normalize="yes")
    with pytest.raises(refattn.RefAttnTypeError, match="normalize"):
        metrics.entropy_backward(np.ones(p.shape[:-1]) * 0.3, p, normalize=1)
    with pytest.raises(refattn.RefAttnTypeError, match="tokens: expected token ids"):
        metrics.summarize([p], tokens=np.array([0.5, 1.0, 2.0, 3.0]))
    with pytest.raises(refattn.RefAttnTypeError, match="tokens: expected token ids"):
        metrics.induction_score(p, [0.0, 1.0, 0.0, 1.0])
    table = metrics.summarize([p], tokens=np.array(["a", "b", "a", "b"]))  # strings are token ids too
    assert table["induction"].shape == (1, 3)
