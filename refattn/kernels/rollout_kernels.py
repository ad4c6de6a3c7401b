"""Numba kernel for rollout's per-layer pass: head mean, residual and row renormalisation in one
read of the maps.  The NumPy definition is ``refattn.rollout_flow._fuse`` (mean fusion, no discard, no
mask); results agree to ≤ 1e-12.  Tasks own one row ``(b, i)`` of the output and sum the heads in a
fixed order, so results are bitwise identical for any number of threads.
"""

import numba as nb
import numpy as np


@nb.njit(inline="always", cache=True)
def _fused_row(a, b, i, weight, residual, row):
    """Row i of map b before renormalisation, ``weight·Σ_h a[b, h, i] + residual·e_i``, into ``row``;
    returns its sum (heads added in order: deterministic)."""
    n = row.shape[0]
    for j in range(n):
        row[j] = 0.0
    for h in range(a.shape[1]):
        src = a[b, h, i]
        for j in range(n):
            row[j] += src[j]
    total = 0.0
    for j in range(n):
        row[j] *= weight
        total += row[j]
    row[i] += residual
    return total + residual


@nb.njit(parallel=True, cache=True)
def fuse_mean(a, residual, renormalize, out, bad):
    """``out[b] = (residual·I + (1 − residual)·mean_h a[b, h]) / rowsum`` for every map ``b``.

    Tasks own one output row ``(b, i)`` (``prange`` over ``B·n``) and add the heads in order.
    Compiled for four explicit signatures (float32 / float64 maps, contiguous or any strides);
    called by :func:`refattn.kernels.rollout_fuse_mean`, by keyword.

    Parameters
    ----------
    a : ndarray, shape (B, H, n, n)
        ``B`` attention maps of ``H`` heads each, float32 or float64, read only, any strides.
    residual : float
        The weight of the identity (float64).
    renormalize : bool
        Whether each row is divided by its sum ``rowsum`` (a row summing to 0 is left as it is);
        False: ``rowsum = 1``.
    out : ndarray, shape (B, n, n)
        float64, C-contiguous; receives ``Â``.
    bad : ndarray of bool, shape (B·n,)
        C-contiguous; ``bad[b·n + i]`` receives whether row ``i`` of map ``b`` is not finite (its sum
        is NaN or ±inf).

    Returns
    -------
    None
        The results are written into ``out`` and ``bad``.
    """
    n_maps, heads, n, _ = a.shape
    weight = (1.0 - residual) / heads
    for task in nb.prange(n_maps * n):
        b = task // n
        i = task % n
        row = out[b, i]
        total = _fused_row(a, b, i, weight, residual, row)
        bad[task] = not np.isfinite(total)
        if renormalize and total != 0.0:
            for j in range(n):
                row[j] /= total


@nb.njit(parallel=True, cache=True)
def fuse_mean_rows(a, residual, renormalize, v, partial, bad):
    """``v Â`` without forming Â: ``partial[m, blk] = Σ_{i in block blk} v[m, :, i] Â[m, i, :]``.

    ``Â`` is :func:`fuse_mean`'s, built one row at a time.  The ``n`` rows of each map are cut into
    ``blocks = partial.shape[1]`` blocks of ``⌈n / blocks⌉`` rows; tasks own one (map, block) pair
    (``prange`` over ``M·blocks``), and the caller sums the blocks in a fixed order
    (:func:`refattn.kernels.rollout_rows_product`).  Compiled for the same four map types as
    :func:`fuse_mean`.

    Parameters
    ----------
    a : ndarray, shape (M, H, n, n)
        ``M`` attention maps of ``H`` heads each, float32 or float64, read only, any strides.
    residual : float
        The weight of the identity (float64).
    renormalize : bool
        Whether the rows of ``Â`` are divided by their sums (a row summing to 0 is left as it is).
    v : ndarray, shape (M, k, n)
        The rows multiplying each map's ``Â``, float64, C-contiguous, read only.
    partial : ndarray, shape (M, blocks, k, n)
        float64, C-contiguous; receives each block's partial product (overwritten, not added to).
    bad : ndarray of bool, shape (M·n,)
        As in :func:`fuse_mean`: ``bad[m·n + i]``, row ``i`` of map ``m`` is not finite.

    Returns
    -------
    None
        The results are written into ``partial`` and ``bad``.
    """
    n_maps, heads, n, _ = a.shape
    rows_v = v.shape[1]
    blocks = partial.shape[1]
    size = (n + blocks - 1) // blocks
    weight = (1.0 - residual) / heads
    for task in nb.prange(n_maps * blocks):
        m = task // blocks
        blk = task % blocks
        acc = partial[m, blk]
        acc[:] = 0.0
        row = np.empty(n)
        for i in range(blk * size, min(n, (blk + 1) * size)):
            total = _fused_row(a, m, i, weight, residual, row)
            bad[m * n + i] = not np.isfinite(total)
            for r in range(rows_v):
                c = v[m, r, i] / total if renormalize and total != 0.0 else v[m, r, i]
                for j in range(n):
                    acc[r, j] += c * row[j]
