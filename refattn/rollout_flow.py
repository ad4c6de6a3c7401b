"""Attention rollout and attention flow (Abnar & Zuidema 2020), with the rollout's backward.

Maps are per layer, first layer first: ``(..., H, n, n)`` (or ``(..., n, n)`` with
``head_fusion=None``), rows = queries.  Per layer::

    Ā = fuse_heads(A)                       mean | max | min over H (None: already fused)
    Ā = Ā with its smallest entries set to 0  ⌊discard_ratio·n⌋ of each row (discard_scope="row"), or
                                            ⌊discard_ratio·n²⌋ of the whole map ("map", vit-explain's),
                                            the protected entries spared (n real tokens; ties: lower index)
    Â = residual·I + (1 − residual)·Ā       restricted to real tokens when a mask is given
    Â = Â / rowsum(Â)                       when renormalize

and ``R = Â_L ⋯ Â_{start_layer+1}``: later layers on the **left** (row-vector convention of the
original code).  Flow is a max-flow on the layered graph with capacities ``Â``.

``mask``: real tokens ``(..., n)``, True = real token (the one mask convention of refattn: True = keep).
``rollout_backward(d_R, attentions, *, options)`` takes the cotangent of ``R`` and returns
``RolloutGrads(dattentions)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np

from refattn import kernels as _kernels
from refattn._validate import (
    RefAttnError,
    RefAttnTypeError,
    as_bool,
    as_choice,
    as_cotangent,
    as_flag,
    as_int,
    as_real,
    check_keywords_of,
    to_numpy,
)
from refattn.metrics._maps import check_probability_rows

__all__ = ["DISCARD_SCOPES", "HEAD_FUSIONS", "RolloutGrads", "attention_flow", "rollout", "rollout_backward"]

#: The values of ``head_fusion`` (None for maps already fused).
HEAD_FUSIONS = ("mean", "max", "min", None)
#: The values of ``discard_scope``: the smallest entries of each row, or of the whole map (vit-explain).
DISCARD_SCOPES = ("row", "map")


class RolloutGrads(NamedTuple):
    """Gradient of :func:`rollout` (returned by :func:`rollout_backward`) w.r.t. ``attentions``.

    Fields
    ------
    dattentions : ndarray of float64, shape (L, ..., H, n, n)
        Every layer's gradient stacked in one array, whatever container held the layers:
        ``dattentions[l]`` is layer l's, 0 for the layers before ``start_layer``.
    """

    dattentions: np.ndarray


class _Options(NamedTuple):
    residual: float
    head_fusion: str | None
    start_layer: int
    discard_ratio: float
    renormalize: bool
    check_probabilities: bool = True
    discard_scope: str = "row"
    protect: tuple | None = None  # ((query, key), ...) spared by the discard; None: the scope's default


def _protect(protect):
    """``protect`` as a tuple of entries: ints (flat indices into an ``(n, n)`` map, vit-explain's
    ``indices != 0``) from a 1-D sequence, or ``(query, key)`` int pairs from a 2-D one (ranges are
    checked against n in :func:`_check_protect`)."""
    if protect is None:
        return None
    pairs = to_numpy(protect, "protect")
    if pairs.size == 0:
        return ()
    if pairs.dtype != bool and pairs.dtype.kind in "iu" and pairs.ndim == 1:
        return tuple(int(i) for i in pairs)
    if pairs.dtype == bool or pairs.dtype.kind not in "iu" or pairs.ndim != 2 or pairs.shape[-1] != 2:
        raise RefAttnError(
            f"protect: expected flat indices such as (0,) or (query, key) pairs such as [(0, 0)], got {protect!r}"
        )
    return tuple((int(i), int(j)) for i, j in pairs)


def _entries(protect, n):
    """The ``(query, key)`` pairs of a parsed ``protect`` for maps of n tokens (flat indices split)."""
    return [divmod(e % (n * n), n) if isinstance(e, int) else e for e in protect]


def _options(
    residual,
    head_fusion,
    start_layer,
    discard_ratio,
    renormalize,
    check_probabilities=True,
    discard_scope="row",
    protect=None,
):
    residual = as_real(residual, "residual", allow_none=False)
    if not 0.0 <= residual <= 1.0:
        raise RefAttnError(f"residual: expected a weight in [0, 1], got {residual}")
    if head_fusion is not None:
        as_choice(head_fusion, "head_fusion", HEAD_FUSIONS[:-1])
    discard_ratio = as_real(discard_ratio, "discard_ratio", allow_none=False)
    if not 0.0 <= discard_ratio < 1.0:
        raise RefAttnError(f"discard_ratio: expected a fraction in [0, 1), got {discard_ratio}")
    return _Options(
        residual,
        head_fusion,
        as_int(start_layer, "start_layer", minimum=0),
        discard_ratio,
        as_flag(renormalize, "renormalize"),
        as_flag(check_probabilities, "check_probabilities"),
        as_choice(discard_scope, "discard_scope", DISCARD_SCOPES),
        _protect(protect),
    )


def _layer(a, index, opts, shape):
    """One layer's map, checked but not converted (fusion reads it once, in float64)."""
    name = f"attentions[{index}]"
    a = to_numpy(a, name)
    if a.dtype == bool or a.dtype.kind not in "iuf":
        raise RefAttnTypeError(f"{name}: expected real numbers (int or float dtype), got dtype {a.dtype}")
    if a.ndim < (3 if opts.head_fusion else 2) or a.shape[-1] != a.shape[-2]:
        raise RefAttnError(
            f"{name}: expected square maps (..., {'H, ' if opts.head_fusion else ''}n, n), got shape {a.shape}"
        )
    if shape is not None and a.shape != shape:
        raise RefAttnError(f"{name}: expected shape {shape} (as layer 0), got {a.shape}")
    return a


