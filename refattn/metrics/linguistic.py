"""Linguistic heuristics, with the structures as arguments (no hard-coded word lists).

* ``pair_attention(P, pairs)``: mean of ``P[i, j]`` over the given (query, key) pairs, e.g.
  dependency arcs (Clark et al. 2019 score heads by such syntactic relations).
* ``group_attention(P, groups)``: for each query in a group, its mass on the other members of
  that group; mean over grouped queries (semantic groups, coreference clusters, …).
* ``phrase_attention(P, pos_tags, *, phrase_tags=...)``: ``group_attention`` over the phrases read
  off POS tags — maximal runs (length ≥ 2) of consecutive tokens whose tag is in ``phrase_tags``.

All are linear in P: ``score = Σ_ij W_ij P_ij / norm`` per map, results ``score P.shape[:-2]``; each
backward takes ``d_score`` and returns :class:`~refattn.metrics.MapGrads` ``(dP)``.  ``mask``: True =
real token; pairs and group members that are padded tokens do not count in ``norm`` (contiguous
padding gives the cropped map's value); ``check_probabilities``: refuse maps that are not probabilities.
"""

from __future__ import annotations

import numpy as np

from refattn._validate import RefAttnError, as_cotangent, check_keywords_of
from refattn.metrics._maps import MapGrads, attention_map, masked_grad, real_keys

__all__ = [
    "DEFAULT_PHRASE_TAGS",
    "group_attention",
    "group_attention_backward",
    "pair_attention",
    "pair_attention_backward",
    "phrase_attention",
    "phrase_attention_backward",
    "phrases_from_tags",
]

#: The tags :func:`phrases_from_tags` and :func:`phrase_attention` make phrases of by default.
DEFAULT_PHRASE_TAGS = ("DET", "ADJ", "NOUN", "PROPN", "NUM")


def _pair_weights(pairs, shape):
    """``(w (Lq, Lk) pair counts, a (n_pairs, 2))``."""
    a = np.asarray(pairs, dtype=np.int64).reshape(-1, 2) if len(pairs) else np.zeros((0, 2), dtype=np.int64)
    lq, lk = shape[-2:]
    if a.size and (a[:, 0].min() < 0 or a[:, 0].max() >= lq or a[:, 1].min() < 0 or a[:, 1].max() >= lk):
        raise RefAttnError(f"pairs: expected (query, key) indices within ({lq}, {lk}), got {a.tolist()}")
    w = np.zeros((lq, lk))
    np.add.at(w, (a[:, 0], a[:, 1]), 1.0)
    return w, a


def _pair_norm(m, a, mask):
    """Pairs between real tokens, per map ``(...,)`` (at least 1): pairs touching a pad do not count."""
    if mask is None:
        return max(len(a), 1)
    real = real_keys(m)  # (..., Lk)
    return np.maximum((m.rows[..., a[:, 0]] & real[..., a[:, 1]]).sum(axis=-1), 1)


def _group_weights(groups, shape):
    """``(w (Lq, Lk): 1 between distinct members of a group, members (Lq,) bool: grouped queries)``."""
    lq, lk = shape[-2:]
    w = np.zeros((lq, lk))
    members = np.zeros(lq, dtype=bool)
    for g in groups:
        g = [int(i) for i in g]
        if any(i < 0 or i >= min(lq, lk) for i in g):
            raise RefAttnError(f"groups: expected token indices in [0, {min(lq, lk)}), got {g}")
        for i in g:
            members[i] = True
            for j in g:
                if j != i:
                    w[i, j] = 1.0
    return w, members


def _member_norm(m, members, mask):
    """Grouped queries that are real rows, per map ``(...,)`` (at least 1)."""
    if mask is None:
        return max(int(members.sum()), 1)
    return np.maximum((m.rows & members).sum(axis=-1), 1)


def _linear(m, w, norm):
    return (m.p * w).sum(axis=(-2, -1)) / norm


def _linear_backward(d_score, m, w, norm):
    d = as_cotangent(d_score, m.p.shape[:-2], "d_score")
    return MapGrads(masked_grad(m, (d / norm)[..., None, None] * w))


