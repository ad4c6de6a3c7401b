"""Token-level metrics: attention received/given, top tokens, attention to given positions
(Clark et al. 2019), function-word ratio, allocation efficiency, special-token bias.

``P (..., H, Lq, Lk)``.  Key sets (``positions``, ``important``, ``special_positions``) are either
integer key indices (shared by every map) or bool masks over keys — ``P.shape[:-3] + (Lk,)`` or
``P.shape[:-2] + (Lk,)`` for per-example sets (True = the key is in the set).  ``mask``: True = real
token (a key-padding mask, or a bool mask broadcastable to P, True = kept).  Each backward takes the
cotangent ``d_<output>`` of the output its forward names and returns
:class:`~refattn.metrics.MapGrads` ``(dP)``.  ``check_probabilities``: refuse maps whose real rows
are not probabilities.
"""

from __future__ import annotations

import numpy as np

from refattn._validate import RefAttnError, as_cotangent, as_int, as_real
from refattn.metrics._maps import MapGrads, attention_map, key_counts, masked_grad, row_mean, row_mean_backward

__all__ = [
    "FUNCTION_WORDS",
    "allocation_efficiency",
    "allocation_efficiency_backward",
    "attention_given",
    "attention_given_backward",
    "attention_received",
    "attention_received_backward",
    "attention_to",
    "attention_to_backward",
    "function_word_ratio",
    "function_word_ratio_backward",
    "key_set",
    "special_token_bias",
    "top_tokens",
]

FUNCTION_WORDS = frozenset(
    "a an the and or but nor so yet if then than that this these those of in on at by for with about against "
    "between into through during before after above below to from up down over under again further once is am "
    "are was were be been being have has had do does did not no it its he she they them his her their we us our "
    "you your i me my as which who whom whose what there here".split()
)


def key_set(keys, shape, *, name="positions"):
    """A 0/1 float weight over keys broadcastable to a map of ``shape (..., Lq, Lk)``: ``keys`` are key
    indices or a bool mask over the keys (True = in the set); ``name`` names the argument in errors."""
    lk = shape[-1]
    a = np.asarray(keys)
    if a.dtype == bool:
        if len(shape) >= 3 and a.shape == tuple(shape[:-3]) + (lk,):
            return a[..., None, None, :].astype(np.float64)
        if a.shape == tuple(shape[:-2]) + (lk,) or a.shape == (lk,):
            return a[..., None, :].astype(np.float64)
        raise RefAttnError(f"{name}: expected key indices or a bool mask over the {lk} keys, got shape {a.shape}")
    if a.dtype.kind not in "iu" or a.ndim > 1:
        raise RefAttnError(f"{name}: expected a 1-D list of key indices or a bool mask, got dtype {a.dtype} {a.shape}")
    if a.size and (a.min() < -lk or a.max() >= lk):
        raise RefAttnError(f"{name}: expected key indices in [0, {lk}), got {a.tolist()}")
    w = np.zeros(lk)
    w[a % lk] = 1.0
    return w


def attention_received(P, *, mask=None, check_probabilities=True):
    """``received (..., Lk)``: the mean over real query rows of ``P_ij`` for each key (``mask``: True = real token)."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    count = np.maximum(m.rows.sum(axis=-1), 1)[..., None]
    return m.p.sum(axis=-2) / count


def attention_received_backward(d_received, P, *, mask=None, check_probabilities=True):
    """Gradient of :func:`attention_received`: ``MapGrads(dP)``, ``dP_ij = d_received_j / n_rows``."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    d = as_cotangent(d_received, m.p.shape[:-2] + m.p.shape[-1:], "d_received")
    count = np.maximum(m.rows.sum(axis=-1), 1)[..., None, None]
    return MapGrads(masked_grad(m, d[..., None, :] / count))


def attention_given(P, *, mask=None, check_probabilities=True):
    """``given (..., Lq)``: the row mass ``Σ_j P_ij`` over allowed keys (1 for a normalised row; less with
    sinks; ``mask``: True = real token)."""
    return attention_map(P, mask, check_probabilities=check_probabilities).p.sum(axis=-1)


