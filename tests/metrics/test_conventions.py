"""The API conventions of the metrics, rollout and softmax family (issue 12, point 2; ``DESIGN.md`` §3).

* Options are keyword-only: the only positional parameters of a public function are its data arrays,
  listed per function in :data:`DATA` (a function missing from the table fails).
* One cotangent rule: ``name_backward(d_<output>, <the forward's data>, *, <the forward's options>)``,
  ``<output>`` the name the forward's docstring gives its result (:data:`OUTPUT`).
* One grads rule: a backward returns a NamedTuple with one field ``d<input>`` per differentiable
  input, in input order (:data:`DIFFERENTIABLE`) — :class:`refattn.metrics.MapGrads` ``(dP)`` for
  every metric of one map ``P``, ``RolloutGrads(dattentions)`` for rollout.
* One mask polarity: every ``mask=`` is True = keep (a real token, an entry that takes part), said
  in the docstring; an all-True mask changes nothing.
"""

from __future__ import annotations

import importlib
import inspect
import re

import numpy as np
import pytest

import refattn
from refattn import metrics, rollout_flow, softmax_family

MODULES = [
    importlib.import_module(f"refattn.metrics.{m}")
    for m in (
        "detectors",
        "distribution",
        "importance",
        "linguistic",
        "norms",
        "position",
        "regularizers",
        "summary",
        "tokens",
    )
] + [rollout_flow, softmax_family]

# The positional parameters (data arrays) of every public function; everything else is keyword-only.
DATA = {
    # detectors
    "duplicate_token_pattern": ("tokens",),
    "induction_pattern": ("tokens",),
    "previous_token_score": ("P",),
    "duplicate_token_score": ("P", "tokens"),
    "induction_score": ("P", "tokens"),
    "pattern_score": ("P", "pattern"),
    # distribution
    "entropy": ("P",),
    "entropy_from_logits": ("s",),
    "max_weight": ("P",),
    "head_confidence": ("P",),
    "js_divergence": ("P1", "P2"),
    "js_distance": ("P1", "P2"),
    "head_diversity": ("P_heads",),
    "detect_collapse": ("P",),
    "detect_uniform": ("P",),
    # importance
    "head_importance": ("grads_of_head_mask",),
    "weight_norm_importance": ("params",),
    # linguistic
    "pair_attention": ("P", "pairs"),
    "group_attention": ("P", "groups"),
    "phrase_attention": ("P", "pos_tags"),
    "phrases_from_tags": ("pos_tags",),
    # norms
    "value_norms": ("P", "x", "w_v", "b_v", "w_o"),
    # position
    "mean_distance": ("P",),
    "locality_score": ("P",),
    "expected_offset": ("P",),
    "offset_attention": ("P",),
    "diagonal_strength": ("P",),
    "positional_bias": ("P",),
    "self_context_balance": ("P",),
    # regularizers
    "entropy_regularizer": ("P",),
    "diversity_regularizer": ("P_heads",),
    # summary
    "summarize": ("attentions", "tokens"),
    # tokens
    "attention_received": ("P",),
    "attention_given": ("P",),
    "attention_to": ("P", "positions"),
    "function_word_ratio": ("P", "tokens"),
    "allocation_efficiency": ("P", "important"),
    "special_token_bias": ("P", "special_positions"),
    "top_tokens": ("P",),
    "key_set": ("keys", "shape"),
    # rollout and flow
    "rollout": ("attentions",),
    "attention_flow": ("attentions",),
    # softmax family
    "softmax": ("x",),
    "log_softmax": ("x",),
    "logsumexp": ("x",),
}

# The name each differentiable forward's docstring gives its result: its backward takes d_<name>.
OUTPUT = {
    "previous_token_score": "score",
    "duplicate_token_score": "score",
    "induction_score": "score",
    "pattern_score": "score",
    "entropy": "entropy",
    "entropy_from_logits": "entropy",
    "max_weight": "max_weight",
    "head_confidence": "confidence",
    "js_divergence": "js",
    "js_distance": "distance",
    "head_diversity": "diversity",
    "pair_attention": "score",
    "group_attention": "score",
    "phrase_attention": "score",
    "value_norms": "norms",
    "mean_distance": "distance",
    "locality_score": "locality",
    "expected_offset": "offset",
    "offset_attention": "mass",
    "diagonal_strength": "strength",
    "positional_bias": "mass",
    "self_context_balance": "balance",
    "entropy_regularizer": "loss",
    "diversity_regularizer": "loss",
    "attention_received": "received",
    "attention_given": "given",
    "attention_to": "mass",
    "function_word_ratio": "ratio",
    "allocation_efficiency": "efficiency",
    "rollout": "R",
    "softmax": "y",
    "log_softmax": "y",
    "logsumexp": "y",
}