def pair_attention(P, pairs, *, mask=None, check_probabilities=True):
    """``score (...,)``: the mean of ``P[i, j]`` over ``pairs`` (a list of (query, key) index pairs).

    ``score = Σ_{(i, j) ∈ pairs} P_ij / norm``, ``norm`` the number of pairs (with a mask, of the
    pairs between real tokens; at least 1).  Clark et al. 2019 score heads by such syntactic
    relations.  Linear in P.

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows), ``Lk`` keys.

    Parameters
    ----------
    P : array_like, shape (..., H, Lq, Lk) or (..., Lq, Lk)
        Attention maps, rows = queries; any real dtype (bfloat16 too), converted to float64, never
        mutated; finite.  Leading dims are batch dims.
    pairs : sequence of (int, int)
        ``(query, key)`` index pairs (e.g. dependency arcs), in the map's coordinates (padded ones
        included); each ``0 <= query < Lq``, ``0 <= key < Lk``.  A pair given twice counts twice.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P.shape[:-3] + (Lk,)`` (per example, shared by its
        heads) or ``P.shape[:-2] + (Lk,)`` (per map), which with ``Lq = Lk`` also marks the padded
        query rows; or a bool mask broadcastable to P (True = the entry is kept; a row is real when it
        keeps some key).  Masked entries count as 0; pairs touching a padded token do not count in the norm,
        so contiguous padding gives the cropped map's value.  Default None: every token real.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the argument and the first offending row, with its sum and
        minimum) a map whose real rows are not probabilities: entries >= 0, each row summing to 1 over
        its allowed keys within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).
        False: measure the map as it is (maps with sinks or dropout, known-good maps in a hot loop).

    Returns
    -------
    score : ndarray of float64, shape P.shape[:-2], i.e. (..., H)
        0 for a map with nothing to measure (the norm is at least 1).

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    w, a = _pair_weights(pairs, m.p.shape)
    return _linear(m, w, _pair_norm(m, a, mask))


def pair_attention_backward(d_score, P, pairs, *, mask=None, check_probabilities=True):
    """Gradient of :func:`pair_attention`: ``dP = ∂/∂P of Σ d_score · score``.

    The score is linear, ``score = Σ_ij W_ij P_ij / norm``: ``dP = d_score · W / norm`` on the allowed
    entries, 0 on masked entries and padded rows.

    Parameters
    ----------
    d_score : array_like, shape P.shape[:-2], i.e. (..., H)
        Cotangent of ``score``: exactly its shape, finite.
    P, pairs
        As :func:`pair_attention`.
    mask, check_probabilities
        The forward's options, as :func:`pair_attention` (same defaults; ``mask``: True = real token).

    Returns
    -------
    MapGrads
        ``(dP,)``: float64, P's shape; 0 on masked entries and padded rows.
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    w, a = _pair_weights(pairs, m.p.shape)
    return _linear_backward(d_score, m, w, _pair_norm(m, a, mask))


def group_attention(P, groups, *, mask=None, check_probabilities=True):
    """``score (...,)``: the mean over grouped queries (real rows) of their mass on the other members of
    their group.

    ``score = Σ_i Σ_{j ∈ g(i), j ≠ i} P_ij / norm``, g(i) the group of query i, ``norm`` the number
    of grouped queries that are real rows (at least 1).  Linear in P.

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows), ``Lk`` keys.

    Parameters
    ----------
    P : array_like, shape (..., H, Lq, Lk) or (..., Lq, Lk)
        Attention maps, rows = queries; any real dtype (bfloat16 too), converted to float64, never
        mutated; finite.  Leading dims are batch dims.
    groups : sequence of sequences of int
        Groups of token indices (semantic groups, coreference clusters, ...), each index in
        ``[0, min(Lq, Lk))``, in the map's coordinates.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P.shape[:-3] + (Lk,)`` (per example, shared by its
        heads) or ``P.shape[:-2] + (Lk,)`` (per map), which with ``Lq = Lk`` also marks the padded
        query rows; or a bool mask broadcastable to P (True = the entry is kept; a row is real when it
        keeps some key).  Masked entries count as 0; only the grouped queries that are real rows count in the norm,
        so contiguous padding gives the cropped map's value.  Default None: every token real.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the argument and the first offending row, with its sum and
        minimum) a map whose real rows are not probabilities: entries >= 0, each row summing to 1 over
        its allowed keys within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).
        False: measure the map as it is (maps with sinks or dropout, known-good maps in a hot loop).

    Returns
    -------
    score : ndarray of float64, shape P.shape[:-2], i.e. (..., H)
        0 for a map with nothing to measure (the norm is at least 1).

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    w, members = _group_weights(groups, m.p.shape)
    return _linear(m, w, _member_norm(m, members, mask))


def group_attention_backward(d_score, P, groups, *, mask=None, check_probabilities=True):
    """Gradient of :func:`group_attention`: ``dP = ∂/∂P of Σ d_score · score``.

    The score is linear, ``score = Σ_ij W_ij P_ij / norm``: ``dP = d_score · W / norm`` on the allowed
    entries, 0 on masked entries and padded rows.

    Parameters
    ----------
    d_score : array_like, shape P.shape[:-2], i.e. (..., H)
        Cotangent of ``score``: exactly its shape, finite.
    P, groups
        As :func:`group_attention`.
    mask, check_probabilities
        The forward's options, as :func:`group_attention` (same defaults; ``mask``: True = real token).

    Returns
    -------
    MapGrads
        ``(dP,)``: float64, P's shape; 0 on masked entries and padded rows.
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    w, members = _group_weights(groups, m.p.shape)
    return _linear_backward(d_score, m, w, _member_norm(m, members, mask))


