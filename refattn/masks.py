"""Boolean attention masks: True = query i may attend key j.

Every mask here is a plain ``bool`` array usable as ``mask=`` of
:func:`refattn.sdpa`.  Alignment of causal and window masks when ``lq != lk``
is explicit (``align="top_left"`` as PyTorch/JAX, ``"bottom_right"`` as
flash-attn); with offset ``o = 0`` resp. ``o = lk - lq``:

* causal: ``j <= i + o``
* window ``(left, right)``: ``i + o - left <= j <= i + o + right`` (``None`` = unbounded)

See ``specs/masks.md``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refattn._validate import RefAttnError, RefAttnTypeError, as_choice, as_flag, as_int, as_real, check_keywords_of

__all__ = ["ALIGNMENTS", "block", "causal", "dropout_mask", "from_lengths", "local", "strided", "varlen", "window"]

ALIGNMENTS = ("top_left", "bottom_right")


def alignment_offset(lq, lk, align, *, what="causal/window"):
    """Offset ``o`` added to the query index: 0 top-left, ``lk - lq`` bottom-right, or the int ``align``."""
    if align is None:
        if lq != lk:
            raise RefAttnError(
                f"align: {what} masking with lq={lq} != lk={lk} is ambiguous; pass "
                "align='top_left' (PyTorch, JAX), align='bottom_right' (flash-attn) or an int offset"
            )
        return 0
    if isinstance(align, str):
        as_choice(align, "align", ALIGNMENTS)
        return 0 if align == "top_left" else lk - lq
    return check_offset(align)


#: The largest ``|o|`` an integer ``align`` may have (larger offsets put every key on one side).
MAX_OFFSET = 2**40


def check_offset(align, name="align"):
    """An integer alignment offset ``o`` (query i sits at key position ``i + o``), ``|o| <= 2**40``."""
    o = as_int(align, name)
    if abs(o) > MAX_OFFSET:
        raise RefAttnError(f"{name}: expected an int offset with |o| <= 2**40, got {o}")
    return o


def check_window(window, name="window"):
    """Validate a window: an int ``w`` (``(w, w)``) or a pair ``(left, right)``, each side an int (of
    any sign and size: a negative side moves the band's edge past the diagonal; see
    :func:`clip_window`) or None (unbounded).  Returns a tuple."""
    if isinstance(window, (int, np.integer)) and not isinstance(window, (bool, np.bool_)):
        window = (window, window)
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise RefAttnError(f"{name}: expected an int w or a pair (left, right) of ints or None, got {window!r}")
    return tuple(None if w is None else as_int(w, f"{name}[{i}]") for i, w in enumerate(window))


def clip_window(window, lq, lk, offset_bound=0):
    """``(left, right)`` with each int side clipped to ``±(lq + lk + offset_bound)``: the offsets
    ``j − (i + o)`` lie strictly inside ``±(max(lq, lk) + |o|)``, so a wider side excludes nothing
    (the same mask as ``None``) and a more negative one excludes everything, as the clipped side
    does; index arithmetic on the clipped sides cannot overflow int64.  ``offset_bound`` bounds
    ``|o|``."""
    c = lq + lk + offset_bound
    return tuple(None if w is None else max(-c, min(w, c)) for w in window)


def band(lq, lk, offset, left, right):
    """bool (lq, lk): ``i + offset - left <= j <= i + offset + right`` (None = unbounded)."""
    d = np.arange(lk)[None, :] - (np.arange(lq)[:, None] + offset)  # (lq, lk): j - (i + o)
    keep = np.ones((lq, lk), dtype=bool)
    if right is not None:
        keep &= d <= right
    if left is not None:
        keep &= d >= -left
    return keep


def _check_lengths(lq, lk):
    return as_int(lq, "lq", minimum=0), as_int(lk, "lk", minimum=0)


def causal(lq, lk, *, align=None):
    """The causal mask: query i may attend key j iff ``j <= i + o``.

    Axes: ``lq`` queries (rows, i), ``lk`` keys (columns, j); ``o`` the alignment offset.

    Parameters
    ----------
    lq, lk : int
        Query and key lengths, >= 0.
    align : {"top_left", "bottom_right"}, optional
        ``"top_left"``: ``o = 0`` (PyTorch, JAX); ``"bottom_right"``: ``o = lk − lq``
        (flash-attn; the last query sees every key).  Default None: allowed only when
        ``lq == lk`` (``o = 0``); otherwise a RefAttnError, never a guess.

    Returns
    -------
    mask : ndarray of bool, shape (lq, lk)
        True = may attend; usable as ``mask=`` of :func:`refattn.sdpa` (or pass ``causal=True``).
    """
    lq, lk = _check_lengths(lq, lk)
    return band(lq, lk, alignment_offset(lq, lk, align, what="causal"), None, 0)


def window(lq, lk, left, right, *, align=None):
    """The sliding-window (local) mask: query i may attend key j iff
    ``i + o − left <= j <= i + o + right``.

    Axes: ``lq`` queries (rows, i), ``lk`` keys (columns, j); ``o`` the alignment offset.  The same
    band as ``sdpa(..., window=(left, right))``.

    Parameters
    ----------
    lq, lk : int
        Query and key lengths, >= 0.
    left, right : int or None
        Keys allowed before and after the diagonal ``j = i + o``: ints >= 0 (any size), or None
        for an unbounded side.  ``(left, 0)`` is flash-attn's causal local window.
    align : {"top_left", "bottom_right"}, optional
        ``o = 0`` or ``o = lk − lq``, as in :func:`causal`; default None, required when
        ``lq != lk``.

    Returns
    -------
    mask : ndarray of bool, shape (lq, lk)
        True = may attend.
    """
    lq, lk = _check_lengths(lq, lk)
    left, right = check_window((left, right))
    return band(lq, lk, alignment_offset(lq, lk, align, what="window"), left, right)


def structural(lq, lk, *, causal=False, window=None, align=None):
    """Intersection of the causal and window masks ``(lq, lk)``, or None when neither is asked."""
    causal = as_flag(causal, "causal")
    if window is not None:
        window = check_window(window)
    if not causal and window is None:
        return None
    what = " and ".join(w for w, on in (("causal", causal), ("window", window is not None)) if on)
    return causal_window_band(lq, lk, causal, window or (None, None), alignment_offset(lq, lk, align, what=what))


def causal_window_band(lq, lk, causal, window, offset):
    """bool ``(lq, lk)``: causal ∧ window at a known offset, or None when neither restricts."""
    left, right = window
    if causal:
        right = 0 if right is None else min(right, 0)
    if left is None and right is None:
        return None
    return band(lq, lk, offset, left, right)


class Sequences(NamedTuple):
    """The sequences of a padded batch as sdpa sees them: int64 arrays of the batch shape ``B...``.

    Sequence ``b`` has real queries ``0 <= i < q_lengths[b]`` and real keys ``k_starts[b] <= j <
    k_starts[b] + k_lengths[b]``; key positions count from its start, ``j' = j − k_starts[b]``, and
    query ``i`` sits at key position ``i + offsets[b]`` (the diagonal of causal, window and chunk).
    ``padded``: whether some query or key may be padding (lengths or starts were given).
    """

    q_lengths: np.ndarray
    k_starts: np.ndarray
    k_lengths: np.ndarray
    offsets: np.ndarray
    padded: bool


def _per_sequence(x, name, batch, low, high):
    """An integer option broadcast to the batch shape, each entry in ``[low, high]`` (``high`` may be
    an array of the batch shape)."""
    a = np.asarray(x)
    if a.dtype.kind not in "iu" or a.dtype == np.bool_:
        raise RefAttnTypeError(f"{name}: expected integers (one per sequence), got dtype {a.dtype}")
    try:
        a = np.broadcast_to(a.astype(np.int64), batch)
    except ValueError:
        raise RefAttnError(
            f"{name}: expected integers broadcastable to the batch shape {batch} (one per sequence), "
            f"got shape {a.shape}"
        ) from None
    bad = (a < low) | (a > high)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        hi = int(np.broadcast_to(high, batch)[at])
        raise RefAttnError(f"{name}: expected values in [{low}, {hi}], got {int(a[at])} at batch index {at}")
    return a


def sequences(batch, lq, lk, *, q_lengths=None, k_lengths=None, k_starts=None, align=None, what=None):
    """Validate sdpa's per-sequence options into :class:`Sequences` over the batch shape ``batch``.

    ``q_lengths`` in ``[0, lq]`` (default ``lq``), ``k_starts`` in ``[0, lk]`` (default 0),
    ``k_lengths`` in ``[0, lk − k_start]`` (default ``lk − k_start``), each broadcastable to
    ``batch``.  ``align``: ``"top_left"`` (o = 0), ``"bottom_right"`` (``o = k_length −
    q_length`` per sequence) or an int o.  ``what``: the structural options in force (e.g.
    ``"causal"``), or None when there are none (then the offset is not used and ``align`` may be
    left out); with ``align=None`` they need ``q_length == k_length`` in every sequence.
    """
    batch = tuple(batch)
    padded = not (q_lengths is None and k_lengths is None and k_starts is None)
    ql = np.full(batch, lq, np.int64) if q_lengths is None else _per_sequence(q_lengths, "q_lengths", batch, 0, lq)
    ks = np.zeros(batch, np.int64) if k_starts is None else _per_sequence(k_starts, "k_starts", batch, 0, lk)
    kl = lk - ks if k_lengths is None else _per_sequence(k_lengths, "k_lengths", batch, 0, lk - ks)
    if align is None:
        if what is not None and np.any(ql != kl):
            at = tuple(int(i) for i in np.argwhere(ql != kl)[0])
            got = f"lq={lq} != lk={lk}" if not padded else f"q_length {ql[at]} != k_length {kl[at]} at batch {at}"
            raise RefAttnError(
                f"align: {what} with {got} is ambiguous; pass align='top_left' (PyTorch, JAX), "
                "align='bottom_right' (flash-attn) or an int offset (query i at key position i + o)"
            )
        offsets = np.zeros(batch, np.int64)
    elif isinstance(align, str):
        as_choice(align, "align", ALIGNMENTS)
        offsets = np.zeros(batch, np.int64) if align == "top_left" else kl - ql
    else:
        offsets = np.full(batch, check_offset(align), np.int64)
    return Sequences(ql, ks, kl, offsets, padded)


def allowed_positions(lq, lk, seqs, *, causal=False, window=(None, None), chunk=None, sink_tokens=0):
    """Which keys each query may attend, sequence by sequence: bool ``(B..., 1, lq, lk)``, or None
    when nothing is disallowed.  The definition the kernels and twins follow (``specs/sdpa.md``).

    With ``j' = j − k_start``, ``o`` the sequence's offset and ``d = j' − (i + o)``, key j is allowed
    for query i iff: ``i < q_length`` and ``0 <= j' < k_length`` (real), ``d <= 0`` under causal,
    ``−left <= d <= right`` for the window's int sides (a key with ``j' < sink_tokens`` is exempt
    from the left side: StreamingLLM's attention sinks), and ``(i + o) // chunk == j' // chunk``
    (floor division) with a chunk.
    """
    left, right = window
    if not (seqs.padded or causal or left is not None or right is not None or chunk):
        return None
    nb = seqs.offsets.ndim
    per = (..., None, None, None)  # (B..., 1, 1, 1)
    i = np.arange(lq).reshape((1,) * nb + (1, lq, 1))
    jr = np.arange(lk).reshape((1,) * nb + (1, 1, lk)) - seqs.k_starts[per]  # j' = j - k_start
    pos = i + seqs.offsets[per]  # i + o
    keep = (i < seqs.q_lengths[per]) & (jr >= 0) & (jr < seqs.k_lengths[per])
    d = jr - pos
    if causal:
        keep = keep & (d <= 0)
    if right is not None:
        keep = keep & (d <= right)
    if left is not None:
        keep = keep & ((d >= -left) | (jr < sink_tokens))
    if chunk:
        keep = keep & (np.floor_divide(pos, chunk) == np.floor_divide(jr, chunk))
    return keep


def padded_queries(lq, seqs):
    """bool ``(B..., 1, lq)``: True where query row i is padding (``i >= q_length``), or None when no
    row is."""
    if not np.any(seqs.q_lengths < lq):
        return None
    return np.arange(lq) >= seqs.q_lengths[..., None, None]


def local(l, window_size):
    """A symmetric sliding window of size ``w``: query i may attend key j iff
    ``i − w//2 <= j <= i + w//2`` (Longformer-style local attention; ``w + 1`` keys for an even w).

    Parameters
    ----------
    l : int
        Sequence length (queries = keys), >= 0.
    window_size : int
        ``w`` >= 0; ``w // 2`` keys on each side of the diagonal.

    Returns
    -------
    mask : ndarray of bool, shape (l, l)
        True = may attend.
    """
    l, w = as_int(l, "l", minimum=0), as_int(window_size, "window_size", minimum=0)
    return band(l, l, 0, w // 2, w // 2)


def strided(l, stride):
    """A strided sparse pattern: query i may attend key j iff ``|i − j| <= 1`` or ``j`` is a
    multiple of ``stride`` (every query sees the strided "summary" columns, as in Sparse
    Transformers' fixed pattern).

    Parameters
    ----------
    l : int
        Sequence length (queries = keys), >= 0.
    stride : int
        Column period, >= 1.

    Returns
    -------
    mask : ndarray of bool, shape (l, l)
        True = may attend.
    """
    l, stride = as_int(l, "l", minimum=0), as_int(stride, "stride", minimum=1)
    j = np.arange(l)
    return band(l, l, 0, 1, 1) | (j % stride == 0)[None, :]


def block(l, block_size):
    """A block-diagonal mask: query i may attend key j iff ``i // b == j // b``, the same block of
    ``b = block_size`` consecutive positions (the last block may be shorter).

    Parameters
    ----------
    l : int
        Sequence length (queries = keys), >= 0.
    block_size : int
        ``b`` >= 1.

    Returns
    -------
    mask : ndarray of bool, shape (l, l)
        True = may attend.
    """
    l, b = as_int(l, "l", minimum=0), as_int(block_size, "block_size", minimum=1)
    ids = np.arange(l) // b
    return ids[:, None] == ids[None, :]


def _as_lengths(x, name, limit):
    a = np.asarray(x)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise RefAttnError(f"{name}: expected a 1-D integer array of lengths, got dtype {a.dtype} shape {a.shape}")
    if a.size and (a.min() < 0 or a.max() > limit):
        raise RefAttnError(f"{name}: expected lengths in [0, {limit}], got min {a.min()} max {a.max()}")
    return a.astype(np.int64)


def from_lengths(q_lengths, k_lengths, lq, lk):
    """A padding mask from sequence lengths: ``mask[b, i, j]`` is True iff ``i < q_lengths[b]`` and
    ``j < k_lengths[b]`` (sequences padded at the end).

    Axes: ``B`` batch items, ``lq`` queries (i), ``lk`` keys (j).  Padded query rows have no key:
    they are empty rows, whose result :func:`refattn.sdpa`'s ``empty_rows`` chooses (sdpa's own
    ``q_lengths=``/``k_lengths=`` options zero padded query rows instead).  For the heads axis of
    sdpa's scores insert it: ``from_lengths(...)[:, None]`` is ``(B, 1, lq, lk)``.

    Parameters
    ----------
    q_lengths : array_like of int, shape (B,), or None
        Real queries per item, each in ``[0, lq]``; None: every query is real.
    k_lengths : array_like of int, shape (B,), or None
        Real keys per item, each in ``[0, lk]``; None: every key is real.  At least one of the two
        is given (it sets B).
    lq, lk : int
        Padded query and key lengths, >= 0.

    Returns
    -------
    mask : ndarray of bool, shape (B, lq, lk)
        True = a real query may attend a real key.
    """
    lq, lk = _check_lengths(lq, lk)
    if q_lengths is None and k_lengths is None:
        raise RefAttnError("q_lengths, k_lengths: expected at least one (it sets the batch size B), got two Nones")
    ql = None if q_lengths is None else _as_lengths(q_lengths, "q_lengths", lq)
    kl = None if k_lengths is None else _as_lengths(k_lengths, "k_lengths", lk)
    ql = np.full(kl.shape, lq, dtype=np.int64) if ql is None else ql
    kl = np.full(ql.shape, lk, dtype=np.int64) if kl is None else kl
    if ql.shape != kl.shape:
        raise RefAttnError(f"q_lengths: expected shape {kl.shape} (as k_lengths), got {ql.shape}")
    qi = np.arange(lq)[None, :, None] < ql[:, None, None]  # (B, lq, 1)
    kj = np.arange(lk)[None, None, :] < kl[:, None, None]  # (B, 1, lk)
    return qi & kj


def _as_cu_seqlens(x, name):
    a = np.asarray(x)
    if a.ndim != 1 or a.size < 2 or a.dtype.kind not in "iu":
        raise RefAttnError(f"{name}: expected a 1-D integer array [0, n1, n1+n2, ...] of length >= 2, got {a!r}")
    a = a.astype(np.int64)
    if a[0] != 0 or np.any(np.diff(a) < 0):
        raise RefAttnError(f"{name}: expected non-decreasing cumulative lengths starting at 0, got {a.tolist()}")
    return a


def varlen(cu_seqlens_q, cu_seqlens_k, *, causal=False, window=None, align=None):
    """The mask of packed (variable-length) sequences: block-diagonal, a block per sequence.

    Sequence s owns queries ``cu_seqlens_q[s] <= i < cu_seqlens_q[s+1]`` and keys
    ``cu_seqlens_k[s] <= j < cu_seqlens_k[s+1]``; a query may attend only keys of its own
    sequence and, with ``causal``/``window``, only those allowed within that sequence, aligned
    with the sequence's own lengths (flash-attn's ``*_varlen_func`` semantics with
    ``align="bottom_right"``).  ``total_q = cu_seqlens_q[-1]``, ``total_k = cu_seqlens_k[-1]``;
    use it on q, k, v packed as one batch item, ``(1, H, total_q, D)``.

    Parameters
    ----------
    cu_seqlens_q, cu_seqlens_k : array_like of int, shape (S + 1,)
        Cumulative lengths ``[0, n_1, n_1 + n_2, ...]`` of the S sequences' queries and keys:
        non-decreasing, starting at 0, the same number of entries.
    causal : bool, default False
        Causal within each sequence (:func:`causal`).
    window : (int or None, int or None), optional
        ``(left, right)`` within each sequence (:func:`window`).  Default None: no window.
    align : {"top_left", "bottom_right"}, optional
        The alignment within each sequence, as in :func:`causal`.  Default None: required by
        causal/window as soon as a sequence has a different number of queries and keys.

    Returns
    -------
    mask : ndarray of bool, shape (total_q, total_k)
        True = may attend.
    """
    cq = _as_cu_seqlens(cu_seqlens_q, "cu_seqlens_q")
    ck = _as_cu_seqlens(cu_seqlens_k, "cu_seqlens_k")
    if cq.size != ck.size:
        raise RefAttnError(f"cu_seqlens_k: expected {cq.size} entries (as cu_seqlens_q), got {ck.size}")
    out = np.zeros((int(cq[-1]), int(ck[-1])), dtype=bool)
    for s in range(cq.size - 1):
        lq, lk = int(cq[s + 1] - cq[s]), int(ck[s + 1] - ck[s])
        block = structural(lq, lk, causal=causal, window=window, align=align)
        out[cq[s] : cq[s + 1], ck[s] : ck[s + 1]] = True if block is None else block
    return out


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(z):
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def dropout_mask(shape, p, seed):
    """A reproducible dropout keep-mask, counter-based: True with probability ``1 − p``.

    The element of C-order flat index n is kept iff ``u_n >= p``, where
    ``u_n = (splitmix64(seed·φ + n + 1) >> 11) · 2⁻⁵³`` (φ = 0x9E3779B97F4A7C15, all arithmetic
    mod 2⁶⁴).  The same (shape, p, seed) gives the same mask on every platform and NumPy version,
    and any element can be computed alone (a kernel can regenerate it).  Pass it as
    ``dropout_mask=`` of :func:`refattn.sdpa` with ``dropout_p=p``.

    Parameters
    ----------
    shape : int or tuple of int
        The mask's shape, each dim >= 0; usually sdpa's scores ``(..., Hq, Lq, Lk)``.
    p : float
        Dropout probability in [0, 1).
    seed : int
        In ``[0, 2**64)``.

    Returns
    -------
    keep : ndarray of bool, shape ``shape``
        True = keep.
    """
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    shape = tuple(as_int(n, "shape", minimum=0) for n in shape)
    p = as_real(p, "p", allow_none=False)
    if not 0.0 <= p < 1.0:
        raise RefAttnError(f"p: expected a dropout probability in [0, 1), got {p}")
    seed = as_int(seed, "seed", minimum=0)
    if seed >= 2**64:
        raise RefAttnError(f"seed: expected an integer < 2**64, got {seed}")
    n = np.arange(int(np.prod(shape, dtype=np.int64)), dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = _splitmix64(np.uint64(seed) * _GOLDEN + n + np.uint64(1))
    u = (z >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return (u >= p).reshape(shape)


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
