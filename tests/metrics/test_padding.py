"""Padding as a property: every metric, detector, rollout and attention flow of a map padded on the
left and/or right (contiguously), with the padding given as the op's key-padding / real-token
``mask``, equals the op on the cropped map — exactly, up to sums taken in another order (1e-12).

One property, ``check_padding_equals_cropping``, iterates the registered metric-like ops
(``refattn._registry.OPS``: metrics, rollout) and the unregistered ones listed in ``EXTRA``; the
table ``PAD`` says, per op, how its other arguments move with the padding and which axes of its
result are token axes.  Padded entries hold garbage (they are masked), pad token ids collide with
real ones and pad POS tags are phrase tags, so a metric that reads a padded entry is caught.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import refattn
from refattn import _registry, metrics
from refattn.testing.strategies import Case, map_cases, rollout_cases
from tests.mutation import assert_catches

pos_mod = importlib.import_module("refattn.metrics.position")
det_mod = importlib.import_module("refattn.metrics.detectors")
sum_mod = importlib.import_module("refattn.metrics.summary")
ling_mod = importlib.import_module("refattn.metrics.linguistic")

CLOSE = dict(rtol=1e-12, atol=1e-14)  # the padded map's sums run over extra zeros, in another order
PAD_ID, PAD_WORD, PAD_TAG = 0, "the", "NOUN"  # a real token id, a function word, a phrase tag


@dataclass(frozen=True)
class Pad:
    """How one op is padded.

    ``out``: the token axes of the result — ``"row"`` (…, Lq), ``"key"`` (…, Lk), ``"map"`` (none),
    ``"square"`` (…, Lq, Lk), ``"indices"`` (key indices, shifted), ``"table"`` (a dict of per-head
    values).  ``args``: (option, kind) pairs that move with the padding.  ``positional``: the op reads
    raw positions ``j − i``, so a non-square map (keys padded only) is padded on the right only.
    ``fill``: what padded entries hold.  ``draw``: extra options ``(draw, case) -> dict``.
    """

    out: str = "map"
    args: tuple = ()
    positional: bool = False
    fill: str = "garbage"
    draw: Callable | None = None
    close: dict | None = None


def _detector_flags(draw, case):
    return {"exclude_bos": draw(st.booleans()), "exclude_current_token": draw(st.booleans())}


def _rollout_rows(draw, case):
    if case.options.get("return_all") or draw(st.booleans()):
        return {}
    n = case.inputs[0].shape[-1]
    return {"rows": draw(st.sampled_from([0, n - 1, [n - 1, 0]]))}


def _normalize(draw, case):
    return {"normalize": draw(st.booleans())}


def _flow_options(draw, case):
    layers = case.inputs[0].shape[0]
    return {"output_layer": draw(st.integers(1, layers)), "normalize": draw(st.booleans())}


def _top_k(draw, case):
    return {"k": draw(st.integers(1, int(np.min(_cropped_mask("top_tokens", case).sum(axis=-1)))))}


PAD = {
    "entropy": Pad("row", draw=_normalize),
    "max_weight": Pad("row"),
    "head_confidence": Pad(),
    "js_divergence": Pad("row"),
    "js_distance": Pad("row"),
    "head_diversity": Pad(),
    "mean_distance": Pad("row", positional=True),
    "locality_score": Pad("row", positional=True),
    "expected_offset": Pad("row", positional=True),
    "diagonal_strength": Pad(positional=True),
    "offset_attention": Pad(positional=True),
    "positional_bias": Pad(),
    "self_context_balance": Pad(positional=True),
    "attention_received": Pad("key"),
    "attention_given": Pad("row"),
    "attention_to": Pad(args=(("positions", "keys"),)),
    "function_word_ratio": Pad(args=(("tokens", "words"),)),
    "allocation_efficiency": Pad(args=(("important", "keys"),)),
    "previous_token_score": Pad(draw=_detector_flags),
    "duplicate_token_score": Pad(args=(("tokens", "ids"),), draw=_detector_flags),
    "induction_score": Pad(args=(("tokens", "ids"),), draw=_detector_flags),
    "pattern_score": Pad(draw=_detector_flags),  # its pattern (an input) moves with the map: _padded_call
    "pair_attention": Pad(args=(("pairs", "pairs"),)),
    "group_attention": Pad(args=(("groups", "groups"),), positional=True),
    "phrase_attention": Pad(args=(("pos_tags", "tags"),), positional=True),
    "entropy_regularizer": Pad(),
    "diversity_regularizer": Pad(),
    "entropy_from_logits": Pad("row", fill="logits"),
    "value_norms": Pad("square", fill="zero"),  # no mask: padded rows uniform, padded keys 0
    "rollout": Pad("square", args=(("rows", "rows"), ("protect", "pairs")), draw=_rollout_rows),
    # not registered (no backward): their strategies are in EXTRA
    "attention_flow": Pad("square", draw=_flow_options, close=dict(rtol=1e-9, atol=1e-10)),  # HiGHS: tol. 1e-10
    "detect_collapse": Pad(),
    "detect_uniform": Pad(),
    "special_token_bias": Pad(args=(("special_positions", "keys"),)),
    "top_tokens": Pad("indices", draw=_top_k),
    "summarize": Pad("table", args=(("tokens", "ids"),)),
}

SHARED = ("keys", "words", "pairs", "groups", "tags", "rows")  # one list for the whole batch: same pads


def _special(draw, shape):
    return {"special_positions": sorted(draw(st.sets(st.integers(0, shape[-1] - 1), min_size=1)))}


def _flow_case(case):
    o = {k: v for k, v in case.options.items() if k in ("residual", "head_fusion", "mask")}
    return Case(case.inputs, o)


@st.composite
def _summary_cases(draw):
    case = draw(map_cases(square=True))
    (p,) = case.inputs
    opts = dict(case.options)
    if draw(st.booleans()):  # one token sequence per example
        opts["tokens"] = draw(hnp.arrays(np.int64, p.shape[:-3] + p.shape[-1:], elements=st.integers(0, 2)))
    return Case(([p, p[..., ::-1, :, :]],), opts)


def _fn(name):
    return getattr(refattn, name) if name == "attention_flow" else getattr(metrics, name)


EXTRA = {
    "attention_flow": rollout_cases().map(_flow_case).filter(lambda c: c.inputs[0].shape[0] <= 2),
    "detect_collapse": st.builds(
        lambda c, t, f: Case(c.inputs, {**c.options, "threshold": t, "fraction": f}),
        map_cases(),
        st.sampled_from([0.3, 0.5, 0.8]),
        st.sampled_from([0.25, 0.5, 1.0]),
    ),
    "detect_uniform": st.builds(
        lambda c, t: Case(c.inputs, {**c.options, "tolerance": t}), map_cases(), st.sampled_from([0.02, 0.2])
    ),
    "special_token_bias": map_cases(extra=_special),
    "top_tokens": map_cases(),
    "summarize": _summary_cases(),
}


# Registered ops of the metric modules that take no attention map, each with the reason it has no padding rule.
NOT_PADDED = {
    "duplicate_token_pattern": "a pattern of token ids (no map): its real= tokens are tested with the detectors",
    "induction_pattern": "a pattern of token ids (no map): its real= tokens are tested with the detectors",
    "head_importance": "gradients of head gates (N, L, H): no token axis",
    "weight_norm_importance": "projection weights: no token axis",
}


def _metric_like(op):
    return op.forward.__module__.startswith(("refattn.metrics", "refattn.rollout_flow")) and op.name not in NOT_PADDED


REGISTERED = sorted(n for n, op in _registry.OPS.items() if _metric_like(op))
NAMES = sorted(set(REGISTERED) | set(EXTRA))


def test_every_metric_like_op_has_a_padding_rule():
    """A newly registered metric fails here until ``PAD`` says how to pad it (or ``NOT_PADDED`` why not)."""
    assert set(NAMES) == set(PAD), sorted(set(NAMES) ^ set(PAD))
    assert set(NOT_PADDED) <= set(_registry.OPS), sorted(set(NOT_PADDED) - set(_registry.OPS))
    assert {"rollout", "offset_attention", "previous_token_score", "summarize", "attention_flow"} <= set(NAMES)


# ---- padding ------------------------------------------------------------------------------------


@dataclass
class Padded:
    """A cropped case and its padding: ``total`` pads per example, ``left`` of them on the left
    (an array of the batch shape), the garbage in padded entries drawn from ``seed``."""

    name: str
    case: Case
    left: np.ndarray
    total: int
    extra: dict
    seed: int

    def __repr__(self):
        return f"Padded({self.name}, left={self.left.tolist()}, total={self.total}, extra={self.extra})\n{self.case!r}"


def _maps_of(name, case):
    """(the map array, its batch shape, whether rows are tokens too) of a case."""
    p = case.inputs[0]
    if name in ("rollout", "attention_flow"):
        return p, (), True
    if name == "summarize":
        p = p[0]
    return p, p.shape[:-3], p.shape[-1] == p.shape[-2]


def _cropped_mask(name, case):
    """The cropped case's real tokens: its own mask (which may have holes) or all True."""
    if "mask" in case.options:
        return case.options["mask"]
    p, batch, _ = _maps_of(name, case)
    return np.ones(batch + (p.shape[-1],), dtype=bool)


