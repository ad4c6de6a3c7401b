"""Head detectors with TransformerLens semantics (``head_detector.py``, error measure "mul"), unrounded.

``score = Σ(P' ⊙ D) / Σ P'`` per map, where ``P'`` is P with masked entries, optionally the BOS
column (``exclude_bos``: the first real token, column 0 without a mask) and the diagonal
(``exclude_current_token``) set to 0, and D the detection pattern (lower-triangular):

* previous token: ``D[i, i−1] = 1``;
* duplicate token: ``D[i, j] = 1`` iff ``tokens[j] == tokens[i]``, ``j < i`` and key j is a real token;
* induction: the duplicate pattern shifted one key to the right, ``D[i, j] = dup[i, j−1]``, then ``tril``.

``P (..., H, L, L)`` (square); ``tokens (L,)`` or per example ``P.shape[:-3] + (L,)`` (integer ids or
strings).  Results ``score (..., H)``; each backward takes its cotangent ``d_score`` and returns
:class:`~refattn.metrics.MapGrads` ``(dP)``.  ``mask``: True = real token (a key-padding mask
``P.shape[:-3] + (L,)``, or a bool mask broadcastable to P, True = kept).  With contiguous padding (left
or right) given as ``mask``, each score equals that of the cropped map.
"""

from __future__ import annotations

import numpy as np

from refattn._validate import RefAttnError, RefAttnTypeError, as_cotangent, as_flag, check_keywords_of, to_numpy
from refattn.metrics._maps import MapGrads, attention_map, masked_grad, real_keys

__all__ = [
    "duplicate_token_pattern",
    "duplicate_token_score",
    "duplicate_token_score_backward",
    "induction_pattern",
    "induction_score",
    "induction_score_backward",
    "previous_token_score",
    "previous_token_score_backward",
]


def _tokens(tokens, shape):
    t = to_numpy(tokens, "tokens")
    if t.dtype.kind not in "iuUSO":
        raise RefAttnTypeError(f"tokens: expected token ids (integers) or strings, got dtype {t.dtype}")
    n = shape[-1]
    if t.shape == (n,) or (len(shape) >= 3 and t.shape == tuple(shape[:-3]) + (n,)):
        return t
    raise RefAttnError(f"tokens: expected shape ({n},) or {tuple(shape[:-3]) + (n,)}, got {t.shape}")


def duplicate_token_pattern(tokens, *, real=None):
    """The duplicate-token pattern ``D (..., L, L)``: 1 where an earlier key carries the query's token.

    ``D[i, j] = 1`` iff ``tokens[j] == tokens[i]``, ``j < i`` and (with ``real``) key j is a real
    token; 0 elsewhere (strictly lower-triangular).

    Parameters
    ----------
    tokens : array_like of int or str, shape (..., L)
        The token of each position (integer ids or strings); leading dims are batch dims.
    real : array_like of bool, broadcastable to (..., L), optional
        True = real token: only real keys count, so a pad id equal to a token is no duplicate.
        Default None: every key counts.

    Returns
    -------
    D : ndarray of float64, shape (..., L, L)
        0/1 pattern, rows = queries.
    """
    t = np.asarray(tokens)
    same = t[..., :, None] == t[..., None, :]
    if real is not None:
        same = same & real[..., None, :]
    return np.tril(same, k=-1).astype(np.float64)


def induction_pattern(tokens, *, real=None):
    """The induction pattern ``D (..., L, L)``: 1 on the key right after an earlier copy of the query's token.

    ``D[i, j] = dup[i, j − 1]`` (the duplicate pattern of :func:`duplicate_token_pattern` shifted one
    key to the right, column 0 zero), then ``tril``: query i attends the token that followed an earlier
    occurrence of its own token (Olsson et al. 2022).

    Parameters
    ----------
    tokens : array_like of int or str, shape (..., L)
        The token of each position (integer ids or strings); leading dims are batch dims.
    real : array_like of bool, broadcastable to (..., L), optional
        True = real token, as in :func:`duplicate_token_pattern`: only real keys match.  Default
        None: every key counts.

    Returns
    -------
    D : ndarray of float64, shape (..., L, L)
        0/1 pattern, rows = queries, lower-triangular.
    """
    dup = duplicate_token_pattern(tokens, real=real)
    shifted = np.zeros_like(dup)
    shifted[..., 1:] = dup[..., :-1]
    return np.tril(shifted)


def _pattern_for(kind, shape, tokens, real=None):
    """The detection pattern, broadcastable to maps of ``shape (..., H, L, L)``; ``real (..., H, L)``
    (keys that are real tokens, per map) or None."""
    n = shape[-1]
    if kind == "previous":
        return np.eye(n, k=-1)
    t = _tokens(tokens, shape)
    if t.ndim > 1:
        t = t[..., None, :]  # (..., 1, L): one token sequence per example, shared by its heads
    return (duplicate_token_pattern if kind == "duplicate" else induction_pattern)(t, real=real)


