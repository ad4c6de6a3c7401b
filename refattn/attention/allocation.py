"""Attention with a dynamic allocation gate, and its backward.

A per-query gate ``g_i ∈ (0, 1)`` scales query i's scores before everything else::

    g_i  = sigmoid(relu(q_i W1 + b1) · w2 + b2)           (..., Hq, Lq)
    s0_ij = g_i · scale · q_i·k_j                           then sdpa's steps 2-7

``gate = AllocationGate(w1 (D, G), b1 (G,), w2 (G,), b2 ())``; other options as sdpa.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refattn._validate import RefAttnError, as_cotangent, as_flag, as_float, sum_outer, unbroadcast
from refattn.attention import sdpa as _sdpa

__all__ = ["AllocationGate", "AllocationGrads", "allocation_attention", "allocation_attention_backward"]


class AllocationGate(NamedTuple):
    """Gate MLP parameters: ``w1 (D, G)``, ``b1 (G,)``, ``w2 (G,)``, ``b2 ()``."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray


class AllocationGrads(NamedTuple):
    dq: np.ndarray
    dk: np.ndarray
    dv: np.ndarray
    dgate: AllocationGate
    dbias: np.ndarray | None
    dsinks: np.ndarray | None


def _gate(gate, d):
    if not isinstance(gate, tuple) or len(gate) != 4:
        raise RefAttnError(f"gate: expected AllocationGate(w1, b1, w2, b2), got {type(gate).__name__}")
    w1, b1, w2, b2 = (as_float(x, f"gate.{n}") for x, n in zip(gate, AllocationGate._fields))
    hidden = w1.shape[-1] if w1.ndim == 2 else -1
    expected = {"w1": (d, hidden), "b1": (hidden,), "w2": (hidden,), "b2": ()}
    for name, x in zip(AllocationGate._fields, (w1, b1, w2, b2)):
        if x.shape != expected[name] or hidden < 1:
            raise RefAttnError(f"gate.{name}: expected shape {expected[name]} (w1 (D={d}, G)), got {x.shape}")
    return AllocationGate(w1, b1, w2, b2)


def _setup(q, k, v, gate, options):
    a = _sdpa.validate(q, k, v, **options)
    gt = _gate(gate, a.q.shape[-1])
    z1 = a.q @ gt.w1 + gt.b1  # (..., Hq, Lq, G)
    h = np.maximum(z1, 0.0)
    g = 1.0 / (1.0 + np.exp(-(h @ gt.w2 + gt.b2)))  # (..., Hq, Lq)
    raw, ke = _sdpa.qk_scores(a)  # (..., Hq, Lq, Lk)
    f = _sdpa.forward_scores(a, g[..., None] * raw, ke)
    return a, gt, z1, h, g, raw, f


def allocation_attention(q, k, v, gate, *, return_lse=False, **options):
    """Gated attention ``out (..., Hq, Lq, Dv)`` [, ``lse``]; ``options`` as :func:`refattn.sdpa`."""
    return_lse = as_flag(return_lse, "return_lse")
    a, _, _, _, _, _, f = _setup(q, k, v, gate, options)
    pd = f.p if a.keep_scale is None else f.p * a.keep_scale
    out = pd @ _sdpa.expand_kv(a.v, a.groups)
    return (out, f.lse.copy()) if return_lse else out


def allocation_attention_backward(d_out, q, k, v, gate, *, d_lse=None, **options):
    """Gradients of :func:`allocation_attention` → :class:`AllocationGrads`."""
    a, gt, z1, h, g, raw, f = _setup(q, k, v, gate, options)
    d_o = as_cotangent(d_out, a.score_shape[:-1] + (a.v.shape[-1],), "d_out")
    dl = None if d_lse is None else as_cotangent(d_lse, a.score_shape[:-1], "d_lse")
    dp, dve, _ = _sdpa.backward_values(a, f, d_o, _sdpa.expand_kv(a.v, a.groups))
    ds0, dbias, dsinks = _sdpa.backward_logits(a, f, dp, dl)
    # s0 = g · raw, raw = scale q k̃ᵀ
    dq, dk = _sdpa.backward_qk(a, f.ke, g[..., None] * ds0)
    dg = np.einsum("...ij,...ij->...i", ds0, raw)  # (..., Hq, Lq)
    # g = sigmoid(z2), z2 = h w2 + b2
    dz2 = dg * g * (1.0 - g)
    dw2 = sum_outer(dz2[..., None], h)[0]  # (G,)
    db2 = np.asarray(dz2.sum())
    # h = relu(z1), z1 = q W1 + b1
    dz1 = (dz2[..., None] * gt.w2) * (z1 > 0)  # (..., Hq, Lq, G)
    dw1 = sum_outer(a.q, dz1)  # (D, G)
    db1 = dz1.reshape(-1, dz1.shape[-1]).sum(axis=0)
    dq = dq + unbroadcast(dz1 @ gt.w1.T, a.q.shape)
    dv = unbroadcast(_sdpa.reduce_kv(dve, a.groups), a.v.shape)
    return AllocationGrads(dq, dk, dv, AllocationGate(dw1, db1, dw2, db2), dbias, dsinks)
