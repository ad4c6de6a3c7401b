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

import numpy as np

from refattn._validate import RefAttnError, as_choice, as_flag, as_int, as_real

__all__ = ["ALIGNMENTS", "block", "causal", "dropout_mask", "from_lengths", "local", "strided", "varlen", "window"]

ALIGNMENTS = ("top_left", "bottom_right")


def alignment_offset(lq, lk, align, *, what="causal/window"):
    """Offset ``o`` added to the query index (0 top-left, ``lk - lq`` bottom-right)."""
    if align is None:
        if lq != lk:
            raise RefAttnError(
                f"align: {what} masking with lq={lq} != lk={lk} is ambiguous; pass "
                "align='top_left' (PyTorch, JAX) or align='bottom_right' (flash-attn)"
            )
        return 0
    as_choice(align, "align", ALIGNMENTS)
    return 0 if align == "top_left" else lk - lq


def check_window(window, name="window"):
    """Validate ``(left, right)``; each an int >= 0 (of any size: see :func:`clip_window`) or None.
    Returns a tuple."""
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise RefAttnError(f"{name}: expected a pair (left, right) of ints >= 0 or None, got {window!r}")
    return tuple(None if w is None else as_int(w, f"{name}[{i}]", minimum=0) for i, w in enumerate(window))


def clip_window(window, lq, lk):
    """``(left, right)`` with each int side clipped to ``lq + lk``: the offsets ``j - (i + o)`` of
    either alignment lie strictly inside ``±max(lq, lk)``, so a wider side excludes nothing (the same
    mask as ``None``), and index arithmetic on the clipped sides cannot overflow int64."""
    return tuple(None if w is None else min(w, lq + lk) for w in window)


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
    """bool ``(lq, lk)``: ``j <= i + o``."""
    lq, lk = _check_lengths(lq, lk)
    return band(lq, lk, alignment_offset(lq, lk, align, what="causal"), None, 0)


def window(lq, lk, left, right, *, align=None):
    """bool ``(lq, lk)``: ``i + o - left <= j <= i + o + right``; ``None`` = unbounded side."""
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


def local(l, window_size):
    """bool ``(l, l)``: ``i − w//2 <= j <= i + w//2`` (sliding window of size ``w``)."""
    l, w = as_int(l, "l", minimum=0), as_int(window_size, "window_size", minimum=0)
    return band(l, l, 0, w // 2, w // 2)


def strided(l, stride):
    """bool ``(l, l)``: ``j ∈ {i − 1, i, i + 1}`` or ``j`` a multiple of ``stride``."""
    l, stride = as_int(l, "l", minimum=0), as_int(stride, "stride", minimum=1)
    j = np.arange(l)
    return band(l, l, 0, 1, 1) | (j % stride == 0)[None, :]


def block(l, block_size):
    """bool ``(l, l)``: query and key in the same block of ``block_size`` positions."""
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
    """Padding mask ``(B, lq, lk)``: True iff ``i < q_lengths[b]`` and ``j < k_lengths[b]``.

    ``q_lengths=None`` keeps every query.  Padded query rows are empty rows
    (see ``empty_rows``).  For heads, insert the axis: ``from_lengths(...)[:, None]``.
    """
    lq, lk = _check_lengths(lq, lk)
    kl = _as_lengths(k_lengths, "k_lengths", lk)
    ql = np.full(kl.shape, lq, dtype=np.int64) if q_lengths is None else _as_lengths(q_lengths, "q_lengths", lq)
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
    """Block-diagonal mask ``(total_q, total_k)`` for packed sequences.

    Sequence s owns queries ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` and keys
    ``cu_seqlens_k[s]:cu_seqlens_k[s+1]``; ``causal``/``window`` apply within
    each sequence with its own alignment (flash-attn's varlen semantics when
    ``align="bottom_right"``).
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
    """Counter-based keep-mask of ``shape``: True with probability ``1 - p``.

    Element with C-order flat index n keeps iff ``u_n >= p`` where
    ``u_n = (splitmix64(seed·φ + n + 1) >> 11) · 2⁻⁵³`` (φ = 0x9E3779B97F4A7C15,
    all arithmetic mod 2⁶⁴).  The same (shape, p, seed) gives the same mask on
    every platform and NumPy version; any element can be computed alone.
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
