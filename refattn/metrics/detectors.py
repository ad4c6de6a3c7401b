"""Head detectors with TransformerLens semantics (``transformer_lens/head_detector.py``), unrounded.

:func:`pattern_score` scores maps against any detection pattern D, as TransformerLens'
``compute_head_attention_similarity_score`` does; the built-in detectors are :func:`pattern_score`
with their own pattern.  Per map, with ``K`` the kept entries (not masked, and by option not the BOS
column — ``exclude_bos``: the first real token, column 0 without a mask — nor the diagonal —
``exclude_current_token``):

* ``error_measure="mul"`` (default): ``score = Σ K⊙P⊙D / Σ K⊙P``, the share of the kept mass on D
  (0 for a map with ``Σ K⊙P = 0``);
* ``error_measure="abs"``: ``score = 1 − Σ K⊙|P − D| / n_rows``, n_rows the map's real query rows
  (L without a mask; 0 for a map without one): TransformerLens' ``1 − mean|P − D| · L`` without its
  rounding to three decimals (TransformerLens rounds only this measure, never "mul").

Built-in patterns (lower-triangular):

* previous token: ``D[i, i−1] = 1``;
* duplicate token: ``D[i, j] = 1`` iff ``tokens[j] == tokens[i]``, ``j < i`` and key j is a real token;
* induction: the duplicate pattern shifted one key to the right, ``D[i, j] = dup[i, j−1]``, then ``tril``.

``P (..., H, L, L)`` (square); ``tokens (L,)`` or per example ``P.shape[:-3] + (L,)`` (integer ids or
strings); ``pattern`` broadcastable to P.  Results ``score (..., H)``, or ``(..., k)`` for ``heads``
(k head indices of axis -3); each backward takes its cotangent ``d_score`` and returns
:class:`~refattn.metrics.MapGrads` ``(dP)``.  ``mask``: True = real token (a key-padding mask
``P.shape[:-3] + (L,)``, or a bool mask broadcastable to P, True = kept).  With contiguous padding (left
or right) given as ``mask``, each score equals that of the cropped map.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refattn._validate import (
    RefAttnError,
    RefAttnTypeError,
    as_choice,
    as_cotangent,
    as_flag,
    as_float,
    check_broadcast_to,
    check_keywords_of,
    to_numpy,
)
from refattn.metrics._maps import Map, MapGrads, attention_map, masked_grad, real_keys

__all__ = [
    "ERROR_MEASURES",
    "duplicate_token_pattern",
    "duplicate_token_score",
    "duplicate_token_score_backward",
    "induction_pattern",
    "induction_score",
    "induction_score_backward",
    "pattern_score",
    "pattern_score_backward",
    "previous_token_score",
    "previous_token_score_backward",
]

#: The values of ``error_measure`` (TransformerLens' ``ErrorMeasure``).
ERROR_MEASURES = ("mul", "abs")


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


def _given_pattern(pattern):
    """``pattern_of`` for :func:`_parts`: a user's pattern, checked against the maps' shape."""

    def pattern_of(shape, real):
        d = as_float(pattern, "pattern")  # (..., L, L) broadcastable to P
        check_broadcast_to(d, shape, "pattern", "the maps P")
        return d

    return pattern_of


def _built_in(kind, tokens=None):
    """``pattern_of`` for :func:`_parts`: a built-in detector's pattern (only real keys match)."""
    return lambda shape, real: _pattern_for(kind, shape, tokens, real)


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


def _heads_index(heads, shape):
    """``heads`` as head indices in ``[0, H)`` (a 0-d or 1-D int array), None for every head."""
    if heads is None:
        return None
    if len(shape) < 3:
        raise RefAttnError(f"heads: selects heads of axis -3 of maps (..., H, L, L), got one map of shape {shape}")
    idx = to_numpy(heads, "heads")
    if idx.ndim == 1 and idx.size == 0:
        idx = idx.astype(np.int64)  # [] reads as float64
    if idx.dtype == bool or idx.dtype.kind not in "iu":
        raise RefAttnTypeError(f"heads: expected head indices (integers), got {heads!r}")
    if idx.ndim > 1:
        raise RefAttnError(f"heads: expected a head index or a 1-D list of them, got shape {idx.shape}")
    h = shape[-3]
    if idx.size and (idx.min() < -h or idx.max() >= h):
        raise RefAttnError(f"heads: expected indices in [-{h}, {h}) (axis -3 of P has {h} heads), got {idx.tolist()}")
    return idx % h


