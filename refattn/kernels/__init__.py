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


def _sdpa_signatures(t):
    f8, b1, i8 = t.float64, t.boolean, t.int64
    in4 = t.Array(f8, 4, "C", readonly=True)  # inputs: contiguous, read only
    in3 = t.Array(f8, 3, "C", readonly=True)
    out4 = t.Array(f8, 4, "C")  # outputs
    out3 = t.Array(f8, 3, "C")
    ro4 = t.Array(f8, 4, "A", readonly=True)  # per-score views, any strides (broadcast)
    rob4 = t.Array(b1, 4, "A", readonly=True)
    ro2 = t.Array(f8, 2, "A", readonly=True)
    geometry = (f8, f8, b1, i8, i8, i8, i8)  # scale, softcap, causal, left, right, offset, empty policy
    per_score = (ro4, b1, rob4, b1, ro4, b1)  # bias, has_bias, mask, has_mask, keep, has_keep
    grads_in = (in3, in4, in3, in3)  # lse, d_out, delta, d_lse
    return {
        "forward": [(in4, in4, in4) + per_score + (ro2,) + geometry + (out4, out3)],
        "backward_dq": [(in4, in4, in4) + per_score + geometry + grads_in + (out4, out4, b1)],
        "backward_dkv": [(in4, in4, in4) + per_score + geometry + grads_in + (out4, out4)],
    }


def _kernels():
    """The attention kernels, each compiled for its one signature (first call only)."""
    import scipy.linalg.cython_blas  # noqa: F401  the BLAS numba's np.dot calls: loaded before any limit

    with warnings.catch_warnings():  # numba's performance notes on BLAS operands: known
        warnings.simplefilter("ignore")
        return _compile("sdpa_kernels", _sdpa_signatures)


def _compile(module, signatures):
    """The kernels of ``refattn.kernels.<module>`` compiled for their explicit signatures (first call
    only, then cached on disk); ``signatures``: a callable ``types -> {kernel name: [signature, ...]}``."""
    from numba import types

    kern = importlib.import_module(f"refattn.kernels.{module}")
    kernels = {}
    for name, sigs in signatures(types).items():  # compiled once per process, then looked up
        if name not in _compiled:
            kernel = getattr(kern, name)
            for sig in sigs:
                kernel.compile(types.void(*sig))
            kernel.disable_compile()
            _compiled[name] = kernel
        kernels[name] = _compiled[name]
    return kernels


def _rollout_signatures(t):
    maps = [t.Array(f, 4, layout, readonly=True) for f in (t.float32, t.float64) for layout in ("C", "A")]
    bad = t.Array(t.boolean, 1, "C")  # contiguous maps vectorise; any strides (views) as the fallback
    return {
        "fuse_mean": [(m, t.float64, t.boolean, t.Array(t.float64, 3, "C"), bad) for m in maps],
        "fuse_mean_rows": [
            (m, t.float64, t.boolean, t.Array(t.float64, 3, "C", readonly=True), t.Array(t.float64, 4, "C"), bad)
            for m in maps
        ],
    }


def _entropy_signatures(t):
    rows = [t.Array(f, 2, "C", readonly=True) for f in (t.float32, t.float64)]
    return {"row_entropy": [(r, t.Array(t.float64, 1, "C"), t.Array(t.boolean, 1, "C")) for r in rows]}


def _read_only(x, shape):
    """``x`` (float32 kept, other dtypes as float64) reshaped to ``shape``, as a read-only view: it matches
    the kernels' read-only signatures exactly and the caller's array is never written."""
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    view = x.reshape(shape).view()
    view.flags.writeable = False
    return view


def rollout_fuse_mean(a, residual, renormalize):
    """Â ``(..., n, n)`` float64 of one layer ``a (..., H, n, n)`` (float32 or float64) by the kernel:
    head mean, ``residual·I`` added, rows renormalised; None when a row is not finite."""
    heads, n = a.shape[-3:-1]
    maps = _read_only(a, (-1, heads, n, n))
    out = np.empty((maps.shape[0], n, n))
    bad = np.empty(maps.shape[0] * n, dtype=bool)
    _compile("rollout_kernels", _rollout_signatures)["fuse_mean"](maps, float(residual), bool(renormalize), out, bad)
    return None if bad.any() else out.reshape(a.shape[:-3] + (n, n))


ROLLOUT_ROW_BLOCKS = 8  # row blocks per map in rollout_rows_product: tasks for the threads, summed in order


def rollout_rows_product(v, a, residual, renormalize):
    """``v Â`` ``(..., k, n)`` for rows ``v (..., k, n)`` and one layer ``a (..., H, n, n)``, Â formed
    row by row inside the kernel (one read of the maps, no n×n array); None when a row is not finite."""
    heads, n = a.shape[-3:-1]
    maps = _read_only(a, (-1, heads, n, n))
    rows = _read_only(
        np.ascontiguousarray(np.broadcast_to(v, a.shape[:-3] + v.shape[-2:]), dtype=np.float64),
        (maps.shape[0],) + v.shape[-2:],
    )
    partial = np.empty((maps.shape[0], ROLLOUT_ROW_BLOCKS) + v.shape[-2:])
    bad = np.empty(maps.shape[0] * n, dtype=bool)
    kernel = _compile("rollout_kernels", _rollout_signatures)["fuse_mean_rows"]
    kernel(maps, float(residual), bool(renormalize), rows, partial, bad)
    if bad.any():
        return None
    return partial.sum(axis=1).reshape(a.shape[:-3] + v.shape[-2:])


def row_entropy(p):
    """Row entropy ``(...,)`` of maps ``p (..., n)`` (float32 or float64, no mask) by the kernel; None
    when an entry is not finite."""
    rows = _read_only(np.ascontiguousarray(p), (-1, p.shape[-1]))
    out = np.empty(rows.shape[0])
    bad = np.empty(rows.shape[0], dtype=bool)
    _compile("metric_kernels", _entropy_signatures)["row_entropy"](rows, out, bad)
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