def _check_layer(a, valid, opts, name):
    """With ``check_probabilities``: every real token's row of every head sums to 1 over the real
    tokens and is non-negative (``specs/rollout.md``); padded tokens' rows are exempt."""
    if not opts.check_probabilities:
        return
    if valid is None:
        check_probability_rows(a, np.True_, name)
        return
    real = valid[..., None, :] if opts.head_fusion else valid  # (..., 1, n) with heads, (..., n) without
    check_probability_rows(a, real, name, keys=real[..., None, :])


def _fused_heads(a, opts, name):
    """Ā ``(..., n, n)`` in float64 and the chosen head (max/min); rejects non-finite maps."""
    choice = None
    if opts.head_fusion == "mean":
        f = a.mean(axis=-3, dtype=np.float64)  # finite iff every head is (a float64 sum cannot overflow here)
    elif opts.head_fusion in ("max", "min"):
        if not np.isfinite(a.sum(dtype=np.float64)):  # max/min would hide a non-finite head
            f = np.full(a.shape[-2:], np.nan)
        else:
            choice = (np.argmax if opts.head_fusion == "max" else np.argmin)(a, axis=-3)
            f = np.take_along_axis(a, choice[..., None, :, :], axis=-3)[..., 0, :, :].astype(np.float64)
    else:
        f = a.astype(np.float64)
    if not np.isfinite(f).all():
        raise RefAttnError(f"{name}: expected finite values (no NaN or inf in any head)")
    return f, choice


class _Fused(NamedTuple):
    a_hat: np.ndarray  # (..., n, n) the layer's Â
    choice: np.ndarray | None  # (..., n, n) head index chosen by max/min fusion
    keep: np.ndarray | None  # (..., n, n) entries kept by discard_ratio
    m: np.ndarray  # (..., n, n) before renormalisation
    rowsum: np.ndarray  # (..., n, 1)
    pair: np.ndarray | None  # (..., n, n) both tokens real (None: no mask)


def _valid(mask, shape):
    """Real-token mask ``(..., n)`` for fused maps of ``shape`` (..., n, n), or None."""
    if mask is None:
        return None
    m = as_bool(mask, "mask")
    try:
        return np.broadcast_to(m, shape[:-1])
    except ValueError:
        raise RefAttnError(f"mask: expected a key-padding mask broadcastable to {shape[:-1]}, got {m.shape}") from None


def _fuse(a, opts, valid, name="attentions"):
    """One layer's Â ``(..., n, n)`` from its map ``a`` and the intermediates the backward needs."""
    f, choice = _fused_heads(a, opts, name)
    n = f.shape[-1]
    pair = None if valid is None else valid[..., :, None] & valid[..., None, :]  # (..., n, n)
    if pair is not None:
        f = np.where(pair, f, 0.0)
    keep = None
    n_real = np.full(f.shape[:-2], n) if valid is None else valid.sum(axis=-1)  # (...,) real tokens per map
    drop = _discarded(opts, n_real)  # (...,) entries discarded per row or per map
    if drop.any():
        if opts.discard_scope == "row":
            ranked = f if valid is None else np.where(valid[..., None, :], f, np.inf)  # padded keys never low
            order = np.argsort(ranked, axis=-1, kind="stable")  # (..., n, n) ascending; ties: lower index
            rank = np.empty_like(order)
            np.put_along_axis(rank, order, np.arange(n), axis=-1)
            keep = rank >= drop[..., None, None]
        else:  # the whole map, flattened row-major (vit-explain's flat.topk(k, largest=False))
            ranked = f if pair is None else np.where(pair, f, np.inf)  # padded entries never ranked low
            flat = ranked.reshape(f.shape[:-2] + (n * n,))  # (..., n²)
            order = np.argsort(flat, axis=-1, kind="stable")  # ascending; ties: lower flat index
            rank = np.empty_like(order)
            np.put_along_axis(rank, order, np.arange(n * n), axis=-1)
            keep = (rank >= drop[..., None]).reshape(f.shape)  # (..., n, n)
        spared = _spared(opts, valid, f.shape)
        if spared is not None:  # chosen among the smallest, but kept: fewer may be discarded
            keep = keep | spared
        f = f * keep
    eye = np.eye(n) if pair is None else np.eye(n) * valid[..., None, :]
    m = opts.residual * eye + (1.0 - opts.residual) * f
    rowsum = np.ones(m.shape[:-1] + (1,))
    if opts.renormalize:
        s = m.sum(axis=-1, keepdims=True)
        rowsum = np.where(s == 0, 1.0, s)  # rows of padded tokens (or all-zero rows) stay 0
        m_hat = m / rowsum
    else:
        m_hat = m
    return _Fused(m_hat, choice, keep, m, rowsum, pair)


