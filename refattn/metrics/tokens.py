"""Token-level metrics: attention received/given, top tokens, attention to given positions
(Clark et al. 2019), function-word ratio, allocation efficiency, special-token bias.

``P (..., H, Lq, Lk)``.  Key sets (``positions``, ``important``, ``special_positions``) are either
integer key indices (shared by every map) or bool masks over keys — ``P.shape[:-3] + (Lk,)`` or
``P.shape[:-2] + (Lk,)`` for per-example sets (True = the key is in the set).  ``mask``: True = real
token (a key-padding mask, or a bool mask broadcastable to P, True = kept).  Each backward takes the
cotangent ``d_<output>`` of the output its forward names and returns
:class:`~refattn.metrics.MapGrads` ``(dP)``.  ``check_probabilities``: refuse maps whose real rows
are not probabilities.
"""

from __future__ import annotations

import numpy as np

from refattn._validate import RefAttnError, as_cotangent, as_int, as_real, check_keywords_of
from refattn.metrics._maps import MapGrads, attention_map, key_counts, masked_grad, row_mean, row_mean_backward

__all__ = [
    "FUNCTION_WORDS",
    "allocation_efficiency",
    "allocation_efficiency_backward",
    "attention_given",
    "attention_given_backward",
    "attention_received",
    "attention_received_backward",
    "attention_to",
    "attention_to_backward",
    "function_word_ratio",
    "function_word_ratio_backward",
    "key_set",
    "special_token_bias",
    "top_tokens",
]

#: The default function words of :func:`function_word_ratio` (English, lower case).
FUNCTION_WORDS = frozenset(
    "a an the and or but nor so yet if then than that this these those of in on at by for with about against "
    "between into through during before after above below to from up down over under again further once is am "
    "are was were be been being have has had do does did not no it its he she they them his her their we us our "
    "you your i me my as which who whom whose what there here".split()
)


def key_set(keys, shape, *, name="positions"):
    """A 0/1 float weight over the keys, broadcastable to a map of ``shape (..., Lq, Lk)``.

    What the token metrics make of their key sets (``positions``, ``important``,
    ``special_positions``): 1 on the keys in the set, 0 elsewhere.

    Parameters
    ----------
    keys : array_like of int, or array_like of bool
        Key indices (a 1-D list; ``-Lk <= j < Lk``, negative ones counted from the end), or a bool
        mask over the keys, True = the key is in the set, of shape ``(Lk,)``, ``shape[:-3] + (Lk,)``
        or ``shape[:-2] + (Lk,)``.
    shape : tuple of int
        The shape of the maps ``(..., Lq, Lk)`` the weight is for.
    name : str, default "positions"
        The argument's name in error messages.

    Returns
    -------
    weight : ndarray of float64
        ``(Lk,)`` for indices, ``shape[:-3] + (1, 1, Lk)`` or ``shape[:-2] + (1, Lk)`` for a mask:
        broadcastable to ``shape``.

    Raises
    ------
    RefAttnError
        Indices out of range, a non-integer non-bool dtype, or a mask of another shape.
    """
    lk = shape[-1]
    a = np.asarray(keys)
    if a.dtype == bool:
        if len(shape) >= 3 and a.shape == tuple(shape[:-3]) + (lk,):
            return a[..., None, None, :].astype(np.float64)
        if a.shape == tuple(shape[:-2]) + (lk,) or a.shape == (lk,):
            return a[..., None, :].astype(np.float64)
        raise RefAttnError(f"{name}: expected key indices or a bool mask over the {lk} keys, got shape {a.shape}")
    if a.dtype.kind not in "iu" or a.ndim > 1:
        raise RefAttnError(f"{name}: expected a 1-D list of key indices or a bool mask, got dtype {a.dtype} {a.shape}")
    if a.size and (a.min() < -lk or a.max() >= lk):
        raise RefAttnError(f"{name}: expected key indices in [0, {lk}), got {a.tolist()}")
    w = np.zeros(lk)
    w[a % lk] = 1.0
    return w