class _Parts(NamedTuple):
    measure: str
    m: Map  # the checked map, masked entries 0
    d: np.ndarray  # the pattern, broadcastable to m.p
    kept: np.ndarray  # (..., H, L, L) 1 on the entries measured (allowed, not BOS / diagonal when excluded)
    heads: np.ndarray | None  # head indices, or None for all


def _parts(P, pattern_of, mask, exclude_bos, exclude_current_token, error_measure, heads, check_probabilities):
    measure = as_choice(error_measure, "error_measure", ERROR_MEASURES)
    m, real, keep = _prepared(P, mask, exclude_bos, exclude_current_token, check_probabilities)
    d = pattern_of(m.p.shape, real)
    idx = _heads_index(heads, m.p.shape)
    return _Parts(measure, m, d, np.where(m.allowed, keep, 0.0), idx)


def _scores(parts):
    """Every map's score ``(..., H)`` and its normaliser (``Σ K⊙P`` for "mul", the real rows for "abs")."""
    m, d, kept = parts.m, parts.d, parts.kept
    if parts.measure == "mul":
        pk = m.p * kept  # (..., H, L, L) P' = K ⊙ P
        total = pk.sum(axis=(-2, -1))  # (..., H) Σ P'
        return np.where(total > 0, (pk * d).sum(axis=(-2, -1)) / np.where(total > 0, total, 1.0), 0.0), total
    rows = np.broadcast_to(m.rows, m.p.shape[:-1]).sum(axis=-1)  # (..., H) real query rows
    err = (kept * np.abs(m.p - d)).sum(axis=(-2, -1))  # (..., H) Σ K ⊙ |P − D|
    return np.where(rows > 0, 1.0 - err / np.maximum(rows, 1), 0.0), rows


def _score(P, pattern_of, mask, exclude_bos, exclude_current_token, error_measure, heads, check_probabilities):
    parts = _parts(P, pattern_of, mask, exclude_bos, exclude_current_token, error_measure, heads, check_probabilities)
    score, _ = _scores(parts)
    return score if parts.heads is None else score[..., parts.heads]


def _scatter_heads(g_heads, heads, shape):
    """The cotangent of every head ``shape (..., H)`` from that of ``score[..., heads]`` ``(..., k)``
    (or ``(...)``): the heads left out get 0, a repeated head the sum of its cotangents."""
    g = np.zeros(shape)
    np.add.at(g, (Ellipsis, heads), g_heads)
    return g


def _score_backward(
    d_score, P, pattern_of, mask, exclude_bos, exclude_current_token, error_measure, heads, check_probabilities
):
    """ "mul": ``d score / dP' = (D − score) / Σ P'``; "abs": ``d score / dP = −sign(P − D) / n_rows``."""
    parts = _parts(P, pattern_of, mask, exclude_bos, exclude_current_token, error_measure, heads, check_probabilities)
    m, d, kept = parts.m, parts.d, parts.kept
    score, norm = _scores(parts)  # (..., H) each
    if parts.heads is None:
        g = as_cotangent(d_score, score.shape, "d_score")  # (..., H)
    else:
        g_heads = as_cotangent(d_score, score.shape[:-1] + parts.heads.shape, "d_score")  # (..., k) or (...)
        g = _scatter_heads(g_heads, parts.heads, score.shape)  # (..., H)
    if parts.measure == "mul":
        # score = Σ P' D / Σ P'
        scale = np.where(norm > 0, g / np.where(norm > 0, norm, 1.0), 0.0)[..., None, None]
        return MapGrads(masked_grad(m, scale * (d - score[..., None, None]) * kept))
    # score = 1 − Σ K |P − D| / n_rows (subgradient 0 where P = D)
    scale = np.where(norm > 0, -g / np.maximum(norm, 1), 0.0)[..., None, None]
    return MapGrads(masked_grad(m, scale * np.sign(m.p - d) * kept))


