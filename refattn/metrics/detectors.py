"""Head detectors with TransformerLens semantics (``head_detector.py``, error measure "mul"), unrounded.

``score = Σ(P' ⊙ D) / Σ P'`` per map, where ``P'`` is P with masked entries, optionally the BOS
column (``exclude_bos``) and the diagonal (``exclude_current_token``) set to 0, and D the
detection pattern (lower-triangular):

* previous token: ``D[i, i−1] = 1``;
* duplicate token: ``D[i, j] = 1`` iff ``tokens[j] == tokens[i]`` and ``j < i``;
* induction: the duplicate pattern shifted one key to the right, ``D[i, j] = dup[i, j−1]``, then ``tril``.

``P (..., H, L, L)`` (square); ``tokens (L,)`` or per example ``P.shape[:-3] + (L,)``.  Results ``(..., H)``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refattn._validate import RefAttnError, as_cotangent, as_flag
from refattn.metrics._maps import attention_map, masked_grad

__all__ = [
    "DetectorGrads",
    "duplicate_token_pattern",
    "duplicate_token_score",
    "duplicate_token_score_backward",
    "induction_pattern",
    "induction_score",
    "induction_score_backward",
    "previous_token_score",
    "previous_token_score_backward",
]


class DetectorGrads(NamedTuple):
    dP: np.ndarray


def _tokens(tokens, shape):
    t = np.asarray(tokens)
    n = shape[-1]
    if t.shape == (n,) or (len(shape) >= 3 and t.shape == tuple(shape[:-3]) + (n,)):
        return t
    raise RefAttnError(f"tokens: expected shape ({n},) or {tuple(shape[:-3]) + (n,)}, got {t.shape}")


def duplicate_token_pattern(tokens):
    """``D (..., L, L)``: 1 where an earlier key carries the query's token."""
    t = np.asarray(tokens)
    same = t[..., :, None] == t[..., None, :]
    return np.tril(same, k=-1).astype(np.float64)


def induction_pattern(tokens):
    """``D (..., L, L)``: the duplicate pattern shifted right by one key, lower-triangular."""
    dup = duplicate_token_pattern(tokens)
    shifted = np.zeros_like(dup)
    shifted[..., 1:] = dup[..., :-1]
    return np.tril(shifted)


def _pattern_for(kind, shape, tokens):
    n = shape[-1]
    if kind == "previous":
        return np.eye(n, k=-1)
    t = _tokens(tokens, shape)
    d = duplicate_token_pattern(t) if kind == "duplicate" else induction_pattern(t)
    return d if t.ndim == 1 else d[..., None, :, :]


def _prepared(P, mask, exclude_bos, exclude_current_token):
    m = attention_map(P, mask)
    if m.p.shape[-1] != m.p.shape[-2]:
        raise RefAttnError(f"P: expected square maps (..., L, L), got shape {m.p.shape}")
    keep = np.ones(m.p.shape[-2:])
    if as_flag(exclude_bos, "exclude_bos"):
        keep[:, 0] = 0.0
    if as_flag(exclude_current_token, "exclude_current_token"):
        np.fill_diagonal(keep, 0.0)
    return m, keep


def _score(P, pattern_kind, tokens, mask, exclude_bos, exclude_current_token):
    m, keep = _prepared(P, mask, exclude_bos, exclude_current_token)
    d = _pattern_for(pattern_kind, m.p.shape, tokens)
    pk = m.p * keep
    total = pk.sum(axis=(-2, -1))
    return np.where(total > 0, (pk * d).sum(axis=(-2, -1)) / np.where(total > 0, total, 1.0), 0.0)


def _score_backward(dy, P, pattern_kind, tokens, mask, exclude_bos, exclude_current_token):
    """``d score / dP' = (D − score) / Σ P'``."""
    m, keep = _prepared(P, mask, exclude_bos, exclude_current_token)
    d_pat = _pattern_for(pattern_kind, m.p.shape, tokens)
    pk = m.p * keep
    total = pk.sum(axis=(-2, -1))
    score = np.where(total > 0, (pk * d_pat).sum(axis=(-2, -1)) / np.where(total > 0, total, 1.0), 0.0)
    g = as_cotangent(dy, m.p.shape[:-2], "dy")
    scale = np.where(total > 0, g / np.where(total > 0, total, 1.0), 0.0)[..., None, None]
    return DetectorGrads(masked_grad(m, scale * (d_pat - score[..., None, None]) * keep))


def previous_token_score(P, *, mask=None, exclude_bos=False, exclude_current_token=False):
    return _score(P, "previous", None, mask, exclude_bos, exclude_current_token)


def previous_token_score_backward(dy, P, *, mask=None, exclude_bos=False, exclude_current_token=False):
    return _score_backward(dy, P, "previous", None, mask, exclude_bos, exclude_current_token)


def duplicate_token_score(P, tokens, *, mask=None, exclude_bos=False, exclude_current_token=False):
    return _score(P, "duplicate", tokens, mask, exclude_bos, exclude_current_token)


def duplicate_token_score_backward(dy, P, tokens, *, mask=None, exclude_bos=False, exclude_current_token=False):
    return _score_backward(dy, P, "duplicate", tokens, mask, exclude_bos, exclude_current_token)


def induction_score(P, tokens, *, mask=None, exclude_bos=False, exclude_current_token=False):
    return _score(P, "induction", tokens, mask, exclude_bos, exclude_current_token)


def induction_score_backward(dy, P, tokens, *, mask=None, exclude_bos=False, exclude_current_token=False):
    return _score_backward(dy, P, "induction", tokens, mask, exclude_bos, exclude_current_token)
