"""Argument checks shared by every op.

Every public op converts its array arguments here, once, at the boundary:
array-likes (lists, NumPy arrays, objects with ``__array__`` or
``__dlpack__``) become float64 (or bool) NumPy arrays, and bad input raises
:class:`RefAttnError` with a message naming the argument, what was expected
and what was given.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["RefAttnError", "RefAttnTypeError"]


class RefAttnError(ValueError):
    """A bad argument to a refattn op (wrong shape, value or option)."""


class Unsupported(RefAttnError):
    """An option a candidate implementation (or an adapter) cannot express."""


class RefAttnTypeError(RefAttnError, TypeError):
    """An argument of the wrong type (e.g. a float mask, a string array)."""


def to_numpy(x, name):
    """``x`` as a NumPy array without copying or converting (array-likes, ``__dlpack__``)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "__dlpack__") and not hasattr(x, "__array__"):
        try:
            return np.from_dlpack(x)
        except (TypeError, RuntimeError, BufferError) as exc:
            raise RefAttnTypeError(f"{name}: could not read the array through __dlpack__ ({exc})") from exc
    try:
        return np.asarray(x)
    except (TypeError, RuntimeError, ValueError) as exc:
        raise RefAttnTypeError(
            f"{name}: expected an array-like of real numbers, got {type(x).__name__} ({exc})"
        ) from exc


def is_extension_float(dtype):
    """Whether ``dtype`` is one of ml_dtypes' float formats (bfloat16, float8_*), which NumPy
    reports as kind ``"V"``."""
    return dtype.kind == "V" and dtype.names is None and dtype.type.__module__.startswith("ml_dtypes")


def as_float(x, name, *, ndim_min=0, allow_neg_inf=False, copy=True):
    """``x`` as a float64 array; rejects non-real dtypes and non-finite values.

    ``allow_neg_inf`` admits ``-inf`` (biases, logits, sinks); NaN and ``+inf``
    are always rejected.  ``copy=False`` (for large read-only inputs) avoids
    the copy when ``x`` already is a float64 array; the caller must not write to it.
    """
    a = to_numpy(x, name)
    if is_extension_float(a.dtype):
        a = a.astype(np.float64)  # bfloat16, float8_*: exactly representable in float64
    if a.dtype == bool or a.dtype.kind not in "iuf":
        raise RefAttnTypeError(f"{name}: expected real numbers (int or float dtype), got dtype {a.dtype}")
    a = np.array(a, dtype=np.float64, copy=True) if copy else np.asarray(a, dtype=np.float64)
    if a.ndim < ndim_min:
        raise RefAttnError(f"{name}: expected at least {ndim_min} dimensions, got shape {a.shape}")
    finite = np.isfinite(a)
    if not finite.all():
        bad = ~finite
        if allow_neg_inf:
            bad &= ~np.isneginf(a)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            allowed = "finite values or -inf" if allow_neg_inf else "finite values"
            raise RefAttnError(f"{name}: expected {allowed}, got {a[idx]} at index {idx}")
    return a


def as_bool(x, name, *, hint=""):
    """``x`` as a bool array; a non-bool array is a :class:`RefAttnTypeError`."""
    a = to_numpy(x, name)
    if a.dtype != bool:
        raise RefAttnTypeError(f"{name}: expected a bool array (True = keep), got dtype {a.dtype}{hint}")
    return np.array(a, dtype=bool, copy=True)


def as_cotangent(d, shape, name="dy"):
    """A cotangent: float64, finite, exactly the shape of the output it belongs to."""
    a = as_float(d, name)
    if a.shape != tuple(shape):
        raise RefAttnError(f"{name}: expected shape {tuple(shape)} (the output's), got {a.shape}")
    return a


def check_broadcast_to(a, target, name, what):
    """Require ``a.shape`` to broadcast to ``target`` without enlarging it."""
    try:
        out = np.broadcast_shapes(a.shape, tuple(target))
    except ValueError:
        out = None
    if out != tuple(target):
        raise RefAttnError(f"{name}: expected a shape broadcastable to {what} {tuple(target)}, got {a.shape}")


def as_choice(value, name, choices):
    if not isinstance(value, str) or value not in choices:
        raise RefAttnError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def as_real(value, name, *, positive=False, allow_none=True):
    """A finite Python float (or None); ``positive`` requires > 0."""
    if value is None:
        if allow_none:
            return None
        raise RefAttnError(f"{name}: expected a real number, got None")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RefAttnTypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not np.isfinite(v):
        raise RefAttnError(f"{name}: expected a finite number, got {v}")
    if positive and v <= 0:
        raise RefAttnError(f"{name}: expected a number > 0, got {v}")
    return v


def as_int(value, name, *, minimum=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise RefAttnTypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
    v = int(value)
    if minimum is not None and v < minimum:
        raise RefAttnError(f"{name}: expected an integer >= {minimum}, got {v}")
    return v


def as_flag(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise RefAttnTypeError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def as_axis(axis, ndim, name="axis"):
    a = as_int(axis, name)
    if not -ndim <= a < ndim:
        raise RefAttnError(f"{name}: expected an axis in [{-ndim}, {ndim}), got {axis}")
    return a % ndim


def unbroadcast(g, shape):
    """Sum ``g`` over the axes along which an array of ``shape`` was broadcast."""
    shape = tuple(shape)
    extra = g.ndim - len(shape)
    if extra:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


def sum_outer(x, y):
    """``Σ xᵀ y`` over every leading dim and row: ``x (..., n, r)``, ``y (..., n, e)`` → ``(r, e)``."""
    shape = np.broadcast_shapes(x.shape[:-1], y.shape[:-1])
    x = np.broadcast_to(x, shape + x.shape[-1:]).reshape(-1, x.shape[-1])
    y = np.broadcast_to(y, shape + y.shape[-1:]).reshape(-1, y.shape[-1])
    return x.T @ y