def pattern_score(
    P,
    pattern,
    *,
    mask=None,
    exclude_bos=False,
    exclude_current_token=False,
    error_measure="mul",
    heads=None,
    check_probabilities=True,
):
    """How well each map matches a detection pattern: ``score (..., H)`` (``(..., k)`` with ``heads``).

    TransformerLens' ``compute_head_attention_similarity_score`` (what ``detect_head`` calls for a
    custom ``detection_pattern``), in float64 and unrounded.  Per map, with ``K`` the kept entries (not
    masked; by option not the BOS column nor the diagonal) and ``D`` the pattern:

    * ``"mul"``: ``score = Σ K⊙P⊙D / Σ K⊙P``, the share of the kept mass on D; in [0, 1] for a 0/1
      pattern; 0 for a map with ``Σ K⊙P = 0``;
    * ``"abs"``: ``score = 1 − Σ K⊙|P − D| / n_rows``, n_rows the map's real query rows (L without a
      mask): 1 for a perfect match, down to −1; 0 for a map without a real row.  TransformerLens
      returns ``1 − round(mean|P − D| · L, 3)`` (the mean over all L² entries, the excluded ones
      counting 0), i.e. ``1 − round(1 − score, 3)``: refattn does not round.

    TransformerLens asserts that D (and, for "abs", ``|P − D|``) is lower-triangular and warns for a
    "mul" pattern other than 0/1; refattn takes any finite pattern and any square map.  The
    built-in detectors (:func:`previous_token_score`, ...) are this function with their pattern.

    Axes: ``...`` batch dims, ``H`` heads, ``L`` tokens (queries = keys).

    Parameters
    ----------
    P : array_like, shape (..., H, L, L)
        Attention maps, rows = queries, square (``Lq = Lk = L``); any real dtype (bfloat16 too),
        converted to float64, never mutated; finite.  Leading dims ``...`` are batch dims; a single
        map ``(L, L)`` is accepted too (without ``heads``).
    pattern : array_like, broadcastable to P, e.g. (L, L)
        The detection pattern ``D``, rows = queries; finite, any real values (0/1 for "mul" in
        TransformerLens' reading).  Held fixed: the backward gives no gradient for it.  With a mask its
        entries on padded tokens are ignored; it is in P's (padded) coordinates.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P.shape[:-3] + (L,)`` (per example, shared by its
        heads) or ``P.shape[:-2] + (L,)`` (per map), which also marks the padded query rows; or a bool
        mask broadcastable to P (True = the entry is kept; a row is real when it keeps some key).
        Masked entries are left out of every sum.  With contiguous padding (left or right) each score
        equals that of the cropped map.  Default None: every token real.
    exclude_bos : bool, default False
        Also leave out the column of the first real token (BOS: column 0 without a mask, the first
        real key of each map with one).  In "abs" the rows still count ``n_rows`` (as in TransformerLens).
    exclude_current_token : bool, default False
        Also leave out the diagonal ``P_ii``.
    error_measure : {"mul", "abs"}, default "mul"
        The measure, as above (TransformerLens' ``error_measure``).
    heads : int or sequence of int, optional
        Score only these heads (indices of axis -3, negative ones from the end, repeats allowed):
        the result is ``score[..., heads]``, shape ``P.shape[:-3] + (k,)`` for k indices, or
        ``P.shape[:-3]`` for one int.  TransformerLens' ``heads`` (``[(layer, head), ...]`` or
        ``{layer: [head, ...]}``) maps to one call per layer with that layer's heads (its other heads
        score −1 there; here they are left out).  Every head is still checked
        (``check_probabilities``).  Default None: every head, ``(..., H)``.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the first offending row, with its sum and minimum) a map whose
        real rows are not probabilities: entries >= 0, each row summing to 1 over its allowed keys
        within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).  False: measure
        the map as it is (maps with sinks or dropout).

    Returns
    -------
    score : ndarray of float64, shape P.shape[:-2], i.e. (..., H); (..., k) or (...) with heads
        Each map's match with the pattern.

    Raises
    ------
    RefAttnError
        A map that is not square, a pattern that does not broadcast to P, a bad ``mask`` shape, an
        unknown ``error_measure``, head indices out of range, or rows that are not probabilities
        (``RefAttnTypeError`` for a non-bool mask or non-integer heads).
    """
    return _score(
        P, _given_pattern(pattern), mask, exclude_bos, exclude_current_token, error_measure, heads, check_probabilities
    )


