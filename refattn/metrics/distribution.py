"""Distribution metrics of attention rows: entropy, confidence, Jensen–Shannon, head diversity, detectors.

``P (..., H, Lq, Lk)`` or ``(..., Lq, Lk)``; per-row results have shape ``P.shape[:-1]`` (0 on
padded rows), per-head results ``P.shape[:-2]`` (means over real query rows).  Natural logs;
``0·log 0 = 0``.  ``mask``: True = real token (a key-padding mask, or a bool mask broadcastable to P,
True = kept).  Each backward takes the cotangent ``d_<output>`` of the output its forward names and
returns ``MapGrads(dP)`` (one map) or its own NamedTuple.  See ``specs/metrics.md``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refattn import kernels as _kernels
from refattn._validate import RefAttnError, as_cotangent, as_flag, as_float, as_real, to_numpy
from refattn.metrics._maps import (
    MapGrads,
    attention_map,
    check_probability_rows,
    interpret_mask,
    key_counts,
    masked_grad,
    row_mean,
    row_mean_backward,
)
from refattn.softmax_family import normalize_last_axis

__all__ = [
    "EntropyFromLogitsGrads",
    "HeadDiversityGrads",
    "JSGrads",
    "detect_collapse",
    "detect_uniform",
    "entropy",
    "entropy_backward",
    "entropy_from_logits",
    "entropy_from_logits_backward",
    "head_confidence",
    "head_confidence_backward",
    "head_diversity",
    "head_diversity_backward",
    "js_distance",
    "js_distance_backward",
    "js_divergence",
    "js_divergence_backward",
    "max_weight",
    "max_weight_backward",
]


class EntropyFromLogitsGrads(NamedTuple):
    """Gradient of :func:`entropy_from_logits` w.r.t. its logits ``s``."""

    ds: np.ndarray


class JSGrads(NamedTuple):
    """Gradients of :func:`js_divergence` / :func:`js_distance` w.r.t. ``P1`` and ``P2``."""

    dP1: np.ndarray
    dP2: np.ndarray


class HeadDiversityGrads(NamedTuple):
    """Gradient of :func:`head_diversity` (and of ``diversity_regularizer``) w.r.t. ``P_heads``."""

    dP_heads: np.ndarray


def _xlogx(p):
    return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)


def _log_counts(m):
    n = key_counts(m)
    return np.where(n > 1, np.log(np.maximum(n, 1)), 0.0)  # a single-key row has entropy 0


def entropy(P, *, mask=None, normalize=False, backend="auto", check_probabilities=True):
    """Row entropy ``entropy (..., Lq)`` = ``−Σ_j P_ij log P_ij`` over allowed keys; ``normalize``: ÷ log(n
    allowed).

    ``mask``: True = real token (key padding) or kept entry (a full bool mask).  ``backend``:
    ``"numba"`` (a parallel kernel reading P once, without a mask), ``"numpy"`` (the definition) or
    ``"auto"`` (the kernel from ``refattn.kernels.AUTO_MIN_SCORES`` entries on).
    ``check_probabilities``: refuse a map whose real rows are not probabilities (``specs/metrics.md``).
    """
    normalize = as_flag(normalize, "normalize")
    check = as_flag(check_probabilities, "check_probabilities")
    if mask is None and _kernels.resolve_backend(backend, int(np.size(P))) == "numba":
        p = to_numpy(P, "P")
        if p.dtype == bool or p.dtype.kind not in "iuf" or p.ndim < 2:
            attention_map(P)  # the definition's error for a bad map
        h = _kernels.row_entropy(p)
        if h is None:
            attention_map(P)  # names the first non-finite entry
        if check:
            check_probability_rows(p, np.True_, "P")
        if normalize:
            n = p.shape[-1]
            h = h / np.log(n) if n > 1 else np.zeros_like(h)
        return h
    _kernels.resolve_backend(backend, 0)
    m = attention_map(P, mask, check_probabilities=check)
    h = np.where(m.rows, -_xlogx(m.p).sum(axis=-1), 0.0)
    if normalize:
        log_n = _log_counts(m)
        h = np.where(log_n > 0, h / np.where(log_n > 0, log_n, 1.0), 0.0)
    return h


def entropy_backward(d_entropy, P, *, mask=None, normalize=False, check_probabilities=True):
    """``MapGrads(dP)``, ``dP_ij = −d_entropy_i (log P_ij + 1)`` on allowed entries (÷ log n when
    normalised; ``mask``: True = real token).

    Not differentiable where an allowed ``P_ij = 0`` (the derivative is +∞ there; it is returned
    as ±inf); use :func:`entropy_from_logits` for a gradient that is finite everywhere.
    """
    normalize = as_flag(normalize, "normalize")
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    d = as_cotangent(d_entropy, m.p.shape[:-1], "d_entropy")
    if normalize:
        log_n = _log_counts(m)
        d = np.where(log_n > 0, d / np.where(log_n > 0, log_n, 1.0), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = -d[..., None] * (np.log(m.p) + 1.0)
    g = np.where((m.p == 0) & (d[..., None] == 0), 0.0, g)
    return MapGrads(masked_grad(m, g))


def _logits_parts(s, mask):
    """Logits with masked keys at -inf, their softmax, and the shifted logits ``u = s − max ≤ 0``
    with ``ū = Σ p u`` (both parts of ``H = log1p(t) − ū`` are ≥ 0: no cancellation near H = 0)."""
    x = as_float(s, "s", ndim_min=2, allow_neg_inf=True)
    logits = np.where(interpret_mask(x.shape, mask)[0], x, -np.inf)
    nz = normalize_last_axis(logits, "zero")
    u = np.where(nz.p > 0, logits - nz.shift[..., None], 0.0)  # (..., Lk) ≤ 0 on allowed keys
    ubar = np.einsum("...j,...j->...", nz.p, u)  # (...,) Σ p u ≤ 0
    return logits, nz, u, ubar


def entropy_from_logits(s, *, mask=None):
    """Entropy ``entropy (..., Lq)`` of ``softmax(s)`` over allowed keys: ``lse − Σ p s``; 0 on empty rows.

    ``mask``: True = real token (a key-padding mask) or allowed entry (a full bool mask); masked keys
    take no weight, as ``-inf`` logits.

    Computed as ``log1p(t) − Σ p (s − max s)`` (``lse − max s = log1p(t)``, ``t`` the softmax
    denominator's tail): two non-negative terms, accurate near 0 (one dominant logit) as near log n.
    """
    _, nz, _, ubar = _logits_parts(s, mask)
    return np.where(nz.empty, 0.0, nz.log_tail - ubar)


def entropy_from_logits_backward(d_entropy, s, *, mask=None):
    """``EntropyFromLogitsGrads(ds)``, ``ds_j = −d_entropy p_j (s_j − Σ_k p_k s_k)``: finite everywhere,
    0 on masked entries (``mask``: True = real token)."""
    logits, nz, u, ubar = _logits_parts(s, mask)
    d = as_cotangent(d_entropy, logits.shape[:-1], "d_entropy")
    centred = np.where(nz.p > 0, u - ubar[..., None], 0.0)  # s_j − Σ p s, from the shifted logits
    return EntropyFromLogitsGrads(-d[..., None] * nz.p * centred)


def max_weight(P, *, mask=None, check_probabilities=True):
    """Largest weight ``max_weight (..., Lq)`` of each row (0 on padded rows; ``mask``: True = real token)."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    return np.where(m.rows, m.p.max(axis=-1), 0.0)


def _argmax_onehot(m):
    idx = np.argmax(m.p, axis=-1)  # ties: the lower key index
    return np.arange(m.p.shape[-1]) == idx[..., None]


def max_weight_backward(d_max_weight, P, *, mask=None, check_probabilities=True):
    """Subgradient ``MapGrads(dP)``: ``d_max_weight`` on each row's (first) maximal entry
    (``mask``: True = real token)."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    d = as_cotangent(d_max_weight, m.p.shape[:-1], "d_max_weight")
    return MapGrads(masked_grad(m, np.where(_argmax_onehot(m), d[..., None], 0.0)))


def head_confidence(P, *, mask=None, check_probabilities=True):
    """Voita et al. 2019: ``confidence (...,)``, the mean over real query rows of the max weight; in
    [1/n, 1] (``mask``: True = real token)."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    return row_mean(np.where(m.rows, m.p.max(axis=-1), 0.0), m.rows)


def head_confidence_backward(d_confidence, P, *, mask=None, check_probabilities=True):
    """Subgradient of :func:`head_confidence`: ``MapGrads(dP)``, ``d_confidence / n_rows`` on each real
    row's (first) maximal entry (``mask``: True = real token)."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    d = row_mean_backward(as_cotangent(d_confidence, m.p.shape[:-2], "d_confidence"), m.rows)
    return MapGrads(masked_grad(m, np.where(_argmax_onehot(m), d[..., None], 0.0)))


def _js_parts(P1, P2, mask, check_probabilities):
    """The two maps, their sum ``σ = P1 + P2`` and relative difference ``r = (P1 − P2)/σ`` (0 where σ = 0)."""
    m1 = attention_map(P1, mask, name="P1", check_probabilities=check_probabilities)
    m2 = attention_map(P2, mask, name="P2", check_probabilities=check_probabilities)
    if m1.p.shape != m2.p.shape:
        raise RefAttnError(f"P2: expected the shape of P1 {m1.p.shape}, got {m2.p.shape}")
    total = m1.p + m2.p  # (..., Lk)
    pos = total > 0
    r = np.where(pos, (m1.p - m2.p) / np.where(pos, total, 1.0), 0.0)  # (..., Lk) in [-1, 1]
    return m1, m2, total, r


def _js_kernel(r):
    """``f(r) = (1 + r) log(1 + r) + (1 − r) log(1 − r) = Σ_k r^{2k} / (k(2k − 1))`` ≥ 0, to a few ulps.

    ``|r| ≤ 1/2``: ``2r·atanh(r) + log1p(−r²)`` — two terms of opposite sign whose magnitudes add
    to at most 3.2 f(r), so no digits are lost however small r is (f ≈ r²); ``|r| > 1/2``: the
    definition (terms at most 3.7 f(r)), with ``0·log 0 = 0`` at ``r = ±1``.
    """
    small = np.abs(r) <= 0.5
    a = np.where(small, r, 0.0)
    near = 2.0 * a * np.arctanh(a) + np.log1p(-a * a)
    b = np.where(small, 1.0, r)  # |b| in (1/2, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(b > -1.0, (1.0 + b) * np.log1p(b), 0.0)
        down = np.where(b < 1.0, (1.0 - b) * np.log1p(-b), 0.0)
    return np.where(small, near, up + down)


def js_divergence(P1, P2, *, mask=None, check_probabilities=True):
    """Jensen–Shannon divergence ``js (..., Lq)`` of each pair of rows, natural log, in [0, log 2]
    (``mask``: True = real token, shared by both maps).

    ``JS = ¼ Σ_j σ_j f(r_j)``, ``σ = P1 + P2``, ``r = (P1 − P2)/σ``: a sum of non-negative terms, each
    computed without cancellation (:func:`_js_kernel`), so JS keeps its relative accuracy down to
    nearly identical rows (``specs/metrics.md``).
    """
    m1, _, total, r = _js_parts(P1, P2, mask, check_probabilities)
    js = 0.25 * (total * _js_kernel(r)).sum(axis=-1)  # (..., Lq)
    return np.where(m1.rows, js, 0.0)


def _half_log1p_times(d, r, total):
    """``½ d log(1 + r)`` (= ``½ d log(P/M)`` with ``1 + r = P/M``): 0 where ``σ = 0`` (masked) or
    ``d = 0``, ``∓∞`` where ``r = −1`` (``P = 0 < M``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        g = 0.5 * d * np.log1p(r)
    return np.where((total > 0) & (d != 0), g, 0.0)


def js_divergence_backward(d_js, P1, P2, *, mask=None, check_probabilities=True):
    """``JSGrads(dP1, dP2)``: ``dP1 = ½ d_js log(P1/M) = ½ d_js log1p(r)``, ``dP2 = ½ d_js log1p(−r)``,
    ``M = (P1 + P2)/2`` (−∞ where ``P = 0 < M``); ``log1p`` of the relative difference keeps the digits
    near ``P1 = P2`` (``mask``: True = real token)."""
    m1, _, total, r = _js_parts(P1, P2, mask, check_probabilities)
    d = as_cotangent(d_js, m1.p.shape[:-1], "d_js")[..., None]
    g1 = _half_log1p_times(d, r, total)
    g2 = _half_log1p_times(d, -r, total)
    return JSGrads(masked_grad(m1, g1), masked_grad(m1, g2))


def js_distance(P1, P2, *, mask=None, check_probabilities=True):
    """``distance (..., Lq)`` = ``sqrt(js_divergence)``: a metric (the triangle inequality holds;
    ``mask``: True = real token)."""
    return np.sqrt(js_divergence(P1, P2, mask=mask, check_probabilities=check_probabilities))


def js_distance_backward(d_distance, P1, P2, *, mask=None, check_probabilities=True):
    """``JSGrads(dP1, dP2)`` through ``d√JS = dJS / (2√JS)`` (undefined where the rows are equal:
    returned as 0 there; ``mask``: True = real token)."""
    js = js_divergence(P1, P2, mask=mask, check_probabilities=check_probabilities)
    d = as_cotangent(d_distance, js.shape, "d_distance")
    root = np.sqrt(js)
    scaled = np.where(root > 0, d / (2 * np.where(root > 0, root, 1.0)), 0.0)
    return js_divergence_backward(scaled, P1, P2, mask=mask, check_probabilities=False)


def _head_vectors(P_heads, mask, check_probabilities):
    m = attention_map(P_heads, mask, name="P_heads", check_probabilities=check_probabilities)
    if m.p.ndim < 3:
        raise RefAttnError(f"P_heads: expected (..., H, Lq, Lk), got shape {m.p.shape}")
    v = m.p.reshape(m.p.shape[:-2] + (-1,))  # (..., H, Lq·Lk)
    norms = np.linalg.norm(v, axis=-1)  # (..., H)
    return m, v, norms


def head_diversity(P_heads, *, mask=None, check_probabilities=True):
    """``diversity (...,)``: the mean over head pairs of ``1 − cos(P_h, P_h')`` (maps flattened); 0 with
    one head (``mask``: True = real token)."""
    _, v, norms = _head_vectors(P_heads, mask, check_probabilities)
    h = v.shape[-2]
    if h < 2:
        return np.zeros(v.shape[:-2])
    unit = v / np.where(norms > 0, norms, 1.0)[..., None]
    cos = unit @ np.swapaxes(unit, -1, -2)  # (..., H, H)
    iu = np.triu_indices(h, 1)
    return (1.0 - cos[..., iu[0], iu[1]]).mean(axis=-1)


def head_diversity_backward(d_diversity, P_heads, *, mask=None, check_probabilities=True):
    """``HeadDiversityGrads(dP_heads)`` from ``d cos(a, b)/da = b/(|a||b|) − cos·a/|a|²``, summed over
    the pairs of each head (``mask``: True = real token)."""
    m, v, norms = _head_vectors(P_heads, mask, check_probabilities)
    h = v.shape[-2]
    d = as_cotangent(d_diversity, v.shape[:-2], "d_diversity")
    if h < 2:
        return HeadDiversityGrads(np.zeros(m.p.shape))
    safe = np.where(norms > 0, norms, 1.0)
    unit = v / safe[..., None]
    cos = unit @ np.swapaxes(unit, -1, -2)
    w = -d[..., None, None] / (h * (h - 1) / 2)  # d(mean(1 − cos)) / d cos_pair
    off = 1.0 - np.eye(h)
    # each unordered pair counted once: Σ_{h'≠h} w (u_h' − cos u_h) / |v_h|
    gv = (w * off) @ unit - (w * off * cos).sum(axis=-1, keepdims=True) * unit
    gv = gv / safe[..., None]
    return HeadDiversityGrads(masked_grad(m, gv.reshape(m.p.shape)))


def detect_collapse(P, *, threshold=0.8, fraction=0.5, mask=None, check_probabilities=True):
    """Heads ``collapsed (...,)`` (bool) where at least ``fraction`` of real rows put ≥ ``threshold`` on
    one key (``mask``: True = real token)."""
    threshold = as_real(threshold, "threshold", allow_none=False)
    fraction = as_real(fraction, "fraction", allow_none=False)
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    peaked = (m.p.max(axis=-1) >= threshold).astype(np.float64)
    return row_mean(peaked, m.rows) >= fraction


def detect_uniform(P, *, tolerance=0.1, mask=None, check_probabilities=True):
    """Heads ``uniform (...,)`` (bool) whose every real row has normalised entropy ≥ ``1 − tolerance``
    (``mask``: True = real token)."""
    tolerance = as_real(tolerance, "tolerance", allow_none=False)
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    h = entropy(m.p, mask=m.allowed, normalize=True, check_probabilities=False)
    single = key_counts(m) <= 1
    ok = (h >= 1.0 - tolerance) | ~m.rows | single
    return ok.all(axis=-1)