@st.composite
def padded_cases(draw, name):
    case = draw(EXTRA[name] if name in EXTRA else _registry.get(name).cases())
    spec = PAD[name]
    p, batch, square = _maps_of(name, case)
    uniform = any(kind in SHARED for _, kind in spec.args) or name in ("rollout", "attention_flow", "pattern_score")
    most = 2 if name == "attention_flow" else 3
    total = draw(st.integers(1, most))
    if uniform or not batch:
        lefts = np.full(batch, draw(st.integers(0, total)), dtype=np.int64)
    else:
        lefts = np.array([draw(st.integers(0, total)) for _ in range(int(np.prod(batch)))]).reshape(batch)
    if spec.positional and not square:
        lefts = np.zeros(batch, dtype=np.int64)  # raw positions: keys alone move only on the right
    extra = spec.draw(draw, case) if spec.draw else {}
    return Padded(name, case, lefts, total, extra, draw(st.integers(0, 2**32 - 1)))


def _embed(a, batch, axes, left, total, fill):
    """``a (batch + core)`` placed at offset ``left[b]`` along each of ``axes`` in arrays of length
    ``total`` there, the rest taken from ``fill(shape)``."""
    shape = list(a.shape)
    for ax in axes:
        shape[ax] = total
    out = fill(tuple(shape))
    for b in np.ndindex(*batch):
        idx = [slice(None)] * (a.ndim - len(batch))
        for ax in axes:
            idx[ax] = slice(int(left[b]), int(left[b]) + a.shape[ax])
        out[b][tuple(idx)] = a[b]
    return out