def _prepared(P, mask, exclude_bos, exclude_current_token, check_probabilities):
    """The map, the real keys ``(..., H, L)`` (None without a mask) and the kept entries ``keep``."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    if m.p.shape[-1] != m.p.shape[-2]:
        raise RefAttnError(f"P: expected square maps (..., L, L), got shape {m.p.shape}")
    real = None if mask is None else real_keys(m)
    keep = np.ones(m.p.shape[-2:])
    if as_flag(exclude_bos, "exclude_bos"):
        if real is None:
            keep[:, 0] = 0.0
        else:  # BOS is the first real token: under left padding it is not column 0
            first = np.argmax(real, axis=-1)  # (..., H)
            keep = np.where(np.arange(m.p.shape[-1]) == first[..., None, None], 0.0, keep)
    if as_flag(exclude_current_token, "exclude_current_token"):
        keep = keep * (1.0 - np.eye(m.p.shape[-1]))
    return m, real, keep


def _score(P, pattern_kind, tokens, mask, exclude_bos, exclude_current_token, check_probabilities):
    m, real, keep = _prepared(P, mask, exclude_bos, exclude_current_token, check_probabilities)
    d = _pattern_for(pattern_kind, m.p.shape, tokens, real)
    pk = m.p * keep
    total = pk.sum(axis=(-2, -1))
    return np.where(total > 0, (pk * d).sum(axis=(-2, -1)) / np.where(total > 0, total, 1.0), 0.0)


def _score_backward(d_score, P, pattern_kind, tokens, mask, exclude_bos, exclude_current_token, check_probabilities):
    """``d score / dP' = (D − score) / Σ P'``."""
    m, real, keep = _prepared(P, mask, exclude_bos, exclude_current_token, check_probabilities)
    d_pat = _pattern_for(pattern_kind, m.p.shape, tokens, real)
    pk = m.p * keep
    total = pk.sum(axis=(-2, -1))
    score = np.where(total > 0, (pk * d_pat).sum(axis=(-2, -1)) / np.where(total > 0, total, 1.0), 0.0)
    g = as_cotangent(d_score, m.p.shape[:-2], "d_score")
    scale = np.where(total > 0, g / np.where(total > 0, total, 1.0), 0.0)[..., None, None]
    return MapGrads(masked_grad(m, scale * (d_pat - score[..., None, None]) * keep))


def previous_token_score(P, *, mask=None, exclude_bos=False, exclude_current_token=False, check_probabilities=True):
    """Previous-token score ``score (..., H)``: the share of each map's mass on ``D[i, i−1]``.

    ``score = Σ_ij P'_ij D_ij / Σ_ij P'_ij`` per map, ``P'`` = P with masked entries (and, by option,
    the BOS column and the diagonal) set to 0, and D the previous-token pattern (lower-triangular):
    ``D[i, i − 1] = 1``.  In [0, 1]; 0 for a map with ``Σ P' = 0``.  TransformerLens' ``head_detector``
    (``error_measure="mul"``) without its rounding to three decimals.

    Axes: ``...`` batch dims, ``H`` heads, ``L`` tokens (queries = keys).

    Parameters
    ----------
    P : array_like, shape (..., H, L, L)
        Attention maps, rows = queries, square (``Lq = Lk = L``); any real dtype (bfloat16 too),
        converted to float64, never mutated; finite.  Leading dims ``...`` are batch dims; a single
        map ``(L, L)`` is accepted too.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P.shape[:-3] + (L,)`` (per example, shared by its
        heads) or ``P.shape[:-2] + (L,)`` (per map), which also marks the padded query rows; or a bool
        mask broadcastable to P (True = the entry is kept; a row is real when it keeps some key).
        Masked entries count as 0.  With contiguous padding (left or right) each score
        equals that of the cropped map.  Default None: every token real.
    exclude_bos : bool, default False
        Also set to 0 the column of the first real token (BOS: column 0 without a mask, the first
        real key of each map with one), in the numerator and in ``Σ P'``.
    exclude_current_token : bool, default False
        Also set the diagonal ``P_ii`` to 0.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the first offending row, with its sum and minimum) a map whose
        real rows are not probabilities: entries >= 0, each row summing to 1 over its allowed keys
        within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).  False: measure
        the map as it is (maps with sinks or dropout).

    Returns
    -------
    score : ndarray of float64, shape P.shape[:-2], i.e. (..., H)
        The share of each map's (kept) mass on the pattern.

    Raises
    ------
    RefAttnError
        A map that is not square, a bad ``mask`` shape, or rows that are not probabilities
        (``RefAttnTypeError`` for a non-bool mask).
    """
    return _score(P, "previous", None, mask, exclude_bos, exclude_current_token, check_probabilities)


def previous_token_score_backward(
    d_score, P, *, mask=None, exclude_bos=False, exclude_current_token=False, check_probabilities=True
):
    """Gradient of :func:`previous_token_score`: ``dP = ∂/∂P of Σ d_score · score``.

    ``score = Σ P' D / Σ P'`` gives ``dP_ij = d_score (D_ij − score) / Σ P'`` on the kept entries of
    each map, 0 on masked, excluded (BOS, diagonal) and padded entries and on maps with ``Σ P' = 0``.

    Parameters
    ----------
    d_score : array_like, shape P.shape[:-2], i.e. (..., H)
        Cotangent of ``score``: exactly its shape, finite.
    P : array_like, shape (..., H, L, L)
        As :func:`previous_token_score`.
    mask, exclude_bos, exclude_current_token, check_probabilities
        The forward's options, as :func:`previous_token_score` (same defaults; ``mask``: True = real token).

    Returns
    -------
    MapGrads
        ``(dP,)``: float64, P's shape.
    """
    return _score_backward(d_score, P, "previous", None, mask, exclude_bos, exclude_current_token, check_probabilities)


def duplicate_token_score(
    P, tokens, *, mask=None, exclude_bos=False, exclude_current_token=False, check_probabilities=True
):
    """Duplicate-token score ``score (..., H)``: the share of each map's mass on earlier keys carrying the
    query's token.

    ``score = Σ_ij P'_ij D_ij / Σ_ij P'_ij`` per map, ``P'`` = P with masked entries (and, by option,
    the BOS column and the diagonal) set to 0, and D the duplicate-token pattern (lower-triangular):
    ``D[i, j] = 1`` iff ``tokens[j] == tokens[i]``, ``j < i`` and key j is a real token
    (:func:`duplicate_token_pattern`).  In [0, 1]; 0 for a map with ``Σ P' = 0``.  TransformerLens' ``head_detector``
    (``error_measure="mul"``) without its rounding to three decimals.

    Axes: ``...`` batch dims, ``H`` heads, ``L`` tokens (queries = keys).

    Parameters
    ----------
    P : array_like, shape (..., H, L, L)
        Attention maps, rows = queries, square (``Lq = Lk = L``); any real dtype (bfloat16 too),
        converted to float64, never mutated; finite.  Leading dims ``...`` are batch dims; a single
        map ``(L, L)`` is accepted too.
    tokens : array_like of int or str, shape (L,) or P.shape[:-3] + (L,)
        The token of each position (integer ids or strings; floats are refused), one sequence shared
        by every map or one per example (shared by its heads).  What a padded position holds is
        ignored.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P.shape[:-3] + (L,)`` (per example, shared by its
        heads) or ``P.shape[:-2] + (L,)`` (per map), which also marks the padded query rows; or a bool
        mask broadcastable to P (True = the entry is kept; a row is real when it keeps some key).
        Masked entries count as 0; only real keys match the pattern.  With contiguous padding (left or right) each score
        equals that of the cropped map.  Default None: every token real.
    exclude_bos : bool, default False
        Also set to 0 the column of the first real token (BOS: column 0 without a mask, the first
        real key of each map with one), in the numerator and in ``Σ P'``.
    exclude_current_token : bool, default False
        Also set the diagonal ``P_ii`` to 0.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the first offending row, with its sum and minimum) a map whose
        real rows are not probabilities: entries >= 0, each row summing to 1 over its allowed keys
        within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).  False: measure
        the map as it is (maps with sinks or dropout).

    Returns
    -------
    score : ndarray of float64, shape P.shape[:-2], i.e. (..., H)
        The share of each map's (kept) mass on the pattern.

    Raises
    ------
    RefAttnError
        A map that is not square, a bad ``tokens`` or ``mask`` shape, or rows that are not probabilities
        (``RefAttnTypeError`` for float tokens or a non-bool mask).
    """
    return _score(P, "duplicate", tokens, mask, exclude_bos, exclude_current_token, check_probabilities)


def duplicate_token_score_backward(
    d_score, P, tokens, *, mask=None, exclude_bos=False, exclude_current_token=False, check_probabilities=True
):
    """Gradient of :func:`duplicate_token_score`: ``dP = ∂/∂P of Σ d_score · score``.

    ``score = Σ P' D / Σ P'`` gives ``dP_ij = d_score (D_ij − score) / Σ P'`` on the kept entries of
    each map, 0 on masked, excluded (BOS, diagonal) and padded entries and on maps with ``Σ P' = 0``.

    Parameters
    ----------
    d_score : array_like, shape P.shape[:-2], i.e. (..., H)
        Cotangent of ``score``: exactly its shape, finite.
    P : array_like, shape (..., H, L, L)
        As :func:`duplicate_token_score`.
    tokens
        As :func:`duplicate_token_score`.
    mask, exclude_bos, exclude_current_token, check_probabilities
        The forward's options, as :func:`duplicate_token_score` (same defaults; ``mask``: True = real token).

    Returns
    -------
    MapGrads
        ``(dP,)``: float64, P's shape.
    """
    return _score_backward(
        d_score, P, "duplicate", tokens, mask, exclude_bos, exclude_current_token, check_probabilities
    )


def induction_score(P, tokens, *, mask=None, exclude_bos=False, exclude_current_token=False, check_probabilities=True):
    """Induction score ``score (..., H)``: the share of each map's mass on the key after an earlier copy
    of the query's token.

    ``score = Σ_ij P'_ij D_ij / Σ_ij P'_ij`` per map, ``P'`` = P with masked entries (and, by option,
    the BOS column and the diagonal) set to 0, and D the induction pattern (lower-triangular):
    the duplicate pattern shifted one key to the right, ``D[i, j] = dup[i, j − 1]``
    (:func:`induction_pattern`).  In [0, 1]; 0 for a map with ``Σ P' = 0``.  TransformerLens' ``head_detector``
    (``error_measure="mul"``) without its rounding to three decimals.

    Axes: ``...`` batch dims, ``H`` heads, ``L`` tokens (queries = keys).

    Parameters
    ----------
    P : array_like, shape (..., H, L, L)
        Attention maps, rows = queries, square (``Lq = Lk = L``); any real dtype (bfloat16 too),
        converted to float64, never mutated; finite.  Leading dims ``...`` are batch dims; a single
        map ``(L, L)`` is accepted too.
    tokens : array_like of int or str, shape (L,) or P.shape[:-3] + (L,)
        The token of each position (integer ids or strings; floats are refused), one sequence shared
        by every map or one per example (shared by its heads).  What a padded position holds is
        ignored.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P.shape[:-3] + (L,)`` (per example, shared by its
        heads) or ``P.shape[:-2] + (L,)`` (per map), which also marks the padded query rows; or a bool
        mask broadcastable to P (True = the entry is kept; a row is real when it keeps some key).
        Masked entries count as 0; only real keys match the pattern.  With contiguous padding (left or right) each score
        equals that of the cropped map.  Default None: every token real.
    exclude_bos : bool, default False
        Also set to 0 the column of the first real token (BOS: column 0 without a mask, the first
        real key of each map with one), in the numerator and in ``Σ P'``.
    exclude_current_token : bool, default False
        Also set the diagonal ``P_ii`` to 0.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the first offending row, with its sum and minimum) a map whose
        real rows are not probabilities: entries >= 0, each row summing to 1 over its allowed keys
        within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).  False: measure
        the map as it is (maps with sinks or dropout).

    Returns
    -------
    score : ndarray of float64, shape P.shape[:-2], i.e. (..., H)
        The share of each map's (kept) mass on the pattern.

    Raises
    ------
    RefAttnError
        A map that is not square, a bad ``tokens`` or ``mask`` shape, or rows that are not probabilities
        (``RefAttnTypeError`` for float tokens or a non-bool mask).
    """
    return _score(P, "induction", tokens, mask, exclude_bos, exclude_current_token, check_probabilities)


def induction_score_backward(
    d_score, P, tokens, *, mask=None, exclude_bos=False, exclude_current_token=False, check_probabilities=True
):
    """Gradient of :func:`induction_score`: ``dP = ∂/∂P of Σ d_score · score``.

    ``score = Σ P' D / Σ P'`` gives ``dP_ij = d_score (D_ij − score) / Σ P'`` on the kept entries of
    each map, 0 on masked, excluded (BOS, diagonal) and padded entries and on maps with ``Σ P' = 0``.

    Parameters
    ----------
    d_score : array_like, shape P.shape[:-2], i.e. (..., H)
        Cotangent of ``score``: exactly its shape, finite.
    P : array_like, shape (..., H, L, L)
        As :func:`induction_score`.
    tokens
        As :func:`induction_score`.
    mask, exclude_bos, exclude_current_token, check_probabilities
        The forward's options, as :func:`induction_score` (same defaults; ``mask``: True = real token).

    Returns
    -------
    MapGrads
        ``(dP,)``: float64, P's shape.
    """
    return _score_backward(
        d_score, P, "induction", tokens, mask, exclude_bos, exclude_current_token, check_probabilities
    )


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
