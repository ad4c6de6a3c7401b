"""Recompute every attention layer of a Hugging Face model with refattn, from the model's own weights.

Forward hooks on each attention module record what it received (hidden states, the additive
attention mask, RoPE's position embeddings) and what it returned (attention output before the output
projection, attention weights).  refattn then recomputes q, k, v from the module's projections, the
weights with :func:`refattn.attention_weights` and the output with :func:`refattn.sdpa`, and the two
are compared.  Supported module layouts (``specs/adapters.md``):

* BERT-style ``query``/``key``/``value`` linears (``BertSelfAttention``);
* GPT-2's fused ``c_attn`` (a Conv1D, ``x @ W + b``), causal;
* Llama-style ``q_proj``/``k_proj``/``v_proj`` with GQA and rotate-half RoPE (Llama, Mistral, Qwen2).
  Their eager attention computes the softmax in float32 even in a float64 model; a layer whose
  returned weights are all float32 values is judged at ``FLOAT32_SOFTMAX_TOLERANCE``, the others
  at ``tolerance`` (1e-10).
  q and k are rotated with the model's own ``(cos, sin)``: Hugging Face computes the RoPE angles in
  float32 even in a float64 model, so :func:`refattn.rope` (float64 angles) differs from them by
  ~1e-8; that difference is reported per layer as ``rope_error``.

Models are built from configs with random weights (:func:`tiny_model`): nothing is downloaded.
Run them in float64 (``model.double()``) with ``attn_implementation="eager"``, the path that
returns attention weights.

:func:`attention_attribution` runs a model and streams its per-layer maps to
:func:`refattn.metrics.attention_attribution`.

Whole-model mapping (``specs/adapters.md``, "Whole-model mapping"): :func:`params_from_hf` reads a
``GPT2LMHeadModel`` or ``LlamaForCausalLM`` into refattn's :class:`~refattn.model.params.LMParams`
and :class:`~refattn.model.config.LMConfig`, :func:`to_hf` builds the Hugging Face model of an
LMParams, and :func:`grads_from_hf` maps the model's ``.grad`` tensors by the same table, so
refattn's hand-written gradients (:func:`refattn.model.lm.lm_loss_and_grads`) can be checked
against autograd parameter by parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from refattn._validate import RefAttnError, RefAttnTypeError, Unsupported, as_float, check_keywords_of
from refattn.attention.position import rope
from refattn.attention.sdpa import attention_weights, sdpa

__all__ = [
    "LayerCheck",
    "ModelCheck",
    "attention_attribution",
    "check_model",
    "grads_from_hf",
    "model_attentions",
    "params_from_hf",
    "tiny_model",
    "to_hf",
]

ARCHITECTURES = ("bert", "gpt2", "llama")
FLOAT32_SOFTMAX_TOLERANCE = 1e-6  # weights that are float32 values: ~2⁻²⁴ relative, times a margin


def _imports():
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise RefAttnError("refattn.adapters.transformers needs: pip install 'refattn[transformers]'") from exc
    return torch, transformers


def tiny_model(kind, *, seed=0, layers=2, hidden=32, heads=4, kv_heads=2, vocab=64, positions=128):
    """A small float64 Hugging Face model with random weights, built from a config (nothing is
    downloaded), in eval mode with eager attention (the path that returns attention weights).

    Needs ``pip install 'refattn[transformers]'``.

    Parameters
    ----------
    kind : {"bert", "gpt2", "llama"}
        ``"bert"``: ``BertModel`` (no pooler); ``"gpt2"``: ``GPT2Model``, causal; ``"llama"``:
        ``LlamaModel``, causal, GQA with ``kv_heads``, rotate-half RoPE.
    seed : int, default 0
        ``torch.manual_seed`` before the weights are drawn.
    layers : int, default 2
        Transformer blocks.
    hidden : int, default 32
        Hidden size (``heads · head dim``); the MLP is ``2 · hidden`` wide.
    heads : int, default 4
        Attention heads; divides ``hidden``.
    kv_heads : int, default 2
        Key/value heads (Llama only); divides ``heads``.
    vocab : int, default 64
        Vocabulary size: token ids are in ``[0, vocab)``.
    positions : int, default 128
        Maximum sequence length.

    Returns
    -------
    torch.nn.Module
        The model, ``.double().eval()``.
    """
    torch, tf = _imports()
    if kind not in ARCHITECTURES:
        raise RefAttnError(f"kind: expected one of {ARCHITECTURES}, got {kind!r}")
    torch.manual_seed(seed)
    common = {"attn_implementation": "eager"}
    if kind == "bert":
        config = tf.BertConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=2 * hidden,
            max_position_embeddings=positions,
            **common,
        )
        model = tf.BertModel(config, add_pooling_layer=False)
    elif kind == "gpt2":
        config = tf.GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=positions,
            bos_token_id=0,
            eos_token_id=0,
            **common,
        )
        model = tf.GPT2Model(config)
    else:
        config = tf.LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=positions,
            **common,
        )
        model = tf.LlamaModel(config)
    return model.double().eval()


@dataclass
class LayerCheck:
    """refattn against the model on one attention layer: the largest absolute differences of the
    attention weights and of the layer's output.

    Fields: ``layer`` (index, first layer 0), ``module`` (its class name), ``weights_error`` and
    ``output_error`` (``max |refattn − model|``), ``rope_error`` (:func:`refattn.rope` with float64
    angles against the model's float32 ones, on q; 0 without RoPE), ``softmax_dtype``
    (``"float32"`` when every weight the model returned is a float32 value) and ``tolerance``
    (what the layer is judged at).  :attr:`passed`: both errors within the tolerance.
    """

    layer: int
    module: str
    weights_error: float
    output_error: float  # of the module's output (after the output projection for GPT-2 and Llama)
    rope_error: float = 0.0  # refattn.rope (float64 angles) vs the model's cos/sin, on q
    softmax_dtype: str = "float64"  # "float32" when every weight the model returned is a float32 value
    tolerance: float = 1e-10

    @property
    def passed(self):
        return max(self.weights_error, self.output_error) <= self.tolerance


@dataclass
class ModelCheck:
    """Every attention layer of a model recomputed by refattn (returned by :func:`check_model`).

    Fields: ``architecture`` (the model's class name), ``layers`` (a :class:`LayerCheck` per
    layer) and ``attentions`` (the model's maps, a NumPy ``(B, H, L, L)`` array per layer, first
    layer first: ready for :func:`refattn.rollout` and the metrics).  :attr:`max_error` is the
    largest error of any layer, :attr:`passed` whether every layer passed.
    """

    architecture: str
    layers: list = field(default_factory=list)
    attentions: list = field(default_factory=list)

    @property
    def max_error(self):
        return max(max(c.weights_error, c.output_error) for c in self.layers)

    @property
    def passed(self):
        return all(c.passed for c in self.layers)

    def report(self):
        """A readable summary: one line for the model, one per layer (its errors and tolerance,
        the RoPE-angle difference, a float32 softmax)."""
        status = "ok" if self.passed else "FAIL"
        lines = [f"{self.architecture}: {len(self.layers)} layers, max error {self.max_error:.2e} ({status})"]
        for c in self.layers:
            note = f", RoPE angles vs refattn.rope {c.rope_error:.1e}" if c.rope_error else ""
            if c.softmax_dtype != "float64":
                note += f"; the model's softmax ran in {c.softmax_dtype}"
            errors = f"weights {c.weights_error:.2e}, output {c.output_error:.2e} (tolerance {c.tolerance:.0e})"
            lines.append(f"  layer {c.layer} ({c.module}): {errors}{note}")
        return "\n".join(lines)


def _np(t):
    return t.detach().to("cpu").double().numpy()


def _attention_modules(model):
    """``[(index, module, architecture)]`` in layer order."""
    found = []
    for module in model.modules():
        if hasattr(module, "query") and hasattr(module, "key") and hasattr(module, "value"):
            found.append((module, "bert"))
        elif hasattr(module, "c_attn") and not getattr(module, "is_cross_attention", False):
            found.append((module, "gpt2"))
        elif all(hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj")):
            found.append((module, "llama"))
    if not found:
        raise Unsupported("model: no attention module of a supported layout (query/key/value, c_attn, q_proj/...)")
    return [(i, m, arch) for i, (m, arch) in enumerate(found)]


def _mask_from_additive(mask, shape):
    """HF's additive mask (0 keep, dtype-min drop) → refattn's (bool mask, float bias or None)."""
    if mask is None:
        return None, None
    m = _np(mask)
    if m.dtype == bool:
        return np.broadcast_to(m, shape), None
    keep = m > np.finfo(np.float64).min / 2
    bias = np.where(keep, m, 0.0)
    return keep, (bias if np.any(bias) else None)


def _heads(x, n_heads):
    """(B, L, H·D) → (B, H, L, D)."""
    b, length, width = x.shape
    return x.reshape(b, length, n_heads, width // n_heads).transpose(0, 2, 1, 3)


def _linear(x, layer):
    w = _np(layer.weight)
    y = x @ w.T
    return y if layer.bias is None else y + _np(layer.bias)


def _recompute(module, arch, hidden, kwargs, config):
    """refattn's (P, out (B, L, H·D)) for one module call."""
    x = _np(hidden)
    if arch == "bert":
        heads = module.num_attention_heads
        q, k, v = (_heads(_linear(x, getattr(module, n)), heads) for n in ("query", "key", "value"))
        opts = {"scale": float(module.scaling)}
    elif arch == "gpt2":
        width = module.embed_dim
        qkv = x @ _np(module.c_attn.weight) + _np(module.c_attn.bias)  # Conv1D: x W + b
        q, k, v = (_heads(qkv[..., i * width : (i + 1) * width], module.num_heads) for i in range(3))
        opts = {"scale": float(module.scaling)}
    else:
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        q = _heads(_linear(x, module.q_proj), heads)
        k, v = (_heads(_linear(x, getattr(module, n)), kv_heads) for n in ("k_proj", "v_proj"))
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", 1e4))
        if (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default") != "default":
            raise Unsupported("rope_type other than 'default' (scaled RoPE) is not translated")
        ours = rope(q, np.arange(x.shape[-2]), base=float(theta), style="half")
        q, k, rope_error = _rotate_as_the_model(q, k, kwargs["position_embeddings"], ours)
        opts = {"scale": float(module.scaling)}
    keep, bias = _mask_from_additive(kwargs.get("attention_mask"), q.shape[:-2] + (q.shape[-2], k.shape[-2]))
    if arch in ("gpt2", "llama") and keep is None:
        opts.update(causal=True, align="top_left")
    opts.update(mask=keep, bias=bias)
    p = attention_weights(q, k, **opts)
    out = sdpa(q, k, v, **opts)  # (B, H, L, Dv)
    out = out.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1)  # (B, L, H·Dv)
    if arch == "gpt2":
        out = out @ _np(module.c_proj.weight) + _np(module.c_proj.bias)
    elif arch == "llama":
        out = _linear(out, module.o_proj)
    return p, out, (rope_error if arch == "llama" else 0.0)


def _rotate_as_the_model(q, k, position_embeddings, ours):
    """Rotate-half RoPE with the model's own ``(cos, sin) (B, L, D)``; also the largest difference
    between refattn's rotation of q (float64 angles) and the model's (HF computes them in float32)."""
    cos, sin = (_np(t)[:, None] for t in position_embeddings)  # (B, 1, L, D)

    def rotate(x):
        half = x.shape[-1] // 2
        return x * cos + np.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin

    q_model = rotate(q)
    return q_model, rotate(k), float(np.max(np.abs(ours - q_model)))


def check_model(model, input_ids, *, attention_mask=None, tolerance=1e-10):
    """Run a Hugging Face model, recompute every attention layer with refattn from the layer's own
    inputs and weights, and compare.

    For each attention module, forward hooks record its hidden states, additive attention mask and
    RoPE ``(cos, sin)``; refattn recomputes q, k, v with the module's projections, the weights with
    :func:`refattn.attention_weights` and the output with :func:`refattn.sdpa`.  Supported layouts:
    BERT-style ``query``/``key``/``value``, GPT-2's fused ``c_attn``, Llama-style
    ``q_proj``/``k_proj``/``v_proj`` (GQA, default RoPE) (``specs/adapters.md``).  Axes: ``B``
    batch, ``L`` tokens, ``H`` heads.

    Parameters
    ----------
    model : torch.nn.Module
        A model run in float64 with ``attn_implementation="eager"`` (e.g. :func:`tiny_model`).
    input_ids : array_like of int, shape (B, L)
        Token ids.
    attention_mask : array_like of int or bool, shape (B, L), optional
        Hugging Face's padding mask (1 = real token).  Default None: every token real.
    tolerance : float, default 1e-10
        The largest error a layer passes with; a layer whose returned weights are float32 values
        (Llama-style eager attention computes its softmax in float32) is judged at
        ``FLOAT32_SOFTMAX_TOLERANCE`` (1e-6) instead.

    Returns
    -------
    ModelCheck
        Per-layer errors, the verdict and the model's attention maps.

    Raises
    ------
    Unsupported
        No attention module of a supported layout, or a scaled RoPE (``rope_type`` other than
        ``"default"``).
    """
    modules = _attention_modules(model)
    calls = {}

    def hook(index):
        def record(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            calls[index] = (hidden, dict(kwargs), output)

        return record

    handles = [m.register_forward_hook(hook(i), with_kwargs=True) for i, m, _ in modules]
    try:
        attentions = model_attentions(model, input_ids, attention_mask=attention_mask)
    finally:
        for h in handles:
            h.remove()
    check = ModelCheck(type(model).__name__, attentions=attentions)
    for i, module, arch in modules:
        hidden, kwargs, output = calls[i]
        p, out, rope_error = _recompute(module, arch, hidden, kwargs, model.config)
        weights = _np(output[1])
        weights_error = float(np.max(np.abs(p - weights)))
        output_error = float(np.max(np.abs(out - _np(output[0]))))
        # Llama-style eager attention computes its softmax in float32 even in a float64 model
        softmax_dtype = "float32" if np.array_equal(weights.astype(np.float32), weights) else "float64"
        tol = tolerance if softmax_dtype == "float64" else FLOAT32_SOFTMAX_TOLERANCE
        name = type(module).__name__
        check.layers.append(LayerCheck(i, name, weights_error, output_error, rope_error, softmax_dtype, tol))
    return check


def model_attentions(model, input_ids, *, attention_mask=None):
    """The attention maps a Hugging Face model returns (``output_attentions=True``), as NumPy.

    Parameters
    ----------
    model : torch.nn.Module
        A model with eager attention (the path that returns weights).
    input_ids : array_like of int, shape (B, L)
        Token ids.
    attention_mask : array_like of int or bool, shape (B, L), optional
        Hugging Face's padding mask (1 = real token).  Default None.

    Returns
    -------
    list of ndarray of float64, each shape (B, H, L, L)
        One map per layer, first layer first (query rows, key columns); run without gradients.
    """
    torch, _ = _imports()
    with torch.no_grad():
        ids = torch.as_tensor(np.asarray(input_ids))
        mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask))
        result = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    return [_np(a) for a in result.attentions]


