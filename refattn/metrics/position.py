"""Positional metrics: distances, locality, offsets, diagonal, positional bias, self vs context.

``P (..., H, Lq, Lk)``; query i and key j are raw indices (for ``Lq != Lk`` maps the distance
is still ``|i − j|``), and every metric depends on them through ``j − i`` only, so padding a
square map on the left shifts both and changes nothing.  Per-row results ``P.shape[:-1]`` (0 on
padded rows); per-head results ``P.shape[:-2]``.  Every metric here except ``expected_offset`` is
linear in P.  Each backward takes the cotangent ``d_<output>`` of the output its forward names and
returns :class:`~refattn.metrics.MapGrads` ``(dP)``.  ``mask``: True = real token (a key-padding mask,
or a bool mask broadcastable to P, True = kept).  ``check_probabilities``: refuse maps whose real rows
are not probabilities.
"""

from __future__ import annotations

import numpy as np

from refattn._validate import as_cotangent, as_int
from refattn.metrics._maps import (
    MapGrads,
    attention_map,
    key_counts,
    masked_grad,
    positions,
    row_mean,
    row_mean_backward,
)

__all__ = [
    "diagonal_strength",
    "diagonal_strength_backward",
    "expected_offset",
    "expected_offset_backward",
    "locality_score",
    "locality_score_backward",
    "mean_distance",
    "mean_distance_backward",
    "offset_attention",
    "offset_attention_backward",
    "positional_bias",
    "positional_bias_backward",
    "self_context_balance",
    "self_context_balance_backward",
]


def _distance(m):
    i, j = positions(m)
    return np.abs(i - j)  # (Lq, Lk)


def mean_distance(P, *, mask=None, check_probabilities=True):
    """``distance (..., Lq)`` = ``Σ_j P_ij |i − j|`` per row (``mask``: True = real token)."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    return (m.p * _distance(m)).sum(axis=-1)


def mean_distance_backward(d_distance, P, *, mask=None, check_probabilities=True):
    """Gradient of :func:`mean_distance`: ``MapGrads(dP)``, ``dP_ij = d_distance_i |i − j|``."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    d = as_cotangent(d_distance, m.p.shape[:-1], "d_distance")
    return MapGrads(masked_grad(m, d[..., None] * _distance(m)))


def _half_width(m):
    n = key_counts(m).astype(np.float64)
    return np.where(m.rows, n / 2.0, 1.0)


def locality_score(P, *, mask=None, check_probabilities=True):
    """``locality (..., Lq)`` = ``1 − mean_distance / (n/2)`` per row, n = allowed keys of the row (1 = all
    on the diagonal; ``mask``: True = real token)."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    return np.where(m.rows, 1.0 - mean_distance(m.p, mask=m.allowed, check_probabilities=False) / _half_width(m), 0.0)


def locality_score_backward(d_locality, P, *, mask=None, check_probabilities=True):
    """Gradient of :func:`locality_score`: ``MapGrads(dP)``, ``dP_ij = −d_locality_i |i − j| / (n/2)``."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    d = as_cotangent(d_locality, m.p.shape[:-1], "d_locality")
    return MapGrads(masked_grad(m, -(d / _half_width(m))[..., None] * _distance(m)))


def _offsets(m):
    i, j = positions(m)
    return j - i  # (Lq, Lk)


def _centre(m):
    return (m.p * _offsets(m)).sum(axis=-1)  # (..., Lq): Σ_j P_ij (j − i) = E_j[j] − i on a normalised row


def expected_offset(P, *, mask=None, check_probabilities=True):
    """``offset (..., Lq)`` = ``|Σ_j P_ij (j − i)|`` per row (``|E_j[j] − i|`` for a normalised row; 0 on
    padded rows; ``mask``: True = real token).

    Written with the offsets ``j − i`` so that, like every metric here, it depends on relative
    positions only: left padding leaves it unchanged even for rows that do not sum to 1.
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    return np.where(m.rows, np.abs(_centre(m)), 0.0)


def expected_offset_backward(d_offset, P, *, mask=None, check_probabilities=True):
    """``MapGrads(dP)``, ``dP_ij = d_offset_i sign(Σ_k P_ik (k − i)) (j − i)`` (subgradient 0 where the sum
    is 0; ``mask``: True = real token)."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    d = as_cotangent(d_offset, m.p.shape[:-1], "d_offset")
    return MapGrads(masked_grad(m, (d * np.sign(_centre(m)))[..., None] * _offsets(m)))


