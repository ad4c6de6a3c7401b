"""Relative-position attention (Shaw, Uszkoreit & Vaswani 2018) and its backward.

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

from refattn._validate import RefAttnError, as_cotangent, as_flag, as_float, as_int, sum_outer, unbroadcast
from refattn.attention import sdpa as _sdpa
from refattn.attention.options import BACKWARD_RETURN_LSE, takes_sdpa_options

__all__ = ["RelativeAttentionGrads", "relative_attention", "relative_attention_backward"]


class RelativeAttentionGrads(NamedTuple):
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
    """Shaw relative attention ``out (..., Hq, Lq, Dv)`` [, ``lse``]; ``options`` as :func:`refattn.sdpa`
    but ``backend`` (refused: NumPy only)."""
    return_lse = as_flag(return_lse, "return_lse")
    a, rk, rv, e, f = _setup(q, k, v, rel_k, rel_v, max_distance, options)
    pd = f.p if a.keep_scale is None else f.p * a.keep_scale  # (..., Hq, Lq, Lk)
    out = pd @ _sdpa.expand_kv(a.v, a.groups) + np.einsum("...ij,ijr->...ir", pd, e) @ rv
    return (out, f.lse.copy()) if return_lse else out


@takes_sdpa_options(refuses={"backend": _NO_BACKEND, "return_lse": BACKWARD_RETURN_LSE})
def relative_attention_backward(d_out, q, k, v, rel_k, rel_v, *, max_distance, d_lse=None, **options):
    """Gradients of :func:`relative_attention` → :class:`RelativeAttentionGrads`; options as the
    forward's (``backend`` and ``return_lse`` refused)."""
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
