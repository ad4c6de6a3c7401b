"""Shared handling of attention maps and masks for the metrics.

A map ``P (..., Lq, Lk)`` has rows = queries (with heads: ``(..., H, Lq, Lk)``).  ``mask`` is
either a key-padding mask — ``P.shape[:-3] + (Lk,)`` for a map with heads or
``P.shape[:-2] + (Lk,)`` — with True = real token, or a full bool mask broadcastable to ``P``.
A key-padding mask with ``Lq == Lk`` also marks the padded query rows; with a full mask a
query row is real when it allows some key.  Masked entries count as 0; padded query rows are
left out of every average.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refattn._validate import RefAttnError, as_bool, as_float


class Map(NamedTuple):
    p: np.ndarray  # (..., Lq, Lk) float64, masked entries set to 0
    allowed: np.ndarray  # bool, broadcastable to p
    rows: np.ndarray  # bool (..., Lq) broadcast: real query rows


def interpret_mask(shape, mask):
    """``(allowed, rows)`` for a map of ``shape (..., Lq, Lk)``: bool arrays broadcast to the map and its rows."""
    lq, lk = shape[-2:]
    if mask is None:  # read-only broadcasts: no map-sized array allocated
        return np.broadcast_to(np.True_, tuple(shape)), np.broadcast_to(np.True_, tuple(shape[:-1]))
    m = as_bool(mask, "mask")
    if len(shape) >= 3 and m.shape == shape[:-3] + (lk,):  # key padding of a map with heads
        allowed = m[..., None, None, :]
        rows = m[..., None, :] if lq == lk else np.ones((1,), dtype=bool)
    elif m.shape == shape[:-2] + (lk,):  # key padding of a map without heads
        allowed = m[..., None, :]
        rows = m if lq == lk else np.ones((1,), dtype=bool)
    else:
        try:
            fits = np.broadcast_shapes(m.shape, shape) == tuple(shape)
        except ValueError:
            fits = False
        if not fits:
            raise RefAttnError(
                f"mask: expected a key-padding mask {shape[:-3] + (lk,)} or {shape[:-2] + (lk,)}, or a bool "
                f"mask broadcastable to the map {tuple(shape)}, got {m.shape}"
            )
        allowed = m
        rows = np.broadcast_to(m, shape).any(axis=-1)
    rows = np.broadcast_to(rows, shape[:-1])
    return np.broadcast_to(allowed & rows[..., None], shape), rows


def attention_map(P, mask=None, *, name="P"):
    """Validate a map and its mask → :class:`Map` (masked entries and padded rows zeroed)."""
    p = as_float(P, name, ndim_min=2)
    allowed, rows = interpret_mask(p.shape, mask)
    return Map(p if mask is None else np.where(allowed, p, 0.0), allowed, rows)  # p: already a fresh copy


def row_mean(values, rows):
    """Mean of ``values (..., Lq)`` over real rows → ``(...,)`` (0 when a map has no real row)."""
    count = rows.sum(axis=-1)
    return np.where(count > 0, np.where(rows, values, 0.0).sum(axis=-1) / np.maximum(count, 1), 0.0)


def row_mean_backward(dy, rows):
    """Cotangent of ``values`` for :func:`row_mean`: ``dy / count`` on real rows."""
    count = np.maximum(rows.sum(axis=-1), 1)
    return np.where(rows, (dy / count)[..., None], 0.0)


def key_counts(m: Map):
    """Number of allowed keys of each row ``(..., Lq)``."""
    return m.allowed.sum(axis=-1)


def positions(m: Map):
    """Query and key indices ``i (Lq, 1)``, ``j (1, Lk)`` as floats."""
    lq, lk = m.p.shape[-2:]
    return np.arange(lq, dtype=np.float64)[:, None], np.arange(lk, dtype=np.float64)[None, :]


def masked_grad(m: Map, d):
    """A gradient w.r.t. P: zero on masked entries and padded rows, full shape of P."""
    return np.where(m.allowed, np.broadcast_to(d, m.p.shape), 0.0)