def _discarded(opts, n_real):
    """How many entries the discard sets to 0: ``⌊ratio · n⌋`` per row, ``⌊ratio · n²⌋`` per map (``n_real``
    real tokens, an int or an array per map)."""
    count = np.asarray(n_real) ** 2 if opts.discard_scope == "map" else np.asarray(n_real)
    return np.floor(opts.discard_ratio * count).astype(np.int64)


def _spared(opts, valid, shape):
    """The entries the discard never removes, bool ``(..., n, n)`` (or broadcastable), or None.

    ``protect=None``: under ``"map"`` the [CLS] entry, the first real token's attention to itself
    (``(0, 0)`` without a mask: vit-explain's ``indices[indices != 0]``); under ``"row"`` nothing.
    Otherwise the given ``(query, key)`` pairs, in the maps' (padded) coordinates.
    """
    n = shape[-1]
    if opts.protect is None:
        if opts.discard_scope == "row":
            return None
        first = np.zeros(shape[:-2], dtype=np.int64) if valid is None else np.argmax(valid, axis=-1)  # (...,)
        eye = np.arange(n)
        return (eye[:, None] == first[..., None, None]) & (eye[None, :] == first[..., None, None])
    if not opts.protect:
        return None
    out = np.zeros((n, n), dtype=bool)
    for i, j in _entries(opts.protect, n):
        out[i, j] = True
    return out


def _check_protect(opts, n):
    """Every ``protect`` pair inside maps of n tokens (checked once, at the first layer)."""
    for e in opts.protect or ():
        if isinstance(e, int):
            if not -n * n <= e < n * n:
                raise RefAttnError(f"protect: expected flat indices in [-{n * n}, {n * n}), got {e}")
        elif not (-n <= e[0] < n and -n <= e[1] < n):
            raise RefAttnError(f"protect: expected (query, key) positions in [-{n}, {n}), got {e}")


def _kernel_applies(a, opts, valid, backend):
    """Whether the rollout kernel computes this layer: mean fusion, no mask, nothing discarded."""
    simple = opts.head_fusion == "mean" and valid is None and not _discarded(opts, a.shape[-1]).any()
    return simple and _kernels.resolve_backend(backend, a.size) == "numba"


def _a_hat(a, opts, valid, name, backend):
    """One layer's Â for the forward: by the kernel when it applies, else by :func:`_fuse`, the
    definition."""
    if _kernel_applies(a, opts, valid, backend):
        a_hat = _kernels.rollout_fuse_mean(a, opts.residual, opts.renormalize)
        if a_hat is None:
            raise RefAttnError(f"{name}: expected finite values (no NaN or inf in any head)")
        return a_hat
    return _fuse(a, opts, valid, name).a_hat


def _layers(attentions, opts, mask, *, keep_maps=False, backend=None):
    """Yield ``(index, map, fused)`` for the layers taking part, one at a time.

    Without ``keep_maps`` the map is dropped (``None``) before the next layer is read, so a stream
    of layers never holds two maps at once.
    """
    if isinstance(attentions, np.ndarray) or not isinstance(attentions, (Iterable, Iterator)):
        attentions = to_numpy(attentions, "attentions")
        if attentions.ndim < 3:
            raise RefAttnError(f"attentions: expected per-layer maps (L, ..., n, n), got shape {attentions.shape}")
    shape, valid = None, None
    for index, a in enumerate(attentions):
        a = _layer(a, index, opts, shape)
        if shape is None:
            shape = a.shape
            fused_shape = a.shape[:-3] + a.shape[-2:] if opts.head_fusion else a.shape
            valid = _valid(mask, fused_shape)
            _check_protect(opts, a.shape[-1])
        name = f"attentions[{index}]"
        _check_layer(a, valid, opts, name)
        if index < opts.start_layer and not np.isfinite(a).all():  # skipped, but still an input
            raise RefAttnError(f"{name}: expected finite values (no NaN or inf in any head)")
        if index >= opts.start_layer:
            if backend is None:  # the backward's intermediates
                fused = _fuse(a, opts, valid, name)
            else:
                fused = _Fused(_a_hat(a, opts, valid, name, backend), None, None, None, None, None)
            if not keep_maps:
                del a
                a = None
            yield index, a, fused
        del a
    if shape is None:
        raise RefAttnError("attentions: expected at least one layer, got none")


