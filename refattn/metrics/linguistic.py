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

from refattn._validate import RefAttnError, as_cotangent
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
    """``score (...,)``: the mean of ``P[i, j]`` over ``pairs`` (a list of (query, key) index pairs); with
    a mask (True = real token), over the pairs between real tokens."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    w, a = _pair_weights(pairs, m.p.shape)
    return _linear(m, w, _pair_norm(m, a, mask))


def pair_attention_backward(d_score, P, pairs, *, mask=None, check_probabilities=True):
    """Gradient of :func:`pair_attention`: ``MapGrads(dP)`` (``mask``: True = real token)."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    w, a = _pair_weights(pairs, m.p.shape)
    return _linear_backward(d_score, m, w, _pair_norm(m, a, mask))


def group_attention(P, groups, *, mask=None, check_probabilities=True):
    """``score (...,)``: the mean over grouped queries (real rows) of their mass on the other members of
    their group (``mask``: True = real token)."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    w, members = _group_weights(groups, m.p.shape)
    return _linear(m, w, _member_norm(m, members, mask))


def group_attention_backward(d_score, P, groups, *, mask=None, check_probabilities=True):
    """Gradient of :func:`group_attention`: ``MapGrads(dP)`` (``mask``: True = real token)."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    w, members = _group_weights(groups, m.p.shape)
    return _linear_backward(d_score, m, w, _member_norm(m, members, mask))


def phrases_from_tags(pos_tags, *, phrase_tags=DEFAULT_PHRASE_TAGS):
    """Maximal runs (length ≥ 2) of consecutive tokens whose tag is in ``phrase_tags``: a list of index lists."""
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
    """``score (...,)``: :func:`group_attention` over the phrases found in ``pos_tags`` (one tag per
    token; with a mask, True = real token, padded tokens break phrases)."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    w, members = _phrase_weights(m, pos_tags, phrase_tags, mask)
    return _linear(m, w, _member_norm(m, members, mask))


def phrase_attention_backward(
    d_score, P, pos_tags, *, phrase_tags=DEFAULT_PHRASE_TAGS, mask=None, check_probabilities=True
):
    """Gradient of :func:`phrase_attention`: ``MapGrads(dP)`` (``mask``: True = real token)."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    w, members = _phrase_weights(m, pos_tags, phrase_tags, mask)
    return _linear_backward(d_score, m, w, _member_norm(m, members, mask))
