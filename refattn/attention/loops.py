"""The same math as :mod:`refattn.attention.sdpa`, as explicit per-element loops.

Slow and obviously right: one Python loop per (batch, head, query, key), the
scores, masks, softcap, sinks, dropout and empty-row policy written out one
scalar at a time with ``math.exp``/``math.tanh``.  It shares only argument
validation with the vectorised path, so the two check each other.  Axes as
:func:`refattn.sdpa`: ``...`` batch, ``Hq``/``Hk`` query/kv heads, ``Lq``/``Lk`` lengths,
``D``/``Dv`` head dims.
"""

from __future__ import annotations

import math

import numpy as np

from refattn._validate import as_flag, check_keywords_of
from refattn.attention.options import takes_sdpa_options
from refattn.attention.sdpa import validate

__all__ = ["multihead_attention", "sdpa"]


def _allowed(i, j, a, b):
    """Whether query i of batch item ``b`` may attend key j under the structure of validated args ``a``
    (padding, causal, window, sink tokens, chunk), one scalar rule per option."""
    seqs = a.seqs
    ks, kl = int(seqs.k_starts[b]), int(seqs.k_lengths[b])
    jr = j - ks  # the key's position in its sequence
    if jr < 0 or jr >= kl:
        return False  # a padding key
    pos = i + int(seqs.offsets[b])  # the query's position on the key axis
    left, right = a.window
    if a.causal and jr > pos:
        return False
    if right is not None and jr > pos + right:
        return False
    if left is not None and jr < pos - left and jr >= a.sink_tokens:
        return False
    if a.chunk is not None and pos // a.chunk != jr // a.chunk:  # Python ints: floor division
        return False
    return True


_NO_BACKEND = "the loops twin is its own implementation (Python loops), the check on refattn.sdpa's backends"


@takes_sdpa_options(refuses={"backend": _NO_BACKEND}, name="loops.sdpa")
def sdpa(
    q,
    k,
    v,
    *,
    mask=None,
    bias=None,
    causal=False,
    window=None,
    align=None,
    chunk=None,
    sink_tokens=0,
    q_lengths=None,
    k_lengths=None,
    k_starts=None,
    scale=None,
    softcap=None,
    sinks=None,
    dropout_p=0.0,
    dropout_mask=None,
    empty_rows="zero",
    return_lse=False,
):
    """Loop version of :func:`refattn.sdpa`: same arguments but ``backend`` (refused), same results.

    For every batch index, head ``h`` (kv head ``h // (Hq // Hk)``) and query ``i``, one scalar at a
    time: ``s_j = scale · Σ_c q_ic k_jc``, then ``c · tanh(s_j / c)``, ``+ bias_ij``, ``-inf`` where
    the mask, causal or window disallow, ``P_j = exp(s_j − m) / (Σ_j exp(s_j − m) + exp(sink − m))``
    with ``m`` the row max, ``out_i = Σ_j P_j · keep_ij / (1 − dropout_p) · v_j`` — sdpa's order of
    operations (``specs/sdpa.md``), written with ``math.exp``/``math.tanh``.  O(Lq·Lk·D) Python
    steps per head: for small cases.  Each option means what it means for :func:`refattn.sdpa`,
    where it is stated in full.

    Parameters
    ----------
    q : array_like, shape (..., Hq, Lq, D)
        Queries; finite, converted to float64.
    k : array_like, shape (..., Hk, Lk, D)
        Keys; ``Hk`` divides ``Hq`` (GQA); finite.
    v : array_like, shape (..., Hk, Lk, Dv)
        Values; finite.
    mask : array_like of bool, broadcastable to (..., Hq, Lq, Lk), optional
        True = query i may attend key j.  Default None.
    bias : array_like, broadcastable to (..., Hq, Lq, Lk), optional
        Added to the logits after the softcap; may hold ``-inf``.  Default None.
    causal : bool, default False
        Query i attends keys ``j <= i + o`` (``o`` set by ``align``).
    window : int or (int or None, int or None), optional
        ``(left, right)``: keys ``i + o − left <= j' <= i + o + right`` (sides of any sign); None =
        an unbounded side; an int ``w`` is ``(w, w)``.  Default None.
    align : {"top_left", "bottom_right"} or int, optional
        ``o = 0``, ``o = k_length − q_length`` per sequence, or the int ``o``; needed by causal,
        window and chunk when some ``q_length != k_length``.  Default None.
    chunk : int, optional
        ``c >= 1``: keys of the query's chunk only, ``(i + o) // c == j' // c``.  Default None.
    sink_tokens : int, default 0
        Keys ``j' < n`` exempt from the window's left side.
    q_lengths, k_lengths, k_starts : array_like of int, broadcastable to the batch dims, optional
        Each sequence's real queries ``i < q_length`` and keys ``k_start <= j < k_start +
        k_length`` (``j' = j − k_start``); padded query rows give 0 and lse ``-inf``.  Default
        None: every query and key is real.
    scale : float, optional
        Multiplies ``q kᵀ``.  Default None: ``1 / sqrt(D)``.
    softcap : float, optional
        ``c > 0``: logits ``c · tanh(s / c)``.  Default None: no cap.
    sinks : array_like, broadcastable to (..., Hq), optional
        A logit per head in every row's softmax denominator.  Default None.
    dropout_p : float, default 0.0
        Dropout probability in [0, 1); ``> 0`` needs ``dropout_mask``.
    dropout_mask : array_like of bool, broadcastable to (..., Hq, Lq, Lk), optional
        True = keep, kept weights scaled by ``1 / (1 − dropout_p)``.  Default None.
    empty_rows : {"zero", "nan", "uniform"}, default "zero"
        The output of a row with every key disallowed and no finite sink: 0, NaN, or the
        (dropped-out) mean of v over all ``Lk`` keys.
    return_lse : bool, default False
        Also return ``lse``.

    Returns
    -------
    out : ndarray of float64, shape (..., Hq, Lq, Dv)
    lse : ndarray of float64, shape (..., Hq, Lq)
        Only with ``return_lse=True``, as ``(out, lse)``; ``-inf`` on empty rows.
    """
    return_lse = as_flag(return_lse, "return_lse")
    a = validate(
        q,
        k,
        v,
        mask=mask,
        bias=bias,
        causal=causal,
        window=window,
        align=align,
        chunk=chunk,
        sink_tokens=sink_tokens,
        q_lengths=q_lengths,
        k_lengths=k_lengths,
        k_starts=k_starts,
        scale=scale,
        softcap=softcap,
        sinks=sinks,
        dropout_p=dropout_p,
        dropout_mask=dropout_mask,
        empty_rows=empty_rows,
    )
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
                if i >= a.seqs.q_lengths[b]:  # a padded query row: 0, lse -inf, whatever empty_rows says
                    lse[b + (h, i)] = -math.inf
                    continue
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
                    ok = _allowed(i, j, a, b)
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


