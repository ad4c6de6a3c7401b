"""The layers of a transformer language model, each with its hand-written backward (``specs/model.md``).

Semantics are those of ``torch.nn.functional`` (``embedding``, ``linear``, ``layer_norm``,
``rms_norm``, ``gelu``, ``silu``, ``relu``, ``cross_entropy``), in float64, with one difference of
layout: a weight is ``(in, out)`` and a layer computes ``x @ w + b`` (PyTorch's ``nn.Linear`` stores
``w.T``), as :class:`refattn.attention.multihead.MHAParams`.

Axes: ``...`` leading (batch, sequence) dims, ``V`` the vocabulary, ``E`` the model width, ``I``/``O``
a linear layer's input/output widths, ``F`` the MLP's hidden width.  Every layer ``name(...)`` has
``name_backward(d_<output>, <same inputs>, *, <same options>)`` returning a NamedTuple with one field
``d<input>`` per differentiable input (None where the input is None); weights' gradients are summed
over every leading dim.  Token ids and targets are integer arrays; an id outside the table raises
:class:`~refattn.RefAttnError` naming the argument and the first offending index.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import special

from refattn._validate import (
    RefAttnError,
    RefAttnTypeError,
    as_choice,
    as_cotangent,
    as_float,
    as_int,
    as_real,
    check_keywords_of,
    first_index,
    sum_outer,
    to_numpy,
)

__all__ = [
    "ACTIVATIONS",
    "CrossEntropyGrads",
    "EmbeddingGrads",
    "GeluGrads",
    "LayerNormGrads",
    "LinearGrads",
    "MLPGrads",
    "MLPParams",
    "RMSNormGrads",
    "SiluGrads",
    "SwiGLUGrads",
    "cross_entropy",
    "cross_entropy_backward",
    "embedding",
    "embedding_backward",
    "gelu",
    "gelu_backward",
    "layer_norm",
    "layer_norm_backward",
    "linear",
    "linear_backward",
    "mlp",
    "mlp_backward",
    "rms_norm",
    "rms_norm_backward",
    "silu",
    "silu_backward",
    "swiglu",
    "swiglu_backward",
]

#: The activations of :func:`mlp`.
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")
_GELU_FORMS = ("none", "tanh")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715  # the tanh form's cubic coefficient (Hendrycks & Gimpel; torch's constant)


# ---- gradient records -------------------------------------------------------------------------


class EmbeddingGrads(NamedTuple):
    """Gradient of :func:`embedding` (from :func:`embedding_backward`).

    Fields
    ------
    dweight : ndarray, shape (V, E)
        Each row the sum of the cotangents of the positions holding that id (0 for unused ids).
    """

    dweight: np.ndarray


class LinearGrads(NamedTuple):
    """Gradients of :func:`linear` (from :func:`linear_backward`).

    Fields
    ------
    dx : ndarray, shape (..., I)
    dweight : ndarray, shape (I, O)
    dbias : ndarray, shape (O,), or None
        None when the layer has no bias.
    """

    dx: np.ndarray
    dweight: np.ndarray
    dbias: np.ndarray | None


class LayerNormGrads(NamedTuple):
    """Gradients of :func:`layer_norm` (from :func:`layer_norm_backward`).

    Fields
    ------
    dx : ndarray, shape (..., E)
    dweight : ndarray, shape (E,), or None
        None when ``weight`` was None.
    dbias : ndarray, shape (E,), or None
        None when ``bias`` was None.
    """

    dx: np.ndarray
    dweight: np.ndarray | None
    dbias: np.ndarray | None


class RMSNormGrads(NamedTuple):
    """Gradients of :func:`rms_norm` (from :func:`rms_norm_backward`).

    Fields
    ------
    dx : ndarray, shape (..., E)
    dweight : ndarray, shape (E,), or None
        None when ``weight`` was None.
    """

    dx: np.ndarray
    dweight: np.ndarray | None


class GeluGrads(NamedTuple):
    """Gradient of :func:`gelu` (from :func:`gelu_backward`).

    Fields
    ------
    dx : ndarray, shape of x
    """

    dx: np.ndarray


class SiluGrads(NamedTuple):
    """Gradient of :func:`silu` (from :func:`silu_backward`).

    Fields
    ------
    dx : ndarray, shape of x
    """

    dx: np.ndarray


class SwiGLUGrads(NamedTuple):
    """Gradients of :func:`swiglu` (from :func:`swiglu_backward`).

    Fields
    ------
    dgate : ndarray, shape of gate
    dup : ndarray, shape of up
    """

    dgate: np.ndarray
    dup: np.ndarray


class MLPParams(NamedTuple):
    """The weights of a transformer block's MLP, applied as ``t @ w + b``.

    Fields
    ------
    w_in : array_like, shape (E, F)
        The up projection (GPT-2's ``c_fc``; Llama's ``up_proj``).
    b_in : array_like, shape (F,), or None
        Its bias; None for none.
    w_out : array_like, shape (F, E)
        The down projection (GPT-2's ``c_proj``; Llama's ``down_proj``).
    b_out : array_like, shape (E,), or None
        Its bias; None for none.
    w_gate : array_like, shape (E, F), or None
        The gate projection of SwiGLU (Llama's ``gate_proj``); None for every other activation.
        Default None.
    """

    w_in: np.ndarray
    b_in: np.ndarray | None
    w_out: np.ndarray
    b_out: np.ndarray | None
    w_gate: np.ndarray | None = None


class MLPGrads(NamedTuple):
    """Gradients of :func:`mlp` (from :func:`mlp_backward`).

    Fields
    ------
    dx : ndarray, shape (..., E)
    dparams : MLPParams
        The weights' gradients, each of its weight's shape; None where the weight is None.
    """

    dx: np.ndarray
    dparams: MLPParams


class CrossEntropyGrads(NamedTuple):
    """Gradient of :func:`cross_entropy` (from :func:`cross_entropy_backward`).

    Fields
    ------
    dlogits : ndarray, shape (..., V)
        0 on the rows whose target is ``ignore_index``.
    """

    dlogits: np.ndarray


# ---- argument checks --------------------------------------------------------------------------


def as_ids(x, name, size, *, ignore=None):
    """``x`` as an int64 array of ids in ``[0, size)`` (``ignore``, when given, also allowed); a
    non-integer dtype is a RefAttnTypeError, an id out of range a RefAttnError naming its index."""
    a = to_numpy(x, name)
    if a.dtype == bool or a.dtype.kind not in "iu":
        raise RefAttnTypeError(f"{name}: expected integer ids (an int dtype), got dtype {a.dtype}")
    a = np.array(a, dtype=np.int64, copy=True)
    bad = (a < 0) | (a >= size)
    if ignore is not None:
        bad &= a != ignore
    idx = first_index(bad)
    if idx is not None:
        also = f" or ignore_index {ignore}" if ignore is not None else ""
        where = f" at index {idx}" if idx else ""
        raise RefAttnError(f"{name}: expected ids in [0, {size}){also}, got {int(a[idx])}{where}")
    return a


def _vector(a, name, size, what):
    """``a`` (float64, validated) of shape ``(size,)``, or None."""
    if a is None:
        return None
    v = as_float(a, name)
    if v.shape != (size,):
        raise RefAttnError(f"{name}: expected shape ({size},) ({what}), got {v.shape}")
    return v


def _matrix(a, name, what):
    m = as_float(a, name)
    if m.ndim != 2:
        raise RefAttnError(f"{name}: expected a 2-D weight {what}, got shape {m.shape}")
    return m


def _input(x, name, width, owner):
    """``x`` as float64 ``(..., width)``; a wrong last dim blames ``x`` (the weights define the layer)."""
    a = as_float(x, name, ndim_min=1)
    if a.shape[-1] != width:
        raise RefAttnError(f"{name}: expected last dim {width} ({owner}), got shape {a.shape}")
    return a


def _eps(eps):
    return as_real(eps, "eps", positive=True, allow_none=False)


def _sum_rows(g):
    """``g (..., n)`` summed over every leading dim: ``(n,)``."""
    return g.reshape(-1, g.shape[-1]).sum(axis=0)


# ---- embedding and linear ---------------------------------------------------------------------


def _embedding_inputs(tokens, weight):
    w = _matrix(weight, "weight", "(V, E)")
    return as_ids(tokens, "tokens", w.shape[0]), w


def embedding(tokens, weight):
    """The rows of an embedding table: ``out[..., :] = weight[tokens[...], :]``.

    As ``torch.nn.functional.embedding(tokens, weight)`` (no padding index, no max-norm).

    Parameters
    ----------
    tokens : array_like of int, shape (...)
        Ids in ``[0, V)``; any number of dims (0 included).
    weight : array_like, shape (V, E)
        The table; finite.

    Returns
    -------
    ndarray of float64, shape (..., E)

    Raises
    ------
    RefAttnError
        An id outside ``[0, V)`` (``tokens: expected ids in [0, V), got 7 at index (0, 2)``), a
        weight that is not 2-D; a float or bool ``tokens`` is a RefAttnTypeError.
    """
    ids, w = _embedding_inputs(tokens, weight)
    return w[ids]  # (..., E)


def embedding_backward(d_out, tokens, weight):
    """Gradient of :func:`embedding`: a scatter-add of ``d_out``'s rows into the rows of the table.

    ``dweight[v] = Σ_{positions p with tokens[p] = v} d_out[p]`` (``np.add.at``, in C order of the
    positions: deterministic).

    Parameters
    ----------
    d_out : array_like, shape (..., E)
        Cotangent of the output; exactly its shape, finite.
    tokens, weight : array_like
        As :func:`embedding`.

    Returns
    -------
    EmbeddingGrads
        ``(dweight,)``, shape (V, E).
    """
    ids, w = _embedding_inputs(tokens, weight)
    d = as_cotangent(d_out, ids.shape + w.shape[1:], "d_out")  # (..., E)
    dw = np.zeros(w.shape)  # (V, E)
    np.add.at(dw, ids.reshape(-1), d.reshape(-1, w.shape[1]))  # out[p] = w[ids[p]]
    return EmbeddingGrads(dw)


def _linear_inputs(x, weight, bias):
    w = _matrix(weight, "weight", "(I, O)")
    a = _input(x, "x", w.shape[0], f"the rows of weight, shape {w.shape}")
    return a, w, _vector(bias, "bias", w.shape[1], "the columns of weight")


def linear(x, weight, bias=None):
    """An affine map of the last axis: ``y = x @ weight + bias``.

    As ``torch.nn.functional.linear(x, weight.T, bias)``: refattn's weights are ``(in, out)``.

    Parameters
    ----------
    x : array_like, shape (..., I)
        Finite; at least 1-D.
    weight : array_like, shape (I, O)
        Finite.
    bias : array_like, shape (O,), optional
        Finite.  Default None: no bias.

    Returns
    -------
    ndarray of float64, shape (..., O)

    Raises
    ------
    RefAttnError
        x's last dim differs from weight's rows (``x: expected last dim 3 (the rows of weight, ...)``),
        a bias of the wrong length, non-finite values.
    """
    a, w, b = _linear_inputs(x, weight, bias)
    y = a @ w  # (..., O)
    return y if b is None else y + b


def linear_backward(d_out, x, weight, bias=None):
    """Gradients of :func:`linear`: ``dx = d_out weightᵀ``, ``dweight = Σ xᵀ d_out``, ``dbias = Σ d_out``
    (sums over every leading dim).

    Parameters
    ----------
    d_out : array_like, shape (..., O)
        Cotangent of ``y``; exactly its shape, finite.
    x, weight, bias : array_like
        As :func:`linear` (bias default None).

    Returns
    -------
    LinearGrads
        ``(dx, dweight, dbias)``; ``dbias`` None without a bias.
    """
    a, w, b = _linear_inputs(x, weight, bias)
    d = as_cotangent(d_out, a.shape[:-1] + (w.shape[1],), "d_out")  # (..., O)
    # y = x w + b
    return LinearGrads(d @ w.T, sum_outer(a, d), None if b is None else _sum_rows(d))


# ---- norms ------------------------------------------------------------------------------------


def _norm_inputs(x, weight, bias=None):
    a = as_float(x, "x", ndim_min=1)
    e = a.shape[-1]
    what = f"x's last dim E = {e}"
    return a, _vector(weight, "weight", e, what), _vector(bias, "bias", e, what)


def _layer_norm_core(x, eps):
    """``(x̂, r)``: ``x̂ = (x − μ) r``, ``r = 1 / sqrt(var + eps)`` (biased variance), ``r (..., 1)``."""
    xc = x - x.mean(axis=-1, keepdims=True)  # (..., E)
    r = 1.0 / np.sqrt(np.mean(xc * xc, axis=-1, keepdims=True) + eps)  # (..., 1)
    return xc * r, r


def layer_norm(x, weight, bias, *, eps=1e-5):
    """Layer normalisation over the last axis (Ba et al. 2016)::

        μ = mean(x),  σ² = mean((x − μ)²)  (biased, as torch),  x̂ = (x − μ) / sqrt(σ² + eps)
        y = x̂ · weight + bias

    As ``torch.nn.functional.layer_norm(x, (E,), weight, bias, eps)``.

    Parameters
    ----------
    x : array_like, shape (..., E)
        Finite; at least 1-D.
    weight : array_like, shape (E,), or None
        The gain; None: 1.
    bias : array_like, shape (E,), or None
        The shift; None: 0.
    eps : float, default 1e-5
        Added to the variance, > 0.

    Returns
    -------
    ndarray of float64, shape (..., E)
    """
    a, w, b = _norm_inputs(x, weight, bias)
    xh, _ = _layer_norm_core(a, _eps(eps))
    y = xh if w is None else xh * w
    return y if b is None else y + b


def layer_norm_backward(d_out, x, weight, bias, *, eps=1e-5):
    """Gradients of :func:`layer_norm`::

        dx̂ = d_out · weight
        dx = r · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ · x̂)),   r = 1 / sqrt(σ² + eps)
        dweight = Σ d_out · x̂,  dbias = Σ d_out

    (means over the last axis, sums over every leading dim; derivation in ``specs/model.md``).

    Parameters
    ----------
    d_out : array_like, shape (..., E)
        Cotangent of ``y``; exactly its shape, finite.
    x, weight, bias : array_like
        As :func:`layer_norm`.
    eps : float, default 1e-5
        As :func:`layer_norm`.

    Returns
    -------
    LayerNormGrads
        ``(dx, dweight, dbias)``; None for a weight or bias given as None.
    """
    a, w, b = _norm_inputs(x, weight, bias)
    d = as_cotangent(d_out, a.shape, "d_out")
    xh, r = _layer_norm_core(a, _eps(eps))  # (..., E), (..., 1)
    # y = x̂ w + b
    dw = None if w is None else _sum_rows(d * xh)
    db = None if b is None else _sum_rows(d)
    dxh = d if w is None else d * w  # (..., E)
    # x̂ = (x − μ) r
    dx = r * (dxh - dxh.mean(axis=-1, keepdims=True) - xh * np.mean(dxh * xh, axis=-1, keepdims=True))
    return LayerNormGrads(dx, dw, db)


def _rms_core(x, eps):
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)  # (..., 1)
    return x * r, r


def rms_norm(x, weight, *, eps=1e-6):
    """Root-mean-square normalisation over the last axis (Zhang & Sennrich 2019)::

        y = x / sqrt(mean(x²) + eps) · weight

    As ``torch.nn.functional.rms_norm(x, (E,), weight, eps)`` (and Llama's ``LlamaRMSNorm``).

    Parameters
    ----------
    x : array_like, shape (..., E)
        Finite; at least 1-D.
    weight : array_like, shape (E,), or None
        The gain; None: 1.
    eps : float, default 1e-6
        Added to the mean square, > 0.

    Returns
    -------
    ndarray of float64, shape (..., E)
    """
    a, w, _ = _norm_inputs(x, weight)
    xh, _ = _rms_core(a, _eps(eps))
    return xh if w is None else xh * w


def rms_norm_backward(d_out, x, weight, *, eps=1e-6):
    """Gradients of :func:`rms_norm`::

        dx̂ = d_out · weight,  dx = r · (dx̂ − x̂ · mean(dx̂ · x̂)),  r = 1 / sqrt(mean(x²) + eps)
        dweight = Σ d_out · x̂

    (derivation in ``specs/model.md``).

    Parameters
    ----------
    d_out : array_like, shape (..., E)
        Cotangent of ``y``; exactly its shape, finite.
    x, weight : array_like
        As :func:`rms_norm`.
    eps : float, default 1e-6
        As :func:`rms_norm`.

    Returns
    -------
    RMSNormGrads
        ``(dx, dweight)``; ``dweight`` None for a weight given as None.
    """
    a, w, _ = _norm_inputs(x, weight)
    d = as_cotangent(d_out, a.shape, "d_out")
    xh, r = _rms_core(a, _eps(eps))
    # y = x̂ w
    dw = None if w is None else _sum_rows(d * xh)
    dxh = d if w is None else d * w
    # x̂ = x r
    return RMSNormGrads(r * (dxh - xh * np.mean(dxh * xh, axis=-1, keepdims=True)), dw)


# ---- activations ------------------------------------------------------------------------------


def _gelu_parts(x, approximate):
    """``(y, dy/dx)`` of GELU, exact or tanh form."""
    if approximate == "none":
        cdf = 0.5 * (1.0 + special.erf(x / math.sqrt(2.0)))  # Φ(x)
        pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)  # φ(x)
        return x * cdf, cdf + x * pdf
    u = _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x)
    t = np.tanh(u)
    du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x * x)
    return 0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du


def gelu(x, *, approximate="none"):
    """The Gaussian error linear unit (Hendrycks & Gimpel 2016), as ``torch.nn.functional.gelu``.

    ``"none"``: ``x Φ(x) = x · ½ (1 + erf(x / √2))``;  ``"tanh"`` (GPT-2's ``gelu_new``):
    ``½ x (1 + tanh(√(2/π) (x + 0.044715 x³)))``.

    Parameters
    ----------
    x : array_like
        Finite; any shape.
    approximate : {"none", "tanh"}, default "none"
        The exact form or the tanh approximation.

    Returns
    -------
    ndarray of float64, shape of x
    """
    a = as_float(x, "x")
    return _gelu_parts(a, as_choice(approximate, "approximate", _GELU_FORMS))[0]


def gelu_backward(d_out, x, *, approximate="none"):
    """Gradient of :func:`gelu`: ``d_out · gelu'(x)``, with ``gelu'(x) = Φ(x) + x φ(x)`` (exact) or
    ``½ (1 + t) + ½ x (1 − t²) √(2/π) (1 + 3 · 0.044715 x²)``, ``t = tanh(√(2/π) (x + 0.044715 x³))``.

    Parameters
    ----------
    d_out : array_like, shape of x
        Cotangent of the output; finite.
    x : array_like
        As :func:`gelu`.
    approximate : {"none", "tanh"}, default "none"
        As :func:`gelu`.

    Returns
    -------
    GeluGrads
        ``(dx,)``.
    """
    a = as_float(x, "x")
    form = as_choice(approximate, "approximate", _GELU_FORMS)
    return GeluGrads(as_cotangent(d_out, a.shape, "d_out") * _gelu_parts(a, form)[1])


def _silu_parts(x):
    """``(silu(x), silu'(x))``: ``x σ(x)`` and ``σ(x) (1 + x (1 − σ(x)))``."""
    s = special.expit(x)  # σ(x), no overflow for large |x|
    return x * s, s * (1.0 + x * (1.0 - s))


def silu(x):
    """The sigmoid linear unit (swish): ``x σ(x)``, as ``torch.nn.functional.silu``.

    Parameters
    ----------
    x : array_like
        Finite; any shape.

    Returns
    -------
    ndarray of float64, shape of x
    """
    return _silu_parts(as_float(x, "x"))[0]


def silu_backward(d_out, x):
    """Gradient of :func:`silu`: ``d_out · σ(x) (1 + x (1 − σ(x)))``.

    Parameters
    ----------
    d_out : array_like, shape of x
        Cotangent of the output; finite.
    x : array_like
        As :func:`silu`.

    Returns
    -------
    SiluGrads
        ``(dx,)``.
    """
    a = as_float(x, "x")
    return SiluGrads(as_cotangent(d_out, a.shape, "d_out") * _silu_parts(a)[1])


def _swiglu_inputs(gate, up):
    g, u = as_float(gate, "gate"), as_float(up, "up")
    if u.shape != g.shape:
        raise RefAttnError(f"up: expected the shape of gate {g.shape}, got {u.shape}")
    return g, u


def swiglu(gate, up):
    """The SwiGLU product (Shazeer 2020): ``silu(gate) · up``, elementwise.

    Parameters
    ----------
    gate : array_like
        The gate's pre-activation (``x w_gate``); finite.
    up : array_like, shape of gate
        The linear branch (``x w_in + b_in``); finite.

    Returns
    -------
    ndarray of float64, shape of gate
    """
    g, u = _swiglu_inputs(gate, up)
    return _silu_parts(g)[0] * u


def swiglu_backward(d_out, gate, up):
    """Gradients of :func:`swiglu`: ``dgate = d_out · up · silu'(gate)``, ``dup = d_out · silu(gate)``.

    Parameters
    ----------
    d_out : array_like, shape of gate
        Cotangent of the output; finite.
    gate, up : array_like
        As :func:`swiglu`.

    Returns
    -------
    SwiGLUGrads
        ``(dgate, dup)``.
    """
    g, u = _swiglu_inputs(gate, up)
    d = as_cotangent(d_out, g.shape, "d_out")
    s, ds = _silu_parts(g)
    return SwiGLUGrads(d * u * ds, d * s)


def _activate(a, activation):
    """``(act(a), act'(a))`` for the pointwise activations of :func:`mlp` (relu' = 0 at 0, as torch)."""
    if activation == "relu":
        return np.maximum(a, 0.0), (a > 0).astype(np.float64)
    return _gelu_parts(a, "tanh" if activation == "gelu_tanh" else "none")


# ---- the MLP ----------------------------------------------------------------------------------


def _mlp_inputs(x, params, activation):
    act = as_choice(activation, "activation", ACTIVATIONS)
    if not isinstance(params, tuple) or len(params) != 5:
        raise RefAttnError(f"params: expected MLPParams(w_in, b_in, w_out, b_out, w_gate), got {type(params).__name__}")
    w_in = _matrix(params[0], "params.w_in", "(E, F)")
    e, f = w_in.shape
    w_out = _matrix(params[2], "params.w_out", "(F, E)")
    if w_out.shape != (f, e):
        raise RefAttnError(f"params.w_out: expected shape (F, E) = {(f, e)} (w_in is {(e, f)}), got {w_out.shape}")
    b_in = _vector(params[1], "params.b_in", f, "the columns of w_in")
    b_out = _vector(params[3], "params.b_out", e, "the rows of w_in")
    w_gate = params[4]
    if act == "swiglu":
        if w_gate is None:
            raise RefAttnError("params.w_gate: expected an (E, F) gate weight for activation 'swiglu', got None")
        w_gate = _matrix(w_gate, "params.w_gate", "(E, F)")
        if w_gate.shape != (e, f):
            raise RefAttnError(f"params.w_gate: expected shape (E, F) = {(e, f)} (as w_in), got {w_gate.shape}")
    elif w_gate is not None:
        raise RefAttnError(f"params.w_gate: expected None for activation {act!r} (only 'swiglu' has a gate)")
    a = _input(x, "x", e, f"the rows of params.w_in, shape {(e, f)}")
    return a, MLPParams(w_in, b_in, w_out, b_out, w_gate), act


def _mlp_hidden(x, p, act):
    """The hidden layer and what the backward needs: ``(h, pre, gate)``."""
    pre = x @ p.w_in  # (..., F)
    if p.b_in is not None:
        pre = pre + p.b_in
    if act == "swiglu":
        gate = x @ p.w_gate  # (..., F)
        return _silu_parts(gate)[0] * pre, pre, gate
    return _activate(pre, act)[0], pre, None


def mlp(x, params, *, activation="gelu"):
    """A transformer block's feed-forward layer::

        h = act(x w_in + b_in)                       (..., F)   gelu, gelu_tanh, relu
        h = silu(x w_gate) · (x w_in + b_in)         (..., F)   swiglu (Llama)
        y = h w_out + b_out                          (..., E)

    Parameters
    ----------
    x : array_like, shape (..., E)
        Finite; at least 1-D.
    params : MLPParams
        ``w_in (E, F)``, ``b_in (F,)`` or None, ``w_out (F, E)``, ``b_out (E,)`` or None, and
        ``w_gate (E, F)`` for ``"swiglu"`` (None otherwise).
    activation : {"gelu", "gelu_tanh", "relu", "swiglu"}, default "gelu"
        The exact GELU, its tanh form (GPT-2), ReLU (Vaswani et al.) or SwiGLU.

    Returns
    -------
    ndarray of float64, shape (..., E)

    Raises
    ------
    RefAttnError
        Weights of disagreeing shapes (``params.w_out: expected shape (F, E) = ...``), a gate weight
        missing for ``"swiglu"`` or given for another activation, x's last dim not E.
    """
    a, p, act = _mlp_inputs(x, params, activation)
    y = _mlp_hidden(a, p, act)[0] @ p.w_out
    return y if p.b_out is None else y + p.b_out


def mlp_backward(d_out, x, params, *, activation="gelu"):
    """Gradients of :func:`mlp`::

        dh = d_out w_outᵀ;  dw_out = Σ hᵀ d_out;  db_out = Σ d_out
        pointwise:  dpre = dh · act'(pre)
        swiglu:     dpre = dh · silu(gate),  dgate = dh · pre · silu'(gate),  dw_gate = Σ xᵀ dgate
        dw_in = Σ xᵀ dpre;  db_in = Σ dpre;  dx = dpre w_inᵀ (+ dgate w_gateᵀ)

    (``pre = x w_in + b_in``, ``gate = x w_gate``; relu' is 0 at 0, as torch).

    Parameters
    ----------
    d_out : array_like, shape (..., E)
        Cotangent of ``y``; exactly its shape, finite.
    x, params : array_like, MLPParams
        As :func:`mlp`.
    activation : {"gelu", "gelu_tanh", "relu", "swiglu"}, default "gelu"
        As :func:`mlp`.

    Returns
    -------
    MLPGrads
        ``(dx, dparams)``, ``dparams`` an :class:`MLPParams` of gradients (None where a weight is None).
    """
    a, p, act = _mlp_inputs(x, params, activation)
    d = as_cotangent(d_out, a.shape, "d_out")  # (..., E)
    h, pre, gate = _mlp_hidden(a, p, act)  # (..., F) each
    # y = h w_out + b_out
    dw_out, db_out = sum_outer(h, d), None if p.b_out is None else _sum_rows(d)
    dh = d @ p.w_out.T  # (..., F)
    dw_gate = None
    if act == "swiglu":
        # h = silu(gate) · pre,  gate = x w_gate
        s, ds = _silu_parts(gate)
        dpre, dgate = dh * s, dh * pre * ds
        dw_gate = sum_outer(a, dgate)
        dx = dgate @ p.w_gate.T
    else:
        # h = act(pre)
        dpre = dh * _activate(pre, act)[1]
        dx = 0.0
    # pre = x w_in + b_in
    dx = dx + dpre @ p.w_in.T
    db_in = None if p.b_in is None else _sum_rows(dpre)
    return MLPGrads(dx, MLPParams(sum_outer(a, dpre), db_in, dw_out, db_out, dw_gate))


# ---- the loss ---------------------------------------------------------------------------------


class _CE(NamedTuple):
    logp: np.ndarray  # (..., V) log-softmax of the logits
    ids: np.ndarray  # (...) targets, ignore_index kept
    valid: np.ndarray  # (...) bool: the target takes part
    count: int  # how many do
    smoothing: float


def _cross_entropy_parts(logits, targets, ignore_index, label_smoothing):
    z = as_float(logits, "logits", ndim_min=1)
    ignore = as_int(ignore_index, "ignore_index")
    eps = as_real(label_smoothing, "label_smoothing", allow_none=False)
    if not 0.0 <= eps <= 1.0:
        raise RefAttnError(f"label_smoothing: expected a number in [0, 1], got {eps}")
    ids = as_ids(targets, "targets", z.shape[-1], ignore=ignore)
    if ids.shape != z.shape[:-1]:
        raise RefAttnError(f"targets: expected shape {z.shape[:-1]} (logits' without the class axis), got {ids.shape}")
    zc = z - z.max(axis=-1, keepdims=True)
    logp = zc - np.log(np.exp(zc).sum(axis=-1, keepdims=True))  # (..., V)
    valid = ids != ignore
    return _CE(logp, ids, valid, int(valid.sum()), eps)


def _row_losses(ce):
    """``ℓ_i = −(1 − ε) log p_i[t_i] − ε mean_c log p_i[c]`` per row (ignored rows: any value)."""
    picked = np.take_along_axis(ce.logp, np.where(ce.valid, ce.ids, 0)[..., None], axis=-1)[..., 0]  # (...)
    return -(1.0 - ce.smoothing) * picked - ce.smoothing * ce.logp.mean(axis=-1)


def cross_entropy(logits, targets, *, ignore_index=-100, label_smoothing=0.0):
    """The mean cross-entropy of the targets under ``softmax(logits)``, as
    ``torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ...)``::

        ℓ_i = (1 − ε) · (−log p_i[t_i]) + ε · mean_c(−log p_i[c]),   p_i = softmax(logits_i)
        loss = Σ_{i: t_i ≠ ignore_index} ℓ_i / #{i: t_i ≠ ignore_index}

    (label smoothing ε as torch: the target distribution ``(1 − ε) onehot + ε / V``).  When every
    target is ``ignore_index`` the loss is NaN (0 / 0) and its gradient 0, as in torch.

    Parameters
    ----------
    logits : array_like, shape (..., V)
        Unnormalised log-probabilities over the last axis (torch's class axis 1 moved last); finite.
    targets : array_like of int, shape (...)
        Class ids in ``[0, V)`` or ``ignore_index``.
    ignore_index : int, default -100
        The target value that takes no part (padding).
    label_smoothing : float, default 0.0
        ``ε`` in ``[0, 1]``.

    Returns
    -------
    ndarray of float64, shape ()
        The mean loss (natural log).

    Raises
    ------
    RefAttnError
        A target outside ``[0, V)`` other than ``ignore_index``
        (``targets: expected ids in [0, 5) or ignore_index -100, got 7 at index (3,)``), targets of
        the wrong shape, ``label_smoothing`` outside ``[0, 1]``.
    """
    ce = _cross_entropy_parts(logits, targets, ignore_index, label_smoothing)
    total = float(np.sum(np.where(ce.valid, _row_losses(ce), 0.0)))
    return np.asarray(total / ce.count if ce.count else np.nan)


def cross_entropy_backward(d_loss, logits, targets, *, ignore_index=-100, label_smoothing=0.0):
    """Gradient of :func:`cross_entropy`::

        dlogits_i = d_loss / n · (p_i − (1 − ε) onehot(t_i) − ε / V)   for a counted row i (n of them)
        dlogits_i = 0                                                for t_i = ignore_index

    (derivation in ``specs/model.md``; 0 everywhere when no target is counted).

    Parameters
    ----------
    d_loss : array_like, shape ()
        Cotangent of the loss (a scalar); finite.
    logits, targets : array_like
        As :func:`cross_entropy`.
    ignore_index : int, default -100
        As :func:`cross_entropy`.
    label_smoothing : float, default 0.0
        As :func:`cross_entropy`.

    Returns
    -------
    CrossEntropyGrads
        ``(dlogits,)``, shape (..., V).
    """
    ce = _cross_entropy_parts(logits, targets, ignore_index, label_smoothing)
    d = float(as_cotangent(d_loss, (), "d_loss"))
    if not ce.count:
        return CrossEntropyGrads(np.zeros(ce.logp.shape))
    v = ce.logp.shape[-1]
    onehot = np.arange(v) == ce.ids[..., None]  # (..., V)
    g = np.exp(ce.logp) - ce.smoothing / v - (1.0 - ce.smoothing) * onehot  # p − ε/V − (1 − ε) onehot(t)
    return CrossEntropyGrads(np.where(ce.valid[..., None], g, 0.0) * (d / ce.count))


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
