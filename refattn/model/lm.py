"""The decoder-only transformer language model in float64, and its hand-derived backward.

Axes: ``B`` batch, ``T`` positions, ``V`` vocabulary, ``E`` model width, ``H``/``Hk`` query and
key/value heads, ``dk = E / H`` the head dim, ``F`` the MLP width, ``L`` layers.  The model
(``specs/model.md``, "The language model")::

    x = wte[tokens] (+ wpe[:T] | + sinusoidal(T, E))                       (B, T, E)
    per block, pre-norm:   x = x + attn(norm_1(x));   x = x + mlp(norm_2(x))
               post-norm:  x = norm_1(x + attn(x));   x = norm_2(x + mlp(x))
    logits = norm_f(x) wteᵀ  (tied)  |  norm_f(x) lm_head;   no norm_f after post-norm blocks

``attn`` is :func:`refattn.multihead_attention` (RoPE: the same projections, each head's q and k
rotated by :func:`refattn.rope`, then :func:`refattn.sdpa`), causal when ``config.causal``; ALiBi
is :func:`refattn.alibi_bias` passed as sdpa's ``bias``; ``mask`` (real tokens) is sdpa's key mask
``mask[:, None, None, :]``; ``head_mask[l, h]`` multiplies head h's output in layer l before
``w_o``.  Every layer is :mod:`refattn.model.layers`' function, and :func:`lm_backward` runs their
``*_backward`` (and sdpa's) from the last line to the first: no autograd, no finite differences.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

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
from refattn.model.params import BlockParams, LMParams, NormParams, param_shapes

__all__ = ["LMGrads", "lm_backward", "lm_forward", "lm_loss_and_grads"]


class LMGrads(NamedTuple):
    """Gradients of :func:`lm_forward` (returned by :func:`lm_backward`), float64.

    Fields
    ------
    dparams : LMParams
        A tree of the parameters' structure: each gradient of its parameter's shape, None where the
        parameter is None (``dwpe`` is zero past row T).
    dhead_mask : ndarray, shape (L, H), or None
        The gradient of ``head_mask`` (Michel et al.'s head importance when taken at ones); None
        without a head mask.
    """

    dparams: LMParams
    dhead_mask: np.ndarray | None


class Inputs(NamedTuple):
    """The validated arguments of one model call (shared with :mod:`refattn.model.loops`)."""

    params: LMParams  # float64 copies, every shape checked against the config
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
    a = as_float(x, name)
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


def _norm(x, p, config):
    if config.norm == "layer":
        return _layers.layer_norm(x, p.weight, p.bias, eps=config.norm_eps)
    return _layers.rms_norm(x, p.weight, eps=config.norm_eps)


def _norm_backward(dy, x, p, config):
    """``(dx, NormParams of grads)`` of :func:`_norm`."""
    if config.norm == "layer":
        g = _layers.layer_norm_backward(dy, x, p.weight, p.bias, eps=config.norm_eps)
        return g.dx, NormParams(g.dweight, g.dbias)
    g = _layers.rms_norm_backward(dy, x, p.weight, eps=config.norm_eps)
    return g.dx, NormParams(g.dweight, None)


def sdpa_options(a: Inputs):
    """The options of every layer's attention: causal, the key mask ``(B, 1, 1, T)`` and ALiBi's bias."""
    c, length = a.config, a.tokens.shape[1]
    bias = None
    if c.positions == "alibi":
        bias = _position.alibi_bias(_position.alibi_slopes(c.n_heads), length, length)  # (H, T, T)
    mask = None if a.mask is None else a.mask[:, None, None, :]  # (B, 1, 1, T)
    return {"mask": mask, "bias": bias, "causal": c.causal}


def _heads(x, p, config):
    """Per-head ``q (B, H, T, dk)``, ``k``, ``v (B, Hk, T, dk)`` of one layer, q and k before RoPE."""
    q = _mh.split_heads(_layers.linear(x, p.w_q, p.b_q), config.n_heads)
    k = _mh.split_heads(_layers.linear(x, p.w_k, p.b_k), config.n_kv_heads)
    v = _mh.split_heads(_layers.linear(x, p.w_v, p.b_v), config.n_kv_heads)
    return q, k, v


def _rotated(q, k, config):
    """``(q, k)`` rotated by RoPE (positions 0..T-1) when ``config.positions == "rope"``, else as they are."""
    if config.positions != "rope":
        return q, k
    return _position.rope(q, base=config.rope_base), _position.rope(k, base=config.rope_base)


def _attention(x, p, a: Inputs, layer, options):
    """One layer's attention sub-layer: ``(B, T, E)`` → ``(B, T, E)``."""
    c = a.config
    hm = None if a.head_mask is None else a.head_mask[layer]  # (H,)
    if c.positions != "rope":
        return _mh.multihead_attention(x, p, num_heads=c.n_heads, num_kv_heads=c.n_kv_heads, head_mask=hm, **options)
    q, k, v = _heads(x, p, c)
    qr, kr = _rotated(q, k, c)
    o = _sdpa.sdpa(qr, kr, v, **options)  # (B, H, T, dk)
    og = o if hm is None else o * hm[:, None, None]
    return _layers.linear(_mh.merge_heads(og), p.w_o, p.b_o)


def _attention_backward(dy, x, p, a: Inputs, layer, options):
    """``(dx, MHAParams of grads, dhead_mask[layer] (H,) or None)`` of :func:`_attention`."""
    c = a.config
    hm = None if a.head_mask is None else a.head_mask[layer]
    if c.positions != "rope":
        g = _mh.multihead_attention_backward(
            dy, x, p, num_heads=c.n_heads, num_kv_heads=c.n_kv_heads, head_mask=hm, **options
        )
        return g.dx, g.dparams, g.dhead_mask
    q, k, v = _heads(x, p, c)  # (B, H, T, dk), (B, Hk, T, dk) x2
    qr, kr = _rotated(q, k, c)
    o = _sdpa.sdpa(qr, kr, v, **options)  # (B, H, T, dk)
    og = o if hm is None else o * hm[:, None, None]
    merged = _mh.merge_heads(og)  # (B, T, H·dk)
    # y = merged w_o + b_o
    go = _layers.linear_backward(dy, merged, p.w_o, p.b_o)
    dog = _mh.split_heads(go.dx, c.n_heads)  # (B, H, T, dk)
    # og = o · hm[h]
    dhm = None if hm is None else np.einsum("bhte,bhte->h", dog, o)
    do = dog if hm is None else dog * hm[:, None, None]
    # o = sdpa(qr, kr, v)
    g = _sdpa.sdpa_backward(do, qr, kr, v, **options)
    # qr = rope(q), kr = rope(k): the inverse rotation of the cotangents
    dq = _position.rope_backward(g.dq, q, base=c.rope_base).dx
    dk = _position.rope_backward(g.dk, k, base=c.rope_base).dx
    # q, k, v = split(x w + b)
    gq = _layers.linear_backward(_mh.merge_heads(dq), x, p.w_q, p.b_q)
    gk = _layers.linear_backward(_mh.merge_heads(dk), x, p.w_k, p.b_k)
    gv = _layers.linear_backward(_mh.merge_heads(g.dv), x, p.w_v, p.b_v)
    dparams = _mh.MHAParams(gq.dweight, gk.dweight, gv.dweight, go.dweight, gq.dbias, gk.dbias, gv.dbias, go.dbias)
    return gq.dx + gk.dx + gv.dx, dparams, dhm


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
    blocks: list  # per block: dict of its sub-layers' inputs
    x_last: np.ndarray  # (B, T, E) the last block's output (the input of norm_f)
    xf: np.ndarray  # (B, T, E) the input of the logits
    logits: np.ndarray  # (B, T, V)
    attn_in: list  # per block: the attention's input (B, T, E)


def _block(x, p: BlockParams, a: Inputs, layer, options):
    """One block → ``(out, saved)``: ``saved`` holds the inputs of its norms, attention and MLP."""
    c = a.config
    if c.norm_position == "pre":
        a_in = _norm(x, p.ln_1, c)  # (B, T, E)
        h = x + _attention(a_in, p.attn, a, layer, options)
        m_in = _norm(h, p.ln_2, c)
        out = h + _layers.mlp(m_in, p.mlp, activation=c.activation)
        return out, {"x": x, "a_in": a_in, "h": h, "m_in": m_in}
    hp = x + _attention(x, p.attn, a, layer, options)  # (B, T, E) before norm_1
    h = _norm(hp, p.ln_1, c)
    op = h + _layers.mlp(h, p.mlp, activation=c.activation)  # before norm_2
    return _norm(op, p.ln_2, c), {"x": x, "a_in": x, "hp": hp, "h": h, "m_in": h, "op": op}


def _block_backward(dout, s, p: BlockParams, a: Inputs, layer, options):
    """``(dx, BlockParams of grads, dhead_mask[layer])`` of :func:`_block`, from its saved inputs ``s``."""
    c = a.config
    if c.norm_position == "pre":
        # out = h + mlp(m_in), m_in = norm_2(h)
        gm = _layers.mlp_backward(dout, s["m_in"], p.mlp, activation=c.activation)
        dh_norm, g_ln2 = _norm_backward(gm.dx, s["h"], p.ln_2, c)
        dh = dout + dh_norm
        # h = x + attn(a_in), a_in = norm_1(x)
        da_in, g_attn, dhm = _attention_backward(dh, s["a_in"], p.attn, a, layer, options)
        dx_norm, g_ln1 = _norm_backward(da_in, s["x"], p.ln_1, c)
        return dh + dx_norm, BlockParams(g_ln1, g_attn, g_ln2, gm.dparams), dhm
    # out = norm_2(op)
    dop, g_ln2 = _norm_backward(dout, s["op"], p.ln_2, c)
    # op = h + mlp(h)
    gm = _layers.mlp_backward(dop, s["h"], p.mlp, activation=c.activation)
    dh = dop + gm.dx
    # h = norm_1(hp)
    dhp, g_ln1 = _norm_backward(dh, s["hp"], p.ln_1, c)
    # hp = x + attn(x)
    dx_attn, g_attn, dhm = _attention_backward(dhp, s["x"], p.attn, a, layer, options)
    return dhp + dx_attn, BlockParams(g_ln1, g_attn, g_ln2, gm.dparams), dhm


def _positions(a: Inputs):
    """The position table added to the embeddings, ``(T, E)``, or None (RoPE, ALiBi)."""
    c, length = a.config, a.tokens.shape[1]
    if c.positions == "learned":
        return _layers.embedding(np.arange(length), a.params.wpe)
    if c.positions == "sinusoidal":
        return _position.sinusoidal_positions(length, c.d_model)
    return None


def _forward(a: Inputs) -> _Trace:
    p, c = a.params, a.config
    options = sdpa_options(a)
    x0 = _layers.embedding(a.tokens, p.wte)  # (B, T, E)
    pos = _positions(a)
    if pos is not None:
        x0 = x0 + pos
    x, saved = x0, []
    for layer, bp in enumerate(p.blocks):
        x, s = _block(x, bp, a, layer, options)
        saved.append(s)
    xf = x if p.ln_f is None else _norm(x, p.ln_f, c)  # (B, T, E)
    head = p.wte.T if c.tied_embeddings else p.lm_head  # (E, V)
    logits = _layers.linear(xf, head)  # (B, T, V)
    return _Trace(a, options, saved, x, xf, logits, [s["a_in"] for s in saved])


def _backward(t: _Trace, d_logits) -> LMGrads:
    a = t.a
    p, c = a.params, a.config
    dl = as_cotangent(d_logits, t.logits.shape, "d_logits")  # (B, T, V)
    # logits = xf head
    head = p.wte.T if c.tied_embeddings else p.lm_head
    g_head = _layers.linear_backward(dl, t.xf, head)
    dwte_head = g_head.dweight.T if c.tied_embeddings else None  # (V, E)
    dlm_head = None if c.tied_embeddings else g_head.dweight  # (E, V)
    # xf = norm_f(x)
    dx, d_ln_f = g_head.dx, None
    if p.ln_f is not None:
        dx, d_ln_f = _norm_backward(dx, t.x_last, p.ln_f, c)
    # the blocks, last to first
    d_blocks, dhm = [None] * len(p.blocks), [None] * len(p.blocks)
    for layer in reversed(range(len(p.blocks))):
        dx, d_blocks[layer], dhm[layer] = _block_backward(dx, t.blocks[layer], p.blocks[layer], a, layer, t.options)
    # x0 = wte[tokens] + positions
    dwte = _layers.embedding_backward(dx, a.tokens, p.wte).dweight
    if dwte_head is not None:
        dwte = dwte + dwte_head
    dwpe = None
    if c.positions == "learned":
        dwpe = _layers.embedding_backward(dx.sum(axis=0), np.arange(a.tokens.shape[1]), p.wpe).dweight
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

    The forward's lines undone from the last to the first (``specs/model.md``): the output
    projection (tied: its gradient joins ``wte``'s), the final norm, each block's MLP, norms and
    attention (:func:`refattn.multihead_attention_backward`; with RoPE, :func:`refattn.sdpa_backward`
    and :func:`refattn.rope_backward`), the residual adds summing their two paths, then the
    embedding lookups.  Every layer's own ``*_backward`` does its part: no autograd, no finite
    differences.

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
