"""Position encodings: RoPE (half-rotation and interleaved), ALiBi, sinusoidal.

Relative-position attention (Shaw et al.) lives in ``relative.py``.

* ``rope(x (..., L, D), positions (L,) | (..., L))`` rotates pairs of the first
  ``r = rotary_dim or D`` dims by ``positions · base^(−2i/r)``, i < r/2;
  ``style="half"`` pairs ``(x[i], x[i + r/2])`` (GPT-NeoX, Llama),
  ``style="interleaved"`` pairs ``(x[2i], x[2i+1])`` (GPT-J, RoFormer).
* ``alibi_slopes(H) (H,)``, ``alibi_bias(slopes (..., H), lq, lk) (..., H, lq, lk)``.
* ``sinusoidal_positions(length, dim) (length, dim)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from refattn import masks as _masks
from refattn._validate import RefAttnError, as_choice, as_cotangent, as_float, as_int, as_real, check_keywords_of

__all__ = ["RopeGrads", "alibi_bias", "alibi_slopes", "rope", "rope_backward", "sinusoidal_positions"]

ROPE_STYLES = ("half", "interleaved")


class RopeGrads(NamedTuple):
    """Gradient of :func:`rope` (returned by :func:`rope_backward`).

    Fields
    ------
    dx : ndarray of float64, shape of ``x`` (..., L, D)
        Summed over the dims along which ``x`` was broadcast against ``positions``.
    """

    dx: np.ndarray


def _rope_setup(x, positions, base, style, rotary_dim):
    x = as_float(x, "x", ndim_min=2)
    length, d = x.shape[-2:]
    as_choice(style, "style", ROPE_STYLES)
    base = as_real(base, "base", positive=True, allow_none=False)
    r = d if rotary_dim is None else as_int(rotary_dim, "rotary_dim", minimum=0)
    if r > d or r % 2:
        raise RefAttnError(f"rotary_dim: expected an even number <= D={d}, got {r}")
    if positions is None:
        pos = np.arange(length, dtype=np.float64)
    else:
        pos = as_float(positions, "positions")
        if pos.ndim == 0 or pos.shape[-1] != length:
            raise RefAttnError(f"positions: expected shape (L,) or (..., L) with L={length}, got {pos.shape}")
    inv_freq = base ** (-np.arange(0, r, 2, dtype=np.float64) / r)  # (r/2,)
    theta = pos[..., None] * inv_freq  # (..., L, r/2)
    return x, r, np.cos(theta), np.sin(theta)


def _pairs(x, r, style):
    """The two halves of every rotated pair: (..., L, r/2) each."""
    if style == "half":
        return x[..., : r // 2], x[..., r // 2 : r]
    return x[..., 0:r:2], x[..., 1:r:2]


def _assemble(x, y1, y2, r, style):
    out = np.array(np.broadcast_to(x, np.broadcast_shapes(x.shape, y1.shape[:-1] + x.shape[-1:])), copy=True)
    if style == "half":
        out[..., : r // 2], out[..., r // 2 : r] = y1, y2
    else:
        out[..., 0:r:2], out[..., 1:r:2] = y1, y2
    return out


def rope(x, positions=None, *, base=10000.0, style="half", rotary_dim=None):
    """Rotary position embedding (RoPE, Su et al.): each pair of the first ``r`` dims of ``x`` at
    position p is rotated by the angle ``θ_{p,i} = p · base^(−2i/r)``, ``i < r/2``.

    ``(y₁, y₂) = (x₁ cos θ − x₂ sin θ, x₂ cos θ + x₁ sin θ)`` for every pair ``(x₁, x₂)``; dims
    ``>= r`` pass through unchanged.  Axes: ``...`` batch (and heads), ``L`` positions, ``D`` head
    dim.  Apply it to q and k before :func:`refattn.sdpa`.

    Parameters
    ----------
    x : array_like, shape (..., L, D)
        The vectors to rotate (float64 after conversion; finite), at least 2-D.
    positions : array_like, shape (L,) or (..., L), optional
        Position of each row (any real, e.g. offset for a KV cache); broadcast against ``x``'s
        leading dims.  Default None: ``0, 1, ..., L − 1``.
    base : float, default 10000.0
        The frequency base θ (Llama 3 uses 500000), > 0.
    style : {"half", "interleaved"}, default "half"
        Which dims pair up: ``"half"``, ``(x[i], x[i + r/2])`` (rotate-half: GPT-NeoX, Llama,
        Hugging Face); ``"interleaved"``, ``(x[2i], x[2i + 1])`` (GPT-J, RoFormer, Meta's Llama
        reference).
    rotary_dim : int, optional
        ``r``: how many leading dims rotate (partial rotary, as GPT-NeoX's ``rotary_pct``); even,
        ``<= D``.  Default None: ``r = D``.

    Returns
    -------
    y : ndarray of float64, shape (..., L, D)
        The broadcast of ``x``'s shape with ``positions``' leading dims.
    """
    x, r, cos, sin = _rope_setup(x, positions, base, style, rotary_dim)
    x1, x2 = _pairs(x, r, style)  # (..., L, r/2)
    return _assemble(x, x1 * cos - x2 * sin, x2 * cos + x1 * sin, r, style)


def rope_backward(d_y, x, positions=None, *, base=10000.0, style="half", rotary_dim=None):
    """Gradient of :func:`rope`: ``dx = Rᵀ d_y``, the inverse rotation (by ``−θ``) of the cotangent,
    summed over the dims along which ``x`` was broadcast.  ``positions`` is not differentiated.

    Parameters
    ----------
    d_y : array_like, shape (..., L, D)
        Cotangent of :func:`rope`'s output: exactly its shape, finite.
    x : array_like, shape (..., L, D)
        The forward's input.
    positions, base, style, rotary_dim
        The forward's options, as :func:`rope` (same defaults).

    Returns
    -------
    RopeGrads
        ``(dx,)``, float64, of ``x``'s shape.
    """
    x, r, cos, sin = _rope_setup(x, positions, base, style, rotary_dim)
    out_shape = np.broadcast_shapes(x.shape, cos.shape[:-1] + x.shape[-1:])
    d_y = as_cotangent(d_y, out_shape, "d_y")
    d1, d2 = _pairs(d_y, r, style)  # (..., L, r/2)
    dx = _assemble(d_y, d1 * cos + d2 * sin, d2 * cos - d1 * sin, r, style)
    extra = dx.ndim - x.ndim
    dx = dx.sum(axis=tuple(range(extra))) if extra else dx
    axes = tuple(i for i, n in enumerate(x.shape) if n == 1 and dx.shape[i] != 1)
    return RopeGrads(dx.sum(axis=axes, keepdims=True) if axes else dx)


def alibi_slopes(num_heads):
    """The ALiBi head slopes (Press et al.): ``2^(−8i/H)``, ``i = 1..H``, for H a power of two;
    otherwise the slopes of the nearest lower power of two m followed by every other slope of 2m
    (the authors' reference code).

    Parameters
    ----------
    num_heads : int
        ``H`` >= 1.

    Returns
    -------
    slopes : ndarray of float64, shape (H,)
        In (0, 1), decreasing for a power of two; feed them to :func:`alibi_bias`.
    """
    n = as_int(num_heads, "num_heads", minimum=1)

    def power_of_two(m):
        return [2.0 ** (-8.0 * i / m) for i in range(1, m + 1)]

    m = 2 ** int(math.floor(math.log2(n)))
    slopes = power_of_two(m)
    if m != n:
        slopes += power_of_two(2 * m)[0::2][: n - m]
    return np.array(slopes)


ALIBI_STYLES = ("abs", "signed")


def alibi_bias(slopes, lq, lk, *, style="abs", align=None, q_lengths=None, k_lengths=None, k_starts=None):
    """The ALiBi bias: a penalty linear in the query-key distance, one slope per head.

    ``bias[..., h, i, j] = −slope_h · |i + o − j'|`` (``style="abs"``, flash-attn's
    ``alibi_slopes``) or ``slope_h · (j' − i − o)`` (``"signed"``, cuDNN; the two agree on causal
    keys ``j' <= i + o``), with ``j' = j − k_start`` and ``o`` the alignment offset of each
    sequence, as :func:`refattn.sdpa` aligns causal and windows.  Axes: ``...`` batch, ``H`` heads,
    ``lq`` queries (i), ``lk`` keys (j).  Pass it as ``bias=`` of :func:`refattn.sdpa` with the same
    ``align``, lengths and starts: on a padded batch flash-attn's ``attn_bias_from_alibi_slopes``
    measures the distance with each sequence's real lengths (``sk − sq``) and its ``key_leftpad``.

    Parameters
    ----------
    slopes : array_like, shape (..., H)
        Per-head slopes (:func:`alibi_slopes`), at least 1-D.
    lq, lk : int
        Query and key lengths, >= 0.
    style : {"abs", "signed"}, default "abs"
        The distance: absolute (symmetric) or signed.
    align : {"top_left", "bottom_right"} or int, optional
        ``o = 0``, ``o = k_length − q_length`` per sequence, or the int ``o``, as :func:`refattn.sdpa`.
        Default None: allowed only when every sequence has ``q_length == k_length``.
    q_lengths, k_lengths, k_starts : array_like of int, optional
        Per-sequence real lengths and key starts, broadcastable to the batch dims ``...`` of
        ``slopes``, as :func:`refattn.sdpa` takes them (they set ``o`` under ``"bottom_right"`` and
        ``j'``; padding is not masked here: pass the same options to sdpa).  Default None: ``lq``,
        ``lk − k_start`` and 0.

    Returns
    -------
    bias : ndarray of float64, shape (..., H, lq, lk)
    """
    slopes = as_float(slopes, "slopes", ndim_min=1)
    lq, lk = as_int(lq, "lq", minimum=0), as_int(lk, "lk", minimum=0)
    as_choice(style, "style", ALIBI_STYLES)
    lengths = {"q_lengths": q_lengths, "k_lengths": k_lengths, "k_starts": k_starts}
    seqs = _masks.sequences(slopes.shape[:-1], lq, lk, **lengths, align=align, what="ALiBi")
    per = (..., None, None, None)  # (..., 1, 1, 1)
    jr = np.arange(lk) - seqs.k_starts[per]  # (..., 1, 1, lk): j' = j - k_start
    rel = jr - (np.arange(lq)[:, None] + seqs.offsets[per])  # (..., 1, lq, lk): j' - i - o
    dist = -np.abs(rel) if style == "abs" else rel
    return slopes[..., None, None] * dist


def sinusoidal_positions(length, dim, *, base=10000.0):
    """The sinusoidal position table of "Attention Is All You Need":
    ``PE[p, 2i] = sin(p / base^(2i/dim))``, ``PE[p, 2i+1] = cos(p / base^(2i/dim))``.

    Axes: ``length`` positions (rows, p), ``dim`` features; an odd ``dim`` ends with a sine column.
    Added to the token embeddings, not to q and k.

    Parameters
    ----------
    length : int
        Positions, >= 0.
    dim : int
        Features, >= 1.
    base : float, default 10000.0
        The wavelength base, > 0.

    Returns
    -------
    pe : ndarray of float64, shape (length, dim)
    """
    length, dim = as_int(length, "length", minimum=0), as_int(dim, "dim", minimum=1)
    base = as_real(base, "base", positive=True, allow_none=False)
    pos = np.arange(length, dtype=np.float64)[:, None]  # (length, 1)
    freq = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)  # (ceil(dim/2),)
    pe = np.zeros((length, dim))
    pe[:, 0::2] = np.sin(pos * freq)
    pe[:, 1::2] = np.cos(pos * freq[: dim // 2])
    return pe


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
