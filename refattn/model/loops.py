"""The language model of :mod:`refattn.model.lm` as explicit Python loops, forward and backward.

Didactic and slow: one loop per batch row ``b``, position ``t``, head ``h`` and feature, every
scalar written out with :mod:`math` (``math.exp``, ``math.erf``, ``math.tanh``).  It shares only
argument validation with :mod:`refattn.model.lm` (:func:`refattn.model.lm.validate`), so the two
check each other: ``tests/model/test_loops.py`` holds their logits and every gradient within 1e-12.
Sizes: a handful of tokens, a width of a few features.

Axes as :mod:`refattn.model.lm`: ``B`` batch, ``T`` positions, ``V`` vocabulary, ``E`` width,
``H``/``Hk`` query/kv heads, ``dk = E / H``, ``F`` MLP width, ``L`` layers.  The backward of each
step follows its forward line in reverse order; the derivations are in ``specs/model.md``.
"""

from __future__ import annotations

import math

import numpy as np

from refattn._validate import as_cotangent, as_flag, check_keywords_of
from refattn.attention.multihead import MHAParams
from refattn.model import lm as _lm
from refattn.model.layers import MLPParams
from refattn.model.params import BlockParams, LMParams, NormParams

__all__ = ["lm_backward_loops", "lm_forward_loops"]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_C = 0.044715


# ---- scalar functions and their derivatives -------------------------------------------------------


def _act(z, kind):
    """One scalar through the activation (``gelu``, ``gelu_tanh``, ``relu``, ``silu``)."""
    if kind == "gelu":
        return 0.5 * z * (1.0 + math.erf(z / math.sqrt(2.0)))
    if kind == "gelu_tanh":
        return 0.5 * z * (1.0 + math.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_C * z**3)))
    if kind == "relu":
        return z if z > 0.0 else 0.0
    return z / (1.0 + math.exp(-z))  # silu


def _act_prime(z, kind):
    """The activation's derivative at the scalar ``z``."""
    if kind == "gelu":  # Φ(z) + z φ(z)
        return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0))) + z * math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    if kind == "gelu_tanh":
        u = math.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_C * z**3))
        return 0.5 * (1.0 + u) + 0.5 * z * (1.0 - u * u) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * z * z)
    if kind == "relu":
        return 1.0 if z > 0.0 else 0.0
    s = 1.0 / (1.0 + math.exp(-z))  # silu: s (1 + z (1 − s))
    return s * (1.0 + z * (1.0 - s))


def _slopes(n_heads):
    """ALiBi's head slopes (Press et al.'s reference): ``2^(−8i/m)`` for the largest power of two
    ``m <= H``, then every other slope of ``2m``."""
    m = 1
    while 2 * m <= n_heads:
        m *= 2
    slopes = [2.0 ** (-8.0 * i / m) for i in range(1, m + 1)]
    extra = [2.0 ** (-8.0 * i / (2 * m)) for i in range(1, 2 * m + 1)][0::2]
    return slopes + extra[: n_heads - m]


# ---- layers, one scalar at a time -----------------------------------------------------------------


def _linear(x, w, b):
    """``y[b, t, o] = Σ_i x[b, t, i] w[i, o] + bias[o]``: ``(B, T, I)`` → ``(B, T, O)``."""
    nb, nt, ni = x.shape
    no = w.shape[1]
    y = np.zeros((nb, nt, no))
    for bi in range(nb):
        for t in range(nt):
            for o in range(no):
                acc = 0.0 if b is None else b[o]
                for i in range(ni):
                    acc += x[bi, t, i] * w[i, o]
                y[bi, t, o] = acc
    return y


def _linear_backward(dy, x, w, b):
    """``(dx, dw, db)``: ``dx[b,t,i] = Σ_o dy w[i,o]``, ``dw[i,o] = Σ_{b,t} x dy``, ``db[o] = Σ_{b,t} dy``."""
    nb, nt, ni = x.shape
    no = w.shape[1]
    dx, dw = np.zeros(x.shape), np.zeros(w.shape)
    db = None if b is None else np.zeros(no)
    for bi in range(nb):
        for t in range(nt):
            for o in range(no):
                g = dy[bi, t, o]
                if db is not None:
                    db[o] += g
                for i in range(ni):
                    dx[bi, t, i] += g * w[i, o]
                    dw[i, o] += g * x[bi, t, i]
    return dx, dw, db


