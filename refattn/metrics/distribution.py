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

from refattn._validate import RefAttnError, as_cotangent, as_flag, as_float, as_real, check_keywords_of
from refattn.metrics._maps import (
    MapGrads,
    attention_map,
    interpret_mask,
    kernel_rows,
    key_counts,
    masked_grad,
    row_mean,
    row_mean_backward,
    use_kernel,
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
    """Gradient of :func:`entropy_from_logits` (returned by :func:`entropy_from_logits_backward`).

    Fields
    ------
    ds : ndarray of float64, shape of ``s`` (..., Lq, Lk)
        0 on masked keys and on empty rows.
    """

    ds: np.ndarray


class JSGrads(NamedTuple):
    """Gradients of :func:`js_divergence` and :func:`js_distance` (returned by their backwards).

    Fields
    ------
    dP1 : ndarray of float64, shape of ``P1``
    dP2 : ndarray of float64, shape of ``P2``
        Both 0 on masked entries and padded rows; ``−inf`` where that map's entry is 0 and the other's
        is not (``log(P/M)`` with ``P = 0 < M``).
    """

    dP1: np.ndarray
    dP2: np.ndarray


class HeadDiversityGrads(NamedTuple):
    """Gradient of :func:`head_diversity` (and of
    :func:`~refattn.metrics.regularizers.diversity_regularizer`) w.r.t. ``P_heads``.

    Fields
    ------
    dP_heads : ndarray of float64, shape of ``P_heads`` (..., H, Lq, Lk)
        0 on masked entries and padded rows.
    """

    dP_heads: np.ndarray


def _xlogx(p):
    return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)


def _log_counts(m):
    n = key_counts(m)
    return np.where(n > 1, np.log(np.maximum(n, 1)), 0.0)  # a single-key row has entropy 0


def entropy(P, *, mask=None, normalize=False, backend="auto", check_probabilities=True):
    """Row entropy ``entropy (..., Lq)`` = ``−Σ_j P_ij log P_ij`` over allowed keys; ``normalize``: ÷ log(n allowed).

    Natural log, ``0 · log 0 = 0``; in ``[0, log n_i]``, ``n_i`` the row's allowed keys.  Padded rows
    read 0.

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows), ``Lk`` keys.

    Parameters
    ----------
    P : array_like, shape (..., H, Lq, Lk) or (..., Lq, Lk)
        Attention maps, rows = queries; any real dtype (bfloat16 too), converted to float64, never
        mutated; finite.  Leading dims are batch dims.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P.shape[:-3] + (Lk,)`` (per example, shared by its
        heads) or ``P.shape[:-2] + (Lk,)`` (per map), which with ``Lq = Lk`` also marks the padded
        query rows; or a bool mask broadcastable to P (True = the entry is kept; a row is real when it
        keeps some key).  Masked entries count as 0; padded rows are left out of every average.
        Default None: every token real.
    normalize : bool, default False
        Divide each row's entropy by ``log n_i`` (result in [0, 1]); a row with a single allowed key
        gives 0.
    backend : {"auto", "numpy", "numba"}, default "auto"
        ``"numba"``: one parallel read of P by the metric kernel (``refattn/kernels/metric_kernels.py``,
        within 1e-12 of the definition, the probability check in the same pass; any mask);
        ``"numpy"``: the definition; ``"auto"``: the kernel from ``refattn.kernels.AUTO_MIN_SCORES``
        (2**18) entries of P on, when numba is installed.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the argument and the first offending row, with its sum and
        minimum) a map whose real rows are not probabilities: entries >= 0, each row summing to 1 over
        its allowed keys within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).
        False: measure the map as it is (maps with sinks or dropout, known-good maps in a hot loop).

    Returns
    -------
    entropy : ndarray of float64, shape P.shape[:-1], i.e. (..., Lq)
        The entropy of each row (normalised with ``normalize``); 0 on padded rows.

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    normalize = as_flag(normalize, "normalize")
    check = as_flag(check_probabilities, "check_probabilities")
    r = kernel_rows(P, mask, check_probabilities=check, entropy=True) if use_kernel(backend, P) else None
    if r is not None:
        return _kernel_entropy(r, normalize)
    m = attention_map(P, mask, check_probabilities=check)
    h = np.where(m.rows, -_xlogx(m.p).sum(axis=-1), 0.0)
    if normalize:
        log_n = _log_counts(m)
        h = np.where(log_n > 0, h / np.where(log_n > 0, log_n, 1.0), 0.0)
    return h


def _kernel_entropy(r, normalize):
    """:func:`entropy` from the metric kernel's rows (:class:`~refattn.metrics._maps.KernelRows`)."""
    h = np.where(r.rows, r.entropy, 0.0)
    if normalize:
        log_n = np.where(r.count > 1, np.log(np.maximum(r.count, 1)), 0.0)
        h = np.where(log_n > 0, h / np.where(log_n > 0, log_n, 1.0), 0.0)
    return h


