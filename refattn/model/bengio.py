"""The neural probabilistic language model of Bengio, Ducharme, Vincent and Jauvin (2003), with its
hand-written backward (``specs/model.md``).

"A Neural Probabilistic Language Model" (JMLR 3, 1137-1155) predicts a word from the ``n`` words
before it (the paper's ``n - 1``: :attr:`~refattn.model.config.BengioConfig.context_size` here)::

    x = (C[w_1], C[w_2], ..., C[w_n])          (..., n·m)   the context's feature vectors, concatenated
    y = b + x W + tanh(d + x H) U              (..., V)     unnormalised log-probabilities
    P(w | context) = softmax(y)

``W`` are the optional direct connections (``direct_connections=False``: ``W`` is None and the
term is dropped).  The paper concatenates the most recent word first; here the context is in text
order (oldest first), which permutes the rows of ``H`` and ``W`` and changes nothing else.  Weights
are ``(in, out)`` (``x @ H``), as everywhere in refattn.  The model sees nothing beyond its ``n``
words, which is what :func:`refattn.model.data.recall_task` exploits.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from refattn._validate import RefAttnError, RefAttnTypeError, as_cotangent, as_float, check_keywords_of
from refattn.model.config import BengioConfig
from refattn.model.layers import as_ids, cross_entropy, cross_entropy_backward

__all__ = [
    "BengioGrads",
    "BengioParams",
    "bengio_backward",
    "bengio_forward",
    "bengio_loss_and_grads",
    "init_bengio_params",
]


class BengioParams(NamedTuple):
    """The parameters of Bengio et al.'s model (the paper's names), ``V`` words, ``n`` context words,
    ``m`` features per word, ``h`` hidden units.

    Fields
    ------
    C : ndarray, shape (V, m)
        The word feature vectors (an embedding table).
    H : ndarray, shape (n·m, h)
        Input to hidden weights.
    d : ndarray, shape (h,)
        Hidden biases.
    U : ndarray, shape (h, V)
        Hidden to output weights.
    W : ndarray, shape (n·m, V), or None
        The direct connections from the features to the output; None without them.
    b : ndarray, shape (V,)
        Output biases.
    """

    C: np.ndarray
    H: np.ndarray
    d: np.ndarray
    U: np.ndarray
    W: np.ndarray | None
    b: np.ndarray


class BengioGrads(NamedTuple):
    """Gradients of :func:`bengio_forward` (from :func:`bengio_backward`).

    Fields
    ------
    dparams : BengioParams
        One gradient per parameter, of its shape (``W`` None without direct connections), summed
        over the batch.
    """

    dparams: BengioParams

    def __getattr__(self, name):
        """The fields of ``dparams`` read directly (``grads.C`` is ``grads.dparams.C``)."""
        if name.startswith("_") or name not in BengioParams._fields:
            raise AttributeError(name)
        return getattr(self.dparams, name)


class _Forward(NamedTuple):
    p: BengioParams
    ids: np.ndarray  # (..., n)
    x: np.ndarray  # (..., n·m)
    t: np.ndarray  # (..., h) tanh(d + x H)
    y: np.ndarray  # (..., V)


def _check_config(config):
    if not isinstance(config, BengioConfig):
        raise RefAttnTypeError(f"config: expected a BengioConfig, got {type(config).__name__}")
    return config


def _check_params(params, config):
    if not isinstance(params, tuple) or len(params) != 6:
        raise RefAttnError(f"params: expected BengioParams(C, H, d, U, W, b), got {type(params).__name__}")
    v, n, m, h = config.vocab_size, config.context_size, config.embedding_dim, config.hidden_units
    shapes = {"C": (v, m), "H": (n * m, h), "d": (h,), "U": (h, v), "W": (n * m, v), "b": (v,)}
    out = {}
    for name, value in zip(BengioParams._fields, params):
        if name == "W" and not config.direct_connections:
            if value is not None:
                raise RefAttnError("params.W: expected None (config.direct_connections is False), got an array")
            out[name] = None
            continue
        if value is None:
            raise RefAttnError(f"params.{name}: expected an array of shape {shapes[name]}, got None")
        a = as_float(value, f"params.{name}")
        if a.shape != shapes[name]:
            raise RefAttnError(f"params.{name}: expected shape {shapes[name]} (from the config), got {a.shape}")
        out[name] = a
    return BengioParams(**out)


def _forward(params, contexts, config):
    config = _check_config(config)
    p = _check_params(params, config)
    ids = as_ids(contexts, "contexts", config.vocab_size)
    if ids.ndim < 1 or ids.shape[-1] != config.context_size:
        raise RefAttnError(
            f"contexts: expected shape (..., {config.context_size}) (config.context_size ids per row), got {ids.shape}"
        )
    x = p.C[ids].reshape(ids.shape[:-1] + (-1,))  # (..., n·m)
    t = np.tanh(x @ p.H + p.d)  # (..., h)
    y = t @ p.U + p.b  # (..., V)
    if p.W is not None:
        y = y + x @ p.W
    return _Forward(p, ids, x, t, y)


def init_bengio_params(config, rng):
    """Initial parameters for ``config``, drawn from ``rng`` in the order C, H, U, W.

    ``C ~ N(0, 1)`` (as ``torch.nn.Embedding``); ``H``, ``W`` uniform in ``±1/sqrt(n·m)`` and ``U``
    in ``±1/sqrt(h)`` (``torch.nn.Linear``'s bound, fan-in); ``d`` and ``b`` zero.  The same
    generator state gives bitwise the same parameters.

    Parameters
    ----------
    config : BengioConfig
        The model's shape.
    rng : numpy.random.Generator
        The source of randomness (advanced by the draws).

    Returns
    -------
    BengioParams
        float64 arrays; ``W`` None without direct connections.
    """
    config = _check_config(config)
    if not isinstance(rng, np.random.Generator):
        raise RefAttnTypeError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
    v, n, m, h = config.vocab_size, config.context_size, config.embedding_dim, config.hidden_units
    fan_x, fan_h = 1.0 / math.sqrt(n * m), 1.0 / math.sqrt(h)
    c = rng.standard_normal((v, m))
    hw = rng.uniform(-fan_x, fan_x, (n * m, h))
    u = rng.uniform(-fan_h, fan_h, (h, v))
    w = rng.uniform(-fan_x, fan_x, (n * m, v)) if config.direct_connections else None
    return BengioParams(c, hw, np.zeros(h), u, w, np.zeros(v))


def bengio_forward(params, contexts, config):
    """The logits of the next word: ``y = b + x W + tanh(d + x H) U``, ``x`` the concatenated
    feature vectors ``C[contexts]``.

    Parameters
    ----------
    params : BengioParams
        Of the shapes ``config`` gives; finite.
    contexts : array_like of int, shape (..., n)
        The ``n = config.context_size`` previous word ids of each prediction, oldest first, in
        ``[0, V)``.
    config : BengioConfig
        The model's shape (``direct_connections`` decides whether ``W`` is used, and must be None).

    Returns
    -------
    ndarray of float64, shape (..., V)
        The logits ``y`` (``softmax(y)`` is the model's distribution of the next word).

    Raises
    ------
    RefAttnError
        A parameter of the wrong shape (``params.H: expected shape (6, 5) (from the config), ...``),
        ``W`` given without direct connections, a context of the wrong length, an id out of range.
    """
    return _forward(params, contexts, config).y


def bengio_backward(d_logits, params, contexts, config):
    """Gradients of :func:`bengio_forward` at the parameters::

        db = Σ dy,  dW = Σ xᵀ dy,  dU = Σ tᵀ dy                       t = tanh(a),  a = d + x H
        da = (dy Uᵀ) · (1 − t²),  dd = Σ da,  dH = Σ xᵀ da
        dx = da Hᵀ + dy Wᵀ,  dC[v] = Σ over the context slots holding v of that slot's part of dx

    (sums over the batch; derivation in ``specs/model.md``).

    Parameters
    ----------
    d_logits : array_like, shape (..., V)
        Cotangent of the logits; exactly their shape, finite.
    params, contexts, config
        As :func:`bengio_forward`.

    Returns
    -------
    BengioGrads
        ``(dparams,)``, a :class:`BengioParams` of gradients.
    """
    f = _forward(params, contexts, config)
    p = f.p
    dy = as_cotangent(d_logits, f.y.shape, "d_logits")  # (..., V)
    rows = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731  (..., k) -> (B, k)
    x, t, dy2 = rows(f.x), rows(f.t), rows(dy)
    # y = b + x W + t U
    db = dy2.sum(axis=0)
    dw = None if p.W is None else x.T @ dy2
    du = t.T @ dy2
    # t = tanh(a), a = d + x H
    da = (dy2 @ p.U.T) * (1.0 - t * t)  # (B, h)
    dd, dh = da.sum(axis=0), x.T @ da
    dx = da @ p.H.T  # (B, n·m)
    if p.W is not None:
        dx = dx + dy2 @ p.W.T
    # x = concat(C[ids]): scatter-add each slot's slice into its word's row
    m = p.C.shape[1]
    dc = np.zeros(p.C.shape)
    np.add.at(dc, f.ids.reshape(-1), dx.reshape(-1, m))
    return BengioGrads(BengioParams(dc, dh, dd, du, dw, db))


def bengio_loss_and_grads(params, contexts, targets, config):
    """The mean cross-entropy of the next words and its gradient at the parameters.

    ``loss = cross_entropy(bengio_forward(params, contexts, config), targets)`` (the paper's
    objective without its weight decay: mean negative log-likelihood).

    Parameters
    ----------
    params, contexts, config
        As :func:`bengio_forward`.
    targets : array_like of int, shape (...)
        The next word of each context (contexts' shape without the last axis), in ``[0, V)``; the
        value -100 is ignored (as :func:`refattn.model.layers.cross_entropy`'s ``ignore_index``).

    Returns
    -------
    loss : float
        The mean loss.
    grads : BengioParams
        Its gradient, a tree of params' structure (what :func:`refattn.model.train.train` takes).
    """
    f = _forward(params, contexts, config)
    loss = cross_entropy(f.y, targets)
    dy = cross_entropy_backward(1.0, f.y, targets).dlogits
    return float(loss), bengio_backward(dy, f.p, f.ids, config).dparams


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