def _real_tokens(attention_mask, shape):
    """Hugging Face's padding mask (1 = real token; int or bool) → refattn's bool ``(B, T)``."""
    if attention_mask is None:
        return None
    m = np.asarray(attention_mask.cpu() if hasattr(attention_mask, "cpu") else attention_mask)
    if m.shape != tuple(shape):
        raise RefAttnError(f"attention_mask: expected the shape of input_ids {tuple(shape)}, got {m.shape}")
    if m.dtype != bool and not np.isin(m, (0, 1)).all():
        raise RefAttnError("attention_mask: expected 0/1 (or bool) entries, 1 = a real token")
    return m.astype(bool)


def attention_attribution(model, input_ids, attention_mask=None, *, residual=0.5, chunk_size=None):
    """Run a Hugging Face model with ``output_attentions=True`` and stream its maps, layer by layer, to
    :func:`refattn.metrics.attention_attribution`.

    The model's per-layer attentions are converted to NumPy one layer at a time (a generator: no
    stacked copy); each torch layer is dropped once it has been read.  ``attention_mask`` is also the
    real-token ``mask`` of the attribution, so padded positions are left out.  Axes: ``B`` batch,
    ``T`` tokens.

    Parameters
    ----------
    model : torch.nn.Module
        A model with eager attention (the path that returns attention weights), e.g.
        :func:`tiny_model` or :func:`to_hf`'s; run without gradients.
    input_ids : array_like of int, shape (B, T)
        Token ids.
    attention_mask : array_like of int or bool, shape (B, T), optional
        Hugging Face's padding mask (1 = real token).  Default None: every token real.
    residual : float, default 0.5
        The rollout's identity weight, as :func:`refattn.metrics.attention_attribution`'s.
    chunk_size : int, optional
        Examples per batch slice, as :func:`refattn.metrics.attention_attribution`'s.  Default None:
        the whole batch.

    Returns
    -------
    attribution : dict
        :func:`refattn.metrics.attention_attribution`'s eight entries (``(B, T)`` arrays,
        ``batch_size``, ``seq_length``).

    Raises
    ------
    RefAttnError
        An ``attention_mask`` of another shape than ``input_ids`` or with entries other than 0/1, a
        model that returned no attentions (not eager), or the attribution's own refusals.
    """
    torch, _ = _imports()
    from refattn.metrics.attribution import attention_attribution as attribution

    ids = np.asarray(input_ids)
    real = _real_tokens(attention_mask, ids.shape)
    with torch.no_grad():
        mask = None if attention_mask is None else torch.as_tensor(real.astype(np.int64))
        result = model(input_ids=torch.as_tensor(ids), attention_mask=mask, output_attentions=True)
    layers = list(result.attentions or ())
    del result
    if not layers or any(a is None for a in layers):
        raise RefAttnError("model: returned no attention weights (build it with attn_implementation='eager')")

    def stream():
        while layers:
            yield _np(layers.pop(0))  # the torch layer is released as it is read

    return attribution(stream(), mask=real, residual=residual, chunk_size=chunk_size)


