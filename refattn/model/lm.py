"""The decoder-only transformer language model in float64, and its hand-derived backward.

Axes: ``B`` batch, ``T`` positions, ``V`` vocabulary, ``E`` model width, ``H``/``Hk`` query and
key/value heads, ``dk = E / H`` the head dim, ``F`` the MLP width, ``L`` layers.  The model
(``specs/model.md``, "The language model")::

    x = wte[tokens] (+ wpe[:T] | + sinusoidal(T, E))                       (B, T, E)
    per block, pre-norm:   x = x + attn(norm_1(x));   x = x + mlp(norm_2(x))
               post-norm:  x = norm_1(x + attn(x));   x = norm_2(x + mlp(x))
    logits = norm_f(x) wteᵀ  (tied)  |  norm_f(x) lm_head;   no norm_f after post-norm blocks

``attn`` is :func:`refattn.multihead_attention`'s lines around one :func:`refattn.sdpa` call (RoPE:
each head's q and k rotated by :func:`refattn.rope` first), causal when ``config.causal``; ALiBi
is :func:`refattn.alibi_bias` passed as sdpa's ``bias``; ``mask`` (real tokens) is sdpa's key mask
``mask[:, None, None, :]``; ``head_mask[l, h]`` multiplies head h's output in layer l before
``w_o``.  The norms, the MLP and the projections are :mod:`refattn.model.layers`' formulas, written
here so that the forward keeps what the backward needs (each norm's x̂ and r, the MLP's
pre-activation and hidden layer, sdpa's ``(out, lse)``): :func:`lm_backward` undoes the lines from
the last to the first on those saved values, with :func:`refattn.sdpa_backward` (``saved=``) and
:func:`refattn.rope_backward`, recomputing nothing: no autograd, no finite differences.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import special

from refattn._validate import (
    RefAttnError,
    RefAttnTypeError,
    as_bool,
    as_cotangent,
    as_flag,
    as_float,
    check_keywords_of,
    to_numpy,
)
from refattn.attention import multihead as _mh
from refattn.attention import position as _position
from refattn.attention import sdpa as _sdpa
from refattn.model import layers as _layers
from refattn.model.config import LMConfig
from refattn.model.layers import MLPParams
from refattn.model.params import BlockParams, LMParams, NormParams, param_shapes

__all__ = ["LMGrads", "lm_backward", "lm_forward", "lm_loss_and_grads"]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715  # the tanh form's cubic coefficient (torch's constant, as refattn.model.layers)


class LMGrads(NamedTuple):
    """Gradients of :func:`lm_forward` (returned by :func:`lm_backward`), float64.

    Fields
    ------
    dparams : LMParams
        A tree of the parameters' structure: each gradient of its parameter's shape, None where the
        parameter is None (``dwpe`` is zero past row T).  Its fields are also read directly:
        ``grads.wte`` is ``grads.dparams.wte``.
    dhead_mask : ndarray, shape (L, H), or None
        The gradient of ``head_mask`` (Michel et al.'s head importance when taken at ones); None
        without a head mask.
    """

    dparams: LMParams
    dhead_mask: np.ndarray | None

    def __getattr__(self, name):
        """The fields of ``dparams`` read directly (``grads.wte`` is ``grads.dparams.wte``): the
        gradients have the parameters' structure."""
        if name.startswith("_") or name not in LMParams._fields:
            raise AttributeError(name)
        return getattr(self.dparams, name)


class Inputs(NamedTuple):
    """The validated arguments of one model call (shared with :mod:`refattn.model.loops`)."""

    params: LMParams  # float64 (no copy of a float64 leaf: only read), every shape checked against the config
    tokens: np.ndarray  # (B, T) int64
    config: LMConfig
    mask: np.ndarray | None  # (B, T) bool, True = a real token
    head_mask: np.ndarray | None  # (L, H) float64


def _leaf(x, shape, name):
    if shape is None:
        if x is not None:
            raise RefAttnError(f"{name}: expected None (this config has no such parameter), got {type(x).__name__}")
        return None
    if x is None:
        raise RefAttnError(f"{name}: expected an array of shape {shape}, got None")
    a = as_float(x, name, copy=False)  # read, never written: no copy of a float64 array
    if a.shape != shape:
        raise RefAttnError(f"{name}: expected shape {shape}, got {a.shape}")
    return a


def _tree(x, shapes, name):
    """``x`` checked against the tree of shapes, rebuilt with the shapes' types (float64 copies)."""
    if shapes is None or (isinstance(shapes, tuple) and shapes and isinstance(shapes[0], int)):
        return _leaf(x, shapes, name)
    if not isinstance(x, tuple) or len(x) != len(shapes):
        kind = type(shapes).__name__
        raise RefAttnTypeError(f"{name}: expected a {kind} of {len(shapes)} fields, got {type(x).__name__}")
    names = getattr(shapes, "_fields", None) or [str(i) for i in range(len(shapes))]
    items = [_tree(xi, si, f"{name}.{n}") for xi, si, n in zip(x, shapes, names)]
    return type(shapes)(*items) if hasattr(shapes, "_fields") else tuple(items)


def validate(params, tokens, config, mask, head_mask):
    """Check every argument of a model call against ``config`` → :class:`Inputs`."""
    if not isinstance(config, LMConfig):
        raise RefAttnTypeError(f"config: expected an LMConfig, got {type(config).__name__}")
    p = _tree(params, param_shapes(config), "params")
    t = to_numpy(tokens, "tokens")
    if t.dtype == bool or t.dtype.kind not in "iu":
        raise RefAttnTypeError(f"tokens: expected integer token ids, got dtype {t.dtype}")
    if t.ndim != 2 or t.shape[1] < 1:
        raise RefAttnError(f"tokens: expected shape (B, T) with T >= 1, got {t.shape}")
    if t.shape[1] > config.max_len:
        raise RefAttnError(f"tokens: expected at most max_len={config.max_len} positions, got T={t.shape[1]}")
    if t.size and (t.min() < 0 or t.max() >= config.vocab_size):
        bad = t[(t < 0) | (t >= config.vocab_size)].flat[0]
        raise RefAttnError(f"tokens: expected ids in [0, vocab_size={config.vocab_size}), got {int(bad)}")
    t = np.array(t, dtype=np.int64)
    m = None
    if mask is not None:
        m = as_bool(mask, "mask", hint=" (True = a real token)")
        if m.shape != t.shape:
            raise RefAttnError(f"mask: expected the shape of tokens {t.shape} (True = a real token), got {m.shape}")
    hm = None
    if head_mask is not None:
        hm = as_float(head_mask, "head_mask")
        want = (config.n_layers, config.n_heads)
        if hm.shape != want:
            raise RefAttnError(f"head_mask: expected shape (n_layers, n_heads) = {want}, got {hm.shape}")
    return Inputs(p, t, config, m, hm)


# ---- the layers the blocks use --------------------------------------------------------------------
#
# Each is the function of refattn.model.layers of the same name (same formulas, same order of
# operations), written on arrays `validate` has already checked, and returning with its output what
# its backward needs: the forward's intermediates are kept, so the backward recomputes nothing
# (layers' *_backward take only the inputs, and recompute the hidden layer or the normalised input).


def _rows(t):
    """``(..., n)`` as ``(rows, n)``: the leading dims flattened (a view of a contiguous array)."""
    return t.reshape(-1, t.shape[-1])


def _linear(x, w, b):
    """``x w + b`` (:func:`refattn.model.layers.linear`): ``(..., I)`` → ``(..., O)``."""
    y = x @ w
    if b is not None:
        y += b
    return y


def _linear_backward(dy, x, w, b):
    """``(dx, dw, db)`` of ``y = x w + b``: ``dy wᵀ``, ``Σ xᵀ dy``, ``Σ dy`` (sums over every leading dim)."""
    d2 = _rows(dy)
    return dy @ w.T, _rows(x).T @ d2, None if b is None else d2.sum(axis=0)


def _norm(x, p, config):
    """``(y, saved)`` of ``norm(x)`` (:func:`refattn.model.layers.layer_norm` or ``rms_norm``), with
    ``saved = (x̂, r)``: ``x̂ = (x − μ) r`` (RMS: ``x r``), ``r = 1 / sqrt(σ² + eps)`` (RMS: ``mean(x²)``)."""
    e = x.shape[-1]
    xc = x - x.mean(axis=-1, keepdims=True) if config.norm == "layer" else x.copy()  # (..., E)
    r = np.einsum("...i,...i->...", xc, xc)[..., None]  # (..., 1) Σ xc², one pass
    r /= e
    r += config.norm_eps
    np.sqrt(r, out=r)
    np.divide(1.0, r, out=r)
    xc *= r  # x̂
    y = xc if p.weight is None else xc * p.weight
    if p.bias is not None:
        y = y + p.bias
    return y, (xc, r)


def _norm_backward(dy, saved, p, config):
    """``(dx, NormParams of grads)`` of :func:`_norm` from its ``saved`` ``(x̂, r)``::

        dw = Σ dy x̂,  db = Σ dy,  g = dy w
        LayerNorm: dx = r (g − mean(g) − x̂ mean(g x̂));   RMSNorm: dx = r (g − x̂ mean(g x̂))

    (means over the last axis, sums over every leading dim: :func:`refattn.model.layers.layer_norm_backward`).
    """
    xh, r = saved
    e = xh.shape[-1]
    dw = None if p.weight is None else np.einsum("ij,ij->j", _rows(dy), _rows(xh))
    db = None if p.bias is None else _rows(dy).sum(axis=0)
    g = dy if p.weight is None else dy * p.weight  # (..., E)
    inner = np.einsum("...i,...i->...", g, xh)[..., None]  # (..., 1)
    inner /= e  # mean(g x̂)
    dx = xh * inner
    np.subtract(g, dx, out=dx)
    if config.norm == "layer":
        dx -= g.mean(axis=-1, keepdims=True)
    dx *= r
    return dx, NormParams(dw, db)


def _mlp(x, p, activation):
    """``(y, saved)`` of :func:`refattn.model.layers.mlp`: ``pre = x w_in + b_in``, ``h = act(pre)``
    (swiglu: ``silu(x w_gate) · pre``), ``y = h w_out + b_out``; ``saved = (x, pre, h, extra)``,
    ``extra`` what the activation's derivative needs: Φ(pre) (gelu), tanh(u) (gelu_tanh), ``(gate,
    σ(gate), silu(gate))`` (swiglu), None (relu)."""
    pre = _linear(x, p.w_in, p.b_in)  # (..., F)
    if activation == "gelu":
        cdf = pre / math.sqrt(2.0)
        special.erf(cdf, out=cdf)
        cdf += 1.0
        cdf *= 0.5  # Φ(pre) = ½ (1 + erf(pre / √2))
        h, extra = pre * cdf, cdf
    elif activation == "gelu_tanh":
        t = np.tanh(_SQRT_2_OVER_PI * (pre + _GELU_CUBIC * pre * pre * pre))
        h, extra = 0.5 * pre * (1.0 + t), t
    elif activation == "relu":
        h, extra = np.maximum(pre, 0.0), None
    else:  # swiglu
        gate = x @ p.w_gate  # (..., F)
        sig = special.expit(gate)  # σ(gate), no overflow for large |gate|
        silu = gate * sig
        h, extra = silu * pre, (gate, sig, silu)
    return _linear(h, p.w_out, p.b_out), (x, pre, h, extra)


def _mlp_backward(dy, saved, p, activation):
    """``(dx, MLPParams of grads)`` of :func:`_mlp` from its ``saved`` values (no product recomputed)::

        dh = dy w_outᵀ;  dw_out = Σ hᵀ dy;  db_out = Σ dy;  dpre = dh act'(pre)
        swiglu: dpre = dh silu(gate),  dgate = dh pre silu'(gate),  silu' = σ (1 + gate (1 − σ))
        dw_in = Σ xᵀ dpre;  db_in = Σ dpre;  dx = dpre w_inᵀ (+ dgate w_gateᵀ)

    (:func:`refattn.model.layers.mlp_backward`'s lines, from the saved values instead of recomputed ones).
    """
    x, pre, h, extra = saved
    dh, dw_out, db_out = _linear_backward(dy, h, p.w_out, p.b_out)  # dh (..., F)
    dx_gate = dw_gate = None
    if activation == "gelu":  # Φ(pre) + pre φ(pre)
        dpre = pre * pre
        dpre *= -0.5
        np.exp(dpre, out=dpre)
        dpre *= pre / math.sqrt(2.0 * math.pi)
        dpre += extra
        dpre *= dh
    elif activation == "gelu_tanh":
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * pre * pre)
        dpre = dh * (0.5 * (1.0 + extra) + 0.5 * pre * (1.0 - extra * extra) * du)
    elif activation == "relu":
        dpre = dh * (pre > 0)  # relu' = 0 at 0, as torch
    else:  # swiglu: h = silu(gate) · pre
        gate, sig, silu = extra
        dpre = dh * silu
        dgate = dh * pre * (sig * (1.0 + gate * (1.0 - sig)))
        dx_gate, dw_gate, _ = _linear_backward(dgate, x, p.w_gate, None)
    dx, dw_in, db_in = _linear_backward(dpre, x, p.w_in, p.b_in)
    if dx_gate is not None:
        dx += dx_gate
    return dx, MLPParams(dw_in, db_in, dw_out, db_out, dw_gate)