def entropy_backward(d_entropy, P, *, mask=None, normalize=False, check_probabilities=True):
    """Gradient of :func:`entropy`: ``dP = ∂/∂P of Σ d_entropy · entropy``.

    ``dP_ij = −d_entropy_i (log P_ij + 1)`` on allowed entries (÷ ``log n_i`` when normalised), 0 on
    masked entries and padded rows.  Not differentiable where an allowed ``P_ij = 0``: the derivative
    is infinite there and is returned as ±inf (0 where ``d_entropy_i = 0``); use
    :func:`entropy_from_logits` for a gradient that is finite everywhere.

    Parameters
    ----------
    d_entropy : array_like, shape P.shape[:-1], i.e. (..., Lq)
        Cotangent of ``entropy``: exactly its shape, finite.
    P : array_like
        As :func:`entropy`.
    mask, normalize, check_probabilities
        The forward's options, as :func:`entropy` (same defaults; ``mask``: True = real token).  The
        backward runs NumPy: it takes no ``backend``.

    Returns
    -------
    MapGrads
        ``(dP,)``: float64, P's shape; 0 on masked entries and padded rows.
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

    Computed as ``log1p(t) − Σ_j p_j (s_j − max s)`` (``lse − max s = log1p(t)``, ``t`` the softmax
    denominator's tail): two non-negative terms, accurate near 0 (one dominant logit) as near
    ``log n``.  The logits are not checked to be anything but real.

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows), ``Lk`` keys.

    Parameters
    ----------
    s : array_like, shape (..., H, Lq, Lk) or (..., Lq, Lk)
        Logits, rows = queries; any real dtype, converted to float64, never mutated; finite or
        ``-inf`` (a key with no weight), never NaN or ``+inf``.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``s.shape[:-3] + (Lk,)`` or ``s.shape[:-2] + (Lk,)``
        (with ``Lq = Lk`` it also marks the padded query rows), or a bool mask broadcastable to s
        (True = the entry is allowed).  Masked keys take no weight, as ``-inf`` logits.  Default None:
        every key allowed.

    Returns
    -------
    entropy : ndarray of float64, shape s.shape[:-1], i.e. (..., Lq)
        Natural log; 0 on empty rows (every key masked or ``-inf``, padded rows included).

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    _, nz, _, ubar = _logits_parts(s, mask)
    return np.where(nz.empty, 0.0, nz.log_tail - ubar)


def entropy_from_logits_backward(d_entropy, s, *, mask=None):
    """Gradient of :func:`entropy_from_logits`: ``ds = ∂/∂s of Σ d_entropy · entropy``.

    ``ds_j = −d_entropy p_j (s_j − Σ_k p_k s_k)``, ``p = softmax(s)`` over the allowed keys, formed from
    the shifted logits: finite everywhere, 0 on masked and ``-inf`` keys and on empty rows.

    Parameters
    ----------
    d_entropy : array_like, shape s.shape[:-1], i.e. (..., Lq)
        Cotangent of ``entropy``: exactly its shape, finite.
    s : array_like
        As :func:`entropy_from_logits`.
    mask
        The forward's option, as :func:`entropy_from_logits` (same default; True = real token).

    Returns
    -------
    EntropyFromLogitsGrads
        ``(ds,)``: float64, s's shape.
    """
    logits, nz, u, ubar = _logits_parts(s, mask)
    d = as_cotangent(d_entropy, logits.shape[:-1], "d_entropy")
    centred = np.where(nz.p > 0, u - ubar[..., None], 0.0)  # s_j − Σ p s, from the shifted logits
    return EntropyFromLogitsGrads(-d[..., None] * nz.p * centred)


def max_weight(P, *, mask=None, check_probabilities=True):
    """Largest weight ``max_weight (..., Lq)`` of each row (0 on padded rows; ``mask``: True = real token).

    ``max_j P_ij`` over the allowed keys.

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows), ``Lk`` keys.

    Parameters
    ----------
    P : array_like, shape (..., H, Lq, Lk) or (..., Lq, Lk)
        Attention maps, rows = queries; any real dtype (bfloat16 too), converted to float64, never
        mutated; finite.  Leading dims are batch dims.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P.shape[:-3] + (Lk,)`` (per example, shared by its
        heads) or ``P.shape[:-2] + (Lk,)`` (per map), which with ``Lq = Lk`` also marks the padded
        query rows; or a bool mask broadcastable to P (True = the entry is kept; a row is real when it
        keeps some key).  Masked entries count as 0; padded rows are left out of every average.
        Default None: every token real.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the argument and the first offending row, with its sum and
        minimum) a map whose real rows are not probabilities: entries >= 0, each row summing to 1 over
        its allowed keys within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).
        False: measure the map as it is (maps with sinks or dropout, known-good maps in a hot loop).

    Returns
    -------
    max_weight : ndarray of float64, shape P.shape[:-1], i.e. (..., Lq)
        0 on padded rows.

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    return np.where(m.rows, m.p.max(axis=-1), 0.0)


