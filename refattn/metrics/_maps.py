"""Shared handling of attention maps and masks for the metrics.

A map ``P (..., Lq, Lk)`` has rows = queries (with heads: ``(..., H, Lq, Lk)``).  ``mask`` is
either a key-padding mask — ``P.shape[:-3] + (Lk,)`` for a map with heads or
``P.shape[:-2] + (Lk,)`` — with True = real token, or a full bool mask broadcastable to ``P``
(True = the entry is kept).  Every mask of refattn is True = keep: no metric takes the opposite polarity.
A key-padding mask with ``Lq == Lk`` also marks the padded query rows; with a full mask a
query row is real when it allows some key.  Masked entries count as 0; padded query rows are
left out of every average.

Maps are checked to be probabilities (:func:`check_probability_rows`): every real row
non-negative and summing to 1 over its allowed keys; ``check_probabilities=False`` skips it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from refattn._validate import RefAttnError, as_bool, as_flag, as_float, is_extension_float, to_numpy

PROBABILITY_TOLERANCE = 1e-6  # |row sum − 1| allowed for a float64 map
LOW_PRECISION_CAP = 1e-2  # the widest tolerance a low-precision map gets (n · eps of its format, capped)


class MapGrads(NamedTuple):
    """The gradient of a metric of one attention map ``P`` (every metric whose only differentiable input is ``P``).

    What the backward of such a metric returns: ``MapGrads(dP)``.

    Fields
    ------
    dP : ndarray of float64, shape of ``P``
        0 on masked entries and padded rows.
    """

    dP: np.ndarray


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


def _eps(dtype):
    """Machine epsilon of the format a map was given in (float64 for integers)."""
    if is_extension_float(dtype):
        import ml_dtypes

        return float(ml_dtypes.finfo(dtype).eps)
    return float(np.finfo(dtype).eps) if dtype.kind == "f" else float(np.finfo(np.float64).eps)


def probability_tolerance(n, dtype=np.float64):
    """The row-sum tolerance for rows of ``n`` keys stored as ``dtype``: 1e-6, widened to ``n · eps`` for
    formats too coarse for it (float32 rows of more than 8 keys, float16, bfloat16), at most 1e-2."""
    return max(PROBABILITY_TOLERANCE, min(LOW_PRECISION_CAP, n * _eps(np.dtype(dtype))))


def check_probability_rows(p, rows, name, *, dtype=None, keys=None, masked=None):
    """Refuse a map whose real rows are not probabilities: :class:`RefAttnError` naming ``name``, the
    first offending row, its sum and its minimum over the allowed keys, with a hint when the values
    look like logits.

    ``p (..., Lq, Lk)`` the map as given (any real dtype), ``rows`` bool broadcastable to
    ``p.shape[:-1]`` (False: a padded or fully masked row, exempt), ``keys`` bool broadcastable to
    ``p`` (the allowed entries; None: all), ``masked`` ``p`` with the entries outside ``keys`` set
    to 0 when the caller has it, ``dtype`` the format the map was given in (sets the tolerance;
    default ``p.dtype``).  Rows whose sum is not finite are left to the finiteness check.
    """
    lk = p.shape[-1]
    if lk == 0 or p.size == 0:
        return
    dtype = p.dtype if dtype is None else np.dtype(dtype)
    if masked is None:
        masked = p if keys is None else np.where(keys, p, 0)
    total = masked.sum(axis=-1, dtype=np.float64)  # (..., Lq)
    low = masked.min(axis=-1)  # (..., Lq); masked entries are 0 and never make it negative
    tol = probability_tolerance(lk, dtype)
    real = np.broadcast_to(rows, total.shape) & np.isfinite(total)
    with np.errstate(invalid="ignore"):
        bad = real & ((low < 0) | (np.abs(total - 1.0) > tol))
    if not bad.any():
        return
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    row = np.asarray(p[idx], dtype=np.float64)  # (Lk,)
    allowed = np.ones(lk, dtype=bool) if keys is None else np.broadcast_to(keys, p.shape)[idx]
    s, lo = float(total[idx]), float(row[allowed].min(initial=np.inf))
    logits = ": these look like logits: apply softmax first"
    if (low[real] < 0).any():
        hint = logits
    elif keys is not None and abs(math.fsum(row) - 1.0) <= tol:
        hint = ": it sums to 1 over all keys, so it puts weight on masked keys (was it computed with this mask?)"
    elif s == 0.0:
        hint = ": a row without any weight (a fully masked or padded row?): mark it with mask="
    elif (np.abs(total[real] - 1.0) > 0.5).any():
        hint = logits
    else:
        hint = ""
    where = f"row {idx}" if len(idx) > 1 else f"row {idx[0]}"
    raise RefAttnError(
        f"{name}: expected probabilities (entries >= 0, each real row summing to 1 within {tol:.3g} over its "
        f"allowed keys), got {where} with sum {s:.10g} and min {lo:.10g}{hint} "
        f"(check_probabilities=False measures the map as it is)"
    )


def attention_map(P, mask=None, *, name="P", check_probabilities=True):
    """Validate a map and its mask → :class:`Map` (masked entries and padded rows zeroed); with
    ``check_probabilities`` its real rows must be probabilities (:func:`check_probability_rows`)."""
    check = as_flag(check_probabilities, "check_probabilities")
    given = to_numpy(P, name)
    p = as_float(given, name, ndim_min=2)
    allowed, rows = interpret_mask(p.shape, mask)
    m = Map(p if mask is None else np.where(allowed, p, 0.0), allowed, rows)  # p: already a fresh copy
    if check:
        keys = None if mask is None else m.allowed
        check_probability_rows(p, m.rows, name, dtype=given.dtype, keys=keys, masked=m.p)
    return m


def real_keys(m: Map):
    """Keys that are real tokens ``(..., Lk)`` per map: allowed for some real query row."""
    return m.allowed.any(axis=-2)


def row_mean(values, rows):
    """Mean of ``values (..., Lq)`` over real rows → ``(...,)`` (0 when a map has no real row)."""
    count = rows.sum(axis=-1)
    return np.where(count > 0, np.where(rows, values, 0.0).sum(axis=-1) / np.maximum(count, 1), 0.0)


def row_mean_backward(d_mean, rows):
    """Cotangent of ``values`` for :func:`row_mean`: ``d_mean / count`` on real rows."""
    count = np.maximum(rows.sum(axis=-1), 1)
    return np.where(rows, (d_mean / count)[..., None], 0.0)


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
