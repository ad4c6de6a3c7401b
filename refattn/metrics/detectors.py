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

from refattn._validate import RefAttnError, RefAttnTypeError, as_cotangent, as_flag, to_numpy
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
    """``D (..., L, L)``: 1 where an earlier key carries the query's token; with ``real (..., L)``
    (bool, True = real token) only real keys count (a pad id equal to a token is no duplicate)."""
    t = np.asarray(tokens)
    same = t[..., :, None] == t[..., None, :]
    if real is not None:
        same = same & real[..., None, :]
    return np.tril(same, k=-1).astype(np.float64)


def induction_pattern(tokens, *, real=None):
    """``D (..., L, L)``: the duplicate pattern shifted right by one key, lower-triangular; ``real``
    as in :func:`duplicate_token_pattern` (True = real token)."""
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

    ``mask``: True = real token; ``exclude_bos``: drop the first real token's column;
    ``exclude_current_token``: drop the diagonal; ``check_probabilities``: refuse maps whose real
    rows are not probabilities.
    """
    return _score(P, "previous", None, mask, exclude_bos, exclude_current_token, check_probabilities)


def previous_token_score_backward(
    d_score, P, *, mask=None, exclude_bos=False, exclude_current_token=False, check_probabilities=True
):
    """Gradient of :func:`previous_token_score`: ``MapGrads(dP)``, ``dP = d_score (D − score) / Σ P'``
    on the kept entries (``mask``: True = real token)."""
    return _score_backward(d_score, P, "previous", None, mask, exclude_bos, exclude_current_token, check_probabilities)


def duplicate_token_score(
    P, tokens, *, mask=None, exclude_bos=False, exclude_current_token=False, check_probabilities=True
):
    """Duplicate-token score ``score (..., H)``: the share of each map's mass on earlier keys carrying
    the query's token (``tokens (L,)`` or per example); options as in :func:`previous_token_score`
    (``mask``: True = real token)."""
    return _score(P, "duplicate", tokens, mask, exclude_bos, exclude_current_token, check_probabilities)


def duplicate_token_score_backward(
    d_score, P, tokens, *, mask=None, exclude_bos=False, exclude_current_token=False, check_probabilities=True
):
    """Gradient of :func:`duplicate_token_score`: ``MapGrads(dP)`` (``mask``: True = real token)."""
    return _score_backward(
        d_score, P, "duplicate", tokens, mask, exclude_bos, exclude_current_token, check_probabilities
    )


def induction_score(P, tokens, *, mask=None, exclude_bos=False, exclude_current_token=False, check_probabilities=True):
    """Induction score ``score (..., H)``: the share of each map's mass on the key after an earlier
    copy of the query's token; options as in :func:`previous_token_score` (``mask``: True = real token)."""
    return _score(P, "induction", tokens, mask, exclude_bos, exclude_current_token, check_probabilities)


def induction_score_backward(
    d_score, P, tokens, *, mask=None, exclude_bos=False, exclude_current_token=False, check_probabilities=True
):
    """Gradient of :func:`induction_score`: ``MapGrads(dP)`` (``mask``: True = real token)."""
    return _score_backward(
        d_score, P, "induction", tokens, mask, exclude_bos, exclude_current_token, check_probabilities
    )
