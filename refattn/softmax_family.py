"""Softmax, log-softmax and log-sum-exp with boolean masks and an empty-row policy.

Shapes: ``x (..., n, ...)`` normalised over ``axis``: an int, a tuple of ints (one *row* is then
the set of entries over all those axes, normalised jointly, as ``scipy.special.softmax`` and
``jax.nn.softmax`` do) or None (every axis); ``n`` is the number of entries of a row.  ``mask`` is
bool, broadcastable to ``x.shape``, True = the entry takes part (refattn's one mask convention:
True = keep).  Each op's output is ``y``; ``name_backward(d_y, x, *, options)`` takes its
cotangent and returns ``<Name>Grads(dx)`` (``LogSumExpGrads(dx, db)`` for logsumexp, whose ``b``
scales the terms as ``scipy.special.logsumexp``'s does).  Entries equal to ``-inf`` in ``x`` take no
weight, as masked entries; their gradient is the limit ``x_j → -inf`` (PyTorch's and
JAX's): 0 for softmax and logsumexp, ``d_y_j`` for log_softmax, while a masked entry's
gradient is 0.  A row with no allowed entry is an *empty row*; ``empty_rows`` says what
softmax and log_softmax give there.  logsumexp's ``y`` is ``-inf`` on an empty row under
every policy (as sdpa's ``lse``), with gradient 0:

===========  ========  ===========  ==============  =========  ============
policy       softmax   log_softmax  their gradient  logsumexp  its gradient
===========  ========  ===========  ==============  =========  ============
"zero"       0         -inf         0               -inf       0
"nan"        NaN       NaN          NaN             -inf       0
"uniform"    1/n       -log n       0               -inf       0
===========  ========  ===========  ==============  =========  ============

``"uniform"`` is what a finite large-negative fill gives (every entry equal).
See ``specs/softmax.md`` for the derivations.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refattn._validate import (
    RefAttnError,
    RefAttnTypeError,
    as_axis,
    as_bool,
    as_choice,
    as_cotangent,
    as_flag,
    as_float,
    check_broadcast_to,
    check_keywords_of,
    to_numpy,
    unbroadcast,
)

__all__ = [
    "EMPTY_ROW_POLICIES",
    "LogSoftmaxGrads",
    "LogSumExpGrads",
    "SoftmaxGrads",
    "log_softmax",
    "log_softmax_backward",
    "logsumexp",
    "logsumexp_backward",
    "softmax",
    "softmax_backward",
]

#: The values of ``empty_rows`` (the table above).
EMPTY_ROW_POLICIES = ("zero", "nan", "uniform")


class SoftmaxGrads(NamedTuple):
    """Gradient of :func:`softmax` (returned by :func:`softmax_backward`) w.r.t. ``x``: ``dx = p (d_y − Σ p d_y)``.

    Fields
    ------
    dx : ndarray of float64, shape of ``x``
    """

    dx: np.ndarray


class LogSoftmaxGrads(NamedTuple):
    """Gradient of :func:`log_softmax` (returned by :func:`log_softmax_backward`) w.r.t. ``x``: ``dx = d_y − p Σ d_y``.

    Fields
    ------
    dx : ndarray of float64, shape of ``x``
    """

    dx: np.ndarray


class LogSumExpGrads(NamedTuple):
    """Gradients of :func:`logsumexp` (returned by :func:`logsumexp_backward`): ``dx = d_y · b e^x / S``
    and ``db = d_y · e^x / S`` with ``S = Σ b e^x`` (``b = 1`` when not given: ``dx = d_y · p``).

    Fields
    ------
    dx : ndarray of float64, shape of ``x``
    db : ndarray of float64, shape of ``b``, or None
        None when no ``b`` was given.
    """

    dx: np.ndarray
    db: np.ndarray | None = None


class Normalized(NamedTuple):
    """Result of :func:`normalize_last_axis` (shapes for ``s (..., n)``)."""

    p: np.ndarray  # (..., n) probabilities, empty-row policy applied
    lse: np.ndarray  # (...,) log of the denominator, -inf on empty rows
    empty: np.ndarray  # (...,) bool, True where the denominator is 0
    p_sink: np.ndarray | None  # (...,) probability mass taken by the sink logit
    shift: np.ndarray | None = None  # (...,) the row's largest logit m (0 on empty rows)
    log_tail: np.ndarray | None = None  # (...,) log1p(Σ e^{s-m} − 1): lse = shift + log_tail


def normalize_last_axis(s, empty_rows, sink=None):
    """Softmax over the last axis of logits ``s (..., n)`` where ``-inf`` = disallowed.

    ``sink (...,)`` is an extra logit that joins the denominator without a
    value (attention sinks).  A row is empty when no entry and no sink is
    finite.  Never warns: ``exp(-inf) = 0`` is the intended value.

    The denominator ``Σ e^{s − m} = 1 + t`` is formed as ``1 + t`` with the tail ``t``
    summed without the largest entry (whose term is exactly 1), and ``lse = m + log1p(t)``:
    a tail far below ε (one dominant logit) keeps its digits instead of rounding to
    ``log 1 = 0`` (``specs/softmax.md``).
    """
    key_max = s.max(axis=-1)  # (...,) may be -inf
    m = key_max if sink is None else np.maximum(key_max, sink)
    empty = np.isneginf(m)  # (...,)
    m = np.where(empty, 0.0, m)
    e = np.exp(s - m[..., None])  # (..., n) masked entries -> 0
    # the tail: every term but the one of the first largest logit, which is exp(0) = 1
    top = np.argmax(s, axis=-1)[..., None]  # (..., 1)
    sink_on_top = np.zeros(m.shape, dtype=bool) if sink is None else (sink >= key_max) & ~empty  # (...,)
    ones = np.take_along_axis(e, top, axis=-1)  # (..., 1): 1, or 0 on empty rows, or ≤ 1 under a sink
    np.put_along_axis(e, top, np.where((empty | sink_on_top)[..., None], ones, 0.0), axis=-1)
    tail = e.sum(axis=-1)  # (...,)
    np.put_along_axis(e, top, ones, axis=-1)
    p_sink = None
    if sink is not None:
        e_sink = np.exp(sink - m)  # (...,)
        tail = tail + np.where(sink_on_top, 0.0, e_sink)
    safe = np.where(empty, 1.0, 1.0 + tail)  # (...,) the denominator
    p = e / safe[..., None]  # (..., n)
    if sink is not None:
        p_sink = np.where(empty, 0.0, e_sink / safe)
    log_tail = np.log1p(np.where(empty, 0.0, tail))  # (...,)
    lse = np.where(empty, -np.inf, m + log_tail)
    if empty.any() and empty_rows != "zero":
        fill = np.nan if empty_rows == "nan" else 1.0 / s.shape[-1]
        p = np.where(empty[..., None], fill, p)
    return Normalized(p, lse, empty, p_sink, m, log_tail)


def softmax_vjp(p, dp):
    """Cotangent of the logits of ``p = softmax(s)`` over the last axis: ``p (dp - Σ p dp)``.

    Formed as ``p (c − Σ p c)`` with ``c = dp − dp_t``, t the largest entry (``Σ p = 1`` makes the
    two equal): the largest entry's ``dp_t − Σ p dp = −Σ_{j≠t} p_j c_j`` keeps its digits when the
    other entries are tiny, instead of cancelling ``dp_t`` against ``Σ p dp ≈ dp_t``.
    """
    top = np.take_along_axis(dp, np.argmax(p, axis=-1)[..., None], axis=-1)  # (..., 1)
    c = dp - top  # (..., n), 0 at the largest entry
    gamma = np.einsum("...j,...j->...", p, c)  # (...,)
    return p * (c - gamma[..., None])  # (..., n)


_AXIS_EXPECTED = "an int, a non-empty tuple of distinct ints, or None (every axis)"


def _as_axes(axis, ndim):
    """``axis`` (an int, a tuple of ints or None) as a sorted tuple of distinct axes in ``[0, ndim)``."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, list):
        raise RefAttnTypeError(f"axis: expected {_AXIS_EXPECTED}, got the list {axis} (pass a tuple)")
    if isinstance(axis, tuple):
        if not axis:
            raise RefAttnError(f"axis: expected {_AXIS_EXPECTED}, got ()")
        axes = [as_axis(a, ndim) for a in axis]
        if len(set(axes)) != len(axes):
            raise RefAttnError(f"axis: expected distinct axes of the {ndim}-D x, got {axis} (an axis repeated)")
        return tuple(sorted(axes))
    return (as_axis(axis, ndim),)


