"""Positional metrics: distances, locality, offsets, diagonal, positional bias, self vs context.

``P (..., H, Lq, Lk)``; query i and key j are raw indices (for ``Lq != Lk`` maps the distance
is still ``|i − j|``), and every metric depends on them through ``j − i`` only, so padding a
square map on the left shifts both and changes nothing.  Per-row results ``P.shape[:-1]`` (0 on
padded rows); per-head results ``P.shape[:-2]``.  Every metric here except ``expected_offset`` is
linear in P.  Each backward takes the cotangent ``d_<output>`` of the output its forward names and
returns :class:`~refattn.metrics.MapGrads` ``(dP)``.  ``mask``: True = real token (a key-padding mask,
or a bool mask broadcastable to P, True = kept).  ``check_probabilities``: refuse maps whose real rows
are not probabilities.
"""

from __future__ import annotations

import numpy as np

from refattn._validate import as_cotangent, as_int, check_keywords_of
from refattn.metrics._maps import (
    MapGrads,
    attention_map,
    kernel_rows,
    key_counts,
    masked_grad,
    positions,
    row_mean,
    row_mean_backward,
    use_kernel,
)

__all__ = [
    "diagonal_strength",
    "diagonal_strength_backward",
    "expected_offset",
    "expected_offset_backward",
    "locality_score",
    "locality_score_backward",
    "mean_distance",
    "mean_distance_backward",
    "offset_attention",
    "offset_attention_backward",
    "positional_bias",
    "positional_bias_backward",
    "self_context_balance",
    "self_context_balance_backward",
]


def _distance(m):
    i, j = positions(m)
    return np.abs(i - j)  # (Lq, Lk)


def mean_distance(P, *, mask=None, backend="auto", check_probabilities=True):
    """``distance (..., Lq)`` = ``Σ_j P_ij |i − j|`` per row (``mask``: True = real token).

    The expected distance between query i and the keys it attends, over its allowed keys (0 on
    padded rows); for ``Lq != Lk`` maps the distance is still ``|i − j|``.

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows, index i), ``Lk`` keys
    (index j); i and j are raw indices of the map, read through ``j − i`` only (left padding of a
    square map changes nothing).

    Parameters
    ----------
    P : array_like, shape (..., H, Lq, Lk) or (..., Lq, Lk)
        Attention maps, rows = queries; any real dtype (bfloat16 too), converted to float64, never
        mutated; finite.  Leading dims are batch dims.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P.shape[:-3] + (Lk,)`` (per example, shared by its
        heads) or ``P.shape[:-2] + (Lk,)`` (per map), which with ``Lq = Lk`` also marks the padded
        query rows; or a bool mask broadcastable to P (True = the entry is kept; a row is real when it
        keeps some key).  Masked entries count as 0; padded rows are left out of every average.
        Default None: every token real.
    backend : {"auto", "numpy", "numba"}, default "auto"
        ``"numba"``: one parallel read of P by the metric kernel (``refattn/kernels/metric_kernels.py``,
        within 1e-12 of the definition, the probability check in the same pass; any mask);
        ``"numpy"``: the definition; ``"auto"``: the kernel from ``refattn.kernels.AUTO_MIN_SCORES``
        (2**18) entries of P on, when numba is installed.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the argument and the first offending row, with its sum and
        minimum) a map whose real rows are not probabilities: entries >= 0, each row summing to 1 over
        its allowed keys within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).
        False: measure the map as it is (maps with sinks or dropout, known-good maps in a hot loop).

    Returns
    -------
    distance : ndarray of float64, shape P.shape[:-1], i.e. (..., Lq)

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    r = kernel_rows(P, mask, check_probabilities=check_probabilities) if use_kernel(backend, P) else None
    if r is not None:
        return np.array(r.distance)  # its own array, not a view of the kernel's table
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    return (m.p * _distance(m)).sum(axis=-1)


def mean_distance_backward(d_distance, P, *, mask=None, check_probabilities=True):
    """Gradient of :func:`mean_distance`: ``dP = ∂/∂P of Σ d_distance · distance``.

    ``dP_ij = d_distance_i |i − j|`` on the allowed entries.

    Parameters
    ----------
    d_distance : array_like, shape P.shape[:-1], i.e. (..., Lq)
        Cotangent of ``distance``: exactly its shape, finite.
    P : array_like
        As :func:`mean_distance`.
    mask, check_probabilities
        The forward's options, as :func:`mean_distance` (same defaults; ``mask``: True = real token).

    Returns
    -------
    MapGrads
        ``(dP,)``: float64, P's shape; 0 on masked entries and padded rows.
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    d = as_cotangent(d_distance, m.p.shape[:-1], "d_distance")
    return MapGrads(masked_grad(m, d[..., None] * _distance(m)))