def rollout(
    attentions,
    *,
    residual=0.5,
    head_fusion="mean",
    start_layer=0,
    discard_ratio=0.0,
    discard_scope="row",
    protect=None,
    renormalize=True,
    mask=None,
    return_all=False,
    rows=None,
    backend="auto",
    check_probabilities=True,
):
    """Attention rollout ``R (..., n, n)``, or every prefix ``(L', ..., n, n)`` with ``return_all``.

    Abnar & Zuidema 2020.  Per layer (``specs/rollout.md``)::

        1. Ā = fuse_heads(A)                  mean | max | min over H (None: already fused)
        2. Ā = Ā · [both tokens real]         with a mask
        3. Ā = Ā with its smallest entries set to 0: the ⌊discard_ratio · n⌋ smallest of each row
           (discard_scope="row") or the ⌊discard_ratio · n²⌋ smallest of the whole map ("map",
           vit-explain's), the protected entries among them spared (n real tokens; real entries
           ranked, ties: lower index, row-major over the map)
        4. M = residual · I + (1 − residual) · Ā    (I on real tokens only)
        5. Â = M / rowsum(M)                  when renormalize (zero rows stay 0)

    and ``R = Â_L ⋯ Â_{s+1}`` for ``start_layer = s``: later layers on the **left** (rows are queries,
    the row-vector convention of the original code); ``return_all`` gives every prefix
    ``Â_k ⋯ Â_{s+1}``, ``k = s+1 .. L``.

    Axes: ``L`` layers, ``...`` batch dims, ``H`` heads, ``n`` tokens (queries = keys).

    Parameters
    ----------
    attentions : sequence, array or iterator of array_like, each of shape (..., H, n, n)
        The maps of every layer, first layer first, rows = queries, square, all of layer 0's shape
        (``(..., n, n)`` with ``head_fusion=None``): a list, a stacked array ``(L, ..., H, n, n)`` or an
        iterator, read one layer at a time.  int or float dtype, never mutated; finite.
        Memory does not grow with depth for an iterator (unless ``return_all``).
        Or a Dask array ``(N, L, H, n, n)`` of a dataset (``N`` examples, chunked over ``N``; ``mask``
        ``(N, n)`` or ``(n,)``): rolled out chunk by chunk, the in-memory result of its layers, ``N``
        first (``specs/datasets.md``).
    residual : float, default 0.5
        The weight of the identity (the residual connection) in ``Â = residual·I + (1 − residual)·Ā``,
        in [0, 1]; 1 gives ``I``.
    head_fusion : {"mean", "max", "min", None}, default "mean"
        How each layer's heads are fused into ``Ā``: their mean, entrywise max or min; None: the maps
        are already fused, ``(..., n, n)``.
    start_layer : int, default 0
        The first layer taken into the product (>= 0, fewer than the layers); earlier layers are
        still checked.
    discard_ratio : float, default 0.0
        In [0, 1): the fraction of ``Ā``'s smallest entries set to 0 before the residual (step 3).
    discard_scope : {"row", "map"}, default "row"
        ``"row"``: the ``⌊discard_ratio · n_real⌋`` smallest entries of each row; ``"map"``: the
        ``⌊discard_ratio · n_real²⌋`` smallest of each whole map (flattened, per example), as
        jacobgil/vit-explain's ``vit_rollout.py`` does.  Real entries only are ranked; ties go to the
        lower (flat) index.
    protect : sequence of int, or sequence of (int, int), optional
        Entries the discard never removes, as flat indices into the ``(n, n)`` map (vit-explain's:
        ``(0,)`` is entry ``(0, 0)``) or as ``(query, key)`` positions, e.g. ``[(0, 0)]``, in the
        maps' (padded) coordinates: they are ranked with the others, and when among the
        smallest they are kept, so fewer are discarded (vit-explain's ``indices[indices != 0]``).
        ``()``: none.  Default None: under ``"map"`` the [CLS] entry — the first real token's
        attention to itself, ``(0, 0)`` without a mask (vit-explain's flat index 0) —, under
        ``"row"`` none (refattn's earlier behaviour).
    renormalize : bool, default True
        Divide each row of M by its sum.
    mask : array_like of bool, broadcastable to (..., n), optional
        True = real token (refattn's one polarity: True = keep): entries touching a padded token are
        0 in every ``Ā`` (the identity too), padded tokens get zero rows and columns, and the result
        on the real tokens equals that of the cropped maps.  Default None: every token real.
    return_all : bool, default False
        Return every prefix, stacked, instead of R.
    rows : int or sequence of int, optional
        Only those rows of R (e.g. 0 for [CLS]), by a vector–matrix chain over the layers taken last
        first: O(L·n²) per row instead of O(L·n³).  Needs the layers as a sequence or array (not an
        iterator); not with ``return_all``.  Default None: all of R.
    backend : {"auto", "numpy", "numba"}, default "auto"
        ``"numba"``: each layer fused (head mean, residual, renormalisation) in one parallel read of
        its maps, for mean fusion without mask or discard (otherwise NumPy), within 1e-12 of the
        definition; ``"numpy"``: the definition; ``"auto"``: the kernel for layers of
        ``refattn.kernels.AUTO_MIN_SCORES`` (2**18) entries and more, when numba is installed.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming ``attentions[i]``, the row and its sum and minimum, with a hint
        when the maps look like logits) a layer whose real tokens' rows, in any head, are not
        probabilities over the real tokens: entries >= 0, summing to 1 within 1e-6 (``n · eps`` for
        float32 and coarser maps).  Every layer is checked, those before ``start_layer`` too; padded
        tokens' rows are exempt.  False: take the maps as they are.

    Returns
    -------
    R : ndarray of float64, shape (..., n, n)
        The rollout; ``(L', ..., n, n)`` with ``return_all`` (``L' = L − start_layer``), ``(..., n)``
        or ``(..., k, n)`` with ``rows`` (an index or k of them).  Padded tokens' rows and columns
        are 0.

    Raises
    ------
    RefAttnError
        No layer, layers of different or non-square shapes, ``start_layer`` past the last layer, an
        option out of range (``protect`` pairs outside the maps among them), non-finite maps or rows
        that are not probabilities (``RefAttnTypeError`` for a non-real dtype or a non-bool mask).
    """
    from refattn import _datasets  # a Dask array (N, L, H, n, n): a dataset, chunk by chunk (specs/datasets.md)

    if _datasets.is_dask_array(attentions):
        options = {k: v for k, v in locals().items() if k not in ("attentions", "mask", "_datasets")}
        return _datasets.rollout(rollout, attentions, mask=mask, **options)
    opts = _options(
        residual, head_fusion, start_layer, discard_ratio, renormalize, check_probabilities, discard_scope, protect
    )
    return_all = as_flag(return_all, "return_all")
    _kernels.resolve_backend(backend, 0)  # validates the choice
    if rows is not None:
        if return_all:
            raise RefAttnError("rows: the row-only path returns R's rows, not every prefix; drop return_all")
        return _rollout_rows(attentions, opts, mask, rows, backend)
    r, prefixes = None, []
    for _, _, fused in _layers(attentions, opts, mask, backend=backend):
        r = fused.a_hat if r is None else fused.a_hat @ r  # later layers on the left
        if return_all:
            prefixes.append(r)
    if r is None:
        raise RefAttnError(f"start_layer: expected fewer than the number of layers, got {opts.start_layer}")
    return np.stack(prefixes) if return_all else r


