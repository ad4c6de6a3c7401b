"""refattn: the float64 golden reference for transformer attention.

The public API, re-exports only (each name is documented where it is defined; see README.md and
``specs/``): :func:`~refattn.attention.sdpa.sdpa`, scaled dot-product attention with every kernel
option (masks, bias, causal and sliding windows with either alignment, softcap, sinks, dropout, GQA,
an empty-row policy), :func:`~refattn.attention.sdpa.attention_weights` (its probabilities P),
:func:`~refattn.attention.sdpa.attention_logits` (its scores after each step), and
its variants — :func:`~refattn.attention.multihead.multihead_attention`,
:func:`~refattn.attention.relative.relative_attention`,
:func:`~refattn.attention.sparse.topk_attention`,
:func:`~refattn.attention.allocation.allocation_attention`,
:func:`~refattn.attention.linear.linear_attention`; RoPE (:func:`~refattn.attention.position.rope`),
ALiBi (:func:`~refattn.attention.position.alibi_slopes`,
:func:`~refattn.attention.position.alibi_bias`) and sinusoidal positions
(:func:`~refattn.attention.position.sinusoidal_positions`);
:func:`~refattn.softmax_family.softmax`, :func:`~refattn.softmax_family.log_softmax`,
:func:`~refattn.softmax_family.logsumexp`; attention :func:`~refattn.rollout_flow.rollout` and
:func:`~refattn.rollout_flow.attention_flow`; and the modules :mod:`~refattn.attention` (every
variant, the tiled and KV-cache forms, the loop twin), :mod:`~refattn.masks`,
:mod:`~refattn.metrics`, :mod:`~refattn.lowp` (low-precision rounding and twins),
:mod:`~refattn.testing` (tolerance rules and gradient checks; its Hypothesis strategies,
:mod:`refattn.testing.strategies`, are imported explicitly) and :mod:`~refattn.io` (case files).
Also exported: the parameter NamedTuples :class:`~refattn.attention.multihead.MHAParams` and
:class:`~refattn.attention.allocation.AllocationGate`, the backwards' ``...Grads`` NamedTuples
(:class:`~refattn.rollout_flow.RolloutGrads` among them), the errors (below) and ``__version__``.

Conventions, the same in every module:

* float64 throughout: array inputs of any real dtype (bfloat16 and float8 too) are converted,
  never mutated; array results are float64 NumPy arrays.
* Axes: ``...`` batch dims (broadcast), ``Hq``/``Hk`` query/key-value heads (``Hq % Hk == 0``),
  ``Lq``/``Lk`` query/key lengths, ``D`` the q/k head dim, ``Dv`` the value head dim:
  ``q (..., Hq, Lq, D)``, ``k (..., Hk, Lk, D)``, ``v (..., Hk, Lk, Dv)``, scores
  ``(..., Hq, Lq, Lk)``.
* A bool mask is True = keep (may attend, a real token); an additive mask is a float ``bias``.
* Every differentiable op ``name(...)`` has ``name_backward(<cotangent>, <same inputs>, <same
  options>)``, the vector-Jacobian product (``sdpa_backward(d_out, q, k, v, ...)``), returning a
  NamedTuple of gradients ``d<input>``, each of its input's shape.
* A bad argument raises :class:`RefAttnError` (a ValueError; :class:`RefAttnTypeError` for a wrong
  type) naming the argument, what was expected and what was given, before any work;
  :class:`Unsupported` marks what a candidate implementation cannot express.
"""

from refattn import attention, io, lowp, masks, metrics, testing
from refattn._validate import RefAttnError, RefAttnTypeError, Unsupported
from refattn._version import __version__
from refattn.attention.allocation import (
    AllocationGate,
    AllocationGrads,
    allocation_attention,
    allocation_attention_backward,
)
from refattn.attention.linear import LinearAttentionGrads, linear_attention, linear_attention_backward
from refattn.attention.multihead import MHAGrads, MHAParams, multihead_attention, multihead_attention_backward
from refattn.attention.position import (
    RopeGrads,
    alibi_bias,
    alibi_slopes,
    rope,
    rope_backward,
    sinusoidal_positions,
)
from refattn.attention.relative import RelativeAttentionGrads, relative_attention, relative_attention_backward
from refattn.attention.sdpa import (
    AttentionLogitsGrads,
    AttentionWeightsGrads,
    SDPAGrads,
    attention_logits,
    attention_logits_backward,
    attention_weights,
    attention_weights_backward,
    sdpa,
    sdpa_backward,
)
from refattn.attention.sparse import topk_attention, topk_attention_backward
from refattn.rollout_flow import RolloutGrads, attention_flow, rollout, rollout_backward
from refattn.softmax_family import (
    LogSoftmaxGrads,
    LogSumExpGrads,
    SoftmaxGrads,
    log_softmax,
    log_softmax_backward,
    logsumexp,
    logsumexp_backward,
    softmax,
    softmax_backward,
)

__all__ = [
    "__version__",
    "AllocationGate",
    "AllocationGrads",
    "AttentionWeightsGrads",
    "LinearAttentionGrads",
    "MHAGrads",
    "MHAParams",
    "RelativeAttentionGrads",
    "RolloutGrads",
    "RopeGrads",
    "alibi_bias",
    "alibi_slopes",
    "allocation_attention",
    "allocation_attention_backward",
    "linear_attention",
    "linear_attention_backward",
    "multihead_attention",
    "multihead_attention_backward",
    "relative_attention",
    "relative_attention_backward",
    "rope",
    "rope_backward",
    "sinusoidal_positions",
    "topk_attention",
    "topk_attention_backward",
    "LogSoftmaxGrads",
    "LogSumExpGrads",
    "RefAttnError",
    "RefAttnTypeError",
    "Unsupported",
    "io",
    "lowp",
    "SDPAGrads",
    "SoftmaxGrads",
    "attention_weights",
    "attention",
    "attention_flow",
    "attention_logits",
    "attention_logits_backward",
    "AttentionLogitsGrads",
    "attention_weights_backward",
    "log_softmax",
    "log_softmax_backward",
    "logsumexp",
    "logsumexp_backward",
    "masks",
    "metrics",
    "rollout",
    "rollout_backward",
    "sdpa",
    "sdpa_backward",
    "softmax",
    "softmax_backward",
    "testing",
]
