"""Tiled formulations of sdpa: query chunks, the online-softmax (FlashAttention-2) algorithm,
and the split-KV merge.  Each equals :func:`refattn.sdpa` on every option it accepts.

Axes as :func:`refattn.sdpa`: ``...`` batch, ``Hq``/``Hk`` query/kv heads, ``Lq``/``Lk`` lengths,
``D``/``Dv`` head dims; ``S`` split-KV partials.

* ``sdpa_chunked(q, k, v, *, chunk_size)``: sdpa on query chunks of ``chunk_size`` rows
  (the memory-efficient recipe); masks, bias and dropout are sliced with global indices.
* ``sdpa_online(q, k, v, *, block_q, block_k)``: the FlashAttention-2 forward — for each
  query block, a running max ``m``, sum ``l`` and accumulator over key blocks; no
  ``Lq × Lk`` array (only ``block_q × block_k`` tiles).  Blocks need not divide the lengths.
* ``sdpa_online_backward``: the FlashAttention-2 backward — ``P`` recomputed from ``lse``,
  ``Δ = rowsum(dO ∘ O)``.
* ``combine_partials(outs (S, ..., Lq, Dv), lses (S, ..., Lq))``: merge split-KV partials,
  ``lse = logsumexp_s lse_s``, ``out = Σ_s exp(lse_s − lse) out_s``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refattn._validate import RefAttnError, as_cotangent, as_flag, as_float, as_int, check_keywords_of, unbroadcast
from refattn.attention import sdpa as _sdpa
from refattn.attention.options import BACKWARD_RETURN_LSE, takes_sdpa_options
from refattn.softmax_family import normalize_last_axis

__all__ = [
    "CombineGrads",
    "combine_partials",
    "combine_partials_backward",
    "sdpa_chunked",
    "sdpa_chunked_backward",
    "sdpa_online",
    "sdpa_online_backward",
]


class CombineGrads(NamedTuple):
    """Gradients of :func:`combine_partials` (returned by :func:`combine_partials_backward`), float64.

    Fields
    ------
    douts : ndarray, shape of ``outs`` (S, ..., Lq, Dv)
        ``w_s · d_out``.
    dlses : ndarray, shape of ``lses`` (S, ..., Lq)
        ``w_s · ((out_s − out)·d_out + d_lse)``.
    """

    douts: np.ndarray
    dlses: np.ndarray


def _blocks(n, size):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


# ---- query chunks ---------------------------------------------------------------------------


_PER_SCORE_OR_STRUCTURE = (
    "mask",
    "bias",
    "dropout_mask",
    "causal",
    "window",
    "align",
    "chunk",
    "sink_tokens",
    "q_lengths",
    "k_lengths",
    "k_starts",
)


def _chunk_options(a, options, i0, i1):
    """sdpa options for query rows ``i0:i1``: structure as an explicit mask, arrays sliced, padded
    query rows as the chunk's own ``q_lengths``."""
    sliced = {k: v for k, v in options.items() if k not in _PER_SCORE_OR_STRUCTURE}
    rows = (Ellipsis, slice(i0, i1), slice(None))
    if a.padded_rows is not None:
        sliced["q_lengths"] = np.clip(a.seqs.q_lengths - i0, 0, i1 - i0)
    if a.allowed is not None:
        sliced["mask"] = np.broadcast_to(a.allowed, a.score_shape)[rows]
    if a.bias is not None:
        sliced["bias"] = np.broadcast_to(a.bias, a.score_shape)[rows]
    if options.get("dropout_mask") is not None:
        sliced["dropout_mask"] = np.broadcast_to(np.asarray(options["dropout_mask"]), a.score_shape)[rows]
    return sliced


_CHUNKED_BACKEND = 'each chunk is one refattn.sdpa call with backend="auto"'
_ONLINE_BACKEND = 'sdpa_online is the online-softmax algorithm in NumPy; refattn.sdpa(..., backend="numba") runs it'