def _project_loops(t, w, b, heads):
    """``split(t w + b)`` one output element at a time: ``t (B..., L, n)`` → ``(B..., H, L, e)``."""
    lead, length, n = t.shape[:-2], t.shape[-2], t.shape[-1]
    e = w.shape[1] // heads
    out = np.zeros(lead + (heads, length, e))
    for idx in np.ndindex(*lead):
        for h in range(heads):
            for i in range(length):
                for c in range(e):
                    col = h * e + c
                    acc = 0.0 if b is None else float(b[col])
                    for r in range(n):
                        acc += t[idx + (i, r)] * w[r, col]
                    out[idx + (h, i, c)] = acc
    return out


@takes_sdpa_options(
    refuses={"backend": _NO_BACKEND, "return_lse": "the output is y (..., Lq, d_model) alone"},
    name="loops.multihead_attention",
)
def multihead_attention(x, params, *, num_heads, num_kv_heads=None, kv=None, head_mask=None, **options):
    """Loop version of :func:`refattn.multihead_attention`: per head, per query, per key.

    The projections ``split(t w + b)`` and the output projection ``merge(O · head_mask) w_o + b_o``
    are written one output element at a time, the attention is :func:`sdpa` (this module's
    loops).  Axes: ``...`` batch, ``Lq``/``Lk`` lengths, ``d_model``/``d_kv`` model widths,
    ``Hq``/``Hk`` heads.  The options are :func:`refattn.sdpa`'s; ``backend`` and ``return_lse``
    are refused (the loops are their own implementation; the output is ``y`` alone).

    Parameters
    ----------
    x : array_like, shape (..., Lq, d_model)
        The queries' input sequence.
    params : MHAParams
        The projections, as :func:`refattn.multihead_attention`'s.
    num_heads : int
        ``Hq`` >= 1.
    num_kv_heads : int, optional
        ``Hk``, dividing ``Hq``.  Default None: ``Hq``.
    kv : array_like, shape (..., Lk, d_kv), optional
        The keys' and values' input sequence.  Default None: ``x`` (self-attention).
    head_mask : array_like, broadcastable to (..., Hq), optional
        A factor per head on its attention output.  Default None.

    Returns
    -------
    ndarray of float64, shape (..., Lq, d_model)
        ``y``; ``...`` is the broadcast of x's and kv's batch dims.
    """
    from refattn.attention.multihead import check_params, head_counts

    x = np.asarray(x, dtype=np.float64)
    src = x if kv is None else np.asarray(kv, dtype=np.float64)
    hq, hk = head_counts(num_heads, num_kv_heads)
    p, _, dv = check_params(params, x.shape[-1], src.shape[-1], hq, hk)
    batch = np.broadcast_shapes(x.shape[:-2], src.shape[:-2])
    x = np.broadcast_to(x, batch + x.shape[-2:])
    src = np.broadcast_to(src, batch + src.shape[-2:])
    q = _project_loops(x, p.w_q, p.b_q, hq)
    k = _project_loops(src, p.w_k, p.b_k, hk)
    v = _project_loops(src, p.w_v, p.b_v, hk)
    o = sdpa(q, k, v, **options)  # (B..., Hq, Lq, dv), loops
    gate = None if head_mask is None else np.broadcast_to(np.asarray(head_mask, dtype=np.float64), batch + (hq,))
    lq, d_model = x.shape[-2], p.w_o.shape[1]
    y = np.zeros(batch + (lq, d_model))
    for idx in np.ndindex(*batch):
        for i in range(lq):
            for c in range(d_model):
                acc = 0.0 if p.b_o is None else float(p.b_o[c])
                for h in range(hq):
                    g = 1.0 if gate is None else gate[idx + (h,)]
                    for e in range(dv):
                        acc += g * o[idx + (h, i, e)] * p.w_o[h * dv + e, c]
                y[idx + (i, c)] = acc
    return y


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
