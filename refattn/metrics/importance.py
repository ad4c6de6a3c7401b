"""Head importance (Michel, Levy & Neubig 2019) and weight-norm importance.

``head_importance(grads_of_head_mask)`` takes the gradients of a loss w.r.t. the head gates ξ
(``refattn.multihead_attention_backward(...).dhead_mask``), collected per example:

* ``per="example"`` (the paper: ``I_h = E_x |∂L(x)/∂ξ_h|``): ``grads (N, L, H)``, or
  ``(N, T, L, H)`` per token, summed over T before ``|·|``;
* ``per="token"`` (the original code's accumulation of ``|·|`` per token): ``grads (N, T, L, H)``,
  ``|·|`` per token, mean over N and T.

``normalize="layer"``: each layer's scores divided by their ℓ2 norm (the paper's normalisation);
``None``: raw.  Result ``(L, H)``.
"""

from __future__ import annotations

import numpy as np

from refattn._validate import RefAttnError, as_choice, as_float, as_int, check_keywords_of

__all__ = ["head_importance", "weight_norm_importance"]


def head_importance(grads_of_head_mask, *, per="example", normalize="layer"):
    """Importance ``(L, H)`` of every head from per-example (or per-token) head-gate gradients.

    Michel, Levy & Neubig 2019: ``I_h = E_x |∂L(x)/∂ξ_h|``, ξ_h the gate of head h (``head_mask`` of
    :func:`~refattn.attention.multihead.multihead_attention`; its gradient is
    ``multihead_attention_backward(...).dhead_mask``), collected for N examples.  Not differentiable
    (no backward).

    Axes: ``N`` examples, ``T`` tokens, ``L`` layers, ``H`` heads.

    Parameters
    ----------
    grads_of_head_mask : array_like, shape (N, L, H) or (N, T, L, H)
        The gradients of the loss w.r.t. the head gates, one per example (or per example and token);
        any real dtype, converted to float64; finite.
    per : {"example", "token"}, default "example"
        ``"example"`` (the paper): ``mean_N |g|``, a ``(N, T, L, H)`` input first summed over T (the
        gradient of the example's loss); ``"token"`` (the original code's accumulation): ``|g|`` per
        token, then the mean over N and T; needs ``(N, T, L, H)``.  The two differ when per-token
        gradients cancel.
    normalize : {"layer", None}, default "layer"
        ``"layer"``: each layer's scores divided by their ℓ2 norm over the heads (the paper; a layer of
        zeros stays 0); None: the raw means.

    Returns
    -------
    importance : ndarray of float64, shape (L, H)
        Non-negative.

    Raises
    ------
    RefAttnError
        A shape that does not fit ``per``, or an unknown ``per`` or ``normalize``.
    """
    g = as_float(grads_of_head_mask, "grads_of_head_mask", ndim_min=3)
    as_choice(per, "per", ("example", "token"))
    if normalize is not None:
        as_choice(normalize, "normalize", ("layer",))
    if per == "token":
        if g.ndim != 4:
            raise RefAttnError(f"grads_of_head_mask: per='token' expects (N, T, L, H), got shape {g.shape}")
        scores = np.abs(g).mean(axis=(0, 1))
    else:
        if g.ndim == 4:
            g = g.sum(axis=1)
        if g.ndim != 3:
            raise RefAttnError(f"grads_of_head_mask: expected (N, L, H) or (N, T, L, H), got shape {g.shape}")
        scores = np.abs(g).mean(axis=0)
    if normalize == "layer":
        norm = np.linalg.norm(scores, axis=-1, keepdims=True)
        scores = np.where(norm > 0, scores / np.where(norm > 0, norm, 1.0), 0.0)
    return scores


def weight_norm_importance(params, *, num_heads):
    """Frobenius norm ``(H,)`` of each query head's slices of ``w_q``, ``w_k``, ``w_v``; per layer ``(L, H)``.

    ``importance_h = sqrt(‖w_q[:, h]‖² + ‖w_k[:, kv(h)]‖² + ‖w_v[:, kv(h)]‖²)`` over head h's columns
    (``[h·dk, (h+1)·dk)`` of ``w_q``); under GQA (``Hk < Hq``) head h uses the slices of its kv head
    ``kv(h) = h // (Hq // Hk)``.  Biases and ``w_o`` are left out.  Not differentiable (no backward).

    Parameters
    ----------
    params : MHAParams or sequence of MHAParams
        The weights of one layer (:class:`~refattn.attention.multihead.MHAParams`: ``w_q (d_model,
        Hq·dk)``, ``w_k (d_kv, Hk·dk)``, ``w_v (d_kv, Hk·dv)``, ...), or a list or tuple of them, one
        per layer, first layer first.
    num_heads : int
        The number of query heads ``Hq`` (>= 1, dividing ``w_q``'s columns), as in
        ``multihead_attention``; the kv heads ``Hk`` follow from ``w_k``'s columns.

    Returns
    -------
    importance : ndarray of float64, shape (Hq,), or (L, Hq) for a sequence of layers

    Raises
    ------
    RefAttnError
        Weights whose shapes disagree with each other or with ``num_heads``.
    """
    if isinstance(params, (list, tuple)) and params and isinstance(params[0], tuple):
        return np.stack([weight_norm_importance(p, num_heads=num_heads) for p in params])
    from refattn.attention.multihead import check_params

    hq = as_int(num_heads, "num_heads", minimum=1)
    w_q, w_k = as_float(params[0], "params.w_q"), as_float(params[1], "params.w_k")
    dk = w_q.shape[1] // hq
    hk = w_k.shape[1] // max(dk, 1)
    p, dk, dv = check_params(params, w_q.shape[0], w_k.shape[0], hq, hk)
    g = hq // hk
    out = np.zeros(hq)
    for h in range(hq):
        kv = h // g
        out[h] = np.sqrt(
            np.sum(p.w_q[:, h * dk : (h + 1) * dk] ** 2)
            + np.sum(p.w_k[:, kv * dk : (kv + 1) * dk] ** 2)
            + np.sum(p.w_v[:, kv * dv : (kv + 1) * dv] ** 2)
        )
    return out


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