def _padded_call(pc):
    """The padded call: ``(inputs, options, square, padded length)`` — maps embedded with garbage
    around them, the mask of the real tokens, and the token-indexing arguments moved along."""
    name, case, spec = pc.name, pc.case, PAD[pc.name]
    rng = np.random.default_rng(pc.seed)
    p, batch, square = _maps_of(name, case)
    lk = p.shape[-1]
    n_pad = lk + pc.total
    left = pc.left
    axes = (-2, -1) if square else (-1,)
    garbage = {
        "garbage": lambda shape: rng.uniform(0.0, 1.0, shape),
        "logits": lambda shape: rng.standard_normal(shape),
        "zero": lambda shape: np.zeros(shape),
    }[spec.fill]

    def pad_map(a):
        out = _embed(a, batch, axes, left, n_pad, garbage)
        if spec.fill == "zero" and square:  # no mask to exempt them: padded rows are uniform rows
            for b in np.ndindex(*batch):
                pad_rows = np.ones(n_pad, dtype=bool)
                pad_rows[int(left[b]) : int(left[b]) + lk] = False
                out[b][..., pad_rows, :] = 1.0 / n_pad
        return out

    inputs = list(case.inputs)
    if name in ("attention_flow", "summarize"):
        op_inputs = ("attentions",)
    elif name in EXTRA:
        op_inputs = ("P",)
    else:
        op_inputs = _registry.get(name).inputs
    for i, arg in enumerate(op_inputs):
        if arg in ("P", "P1", "P2", "P_heads", "s", "attentions"):
            inputs[i] = [pad_map(a) for a in inputs[i]] if isinstance(inputs[i], list) else pad_map(inputs[i])
        elif arg == "x":  # value_norms' token states (..., Lk, d_model)
            inputs[i] = _embed(inputs[i], batch, (-2,), left, n_pad, lambda shape: rng.standard_normal(shape))
        elif arg == "pattern":  # pattern_score's (..., L, L), in the map's coordinates: garbage on the pads
            at = np.asarray(int(np.ravel(left)[0]) if left.size else 0).reshape(())
            inputs[i] = _embed(inputs[i], (), (-2, -1), at, n_pad, lambda shape: rng.uniform(0.0, 1.0, shape))
    opts = dict(case.options)
    opts.update(pc.extra)
    if spec.fill != "zero":  # value_norms takes no mask
        real = _cropped_mask(name, case)
        mask_batch = real.shape[:-1]
        lead = left if mask_batch else np.asarray(left).reshape(())
        opts["mask"] = _embed(real, mask_batch, (-1,), lead, n_pad, lambda shape: np.zeros(shape, dtype=bool))
        if not square and n_pad == p.shape[-2]:  # a square key-padding mask would mark query rows too
            opts["mask"] = opts["mask"][..., None, None, :] if p.ndim - len(batch) == 3 else opts["mask"][..., None, :]
    shift = int(np.ravel(left)[0]) if left.size else 0
    for option, kind in spec.args:
        if option not in opts:
            continue
        v = opts[option]
        if kind == "keys":
            opts[option] = [j + shift for j in v]
        elif kind == "rows":
            opts[option] = [j + shift for j in v] if isinstance(v, list) else v + shift
        elif kind == "pairs":
            opts[option] = [(i + (shift if square else 0), j + shift) for i, j in v]
        elif kind == "groups":
            opts[option] = [[i + shift for i in g] for g in v]
        elif kind == "tags":  # one tag per token: min(Lq, Lk) of the padded map
            tokens = min(n_pad if square else p.shape[-2], n_pad)
            opts[option] = [PAD_TAG] * shift + list(v) + [PAD_TAG] * (tokens - len(v) - shift)
        elif kind == "words":
            opts[option] = [PAD_WORD] * shift + list(v) + [PAD_WORD] * (n_pad - lk - shift)
        elif kind == "ids":
            t = np.asarray(v)
            t_batch = t.shape[:-1]
            assert t_batch == batch or not batch, "shared token ids need the same padding for every example"
            lead = left if t_batch else np.asarray(shift).reshape(())
            opts[option] = _embed(t, t_batch, (-1,), lead, n_pad, lambda shape: np.full(shape, PAD_ID))
    return inputs, opts, square, n_pad


