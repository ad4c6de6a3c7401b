"""Softmax, log-softmax and log-sum-exp with boolean masks and an empty-row policy.

Shapes: ``x (..., n, ...)`` with the normalised axis ``axis``; ``mask`` is bool,
broadcastable to ``x.shape``, True = the entry takes part.  Entries equal to
``-inf`` in ``x`` are treated as masked.  A row with no allowed entry is an
*empty row*; ``empty_rows`` says what it gives:

===========  ====================  ================  ==============  =========
policy       softmax               log_softmax       logsumexp       gradient
===========  ====================  ================  ==============  =========
"zero"       0                     -inf              -inf            0
"nan"        NaN                   NaN               NaN             NaN
"uniform"    1/n                   -log n            -inf            0
===========  ====================  ================  ==============  =========

``"uniform"`` is what a finite large-negative fill gives (every entry equal).
See ``specs/softmax.md`` for the derivations.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refattn._validate import as_axis, as_bool, as_choice, as_cotangent, as_float, check_broadcast_to

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

EMPTY_ROW_POLICIES = ("zero", "nan", "uniform")


class SoftmaxGrads(NamedTuple):
    dx: np.ndarray


class LogSoftmaxGrads(NamedTuple):
    dx: np.ndarray


class LogSumExpGrads(NamedTuple):
    dx: np.ndarray


class Normalized(NamedTuple):
    """Result of :func:`normalize_last_axis` (shapes for ``s (..., n)``)."""

    p: np.ndarray  # (..., n) probabilities, empty-row policy applied
    lse: np.ndarray  # (...,) log of the denominator, -inf on empty rows
    empty: np.ndarray  # (...,) bool, True where the denominator is 0
    p_sink: np.ndarray | None  # (...,) probability mass taken by the sink logit


def normalize_last_axis(s, empty_rows, sink=None):
    """Softmax over the last axis of logits ``s (..., n)`` where ``-inf`` = disallowed.

    ``sink (...,)`` is an extra logit that joins the denominator without a
    value (attention sinks).  A row is empty when no entry and no sink is
    finite.  Never warns: ``exp(-inf) = 0`` is the intended value.
    """
    m = s.max(axis=-1)  # (...,) may be -inf
    if sink is not None:
        m = np.maximum(m, sink)
    empty = np.isneginf(m)  # (...,)
    m = np.where(empty, 0.0, m)
    e = np.exp(s - m[..., None])  # (..., n) masked entries -> 0
    denom = e.sum(axis=-1)  # (...,)
    p_sink = None
    if sink is not None:
        e_sink = np.exp(sink - m)  # (...,)
        denom = denom + e_sink
    safe = np.where(empty, 1.0, denom)
    p = e / safe[..., None]  # (..., n)
    if sink is not None:
        p_sink = np.where(empty, 0.0, e_sink / safe)
    with np.errstate(divide="ignore"):
        lse = np.where(empty, -np.inf, m + np.log(safe))
    if empty.any() and empty_rows != "zero":
        fill = np.nan if empty_rows == "nan" else 1.0 / s.shape[-1]
        p = np.where(empty[..., None], fill, p)
    return Normalized(p, lse, empty, p_sink)


def softmax_vjp(p, dp):
    """Cotangent of the logits of ``p = softmax(s)`` over the last axis: ``p (dp - Σ p dp)``."""
    delta = np.einsum("...j,...j->...", p, dp)  # (...,)
    return p * (dp - delta[..., None])  # (..., n)


def _prepare(x, axis, mask, empty_rows):
    x = as_float(x, "x", ndim_min=1, allow_neg_inf=True)
    ax = as_axis(axis, x.ndim)
    as_choice(empty_rows, "empty_rows", EMPTY_ROW_POLICIES)
    s = x
    if mask is not None:
        m = as_bool(mask, "mask", hint="; pass additive masks by adding them to x")
        check_broadcast_to(m, x.shape, "mask", "x.shape")
        s = np.where(m, x, -np.inf)
    s = np.moveaxis(s, ax, -1)  # (..., n)
    return x, ax, s


def _empty_rows_grad(dx, empty, empty_rows):
    """Zero the gradient of empty rows under 'uniform' (constant fill): (..., n)."""
    if empty_rows == "uniform" and empty.any():
        dx = np.where(empty[..., None], 0.0, dx)
    return dx


def softmax(x, *, axis=-1, mask=None, empty_rows="zero"):
    """Softmax of ``x`` along ``axis``; masked entries give 0.  Returns x's shape."""
    x, ax, s = _prepare(x, axis, mask, empty_rows)
    return np.moveaxis(normalize_last_axis(s, empty_rows).p, -1, ax)


