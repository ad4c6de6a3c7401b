"""Numba kernels for the metric reductions where NumPy is the bottleneck (measured in the benchmark):
row entropy.  NumPy definitions in :mod:`refattn.metrics`; results agree to ≤ 1e-12 and each task
owns one row (a fixed summation order: bitwise identical for any number of threads)."""

import math

import numba as nb
import numpy as np


@nb.njit(parallel=True, cache=True)
def row_entropy(p, out, bad):
    """``out[r] = −Σ_j p[r, j] log p[r, j]`` (natural log, 0 log 0 = 0) for every row of ``p``.

    Only entries ``> 0`` contribute.  Tasks own one row each (``prange``), summed in key order.
    Compiled for two explicit signatures (float32 and float64 ``p``); called by
    :func:`refattn.kernels.row_entropy`, by keyword.

    Parameters
    ----------
    p : ndarray, shape (R, n)
        ``R`` rows of attention maps, float32 or float64, C-contiguous, read only.
    out : ndarray, shape (R,)
        float64, C-contiguous; receives each row's entropy.
    bad : ndarray of bool, shape (R,)
        C-contiguous; receives, per row, whether some entry is NaN or ±inf (then ``out[r]`` is not
        meaningful).

    Returns
    -------
    None
        The results are written into ``out`` and ``bad``.
    """
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