def _rows(a, axes):
    """``a`` with ``axes`` (sorted) moved to the end and flattened into one: ``(..., n)``, the other
    dims in their order."""
    k, nd = len(axes), a.ndim
    moved = np.moveaxis(a, axes, tuple(range(nd - k, nd)))
    n = int(np.prod(moved.shape[nd - k :], dtype=np.int64))
    return moved.reshape(moved.shape[: nd - k] + (n,))


def _unrows(y, shape, axes):
    """The inverse of :func:`_rows`: ``y (..., n)`` back to x's ``shape``."""
    k, nd = len(axes), len(shape)
    y = y.reshape(y.shape[:-1] + tuple(shape[a] for a in axes))
    return np.moveaxis(y, tuple(range(nd - k, nd)), axes)


def _prepare(x, axis, mask, empty_rows):
    """``(x, axes, s (..., n) with masked entries -inf, keep (..., n) bool: not masked)``: the rows
    over ``axes`` flattened into the last axis."""
    x = as_float(x, "x", ndim_min=1, allow_neg_inf=True)
    axes = _as_axes(axis, x.ndim)
    as_choice(empty_rows, "empty_rows", EMPTY_ROW_POLICIES)
    s = x
    keep = np.broadcast_to(np.True_, x.shape)
    if mask is not None:
        m = as_bool(mask, "mask", hint="; pass additive masks by adding them to x")
        check_broadcast_to(m, x.shape, "mask", "x.shape")
        s = np.where(m, x, -np.inf)
        keep = np.broadcast_to(m, x.shape)
    return x, axes, _rows(s, axes), _rows(keep, axes)


