"""Norm-based attention (Kobayashi et al. 2020): ``‖α_ij f(x_j)‖`` with ``f(x) = (x W_V + b_V) W_O``.

``P (..., H, Lq, Lk)``, ``x (..., Lk, d_model)``, ``w_v (d_model, H·dv)``, ``b_v (H·dv,)`` or None,
``w_o (H·dv, d_model)``; head h uses columns ``[h·dv, (h+1)·dv)`` of ``w_v`` and rows of ``w_o``.
Result ``norms (..., H, Lq, Lk)`` = ``|P_hij| · ‖f_h(x_j)‖``; the backward takes ``d_norms``.  No mask:
a padded key's entry is whatever P holds there (0 for a map computed with that key masked).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refattn._validate import (
    RefAttnError,
    as_cotangent,
    as_flag,
    as_float,
    check_keywords_of,
    sum_outer,
    to_numpy,
    unbroadcast,
)
from refattn.metrics._maps import check_probability_rows

__all__ = ["ValueNormsGrads", "value_norms", "value_norms_backward"]


class ValueNormsGrads(NamedTuple):
    """Gradients of :func:`value_norms` (returned by :func:`value_norms_backward`), in input order.

    Fields
    ------
    dP : ndarray of float64, shape of ``P`` (..., H, Lq, Lk)
    dx : ndarray of float64, shape of ``x`` (..., Lk, d_model)
    dw_v : ndarray of float64, shape of ``w_v`` (d_model, H·dv)
    db_v : ndarray of float64, shape (H·dv,), or None
        None when no bias was given.
    dw_o : ndarray of float64, shape of ``w_o`` (H·dv, d_model)
    """

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
    """``norms (..., H, Lq, Lk)`` = ``|α_ij| ‖f_h(x_j)‖`` for every head, query and key (Kobayashi et al. 2020).

    ``f_h(x) = (x W_V^h + b_V^h) W_O^h``: the vector key j contributes to query i through head h is
    ``α_hij f_h(x_j)``, and its norm measures that contribution better than the weight alone.  No
    mask: a padded key's entry is whatever P holds there (0 for a map computed with that key masked).

    Axes: ``...`` batch dims, ``H`` heads, ``Lq`` queries, ``Lk`` keys, ``d_model`` the model width,
    ``dv`` the value head dim.

    Parameters
    ----------
    P : array_like, shape (..., H, Lq, Lk)
        Attention maps of the layer, rows = queries; any real dtype, converted to float64, never
        mutated; finite.
    x : array_like, shape (..., Lk, d_model)
        The layer's key/value inputs; batch dims broadcast with P's.
    w_v : array_like, shape (d_model, H·dv)
        Value projection, applied as ``x @ w_v`` (``W.T`` of PyTorch's ``nn.Linear``); head h takes
        columns ``[h·dv, (h+1)·dv)``.
    b_v : array_like, shape (H·dv,), or None
        Value bias (None: no bias).
    w_o : array_like, shape (H·dv, d_model)
        Output projection; head h takes rows ``[h·dv, (h+1)·dv)``.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the first offending row) a P whose rows are not probabilities
        over all keys: entries >= 0, each row summing to 1 within 1e-6 (``n · eps`` of a coarser
        format, at most 1e-2).  False: take P as it is.

    Returns
    -------
    norms : ndarray of float64, shape (..., H, Lq, Lk)
        ``...`` the broadcast of P's and x's batch dims.

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    p, *_, norms = _parts(P, x, w_v, b_v, w_o, check_probabilities)
    return np.abs(p) * norms[..., None, :]


def value_norms_backward(d_norms, P, x, w_v, b_v, w_o, *, check_probabilities=True):
    """Gradients of :func:`value_norms`: ``∂/∂(P, x, w_v, b_v, w_o) of Σ d_norms · norms``.

    ``dP = d_norms sign(P) ‖f‖``, and through ``‖f‖`` (``d f = dn · f/‖f‖``, 0 where ``f = 0``: the norm has
    no gradient there) to x, ``w_v``, ``b_v`` and ``w_o``; broadcast batch dims are summed back.

    Parameters
    ----------
    d_norms : array_like, shape of ``norms`` (..., H, Lq, Lk)
        Cotangent of ``norms``: exactly its shape, finite.
    P, x, w_v, b_v, w_o
        As :func:`value_norms`.
    check_probabilities
        The forward's option, as :func:`value_norms` (same default).

    Returns
    -------
    ValueNormsGrads
        ``(dP, dx, dw_v, db_v, dw_o)``: float64, each of its input's shape; ``db_v`` None without a bias.
    """
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


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
