"""Head importance (Michel, Levy & Neubig 2019) and weight-norm importance.

``head_importance(grads_of_head_mask)`` takes the gradients of a loss w.r.t. the head gates ξ
(``refattn.multihead_attention_backward(...).dhead_mask``), collected per example:

* ``per="example"`` (the paper: ``I_h = E_x |∂L(x)/∂ξ_h|``): ``grads (N, L, H)``, or
  ``(N, T, L, H)`` per token, summed over the (real) tokens T before ``|·|``;
* ``per="token"`` (the original code's accumulation of ``|·|`` over tokens): ``grads (N, T, L, H)``,
  ``|·|`` per token, mean over every real token of the batch (``mask (N, T)``, True = real token).

``normalize="layer"``: each layer's scores divided by their ℓ2 norm (the paper's normalisation);
``None``: raw.  Result ``(L, H)``.
"""

from __future__ import annotations

import numpy as np

from refattn._validate import RefAttnError, as_bool, as_choice, as_float, as_int, check_keywords_of

__all__ = ["head_importance", "weight_norm_importance"]


def head_importance(grads_of_head_mask, *, per="example", normalize="layer", mask=None):
    """Importance ``(L, H)`` of every head from per-example (or per-token) head-gate gradients.

    Michel, Levy & Neubig 2019: ``I_h = E_x |∂L(x)/∂ξ_h|``, ξ_h the gate of head h (``head_mask`` of
    :func:`~refattn.attention.multihead.multihead_attention`; its gradient is
    ``multihead_attention_backward(...).dhead_mask``), collected for N examples.  With ``g (N, T, L,
    H)`` and ``m (N, T)`` the real tokens (all True without a mask):

    * ``per="example"``: ``I = (1/N) Σ_n |Σ_t m_nt g_nt|`` (``(N, L, H)`` input: ``(1/N) Σ_n |g_n|``);
    * ``per="token"``: ``I = Σ_nt m_nt |g_nt| / Σ_nt m_nt``, the mean over the batch's real tokens
      (the original code's ``head_importance /= tot_tokens``; 0 when no token is real).

    Padded tokens take no part, so a padded batch gives the result of its items unpadded (for
    ``"token"``: laid end to end as one example; for ``"example"``: each item as it is).  Not
    differentiable (no backward).

    Axes: ``N`` examples, ``T`` tokens, ``L`` layers, ``H`` heads.

    Parameters
    ----------
    grads_of_head_mask : array_like, shape (N, L, H) or (N, T, L, H)
        The gradients of the loss w.r.t. the head gates, one per example (or per example and token);
        any real dtype, converted to float64; finite.  What a padded token holds is ignored.
    per : {"example", "token"}, default "example"
        ``"example"`` (the paper): ``mean_N |g|``, a ``(N, T, L, H)`` input first summed over its real
        tokens (the gradient of the example's loss); ``"token"`` (the original code's accumulation):
        ``|g|`` per token, then the mean over the real tokens; needs ``(N, T, L, H)``.  The two differ
        when per-token gradients cancel.
    normalize : {"layer", None}, default "layer"
        ``"layer"``: each layer's scores divided by their ℓ2 norm over the heads (the paper; a layer of
        zeros stays 0); None: the raw means.
    mask : array_like of bool, shape (N, T), optional
        True = real token (refattn's one polarity: True = keep), for a ``(N, T, L, H)`` input: padded
        tokens are left out of the sums and of the token count.  Default None: every token real.

    Returns
    -------
    importance : ndarray of float64, shape (L, H)
        Non-negative.

    Raises
    ------
    RefAttnError
        A shape that does not fit ``per``, a ``mask`` that is not ``(N, T)`` or given for an ``(N, L,
        H)`` input, or an unknown ``per`` or ``normalize`` (``RefAttnTypeError`` for a non-bool mask).
    """
    g = as_float(grads_of_head_mask, "grads_of_head_mask", ndim_min=3)
    as_choice(per, "per", ("example", "token"))
    if normalize is not None:
        as_choice(normalize, "normalize", ("layer",))
    if g.ndim not in (3, 4):
        raise RefAttnError(f"grads_of_head_mask: expected (N, L, H) or (N, T, L, H), got shape {g.shape}")
    if per == "token" and g.ndim != 4:
        raise RefAttnError(f"grads_of_head_mask: per='token' expects (N, T, L, H), got shape {g.shape}")
    real = None
    if mask is not None:
        real = as_bool(mask, "mask")
        if g.ndim != 4:
            raise RefAttnError(f"mask: real tokens (N, T) need per-token gradients (N, T, L, H), got shape {g.shape}")
        if real.shape != g.shape[:2]:
            raise RefAttnError(f"mask: expected the real tokens {g.shape[:2]} (N, T), got shape {real.shape}")
        g = np.where(real[..., None, None], g, 0.0)  # (N, T, L, H): padded tokens' gradients dropped
    if per == "token":
        count = g.shape[0] * g.shape[1] if real is None else int(real.sum())
        scores = np.abs(g).sum(axis=(0, 1)) / max(count, 1)  # (L, H) mean over the real tokens
    else:
        if g.ndim == 4:
            g = g.sum(axis=1)  # (N, L, H) the gradient of each example's loss
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