_MAP = ("P",)
DIFFERENTIABLE = {name: _MAP for name in OUTPUT}
DIFFERENTIABLE.update(
    {
        "entropy_from_logits": ("s",),
        "js_divergence": ("P1", "P2"),
        "js_distance": ("P1", "P2"),
        "head_diversity": ("P_heads",),
        "diversity_regularizer": ("P_heads",),
        "value_norms": ("P", "x", "w_v", "b_v", "w_o"),
        "rollout": ("attentions",),
        "softmax": ("x",),
        "log_softmax": ("x",),
        "logsumexp": ("x", "b"),  # b: an array option (None without it: db is None)
    }
)


def _public_functions():
    """``{name: function}`` of every public function of :data:`MODULES` (classes and constants left out)."""
    out = {}
    for module in MODULES:
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj):
                out[name] = obj
    return out


PUBLIC = _public_functions()
BACKWARDS = sorted(n for n in PUBLIC if n.endswith("_backward"))
FORWARDS = sorted(n for n in PUBLIC if not n.endswith("_backward"))


def _positional(fn):
    params = inspect.signature(fn).parameters.values()
    assert not any(p.kind is p.VAR_POSITIONAL for p in params), f"{fn.__name__} takes *args"
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _keyword_only(fn):
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}


def test_the_tables_cover_every_public_function():
    assert set(FORWARDS) == set(DATA), sorted(set(FORWARDS) ^ set(DATA))
    assert {b.removesuffix("_backward") for b in BACKWARDS} == set(OUTPUT), "a backward without its output's name"
    assert set(OUTPUT) <= set(FORWARDS)


@pytest.mark.parametrize("name", FORWARDS)
def test_options_are_keyword_only(name):
    """Only the data arrays are positional (``detect_collapse(P, threshold, fraction)`` is no more)."""
    assert _positional(PUBLIC[name]) == DATA[name]


@pytest.mark.parametrize("name", BACKWARDS)
def test_backward_takes_d_output_then_the_forwards_inputs_and_options(name):
    forward = name.removesuffix("_backward")
    backward = PUBLIC[name]
    assert _positional(backward) == ("d_" + OUTPUT[forward],) + DATA[forward]
    own = _keyword_only(PUBLIC[forward])
    # the cotangents of the other outputs (logsumexp_backward's d_sign) are keywords, not options
    taken = {n: d for n, d in _keyword_only(backward).items() if not n.startswith("d_")}
    # the forward's options, with the forward's defaults; output selectors and backends aside
    # (a backward runs NumPy), and a backward adds no option of its own
    selectors = {"backend"} | {n for n in own if n.startswith("return_") and n not in taken}
    assert set(taken) == set(own) - selectors, sorted(set(taken) ^ (set(own) - selectors))
    assert all(taken[n] == own[n] for n in taken)


@pytest.mark.parametrize("forward", sorted(OUTPUT))
def test_the_forward_docstring_names_its_output(forward):
    doc = inspect.getdoc(PUBLIC[forward]) or ""
    out = OUTPUT[forward]
    assert f"``{out}`` " in doc or f"``{out} (" in doc or f"``{out} =" in doc or f"``{out}``:" in doc, (
        f"{forward}: the docstring does not name its output {out!r}"
    )


# ---- calls: a small example of every function -----------------------------------------------------

_rng = np.random.default_rng(12)
_P = softmax_family.softmax(_rng.standard_normal((2, 3, 3)))  # H = 2 heads of 3 tokens
_P2 = softmax_family.softmax(_rng.standard_normal((2, 3, 3)))
_S = _rng.standard_normal((2, 3, 3))
_A = softmax_family.softmax(_rng.standard_normal((2, 2, 3, 3)))  # 2 layers
_X = _rng.standard_normal((2, 3))
_TOKENS = np.array([1, 2, 1])
_VALUE_NORMS = (
    _P,
    _rng.standard_normal((3, 4)),  # x (Lk, d_model)
    _rng.standard_normal((4, 4)),  # w_v (d_model, H·dv), dv = 2
    _rng.standard_normal(4),  # b_v
    _rng.standard_normal((4, 4)),  # w_o
)
_PARAMS = refattn.MHAParams(*(_rng.standard_normal((4, 4)) for _ in range(4)), *(np.zeros(4),) * 4)

