"""Frozen model configurations, validated when built: :class:`LMConfig` (the transformer language
model of :mod:`refattn.model.lm`) and :class:`BengioConfig` (the neural probabilistic language
model of :mod:`refattn.model.bengio`).

A bad field raises :class:`~refattn.RefAttnError` naming it (``LMConfig.n_heads: expected a divisor
of d_model=6, got 4``); ``n_kv_heads=None`` and ``d_ff=None`` are resolved at construction, so a
built config holds integers only (``LMConfig(..., n_kv_heads=None).n_kv_heads == n_heads``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from refattn._validate import RefAttnError, as_choice, as_flag, as_int, as_real

__all__ = ["ACTIVATIONS", "NORMS", "NORM_POSITIONS", "POSITIONS", "BengioConfig", "LMConfig"]

POSITIONS = ("learned", "sinusoidal", "rope", "alibi")
NORMS = ("layer", "rms")
NORM_POSITIONS = ("pre", "post")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")


def _set(obj, name, value):
    object.__setattr__(obj, name, value)  # a frozen dataclass stores its validated fields so


@dataclass(frozen=True)
class LMConfig:
    """The shape and options of a decoder-only transformer language model (:func:`refattn.model.lm.lm_forward`).

    Fields
    ------
    vocab_size : int
        ``V`` >= 1, the number of token ids (``vocab=`` is taken as an alias, and ``config.vocab``
        reads it).
    d_model : int
        ``E`` >= 1, the residual width; ``n_heads`` divides it (head dim ``dk = E / n_heads``).
    n_layers : int
        ``L`` >= 0 transformer blocks.
    n_heads : int
        ``H`` >= 1 query heads.
    n_kv_heads : int, optional
        ``Hk``, dividing ``H`` (GQA; 1 is MQA).  Default None: ``H`` (resolved at construction).
    d_ff : int, optional
        ``F`` >= 1, the MLP's hidden width.  Default None: ``4 · E`` (resolved at construction).
    max_len : int, default 1024
        The longest sequence ``T`` the model takes (the rows of the learned table ``wpe``).
    positions : {"learned", "sinusoidal", "rope", "alibi"}, default "learned"
        How positions enter: a learned table ``wpe (max_len, E)`` added to the token embeddings
        (GPT-2); the fixed sinusoidal table of Vaswani et al. added likewise; RoPE on each head's
        q and k (half-rotation pairs, GPT-NeoX/Llama; needs an even ``dk``); ALiBi, a per-head
        linear distance bias on the scores (Press et al.).
    norm : {"layer", "rms"}, default "layer"
        LayerNorm (biased variance, as torch; a bias when ``bias``) or RMSNorm (weight only).
    norm_position : {"pre", "post"}, default "pre"
        Pre-norm ``x + f(norm(x))`` with a final norm ``ln_f`` (GPT-2, Llama), or post-norm
        ``norm(x + f(x))`` without one (Vaswani et al., GPT-1, BERT).
    activation : {"gelu", "gelu_tanh", "relu", "swiglu"}, default "gelu"
        The MLP's activation (:func:`refattn.model.layers.mlp`); ``"swiglu"`` adds a gate weight.
    tied_embeddings : bool, default True
        Logits ``x wteᵀ`` (no ``lm_head``), or ``x lm_head`` with its own ``(E, V)`` weight.
    causal : bool, default True
        Each position attends itself and earlier positions only (a decoder).
    bias : bool, default True
        Biases in the attention and MLP projections and in LayerNorm (GPT-2); False for none (Llama).
    norm_eps : float, default 1e-5
        The ``eps`` of every norm, > 0.
    rope_base : float, default 10000.0
        RoPE's frequency base, > 0 (used with ``positions="rope"`` only).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    d_ff: int | None = None
    max_len: int = 1024
    positions: str = "learned"
    norm: str = "layer"
    norm_position: str = "pre"
    activation: str = "gelu"
    tied_embeddings: bool = True
    causal: bool = True
    bias: bool = True
    norm_eps: float = 1e-5
    rope_base: float = 10000.0

    def __post_init__(self):
        def f(name):
            return f"LMConfig.{name}"

        for name, minimum in (("vocab_size", 1), ("d_model", 1), ("n_layers", 0), ("n_heads", 1), ("max_len", 1)):
            _set(self, name, as_int(getattr(self, name), f(name), minimum=minimum))
        if self.d_model % self.n_heads:
            raise RefAttnError(f"{f('n_heads')}: expected a divisor of d_model={self.d_model}, got {self.n_heads}")
        kv = self.n_heads if self.n_kv_heads is None else as_int(self.n_kv_heads, f("n_kv_heads"), minimum=1)
        if self.n_heads % kv:
            raise RefAttnError(f"{f('n_kv_heads')}: expected a divisor of n_heads={self.n_heads}, got {kv}")
        _set(self, "n_kv_heads", kv)
        _set(self, "d_ff", 4 * self.d_model if self.d_ff is None else as_int(self.d_ff, f("d_ff"), minimum=1))
        as_choice(self.positions, f("positions"), POSITIONS)
        as_choice(self.norm, f("norm"), NORMS)
        as_choice(self.norm_position, f("norm_position"), NORM_POSITIONS)
        as_choice(self.activation, f("activation"), ACTIVATIONS)
        for name in ("tied_embeddings", "causal", "bias"):
            _set(self, name, as_flag(getattr(self, name), f(name)))
        for name in ("norm_eps", "rope_base"):
            _set(self, name, as_real(getattr(self, name), f(name), positive=True, allow_none=False))
        if self.positions == "rope" and self.head_dim % 2:
            raise RefAttnError(
                f"{f('positions')}: expected an even head dim d_model / n_heads for 'rope' (it rotates pairs of "
                f"dims), got {self.d_model} / {self.n_heads} = {self.head_dim}"
            )

    @property
    def head_dim(self):
        """``dk = d_model / n_heads``, the per-head width of q, k and v."""
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class BengioConfig:
    """The shape of Bengio et al. (2003)'s neural probabilistic language model
    (:func:`refattn.model.bengio.bengio_forward`).

    Fields
    ------
    vocab_size : int
        ``V`` >= 1 word ids (``vocab=`` is taken as an alias).
    context_size : int
        ``n`` >= 1 previous words the model reads (the paper's ``n - 1``).
    embedding_dim : int
        ``m`` >= 1, the width of each word's feature vector (the rows of ``C``).
    hidden_units : int
        ``h`` >= 1 tanh units.
    direct_connections : bool, default True
        The direct embedding-to-output weights ``W`` (the paper's optional linear path).
    """

    vocab_size: int
    context_size: int
    embedding_dim: int
    hidden_units: int
    direct_connections: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "context_size", "embedding_dim", "hidden_units"):
            _set(self, name, as_int(getattr(self, name), f"BengioConfig.{name}", minimum=1))
        _set(self, "direct_connections", as_flag(self.direct_connections, "BengioConfig.direct_connections"))


def _vocab_alias(cls):
    """Let ``cls(vocab=V, ...)`` mean ``cls(vocab_size=V, ...)`` (the shorter name some configs use),
    and give it a read-only ``vocab`` property."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, vocab=None, **kwargs):
        if vocab is not None:
            if args or "vocab_size" in kwargs:
                raise RefAttnError(f"{cls.__name__}.vocab: give vocab_size or its alias vocab, not both")
            kwargs["vocab_size"] = vocab
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    cls.vocab = property(lambda self: self.vocab_size, doc="``vocab_size`` under its shorter name.")
    return cls


_vocab_alias(LMConfig)
_vocab_alias(BengioConfig)