def _rows_index(rows, n):
    idx = np.asarray(rows)
    if idx.dtype.kind not in "iu" or idx.ndim > 1:
        raise RefAttnError(f"rows: expected a row index or a 1-D list of them, got {rows!r}")
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise RefAttnError(f"rows: expected indices in [0, {n}), got {idx.tolist()}")
    return idx % n


def _rollout_rows(attentions, opts, mask, rows, backend):
    """Rows of R = Â_L ⋯ Â_s: ``v = Â_L[rows]``, then ``v ← v Â_l`` for l = L−1 … s."""
    if isinstance(attentions, (Iterator,)) or not hasattr(attentions, "__len__"):
        raise RefAttnError("attentions: the row-only rollout reads the layers last first; pass a list or an array")
    count = len(attentions)
    if count == 0:
        raise RefAttnError("attentions: expected at least one layer, got none")
    if opts.start_layer >= count:
        raise RefAttnError(f"start_layer: expected fewer than the number of layers, got {opts.start_layer}")
    shape, valid, v, idx = None, None, None, None
    for index in range(count - 1, -1, -1):
        a = _layer(attentions[index], index, opts, shape)
        if shape is None:
            shape = a.shape
            fused_shape = a.shape[:-3] + a.shape[-2:] if opts.head_fusion else a.shape
            valid = _valid(mask, fused_shape)
            _check_protect(opts, a.shape[-1])
            idx = _rows_index(rows, a.shape[-1])
        _check_layer(a, valid, opts, f"attentions[{index}]")
        if index < opts.start_layer:
            if not np.isfinite(a).all():
                raise RefAttnError(f"attentions[{index}]: expected finite values (no NaN or inf in any head)")
            continue
        name = f"attentions[{index}]"
        if _kernel_applies(a, opts, valid, backend):  # v Â inside the kernel: Â is never formed
            if v is None:
                v = np.zeros(a.shape[:-3] + (np.atleast_1d(idx).size, a.shape[-1]))
                v[..., np.arange(v.shape[-2]), np.atleast_1d(idx)] = 1.0  # e_rows Â = Â[rows]
            v = _kernels.rollout_rows_product(v, a, opts.residual, opts.renormalize)
            if v is None:
                raise RefAttnError(f"{name}: expected finite values (no NaN or inf in any head)")
            continue
        a_hat = _fuse(a, opts, valid, name).a_hat  # (..., n, n)
        v = a_hat[..., np.atleast_1d(idx), :] if v is None else v @ a_hat  # (..., k, n)
    return v[..., 0, :] if idx.ndim == 0 else v