@takes_sdpa_options(refuses={"backend": _CHUNKED_BACKEND})
def sdpa_chunked(q, k, v, *, chunk_size, return_lse=False, **options):
    """sdpa computed ``chunk_size`` query rows at a time (the memory-efficient recipe, Rabe & Staats
    2021); same results and options as :func:`refattn.sdpa`.

    ``out[..., i0:i1, :] = sdpa(q[..., i0:i1, :], k, v, ...)`` for each chunk of rows, with
    causal and window turned into an explicit mask built with the global row indices, and
    ``mask``, ``bias`` and ``dropout_mask`` sliced to the chunk's rows.  ``backend`` is refused
    (each chunk is an sdpa call with ``backend="auto"``).

    Parameters
    ----------
    q : array_like, shape (..., Hq, Lq, D)
        Queries; finite, converted to float64.
    k : array_like, shape (..., Hk, Lk, D)
        Keys; ``Hk`` divides ``Hq`` (GQA); finite.
    v : array_like, shape (..., Hk, Lk, Dv)
        Values; finite.
    chunk_size : int
        Query rows per chunk, >= 1; need not divide ``Lq`` (the last chunk is shorter).
    return_lse : bool, default False
        Also return ``lse``.

    Returns
    -------
    out : ndarray of float64, shape (..., Hq, Lq, Dv)
        As :func:`refattn.sdpa`'s (to float64 rounding).
    lse : ndarray of float64, shape (..., Hq, Lq)
        Only with ``return_lse=True``, as ``(out, lse)``; ``-inf`` on empty rows.
    """
    chunk = as_int(chunk_size, "chunk_size", minimum=1)
    return_lse = as_flag(return_lse, "return_lse")
    a = _sdpa.validate(q, k, v, **options)
    parts = [
        _sdpa.sdpa(a.q[..., i0:i1, :], a.k, a.v, return_lse=True, **_chunk_options(a, options, i0, i1))
        for i0, i1 in _blocks(a.q.shape[-2], chunk)
    ]
    out = np.concatenate([np.broadcast_to(o, a.score_shape[:-3] + o.shape[-3:]) for o, _ in parts], axis=-2)
    lse = np.concatenate([np.broadcast_to(m, a.score_shape[:-3] + m.shape[-2:]) for _, m in parts], axis=-1)
    return (out, lse) if return_lse else out


@takes_sdpa_options(refuses={"backend": _CHUNKED_BACKEND, "return_lse": BACKWARD_RETURN_LSE})
def sdpa_chunked_backward(d_out, q, k, v, *, chunk_size, d_lse=None, **options):
    """Gradients of :func:`sdpa_chunked`: :func:`refattn.sdpa_backward` per chunk of query rows.

    Each chunk writes its rows of ``dq`` (and of the full-size ``dbias``); ``dk``, ``dv`` and
    ``dsinks`` are summed over the chunks.  The options must be those of the forward call;
    ``backend`` and ``return_lse`` are refused.

    Parameters
    ----------
    d_out : array_like, shape (..., Hq, Lq, Dv)
        Cotangent of ``out``: exactly the output's shape, finite.
    q, k, v : array_like
        As :func:`sdpa_chunked`: ``(..., Hq, Lq, D)``, ``(..., Hk, Lk, D)``, ``(..., Hk, Lk, Dv)``.
    chunk_size : int
        Query rows per chunk, >= 1.
    d_lse : array_like, shape (..., Hq, Lq), optional
        Cotangent of ``lse`` (when the forward returned it).  Default None: no lse term.

    Returns
    -------
    SDPAGrads
        ``(dq, dk, dv, dbias, dsinks)``, float64, each of its input's shape;
        ``dbias``/``dsinks`` None without bias/sinks.
    """
    chunk = as_int(chunk_size, "chunk_size", minimum=1)
    a = _sdpa.validate(q, k, v, **options)
    d_o = as_cotangent(d_out, a.score_shape[:-1] + a.v.shape[-1:], "d_out")
    dl = None if d_lse is None else as_cotangent(d_lse, a.score_shape[:-1], "d_lse")
    dq = np.zeros(a.score_shape[:-1] + a.q.shape[-1:])
    dk, dv = np.zeros(a.k.shape), np.zeros(a.v.shape)
    dbias = None if a.bias is None else np.zeros(a.score_shape)
    dsinks = None if a.sinks is None else np.zeros(a.sinks.shape)
    for i0, i1 in _blocks(a.q.shape[-2], chunk):
        g = _sdpa.sdpa_backward(
            d_o[..., i0:i1, :],
            a.q[..., i0:i1, :],
            a.k,
            a.v,
            d_lse=None if dl is None else dl[..., i0:i1],
            **_chunk_options(a, options, i0, i1),
        )
        dq[..., i0:i1, :] = g.dq
        dk, dv = dk + g.dk, dv + g.dv
        if dbias is not None:
            dbias[..., i0:i1, :] = g.dbias
        if dsinks is not None:
            dsinks = dsinks + g.dsinks
    dbias = None if dbias is None else unbroadcast(dbias, a.bias.shape)
    return _sdpa.SDPAGrads(unbroadcast(dq, a.q.shape), dk, dv, dbias, dsinks)