EXAMPLES = {  # name -> (positional data, options)
    "duplicate_token_pattern": ((_TOKENS,), {}),
    "induction_pattern": ((_TOKENS,), {}),
    "previous_token_score": ((_P,), {}),
    "duplicate_token_score": ((_P, _TOKENS), {}),
    "induction_score": ((_P, _TOKENS), {}),
    "pattern_score": ((_P, np.eye(_P.shape[-1], k=-1)), {}),
    "entropy": ((_P,), {}),
    "entropy_from_logits": ((_S,), {}),
    "max_weight": ((_P,), {}),
    "head_confidence": ((_P,), {}),
    "js_divergence": ((_P, _P2), {}),
    "js_distance": ((_P, _P2), {}),
    "head_diversity": ((_P,), {}),
    "detect_collapse": ((_P,), {"threshold": 0.5}),
    "detect_uniform": ((_P,), {"tolerance": 0.5}),
    "head_importance": ((_rng.standard_normal((3, 2, 2, 2)),), {"per": "token"}),  # (N, T, L, H)
    "weight_norm_importance": ((_PARAMS,), {"num_heads": 2}),
    "pair_attention": ((_P, [(1, 0), (2, 1)]), {}),
    "group_attention": ((_P, [[0, 2]]), {}),
    "phrase_attention": ((_P, ["DET", "NOUN", "VERB"]), {}),
    "phrases_from_tags": ((["DET", "NOUN", "VERB"],), {}),
    "value_norms": (_VALUE_NORMS, {}),
    "mean_distance": ((_P,), {}),
    "locality_score": ((_P,), {}),
    "expected_offset": ((_P,), {}),
    "offset_attention": ((_P,), {"offset": -1}),
    "diagonal_strength": ((_P,), {}),
    "positional_bias": ((_P,), {}),
    "self_context_balance": ((_P,), {}),
    "entropy_regularizer": ((_P,), {}),
    "diversity_regularizer": ((_P,), {}),
    "summarize": (([_P, _P2], _TOKENS), {}),
    "attention_received": ((_P,), {}),
    "attention_given": ((_P,), {}),
    "attention_to": ((_P, [0]), {}),
    "function_word_ratio": ((_P, ["the", "cat", "of"]), {}),
    "allocation_efficiency": ((_P, [1, 2]), {}),
    "special_token_bias": ((_P, [0]), {}),
    "top_tokens": ((_P,), {"k": 2}),
    "key_set": (([0, 2], _P.shape), {}),
    "rollout": ((_A,), {}),
    "attention_flow": ((_A,), {}),
    "softmax": ((_X,), {}),
    "log_softmax": ((_X,), {}),
    "logsumexp": ((_X,), {}),
}


def test_every_function_has_an_example():
    assert set(EXAMPLES) == set(FORWARDS), sorted(set(EXAMPLES) ^ set(FORWARDS))


@pytest.mark.parametrize("name", FORWARDS)
def test_an_option_passed_positionally_is_refused(name):
    """One positional argument past the data arrays is a TypeError (the options are keyword-only)."""
    inputs, options = EXAMPLES[name]
    PUBLIC[name](*inputs, **options)  # the example itself is valid
    with pytest.raises(TypeError, match="positional argument"):
        PUBLIC[name](*inputs, 0.5, **options)


@pytest.mark.parametrize("forward", sorted(OUTPUT))
def test_backward_returns_one_d_field_per_differentiable_input(forward):
    inputs, options = EXAMPLES[forward]
    out = PUBLIC[forward](*inputs, **options)
    d_out = np.random.default_rng(1).standard_normal(np.shape(out))  # random, never all ones
    grads = PUBLIC[forward + "_backward"](d_out, *inputs, **options)
    assert isinstance(grads, tuple) and hasattr(grads, "_fields"), f"{forward}_backward: not a NamedTuple"
    assert grads._fields == tuple("d" + n for n in DIFFERENTIABLE[forward])
    for n, g in zip(DIFFERENTIABLE[forward], grads):
        given = inputs[DATA[forward].index(n)] if n in DATA[forward] else options.get(n)
        assert (g is None) == (given is None)
        assert g is None or (g.dtype == np.float64 and g.shape == np.shape(given)), (n, np.shape(g), np.shape(given))
    if DIFFERENTIABLE[forward] == _MAP:
        assert type(grads) is metrics.MapGrads, f"{forward}_backward returns {type(grads).__name__}, not MapGrads"