def attention_received(P, *, mask=None, check_probabilities=True):
    """``received (..., Lk)``: the mean over real query rows of ``P_ij`` for each key (``mask``: True = real
    token).

    ``received_j = Σ_i P_ij / n_rows`` over the real rows i; 0 on masked keys.

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows), ``Lk`` keys.

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
    received : ndarray of float64, shape P.shape[:-2] + (Lk,), i.e. (..., H, Lk)

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    count = np.maximum(m.rows.sum(axis=-1), 1)[..., None]
    return m.p.sum(axis=-2) / count


def attention_received_backward(d_received, P, *, mask=None, check_probabilities=True):
    """Gradient of :func:`attention_received`: ``dP = ∂/∂P of Σ d_received · received``.

    ``dP_ij = d_received_j / n_rows`` on the allowed entries of the real rows.

    Parameters
    ----------
    d_received : array_like, shape P.shape[:-2] + (Lk,), i.e. (..., H, Lk)
        Cotangent of ``received``: exactly its shape, finite.
    P : array_like
        As :func:`attention_received`.
    mask, check_probabilities
        The forward's options, as :func:`attention_received` (same defaults; ``mask``: True = real token).

    Returns
    -------
    MapGrads
        ``(dP,)``: float64, P's shape; 0 on masked entries and padded rows.
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    d = as_cotangent(d_received, m.p.shape[:-2] + m.p.shape[-1:], "d_received")
    count = np.maximum(m.rows.sum(axis=-1), 1)[..., None, None]
    return MapGrads(masked_grad(m, d[..., None, :] / count))


def attention_given(P, *, mask=None, check_probabilities=True):
    """``given (..., Lq)``: the row mass ``Σ_j P_ij`` over allowed keys (1 for a normalised row; less with
    sinks).

    0 on padded rows; a measure of the mass a map with sinks or dropout leaves out (with
    ``check_probabilities=False``).

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows), ``Lk`` keys.

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
    given : ndarray of float64, shape P.shape[:-1], i.e. (..., Lq)

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    return attention_map(P, mask, check_probabilities=check_probabilities).p.sum(axis=-1)


def attention_given_backward(d_given, P, *, mask=None, check_probabilities=True):
    """Gradient of :func:`attention_given`: ``dP = ∂/∂P of Σ d_given · given``.

    ``dP_ij = d_given_i`` on the allowed entries.

    Parameters
    ----------
    d_given : array_like, shape P.shape[:-1], i.e. (..., Lq)
        Cotangent of ``given``: exactly its shape, finite.
    P : array_like
        As :func:`attention_given`.
    mask, check_probabilities
        The forward's options, as :func:`attention_given` (same defaults; ``mask``: True = real token).

    Returns
    -------
    MapGrads
        ``(dP,)``: float64, P's shape; 0 on masked entries and padded rows.
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    d = as_cotangent(d_given, m.p.shape[:-1], "d_given")
    return MapGrads(masked_grad(m, d[..., None]))


def top_tokens(P, *, k, mask=None, check_probabilities=True):
    """``indices (..., k)`` of the ``k`` keys receiving the most attention (ties: lower index; masked keys
    last).

    Keys ranked by :func:`attention_received`, highest first; keys that are no real token come
    after every real one.  Not differentiable (no backward).

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows), ``Lk`` keys.

    Parameters
    ----------
    P : array_like, shape (..., H, Lq, Lk) or (..., Lq, Lk)
        Attention maps, rows = queries; any real dtype (bfloat16 too), converted to float64, never
        mutated; finite.  Leading dims are batch dims.
    k : int
        How many keys: ``1 <= k <= Lk``.
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
    indices : ndarray of int64, shape P.shape[:-2] + (k,), i.e. (..., H, k)
        Key indices in the map's coordinates (shifted by any left padding).

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    k = as_int(k, "k", minimum=1)
    if k > m.p.shape[-1]:
        raise RefAttnError(f"k: expected at most Lk={m.p.shape[-1]}, got {k}")
    received = attention_received(m.p, mask=m.allowed, check_probabilities=False)
    real = m.allowed.any(axis=-2)
    return np.argsort(-np.where(real, received, -np.inf), axis=-1, kind="stable")[..., :k]


def attention_to(P, positions, *, mask=None, check_probabilities=True):
    """``mass (...,)``: the mean over real rows of the mass on the keys in ``positions``.

    ``mass = mean_i Σ_{j ∈ positions} P_ij`` over the real rows: Clark et al. 2019's attention to
    [CLS], [SEP] or punctuation.

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows), ``Lk`` keys.

    Parameters
    ----------
    P : array_like, shape (..., H, Lq, Lk) or (..., Lq, Lk)
        Attention maps, rows = queries; any real dtype (bfloat16 too), converted to float64, never
        mutated; finite.  Leading dims are batch dims.
    positions : array_like of int, or array_like of bool
        The keys.
        Key indices (a 1-D list shared by every map; ``-Lk <= j < Lk``, negative ones counted from
        the end), or a bool mask over the keys, True = the key is in the set, of shape
        ``(Lk,)``, ``P.shape[:-3] + (Lk,)`` (per example) or ``P.shape[:-2] + (Lk,)`` (per map).
        Indices are in the map's coordinates (padded positions included).
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
    w = key_set(positions, m.p.shape)
    return row_mean((m.p * w).sum(axis=-1), m.rows)