def rollout_backward(
    d_R,
    attentions,
    *,
    residual=0.5,
    head_fusion="mean",
    start_layer=0,
    discard_ratio=0.0,
    discard_scope="row",
    protect=None,
    renormalize=True,
    mask=None,
    return_all=False,
    rows=None,
    check_probabilities=True,
):
    """Gradient of :func:`rollout`: ``dattentions = ∂/∂attentions of Σ d_R · R``.

    Going from the last layer down with the prefixes ``P_k = Â_k ⋯ Â_{s+1}``: ``G_k = dR_k + Â_{k+1}ᵀ
    G_{k+1}``, ``dÂ_k = G_k P_{k−1}ᵀ``, then back through each layer's steps (``specs/rollout.md``):
    the renormalisation, the residual, the discard (its selection held fixed, per row or per map), the
    padding and the fusion (mean: ``dĀ / H`` to every head; max/min: the subgradient, all to the
    selected head, lower head index on ties).  The result is the same whether ``attentions`` is an
    array, a sequence or an iterator.

    Parameters
    ----------
    d_R : array_like
        Cotangent of ``R``: exactly its shape, finite; ``(L', ..., n, n)`` (every prefix) with
        ``return_all``; the shape of those rows with ``rows`` (scattered into R's full shape).
    attentions : sequence, array or iterator of array_like
        As :func:`rollout`.
    residual, head_fusion, start_layer, discard_ratio, discard_scope, protect, renormalize
    mask, return_all, rows, check_probabilities
        The forward's options, as :func:`rollout` (same defaults; ``mask``: True = real token).
        The backward runs NumPy: it takes no ``backend``.

    Returns
    -------
    RolloutGrads
        ``(dattentions,)``: float64, ``(L, ..., H, n, n)``, 0 for the layers before ``start_layer``.
    """
    opts = _options(
        residual, head_fusion, start_layer, discard_ratio, renormalize, check_probabilities, discard_scope, protect
    )
    return_all = as_flag(return_all, "return_all")
    if rows is not None:
        if return_all:
            raise RefAttnError("rows: the row-only path returns R's rows, not every prefix; drop return_all")
        maps = list(attentions)
        n = np.shape(maps[0])[-1]
        idx = _rows_index(rows, n)
        fused_batch = np.shape(maps[0])[:-3] if head_fusion else np.shape(maps[0])[:-2]
        d_rows = as_cotangent(d_R, fused_batch + idx.shape + (n,), "d_R")
        full = np.zeros(fused_batch + (n, n))
        np.add.at(
            full, (Ellipsis, idx if idx.ndim else idx[None], slice(None)), d_rows if idx.ndim else d_rows[..., None, :]
        )
        return rollout_backward(
            full,
            maps,
            residual=residual,
            head_fusion=head_fusion,
            start_layer=start_layer,
            discard_ratio=discard_ratio,
            discard_scope=discard_scope,
            protect=protect,
            renormalize=renormalize,
            mask=mask,
            check_probabilities=check_probabilities,
        )
    maps, fused = [], []
    for index, a, f in _layers(attentions, opts, mask, keep_maps=True):
        maps.append((index, a))
        fused.append(f)
    first = maps[0][0]
    shape = maps[0][1].shape
    n_layers = first + len(maps)
    r_shape = fused[0].a_hat.shape
    d = as_cotangent(d_R, ((len(fused),) + r_shape) if return_all else r_shape, "d_R")
    # prefixes P_k = Â_k ⋯ Â_first (P_{-1} = I)
    prefixes, r = [], None
    for f in fused:
        r = f.a_hat if r is None else f.a_hat @ r
        prefixes.append(r)
    grads = np.zeros((n_layers,) + shape)  # (L, ..., H, n, n): one array, written layer by layer
    g = np.zeros(r_shape)
    for k in range(len(fused) - 1, -1, -1):
        # R_k = Â_k R_{k-1}: G_k = dR_k + Â_{k+1}ᵀ G_{k+1}
        g = g + (d[k] if return_all else (d if k == len(fused) - 1 else 0.0))
        prev = np.eye(r_shape[-1]) if k == 0 else prefixes[k - 1]
        d_hat = g @ np.swapaxes(prev, -1, -2)  # (..., n, n)
        g = np.swapaxes(fused[k].a_hat, -1, -2) @ g
        grads[first + k] = _fuse_backward(d_hat, fused[k], opts, maps[k][1])
    return RolloutGrads(grads)