def _empty_rows_grad(dx, empty, empty_rows):
    """Zero the gradient of empty rows under 'uniform' (constant fill): (..., n)."""
    if empty_rows == "uniform" and empty.any():
        dx = np.where(empty[..., None], 0.0, dx)
    return dx


def softmax(x, *, axis=-1, mask=None, empty_rows="zero"):
    """``y``: the softmax of ``x`` over ``axis``, x's shape; masked entries give 0.

    ``y_j = exp(x_j − lse)`` over the entries of a row that take part (``mask`` True and
    ``x_j > -inf``), 0 elsewhere, ``lse = m + log1p(t)`` with ``m`` the row's max and ``t`` the
    denominator's tail without its largest term (``specs/softmax.md``): no overflow, and the digits
    of a tail far below ε are kept.

    Axes: a *row* is the set of entries over ``axis`` (one axis, several, or all), ``n`` its number
    of entries; the other dims are batch dims.

    Parameters
    ----------
    x : array_like, shape (..., n, ...)
        Logits, normalised over ``axis``; any real dtype, converted to float64, never mutated; at
        least one dimension.  ``-inf`` entries take no weight, as masked ones (their gradient is the
        limit ``x_j → -inf``); NaN and ``+inf`` are refused.
    axis : int, tuple of ints or None, default -1
        The axis normalised over (negative counts from the end); a tuple of distinct axes normalises
        jointly over all of them (scipy's and JAX's ``axis=(0, 2)``); None: over every axis.
    mask : array_like of bool, broadcastable to x.shape, optional
        True = the entry takes part (refattn's one polarity: True = keep); a mask may not enlarge
        ``x``.  A float mask is refused: add an additive mask to ``x``.  Default None: every entry
        takes part.
    empty_rows : {"zero", "nan", "uniform"}, default "zero"
        The result on an *empty row* (no entry taking part, or all of them ``-inf``): see the table
        of :mod:`refattn.softmax_family`.  ``"zero"``: 0; ``"nan"``: NaN; ``"uniform"``: ``1/n``.

    Returns
    -------
    y : ndarray of float64, x's shape
        Each row sums to 1 over its entries that take part (empty rows aside).

    Raises
    ------
    RefAttnError
        A NaN or ``+inf`` entry, a bad ``axis`` (out of range, repeated, ``()``), ``mask`` shape or
        ``empty_rows`` (``RefAttnTypeError`` for a non-real ``x``, a non-bool mask or a list ``axis``).
    """
    x, axes, s, _ = _prepare(x, axis, mask, empty_rows)
    return _unrows(normalize_last_axis(s, empty_rows).p, x.shape, axes)