# ---- whole-model mapping: refattn.model's LMParams <-> GPT2LMHeadModel / LlamaForCausalLM ----------

_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def _family(model):
    """``"gpt2"`` or ``"llama"`` for a causal-LM model of a supported family."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in ("gpt2", "llama"):
        raise Unsupported(
            f"model: expected a GPT2LMHeadModel or a LlamaForCausalLM, got {type(model).__name__} (model_type {kind!r})"
        )
    names = {n for n, _ in model.named_parameters()}
    embedding = "transformer.wte.weight" if kind == "gpt2" else "model.embed_tokens.weight"
    if embedding not in names:
        raise Unsupported(
            f"model: expected the causal-LM class ({'GPT2LMHeadModel' if kind == 'gpt2' else 'LlamaForCausalLM'}) "
            f"with its LM head, got {type(model).__name__}"
        )
    return kind


def _config_from_hf(c, kind):
    """The :class:`~refattn.model.config.LMConfig` of a Hugging Face config (Unsupported for the options
    refattn's language model does not have)."""
    from refattn.model.config import LMConfig

    def refuse(field, why):
        raise Unsupported(f"model.config.{field}: {why}")

    if kind == "gpt2":
        if c.activation_function not in _GPT2_ACTIVATIONS:
            refuse("activation_function", f"expected one of {sorted(_GPT2_ACTIVATIONS)}, got {c.activation_function!r}")
        if not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx:
            refuse("scale_attn_weights", "only the 1/sqrt(head dim) scale is translated")
        if getattr(c, "add_cross_attention", False):
            refuse("add_cross_attention", "a decoder-only model is expected")
        return LMConfig(
            vocab_size=c.vocab_size,
            d_model=c.n_embd,
            n_layers=c.n_layer,
            n_heads=c.n_head,
            d_ff=c.n_inner or 4 * c.n_embd,
            max_len=c.n_positions,
            positions="learned",
            norm="layer",
            norm_position="pre",
            activation=_GPT2_ACTIVATIONS[c.activation_function],
            tied_embeddings=bool(c.tie_word_embeddings),
            causal=True,
            bias=True,
            norm_eps=c.layer_norm_epsilon,
        )
    if c.hidden_act != "silu":
        refuse("hidden_act", f"expected 'silu' (SwiGLU), got {c.hidden_act!r}")
    rope = getattr(c, "rope_parameters", None) or {}
    for scaling in (rope, getattr(c, "rope_scaling", None) or {}):  # rope_scaling: before transformers 5
        if (scaling.get("rope_type") or scaling.get("type") or "default") != "default":
            refuse("rope_parameters", "a scaled RoPE (rope_type other than 'default') is not translated")
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        refuse("head_dim", f"expected hidden_size / num_attention_heads, got {head_dim}")
    if c.attention_bias or c.mlp_bias:
        refuse("attention_bias", "biases are not translated (SwiGLU's gate has no bias in refattn)")
    if (getattr(c, "pretraining_tp", 1) or 1) != 1:
        refuse("pretraining_tp", f"expected 1, got {c.pretraining_tp}")
    return LMConfig(
        vocab_size=c.vocab_size,
        d_model=c.hidden_size,
        n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads or c.num_attention_heads,
        d_ff=c.intermediate_size,
        max_len=c.max_position_embeddings,
        positions="rope",
        norm="rms",
        norm_position="pre",
        activation="swiglu",
        tied_embeddings=bool(c.tie_word_embeddings),
        causal=True,
        bias=False,
        norm_eps=c.rms_norm_eps,
        rope_base=float(theta),
    )


def _family_of_config(config):
    """``"gpt2"`` or ``"llama"``: the Hugging Face family that computes exactly what ``config`` does."""
    from refattn.model.config import LMConfig

    if not isinstance(config, LMConfig):
        raise RefAttnTypeError(f"config: expected an LMConfig, got {type(config).__name__}")
    want = {
        "gpt2": {"positions": "learned", "norm": "layer", "norm_position": "pre", "causal": True, "bias": True},
        "llama": {
            "positions": "rope",
            "norm": "rms",
            "norm_position": "pre",
            "causal": True,
            "bias": False,
            "activation": "swiglu",
        },
    }
    kind = "llama" if config.positions == "rope" else "gpt2"
    for field_name, value in want[kind].items():
        if getattr(config, field_name) != value:
            raise Unsupported(
                f"config.{field_name}: a {'GPT-2' if kind == 'gpt2' else 'Llama'} model has {field_name}={value!r}, "
                f"got {getattr(config, field_name)!r} (GPT-2: learned positions, LayerNorm, biases; Llama: RoPE, "
                "RMSNorm, SwiGLU, no biases)"
            )
    if kind == "gpt2":
        if config.activation == "swiglu":
            raise Unsupported("config.activation: GPT-2's MLP has no gate: expected 'gelu', 'gelu_tanh' or 'relu'")
        if config.n_kv_heads != config.n_heads:
            raise Unsupported(
                f"config.n_kv_heads: GPT-2 has no GQA: expected {config.n_heads}, got {config.n_kv_heads}"
            )
    return kind


def _hf_config(config, kind, tf):
    """The Hugging Face config of an LMConfig (eager attention, no dropout)."""
    if kind == "gpt2":
        activation = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[config.activation]
        return tf.GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.max_len,
            n_embd=config.d_model,
            n_layer=config.n_layers,
            n_head=config.n_heads,
            n_inner=config.d_ff,
            activation_function=activation,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            layer_norm_epsilon=config.norm_eps,
            tie_word_embeddings=config.tied_embeddings,
            bos_token_id=config.vocab_size - 1,  # GPT-2's <|endoftext|> is its last id, 50256
            eos_token_id=config.vocab_size - 1,
            attn_implementation="eager",
        )
    import inspect

    rope = (
        {"rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base}}
        if "rope_parameters" in inspect.signature(tf.LlamaConfig.__init__).parameters
        else {"rope_theta": config.rope_base}
    )
    return tf.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_len,
        rms_norm_eps=config.norm_eps,
        hidden_act="silu",
        tie_word_embeddings=config.tied_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        attn_implementation="eager",
        **rope,
    )


