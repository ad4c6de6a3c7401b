"""Attention with a dynamic allocation gate, and its backward.

A per-query gate ``g_i ∈ (0, 1)`` scales query i's scores before everything else::

    g_i  = sigmoid(relu(q_i W1 + b1) · w2 + b2)           (..., Hq, Lq)
    s0_ij = g_i · scale · q_i·k_j                           then sdpa's steps 2-7

``gate = AllocationGate(w1 (D, G), b1 (G,), w2 (G,), b2 ())`` (also a 4-tuple or a mapping, with
``w2 (G, 1)``/``b2 (1,)`` accepted; gradients come back in the layout given); options as sdpa.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from refattn._validate import RefAttnError, as_cotangent, as_flag, as_float, sum_outer, unbroadcast
from refattn.attention import sdpa as _sdpa
from refattn.attention.options import BACKWARD_RETURN_LSE, takes_sdpa_options

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
    """Validated gate in the canonical layout, and a function restoring the caller's layout.

    Accepts an ``AllocationGate``, any 4-tuple ``(W1, b1, W2, b2)`` or a mapping with those keys
    (any case); ``W2`` may be ``(G,)`` or ``(G, 1)`` and ``b2`` ``()`` or ``(1,)``.
    """
    if isinstance(gate, Mapping):
        lower = {str(k).lower(): v for k, v in gate.items()}
        missing = [n for n in AllocationGate._fields if n not in lower]
        if missing:
            raise RefAttnError(f"gate: expected keys w1, b1, w2, b2, missing {missing}")
        gate = tuple(lower[n] for n in AllocationGate._fields)
    if not isinstance(gate, tuple) or len(gate) != 4:
        raise RefAttnError(f"gate: expected AllocationGate(w1, b1, w2, b2), got {type(gate).__name__}")
    raw = [as_float(x, f"gate.{n}") for x, n in zip(gate, AllocationGate._fields)]
    shapes = [x.shape for x in raw]
    w1, b1, w2, b2 = raw
    hidden = w1.shape[-1] if w1.ndim == 2 else -1
    w2 = w2.reshape(-1) if w2.shape == (hidden, 1) else w2
    b2 = b2.reshape(()) if b2.shape == (1,) else b2
    expected = {"w1": (d, hidden), "b1": (hidden,), "w2": (hidden,), "b2": ()}
    for name, x in zip(AllocationGate._fields, (w1, b1, w2, b2)):
        if x.shape != expected[name] or hidden < 1:
            raise RefAttnError(f"gate.{name}: expected shape {expected[name]} (w1 (D={d}, G)), got {x.shape}")

    def restore(grads):
        return AllocationGate(*(np.reshape(g, shape) for g, shape in zip(grads, shapes)))

    return AllocationGate(w1, b1, w2, b2), restore


def _setup(q, k, v, gate, options):
    a = _sdpa.validate(q, k, v, **options)
    gt, restore = _gate(gate, a.q.shape[-1])
    z1 = a.q @ gt.w1 + gt.b1  # (..., Hq, Lq, G)
    h = np.maximum(z1, 0.0)
    g = 1.0 / (1.0 + np.exp(-(h @ gt.w2 + gt.b2)))  # (..., Hq, Lq)
    raw, ke = _sdpa.qk_scores(a)  # (..., Hq, Lq, Lk)
    f = _sdpa.forward_scores(a, g[..., None] * raw, ke)
    return a, gt, restore, z1, h, g, raw, f


_NO_BACKEND = "allocation_attention builds its gated scores in NumPy; it has no kernel"


@takes_sdpa_options(refuses={"backend": _NO_BACKEND})
def allocation_attention(q, k, v, gate, *, return_lse=False, **options):
    """Gated attention ``out (..., Hq, Lq, Dv)`` [, ``lse``]; ``options`` as :func:`refattn.sdpa` but
    ``backend`` (refused: NumPy only)."""
    return_lse = as_flag(return_lse, "return_lse")
    a, *_, f = _setup(q, k, v, gate, options)
    pd = f.p if a.keep_scale is None else f.p * a.keep_scale
    out = pd @ _sdpa.expand_kv(a.v, a.groups)
    return (out, f.lse.copy()) if return_lse else out


@takes_sdpa_options(refuses={"backend": _NO_BACKEND, "return_lse": BACKWARD_RETURN_LSE})
def allocation_attention_backward(d_out, q, k, v, gate, *, d_lse=None, **options):
    """Gradients of :func:`allocation_attention` → :class:`AllocationGrads`; options as the forward's
    (``backend`` and ``return_lse`` refused)."""
    a, gt, restore, z1, h, g, raw, f = _setup(q, k, v, gate, options)
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
    return AllocationGrads(dq, dk, dv, restore((dw1, db1, dw2, db2)), dbias, dsinks)
