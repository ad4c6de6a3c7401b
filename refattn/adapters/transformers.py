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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from refattn._validate import RefAttnError, Unsupported, check_keywords_of
from refattn.attention.position import rope
from refattn.attention.sdpa import attention_weights, sdpa

__all__ = ["LayerCheck", "ModelCheck", "check_model", "model_attentions", "tiny_model"]

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


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