def _argmax_onehot(m):
    idx = np.argmax(m.p, axis=-1)  # ties: the lower key index
    return np.arange(m.p.shape[-1]) == idx[..., None]


def max_weight_backward(d_max_weight, P, *, mask=None, check_probabilities=True):
    """Gradient of :func:`max_weight`: ``dP = ∂/∂P of Σ d_max_weight · max_weight``.

    Parameters
    ----------
    d_max_weight : array_like, shape P.shape[:-1], i.e. (..., Lq)
        Cotangent of ``max_weight``: exactly its shape, finite.
    P : array_like
        As :func:`max_weight`.
    mask, check_probabilities
        The forward's options, as :func:`max_weight` (same defaults; ``mask``: True = real token).

    Returns
    -------
    MapGrads
        ``(dP,)``, float64, P's shape: the subgradient, ``d_max_weight_i`` on each row's first (lowest
        key index) maximal entry, 0 elsewhere.
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    d = as_cotangent(d_max_weight, m.p.shape[:-1], "d_max_weight")
    return MapGrads(masked_grad(m, np.where(_argmax_onehot(m), d[..., None], 0.0)))


def head_confidence(P, *, mask=None, backend="auto", check_probabilities=True):
    """Voita et al. 2019: ``confidence (...,)``, the mean over real query rows of the max weight.

    ``confidence = mean_i max_j P_ij`` over the real rows of each map: in ``[1/n, 1]`` for rows of
    ``n`` allowed keys; 0 for a map without a real row.

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows), ``Lk`` keys.

    Parameters
    ----------
    P : array_like, shape (..., H, Lq, Lk) or (..., Lq, Lk)
        Attention maps, rows = queries; any real dtype (bfloat16 too), converted to float64, never
        mutated; finite.  Leading dims are batch dims.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P.shape[:-3] + (Lk,)`` (per example, shared by its
        heads) or ``P.shape[:-2] + (Lk,)`` (per map), which with ``Lq = Lk`` also marks the padded
        query rows; or a bool mask broadcastable to P (True = the entry is kept; a row is real when it
        keeps some key).  Masked entries count as 0; padded rows are left out of every average.
        Default None: every token real.
    backend : {"auto", "numpy", "numba"}, default "auto"
        ``"numba"``: one parallel read of P by the metric kernel (``refattn/kernels/metric_kernels.py``,
        within 1e-12 of the definition, the probability check in the same pass; any mask);
        ``"numpy"``: the definition; ``"auto"``: the kernel from ``refattn.kernels.AUTO_MIN_SCORES``
        (2**18) entries of P on, when numba is installed.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the argument and the first offending row, with its sum and
        minimum) a map whose real rows are not probabilities: entries >= 0, each row summing to 1 over
        its allowed keys within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).
        False: measure the map as it is (maps with sinks or dropout, known-good maps in a hot loop).

    Returns
    -------
    confidence : ndarray of float64, shape P.shape[:-2], i.e. (..., H)

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    r = kernel_rows(P, mask, check_probabilities=check_probabilities) if use_kernel(backend, P) else None
    if r is not None:
        return row_mean(np.where(r.rows, r.max, 0.0), r.rows)
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    return row_mean(np.where(m.rows, m.p.max(axis=-1), 0.0), m.rows)