def _call(name, inputs, opts):
    if name in ("rollout", "attention_flow"):
        return getattr(refattn, name)(*inputs, **opts)
    if name in EXTRA:
        return _fn(name)(*inputs, **opts)
    return _registry.get(name).forward(*inputs, **opts)


def _crop(name, out, pc, square, lk, lq):
    """The padded result cropped to the real tokens: ``{batch index: crop}`` (the result itself for
    per-map and table outputs, which have no token axis)."""
    spec = PAD[name]
    _, batch, _ = _maps_of(name, pc.case)
    if spec.out in ("map", "table"):
        return out
    crops = {}
    for b in np.ndindex(*batch):
        y = out[b] if batch else out
        lo = int(pc.left[b])
        rows = slice(lo, lo + lq) if square else slice(None)
        keys = slice(lo, lo + lk)
        if spec.out == "row":
            y = y[..., rows]
        elif spec.out == "key":
            y = y[..., keys]
        elif spec.out == "indices":
            y = y - lo
        elif spec.out == "square":
            y = y[..., keys] if name == "rollout" and "rows" in pc.extra else y[..., rows, keys]
        crops[b] = y
    return crops


def check_padding_equals_cropping(pc):
    name, spec = pc.name, PAD[pc.name]
    close = spec.close or CLOSE
    p, batch, _ = _maps_of(name, pc.case)
    lq, lk = p.shape[-2:]
    inputs, opts, square, _ = _padded_call(pc)
    want = _call(name, pc.case.inputs, {**pc.case.options, **pc.extra})
    got = _crop(name, _call(name, inputs, opts), pc, square, lk, lq)
    if spec.out == "table":
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_allclose(got[key], want[key], **close, err_msg=f"{name}: {key}")
        return
    if spec.out == "map":
        pairs = [((), got, want)]
    else:
        pairs = [(b, y, want[b] if batch else want) for b, y in got.items()]
    for b, y, w in pairs:
        y, w = np.asarray(y), np.asarray(w)
        assert y.shape == w.shape, (name, b, y.shape, w.shape)
        if w.dtype.kind in "bi":
            np.testing.assert_array_equal(y, w, err_msg=f"{name}, example {b}")
        else:
            np.testing.assert_allclose(y, w, **close, err_msg=f"{name}, example {b}")


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_padding_equals_cropping(name, data):
    check_padding_equals_cropping(data.draw(padded_cases(name)))


