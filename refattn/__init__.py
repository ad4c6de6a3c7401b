"""refattn: the float64 golden reference for transformer attention.

Public API (re-exports only); see README.md and specs/.
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
    AttentionWeightsGrads,
    SDPAGrads,
    attention_weights,
    attention_weights_backward,
    sdpa,
    sdpa_backward,
)
from refattn.attention.sparse import topk_attention, topk_attention_backward
from refattn.rollout_flow import attention_flow, rollout, rollout_backward
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