def head_confidence_backward(d_confidence, P, *, mask=None, check_probabilities=True):
    """Gradient of :func:`head_confidence`: ``dP = ∂/∂P of Σ d_confidence · confidence``.

    Parameters
    ----------
    d_confidence : array_like, shape P.shape[:-2], i.e. (..., H)
        Cotangent of ``confidence``: exactly its shape, finite.
    P : array_like
        As :func:`head_confidence`.
    mask, check_probabilities
        The forward's options, as :func:`head_confidence` (same defaults; ``mask``: True = real token).

    Returns
    -------
    MapGrads
        ``(dP,)``, float64, P's shape: the subgradient, ``d_confidence / n_rows`` on each real row's
        first (lowest key index) maximal entry, 0 elsewhere.
    """
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
    """Jensen–Shannon divergence ``js (..., Lq)`` of each pair of rows, natural log, in [0, log 2].

    ``JS = ½ KL(P1 ‖ M) + ½ KL(P2 ‖ M)``, ``M = (P1 + P2)/2``, computed as ``¼ Σ_j σ_j f(r_j)`` with
    ``σ = P1 + P2``, ``r = (P1 − P2)/σ`` and ``f(r) = (1 + r) log(1 + r) + (1 − r) log(1 − r) ≥ 0``: a
    sum of non-negative terms, each without cancellation, so JS keeps its relative accuracy down to
    nearly identical rows (``specs/metrics.md``).  Symmetric; 0 on equal rows.

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows), ``Lk`` keys.

    Parameters
    ----------
    P1 : array_like, shape (..., H, Lq, Lk) or (..., Lq, Lk)
        The first maps, rows = queries; any real dtype, converted to float64, never mutated; finite.
    P2 : array_like, shape of P1
        The second maps, exactly P1's shape.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P.shape[:-3] + (Lk,)`` (per example, shared by its
        heads) or ``P.shape[:-2] + (Lk,)`` (per map), which with ``Lq = Lk`` also marks the padded
        query rows; or a bool mask broadcastable to P (True = the entry is kept; a row is real when it
        keeps some key).  Masked entries count as 0; padded rows are left out of every average.
        Shared by both maps.  Default None: every token real.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the argument and the first offending row, with its sum and
        minimum) a map whose real rows are not probabilities: entries >= 0, each row summing to 1 over
        its allowed keys within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).
        False: measure the map as it is (maps with sinks or dropout, known-good maps in a hot loop).

    Returns
    -------
    js : ndarray of float64, shape P1.shape[:-1], i.e. (..., Lq)
        0 on padded rows.

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
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
    """Gradient of :func:`js_divergence`: ``dP1, dP2 = ∂/∂(P1, P2) of Σ d_js · js``.

    ``dP1 = ½ d_js log(P1/M) = ½ d_js log1p(r)``, ``dP2 = ½ d_js log1p(−r)``, ``r = (P1 − P2)/(P1 + P2)``:
    ``log1p`` of the relative difference keeps the digits near ``P1 = P2``.  ``−inf`` where an entry is
    0 and the other map's is not; 0 on masked entries and padded rows.

    Parameters
    ----------
    d_js : array_like, shape P1.shape[:-1], i.e. (..., Lq)
        Cotangent of ``js``: exactly its shape, finite.
    P1, P2 : array_like
        As :func:`js_divergence`.
    mask, check_probabilities
        The forward's options, as :func:`js_divergence` (same defaults; ``mask``: True = real token).

    Returns
    -------
    JSGrads
        ``(dP1, dP2)``: float64, each of its map's shape.
    """
    m1, _, total, r = _js_parts(P1, P2, mask, check_probabilities)
    d = as_cotangent(d_js, m1.p.shape[:-1], "d_js")[..., None]
    g1 = _half_log1p_times(d, r, total)
    g2 = _half_log1p_times(d, -r, total)
    return JSGrads(masked_grad(m1, g1), masked_grad(m1, g2))


def js_distance(P1, P2, *, mask=None, check_probabilities=True):
    """``distance (..., Lq)`` = ``sqrt(js_divergence)``: a metric (the triangle inequality holds).

    The Jensen–Shannon distance of each pair of rows, in ``[0, sqrt(log 2)]``; it inherits the
    relative accuracy of :func:`js_divergence`.

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows), ``Lk`` keys.

    Parameters
    ----------
    P1 : array_like, shape (..., H, Lq, Lk) or (..., Lq, Lk)
        The first maps, rows = queries; any real dtype, converted to float64, never mutated; finite.
    P2 : array_like, shape of P1
        The second maps, exactly P1's shape.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P.shape[:-3] + (Lk,)`` (per example, shared by its
        heads) or ``P.shape[:-2] + (Lk,)`` (per map), which with ``Lq = Lk`` also marks the padded
        query rows; or a bool mask broadcastable to P (True = the entry is kept; a row is real when it
        keeps some key).  Masked entries count as 0; padded rows are left out of every average.
        Shared by both maps.  Default None: every token real.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the argument and the first offending row, with its sum and
        minimum) a map whose real rows are not probabilities: entries >= 0, each row summing to 1 over
        its allowed keys within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).
        False: measure the map as it is (maps with sinks or dropout, known-good maps in a hot loop).

    Returns
    -------
    distance : ndarray of float64, shape P1.shape[:-1], i.e. (..., Lq)
        0 on padded rows.

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    return np.sqrt(js_divergence(P1, P2, mask=mask, check_probabilities=check_probabilities))