def _norm(x, p, config):
    """LayerNorm ``(x − μ) / sqrt(σ² + eps) · w + b`` (biased σ²) or RMSNorm ``x / sqrt(mean x² + eps) · w``
    over the last axis, row by row."""
    nb, nt, ne = x.shape
    y = np.zeros(x.shape)
    for bi in range(nb):
        for t in range(nt):
            row = [x[bi, t, e] for e in range(ne)]
            if config.norm == "layer":
                mu = sum(row) / ne
                var = sum((v - mu) ** 2 for v in row) / ne
                r = math.sqrt(var + config.norm_eps)
                for e in range(ne):
                    y[bi, t, e] = (row[e] - mu) / r * p.weight[e] + (0.0 if p.bias is None else p.bias[e])
            else:
                r = math.sqrt(sum(v * v for v in row) / ne + config.norm_eps)
                for e in range(ne):
                    y[bi, t, e] = row[e] / r * p.weight[e]
    return y


def _norm_backward(dy, x, p, config):
    """``(dx, NormParams of grads)``.  LayerNorm, with ``x̂ = (x − μ)/r`` and ``g = dy · w``:
    ``dx = (g − mean(g) − x̂ · mean(g x̂)) / r``; RMSNorm: ``dx = g / r − x · Σ(g x) / (E r³)``."""
    nb, nt, ne = x.shape
    dx, dw = np.zeros(x.shape), np.zeros(ne)
    db = np.zeros(ne) if (config.norm == "layer" and p.bias is not None) else None
    for bi in range(nb):
        for t in range(nt):
            row = [x[bi, t, e] for e in range(ne)]
            g = [dy[bi, t, e] * p.weight[e] for e in range(ne)]
            if config.norm == "layer":
                mu = sum(row) / ne
                r = math.sqrt(sum((v - mu) ** 2 for v in row) / ne + config.norm_eps)
                xh = [(v - mu) / r for v in row]
                mean_g = sum(g) / ne
                mean_gx = sum(gi * xi for gi, xi in zip(g, xh)) / ne
                for e in range(ne):
                    dx[bi, t, e] = (g[e] - mean_g - xh[e] * mean_gx) / r
                    dw[e] += dy[bi, t, e] * xh[e]
                    if db is not None:
                        db[e] += dy[bi, t, e]
            else:
                r = math.sqrt(sum(v * v for v in row) / ne + config.norm_eps)
                gx = sum(gi * xi for gi, xi in zip(g, row))
                for e in range(ne):
                    dx[bi, t, e] = g[e] / r - row[e] * gx / (ne * r**3)
                    dw[e] += dy[bi, t, e] * row[e] / r
    return dx, NormParams(dw, db)


def _mlp(x, p, activation):
    """``h = act(x w_in + b_in)`` (swiglu: ``silu(x w_gate) · (x w_in + b_in)``), ``out = h w_out + b_out``;
    returns ``(out, (u, gate, h))`` with the pre-activations."""
    u = _linear(x, p.w_in, p.b_in)  # (B, T, F)
    gate = _linear(x, p.w_gate, None) if activation == "swiglu" else None
    h = np.zeros(u.shape)
    for idx in np.ndindex(*u.shape):
        h[idx] = _act(gate[idx], "silu") * u[idx] if gate is not None else _act(u[idx], activation)
    return _linear(h, p.w_out, p.b_out), (u, gate, h)


