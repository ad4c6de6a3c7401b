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
from refattn._validate import RefAttnError, as_choice, as_cotangent, as_float, as_int, as_real

__all__ = ["RopeGrads", "alibi_bias", "alibi_slopes", "rope", "rope_backward", "sinusoidal_positions"]

ROPE_STYLES = ("half", "interleaved")


class RopeGrads(NamedTuple):
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
    """Rotary position embedding of ``x (..., L, D)``; dims ``>= rotary_dim`` pass through."""
    x, r, cos, sin = _rope_setup(x, positions, base, style, rotary_dim)
    x1, x2 = _pairs(x, r, style)  # (..., L, r/2)
    return _assemble(x, x1 * cos - x2 * sin, x2 * cos + x1 * sin, r, style)


def rope_backward(dy, x, positions=None, *, base=10000.0, style="half", rotary_dim=None):
    """Gradient of :func:`rope`: the inverse (transposed) rotation of ``dy``."""
    x, r, cos, sin = _rope_setup(x, positions, base, style, rotary_dim)
    out_shape = np.broadcast_shapes(x.shape, cos.shape[:-1] + x.shape[-1:])
    dy = as_cotangent(dy, out_shape, "dy")
    d1, d2 = _pairs(dy, r, style)  # (..., L, r/2)
    dx = _assemble(dy, d1 * cos + d2 * sin, d2 * cos - d1 * sin, r, style)
    extra = dx.ndim - x.ndim
    dx = dx.sum(axis=tuple(range(extra))) if extra else dx
    axes = tuple(i for i, n in enumerate(x.shape) if n == 1 and dx.shape[i] != 1)
    return RopeGrads(dx.sum(axis=axes, keepdims=True) if axes else dx)


def alibi_slopes(num_heads):
    """ALiBi slopes ``(H,)``: ``2^(−8i/H)``, i = 1..H for H a power of two; otherwise the
    slopes of the nearest lower power of two m followed by every other slope of 2m
    (Press et al.'s reference code)."""
    n = as_int(num_heads, "num_heads", minimum=1)

    def power_of_two(m):
        return [2.0 ** (-8.0 * i / m) for i in range(1, m + 1)]

    m = 2 ** int(math.floor(math.log2(n)))
    slopes = power_of_two(m)
    if m != n:
        slopes += power_of_two(2 * m)[0::2][: n - m]
    return np.array(slopes)


ALIBI_STYLES = ("abs", "signed")


def alibi_bias(slopes, lq, lk, *, style="abs", align=None):
    """ALiBi bias ``(..., H, lq, lk)`` for ``slopes (..., H)``; pass it as ``bias=``.

    ``"abs"``: ``−slope·|i + o − j|`` (flash-attn); ``"signed"``: ``slope·(j − i − o)`` (cuDNN);
    ``o`` the alignment offset (``align`` required when ``lq != lk``).
    """
    slopes = as_float(slopes, "slopes", ndim_min=1)
    lq, lk = as_int(lq, "lq", minimum=0), as_int(lk, "lk", minimum=0)
    as_choice(style, "style", ALIBI_STYLES)
    o = _masks.alignment_offset(lq, lk, align, what="ALiBi")
    rel = np.arange(lk)[None, :] - (np.arange(lq)[:, None] + o)  # (lq, lk): j - i - o
    dist = -np.abs(rel) if style == "abs" else rel
    return slopes[..., None, None] * dist


def sinusoidal_positions(length, dim, *, base=10000.0):
    """Sinusoidal table ``(length, dim)``: ``PE[p, 2i] = sin(p / base^(2i/dim))``, ``PE[p, 2i+1] = cos(...)``."""
    length, dim = as_int(length, "length", minimum=0), as_int(dim, "dim", minimum=1)
    base = as_real(base, "base", positive=True, allow_none=False)
    pos = np.arange(length, dtype=np.float64)[:, None]  # (length, 1)
    freq = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)  # (ceil(dim/2),)
    pe = np.zeros((length, dim))
    pe[:, 0::2] = np.sin(pos * freq)
    pe[:, 1::2] = np.cos(pos * freq[: dim // 2])
    return pe