def _half_width(m):
    n = key_counts(m).astype(np.float64)
    return np.where(m.rows, n / 2.0, 1.0)


def locality_score(P, *, mask=None, backend="auto", check_probabilities=True):
    """``locality (..., Lq)`` = ``1 − mean_distance / (n/2)`` per row, n = allowed keys of the row.

    1 = all the weight on the diagonal; it falls with the distance and can be negative (weight
    far from the query).  0 on padded rows.

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows, index i), ``Lk`` keys
    (index j); i and j are raw indices of the map, read through ``j − i`` only (left padding of a
    square map changes nothing).

    Parameters
    ----------
    P : array_like, shape (..., H, Lq, Lk) or (..., Lq, Lk)
        Attention maps, rows = queries; any real dtype (bfloat16 too), converted to float64, never
        mutated; finite.  Leading dims are batch dims.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P.shape[:-3] + (Lk,)`` (per example, shared by its
        heads) or ``P.shape[:-2] + (Lk,)`` (per map), which with ``Lq = Lk`` also marks the padded
        query rows; or a bool mask broadcastable to P (True = the entry is kept; a row is real when it
        keeps some key).  Masked entries count as 0; padded rows are left out of every average.
        Default None: every token real.
    backend : {"auto", "numpy", "numba"}, default "auto"
        ``"numba"``: one parallel read of P by the metric kernel (``refattn/kernels/metric_kernels.py``,
        within 1e-12 of the definition, the probability check in the same pass; any mask);
        ``"numpy"``: the definition; ``"auto"``: the kernel from ``refattn.kernels.AUTO_MIN_SCORES``
        (2**18) entries of P on, when numba is installed.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the argument and the first offending row, with its sum and
        minimum) a map whose real rows are not probabilities: entries >= 0, each row summing to 1 over
        its allowed keys within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).
        False: measure the map as it is (maps with sinks or dropout, known-good maps in a hot loop).

    Returns
    -------
    locality : ndarray of float64, shape P.shape[:-1], i.e. (..., Lq)

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    r = kernel_rows(P, mask, check_probabilities=check_probabilities) if use_kernel(backend, P) else None
    if r is not None:
        return _kernel_locality(r)
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    return np.where(
        m.rows,
        1.0 - mean_distance(m.p, mask=m.allowed, backend="numpy", check_probabilities=False) / _half_width(m),
        0.0,
    )


def _kernel_locality(r):
    """:func:`locality_score` from the metric kernel's rows (:class:`~refattn.metrics._maps.KernelRows`)."""
    return np.where(r.rows, 1.0 - r.distance / np.where(r.rows, r.count / 2.0, 1.0), 0.0)


