"""Scaled dot-product attention in float64, every kernel option, and its backward.

Axes: ``B...`` leading batch dims (broadcast), ``Hq``/``Hk`` query/key heads,
``Lq``/``Lk`` query/key lengths, ``D`` q/k head dim, ``Dv`` value head dim.

* ``q (..., Hq, Lq, D)``, ``k (..., Hk, Lk, D)``, ``v (..., Hk, Lk, Dv)``;
  ``Hq % Hk == 0``; query head i uses key/value head ``i // (Hq // Hk)``.
* ``mask`` bool and ``bias`` float broadcastable to ``(..., Hq, Lq, Lk)``;
  ``sinks`` broadcastable to ``(..., Hq)``; ``dropout_mask`` bool like ``mask``.

Order of operations (normative, ``specs/sdpa.md``)::

    s = scale · q kᵀ                      scale defaults to 1/sqrt(D)
    s = c · tanh(s / c)                   if softcap=c
    s = s + bias                          if bias
    s = -inf where mask/causal/window disallow
    P = exp(s - lse), lse = log(Σ_j exp(s_j) + exp(sink))
    P = P · keep / (1 - dropout_p)        if dropout_mask
    out = P @ v
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np

from refattn import kernels as _kernels
from refattn import masks as _masks
from refattn._validate import (
    RefAttnError,
    as_bool,
    as_choice,
    as_cotangent,
    as_flag,
    as_float,
    as_int,
    as_real,
    check_broadcast_to,
    check_keywords_of,
    unbroadcast,
)
from refattn.softmax_family import EMPTY_ROW_POLICIES, normalize_last_axis

__all__ = [
    "LOGIT_STAGES",
    "AttentionLogitsGrads",
    "AttentionWeightsGrads",
    "SDPAGrads",
    "attention_logits",
    "attention_logits_backward",
    "attention_weights",
    "attention_weights_backward",
    "sdpa",
    "sdpa_backward",
]


class SDPAGrads(NamedTuple):
    """Gradients of :func:`sdpa` (returned by :func:`sdpa_backward`), each float64 and of its
    input's shape: GQA groups and broadcast dims are summed back.

    Fields
    ------
    dq : ndarray, shape of ``q`` (..., Hq, Lq, D)
    dk : ndarray, shape of ``k`` (..., Hk, Lk, D)
    dv : ndarray, shape of ``v`` (..., Hk, Lk, Dv)
    dbias : ndarray or None
        Shape of ``bias``; None when no bias was given.
    dsinks : ndarray or None
        Shape of ``sinks``; None when no sinks were given.
    """

    dq: np.ndarray
    dk: np.ndarray
    dv: np.ndarray
    dbias: np.ndarray | None
    dsinks: np.ndarray | None


class AttentionWeightsGrads(NamedTuple):
    """Gradients of :func:`attention_weights` (returned by :func:`attention_weights_backward`),
    each float64 and of its input's shape.

    Fields
    ------
    dq : ndarray, shape of ``q`` (..., Hq, Lq, D)
    dk : ndarray, shape of ``k`` (..., Hk, Lk, D)
    dbias : ndarray or None
        Shape of ``bias``; None when no bias was given.
    dsinks : ndarray or None
        Shape of ``sinks``; None when no sinks were given.
    """

    dq: np.ndarray
    dk: np.ndarray
    dbias: np.ndarray | None
    dsinks: np.ndarray | None


class AttentionLogitsGrads(NamedTuple):
    """Gradients of :func:`attention_logits` (returned by :func:`attention_logits_backward`), each
    float64 and of its input's shape.

    Fields
    ------
    dq : ndarray, shape of ``q`` (..., Hq, Lq, D)
    dk : ndarray, shape of ``k`` (..., Hk, Lk, D)
    dbias : ndarray or None
        Shape of ``bias`` (zeros when ``stage`` comes before the bias); None when no bias was given.
    """

    dq: np.ndarray
    dk: np.ndarray
    dbias: np.ndarray | None


#: The stages of :func:`attention_logits`, in sdpa's order of operations.
LOGIT_STAGES = ("scaled", "softcapped", "biased", "masked")


@dataclass(frozen=True)
class Args:
    """Validated float64 arguments of one sdpa call."""

    q: np.ndarray  # (..., Hq, Lq, D)
    k: np.ndarray  # (..., Hk, Lk, D)
    v: np.ndarray | None  # (..., Hk, Lk, Dv)
    scale: float
    softcap: float | None
    bias: np.ndarray | None  # broadcastable to scores
    user_mask: np.ndarray | None  # bool, broadcastable to scores (the ``mask`` argument)
    causal: bool
    window: tuple  # (left, right), None = unbounded side, ints of any sign (clipped)
    chunk: int | None  # (i + o) // chunk == j' // chunk
    sink_tokens: int  # keys j' < sink_tokens exempt from the window's left side
    seqs: _masks.Sequences  # per-sequence lengths, starts and alignment offsets (batch-shaped)
    sinks: np.ndarray | None  # broadcastable to (..., Hq)
    keep_scale: np.ndarray | None  # keep / (1 - p), broadcastable to scores
    empty_rows: str
    score_shape: tuple  # (..., Hq, Lq, Lk)

    @property
    def groups(self):
        return self.q.shape[-3] // self.k.shape[-3]

    @property
    def structured(self):
        """Whether causal, a window, a chunk or padding restrict the keys (computed per sequence)."""
        return self.seqs.padded or self.causal or self.window != (None, None) or self.chunk is not None

    @property
    def masked(self):
        """Whether ``mask``, causal, window, chunk or padding may disallow scores (``allowed`` is not
        None); builds nothing."""
        return self.user_mask is not None or self.structured

    @cached_property
    def allowed(self):
        """bool mask broadcastable to the scores (mask ∧ structure), or None when all allowed."""
        lq, lk = self.score_shape[-2:]
        band = _masks.allowed_positions(
            lq, lk, self.seqs, causal=self.causal, window=self.window, chunk=self.chunk, sink_tokens=self.sink_tokens
        )
        if band is None:
            return self.user_mask
        return band if self.user_mask is None else self.user_mask & band

    @cached_property
    def padded_rows(self):
        """bool ``(B..., 1, Lq)``: the padded query rows (``i >= q_length``), or None when there are none."""
        return _masks.padded_queries(self.score_shape[-2], self.seqs)


def validate(
    q,
    k,
    v,
    *,
    mask=None,
    bias=None,
    causal=False,
    window=None,
    align=None,
    chunk=None,
    sink_tokens=0,
    q_lengths=None,
    k_lengths=None,
    k_starts=None,
    scale=None,
    softcap=None,
    sinks=None,
    dropout_p=0.0,
    dropout_mask=None,
    empty_rows="zero",
    names=("q", "k", "v"),
):
    """Check and convert every argument of sdpa (``v=None`` for attention_weights).

    ``names`` are the caller's names for q, k, v, used in error messages.
    """
    qn, kn, vn = names
    q = as_float(q, qn, ndim_min=3)
    k = as_float(k, kn, ndim_min=3)
    hq, lq, d = q.shape[-3:]
    hk, lk, dk = k.shape[-3:]
    for arg, what, n in (
        (qn, "heads Hq", hq),
        (qn, "length Lq", lq),
        (qn, "head dim D", d),
        (kn, "heads Hk", hk),
        (kn, "length Lk", lk),
    ):
        if n < 1:
            raise RefAttnError(f"{arg}: expected {what} >= 1, got shape {(q if arg == qn else k).shape}")
    if dk != d:
        raise RefAttnError(f"{kn}: expected last dim D={d} (as {qn} {q.shape}), got {kn} shape {k.shape}")
    if hq % hk:
        raise RefAttnError(f"{kn}: expected a number of heads Hk dividing Hq={hq} (GQA), got Hk={hk} (shape {k.shape})")
    batch_shapes = [(qn, q.shape[:-3]), (kn, k.shape[:-3])]
    if v is not None:
        v = as_float(v, vn, ndim_min=3)
        if v.shape[-3:-1] != (hk, lk) or v.shape[-1] < 1:
            raise RefAttnError(
                f"{vn}: expected shape (..., Hk={hk}, Lk={lk}, Dv>=1) to match {kn} {k.shape}, got {v.shape}"
            )
        batch_shapes.append((vn, v.shape[:-3]))
    try:
        batch = np.broadcast_shapes(*(s for _, s in batch_shapes))
    except ValueError:
        desc = ", ".join(f"{n} {s}" for n, s in batch_shapes)
        raise RefAttnError(f"{', '.join(names)}: expected broadcastable leading batch dims, got {desc}") from None
    score_shape = tuple(batch) + (hq, lq, lk)

    as_choice(empty_rows, "empty_rows", EMPTY_ROW_POLICIES)
    scale = 1.0 / math.sqrt(d) if scale is None else as_real(scale, "scale")
    softcap = as_real(softcap, "softcap", positive=True)

    user_mask = None
    if mask is not None:
        user_mask = as_bool(mask, "mask", hint="; pass an additive float mask as bias=")
        check_broadcast_to(user_mask, score_shape, "mask", "the scores (..., Hq, Lq, Lk)")
    causal = as_flag(causal, "causal")
    window = (None, None) if window is None else _masks.check_window(window)
    chunk = None if chunk is None else as_int(chunk, "chunk", minimum=1)
    sink_tokens = as_int(sink_tokens, "sink_tokens", minimum=0)
    on = (("causal", causal), ("window", window != (None, None)), ("chunk", chunk is not None))
    what = " and ".join(w for w, used in on if used) or None
    seqs = _masks.sequences(
        tuple(batch), lq, lk, q_lengths=q_lengths, k_lengths=k_lengths, k_starts=k_starts, align=align, what=what
    )
    window = _masks.clip_window(window, lq, lk, int(np.max(np.abs(seqs.offsets), initial=0)))

    if bias is not None:
        bias = as_float(bias, "bias", allow_neg_inf=True)
        check_broadcast_to(bias, score_shape, "bias", "the scores (..., Hq, Lq, Lk)")
    if sinks is not None:
        sinks = as_float(sinks, "sinks", allow_neg_inf=True)
        check_broadcast_to(sinks, tuple(batch) + (hq,), "sinks", "(..., Hq)")
    check_logits(q, k, scale, bias, (qn, kn))

    p = as_real(dropout_p, "dropout_p", allow_none=False)
    if not 0.0 <= p < 1.0:
        raise RefAttnError(f"dropout_p: expected a probability in [0, 1), got {p}")
    keep_scale = None
    if dropout_mask is not None:
        keep = as_bool(dropout_mask, "dropout_mask")
        check_broadcast_to(keep, score_shape, "dropout_mask", "the scores (..., Hq, Lq, Lk)")
        keep_scale = keep / (1.0 - p)
    elif p > 0:
        raise RefAttnError(
            f"dropout_mask: dropout_p={p} > 0 needs an explicit keep-mask (the reference is "
            "deterministic); build one with refattn.masks.dropout_mask(shape, p, seed)"
        )
    return Args(
        q,
        k,
        v,
        scale,
        softcap,
        bias,
        user_mask,
        causal,
        window,
        chunk,
        sink_tokens,
        seqs,
        sinks,
        keep_scale,
        empty_rows,
        score_shape,
    )


LOGIT_LIMIT = 2.0**1022  # bound on Σ_d |q_d k_d| and on bias: a sum of two such terms, rounded, stays finite
_CHECK_ROWS = 256  # query rows per product in the exact overflow check


def _max_abs(x):
    return max(float(np.max(x, initial=0.0)), -float(np.min(x, initial=0.0)))


def max_abs_dot(q, k):
    """``max_ij Σ_d |q_id| |k_jd|`` over every query row i and key j of its kv head, ``q (..., Hq, Lq, D)``
    and ``k (..., Hk, Lk, D)``; a block of rows at a time (O(rows · Lk) memory), ``inf`` on overflow."""
    batch = np.broadcast_shapes(q.shape[:-3], k.shape[:-3])
    hk, lk, d = k.shape[-3:]
    rows = q.shape[-3] // hk * q.shape[-2]  # the query rows of each kv head's group
    qa = np.abs(np.broadcast_to(q, batch + q.shape[-3:])).reshape(-1, hk, rows, d)  # (N, Hk, g·Lq, D)
    ka = np.abs(np.broadcast_to(k, batch + k.shape[-3:])).reshape(-1, hk, lk, d)  # (N, Hk, Lk, D)
    best = 0.0
    with np.errstate(over="ignore"):
        for n, h in np.ndindex(qa.shape[:2]):
            for i0 in range(0, rows, _CHECK_ROWS):
                best = max(best, float(np.max(qa[n, h, i0 : i0 + _CHECK_ROWS] @ ka[n, h].T)))
    return best


def check_logits(q, k, scale, bias, names=("q", "k")):
    """RefAttnError unless every logit fits float64 whatever the summation order: ``max(1, |scale|) ·
    Σ_d |q_id| |k_jd| <= LOGIT_LIMIT`` for every pair (the product q·kᵀ is formed before it is
    scaled, so it must fit too) and ``bias <= LOGIT_LIMIT``.  Cheap first: ``D · max|q| · max|k|``
    bounds every sum, and only when that bound exceeds the limit are the sums formed (blockwise)."""
    growth = max(1.0, abs(scale))
    mq, mk = _max_abs(q), _max_abs(k)
    with np.errstate(over="ignore", invalid="ignore"):
        bound = q.shape[-1] * mq * mk * growth  # inf or NaN (0 · inf) when it overflows
    if not bound <= LOGIT_LIMIT:
        bound = max_abs_dot(q, k) * growth
    if not bound <= LOGIT_LIMIT:
        qn, kn = names
        raise RefAttnError(
            f"{qn}, {kn}, scale: the logits scale · {qn} {kn}ᵀ overflow float64 (max_ij Σ_d |{qn}_id {kn}_jd| · "
            f"max(1, |scale|) = {bound:.3g} > 2**1022; max |{qn}| = {mq:.3g}, max |{kn}| = {mk:.3g}, "
            f"scale = {scale:.3g}); rescale {qn} or {kn}"
        )
    if bias is not None and np.max(bias, initial=-np.inf) > LOGIT_LIMIT:
        raise RefAttnError(
            f"bias: expected entries <= 2**1022 (larger logits overflow float64), got max {np.max(bias):.3g}"
        )


def expand_kv(x, groups):
    """Repeat each kv head ``groups`` times along axis -3 (PyTorch ``repeat_interleave``)."""
    return x if groups == 1 else np.repeat(x, groups, axis=-3)


def reduce_kv(dx, groups):
    """Sum a gradient of expanded kv heads ``(..., Hq, L, E)`` back to ``(..., Hk, L, E)``."""
    if groups == 1:
        return dx
    *lead, hq, n, e = dx.shape
    return dx.reshape(*lead, hq // groups, groups, n, e).sum(axis=-3)


class Forward(NamedTuple):
    """Intermediates of the forward pass, reused by the backward."""

    ke: np.ndarray  # (..., Hq, Lk, D)   kv heads expanded
    tanh: np.ndarray | None  # (..., Hq, Lq, Lk)  tanh(s0/c) when softcap
    p: np.ndarray  # (..., Hq, Lq, Lk)  softmax probabilities (before dropout)
    lse: np.ndarray  # (..., Hq, Lq)       -inf on empty rows
    empty: np.ndarray  # (..., Hq, Lq)     bool
    p_sink: np.ndarray | None  # (..., Hq, Lq)
    logits: np.ndarray  # (..., Hq, Lq, Lk)  the softmax input, -inf where disallowed


def qk_scores(a: Args):
    """Step 1: ``s0 = scale · q k̃ᵀ (..., Hq, Lq, Lk)`` and the expanded keys ``k̃ (..., Hq, Lk, D)``."""
    ke = expand_kv(a.k, a.groups)
    return a.scale * (a.q @ np.swapaxes(ke, -1, -2)), ke


def forward_scores(a: Args, s0=None, ke=None) -> Forward:
    """Steps 2-5 (softcap, bias, masks, softmax with sinks) on ``s0``; step 1 when ``s0`` is None.

    Variants (relative position, allocation gate) pass their own ``s0`` and ``ke``.
    """
    if s0 is None:
        s0, ke = qk_scores(a)
    s = s0
    t = None
    if a.softcap is not None:
        t = np.tanh(s0 / a.softcap)  # (..., Hq, Lq, Lk)
        s = a.softcap * t
    if a.bias is not None:
        s = s + a.bias
    if a.allowed is not None:
        s = np.where(a.allowed, s, -np.inf)
    s = np.broadcast_to(s, a.score_shape)
    sink = None if a.sinks is None else np.broadcast_to(a.sinks[..., None], a.score_shape[:-1])  # (..., Hq, Lq)
    nz = normalize_last_axis(s, a.empty_rows, sink)
    p, lse, empty, p_sink = nz.p, nz.lse, nz.empty, nz.p_sink
    pad = a.padded_rows  # (B..., 1, Lq): padded query rows give 0 and lse -inf under every policy
    if pad is not None:
        p = np.where(pad[..., None], 0.0, p)
        lse = np.where(pad, -np.inf, lse)
        empty = empty | pad
        p_sink = None if p_sink is None else np.where(pad, 0.0, p_sink)
    return Forward(ke, t, p, lse, empty, p_sink, s)


def sdpa(
    q,
    k,
    v,
    *,
    mask=None,
    bias=None,
    causal=False,
    window=None,
    align=None,
    chunk=None,
    sink_tokens=0,
    q_lengths=None,
    k_lengths=None,
    k_starts=None,
    scale=None,
    softcap=None,
    sinks=None,
    dropout_p=0.0,
    dropout_mask=None,
    empty_rows="zero",
    return_lse=False,
    backend="auto",
):
    """Scaled dot-product attention in float64, every kernel option applied in one fixed order.

    ``out = P̃ v``, ``P = softmax_j(mask(softcap(scale · q kᵀ) + bias))`` with the sink in each
    row's denominator, ``P̃ = P · keep / (1 − dropout_p)``.

    Axes: ``...`` batch dims (broadcast between q, k and v), ``Hq`` query heads, ``Hk`` key/value
    heads (``Hq % Hk == 0``; query head h reads kv head ``h // (Hq // Hk)``: GQA, MQA), ``Lq`` query
    length, ``Lk`` key length, ``D`` q/k head dim, ``Dv`` value head dim.  The scores are
    ``(..., Hq, Lq, Lk)``.  Order of operations (normative, ``specs/sdpa.md``)::

        1. s = scale · q k̃ᵀ                      k̃: kv heads repeated to Hq
        2. s = c · tanh(s / c)                   if softcap = c
        3. s = s + bias                          if bias
        4. s = -inf where mask, causal or window disallow (their intersection)
        5. lse = log(Σ_j exp(s_j) + exp(sink)),  P = exp(s − lse)
        6. P̃ = P · keep / (1 − dropout_p)       if dropout_mask = keep
        7. out = P̃ ṽ

    Each batch item is a sequence with ``q_length`` real queries and ``k_length`` real keys
    starting at key ``k_start`` (defaults: all of them); key positions count from that start,
    ``j' = j − k_start``, and query ``i`` sits at key position ``i + o``, ``o`` the alignment
    offset (0 for ``align="top_left"``, ``k_length − q_length`` for ``"bottom_right"``, or an int).
    With ``d = j' − (i + o)``: ``causal`` allows ``d <= 0``, ``window=(left, right)`` allows
    ``−left <= d <= right`` (keys ``j' < sink_tokens`` exempt from the left side), ``chunk=c``
    allows ``(i + o) // c == j' // c``; padding keys are never allowed, and padded query rows
    (``i >= q_length``) give ``out = 0``, ``lse = −inf`` and no gradient under every
    ``empty_rows`` policy (``specs/sdpa.md``, "Sequences, alignment and structure").

    Parameters
    ----------
    q : array_like, shape (..., Hq, Lq, D)
        Queries: any real dtype (bfloat16 and float8 too), converted to float64, never mutated;
        finite.  Every length, head count and head dim is >= 1.
    k : array_like, shape (..., Hk, Lk, D)
        Keys; ``Hk`` divides ``Hq``; finite.
    v : array_like, shape (..., Hk, Lk, Dv)
        Values; finite.
    mask : array_like of bool, broadcastable to (..., Hq, Lq, Lk), optional
        True = query i may attend key j (:mod:`refattn.masks` builds them).  A float mask is
        refused: pass an additive mask as ``bias``.  Default None: every key allowed.
    bias : array_like, broadcastable to (..., Hq, Lq, Lk), optional
        Added to the logits after the softcap (ALiBi, relative positions, an additive mask); may
        hold ``-inf`` (disallowed), not NaN or ``+inf``, entries at most 2**1022.  Differentiable
        (``dbias``).  Default None.
    causal : bool, default False
        Query i attends keys ``j' <= i + o``.
    window : int or (int or None, int or None), optional
        ``(left, right)``: query i attends keys ``i + o − left <= j' <= i + o + right``; each side
        an int of any sign and size (a negative side moves that edge past the diagonal: ``(-1,
        2)`` allows ``i + o + 1 <= j' <= i + o + 2``) or None (unbounded); an int ``w`` is ``(w,
        w)``.  Intersected with ``causal``, ``chunk`` and ``mask``.  Default None: no window.
        (flash-attn's ``window_size=(l, r)``, -1 unbounded, is ``(None if l < 0 else l, None if r
        < 0 else r)``.)
    align : {"top_left", "bottom_right"} or int, optional
        Where the diagonal of ``causal``, ``window`` and ``chunk`` lies: ``"top_left"``, ``o = 0``
        (PyTorch, JAX); ``"bottom_right"``, ``o = k_length − q_length`` per sequence
        (flash-attn, decoding); an int ``o`` with ``|o| <= 2**40`` (ONNX's past length, cuDNN).
        Default None: ``o = 0`` when every sequence has ``q_length == k_length``; otherwise causal,
        window or chunk without it is a RefAttnError (never guessed).  Without them it has no
        effect.
    chunk : int, optional
        ``c >= 1`` (FA3's ``attention_chunk``): query i attends only keys of its own chunk of c
        positions, ``(i + o) // c == j' // c`` (floor division), intersected with causal and
        window.  Default None: no chunks.
    sink_tokens : int, default 0
        ``n >= 0`` (FA3's ``sink_token_length``, StreamingLLM): keys ``j' < n`` are exempt from the
        window's left side (the window slides, the sink tokens stay); causal, the right side and
        chunks still apply.  No effect without a left window side.
    q_lengths : array_like of int, broadcastable to the batch dims ``...``, optional
        Real queries per sequence, each in ``[0, Lq]``: rows ``i >= q_length`` are padding (out 0,
        lse ``-inf``, no gradient, whatever ``empty_rows`` says).  Default None: ``Lq``.
    k_lengths : array_like of int, broadcastable to the batch dims ``...``, optional
        Real keys per sequence, each in ``[0, Lk − k_start]``: keys outside ``[k_start, k_start +
        k_length)`` are padding.  Default None: ``Lk − k_start``.
    k_starts : array_like of int, broadcastable to the batch dims ``...``, optional
        Each sequence's first real key, in ``[0, Lk]`` (flash-attn's ``key_leftpad``, xformers'
        gappy keys).  Default None: 0.
    scale : float, optional
        Multiplies ``q kᵀ``: any finite real (a 0-d array too).  Default None: ``1 / sqrt(D)``.
    softcap : float, optional
        ``c > 0``: logits ``c · tanh(s / c)`` (Gemma 2, Grok), before bias and masks.  Default
        None: no cap.
    sinks : array_like, broadcastable to (..., Hq), optional
        A logit per head that joins every row's softmax denominator without a value (gpt-oss,
        StreamingLLM): rows of P then sum to ``1 − exp(sink − lse)``; may be ``-inf``.
        Differentiable (``dsinks``).  Default None.
    dropout_p : float, default 0.0
        Dropout probability in [0, 1); ``> 0`` needs ``dropout_mask`` (the reference is
        deterministic).
    dropout_mask : array_like of bool, broadcastable to (..., Hq, Lq, Lk), optional
        True = keep: kept weights are scaled by ``1 / (1 − dropout_p)``; build one with
        :func:`refattn.masks.dropout_mask`.  Default None: no dropout.
    empty_rows : {"zero", "nan", "uniform"}, default "zero"
        The result for an *empty* row (every key disallowed and no finite sink): ``"zero"``, P
        and out 0 (PyTorch's safe softmax, flash-attn); ``"nan"``, NaN (xformers, eager
        softmax); ``"uniform"``, ``P = 1/Lk`` and out the mean of v over all ``Lk`` keys,
        dropout applied (as a finite fill such as ``finfo.min`` gives).  lse is ``-inf`` there
        under every policy.
    return_lse : bool, default False
        Also return ``lse``.
    backend : {"auto", "numpy", "numba"}, default "auto"
        ``"numpy"``: this module, the definition; ``"numba"``: the tiled kernel (no ``Lq × Lk``
        array, within 1e-12 of numpy; needs numba); ``"auto"``: the kernel from
        ``refattn.kernels.AUTO_MIN_SCORES`` (2**18) scores on, or when the NumPy path is over
        its limit, if numba is installed.  The NumPy path refuses (RefAttnError, before
        allocating) when its score-sized intermediates would exceed
        ``refattn.kernels.numpy_max_bytes()`` (8 GiB unless ``REFATTN_NUMPY_MAX_BYTES`` says
        otherwise).

    Returns
    -------
    out : ndarray of float64, shape (..., Hq, Lq, Dv)
        ``...`` is the broadcast of q's, k's and v's batch dims.
    lse : ndarray of float64, shape (..., Hq, Lq)
        Only with ``return_lse=True``, as ``(out, lse)``: the natural log of each row's softmax
        denominator, the sink included, before dropout; ``-inf`` on empty rows.

    Raises
    ------
    RefAttnError
        A bad shape, value or option, named in the message (``RefAttnTypeError`` for a wrong
        type, such as a float mask); logits that could overflow float64.
    """
    return_lse = as_flag(return_lse, "return_lse")
    a = validate(
        q,
        k,
        v,
        mask=mask,
        bias=bias,
        causal=causal,
        window=window,
        align=align,
        chunk=chunk,
        sink_tokens=sink_tokens,
        q_lengths=q_lengths,
        k_lengths=k_lengths,
        k_starts=k_starts,
        scale=scale,
        softcap=softcap,
        sinks=sinks,
        dropout_p=dropout_p,
        dropout_mask=dropout_mask,
        empty_rows=empty_rows,
    )
    return run_forward(a, return_lse, backend)


def score_arrays(a: Args, backward=False):
    """How many float64 arrays of the score shape ``(..., Hq, Lq, Lk)`` the NumPy path holds at once,
    at most (an upper bound, counted in the code below and checked against tracemalloc in the tests).

    Forward (``forward_scores``, ``normalize_last_axis``): ``s0 = scale·(q k̃ᵀ)`` (the product and its
    scaled copy), then in the softmax the logits, ``s − m`` and ``e = exp(s − m)``, then ``e`` and
    ``P``: 3.  A softcap keeps ``s0`` and ``tanh(s0/c)`` beside the capped logits: +2.  A bias or a
    mask (causal, window) makes the logits a new array beside ``s0``: +1.  ``empty_rows="nan"`` /
    ``"uniform"`` fills empty rows of ``P`` into a copy: +1.
    Backward (``backward_values``, ``backward_logits``): the logits, ``P``, ``dP``, ``dP − Δ`` and
    ``dP − Δ + dlse`` (temporaries), then ``ds``: 5 (after the forward's peak has passed); softcap holds
    ``tanh``, ``1 − tanh²`` and the new ``ds``: +2; dropout ``P̃`` and ``dP̃``: +1; dbias (summed over
    the bias' broadcast axes, a copy) or ``"uniform"`` (``ds`` zeroed on empty rows, a copy): +1.
    A mask (bool, 1 byte a score, held while the op runs, ``mask ∧ band`` formed once): +1/4.
    """
    softcap = 2 * (a.softcap is not None)
    count = 3 + softcap + (a.bias is not None or a.masked) + (a.empty_rows != "zero")
    if backward:
        extra = a.bias is not None or a.empty_rows == "uniform"
        count = max(count, 5 + softcap + (a.keep_scale is not None) + extra)
    return count + 0.25 * a.masked


def numpy_bytes(a: Args, backward=False):
    """Bytes of the score-sized intermediates of the NumPy path (``score_arrays`` of them)."""
    return score_arrays(a, backward) * 8.0 * math.prod(a.score_shape)


def choose_backend(a: Args, backend, backward=False, op="sdpa"):
    """``"numpy"`` or ``"numba"`` (``refattn.kernels.resolve_backend``): ``"auto"`` takes the kernel from
    ``AUTO_MIN_SCORES`` scores on, and a NumPy path needing more than ``refattn.kernels.numpy_max_bytes()``
    for its score-sized intermediates is refused (``"auto"`` takes the kernel instead when it can)."""
    what = f"the NumPy path of {op}"
    count = math.prod(a.score_shape)
    return _kernels.resolve_backend(backend, count, numpy_bytes(a, backward), what=what, shape=a.score_shape)


def _check_weights_size(a: Args, op, backward=False):
    """attention_weights has no kernel (its output is score-sized): refuse it over the NumPy limit
    (the backward also copies ``d_weights``, one more score-sized array)."""
    nbytes = numpy_bytes(a, backward) + backward * 8.0 * math.prod(a.score_shape)
    limit = _kernels.numpy_max_bytes()
    if nbytes > limit:
        text = _kernels.numpy_too_big_message("q, k", op, nbytes, limit, a.score_shape)
        raise RefAttnError(
            text + '; sdpa(..., return_lse=True, backend="numba") gives out and lse without P (O(N·D) memory), '
            "or take fewer queries at a time"
        )


def run_forward(a: Args, return_lse, backend="numpy"):
    """Steps 1-7 on validated arguments: ``out`` [, ``lse``]."""
    if choose_backend(a, backend) == "numba":
        out, lse = _kernels.sdpa_forward(a)
        return (out, lse) if return_lse else out
    f = forward_scores(a)
    pd = f.p if a.keep_scale is None else f.p * a.keep_scale  # (..., Hq, Lq, Lk)
    out = pd @ expand_kv(a.v, a.groups)  # (..., Hq, Lq, Dv)
    return (out, f.lse.copy()) if return_lse else out


def backward_logits(a: Args, f: Forward, dp, d_lse):
    """Undo steps 5 back to 2: from ``dP (..., Hq, Lq, Lk)`` and ``d_lse`` to ``ds0``, dbias, dsinks."""
    # P = softmax(s) over keys, the sink in the denominator; lse = log(denominator)
    delta = np.einsum("...j,...j->...", f.p, dp)  # (..., Hq, Lq)  Σ_j P dP
    dl = np.zeros(delta.shape) if d_lse is None else np.where(f.empty, 0.0, d_lse)  # (..., Hq, Lq)
    ds = f.p * (dp - delta[..., None] + dl[..., None])  # (..., Hq, Lq, Lk)
    if a.empty_rows == "uniform" and f.empty.any():
        ds = np.where(f.empty[..., None], 0.0, ds)  # a constant fill has no gradient
    dsinks = None
    if a.sinks is not None:
        dsinks = unbroadcast((f.p_sink * (dl - delta)).sum(axis=-1), a.sinks.shape)  # (..., Hq) <- (..., Hq, Lq)
    # s = where(allowed, s, -inf): ds is already 0 where P = 0
    # s = s + bias
    dbias = None if a.bias is None else unbroadcast(ds, a.bias.shape)
    # s = c tanh(s0 / c)
    if f.tanh is not None:
        ds = ds * (1.0 - f.tanh**2)  # (..., Hq, Lq, Lk)
    return ds, dbias, dsinks


def backward_qk(a: Args, ke, ds0):
    """Undo step 1, ``s0 = scale q k̃ᵀ``: dq ``(q's shape)`` and dk ``(k's shape)``."""
    dq = a.scale * (ds0 @ ke)  # (..., Hq, Lq, D)
    dke = a.scale * (np.swapaxes(ds0, -1, -2) @ a.q)  # (..., Hq, Lk, D)
    return unbroadcast(dq, a.q.shape), unbroadcast(reduce_kv(dke, a.groups), a.k.shape)


def backward_scores(a: Args, f: Forward, dp, d_lse):
    """Steps 5 back to 1: dq, dk, dbias, dsinks."""
    ds0, dbias, dsinks = backward_logits(a, f, dp, d_lse)
    dq, dk = backward_qk(a, f.ke, ds0)
    return dq, dk, dbias, dsinks


def backward_values(a: Args, f: Forward, d_out, ve):
    """Undo steps 7 and 6 (``out = P̃ ṽ``, ``P̃ = P keep/(1-p)``): ``dP``, ``dṽ`` and ``P̃``."""
    pd = f.p if a.keep_scale is None else f.p * a.keep_scale  # (..., Hq, Lq, Lk)
    dve = np.swapaxes(pd, -1, -2) @ d_out  # (..., Hq, Lk, Dv)
    dpd = d_out @ np.swapaxes(ve, -1, -2)  # (..., Hq, Lq, Lk)
    dp = dpd if a.keep_scale is None else dpd * a.keep_scale
    return dp, dve, pd


def sdpa_backward(
    d_out,
    q,
    k,
    v,
    *,
    d_lse=None,
    mask=None,
    bias=None,
    causal=False,
    window=None,
    align=None,
    chunk=None,
    sink_tokens=0,
    q_lengths=None,
    k_lengths=None,
    k_starts=None,
    scale=None,
    softcap=None,
    sinks=None,
    dropout_p=0.0,
    dropout_mask=None,
    empty_rows="zero",
    backend="auto",
    saved=None,
):
    """Gradients of :func:`sdpa`: the vector-Jacobian product of ``out`` (and ``lse``) at q, k, v,
    bias and sinks.

    ``dq, dk, dv, dbias, dsinks = ∂/∂(q, k, v, bias, sinks) of Σ d_out · out + Σ d_lse · lse``,
    steps 7 back to 1 of :func:`sdpa`'s order of operations (``specs/sdpa.md``).  Axes as
    :func:`sdpa`: ``...`` batch, ``Hq``/``Hk`` query/kv heads, ``Lq``/``Lk`` lengths, ``D``/``Dv``
    head dims.

    Parameters
    ----------
    d_out : array_like, shape (..., Hq, Lq, Dv)
        Cotangent of ``out``: exactly the output's shape, finite.
    q, k, v : array_like
        As :func:`sdpa`: ``(..., Hq, Lq, D)``, ``(..., Hk, Lk, D)``, ``(..., Hk, Lk, Dv)``.
    d_lse : array_like, shape (..., Hq, Lq), optional
        Cotangent of ``lse`` (when the forward returned it); ignored on empty rows.  Default
        None: no lse term.
    mask, bias, causal, window, align, chunk, sink_tokens
        The forward's options, as :func:`sdpa` (same defaults): pass exactly those of the
        forward call.
    q_lengths, k_lengths, k_starts, scale, softcap, sinks, dropout_p, dropout_mask, empty_rows
        Likewise.
    backend : {"auto", "numpy", "numba"}, default "auto"
        As :func:`sdpa`; the kernel recomputes P from lse, FlashAttention-2 style.
    saved : (out, lse), optional
        What ``sdpa(..., return_lse=True)`` returned for these same arguments: the kernel then
        skips recomputing the forward (as autograd reuses saved tensors).  Shapes are checked,
        values trusted: pass exactly what refattn returned.  The NumPy path rebuilds P and does
        not use it.  Default None.

    Returns
    -------
    SDPAGrads
        ``(dq, dk, dv, dbias, dsinks)``, float64, each of its input's shape (GQA groups and
        broadcast dims summed); ``dbias``/``dsinks`` None without bias/sinks.  An empty row
        contributes nothing under ``empty_rows="zero"``, NaN to its head's gradients under
        ``"nan"``, and to dv alone under ``"uniform"``.
    """
    a = validate(
        q,
        k,
        v,
        mask=mask,
        bias=bias,
        causal=causal,
        window=window,
        align=align,
        chunk=chunk,
        sink_tokens=sink_tokens,
        q_lengths=q_lengths,
        k_lengths=k_lengths,
        k_starts=k_starts,
        scale=scale,
        softcap=softcap,
        sinks=sinks,
        dropout_p=dropout_p,
        dropout_mask=dropout_mask,
        empty_rows=empty_rows,
    )
    return run_backward(a, d_out, d_lse, backend, saved)


def _saved(saved, out_shape):
    """``(out, lse)`` from the forward, shape-checked (values may be NaN / -inf, as sdpa returns)."""
    if not (isinstance(saved, (tuple, list)) and len(saved) == 2):
        raise RefAttnError("saved: expected the pair (out, lse) that sdpa(..., return_lse=True) returned")
    out, lse = (np.asarray(x, dtype=np.float64) for x in saved)
    for name, x, shape in (("saved out", out, out_shape), ("saved lse", lse, out_shape[:-1])):
        if x.shape != shape:
            raise RefAttnError(f"{name}: expected shape {shape}, got {x.shape}")
    return out, lse


def run_backward(a: Args, d_out, d_lse, backend="numpy", saved=None):
    """Steps 7 back to 1 on validated arguments → :class:`SDPAGrads`."""
    chosen = choose_backend(a, backend, backward=True, op="sdpa_backward")  # before d_out is copied
    out_shape = a.score_shape[:-1] + (a.v.shape[-1],)
    d_o = as_cotangent(d_out, out_shape, "d_out")  # (..., Hq, Lq, Dv)
    dl = None if d_lse is None else as_cotangent(d_lse, a.score_shape[:-1], "d_lse")
    saved = None if saved is None else _saved(saved, out_shape)
    if chosen == "numba":
        return SDPAGrads(*_kernels.sdpa_backward(a, d_o, dl, saved))
    f = forward_scores(a)
    dp, dve, _ = backward_values(a, f, d_o, expand_kv(a.v, a.groups))
    dq, dk, dbias, dsinks = backward_scores(a, f, dp, dl)
    dv = unbroadcast(reduce_kv(dve, a.groups), a.v.shape)
    return SDPAGrads(dq, dk, dv, dbias, dsinks)


def attention_weights(
    q,
    k,
    *,
    mask=None,
    bias=None,
    causal=False,
    window=None,
    align=None,
    chunk=None,
    sink_tokens=0,
    q_lengths=None,
    k_lengths=None,
    k_starts=None,
    scale=None,
    softcap=None,
    sinks=None,
    empty_rows="zero",
):
    """The attention weights of :func:`sdpa`: ``P = softmax_j(mask(softcap(scale · q kᵀ) + bias))``,
    the sink in the denominator, before dropout.

    Steps 1 to 5 of :func:`sdpa`'s order of operations.  Axes: ``...`` batch, ``Hq``/``Hk``
    query/kv heads (``Hq % Hk == 0``), ``Lq``/``Lk`` query/key lengths, ``D`` head dim.  No kernel
    (the output is score-sized): over the NumPy memory limit it raises, pointing to
    ``sdpa(..., return_lse=True, backend="numba")``.

    Parameters
    ----------
    q : array_like, shape (..., Hq, Lq, D)
        Queries (float64 after conversion; finite).
    k : array_like, shape (..., Hk, Lk, D)
        Keys.
    q_lengths, k_lengths, k_starts
        As :func:`sdpa`: the sequences of a padded batch (a padded query row of P is 0).
    mask, bias, causal, window, align, chunk, sink_tokens, scale, softcap, sinks, empty_rows
        As :func:`sdpa` (same meaning and defaults): ``mask`` bool broadcastable to
        ``(..., Hq, Lq, Lk)`` (True = may attend), ``bias`` float of that shape, ``causal`` /
        ``window`` / ``align`` / ``chunk`` / ``sink_tokens`` the structural masks, ``scale``
        (default ``1/sqrt(D)``),
        ``softcap``, ``sinks`` ``(..., Hq)``, ``empty_rows`` ``"zero"``, ``"nan"`` or
        ``"uniform"`` (the row of P: 0, NaN or ``1/Lk``).

    Returns
    -------
    P : ndarray of float64, shape (..., Hq, Lq, Lk)
        Rows sum to 1 (to ``1 − exp(sink − lse)`` with sinks), 0 where disallowed; an empty
        row is 0, NaN or ``1/Lk`` as ``empty_rows`` says.
    """
    a = validate(
        q,
        k,
        None,
        mask=mask,
        bias=bias,
        causal=causal,
        window=window,
        align=align,
        chunk=chunk,
        sink_tokens=sink_tokens,
        q_lengths=q_lengths,
        k_lengths=k_lengths,
        k_starts=k_starts,
        scale=scale,
        softcap=softcap,
        sinks=sinks,
        empty_rows=empty_rows,
    )
    _check_weights_size(a, "attention_weights")
    return forward_scores(a).p


def attention_weights_backward(
    d_weights,
    q,
    k,
    *,
    mask=None,
    bias=None,
    causal=False,
    window=None,
    align=None,
    chunk=None,
    sink_tokens=0,
    q_lengths=None,
    k_lengths=None,
    k_starts=None,
    scale=None,
    softcap=None,
    sinks=None,
    empty_rows="zero",
):
    """Gradients of :func:`attention_weights`: ``dq, dk, dbias, dsinks = ∂/∂(q, k, bias, sinks) of
    Σ d_weights · P``.

    Axes as :func:`attention_weights`.

    Parameters
    ----------
    d_weights : array_like, shape (..., Hq, Lq, Lk)
        Cotangent of ``P``: exactly its shape, finite.
    q, k : array_like
        As :func:`attention_weights`: ``(..., Hq, Lq, D)`` and ``(..., Hk, Lk, D)``.
    mask, bias, causal, window, align, chunk, sink_tokens
        The forward's options, as :func:`sdpa` (same defaults).
    q_lengths, k_lengths, k_starts, scale, softcap, sinks, empty_rows
        Likewise.

    Returns
    -------
    AttentionWeightsGrads
        ``(dq, dk, dbias, dsinks)``, float64, each of its input's shape; ``dbias``/``dsinks``
        None without bias/sinks.
    """
    a = validate(
        q,
        k,
        None,
        mask=mask,
        bias=bias,
        causal=causal,
        window=window,
        align=align,
        chunk=chunk,
        sink_tokens=sink_tokens,
        q_lengths=q_lengths,
        k_lengths=k_lengths,
        k_starts=k_starts,
        scale=scale,
        softcap=softcap,
        sinks=sinks,
        empty_rows=empty_rows,
    )
    _check_weights_size(a, "attention_weights_backward", backward=True)
    f = forward_scores(a)
    dp = as_cotangent(d_weights, a.score_shape, "d_weights")
    return AttentionWeightsGrads(*backward_scores(a, f, dp, None))


#: The options of :func:`attention_logits`: sdpa's steps 1 to 4.
LOGIT_OPTIONS = (
    "mask",
    "bias",
    "causal",
    "window",
    "align",
    "chunk",
    "sink_tokens",
    "q_lengths",
    "k_lengths",
    "k_starts",
    "scale",
    "softcap",
)


def _logits_args(q, k, stage, arguments):
    """Validated arguments (``arguments``: the caller's locals, its options among them) and the index
    of ``stage``."""
    as_choice(stage, "stage", LOGIT_STAGES)
    a = validate(q, k, None, **{n: arguments[n] for n in LOGIT_OPTIONS})
    _check_weights_size(a, "attention_logits")
    return a, LOGIT_STAGES.index(stage)


def _logits(a: Args, upto):
    """The scores after stage ``LOGIT_STAGES[upto]``, broadcast to the score shape (a new array), the
    expanded keys and ``tanh(s0/c)`` (None without a softcap)."""
    s, ke = qk_scores(a)  # (..., Hq, Lq, Lk)
    t = None
    if upto >= 1 and a.softcap is not None:
        t = np.tanh(s / a.softcap)
        s = a.softcap * t
    if upto >= 2 and a.bias is not None:
        s = s + a.bias
    if upto >= 3 and a.allowed is not None:
        s = np.where(a.allowed, s, -np.inf)
    return np.array(np.broadcast_to(s, a.score_shape)), ke, t


def attention_logits(
    q,
    k,
    *,
    stage="masked",
    mask=None,
    bias=None,
    causal=False,
    window=None,
    align=None,
    chunk=None,
    sink_tokens=0,
    q_lengths=None,
    k_lengths=None,
    k_starts=None,
    scale=None,
    softcap=None,
):
    """The attention scores after a stage of :func:`sdpa`'s order of operations: what a kernel's
    intermediate score output (ONNX's ``qk_matmul_output``, a debug dump) must equal.

    Steps 1 to 4 of :func:`sdpa`, stopped after ``stage``::

        "scaled"      s = scale · q k̃ᵀ
        "softcapped"  s = c · tanh(s / c)          (= "scaled" without softcap)
        "biased"      s = s + bias                 (= the previous stage without bias)
        "masked"      s = -inf where mask, causal, window, chunk or padding disallow

    Axes: ``...`` batch, ``Hq``/``Hk`` query/kv heads (``Hq % Hk == 0``), ``Lq``/``Lk`` query/key
    lengths, ``D`` head dim.  No kernel (the output is score-sized): over the NumPy memory limit it
    raises.  ``specs/sdpa.md`` maps ONNX's ``qk_matmul_output_mode`` and other peers' outputs to
    stages (``specs/coverage.md``).

    Parameters
    ----------
    q : array_like, shape (..., Hq, Lq, D)
        Queries (float64 after conversion; finite).
    k : array_like, shape (..., Hk, Lk, D)
        Keys.
    stage : {"scaled", "softcapped", "biased", "masked"}, default "masked"
        The last step applied (the softmax input, for "masked").
    mask, bias, causal, window, align, chunk, sink_tokens
        As :func:`sdpa` (same meaning and defaults).
    q_lengths, k_lengths, k_starts, scale, softcap
        As :func:`sdpa` (same meaning and defaults); a padded query row is ``-inf`` throughout at
        the "masked" stage.  The options of the softmax and after it (``sinks``, dropout,
        ``empty_rows``) do not change the logits and are not taken.

    Returns
    -------
    logits : ndarray of float64, shape (..., Hq, Lq, Lk)
        The scores after ``stage``; ``-inf`` where disallowed (stage "masked") or where the bias is
        ``-inf`` (stages "biased" and "masked").
    """
    a, upto = _logits_args(q, k, stage, locals())
    return _logits(a, upto)[0]


def attention_logits_backward(
    d_logits,
    q,
    k,
    *,
    stage="masked",
    mask=None,
    bias=None,
    causal=False,
    window=None,
    align=None,
    chunk=None,
    sink_tokens=0,
    q_lengths=None,
    k_lengths=None,
    k_starts=None,
    scale=None,
    softcap=None,
):
    """Gradients of :func:`attention_logits`: ``dq, dk, dbias = ∂/∂(q, k, bias) of Σ d_logits · s``
    over the finite entries of ``s`` (a disallowed or ``-inf``-biased score is a constant).

    ``ds = d_logits`` where the score is finite (0 elsewhere), then ``dbias = Σ_broadcast ds`` (at
    stages "biased" and "masked"), through the softcap ``ds · (1 − tanh²(s0/c))`` (from stage
    "softcapped" on), and ``dq = scale · ds k̃``, ``dk = scale · dsᵀ q`` summed over GQA groups
    (``specs/sdpa.md``).

    Parameters
    ----------
    d_logits : array_like, shape (..., Hq, Lq, Lk)
        Cotangent of the logits: exactly their shape; finite (its entries at ``-inf`` logits are
        ignored).
    q, k : array_like
        As :func:`attention_logits`: ``(..., Hq, Lq, D)`` and ``(..., Hk, Lk, D)``.
    stage, mask, bias, causal, window, align, chunk, sink_tokens
        The forward's arguments (same defaults).
    q_lengths, k_lengths, k_starts, scale, softcap
        Likewise.

    Returns
    -------
    AttentionLogitsGrads
        ``(dq, dk, dbias)``, float64, each of its input's shape; ``dbias`` None without a bias.
    """
    a, upto = _logits_args(q, k, stage, locals())
    s, ke, t = _logits(a, upto)
    ds = np.where(np.isfinite(s), as_cotangent(d_logits, a.score_shape, "d_logits"), 0.0)  # (..., Hq, Lq, Lk)
    dbias = None
    if a.bias is not None:
        dbias = unbroadcast(ds, a.bias.shape) if upto >= 2 else np.zeros(a.bias.shape)
    if t is not None:
        ds = ds * (1.0 - t**2)
    dq, dk = backward_qk(a, ke, ds)
    return AttentionLogitsGrads(dq, dk, dbias)


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
