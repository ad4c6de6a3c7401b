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
    """``out[b] = (residual·I + (1 − residual)·mean_h a[b, h]) / rowsum`` for ``a (B, H, n, n)``;
    ``bad[b·n + i]`` is True where row i of map b is not finite."""
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
    """``v Â`` without forming Â: ``partial[m, blk] = Σ_{i in block blk} v[m, :, i] Â[m, i, :]`` for
    ``a (M, H, n, n)``, ``v (M, k, n)``, ``partial (M, blocks, k, n)``; the caller sums the blocks
    in a fixed order.  ``bad`` as :func:`fuse_mean`."""
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
