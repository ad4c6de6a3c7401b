"""The standard per-layer, per-head table of attention statistics."""

from __future__ import annotations

import numpy as np

from refattn._validate import RefAttnError, as_flag, as_float
from refattn.metrics._maps import attention_map, interpret_mask, real_keys, row_mean
from refattn.metrics.detectors import _tokens, duplicate_token_score, induction_score, previous_token_score
from refattn.metrics.distribution import entropy, head_confidence, head_diversity
from refattn.metrics.position import diagonal_strength, locality_score, mean_distance

__all__ = ["summarize"]


def _first_real_token(p, mask, check_probabilities):
    """Mean over real rows of the mass on each map's first real token ``(...,)`` (key 0 without a mask)."""
    m = attention_map(p, mask, check_probabilities=check_probabilities)
    real = real_keys(m)  # (..., Lk)
    first = np.arange(real.shape[-1]) == np.argmax(real, axis=-1)[..., None]  # (..., Lk) one-hot
    return row_mean((m.p * first[..., None, :]).sum(axis=-1), m.rows)


def summarize(attentions, tokens=None, *, mask=None, check_probabilities=True):
    """Per layer and head, averaged over the batch and real query rows: a dict of ``(L, H)`` arrays
    (``diversity``: ``(L,)``).

    ``attentions``: per-layer maps ``(..., H, n, n)``, first layer first.  Keys: ``entropy``,
    ``normalized_entropy``, ``confidence``, ``mean_distance``, ``locality``,
    ``diagonal_strength``, ``attention_to_first`` (the first real token: key 0 unless left padding
    moves it), ``diversity``; with ``tokens`` (integer ids or strings, ``(n,)`` or per example) also
    ``previous_token``, ``duplicate_token``, ``induction``.  ``mask``: True = real token (a key-padding
    mask ``(..., n)``).  ``check_probabilities``: every layer's real rows must be probabilities.
    """
    layers = [as_float(a, f"attentions[{i}]", ndim_min=3) for i, a in enumerate(attentions)]
    if not layers:
        raise RefAttnError("attentions: expected at least one layer")
    check = as_flag(check_probabilities, "check_probabilities")
    if tokens is not None:
        _tokens(tokens, layers[0].shape)
    for i, p in enumerate(layers):
        if check:
            attention_map(p, mask, name=f"attentions[{i}]")
    rows = {}

    def add(name, per_head):
        rows.setdefault(name, []).append(per_head.reshape(-1, per_head.shape[-1]).mean(axis=0))

    off = dict(mask=mask, check_probabilities=False)  # checked above, with the layer named
    for p in layers:
        real = interpret_mask(p.shape, mask)[1]  # (..., H, Lq) real query rows
        add("entropy", row_mean(entropy(p, **off), real))
        add("normalized_entropy", row_mean(entropy(p, normalize=True, **off), real))
        add("confidence", head_confidence(p, **off))
        add("mean_distance", row_mean(mean_distance(p, **off), real))
        add("locality", row_mean(locality_score(p, **off), real))
        add("diagonal_strength", diagonal_strength(p, **off))
        add("attention_to_first", _first_real_token(p, mask, False))
        rows.setdefault("diversity", []).append(np.mean(head_diversity(p, **off)))
        if tokens is not None:
            add("previous_token", previous_token_score(p, **off))
            add("duplicate_token", duplicate_token_score(p, tokens, **off))
            add("induction", induction_score(p, tokens, **off))
    return {name: np.array(values) for name, values in rows.items()}