def sdpa_options(a: Inputs):
    """The options of every layer's attention: causal, the key mask ``(B, 1, 1, T)`` and ALiBi's bias."""
    c, length = a.config, a.tokens.shape[1]
    bias = None
    if c.positions == "alibi":
        bias = _position.alibi_bias(_position.alibi_slopes(c.n_heads), length, length)  # (H, T, T)
    mask = None if a.mask is None else a.mask[:, None, None, :]  # (B, 1, 1, T)
    return {"mask": mask, "bias": bias, "causal": c.causal}


def _qkv_weights(p):
    """``(w, b)``: ``w_q``, ``w_k``, ``w_v`` side by side ``(E, (H + 2·Hk)·dk)`` (one product for the
    three projections) and their biases likewise (None without biases)."""
    w = np.concatenate([p.w_q, p.w_k, p.w_v], axis=1)
    if p.b_q is None and p.b_k is None and p.b_v is None:
        return w, None
    parts = [np.zeros(wi.shape[1]) if bi is None else bi for wi, bi in ((p.w_q, p.b_q), (p.w_k, p.b_k), (p.w_v, p.b_v))]
    return w, np.concatenate(parts)


def _heads(x, p, config, w=None, b=None):
    """Per-head ``q (B, H, T, dk)``, ``k``, ``v (B, Hk, T, dk)`` of one layer, q and k before RoPE
    (views of one product ``x [w_q w_k w_v]``)."""
    if w is None:
        w, b = _qkv_weights(p)
    qkv = _linear(x, w, b)  # (B, T, (H + 2·Hk)·dk)
    nq, nk = p.w_q.shape[1], p.w_k.shape[1]
    q = _mh.split_heads(qkv[..., :nq], config.n_heads)
    k = _mh.split_heads(qkv[..., nq : nq + nk], config.n_kv_heads)
    v = _mh.split_heads(qkv[..., nq + nk :], config.n_kv_heads)
    return q, k, v


