"""Array layouts of q/k/v/out: refattn's ``(B, H, L, D)`` and the ones other libraries use.

* ``"bhld"`` — refattn, PyTorch SDPA: ``(batch, heads, length, head_dim)``;
* ``"bshd"`` — flash-attn: ``(batch, seqlen, heads, head_dim)``;
* ``"btnh"`` — JAX ``dot_product_attention``: ``(batch, time, num_heads, head_dim)``, the same axes
  as ``"bshd"`` under other names;
* ``"bsd"`` — packed heads (ONNX Attention's 3-D inputs, PyTorch ``nn.MultiheadAttention`` with
  ``batch_first``, Hugging Face hidden states): ``(batch, seqlen, heads·head_dim)``, head ``h``
  holding the columns ``h·D .. (h+1)·D - 1`` (ONNX's reshape to ``(B, S, H, D)``); converting to
  ``"bhld"`` needs ``num_heads``.

For lse, drop the last letter: ``(B, H, L)`` vs ``(B, L, H)`` (``"bsd"`` has no lse form: use
``"bshd"``'s).
"""

import numpy as np

from refattn._validate import RefAttnError, as_choice, as_int, check_keywords_of, to_numpy

__all__ = ["LAYOUTS", "from_bhld", "to_bhld"]

LAYOUTS = ("bhld", "bshd", "btnh", "bsd")


def _checked(layout, a, name, num_heads, *, packed_input):
    """Validate ``layout`` and the dims of ``a``; ``num_heads`` as an int (or None) consistent with ``a``.

    ``packed_input``: ``a`` is in the packed ``"bsd"`` layout (to_bhld's input), else ``(..., H, L, D)``
    or another unpacked layout."""
    as_choice(layout, "layout", LAYOUTS)
    h = None if num_heads is None else as_int(num_heads, "num_heads", minimum=1)
    if layout == "bsd":
        if packed_input:
            if a.ndim < 3:
                raise RefAttnError(f"{name}: expected at least 3 dims (batch, length, heads·dim), got shape {a.shape}")
            if h is None:
                raise RefAttnError(
                    f'num_heads: required to unpack the "bsd" layout (B, S, H·D), got None ({name} {a.shape})'
                )
            if a.shape[-1] % h:
                raise RefAttnError(
                    f"num_heads: expected a divisor of the last dim H·D = {a.shape[-1]} of {name} {a.shape}, got {h}"
                )
        elif a.ndim < 4:
            raise RefAttnError(
                f'{name}: expected at least 4 dims (..., H, L, D) to pack as "bsd" (no lse form: use "bshd"), '
                f"got shape {a.shape}"
            )
        return h
    if a.ndim < 3:
        raise RefAttnError(f"{name}: expected at least 3 dims (batch, length, heads[, dim]), got {a.ndim}")
    return h


def _check_heads(h, a, layout, name, *, bhld):
    """``a``'s heads axis must hold ``h`` heads (when given): axis -3 of (..., H, L, D), -2 of (..., L, H, D)."""
    if h is None:
        return
    lse = a.ndim == 3
    axis = (-2 if lse else -3) if bhld else (-1 if lse else -2)
    if a.shape[axis] != h:
        where = "(..., H, L, D)" if bhld else f'the "{layout}" layout'
        raise RefAttnError(f"num_heads: expected {a.shape[axis]}, the heads of {name} {a.shape} in {where}, got {h}")


