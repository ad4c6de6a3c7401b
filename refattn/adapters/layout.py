"""Array layouts of q/k/v/out: refattn's ``(B, H, L, D)`` and the ones other libraries use.

* ``"bhld"`` — refattn, PyTorch SDPA: ``(batch, heads, length, head_dim)``;
* ``"bshd"`` — flash-attn: ``(batch, seqlen, heads, head_dim)``;
* ``"btnh"`` — JAX ``dot_product_attention``: ``(batch, time, num_heads, head_dim)``, the same axes
  as ``"bshd"`` under other names.

For lse, drop the last letter: ``(B, H, L)`` vs ``(B, L, H)``.
"""

import numpy as np

from refattn._validate import RefAttnError, as_choice, to_numpy

__all__ = ["LAYOUTS", "from_bhld", "to_bhld"]

LAYOUTS = ("bhld", "bshd", "btnh")


def _axes(layout, ndim, name):
    as_choice(layout, "layout", LAYOUTS)
    if ndim < 3:
        raise RefAttnError(f"{name}: expected at least 3 dims (batch, length, heads[, dim]), got {ndim}")
    return layout != "bhld"


def to_bhld(x, layout, *, name="x"):
    """``x`` in ``layout`` → refattn's ``(..., H, L, D)`` (a view; lse-shaped ``(..., L, H)`` → ``(..., H, L)``)."""
    a = to_numpy(x, name)
    if not _axes(layout, a.ndim, name):
        return a
    return np.swapaxes(a, -3, -2) if a.ndim >= 4 else np.swapaxes(a, -1, -2)


def from_bhld(x, layout, *, name="x"):
    """refattn's ``(..., H, L, D)`` → ``layout`` (the inverse of :func:`to_bhld`)."""
    return to_bhld(x, layout, name=name)  # both conversions swap the same two axes