# ---- online softmax (FlashAttention-2) ------------------------------------------------------


class _Tiles:
    """Broadcast views of the per-score arrays and the tile score function."""

    def __init__(self, a):
        self.a = a
        self.ke = _sdpa.expand_kv(a.k, a.groups)  # (..., Hq, Lk, D)
        self.ve = _sdpa.expand_kv(a.v, a.groups)  # (..., Hq, Lk, Dv)
        self.allowed = None if a.allowed is None else np.broadcast_to(a.allowed, a.score_shape)
        self.bias = None if a.bias is None else np.broadcast_to(a.bias, a.score_shape)
        self.keep = None if a.keep_scale is None else np.broadcast_to(a.keep_scale, a.score_shape)
        self.sink = None if a.sinks is None else np.broadcast_to(a.sinks[..., None], a.score_shape[:-1])
        pad = a.padded_rows  # (B..., 1, Lq) or None: padded query rows are 0 under every policy
        self.pad = None if pad is None else np.broadcast_to(pad, a.score_shape[:-1])

    def scores(self, i0, i1, j0, j1):
        """Tile logits ``(..., Hq, bq, bk)`` (−inf where disallowed) and ``tanh(s0/c)`` or None."""
        a, tile = self.a, (Ellipsis, slice(i0, i1), slice(j0, j1))
        s = a.scale * (a.q[..., i0:i1, :] @ np.swapaxes(self.ke[..., j0:j1, :], -1, -2))
        t = None
        if a.softcap is not None:
            t = np.tanh(s / a.softcap)
            s = a.softcap * t
        if self.bias is not None:
            s = s + self.bias[tile]
        if self.allowed is not None:
            s = np.where(self.allowed[tile], s, -np.inf)
        return s, t

    def keep_tile(self, p, i0, i1, j0, j1):
        return p if self.keep is None else p * self.keep[..., i0:i1, j0:j1]

    def uniform_rows(self, i0, i1):
        """Output of 'uniform' empty rows ``(..., Hq, bq, Dv)``: the (dropped-out) mean of v."""
        lk = self.a.k.shape[-2]
        w = np.ones(self.a.score_shape[:-2] + (i1 - i0, lk)) if self.keep is None else self.keep[..., i0:i1, :]
        return (w / lk) @ self.ve


