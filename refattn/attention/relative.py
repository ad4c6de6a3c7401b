"""Relative-position attention (Shaw, Uszkoreit & Vaswani 2018) and its backward.

Axes as :func:`refattn.sdpa` (``...`` batch, ``Hq``/``Hk`` query/kv heads, ``Lq``/``Lk``
lengths, ``D``/``Dv`` head dims) and ``2M+1`` relative-distance buckets:
``q (..., Hq, Lq, D)``, ``k (..., Hk, Lk, D)``, ``v (..., Hk, Lk, Dv)``, ``rel_k (2M+1, D)``,
``rel_v (2M+1, Dv)`` with ``M = max_distance``; ``idx_ij = clip(j − i, −M, M) + M``::

    s0_ij = scale · (q_i·k_j + q_i·rel_k[idx_ij])          then sdpa's steps 2-6
    out_i = Σ_j P̃_ij (v_j + rel_v[idx_ij])

Relative distances use raw indices (no alignment offset).  ``E (Lq, Lk, 2M+1)`` is the
one-hot bucket map ``E_ijr = [idx_ij = r]``: gathering is ``Y E`` and bucketing ``X Eᵀ``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refattn._validate import (
    RefAttnError,
    as_cotangent,
    as_flag,
    as_float,
    as_int,
    check_keywords_of,
    sum_outer,
    unbroadcast,
)
from refattn.attention import sdpa as _sdpa
from refattn.attention.options import BACKWARD_RETURN_LSE, takes_sdpa_options

__all__ = ["RelativeAttentionGrads", "relative_attention", "relative_attention_backward"]


class RelativeAttentionGrads(NamedTuple):
    """Gradients of :func:`relative_attention` (returned by :func:`relative_attention_backward`),
    each float64 and of its input's shape: GQA groups and broadcast dims are summed back.

    Fields
    ------
    dq : ndarray, shape of ``q`` (..., Hq, Lq, D)
    dk : ndarray, shape of ``k`` (..., Hk, Lk, D)
    dv : ndarray, shape of ``v`` (..., Hk, Lk, Dv)
    drel_k : ndarray, shape (2M+1, D)
        Summed over batch, heads and query-key pairs of each bucket.
    drel_v : ndarray, shape (2M+1, Dv)
        Summed likewise.
    dbias : ndarray or None
        Shape of ``bias``; None when no bias was given.
    dsinks : ndarray or None
        Shape of ``sinks``; None when no sinks were given.
    """

    dq: np.ndarray
    dk: np.ndarray
    dv: np.ndarray
    drel_k: np.ndarray
    drel_v: np.ndarray
    dbias: np.ndarray | None
    dsinks: np.ndarray | None


def bucket_map(lq, lk, max_distance):
    """One-hot ``E (lq, lk, 2M+1)``: ``E[i, j, clip(j − i, −M, M) + M] = 1``."""
    idx = np.clip(np.arange(lk)[None, :] - np.arange(lq)[:, None], -max_distance, max_distance) + max_distance
    return (idx[..., None] == np.arange(2 * max_distance + 1)).astype(np.float64)


def _setup(q, k, v, rel_k, rel_v, max_distance, options):
    m = as_int(max_distance, "max_distance", minimum=0)
    a = _sdpa.validate(q, k, v, **options)
    rk = as_float(rel_k, "rel_k")
    rv = as_float(rel_v, "rel_v")
    if rk.shape != (2 * m + 1, a.q.shape[-1]):
        raise RefAttnError(
            f"rel_k: expected shape (2·max_distance+1, D) = {(2 * m + 1, a.q.shape[-1])}, got {rk.shape}"
        )
    if rv.shape != (2 * m + 1, a.v.shape[-1]):
        raise RefAttnError(
            f"rel_v: expected shape (2·max_distance+1, Dv) = {(2 * m + 1, a.v.shape[-1])}, got {rv.shape}"
        )
    e = bucket_map(a.q.shape[-2], a.k.shape[-2], m)  # (Lq, Lk, R)
    s0, ke = _sdpa.qk_scores(a)
    s0 = s0 + a.scale * np.einsum("...ir,ijr->...ij", a.q @ rk.T, e)  # (..., Hq, Lq, Lk)
    return a, rk, rv, e, _sdpa.forward_scores(a, s0, ke)


_NO_BACKEND = "relative_attention builds its scores (q kᵀ plus the relative term) in NumPy; it has no kernel"


@takes_sdpa_options(refuses={"backend": _NO_BACKEND})
def relative_attention(q, k, v, rel_k, rel_v, *, max_distance, return_lse=False, **options):
    """Relative-position attention (Shaw, Uszkoreit & Vaswani 2018): learned embeddings of the
    clipped distance ``j − i`` join the keys and the values.

    With ``M = max_distance`` and ``idx_ij = clip(j − i, −M, M) + M`` (raw indices, no alignment
    offset)::

        s0_ij = scale · (q_i·k_j + q_i·rel_k[idx_ij])        then sdpa's steps 2-6
        out_i = Σ_j P̃_ij (v_j + rel_v[idx_ij])

    (softcap, bias, masks, softmax with sinks, dropout as :func:`refattn.sdpa`; ``P̃`` the
    weights after dropout).  The options are :func:`refattn.sdpa`'s; ``backend`` is refused (the
    scores are built in NumPy).

    Parameters
    ----------
    q : array_like, shape (..., Hq, Lq, D)
        Queries; finite, converted to float64.
    k : array_like, shape (..., Hk, Lk, D)
        Keys; ``Hk`` divides ``Hq`` (GQA); finite.
    v : array_like, shape (..., Hk, Lk, Dv)
        Values; finite.
    rel_k : array_like, shape (2M+1, D)
        Key embedding of each clipped distance, row ``r`` for ``j − i = r − M``; shared by every
        batch element and head.
    rel_v : array_like, shape (2M+1, Dv)
        Value embedding of each clipped distance, likewise.
    max_distance : int
        ``M >= 0``: distances beyond ``±M`` share the end buckets (``M = 0``: one bucket).
    return_lse : bool, default False
        Also return ``lse``.

    Returns
    -------
    out : ndarray of float64, shape (..., Hq, Lq, Dv)
        ``...`` is the broadcast of q's, k's and v's batch dims.
    lse : ndarray of float64, shape (..., Hq, Lq)
        Only with ``return_lse=True``, as ``(out, lse)``: the log of each row's softmax
        denominator, the sink included; ``-inf`` on empty rows.

    Raises
    ------
    RefAttnError
        A bad shape, value or option, e.g. ``rel_k`` not ``(2·max_distance+1, D)``.
    """
    return_lse = as_flag(return_lse, "return_lse")
    a, rk, rv, e, f = _setup(q, k, v, rel_k, rel_v, max_distance, options)
    pd = f.p if a.keep_scale is None else f.p * a.keep_scale  # (..., Hq, Lq, Lk)
    out = pd @ _sdpa.expand_kv(a.v, a.groups) + np.einsum("...ij,ijr->...ir", pd, e) @ rv
    return (out, f.lse.copy()) if return_lse else out


@takes_sdpa_options(refuses={"backend": _NO_BACKEND, "return_lse": BACKWARD_RETURN_LSE})
def relative_attention_backward(d_out, q, k, v, rel_k, rel_v, *, max_distance, d_lse=None, **options):
    """Gradients of :func:`relative_attention`: the vector-Jacobian product of ``out`` (and ``lse``)
    at q, k, v, rel_k, rel_v, bias and sinks.

    With ``B(X)_ir = Σ_j X_ij [idx_ij = r]`` (bucketing): ``drel_v = Σ B(P̃)ᵀ d_out``,
    ``dP̃_ij = d_out_i·(ṽ_j + rel_v[idx_ij])``; sdpa's steps 6 back to 2 give ``ds0``; then
    ``dq = scale·(ds0 k̃ + B(ds0) rel_k)``, ``dk̃ = scale·ds0ᵀ q``, ``drel_k = scale·Σ B(ds0)ᵀ q``
    (``specs/relative.md``).  The options must be those of the forward call; ``backend`` and
    ``return_lse`` are refused.

    Parameters
    ----------
    d_out : array_like, shape (..., Hq, Lq, Dv)
        Cotangent of ``out``: exactly the output's shape, finite.
    q, k, v : array_like
        As :func:`relative_attention`: ``(..., Hq, Lq, D)``, ``(..., Hk, Lk, D)``,
        ``(..., Hk, Lk, Dv)``.
    rel_k, rel_v : array_like
        As the forward's: ``(2M+1, D)`` and ``(2M+1, Dv)``.
    max_distance : int
        ``M``, as the forward's.
    d_lse : array_like, shape (..., Hq, Lq), optional
        Cotangent of ``lse`` (when the forward returned it).  Default None: no lse term.

    Returns
    -------
    RelativeAttentionGrads
        ``(dq, dk, dv, drel_k, drel_v, dbias, dsinks)``, float64, each of its input's shape;
        ``dbias``/``dsinks`` None without bias/sinks.
    """
    a, rk, rv, e, f = _setup(q, k, v, rel_k, rel_v, max_distance, options)
    ve = _sdpa.expand_kv(a.v, a.groups)  # (..., Hq, Lk, Dv)
    d_o = as_cotangent(d_out, a.score_shape[:-1] + (rv.shape[-1],), "d_out")
    dl = None if d_lse is None else as_cotangent(d_lse, a.score_shape[:-1], "d_lse")
    # out = P̃ ṽ + bucket(P̃) rel_v
    dp, dve, pd = _sdpa.backward_values(a, f, d_o, ve)
    drel_v = sum_outer(np.einsum("...ij,ijr->...ir", pd, e), d_o)  # (R, Dv)
    d_pd_rel = np.einsum("...ie,re,ijr->...ij", d_o, rv, e)  # (..., Hq, Lq, Lk)
    dp = dp + (d_pd_rel if a.keep_scale is None else d_pd_rel * a.keep_scale)
    ds0, dbias, dsinks = _sdpa.backward_logits(a, f, dp, dl)
    # s0 = scale q k̃ᵀ + scale gather(q rel_kᵀ)
    dq, dk = _sdpa.backward_qk(a, f.ke, ds0)
    ds_rel = a.scale * np.einsum("...ij,ijr->...ir", ds0, e)  # (..., Hq, Lq, R)
    dq = dq + unbroadcast(ds_rel @ rk, a.q.shape)
    drel_k = sum_outer(ds_rel, a.q)  # (R, D)
    dv = unbroadcast(_sdpa.reduce_kv(dve, a.groups), a.v.shape)
    return RelativeAttentionGrads(dq, dk, dv, drel_k, drel_v, dbias, dsinks)


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
