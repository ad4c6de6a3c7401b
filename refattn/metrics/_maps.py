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


def _mask_parts(shape, mask):
    """``(keys, rows)`` for a map of ``shape (..., Lq, Lk)`` and a given ``mask``: ``keys`` the bool mask
    as it broadcasts to the map (before padded rows are taken out; its own, compact shape), ``rows``
    the real query rows, broadcast to ``shape[:-1]``."""
    lq, lk = shape[-2:]
    m = as_bool(mask, "mask")
    if len(shape) >= 3 and m.shape == shape[:-3] + (lk,):  # key padding of a map with heads
        keys = m[..., None, None, :]
        rows = m[..., None, :] if lq == lk else np.ones((1,), dtype=bool)
    elif m.shape == shape[:-2] + (lk,):  # key padding of a map without heads
        keys = m[..., None, :]
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
        keys = m
        rows = np.broadcast_to(m, shape).any(axis=-1)
    return keys, np.broadcast_to(rows, shape[:-1])


def interpret_mask(shape, mask):
    """``(allowed, rows)`` for a map of ``shape (..., Lq, Lk)``: bool arrays broadcast to the map and its rows."""
    if mask is None:  # read-only broadcasts: no map-sized array allocated
        return np.broadcast_to(np.True_, tuple(shape)), np.broadcast_to(np.True_, tuple(shape[:-1]))
    keys, rows = _mask_parts(shape, mask)
    return np.broadcast_to(keys & rows[..., None], shape), rows


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


class KernelRows(NamedTuple):
    """What one read of a map by the metric kernel gives (:func:`kernel_rows`): per-row sums over the
    allowed keys, shape ``P.shape[:-1]`` each, 0 on rows that are not real; ``gram`` per map."""

    rows: np.ndarray  # bool (..., Lq): real query rows
    count: np.ndarray  # allowed keys of each row
    total: np.ndarray  # Σ_j P_ij
    max: np.ndarray  # max_j of the masked row (masked entries 0)
    distance: np.ndarray  # Σ_j P_ij |i − j|
    entropy: np.ndarray | None  # −Σ_j P_ij log P_ij (with entropy=True)
    diagonal: np.ndarray  # P_ii (0 when key i is absent or masked)
    diagonal_kept: np.ndarray  # bool: key i exists and is allowed (a real row)
    first: np.ndarray  # P_i,f, f the map's first real key
    previous: np.ndarray  # P_i,i−1
    duplicate: np.ndarray | None  # duplicate-token pattern mass (with tokens)
    induction: np.ndarray | None  # induction pattern mass (with tokens)
    gram: np.ndarray | None  # (..., H, H) Σ over the masked maps of P_h ⊙ P_h' (with gram=True)


def _token_codes(tokens, batch):
    """Integer codes ``(Nt, n)`` of validated tokens (equal code = equal token) and the codes' batch
    element of each of the ``N`` maps' batch elements."""
    t = np.asarray(tokens)
    codes = np.unique(t, return_inverse=True)[1].reshape(t.shape).astype(np.int64)
    n_maps = math.prod(batch)
    if t.ndim == 1:
        return codes[None, :], np.zeros(n_maps, dtype=np.int64)
    return np.ascontiguousarray(codes.reshape(n_maps, t.shape[-1])), np.arange(n_maps, dtype=np.int64)


def _kernel_keys(shape, keys):
    """The allowed keys as :func:`refattn.kernels.metric_rows` takes them: ``(Nk, Hk, Lqk, Lk)`` over
    their own batch elements (compact: ``Hk``, ``Lqk`` 1 where the mask is shared) and the map ``(N,)``
    from each batch element of the maps to its own."""
    lk = shape[-1]
    batch = tuple(shape[:-3])
    keys = keys.reshape((1,) * (len(shape) - keys.ndim) + keys.shape)  # aligned to the map's dims
    own = keys.shape[:-3]
    kh, kq = (keys.shape[-3], keys.shape[-2]) if len(shape) >= 3 else (1, keys.shape[-2])
    compact = np.broadcast_to(keys.reshape((math.prod(own), kh, kq, keys.shape[-1])), (math.prod(own), kh, kq, lk))
    key_map = np.broadcast_to(np.arange(math.prod(own), dtype=np.int64).reshape(own), batch).reshape(-1)
    return np.ascontiguousarray(compact), np.ascontiguousarray(key_map)


def use_kernel(backend, P):
    """Whether a metric called with ``backend=`` on the map ``P`` runs the metric kernel
    (:func:`refattn.kernels.resolve_backend` with P's number of entries); a bad ``backend`` raises."""
    from refattn import kernels

    try:
        size = math.prod(np.shape(P))
    except (ValueError, TypeError):  # a ragged nesting: validation refuses it on the NumPy path
        size = 0
    return kernels.resolve_backend(backend, int(size)) == "numba"