def _rotated(q, k, config):
    """``(q, k)`` rotated by RoPE (positions 0..T-1) when ``config.positions == "rope"``, else as they are."""
    if config.positions != "rope":
        return q, k
    return _position.rope(q, base=config.rope_base), _position.rope(k, base=config.rope_base)


def _attention(x, p, a: Inputs, layer, options):
    """``(y, saved)`` of one layer's attention sub-layer ``(B, T, E)`` → ``(B, T, E)``::

        q, k, v = split(x [w_q w_k w_v] + [b_q b_k b_v]);  q, k = rope(q), rope(k) (RoPE only)
        o, lse = sdpa(q, k, v, return_lse=True, **options);  o_h ← head_mask[layer, h] · o_h
        y = merge(o) w_o + b_o

    (:func:`refattn.multihead_attention`'s lines, with sdpa's ``(out, lse)`` kept for its backward).
    """
    c = a.config
    w, b = _qkv_weights(p)
    q, k, v = _heads(x, p, c, w, b)
    qr, kr = _rotated(q, k, c)
    o, lse = _sdpa.sdpa(qr, kr, v, return_lse=True, **options)  # (B, H, T, dk), (B, H, T)
    hm = None if a.head_mask is None else a.head_mask[layer]  # (H,)
    merged = _mh.merge_heads(o if hm is None else o * hm[:, None, None])  # (B, T, H·dk)
    saved = {"x": x, "w": w, "b": b, "q": q, "k": k, "qr": qr, "kr": kr, "v": v, "o": o, "lse": lse}
    saved["merged"] = merged
    return _linear(merged, p.w_o, p.b_o), saved