def phrases_from_tags(pos_tags, *, phrase_tags=DEFAULT_PHRASE_TAGS):
    """The phrases of a tag sequence: maximal runs (length ≥ 2) of consecutive tokens whose tag is in ``phrase_tags``.

    Parameters
    ----------
    pos_tags : iterable of str
        One tag per token (``None`` is in no phrase and ends a run).
    phrase_tags : collection of str, default DEFAULT_PHRASE_TAGS
        The tags a phrase is made of: ``("DET", "ADJ", "NOUN", "PROPN", "NUM")`` by default.

    Returns
    -------
    phrases : list of list of int
        The token indices of each phrase, in order.
    """
    tags = set(phrase_tags)
    phrases, run = [], []
    for i, tag in enumerate(list(pos_tags) + [None]):
        if tag is not None and tag in tags:
            run.append(i)
            continue
        if len(run) >= 2:
            phrases.append(run)
        run = []
    return phrases


def _phrase_weights(m, pos_tags, phrase_tags, mask):
    """``(w, members)`` of the phrases, per map when a mask is given: a padded token is in no phrase
    and ends a run, so the phrases are those of the cropped tags."""
    tags = list(pos_tags)
    n = min(m.p.shape[-2:])
    if len(tags) != n:
        raise RefAttnError(f"pos_tags: expected one tag per token, min(Lq, Lk) = {n} tags, got {len(tags)}")
    if mask is None:
        return _group_weights(phrases_from_tags(tags, phrase_tags=phrase_tags), m.p.shape)
    real = real_keys(m)[..., :n] & m.rows[..., :n]  # (..., n) real tokens of each map
    w = np.zeros(m.p.shape)
    members = np.zeros(m.p.shape[:-1], dtype=bool)
    cache = {}
    for idx in np.ndindex(*real.shape[:-1]):
        key = real[idx].tobytes()
        if key not in cache:
            kept = [t if ok else None for t, ok in zip(tags, real[idx])]
            cache[key] = _group_weights(phrases_from_tags(kept, phrase_tags=phrase_tags), m.p.shape)
        w[idx], members[idx] = cache[key]
    return w, members


def phrase_attention(P, pos_tags, *, phrase_tags=DEFAULT_PHRASE_TAGS, mask=None, check_probabilities=True):
    """``score (...,)``: :func:`group_attention` over the phrases found in ``pos_tags``.

    The phrases are the maximal runs (length >= 2) of consecutive tokens whose tag is in
    ``phrase_tags`` (:func:`phrases_from_tags`); with a mask a padded token is in no phrase and
    ends a run, so the phrases are those of the cropped tags.  Linear in P.

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows), ``Lk`` keys.

    Parameters
    ----------
    P : array_like, shape (..., H, Lq, Lk) or (..., Lq, Lk)
        Attention maps, rows = queries; any real dtype (bfloat16 too), converted to float64, never
        mutated; finite.  Leading dims are batch dims.
    pos_tags : sequence of str
        One part-of-speech tag per token, ``min(Lq, Lk)`` of them (pads included: their tags are
        ignored).
    phrase_tags : collection of str, default DEFAULT_PHRASE_TAGS
        The tags a phrase is made of: ``("DET", "ADJ", "NOUN", "PROPN", "NUM")`` by default.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P.shape[:-3] + (Lk,)`` (per example, shared by its
        heads) or ``P.shape[:-2] + (Lk,)`` (per map), which with ``Lq = Lk`` also marks the padded
        query rows; or a bool mask broadcastable to P (True = the entry is kept; a row is real when it
        keeps some key).  Masked entries count as 0; a padded token is in no phrase,
        so contiguous padding gives the cropped map's value.  Default None: every token real.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the argument and the first offending row, with its sum and
        minimum) a map whose real rows are not probabilities: entries >= 0, each row summing to 1 over
        its allowed keys within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).
        False: measure the map as it is (maps with sinks or dropout, known-good maps in a hot loop).

    Returns
    -------
    score : ndarray of float64, shape P.shape[:-2], i.e. (..., H)
        0 for a map with nothing to measure (the norm is at least 1).

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    w, members = _phrase_weights(m, pos_tags, phrase_tags, mask)
    return _linear(m, w, _member_norm(m, members, mask))


def phrase_attention_backward(
    d_score, P, pos_tags, *, phrase_tags=DEFAULT_PHRASE_TAGS, mask=None, check_probabilities=True
):
    """Gradient of :func:`phrase_attention`: ``dP = ∂/∂P of Σ d_score · score``.

    The score is linear, ``score = Σ_ij W_ij P_ij / norm``: ``dP = d_score · W / norm`` on the allowed
    entries, 0 on masked entries and padded rows.

    Parameters
    ----------
    d_score : array_like, shape P.shape[:-2], i.e. (..., H)
        Cotangent of ``score``: exactly its shape, finite.
    P, pos_tags
        As :func:`phrase_attention`.
    phrase_tags, mask, check_probabilities
        The forward's options, as :func:`phrase_attention` (same defaults; ``mask``: True = real token).

    Returns
    -------
    MapGrads
        ``(dP,)``: float64, P's shape; 0 on masked entries and padded rows.
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    w, members = _phrase_weights(m, pos_tags, phrase_tags, mask)
    return _linear_backward(d_score, m, w, _member_norm(m, members, mask))


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
