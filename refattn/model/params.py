"""Parameter trees of the models and their deterministic initialisation.

A *tree* is a NamedTuple (or tuple) whose fields are arrays, None (an absent parameter: a bias of a
bias-free model) or trees.  The language model's is::

    LMParams(wte (V, E), wpe (max_len, E) | None, blocks: (BlockParams, ...) one per layer,
             ln_f: NormParams | None, lm_head (E, V) | None)
    BlockParams(ln_1: NormParams, attn: MHAParams, ln_2: NormParams, mlp: MLPParams)
    NormParams(weight (E,), bias (E,) | None)

with :class:`refattn.attention.multihead.MHAParams` ``(w_q (E, H·dk), w_k (E, Hk·dk),
w_v (E, Hk·dk), w_o (H·dk, E), b_q, b_k, b_v, b_o)`` and :class:`refattn.model.layers.MLPParams`
``(w_in (E, F), b_in (F,), w_out (F, E), b_out (E,), w_gate (E, F) | None)``.  Weights are
``(in, out)``: a layer computes ``x @ w + b``.  Gradients are trees of the same structure (None
where the parameter is None), so :func:`tree_map` combines a tree with its gradient.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from refattn._validate import RefAttnError, RefAttnTypeError, as_int, as_real, check_keywords_of
from refattn.attention.multihead import MHAParams
from refattn.model.config import BengioConfig, LMConfig
from refattn.model.layers import MLPParams

__all__ = [
    "BlockParams",
    "LMParams",
    "NormParams",
    "init_params",
    "param_shapes",
    "tree_items",
    "tree_leaves",
    "tree_map",
]


class NormParams(NamedTuple):
    """The weights of one LayerNorm or RMSNorm over the last axis.

    Fields
    ------
    weight : ndarray, shape (E,)
        The gain (initialised to ones).
    bias : ndarray, shape (E,), or None
        The shift of a LayerNorm with ``bias`` (zeros); None for RMSNorm and bias-free models.
    """

    weight: np.ndarray
    bias: np.ndarray | None = None


class BlockParams(NamedTuple):
    """The weights of one transformer block.

    Fields
    ------
    ln_1 : NormParams
        The norm before (pre-norm) or after (post-norm) the attention sub-layer.
    attn : MHAParams
        ``w_q (E, H·dk)``, ``w_k (E, Hk·dk)``, ``w_v (E, Hk·dk)``, ``w_o (H·dk, E)`` and the biases
        ``b_q``, ``b_k``, ``b_v``, ``b_o`` (None without ``bias``).
    ln_2 : NormParams
        The norm of the MLP sub-layer.
    mlp : MLPParams
        ``w_in (E, F)``, ``b_in (F,)``, ``w_out (F, E)``, ``b_out (E,)``, ``w_gate (E, F)`` (swiglu
        only; None otherwise).
    """

    ln_1: NormParams
    attn: MHAParams
    ln_2: NormParams
    mlp: MLPParams


class LMParams(NamedTuple):
    """The weights of the transformer language model (:func:`refattn.model.lm.lm_forward`).

    Fields
    ------
    wte : ndarray, shape (V, E)
        Token embeddings (also the output projection when the embeddings are tied).
    wpe : ndarray, shape (max_len, E), or None
        Learned position embeddings; None for sinusoidal, RoPE and ALiBi positions.
    blocks : tuple of BlockParams
        One per layer, first to last.
    ln_f : NormParams or None
        The final norm of a pre-norm model; None for post-norm.
    lm_head : ndarray, shape (E, V), or None
        The output projection of an untied model; None when tied (``wte.T`` is used).
    """

    wte: np.ndarray
    wpe: np.ndarray | None
    blocks: tuple
    ln_f: NormParams | None
    lm_head: np.ndarray | None


def _is_tree(x):
    return isinstance(x, tuple)


def _rebuild(like, items):
    return type(like)(*items) if hasattr(like, "_fields") else type(like)(items)


def _names(tree):
    return getattr(tree, "_fields", None) or [str(i) for i in range(len(tree))]


def tree_map(fn, *trees):
    """``fn`` applied leaf by leaf to trees of one structure: a tree of the results.

    Parameters
    ----------
    fn : callable
        ``fn(leaf, *other_leaves)`` for every leaf (every field that is neither a tuple nor None).
    *trees : NamedTuple or tuple
        One or more trees of the same structure (same types, same lengths, None in the same places),
        e.g. a parameter tree and its gradient.

    Returns
    -------
    tree
        The first tree's structure, ``fn``'s results at the leaves and None where the trees hold None.

    Raises
    ------
    RefAttnError
        The trees differ in structure (the message names the first place, e.g. ``blocks.1.attn.b_q``).
    """
    if not trees:
        raise RefAttnError("trees: expected at least one tree, got none")
    return _map(fn, trees, "")


def _map(fn, trees, path):
    first = trees[0]
    if first is None:
        if any(t is not None for t in trees[1:]):
            raise RefAttnError(f"trees: expected None at {path or 'the root'} in every tree (as in the first)")
        return None
    if _is_tree(first):
        for t in trees[1:]:
            if not _is_tree(t) or type(t) is not type(first) or len(t) != len(first):
                raise RefAttnError(
                    f"trees: expected a {type(first).__name__} of {len(first)} at {path or 'the root'} in every tree, "
                    f"got {type(t).__name__}"
                )
        return _rebuild(
            first,
            [_map(fn, [t[i] for t in trees], f"{path}.{n}" if path else n) for i, n in enumerate(_names(first))],
        )
    if any(t is None or _is_tree(t) for t in trees[1:]):
        raise RefAttnError(f"trees: expected a leaf at {path or 'the root'} in every tree (as in the first)")
    return fn(*trees)


def tree_items(tree):
    """The leaves of a tree with their dotted names, depth first in field order.

    Parameters
    ----------
    tree : NamedTuple or tuple
        A parameter tree (or a gradient tree).

    Returns
    -------
    list of (str, leaf)
        ``("wte", ...)``, ``("blocks.0.ln_1.weight", ...)``, ``("blocks.0.attn.w_q", ...)``, ...; None
        fields are skipped.
    """
    out = []

    def walk(t, path):
        if t is None:
            return
        if _is_tree(t):
            for n, item in zip(_names(t), t):
                walk(item, f"{path}.{n}" if path else n)
        else:
            out.append((path, t))

    walk(tree, "")
    return out


def tree_leaves(tree):
    """The leaves of a tree, depth first in field order (None fields skipped).

    Parameters
    ----------
    tree : NamedTuple or tuple
        A parameter tree (or a gradient tree).

    Returns
    -------
    list
        The leaves, in the order of :func:`tree_items`.
    """
    return [leaf for _, leaf in tree_items(tree)]


def _norm_shapes(config):
    e = (config.d_model,)
    return NormParams(e, e if config.bias and config.norm == "layer" else None)


def param_shapes(config):
    """The shape of every parameter of the language model of ``config``.

    Parameters
    ----------
    config : LMConfig
        The model.

    Returns
    -------
    LMParams
        A tree of shape tuples (None where the parameter is absent): ``wte (V, E)``, ``wpe
        (max_len, E)`` for learned positions, per block the norms ``(E,)``, ``w_q (E, H·dk)``,
        ``w_k``/``w_v (E, Hk·dk)``, ``w_o (H·dk, E)``, the MLP's ``(E, F)``/``(F, E)``, ...
    """
    if not isinstance(config, LMConfig):
        raise RefAttnTypeError(f"config: expected an LMConfig, got {type(config).__name__}")
    e, v, f = config.d_model, config.vocab_size, config.d_ff
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    b = config.bias
    attn = MHAParams((e, q), (e, kv), (e, kv), (q, e), (q,) if b else None, (kv,) if b else None,
                     (kv,) if b else None, (e,) if b else None)  # fmt: skip
    mlp = MLPParams((e, f), (f,) if b else None, (f, e), (e,) if b else None,
                    (e, f) if config.activation == "swiglu" else None)  # fmt: skip
    block = BlockParams(_norm_shapes(config), attn, _norm_shapes(config), mlp)
    return LMParams(
        (v, e),
        (config.max_len, e) if config.positions == "learned" else None,
        tuple(block for _ in range(config.n_layers)),
        _norm_shapes(config) if config.norm_position == "pre" else None,
        None if config.tied_embeddings else (e, v),
    )


def _is_shape(x):
    return isinstance(x, tuple) and not hasattr(x, "_fields") and len(x) > 0 and all(isinstance(n, int) for n in x)


def init_params(config, seed, *, std=None, scale_residual=None):
    """Deterministic initial parameters for ``config``.

    For an :class:`~refattn.model.config.LMConfig` (GPT-2's scheme): every weight matrix
    ``N(0, std²)``, drawn in the order of :func:`tree_items` (``wte``, ``wpe``, then block by block
    ``w_q, w_k, w_v, w_o, w_in, w_out, w_gate``, then ``lm_head``); the residual projections
    ``w_o`` and ``mlp.w_out`` with ``std / sqrt(2 · n_layers)`` when ``scale_residual``; biases 0;
    norm weights 1.  For a :class:`~refattn.model.config.BengioConfig`:
    :func:`refattn.model.bengio.init_bengio_params` with the same generator.  The generator is
    ``numpy.random.Generator(PCG64(seed))``: the same seed gives bitwise the same parameters.

    Parameters
    ----------
    config : LMConfig or BengioConfig
        The model.
    seed : int
        >= 0, seeds the generator.
    std : float, optional
        LMConfig only: the weights' standard deviation, > 0.  Default None: 0.02.
    scale_residual : bool, optional
        LMConfig only: scale ``w_o`` and ``mlp.w_out`` by ``1 / sqrt(2 · n_layers)``.  Default None:
        True (GPT-2).

    Returns
    -------
    LMParams or BengioParams
        float64 arrays.
    """
    seed = as_int(seed, "seed", minimum=0)
    rng = np.random.Generator(np.random.PCG64(seed))
    if isinstance(config, BengioConfig):
        for name, value in (("std", std), ("scale_residual", scale_residual)):
            if value is not None:
                raise RefAttnError(f"{name}: an LMConfig option; expected None for a BengioConfig, got {value!r}")
        from refattn.model.bengio import init_bengio_params

        return init_bengio_params(config, rng)
    if not isinstance(config, LMConfig):
        raise RefAttnTypeError(f"config: expected an LMConfig or a BengioConfig, got {type(config).__name__}")
    std = 0.02 if std is None else as_real(std, "std", positive=True, allow_none=False)
    if scale_residual is None:
        scale_residual = True
    elif not isinstance(scale_residual, (bool, np.bool_)):
        raise RefAttnTypeError(f"scale_residual: expected True or False, got {type(scale_residual).__name__}")
    residual_std = std / math.sqrt(2 * config.n_layers) if scale_residual and config.n_layers else std

    def fill(path, shape):
        field = path.rsplit(".", 1)[-1]
        if len(shape) == 2:
            return rng.normal(0.0, residual_std if field in ("w_o", "w_out") else std, shape)
        return np.ones(shape) if field == "weight" else np.zeros(shape)

    return _fill(param_shapes(config), "", fill)


def _fill(shapes, path, fill):
    """The tree of ``fill(path, shape)`` over a tree of shapes, depth first in field order."""
    if shapes is None:
        return None
    if _is_shape(shapes):
        return fill(path, shapes)
    return _rebuild(shapes, [_fill(s, f"{path}.{n}" if path else n, fill) for n, s in zip(_names(shapes), shapes)])


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