def _mlp_backward(dy, x, p, activation):
    """``(dx, MLPParams of grads)`` of :func:`_mlp`."""
    _, (u, gate, h) = _mlp(x, p, activation)
    # out = h w_out + b_out
    dh, dw_out, db_out = _linear_backward(dy, h, p.w_out, p.b_out)
    du = np.zeros(u.shape)
    dgate = None if gate is None else np.zeros(u.shape)
    for idx in np.ndindex(*u.shape):
        if gate is None:  # h = act(u)
            du[idx] = dh[idx] * _act_prime(u[idx], activation)
        else:  # h = silu(gate) · u
            du[idx] = dh[idx] * _act(gate[idx], "silu")
            dgate[idx] = dh[idx] * u[idx] * _act_prime(gate[idx], "silu")
    # u = x w_in + b_in, gate = x w_gate
    dx, dw_in, db_in = _linear_backward(du, x, p.w_in, p.b_in)
    dw_gate = None
    if gate is not None:
        dxg, dw_gate, _ = _linear_backward(dgate, x, p.w_gate, None)
        dx = dx + dxg
    return dx, MLPParams(dw_in, db_in, dw_out, db_out, dw_gate)


def _rope(x, config, inverse=False):
    """Rotate each head's pairs ``(e, e + dk/2)`` at position t by ``θ = t · base^(−2e/dk)``
    (``inverse``: by ``−θ``, the backward): ``x (B, H, T, dk)``."""
    nb, nh, nt, dk = x.shape
    half = dk // 2
    y = np.array(x, copy=True)
    sign = -1.0 if inverse else 1.0
    for bi in range(nb):
        for h in range(nh):
            for t in range(nt):
                for e in range(half):
                    theta = t * config.rope_base ** (-(2.0 * e) / dk)
                    c, s = math.cos(theta), sign * math.sin(theta)
                    x1, x2 = x[bi, h, t, e], x[bi, h, t, e + half]
                    y[bi, h, t, e] = x1 * c - x2 * s
                    y[bi, h, t, e + half] = x2 * c + x1 * s
    return y


def _split(t, heads):
    """``(B, T, heads·e)`` → ``(B, heads, T, e)``: head h takes columns ``[h·e, (h+1)·e)``."""
    nb, nt, n = t.shape
    e = n // heads
    out = np.zeros((nb, heads, nt, e))
    for bi in range(nb):
        for h in range(heads):
            for i in range(nt):
                for c in range(e):
                    out[bi, h, i, c] = t[bi, i, h * e + c]
    return out


def _merge(t):
    """``(B, heads, T, e)`` → ``(B, T, heads·e)``."""
    nb, heads, nt, e = t.shape
    out = np.zeros((nb, nt, heads * e))
    for bi in range(nb):
        for h in range(heads):
            for i in range(nt):
                for c in range(e):
                    out[bi, i, h * e + c] = t[bi, h, i, c]
    return out


def _allowed(a, bi, i, j):
    """Whether query i of row b may attend key j: causal, and the key a real token."""
    if a.config.causal and j > i:
        return False
    return a.mask is None or bool(a.mask[bi, j])


def _probabilities(q, k, a):
    """``P[b, h, i, j] = softmax_j(q_i · k_j / sqrt(dk) + alibi)`` over the allowed keys (0 elsewhere;
    a row with no allowed key is 0): ``q (B, H, T, dk)``, ``k (B, Hk, T, dk)`` → ``(B, H, T, T)``."""
    nb, nh, nt, dk = q.shape
    group = nh // k.shape[1]
    slopes = _slopes(nh) if a.config.positions == "alibi" else None
    p = np.zeros((nb, nh, nt, nt))
    for bi in range(nb):
        for h in range(nh):
            g = h // group  # the kv head of query head h
            for i in range(nt):
                s = {}
                for j in range(nt):
                    if not _allowed(a, bi, i, j):
                        continue
                    s[j] = sum(q[bi, h, i, c] * k[bi, g, j, c] for c in range(dk)) / math.sqrt(dk)
                    if slopes is not None:
                        s[j] -= slopes[h] * abs(i - j)
                if not s:
                    continue  # an empty row: output 0
                top = max(s.values())
                z = sum(math.exp(v - top) for v in s.values())
                for j, v in s.items():
                    p[bi, h, i, j] = math.exp(v - top) / z
    return p


def _heads(x, p, config):
    q = _split(_linear(x, p.w_q, p.b_q), config.n_heads)  # (B, H, T, dk)
    k = _split(_linear(x, p.w_k, p.b_k), config.n_kv_heads)  # (B, Hk, T, dk)
    v = _split(_linear(x, p.w_v, p.b_v), config.n_kv_heads)
    if config.positions == "rope":
        q, k = _rope(q, config), _rope(k, config)
    return q, k, v


