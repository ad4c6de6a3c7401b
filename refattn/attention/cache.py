"""KV-cache decoding, the past/present KV append, ONNX's short masks and paged KV gathering.

Axes: ``B`` sequences, ``Hq``/``Hk`` query/kv heads, ``Lq`` new queries, ``Lc`` cache slots,
``D``/``Dv`` head dims; append: ``Lp`` past and ``Ln`` new positions; paged: ``P`` pages of
``page_size`` slots, ``S = max_pages·page_size``.

* ``append(past_k (B, Hk, Lp, D), past_v (B, Hk, Lp, Dv), k (B, Hk, Ln, D), v (B, Hk, Ln, Dv))``:
  ONNX Attention's ``present_key``/``present_value``, the past and the new keys/values
  concatenated along the length axis -2: ``(B, Hk, Lp + Ln, D)``; a None past is empty.
* ``extend_mask(mask (..., m), total_length)``: a mask with fewer columns than the keys, padded as
  ONNX pads ``attn_mask``: the missing columns ``m..total_length-1`` are False (bool) or ``-inf``
  (additive float), i.e. masked.

* ``decode(q (B, Hq, Lq, D), k_cache (B, Hk, Lc, D), v_cache (B, Hk, Lc, Dv), *, cache_lengths (B,))``:
  the new queries (the last ``Lq`` tokens of each sequence, normally already appended to the
  cache) attend to the first ``cache_lengths[b]`` (≥ 0) cached keys: it is sdpa on each
  sequence's valid prefix, ``causal``/``window`` aligned bottom-right to it (query i sits at
  position ``cache_lengths[b] − Lq + i``).  Slots past a length are not keys at all (they never
  enter a softmax, not even the ``"uniform"`` empty-row mean); a length of 0 gives zero output
  rows whatever ``empty_rows`` says.  ``mask``/``bias`` with fewer than ``Lc`` columns are padded by
  :func:`extend_mask`.
* ``paged_gather(pages (P, Hk, page_size, D), block_table (B, max_pages), lengths (B,))``:
  dense ``(B, Hk, max_pages·page_size, D)`` keys (zero beyond each length) and a validity
  mask ``(B, max_pages·page_size)``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refattn._validate import (
    RefAttnError,
    RefAttnTypeError,
    as_cotangent,
    as_flag,
    as_float,
    as_int,
    check_keywords_of,
    to_numpy,
    unbroadcast,
)
from refattn.attention import sdpa as _sdpa
from refattn.attention.options import BACKWARD_RETURN_LSE, takes_sdpa_options

__all__ = [
    "AppendGrads",
    "DecodeGrads",
    "ExtendMaskGrads",
    "PagedGatherGrads",
    "append",
    "append_backward",
    "decode",
    "decode_backward",
    "extend_mask",
    "extend_mask_backward",
    "paged_gather",
    "paged_gather_backward",
]


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


class AppendGrads(NamedTuple):
    """Gradients of :func:`append` (returned by :func:`append_backward`): the cotangents of the
    present keys/values split back at ``Lp``.

    Fields
    ------
    dpast_k : ndarray or None
        ``d_present_k[:, :, :Lp]``, shape of ``past_k`` (B, Hk, Lp, D); None when no past was given.
    dpast_v : ndarray or None
        ``d_present_v[:, :, :Lp]``, shape of ``past_v`` (B, Hk, Lp, Dv); None when no past was given.
    dk : ndarray, shape of ``k`` (B, Hk, Ln, D)
        ``d_present_k[:, :, Lp:]``.
    dv : ndarray, shape of ``v`` (B, Hk, Ln, Dv)
        ``d_present_v[:, :, Lp:]`` (0 when no ``d_present_v`` was given).
    """

    dpast_k: np.ndarray | None
    dpast_v: np.ndarray | None
    dk: np.ndarray
    dv: np.ndarray


class ExtendMaskGrads(NamedTuple):
    """Gradient of :func:`extend_mask` for an additive (float) mask (returned by
    :func:`extend_mask_backward`).

    Fields
    ------
    dmask : ndarray, shape of ``mask`` (..., m)
        The cotangent's first ``m`` columns; the padded ``-inf`` columns are constants.
    """

    dmask: np.ndarray


def _int_array(x, name, ndim):
    a = np.asarray(x)
    if a.ndim != ndim or a.dtype.kind not in "iu":
        raise RefAttnError(f"{name}: expected a {ndim}-D integer array, got dtype {a.dtype} shape {a.shape}")
    return a.astype(np.int64)


DECODE_ALIGN = "bottom_right"  # the new queries are the newest tokens of each sequence
_PER_SCORE = ("mask", "bias", "dropout_mask")
_PER_SEQUENCE = ("q_lengths", "k_lengths", "k_starts")  # broadcastable to (B,): one value per sequence
_STRUCTURE = ("causal", "window", "chunk", "sink_tokens")  # aligned per sequence, not over the whole cache
_REFUSED = {
    "align": "decode is always aligned bottom-right to each cache length (query i sits at cache_lengths[b] - Lq + i)",
    "backend": 'each sequence is one refattn.sdpa call on its valid prefix, with backend="auto"',
}


def _decode_setup(q, k_cache, v_cache, cache_lengths, options):
    """Validated args over the whole cache and the per-sequence sdpa options (cache truncated)."""
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if np.ndim(x) != 4:
            raise RefAttnError(f"{name}: expected a (B, H, L, D) array, got shape {np.shape(x)}")
    structure = {n: options[n] for n in _STRUCTURE if n in options}
    rest = {n: v for n, v in options.items() if n not in structure}
    short = _short_columns(rest, np.shape(k_cache)[2])
    for name in short:
        rest[name] = _extend(rest[name], np.shape(k_cache)[2], name, _KIND[name])
    a = _sdpa.validate(q, k_cache, v_cache, names=_NAMES, **rest)
    b, lc = a.k.shape[0], a.k.shape[2]
    lens = _int_array(cache_lengths, "cache_lengths", 1)
    if lens.shape != (b,) or lens.min(initial=0) < 0 or lens.max(initial=0) > lc:
        raise RefAttnError(f"cache_lengths: expected {b} lengths in [0, Lc={lc}], got {lens.tolist()}")
    per_seq = []
    for i, n in enumerate(lens):
        o = {**rest, **structure, "align": DECODE_ALIGN}
        for name in _PER_SCORE:
            if rest.get(name) is not None:
                o[name] = np.broadcast_to(np.asarray(rest[name]), a.score_shape)[i, ..., :n]
        for name in _PER_SEQUENCE:
            if rest.get(name) is not None:
                o[name] = np.broadcast_to(np.asarray(rest[name]), (b,))[i]
        if a.sinks is not None:
            o["sinks"] = np.broadcast_to(a.sinks, a.score_shape[:2])[i]
        per_seq.append((int(n), o))
    return a, per_seq, short


_KIND = {"mask": "bool", "bias": "float"}  # ONNX's two kinds of attn_mask: refattn's mask and bias


def _short_columns(options, lc):
    """The names of the ``mask``/``bias`` options whose last dim ``m`` is ``1 < m < Lc`` (padded by
    :func:`extend_mask`; ``m = 1`` broadcasts, as everywhere in refattn)."""
    return tuple(n for n in _KIND if options.get(n) is not None and 1 < (np.shape(options[n]) or (1,))[-1] < lc)


def _no_keys(a, o):
    """``(out (Hq, Lq, Dv), lse (Hq, Lq))`` of a sequence with no key: zeros, and lse ``-inf`` (the
    sink's logit with ``sinks``: the denominator holds the sink alone)."""
    hq, lq = a.q.shape[1:3]
    out = np.zeros((hq, lq, a.v.shape[-1]))
    sinks = o.get("sinks")
    if sinks is None:
        return out, np.full((hq, lq), -np.inf)
    lse = np.repeat(np.asarray(sinks, dtype=np.float64)[:, None], lq, axis=1)  # (Hq, Lq)
    return out, lse


@takes_sdpa_options(refuses=_REFUSED)
def decode(q, k_cache, v_cache, *, cache_lengths, return_lse=False, **options):
    """Attention of new queries over a KV cache: sdpa on each sequence's valid prefix.

    ``out[b] = sdpa(q[b], k_cache[b, :, :n_b], v_cache[b, :, :n_b], align="bottom_right",
    **options_b)`` with ``n_b = cache_lengths[b]``: query i of sequence b sits at position
    ``n_b − Lq + i`` (the new queries are the newest tokens, their keys and values normally
    already in the cache), so ``causal`` allows keys ``j <= n_b − Lq + i`` and ``window`` is
    aligned likewise.  Slots past ``n_b`` are not keys at all (they never enter a softmax, not even
    the ``"uniform"`` empty-row mean); a length below ``Lq`` leaves the first query rows empty
    under ``causal`` (``empty_rows`` applies).  A length of 0 (no key at all) gives zero output rows
    whatever ``empty_rows`` says, and ``lse`` ``-inf`` (the sink's logit with ``sinks``: the
    denominator holds the sink alone), as ONNX answers zeros.  The options are :func:`refattn.sdpa`'s,
    with the per-score arrays (``mask``, ``bias``, ``dropout_mask``) broadcastable to the whole cache
    ``(B, Hq, Lq, Lc)`` and sliced per sequence, ``sinks`` to ``(B, Hq)``; a ``mask`` (bool, True = may
    attend) or ``bias`` whose last dim ``m`` is ``1 < m < Lc`` is first padded to ``Lc`` columns as ONNX
    pads a short ``attn_mask`` (:func:`extend_mask`: False / ``-inf``, the missing keys masked; a
    last dim of 1 broadcasts instead).  ``align`` is refused (always bottom-right to each cache
    length) and ``backend`` too (each sequence is one sdpa call with ``backend="auto"``).

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
        Each sequence's valid length ``n_b``, in ``[0, Lc]`` (0: no key, zero output rows).
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
    a, per_seq, _ = _decode_setup(q, k_cache, v_cache, cache_lengths, options)
    parts = [
        _sdpa.sdpa(a.q[i], a.k[i, :, :n], a.v[i, :, :n], return_lse=True, **o) if n else _no_keys(a, o)
        for i, (n, o) in enumerate(per_seq)
    ]
    out, lse = np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])
    return (out, lse) if return_lse else out


@takes_sdpa_options(refuses={**_REFUSED, "return_lse": BACKWARD_RETURN_LSE})
def decode_backward(d_out, q, k_cache, v_cache, *, cache_lengths, d_lse=None, **options):
    """Gradients of :func:`decode`: per sequence, :func:`refattn.sdpa_backward` on its valid prefix.

    Cache slots past each length get zero gradient; a sequence of length 0 has zero gradients
    (``dsinks`` aside: ``d_lse`` summed over its queries, its lse being the sink's logit).  A short
    ``bias`` (padded, as the forward pads it) gets the gradient of its own columns.  The options must
    be those of the forward call; ``align``, ``backend`` and ``return_lse`` are refused.

    Parameters
    ----------
    d_out : array_like, shape (B, Hq, Lq, Dv)
        Cotangent of ``out``: exactly the output's shape, finite.
    q, k_cache, v_cache : array_like
        As :func:`decode`: ``(B, Hq, Lq, D)``, ``(B, Hk, Lc, D)``, ``(B, Hk, Lc, Dv)``.
    cache_lengths : array_like of int, shape (B,)
        As the forward's, in ``[0, Lc]``.
    d_lse : array_like, shape (B, Hq, Lq), optional
        Cotangent of ``lse`` (when the forward returned it).  Default None: no lse term.

    Returns
    -------
    DecodeGrads
        ``(dq, dk_cache, dv_cache, dbias, dsinks)``, float64, each of its input's shape;
        ``dbias``/``dsinks`` None without bias/sinks.
    """
    a, per_seq, short = _decode_setup(q, k_cache, v_cache, cache_lengths, options)
    d_o = as_cotangent(d_out, a.score_shape[:-1] + a.v.shape[-1:], "d_out")
    dl = None if d_lse is None else as_cotangent(d_lse, a.score_shape[:-1], "d_lse")
    dq, dk, dv = np.zeros(a.q.shape), np.zeros(a.k.shape), np.zeros(a.v.shape)
    dbias = None if a.bias is None else np.zeros(a.score_shape)
    dsinks = None if a.sinks is None else np.zeros(a.score_shape[:2])
    for i, (n, o) in enumerate(per_seq):
        if n == 0:  # no keys: out = 0; lse = the sink's logit (d lse / d sink = 1 where it is finite) or -inf
            if dsinks is not None and dl is not None:
                dsinks[i] = np.where(np.isfinite(o["sinks"]), dl[i].sum(axis=-1), 0.0)
            continue
        g = _sdpa.sdpa_backward(d_o[i], a.q[i], a.k[i, :, :n], a.v[i, :, :n], d_lse=None if dl is None else dl[i], **o)
        dq[i], dk[i, :, :n], dv[i, :, :n] = g.dq, g.dk, g.dv
        if dbias is not None:
            dbias[i, ..., :n] = g.dbias
        if dsinks is not None:
            dsinks[i] = g.dsinks
    if dbias is not None:
        dbias = unbroadcast(dbias, a.bias.shape)  # (..., Lc) of the padded bias
        if "bias" in short:
            dbias = dbias[..., : np.shape(options["bias"])[-1]]  # the padded -inf columns are constants
    return DecodeGrads(dq, dk, dv, dbias, None if dsinks is None else unbroadcast(dsinks, a.sinks.shape))


# ---- past/present KV (ONNX Attention) ---------------------------------------------------------


def _append_setup(past_k, past_v, k, v):
    """Validated float64 ``(past_k or None, past_v or None, k, v)``."""
    k, v = as_float(k, "k"), as_float(v, "v")
    for name, x, dim in (("k", k, "D"), ("v", v, "Dv")):
        if x.ndim != 4:
            raise RefAttnError(f"{name}: expected a (B, Hk, Ln, {dim}) array, got shape {x.shape}")
    if v.shape[:3] != k.shape[:3]:
        raise RefAttnError(f"v: expected shape (B, Hk, Ln, Dv) with (B, Hk, Ln) = {k.shape[:3]} as k's, got {v.shape}")
    if (past_k is None) != (past_v is None):
        given, missing = ("past_k", "past_v") if past_v is None else ("past_v", "past_k")
        raise RefAttnError(f"{missing}: expected an array since {given} is given (both or neither), got None")
    if past_k is None:
        return None, None, k, v
    pk, pv = as_float(past_k, "past_k"), as_float(past_v, "past_v")
    for name, p, new, new_name in (("past_k", pk, k, "k"), ("past_v", pv, v, "v")):
        if p.ndim != 4 or p.shape[:2] != new.shape[:2] or p.shape[3] != new.shape[3]:
            want = f"({new.shape[0]}, {new.shape[1]}, Lp, {new.shape[3]})"
            raise RefAttnError(
                f"{name}: expected shape {want} (B, Hk and the head dim of {new_name} {new.shape}), got {p.shape}"
            )
    if pv.shape[2] != pk.shape[2]:
        raise RefAttnError(f"past_v: expected the past length Lp = {pk.shape[2]} of past_k {pk.shape}, got {pv.shape}")
    return pk, pv, k, v


def append(past_k, past_v, k, v):
    """ONNX Attention's KV cache update: ``present = concat(past, new)`` along the length axis -2.

    ``present_k = [past_k | k]``, ``present_v = [past_v | v]`` (the past positions first), as ONNX's
    reference ``np.concatenate((past_key, K), axis=2)``; a None past is an empty one (``present = k``,
    ``v``).  Pass ``present_k``/``present_v`` to :func:`refattn.sdpa` (or to :func:`decode` as the
    cache) for the attention itself.

    Parameters
    ----------
    past_k : array_like or None, shape (B, Hk, Lp, D)
        The past keys; ``Lp`` may be 0; exactly 4-D; finite.  None: no past (then ``past_v`` is None).
    past_v : array_like or None, shape (B, Hk, Lp, Dv)
        The past values, the same ``B``, ``Hk`` and ``Lp``; None with ``past_k``.
    k : array_like, shape (B, Hk, Ln, D)
        The new keys; ``Ln`` may be 0; exactly 4-D; finite.
    v : array_like, shape (B, Hk, Ln, Dv)
        The new values.

    Returns
    -------
    present_k : ndarray of float64, shape (B, Hk, Lp + Ln, D)
    present_v : ndarray of float64, shape (B, Hk, Lp + Ln, Dv)
        A new array each (no view of an input).

    Raises
    ------
    RefAttnError
        A non-finite entry; an array not 4-D; shapes that disagree (B, Hk, the head dims, the past
        length of ``past_k`` and ``past_v``, the new length of ``k`` and ``v``); one past given
        without the other.
    """
    pk, pv, k, v = _append_setup(past_k, past_v, k, v)
    if pk is None:
        return k, v  # already float64 copies
    return np.concatenate((pk, k), axis=2), np.concatenate((pv, v), axis=2)


def append_backward(d_present_k, past_k, past_v, k, v, *, d_present_v=None):
    """Gradients of :func:`append`: the cotangents split at ``Lp``, ``d_present[:, :, :Lp]`` for the
    past and ``d_present[:, :, Lp:]`` for the new keys/values.

    Parameters
    ----------
    d_present_k : array_like, shape (B, Hk, Lp + Ln, D)
        Cotangent of ``present_k``: exactly its shape, finite.
    past_k, past_v, k, v : array_like (past_k, past_v: or None)
        As :func:`append`.
    d_present_v : array_like, shape (B, Hk, Lp + Ln, Dv), optional
        Cotangent of ``present_v``.  Default None: no term (``dpast_v``, ``dv`` zero).

    Returns
    -------
    AppendGrads
        ``(dpast_k, dpast_v, dk, dv)``, float64, each of its input's shape; the past's None without a past.
    """
    pk, pv, k, v = _append_setup(past_k, past_v, k, v)
    lp = 0 if pk is None else pk.shape[2]
    b, hk, ln = k.shape[:3]
    dk = as_cotangent(d_present_k, (b, hk, lp + ln, k.shape[3]), "d_present_k")  # (B, Hk, Lp + Ln, D)
    if d_present_v is None:
        dv = np.zeros((b, hk, lp + ln, v.shape[3]))
    else:
        dv = as_cotangent(d_present_v, (b, hk, lp + ln, v.shape[3]), "d_present_v")  # (B, Hk, Lp + Ln, Dv)
    past = (None, None) if pk is None else (dk[:, :, :lp], dv[:, :, :lp])
    return AppendGrads(*past, dk[:, :, lp:], dv[:, :, lp:])


# ---- short masks (ONNX attn_mask with fewer columns than the keys) ----------------------------


def _extend(mask, total_length, name, kind=None):
    """``mask (..., m)`` padded to ``total_length`` columns: False (bool) or ``-inf`` (float);
    ``kind`` ("bool"/"float") leaves a mask of the other kind as it is, for the caller to refuse."""
    a = to_numpy(mask, name)
    if a.ndim < 1:
        raise RefAttnError(f"{name}: expected at least 1 dimension (..., m), got shape {a.shape}")
    is_bool = a.dtype == np.bool_
    if kind is not None and is_bool != (kind == "bool"):
        return mask
    if is_bool:
        a, fill = np.array(a, dtype=bool, copy=True), False
    elif a.dtype.kind in "iub":
        raise RefAttnTypeError(
            f"{name}: expected a bool mask (True = may attend) or a float additive mask, got dtype {a.dtype}"
        )
    else:
        a, fill = as_float(a, name, allow_neg_inf=True), -np.inf
    total = as_int(total_length, "total_length")
    m = a.shape[-1]
    if total < m:
        raise RefAttnError(f"total_length: expected at least the {m} columns of {name} {a.shape}, got {total}")
    pad = np.full(a.shape[:-1] + (total - m,), fill, dtype=a.dtype)
    return np.concatenate((a, pad), axis=-1)


def extend_mask(mask, total_length):
    """A mask with fewer columns than the keys, padded to ``total_length`` as ONNX Attention pads
    ``attn_mask``: the missing last columns are masked.

    ONNX (Attention-24, and its reference ``onnx/reference/ops/op_attention.py``): "the last dimension
    can also be shorter than total_sequence_length and will be padded ... with negative infinity";
    the reference pads at the end of the last axis with ``False`` for a bool mask and ``-inf`` for a
    float one.  So the keys ``m..total_length-1`` are never attended.  ONNX pads whenever ``m <
    total_length``, a one-column mask too (it does not broadcast it): call this before handing such a
    mask to refattn, whose masks broadcast a last dim of 1.

    Parameters
    ----------
    mask : array_like, shape (..., m)
        A bool mask (True = may attend: refattn's and ONNX's polarity) or an additive float mask (a
        ``bias``: finite or ``-inf``); at least 1-D.  Integer masks are refused (ambiguous).
    total_length : int
        The number of keys, ``>= m`` (ONNX's ``total_sequence_length = past + new``).

    Returns
    -------
    extended : ndarray, shape (..., total_length)
        bool for a bool mask, float64 for a float one; a new array.

    Raises
    ------
    RefAttnError
        ``total_length < m``; a 0-D mask; NaN or ``+inf`` in a float mask (``RefAttnTypeError``: an
        integer or non-numeric mask, a non-integer ``total_length``).
    """
    return _extend(mask, total_length, "mask")


def extend_mask_backward(d_extended, mask, total_length):
    """Gradient of :func:`extend_mask` for an additive (float) mask: ``dmask = d_extended[..., :m]``.

    Parameters
    ----------
    d_extended : array_like, shape (..., total_length)
        Cotangent of ``extended``: exactly its shape, finite.
    mask, total_length
        As :func:`extend_mask`; ``mask`` a float mask (a bool mask has no gradient: refused).

    Returns
    -------
    ExtendMaskGrads
        ``(dmask,)``, float64, of ``mask``'s shape.
    """
    if to_numpy(mask, "mask").dtype == np.bool_:
        raise RefAttnTypeError("mask: a bool mask has no gradient (extend_mask_backward is for additive float masks)")
    extended = _extend(mask, total_length, "mask")
    d = as_cotangent(d_extended, extended.shape, "d_extended")  # (..., total_length)
    return ExtendMaskGrads(d[..., : np.shape(mask)[-1]])


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
