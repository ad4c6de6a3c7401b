"""Softmax, log-softmax and log-sum-exp with boolean masks and an empty-row policy.

Shapes: ``x (..., n, ...)`` with the normalised axis ``axis``; ``mask`` is bool,
broadcastable to ``x.shape``, True = the entry takes part (refattn's one mask convention:
True = keep).  Each op's output is ``y``; ``name_backward(d_y, x, *, options)`` takes its
cotangent and returns ``<Name>Grads(dx)``.  Entries equal to ``-inf`` in ``x`` take no
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

from refattn._validate import as_axis, as_bool, as_choice, as_cotangent, as_float, check_broadcast_to, check_keywords_of

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
    """Gradient of :func:`logsumexp` (returned by :func:`logsumexp_backward`) w.r.t. ``x``: ``dx = d_y · p``.

    Fields
    ------
    dx : ndarray of float64, shape of ``x``
    """

    dx: np.ndarray


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


def _prepare(x, axis, mask, empty_rows):
    """``(x, axis, s (..., n) with masked entries -inf, keep (..., n) bool: not masked)``."""
    x = as_float(x, "x", ndim_min=1, allow_neg_inf=True)
    ax = as_axis(axis, x.ndim)
    as_choice(empty_rows, "empty_rows", EMPTY_ROW_POLICIES)
    s = x
    keep = np.broadcast_to(np.True_, x.shape)
    if mask is not None:
        m = as_bool(mask, "mask", hint="; pass additive masks by adding them to x")
        check_broadcast_to(m, x.shape, "mask", "x.shape")
        s = np.where(m, x, -np.inf)
        keep = np.broadcast_to(m, x.shape)
    return x, ax, np.moveaxis(s, ax, -1), np.moveaxis(keep, ax, -1)


def _empty_rows_grad(dx, empty, empty_rows):
    """Zero the gradient of empty rows under 'uniform' (constant fill): (..., n)."""
    if empty_rows == "uniform" and empty.any():
        dx = np.where(empty[..., None], 0.0, dx)
    return dx


def softmax(x, *, axis=-1, mask=None, empty_rows="zero"):
    """``y``: the softmax of ``x`` along ``axis``, x's shape; masked entries give 0.

    ``y_j = exp(x_j − lse)`` over the entries that take part (``mask`` True and ``x_j > -inf``), 0
    elsewhere, ``lse = m + log1p(t)`` with ``m`` the row's max and ``t`` the denominator's tail
    without its largest term (``specs/softmax.md``): no overflow, and the digits of a tail far below
    ε are kept.

    Axes: ``n`` the length of ``axis``; the other dims are batch dims.

    Parameters
    ----------
    x : array_like, shape (..., n, ...)
        Logits, normalised along ``axis``; any real dtype, converted to float64, never mutated; at
        least one dimension.  ``-inf`` entries take no weight, as masked ones (their gradient is the
        limit ``x_j → -inf``); NaN and ``+inf`` are refused.
    axis : int, default -1
        The axis normalised over (negative counts from the end).
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
        A NaN or ``+inf`` entry, a bad ``axis``, ``mask`` shape or ``empty_rows`` (``RefAttnTypeError``
        for a non-real ``x`` or a non-bool mask).
    """
    x, ax, s, _ = _prepare(x, axis, mask, empty_rows)
    return np.moveaxis(normalize_last_axis(s, empty_rows).p, -1, ax)


def softmax_backward(d_y, x, *, axis=-1, mask=None, empty_rows="zero"):
    """Gradient of :func:`softmax`: ``dx = ∂/∂x of Σ d_y · y = p (d_y − Σ p d_y)``.

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
        The forward's options, as :func:`softmax` (same defaults; ``mask``: True = the entry takes part).

    Returns
    -------
    SoftmaxGrads
        ``(dx,)``: float64, x's shape.
    """
    x, ax, s, _ = _prepare(x, axis, mask, empty_rows)
    d = np.moveaxis(as_cotangent(d_y, x.shape, "d_y"), ax, -1)  # (..., n)
    nz = normalize_last_axis(s, empty_rows)
    dx = _empty_rows_grad(softmax_vjp(nz.p, d), nz.empty, empty_rows)
    return SoftmaxGrads(np.moveaxis(dx, -1, ax))


def log_softmax(x, *, axis=-1, mask=None, empty_rows="zero"):
    """``y = log(softmax(x))``, x's shape, computed as ``x − lse``; masked entries give ``-inf``.

    ``y_j = (x_j − m) − log1p(t)`` (``m`` the row's max, ``t`` the denominator's tail without its
    largest term, ``specs/softmax.md``) over the entries that take part; ``-inf`` on the others.

    Axes: ``n`` the length of ``axis``; the other dims are batch dims.

    Parameters
    ----------
    x : array_like, shape (..., n, ...)
        Logits, normalised along ``axis``; any real dtype, converted to float64, never mutated; at
        least one dimension.  ``-inf`` entries take no weight, as masked ones (their gradient is the
        limit ``x_j → -inf``); NaN and ``+inf`` are refused.
    axis : int, default -1
        The axis normalised over (negative counts from the end).
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
        A NaN or ``+inf`` entry, a bad ``axis``, ``mask`` shape or ``empty_rows`` (``RefAttnTypeError``
        for a non-real ``x`` or a non-bool mask).
    """
    x, ax, s, _ = _prepare(x, axis, mask, empty_rows)
    nz = normalize_last_axis(s, empty_rows)
    y = (s - nz.shift[..., None]) - nz.log_tail[..., None]  # (..., n), -inf where masked; 0 - log1p(t) at the max
    if nz.empty.any():
        fill = {"zero": -np.inf, "nan": np.nan, "uniform": -np.log(s.shape[-1])}[empty_rows]
        y = np.where(nz.empty[..., None], fill, y)
    return np.moveaxis(y, -1, ax)


def log_softmax_backward(d_y, x, *, axis=-1, mask=None, empty_rows="zero"):
    """Gradient of :func:`log_softmax`: ``dx = ∂/∂x of Σ d_y · y = d_y − p Σ d_y``.

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
        The forward's options, as :func:`log_softmax` (same defaults; ``mask``: True = the entry takes part).

    Returns
    -------
    LogSoftmaxGrads
        ``(dx,)``: float64, x's shape.
    """
    x, ax, s, keep = _prepare(x, axis, mask, empty_rows)
    d = np.moveaxis(as_cotangent(d_y, x.shape, "d_y"), ax, -1)  # (..., n)
    nz = normalize_last_axis(s, empty_rows)
    d = np.where(keep, d, 0.0)  # masked: the output there is the constant -inf
    # y = x - lse(x): dx = d_y - p Σ d_y, p_j = 0 at an unmasked -inf entry (dx_j = d_y_j, the limit)
    dx = d - nz.p * d.sum(axis=-1, keepdims=True)  # (..., n)
    if nz.empty.any():
        dx = np.where(nz.empty[..., None], np.nan if empty_rows == "nan" else 0.0, dx)
    return LogSoftmaxGrads(np.moveaxis(dx, -1, ax))


def logsumexp(x, *, axis=-1, mask=None, empty_rows="zero"):
    """``y = log Σ exp(x)`` over the allowed entries of ``axis``, reduced away.

    ``y = m + log1p(t)`` (``m`` the row's max, ``t`` the denominator's tail without its largest term,
    ``specs/softmax.md``), over the entries that take part.  ``-inf`` on an empty row under every
    ``empty_rows`` policy, as sdpa's ``lse``: the policy (validated) sets only softmax's and
    log_softmax's values there.

    Axes: ``n`` the length of ``axis``; the other dims are batch dims.

    Parameters
    ----------
    x : array_like, shape (..., n, ...)
        Logits, normalised along ``axis``; any real dtype, converted to float64, never mutated; at
        least one dimension.  ``-inf`` entries take no weight, as masked ones (their gradient is the
        limit ``x_j → -inf``); NaN and ``+inf`` are refused.
    axis : int, default -1
        The axis normalised over (negative counts from the end).
    mask : array_like of bool, broadcastable to x.shape, optional
        True = the entry takes part (refattn's one polarity: True = keep); a mask may not enlarge
        ``x``.  A float mask is refused: add an additive mask to ``x``.  Default None: every entry
        takes part.
    empty_rows : {"zero", "nan", "uniform"}, default "zero"
        The result on an *empty row* (no entry taking part, or all of them ``-inf``): see the table
        of :mod:`refattn.softmax_family`.  It does not change logsumexp's ``-inf``.

    Returns
    -------
    y : ndarray of float64, x.shape without ``axis``

    Raises
    ------
    RefAttnError
        A NaN or ``+inf`` entry, a bad ``axis``, ``mask`` shape or ``empty_rows`` (``RefAttnTypeError``
        for a non-real ``x`` or a non-bool mask).
    """
    x, ax, s, _ = _prepare(x, axis, mask, empty_rows)
    return normalize_last_axis(s, empty_rows).lse


def logsumexp_backward(d_y, x, *, axis=-1, mask=None, empty_rows="zero"):
    """Gradient of :func:`logsumexp`: ``dx = ∂/∂x of Σ d_y · y = d_y · softmax(x)``.

    0 on empty rows under every policy (``y`` is the constant ``-inf`` there), and at masked and
    ``-inf`` entries (also the limit ``x_j → -inf``).

    Parameters
    ----------
    d_y : array_like, shape x.shape without ``axis``
        Cotangent of ``y``: exactly its shape, finite.
    x : array_like
        As :func:`logsumexp`.
    axis, mask, empty_rows
        The forward's options, as :func:`logsumexp` (same defaults; ``mask``: True = the entry takes part).

    Returns
    -------
    LogSumExpGrads
        ``(dx,)``: float64, x's shape.
    """
    x, ax, s, _ = _prepare(x, axis, mask, empty_rows)
    d = as_cotangent(d_y, s.shape[:-1], "d_y")  # (...,)
    nz = normalize_last_axis(s, "zero")  # p = 0 on empty rows, whatever the policy
    return LogSumExpGrads(np.moveaxis(d[..., None] * nz.p, -1, ax))


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