def _table(config, kind):
    """The weight mapping: ``[(hf_name, transpose, [(refattn path, columns), ...])]``.

    Each Hugging Face tensor (transposed first when ``transpose``: ``nn.Linear`` stores ``(out, in)``)
    is ``[..., columns]``-sliced into the refattn leaves at ``path`` (dotted, as
    :func:`refattn.model.params.tree_items` names them); ``columns`` None: the whole tensor.  GPT-2's
    Conv1D weights are already ``(in, out)`` (``x W + b``) and its fused ``c_attn`` splits into
    thirds: q, k, v.
    """
    e = config.d_model
    rows = []
    if kind == "gpt2":
        thirds = [slice(i * e, (i + 1) * e) for i in range(3)]
        rows += [("transformer.wte.weight", False, [("wte", None)]), ("transformer.wpe.weight", False, [("wpe", None)])]
        for i in range(config.n_layers):
            h, b = f"transformer.h.{i}.", f"blocks.{i}."
            rows += [
                (h + "ln_1.weight", False, [(b + "ln_1.weight", None)]),
                (h + "ln_1.bias", False, [(b + "ln_1.bias", None)]),
                (h + "attn.c_attn.weight", False, [(b + f"attn.w_{x}", s) for x, s in zip("qkv", thirds)]),
                (h + "attn.c_attn.bias", False, [(b + f"attn.b_{x}", s) for x, s in zip("qkv", thirds)]),
                (h + "attn.c_proj.weight", False, [(b + "attn.w_o", None)]),
                (h + "attn.c_proj.bias", False, [(b + "attn.b_o", None)]),
                (h + "ln_2.weight", False, [(b + "ln_2.weight", None)]),
                (h + "ln_2.bias", False, [(b + "ln_2.bias", None)]),
                (h + "mlp.c_fc.weight", False, [(b + "mlp.w_in", None)]),
                (h + "mlp.c_fc.bias", False, [(b + "mlp.b_in", None)]),
                (h + "mlp.c_proj.weight", False, [(b + "mlp.w_out", None)]),
                (h + "mlp.c_proj.bias", False, [(b + "mlp.b_out", None)]),
            ]
        rows += [
            ("transformer.ln_f.weight", False, [("ln_f.weight", None)]),
            ("transformer.ln_f.bias", False, [("ln_f.bias", None)]),
        ]
    else:
        rows.append(("model.embed_tokens.weight", False, [("wte", None)]))
        for i in range(config.n_layers):
            h, b = f"model.layers.{i}.", f"blocks.{i}."
            rows += [
                (h + "input_layernorm.weight", False, [(b + "ln_1.weight", None)]),
                (h + "self_attn.q_proj.weight", True, [(b + "attn.w_q", None)]),
                (h + "self_attn.k_proj.weight", True, [(b + "attn.w_k", None)]),
                (h + "self_attn.v_proj.weight", True, [(b + "attn.w_v", None)]),
                (h + "self_attn.o_proj.weight", True, [(b + "attn.w_o", None)]),
                (h + "post_attention_layernorm.weight", False, [(b + "ln_2.weight", None)]),
                (h + "mlp.gate_proj.weight", True, [(b + "mlp.w_gate", None)]),
                (h + "mlp.up_proj.weight", True, [(b + "mlp.w_in", None)]),
                (h + "mlp.down_proj.weight", True, [(b + "mlp.w_out", None)]),
            ]
        rows.append(("model.norm.weight", False, [("ln_f.weight", None)]))
    if not config.tied_embeddings:
        rows.append(("lm_head.weight", True, [("lm_head", None)]))
    return rows