def test_one_map_grads_class():
    """One ``MapGrads`` (``refattn.metrics._maps``, exported by ``refattn.metrics``); no other class of
    one ``dP`` field, and the old per-family classes are gone."""
    maps = importlib.import_module("refattn.metrics._maps")
    assert metrics.MapGrads is maps.MapGrads and "MapGrads" in metrics.__all__
    for module in MODULES:
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, type) and getattr(obj, "_fields", None) == ("dP",):
                assert obj is metrics.MapGrads, f"{module.__name__}.{name}"
    for old in (
        "DetectorGrads",
        "EntropyGrads",
        "MaxWeightGrads",
        "EntropyRegularizerGrads",
        "DiversityRegularizerGrads",
    ):
        assert not hasattr(metrics, old), old


def test_rollout_backward_stacks_the_layers_whatever_their_container():
    d_R = np.random.default_rng(2).standard_normal((3, 3))
    stacked = refattn.rollout_backward(d_R, _A, start_layer=1)
    assert isinstance(stacked, rollout_flow.RolloutGrads) and stacked._fields == ("dattentions",)
    assert stacked.dattentions.shape == _A.shape
    assert (stacked.dattentions[0] == 0).all()  # before start_layer
    for container in (list, iter):
        again = refattn.rollout_backward(d_R, container(_A), start_layer=1)
        np.testing.assert_array_equal(again.dattentions, stacked.dattentions)


# ---- masks: True = keep ---------------------------------------------------------------------------

MASKED = sorted(n for n in FORWARDS if "mask" in inspect.signature(PUBLIC[n]).parameters)
_POLARITY = {"softmax_family": "True = the entry takes part"}  # the metrics, rollout and flow: a real token


def _all_true_mask(name, inputs):
    if name in ("softmax", "log_softmax", "logsumexp"):
        return np.ones(np.shape(inputs[0]), dtype=bool)
    if name == "head_importance":  # real tokens (N, T) of per-token gradients (N, T, L, H)
        return np.ones(np.shape(inputs[0])[:2], dtype=bool)
    first = inputs[0][0] if name == "summarize" else inputs[0]
    return np.ones(np.shape(first)[-1], dtype=bool)  # a key-padding mask (n,): every token real


MASKED_BACKWARDS = sorted(b for b in BACKWARDS if "mask" in inspect.signature(PUBLIC[b]).parameters)


def _says_true_is_keep(name):
    module = PUBLIC[name].__module__.rsplit(".", 1)[-1]
    return _POLARITY.get(module, "True = real token") in " ".join((inspect.getdoc(PUBLIC[name]) or "").split())


@pytest.mark.parametrize("name", MASKED + MASKED_BACKWARDS)
def test_the_mask_docstring_states_true_is_keep(name):
    """The docstring says what True means; a backward may instead refer to its forward, which does."""
    if _says_true_is_keep(name):
        return
    forward = name.removesuffix("_backward")
    assert name != forward, f"{name}: the docstring does not say what mask=True means"
    assert f":func:`{forward}`" in (inspect.getdoc(PUBLIC[name]) or ""), (
        f"{name}: neither says it nor refers to {forward}"
    )
    assert _says_true_is_keep(forward), forward


@pytest.mark.parametrize("name", MASKED)
def test_an_all_true_mask_changes_nothing(name):
    """True = keep: masking nothing out gives the unmasked result (the opposite polarity would mask all)."""
    inputs, options = EXAMPLES[name]
    fn = PUBLIC[name]
    plain = fn(*inputs, **options)
    masked = fn(*inputs, mask=_all_true_mask(name, inputs), **options)
    if isinstance(plain, dict):
        assert plain.keys() == masked.keys()
        for key in plain:
            np.testing.assert_allclose(masked[key], plain[key], rtol=1e-14, atol=1e-15, err_msg=key)
    else:
        np.testing.assert_allclose(masked, plain, rtol=1e-14, atol=1e-15)


def test_no_argument_takes_the_opposite_polarity():
    """No ``key_padding_mask``/``is_padding``-like parameter: every mask of these modules is True = keep."""
    opposite = re.compile(r"padding|is_pad|ignore")
    for name, fn in PUBLIC.items():
        bad = [p for p in inspect.signature(fn).parameters if opposite.search(p)]
        assert not bad, f"{name}: {bad}"