def pattern_score_backward(
    d_score,
    P,
    pattern,
    *,
    mask=None,
    exclude_bos=False,
    exclude_current_token=False,
    error_measure="mul",
    heads=None,
    check_probabilities=True,
):
    """Gradient of :func:`pattern_score`: ``dP = ∂/∂P of Σ d_score · score`` (the pattern held fixed).

    "mul": ``score = Σ P' D / Σ P'`` (``P' = K⊙P``) gives ``dP_ij = d_score (D_ij − score) / Σ P'``;
    "abs": ``score = 1 − Σ K|P − D| / n_rows`` gives ``dP_ij = −d_score sign(P_ij − D_ij) / n_rows``
    (the subgradient 0 where ``P_ij = D_ij``).  Both on the kept entries of each map, 0 on masked,
    excluded (BOS, diagonal) and padded entries and on maps whose normaliser is 0; with ``heads``,
    the heads left out get 0 and a repeated head the sum of its cotangents.

    Parameters
    ----------
    d_score : array_like
        Cotangent of ``score``: exactly its shape (``(..., H)``, or that of ``score[..., heads]``), finite.
    P : array_like, shape (..., H, L, L)
        As :func:`pattern_score`.
    pattern : array_like, broadcastable to P
        As :func:`pattern_score`.
    mask, exclude_bos, exclude_current_token, error_measure, heads, check_probabilities
        The forward's options, as :func:`pattern_score` (same defaults; ``mask``: True = real token).

    Returns
    -------
    MapGrads
        ``(dP,)``: float64, P's shape.
    """
    return _score_backward(
        d_score,
        P,
        _given_pattern(pattern),
        mask,
        exclude_bos,
        exclude_current_token,
        error_measure,
        heads,
        check_probabilities,
    )


def previous_token_score(
    P,
    *,
    mask=None,
    exclude_bos=False,
    exclude_current_token=False,
    error_measure="mul",
    heads=None,
    check_probabilities=True,
):
    """Previous-token score ``score (..., H)``: how each map matches ``D[i, i−1] = 1``.

    :func:`pattern_score` with D the previous-token pattern (lower-triangular): ``D[i, i − 1] = 1``:
    per map, ``K`` the kept entries (not masked; by option not the BOS column nor the diagonal),
    ``"mul"``: ``score = Σ K⊙P⊙D / Σ K⊙P`` in [0, 1] (0 for a map with ``Σ K⊙P = 0``); ``"abs"``:
    ``score = 1 − Σ K⊙|P − D| / n_rows``.  TransformerLens' ``head_detector`` without its rounding
    (which it applies to "abs" only).

    Axes: ``...`` batch dims, ``H`` heads, ``L`` tokens (queries = keys).

    Parameters
    ----------
    P : array_like, shape (..., H, L, L)
        Attention maps, rows = queries, square (``Lq = Lk = L``); any real dtype (bfloat16 too),
        converted to float64, never mutated; finite.  Leading dims ``...`` are batch dims; a single
        map ``(L, L)`` is accepted too (without ``heads``).
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P.shape[:-3] + (L,)`` (per example, shared by its
        heads) or ``P.shape[:-2] + (L,)`` (per map), which also marks the padded query rows; or a bool
        mask broadcastable to P (True = the entry is kept; a row is real when it keeps some key).
        Masked entries are left out of every sum.  With contiguous padding (left or right)
        each score equals that of the cropped map.  Default None: every token real.
    exclude_bos : bool, default False
        Also leave out the column of the first real token (BOS: column 0 without a mask, the first
        real key of each map with one).
    exclude_current_token : bool, default False
        Also leave out the diagonal ``P_ii``.
    error_measure : {"mul", "abs"}, default "mul"
        ``"mul"``: the share of the kept mass on the pattern, in [0, 1]; ``"abs"``: ``1 − Σ K|P − D| /
        n_rows``, in [−1, 1] (TransformerLens' two measures, unrounded: :func:`pattern_score`).
    heads : int or sequence of int, optional
        Score only these heads (indices of axis -3): ``score[..., heads]``, shape ``P.shape[:-3] +
        (k,)`` for k indices, ``P.shape[:-3]`` for one int (:func:`pattern_score`).  Default None:
        every head.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the first offending row, with its sum and minimum) a map whose
        real rows are not probabilities: entries >= 0, each row summing to 1 over its allowed keys
        within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).  False: measure
        the map as it is (maps with sinks or dropout).

    Returns
    -------
    score : ndarray of float64, shape P.shape[:-2], i.e. (..., H); (..., k) or (...) with heads
        Each map's match with the pattern.

    Raises
    ------
    RefAttnError
        A map that is not square, a bad ``mask`` shape, an unknown ``error_measure``, head indices out of
        range, or rows that are not probabilities (``RefAttnTypeError`` for a non-bool mask or non-integer heads).
    """
    return _score(
        P,
        _built_in("previous", None),
        mask,
        exclude_bos,
        exclude_current_token,
        error_measure,
        heads,
        check_probabilities,
    )