@takes_sdpa_options(refuses={"backend": _ONLINE_BACKEND})
def sdpa_online(q, k, v, *, block_q, block_k, return_lse=False, **options):
    """The FlashAttention-2 forward (online softmax over key blocks); same results and options as
    :func:`refattn.sdpa`.

    For each block of ``block_q`` queries, over blocks of ``block_k`` keys, with a running max
    ``m``, sum ``l`` and accumulator ``acc`` per row (initialised with the sink: ``m = σ``,
    ``l = 1``)::

        s = tile logits (scale, softcap, bias, masks)               (..., Hq, bq, bk)
        m' = max(m, rowmax(s));  α = exp(m − m');  P = exp(s − m')
        l = α l + rowsum(P);     acc = α acc + (P ⊙ keep/(1−p)) v_tile
        out = acc / l,  lse = m + log l                              (l = 0: an empty row)

    Only ``block_q × block_k`` tiles of scores exist, never ``Lq × Lk``.  ``backend`` is refused
    (this is the algorithm in NumPy; ``refattn.sdpa(..., backend="numba")`` runs it compiled).

    Parameters
    ----------
    q : array_like, shape (..., Hq, Lq, D)
        Queries; finite, converted to float64.
    k : array_like, shape (..., Hk, Lk, D)
        Keys; ``Hk`` divides ``Hq`` (GQA); finite.
    v : array_like, shape (..., Hk, Lk, Dv)
        Values; finite.
    block_q : int
        Query rows per block, >= 1; need not divide ``Lq``.
    block_k : int
        Keys per block, >= 1; need not divide ``Lk``.
    return_lse : bool, default False
        Also return ``lse``.

    Returns
    -------
    out : ndarray of float64, shape (..., Hq, Lq, Dv)
        As :func:`refattn.sdpa`'s (to float64 rounding).
    lse : ndarray of float64, shape (..., Hq, Lq)
        Only with ``return_lse=True``, as ``(out, lse)``; ``-inf`` on empty rows.
    """
    bq, bk = as_int(block_q, "block_q", minimum=1), as_int(block_k, "block_k", minimum=1)
    return_lse = as_flag(return_lse, "return_lse")
    a = _sdpa.validate(q, k, v, **options)
    tiles = _Tiles(a)
    lq, lk, dv = a.q.shape[-2], a.k.shape[-2], a.v.shape[-1]
    out = np.zeros(a.score_shape[:-1] + (dv,))
    lse = np.zeros(a.score_shape[:-1])
    for i0, i1 in _blocks(lq, bq):
        rows = a.score_shape[:-2] + (i1 - i0,)
        m = np.full(rows, -np.inf) if tiles.sink is None else tiles.sink[..., i0:i1].copy()  # running max
        l = np.where(np.isfinite(m), 1.0, 0.0)  # running sum; the sink contributes exp(σ - m) = 1
        acc = np.zeros(rows + (dv,))  # running Σ P̃ v, scaled by exp(-m)
        for j0, j1 in _blocks(lk, bk):
            s, _ = tiles.scores(i0, i1, j0, j1)  # (..., Hq, bq, bk)
            m_new = np.maximum(m, s.max(axis=-1))
            m_safe = np.where(np.isneginf(m_new), 0.0, m_new)
            alpha = np.exp(m - m_safe)  # rescales the old sums; 0 while m = -inf
            p = np.exp(s - m_safe[..., None])
            l = l * alpha + p.sum(axis=-1)
            acc = acc * alpha[..., None] + tiles.keep_tile(p, i0, i1, j0, j1) @ tiles.ve[..., j0:j1, :]
            m = m_new
        empty = l == 0.0
        out[..., i0:i1, :] = acc / np.where(empty, 1.0, l)[..., None]
        with np.errstate(divide="ignore"):
            lse[..., i0:i1] = np.where(empty, -np.inf, m + np.log(np.where(empty, 1.0, l)))
        if empty.any() and a.empty_rows != "zero":
            fill = np.nan if a.empty_rows == "nan" else tiles.uniform_rows(i0, i1)
            out[..., i0:i1, :] = np.where(empty[..., None], fill, out[..., i0:i1, :])
    if tiles.pad is not None:
        out = np.where(tiles.pad[..., None], 0.0, out)
        lse = np.where(tiles.pad, -np.inf, lse)
    return (out, lse) if return_lse else out