def attention_given_backward(d_given, P, *, mask=None, check_probabilities=True):
    """Gradient of :func:`attention_given`: ``MapGrads(dP)``, ``dP_ij = d_given_i`` on allowed entries."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    d = as_cotangent(d_given, m.p.shape[:-1], "d_given")
    return MapGrads(masked_grad(m, d[..., None]))


def top_tokens(P, *, k, mask=None, check_probabilities=True):
    """``indices (..., k)`` of the ``k`` keys receiving the most attention (ties: lower index; masked keys
    last; ``mask``: True = real token)."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    k = as_int(k, "k", minimum=1)
    if k > m.p.shape[-1]:
        raise RefAttnError(f"k: expected at most Lk={m.p.shape[-1]}, got {k}")
    received = attention_received(m.p, mask=m.allowed, check_probabilities=False)
    real = m.allowed.any(axis=-2)
    return np.argsort(-np.where(real, received, -np.inf), axis=-1, kind="stable")[..., :k]


def attention_to(P, positions, *, mask=None, check_probabilities=True):
    """``mass (...,)``: the mean over real rows of the mass on the keys in ``positions`` (Clark et al.'s
    [CLS]/[SEP]; ``mask``: True = real token)."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    w = key_set(positions, m.p.shape)
    return row_mean((m.p * w).sum(axis=-1), m.rows)


def attention_to_backward(d_mass, P, positions, *, mask=None, check_probabilities=True):
    """Gradient of :func:`attention_to`: ``MapGrads(dP)``."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    w = key_set(positions, m.p.shape)
    d = row_mean_backward(as_cotangent(d_mass, m.p.shape[:-2], "d_mass"), m.rows)
    return MapGrads(masked_grad(m, d[..., None] * w))


def _share(m, w):
    """Per row: share of the row's mass on the weighted keys, and the row mass."""
    mass = m.p.sum(axis=-1)
    on = (m.p * w).sum(axis=-1)
    return np.where(mass > 0, on / np.where(mass > 0, mass, 1.0), 0.0), on, mass


def _share_backward(d_share, m, w, name):
    _, on, mass = _share(m, w)
    d = row_mean_backward(as_cotangent(d_share, m.p.shape[:-2], name), m.rows & (mass > 0))
    safe = np.where(mass > 0, mass, 1.0)[..., None]
    return MapGrads(masked_grad(m, d[..., None] * (w * safe - on[..., None]) / safe**2))


def _function_word_set(P_shape, tokens, function_words):
    words = np.asarray(tokens, dtype=object)
    lk = P_shape[-1]
    if words.shape[-1:] != (lk,):
        raise RefAttnError(f"tokens: expected the {lk} key tokens (..., Lk), got shape {words.shape}")
    vocab = {str(w).lower() for w in function_words}
    is_fw = np.vectorize(lambda t: str(t).lower() in vocab, otypes=[bool])(words)
    return key_set(is_fw, P_shape, name="tokens")


def function_word_ratio(P, tokens, *, function_words=FUNCTION_WORDS, mask=None, check_probabilities=True):
    """``ratio (...,)``: the mean over real rows of the share of mass on function-word keys
    (case-insensitive; ``mask``: True = real token)."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    share, _, mass = _share(m, _function_word_set(m.p.shape, tokens, function_words))
    return row_mean(share, m.rows & (mass > 0))


def function_word_ratio_backward(
    d_ratio, P, tokens, *, function_words=FUNCTION_WORDS, mask=None, check_probabilities=True
):
    """Gradient of :func:`function_word_ratio`: ``MapGrads(dP)``."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    return _share_backward(d_ratio, m, _function_word_set(m.p.shape, tokens, function_words), "d_ratio")


def allocation_efficiency(P, important, *, mask=None, check_probabilities=True):
    """``efficiency (...,)``: the mean over real rows of the share of mass that lands on the ``important``
    keys, in [0, 1] (``mask``: True = real token)."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    share, _, mass = _share(m, key_set(important, m.p.shape, name="important"))
    return row_mean(share, m.rows & (mass > 0))


def allocation_efficiency_backward(d_efficiency, P, important, *, mask=None, check_probabilities=True):
    """Gradient of :func:`allocation_efficiency`: ``MapGrads(dP)``."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    return _share_backward(d_efficiency, m, key_set(important, m.p.shape, name="important"), "d_efficiency")


def special_token_bias(P, special_positions, *, factor=2, mask=None, check_probabilities=True):
    """Heads ``biased (...,)`` (bool) giving special tokens more than ``factor`` × their uniform share
    ``|S|/n`` (``mask``: True = real token)."""
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    factor = as_real(factor, "factor", allow_none=False)
    w = key_set(special_positions, m.p.shape, name="special_positions")
    uniform = (np.broadcast_to(w, m.p.shape) * m.allowed).sum(axis=-1) / np.maximum(key_counts(m), 1)
    to = attention_to(m.p, special_positions, mask=m.allowed, check_probabilities=False)
    return to > factor * row_mean(uniform, m.rows)
