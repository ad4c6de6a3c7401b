"""Argument checks shared by every op.

Every public op converts its array arguments here, once, at the boundary:
array-likes (lists, NumPy arrays, objects with ``__array__`` or
``__dlpack__``) become float64 (or bool) NumPy arrays, and bad input raises
:class:`RefAttnError` with a message naming the argument, what was expected
and what was given.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import numbers

import numpy as np

__all__ = ["RefAttnError", "RefAttnTypeError"]


class RefAttnError(ValueError):
    """A bad argument to a refattn op: a wrong shape, value or option.

    A :class:`ValueError`.  The message names the argument, what was expected and what was
    given, e.g. ``dropout_p: expected a probability in [0, 1), got 1.5``; raised before any work.
    """


class Unsupported(RefAttnError):
    """An option a candidate implementation (or an adapter) cannot express, e.g. an lse cotangent
    for PyTorch's SDPA.  A :class:`RefAttnError`; ``refattn check`` reports the case as
    ``unsupported`` instead of failed."""


class RefAttnTypeError(RefAttnError, TypeError):
    """An argument of the wrong type, e.g. a float mask, a string array, a bool given for a number.

    Both a :class:`RefAttnError` (so a ``ValueError``) and a :class:`TypeError`."""


def unknown_option(function, name, valid, listed=None):
    """The :class:`RefAttnError` for a keyword ``name`` that ``function`` (its name, for the message)
    does not take: the closest of ``valid`` suggested, and the options listed (``listed``, default
    ``valid`` in order): ``"entropy: unknown option 'normalise' (did you mean 'normalize'?); options: ..."``."""
    close = difflib.get_close_matches(name, sorted(valid), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return RefAttnError(f"{function}: unknown option {name!r}{hint}; options: {', '.join(listed or valid)}")


def keyword_checked(fn):
    """``fn`` with the names of its keyword arguments checked before it runs: a name its signature
    lacks raises :func:`unknown_option`'s error instead of Python's ``TypeError``.  A function that
    takes ``**kwargs``, or is checked already, is returned as it is."""
    params = inspect.signature(fn).parameters
    if getattr(fn, "keywords_checked", False) or any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return fn
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    valid = frozenset(named)

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        for name in kwargs:
            if name not in valid:
                raise unknown_option(fn.__name__, name, named)
        return fn(*args, **kwargs)

    checked.keywords_checked = True
    return checked


def check_keywords_of(namespace):
    """Wrap every public function a module defines (``namespace["__all__"]``) in
    :func:`keyword_checked`: call as ``check_keywords_of(globals())`` at the end of the module."""
    for name in namespace["__all__"]:
        fn = namespace[name]
        if inspect.isfunction(fn) and fn.__module__ == namespace["__name__"]:
            namespace[name] = keyword_checked(fn)


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
    check_finite(a, name, allow_neg_inf=allow_neg_inf)
    return a


def first_index(bad):
    """The index (a tuple of ints) of the first True of the bool array ``bad`` in C order, or None."""
    if not bad.size:
        return None
    flat = int(np.argmax(bad, axis=None))  # the first True (0 when there is none)
    idx = tuple(int(i) for i in np.unravel_index(flat, bad.shape))
    return idx if bad[idx] else None


def check_finite(a, name, *, allow_neg_inf=False):
    """RefAttnError unless every entry of the array ``a`` is finite (or ``-inf``, with
    ``allow_neg_inf``); the message names ``name``, the first offending index (C order) and its
    value: ``q: expected finite values, got nan at index (0, 1, 3, 2)``."""
    if a.dtype.kind in "biu":
        return
    finite = np.asarray(np.isfinite(a))  # an array also for a 0-d input (isfinite gives a NumPy bool)
    if finite.all():
        return
    bad = ~finite
    if allow_neg_inf:
        bad &= ~np.isneginf(a)
    idx = first_index(bad)
    if idx is not None:
        allowed = "finite values or -inf" if allow_neg_inf else "finite values"
        where = f" at index {idx}" if idx else ""  # a 0-d array has one entry
        raise RefAttnError(f"{name}: expected {allowed}, got {float(a[idx])}{where}")


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
    """``value`` itself when it is one of the strings ``choices``; otherwise a RefAttnError listing them."""
    if not isinstance(value, str) or value not in choices:
        raise RefAttnError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _scalar(value, name, what):
    """``value`` itself, or the one element of a 0-d array (NumPy, or any object with ``__array__`` /
    ``__dlpack__``) given for a scalar option; an array with dimensions is a RefAttnTypeError."""
    if not isinstance(value, (np.ndarray, np.generic)) and not hasattr(value, "__array__"):
        if not hasattr(value, "__dlpack__"):
            return value
    a = to_numpy(value, name)
    if a.ndim:
        raise RefAttnTypeError(f"{name}: expected {what} (a scalar or a 0-d array), got an array of shape {a.shape}")
    if is_extension_float(a.dtype):
        a = a.astype(np.float64)
    return a[()]


def _describe(value):
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def as_real(value, name, *, positive=False, allow_none=True):
    """A finite Python float (or None); ``positive`` requires > 0.  Accepts any real scalar (Python or
    NumPy int or float, ``fractions.Fraction``) or a 0-d array of one; bool and complex are refused."""
    if value is None:
        if allow_none:
            return None
        raise RefAttnError(f"{name}: expected a real number, got None")
    v = _scalar(value, name, "a real number")
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise RefAttnTypeError(f"{name}: expected a real number, got {_describe(v)}")
    try:
        v = float(v)
    except OverflowError:
        raise RefAttnError(f"{name}: expected a finite number, got {_describe(v)} (beyond float64)") from None
    if not np.isfinite(v):
        raise RefAttnError(f"{name}: expected a finite number, got {v}")
    if positive and v <= 0:
        raise RefAttnError(f"{name}: expected a number > 0, got {v}")
    return v


def as_int(value, name, *, minimum=None):
    """A Python int: any integer scalar (Python or NumPy) or a 0-d integer array; bool is refused."""
    v = _scalar(value, name, "an integer")
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
        raise RefAttnTypeError(f"{name}: expected an integer, got {_describe(v)}")
    v = int(v)
    if minimum is not None and v < minimum:
        raise RefAttnError(f"{name}: expected an integer >= {minimum}, got {v}")
    return v


def as_flag(value, name):
    """A Python bool: ``True``/``False``, a NumPy bool or a 0-d bool array."""
    v = _scalar(value, name, "True or False")
    if not isinstance(v, (bool, np.bool_)):
        raise RefAttnTypeError(f"{name}: expected True or False, got {_describe(v)}")
    return bool(v)


def as_axis(axis, ndim, name="axis"):
    """``axis`` as an index in ``[0, ndim)`` (a negative one counts from the end)."""
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