def _fuse_backward(d_hat, f, opts, a):
    """Undo one layer: renormalisation, residual, discard, head fusion → gradient of its map."""
    if opts.renormalize:
        # Â = M / rowsum(M)
        d_m = (d_hat - np.sum(d_hat * f.a_hat, axis=-1, keepdims=True)) / f.rowsum
        d_m = np.where(f.m.sum(axis=-1, keepdims=True) == 0, 0.0, d_m)
    else:
        d_m = d_hat
    # M = r I + (1 - r) Ā
    d_f = (1.0 - opts.residual) * d_m
    if f.keep is not None:
        d_f = d_f * f.keep
    if f.pair is not None:  # Ā = where(both tokens real, Ā, 0)
        d_f = np.where(f.pair, d_f, 0.0)
    if opts.head_fusion == "mean":
        return np.broadcast_to(d_f[..., None, :, :] / a.shape[-3], a.shape)  # copied into its layer's slot
    if opts.head_fusion in ("max", "min"):
        out = np.zeros(a.shape)
        np.put_along_axis(out, f.choice[..., None, :, :], d_f[..., None, :, :], axis=-3)
        return out
    return d_f


def attention_flow(
    attentions,
    *,
    residual=0.5,
    head_fusion="mean",
    output_layer=None,
    mask=None,
    normalize=True,
    backend="auto",
    check_probabilities=True,
):
    """Attention flow ``flow (..., n, n)``: max-flow from each node of the output layer to each input token.

    Abnar & Zuidema 2020.  Nodes ``(l, i)`` for l = 0..L (0 = input tokens), edges ``(l, i) → (l − 1, j)``
    with capacity ``Â^(l)_ij`` (steps 1–5 of :func:`rollout`, renormalised, nothing discarded).  For
    each node i of the output layer and each input token j, the maximum flow from ``(L_o, i)`` to
    ``(0, j)`` in float64 (no integer quantisation); each row is then normalised.  Two exact
    solvers (``specs/rollout.md``, Flow): Dinic's algorithm in a Numba kernel (``backend="numba"``:
    every pair of an n=64, L=12 map in about 1-2 s on 2 cores) and, the definition, one linear
    program per pair solved by SciPy's HiGHS (``"numpy"``: ``n²`` LPs of ``L·n²`` variables, ~40 min
    at that size: a reference for small n); they agree to 1e-12.  Not differentiable (no backward).

    Axes: ``L`` layers, ``...`` batch dims, ``H`` heads, ``n`` tokens (queries = keys).

    Parameters
    ----------
    attentions : sequence, array or iterator of array_like, each of shape (..., H, n, n)
        The maps of every layer, first layer first, rows = queries, square, all of layer 0's shape
        (``(..., n, n)`` with ``head_fusion=None``): a list, a stacked array ``(L, ..., H, n, n)`` or an
        iterator, read one layer at a time.  int or float dtype, never mutated; finite.
    residual : float, default 0.5
        The weight of the identity (the residual connection) in ``Â = residual·I + (1 − residual)·Ā``,
        in [0, 1]; 1 gives ``I``.
    head_fusion : {"mean", "max", "min", None}, default "mean"
        How each layer's heads are fused into ``Ā``: their mean, entrywise max or min; None: the maps
        are already fused, ``(..., n, n)``.
    output_layer : int, optional
        The source layer ``L_o``, in 1..L.  Default None: the last layer, L.
    mask : array_like of bool, broadcastable to (..., n), optional
        True = real token (refattn's one polarity: True = keep): padded tokens neither send nor
        receive flow (their entries are 0 in every ``Â``), and the result on the real tokens equals
        that of the cropped maps (to 1e-9).  Default None: every token real.
    normalize : bool, default True
        Divide each row by its total flow; False: the raw flows, each ≤ 1 (the capacity out of a
        node).
    backend : {"auto", "numpy", "numba"}, default "auto"
        ``"numba"``: the Dinic kernel (:func:`refattn.kernels.layered_max_flows`); ``"numpy"``: the
        HiGHS linear programs; ``"auto"``: the kernel when numba is installed and the LPs' work
        ``L_o·n⁴·(batch size)`` is at least ``refattn.kernels.AUTO_MIN_SCORES`` (2¹⁸: n = 16 at
        L_o = 4, where the LPs take seconds), the LPs otherwise.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming ``attentions[i]``, the row and its sum and minimum, with a hint
        when the maps look like logits) a layer whose real tokens' rows, in any head, are not
        probabilities over the real tokens: entries >= 0, summing to 1 within 1e-6 (``n · eps`` for
        float32 and coarser maps).  Every layer is checked, those past ``output_layer`` too; padded
        tokens' rows are exempt.  False: take the maps as they are.

    Returns
    -------
    flow : ndarray of float64, shape (..., n, n)
        Row i: the flow from output node i to each input token (rows sum to 1 with ``normalize``);
        0 on padded tokens' rows and columns.

    Raises
    ------
    RefAttnError
        As :func:`rollout`; also ``output_layer`` out of range, an unknown ``backend`` (or
        ``"numba"`` without numba), an output node that carries no flow to any input token, or an LP
        that fails.
    """
    opts = _options(residual, head_fusion, 0, 0.0, True, check_probabilities)
    normalize = as_flag(normalize, "normalize")
    _kernels.resolve_backend(backend, 0)  # validates the choice before any layer is read
    layers = [f.a_hat for _, _, f in _layers(attentions, opts, mask)]
    depth = len(layers) if output_layer is None else as_int(output_layer, "output_layer", minimum=1)
    if depth > len(layers):
        raise RefAttnError(f"output_layer: expected 1..{len(layers)}, got {depth}")
    graphs = np.stack(layers[:depth], axis=-3)  # (..., Lo, n, n): edge (l+1, i) -> (l, j) has capacity [l, i, j]
    n = graphs.shape[-1]
    batch = graphs.shape[:-3]
    valid = np.ones(batch + (n,), dtype=bool)
    if mask is not None:
        valid = np.broadcast_to(as_bool(mask, "mask"), batch + (n,))
    if _kernels.resolve_backend(backend, depth * n**4 * int(np.prod(batch))) == "numba":
        flows = _kernels.layered_max_flows(graphs)  # (..., n, n)
    else:
        flows = _lp_flows(graphs, valid)
    flows = np.where(valid[..., :, None] & valid[..., None, :], flows, 0.0)
    total = flows.sum(axis=-1)  # (..., n)
    silent = valid & ~(total > 0)
    if silent.any():
        *b, i = (int(x) for x in np.argwhere(silent)[0])
        raise RefAttnError(f"attentions: output node {i} (batch index {tuple(b)}) carries no flow to any input token")
    return flows / np.where(total > 0, total, 1.0)[..., None] if normalize else flows