def previous_token_score_backward(
    d_score,
    P,
    *,
    mask=None,
    exclude_bos=False,
    exclude_current_token=False,
    error_measure="mul",
    heads=None,
    check_probabilities=True,
):
    """Gradient of :func:`previous_token_score`: ``dP = ∂/∂P of Σ d_score · score``.

    :func:`pattern_score_backward` with the detector's pattern: "mul" ``dP_ij = d_score (D_ij − score) /
    Σ P'``, "abs" ``dP_ij = −d_score sign(P_ij − D_ij) / n_rows``, on the kept entries of each map; 0 on
    masked, excluded (BOS, diagonal) and padded entries, on maps whose normaliser is 0 and on the heads
    left out by ``heads``.

    Parameters
    ----------
    d_score : array_like
        Cotangent of ``score``: exactly its shape (``(..., H)``, or that of ``score[..., heads]``), finite.
    P : array_like, shape (..., H, L, L)
        As :func:`previous_token_score`.
    mask, exclude_bos, exclude_current_token, error_measure, heads, check_probabilities
        The forward's options, as :func:`previous_token_score` (same defaults; ``mask``: True = real token).

    Returns
    -------
    MapGrads
        ``(dP,)``: float64, P's shape.
    """
    return _score_backward(
        d_score,
        P,
        _built_in("previous", None),
        mask,
        exclude_bos,
        exclude_current_token,
        error_measure,
        heads,
        check_probabilities,
    )


def duplicate_token_score(
    P,
    tokens,
    *,
    mask=None,
    exclude_bos=False,
    exclude_current_token=False,
    error_measure="mul",
    heads=None,
    check_probabilities=True,
):
    """Duplicate-token score ``score (..., H)``: how each map matches the earlier keys carrying the
    query's token.

    :func:`pattern_score` with D the duplicate-token pattern (lower-triangular):
    ``D[i, j] = 1`` iff ``tokens[j] == tokens[i]``, ``j < i`` and key j is a real token
    (:func:`duplicate_token_pattern`): per map, ``K`` the kept entries (not masked; by
    option not the BOS column nor the diagonal), ``"mul"``: ``score = Σ K⊙P⊙D / Σ K⊙P`` in [0, 1] (0
    for a map with ``Σ K⊙P = 0``); ``"abs"``: ``score = 1 − Σ K⊙|P − D| / n_rows``.  TransformerLens'
    ``head_detector`` without its rounding (which it applies to "abs" only).

    Axes: ``...`` batch dims, ``H`` heads, ``L`` tokens (queries = keys).

    Parameters
    ----------
    P : array_like, shape (..., H, L, L)
        Attention maps, rows = queries, square (``Lq = Lk = L``); any real dtype (bfloat16 too),
        converted to float64, never mutated; finite.  Leading dims ``...`` are batch dims; a single
        map ``(L, L)`` is accepted too (without ``heads``).
    tokens : array_like of int or str, shape (L,) or P.shape[:-3] + (L,)
        The token of each position (integer ids or strings; floats are refused), one sequence shared
        by every map or one per example (shared by its heads).  What a padded position holds is
        ignored.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P.shape[:-3] + (L,)`` (per example, shared by its
        heads) or ``P.shape[:-2] + (L,)`` (per map), which also marks the padded query rows; or a bool
        mask broadcastable to P (True = the entry is kept; a row is real when it keeps some key).
        Masked entries are left out of every sum; only real keys match the pattern.  With contiguous
        padding (left or right) each score equals that of the cropped map.  Default None: every token real.
    exclude_bos : bool, default False
        Also leave out the column of the first real token (BOS: column 0 without a mask, the first
        real key of each map with one).
    exclude_current_token : bool, default False
        Also leave out the diagonal ``P_ii``.
    error_measure : {"mul", "abs"}, default "mul"
        ``"mul"``: the share of the kept mass on the pattern, in [0, 1]; ``"abs"``: ``1 − Σ K|P − D| /
        n_rows``, in [−1, 1] (TransformerLens' two measures, unrounded: :func:`pattern_score`).
    heads : int or sequence of int, optional
        Score only these heads (indices of axis -3): ``score[..., heads]``, shape ``P.shape[:-3] +
        (k,)`` for k indices, ``P.shape[:-3]`` for one int (:func:`pattern_score`).  Default None:
        every head.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the first offending row, with its sum and minimum) a map whose
        real rows are not probabilities: entries >= 0, each row summing to 1 over its allowed keys
        within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).  False: measure
        the map as it is (maps with sinks or dropout).

    Returns
    -------
    score : ndarray of float64, shape P.shape[:-2], i.e. (..., H); (..., k) or (...) with heads
        Each map's match with the pattern.

    Raises
    ------
    RefAttnError
        A map that is not square, a bad ``tokens`` or ``mask`` shape, an unknown ``error_measure``,
        head indices out of range, or rows that are not probabilities (``RefAttnTypeError`` for float
        tokens, a non-bool mask or non-integer heads).
    """
    return _score(
        P,
        _built_in("duplicate", tokens),
        mask,
        exclude_bos,
        exclude_current_token,
        error_measure,
        heads,
        check_probabilities,
    )