def to_bhld(x, layout, *, name="x", num_heads=None):
    """An array in another library's layout as refattn's ``(..., H, L, D)``: the heads and length
    axes swapped, as a view (no copy, dtype kept); the packed ``"bsd"`` split into heads first.

    Axes: ``...`` batch, ``H`` heads, ``L`` (``S``) length, ``D`` head dim.  A 3-D array in an unpacked
    layout is lse-shaped: ``(..., L, H)`` becomes ``(..., H, L)``.  For ``"bsd"`` a 3-D array is
    ``(B, S, H·D)``, reshaped to ``(B, S, H, D)`` (head ``h`` = columns ``h·D .. (h+1)·D − 1``, as ONNX
    reshapes its 3-D inputs) and swapped: a view where NumPy can reshape without a copy.

    Parameters
    ----------
    x : array_like, shape (..., L, H, D), lse-shaped (..., L, H), or (..., S, H·D) for "bsd"
        (``(..., H, L, D)`` already for ``"bhld"``.)  Any array-like (a NumPy array, a CPU
        tensor through ``__array__`` or ``__dlpack__``), at least 3-D.
    layout : {"bhld", "bshd", "btnh", "bsd"}
        The layout of ``x``: ``"bhld"`` (refattn, PyTorch SDPA: returned as it is), ``"bshd"``
        (flash-attn), ``"btnh"`` (JAX ``dot_product_attention``) or ``"bsd"`` (heads packed in the last
        dim: ONNX's 3-D Attention inputs).
    name : str, default "x"
        The argument's name in error messages.
    num_heads : int, optional
        The number of heads ``H``: required for ``"bsd"`` (it must divide the last dim ``H·D``); for the
        other layouts checked against ``x``'s heads axis when given.  Default None.

    Returns
    -------
    ndarray, shape (..., H, L, D) or (..., H, L)
        A view of ``x`` (``"bsd"``: where a reshape needs no copy, i.e. unless its last dim is strided).

    Raises
    ------
    RefAttnError
        An unknown layout; too few dims; ``"bsd"`` without ``num_heads`` or with one that does not divide
        the last dim; a ``num_heads`` other than ``x``'s heads.
    """
    a = to_numpy(x, name)
    h = _checked(layout, a, name, num_heads, packed_input=True)
    if layout == "bsd":
        a = a.reshape(a.shape[:-1] + (h, a.shape[-1] // h))  # (..., S, H, D)
        return np.swapaxes(a, -3, -2)
    _check_heads(h, a, layout, name, bhld=layout == "bhld")
    if layout == "bhld":
        return a
    return np.swapaxes(a, -3, -2) if a.ndim >= 4 else np.swapaxes(a, -1, -2)


def from_bhld(x, layout, *, name="x", num_heads=None):
    """refattn's ``(..., H, L, D)`` (or lse's ``(..., H, L)``) in another library's layout: the
    inverse of :func:`to_bhld`, a view (``"bsd"``: ``(..., L, H·D)``, a copy unless ``H = 1``).

    Parameters
    ----------
    x : array_like, shape (..., H, L, D) or lse-shaped (..., H, L)
        At least 3-D (4-D for ``"bsd"``, which has no lse form).
    layout : {"bhld", "bshd", "btnh", "bsd"}
        The layout wanted, as :func:`to_bhld`.
    name : str, default "x"
        The argument's name in error messages.
    num_heads : int, optional
        Checked against ``x``'s heads axis ``H`` when given (never needed: ``x`` has its heads).
        Default None.

    Returns
    -------
    ndarray, shape (..., L, H, D), (..., L, H) or (..., L, H·D) for "bsd"
        A view of ``x`` (unchanged for ``"bhld"``); for ``"bsd"`` the heads packed back, head ``h`` in
        the columns ``h·D .. (h+1)·D − 1``.
    """
    a = to_numpy(x, name)
    h = _checked(layout, a, name, num_heads, packed_input=False)
    _check_heads(h, a, layout, name, bhld=True)
    if layout == "bhld":
        return a
    if layout == "bsd":
        swapped = np.swapaxes(a, -3, -2)  # (..., L, H, D)
        return swapped.reshape(swapped.shape[:-2] + (swapped.shape[-2] * swapped.shape[-1],))
    return np.swapaxes(a, -3, -2) if a.ndim >= 4 else np.swapaxes(a, -1, -2)  # the same two axes as to_bhld


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
