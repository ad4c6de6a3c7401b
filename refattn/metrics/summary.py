"""The standard per-layer, per-head table of attention statistics."""

from __future__ import annotations

import numpy as np

from refattn._validate import RefAttnError, as_float
from refattn.metrics._maps import interpret_mask, row_mean
from refattn.metrics.detectors import duplicate_token_score, induction_score, previous_token_score
from refattn.metrics.distribution import entropy, head_confidence, head_diversity
from refattn.metrics.position import diagonal_strength, locality_score, mean_distance
from refattn.metrics.tokens import attention_to

__all__ = ["summarize"]


def summarize(attentions, tokens=None, *, mask=None):
    """Per layer and head, averaged over the batch and real query rows: a dict of ``(L, H)`` arrays
    (``diversity``: ``(L,)``).

    ``attentions``: per-layer maps ``(..., H, n, n)``, first layer first.  Keys: ``entropy``,
    ``normalized_entropy``, ``confidence``, ``mean_distance``, ``locality``,
    ``diagonal_strength``, ``attention_to_first``, ``diversity``; with ``tokens`` also
    ``previous_token``, ``duplicate_token``, ``induction``.
    """
    layers = [as_float(a, f"attentions[{i}]", ndim_min=3) for i, a in enumerate(attentions)]
    if not layers:
        raise RefAttnError("attentions: expected at least one layer")
    rows = {}

    def add(name, per_head):
        rows.setdefault(name, []).append(per_head.reshape(-1, per_head.shape[-1]).mean(axis=0))

    for p in layers:
        real = interpret_mask(p.shape, mask)[1]  # (..., H, Lq) real query rows
        add("entropy", row_mean(entropy(p, mask=mask), real))
        add("normalized_entropy", row_mean(entropy(p, mask=mask, normalize=True), real))
        add("confidence", head_confidence(p, mask=mask))
        add("mean_distance", row_mean(mean_distance(p, mask=mask), real))
        add("locality", row_mean(locality_score(p, mask=mask), real))
        add("diagonal_strength", diagonal_strength(p, mask=mask))
        add("attention_to_first", attention_to(p, [0], mask=mask))
        rows.setdefault("diversity", []).append(np.mean(head_diversity(p, mask=mask)))
        if tokens is not None:
            add("previous_token", previous_token_score(p, mask=mask))
            add("duplicate_token", duplicate_token_score(p, tokens, mask=mask))
            add("induction", induction_score(p, tokens, mask=mask))
    return {name: np.array(values) for name, values in rows.items()}