def locality_score_backward(d_locality, P, *, mask=None, check_probabilities=True):
    """Gradient of :func:`locality_score`: ``dP = ∂/∂P of Σ d_locality · locality``.

    ``dP_ij = −d_locality_i |i − j| / (n_i/2)`` on the allowed entries.

    Parameters
    ----------
    d_locality : array_like, shape P.shape[:-1], i.e. (..., Lq)
        Cotangent of ``locality``: exactly its shape, finite.
    P : array_like
        As :func:`locality_score`.
    mask, check_probabilities
        The forward's options, as :func:`locality_score` (same defaults; ``mask``: True = real token).

    Returns
    -------
    MapGrads
        ``(dP,)``: float64, P's shape; 0 on masked entries and padded rows.
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    d = as_cotangent(d_locality, m.p.shape[:-1], "d_locality")
    return MapGrads(masked_grad(m, -(d / _half_width(m))[..., None] * _distance(m)))


def _offsets(m):
    i, j = positions(m)
    return j - i  # (Lq, Lk)


def _centre(m):
    return (m.p * _offsets(m)).sum(axis=-1)  # (..., Lq): Σ_j P_ij (j − i) = E_j[j] − i on a normalised row


def expected_offset(P, *, mask=None, check_probabilities=True):
    """``offset (..., Lq)`` = ``|Σ_j P_ij (j − i)|`` per row (``|E_j[j] − i|`` for a normalised row).

    How far from the query the row's centre of mass lies; 0 on padded rows.  Written with the
    offsets ``j − i`` so that, like every metric here, it depends on relative positions only:
    left padding leaves it unchanged even for rows that do not sum to 1.  Not linear in P.

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows, index i), ``Lk`` keys
    (index j); i and j are raw indices of the map, read through ``j − i`` only (left padding of a
    square map changes nothing).

    Parameters
    ----------
    P : array_like, shape (..., H, Lq, Lk) or (..., Lq, Lk)
        Attention maps, rows = queries; any real dtype (bfloat16 too), converted to float64, never
        mutated; finite.  Leading dims are batch dims.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P.shape[:-3] + (Lk,)`` (per example, shared by its
        heads) or ``P.shape[:-2] + (Lk,)`` (per map), which with ``Lq = Lk`` also marks the padded
        query rows; or a bool mask broadcastable to P (True = the entry is kept; a row is real when it
        keeps some key).  Masked entries count as 0; padded rows are left out of every average.
        Default None: every token real.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the argument and the first offending row, with its sum and
        minimum) a map whose real rows are not probabilities: entries >= 0, each row summing to 1 over
        its allowed keys within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).
        False: measure the map as it is (maps with sinks or dropout, known-good maps in a hot loop).

    Returns
    -------
    offset : ndarray of float64, shape P.shape[:-1], i.e. (..., Lq)

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    return np.where(m.rows, np.abs(_centre(m)), 0.0)


def expected_offset_backward(d_offset, P, *, mask=None, check_probabilities=True):
    """Gradient of :func:`expected_offset`: ``dP = ∂/∂P of Σ d_offset · offset``.

    ``dP_ij = d_offset_i sign(Σ_k P_ik (k − i)) (j − i)`` on the allowed entries: the
    subgradient 0 where the sum is 0.

    Parameters
    ----------
    d_offset : array_like, shape P.shape[:-1], i.e. (..., Lq)
        Cotangent of ``offset``: exactly its shape, finite.
    P : array_like
        As :func:`expected_offset`.
    mask, check_probabilities
        The forward's options, as :func:`expected_offset` (same defaults; ``mask``: True = real token).

    Returns
    -------
    MapGrads
        ``(dP,)``: float64, P's shape; 0 on masked entries and padded rows.
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    d = as_cotangent(d_offset, m.p.shape[:-1], "d_offset")
    return MapGrads(masked_grad(m, (d * np.sign(_centre(m)))[..., None] * _offsets(m)))


def _offset_pattern(m, offset):
    i, j = positions(m)
    return (j - i == offset).astype(np.float64)  # (Lq, Lk)


def _rows_with_target(m, offset):
    """Real rows i whose key ``i + offset`` exists and is allowed (a real token) ``(..., Lq)``."""
    return m.rows & (m.allowed & (_offset_pattern(m, offset) > 0)).any(axis=-1)


def offset_attention(P, *, offset, mask=None, check_probabilities=True):
    """``mass (...,)``: the mean over real rows i (with key ``i + offset`` present) of ``P[i, i + offset]``.

    ``offset = −1``: previous token; ``0``: self; ``+1``: next token.  A row counts when its key
    ``i + offset`` exists and is allowed: a padded key (under right padding for +1, left padding
    for −1) is no target, as it is not in the cropped map.  0 for a map without such a row.

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows, index i), ``Lk`` keys
    (index j); i and j are raw indices of the map, read through ``j − i`` only (left padding of a
    square map changes nothing).

    Parameters
    ----------
    P : array_like, shape (..., H, Lq, Lk) or (..., Lq, Lk)
        Attention maps, rows = queries; any real dtype (bfloat16 too), converted to float64, never
        mutated; finite.  Leading dims are batch dims.
    offset : int
        The key offset ``j − i`` measured: −1 previous token, 0 self, +1 next token (any int).
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P.shape[:-3] + (Lk,)`` (per example, shared by its
        heads) or ``P.shape[:-2] + (Lk,)`` (per map), which with ``Lq = Lk`` also marks the padded
        query rows; or a bool mask broadcastable to P (True = the entry is kept; a row is real when it
        keeps some key).  Masked entries count as 0; padded rows are left out of every average.
        Default None: every token real.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the argument and the first offending row, with its sum and
        minimum) a map whose real rows are not probabilities: entries >= 0, each row summing to 1 over
        its allowed keys within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).
        False: measure the map as it is (maps with sinks or dropout, known-good maps in a hot loop).

    Returns
    -------
    mass : ndarray of float64, shape P.shape[:-2], i.e. (..., H)

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    offset = as_int(offset, "offset")
    return row_mean((m.p * _offset_pattern(m, offset)).sum(axis=-1), _rows_with_target(m, offset))