def duplicate_token_score_backward(
    d_score,
    P,
    tokens,
    *,
    mask=None,
    exclude_bos=False,
    exclude_current_token=False,
    error_measure="mul",
    heads=None,
    check_probabilities=True,
):
    """Gradient of :func:`duplicate_token_score`: ``dP = ∂/∂P of Σ d_score · score``.

    :func:`pattern_score_backward` with the detector's pattern: "mul" ``dP_ij = d_score (D_ij − score) /
    Σ P'``, "abs" ``dP_ij = −d_score sign(P_ij − D_ij) / n_rows``, on the kept entries of each map; 0 on
    masked, excluded (BOS, diagonal) and padded entries, on maps whose normaliser is 0 and on the heads
    left out by ``heads``.

    Parameters
    ----------
    d_score : array_like
        Cotangent of ``score``: exactly its shape (``(..., H)``, or that of ``score[..., heads]``), finite.
    P : array_like, shape (..., H, L, L)
        As :func:`duplicate_token_score`.
    tokens
        As :func:`duplicate_token_score`.
    mask, exclude_bos, exclude_current_token, error_measure, heads, check_probabilities
        The forward's options, as :func:`duplicate_token_score` (same defaults; ``mask``: True = real token).

    Returns
    -------
    MapGrads
        ``(dP,)``: float64, P's shape.
    """
    return _score_backward(
        d_score,
        P,
        _built_in("duplicate", tokens),
        mask,
        exclude_bos,
        exclude_current_token,
        error_measure,
        heads,
        check_probabilities,
    )