def _real_and_first(shape, keys, rows):
    """The real keys ``(..., Lk)`` of each map (:func:`real_keys`: allowed for some real row) and the
    first of them ``(...,)`` (0 when there is none), from the compact mask ``keys`` and the real rows."""
    if keys.ndim >= 2 and keys.shape[-2] == 1:  # shared by the rows: no map-sized array
        real = keys[..., 0, :] & rows.any(axis=-1)[..., None]
    else:
        real = (keys & rows[..., None]).any(axis=-2)
    real = np.broadcast_to(real, shape[:-2] + (shape[-1],))
    return real, np.argmax(real, axis=-1)


def kernel_rows(P, mask=None, *, name="P", check_probabilities=True, entropy=False, tokens=None, gram=False):
    """One read of the map ``P`` by the metric kernel: :class:`KernelRows`, validated and checked as
    :func:`attention_map` validates and checks (the same errors, raised by it), or None when the NumPy
    path is to run instead (an empty map).

    ``P (..., Lq, Lk)`` any real dtype (float32 read as it is, another dtype converted to float64);
    ``mask`` as every metric takes it; ``tokens`` validated token ids or strings ``(Lk,)`` or
    ``P.shape[:-3] + (Lk,)`` of a square map (None: no pattern masses); ``entropy`` / ``gram``: compute
    the row entropies / the heads' Gram matrices (axis -3 the heads; at least 3 dims).  The kernel
    finds the non-finite entries and the rows that are not probabilities in the same pass; only then is
    :func:`attention_map` run, for its message.
    """
    from refattn import kernels

    check = as_flag(check_probabilities, "check_probabilities")
    given = to_numpy(P, name)
    if not (is_extension_float(given.dtype) or given.dtype.kind in "iuf") or given.ndim < 2:
        attention_map(P, mask, name=name)  # a bad dtype or shape: the definition's error
        return None  # pragma: no cover (it always raises there)
    p = given if given.dtype in (np.float32, np.float64) else given.astype(np.float64)
    shape = p.shape
    if p.size == 0:
        return None
    lq, lk = shape[-2:]
    heads = shape[-3] if p.ndim >= 3 else 1
    batch = tuple(shape[:-3])
    n_maps = math.prod(batch)
    if mask is None:
        keys, key_map = np.ones((1, 1, 1, lk), dtype=bool), np.zeros(n_maps, dtype=np.int64)
        rows = np.broadcast_to(np.True_, shape[:-1])
        real = np.broadcast_to(np.True_, shape[:-2] + (lk,))
        first = np.zeros(shape[:-2], dtype=np.int64)
    else:
        compact, rows = _mask_parts(shape, mask)
        keys, key_map = _kernel_keys(shape, compact)
        real, first = _real_and_first(shape, compact, rows)
    if tokens is None:
        codes, token_map = np.zeros((1, lk), dtype=np.int64), np.zeros(n_maps, dtype=np.int64)
        real_keys = np.zeros((1, 1, 1), dtype=bool)
    else:
        codes, token_map = _token_codes(tokens, batch)
        real_keys = np.ascontiguousarray(real).reshape(n_maps, heads, lk)
    field, grams, bad = kernels.metric_rows(
        p=np.ascontiguousarray(p).reshape(n_maps, heads, lq, lk),
        keys=keys,
        key_map=key_map,
        rows=np.ascontiguousarray(rows).reshape(n_maps, heads, lq),
        real=real_keys,
        first=np.ascontiguousarray(first, dtype=np.int64).reshape(n_maps, heads),
        tokens=codes,
        token_map=token_map,
        entropy=bool(entropy),
        tokens_wanted=tokens is not None,
        gram=bool(gram),
    )
    if bad.any():
        attention_map(P, mask, name=name, check_probabilities=check)  # names the first non-finite entry
        return None  # pragma: no cover (a non-finite entry always raises there)
    field = {key: value.reshape(shape[:-1]) for key, value in field.items()}
    real_rows = np.asarray(rows)
    if check:
        total = field["sum"]
        with np.errstate(invalid="ignore"):
            off = (field["negative"] > 0) | (np.abs(total - 1.0) > probability_tolerance(lk, given.dtype))
        if (real_rows & np.isfinite(total) & off).any():
            attention_map(P, mask, name=name)  # refuses it, naming the first offending row
    return KernelRows(
        rows=real_rows,
        count=field["count"],
        total=field["sum"],
        max=field["max"],
        distance=field["distance"],
        entropy=field["entropy"] if entropy else None,
        diagonal=field["diagonal"],
        diagonal_kept=field["diagonal_kept"] > 0,
        first=field["first"],
        previous=field["previous"],
        duplicate=field["duplicate"] if tokens is not None else None,
        induction=field["induction"] if tokens is not None else None,
        gram=grams.sum(axis=1).reshape(batch + (heads, heads)) if gram else None,
    )


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