def _is_shape(x):
    return isinstance(x, tuple) and not hasattr(x, "_fields") and all(isinstance(n, int) for n in x)


def _children(shapes, path):
    names = getattr(shapes, "_fields", None) or [str(i) for i in range(len(shapes))]
    return [(f"{path}.{n}" if path else n, s) for n, s in zip(names, shapes)]


def _shape_items(shapes, path=""):
    """``{dotted path: shape}`` of a tree of shapes (:func:`refattn.model.params.param_shapes`)."""
    if shapes is None:
        return {}
    if _is_shape(shapes):
        return {path: shapes}
    return {k: v for p, s in _children(shapes, path) for k, v in _shape_items(s, p).items()}


def _assemble(shapes, path, values):
    """The tree of ``shapes`` (:func:`refattn.model.params.param_shapes`) with ``values[path]`` at each leaf."""
    if shapes is None:
        return None
    if _is_shape(shapes):
        return values.pop(path)
    items = [_assemble(s, p, values) for p, s in _children(shapes, path)]
    return type(shapes)(*items) if hasattr(shapes, "_fields") else type(shapes)(items)


def _tree_from_hf(model, config, kind, read):
    """The LMParams of ``read(name, parameter) -> ndarray`` over the model's parameters, by :func:`_table`."""
    from refattn.model.params import param_shapes

    named = dict(model.named_parameters())
    table = _table(config, kind)
    unmapped = sorted(set(named) - {name for name, _, _ in table})
    if unmapped:
        raise Unsupported(f"model: parameters refattn's language model has no place for: {unmapped}")
    values = {}
    for name, transpose, parts in table:
        if name not in named:
            raise Unsupported(f"model: expected a parameter {name!r} (the {kind} layout), found none")
        a = read(name, named[name])
        a = a.T if transpose else a
        for path, cols in parts:
            values[path] = np.array(a if cols is None else a[..., cols], dtype=np.float64, order="C")
    return _assemble(param_shapes(config), "", values)