@takes_sdpa_options(refuses={"backend": _ONLINE_BACKEND, "return_lse": BACKWARD_RETURN_LSE})
def sdpa_online_backward(d_out, q, k, v, *, block_q, block_k, d_lse=None, **options):
    """The FlashAttention-2 backward: P recomputed from lse, tile by tile.

    Out and lse are recomputed by :func:`sdpa_online`; ``Δ_i = rowsum(dO_i ∘ O_i)``; per tile
    ``P = exp(s − lse)``, ``dṽ += P̃ᵀ dO``, ``dP = (dO ṽᵀ) ⊙ keep/(1−p)``,
    ``ds = P ⊙ (dP − Δ + d_lse)``, then back through the softcap, ``dq += scale·ds k̃``,
    ``dk̃ += scale·dsᵀ q``; the sinks get ``Σ_i P_σ,i (d_lse_i − Δ_i)`` (``specs/tiled.md``).
    The options must be those of the forward call; ``backend`` and ``return_lse`` are refused.

    Parameters
    ----------
    d_out : array_like, shape (..., Hq, Lq, Dv)
        Cotangent of ``out``: exactly the output's shape, finite.
    q, k, v : array_like
        As :func:`sdpa_online`: ``(..., Hq, Lq, D)``, ``(..., Hk, Lk, D)``, ``(..., Hk, Lk, Dv)``.
    block_q, block_k : int
        Query rows and keys per block, >= 1.
    d_lse : array_like, shape (..., Hq, Lq), optional
        Cotangent of ``lse`` (when the forward returned it); ignored on empty rows.  Default
        None: no lse term.

    Returns
    -------
    SDPAGrads
        ``(dq, dk, dv, dbias, dsinks)``, float64, each of its input's shape;
        ``dbias``/``dsinks`` None without bias/sinks.
    """
    bq, bk = as_int(block_q, "block_q", minimum=1), as_int(block_k, "block_k", minimum=1)
    a = _sdpa.validate(q, k, v, **options)
    out, lse = sdpa_online(q, k, v, block_q=bq, block_k=bk, return_lse=True, **options)
    tiles = _Tiles(a)
    lq, lk = a.q.shape[-2], a.k.shape[-2]
    d_o = as_cotangent(d_out, out.shape, "d_out")
    empty = np.isneginf(lse)  # (..., Hq, Lq)
    dl = np.zeros(lse.shape) if d_lse is None else np.where(empty, 0.0, as_cotangent(d_lse, lse.shape, "d_lse"))
    delta = np.einsum("...ie,...ie->...i", d_o, out)  # (..., Hq, Lq)  Δ = Σ_j P dP = dO·O
    lse_safe = np.where(empty, 0.0, lse)
    dq = np.zeros(a.score_shape[:-1] + a.q.shape[-1:])
    dke = np.zeros(a.score_shape[:-3] + tiles.ke.shape[-3:])
    dve = np.zeros(a.score_shape[:-3] + tiles.ve.shape[-3:])
    dbias = None if a.bias is None else np.zeros(a.score_shape)
    fill = {"zero": 0.0, "nan": np.nan, "uniform": 1.0 / lk}[a.empty_rows]
    for j0, j1 in _blocks(lk, bk):
        for i0, i1 in _blocks(lq, bq):
            rows = (Ellipsis, slice(i0, i1))
            s, t = tiles.scores(i0, i1, j0, j1)
            p = np.exp(s - lse_safe[rows][..., None])  # (..., Hq, bq, bk)
            e = empty[rows][..., None]
            p = np.where(e, fill, p)
            if tiles.pad is not None:
                p = np.where(tiles.pad[rows][..., None], 0.0, p)
            # out = P̃ ṽ
            dve[..., j0:j1, :] += np.swapaxes(tiles.keep_tile(p, i0, i1, j0, j1), -1, -2) @ d_o[rows + (slice(None),)]
            dp = tiles.keep_tile(
                d_o[rows + (slice(None),)] @ np.swapaxes(tiles.ve[..., j0:j1, :], -1, -2), i0, i1, j0, j1
            )
            # P = exp(s - lse)
            ds = p * (dp - delta[rows][..., None] + dl[rows][..., None])
            if a.empty_rows == "uniform":
                ds = np.where(e, 0.0, ds)
            if dbias is not None:
                dbias[..., i0:i1, j0:j1] = ds
            if t is not None:
                ds = ds * (1.0 - t**2)
            # s0 = scale q k̃ᵀ
            dq[..., i0:i1, :] += a.scale * (ds @ tiles.ke[..., j0:j1, :])
            dke[..., j0:j1, :] += a.scale * (np.swapaxes(ds, -1, -2) @ a.q[..., i0:i1, :])
    dsinks = None
    if a.sinks is not None:
        p_sink = np.where(empty, 0.0, np.exp(tiles.sink - lse_safe))
        dsinks = unbroadcast((p_sink * (dl - delta)).sum(axis=-1), a.sinks.shape)
    return _sdpa.SDPAGrads(
        unbroadcast(dq, a.q.shape),
        unbroadcast(_sdpa.reduce_kv(dke, a.groups), a.k.shape),
        unbroadcast(_sdpa.reduce_kv(dve, a.groups), a.v.shape),
        None if dbias is None else unbroadcast(dbias, a.bias.shape),
        dsinks,
    )


