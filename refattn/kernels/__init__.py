"""Numba kernels for the hot core, selected with ``backend="auto" | "numpy" | "numba"``.

Each kernel has a NumPy twin that defines the math (``specs/kernels.md``); results agree to
≤ 1e-12 relative and are bitwise identical for any number of threads.  Nothing here imports
numba or compiles until a kernel is first used; compiled code is cached on disk.
"""

from __future__ import annotations

import importlib.util
import math
import warnings

import numpy as np

from refattn._validate import RefAttnError, as_choice, unbroadcast

__all__ = [
    "BACKENDS",
    "AUTO_MIN_SCORES",
    "numba_available",
    "resolve_backend",
    "rollout_fuse_mean",
    "rollout_rows_product",
]

BACKENDS = ("auto", "numpy", "numba")
AUTO_MIN_SCORES = 1 << 18  # "auto" uses the kernel from this many scores (N·Hq·Lq·Lk) on
_EMPTY_POLICY = {"zero": 0, "nan": 1, "uniform": 2}
_compiled = {}


def numba_available():
    return importlib.util.find_spec("numba") is not None


def resolve_backend(backend, score_count):
    """``"numpy"`` or ``"numba"`` for a call with ``score_count`` scores."""
    as_choice(backend, "backend", BACKENDS)
    if backend == "numba":
        if not numba_available():
            raise RefAttnError("backend: 'numba' was asked for but numba is not installed (pip install numba)")
        return "numba"
    if backend == "auto" and score_count >= AUTO_MIN_SCORES and numba_available():
        return "numba"
    return "numpy"


def _kernels():
    """The kernel module with each kernel compiled for its one signature (first call only)."""
    if not _compiled:
        import scipy.linalg.cython_blas  # noqa: F401  the BLAS numba's np.dot calls: loaded before any limit
        from numba import types

        from refattn.kernels import sdpa_kernels as kern

        f8, b1, i8 = types.float64, types.boolean, types.int64
        in4 = types.Array(f8, 4, "C", readonly=True)  # inputs: contiguous, read only
        in3 = types.Array(f8, 3, "C", readonly=True)
        out4 = types.Array(f8, 4, "C")  # outputs
        out3 = types.Array(f8, 3, "C")
        ro4 = types.Array(f8, 4, "A", readonly=True)  # per-score views, any strides (broadcast)
        rob4 = types.Array(b1, 4, "A", readonly=True)
        ro2 = types.Array(f8, 2, "A", readonly=True)
        geometry = (f8, f8, b1, i8, i8, i8, i8)  # scale, softcap, causal, left, right, offset, empty policy
        per_score = (ro4, b1, rob4, b1, ro4, b1)  # bias, has_bias, mask, has_mask, keep, has_keep
        grads_in = (in3, in4, in3, in3)  # lse, d_out, delta, d_lse
        signatures = {
            "forward": (in4, in4, in4) + per_score + (ro2,) + geometry + (out4, out3),
            "backward_dq": (in4, in4, in4) + per_score + geometry + grads_in + (out4, out4, b1),
            "backward_dkv": (in4, in4, in4) + per_score + geometry + grads_in + (out4, out4),
        }
        for name, sig in signatures.items():
            kernel = getattr(kern, name)
            with warnings.catch_warnings():  # numba notes that 4-D tile slices are copied for BLAS: known
                warnings.simplefilter("ignore")
                kernel.compile(types.void(*sig))
            kernel.disable_compile()
            _compiled[name] = kernel
    return _compiled


def _rollout_kernel():
    """The rollout pass compiled for float32 and float64 maps of any strides (first call only)."""
    if "fuse_mean" not in _compiled:
        from numba import types

        from refattn.kernels import rollout_kernels as kern

        for f in (types.float32, types.float64):
            for layout in ("C", "A"):  # contiguous maps vectorise; any strides (views) as the fallback
                sig = (types.Array(f, 4, layout, readonly=True), types.float64, types.boolean,
                       types.Array(types.float64, 3, "C"), types.Array(types.boolean, 1, "C"))  # fmt: skip
                kern.fuse_mean.compile(types.void(*sig))
                sig_rows = (sig[0], types.float64, types.boolean, types.Array(types.float64, 3, "C", readonly=True),
                            types.Array(types.float64, 4, "C"), types.Array(types.boolean, 1, "C"))  # fmt: skip
                kern.fuse_mean_rows.compile(types.void(*sig_rows))
        for kernel in (kern.fuse_mean, kern.fuse_mean_rows):
            kernel.disable_compile()
            _compiled[kernel.__name__] = kernel
    return _compiled["fuse_mean"], _compiled["fuse_mean_rows"]