def params_from_hf(model):
    """The weights and configuration of a Hugging Face GPT-2 or Llama causal LM, as refattn's.

    A pure weight mapping (``specs/adapters.md``, "Whole-model mapping"); every parameter of the model
    has exactly one place in the result:

    * ``GPT2LMHeadModel``: ``wte``, ``wpe`` (learned positions), per block ``ln_1``/``ln_2``
      (LayerNorm with bias, ``layer_norm_epsilon``), the fused ``c_attn`` (a Conv1D, already
      ``(in, out)``) split into thirds ``w_q, w_k, w_v`` (and its bias into ``b_q, b_k, b_v``),
      ``c_proj`` → ``w_o``, ``mlp.c_fc``/``mlp.c_proj`` → ``w_in``/``w_out`` (``gelu_new`` is the
      tanh GELU, ``"gelu_tanh"``), ``ln_f``; the LM head is tied to ``wte`` (``lm_head`` None) unless
      ``tie_word_embeddings=False``.
    * ``LlamaForCausalLM``: ``embed_tokens`` → ``wte``, RMSNorms (weight only, ``rms_norm_eps``),
      ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (``nn.Linear``, ``(out, in)``: transposed) with GQA,
      ``gate_proj``/``up_proj``/``down_proj`` → ``w_gate``/``w_in``/``w_out`` (SwiGLU), ``norm`` →
      ``ln_f``, ``lm_head`` (transposed) unless tied; RoPE rotate-half with ``rope_theta``.

    Parameters
    ----------
    model : torch.nn.Module
        A ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` (any dtype: read in float64).

    Returns
    -------
    params : refattn.model.params.LMParams
        float64 copies (the model is not shared).
    config : refattn.model.config.LMConfig

    Raises
    ------
    Unsupported
        Another model class, or an option refattn's language model does not have (cross attention,
        a scaled RoPE, biases in a Llama, ...), named.
    """
    kind = _family(model)
    config = _config_from_hf(model.config, kind)
    return _tree_from_hf(model, config, kind, lambda name, p: _np(p)), config