# ---- split-KV merge -------------------------------------------------------------------------


def _combine_setup(outs, lses):
    outs = as_float(outs, "outs", ndim_min=2)
    lses = as_float(lses, "lses", ndim_min=1, allow_neg_inf=True)
    if outs.shape[:-1] != lses.shape:
        raise RefAttnError(f"lses: expected shape {outs.shape[:-1]} (outs without its last dim), got {lses.shape}")
    # the softmax over the partials, as refattn.softmax forms it: lse = max + log1p(tail), so a
    # dominant partial keeps the digits of the others (lse = 1e-22, not 0, for lses 0 and -50)
    nz = normalize_last_axis(np.moveaxis(lses, 0, -1), "zero")  # rows with every partial empty: w 0, lse -inf
    w = np.moveaxis(nz.p, -1, 0)  # (S, ..., Lq) exp(lse_s - lse)
    return outs, lses, w, nz.lse


def combine_partials(outs, lses):
    """Merge split-KV partials (flash-decoding): attention over the union of key splits from each
    split's output and lse.

    ``lse = log Σ_s exp(lse_s)``, ``w_s = exp(lse_s − lse)``, ``out = Σ_s w_s out_s``, the sum
    formed as ``max + log1p(tail)`` (refattn's softmax).  A partial with ``lse_s = -inf`` (no key
    in its split) contributes nothing; a row where every partial is empty gives ``out = 0``,
    ``lse = -inf`` (the ``"zero"`` policy).

    Parameters
    ----------
    outs : array_like, shape (S, ..., Lq, Dv)
        The ``S`` partial outputs, stacked on the first axis (``...`` e.g. batch and heads); finite.
    lses : array_like, shape (S, ..., Lq)
        Their log-sum-exps, ``outs.shape[:-1]``; finite or ``-inf``.

    Returns
    -------
    out : ndarray of float64, shape (..., Lq, Dv)
    lse : ndarray of float64, shape (..., Lq)
    """
    outs, _, w, lse = _combine_setup(outs, lses)
    return np.einsum("s...i,s...ie->...ie", w, outs), lse


def combine_partials_backward(d_out, outs, lses, *, d_lse=None):
    """Gradients of :func:`combine_partials`: ``douts_s = w_s d_out``,
    ``dlses_s = w_s ((out_s − out)·d_out + d_lse)``.

    Parameters
    ----------
    d_out : array_like, shape (..., Lq, Dv)
        Cotangent of ``out``: exactly the output's shape, finite.
    outs, lses : array_like
        As :func:`combine_partials`: ``(S, ..., Lq, Dv)`` and ``(S, ..., Lq)``.
    d_lse : array_like, shape (..., Lq), optional
        Cotangent of ``lse``.  Default None: no lse term.

    Returns
    -------
    CombineGrads
        ``(douts, dlses)``, float64, of the shapes of ``outs`` and ``lses``.
    """
    outs, lses, w, lse = _combine_setup(outs, lses)
    out = np.einsum("s...i,s...ie->...ie", w, outs)
    d_o = as_cotangent(d_out, out.shape, "d_out")
    dl = np.zeros(lse.shape) if d_lse is None else as_cotangent(d_lse, lse.shape, "d_lse")
    # out = Σ_s w_s out_s, w_s = exp(lse_s - lse), lse = logsumexp_s lse_s
    douts = w[..., None] * d_o  # (S, ..., Lq, Dv)
    dlses = w * (np.einsum("s...ie,...ie->s...i", outs - out, d_o) + dl)  # (S, ..., Lq)
    return CombineGrads(douts, dlses)


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