def _attention_backward(dy, s, p, a: Inputs, layer, options):
    """``(dx, MHAParams of grads, dhead_mask[layer] (H,) or None)`` of :func:`_attention`, from its saved values."""
    c = a.config
    hm = None if a.head_mask is None else a.head_mask[layer]
    # y = merged w_o + b_o
    dmerged, dw_o, db_o = _linear_backward(dy, s["merged"], p.w_o, p.b_o)
    dog = _mh.split_heads(dmerged, c.n_heads)  # (B, H, T, dk)
    # og = o · hm[h]
    dhm = None if hm is None else np.einsum("bhte,bhte->h", dog, s["o"])
    do = dog if hm is None else dog * hm[:, None, None]
    # o = sdpa(qr, kr, v): the forward's (out, lse) saved, as autograd saves them
    g = _sdpa.sdpa_backward(do, s["qr"], s["kr"], s["v"], saved=(s["o"], s["lse"]), **options)
    dq, dk = g.dq, g.dk
    if c.positions == "rope":  # qr = rope(q), kr = rope(k): the inverse rotation of the cotangents
        dq = _position.rope_backward(dq, s["q"], base=c.rope_base).dx
        dk = _position.rope_backward(dk, s["k"], base=c.rope_base).dx
    # q, k, v = split(x w + b), w = [w_q w_k w_v]
    dqkv = np.concatenate([_mh.merge_heads(dq), _mh.merge_heads(dk), _mh.merge_heads(g.dv)], axis=-1)
    dx, dw, db = _linear_backward(dqkv, s["x"], s["w"], s["b"])
    nq, nk = p.w_q.shape[1], p.w_k.shape[1]
    cuts = ((0, nq), (nq, nq + nk), (nq + nk, dw.shape[1]))
    dws = [np.ascontiguousarray(dw[:, i:j]) for i, j in cuts]
    dbs = [None if bias is None else db[i:j].copy() for bias, (i, j) in zip((p.b_q, p.b_k, p.b_v), cuts)]
    return dx, _mh.MHAParams(*dws, dw_o, *dbs, db_o), dhm


