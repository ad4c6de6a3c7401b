"""refattn: the float64 golden reference for transformer attention.

Public API (re-exports only); see README.md and specs/.
"""

from refattn import masks, testing
from refattn._validate import RefAttnError, RefAttnTypeError
from refattn.attention.sdpa import (
    AttentionWeightsGrads,
    SDPAGrads,
    attention_weights,
    attention_weights_backward,
    sdpa,
    sdpa_backward,
)
from refattn.softmax import (
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

__version__ = "0.1.0"

__all__ = [
    "AttentionWeightsGrads",
    "LogSoftmaxGrads",
    "LogSumExpGrads",
    "RefAttnError",
    "RefAttnTypeError",
    "SDPAGrads",
    "SoftmaxGrads",
    "attention_weights",
    "attention_weights_backward",
    "log_softmax",
    "log_softmax_backward",
    "logsumexp",
    "logsumexp_backward",
    "masks",
    "sdpa",
    "sdpa_backward",
    "softmax",
    "softmax_backward",
    "testing",
]