def softmax_backward(d_y, x, *, axis=-1, mask=None, empty_rows="zero"):
    """Gradient of :func:`softmax`: ``dx = ∂/∂x of Σ d_y · y = p (d_y − Σ p d_y)``, the sum over a row.

    0 at masked and ``-inf`` entries (``p_j = 0``: also the limit ``x_j → -inf``); on empty rows 0
    under ``"zero"`` and ``"uniform"``, NaN under ``"nan"``.  Formed as ``p (c − Σ p c)``,
    ``c = d_y − d_y_t`` (t the largest entry), so the largest entry keeps its digits.

    Parameters
    ----------
    d_y : array_like, shape x.shape
        Cotangent of ``y``: exactly its shape, finite.
    x : array_like
        As :func:`softmax`.
    axis, mask, empty_rows
        The forward's options, as :func:`softmax` (same defaults; ``axis`` an int, a tuple or None;
        ``mask``: True = the entry takes part).

    Returns
    -------
    SoftmaxGrads
        ``(dx,)``: float64, x's shape.
    """
    x, axes, s, _ = _prepare(x, axis, mask, empty_rows)
    d = _rows(as_cotangent(d_y, x.shape, "d_y"), axes)  # (..., n)
    nz = normalize_last_axis(s, empty_rows)
    dx = _empty_rows_grad(softmax_vjp(nz.p, d), nz.empty, empty_rows)
    return SoftmaxGrads(_unrows(dx, x.shape, axes))


def log_softmax(x, *, axis=-1, mask=None, empty_rows="zero"):
    """``y = log(softmax(x))``, x's shape, computed as ``x − lse``; masked entries give ``-inf``.

    ``y_j = (x_j − m) − log1p(t)`` (``m`` the row's max, ``t`` the denominator's tail without its
    largest term, ``specs/softmax.md``) over the entries that take part; ``-inf`` on the others.

    Axes: a *row* is the set of entries over ``axis`` (one axis, several, or all), ``n`` its number
    of entries; the other dims are batch dims.

    Parameters
    ----------
    x : array_like, shape (..., n, ...)
        Logits, normalised over ``axis``; any real dtype, converted to float64, never mutated; at
        least one dimension.  ``-inf`` entries take no weight, as masked ones (their gradient is the
        limit ``x_j → -inf``); NaN and ``+inf`` are refused.
    axis : int, tuple of ints or None, default -1
        The axis normalised over (negative counts from the end); a tuple of distinct axes normalises
        jointly over all of them; None: over every axis.
    mask : array_like of bool, broadcastable to x.shape, optional
        True = the entry takes part (refattn's one polarity: True = keep); a mask may not enlarge
        ``x``.  A float mask is refused: add an additive mask to ``x``.  Default None: every entry
        takes part.
    empty_rows : {"zero", "nan", "uniform"}, default "zero"
        The result on an *empty row* (no entry taking part, or all of them ``-inf``): see the table
        of :mod:`refattn.softmax_family`.  ``"zero"``: ``-inf``; ``"nan"``: NaN; ``"uniform"``: ``−log n``.

    Returns
    -------
    y : ndarray of float64, x's shape

    Raises
    ------
    RefAttnError
        A NaN or ``+inf`` entry, a bad ``axis`` (out of range, repeated, ``()``), ``mask`` shape or
        ``empty_rows`` (``RefAttnTypeError`` for a non-real ``x``, a non-bool mask or a list ``axis``).
    """
    x, axes, s, _ = _prepare(x, axis, mask, empty_rows)
    nz = normalize_last_axis(s, empty_rows)
    y = (s - nz.shift[..., None]) - nz.log_tail[..., None]  # (..., n), -inf where masked; 0 - log1p(t) at the max
    if nz.empty.any():
        fill = {"zero": -np.inf, "nan": np.nan, "uniform": -np.log(s.shape[-1])}[empty_rows]
        y = np.where(nz.empty[..., None], fill, y)
    return _unrows(y, x.shape, axes)


