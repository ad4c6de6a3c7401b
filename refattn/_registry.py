"""The op table: every public op with its backward, its differentiable inputs and a case strategy.

Generic tests (``tests/test_registry.py``) iterate this table: finite-difference
gradients, no mutation, batched == per-batch loop, determinism, validation.
Registering an op here is how it gets tested.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

_sdpa = importlib.import_module("refattn.attention.sdpa")
_softmax = importlib.import_module("refattn.softmax")  # the module; refattn.softmax is the function
_allocation = importlib.import_module("refattn.attention.allocation")
_cache = importlib.import_module("refattn.attention.cache")
_linear = importlib.import_module("refattn.attention.linear")
_multihead = importlib.import_module("refattn.attention.multihead")
_position = importlib.import_module("refattn.attention.position")
_relative = importlib.import_module("refattn.attention.relative")
_sparse = importlib.import_module("refattn.attention.sparse")
_tiled = importlib.import_module("refattn.attention.tiled")

__all__ = ["OPS", "Op", "get", "register"]


@dataclass(frozen=True)
class Op:
    """One registered op.

    ``inputs``: names of the positional array inputs.  ``differentiable``:
    the inputs and array options with a gradient, in the order of the
    backward's NamedTuple.  ``core_ndim``: per array argument, how many
    trailing dims are not batch dims (used to slice a batch).  ``strategy``:
    the name of a function in :mod:`refattn.testing.strategies` returning a
    Hypothesis strategy of cases (``for_gradcheck=True`` restricts to smooth,
    finite cases).
    """

    name: str
    forward: Callable
    backward: Callable | None
    inputs: tuple
    differentiable: tuple
    core_ndim: dict = field(default_factory=dict)
    strategy: str = ""
    not_differentiable: str = ""

    def cases(self, *, for_gradcheck=False):
        from refattn.testing import strategies

        return getattr(strategies, self.strategy)(for_gradcheck=for_gradcheck)


OPS: dict = {}


def register(op: Op) -> Op:
    if op.name in OPS:
        raise ValueError(f"op {op.name!r} is already registered")
    if op.backward is None and not op.not_differentiable:
        raise ValueError(f"op {op.name!r}: no backward and no reason given")
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