def grads_from_hf(model):
    """The ``.grad`` of every parameter of a Hugging Face GPT-2 or Llama causal LM, as an LMParams of
    gradients (the mapping of :func:`params_from_hf`, applied to the gradients).

    The tied ``wte`` gets its one ``.grad``: autograd sums the embedding's and the LM head's parts in
    it, as :func:`refattn.model.lm.lm_backward` does.

    Parameters
    ----------
    model : torch.nn.Module
        A ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` after ``loss.backward()``.

    Returns
    -------
    grads : refattn.model.params.LMParams
        float64; ``grads.blocks[i].attn.w_q`` is ``∂loss/∂w_q`` in refattn's ``(in, out)`` layout.

    Raises
    ------
    RefAttnError
        A parameter without ``.grad`` (no backward has run, or it did not reach that parameter).
    Unsupported
        As :func:`params_from_hf`.
    """
    kind = _family(model)
    config = _config_from_hf(model.config, kind)

    def read(name, p):
        if p.grad is None:
            raise RefAttnError(f"model: parameter {name!r} has no .grad (run loss.backward() first)")
        return _np(p.grad)

    return _tree_from_hf(model, config, kind, read)


def to_hf(params, config):
    """A Hugging Face model computing what refattn's language model of ``(params, config)`` computes.

    A ``GPT2LMHeadModel`` for learned positions, LayerNorm and biases (activation ``"gelu_tanh"`` →
    ``gelu_new``, ``"gelu"``, ``"relu"``); a ``LlamaForCausalLM`` for RoPE, RMSNorm, SwiGLU and no
    biases (GQA with ``n_kv_heads``); both pre-norm and causal.  float64, eval mode, eager attention,
    no dropout; the weights copied by the table of :func:`params_from_hf`, so
    ``params_from_hf(to_hf(params, config))`` returns ``(params, config)`` exactly.

    Parameters
    ----------
    params : refattn.model.params.LMParams
        The weights; every shape must match :func:`refattn.model.params.param_shapes` of ``config``.
    config : refattn.model.config.LMConfig
        The model's shape and options.

    Returns
    -------
    torch.nn.Module
        The model, ``.double().eval()``.

    Raises
    ------
    Unsupported
        A config neither family computes (e.g. ALiBi or sinusoidal positions, post-norm, a
        non-causal model, GPT-2 with GQA or SwiGLU, Llama with biases), the field named.
    RefAttnError
        A parameter whose shape disagrees with ``config`` (named by its path, e.g.
        ``params.blocks.0.attn.w_q``) or that is not finite.
    """
    from refattn.model.params import param_shapes, tree_items

    torch, tf = _imports()
    kind = _family_of_config(config)
    shapes = _shape_items(param_shapes(config))
    given = dict(tree_items(params))
    if set(given) != set(shapes):
        raise RefAttnError(
            f"params: expected the parameters of the config {sorted(shapes)}, got {sorted(given)} "
            f"(missing {sorted(set(shapes) - set(given))}, extra {sorted(set(given) - set(shapes))})"
        )
    leaves = {}
    for path, leaf in given.items():
        a = as_float(leaf, f"params.{path}")
        if a.shape != tuple(shapes[path]):
            raise RefAttnError(f"params.{path}: expected shape {tuple(shapes[path])}, got {a.shape}")
        leaves[path] = a
    model = (tf.GPT2LMHeadModel if kind == "gpt2" else tf.LlamaForCausalLM)(_hf_config(config, kind, tf))
    model = model.double().eval()
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, transpose, parts in _table(config, kind):
            target = named.pop(name)
            full = np.empty(tuple(target.shape[::-1]) if transpose else tuple(target.shape))
            for path, cols in parts:
                full[..., slice(None) if cols is None else cols] = leaves[path]
            target.copy_(torch.from_numpy(np.ascontiguousarray(full.T if transpose else full)))
    if named:
        raise Unsupported(f"model: parameters with no place in the mapping: {sorted(named)}")
    return model


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