def offset_attention_backward(d_mass, P, *, offset, mask=None, check_probabilities=True):
    """Gradient of :func:`offset_attention`: ``dP = ∂/∂P of Σ d_mass · mass``.

    ``dP_{i, i+offset} = d_mass / n_rows`` on the rows that count, 0 elsewhere.

    Parameters
    ----------
    d_mass : array_like, shape P.shape[:-2], i.e. (..., H)
        Cotangent of ``mass``: exactly its shape, finite.
    P : array_like
        As :func:`offset_attention`.
    offset, mask, check_probabilities
        The forward's options, as :func:`offset_attention` (same defaults; ``mask``: True = real token).

    Returns
    -------
    MapGrads
        ``(dP,)``: float64, P's shape; 0 on masked entries and padded rows.
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    offset = as_int(offset, "offset")
    rows = _rows_with_target(m, offset)
    d = row_mean_backward(as_cotangent(d_mass, m.p.shape[:-2], "d_mass"), rows)
    return MapGrads(masked_grad(m, d[..., None] * _offset_pattern(m, offset)))


def diagonal_strength(P, *, mask=None, backend="auto", check_probabilities=True):
    """``strength (...,)``: the mean over real rows of ``P_ii`` (``mask``: True = real token).

    :func:`offset_attention` with ``offset=0``.

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows, index i), ``Lk`` keys
    (index j); i and j are raw indices of the map, read through ``j − i`` only (left padding of a
    square map changes nothing).

    Parameters
    ----------
    P : array_like, shape (..., H, Lq, Lk) or (..., Lq, Lk)
        Attention maps, rows = queries; any real dtype (bfloat16 too), converted to float64, never
        mutated; finite.  Leading dims are batch dims.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P.shape[:-3] + (Lk,)`` (per example, shared by its
        heads) or ``P.shape[:-2] + (Lk,)`` (per map), which with ``Lq = Lk`` also marks the padded
        query rows; or a bool mask broadcastable to P (True = the entry is kept; a row is real when it
        keeps some key).  Masked entries count as 0; padded rows are left out of every average.
        Default None: every token real.
    backend : {"auto", "numpy", "numba"}, default "auto"
        ``"numba"``: one parallel read of P by the metric kernel (``refattn/kernels/metric_kernels.py``,
        within 1e-12 of the definition, the probability check in the same pass; any mask);
        ``"numpy"``: the definition; ``"auto"``: the kernel from ``refattn.kernels.AUTO_MIN_SCORES``
        (2**18) entries of P on, when numba is installed.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the argument and the first offending row, with its sum and
        minimum) a map whose real rows are not probabilities: entries >= 0, each row summing to 1 over
        its allowed keys within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).
        False: measure the map as it is (maps with sinks or dropout, known-good maps in a hot loop).

    Returns
    -------
    strength : ndarray of float64, shape P.shape[:-2], i.e. (..., H)

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    r = kernel_rows(P, mask, check_probabilities=check_probabilities) if use_kernel(backend, P) else None
    if r is not None:
        return row_mean(r.diagonal, r.diagonal_kept)
    return offset_attention(P, offset=0, mask=mask, check_probabilities=check_probabilities)


