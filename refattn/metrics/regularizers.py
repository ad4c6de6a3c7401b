"""Regularizers on attention maps, with gradients.

* ``entropy_regularizer(P, *, target=None)``: mean over real rows (and heads, batch) of
  ``|H_i − target_i|``; ``target`` defaults to ``log(n_i / 4)`` with ``n_i`` the row's allowed keys
  (a row spread over about a quarter of its keys); a scalar ``loss``.
* ``diversity_regularizer(P_heads)``: mean over maps of the mean pairwise cosine similarity of
  the heads, ``1 − head_diversity`` (minimise it to make heads differ); a scalar ``loss``.

The backwards take ``d_loss`` (a scalar) and return ``MapGrads(dP)`` / ``HeadDiversityGrads(dP_heads)``.
``mask``: True = real token.
"""

from __future__ import annotations

import numpy as np

from refattn._validate import as_cotangent, as_float, check_keywords_of
from refattn.metrics._maps import MapGrads, attention_map, key_counts
from refattn.metrics.distribution import (
    HeadDiversityGrads,
    entropy,
    entropy_backward,
    head_diversity,
    head_diversity_backward,
)

__all__ = [
    "diversity_regularizer",
    "diversity_regularizer_backward",
    "entropy_regularizer",
    "entropy_regularizer_backward",
]


def _entropy_gap(P, target, mask, check_probabilities):
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    h = entropy(m.p, mask=m.allowed, check_probabilities=False)
    if target is None:
        t = np.log(np.maximum(key_counts(m), 1) / 4.0)
    else:
        t = np.broadcast_to(as_float(target, "target"), h.shape)
    count = max(int(m.rows.sum()), 1)
    return m, h - t, count


def entropy_regularizer(P, *, target=None, mask=None, check_probabilities=True):
    """``loss`` = ``mean |H_i − target_i|`` over real rows: a scalar (0-d array).

    ``H_i`` the entropy of row i (:func:`~refattn.metrics.distribution.entropy`, natural log), the mean
    taken over every real row of every map (heads and batch included).  The default target
    ``log(n_i / 4)``, ``n_i`` the row's allowed keys, asks each row to spread over about a quarter of
    its keys.

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows), ``Lk`` keys.

    Parameters
    ----------
    P : array_like, shape (..., H, Lq, Lk) or (..., Lq, Lk)
        Attention maps, rows = queries; any real dtype (bfloat16 too), converted to float64, never
        mutated; finite.  Leading dims are batch dims.
    target : array_like, broadcastable to P.shape[:-1], optional
        The entropy each row should have (natural log); any real dtype, finite.  Default None:
        ``log(n_i / 4)``.
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
    loss : ndarray of float64, shape ()
        0-d; 0 without a real row.

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    m, gap, count = _entropy_gap(P, target, mask, check_probabilities)
    return np.asarray(np.where(m.rows, np.abs(gap), 0.0).sum() / count)


def entropy_regularizer_backward(d_loss, P, *, target=None, mask=None, check_probabilities=True):
    """Gradient of :func:`entropy_regularizer`: ``dP = ∂/∂P of Σ d_loss · loss``.

    ``dP = d_loss · sign(H_i − target_i) / count · ∂H_i/∂P`` (the subgradient 0 at ``H = target``),
    ``count`` the number of real rows, ``∂H_i/∂P_ij = −(log P_ij + 1)`` (±inf at an allowed
    ``P_ij = 0``, as :func:`~refattn.metrics.distribution.entropy_backward`).

    Parameters
    ----------
    d_loss : array_like, shape () (a scalar)
        Cotangent of ``loss``: exactly its shape, finite.
    P : array_like
        As :func:`entropy_regularizer`.
    target, mask, check_probabilities
        The forward's options, as :func:`entropy_regularizer` (same defaults; ``mask``: True = real token).

    Returns
    -------
    MapGrads
        ``(dP,)``: float64, P's shape; 0 on masked entries and padded rows.
    """
    m, gap, count = _entropy_gap(P, target, mask, check_probabilities)
    d = float(as_cotangent(d_loss, (), "d_loss"))
    dh = np.where(m.rows, d * np.sign(gap) / count, 0.0)
    return MapGrads(entropy_backward(dh, m.p, mask=m.allowed, check_probabilities=False).dP)


def diversity_regularizer(P_heads, *, mask=None, check_probabilities=True):
    """``loss``: the mean pairwise cosine similarity of the heads, averaged over maps: a scalar (0-d array).

    ``loss = mean(1 − head_diversity(P_heads))`` (:func:`~refattn.metrics.distribution.head_diversity`):
    minimise it to make the heads of a layer attend differently.  1 with one head.

    Axes: ``...`` batch dims, ``H`` heads, ``Lq`` queries, ``Lk`` keys.

    Parameters
    ----------
    P_heads : array_like, shape (..., H, Lq, Lk)
        The maps of every head of a layer, rows = queries; any real dtype, converted to float64,
        never mutated; finite.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P_heads.shape[:-3] + (Lk,)`` (per example, shared by its
        heads) or ``P_heads.shape[:-2] + (Lk,)`` (per map), which with ``Lq = Lk`` also marks the padded
        query rows; or a bool mask broadcastable to P_heads (True = the entry is kept; a row is real when it
        keeps some key).  Masked entries count as 0; padded rows are left out of every average.
        Default None: every token real.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the argument and the first offending row, with its sum and
        minimum) a map whose real rows are not probabilities: entries >= 0, each row summing to 1 over
        its allowed keys within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).
        False: measure the map as it is (maps with sinks or dropout, known-good maps in a hot loop).

    Returns
    -------
    loss : ndarray of float64, shape ()
        0-d, in [0, 1] for non-negative maps.

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    return np.asarray(np.mean(1.0 - head_diversity(P_heads, mask=mask, check_probabilities=check_probabilities)))


def diversity_regularizer_backward(d_loss, P_heads, *, mask=None, check_probabilities=True):
    """Gradient of :func:`diversity_regularizer`: ``dP_heads = ∂/∂P_heads of d_loss · loss``.

    ``−d_loss / n_maps`` times the gradient of :func:`~refattn.metrics.distribution.head_diversity` of
    each map (:func:`~refattn.metrics.distribution.head_diversity_backward`).

    Parameters
    ----------
    d_loss : array_like, shape ()
        Cotangent of ``loss``: a scalar, finite.
    P_heads : array_like, shape (..., H, Lq, Lk)
        As :func:`diversity_regularizer`.
    mask, check_probabilities
        The forward's options, as :func:`diversity_regularizer` (same defaults; ``mask``: True = real
        token).

    Returns
    -------
    HeadDiversityGrads
        ``(dP_heads,)``: float64, P_heads' shape.
    """
    div = head_diversity(P_heads, mask=mask, check_probabilities=check_probabilities)
    d = float(as_cotangent(d_loss, (), "d_loss"))
    cot = np.full(div.shape, -d / max(div.size, 1))
    return HeadDiversityGrads(head_diversity_backward(cot, P_heads, mask=mask, check_probabilities=False).dP_heads)


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