def log_softmax_backward(d_y, x, *, axis=-1, mask=None, empty_rows="zero"):
    """Gradient of :func:`log_softmax`: ``dx = ∂/∂x of Σ d_y · y = d_y − p Σ d_y``, the sum over a row.

    The sum runs over the entries not masked; masked entries have their ``d_y`` dropped (the
    output there is the constant ``-inf``) and ``dx = 0``.  An unmasked ``x_j = -inf`` keeps its
    cotangent: ``dx_j = d_y_j`` (``p_j = 0``), the limit ``x_j → -inf`` of the gradient, as PyTorch
    and JAX give it.  On empty rows 0, NaN under ``"nan"``.

    Parameters
    ----------
    d_y : array_like, shape x.shape
        Cotangent of ``y``: exactly its shape, finite.
    x : array_like
        As :func:`log_softmax`.
    axis, mask, empty_rows
        The forward's options, as :func:`log_softmax` (same defaults; ``axis`` an int, a tuple or
        None; ``mask``: True = the entry takes part).

    Returns
    -------
    LogSoftmaxGrads
        ``(dx,)``: float64, x's shape.
    """
    x, axes, s, keep = _prepare(x, axis, mask, empty_rows)
    d = _rows(as_cotangent(d_y, x.shape, "d_y"), axes)  # (..., n)
    nz = normalize_last_axis(s, empty_rows)
    d = np.where(keep, d, 0.0)  # masked: the output there is the constant -inf
    # y = x - lse(x): dx = d_y - p Σ d_y, p_j = 0 at an unmasked -inf entry (dx_j = d_y_j, the limit)
    dx = d - nz.p * d.sum(axis=-1, keepdims=True)  # (..., n)
    if nz.empty.any():
        dx = np.where(nz.empty[..., None], np.nan if empty_rows == "nan" else 0.0, dx)
    return LogSoftmaxGrads(_unrows(dx, x.shape, axes))


class _Scaled(NamedTuple):
    """``log|S|``, ``S = Σ_j b_j e^{s_j}`` over the last axis of ``s (..., n)`` (``-inf`` = takes no part),
    and the pieces of its gradient (:func:`_scaled_sum`)."""

    y: np.ndarray  # (...,) log|S|; -inf where S = 0
    sign: np.ndarray  # (...,) sign of S: -1.0, 0.0 or 1.0
    e: np.ndarray  # (..., n) e^{s_j - m} where s_j > -inf, 0 elsewhere (may overflow at a b_j = 0 entry above m)
    total: np.ndarray  # (...,) S e^{-m}, signed; 0 where S = 0
    terms: np.ndarray  # (..., n) b_j e^{s_j - m} (0 where b_j = 0 or s_j = -inf)
    empty: np.ndarray  # (...,) bool: no entry takes part


def _scaled_sum(s, w):
    """:class:`_Scaled` of the rows ``s (..., n)`` (``-inf`` = takes no part) with factors ``w (..., n)``.

    The shift ``m`` is the largest ``s_j`` among the nonzero terms (``b_j ≠ 0``: a zero factor must not
    set the scale, or ``[1000, 0]`` with ``b = [0, 1]`` would underflow to ``-inf``).  With ``t`` the
    first largest such term, ``S e^{-m} = b_t (1 + r)``, ``r = Σ_{j≠t} b_j e^{s_j−m} / b_t``, and
    ``log|S| = m + log|b_t| + log|1 + r|``, ``log1p(r)`` when ``r > −1``: the digits of a tail far below
    ε are kept, as :func:`normalize_last_axis` keeps them (``b = 1`` gives its ``lse`` bit for bit).
    """
    takes = ~np.isneginf(s)  # (..., n)
    live = takes & (w != 0)  # (..., n) the nonzero terms of S
    s_live = np.where(live, s, -np.inf)  # (..., n)
    m = s_live.max(axis=-1)  # (...,) -inf: no nonzero term (S = 0)
    none = np.isneginf(m)  # (...,)
    m = np.where(none, 0.0, m)
    with np.errstate(over="ignore"):
        e = np.where(takes, np.exp(np.where(takes, s, 0.0) - m[..., None]), 0.0)  # (..., n)
    terms = w * np.where(live, e, 0.0)  # (..., n)
    top = np.argmax(s_live, axis=-1)[..., None]  # (..., 1) the first largest nonzero term: e = 1 there
    w_top = np.where(none, 1.0, np.take_along_axis(w, top, axis=-1)[..., 0])  # (...,)
    rest = terms.copy()
    np.put_along_axis(rest, top, 0.0, axis=-1)
    r = rest.sum(axis=-1) / w_top  # (...,)
    one_plus = 1.0 + r  # (...,) S e^{-m} / b_t
    zero = none | (one_plus == 0)  # (...,) S = 0
    with np.errstate(divide="ignore"):
        log_rest = np.where(r > -1.0, np.log1p(np.maximum(r, -1.0)), np.log(np.abs(one_plus)))  # log|1 + r|
    y = np.where(zero, -np.inf, m + np.log(np.abs(w_top)) + log_rest)
    sign = np.where(zero, 0.0, np.sign(w_top) * np.sign(one_plus))
    total = np.where(zero, 0.0, w_top * one_plus)
    return _Scaled(y, sign, e, total, terms, ~takes.any(axis=-1))