def diagonal_strength_backward(d_strength, P, *, mask=None, check_probabilities=True):
    """Gradient of :func:`diagonal_strength`: ``dP = ∂/∂P of Σ d_strength · strength``.

    ``dP_ii = d_strength / n_rows`` on the real rows.

    Parameters
    ----------
    d_strength : array_like, shape P.shape[:-2], i.e. (..., H)
        Cotangent of ``strength``: exactly its shape, finite.
    P : array_like
        As :func:`diagonal_strength`.
    mask, check_probabilities
        The forward's options, as :func:`diagonal_strength` (same defaults; ``mask``: True = real token).

    Returns
    -------
    MapGrads
        ``(dP,)``: float64, P's shape; 0 on masked entries and padded rows.
    """
    return offset_attention_backward(d_strength, P, offset=0, mask=mask, check_probabilities=check_probabilities)


def _regions(m):
    """One-hot region of each allowed key by its rank among the row's allowed keys: first quarter,
    middle half, last quarter → ``(..., Lq, Lk, 3)``."""
    allowed = m.allowed.astype(np.float64)
    rank = np.cumsum(allowed, axis=-1) - 1.0  # rank among allowed keys
    n = allowed.sum(axis=-1, keepdims=True)
    first = (4 * rank < n) & m.allowed
    last = (4 * rank >= 3 * n) & m.allowed & ~first
    middle = m.allowed & ~first & ~last
    return np.stack([first, middle, last], axis=-1).astype(np.float64)


def positional_bias(P, *, mask=None, check_probabilities=True):
    """``mass (..., 3)``: the mean attention (over real rows) received by the first quarter, middle half
    and last quarter of each row's allowed keys.

    The allowed keys of each row are split by their rank ``r`` among them (``n`` of them): first
    quarter ``4r < n``, last quarter ``4r >= 3n``, the middle half in between; ``mass[..., k]`` is
    the mean over real rows of the row's weight on region k.

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows, index i), ``Lk`` keys
    (index j); i and j are raw indices of the map, read through ``j − i`` only (left padding of a
    square map changes nothing).

    Parameters
    ----------
    P : array_like, shape (..., H, Lq, Lk) or (..., Lq, Lk)
        Attention maps, rows = queries; any real dtype (bfloat16 too), converted to float64, never
        mutated; finite.  Leading dims are batch dims.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P.shape[:-3] + (Lk,)`` (per example, shared by its
        heads) or ``P.shape[:-2] + (Lk,)`` (per map), which with ``Lq = Lk`` also marks the padded
        query rows; or a bool mask broadcastable to P (True = the entry is kept; a row is real when it
        keeps some key).  Masked entries count as 0; padded rows are left out of every average.
        Default None: every token real.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the argument and the first offending row, with its sum and
        minimum) a map whose real rows are not probabilities: entries >= 0, each row summing to 1 over
        its allowed keys within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).
        False: measure the map as it is (maps with sinks or dropout, known-good maps in a hot loop).

    Returns
    -------
    mass : ndarray of float64, shape P.shape[:-2] + (3,), i.e. (..., H, 3)

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    mass = np.einsum("...j,...jr->...r", m.p, _regions(m))  # (..., Lq, 3)
    return np.stack([row_mean(mass[..., r], m.rows) for r in range(3)], axis=-1)


def positional_bias_backward(d_mass, P, *, mask=None, check_probabilities=True):
    """Gradient of :func:`positional_bias`: ``dP = ∂/∂P of Σ d_mass · mass``.

    ``dP_ij = d_mass[region(i, j)] / n_rows`` on the allowed entries of the real rows.

    Parameters
    ----------
    d_mass : array_like, shape P.shape[:-2] + (3,), i.e. (..., H, 3)
        Cotangent of ``mass``: exactly its shape, finite.
    P : array_like
        As :func:`positional_bias`.
    mask, check_probabilities
        The forward's options, as :func:`positional_bias` (same defaults; ``mask``: True = real token).

    Returns
    -------
    MapGrads
        ``(dP,)``: float64, P's shape; 0 on masked entries and padded rows.
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    d = as_cotangent(d_mass, m.p.shape[:-2] + (3,), "d_mass")
    per_row = np.stack([row_mean_backward(d[..., r], m.rows) for r in range(3)], axis=-1)  # (..., Lq, 3)
    return MapGrads(masked_grad(m, np.einsum("...r,...jr->...j", per_row, _regions(m))))


