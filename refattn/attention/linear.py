"""Linear attention (Katharopoulos et al. 2020) and its backward.

``q (..., Hq, Lq, D)``, ``k (..., Hk, Lk, D)``, ``v (..., Hk, Lk, Dv)`` (GQA as in sdpa)::

    a_i = φ(q_i), b_j = φ(k_j)
    S_i = Σ_j b_j v_jᵀ (D, Dv),  z_i = Σ_j b_j (D,)    sums over j <= i when causal (Lq == Lk)
    out_i = a_iᵀ S_i / (a_iᵀ z_i + eps)

Feature maps: ``"elu+1"`` (φ(x) = x + 1 for x > 0, eˣ otherwise) and ``"relu"``.
Computed with prefix sums: O(L·D·Dv), no L×L matrix.  A row whose denominator is exactly 0
(possible with ``"relu"`` and ``eps=0``) is an empty row: output 0, no gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refattn._validate import (
    RefAttnError,
    as_choice,
    as_cotangent,
    as_flag,
    as_float,
    as_real,
    check_keywords_of,
    unbroadcast,
)
from refattn.attention.sdpa import expand_kv, reduce_kv

__all__ = ["FEATURE_MAPS", "LinearAttentionGrads", "linear_attention", "linear_attention_backward"]

FEATURE_MAPS = ("elu+1", "relu")


class LinearAttentionGrads(NamedTuple):
    """Gradients of :func:`linear_attention` (returned by :func:`linear_attention_backward`), each
    float64 and of its input's shape (GQA groups and broadcast dims summed).

    Fields
    ------
    dq : ndarray, shape of ``q`` (..., Hq, Lq, D)
    dk : ndarray, shape of ``k`` (..., Hk, Lk, D)
    dv : ndarray, shape of ``v`` (..., Hk, Lk, Dv)
    """

    dq: np.ndarray
    dk: np.ndarray
    dv: np.ndarray


def _phi(x, name):
    """(φ(x), φ'(x))."""
    if name == "elu+1":
        e = np.exp(np.minimum(x, 0.0))
        return np.where(x > 0, x + 1.0, e), np.where(x > 0, 1.0, e)
    return np.maximum(x, 0.0), (x > 0).astype(np.float64)


def prefix_sum(x, axis):
    """Inclusive prefix sum along ``axis`` (row i sums keys j <= i)."""
    return np.cumsum(x, axis=axis)


def _validate(q, k, v, feature_map, causal, eps):
    q, k, v = as_float(q, "q", ndim_min=3), as_float(k, "k", ndim_min=3), as_float(v, "v", ndim_min=3)
    as_choice(feature_map, "feature_map", FEATURE_MAPS)
    causal = as_flag(causal, "causal")
    eps = as_real(eps, "eps", allow_none=False)
    if eps < 0:
        raise RefAttnError(f"eps: expected a number >= 0, got {eps}")
    if k.shape[-1] != q.shape[-1]:
        raise RefAttnError(f"k: expected last dim D={q.shape[-1]} (as q {q.shape}), got {k.shape}")
    if v.shape[-3:-1] != k.shape[-3:-1]:
        raise RefAttnError(f"v: expected (..., Hk, Lk, Dv) matching k {k.shape}, got {v.shape}")
    if q.shape[-3] % k.shape[-3]:
        raise RefAttnError(f"k: expected Hk dividing Hq={q.shape[-3]}, got Hk={k.shape[-3]}")
    if causal and q.shape[-2] != k.shape[-2]:
        raise RefAttnError(
            f"causal: expected Lq == Lk for causal linear attention, got {q.shape[-2]} and {k.shape[-2]}"
        )
    return q, k, v, causal, eps


def _forward(q, k, v, feature_map, causal, eps):
    g = q.shape[-3] // k.shape[-3]
    a, da = _phi(q, feature_map)  # (..., Hq, Lq, D)
    b, db = _phi(expand_kv(k, g), feature_map)  # (..., Hq, Lk, D)
    ve = expand_kv(v, g)  # (..., Hq, Lk, Dv)
    kv = b[..., :, :, None] * ve[..., :, None, :]  # (..., Hq, Lk, D, Dv)
    if causal:
        s, z = prefix_sum(kv, -3), prefix_sum(b, -2)  # (..., Hq, L, D, Dv), (..., Hq, L, D)
    else:
        s, z = kv.sum(axis=-3, keepdims=True), b.sum(axis=-2, keepdims=True)
    num = np.einsum("...id,...ide->...ie", a, s)  # (..., Hq, Lq, Dv)
    den = np.einsum("...id,...id->...i", a, z) + eps  # (..., Hq, Lq)
    den = np.where(den == 0.0, np.inf, den)  # no mass at all (relu, eps=0): an empty row, output 0
    return num / den[..., None], (a, da, b, db, ve, s, z, den, g)


def linear_attention(q, k, v, *, feature_map="elu+1", causal=False, eps=1e-6):
    """Linear attention (Katharopoulos et al. 2020): softmax replaced by a feature map, so the
    keys are summed once, in O(L·D·Dv) time and no ``Lq × Lk`` array.

    ``out_i = φ(q_i)ᵀ S_i / (φ(q_i)ᵀ z_i + eps)`` with ``S_i = Σ_j φ(k_j) v_jᵀ`` and
    ``z_i = Σ_j φ(k_j)``, the sums over every key, or over ``j <= i`` when causal.  Axes: ``...``
    batch dims (broadcast), ``Hq``/``Hk`` query/kv heads (``Hq % Hk == 0``, GQA as
    :func:`refattn.sdpa`), ``Lq``/``Lk`` lengths, ``D`` q/k head dim, ``Dv`` value head dim.  A
    row whose denominator is exactly 0 (``"relu"`` with ``eps=0``) is an empty row: output 0.

    Parameters
    ----------
    q : array_like, shape (..., Hq, Lq, D)
        Queries (float64 after conversion; finite).
    k : array_like, shape (..., Hk, Lk, D)
        Keys.
    v : array_like, shape (..., Hk, Lk, Dv)
        Values.
    feature_map : {"elu+1", "relu"}, default "elu+1"
        φ: ``"elu+1"``, ``x + 1`` for ``x > 0`` and ``eˣ`` otherwise (the paper's, positive);
        ``"relu"``, ``max(x, 0)``.
    causal : bool, default False
        Prefix sums: row i sums keys ``j <= i``; needs ``Lq == Lk``.
    eps : float, default 1e-6
        Added to the denominator, >= 0.

    Returns
    -------
    out : ndarray of float64, shape (..., Hq, Lq, Dv)
    """
    q, k, v, causal, eps = _validate(q, k, v, feature_map, causal, eps)
    return _forward(q, k, v, feature_map, causal, eps)[0]


def linear_attention_backward(d_out, q, k, v, *, feature_map="elu+1", causal=False, eps=1e-6):
    """Gradients of :func:`linear_attention`: ``dq, dk, dv = ∂/∂(q, k, v) of Σ d_out · out``.

    Axes as :func:`linear_attention`; the causal backward runs the prefix sums in reverse.

    Parameters
    ----------
    d_out : array_like, shape (..., Hq, Lq, Dv)
        Cotangent of ``out``: exactly its shape, finite.
    q, k, v : array_like
        As :func:`linear_attention`: ``(..., Hq, Lq, D)``, ``(..., Hk, Lk, D)``, ``(..., Hk, Lk, Dv)``.
    feature_map, causal, eps
        The forward's options, as :func:`linear_attention` (same defaults).

    Returns
    -------
    LinearAttentionGrads
        ``(dq, dk, dv)``, float64, each of its input's shape.
    """
    q, k, v, causal, eps = _validate(q, k, v, feature_map, causal, eps)
    out, (a, da, b, db, ve, s, z, den, g) = _forward(q, k, v, feature_map, causal, eps)
    d_o = as_cotangent(d_out, out.shape, "d_out")  # (..., Hq, Lq, Dv)
    # out = num / den
    dnum = d_o / den[..., None]  # (..., Hq, Lq, Dv)
    dden = -np.einsum("...ie,...ie->...i", d_o, out) / den  # (..., Hq, Lq)
    # num_i = a_iᵀ S_i, den_i = a_iᵀ z_i + eps
    d_a = np.einsum("...ide,...ie->...id", s, dnum) + z * dden[..., None]  # (..., Hq, Lq, D)
    ds = a[..., :, :, None] * dnum[..., :, None, :]  # (..., Hq, Lq, D, Dv)
    dz = a * dden[..., None]  # (..., Hq, Lq, D)
    # S_i = Σ_{j (<= i)} b_j v_jᵀ, z_i = Σ_{j (<= i)} b_j: key j collects every row i that sums it
    if causal:
        gs = np.flip(prefix_sum(np.flip(ds, -3), -3), -3)  # (..., Hq, L, D, Dv) Σ_{i >= j}
        gz = np.flip(prefix_sum(np.flip(dz, -2), -2), -2)  # (..., Hq, L, D)
    else:
        gs, gz = ds.sum(axis=-3, keepdims=True), dz.sum(axis=-2, keepdims=True)
    d_b = np.einsum("...jde,...je->...jd", np.broadcast_to(gs, b.shape + (ve.shape[-1],)), ve) + gz
    dve = np.einsum("...jde,...jd->...je", np.broadcast_to(gs, b.shape + (ve.shape[-1],)), b)
    # a = φ(q), b = φ(k̃)
    dq = unbroadcast(d_a * da, q.shape)
    dk = unbroadcast(reduce_kv(d_b * db, g), k.shape)
    dv = unbroadcast(reduce_kv(dve, g), v.shape)
    return LinearAttentionGrads(dq, dk, dv)


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