def attention_maps(x, p, a: Inputs, options):
    """One layer's attention probabilities ``P (B, H, T, T)`` at its attention input ``x``."""
    q, k, _ = _heads(x, p, a.config)
    qr, kr = _rotated(q, k, a.config)
    return _sdpa.attention_weights(qr, kr, **options)


# ---- the model ------------------------------------------------------------------------------------


class _Trace(NamedTuple):
    """What the backward needs of one forward pass."""

    a: Inputs
    options: dict
    blocks: list  # per block: dict of its sub-layers' inputs and saved intermediates
    x_last: np.ndarray  # (B, T, E) the last block's output (the input of norm_f)
    xf: np.ndarray  # (B, T, E) the input of the logits
    logits: np.ndarray  # (B, T, V)
    attn_in: list  # per block: the attention's input (B, T, E)
    ln_f: tuple | None  # norm_f's saved (x̂, r), None without norm_f


def _block(x, p: BlockParams, a: Inputs, layer, options):
    """One block → ``(out, saved)``: ``saved`` holds the inputs of its norms, attention and MLP
    (``x``, ``a_in``, ``h``, ``m_in``; post-norm also ``hp``, ``op``) and each sub-layer's saved values."""
    c = a.config
    if c.norm_position == "pre":
        a_in, n1 = _norm(x, p.ln_1, c)  # (B, T, E)
        h, sa = _attention(a_in, p.attn, a, layer, options)
        h += x
        m_in, n2 = _norm(h, p.ln_2, c)
        out, sm = _mlp(m_in, p.mlp, c.activation)
        out += h
        return out, {"x": x, "a_in": a_in, "h": h, "m_in": m_in, "ln_1": n1, "attn": sa, "ln_2": n2, "mlp": sm}
    hp, sa = _attention(x, p.attn, a, layer, options)  # (B, T, E) before norm_1
    hp += x
    h, n1 = _norm(hp, p.ln_1, c)
    op, sm = _mlp(h, p.mlp, c.activation)  # before norm_2
    op += h
    out, n2 = _norm(op, p.ln_2, c)
    saved = {"x": x, "a_in": x, "hp": hp, "h": h, "m_in": h, "op": op, "ln_1": n1, "attn": sa, "ln_2": n2}
    saved["mlp"] = sm
    return out, saved