def attention_to_backward(d_mass, P, positions, *, mask=None, check_probabilities=True):
    """Gradient of :func:`attention_to`: ``dP = ∂/∂P of Σ d_mass · mass``.

    ``dP_ij = d_mass / n_rows`` for the keys j in ``positions``, on the allowed entries of the
    real rows.

    Parameters
    ----------
    d_mass : array_like, shape P.shape[:-2], i.e. (..., H)
        Cotangent of ``mass``: exactly its shape, finite.
    P, positions
        As :func:`attention_to`.
    mask, check_probabilities
        The forward's options, as :func:`attention_to` (same defaults; ``mask``: True = real token).

    Returns
    -------
    MapGrads
        ``(dP,)``: float64, P's shape; 0 on masked entries and padded rows.
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    w = key_set(positions, m.p.shape)
    d = row_mean_backward(as_cotangent(d_mass, m.p.shape[:-2], "d_mass"), m.rows)
    return MapGrads(masked_grad(m, d[..., None] * w))


def _share(m, w):
    """Per row: share of the row's mass on the weighted keys, and the row mass."""
    mass = m.p.sum(axis=-1)
    on = (m.p * w).sum(axis=-1)
    return np.where(mass > 0, on / np.where(mass > 0, mass, 1.0), 0.0), on, mass


def _share_backward(d_share, m, w, name):
    _, on, mass = _share(m, w)
    d = row_mean_backward(as_cotangent(d_share, m.p.shape[:-2], name), m.rows & (mass > 0))
    safe = np.where(mass > 0, mass, 1.0)[..., None]
    return MapGrads(masked_grad(m, d[..., None] * (w * safe - on[..., None]) / safe**2))


def _function_word_set(P_shape, tokens, function_words):
    words = np.asarray(tokens, dtype=object)
    lk = P_shape[-1]
    if words.shape[-1:] != (lk,):
        raise RefAttnError(f"tokens: expected the {lk} key tokens (..., Lk), got shape {words.shape}")
    vocab = {str(w).lower() for w in function_words}
    is_fw = np.vectorize(lambda t: str(t).lower() in vocab, otypes=[bool])(words)
    return key_set(is_fw, P_shape, name="tokens")


def function_word_ratio(P, tokens, *, function_words=FUNCTION_WORDS, mask=None, check_probabilities=True):
    """``ratio (...,)``: the mean over real rows of the share of mass on function-word keys.

    ``ratio = mean_i (Σ_{j: tokens[j] a function word} P_ij / Σ_j P_ij)`` over the real rows with
    mass; words are compared case-insensitively.

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows), ``Lk`` keys.

    Parameters
    ----------
    P : array_like, shape (..., H, Lq, Lk) or (..., Lq, Lk)
        Attention maps, rows = queries; any real dtype (bfloat16 too), converted to float64, never
        mutated; finite.  Leading dims are batch dims.
    tokens : array_like of str, shape (Lk,), P.shape[:-3] + (Lk,) or P.shape[:-2] + (Lk,)
        The word at each key position (pads included, ignored); non-strings are compared as
        ``str(token)``.
    function_words : collection of str, default FUNCTION_WORDS
        The function words (compared case-insensitively); the default, :data:`FUNCTION_WORDS`, is a
        list of 83 English determiners, pronouns, prepositions, conjunctions and auxiliaries.
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
    ratio : ndarray of float64, shape P.shape[:-2], i.e. (..., H)

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    share, _, mass = _share(m, _function_word_set(m.p.shape, tokens, function_words))
    return row_mean(share, m.rows & (mass > 0))


def function_word_ratio_backward(
    d_ratio, P, tokens, *, function_words=FUNCTION_WORDS, mask=None, check_probabilities=True
):
    """Gradient of :func:`function_word_ratio`: ``dP = ∂/∂P of Σ d_ratio · ratio``.

    The share ``s_i = on_i / mass_i``, ``on_i = Σ_j w_j P_ij``, ``mass_i = Σ_j P_ij``, gives
    ``dP_ij = d_ratio (w_j mass_i − on_i) / (mass_i² n_rows)`` on the allowed entries of the real rows
    with ``mass_i > 0`` (``n_rows`` of them).
    ``w`` is 1 on function-word keys.

    Parameters
    ----------
    d_ratio : array_like, shape P.shape[:-2], i.e. (..., H)
        Cotangent of ``ratio``: exactly its shape, finite.
    P, tokens
        As :func:`function_word_ratio`.
    function_words, mask, check_probabilities
        The forward's options, as :func:`function_word_ratio` (same defaults; ``mask``: True = real token).

    Returns
    -------
    MapGrads
        ``(dP,)``: float64, P's shape; 0 on masked entries and padded rows.
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    return _share_backward(d_ratio, m, _function_word_set(m.p.shape, tokens, function_words), "d_ratio")


