"""The op table: every public op with its backward, its differentiable inputs and a case strategy.

Generic tests (``tests/test_registry.py``) iterate this table: finite-difference
gradients (to each op's ``tolerance``), no mutation, batched == per-batch loop,
determinism, validation.  Registering an op here is how it gets tested.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

_sdpa = importlib.import_module("refattn.attention.sdpa")
from refattn import softmax_family as _softmax  # noqa: E402

_allocation = importlib.import_module("refattn.attention.allocation")
_cache = importlib.import_module("refattn.attention.cache")
_linear = importlib.import_module("refattn.attention.linear")
_multihead = importlib.import_module("refattn.attention.multihead")
_position = importlib.import_module("refattn.attention.position")
_relative = importlib.import_module("refattn.attention.relative")
_sparse = importlib.import_module("refattn.attention.sparse")
_tiled = importlib.import_module("refattn.attention.tiled")
from refattn import rollout_flow as _rollout  # noqa: E402

_metrics = importlib.import_module("refattn.metrics")

__all__ = ["OPS", "TOLERANCE", "Op", "get", "register"]

TOLERANCE = 1e-8  # gradcheck's rtol for every op (DESIGN.md section 5); the worst measured: 5.5e-10


@dataclass(frozen=True)
class Op:
    """One registered op.

    ``inputs``: names of the positional array inputs.  ``differentiable``:
    the inputs and array options with a gradient, in the order of the
    backward's NamedTuple.  ``core_ndim``: per array argument, how many
    trailing dims are not batch dims (used to slice a batch).  ``strategy``:
    the name of a function in :mod:`refattn.testing.strategies` returning a
    Hypothesis strategy of cases (``for_gradcheck=True`` restricts to smooth,
    finite cases).  ``tolerance``: the relative error the gradient check
    allows (``refattn.testing.gradcheck``'s ``rtol``); one above
    :data:`TOLERANCE` needs its ``tolerance_reason``.
    """

    name: str
    forward: Callable
    backward: Callable | None
    inputs: tuple
    differentiable: tuple
    core_ndim: dict = field(default_factory=dict)
    strategy: str = ""
    not_differentiable: str = ""
    reduces_batch: str = ""  # why a batched call is not a loop over the batch (e.g. a mean over it)
    tolerance: float = TOLERANCE
    tolerance_reason: str = ""

    def cases(self, *, for_gradcheck=False):
        from refattn.testing import strategies

        if self.strategy.startswith("metric:"):
            return strategies.metric_strategy(self.strategy[len("metric:") :])(for_gradcheck=for_gradcheck)
        return getattr(strategies, self.strategy)(for_gradcheck=for_gradcheck)


OPS: dict = {}


def register(op: Op) -> Op:
    if op.name in OPS:
        raise ValueError(f"op {op.name!r} is already registered")
    if op.backward is None and not op.not_differentiable:
        raise ValueError(f"op {op.name!r}: no backward and no reason given")
    if op.tolerance > TOLERANCE and not op.tolerance_reason:
        raise ValueError(
            f"op {op.name!r}: gradient tolerance {op.tolerance:g} looser than {TOLERANCE:g} without a reason"
        )
    OPS[op.name] = op
    return op


def get(name: str) -> Op:
    return OPS[name]


_ATTN_CORE = {"q": 3, "k": 3, "v": 3, "mask": 3, "bias": 3, "dropout_mask": 3, "sinks": 1}

register(
    Op(
        "sdpa",
        _sdpa.sdpa,
        _sdpa.sdpa_backward,
        ("q", "k", "v"),
        ("q", "k", "v", "bias", "sinks"),
        _ATTN_CORE,
        "sdpa_cases",
    )
)
register(
    Op(
        "attention_weights",
        _sdpa.attention_weights,
        _sdpa.attention_weights_backward,
        ("q", "k"),
        ("q", "k", "bias", "sinks"),
        _ATTN_CORE,
        "weights_cases",
    )
)
for _name in ("softmax", "log_softmax", "logsumexp"):
    register(
        Op(
            _name,
            getattr(_softmax, _name),
            getattr(_softmax, _name + "_backward"),
            ("x",),
            ("x",),
            {"x": 2, "mask": 2},
            "softmax_cases",
        )
    )

_ATTN_GRADS = ("q", "k", "v", "bias", "sinks")
register(
    Op(
        "relative_attention",
        _relative.relative_attention,
        _relative.relative_attention_backward,
        ("q", "k", "v", "rel_k", "rel_v"),
        ("q", "k", "v", "rel_k", "rel_v", "bias", "sinks"),
        {**_ATTN_CORE, "rel_k": 2, "rel_v": 2},
        "relative_cases",
    )
)
register(
    Op(
        "topk_attention",
        _sparse.topk_attention,
        _sparse.topk_attention_backward,
        ("q", "k", "v"),
        _ATTN_GRADS,
        _ATTN_CORE,
        "topk_cases",
    )
)
register(
    Op(
        "linear_attention",
        _linear.linear_attention,
        _linear.linear_attention_backward,
        ("q", "k", "v"),
        ("q", "k", "v"),
        {"q": 3, "k": 3, "v": 3},
        "linear_cases",
    )
)
register(
    Op(
        "sdpa_chunked",
        _tiled.sdpa_chunked,
        _tiled.sdpa_chunked_backward,
        ("q", "k", "v"),
        _ATTN_GRADS,
        _ATTN_CORE,
        "chunked_cases",
    )
)
register(
    Op(
        "sdpa_online",
        _tiled.sdpa_online,
        _tiled.sdpa_online_backward,
        ("q", "k", "v"),
        _ATTN_GRADS,
        _ATTN_CORE,
        "online_cases",
    )
)
register(
    Op(
        "combine_partials",
        _tiled.combine_partials,
        _tiled.combine_partials_backward,
        ("outs", "lses"),
        ("outs", "lses"),
        {"outs": 4, "lses": 3},
        "combine_cases",
    )
)
register(
    Op(
        "decode",
        _cache.decode,
        _cache.decode_backward,
        ("q", "k_cache", "v_cache"),
        ("q", "k_cache", "v_cache", "bias", "sinks"),
        {"q": 4, "k_cache": 4, "v_cache": 4},
        "decode_cases",
    )
)
register(
    Op(
        "paged_gather",
        _cache.paged_gather,
        _cache.paged_gather_backward,
        ("pages",),
        ("pages",),
        {"pages": 4},
        "paged_cases",
    )
)
register(
    Op(
        "allocation_attention",
        _allocation.allocation_attention,
        _allocation.allocation_attention_backward,
        ("q", "k", "v", "gate"),
        ("q", "k", "v", "gate", "bias", "sinks"),
        _ATTN_CORE,
        "allocation_cases",
    )
)
register(
    Op(
        "multihead_attention",
        _multihead.multihead_attention,
        _multihead.multihead_attention_backward,
        ("x", "params"),
        ("x", "kv", "params", "head_mask"),
        {"x": 2, "kv": 2, "head_mask": 1, "mask": 3},
        "multihead_cases",
    )
)
register(Op("rope", _position.rope, _position.rope_backward, ("x",), ("x",), {"x": 2, "positions": 1}, "rope_cases"))


def _rollout_stacked_backward(d_R, attentions, *, return_all=False, **options):
    """rollout_backward in the registry's form: the per-layer list stacked into ``RolloutGrads``."""
    import numpy as np

    grads = _rollout.rollout_backward(d_R, attentions, return_all=return_all, **options)
    return _rollout.RolloutGrads(np.stack(grads))


register(
    Op(
        "rollout",
        _rollout.rollout,
        _rollout_stacked_backward,
        ("attentions",),
        ("attentions",),
        {"attentions": 4, "mask": 1},
        "rollout_cases",
    )
)

_MAP_CORE = {"P": 3, "P1": 3, "P2": 3, "P_heads": 3, "mask": 1, "tokens": 1, "positions": 1, "important": 1}
for _name in (
    "entropy",
    "max_weight",
    "head_confidence",
    "js_divergence",
    "js_distance",
    "head_diversity",
    "mean_distance",
    "locality_score",
    "expected_offset",
    "diagonal_strength",
    "offset_attention",
    "positional_bias",
    "self_context_balance",
    "attention_received",
    "attention_given",
    "attention_to",
    "function_word_ratio",
    "allocation_efficiency",
    "previous_token_score",
    "duplicate_token_score",
    "induction_score",
    "pair_attention",
    "group_attention",
    "phrase_attention",
    "entropy_regularizer",
    "diversity_regularizer",
):
    _fwd = getattr(_metrics, _name)
    _inputs = (
        ("P1", "P2")
        if _name.startswith("js_")
        else ("P_heads",)
        if _name in ("head_diversity", "diversity_regularizer")
        else ("P",)
    )
    reduces = "a regularizer: one scalar averaged over the batch" if _name.endswith("_regularizer") else ""
    register(
        Op(
            _name,
            _fwd,
            getattr(_metrics, _name + "_backward"),
            _inputs,
            _inputs,
            _MAP_CORE,
            "metric:" + _name,
            reduces_batch=reduces,
        )
    )
register(
    Op(
        "entropy_from_logits",
        _metrics.entropy_from_logits,
        _metrics.entropy_from_logits_backward,
        ("s",),
        ("s",),
        {"s": 3, "mask": 1},
        "logits_cases",
    )
)
register(
    Op(
        "value_norms",
        _metrics.value_norms,
        _metrics.value_norms_backward,
        ("P", "x", "w_v", "b_v", "w_o"),
        ("P", "x", "w_v", "b_v", "w_o"),
        {"P": 3, "x": 2, "w_v": 2, "b_v": 1, "w_o": 2},
        "value_norm_cases",
    )
)
