"""The standard per-layer, per-head table of attention statistics."""

from __future__ import annotations

import numpy as np

from refattn._validate import RefAttnError, as_flag, as_float, check_keywords_of
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
    """Per layer and head, averaged over the batch and real query rows: a dict of ``(L, H)`` arrays.

    The standard table of attention statistics, one row per layer, each entry the mean over the batch
    of the per-map value (itself a mean over real query rows):

    * ``entropy``, ``normalized_entropy``: row entropy (:func:`~refattn.metrics.distribution.entropy`),
      natural log, and ÷ ``log n``;
    * ``confidence``: :func:`~refattn.metrics.distribution.head_confidence`;
    * ``mean_distance``, ``locality``: :func:`~refattn.metrics.position.mean_distance`,
      :func:`~refattn.metrics.position.locality_score`;
    * ``diagonal_strength``: :func:`~refattn.metrics.position.diagonal_strength`;
    * ``attention_to_first``: the mass on the first real token (key 0 unless left padding moves it);
    * ``diversity``, of shape ``(L,)``: :func:`~refattn.metrics.distribution.head_diversity`, averaged over the
      batch;
    * with ``tokens`` also ``previous_token``, ``duplicate_token``, ``induction``: the scores of
      :mod:`refattn.metrics.detectors`.

    Axes: ``L`` layers, ``...`` batch dims, ``H`` heads, ``n`` tokens (queries = keys).

    Parameters
    ----------
    attentions : sequence of array_like, each of shape (..., H, n, n)
        The maps of every layer, first layer first, rows = queries, square, with the same heads in
        every layer; any real dtype, converted to float64, never mutated; finite.  At least one layer.
    tokens : array_like of int or str, shape (n,) or (..., n), optional
        The token of each position (integer ids or strings; floats are refused), one sequence for
        every map or one per example; what a padded position holds is ignored.  Default None: no
        detector scores.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``(..., n)`` (or, as for every metric, a bool mask
        broadcastable to the maps, True = the entry is kept).  Padded rows are left out of every
        average; contiguous padding gives the cropped maps' table.  Default None: every token real.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming ``attentions[i]`` and the first offending row) a layer whose real
        rows are not probabilities: entries >= 0, each row summing to 1 over its allowed keys within
        1e-6 (``n · eps`` of a coarser format).  Every layer is checked once.  False: take the maps as
        they are.

    Returns
    -------
    summary : dict of str to ndarray of float64
        The keys above, in that order: ``(L, H)`` arrays, ``diversity`` ``(L,)``.

    Raises
    ------
    RefAttnError
        No layer, a bad ``tokens`` or ``mask`` shape, or rows that are not probabilities
        (``RefAttnTypeError`` for float tokens or a non-bool mask).
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


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
