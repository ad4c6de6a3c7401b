"""The standard per-layer, per-head table of attention statistics."""

from __future__ import annotations

import numpy as np

from refattn._validate import RefAttnError, as_flag, as_float, check_keywords_of, to_numpy
from refattn.metrics._maps import attention_map, interpret_mask, kernel_rows, real_keys, row_mean, use_kernel
from refattn.metrics.detectors import _tokens, duplicate_token_score, induction_score, previous_token_score
from refattn.metrics.distribution import _diversity_from_gram, _kernel_entropy, entropy, head_confidence, head_diversity
from refattn.metrics.position import _kernel_locality, diagonal_strength, locality_score, mean_distance

__all__ = ["summarize"]


def _first_real_token(p, mask, check_probabilities):
    """Mean over real rows of the mass on each map's first real token ``(...,)`` (key 0 without a mask)."""
    m = attention_map(p, mask, check_probabilities=check_probabilities)
    real = real_keys(m)  # (..., Lk)
    first = np.arange(real.shape[-1]) == np.argmax(real, axis=-1)[..., None]  # (..., Lk) one-hot
    return row_mean((m.p * first[..., None, :]).sum(axis=-1), m.rows)


def _share(mass, total):
    """A detector's "mul" score per map from per-row masses: ``Σ_i mass_i / Σ_i total_i`` (0 without mass)."""
    t = total.sum(axis=-1)
    return np.where(t > 0, mass.sum(axis=-1) / np.where(t > 0, t, 1.0), 0.0)


def _kernel_layer(r, add, tokens):
    """One layer's rows of the table from the metric kernel's rows (:class:`~refattn.metrics._maps.KernelRows`)."""
    real = r.rows
    add("entropy", row_mean(_kernel_entropy(r, False), real))
    add("normalized_entropy", row_mean(_kernel_entropy(r, True), real))
    add("confidence", row_mean(np.where(real, r.max, 0.0), real))
    add("mean_distance", row_mean(r.distance, real))
    add("locality", row_mean(_kernel_locality(r), real))
    add("diagonal_strength", row_mean(r.diagonal, r.diagonal_kept))
    add("attention_to_first", row_mean(r.first, real))
    add("diversity", np.mean(_diversity_from_gram(r.gram)))
    if tokens is not None:
        add("previous_token", _share(r.previous, r.total))
        add("duplicate_token", _share(r.duplicate, r.total))
        add("induction", _share(r.induction, r.total))


def summarize(attentions, tokens=None, *, mask=None, backend="auto", check_probabilities=True):
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
        Or a Dask array ``(N, L, H, n, n)`` of a dataset (``N`` examples of ``L`` layers each, chunked
        over ``N``; ``mask`` and ``tokens`` then ``(N, n)`` or ``(n,)``): summarised chunk by chunk, the
        in-memory result of its layers (``specs/datasets.md``).
    tokens : array_like of int or str, shape (n,) or (..., n), optional
        The token of each position (integer ids or strings; floats are refused), one sequence for
        every map or one per example; what a padded position holds is ignored.  Default None: no
        detector scores.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``(..., n)`` (or, as for every metric, a bool mask
        broadcastable to the maps, True = the entry is kept).  Padded rows are left out of every
        average; contiguous padding gives the cropped maps' table.  Default None: every token real.
    backend : {"auto", "numpy", "numba"}, default "auto"
        ``"numba"``: each layer read once by the metric kernel (``refattn/kernels/metric_kernels.py``:
        every statistic of the table and the probability check in one parallel pass, then means over
        rows), within 1e-12 of the definitions; ``"numpy"``: the metrics' definitions, one call each;
        ``"auto"``: the kernel for layers of ``refattn.kernels.AUTO_MIN_SCORES`` (2**18) entries on, when
        numba is installed.
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
    from refattn import _datasets  # a Dask array (N, L, H, n, n): a dataset, chunk by chunk (specs/datasets.md)

    if _datasets.is_dask_array(attentions):
        return _datasets.summary(summarize, attentions, tokens, mask=mask, check_probabilities=check_probabilities)
    given = [to_numpy(a, f"attentions[{i}]") for i, a in enumerate(attentions)]
    if not given:
        raise RefAttnError("attentions: expected at least one layer")
    check = as_flag(check_probabilities, "check_probabilities")
    fast = [use_kernel(backend, g) and g.ndim >= 3 for g in given]  # the kernel validates as it reads
    layers = [g if f else as_float(g, f"attentions[{i}]", ndim_min=3) for i, (g, f) in enumerate(zip(given, fast))]
    t = None if tokens is None else _tokens(tokens, layers[0].shape)
    for i, p in enumerate(given):
        if check and not fast[i]:  # the maps as given: their format sets the tolerance
            attention_map(p, mask, name=f"attentions[{i}]")
    rows = {}

    def add(name, per_head):
        if name == "diversity":
            rows.setdefault(name, []).append(per_head)
        else:
            rows.setdefault(name, []).append(per_head.reshape(-1, per_head.shape[-1]).mean(axis=0))

    off = dict(mask=mask, check_probabilities=False)  # checked above, with the layer named
    for i, p in enumerate(layers):
        square = p.shape[-1] == p.shape[-2]
        r = None
        if fast[i] and (t is None or square):  # the detectors refuse a map that is not square
            name = f"attentions[{i}]"
            r = kernel_rows(p, mask, name=name, check_probabilities=check, entropy=True, tokens=t, gram=True)
        if r is not None:
            _kernel_layer(r, add, t)
            continue
        if fast[i] and check:  # not checked above
            attention_map(p, mask, name=f"attentions[{i}]")
        p = as_float(p, f"attentions[{i}]", ndim_min=3)
        real = interpret_mask(p.shape, mask)[1]  # (..., H, Lq) real query rows
        add("entropy", row_mean(entropy(p, backend="numpy", **off), real))
        add("normalized_entropy", row_mean(entropy(p, normalize=True, backend="numpy", **off), real))
        add("confidence", head_confidence(p, backend="numpy", **off))
        add("mean_distance", row_mean(mean_distance(p, backend="numpy", **off), real))
        add("locality", row_mean(locality_score(p, backend="numpy", **off), real))
        add("diagonal_strength", diagonal_strength(p, backend="numpy", **off))
        add("attention_to_first", _first_real_token(p, mask, False))
        add("diversity", np.mean(head_diversity(p, backend="numpy", **off)))
        if tokens is not None:
            add("previous_token", previous_token_score(p, **off))
            add("duplicate_token", duplicate_token_score(p, tokens, **off))
            add("induction", induction_score(p, tokens, **off))
    return {name: np.array(values) for name, values in rows.items()}


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
