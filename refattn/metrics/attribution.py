"""Attention attribution in one call: per-token summaries of every layer's maps and of their rollout.

:func:`attention_attribution` reads the maps of a model's layers — an array ``(L, B, H, T, T)``, a
list of ``(B, H, T, T)`` layers, or any iterator of them (a generator is read once, one layer at a
time, never stacked) — and returns a dict of eight entries (:data:`ATTRIBUTION_KEYS`): six
``(B, T)`` arrays, per key or per query row, and the batch size and sequence length.  Each entry is a
registered metric of :mod:`refattn.metrics` or :func:`refattn.rollout`, averaged over layers and
heads; the rollout product is carried as one running ``(B, T, T)`` matrix, and ``chunk_size`` walks
the batch in slices, so the memory held stays near the layer being read (``specs/metrics.md``,
"Attribution in one call").  Not differentiable: a report (each metric it reports has its own
backward).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from refattn import kernels as _kernels
from refattn._validate import (
    RefAttnError,
    RefAttnTypeError,
    as_bool,
    as_flag,
    as_int,
    as_real,
    check_keywords_of,
    to_numpy,
)
from refattn.metrics._maps import attention_map
from refattn.metrics.distribution import entropy, max_weight
from refattn.metrics.tokens import attention_received

__all__ = ["ATTRIBUTION_KEYS", "attention_attribution"]

#: The keys of :func:`attention_attribution`'s result, in its order.
ATTRIBUTION_KEYS = (
    "mean_attention",
    "max_attention",
    "attention_entropy",
    "attention_concentration",
    "rollout_max",
    "rollout_entropy",
    "batch_size",
    "seq_length",
)
_PER_LAYER = ATTRIBUTION_KEYS[:4]  # the entries summed over layers and heads


def _layer_source(attentions):
    """An iterator over the layers: the first axis of an array, the items of anything else iterable."""
    if isinstance(attentions, np.ndarray) or not isinstance(attentions, (Iterable, Iterator)):
        a = to_numpy(attentions, "attentions")
        if a.ndim != 5:
            raise RefAttnError(f"attentions: expected per-layer maps (L, B, H, T, T), got shape {a.shape}")
        return iter(a)
    return iter(attentions)


def _layer(a, index, shape):
    """Layer ``index`` as a NumPy array (not converted: each metric reads it in float64), checked."""
    name = f"attentions[{index}]"
    a = to_numpy(a, name)
    if a.dtype == bool or a.dtype.kind not in "iuf":  # as refattn.rollout
        raise RefAttnTypeError(f"{name}: expected real numbers (int or float dtype), got dtype {a.dtype}")
    if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
        raise RefAttnError(f"{name}: expected square maps (B, H, T, T), got shape {a.shape}")
    if shape is not None and a.shape != shape:
        raise RefAttnError(f"{name}: expected shape {shape} (as layer 0), got {a.shape}")
    return a


def _real_tokens(mask, batch, length):
    if mask is None:
        return None
    m = as_bool(mask, "mask")
    if m.shape != (batch, length):
        raise RefAttnError(f"mask: expected the real tokens (B, T) = {(batch, length)}, got shape {m.shape}")
    return m


def _chunks(batch, size):
    """The batch slices one pass reads: ``[0, size), [size, 2·size), ...``, the last one shorter."""
    return [slice(start, min(start + size, batch)) for start in range(0, batch, size)]


def _concentration(p):
    """Σ_j P_ij² of each row ``(..., T)`` of a masked float64 map (the Herfindahl–Hirschman index)."""
    return np.einsum("...ij,...ij->...i", p, p)  # (..., H, T), no map-sized temporary


def _average(total, layers, heads):
    """A sum over ``layers`` layers of ``heads`` heads each → its mean."""
    return total / (layers * heads)


def _add_layer(sums, p, real, check, backend, name):
    """Add one batch slice of one layer to the head sums: ``p (b, H, T, T)``, ``real (b, T)`` or None."""
    m = attention_map(p, real, name=name, check_probabilities=check)  # masked float64 copy, checked once
    off = {"mask": real, "check_probabilities": False}
    sums["mean_attention"] += attention_received(m.p, **off).sum(axis=1)  # (b, T) per key
    sums["max_attention"] += m.p.max(axis=-2).sum(axis=1)  # (b, T) per key: padded rows and keys are 0 in m.p
    sums["attention_concentration"] += _concentration(m.p).sum(axis=1)  # (b, T) per query row
    del m
    sums["attention_entropy"] += entropy(p, backend=backend, **off).sum(axis=1)  # (b, T) per query row, nats


def attention_attribution(
    attentions, *, mask=None, residual=0.5, chunk_size=None, check_probabilities=True, backend="auto"
):
    """Per-token attention attribution ``attribution`` of every layer's maps and of their rollout, in one call.

    With ``P^(l) (B, H, T, T)`` the maps of layer ``l`` (rows = queries), ``L`` layers, ``H`` heads,
    ``R = Â_L ⋯ Â_1 (B, T, T)`` their rollout (:func:`refattn.rollout`: head mean,
    ``Â = residual·I + (1 − residual)·Ā`` renormalised, later layers on the left; Abnar & Zuidema
    2020), ``i`` a real query row, ``j`` a key and ``n_rows`` the real rows of the example::

        mean_attention[b, j]          = 1/(L·H) Σ_l,h  (1/n_rows) Σ_i P^(l)_bhij    attention_received
        max_attention[b, j]           = 1/(L·H) Σ_l,h  max_i P^(l)_bhij              (real rows i)
        attention_entropy[b, i]       = 1/(L·H) Σ_l,h  −Σ_j P log P                  entropy, nats
        attention_concentration[b, i] = 1/(L·H) Σ_l,h  Σ_j (P^(l)_bhij)²             Herfindahl–Hirschman
        rollout_max[b, i]             = max_j R_bij                                  max_weight of R
        rollout_entropy[b, i]         = −Σ_j R_bij log R_bij                         entropy of R, nats

    The concentration of a row is its Herfindahl–Hirschman index (Hirschman 1945, Herfindahl 1950),
    the probability that two keys drawn from the row coincide, ``exp(−H₂)`` with ``H₂`` the Rényi
    entropy of order 2: ``1/n`` for a row uniform over ``n`` real keys, 1 for a one-hot row; its
    inverse is the row's effective number of keys.  Every sum runs over real tokens only: padded keys
    count as 0, padded query rows are left out of every average and read 0 in per-row entries, and
    an example padded contiguously gives the cropped example's values on its real tokens (as every
    metric of :mod:`refattn.metrics`).  Layers are read one at a time: an iterator is consumed once
    and never stacked, the rollout is one running ``(B, T, T)`` product ``R ← Â_l R``, so the memory
    held is the layer being read, about three float64 copies of one batch slice of it (``chunk_size``
    examples; the whole batch by default) and ``O(B·T²)`` for R.  The result is the same (to 1e-12)
    for an array, a list, an iterator and every ``chunk_size``.  Not differentiable (no backward):
    each entry is a registered metric with its own.

    Axes: ``L`` layers, ``B`` batch, ``H`` heads, ``T`` tokens (queries = keys).

    Parameters
    ----------
    attentions : array_like (L, B, H, T, T), or a sequence or iterator of array_like (B, H, T, T)
        The maps of every layer, first layer first, rows = queries, square, all of layer 0's shape:
        a stacked array, a list (e.g. a Hugging Face model's ``outputs.attentions``) or any iterator
        (a generator is read once, layer by layer).  Any real dtype, read in float64, never mutated;
        finite.  At least one layer.
        Or a Dask array ``(N, L, H, T, T)`` of a dataset (``N`` examples first, chunked over ``N``;
        ``mask`` ``(N, T)``): attributed chunk by chunk, the in-memory result (``specs/datasets.md``).
    mask : array_like of bool, shape (B, T), optional
        True = real token (refattn's one polarity: True = keep), as every metric's key-padding mask:
        padded keys count as 0 and padded query rows are left out.  Default None: every token real.
    residual : float, default 0.5
        The rollout's identity weight, in [0, 1] (:func:`refattn.rollout`'s ``residual``: the
        residual connection, Abnar & Zuidema's 0.5).
    chunk_size : int, optional
        >= 1: read each layer ``chunk_size`` examples at a time (the float64 copies the metrics make
        are of that many examples, not of the whole layer).  Default None: the whole batch at once.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming ``attentions[l]``, or ``attentions[l][b0:b1]`` for a batch slice,
        with the first offending row of that slice, its sum and minimum) a layer whose real rows are
        not probabilities over the real keys (within 1e-6, ``n · eps`` for coarser formats).  Each
        layer is checked once.  False: take the maps as they are.
    backend : {"auto", "numpy", "numba"}, default "auto"
        Passed to :func:`~refattn.metrics.distribution.entropy` and :func:`refattn.rollout` (their
        kernels apply without a mask); results agree to 1e-12 whichever runs.

    Returns
    -------
    attribution : dict
        Exactly the keys of :data:`ATTRIBUTION_KEYS`, in that order: ``mean_attention``,
        ``max_attention`` (per key), ``attention_entropy``, ``attention_concentration``,
        ``rollout_max``, ``rollout_entropy`` (per query row): float64 ``(B, T)`` arrays, 0 on padded
        tokens; ``batch_size`` ``B`` and ``seq_length`` ``T``: Python ints (``T`` counts padded
        positions too).

    Raises
    ------
    RefAttnError
        No layer, a layer that is not ``(B, H, T, T)`` or not of layer 0's shape, a ``mask`` that is
        not ``(B, T)``, ``residual`` outside [0, 1], ``chunk_size`` < 1, non-finite maps or rows that
        are not probabilities (``RefAttnTypeError`` for a non-real dtype or a non-bool mask).
    """
    from refattn import _datasets  # a Dask array (N, L, H, T, T): a dataset, chunk by chunk (specs/datasets.md)

    if _datasets.is_dask_array(attentions):
        options = {k: v for k, v in locals().items() if k not in ("attentions", "mask", "_datasets")}
        return _datasets.attribution(attention_attribution, attentions, mask=mask, **options)
    from refattn.rollout_flow import rollout  # here: rollout_flow imports refattn.metrics._maps

    residual = as_real(residual, "residual", allow_none=False)
    if not 0.0 <= residual <= 1.0:
        raise RefAttnError(f"residual: expected a weight in [0, 1], got {residual}")
    size = None if chunk_size is None else as_int(chunk_size, "chunk_size", minimum=1)
    check = as_flag(check_probabilities, "check_probabilities")
    _kernels.resolve_backend(backend, 0)  # validates the choice
    layers = _layer_source(attentions)
    shape, real, sums, r, count = None, None, None, None, 0
    for a in layers:  # no enumerate: its cached tuple would keep the previous layer alive during next()
        p = _layer(a, count, shape)
        if shape is None:
            shape = p.shape
            batch, _, length, _ = shape
            real = _real_tokens(mask, batch, length)
            sums = {key: np.zeros((batch, length)) for key in _PER_LAYER}
            r = np.zeros((batch, length, length))
            slices = _chunks(batch, size or max(batch, 1))
        for s in slices:
            part = {key: value[s] for key, value in sums.items()}  # views: the sums are added in place
            name = f"attentions[{count}]" if len(slices) == 1 else f"attentions[{count}][{s.start}:{s.stop}]"
            piece = None if real is None else real[s]
            _add_layer(part, p[s], piece, check, backend, name)
            a_hat = rollout([p[s]], residual=residual, mask=piece, check_probabilities=False, backend=backend)
            r[s] = a_hat if count == 0 else a_hat @ r[s]  # R ← Â_l R: later layers on the left
            del a_hat
        del a, p  # before the next layer is read
        count += 1
    if shape is None:
        raise RefAttnError("attentions: expected at least one layer, got none")
    heads = shape[1]
    out = {key: _average(sums[key], count, heads) for key in _PER_LAYER}
    out["rollout_max"] = max_weight(r, mask=real, check_probabilities=False)
    out["rollout_entropy"] = entropy(r, mask=real, check_probabilities=False, backend=backend)
    out["batch_size"] = int(shape[0])
    out["seq_length"] = int(shape[2])
    return {key: out[key] for key in ATTRIBUTION_KEYS}


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
