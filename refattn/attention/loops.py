"""The same math as :mod:`refattn.attention.sdpa`, as explicit per-element loops.

Slow and obviously right: one Python loop per (batch, head, query, key), the
scores, masks, softcap, sinks, dropout and empty-row policy written out one
scalar at a time with ``math.exp``/``math.tanh``.  It shares only argument
validation with the vectorised path, so the two check each other.
"""

from __future__ import annotations

import math

import numpy as np

from refattn._validate import RefAttnError, as_flag
from refattn.attention.sdpa import validate

__all__ = ["sdpa"]


def _allowed(i, j, lq, lk, causal, window, align):
    """Whether query i may attend key j under causal/window (scalar rule)."""
    if not causal and window is None:
        return True
    if lq != lk and align is None:
        raise RefAttnError("align: ambiguous alignment with lq != lk")
    o = lk - lq if align == "bottom_right" else 0
    if causal and j > i + o:
        return False
    if window is not None:
        left, right = window
        if left is not None and j < i + o - left:
            return False
        if right is not None and j > i + o + right:
            return False
    return True


def sdpa(q, k, v, *, mask=None, bias=None, causal=False, window=None, align=None, scale=None,
         softcap=None, sinks=None, dropout_p=0.0, dropout_mask=None, empty_rows="zero", return_lse=False):
    """Loop version of :func:`refattn.sdpa`: same arguments, same results."""
    return_lse = as_flag(return_lse, "return_lse")
    a = validate(q, k, v, mask=mask, bias=bias, causal=causal, window=window, align=align, scale=scale,
                 softcap=softcap, sinks=sinks, dropout_p=dropout_p, dropout_mask=dropout_mask, empty_rows=empty_rows)
    batch = a.score_shape[:-3]
    hq, lq, lk = a.score_shape[-3:]
    hk, d, dv = a.k.shape[-3], a.q.shape[-1], a.v.shape[-1]
    group = hq // hk
    user_mask = None if mask is None else np.broadcast_to(np.asarray(mask), a.score_shape)
    bias_b = None if a.bias is None else np.broadcast_to(a.bias, a.score_shape)
    keep = None if dropout_mask is None else np.broadcast_to(np.asarray(dropout_mask), a.score_shape)
    sink_b = None if a.sinks is None else np.broadcast_to(a.sinks, batch + (hq,))
    qb = np.broadcast_to(a.q, batch + a.q.shape[-3:])
    kb = np.broadcast_to(a.k, batch + a.k.shape[-3:])
    vb = np.broadcast_to(a.v, batch + a.v.shape[-3:])
    out = np.zeros(batch + (hq, lq, dv))
    lse = np.zeros(batch + (hq, lq))
    for b in np.ndindex(*batch):
        for h in range(hq):
            kvh = h // group
            for i in range(lq):
                scores = []
                for j in range(lk):
                    s = 0.0
                    for c in range(d):
                        s += qb[b + (h, i, c)] * kb[b + (kvh, j, c)]
                    s *= a.scale
                    if a.softcap is not None:
                        s = a.softcap * math.tanh(s / a.softcap)
                    if bias_b is not None:
                        s += bias_b[b + (h, i, j)]
                    ok = _allowed(i, j, lq, lk, causal, window, align)
                    if user_mask is not None and not user_mask[b + (h, i, j)]:
                        ok = False
                    scores.append(s if ok else -math.inf)
                sink = -math.inf if sink_b is None else float(sink_b[b + (h,)])
                m = max(scores + [sink])
                if m == -math.inf:  # empty row
                    lse[b + (h, i)] = -math.inf
                    if empty_rows == "zero":
                        continue
                    if empty_rows == "nan":
                        out[b + (h, i)] = math.nan
                        continue
                    weights = [1.0 / lk] * lk
                else:
                    exps = [math.exp(s - m) for s in scores]
                    total = sum(exps) + math.exp(sink - m)
                    lse[b + (h, i)] = m + math.log(total)
                    weights = [e / total for e in exps]
                for j in range(lk):
                    w = weights[j]
                    if keep is not None:
                        w = w * keep[b + (h, i, j)] / (1.0 - dropout_p)
                    for c in range(dv):
                        out[b + (h, i, c)] += w * vb[b + (kvh, j, c)]
    return (out, lse) if return_lse else out