def rollout_fuse_mean(a, residual, renormalize, out=None):
    """Â ``(..., n, n)`` float64 of one layer ``a (..., H, n, n)`` (float32 or float64) by the kernel:
    head mean, ``residual·I`` added, rows renormalised; None when a row is not finite.  ``out``: a
    float64 C-contiguous buffer of Â's size to write into (reused across layers: no page faults)."""
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    lead, (heads, n) = a.shape[:-3], a.shape[-3:-1]
    maps = a.reshape((-1, heads, n, n)).view()
    maps.flags.writeable = False  # matches the read-only signatures exactly (the caller's array is untouched)
    if out is None:
        out = np.empty(lead + (n, n))
    flat_out = out.reshape((-1, n, n))
    bad = np.empty(maps.shape[0] * n, dtype=bool)
    _rollout_kernel()[0](maps, float(residual), bool(renormalize), flat_out, bad)
    return None if bad.any() else out


ROLLOUT_ROW_BLOCKS = 8  # row blocks per map in rollout_rows_product: tasks for the threads, summed in order


def rollout_rows_product(v, a, residual, renormalize):
    """``v Â`` ``(..., k, n)`` for rows ``v (..., k, n)`` and one layer ``a (..., H, n, n)``, Â formed
    row by row inside the kernel (one read of the maps, no n×n array); None when a row is not finite."""
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    heads, n = a.shape[-3:-1]
    maps = a.reshape((-1, heads, n, n)).view()
    maps.flags.writeable = False
    rows = np.ascontiguousarray(np.broadcast_to(v, a.shape[:-3] + v.shape[-2:]), dtype=np.float64)
    rows = rows.reshape((maps.shape[0],) + v.shape[-2:]).view()
    rows.flags.writeable = False
    partial = np.empty((maps.shape[0], ROLLOUT_ROW_BLOCKS) + v.shape[-2:])
    bad = np.empty(maps.shape[0] * n, dtype=bool)
    _rollout_kernel()[1](maps, float(residual), bool(renormalize), rows, partial, bad)
    if bad.any():
        return None
    return partial.sum(axis=1).reshape(a.shape[:-3] + v.shape[-2:])


def row_entropy(p):
    """Row entropy ``(...,)`` of maps ``p (..., n)`` (float32 or float64, no mask) by the kernel; None
    when an entry is not finite."""
    if "row_entropy" not in _compiled:
        from numba import types

        from refattn.kernels import metric_kernels as kern

        for f in (types.float32, types.float64):
            sig = (types.Array(f, 2, "C", readonly=True), types.Array(types.float64, 1, "C"),
                   types.Array(types.boolean, 1, "C"))  # fmt: skip
            kern.row_entropy.compile(types.void(*sig))
        kern.row_entropy.disable_compile()
        _compiled["row_entropy"] = kern.row_entropy
    if p.dtype not in (np.float32, np.float64):
        p = p.astype(np.float64)
    rows = np.ascontiguousarray(p).reshape((-1, p.shape[-1])).view()
    rows.flags.writeable = False
    out = np.empty(rows.shape[0])
    bad = np.empty(rows.shape[0], dtype=bool)
    _compiled["row_entropy"](rows, out, bad)
    return None if bad.any() else out.reshape(p.shape[:-1])