def _block_backward(dout, s, p: BlockParams, a: Inputs, layer, options):
    """``(dx, BlockParams of grads, dhead_mask[layer])`` of :func:`_block`, from its saved values ``s``."""
    c = a.config
    if c.norm_position == "pre":
        # out = h + mlp(m_in), m_in = norm_2(h)
        dm_in, g_mlp = _mlp_backward(dout, s["mlp"], p.mlp, c.activation)
        dh, g_ln2 = _norm_backward(dm_in, s["ln_2"], p.ln_2, c)
        dh += dout
        # h = x + attn(a_in), a_in = norm_1(x)
        da_in, g_attn, dhm = _attention_backward(dh, s["attn"], p.attn, a, layer, options)
        dx, g_ln1 = _norm_backward(da_in, s["ln_1"], p.ln_1, c)
        dx += dh
        return dx, BlockParams(g_ln1, g_attn, g_ln2, g_mlp), dhm
    # out = norm_2(op)
    dop, g_ln2 = _norm_backward(dout, s["ln_2"], p.ln_2, c)
    # op = h + mlp(h)
    dh, g_mlp = _mlp_backward(dop, s["mlp"], p.mlp, c.activation)
    dh += dop
    # h = norm_1(hp)
    dhp, g_ln1 = _norm_backward(dh, s["ln_1"], p.ln_1, c)
    # hp = x + attn(x)
    dx, g_attn, dhm = _attention_backward(dhp, s["attn"], p.attn, a, layer, options)
    dx += dhp
    return dx, BlockParams(g_ln1, g_attn, g_ln2, g_mlp), dhm


def _positions(a: Inputs):
    """The position table added to the embeddings, ``(T, E)``, or None (RoPE, ALiBi)."""
    c, length = a.config, a.tokens.shape[1]
    if c.positions == "learned":
        return a.params.wpe[:length]
    if c.positions == "sinusoidal":
        return _position.sinusoidal_positions(length, c.d_model)
    return None


def _forward(a: Inputs) -> _Trace:
    p, c = a.params, a.config
    options = sdpa_options(a)
    x0 = _layers.embedding(a.tokens, p.wte)  # (B, T, E)
    pos = _positions(a)
    if pos is not None:
        x0 += pos
    x, saved = x0, []
    for layer, bp in enumerate(p.blocks):
        x, s = _block(x, bp, a, layer, options)
        saved.append(s)
    xf, ln_f = (x, None) if p.ln_f is None else _norm(x, p.ln_f, c)  # (B, T, E)
    head = p.wte.T if c.tied_embeddings else p.lm_head  # (E, V)
    logits = xf @ head  # (B, T, V)
    return _Trace(a, options, saved, x, xf, logits, [s["a_in"] for s in saved], ln_f)


