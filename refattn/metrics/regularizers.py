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

from refattn._validate import as_cotangent, as_float
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
    """``loss`` = ``mean |H_i − target_i|`` over real rows: a scalar (0-d array).  ``target``: broadcastable
    to the rows ``P.shape[:-1]`` (None: ``log(n_i / 4)``); ``mask``: True = real token."""
    m, gap, count = _entropy_gap(P, target, mask, check_probabilities)
    return np.asarray(np.where(m.rows, np.abs(gap), 0.0).sum() / count)


def entropy_regularizer_backward(d_loss, P, *, target=None, mask=None, check_probabilities=True):
    """Gradient of :func:`entropy_regularizer`: ``MapGrads(dP)``, ``dP = d_loss · sign(H − target) / count ·
    dH/dP`` (subgradient 0 at ``H = target``; ``mask``: True = real token)."""
    m, gap, count = _entropy_gap(P, target, mask, check_probabilities)
    d = float(as_cotangent(d_loss, (), "d_loss"))
    dh = np.where(m.rows, d * np.sign(gap) / count, 0.0)
    return MapGrads(entropy_backward(dh, m.p, mask=m.allowed, check_probabilities=False).dP)


def diversity_regularizer(P_heads, *, mask=None, check_probabilities=True):
    """``loss``: the mean pairwise cosine similarity of the heads, averaged over maps: a scalar (0-d array;
    ``mask``: True = real token)."""
    return np.asarray(np.mean(1.0 - head_diversity(P_heads, mask=mask, check_probabilities=check_probabilities)))


def diversity_regularizer_backward(d_loss, P_heads, *, mask=None, check_probabilities=True):
    """Gradient of :func:`diversity_regularizer`: ``HeadDiversityGrads(dP_heads)``."""
    div = head_diversity(P_heads, mask=mask, check_probabilities=check_probabilities)
    d = float(as_cotangent(d_loss, (), "d_loss"))
    cot = np.full(div.shape, -d / max(div.size, 1))
    return HeadDiversityGrads(head_diversity_backward(cot, P_heads, mask=mask, check_probabilities=False).dP_heads)
