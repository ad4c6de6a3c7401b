"""Norm-based attention (Kobayashi et al. 2020): ``‖α_ij f(x_j)‖`` with ``f(x) = (x W_V + b_V) W_O``.

``P (..., H, Lq, Lk)``, ``x (..., Lk, d_model)``, ``w_v (d_model, H·dv)``, ``b_v (H·dv,)`` or None,
``w_o (H·dv, d_model)``; head h uses columns ``[h·dv, (h+1)·dv)`` of ``w_v`` and rows of ``w_o``.
Result ``norms (..., H, Lq, Lk)`` = ``|P_hij| · ‖f_h(x_j)‖``; the backward takes ``d_norms``.  No mask:
a padded key's entry is whatever P holds there (0 for a map computed with that key masked).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refattn._validate import RefAttnError, as_cotangent, as_flag, as_float, sum_outer, to_numpy, unbroadcast
from refattn.metrics._maps import check_probability_rows

__all__ = ["ValueNormsGrads", "value_norms", "value_norms_backward"]


class ValueNormsGrads(NamedTuple):
    """Gradients of :func:`value_norms` w.r.t. each of its inputs, in input order (``db_v`` None without a bias)."""

    dP: np.ndarray
    dx: np.ndarray
    dw_v: np.ndarray
    db_v: np.ndarray | None
    dw_o: np.ndarray


def _parts(P, x, w_v, b_v, w_o, check_probabilities):
    check = as_flag(check_probabilities, "check_probabilities")
    given = to_numpy(P, "P")
    p = as_float(given, "P", ndim_min=3)
    if check:
        check_probability_rows(p, np.True_, "P", dtype=given.dtype)
    x = as_float(x, "x", ndim_min=2)
    w_v, w_o = as_float(w_v, "w_v"), as_float(w_o, "w_o")
    h, lk = p.shape[-3], p.shape[-1]
    if x.shape[-2] != lk:
        raise RefAttnError(f"x: expected Lk={lk} tokens (..., Lk, d_model), got shape {x.shape}")
    if w_v.ndim != 2 or w_v.shape[0] != x.shape[-1] or w_v.shape[1] % h:
        raise RefAttnError(f"w_v: expected (d_model={x.shape[-1]}, H·dv) with H={h}, got {w_v.shape}")
    if w_o.shape != (w_v.shape[1], x.shape[-1]):
        raise RefAttnError(f"w_o: expected {(w_v.shape[1], x.shape[-1])}, got {w_o.shape}")
    b = None if b_v is None else as_float(b_v, "b_v")
    if b is not None and b.shape != (w_v.shape[1],):
        raise RefAttnError(f"b_v: expected shape {(w_v.shape[1],)}, got {b.shape}")
    dv = w_v.shape[1] // h
    wv = w_v.reshape(x.shape[-1], h, dv).transpose(1, 0, 2)  # (H, d_model, dv)
    wo = w_o.reshape(h, dv, x.shape[-1])  # (H, dv, d_model)
    u = x[..., None, :, :] @ wv  # (..., H, Lk, dv)
    if b is not None:
        u = u + b.reshape(h, 1, dv)
    f = u @ wo  # (..., H, Lk, d_model)
    norms = np.linalg.norm(f, axis=-1)  # (..., H, Lk)
    return p, x, w_v, b, w_o, wv, wo, u, f, norms


def value_norms(P, x, w_v, b_v, w_o, *, check_probabilities=True):
    """``norms (..., H, Lq, Lk)`` = ``|α_ij| ‖f_h(x_j)‖`` for every head, query and key; ``check_probabilities``:
    each row of P must be a probability distribution (no mask: over all keys)."""
    p, *_, norms = _parts(P, x, w_v, b_v, w_o, check_probabilities)
    return np.abs(p) * norms[..., None, :]


def value_norms_backward(d_norms, P, x, w_v, b_v, w_o, *, check_probabilities=True):
    """``ValueNormsGrads(dP, dx, dw_v, db_v, dw_o)`` (0 through a zero vector ``f``, where the norm has no
    gradient)."""
    p, x, w_v, b, w_o, wv, wo, u, f, norms = _parts(P, x, w_v, b_v, w_o, check_probabilities)
    out_shape = np.broadcast_shapes(p.shape, norms.shape[:-1] + (1,) + norms.shape[-1:])
    d = as_cotangent(d_norms, out_shape, "d_norms")
    dp = unbroadcast(d * np.sign(p) * norms[..., None, :], p.shape)
    dn = (d * np.abs(p)).sum(axis=-2)  # (..., H, Lk)
    df = np.where(norms > 0, dn / np.where(norms > 0, norms, 1.0), 0.0)[..., None] * f  # (..., H, Lk, d_model)
    du = df @ np.swapaxes(wo, -1, -2)  # (..., H, Lk, dv)
    h, dv = wv.shape[0], wv.shape[2]
    dwo = np.stack([sum_outer(u[..., i, :, :], df[..., i, :, :]) for i in range(h)])  # (H, dv, d_model)
    dwv = np.stack([sum_outer(np.broadcast_to(x, du.shape[:-3] + x.shape[-2:]), du[..., i, :, :]) for i in range(h)])
    db = None if b is None else du.reshape(-1, h, du.shape[-2], dv).sum(axis=(0, 2)).reshape(-1)
    dx = unbroadcast((du @ np.swapaxes(wv, -1, -2)).sum(axis=-3), x.shape)
    return ValueNormsGrads(dp, dx, dwv.transpose(1, 0, 2).reshape(w_v.shape), db, dwo.reshape(w_o.shape))