def _backward(t: _Trace, d_logits) -> LMGrads:
    a = t.a
    p, c = a.params, a.config
    dl = as_cotangent(d_logits, t.logits.shape, "d_logits")  # (B, T, V)
    # logits = xf head, head = wteᵀ (tied) or lm_head
    if c.tied_embeddings:
        dx = dl @ p.wte  # (B, T, E)
        dwte_head, dlm_head = _rows(dl).T @ _rows(t.xf), None  # (V, E)
    else:
        dx = dl @ p.lm_head.T
        dwte_head, dlm_head = None, _rows(t.xf).T @ _rows(dl)  # (E, V)
    # xf = norm_f(x)
    d_ln_f = None
    if p.ln_f is not None:
        dx, d_ln_f = _norm_backward(dx, t.ln_f, p.ln_f, c)
    # the blocks, last to first
    d_blocks, dhm = [None] * len(p.blocks), [None] * len(p.blocks)
    for layer in reversed(range(len(p.blocks))):
        dx, d_blocks[layer], dhm[layer] = _block_backward(dx, t.blocks[layer], p.blocks[layer], a, layer, t.options)
    # x0 = wte[tokens] + positions
    dwte = _layers.embedding_backward(dx, a.tokens, p.wte).dweight
    if dwte_head is not None:
        dwte += dwte_head
    dwpe = None
    if c.positions == "learned":
        dwpe = np.zeros(p.wpe.shape)
        dwpe[: a.tokens.shape[1]] = dx.sum(axis=0)  # dwpe[t] = Σ_b dx0[b, t]; rows >= T: 0
    dhead_mask = None
    if a.head_mask is not None:
        dhead_mask = np.stack(dhm) if dhm else np.zeros(a.head_mask.shape)
    grads = LMParams(dwte, dwpe, tuple(d_blocks), d_ln_f, dlm_head)
    return LMGrads(grads, dhead_mask)


def lm_forward(params, tokens, config, *, mask=None, head_mask=None, return_attentions=False):
    """The language model's logits: embeddings, ``config.n_layers`` blocks, final norm, output projection.

    ::

        x = wte[tokens] (+ wpe[:T] | + sinusoidal(T, E))                       (B, T, E)
        pre-norm block:   x = x + attn(norm_1(x));   x = x + mlp(norm_2(x))
        post-norm block:  x = norm_1(x + attn(x));   x = norm_2(x + mlp(x))
        logits = norm_f(x) wteᵀ (tied) | norm_f(x) lm_head                      (B, T, V)

    (no ``norm_f`` after post-norm blocks).  ``attn`` is multi-head attention
    (:func:`refattn.multihead_attention`; with RoPE, :func:`refattn.rope` on each head's q and k
    before :func:`refattn.sdpa`), causal when ``config.causal``, with ALiBi's bias when
    ``config.positions == "alibi"``; ``mlp`` is :func:`refattn.model.layers.mlp`.  Axes: ``B``
    batch, ``T`` positions, ``V`` vocabulary, ``E`` width, ``H`` heads, ``L`` layers.

    Parameters
    ----------
    params : LMParams
        The weights (:func:`refattn.model.params.init_params`); every shape is checked against
        ``config`` (:func:`refattn.model.params.param_shapes`); finite.
    tokens : array_like of int, shape (B, T)
        Token ids in ``[0, V)``, ``1 <= T <= config.max_len``.
    config : LMConfig
        The model's shape and options.
    mask : array_like of bool, shape (B, T), optional
        True = a real token, False = padding: no query attends a padding key (a query with no real
        key to attend gets output 0, sdpa's ``empty_rows="zero"``).  The logits at padding positions
        are computed anyway; leave them out of a loss with ``ignore_index``.  Default None: all real.
    head_mask : array_like, shape (L, H), optional
        ``head_mask[l, h]`` multiplies head h's output in layer l before ``w_o`` (0 prunes it;
        Michel et al. 2019); differentiable.  Default None: every head 1.
    return_attentions : bool, default False
        Also return every layer's attention probabilities.

    Returns
    -------
    logits : ndarray of float64, shape (B, T, V)
    attentions : list of ndarray, each (B, H, T, T)
        Only with ``return_attentions=True``, as ``(logits, attentions)``: layer by layer, the
        softmax weights (rows sum to 1 over the allowed keys, before the head mask).

    Raises
    ------
    RefAttnError
        A shape that disagrees with ``config`` (named: ``params.blocks.0.attn.w_q: expected shape
        ...``), a token id out of range, a non-finite weight (``RefAttnTypeError`` for a wrong type:
        a float token, a non-bool mask, a config that is not an LMConfig).
    """
    return_attentions = as_flag(return_attentions, "return_attentions")
    t = _forward(validate(params, tokens, config, mask, head_mask))
    if not return_attentions:
        return t.logits
    maps = [attention_maps(x, bp.attn, t.a, t.options) for x, bp in zip(t.attn_in, t.a.params.blocks)]
    return t.logits, maps


