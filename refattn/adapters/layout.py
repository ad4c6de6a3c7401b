"""Array layouts of q/k/v/out: refattn's ``(B, H, L, D)`` and the ones other libraries use.

* ``"bhld"`` — refattn, PyTorch SDPA: ``(batch, heads, length, head_dim)``;
* ``"bshd"`` — flash-attn: ``(batch, seqlen, heads, head_dim)``;
* ``"btnh"`` — JAX ``dot_product_attention``: ``(batch, time, num_heads, head_dim)``, the same axes
  as ``"bshd"`` under other names.

For lse, drop the last letter: ``(B, H, L)`` vs ``(B, L, H)``.
"""

import numpy as np

from refattn._validate import RefAttnError, as_choice, check_keywords_of, to_numpy

__all__ = ["LAYOUTS", "from_bhld", "to_bhld"]

LAYOUTS = ("bhld", "bshd", "btnh")


def _axes(layout, ndim, name):
    as_choice(layout, "layout", LAYOUTS)
    if ndim < 3:
        raise RefAttnError(f"{name}: expected at least 3 dims (batch, length, heads[, dim]), got {ndim}")
    return layout != "bhld"


def to_bhld(x, layout, *, name="x"):
    """An array in another library's layout as refattn's ``(..., H, L, D)``: the heads and length
    axes swapped, as a view (no copy, dtype kept).

    Axes: ``...`` batch, ``H`` heads, ``L`` length, ``D`` head dim.  A 3-D array is lse-shaped:
    ``(..., L, H)`` becomes ``(..., H, L)``.

    Parameters
    ----------
    x : array_like, shape (..., L, H, D) or lse-shaped (..., L, H)
        (``(..., H, L, D)`` already for ``"bhld"``.)  Any array-like (a NumPy array, a CPU
        tensor through ``__array__`` or ``__dlpack__``), at least 3-D.
    layout : {"bhld", "bshd", "btnh"}
        The layout of ``x``: ``"bhld"`` (refattn, PyTorch SDPA: returned as it is), ``"bshd"``
        (flash-attn) or ``"btnh"`` (JAX ``dot_product_attention``).
    name : str, default "x"
        The argument's name in error messages.

    Returns
    -------
    ndarray, shape (..., H, L, D) or (..., H, L)
        A view of ``x``.
    """
    a = to_numpy(x, name)
    if not _axes(layout, a.ndim, name):
        return a
    return np.swapaxes(a, -3, -2) if a.ndim >= 4 else np.swapaxes(a, -1, -2)


def from_bhld(x, layout, *, name="x"):
    """refattn's ``(..., H, L, D)`` (or lse's ``(..., H, L)``) in another library's layout: the
    inverse of :func:`to_bhld`, a view.

    Parameters
    ----------
    x : array_like, shape (..., H, L, D) or lse-shaped (..., H, L)
        At least 3-D.
    layout : {"bhld", "bshd", "btnh"}
        The layout wanted, as :func:`to_bhld`.
    name : str, default "x"
        The argument's name in error messages.

    Returns
    -------
    ndarray, shape (..., L, H, D) or (..., L, H)
        A view of ``x`` (unchanged for ``"bhld"``).
    """
    return to_bhld(x, layout, name=name)  # both conversions swap the same two axes


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