def _offset_pattern(m, offset):
    i, j = positions(m)
    return (j - i == offset).astype(np.float64)  # (Lq, Lk)


def _rows_with_target(m, offset):
    """Real rows i whose key ``i + offset`` exists and is allowed (a real token) ``(..., Lq)``."""
    return m.rows & (m.allowed & (_offset_pattern(m, offset) > 0)).any(axis=-1)


def offset_attention(P, *, offset, mask=None, check_probabilities=True):
    """``mass (...,)``: the mean over real rows i (with key ``i + offset`` present) of ``P[i, i + offset]``.

    ``offset = −1``: previous token; ``0``: self; ``+1``: next token.  A row counts when its key
    ``i + offset`` is allowed: a padded key (under right padding for +1, left padding for −1) is
    no target, as it is not in the cropped map (``mask``: True = real token).
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    offset = as_int(offset, "offset")
    return row_mean((m.p * _offset_pattern(m, offset)).sum(axis=-1), _rows_with_target(m, offset))


def offset_attention_backward(d_mass, P, *, offset, mask=None, check_probabilities=True):
    """Gradient of :func:`offset_attention`: ``MapGrads(dP)``, ``d_mass / n_rows`` on ``P[i, i + offset]``."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    offset = as_int(offset, "offset")
    rows = _rows_with_target(m, offset)
    d = row_mean_backward(as_cotangent(d_mass, m.p.shape[:-2], "d_mass"), rows)
    return MapGrads(masked_grad(m, d[..., None] * _offset_pattern(m, offset)))


def diagonal_strength(P, *, mask=None, check_probabilities=True):
    """``strength (...,)``: the mean over real rows of ``P_ii`` (``offset_attention`` with offset 0;
    ``mask``: True = real token)."""
    return offset_attention(P, offset=0, mask=mask, check_probabilities=check_probabilities)


def diagonal_strength_backward(d_strength, P, *, mask=None, check_probabilities=True):
    """Gradient of :func:`diagonal_strength`: ``MapGrads(dP)``."""
    return offset_attention_backward(d_strength, P, offset=0, mask=mask, check_probabilities=check_probabilities)


def _regions(m):
    """One-hot region of each allowed key by its rank among the row's allowed keys: first quarter,
    middle half, last quarter → ``(..., Lq, Lk, 3)``."""
    allowed = m.allowed.astype(np.float64)
    rank = np.cumsum(allowed, axis=-1) - 1.0  # rank among allowed keys
    n = allowed.sum(axis=-1, keepdims=True)
    first = (4 * rank < n) & m.allowed
    last = (4 * rank >= 3 * n) & m.allowed & ~first
    middle = m.allowed & ~first & ~last
    return np.stack([first, middle, last], axis=-1).astype(np.float64)


def positional_bias(P, *, mask=None, check_probabilities=True):
    """``mass (..., 3)``: the mean attention (over real rows) received by the first quarter, middle half
    and last quarter of each row's allowed keys (``mask``: True = real token)."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    mass = np.einsum("...j,...jr->...r", m.p, _regions(m))  # (..., Lq, 3)
    return np.stack([row_mean(mass[..., r], m.rows) for r in range(3)], axis=-1)


def positional_bias_backward(d_mass, P, *, mask=None, check_probabilities=True):
    """Gradient of :func:`positional_bias`: ``MapGrads(dP)``."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    d = as_cotangent(d_mass, m.p.shape[:-2] + (3,), "d_mass")
    per_row = np.stack([row_mean_backward(d[..., r], m.rows) for r in range(3)], axis=-1)  # (..., Lq, 3)
    return MapGrads(masked_grad(m, np.einsum("...r,...jr->...j", per_row, _regions(m))))


def _self_minus_context(m):
    i, j = positions(m)
    return np.where(i == j, 1.0, -1.0)  # (Lq, Lk)


def self_context_balance(P, *, mask=None, check_probabilities=True):
    """``balance (...,)``: the mean over real rows of ``P_ii − Σ_{j≠i} P_ij``: +1 all on self, −1 all on
    context (``mask``: True = real token)."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    return row_mean((m.p * _self_minus_context(m)).sum(axis=-1), m.rows)


def self_context_balance_backward(d_balance, P, *, mask=None, check_probabilities=True):
    """Gradient of :func:`self_context_balance`: ``MapGrads(dP)``."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    d = row_mean_backward(as_cotangent(d_balance, m.p.shape[:-2], "d_balance"), m.rows)
    return MapGrads(masked_grad(m, d[..., None] * _self_minus_context(m)))