def _prepare_b(b, x, axes):
    """``b`` as float64 rows ``(..., n)`` of x's rows (None stays None) and its own shape."""
    if b is None:
        return None, None
    a = to_numpy(b, "b")
    b = as_float(a.reshape(1) if a.ndim == 0 else a, "b").reshape(a.shape)  # check_finite needs >= 1 dim
    check_broadcast_to(b, x.shape, "b", "x.shape")
    return _rows(np.broadcast_to(b, x.shape), axes), b.shape


def logsumexp(x, *, axis=-1, mask=None, b=None, return_sign=False, empty_rows="zero"):
    """``y = log Σ b exp(x)`` over the allowed entries of each row over ``axis``, reduced away.

    ``scipy.special.logsumexp``'s (and ``jax.nn.logsumexp``'s) semantics: without ``b``, ``y = m +
    log1p(t)`` (``m`` the row's max, ``t`` the denominator's tail without its largest term,
    ``specs/softmax.md``).  With factors ``b`` (any sign, zeros too), ``S = Σ b_j e^{x_j}`` over the
    entries that take part and ``y = log|S|``: with ``return_sign=True`` the result is ``(y, sign)``,
    ``sign`` the sign of ``S`` (−1, 0 or 1); without it a negative ``S`` gives ``y = NaN``, as SciPy
    gives it.  ``S = 0`` gives ``y = -inf``, ``sign = 0``.  An *empty row* (no entry taking part) is
    ``-inf`` (sign 0) under every ``empty_rows`` policy, as sdpa's ``lse``: the policy (validated) sets
    only softmax's and log_softmax's values there.

    Axes: a *row* is the set of entries over ``axis`` (one axis, several, or all), ``n`` its number
    of entries; the other dims are batch dims.

    Parameters
    ----------
    x : array_like, shape (..., n, ...)
        Logits, reduced over ``axis``; any real dtype, converted to float64, never mutated; at
        least one dimension.  ``-inf`` entries take no weight, as masked ones (their gradient is the
        limit ``x_j → -inf``); NaN and ``+inf`` are refused.
    axis : int, tuple of ints or None, default -1
        The axis reduced over (negative counts from the end); a tuple of distinct axes reduces jointly
        over all of them; None: over every axis (``y`` is then 0-D).
    mask : array_like of bool, broadcastable to x.shape, optional
        True = the entry takes part (refattn's one polarity: True = keep); a mask may not enlarge
        ``x``.  A float mask is refused: add an additive mask to ``x``.  Default None: every entry
        takes part.
    b : array_like, broadcastable to x.shape, optional
        Scale factors of the terms, finite, any sign (0 drops a term): ``log Σ b e^x``.  A ``b`` may
        not enlarge ``x``.  Default None: every factor 1.
    return_sign : bool, default False
        Also return the sign of the sum, as ``(y, sign)``; ``y`` is then ``log|S|``, never NaN.
    empty_rows : {"zero", "nan", "uniform"}, default "zero"
        The result on an *empty row* (no entry taking part, or all of them ``-inf``): see the table
        of :mod:`refattn.softmax_family`.  It does not change logsumexp's ``-inf``.

    Returns
    -------
    y : ndarray of float64, x.shape without ``axis``
        ``log|S|``; NaN where ``S < 0`` unless ``return_sign``; ``-inf`` where ``S = 0``.
    sign : ndarray of float64, y's shape
        Only with ``return_sign=True``: −1.0, 0.0 (``S = 0``, empty rows) or 1.0.

    Raises
    ------
    RefAttnError
        A NaN or ``+inf`` entry of ``x``, a non-finite ``b``, a bad ``axis`` (out of range, repeated,
        ``()``), ``mask`` or ``b`` shape, ``empty_rows`` (``RefAttnTypeError`` for a non-real ``x`` or
        ``b``, a non-bool mask or a list ``axis``).
    """
    return_sign = as_flag(return_sign, "return_sign")
    x, axes, s, _ = _prepare(x, axis, mask, empty_rows)
    w, _ = _prepare_b(b, x, axes)
    if w is None:
        y = normalize_last_axis(s, empty_rows).lse  # (...,)
        sign = np.where(np.isneginf(y), 0.0, 1.0)
    else:
        sc = _scaled_sum(s, w)
        y, sign = sc.y, sc.sign
        if not return_sign:
            y = np.where(sign < 0, np.nan, y)
    return (y, sign) if return_sign else y


