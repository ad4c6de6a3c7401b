"""Linguistic heuristics, with the structures as arguments (no hard-coded word lists).

* ``pair_attention(P, pairs)``: mean of ``P[i, j]`` over the given (query, key) pairs, e.g.
  dependency arcs (Clark et al. 2019 score heads by such syntactic relations).
* ``group_attention(P, groups)``: for each query in a group, its mass on the other members of
  that group; mean over grouped queries (semantic groups, coreference clusters, …).
* ``phrase_attention(P, pos_tags, phrase_tags=...)``: ``group_attention`` over the phrases read
  off POS tags — maximal runs (length ≥ 2) of consecutive tokens whose tag is in ``phrase_tags``.

All are linear in P: ``value = Σ_ij W_ij P_ij / norm`` per map, results ``P.shape[:-2]``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refattn._validate import RefAttnError, as_cotangent
from refattn.metrics._maps import attention_map, masked_grad

__all__ = [
    "DEFAULT_PHRASE_TAGS",
    "MapGrads",
    "group_attention",
    "group_attention_backward",
    "pair_attention",
    "pair_attention_backward",
    "phrase_attention",
    "phrase_attention_backward",
    "phrases_from_tags",
]

DEFAULT_PHRASE_TAGS = ("DET", "ADJ", "NOUN", "PROPN", "NUM")


class MapGrads(NamedTuple):
    dP: np.ndarray


def _pair_weights(pairs, shape):
    a = np.asarray(pairs, dtype=np.int64).reshape(-1, 2) if len(pairs) else np.zeros((0, 2), dtype=np.int64)
    lq, lk = shape[-2:]
    if a.size and (a[:, 0].min() < 0 or a[:, 0].max() >= lq or a[:, 1].min() < 0 or a[:, 1].max() >= lk):
        raise RefAttnError(f"pairs: expected (query, key) indices within ({lq}, {lk}), got {a.tolist()}")
    w = np.zeros((lq, lk))
    np.add.at(w, (a[:, 0], a[:, 1]), 1.0)
    return w, max(len(a), 1)


def _group_weights(groups, shape):
    lq, lk = shape[-2:]
    w = np.zeros((lq, lk))
    members = set()
    for g in groups:
        g = [int(i) for i in g]
        if any(i < 0 or i >= min(lq, lk) for i in g):
            raise RefAttnError(f"groups: expected token indices in [0, {min(lq, lk)}), got {g}")
        for i in g:
            members.add(i)
            for j in g:
                if j != i:
                    w[i, j] = 1.0
    return w, max(len(members), 1)


def _linear(P, w, norm, mask):
    m = attention_map(P, mask)
    return (m.p * w).sum(axis=(-2, -1)) / norm


def _linear_backward(dy, P, w, norm, mask):
    m = attention_map(P, mask)
    d = as_cotangent(dy, m.p.shape[:-2], "dy")
    return MapGrads(masked_grad(m, d[..., None, None] * w / norm))


def pair_attention(P, pairs, *, mask=None):
    """Mean of ``P[i, j]`` over ``pairs`` (a list of (query, key) index pairs) ``(...,)``."""
    w, norm = _pair_weights(pairs, np.shape(P))
    return _linear(P, w, norm, mask)


def pair_attention_backward(dy, P, pairs, *, mask=None):
    w, norm = _pair_weights(pairs, np.shape(P))
    return _linear_backward(dy, P, w, norm, mask)


def group_attention(P, groups, *, mask=None):
    """Mean over grouped queries of their mass on the other members of their group ``(...,)``."""
    w, norm = _group_weights(groups, np.shape(P))
    return _linear(P, w, norm, mask)


def group_attention_backward(dy, P, groups, *, mask=None):
    w, norm = _group_weights(groups, np.shape(P))
    return _linear_backward(dy, P, w, norm, mask)


def phrases_from_tags(pos_tags, phrase_tags=DEFAULT_PHRASE_TAGS):
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


def phrase_attention(P, pos_tags, phrase_tags=DEFAULT_PHRASE_TAGS, *, mask=None):
    """:func:`group_attention` over the phrases found in ``pos_tags`` (one tag per token)."""
    return group_attention(P, phrases_from_tags(pos_tags, phrase_tags), mask=mask)


def phrase_attention_backward(dy, P, pos_tags, phrase_tags=DEFAULT_PHRASE_TAGS, *, mask=None):
    return group_attention_backward(dy, P, phrases_from_tags(pos_tags, phrase_tags), mask=mask)