def allocation_efficiency(P, important, *, mask=None, check_probabilities=True):
    """``efficiency (...,)``: the mean over real rows of the share of mass that lands on the ``important``
    keys.

    ``efficiency = mean_i (Σ_{j ∈ important} P_ij / Σ_j P_ij)`` over the real rows with mass; in
    [0, 1].

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows), ``Lk`` keys.

    Parameters
    ----------
    P : array_like, shape (..., H, Lq, Lk) or (..., Lq, Lk)
        Attention maps, rows = queries; any real dtype (bfloat16 too), converted to float64, never
        mutated; finite.  Leading dims are batch dims.
    important : array_like of int, or array_like of bool
        The important keys.
        Key indices (a 1-D list shared by every map; ``-Lk <= j < Lk``, negative ones counted from
        the end), or a bool mask over the keys, True = the key is in the set, of shape
        ``(Lk,)``, ``P.shape[:-3] + (Lk,)`` (per example) or ``P.shape[:-2] + (Lk,)`` (per map).
        Indices are in the map's coordinates (padded positions included).
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
    efficiency : ndarray of float64, shape P.shape[:-2], i.e. (..., H)

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    share, _, mass = _share(m, key_set(important, m.p.shape, name="important"))
    return row_mean(share, m.rows & (mass > 0))


def allocation_efficiency_backward(d_efficiency, P, important, *, mask=None, check_probabilities=True):
    """Gradient of :func:`allocation_efficiency`: ``dP = ∂/∂P of Σ d_efficiency · efficiency``.

    The share ``s_i = on_i / mass_i``, ``on_i = Σ_j w_j P_ij``, ``mass_i = Σ_j P_ij``, gives
    ``dP_ij = d_efficiency (w_j mass_i − on_i) / (mass_i² n_rows)`` on the allowed entries of the real rows
    with ``mass_i > 0`` (``n_rows`` of them).
    ``w`` is 1 on the important keys.

    Parameters
    ----------
    d_efficiency : array_like, shape P.shape[:-2], i.e. (..., H)
        Cotangent of ``efficiency``: exactly its shape, finite.
    P, important
        As :func:`allocation_efficiency`.
    mask, check_probabilities
        The forward's options, as :func:`allocation_efficiency` (same defaults; ``mask``: True = real token).

    Returns
    -------
    MapGrads
        ``(dP,)``: float64, P's shape; 0 on masked entries and padded rows.
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    return _share_backward(d_efficiency, m, key_set(important, m.p.shape, name="important"), "d_efficiency")


def special_token_bias(P, special_positions, *, factor=2, mask=None, check_probabilities=True):
    """Heads ``biased (...,)`` (bool) giving special tokens more than ``factor`` × their uniform share.

    ``biased = attention_to(P, special_positions) > factor · mean_i |S ∩ A_i| / n_i``, ``A_i`` the
    allowed keys of row i (``n_i`` of them): more attention on the special keys S than ``factor``
    times what a uniform row would give them.  Not differentiable (no backward).

    Axes: ``...`` batch dims, ``H`` heads (optional), ``Lq`` queries (rows), ``Lk`` keys.

    Parameters
    ----------
    P : array_like, shape (..., H, Lq, Lk) or (..., Lq, Lk)
        Attention maps, rows = queries; any real dtype (bfloat16 too), converted to float64, never
        mutated; finite.  Leading dims are batch dims.
    special_positions : array_like of int, or array_like of bool
        The special keys ([CLS], [SEP], BOS, ...).
        Key indices (a 1-D list shared by every map; ``-Lk <= j < Lk``, negative ones counted from
        the end), or a bool mask over the keys, True = the key is in the set, of shape
        ``(Lk,)``, ``P.shape[:-3] + (Lk,)`` (per example) or ``P.shape[:-2] + (Lk,)`` (per map).
        Indices are in the map's coordinates (padded positions included).
    factor : float, default 2
        How many times the uniform share counts as biased.
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
    biased : ndarray of bool, shape P.shape[:-2], i.e. (..., H)

    Raises
    ------
    RefAttnError
        A bad shape or value, named in the message, or rows that are not probabilities
        (``RefAttnTypeError`` for a wrong type, such as a non-bool mask).
    """
    m = attention_map(P, mask, check_probabilities=check_probabilities)
    factor = as_real(factor, "factor", allow_none=False)
    w = key_set(special_positions, m.p.shape, name="special_positions")
    uniform = (np.broadcast_to(w, m.p.shape) * m.allowed).sum(axis=-1) / np.maximum(key_counts(m), 1)
    to = attention_to(m.p, special_positions, mask=m.allowed, check_probabilities=False)
    return to > factor * row_mean(uniform, m.rows)


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