# ---- the examples of issue 11 and the mutants the property catches ------------------------------


def _four_token_map():
    rng = np.random.default_rng(11)
    return refattn.softmax(rng.standard_normal((1, 4, 4)) * 2)  # (H, L, L)


def _pad(p, left, right):
    n = p.shape[-1] + left + right
    out = np.zeros(p.shape[:-2] + (n, n))
    out[..., left : left + p.shape[-2], left : left + p.shape[-1]] = p
    real = np.zeros(n, dtype=bool)
    real[left : left + p.shape[-1]] = True
    out[..., ~real, :] = 1.0 / n  # padded query rows: anything; they are exempt
    return out, real


def test_offset_attention_counts_only_rows_whose_target_is_a_real_token():
    p = _four_token_map()
    for offset, (left, right) in ((1, (0, 2)), (-1, (2, 0)), (1, (1, 1)), (-1, (1, 1))):
        padded, real = _pad(p, left, right)
        want = metrics.offset_attention(p, offset=offset)
        assert metrics.offset_attention(padded, offset=offset, mask=real) == pytest.approx(want, rel=1e-15, abs=0.0)


def test_exclude_bos_removes_the_first_real_token_under_left_padding():
    p = _four_token_map()
    padded, real = _pad(p, 2, 0)
    want = metrics.previous_token_score(p, exclude_bos=True)
    got = metrics.previous_token_score(padded, mask=real, exclude_bos=True)
    assert got == pytest.approx(want, rel=1e-14, abs=0.0)


def _old_rows_with_target(m, offset):
    """Issue 11: a row had a target when ``i + offset < Lk`` — the padded length."""
    target = np.arange(m.p.shape[-2]) + offset
    return m.rows & ((target >= 0) & (target < m.p.shape[-1]))


def _exclude_column_zero(mp):
    """Issue 11: exclude_bos zeroed column 0, a pad under left padding."""
    fixed = det_mod._prepared

    def old(P, mask, exclude_bos, exclude_current_token, check_probabilities):
        m, real, keep = fixed(P, mask, False, exclude_current_token, check_probabilities)
        if exclude_bos:
            keep = np.array(keep, copy=True)
            keep[..., :, 0] = 0.0
        return m, real, keep

    mp.setattr(det_mod, "_prepared", old)


MUTANTS = {
    "offset_target_in_the_padded_length": (
        "offset_attention",
        lambda mp: mp.setattr(pos_mod, "_rows_with_target", _old_rows_with_target),
    ),
    "exclude_bos_zeroes_column_zero": ("previous_token_score", _exclude_column_zero),
    "induction_reads_pad_ids": (
        "induction_score",
        lambda mp: mp.setattr(
            det_mod,
            "_pattern_for",
            (lambda real: lambda kind, shape, tokens, r=None: real(kind, shape, tokens))(det_mod._pattern_for),
        ),
    ),
    "first_token_is_column_zero": (
        "summarize",
        lambda mp: mp.setattr(
            sum_mod,
            "_first_real_token",
            lambda p, mask, check: metrics.attention_to(p, [0], mask=mask, check_probabilities=check),
        ),
    ),
    "phrases_run_into_pads": (
        "phrase_attention",
        lambda mp: mp.setattr(
            ling_mod,
            "_phrase_weights",
            lambda m, tags, phrase_tags, mask: ling_mod._group_weights(
                ling_mod.phrases_from_tags(tags, phrase_tags=phrase_tags), m.p.shape
            ),
        ),
    ),
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_padding_property_catches_its_mutant(mutant, monkeypatch):
    name, patch = MUTANTS[mutant]
    patch(monkeypatch)
    assert_catches(padded_cases(name), check_padding_equals_cropping)