def _lp_flows(graphs, valid):
    """The flows ``(..., n, n)`` of every pair of real tokens by :func:`_max_flow` (0 elsewhere)."""
    from scipy.optimize import linprog

    batch, n = graphs.shape[:-3], graphs.shape[-1]
    out = np.zeros(batch + (n, n))
    for b in np.ndindex(*batch):
        real = np.flatnonzero(valid[b])
        for i in real:
            for j in real:
                out[b + (i, j)] = _max_flow(graphs[b], i, j, linprog)
    return out


def _conservation(depth, n):
    """The equality constraints of :func:`_max_flow`, sparse ``((depth − 1)·n, depth·n²)``: row
    ``(layer − 1)·n + j`` is ``Σ_k x[layer − 1, j, k] − Σ_k x[layer, k, j]`` (out of minus into node
    ``(layer, j)``), for every intermediate layer 1..depth−1."""
    from scipy import sparse

    layer, j, k = np.meshgrid(np.arange(1, depth), np.arange(n), np.arange(n), indexing="ij")
    rows = ((layer - 1) * n + j).ravel()
    out_of = (((layer - 1) * n + j) * n + k).ravel()  # x[layer - 1, j, k]: edge (layer, j) -> (layer - 1, k)
    into = ((layer * n + k) * n + j).ravel()  # x[layer, k, j]: edge (layer + 1, k) -> (layer, j)
    values = np.concatenate([np.ones(rows.size), -np.ones(rows.size)])
    return sparse.csr_array(
        (values, (np.concatenate([rows, rows]), np.concatenate([out_of, into]))), shape=((depth - 1) * n, depth * n * n)
    )


def _max_flow(cap, source, sink, linprog):
    """Max flow from node ``source`` of the top layer to input token ``sink`` (layered graph, LP).

    Variable ``x[l, i, j]`` is the flow on edge ``(l + 1, i) → (l, j)``, ``0 <= x <= cap[l, i, j]``;
    conservation at every intermediate node (:func:`_conservation`, sparse); HiGHS with feasibility
    tolerances 1e-10.
    """
    depth, n, _ = cap.shape
    upper = cap.copy()
    upper[-1, np.arange(n) != source, :] = 0.0  # only the source emits at the top layer
    upper[0, :, np.arange(n) != sink] = 0.0  # only the sink absorbs at the bottom layer
    objective = np.zeros(upper.shape)
    objective[0, :, sink] = -1.0  # maximise the flow into the sink
    res = linprog(
        objective.ravel(),
        A_eq=_conservation(depth, n) if depth > 1 else None,
        b_eq=np.zeros((depth - 1) * n) if depth > 1 else None,
        bounds=np.stack([np.zeros(upper.size), upper.ravel()], axis=1),
        method="highs",
        options={"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10},
    )
    if res.status != 0:
        raise RefAttnError(f"attention_flow: the max-flow LP failed ({res.message})")
    return max(-res.fun, 0.0)


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