def lm_backward(d_logits, params, tokens, config, *, mask=None, head_mask=None):
    """Gradients of :func:`lm_forward`: the vector-Jacobian product of the logits at every parameter
    and at ``head_mask``.

    The forward's lines undone from the last to the first (``specs/model.md``), on the values one
    forward pass saved: the output projection (tied: its gradient joins ``wte``'s), the final norm,
    each block's MLP, norms and attention (the projections' backward, the head gate,
    :func:`refattn.sdpa_backward` with the forward's ``(out, lse)``, with RoPE
    :func:`refattn.rope_backward`), the residual adds summing their two paths, then the embedding
    lookups.  No autograd, no finite differences.

    Parameters
    ----------
    d_logits : array_like, shape (B, T, V)
        Cotangent of the logits: exactly their shape, finite.
    params, tokens, config, mask, head_mask
        As :func:`lm_forward` (same defaults).

    Returns
    -------
    LMGrads
        ``(dparams, dhead_mask)``: an :class:`~refattn.model.params.LMParams` of gradients (None
        where the parameter is None) and the ``(L, H)`` head-mask gradient (None without one).
    """
    return _backward(_forward(validate(params, tokens, config, mask, head_mask)), d_logits)


def lm_loss_and_grads(
    params, tokens, targets, config, *, mask=None, head_mask=None, ignore_index=-100, label_smoothing=0.0
):
    """The mean cross-entropy of the next tokens and its gradients, in one forward pass.

    ``loss = cross_entropy(lm_forward(params, tokens, config), targets)``
    (:func:`refattn.model.layers.cross_entropy`, torch's semantics), and
    ``lm_backward(cross_entropy_backward(1, ...), ...)`` from the same forward pass.

    Parameters
    ----------
    params, tokens, config, mask, head_mask
        As :func:`lm_forward`.
    targets : array_like of int, shape (B, T)
        The token to predict at each position (usually ``tokens`` shifted by one); ``ignore_index``
        marks positions left out of the mean (padding, the last position).
    ignore_index : int, default -100
        The target id that takes no part in the loss.
    label_smoothing : float, default 0.0
        In [0, 1]: the target distribution ``(1 − ε) one_hot + ε / V``.

    Returns
    -------
    loss : float
        The mean over the non-ignored targets.
    grads : LMGrads
        Its gradients, as :func:`lm_backward`'s.
    """
    t = _forward(validate(params, tokens, config, mask, head_mask))
    loss = _layers.cross_entropy(t.logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing)
    dl = _layers.cross_entropy_backward(
        1.0, t.logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing
    ).dlogits
    return float(loss), _backward(t, dl)


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