def _attention(x, p, a, layer):
    """``(y, P)``: ``o[b,h,i] = Σ_j P[b,h,i,j] v[b,g,j]``, gated by ``head_mask[layer, h]``,
    merged and projected by ``w_o``."""
    c = a.config
    q, k, v = _heads(x, p, c)
    pr = _probabilities(q, k, a)
    nb, nh, nt, dk = q.shape
    group = nh // c.n_kv_heads
    o = np.zeros(q.shape)
    for bi in range(nb):
        for h in range(nh):
            gate = 1.0 if a.head_mask is None else a.head_mask[layer, h]
            for i in range(nt):
                for e in range(dk):
                    o[bi, h, i, e] = gate * sum(pr[bi, h, i, j] * v[bi, h // group, j, e] for j in range(nt))
    return _linear(_merge(o), p.w_o, p.b_o), pr


def _attention_backward(dy, x, p, a, layer):
    """``(dx, MHAParams of grads, dhead_mask row (H,))`` of :func:`_attention`."""
    c = a.config
    q, k, v = _heads(x, p, c)  # q, k after RoPE
    pr = _probabilities(q, k, a)
    nb, nh, nt, dk = q.shape
    group = nh // c.n_kv_heads
    o = np.zeros(q.shape)  # before the head gate
    for bi in range(nb):
        for h in range(nh):
            for i in range(nt):
                for e in range(dk):
                    o[bi, h, i, e] = sum(pr[bi, h, i, j] * v[bi, h // group, j, e] for j in range(nt))
    gates = [1.0 if a.head_mask is None else a.head_mask[layer, h] for h in range(nh)]
    og = np.zeros(o.shape)
    for bi, h, i, e in np.ndindex(*o.shape):
        og[bi, h, i, e] = gates[h] * o[bi, h, i, e]
    # y = merge(og) w_o + b_o
    dmerged, dw_o, db_o = _linear_backward(dy, _merge(og), p.w_o, p.b_o)
    dog = _split(dmerged, nh)
    # og = gate_h · o: dgate_h = Σ dog · o, do = gate_h · dog
    dhm = np.zeros(nh)
    do = np.zeros(o.shape)
    for bi, h, i, e in np.ndindex(*o.shape):
        dhm[h] += dog[bi, h, i, e] * o[bi, h, i, e]
        do[bi, h, i, e] = gates[h] * dog[bi, h, i, e]
    # o_i = Σ_j P_ij v_j: dP_ij = do_i · v_j, dv_j += P_ij do_i
    # P = softmax(s): ds_ij = P_ij (dP_ij − Σ_l P_il dP_il);  s_ij = q_i · k_j / sqrt(dk) (+ alibi)
    dq, dk_, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for bi in range(nb):
        for h in range(nh):
            g = h // group
            for i in range(nt):
                dp = [sum(do[bi, h, i, e] * v[bi, g, j, e] for e in range(dk)) for j in range(nt)]
                row = sum(pr[bi, h, i, j] * dp[j] for j in range(nt))
                for j in range(nt):
                    for e in range(dk):
                        dv[bi, g, j, e] += pr[bi, h, i, j] * do[bi, h, i, e]
                    ds = pr[bi, h, i, j] * (dp[j] - row) / math.sqrt(dk)
                    for e in range(dk):
                        dq[bi, h, i, e] += ds * k[bi, g, j, e]
                        dk_[bi, g, j, e] += ds * q[bi, h, i, e]
    if c.positions == "rope":  # q = R q0: dq0 = Rᵀ dq
        dq, dk_ = _rope(dq, c, inverse=True), _rope(dk_, c, inverse=True)
    # q, k (before RoPE), v = split(x w + b)
    dxq, dw_q, db_q = _linear_backward(_merge(dq), x, p.w_q, p.b_q)
    dxk, dw_k, db_k = _linear_backward(_merge(dk_), x, p.w_k, p.b_k)
    dxv, dw_v, db_v = _linear_backward(_merge(dv), x, p.w_v, p.b_v)
    return dxq + dxk + dxv, MHAParams(dw_q, dw_k, dw_v, dw_o, db_q, db_k, db_v, db_o), dhm


def _add(x, y):
    out = np.zeros(x.shape)
    for idx in np.ndindex(*x.shape):
        out[idx] = x[idx] + y[idx]
    return out


def _block(x, p, a, layer):
    """One block → ``(out, saved, P)``."""
    c = a.config
    if c.norm_position == "pre":
        a_in = _norm(x, p.ln_1, c)
        y, pr = _attention(a_in, p.attn, a, layer)
        h = _add(x, y)  # x + attn(norm_1(x))
        m_in = _norm(h, p.ln_2, c)
        return _add(h, _mlp(m_in, p.mlp, c.activation)[0]), {"x": x, "a_in": a_in, "h": h, "m_in": m_in}, pr
    y, pr = _attention(x, p.attn, a, layer)
    hp = _add(x, y)  # x + attn(x)
    h = _norm(hp, p.ln_1, c)
    op = _add(h, _mlp(h, p.mlp, c.activation)[0])  # h + mlp(h)
    return _norm(op, p.ln_2, c), {"x": x, "hp": hp, "h": h, "op": op}, pr


def _block_backward(dout, s, p, a, layer):
    c = a.config
    if c.norm_position == "pre":
        dm_in, g_mlp = _mlp_backward(dout, s["m_in"], p.mlp, c.activation)
        dh_n, g_ln2 = _norm_backward(dm_in, s["h"], p.ln_2, c)
        dh = _add(dout, dh_n)  # h feeds the residual and norm_2
        da_in, g_attn, dhm = _attention_backward(dh, s["a_in"], p.attn, a, layer)
        dx_n, g_ln1 = _norm_backward(da_in, s["x"], p.ln_1, c)
        return _add(dh, dx_n), BlockParams(g_ln1, g_attn, g_ln2, g_mlp), dhm
    dop, g_ln2 = _norm_backward(dout, s["op"], p.ln_2, c)
    dh_m, g_mlp = _mlp_backward(dop, s["h"], p.mlp, c.activation)
    dh = _add(dop, dh_m)
    dhp, g_ln1 = _norm_backward(dh, s["hp"], p.ln_1, c)
    dx_a, g_attn, dhm = _attention_backward(dhp, s["x"], p.attn, a, layer)
    return _add(dhp, dx_a), BlockParams(g_ln1, g_attn, g_ln2, g_mlp), dhm


def _embed(a):
    """``x[b, t, e] = wte[tokens[b, t], e] + pos[t, e]``: pos from ``wpe``, the sinusoidal table
    ``sin(t / base^(2i/E))`` (even e = 2i) / ``cos`` (odd e), or 0."""
    c, p = a.config, a.params
    nb, nt = a.tokens.shape
    ne = c.d_model
    x = np.zeros((nb, nt, ne))
    for bi in range(nb):
        for t in range(nt):
            for e in range(ne):
                pos = 0.0
                if c.positions == "learned":
                    pos = p.wpe[t, e]
                elif c.positions == "sinusoidal":
                    angle = t * 10000.0 ** (-(2.0 * (e // 2)) / ne)
                    pos = math.sin(angle) if e % 2 == 0 else math.cos(angle)
                x[bi, t, e] = p.wte[a.tokens[bi, t], e] + pos
    return x


def _head(a):
    p = a.params
    return p.wte.T if a.config.tied_embeddings else p.lm_head  # (E, V)


def _forward(a):
    p, c = a.params, a.config
    x = _embed(a)
    saved, maps = [], []
    for layer, bp in enumerate(p.blocks):
        x, s, pr = _block(x, bp, a, layer)
        saved.append(s)
        maps.append(pr)
    xf = x if p.ln_f is None else _norm(x, p.ln_f, c)
    return _linear(xf, _head(a), None), saved, x, xf, maps


def lm_forward_loops(params, tokens, config, *, mask=None, head_mask=None, return_attentions=False):
    """Loop version of :func:`refattn.model.lm.lm_forward`: same arguments, same results (to 1e-12).

    Each line of the model as loops over ``b``, ``t``, heads and features: the embedding lookup
    (plus the learned or sinusoidal positions), per block the norms (mean and variance by sums),
    the q/k/v projections, RoPE's rotations, the scores ``q·k / sqrt(dk)`` (minus ALiBi's
    ``slope_h · |i − j|``) over the allowed keys (causal, real tokens), the softmax by
    ``math.exp`` after the row max, the weighted values, the head gate, ``w_o``, the MLP's
    activation scalar by scalar, the residual adds; then the final norm and the logits.  O(B·T²·E)
    Python steps per layer: for small cases.

    Parameters
    ----------
    params : LMParams
        As :func:`refattn.model.lm.lm_forward`.
    tokens : array_like of int, shape (B, T)
        Token ids in ``[0, V)``.
    config : LMConfig
        The model.
    mask : array_like of bool, shape (B, T), optional
        True = a real token.  Default None.
    head_mask : array_like, shape (L, H), optional
        Per-layer, per-head gates.  Default None.
    return_attentions : bool, default False
        Also return each layer's ``P (B, H, T, T)``.

    Returns
    -------
    logits : ndarray of float64, shape (B, T, V)
    attentions : list of ndarray, each (B, H, T, T)
        Only with ``return_attentions=True``, as ``(logits, attentions)``.
    """
    return_attentions = as_flag(return_attentions, "return_attentions")
    logits, _, _, _, maps = _forward(_lm.validate(params, tokens, config, mask, head_mask))
    return (logits, maps) if return_attentions else logits


def lm_backward_loops(d_logits, params, tokens, config, *, mask=None, head_mask=None):
    """Loop version of :func:`refattn.model.lm.lm_backward`: same arguments, same gradients (to 1e-12).

    The forward's loops, then each line's vector-Jacobian product as loops, last line first: the
    logits' projection, the final norm, per block (last first) the MLP, the norms, the head gate,
    ``dP = do · v``, the softmax's ``ds = P (dP − Σ P dP)``, the scores' ``dq``, ``dk`` (summed over
    a GQA group), RoPE's inverse rotation, the projections; the residual adds send their cotangent
    down both paths; then the embedding lookups scatter-add into ``wte`` and ``wpe``.

    Parameters
    ----------
    d_logits : array_like, shape (B, T, V)
        Cotangent of the logits: exactly their shape, finite.
    params, tokens, config, mask, head_mask
        As :func:`lm_forward_loops`.

    Returns
    -------
    LMGrads
        As :func:`refattn.model.lm.lm_backward`.
    """
    a = _lm.validate(params, tokens, config, mask, head_mask)
    p, c = a.params, a.config
    logits, saved, x_last, xf, _ = _forward(a)
    dl = as_cotangent(d_logits, logits.shape, "d_logits")
    # logits = xf head
    dxf, dhead, _ = _linear_backward(dl, xf, _head(a), None)
    # xf = norm_f(x_last)
    dx, d_ln_f = (dxf, None) if p.ln_f is None else _norm_backward(dxf, x_last, p.ln_f, c)
    d_blocks, dhm = [None] * len(p.blocks), np.zeros((len(p.blocks), c.n_heads))
    for layer in reversed(range(len(p.blocks))):
        dx, d_blocks[layer], dhm[layer] = _block_backward(dx, saved[layer], p.blocks[layer], a, layer)
    # x[b, t] = wte[tokens[b, t]] + wpe[t]: scatter-add
    nb, nt = a.tokens.shape
    dwte = np.zeros(p.wte.shape)
    dwpe = None if p.wpe is None else np.zeros(p.wpe.shape)
    for bi in range(nb):
        for t in range(nt):
            for e in range(c.d_model):
                dwte[a.tokens[bi, t], e] += dx[bi, t, e]
                if dwpe is not None:
                    dwpe[t, e] += dx[bi, t, e]
    dlm_head = None
    if c.tied_embeddings:  # head = wteᵀ
        for e, v in np.ndindex(*dhead.shape):
            dwte[v, e] += dhead[e, v]
    else:
        dlm_head = dhead
    grads = LMParams(dwte, dwpe, tuple(d_blocks), d_ln_f, dlm_head)
    return _lm.LMGrads(grads, None if a.head_mask is None else dhm)


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
