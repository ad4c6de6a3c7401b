"""Numba kernels for the metric reductions where NumPy is the bottleneck (measured in the benchmark):
row entropy.  NumPy definitions in :mod:`refattn.metrics`; results agree to ≤ 1e-12 and each task
owns one row (a fixed summation order: bitwise identical for any number of threads)."""

import math

import numba as nb
import numpy as np


@nb.njit(parallel=True, cache=True)
def row_entropy(p, out, bad):
    """``out[r] = −Σ_j p[r, j] log p[r, j]`` (0 log 0 = 0) for ``p (R, n)``; ``bad[r]``: a non-finite entry."""
    n_rows, n = p.shape
    for r in nb.prange(n_rows):
        total = 0.0
        check = 0.0
        for j in range(n):
            x = np.float64(p[r, j])
            check += x * 0.0  # NaN iff some entry is NaN or ±inf
            if x > 0.0:
                total += x * math.log(x)
        out[r] = -total
        bad[r] = not np.isfinite(check)
