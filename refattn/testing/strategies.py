"""Hypothesis strategies that draw valid inputs and options for refattn's ops.

Each strategy draws a :class:`Case` (positional ``inputs`` and keyword
``options``); each op of the registry (``refattn/_registry.py``) holds its strategy.  Values are bounded
(``|x| <= 2``) so nothing overflows; masks are random, so rows with every key
masked (empty rows) occur.  Needs Hypothesis (the ``test`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

__all__ = [
    "TILE_LENGTHS",
    "alibi_bias_cases",
    "alibi_slopes_cases",
    "allocation_cases",
    "attention_inputs",
    "block_mask_cases",
    "Case",
    "causal_mask_cases",
    "chunked_cases",
    "combine_cases",
    "decode_cases",
    "detect_collapse_cases",
    "detect_uniform_cases",
    "dropout_mask_cases",
    "finite_floats",
    "flow_cases",
    "from_lengths_cases",
    "head_importance_cases",
    "linear_cases",
    "local_mask_cases",
    "logits_cases",
    "map_cases",
    "metric_strategy",
    "multihead_cases",
    "online_cases",
    "paged_cases",
    "relative_cases",
    "rollout_cases",
    "rope_cases",
    "round_to_cases",
    "sdpa_cases",
    "sdpa_twin_cases",
    "sinusoidal_cases",
    "softmax_cases",
    "special_token_cases",
    "strided_mask_cases",
    "summarize_cases",
    "token_pattern_cases",
    "top_tokens_cases",
    "topk_cases",
    "topk_mask_cases",
    "value_norm_cases",
    "varlen_cases",
    "weight_norm_cases",
    "weights_cases",
    "window_mask_cases",
]


@dataclass
class Case:
    """Inputs and options of one op call: ``fn(*inputs, **options)``."""

    inputs: tuple
    options: dict = field(default_factory=dict)

    def __repr__(self):
        shapes = ", ".join(str(np.shape(x)) for x in self.inputs)
        opts = {k: (f"array{np.shape(v)}" if isinstance(v, np.ndarray) else v) for k, v in self.options.items()}
        return f"Case(inputs=[{shapes}], options={opts})\n  inputs={self.inputs!r}\n  options={self.options!r}"


def finite_floats(bound=2.0):
    return st.floats(-bound, bound, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def _floats_array(draw, shape, bound=2.0):
    return draw(hnp.arrays(np.float64, shape, elements=finite_floats(bound)))


def _sub_shape(draw, shape, min_dims=0):
    """A shape that broadcasts to ``shape`` without enlarging it (dims kept or set to 1, leading dims dropped)."""
    ndim = draw(st.integers(min(min_dims, len(shape)), len(shape)))
    tail = shape[len(shape) - ndim :]
    return tuple(draw(st.sampled_from([n, 1])) for n in tail)


def _with_neg_inf(draw, a, probability=0.15):
    holes = draw(hnp.arrays(np.float64, a.shape, elements=st.sampled_from([0.0] * 6 + [1.0]))) > 0
    if probability and holes.any():
        a = np.where(holes, -np.inf, a)
    return a


@st.composite
def _attention_case(draw, *, with_v, for_gradcheck):
    batch = draw(st.sampled_from([(), (1,), (2,)]))
    hk = draw(st.integers(1, 2))
    hq = hk * draw(st.integers(1, 2))
    lq, lk = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    d, dv = draw(st.integers(1, 3)), draw(st.integers(1, 3))

    def batch_of():
        return tuple(draw(st.sampled_from([n, 1])) for n in batch)

    q = _floats_array(draw, batch + (hq, lq, d))
    k = _floats_array(draw, batch_of() + (hk, lk, d))
    inputs = (q, k)
    if with_v:
        inputs += (_floats_array(draw, batch_of() + (hk, lk, dv)),)
    score = batch + (hq, lq, lk)
    opts = {}
    if draw(st.booleans()):
        opts["mask"] = draw(hnp.arrays(bool, _sub_shape(draw, score, 1), elements=st.booleans()))
    if draw(st.booleans()):
        opts["bias"] = _with_neg_inf(draw, _floats_array(draw, _sub_shape(draw, score, 1)))
    if draw(st.booleans()):
        opts["causal"] = True
    if draw(st.booleans()):
        opts["window"] = (draw(st.one_of(st.none(), st.integers(0, 3))), draw(st.one_of(st.none(), st.integers(0, 3))))
    structural = opts.get("causal") or "window" in opts
    if structural and lq != lk:
        opts["align"] = draw(st.sampled_from(["top_left", "bottom_right"]))
    elif draw(st.booleans()):
        opts["align"] = draw(st.sampled_from(["top_left", "bottom_right"]))
    if draw(st.booleans()):
        opts["scale"] = draw(st.floats(0.1, 2.0))
    if draw(st.booleans()):
        opts["softcap"] = draw(st.floats(0.5, 5.0))
    if draw(st.booleans()):
        sinks = _floats_array(draw, _sub_shape(draw, batch + (hq,), 1))
        opts["sinks"] = _with_neg_inf(draw, sinks)
    if with_v and draw(st.booleans()):
        p = draw(st.sampled_from([0.0, 0.25]))
        opts["dropout_p"] = p
        opts["dropout_mask"] = draw(hnp.arrays(bool, _sub_shape(draw, score, 1), elements=st.booleans()))
    policies = ["zero", "uniform"] if for_gradcheck else ["zero", "nan", "uniform"]
    opts["empty_rows"] = draw(st.sampled_from(policies))
    if with_v and draw(st.booleans()):
        opts["return_lse"] = True
    return Case(inputs, opts)


TILE_LENGTHS = (1, 2, 3, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129)


@st.composite
def attention_inputs(
    draw,
    *,
    lengths=TILE_LENGTHS,
    head_dims=(8, 16, 64),
    max_batch=2,
    max_heads=4,
    options=("causal", "window", "mask", "bias", "scale", "gqa"),
    adversarial=True,
    dtype=None,
):
    """Inputs for property-testing a user's attention kernel against refattn: a :class:`Case` with
    ``inputs = (q (B, Hq, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, D))`` and sdpa ``options``.

    Lengths are drawn from ``lengths`` (by default both sides of the 32/64/128 tile boundaries);
    ``options`` names what may be drawn: ``"causal"``, ``"window"`` (either alignment),
    ``"mask"`` (key padding per batch item, query padding too: empty rows occur), ``"bias"``,
    ``"scale"``, ``"gqa"`` (Hk dividing Hq), ``"softcap"``, ``"sinks"``.  ``adversarial`` adds rows
    with large logits (a row of q scaled by 30) and near ties (keys equal to 1e-9).  With ``dtype``
    (``"bfloat16"``, ...) every array is rounded to that format, so a kernel's low-precision inputs
    hold exactly the values refattn sees.  Arrays come from a drawn seed (fast at 129 × 64).
    """
    from refattn import lowp

    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    b = draw(st.integers(1, max_batch))
    hk = draw(st.integers(1, max_heads))
    groups = draw(st.sampled_from([g for g in (1, 2, 4) if hk * g <= max_heads] or [1])) if "gqa" in options else 1
    hq = hk * groups
    lq, lk, d = draw(st.sampled_from(lengths)), draw(st.sampled_from(lengths)), draw(st.sampled_from(head_dims))
    q, k, v = (
        rng.standard_normal((b, hq, lq, d)),
        rng.standard_normal((b, hk, lk, d)),
        rng.standard_normal((b, hk, lk, d)),
    )
    if adversarial and draw(st.booleans()):
        q[..., rng.integers(lq), :] *= 30.0  # one row of large logits: a softmax that must not overflow
    if adversarial and lk > 1 and draw(st.booleans()):
        k[..., 1, :] = k[..., 0, :] + 1e-9 * rng.standard_normal(k[..., 0, :].shape)  # near-tied keys
    opts = {}
    if "causal" in options and draw(st.booleans()):
        opts["causal"] = True
    if "window" in options and draw(st.booleans()):
        opts["window"] = (draw(st.sampled_from([None, 0, 1, 31, 64])), draw(st.sampled_from([None, 0, 1, 31, 64])))
    if opts and draw(st.booleans()) or (opts and lq != lk):
        opts["align"] = draw(st.sampled_from(["top_left", "bottom_right"]))
    if "mask" in options and draw(st.booleans()):
        from refattn.masks import from_lengths

        k_len = [int(rng.integers(1, lk + 1)) for _ in range(b)]
        q_len = [int(rng.integers(0, lq + 1)) for _ in range(b)] if draw(st.booleans()) else None
        opts["mask"] = from_lengths(q_len, k_len, lq, lk)[:, None]  # (B, 1, Lq, Lk)
    if "bias" in options and draw(st.booleans()):
        opts["bias"] = rng.standard_normal((hq, lq, lk))
    if "scale" in options and draw(st.booleans()):
        opts["scale"] = draw(st.sampled_from([0.05, 0.5, 1.0]))
    if "softcap" in options and draw(st.booleans()):
        opts["softcap"] = draw(st.sampled_from([5.0, 30.0]))
    if "sinks" in options and draw(st.booleans()):
        opts["sinks"] = rng.standard_normal(hq)
    if dtype is not None:
        rd = lambda x: lowp.round_to(x, dtype)  # noqa: E731
        q, k, v = rd(q), rd(k), rd(v)
        opts.update({n: rd(opts[n]) for n in ("bias", "sinks") if n in opts})
    return Case((q, k, v), opts)


def sdpa_cases(*, for_gradcheck=False):
    """Cases for :func:`refattn.sdpa`: every option, GQA, broadcast batch dims, lq != lk."""
    return _attention_case(with_v=True, for_gradcheck=for_gradcheck)


def weights_cases(*, for_gradcheck=False):
    """Cases for :func:`refattn.attention_weights` (sdpa's options without v and dropout)."""
    return _attention_case(with_v=False, for_gradcheck=for_gradcheck)


@st.composite
def softmax_cases(draw, *, for_gradcheck=False):
    """Cases for softmax / log_softmax / logsumexp: ``x (B?, m, n)``, axis -1 or -2, masks, -inf entries."""
    batch = draw(st.sampled_from([(), (2,)]))
    shape = batch + (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    x = _floats_array(draw, shape, 3.0)
    if draw(st.booleans()):
        x = _with_neg_inf(draw, x)
    opts = {"axis": draw(st.sampled_from([-1, -2]))}
    if draw(st.booleans()):
        opts["mask"] = draw(hnp.arrays(bool, _sub_shape(draw, shape, 1), elements=st.booleans()))
    policies = ["zero", "uniform"] if for_gradcheck else ["zero", "nan", "uniform"]
    opts["empty_rows"] = draw(st.sampled_from(policies))
    return Case((x,), opts)


# ---- variants (issue: every attention variant) ------------------------------------------------


def _seeded_noise(draw, shape, scale):
    """Continuous noise from a drawn seed: breaks the exact ties Hypothesis likes to produce."""
    seed = draw(st.integers(0, 2**32 - 1))
    return scale * np.random.default_rng(seed).standard_normal(shape)


@st.composite
def relative_cases(draw, *, for_gradcheck=False):
    """Cases for ``relative_attention``: an sdpa case plus ``rel_k``, ``rel_v`` and ``max_distance``."""
    case = draw(sdpa_cases(for_gradcheck=for_gradcheck))
    q, k, v = case.inputs
    m = draw(st.integers(0, 3))
    rel_k = _floats_array(draw, (2 * m + 1, q.shape[-1]))
    rel_v = _floats_array(draw, (2 * m + 1, v.shape[-1]))
    return Case((q, k, v, rel_k, rel_v), {**case.options, "max_distance": m})


def _topk_gap(case, top_k):
    from refattn.attention import sdpa as core

    opts = {n: v for n, v in case.options.items() if n not in ("return_lse", "top_k")}
    logits = core.forward_scores(core.validate(*case.inputs, **opts)).logits
    finite = np.where(np.isfinite(logits), logits, -1e300)
    srt = -np.sort(-finite, axis=-1)
    if top_k >= logits.shape[-1]:
        return np.inf
    return float(np.min(srt[..., top_k - 1] - srt[..., top_k]))


@st.composite
def topk_cases(draw, *, for_gradcheck=False):
    """Cases for ``topk_attention``; for gradients the k-th and (k+1)-th logits are ≥ 1e-3 apart."""
    case = draw(sdpa_cases(for_gradcheck=for_gradcheck))
    q, k, v = case.inputs
    q = q + _seeded_noise(draw, q.shape, 0.1)
    case = Case((q, k, v), {**case.options, "top_k": draw(st.integers(1, 4))})
    if for_gradcheck:
        from hypothesis import assume

        assume(_topk_gap(case, case.options["top_k"]) > 1e-3)
    return case


@st.composite
def linear_cases(draw, *, for_gradcheck=False):
    """Cases for ``linear_attention`` (``"relu"`` only off the gradient check: its kink at 0)."""
    batch = draw(st.sampled_from([(), (2,)]))
    hk = draw(st.integers(1, 2))
    hq = hk * draw(st.integers(1, 2))
    causal = draw(st.booleans())
    lq = draw(st.integers(1, 4))
    lk = lq if causal else draw(st.integers(1, 4))
    d, dv = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    inputs = (
        _floats_array(draw, batch + (hq, lq, d)),
        _floats_array(draw, batch + (hk, lk, d)),
        _floats_array(draw, batch + (hk, lk, dv)),
    )
    if for_gradcheck:  # elu+1 is C¹ but not C² at 0: keep finite differences off the kink
        from hypothesis import assume

        q, k = (x + _seeded_noise(draw, x.shape, 0.05) for x in inputs[:2])
        assume(min(np.min(np.abs(q), initial=1.0), np.min(np.abs(k), initial=1.0)) > 1e-3)
        inputs = (q, k, inputs[2])
    maps = ["elu+1"] if for_gradcheck else ["elu+1", "relu"]
    opts = {"feature_map": draw(st.sampled_from(maps)), "causal": causal}
    if draw(st.booleans()):
        opts["eps"] = draw(st.sampled_from([0.0, 1e-3, 0.5])) if not for_gradcheck else 0.5
    return Case(inputs, opts)


@st.composite
def chunked_cases(draw, *, for_gradcheck=False):
    case = draw(sdpa_cases(for_gradcheck=for_gradcheck))
    return Case(case.inputs, {**case.options, "chunk_size": draw(st.integers(1, 5))})


@st.composite
def online_cases(draw, *, for_gradcheck=False):
    case = draw(sdpa_cases(for_gradcheck=for_gradcheck))
    return Case(case.inputs, {**case.options, "block_q": draw(st.integers(1, 5)), "block_k": draw(st.integers(1, 5))})


@st.composite
def combine_cases(draw, *, for_gradcheck=False):
    """Split-KV partials ``outs (S, H, Lq, Dv)`` and ``lses (S, H, Lq)`` with some ``-inf``."""
    s, h, lq, dv = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    outs = _floats_array(draw, (s, h, lq, dv))
    lses = _with_neg_inf(draw, _floats_array(draw, (s, h, lq), 3.0))
    return Case((outs, lses), {})


@st.composite
def decode_cases(draw, *, for_gradcheck=False):
    """KV-cache decoding: ``q (B, Hq, Lq, D)``, caches ``(B, Hk, Lc, D)``, lengths in ``[Lq, Lc]``."""
    b, hk = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    hq = hk * draw(st.integers(1, 2))
    lq, lc = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    d, dv = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    inputs = (
        _floats_array(draw, (b, hq, lq, d)),
        _floats_array(draw, (b, hk, lc, d)),
        _floats_array(draw, (b, hk, lc, dv)),
    )
    lengths = np.array([draw(st.integers(1, lc)) for _ in range(b)])
    opts = {"cache_lengths": lengths, "causal": draw(st.booleans())}
    if draw(st.booleans()):
        opts["window"] = (draw(st.one_of(st.none(), st.integers(0, 3))), draw(st.one_of(st.none(), st.integers(0, 3))))
    if draw(st.booleans()):
        opts["softcap"] = draw(st.floats(0.5, 5.0))
    if draw(st.booleans()):
        opts["sinks"] = _floats_array(draw, (hq,))
    opts["empty_rows"] = draw(st.sampled_from(["zero", "uniform"] if for_gradcheck else ["zero", "nan", "uniform"]))
    return Case(inputs, opts)


@st.composite
def paged_cases(draw, *, for_gradcheck=False):
    """Paged KV: ``pages (P, Hk, page, D)``, a block table of page ids (−1 unused), lengths."""
    n_pages, hk, page, d = (
        draw(st.integers(1, 4)),
        draw(st.integers(1, 2)),
        draw(st.integers(1, 3)),
        draw(st.integers(1, 3)),
    )
    b, max_pages = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    table = np.array([[draw(st.integers(-1, n_pages - 1)) for _ in range(max_pages)] for _ in range(b)])
    lengths = []
    for row in table:
        usable = 0
        while usable < max_pages and row[usable] >= 0:
            usable += 1
        lengths.append(draw(st.integers(0, usable * page)))
    return Case((_floats_array(draw, (n_pages, hk, page, d)),), {"block_table": table, "lengths": np.array(lengths)})


@st.composite
def allocation_cases(draw, *, for_gradcheck=False):
    """Gated attention: an sdpa case plus an ``AllocationGate`` with G hidden units."""
    from refattn.attention.allocation import AllocationGate

    case = draw(sdpa_cases(for_gradcheck=for_gradcheck))
    q = case.inputs[0]
    g = draw(st.integers(1, 3))
    w1 = _floats_array(draw, (q.shape[-1], g)) + _seeded_noise(draw, (q.shape[-1], g), 0.1)
    gate = AllocationGate(
        w1, _floats_array(draw, (g,)) + 0.05, _floats_array(draw, (g,)), np.array(draw(finite_floats()))
    )
    if for_gradcheck:
        from hypothesis import assume

        z1 = np.asarray(q) @ w1 + gate.b1
        assume(np.min(np.abs(z1)) > 1e-3)  # away from relu's kink
    return Case(case.inputs + (gate,), case.options)


@st.composite
def multihead_cases(draw, *, for_gradcheck=False):
    """Multi-head attention: self or cross, GQA, optional biases, head gate, masks, causal."""
    from refattn.attention.multihead import MHAParams

    batch = draw(st.sampled_from([(), (2,)]))
    hk = draw(st.integers(1, 2))
    hq = hk * draw(st.integers(1, 2))
    dk, dv, d_model = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    lq = draw(st.integers(1, 3))
    cross = draw(st.booleans())
    lk = draw(st.integers(1, 3)) if cross else lq
    d_kv = draw(st.integers(1, 3)) if cross else d_model
    x = _floats_array(draw, batch + (lq, d_model))

    def maybe(shape):
        return _floats_array(draw, shape) if draw(st.booleans()) else None

    params = MHAParams(
        _floats_array(draw, (d_model, hq * dk)),
        _floats_array(draw, (d_kv, hk * dk)),
        _floats_array(draw, (d_kv, hk * dv)),
        _floats_array(draw, (hq * dv, d_model)),
        maybe((hq * dk,)),
        maybe((hk * dk,)),
        maybe((hk * dv,)),
        maybe((d_model,)),
    )
    opts = {"num_heads": hq, "num_kv_heads": hk}
    if cross:
        opts["kv"] = _floats_array(draw, batch + (lk, d_kv))
    if draw(st.booleans()):
        opts["head_mask"] = _floats_array(draw, (hq,))
    if draw(st.booleans()):
        opts["mask"] = draw(hnp.arrays(bool, batch + (1, 1, lk), elements=st.booleans()))
    if draw(st.booleans()):
        opts["causal"] = True
        if lq != lk:
            opts["align"] = draw(st.sampled_from(["top_left", "bottom_right"]))
    opts["empty_rows"] = draw(st.sampled_from(["zero", "uniform"] if for_gradcheck else ["zero", "nan", "uniform"]))
    return Case((x, params), opts)


@st.composite
def rope_cases(draw, *, for_gradcheck=False):
    """RoPE: ``x (B?, H?, L, D)`` (D even), positions, style, rotary_dim, base."""
    lead = draw(st.sampled_from([(), (2,), (2, 2)]))
    length, half = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    x = _floats_array(draw, lead + (length, 2 * half))
    opts = {"style": draw(st.sampled_from(["half", "interleaved"]))}
    if draw(st.booleans()):
        opts["positions"] = draw(hnp.arrays(np.float64, (length,), elements=st.floats(-50, 50)))
    if draw(st.booleans()):
        opts["rotary_dim"] = 2 * draw(st.integers(0, half))
    if draw(st.booleans()):
        opts["base"] = draw(st.sampled_from([10000.0, 500.0, 1e6]))
    return Case((x,), opts)


# ---- attention maps for rollout and the metrics ----------------------------------------------


def _softmax_rows(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _maps(draw, shape):
    """Row-stochastic maps with strictly positive, tie-free entries (softmax of noisy logits)."""
    logits = _floats_array(draw, shape) + _seeded_noise(draw, shape, 0.3)
    return _softmax_rows(logits)


@st.composite
def rollout_cases(draw, *, for_gradcheck=False):
    """Stacked per-layer maps ``(L, H, n, n)`` and every rollout option (mask: real tokens ``(n,)``)."""
    layers, heads, n = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    opts = {"head_fusion": draw(st.sampled_from(["mean", "max", "min"]))}
    maps = _maps(draw, (layers, heads, n, n))
    if draw(st.booleans()):
        opts["residual"] = draw(st.sampled_from([0.0, 0.3, 0.5, 1.0]))
    if draw(st.booleans()):
        opts["start_layer"] = draw(st.integers(0, layers - 1))
    if draw(st.booleans()):
        opts["discard_ratio"] = draw(st.sampled_from([0.25, 0.5]))
    if draw(st.booleans()):
        opts["renormalize"] = False
    if draw(st.booleans()):
        real = np.array([True] + [draw(st.booleans()) for _ in range(n - 1)])
        opts["mask"] = real
        # as a model gives them: real rows sum to 1 over the real tokens (what padded entries hold is ignored)
        maps = np.where(real, maps / (maps * real).sum(axis=-1, keepdims=True), maps)
    if draw(st.booleans()):
        opts["return_all"] = True
    if for_gradcheck and opts["head_fusion"] != "mean" and heads > 1:
        from hypothesis import assume

        srt = np.sort(maps, axis=1)
        assume(np.min(srt[:, -1] - srt[:, -2]) > 1e-3 and np.min(srt[:, 1] - srt[:, 0]) > 1e-3)  # no tied heads
    if for_gradcheck and opts.get("discard_ratio"):
        from hypothesis import assume

        fuse = {"mean": np.mean, "max": np.max, "min": np.min}[opts["head_fusion"]]
        fused = fuse(maps, axis=1)  # (L, n, n), as rollout fuses the heads
        real = opts.get("mask", np.ones(n, dtype=bool))
        ranked = np.sort(fused[..., real], axis=-1)  # the discard ranks the real keys only
        assume(ranked.shape[-1] < 2 or np.min(np.diff(ranked, axis=-1)) > 1e-3)  # the selection must not flip
    if for_gradcheck:
        opts["check_probabilities"] = False  # finite differences step off the probability simplex
    return Case((maps,), opts)


@st.composite
def map_cases(draw, *, for_gradcheck=False, square=False, extra=None, second_map=False):
    """Maps ``(B?, H, Lq, Lk)`` (row-stochastic, positive), an optional key-padding mask, and the
    metric's own arguments from ``extra(draw, shape)``."""
    batch = draw(st.sampled_from([(), (2,)]))
    lq = draw(st.integers(1, 4))
    lk = lq if square else draw(st.integers(1, 4))
    shape = batch + (draw(st.integers(1, 3)), lq, lk)
    opts = {} if extra is None else extra(draw, shape)
    key_mask = None
    if draw(st.booleans()):
        rows = [[True] + [draw(st.booleans()) for _ in range(lk - 1)] for _ in range(max(int(np.prod(batch)), 1))]
        key_mask = np.array(rows).reshape(batch + (lk,))
        opts["mask"] = key_mask

    def one_map():
        p = _maps(draw, shape)
        if key_mask is None:
            return p
        p = p * key_mask[..., None, None, :]  # as a model gives them: softmax over the real keys only
        return p / p.sum(axis=-1, keepdims=True)

    return Case((one_map(),) + ((one_map(),) if second_map else ()), opts)


def _token_ids(draw, shape):
    return {
        "tokens": np.array([draw(st.integers(0, 2)) for _ in range(int(np.prod(shape[:-3] + shape[-1:])))]).reshape(
            shape[:-3] + shape[-1:]
        )
    }


def _key_choice(name):
    def extra(draw, shape):
        lk = shape[-1]
        return {name: sorted(draw(st.sets(st.integers(0, lk - 1), min_size=1, max_size=lk)))}

    return extra


def _words(draw, shape):
    return {"tokens": [draw(st.sampled_from(["the", "cat", "of", "sat", "a", "mat"])) for _ in range(shape[-1])]}


def _pairs(draw, shape):
    lq, lk = shape[-2:]
    return {
        "pairs": [(draw(st.integers(0, lq - 1)), draw(st.integers(0, lk - 1))) for _ in range(draw(st.integers(1, 3)))]
    }


def _groups(draw, shape):
    n = min(shape[-2:])
    idx = list(range(n))
    cut = draw(st.integers(0, n))
    return {"groups": [g for g in (idx[:cut], idx[cut:]) if g]}


def _tags(draw, shape):
    return {"pos_tags": [draw(st.sampled_from(["DET", "ADJ", "NOUN", "VERB"])) for _ in range(min(shape[-2:]))]}


def _offset(draw, shape):
    return {"offset": draw(st.integers(-2, 2))}


def metric_strategy(name):
    """The case strategy of the metric ``name``: a callable ``(for_gradcheck=False) -> strategy``."""
    square = name in ("previous_token_score", "duplicate_token_score", "induction_score")
    extra = {
        "duplicate_token_score": _token_ids,
        "induction_score": _token_ids,
        "attention_to": _key_choice("positions"),
        "allocation_efficiency": _key_choice("important"),
        "function_word_ratio": _words,
        "pair_attention": _pairs,
        "group_attention": _groups,
        "phrase_attention": _tags,
        "offset_attention": _offset,
    }.get(name)

    def cases(*, for_gradcheck=False):
        strategy = map_cases(
            for_gradcheck=for_gradcheck, square=square, extra=extra, second_map=name in ("js_divergence", "js_distance")
        )
        if for_gradcheck and name in _SMOOTHNESS:
            strategy = strategy.filter(_SMOOTHNESS[name])
        if for_gradcheck:  # finite differences step off the probability simplex
            strategy = strategy.map(lambda case: Case(case.inputs, {**case.options, "check_probabilities": False}))
        return strategy

    return cases


def _gap_to_second(case):
    p = np.sort(case.inputs[0], axis=-1)
    return p.shape[-1] < 2 or np.min(p[..., -1] - p[..., -2]) > 1e-3


def _offset_away_from_zero(case):
    from refattn.metrics._maps import attention_map

    m = attention_map(case.inputs[0], case.options.get("mask"))
    centre = (m.p * np.arange(m.p.shape[-1])).sum(-1) - np.arange(m.p.shape[-2])
    return np.min(np.abs(np.where(m.rows, centre, 1.0))) > 1e-3


def _distinct_maps(case):
    from refattn.metrics import js_divergence

    # sqrt(JS) curves sharply near 0: central differences with eps = 1e-4 need the maps well apart
    return np.min(js_divergence(*case.inputs, mask=case.options.get("mask"))) > 1e-3


def _entropy_off_target(case):
    from refattn.metrics import entropy
    from refattn.metrics._maps import attention_map, key_counts

    m = attention_map(case.inputs[0], case.options.get("mask"))
    gap = entropy(m.p, mask=m.allowed) - np.log(np.maximum(key_counts(m), 1) / 4.0)
    return np.min(np.abs(np.where(m.rows, gap, 1.0))) > 1e-3


_SMOOTHNESS = {
    "max_weight": _gap_to_second,
    "head_confidence": _gap_to_second,
    "expected_offset": _offset_away_from_zero,
    "js_distance": _distinct_maps,
    "entropy_regularizer": _entropy_off_target,
}


@st.composite
def logits_cases(draw, *, for_gradcheck=False):
    """Logits ``(B?, H, Lq, Lk)`` with an optional key-padding mask (for ``entropy_from_logits``)."""
    case = draw(map_cases())
    with np.errstate(divide="ignore"):  # masked keys become -inf logits
        return Case((np.log(case.inputs[0]),), case.options)


@st.composite
def value_norm_cases(draw, *, for_gradcheck=False):
    """``value_norms(P, x, w_v, b_v, w_o)``: maps, token states and per-head value/output weights."""
    case = draw(map_cases())
    p = case.inputs[0]
    h, lk = p.shape[-3], p.shape[-1]
    d_model, dv = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    x = _floats_array(draw, p.shape[:-3] + (lk, d_model)) + _seeded_noise(draw, p.shape[:-3] + (lk, d_model), 0.1)
    b_v = _floats_array(draw, (h * dv,)) if draw(st.booleans()) else None
    w_v, w_o = _floats_array(draw, (d_model, h * dv)) + 0.1, _floats_array(draw, (h * dv, d_model)) + 0.1
    if for_gradcheck:  # ‖f(x_j)‖ has a kink at 0: keep every head's transformed value away from it
        from hypothesis import assume

        v = (x @ w_v + (0.0 if b_v is None else b_v)).reshape(x.shape[:-1] + (h, dv))
        f = np.einsum("...lhd,hdm->...lhm", v, w_o.reshape(h, dv, d_model))
        assume(np.min(np.linalg.norm(f, axis=-1)) > 1e-2)
    return Case((p, x, w_v, b_v, w_o), {"check_probabilities": False} if for_gradcheck else {})


# ---- the low-precision twin -------------------------------------------------------------------


@st.composite
def sdpa_twin_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`refattn.lowp.sdpa_twin`: an sdpa case (no ``backend``) in a drawn format and
    accumulation, with the kernel's choices (``scale_at``, ``exp2``, ``block_k``, ``recompute_p``).

    ``for_gradcheck`` draws ``dtype = accumulate = "float64"`` only: there the twin is sdpa and its
    backward a derivative; in a low-precision format the forward is piecewise constant and the
    backward is the kernel's rounded gradient, which no finite difference measures.
    """
    from refattn import lowp

    case = draw(sdpa_cases(for_gradcheck=for_gradcheck))
    if for_gradcheck:
        dtype, accumulate = "float64", "float64"
    else:
        dtype = draw(st.sampled_from(sorted(lowp.FORMATS) + ["bf16", "fp16"]))
        accumulate = draw(st.sampled_from(lowp.ACCUMULATE))
    opts = {**case.options, "dtype": dtype, "accumulate": accumulate}
    if draw(st.booleans()):
        opts["scale_at"] = draw(st.sampled_from(lowp.SCALE_AT))
    if draw(st.booleans()):
        opts["exp2"] = True
    if draw(st.booleans()):
        opts["block_k"] = draw(st.integers(1, 3))
    if draw(st.booleans()):
        opts["recompute_p"] = True
    return Case(case.inputs, opts)


@st.composite
def round_to_cases(draw, *, for_gradcheck=False):
    """``round_to(x, dtype)``: ``x (B?, n)`` of any real values — normal, subnormal in the target format,
    past its largest finite value, ``±inf`` and NaN — and a format name or alias."""
    from refattn import lowp

    batch = draw(st.sampled_from([(), (2,)]))
    shape = batch + (draw(st.integers(0, 4)),)
    special = st.sampled_from([0.0, -0.0, 1e-42, 3e-8, 65520.0, 1e39, -1e300, np.inf, -np.inf, np.nan])
    x = draw(hnp.arrays(np.float64, shape, elements=st.one_of(finite_floats(1e6), special)))
    return Case((x,), {"dtype": draw(st.sampled_from(sorted(lowp.FORMATS) + ["bf16", "fp8_e5m2", "half"]))})


# ---- ops without a backward: masks, position tables, detectors, flow, rankings -------------------


def _align(draw, lq, lk, needed=True):
    """``{"align": ...}``: required when ``lq != lk`` (``needed``), optional otherwise."""
    if needed and lq != lk or draw(st.booleans()):
        return {"align": draw(st.sampled_from(["top_left", "bottom_right"]))}
    return {}


def _side(draw):
    return draw(st.one_of(st.none(), st.integers(0, 3)))


@st.composite
def causal_mask_cases(draw, *, for_gradcheck=False):
    """``masks.causal(lq, lk, align=...)``: lengths 0..5 (empty masks included)."""
    lq, lk = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    return Case((lq, lk), _align(draw, lq, lk))


@st.composite
def window_mask_cases(draw, *, for_gradcheck=False):
    """``masks.window(lq, lk, left, right, align=...)``: sides 0..3 or None (unbounded)."""
    lq, lk = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    return Case((lq, lk, _side(draw), _side(draw)), _align(draw, lq, lk))


@st.composite
def local_mask_cases(draw, *, for_gradcheck=False):
    """``masks.local(l, window_size)``: windows up to wider than the sequence."""
    return Case((draw(st.integers(0, 6)), draw(st.integers(0, 14))))


@st.composite
def strided_mask_cases(draw, *, for_gradcheck=False):
    """``masks.strided(l, stride)``."""
    return Case((draw(st.integers(0, 6)), draw(st.integers(1, 4))))


@st.composite
def block_mask_cases(draw, *, for_gradcheck=False):
    """``masks.block(l, block_size)``."""
    return Case((draw(st.integers(0, 6)), draw(st.integers(1, 4))))


@st.composite
def from_lengths_cases(draw, *, for_gradcheck=False):
    """``masks.from_lengths(q_lengths, k_lengths, lq, lk)``: a batch of 1..3 lengths (0 included),
    ``q_lengths`` None (every query kept) or drawn."""
    b, lq, lk = draw(st.integers(1, 3)), draw(st.integers(0, 4)), draw(st.integers(0, 4))
    k_lengths = np.array([draw(st.integers(0, lk)) for _ in range(b)], dtype=np.int64)
    q_lengths = None
    if draw(st.booleans()):
        q_lengths = np.array([draw(st.integers(0, lq)) for _ in range(b)], dtype=np.int64)
    return Case((q_lengths, k_lengths, lq, lk))


@st.composite
def varlen_cases(draw, *, for_gradcheck=False):
    """``masks.varlen(cu_seqlens_q, cu_seqlens_k, ...)``: 1..3 packed sequences of 0..3 tokens each,
    causal/window within each (its own alignment, required where lengths differ)."""
    s = draw(st.integers(1, 3))
    lq = [draw(st.integers(0, 3)) for _ in range(s)]
    lk = [draw(st.integers(0, 3)) for _ in range(s)]
    opts = {}
    if draw(st.booleans()):
        opts["causal"] = True
    if draw(st.booleans()):
        opts["window"] = (_side(draw), _side(draw))
    if opts and lq != lk or draw(st.booleans()):
        opts["align"] = draw(st.sampled_from(["top_left", "bottom_right"]))
    cu = [np.concatenate([[0], np.cumsum(n)]).astype(np.int64) for n in (lq, lk)]
    return Case(tuple(cu), opts)


@st.composite
def dropout_mask_cases(draw, *, for_gradcheck=False):
    """``masks.dropout_mask(shape, p, seed)``: shapes of 0..3 dims, any 64-bit seed."""
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    p = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9]))
    return Case((shape, p, draw(st.integers(0, 2**64 - 1))))


@st.composite
def alibi_slopes_cases(draw, *, for_gradcheck=False):
    """``alibi_slopes(num_heads)``: powers of two and not."""
    return Case((draw(st.integers(1, 20)),))


@st.composite
def alibi_bias_cases(draw, *, for_gradcheck=False):
    """``alibi_bias(slopes (B?, H), lq, lk, style=..., align=...)``."""
    batch = draw(st.sampled_from([(), (2,)]))
    slopes = _floats_array(draw, batch + (draw(st.integers(1, 3)),))
    lq, lk = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    opts = {"style": draw(st.sampled_from(["abs", "signed"])), **_align(draw, lq, lk)}
    return Case((slopes, lq, lk), opts)


@st.composite
def sinusoidal_cases(draw, *, for_gradcheck=False):
    """``sinusoidal_positions(length, dim, base=...)``: odd dims included."""
    opts = {"base": draw(st.sampled_from([10000.0, 500.0, 1e6]))} if draw(st.booleans()) else {}
    return Case((draw(st.integers(0, 6)), draw(st.integers(1, 7))), opts)


@st.composite
def topk_mask_cases(draw, *, for_gradcheck=False):
    """``topk_mask(logits (B?, Lq, Lk), top_k=...)``: logits with ``-inf`` (masked) entries and ties."""
    batch = draw(st.sampled_from([(), (2,)]))
    shape = batch + (draw(st.integers(1, 3)), draw(st.integers(1, 4)))
    logits = _with_neg_inf(draw, draw(hnp.arrays(np.float64, shape, elements=st.sampled_from([-1.0, 0.0, 0.5, 2.0]))))
    return Case((logits,), {"top_k": draw(st.integers(1, 5))})


@st.composite
def flow_cases(draw, *, for_gradcheck=False):
    """``attention_flow(attentions (L, H, n, n))``: small (each entry of the result is a linear program),
    every option, a real-token ``mask (n,)``."""
    layers, heads, n = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    maps = _maps(draw, (layers, heads, n, n))
    opts = {"head_fusion": draw(st.sampled_from(["mean", "max", "min"]))}
    if draw(st.booleans()):
        opts["residual"] = draw(st.sampled_from([0.0, 0.5, 1.0]))
    if draw(st.booleans()):
        opts["output_layer"] = draw(st.integers(1, layers))
    if draw(st.booleans()):
        opts["normalize"] = False
    if draw(st.booleans()):
        real = np.array([True] + [draw(st.booleans()) for _ in range(n - 1)])
        opts["mask"] = real
        maps = np.where(real, maps / (maps * real).sum(axis=-1, keepdims=True), maps)
    return Case((maps,), opts)


def _map_options(strategy, **draws):
    """``strategy`` (of map cases) with each option of ``draws`` drawn from its strategy."""
    return st.builds(
        lambda case, more: Case(case.inputs, {**case.options, **more}), strategy, st.fixed_dictionaries(draws)
    )


def detect_collapse_cases(*, for_gradcheck=False):
    """``detect_collapse(P, threshold=..., fraction=...)`` on map cases."""
    return _map_options(map_cases(), threshold=st.sampled_from([0.3, 0.5, 0.8]), fraction=st.sampled_from([0.25, 1.0]))


def detect_uniform_cases(*, for_gradcheck=False):
    """``detect_uniform(P, tolerance=...)`` on map cases."""
    return _map_options(map_cases(), tolerance=st.sampled_from([0.02, 0.2, 1.0]))


def _special_positions(draw, shape):
    return {"special_positions": sorted(draw(st.sets(st.integers(0, shape[-1] - 1), min_size=1)))}


def special_token_cases(*, for_gradcheck=False):
    """``special_token_bias(P, special_positions, factor=...)``."""
    return _map_options(map_cases(extra=_special_positions), factor=st.sampled_from([0.5, 1.0, 2.0]))


@st.composite
def top_tokens_cases(draw, *, for_gradcheck=False):
    """``top_tokens(P, k)``, ``k`` in ``1..Lk``."""
    case = draw(map_cases())
    return Case(case.inputs, {**case.options, "k": draw(st.integers(1, case.inputs[0].shape[-1]))})


@st.composite
def summarize_cases(draw, *, for_gradcheck=False):
    """``summarize(attentions, tokens=..., mask=...)``: 1..2 layers of square maps, token ids shared or
    per example."""
    case = draw(map_cases(square=True))
    (p,) = case.inputs
    layers = [p] + ([_maps(draw, p.shape)] if draw(st.booleans()) else [])
    if "mask" in case.options:
        real = case.options["mask"][..., None, None, :]
        layers = [np.where(real, a / (a * real).sum(axis=-1, keepdims=True), a) for a in layers]
    opts = dict(case.options)
    if draw(st.booleans()):
        shape = draw(st.sampled_from([p.shape[-1:], p.shape[:-3] + p.shape[-1:]]))
        opts["tokens"] = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, 2)))
    return Case((layers,), opts)


@st.composite
def token_pattern_cases(draw, *, for_gradcheck=False):
    """``duplicate_token_pattern`` / ``induction_pattern(tokens (B?, L), real=...)``: ids or strings."""
    shape = draw(st.sampled_from([(), (2,)])) + (draw(st.integers(1, 5)),)
    ids = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, 2)))
    tokens = np.array(["a", "b", "c"])[ids] if draw(st.booleans()) else ids
    opts = {"real": draw(hnp.arrays(bool, shape, elements=st.booleans()))} if draw(st.booleans()) else {}
    return Case((tokens,), opts)


@st.composite
def head_importance_cases(draw, *, for_gradcheck=False):
    """``head_importance(grads (N, L, H) or (N, T, L, H), per=..., normalize=...)``."""
    per = draw(st.sampled_from(["example", "token"]))
    tokens = (draw(st.integers(1, 3)),) if per == "token" or draw(st.booleans()) else ()
    shape = (draw(st.integers(1, 3)),) + tokens + (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    opts = {"per": per, "normalize": draw(st.sampled_from(["layer", None]))}
    return Case((_floats_array(draw, shape),), opts)


@st.composite
def weight_norm_cases(draw, *, for_gradcheck=False):
    """``weight_norm_importance(params, num_heads=...)``: one ``MHAParams`` or one per layer, GQA."""
    case = draw(multihead_cases())
    params = case.inputs[1]
    if draw(st.booleans()):
        params = [params, params._replace(w_q=-params.w_q)]
    return Case((params,), {"num_heads": case.options["num_heads"]})