def induction_score(
    P,
    tokens,
    *,
    mask=None,
    exclude_bos=False,
    exclude_current_token=False,
    error_measure="mul",
    heads=None,
    check_probabilities=True,
):
    """Induction score ``score (..., H)``: how each map matches the key after an earlier copy of the
    query's token.

    :func:`pattern_score` with D the induction pattern (lower-triangular): the
    duplicate pattern shifted one key to the right, ``D[i, j] = dup[i, j − 1]``
    (:func:`induction_pattern`): per map, ``K`` the kept entries (not masked; by
    option not the BOS column nor the diagonal), ``"mul"``: ``score = Σ K⊙P⊙D / Σ K⊙P`` in [0, 1] (0
    for a map with ``Σ K⊙P = 0``); ``"abs"``: ``score = 1 − Σ K⊙|P − D| / n_rows``.  TransformerLens'
    ``head_detector`` without its rounding (which it applies to "abs" only).

    Axes: ``...`` batch dims, ``H`` heads, ``L`` tokens (queries = keys).

    Parameters
    ----------
    P : array_like, shape (..., H, L, L)
        Attention maps, rows = queries, square (``Lq = Lk = L``); any real dtype (bfloat16 too),
        converted to float64, never mutated; finite.  Leading dims ``...`` are batch dims; a single
        map ``(L, L)`` is accepted too (without ``heads``).
    tokens : array_like of int or str, shape (L,) or P.shape[:-3] + (L,)
        The token of each position (integer ids or strings; floats are refused), one sequence shared
        by every map or one per example (shared by its heads).  What a padded position holds is
        ignored.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P.shape[:-3] + (L,)`` (per example, shared by its
        heads) or ``P.shape[:-2] + (L,)`` (per map), which also marks the padded query rows; or a bool
        mask broadcastable to P (True = the entry is kept; a row is real when it keeps some key).
        Masked entries are left out of every sum; only real keys match the pattern.  With contiguous
        padding (left or right) each score equals that of the cropped map.  Default None: every token real.
    exclude_bos : bool, default False
        Also leave out the column of the first real token (BOS: column 0 without a mask, the first
        real key of each map with one).
    exclude_current_token : bool, default False
        Also leave out the diagonal ``P_ii``.
    error_measure : {"mul", "abs"}, default "mul"
        ``"mul"``: the share of the kept mass on the pattern, in [0, 1]; ``"abs"``: ``1 − Σ K|P − D| /
        n_rows``, in [−1, 1] (TransformerLens' two measures, unrounded: :func:`pattern_score`).
    heads : int or sequence of int, optional
        Score only these heads (indices of axis -3): ``score[..., heads]``, shape ``P.shape[:-3] +
        (k,)`` for k indices, ``P.shape[:-3]`` for one int (:func:`pattern_score`).  Default None:
        every head.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the first offending row, with its sum and minimum) a map whose
        real rows are not probabilities: entries >= 0, each row summing to 1 over its allowed keys
        within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).  False: measure
        the map as it is (maps with sinks or dropout).

    Returns
    -------
    score : ndarray of float64, shape P.shape[:-2], i.e. (..., H); (..., k) or (...) with heads
        Each map's match with the pattern.

    Raises
    ------
    RefAttnError
        A map that is not square, a bad ``tokens`` or ``mask`` shape, an unknown ``error_measure``,
        head indices out of range, or rows that are not probabilities (``RefAttnTypeError`` for float
        tokens, a non-bool mask or non-integer heads).
    """
    return _score(
        P,
        _built_in("induction", tokens),
        mask,
        exclude_bos,
        exclude_current_token,
        error_measure,
        heads,
        check_probabilities,
    )


def induction_score_backward(
    d_score,
    P,
    tokens,
    *,
    mask=None,
    exclude_bos=False,
    exclude_current_token=False,
    error_measure="mul",
    heads=None,
    check_probabilities=True,
):
    """Gradient of :func:`induction_score`: ``dP = ∂/∂P of Σ d_score · score``.

    :func:`pattern_score_backward` with the detector's pattern: "mul" ``dP_ij = d_score (D_ij − score) /
    Σ P'``, "abs" ``dP_ij = −d_score sign(P_ij − D_ij) / n_rows``, on the kept entries of each map; 0 on
    masked, excluded (BOS, diagonal) and padded entries, on maps whose normaliser is 0 and on the heads
    left out by ``heads``.

    Parameters
    ----------
    d_score : array_like
        Cotangent of ``score``: exactly its shape (``(..., H)``, or that of ``score[..., heads]``), finite.
    P : array_like, shape (..., H, L, L)
        As :func:`induction_score`.
    tokens
        As :func:`induction_score`.
    mask, exclude_bos, exclude_current_token, error_measure, heads, check_probabilities
        The forward's options, as :func:`induction_score` (same defaults; ``mask``: True = real token).

    Returns
    -------
    MapGrads
        ``(dP,)``: float64, P's shape.
    """
    return _score_backward(
        d_score,
        P,
        _built_in("induction", tokens),
        mask,
        exclude_bos,
        exclude_current_token,
        error_measure,
        heads,
        check_probabilities,
    )


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