def js_distance_backward(d_distance, P1, P2, *, mask=None, check_probabilities=True):
    """Gradient of :func:`js_distance`: ``dP1, dP2 = ∂/∂(P1, P2) of Σ d_distance · distance``.

    Through ``d√JS = dJS / (2√JS)`` and :func:`js_divergence_backward`.  √ has no derivative at 0: where
    the rows are equal the gradient is returned as 0.

    Parameters
    ----------
    d_distance : array_like, shape P1.shape[:-1], i.e. (..., Lq)
        Cotangent of ``distance``: exactly its shape, finite.
    P1, P2 : array_like
        As :func:`js_distance`.
    mask, check_probabilities
        The forward's options, as :func:`js_distance` (same defaults; ``mask``: True = real token).

    Returns
    -------
    JSGrads
        ``(dP1, dP2)``: float64, each of its map's shape.
    """
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


def head_diversity(P_heads, *, mask=None, backend="auto", check_probabilities=True):
    """``diversity (...,)``: the mean over head pairs of ``1 − cos(P_h, P_h')`` (maps flattened); 0 with one head.

    ``diversity = mean_{h < h'} (1 − ⟨v_h, v_h'⟩ / (‖v_h‖ ‖v_h'‖))``, ``v_h`` head h's map (masked
    entries zeroed) flattened to ``Lq·Lk`` entries; a map that is all zero has cosine 0 with every
    other.  In [0, 1] for non-negative maps.

    Axes: ``...`` batch dims, ``H`` heads, ``Lq`` queries, ``Lk`` keys.

    Parameters
    ----------
    P_heads : array_like, shape (..., H, Lq, Lk)
        The maps of every head of a layer (at least 3 dims), rows = queries; any real dtype,
        converted to float64, never mutated; finite.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P_heads.shape[:-3] + (Lk,)`` (per example, shared by its
        heads) or ``P_heads.shape[:-2] + (Lk,)`` (per map), which with ``Lq = Lk`` also marks the padded
        query rows; or a bool mask broadcastable to P_heads (True = the entry is kept; a row is real when it
        keeps some key).  Masked entries count as 0; padded rows are left out of every average.
        Default None: every token real.
    backend : {"auto", "numpy", "numba"}, default "auto"
        ``"numba"``: one parallel read of P_heads by the metric kernel (``refattn/kernels/metric_kernels.py``,
        within 1e-12 of the definition, the probability check in the same pass; any mask);
        ``"numpy"``: the definition; ``"auto"``: the kernel from ``refattn.kernels.AUTO_MIN_SCORES``
        (2**18) entries of P_heads on, when numba is installed.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the argument and the first offending row, with its sum and
        minimum) a map whose real rows are not probabilities: entries >= 0, each row summing to 1 over
        its allowed keys within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).
        False: measure the map as it is (maps with sinks or dropout, known-good maps in a hot loop).

    Returns
    -------
    diversity : ndarray of float64, shape P_heads.shape[:-3], i.e. (...,)

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    if use_kernel(backend, P_heads) and np.ndim(P_heads) >= 3:
        r = kernel_rows(P_heads, mask, name="P_heads", check_probabilities=check_probabilities, gram=True)
        if r is not None:
            return _diversity_from_gram(r.gram)
    _, v, norms = _head_vectors(P_heads, mask, check_probabilities)
    h = v.shape[-2]
    if h < 2:
        return np.zeros(v.shape[:-2])
    unit = v / np.where(norms > 0, norms, 1.0)[..., None]
    cos = unit @ np.swapaxes(unit, -1, -2)  # (..., H, H)
    iu = np.triu_indices(h, 1)
    return (1.0 - cos[..., iu[0], iu[1]]).mean(axis=-1)


def _diversity_from_gram(gram):
    """:func:`head_diversity` from the heads' Gram matrices ``(..., H, H)`` of the masked maps:
    ``cos = G_hh' / (‖v_h‖ ‖v_h'‖)``, ``‖v_h‖ = √G_hh`` (0 with a zero map)."""
    h = gram.shape[-1]
    if h < 2:
        return np.zeros(gram.shape[:-2])
    norms = np.sqrt(np.diagonal(gram, axis1=-2, axis2=-1))  # (..., H)
    outer = norms[..., :, None] * norms[..., None, :]
    cos = np.where(outer > 0, gram / np.where(outer > 0, outer, 1.0), 0.0)
    iu = np.triu_indices(h, 1)
    return (1.0 - cos[..., iu[0], iu[1]]).mean(axis=-1)


def head_diversity_backward(d_diversity, P_heads, *, mask=None, check_probabilities=True):
    """Gradient of :func:`head_diversity`: ``dP_heads = ∂/∂P_heads of Σ d_diversity · diversity``.

    From ``∂cos(a, b)/∂a = b/(‖a‖ ‖b‖) − cos(a, b) · a/‖a‖²``, summed over the pairs of each head; 0 on
    masked entries and padded rows, and for a single head.

    Parameters
    ----------
    d_diversity : array_like, shape P_heads.shape[:-3], i.e. (...,)
        Cotangent of ``diversity``: exactly its shape, finite.
    P_heads : array_like, shape (..., H, Lq, Lk)
        As :func:`head_diversity`.
    mask, check_probabilities
        The forward's options, as :func:`head_diversity` (same defaults; ``mask``: True = real token).

    Returns
    -------
    HeadDiversityGrads
        ``(dP_heads,)``: float64, P_heads' shape.
    """
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
    """Heads ``collapsed (...,)`` (bool) where at least ``fraction`` of real rows put ≥ ``threshold`` on one key.

    A collapsed head attends (almost) one key per query: ``mean_i [max_j P_ij >= threshold] >=
    fraction`` over its real rows.  Not differentiable (no backward).

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows), ``Lk`` keys.

    Parameters
    ----------
    P : array_like, shape (..., H, Lq, Lk) or (..., Lq, Lk)
        Attention maps, rows = queries; any real dtype (bfloat16 too), converted to float64, never
        mutated; finite.  Leading dims are batch dims.
    threshold : float, default 0.8
        The weight a row's largest entry must reach for the row to count as peaked.
    fraction : float, default 0.5
        The share of real rows that must be peaked.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P.shape[:-3] + (Lk,)`` (per example, shared by its
        heads) or ``P.shape[:-2] + (Lk,)`` (per map), which with ``Lq = Lk`` also marks the padded
        query rows; or a bool mask broadcastable to P (True = the entry is kept; a row is real when it
        keeps some key).  Masked entries count as 0; padded rows are left out of every average.
        Default None: every token real.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the argument and the first offending row, with its sum and
        minimum) a map whose real rows are not probabilities: entries >= 0, each row summing to 1 over
        its allowed keys within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).
        False: measure the map as it is (maps with sinks or dropout, known-good maps in a hot loop).

    Returns
    -------
    collapsed : ndarray of bool, shape P.shape[:-2], i.e. (..., H)

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    threshold = as_real(threshold, "threshold", allow_none=False)
    fraction = as_real(fraction, "fraction", allow_none=False)
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    peaked = (m.p.max(axis=-1) >= threshold).astype(np.float64)
    return row_mean(peaked, m.rows) >= fraction


