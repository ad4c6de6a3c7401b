"""Multi-head attention with projections (self and cross, GQA, head gates) and its backward.

Axes: ``...`` batch dims, ``Lq``/``Lk`` query/key lengths, ``d_model``/``d_kv`` the widths of
the query and key/value inputs, ``Hq``/``Hk`` query/kv heads (``Hk`` divides ``Hq``: GQA), ``dk``
and ``dv`` the per-head q/k and value dims.
``x (..., Lq, d_model)``, ``kv (..., Lk, d_kv)`` (``kv=None``: self-attention on x).
``MHAParams``: ``w_q (d_model, Hq·dk)``, ``w_k (d_kv, Hk·dk)``, ``w_v (d_kv, Hk·dv)``,
``w_o (Hq·dv, d_model)``, biases ``b_q (Hq·dk,)`` … ``b_o (d_model,)`` or None.
Projections are ``x @ w + b``; head h takes columns ``[h·dk, (h+1)·dk)`` (PyTorch's
``view(B, L, H, dk)`` order)::

    Q, K, V = split(x w_q + b_q), split(kv w_k + b_k), split(kv w_v + b_v)   (..., H, L, e)
    O = sdpa(Q, K, V, **options) · head_mask[..., h]                         (..., Hq, Lq, dv)
    y = merge(O) w_o + b_o                                                   (..., Lq, d_model)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refattn._validate import (
    RefAttnError,
    as_cotangent,
    as_float,
    as_int,
    check_broadcast_to,
    check_keywords_of,
    sum_outer,
    unbroadcast,
)
from refattn.attention import sdpa as _sdpa
from refattn.attention.options import takes_sdpa_options

__all__ = ["MHAGrads", "MHAParams", "multihead_attention", "multihead_attention_backward"]


class MHAParams(NamedTuple):
    """The weights of one multi-head attention layer, applied as ``t @ w + b`` (so ``w = W.T`` of
    PyTorch's ``nn.Linear``); head ``h`` takes columns ``[h·e, (h+1)·e)`` of a projection.

    Fields
    ------
    w_q : array_like, shape (d_model, Hq·dk)
    w_k : array_like, shape (d_kv, Hk·dk)
    w_v : array_like, shape (d_kv, Hk·dv)
    w_o : array_like, shape (Hq·dv, d_model)
    b_q : array_like, shape (Hq·dk,), or None
        Default None: no bias.
    b_k : array_like, shape (Hk·dk,), or None
        Default None.
    b_v : array_like, shape (Hk·dv,), or None
        Default None.
    b_o : array_like, shape (d_model,), or None
        Default None.
    """

    w_q: np.ndarray
    w_k: np.ndarray
    w_v: np.ndarray
    w_o: np.ndarray
    b_q: np.ndarray | None = None
    b_k: np.ndarray | None = None
    b_v: np.ndarray | None = None
    b_o: np.ndarray | None = None


class MHAGrads(NamedTuple):
    """Gradients of :func:`multihead_attention` (returned by :func:`multihead_attention_backward`),
    float64, each of its input's shape (broadcast dims summed back).

    Fields
    ------
    dx : ndarray, shape of ``x`` (..., Lq, d_model)
        For self-attention (``kv=None``) it includes x's role as keys and values.
    dkv : ndarray or None
        Shape of ``kv`` (..., Lk, d_kv); None for self-attention.
    dparams : MHAParams
        The weights' gradients (summed over batch and rows), None where a bias is absent.
    dhead_mask : ndarray or None
        Shape of ``head_mask``; None when no head mask was given.
    """

    dx: np.ndarray
    dkv: np.ndarray | None
    dparams: MHAParams
    dhead_mask: np.ndarray | None


class Projected(NamedTuple):
    x: np.ndarray  # (..., Lq, d_model)
    src: np.ndarray  # (..., Lk, d_kv)
    params: MHAParams
    q: np.ndarray  # (..., Hq, Lq, dk)
    k: np.ndarray  # (..., Hk, Lk, dk)
    v: np.ndarray  # (..., Hk, Lk, dv)
    head_mask: np.ndarray | None


def split_heads(t, heads):
    """``(..., L, H·e)`` → ``(..., H, L, e)``."""
    return np.swapaxes(t.reshape(t.shape[:-1] + (heads, t.shape[-1] // heads)), -2, -3)


def merge_heads(t):
    """``(..., H, L, e)`` → ``(..., L, H·e)``."""
    t = np.swapaxes(t, -2, -3)
    return t.reshape(t.shape[:-2] + (t.shape[-2] * t.shape[-1],))


def check_params(params, d_model, d_kv, hq, hk, *, x_name="x", kv_name=None):
    """Validated float64 ``MHAParams`` and the head dims ``(dk, dv)``.

    The weights define the model: an input whose last dim disagrees with them is blamed, by
    ``x_name`` (``d_model`` vs ``w_q``'s rows) and ``kv_name`` (``d_kv`` vs ``w_k``'s rows; None for
    self-attention, where ``w_k`` is blamed when it disagrees with ``w_q``)."""
    if not isinstance(params, tuple) or len(params) != 8:
        raise RefAttnError(f"params: expected MHAParams(w_q, w_k, w_v, w_o, b_q, b_k, b_v, b_o), got {type(params)}")
    p = MHAParams(*(None if a is None else as_float(a, f"params.{n}") for a, n in zip(params, MHAParams._fields)))
    for n in ("w_q", "w_k", "w_v", "w_o"):
        if getattr(p, n).ndim != 2:
            raise RefAttnError(f"params.{n}: expected a 2-D weight, got shape {getattr(p, n).shape}")
    if p.w_q.shape[1] % hq:
        raise RefAttnError(f"params.w_q: expected (d_model, Hq·dk), Hq={hq} dividing the columns, got {p.w_q.shape}")
    if p.w_q.shape[0] != d_model:
        raise RefAttnError(
            f"{x_name}: expected last dim d_model = {p.w_q.shape[0]} (the rows of params.w_q, shape {p.w_q.shape}), "
            f"got last dim {d_model}"
        )
    dk = p.w_q.shape[1] // hq
    if kv_name is not None and p.w_k.shape[0] != d_kv:
        raise RefAttnError(
            f"{kv_name}: expected last dim d_kv = {p.w_k.shape[0]} (the rows of params.w_k, shape {p.w_k.shape}), "
            f"got last dim {d_kv}"
        )
    if p.w_k.shape != (d_kv, hk * dk):
        raise RefAttnError(f"params.w_k: expected (d_kv, Hk·dk) = {(d_kv, hk * dk)}, got {p.w_k.shape}")
    if p.w_v.shape[0] != d_kv or p.w_v.shape[1] % hk:
        raise RefAttnError(f"params.w_v: expected (d_kv={d_kv}, Hk·dv) with Hk={hk}, got {p.w_v.shape}")
    dv = p.w_v.shape[1] // hk
    if p.w_o.shape != (hq * dv, d_model):
        raise RefAttnError(f"params.w_o: expected (Hq·dv, d_model) = {(hq * dv, d_model)}, got {p.w_o.shape}")
    for b, w in (("b_q", "w_q"), ("b_k", "w_k"), ("b_v", "w_v"), ("b_o", "w_o")):
        bias = getattr(p, b)
        if bias is not None and bias.shape != (getattr(p, w).shape[1],):
            raise RefAttnError(f"params.{b}: expected shape {(getattr(p, w).shape[1],)}, got {bias.shape}")
    return p, dk, dv


def head_counts(num_heads, num_kv_heads):
    hq = as_int(num_heads, "num_heads", minimum=1)
    hk = hq if num_kv_heads is None else as_int(num_kv_heads, "num_kv_heads", minimum=1)
    if hq % hk:
        raise RefAttnError(f"num_kv_heads: expected a divisor of num_heads={hq}, got {hk}")
    return hq, hk


def project(x, params, num_heads, num_kv_heads, kv, head_mask):
    """Validate and compute the per-head Q, K, V."""
    x = as_float(x, "x", ndim_min=2)
    src = x if kv is None else as_float(kv, "kv", ndim_min=2)
    hq, hk = head_counts(num_heads, num_kv_heads)
    p, _, _ = check_params(params, x.shape[-1], src.shape[-1], hq, hk, kv_name=None if kv is None else "kv")

    def lin(t, w, b):
        return t @ w if b is None else t @ w + b

    hm = None
    if head_mask is not None:
        hm = as_float(head_mask, "head_mask", ndim_min=1)
        check_broadcast_to(hm, x.shape[:-2] + (hq,), "head_mask", "(..., Hq)")
    return Projected(
        x,
        src,
        p,
        split_heads(lin(x, p.w_q, p.b_q), hq),
        split_heads(lin(src, p.w_k, p.b_k), hk),
        split_heads(lin(src, p.w_v, p.b_v), hk),
        hm,
    )


_NO_LSE = "the output is y (..., Lq, d_model) alone; refattn.sdpa on the projected heads gives their lse"
_BACKWARD_NO_LSE = "a backward returns gradients, and multihead_attention has no lse output"


@takes_sdpa_options(refuses={"return_lse": _NO_LSE})
def multihead_attention(x, params, *, num_heads, num_kv_heads=None, kv=None, head_mask=None, **options):
    """Multi-head attention with its projections: self or cross, GQA, per-head gates.

    ::

        Q, K, V = split(x w_q + b_q), split(kv w_k + b_k), split(kv w_v + b_v)   (..., H, L, e)
        O = sdpa(Q, K, V, **options) · head_mask[..., h]                         (..., Hq, Lq, dv)
        y = merge(O) w_o + b_o                                                   (..., Lq, d_model)

    ``split`` gives head ``h`` columns ``[h·e, (h+1)·e)`` (PyTorch's ``view(B, L, H, e)``);
    query head ``h`` reads kv head ``h // (Hq // Hk)``.  The options are :func:`refattn.sdpa`'s,
    ``backend`` included, applied to the per-head attention: ``mask``, ``bias`` and
    ``dropout_mask`` broadcast to its scores ``(..., Hq, Lq, Lk)`` (a key-padding mask ``(B, Lk)``
    is ``mask[:, None, None, :]``), ``sinks`` to ``(..., Hq)``, ``scale`` defaults to
    ``1 / sqrt(dk)``.  ``return_lse`` is refused (the output is ``y`` alone).

    Parameters
    ----------
    x : array_like, shape (..., Lq, d_model)
        The queries' input sequence (and the keys' and values' without ``kv``); finite.
    params : MHAParams
        The weights ``w_q (d_model, Hq·dk)``, ``w_k (d_kv, Hk·dk)``, ``w_v (d_kv, Hk·dv)``,
        ``w_o (Hq·dv, d_model)`` and optional biases; ``dk`` and ``dv`` follow from them.
    num_heads : int
        ``Hq`` >= 1, dividing the columns of ``w_q``.
    num_kv_heads : int, optional
        ``Hk``, dividing ``Hq`` (GQA, MQA with 1).  Default None: ``Hq``.
    kv : array_like, shape (..., Lk, d_kv), optional
        The keys' and values' input sequence (cross-attention); batch dims broadcast with x's.
        Default None: ``x`` (self-attention).
    head_mask : array_like, broadcastable to (..., Hq), optional
        A float factor per head on its attention output (Michel et al. 2019's gate; 0 prunes the
        head); differentiable (``dhead_mask``).  Default None: every head 1.

    Returns
    -------
    ndarray of float64, shape (..., Lq, d_model)
        ``y``; ``...`` is the broadcast of x's and kv's batch dims.

    Raises
    ------
    RefAttnError
        A bad shape, value or option; an input width that disagrees with the weights blames the
        input (``x: expected last dim d_model = ...``).
    """
    pr = project(x, params, num_heads, num_kv_heads, kv, head_mask)
    o = _sdpa.sdpa(pr.q, pr.k, pr.v, **options)  # (..., Hq, Lq, dv)
    if pr.head_mask is not None:
        o = o * pr.head_mask[..., None, None]
    y = merge_heads(o) @ pr.params.w_o
    return y if pr.params.b_o is None else y + pr.params.b_o


@takes_sdpa_options(refuses={"return_lse": _BACKWARD_NO_LSE})
def multihead_attention_backward(d_y, x, params, *, num_heads, num_kv_heads=None, kv=None, head_mask=None, **options):
    """Gradients of :func:`multihead_attention`: the vector-Jacobian product of ``y`` at x, kv, the
    weights and head_mask.

    Back through ``y = merge(Õ) w_o + b_o``, the head gate ``Õ_h = ξ_h O_h``
    (``dξ_h = Σ dÕ_h ∘ O_h``, the head-importance signal of Michel et al. 2019), sdpa
    (:func:`refattn.sdpa_backward`, GQA summed there) and the three projections
    (``specs/multihead.md``).  The options must be those of the forward call; ``return_lse`` is
    refused.

    Parameters
    ----------
    d_y : array_like, shape (..., Lq, d_model)
        Cotangent of ``y``: exactly the output's shape, finite.
    x, params : array_like, MHAParams
        As :func:`multihead_attention`.
    num_heads, num_kv_heads, kv, head_mask
        As the forward's (same defaults).

    Returns
    -------
    MHAGrads
        ``(dx, dkv, dparams, dhead_mask)``; ``dkv`` None for self-attention (``dx`` then holds
        both roles of x), ``dhead_mask`` None without a head mask.
    """
    pr = project(x, params, num_heads, num_kv_heads, kv, head_mask)
    p = pr.params
    o = _sdpa.sdpa(pr.q, pr.k, pr.v, **options)  # (..., Hq, Lq, dv) before the head gate
    og = o if pr.head_mask is None else o * pr.head_mask[..., None, None]
    merged = merge_heads(og)  # (..., Lq, Hq·dv)
    dy = as_cotangent(d_y, merged.shape[:-1] + (p.w_o.shape[1],), "d_y")
    # y = merged w_o + b_o
    dw_o, db_o = sum_outer(merged, dy), None if p.b_o is None else dy.reshape(-1, dy.shape[-1]).sum(axis=0)
    dog = split_heads(dy @ p.w_o.T, num_heads)  # (..., Hq, Lq, dv)
    # og = o · head_mask
    dhm = None
    do = dog
    if pr.head_mask is not None:
        dhm = unbroadcast(np.einsum("...hie,...hie->...h", dog, o), pr.head_mask.shape)
        do = dog * pr.head_mask[..., None, None]
    # o = sdpa(Q, K, V)
    g = _sdpa.sdpa_backward(do, pr.q, pr.k, pr.v, **options)
    # Q = x w_q + b_q, K = src w_k + b_k, V = src w_v + b_v
    grads = {}
    inputs = {"q": (pr.x, g.dq), "k": (pr.src, g.dk), "v": (pr.src, g.dv)}
    d_in = {"q": None, "k": None, "v": None}
    for n, (t, dh) in inputs.items():
        dm = merge_heads(dh)  # (..., L, H·e)
        w, b = getattr(p, "w_" + n), getattr(p, "b_" + n)
        grads["w_" + n] = sum_outer(t, dm)
        grads["b_" + n] = None if b is None else dm.reshape(-1, dm.shape[-1]).sum(axis=0)
        d_in[n] = unbroadcast(dm @ w.T, t.shape)
    dsrc = d_in["k"] + d_in["v"]
    dparams = MHAParams(grads["w_q"], grads["w_k"], grads["w_v"], dw_o, grads["b_q"], grads["b_k"], grads["b_v"], db_o)
    if kv is None:
        return MHAGrads(d_in["q"] + dsrc, None, dparams, dhm)
    return MHAGrads(d_in["q"], dsrc, dparams, dhm)


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