def _one_blas_thread():
    """BLAS limited to one thread while a kernel's parallel tasks call it (load the kernels first)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


def _flat(x, batch, n):
    return np.ascontiguousarray(np.broadcast_to(x, batch + x.shape[-3:])).reshape((n,) + x.shape[-3:])


def _per_score(x, score_shape, n, dtype):
    """A (N, Hq, Lq, Lk) read-only view of a broadcastable per-score array (a dummy when absent)."""
    if x is None:
        return np.broadcast_to(np.zeros(1, dtype=dtype), (1, 1, 1, 1)), False
    view = np.broadcast_to(np.asarray(x, dtype=dtype), score_shape)
    return view.reshape((n,) + score_shape[-3:]), True


class _Flat:
    """The validated sdpa arguments flattened to the kernels' layout."""

    def __init__(self, a):
        self.a = a
        self.batch = a.score_shape[:-3]
        self.n = math.prod(self.batch)
        self.q = _flat(a.q, self.batch, self.n)
        self.k = _flat(a.k, self.batch, self.n)
        self.v = _flat(a.v, self.batch, self.n)
        self.bias, self.has_bias = _per_score(a.bias, a.score_shape, self.n, np.float64)
        self.mask, self.has_mask = _per_score(a.user_mask, a.score_shape, self.n, bool)  # causal/window: on the fly
        self.keep, self.has_keep = _per_score(a.keep_scale, a.score_shape, self.n, np.float64)
        hq, lq, lk = a.score_shape[-3:]
        sink = np.full(self.batch + (hq,), -np.inf) if a.sinks is None else np.broadcast_to(a.sinks, self.batch + (hq,))
        self.sink = np.asarray(sink, dtype=np.float64).reshape(self.n, hq)
        left, right = (-1 if w is None else int(w) for w in a.window)
        self.geometry = (
            float(a.scale),
            float(a.softcap or 0.0),
            bool(a.causal),
            left,
            right,
            int(a.offset),
            _EMPTY_POLICY[a.empty_rows],
        )

    def per_score(self):
        return (self.bias, self.has_bias, self.mask, self.has_mask, self.keep, self.has_keep)


def sdpa_forward(a):
    """``(out, lse)`` of sdpa on validated arguments ``a``, by the forward kernel."""
    f = _Flat(a)
    hq, lq = a.score_shape[-3:-1]
    out = np.zeros((f.n, hq, lq, a.v.shape[-1]))
    lse = np.zeros((f.n, hq, lq))
    kern = _kernels()  # before the limit: loading the kernels loads the BLAS they call
    with _one_blas_thread():
        kern["forward"](f.q, f.k, f.v, *f.per_score(), f.sink, *f.geometry, out, lse)
    return out.reshape(a.score_shape[:-1] + (a.v.shape[-1],)), lse.reshape(a.score_shape[:-1])


def sdpa_backward(a, d_out, d_lse, saved=None):
    """``(dq, dk, dv, dbias, dsinks)`` by the backward kernels (P recomputed from lse); ``saved``:
    the forward's ``(out, lse)``, recomputed when None."""
    f = _Flat(a)
    hq, lq = a.score_shape[-3:-1]
    out, lse = sdpa_forward(a) if saved is None else saved
    out = out.reshape(f.n, hq, lq, -1)
    lse = lse.reshape(f.n, hq, lq)
    d_o = np.ascontiguousarray(np.broadcast_to(d_out, out.shape))
    empty = np.isneginf(lse)
    dl = np.zeros(lse.shape) if d_lse is None else np.where(empty, 0.0, np.reshape(d_lse, lse.shape))
    delta = np.einsum("nhie,nhie->nhi", d_o, out)  # Δ = rowsum(dO ∘ O)
    kern = _kernels()
    dq = np.zeros(f.q.shape)
    dbias_full = np.zeros((f.n,) + a.score_shape[-3:]) if a.bias is not None else np.zeros((1, 1, 1, 1))
    dk, dv = np.zeros(f.k.shape), np.zeros(f.v.shape)
    with _one_blas_thread():
        kern["backward_dq"](
            f.q, f.k, f.v, *f.per_score(), *f.geometry, lse, d_o, delta, dl, dq, dbias_full, a.bias is not None
        )
        kern["backward_dkv"](f.q, f.k, f.v, *f.per_score(), *f.geometry, lse, d_o, delta, dl, dk, dv)
    dsinks = None
    if a.sinks is not None:
        p_sink = np.where(empty, 0.0, np.exp(f.sink[..., None] - np.where(empty, 0.0, lse)))
        dsinks = unbroadcast((p_sink * (dl - delta)).sum(axis=-1).reshape(f.batch + (hq,)), a.sinks.shape)
    dbias = None
    if a.bias is not None:
        dbias = unbroadcast(dbias_full.reshape(a.score_shape), a.bias.shape)
    shape = f.batch
    return (
        unbroadcast(dq.reshape(shape + f.q.shape[1:]), a.q.shape),
        unbroadcast(dk.reshape(shape + f.k.shape[1:]), a.k.shape),
        unbroadcast(dv.reshape(shape + f.v.shape[1:]), a.v.shape),
        dbias,
        dsinks,
    )