def detect_uniform(P, *, tolerance=0.1, mask=None, check_probabilities=True):
    """Heads ``uniform (...,)`` (bool) whose every real row has normalised entropy ≥ ``1 − tolerance``.

    Normalised entropy ``H_i / log n_i`` (:func:`entropy` with ``normalize=True``); rows with a single
    allowed key and padded rows do not count against a head.  Not differentiable (no backward).

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows), ``Lk`` keys.

    Parameters
    ----------
    P : array_like, shape (..., H, Lq, Lk) or (..., Lq, Lk)
        Attention maps, rows = queries; any real dtype (bfloat16 too), converted to float64, never
        mutated; finite.  Leading dims are batch dims.
    tolerance : float, default 0.1
        How far below 1 a row's normalised entropy may be.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P.shape[:-3] + (Lk,)`` (per example, shared by its
        heads) or ``P.shape[:-2] + (Lk,)`` (per map), which with ``Lq = Lk`` also marks the padded
        query rows; or a bool mask broadcastable to P (True = the entry is kept; a row is real when it
        keeps some key).  Masked entries count as 0; padded rows are left out of every average.
        Default None: every token real.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the argument and the first offending row, with its sum and
        minimum) a map whose real rows are not probabilities: entries >= 0, each row summing to 1 over
        its allowed keys within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).
        False: measure the map as it is (maps with sinks or dropout, known-good maps in a hot loop).

    Returns
    -------
    uniform : ndarray of bool, shape P.shape[:-2], i.e. (..., H)

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    tolerance = as_real(tolerance, "tolerance", allow_none=False)
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    h = entropy(m.p, mask=m.allowed, normalize=True, check_probabilities=False)
    single = key_counts(m) <= 1
    ok = (h >= 1.0 - tolerance) | ~m.rows | single
    return ok.all(axis=-1)


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