def softmax_backward(dy, x, *, axis=-1, mask=None, empty_rows="zero"):
    """Gradient of ``softmax`` w.r.t. ``x``: ``dx = p (dy - Σ p dy)``."""
    x, ax, s = _prepare(x, axis, mask, empty_rows)
    d = np.moveaxis(as_cotangent(dy, x.shape), ax, -1)  # (..., n)
    nz = normalize_last_axis(s, empty_rows)
    dx = _empty_rows_grad(softmax_vjp(nz.p, d), nz.empty, empty_rows)
    return SoftmaxGrads(np.moveaxis(dx, -1, ax))


def log_softmax(x, *, axis=-1, mask=None, empty_rows="zero"):
    """``log(softmax(x))`` computed as ``s - lse``; masked entries give ``-inf``."""
    x, ax, s = _prepare(x, axis, mask, empty_rows)
    nz = normalize_last_axis(s, empty_rows)
    y = s - np.where(nz.empty, 0.0, nz.lse)[..., None]  # (..., n), -inf where masked
    if nz.empty.any():
        fill = {"zero": -np.inf, "nan": np.nan, "uniform": -np.log(s.shape[-1])}[empty_rows]
        y = np.where(nz.empty[..., None], fill, y)
    return np.moveaxis(y, -1, ax)


def log_softmax_backward(dy, x, *, axis=-1, mask=None, empty_rows="zero"):
    """Gradient of ``log_softmax``: ``dx = dy - p Σ dy`` over allowed entries (0 elsewhere)."""
    x, ax, s = _prepare(x, axis, mask, empty_rows)
    d = np.moveaxis(as_cotangent(dy, x.shape), ax, -1)  # (..., n)
    nz = normalize_last_axis(s, empty_rows)
    allowed = ~np.isneginf(s)  # (..., n)
    d = np.where(allowed, d, 0.0)  # the output there is the constant -inf
    dx = d - nz.p * d.sum(axis=-1, keepdims=True)  # (..., n)
    if nz.empty.any():
        dx = np.where(nz.empty[..., None], np.nan if empty_rows == "nan" else 0.0, dx)
    return LogSoftmaxGrads(np.moveaxis(dx, -1, ax))


def logsumexp(x, *, axis=-1, mask=None, empty_rows="zero"):
    """``log Σ exp(x)`` over allowed entries of ``axis`` (reduced away); ``-inf`` on empty rows."""
    x, ax, s = _prepare(x, axis, mask, empty_rows)
    nz = normalize_last_axis(s, empty_rows)
    if empty_rows == "nan":
        return np.where(nz.empty, np.nan, nz.lse)
    return nz.lse


def logsumexp_backward(dy, x, *, axis=-1, mask=None, empty_rows="zero"):
    """Gradient of ``logsumexp``: ``dx = dy · softmax(x)`` (0 on empty rows)."""
    x, ax, s = _prepare(x, axis, mask, empty_rows)
    d = as_cotangent(dy, s.shape[:-1])  # (...,)
    nz = normalize_last_axis(s, empty_rows)
    dx = _empty_rows_grad(d[..., None] * nz.p, nz.empty, empty_rows)
    return LogSumExpGrads(np.moveaxis(dx, -1, ax))