def logsumexp_backward(d_y, x, *, axis=-1, mask=None, b=None, return_sign=False, d_sign=None, empty_rows="zero"):
    """Gradients of :func:`logsumexp`: ``dx_j = d_y · b_j e^{x_j} / S`` and ``db_j = d_y · e^{x_j} / S``,
    ``S = Σ b e^x`` signed (``d log|S| = dS / S`` on either side of 0); without ``b``, ``dx = d_y ·
    softmax(x)``.

    0 on empty rows under every policy (``y`` is the constant ``-inf`` there), and at masked and
    ``-inf`` entries (also the limit ``x_j → -inf``); ``dx_j = 0`` where ``b_j = 0`` while ``db_j`` is
    ``d_y e^{x_j}/S`` there too.  NaN on a row whose ``S`` is 0 although entries take part (``log|S|``
    is singular there) and, without ``return_sign``, on a row whose ``S < 0`` (``y`` is NaN there).

    Parameters
    ----------
    d_y : array_like, shape x.shape without ``axis``
        Cotangent of ``y``: exactly its shape, finite.
    x : array_like
        As :func:`logsumexp`.
    axis, mask, b, return_sign, empty_rows
        The forward's options, as :func:`logsumexp` (same defaults; ``mask``: True = the entry takes
        part).
    d_sign : array_like, shape of ``y``, optional
        Cotangent of ``sign`` (with ``return_sign=True`` only): finite; it adds nothing, the sign being
        piecewise constant.  Default None.

    Returns
    -------
    LogSumExpGrads
        ``(dx, db)``: float64, of x's and b's shapes; ``db`` None without ``b``.
    """
    return_sign = as_flag(return_sign, "return_sign")
    x, axes, s, _ = _prepare(x, axis, mask, empty_rows)
    w, b_shape = _prepare_b(b, x, axes)
    d = as_cotangent(d_y, s.shape[:-1], "d_y")  # (...,)
    if d_sign is not None:
        if not return_sign:
            raise RefAttnError("d_sign: a cotangent of sign, which logsumexp returns only with return_sign=True")
        as_cotangent(d_sign, s.shape[:-1], "d_sign")  # sign is piecewise constant: no contribution
    if w is None:
        nz = normalize_last_axis(s, "zero")  # p = 0 on empty rows, whatever the policy
        return LogSumExpGrads(_unrows(d[..., None] * nz.p, x.shape, axes))
    sc = _scaled_sum(s, w)
    # y = log|S|, S = Σ b e^x: dy/dx_j = b_j e^{x_j} / S, dy/db_j = e^{x_j} / S (both shifted by e^{-m})
    singular = (sc.total == 0) & ~sc.empty  # (...,) S = 0 with entries taking part
    if not return_sign:
        singular |= sc.sign < 0  # y = NaN there
    safe = np.where(sc.total == 0, 1.0, sc.total)[..., None]  # (..., 1)
    dx = d[..., None] * sc.terms / safe  # (..., n)
    with np.errstate(invalid="ignore", over="ignore"):
        db = d[..., None] * sc.e / safe  # (..., n): inf only where the true gradient overflows
    bad = np.where(singular, np.nan, 0.0)[..., None]  # (..., 1)
    flagged = (singular | sc.empty)[..., None]
    dx, db = np.where(flagged, bad, dx), np.where(flagged, bad, db)
    return LogSumExpGrads(_unrows(dx, x.shape, axes), unbroadcast(_unrows(db, x.shape, axes), b_shape))


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