def _self_minus_context(m):
    i, j = positions(m)
    return np.where(i == j, 1.0, -1.0)  # (Lq, Lk)


def self_context_balance(P, *, mask=None, check_probabilities=True):
    """``balance (...,)``: the mean over real rows of ``P_ii − Σ_{j≠i} P_ij``: +1 all on self, −1 all on
    context.

    In [−1, 1] for probability rows; 0 for a map without a real row.

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows, index i), ``Lk`` keys
    (index j); i and j are raw indices of the map, read through ``j − i`` only (left padding of a
    square map changes nothing).

    Parameters
    ----------
    P : array_like, shape (..., H, Lq, Lk) or (..., Lq, Lk)
        Attention maps, rows = queries; any real dtype (bfloat16 too), converted to float64, never
        mutated; finite.  Leading dims are batch dims.
    mask : array_like of bool, optional
        True = real token: a key-padding mask ``P.shape[:-3] + (Lk,)`` (per example, shared by its
        heads) or ``P.shape[:-2] + (Lk,)`` (per map), which with ``Lq = Lk`` also marks the padded
        query rows; or a bool mask broadcastable to P (True = the entry is kept; a row is real when it
        keeps some key).  Masked entries count as 0; padded rows are left out of every average.
        Default None: every token real.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the argument and the first offending row, with its sum and
        minimum) a map whose real rows are not probabilities: entries >= 0, each row summing to 1 over
        its allowed keys within 1e-6 (``n · eps`` of a coarser format such as float16, at most 1e-2).
        False: measure the map as it is (maps with sinks or dropout, known-good maps in a hot loop).

    Returns
    -------
    balance : ndarray of float64, shape P.shape[:-2], i.e. (..., H)

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    return row_mean((m.p * _self_minus_context(m)).sum(axis=-1), m.rows)


def self_context_balance_backward(d_balance, P, *, mask=None, check_probabilities=True):
    """Gradient of :func:`self_context_balance`: ``dP = ∂/∂P of Σ d_balance · balance``.

    ``dP_ij = ±d_balance / n_rows`` (+ on the diagonal, − elsewhere) on the allowed entries of
    the real rows.

    Parameters
    ----------
    d_balance : array_like, shape P.shape[:-2], i.e. (..., H)
        Cotangent of ``balance``: exactly its shape, finite.
    P : array_like
        As :func:`self_context_balance`.
    mask, check_probabilities
        The forward's options, as :func:`self_context_balance` (same defaults; ``mask``: True = real token).

    Returns
    -------
    MapGrads
        ``(dP,)``: float64, P's shape; 0 on masked entries and padded rows.
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    d = row_mean_backward(as_cotangent(d_balance, m.p.shape[:-2], "d_balance"), m.rows)
    return MapGrads(masked_grad(m, d[..., None] * _self_minus_context(m)))


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
