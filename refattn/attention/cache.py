"""KV-cache decoding and paged KV gathering.

Axes: ``B`` sequences, ``Hq``/``Hk`` query/kv heads, ``Lq`` new queries, ``Lc`` cache slots,
``D``/``Dv`` head dims; paged: ``P`` pages of ``page_size`` slots, ``S = max_pages·page_size``.

* ``decode(q (B, Hq, Lq, D), k_cache (B, Hk, Lc, D), v_cache (B, Hk, Lc, Dv), *, cache_lengths (B,))``:
  the new queries (the last ``Lq`` tokens of each sequence, normally already appended to the
  cache) attend to the first ``cache_lengths[b]`` (≥ 1) cached keys: it is sdpa on each
  sequence's valid prefix, ``causal``/``window`` aligned bottom-right to it (query i sits at
  position ``cache_lengths[b] − Lq + i``).  Slots past a length are not keys at all (they never
  enter a softmax, not even the ``"uniform"`` empty-row mean).
* ``paged_gather(pages (P, Hk, page_size, D), block_table (B, max_pages), lengths (B,))``:
  dense ``(B, Hk, max_pages·page_size, D)`` keys (zero beyond each length) and a validity
  mask ``(B, max_pages·page_size)``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refattn._validate import RefAttnError, as_cotangent, as_flag, as_float, check_keywords_of, unbroadcast
from refattn.attention import sdpa as _sdpa
from refattn.attention.options import BACKWARD_RETURN_LSE, takes_sdpa_options

__all__ = ["DecodeGrads", "PagedGatherGrads", "decode", "decode_backward", "paged_gather", "paged_gather_backward"]


_NAMES = ("q", "k_cache", "v_cache")


class DecodeGrads(NamedTuple):
    """Gradients of :func:`decode` (returned by :func:`decode_backward`), each float64 and of its
    input's shape; cache slots past a sequence's length get zero.

    Fields
    ------
    dq : ndarray, shape of ``q`` (B, Hq, Lq, D)
    dk_cache : ndarray, shape of ``k_cache`` (B, Hk, Lc, D)
    dv_cache : ndarray, shape of ``v_cache`` (B, Hk, Lc, Dv)
    dbias : ndarray or None
        Shape of ``bias`` (broadcast dims summed); None when no bias was given.
    dsinks : ndarray or None
        Shape of ``sinks``; None when no sinks were given.
    """

    dq: np.ndarray
    dk_cache: np.ndarray
    dv_cache: np.ndarray
    dbias: np.ndarray | None
    dsinks: np.ndarray | None


class PagedGatherGrads(NamedTuple):
    """Gradient of :func:`paged_gather` (returned by :func:`paged_gather_backward`).

    Fields
    ------
    dpages : ndarray, shape of ``pages`` (P, Hk, page_size, D)
        The cotangents of the valid slots added into the page slots they came from (a page used by
        several sequences accumulates them all); 0 for slots no valid position reads.
    """

    dpages: np.ndarray


def _int_array(x, name, ndim):
    a = np.asarray(x)
    if a.ndim != ndim or a.dtype.kind not in "iu":
        raise RefAttnError(f"{name}: expected a {ndim}-D integer array, got dtype {a.dtype} shape {a.shape}")
    return a.astype(np.int64)


DECODE_ALIGN = "bottom_right"  # the new queries are the newest tokens of each sequence
_PER_SCORE = ("mask", "bias", "dropout_mask")
_REFUSED = {
    "align": "decode is always aligned bottom-right to each cache length (query i sits at cache_lengths[b] - Lq + i)",
    "backend": 'each sequence is one refattn.sdpa call on its valid prefix, with backend="auto"',
}


def _decode_setup(q, k_cache, v_cache, cache_lengths, options):
    """Validated args over the whole cache and the per-sequence sdpa options (cache truncated)."""
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if np.ndim(x) != 4:
            raise RefAttnError(f"{name}: expected a (B, H, L, D) array, got shape {np.shape(x)}")
    structure = {n: options[n] for n in ("causal", "window") if n in options}
    rest = {n: v for n, v in options.items() if n not in structure}
    a = _sdpa.validate(q, k_cache, v_cache, names=_NAMES, **rest)
    b, lc = a.k.shape[0], a.k.shape[2]
    lens = _int_array(cache_lengths, "cache_lengths", 1)
    if lens.shape != (b,) or lens.min(initial=1) < 1 or lens.max(initial=1) > lc:
        raise RefAttnError(f"cache_lengths: expected {b} lengths in [1, Lc={lc}], got {lens.tolist()}")
    per_seq = []
    for i, n in enumerate(lens):
        o = {**rest, **structure, "align": DECODE_ALIGN}
        for name in _PER_SCORE:
            if rest.get(name) is not None:
                o[name] = np.broadcast_to(np.asarray(rest[name]), a.score_shape)[i, ..., :n]
        if a.sinks is not None:
            o["sinks"] = np.broadcast_to(a.sinks, a.score_shape[:2])[i]
        per_seq.append((int(n), o))
    return a, per_seq


@takes_sdpa_options(refuses=_REFUSED)
def decode(q, k_cache, v_cache, *, cache_lengths, return_lse=False, **options):
    """Attention of new queries over a KV cache: sdpa on each sequence's valid prefix.

    ``out[b] = sdpa(q[b], k_cache[b, :, :n_b], v_cache[b, :, :n_b], align="bottom_right",
    **options_b)`` with ``n_b = cache_lengths[b]``: query i of sequence b sits at position
    ``n_b − Lq + i`` (the new queries are the newest tokens, their keys and values normally
    already in the cache), so ``causal`` allows keys ``j <= n_b − Lq + i`` and ``window`` is
    aligned likewise.  Slots past ``n_b`` are not keys at all (they never enter a softmax, not even
    the ``"uniform"`` empty-row mean); a length below ``Lq`` leaves the first query rows empty
    under ``causal`` (``empty_rows`` applies).  The options are :func:`refattn.sdpa`'s, with the
    per-score arrays (``mask``, ``bias``, ``dropout_mask``) broadcastable to the whole cache
    ``(B, Hq, Lq, Lc)`` and sliced per sequence, ``sinks`` to ``(B, Hq)``; ``align`` is refused
    (always bottom-right to each cache length) and ``backend`` too (each sequence is one sdpa call
    with ``backend="auto"``).

    Parameters
    ----------
    q : array_like, shape (B, Hq, Lq, D)
        The new queries; exactly 4-D; finite, converted to float64.
    k_cache : array_like, shape (B, Hk, Lc, D)
        The key cache; ``Hk`` divides ``Hq`` (GQA); exactly 4-D.  Slots past a length may hold
        anything finite.
    v_cache : array_like, shape (B, Hk, Lc, Dv)
        The value cache, likewise.
    cache_lengths : array_like of int, shape (B,)
        Each sequence's valid length ``n_b``, in ``[1, Lc]``.
    return_lse : bool, default False
        Also return ``lse``.

    Returns
    -------
    out : ndarray of float64, shape (B, Hq, Lq, Dv)
    lse : ndarray of float64, shape (B, Hq, Lq)
        Only with ``return_lse=True``, as ``(out, lse)``: the log of each row's softmax
        denominator over its sequence's valid keys, the sink included; ``-inf`` on empty rows.
    """
    return_lse = as_flag(return_lse, "return_lse")
    a, per_seq = _decode_setup(q, k_cache, v_cache, cache_lengths, options)
    parts = [_sdpa.sdpa(a.q[i], a.k[i, :, :n], a.v[i, :, :n], return_lse=True, **o) for i, (n, o) in enumerate(per_seq)]
    out, lse = np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])
    return (out, lse) if return_lse else out


@takes_sdpa_options(refuses={**_REFUSED, "return_lse": BACKWARD_RETURN_LSE})
def decode_backward(d_out, q, k_cache, v_cache, *, cache_lengths, d_lse=None, **options):
    """Gradients of :func:`decode`: per sequence, :func:`refattn.sdpa_backward` on its valid prefix.

    Cache slots past each length get zero gradient.  The options must be those of the forward
    call; ``align``, ``backend`` and ``return_lse`` are refused.

    Parameters
    ----------
    d_out : array_like, shape (B, Hq, Lq, Dv)
        Cotangent of ``out``: exactly the output's shape, finite.
    q, k_cache, v_cache : array_like
        As :func:`decode`: ``(B, Hq, Lq, D)``, ``(B, Hk, Lc, D)``, ``(B, Hk, Lc, Dv)``.
    cache_lengths : array_like of int, shape (B,)
        As the forward's, in ``[1, Lc]``.
    d_lse : array_like, shape (B, Hq, Lq), optional
        Cotangent of ``lse`` (when the forward returned it).  Default None: no lse term.

    Returns
    -------
    DecodeGrads
        ``(dq, dk_cache, dv_cache, dbias, dsinks)``, float64, each of its input's shape;
        ``dbias``/``dsinks`` None without bias/sinks.
    """
    a, per_seq = _decode_setup(q, k_cache, v_cache, cache_lengths, options)
    d_o = as_cotangent(d_out, a.score_shape[:-1] + a.v.shape[-1:], "d_out")
    dl = None if d_lse is None else as_cotangent(d_lse, a.score_shape[:-1], "d_lse")
    dq, dk, dv = np.zeros(a.q.shape), np.zeros(a.k.shape), np.zeros(a.v.shape)
    dbias = None if a.bias is None else np.zeros(a.score_shape)
    dsinks = None if a.sinks is None else np.zeros(a.score_shape[:2])
    for i, (n, o) in enumerate(per_seq):
        g = _sdpa.sdpa_backward(d_o[i], a.q[i], a.k[i, :, :n], a.v[i, :, :n], d_lse=None if dl is None else dl[i], **o)
        dq[i], dk[i, :, :n], dv[i, :, :n] = g.dq, g.dk, g.dv
        if dbias is not None:
            dbias[i, ..., :n] = g.dbias
        if dsinks is not None:
            dsinks[i] = g.dsinks
    return DecodeGrads(
        dq,
        dk,
        dv,
        None if dbias is None else unbroadcast(dbias, a.bias.shape),
        None if dsinks is None else unbroadcast(dsinks, a.sinks.shape),
    )


def _paged_setup(pages, block_table, lengths):
    pages = as_float(pages, "pages", ndim_min=4)
    if pages.ndim != 4:
        raise RefAttnError(f"pages: expected (num_pages, Hk, page_size, D), got shape {pages.shape}")
    table = _int_array(block_table, "block_table", 2)
    lens = _int_array(lengths, "lengths", 1)
    n_pages, _, page, _ = pages.shape
    if lens.shape != table.shape[:1]:
        raise RefAttnError(f"lengths: expected shape {table.shape[:1]} (one per block_table row), got {lens.shape}")
    if lens.min(initial=0) < 0 or lens.max(initial=0) > table.shape[1] * page:
        raise RefAttnError(f"lengths: expected values in [0, {table.shape[1] * page}], got {lens.tolist()}")
    slot = np.arange(table.shape[1] * page)  # (S,)
    valid = slot[None, :] < lens[:, None]  # (B, S)
    page_of = table[:, slot // page]  # (B, S)
    used = page_of[valid]
    if used.size and (used.min() < 0 or used.max() >= n_pages):
        raise RefAttnError(f"block_table: expected page ids in [0, {n_pages}) for every used slot, got {used.tolist()}")
    return pages, np.where(valid, page_of, 0), slot % page, valid


def paged_gather(pages, block_table, lengths):
    """Paged KV (vLLM's PagedAttention layout) gathered into dense per-sequence arrays.

    Slot ``s`` of sequence ``b`` is slot ``s % page_size`` of page ``block_table[b, s // page_size]``:
    ``dense[b, :, s] = pages[block_table[b, s // page_size], :, s % page_size]`` for
    ``s < lengths[b]``, and 0 past each length (never data of an unused page).

    Parameters
    ----------
    pages : array_like, shape (P, Hk, page_size, D)
        The page pool (each page in refattn's ``(H, L, D)`` order); exactly 4-D; finite.
    block_table : array_like of int, shape (B, max_pages)
        Page ids of each sequence, in order; the ids of used slots must lie in ``[0, P)``, unused
        entries may be anything (-1, say).
    lengths : array_like of int, shape (B,)
        Each sequence's valid length, in ``[0, max_pages·page_size]``.

    Returns
    -------
    dense : ndarray of float64, shape (B, Hk, S, D)
        ``S = max_pages·page_size``; zero past each length.
    valid : ndarray of bool, shape (B, S)
        True on the slots below each length (``valid[:, None, None, :]`` is a key mask for sdpa).
    """
    pages, page_of, offset, valid = _paged_setup(pages, block_table, lengths)
    dense = pages[page_of, :, offset[None, :], :]  # (B, S, Hk, D)
    dense = np.where(valid[:, :, None, None], dense, 0.0)
    return np.moveaxis(dense, 1, 2), valid


def paged_gather_backward(d_dense, pages, block_table, lengths):
    """Gradient of :func:`paged_gather` w.r.t. ``pages``: a scatter-add of the valid slots.

    ``dpages[block_table[b, s // page_size], :, s % page_size] += d_dense[b, :, s]`` for every
    ``s < lengths[b]``; a page used by several sequences accumulates them all.

    Parameters
    ----------
    d_dense : array_like, shape (B, Hk, S, D)
        Cotangent of ``dense``: exactly its shape, finite (entries past a length are ignored).
    pages, block_table, lengths : array_like
        As :func:`paged_gather`: ``(P, Hk, page_size, D)``, int ``(B, max_pages)``, int ``(B,)``.

    Returns
    -------
    PagedGatherGrads
        ``(dpages,)``, float64, of ``pages``' shape.
    """
    pages, page_of, offset, valid = _paged_setup(pages, block_table, lengths)
    b, s = valid.shape
    dd = as_cotangent(d_dense, (b, pages.shape[1], s, pages.shape[3]), "d_dense")
    dpages = np.zeros(pages.shape)
    bi, si = np.nonzero(valid)
    np.add.at(dpages, (page_of[bi, si], slice(None), offset[si]), dd[bi, :, si, :])
    return PagedGatherGrads(dpages)


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
