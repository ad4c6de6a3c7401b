"""The op table: every public op, with its backward (or why it has none), input domain, backends,
case strategy, tolerance and the bad inputs it must reject.

Generic tests (``tests/test_registry.py``) iterate this table on every backend an op has:
finite-difference gradients (to each op's ``tolerance``; differentiable ops), no mutation, batched ==
per-batch loop, determinism, the other backends equal NumPy, bad inputs rejected.  Registering an op
here is how it gets tested; a test enumerates the package's public API and fails on any public
function that is neither registered (as an op's forward, backward or backend) nor listed in
:data:`NOT_OPS` or under a module of :data:`NOT_OP_MODULES` (``specs/testing.md``, "The op registry").

Needs the ``test`` extra: the strategies are Hypothesis strategies (:mod:`refattn.testing.strategies`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from hypothesis import strategies as _hs

from refattn import lowp, masks
from refattn import metrics as _metrics
from refattn import rollout_flow as _rollout
from refattn import softmax_family as _softmax
from refattn._validate import RefAttnError, RefAttnTypeError
from refattn.attention import allocation as _allocation
from refattn.attention import cache as _cache
from refattn.attention import linear as _linear
from refattn.attention import loops as _loops
from refattn.attention import multihead as _multihead
from refattn.attention import position as _position
from refattn.attention import relative as _relative
from refattn.attention import sdpa as _sdpa
from refattn.attention import sparse as _sparse
from refattn.attention import tiled as _tiled
from refattn.model import bengio as _bengio
from refattn.model import layers as _layers
from refattn.model import lm as _lm
from refattn.model import loops as _lm_loops
from refattn.testing import model_strategies as _mst
from refattn.testing import strategies as _st

__all__ = [
    "BACKEND_NAMES",
    "NOT_OPS",
    "NOT_OP_MODULES",
    "NUMBA",
    "NUMPY",
    "OPS",
    "TOLERANCE",
    "Backend",
    "Implementation",
    "Op",
    "Reject",
    "below",
    "get",
    "non_finite",
    "not_integer",
    "register",
    "replaced",
    "strings",
]

TOLERANCE = 1e-8  # gradcheck's rtol for every op (the accuracy bar, specs/testing.md); worst measured 5.5e-10
BACKEND_NAMES = ("numpy", "numba", "loops")


# ---- backends ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    ``"numpy"`` and ``"numba"``: the op's own forward and backward, called with ``backend=`` bound
    where they take it (the backward of an op whose backward takes no ``backend`` is NumPy's on
    both).  ``"loops"``: ``twin``, the per-element twin in :mod:`refattn.attention.loops` (forward
    only: its results are checked against NumPy's, the gradients are the NumPy backward's).
    ``requires``: the package it needs (its tests are skipped without it).  ``gaps``: ``{argument:
    what must change}`` for the arguments whose bad values this backend does not refuse yet as the
    op's :class:`Reject` records require (checked as open gaps, like ``Reject.gap``).
    """

    name: str
    twin: Callable | None = None
    requires: str = ""
    gaps: dict = field(default_factory=dict)


class Implementation(NamedTuple):
    """What a generic test calls on one backend: ``forward`` and ``backward`` (None: forward only)."""

    backend: str
    forward: Callable
    backward: Callable | None


NUMPY = Backend("numpy")
NUMBA = Backend("numba", requires="numba")


def _takes_backend(fn):
    return fn is not None and "backend" in inspect.signature(fn).parameters


def _bind_backend(fn, name):
    """``fn`` with ``backend=name`` bound where it takes one (``functools.wraps``: same signature)."""
    if not _takes_backend(fn):
        return fn

    @functools.wraps(fn)
    def on_backend(*args, **kwargs):
        return fn(*args, **kwargs, backend=name)

    on_backend.__signature__ = inspect.signature(fn).replace(
        parameters=[p for p in inspect.signature(fn).parameters.values() if p.name != "backend"]
    )
    return on_backend


# ---- bad inputs -------------------------------------------------------------------------------


class Reject(NamedTuple):
    """One bad argument an op must refuse.

    ``arg``: a positional input or an option; ``bad(value)`` gives the bad value (None: does not
    apply to this value, e.g. an option left at None); the call must raise ``error`` with a message
    matching ``match`` (default: ``arg``).  ``gap``: the op does not refuse it yet, and what must
    change (the test then checks the gap is still open, so that closing it removes the mark).
    """

    arg: str
    what: str
    bad: Callable
    error: type = RefAttnError
    match: str = ""
    gap: str = ""


def _poison(x, bad):
    """A copy of ``x`` with its first float entry set to ``bad``: the first array field of a
    NamedTuple, the first array of a list, ``bad`` itself for a float scalar; None when ``x`` holds none."""
    if x is None:
        return None
    if isinstance(x, (tuple, list)):
        items = list(x)
        for j, item in enumerate(items):
            poisoned = _poison(item, bad)
            if poisoned is not None:
                items[j] = poisoned
                return type(x)(*items) if isinstance(x, tuple) and hasattr(x, "_fields") else type(x)(items)
        return None
    if isinstance(x, (float, np.floating)):
        return bad
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "f" or x.size == 0:
        return None
    y = x.copy()
    y.flat[0] = bad
    return y


def non_finite(*args, gap=""):
    """NaN and ``+inf`` in each of ``args`` (float arrays, NamedTuples or lists of them, float scalars)."""
    return tuple(
        Reject(a, what, functools.partial(_poison, bad=v), RefAttnError, gap=gap)
        for a in args
        for what, v in (("NaN", np.nan), ("inf", np.inf))
    )


def _string_array(x):
    return None if x is None or np.ndim(x) == 0 else np.full(np.shape(x), "a")


def strings(*args, gap=""):
    """A string array of the same shape in each of ``args``: a :class:`RefAttnTypeError`."""
    return tuple(Reject(a, "strings", _string_array, RefAttnTypeError, gap=gap) for a in args)


def below(arg, minimum, *, match="", gap=""):
    """An integer ``arg`` set to ``minimum - 1`` (left alone where it is None)."""
    return (Reject(arg, f"< {minimum}", lambda v: None if v is None else minimum - 1, RefAttnError, match, gap),)


def not_integer(*args, gap=""):
    """``1.5`` for each integer argument: a :class:`RefAttnTypeError`."""
    return tuple(Reject(a, "1.5", lambda v: None if v is None else 1.5, RefAttnTypeError, gap=gap) for a in args)


def replaced(arg, what, value, error=RefAttnError, *, match="", gap=""):
    """``arg`` replaced by ``value`` (or ``value(old)`` when callable)."""
    return (Reject(arg, what, value if callable(value) else lambda v: value, error, match, gap),)


# ---- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One registered op.

    ``inputs``: names of the positional arguments.  ``differentiable``: the inputs and array
    options with a gradient, in the order of the backward's NamedTuple (empty when there is no
    backward).  ``core_ndim``: per array argument, how many trailing dims are not batch dims (used to
    slice a batch).  ``strategy``: a callable ``(for_gradcheck=False) -> strategy of Case``
    (``for_gradcheck=True`` restricts to smooth, finite cases).  ``domain``: the inputs it is
    defined on, in words.  ``not_differentiable``: why it has no backward (required when
    ``backward`` is None).  ``backends``: its implementations, NumPy first.  ``reduces_batch``: why a
    batched call is not a loop over the batch.  ``rejects``: the bad inputs it must refuse (default:
    NaN and inf in every input, strings in the first).  ``tolerance``: the relative error the
    gradient check allows (gradcheck's ``rtol``); one above :data:`TOLERANCE` needs its
    ``tolerance_reason``.
    """

    name: str
    forward: Callable
    backward: Callable | None
    inputs: tuple
    differentiable: tuple = ()
    core_ndim: dict = field(default_factory=dict)
    strategy: Callable | None = None
    domain: str = ""
    not_differentiable: str = ""
    backends: tuple = (NUMPY,)
    reduces_batch: str = ""
    rejects: tuple | None = None
    tolerance: float = TOLERANCE
    tolerance_reason: str = ""

    @property
    def kind(self):
        """``"differentiable"``, or ``"not differentiable: <the reason>"``."""
        return "differentiable" if self.backward is not None else f"not differentiable: {self.not_differentiable}"

    @property
    def backend_names(self):
        return tuple(b.name for b in self.backends)

    def cases(self, *, for_gradcheck=False):
        return self.strategy(for_gradcheck=for_gradcheck)

    def on(self, backend):
        """The :class:`Implementation` of this op on the backend named ``backend``."""
        b = next((b for b in self.backends if b.name == backend), None)
        if b is None:
            raise KeyError(f"op {self.name!r} has no backend {backend!r} (it has {', '.join(self.backend_names)})")
        if b.twin is not None:
            return Implementation(backend, b.twin, None)
        return Implementation(backend, _bind_backend(self.forward, backend), _bind_backend(self.backward, backend))

    def backend(self, name):
        """The :class:`Backend` record named ``name``."""
        return next(b for b in self.backends if b.name == name)

    def invalid(self):
        """The :class:`Reject` records of this op (its own, or the default)."""
        if self.rejects is not None:
            return self.rejects
        return non_finite(*self.inputs) + strings(self.inputs[0])


OPS: dict = {}


def register(op: Op) -> Op:
    """Add ``op`` to :data:`OPS` after checking that its record is complete and consistent."""

    def refuse(why):
        raise ValueError(f"op {op.name!r}: {why}")

    if op.name in OPS:
        refuse("already registered")
    if not callable(op.strategy):
        refuse("no case strategy (a callable (for_gradcheck=False) -> strategy)")
    if not op.domain:
        refuse("no input domain")
    if op.backward is None and not op.not_differentiable:
        refuse("no backward and no reason given")
    if op.backward is not None and op.not_differentiable:
        refuse("a backward and a reason for having none")
    if op.backward is None and op.differentiable:
        refuse("differentiable inputs without a backward")
    if op.tolerance > TOLERANCE and not op.tolerance_reason:
        refuse(f"gradient tolerance {op.tolerance:g} looser than {TOLERANCE:g} without a reason")
    names = op.backend_names
    if not names or names[0] != "numpy" or len(set(names)) != len(names) or not set(names) <= set(BACKEND_NAMES):
        refuse(f"backends {names}: expected 'numpy' first, then distinct ones of {BACKEND_NAMES}")
    if ("numba" in names) != _takes_backend(op.forward):
        refuse("the numba backend is for the ops whose forward takes backend= (and every such op has it)")
    if any((b.name == "loops") != (b.twin is not None) for b in op.backends):
        refuse("the loops backend (and only it) is a twin function")
    OPS[op.name] = op
    return op


def get(name: str) -> Op:
    return OPS[name]


# Whole modules without ops, each with the reason; a name covers the module and every module below it.
NOT_OP_MODULES = {
    "refattn.adapters": "bridges to PyTorch and Hugging Face (they call the registered ops; tests/adapters)",
    "refattn.attention.options": "the definition of sdpa's options and the decorator that gives them to the variants",
    "refattn.bench": "the benchmarks",
    "refattn.cli": "the refattn command",
    "refattn.datasets": "datasets of maps on Dask: stores, and the registered summarize / rollout / metrics and "
    "attention_attribution evaluated chunk by chunk (tests/test_datasets.py, against their in-memory results)",
    "refattn.crosscheck": "file formats, the standard suite, goldens and verdicts of the cross-checking harness",
    "refattn.io": "the file formats under their user-facing names (re-exports of refattn.crosscheck, refattn.datasets)",
    "refattn.kernels": "the Numba kernels behind the ops' numba backends (Backend records) and their compile helper",
    "refattn.model.data": "the synthetic recall task, the standard-library corpus and batching: token ids, no "
    "differentiable arrays (tests/model/test_data.py)",
    "refattn.model.train": "optimisers, clipping, schedules and the training loop over parameter trees "
    "(tests/model/test_train.py, against torch.optim)",
    "refattn.model.experiments": "the reproducible experiments (training runs, tables and figures) built on the "
    "registered model ops (tests/model/test_experiments.py)",
    "refattn.model.params": "parameter trees of the models, their shapes, deterministic initialisation and tree "
    "helpers: no arrays computed from inputs (the ops using them, lm and its layers, are registered)",
    "refattn.plot": "figures of maps, metrics and rollout",
    "refattn.testing": "for test suites: the gradient checkers, the tolerance rules and the strategies",
}

# Public functions of op modules that are not ops, each with the reason (defining module + name).
NOT_OPS = {
    "refattn.lowp.format_of": "a dtype name or object -> its Format record: no arrays in or out",
    "refattn.lowp.round_arrays": "round_to over the arrays of a mapping (round_to is registered)",
    "refattn.metrics.tokens.key_set": "the metrics' parser of key arguments (indices or a bool mask -> 0/1 weights)",
    "refattn.metrics.linguistic.phrases_from_tags": "POS tags (strings) -> phrase index lists: text preprocessing",
    "refattn.model.bengio.init_bengio_params": "random initial parameters of a config: no arrays in",
    "refattn.model.bengio.bengio_loss_and_grads": "cross_entropy of bengio_forward with bengio_backward of "
    "cross_entropy_backward (each registered) as (loss, grads) for training; gradchecked in tests/model/test_bengio.py",
    "refattn.model.lm.lm_loss_and_grads": "cross_entropy of lm_forward with lm_backward of cross_entropy_backward "
    "(each registered) from one forward pass; checked against them in tests/model/test_lm.py",
    "refattn.model.loops.lm_backward_loops": "the loop twin of lm_backward (lm's loops backend twins the forward "
    "only); held to lm_backward within 1e-12 in tests/model/test_loops.py",
    "refattn.metrics.attribution.attention_attribution": "a report over a model's layers (registered metrics and "
    "rollout, averaged) that reads an iterator once and returns ints beside its arrays: tested in "
    "tests/metrics/test_attribution.py against the registered ops",
}

# ---- attention --------------------------------------------------------------------------------

_ATTN_CORE = {
    "q": 3,
    "k": 3,
    "v": 3,
    "mask": 3,
    "bias": 3,
    "dropout_mask": 3,
    "sinks": 1,
    "q_lengths": 0,
    "k_lengths": 0,
    "k_starts": 0,
}
_ATTN_GRADS = ("q", "k", "v", "bias", "sinks")
_ATTN_DOMAIN = (
    "finite q (..., Hq, Lq, D), k (..., Hk, Lk, D), v (..., Hk, Lk, Dv), Hk dividing Hq; bias and sinks "
    "finite or -inf; masks bool; empty rows (every key masked) allowed"
)

register(
    Op(
        "sdpa",
        _sdpa.sdpa,
        _sdpa.sdpa_backward,
        ("q", "k", "v"),
        _ATTN_GRADS,
        _ATTN_CORE,
        _st.sdpa_cases,
        _ATTN_DOMAIN,
        backends=(NUMPY, NUMBA, Backend("loops", _loops.sdpa)),
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
        _st.weights_cases,
        "as sdpa's, without v and dropout",
    )
)
register(
    Op(
        "attention_logits",
        _sdpa.attention_logits,
        _sdpa.attention_logits_backward,
        ("q", "k"),
        ("q", "k", "bias"),
        _ATTN_CORE,
        _st.attention_logits_cases,
        "as attention_weights', without sinks and empty_rows; -inf logits (disallowed) take no cotangent",
    )
)
for _name in ("softmax", "log_softmax", "logsumexp"):
    register(
        Op(
            _name,
            getattr(_softmax, _name),
            getattr(_softmax, _name + "_backward"),
            ("x",),
            ("x", "b") if _name == "logsumexp" else ("x",),
            {"x": 2, "mask": 2},
            _st.softmax_cases,
            "x finite or -inf (weight 0), any axis; mask bool; rows with no allowed entry follow empty_rows",
        )
    )
# issue 13: rows over a tuple of axes or all of them (axis=None), and logsumexp's scale factors b
for _name in ("softmax", "log_softmax", "logsumexp"):
    register(
        Op(
            _name + "_axes",
            getattr(_softmax, _name),
            getattr(_softmax, _name + "_backward"),
            ("x",),
            ("x", "b") if _name == "logsumexp" else ("x",),
            {"x": 3, "mask": 3},
            _st.softmax_axes_cases,
            "as " + _name + "'s, a row being the entries over axis: an int, a tuple of distinct axes, or None (all)",
            reduces_batch="a row may span every axis (axis=None or a tuple holding the leading axis)",
            rejects=non_finite("x")
            + strings("x")
            + replaced("axis", "a repeated axis", lambda v: None if v is None else (-1, -1)),
        )
    )
register(
    Op(
        "logsumexp_b",
        _softmax.logsumexp,
        _softmax.logsumexp_backward,
        ("x",),
        ("x", "b"),
        {"x": 3, "mask": 3, "b": 3},
        _st.logsumexp_b_cases,
        "as logsumexp_axes', with finite b broadcastable to x (any sign, zeros); differentiable where S = Σ b e^x "
        "is not 0 (and S > 0 without return_sign)",
        reduces_batch="a row may span every axis (axis=None or a tuple holding the leading axis)",
        rejects=non_finite("x", "b")
        + strings("x")
        + replaced("b", "a shape that enlarges x", lambda v: np.ones(np.shape(v) + (5,))),
    )
)
register(
    Op(
        "relative_attention",
        _relative.relative_attention,
        _relative.relative_attention_backward,
        ("q", "k", "v", "rel_k", "rel_v"),
        ("q", "k", "v", "rel_k", "rel_v", "bias", "sinks"),
        {**_ATTN_CORE, "rel_k": 2, "rel_v": 2},
        _st.relative_cases,
        "as sdpa's, plus finite rel_k (2m + 1, D), rel_v (2m + 1, Dv) for max_distance m",
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
        _st.topk_cases,
        "as sdpa's, top_k >= 1; differentiable where the k-th and (k+1)-th logits differ (the selection holds)",
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
        _st.linear_cases,
        "finite q, k, v as sdpa's (Lq = Lk when causal); elu+1 or relu features (relu: kink at 0)",
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
        _st.chunked_cases,
        "as sdpa's, chunk_size >= 1",
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
        _st.online_cases,
        "as sdpa's, block_q, block_k >= 1",
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
        _st.combine_cases,
        "finite outs (S, ..., Lq, Dv); lses (S, ..., Lq) finite or -inf (an empty split)",
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
        _st.decode_cases,
        "finite q (B, Hq, Lq, D), caches (B, Hk, Lc >= 1, D); cache_lengths in [0, Lc] (0: zero output rows)",
    )
)
register(
    Op(
        "decode_ragged",
        _cache.decode,
        _cache.decode_backward,
        ("q", "k_cache", "v_cache"),
        ("q", "k_cache", "v_cache", "bias", "sinks"),
        {"q": 4, "k_cache": 4, "v_cache": 4},
        _st.decode_ragged_cases,
        "as decode's, with empty sequences (cache_lengths 0) and mask/bias of fewer than Lc columns (ONNX's short "
        "attn_mask, padded by extend_mask)",
    )
)
register(
    Op(
        "append",
        _cache.append,
        _cache.append_backward,
        ("past_k", "past_v", "k", "v"),
        ("past_k", "past_v", "k", "v"),
        {"past_k": 3, "past_v": 3, "k": 3, "v": 3},
        _st.append_cases,
        "finite past_k (B, Hk, Lp, D), past_v (B, Hk, Lp, Dv) (both None: no past), k (B, Hk, Ln, D), "
        "v (B, Hk, Ln, Dv); Lp, Ln >= 0",
        rejects=non_finite("past_k", "past_v", "k", "v")
        + strings("k")
        + replaced(
            "past_k", "another head dim", lambda v: None if v is None else np.zeros(v.shape[:3] + (v.shape[3] + 1,))
        ),
    )
)
register(
    Op(
        "extend_mask",
        _cache.extend_mask,
        None,
        ("mask", "total_length"),
        core_ndim={"mask": 1},
        strategy=_st.extend_mask_cases,
        domain="a bool mask (..., m), total_length >= m: the missing columns False (ONNX's padding)",
        not_differentiable="a bool mask (the additive float form is extend_mask_additive, with its backward)",
        rejects=strings("mask")
        + replaced("total_length", "fewer than the mask's columns", -1)
        + not_integer("total_length"),
    )
)
register(
    Op(
        "extend_mask_additive",
        _cache.extend_mask,
        _cache.extend_mask_backward,
        ("mask", "total_length"),
        ("mask",),
        {"mask": 1},
        functools.partial(_st.extend_mask_cases, additive=True),
        "an additive float mask (..., m), finite or -inf, total_length >= m: the missing columns -inf",
        rejects=non_finite("mask")
        + replaced("mask", "an integer mask", lambda v: np.zeros(np.shape(v), dtype=np.int64), RefAttnTypeError)
        + replaced("total_length", "fewer than the mask's columns", -1),
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
        _st.paged_cases,
        "finite pages (P, Hk, page, D); block_table of page ids in [-1, P) (-1 unused); lengths within the pages",
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
        _st.allocation_cases,
        "as sdpa's, plus a finite AllocationGate; differentiable off the relu kink of its hidden layer",
    )
)
_LOOPS_X_GAP = (
    "loops.multihead_attention does not validate x (attention/loops.py): NaN and inf are refused as the projected "
    "q's, strings raise a plain ValueError"
)
register(
    Op(
        "multihead_attention",
        _multihead.multihead_attention,
        _multihead.multihead_attention_backward,
        ("x", "params"),
        ("x", "kv", "params", "head_mask"),
        {"x": 2, "kv": 2, "head_mask": 1, "mask": 3},
        _st.multihead_cases,
        "finite x (..., Lq, d_model), kv (..., Lk, d_kv), MHAParams of matching shapes, head counts dividing",
        backends=(NUMPY, NUMBA, Backend("loops", _loops.multihead_attention, gaps={"x": _LOOPS_X_GAP})),
    )
)
register(
    Op(
        "rope",
        _position.rope,
        _position.rope_backward,
        ("x",),
        ("x",),
        {"x": 2, "positions": 1},
        _st.rope_cases,
        "finite x (..., L, D), D even; finite positions (L,); rotary_dim even, <= D",
    )
)
_INTEGERS = "integer sizes only: no real-valued input"
register(
    Op(
        "alibi_slopes",
        _position.alibi_slopes,
        None,
        ("num_heads",),
        strategy=_st.alibi_slopes_cases,
        domain="num_heads >= 1",
        not_differentiable="a constant table of the head count: " + _INTEGERS,
        rejects=below("num_heads", 1) + not_integer("num_heads"),
    )
)
register(
    Op(
        "alibi_bias",
        _position.alibi_bias,
        None,
        ("slopes", "lq", "lk"),
        core_ndim={"slopes": 1},
        strategy=_st.alibi_bias_cases,
        domain="finite slopes (..., H); lq, lk >= 0; align when lq != lk",
        not_differentiable="ALiBi's slopes are fixed constants, not trained (Press et al.): no backward is provided",
        rejects=non_finite("slopes") + strings("slopes") + below("lq", 0) + below("lk", 0) + not_integer("lq"),
    )
)
register(
    Op(
        "sinusoidal_positions",
        _position.sinusoidal_positions,
        None,
        ("length", "dim"),
        strategy=_st.sinusoidal_cases,
        domain="length >= 0, dim >= 1 (odd allowed); base finite > 0",
        not_differentiable="a constant table: " + _INTEGERS,
        rejects=below("length", 0) + below("dim", 1) + not_integer("dim") + non_finite("base"),
    )
)
register(
    Op(
        "topk_mask",
        _sparse.topk_mask,
        None,
        ("logits",),
        core_ndim={"logits": 2},
        strategy=_st.topk_mask_cases,
        domain="logits (..., Lq, Lk) finite or -inf (never selected); top_k >= 1",
        not_differentiable="a boolean selection: piecewise constant in the logits",
        rejects=(
            non_finite("logits", gap="topk_mask validates nothing (attention/sparse.py): NaN and inf pass")
            + strings("logits", gap="topk_mask validates nothing: strings fail inside NumPy (UFuncTypeError)")
            + below("top_k", 1, gap="topk_mask validates nothing: top_k = 0 gives an all-False mask")
        ),
    )
)

# ---- low precision ----------------------------------------------------------------------------

# sdpa_twin's backward is the low-precision kernel's gradient (autograd of the rounded graph), not a
# derivative of the rounded forward (piecewise constant: its derivative is 0 almost everywhere).  It
# is registered as differentiable all the same: every generic test runs on every format, and the
# gradient check runs where the twin is differentiable and its backward must be the derivative —
# dtype = accumulate = "float64", where the twin is sdpa (the strategy's for_gradcheck cases).
register(
    Op(
        "sdpa_twin",
        lowp.sdpa_twin,
        lowp.sdpa_twin_backward,
        ("q", "k", "v"),
        _ATTN_GRADS,
        _ATTN_CORE,
        _st.sdpa_twin_cases,
        "as sdpa's, in any format of lowp.FORMATS; the gradient is a derivative at dtype = accumulate = float64 "
        "only (elsewhere the kernel's rounded gradient)",
        rejects=non_finite("q", "k", "v")
        + strings("q")
        + replaced("dtype", "an unknown format", "float7")
        + replaced("accumulate", "an unknown accumulation", "float16"),
    )
)
register(
    Op(
        "round_to",
        lowp.round_to,
        None,
        ("x",),
        core_ndim={"x": 0},
        strategy=_st.round_to_cases,
        domain="any real x, ±inf and NaN included (overflow: inf, NaN in float8_e4m3); dtype a format name or alias",
        not_differentiable="piecewise constant: its derivative is 0 almost everywhere (straight-through: a convention)",
        rejects=strings(
            "x", gap="round_to raises RefAttnError, not RefAttnTypeError, for a non-numeric dtype (lowp.py)"
        )
        + replaced("dtype", "an unknown format", "float7"),
    )
)

# ---- masks ------------------------------------------------------------------------------------

_MASK = "a boolean mask of integer sizes: " + _INTEGERS
for _name, _args, _strategy, _rejects in (
    ("causal", ("lq", "lk"), _st.causal_mask_cases, below("lq", 0) + below("lk", 0) + not_integer("lq")),
    (
        "window",
        ("lq", "lk", "left", "right"),
        _st.window_mask_cases,
        # a side may be negative (the band past the diagonal); a float side is named as window[0]
        below("lq", 0) + not_integer("lk") + replaced("left", "1.5", 1.5, RefAttnTypeError, match="window"),
    ),
    ("local", ("l", "window_size"), _st.local_mask_cases, below("l", 0) + below("window_size", 0) + not_integer("l")),
    ("strided", ("l", "stride"), _st.length_and_period_cases, below("stride", 1) + not_integer("stride")),
    ("block", ("l", "block_size"), _st.length_and_period_cases, below("block_size", 1) + not_integer("block_size")),
):
    register(
        Op(
            "masks." + _name,
            getattr(masks, _name),
            None,
            _args,
            strategy=_strategy,
            domain="sizes >= 0 (strides and blocks >= 1; window sides of any sign); align when lq != lk",
            not_differentiable=_MASK,
            rejects=_rejects,
        )
    )
_LENGTHS_GAP = "a non-integer array of lengths is a RefAttnError, not a RefAttnTypeError (masks.py)"
register(
    Op(
        "masks.from_lengths",
        masks.from_lengths,
        None,
        ("q_lengths", "k_lengths", "lq", "lk"),
        core_ndim={"q_lengths": 0, "k_lengths": 0},
        strategy=_st.from_lengths_cases,
        domain="integer lengths (B,) within [0, lq] and [0, lk] (q_lengths None: every query)",
        not_differentiable=_MASK,
        rejects=replaced("k_lengths", "a length past lk", lambda v: v + 100)  # the strategy's lk <= 4
        + replaced("k_lengths", "negative lengths", lambda v: v - 1 - v.max(initial=0))
        + replaced("k_lengths", "float lengths", lambda v: v + 0.5, RefAttnTypeError, gap=_LENGTHS_GAP)
        + below("lq", 0),
    )
)
register(
    Op(
        "masks.varlen",
        masks.varlen,
        None,
        ("cu_seqlens_q", "cu_seqlens_k"),
        strategy=_st.varlen_cases,
        domain="cumulative lengths [0, n1, n1 + n2, ...] (non-decreasing) for q and k, as many for each",
        not_differentiable=_MASK,
        rejects=replaced("cu_seqlens_q", "decreasing", lambda v: np.concatenate([v, [-1]]))
        + replaced("cu_seqlens_k", "not starting at 0", lambda v: v + 1)
        + replaced("cu_seqlens_q", "floats", lambda v: v + 0.5, RefAttnTypeError, gap=_LENGTHS_GAP),
    )
)
register(
    Op(
        "masks.dropout_mask",
        masks.dropout_mask,
        None,
        ("shape", "p", "seed"),
        strategy=_st.dropout_mask_cases,
        domain="a shape of sizes >= 0, p in [0, 1), a seed in [0, 2**64)",
        not_differentiable="a boolean keep-mask of a seed (counter-based): no real-valued input but p, a threshold",
        rejects=replaced("p", "p = 1", 1.0)
        + non_finite("p")
        + below("seed", 0)
        + replaced("seed", "seed = 2**64", 2**64)
        + replaced("shape", "a negative size", lambda v: (*v, -1), match="shape"),
    )
)

# ---- rollout and flow -------------------------------------------------------------------------


_ROLLOUT_DOMAIN = (
    "finite maps (L, ..., H, n, n), rows stochastic over the real tokens (check_probabilities); mask (n,) True = real"
)
register(
    Op(
        "rollout",
        _rollout.rollout,
        _rollout.rollout_backward,
        ("attentions",),
        ("attentions",),
        {"attentions": 4, "mask": 1},
        _st.rollout_discard_cases,
        _ROLLOUT_DOMAIN + "; differentiable off head ties (max/min fusion) and discard-threshold ties (per row or map)",
        backends=(NUMPY, NUMBA),
        rejects=non_finite("attentions")
        + strings("attentions")
        + replaced("discard_scope", "an unknown scope", "column")
        + replaced("protect", "a pair outside the maps", lambda v: [(99, 0)]),
    )
)
register(
    Op(
        "attention_flow",
        _rollout.attention_flow,
        None,
        ("attentions",),
        core_ndim={"attentions": 4, "mask": 1},
        strategy=_st.flow_cases,
        domain=_ROLLOUT_DOMAIN + "; every real output node carries some flow",
        not_differentiable="a max-flow (a linear program's optimum): piecewise linear, kinked where the optimal basis "
        "changes; no backward is provided",
        backends=(NUMPY, NUMBA),  # numpy: HiGHS, one LP per pair; numba: Dinic's algorithm (flow_kernels)
    )
)

# ---- metrics ----------------------------------------------------------------------------------

_MAP_CORE = {"P": 3, "P1": 3, "P2": 3, "P_heads": 3, "mask": 1, "tokens": 1, "positions": 1, "important": 1}
_MAP_DOMAIN = (
    "finite maps P (..., H, Lq, Lk), rows stochastic over the real keys (check_probabilities); mask True = real"
)
_SQUARE = ("previous_token_score", "duplicate_token_score", "induction_score")
_DETECTOR_REJECTS = (
    non_finite("P")
    + strings("P")
    + replaced("error_measure", "an unknown measure", "sq")
    + replaced("heads", "a head past H", lambda v: 99)
)
_KINKED = {
    "max_weight": "differentiable off ties of the largest entry",
    "head_confidence": "differentiable off ties of the largest entry",
    "expected_offset": "differentiable off a zero expected offset (|·|)",
    "js_distance": "differentiable off P1 = P2 (sqrt)",
    "entropy_regularizer": "differentiable off entropy = target (|·|)",
}
# the metrics whose forward takes backend= (one read of P by refattn/kernels/metric_kernels.py)
_METRIC_KERNELS = (
    "entropy",
    "head_confidence",
    "head_diversity",
    "mean_distance",
    "locality_score",
    "diagonal_strength",
)
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
    _domain = _MAP_DOMAIN + ("; square (Lq = Lk)" if _name in _SQUARE else "")
    _domain += f"; {_KINKED[_name]}" if _name in _KINKED else ""
    register(
        Op(
            _name,
            _fwd,
            getattr(_metrics, _name + "_backward"),
            _inputs,
            _inputs,
            _MAP_CORE,
            _st.detector_strategy(_name) if _name in _SQUARE else _st.metric_strategy(_name),
            _domain,
            backends=(NUMPY, NUMBA) if _name in _METRIC_KERNELS else (NUMPY,),
            reduces_batch="a regularizer: one scalar averaged over the batch" if _name.endswith("_regularizer") else "",
            rejects=_DETECTOR_REJECTS if _name in _SQUARE else None,
        )
    )
register(
    Op(
        "pattern_score",
        _metrics.pattern_score,
        _metrics.pattern_score_backward,
        ("P", "pattern"),
        ("P",),
        {**_MAP_CORE, "pattern": 3},
        _st.pattern_score_cases,
        _MAP_DOMAIN + "; square (Lq = Lk); finite pattern broadcastable to P (held fixed: no gradient); "
        "differentiable off P = pattern under error_measure='abs' (|·|)",
        rejects=non_finite("P", "pattern")
        + strings("P")
        + replaced("pattern", "one key too wide", lambda v: np.zeros((*np.shape(v)[:-1], np.shape(v)[-1] + 1)))
        + _DETECTOR_REJECTS[-2:],
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
        _st.logits_cases,
        "logits s (..., H, Lq, Lk) finite or -inf (a masked key); mask True = real",
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
        _st.value_norm_cases,
        _MAP_DOMAIN + "; finite x (..., Lk, d_model), w_v, b_v, w_o; differentiable off a zero transformed value",
    )
)
_DECISION = "a boolean decision per head: piecewise constant in P"
_MAP_REJECTS = non_finite("P") + strings("P")
register(
    Op(
        "detect_collapse",
        _metrics.detect_collapse,
        None,
        ("P",),
        core_ndim=_MAP_CORE,
        strategy=_st.detect_collapse_cases,
        domain=_MAP_DOMAIN + "; finite threshold and fraction",
        not_differentiable=_DECISION,
        rejects=_MAP_REJECTS + non_finite("threshold"),
    )
)
register(
    Op(
        "detect_uniform",
        _metrics.detect_uniform,
        None,
        ("P",),
        core_ndim=_MAP_CORE,
        strategy=_st.detect_uniform_cases,
        domain=_MAP_DOMAIN + "; finite tolerance",
        not_differentiable=_DECISION,
        rejects=_MAP_REJECTS + non_finite("tolerance"),
    )
)
register(
    Op(
        "special_token_bias",
        _metrics.special_token_bias,
        None,
        ("P",),
        core_ndim=_MAP_CORE,
        strategy=_st.special_token_cases,
        domain=_MAP_DOMAIN + "; special_positions key indices or a bool mask over the keys; finite factor",
        not_differentiable=_DECISION,
        rejects=_MAP_REJECTS + non_finite("factor"),
    )
)
register(
    Op(
        "top_tokens",
        _metrics.top_tokens,
        None,
        ("P",),
        core_ndim=_MAP_CORE,
        strategy=_st.top_tokens_cases,
        domain=_MAP_DOMAIN + "; 1 <= k <= Lk",
        not_differentiable="integer key indices: piecewise constant in P",
        rejects=_MAP_REJECTS + below("k", 1),
    )
)
register(
    Op(
        "summarize",
        _metrics.summarize,
        None,
        ("attentions",),
        strategy=_st.summarize_cases,
        domain="a list of per-layer square maps as the metrics' (one shape); token ids or strings (n,) or per example",
        not_differentiable="a report of registered metrics (each with its own backward), averaged into a table",
        reduces_batch="averages over the batch and the query rows: one (L, H) table",
        backends=(NUMPY, NUMBA),
        rejects=non_finite("attentions") + strings("attentions"),
    )
)
_TOKENS_GAP = "the token patterns validate nothing (metrics/detectors.py): float ids pass, the scores refuse them"
for _name in ("duplicate_token_pattern", "induction_pattern"):
    register(
        Op(
            _name,
            getattr(_metrics, _name),
            None,
            ("tokens",),
            core_ndim={"tokens": 1, "real": 1},
            strategy=_st.token_pattern_cases,
            domain="token ids (integers) or strings (..., L); real bool (..., L) or None",
            not_differentiable="a 0/1 pattern of token ids: no real-valued input",
            rejects=replaced("tokens", "float ids", lambda v: np.zeros(np.shape(v)), RefAttnTypeError, gap=_TOKENS_GAP),
        )
    )
register(
    Op(
        "head_importance",
        _metrics.head_importance,
        None,
        ("grads_of_head_mask",),
        strategy=_st.head_importance_mask_cases,
        domain="finite head-gate gradients (N, L, H) or per token (N, T, L, H); mask (N, T) True = real token",
        not_differentiable="an attribution score of given gradients (E|g|, layer-normalised): an analysis result, "
        "not a loss; |g| is kinked at 0",
        reduces_batch="an expectation over the examples N (the leading axis)",
        rejects=non_finite("grads_of_head_mask")
        + strings("grads_of_head_mask")
        + replaced("per", "an unknown accumulation", "batch")
        + replaced("mask", "a mask one token short", lambda v: v[:, :-1])
        + replaced("mask", "a float mask", lambda v: v.astype(np.float64), RefAttnTypeError),
    )
)
register(
    Op(
        "weight_norm_importance",
        _metrics.weight_norm_importance,
        None,
        ("params",),
        strategy=_st.weight_norm_cases,
        domain="finite MHAParams (or one per layer) with num_heads query heads",
        not_differentiable="a statistic of trained weights (per-head Frobenius norms) for analysis: no backward is "
        "provided",
        rejects=non_finite("params") + below("num_heads", 1),
    )
)

# ---- model layers and Bengio's model (refattn.model; specs/model.md) ---------------------------


def _wider(arg, what="a wrong last dim"):
    """``arg`` with its last axis one longer (a width that disagrees with the weights)."""
    return replaced(arg, what, lambda a: None if a is None else np.concatenate([a, a[..., :1]], axis=-1))


_FLOAT_IDS = "float ids"
_LAYER_DOMAIN = "finite float arrays; weights (in, out); every size >= 1"
register(
    Op(
        "embedding",
        _layers.embedding,
        _layers.embedding_backward,
        ("tokens", "weight"),
        ("weight",),
        {"tokens": 0, "weight": 2},
        _mst.embedding_cases,
        "integer tokens (...) in [0, V); finite weight (V, E)",
        rejects=non_finite("weight")
        + strings("tokens")
        + replaced("tokens", "an id past V", lambda t: t + 100)
        + replaced("tokens", "a negative id", lambda t: t - 100)
        + replaced("tokens", _FLOAT_IDS, lambda t: t + 0.5, RefAttnTypeError)
        + replaced("weight", "a 1-D table", lambda w: w[0]),
    )
)
register(
    Op(
        "linear",
        _layers.linear,
        _layers.linear_backward,
        ("x", "weight", "bias"),
        ("x", "weight", "bias"),
        {"x": 1, "weight": 2, "bias": 1},
        _mst.linear_cases,
        _LAYER_DOMAIN + ": x (..., I), weight (I, O), bias (O,) or None",
        rejects=non_finite("x", "weight", "bias") + strings("x") + _wider("x") + _wider("bias", "a wrong length"),
    )
)
_EPS_ZERO = replaced("eps", "eps = 0", 0.0)
register(
    Op(
        "layer_norm",
        _layers.layer_norm,
        _layers.layer_norm_backward,
        ("x", "weight", "bias"),
        ("x", "weight", "bias"),
        {"x": 1, "weight": 1, "bias": 1},
        _mst.layer_norm_cases,
        _LAYER_DOMAIN + ": x (..., E), weight and bias (E,) or None; eps > 0",
        rejects=non_finite("x", "weight", "bias") + strings("x") + _wider("weight", "a wrong length") + _EPS_ZERO,
    )
)
register(
    Op(
        "rms_norm",
        _layers.rms_norm,
        _layers.rms_norm_backward,
        ("x", "weight"),
        ("x", "weight"),
        {"x": 1, "weight": 1},
        _mst.rms_norm_cases,
        _LAYER_DOMAIN + ": x (..., E), weight (E,) or None; eps > 0",
        rejects=non_finite("x", "weight") + strings("x") + _wider("weight", "a wrong length") + _EPS_ZERO,
    )
)
register(
    Op(
        "gelu",
        _layers.gelu,
        _layers.gelu_backward,
        ("x",),
        ("x",),
        {"x": 0},
        _mst.gelu_cases,
        "finite x of any shape; approximate 'none' or 'tanh'",
        rejects=non_finite("x") + strings("x") + replaced("approximate", "an unknown form", "erf"),
    )
)
register(
    Op("silu", _layers.silu, _layers.silu_backward, ("x",), ("x",), {"x": 0}, _mst.silu_cases, "finite x of any shape")
)
register(
    Op(
        "swiglu",
        _layers.swiglu,
        _layers.swiglu_backward,
        ("gate", "up"),
        ("gate", "up"),
        {"gate": 0, "up": 0},
        _mst.swiglu_cases,
        "finite gate and up of one shape",
        rejects=non_finite("gate", "up") + strings("gate") + _wider("up", "another shape"),
    )
)
register(
    Op(
        "mlp",
        _layers.mlp,
        _layers.mlp_backward,
        ("x", "params"),
        ("x", "params"),
        {"x": 1},
        _mst.mlp_cases,
        _LAYER_DOMAIN + ": x (..., E), MLPParams w_in (E, F), w_out (F, E), biases or None, w_gate (E, F) for swiglu "
        "only; relu: differentiable off its kink (a pre-activation 0)",
        rejects=non_finite("x", "params")
        + strings("x")
        + replaced("activation", "an unknown activation", "tanh")
        + replaced("params", "a w_out of the wrong shape", lambda p: p._replace(w_out=p.w_out[:, :0])),
    )
)
register(
    Op(
        "cross_entropy",
        _layers.cross_entropy,
        _layers.cross_entropy_backward,
        ("logits", "targets"),
        ("logits",),
        {"logits": 1, "targets": 0},
        _mst.cross_entropy_cases,
        "finite logits (..., V); integer targets (...) in [0, V) or ignore_index; label_smoothing in [0, 1]; "
        "every target ignored: NaN loss, zero gradient (torch)",
        reduces_batch="the mean over every counted target of the batch: one scalar",
        rejects=non_finite("logits")
        + strings("logits")
        + replaced("targets", "a class id past V", lambda t: np.full(np.shape(t), 1000))
        + replaced("targets", "float targets", lambda t: t + 0.5, RefAttnTypeError)
        + replaced("targets", "a wrong shape", lambda t: np.append(np.ravel(t), 0))
        + replaced("label_smoothing", "1.5", 1.5)
        + not_integer("ignore_index"),
    )
)
register(
    Op(
        "bengio_forward",
        _bengio.bengio_forward,
        _bengio.bengio_backward,
        ("params", "contexts"),
        ("params",),
        {"contexts": 1},
        _mst.bengio_cases,
        "BengioParams of the config's shapes (W None without direct connections), finite; integer contexts (..., n) "
        "in [0, V); the config passed as the option config=",
        rejects=non_finite("params")
        + strings("contexts")
        + replaced("contexts", "an id past V", lambda c: c + 1000)
        + replaced("contexts", _FLOAT_IDS, lambda c: c + 0.5, RefAttnTypeError)
        + replaced("contexts", "a wrong context length", lambda c: c[..., :0])
        + replaced("config", "not a BengioConfig", "config", RefAttnTypeError),
    )
)


# ---- the transformer language model (refattn.model.lm) -------------------------------------------


@_hs.composite
def _lm_cases(draw, *, for_gradcheck=False):
    """Tiny :class:`~refattn.model.config.LMConfig` models: ``inputs = (params, tokens (B, T))``,
    ``options = {"config": ..., "mask"?: (B, T), "head_mask"?: (L, H)}``; every option of the config
    drawn (positions, norm and its position, activation, tied, GQA, causal, bias), B in 1..2, T in
    1..3, widths 2 or 4, 0..2 layers (0..1 for the gradient check).  Every leaf of the parameters is
    random (norm weights near 1, biases near 0), from a drawn seed.  ``for_gradcheck=True`` leaves
    out ReLU (its kink at 0 has no derivative to check)."""
    from refattn.model.config import LMConfig
    from refattn.model.params import init_params, tree_map

    positions = draw(_hs.sampled_from(["learned", "sinusoidal", "rope", "alibi"]))
    heads = draw(_hs.sampled_from([1, 2]))
    d_model = heads * draw(_hs.sampled_from([2] if positions == "rope" or for_gradcheck else [1, 2]))
    length, batch = draw(_hs.integers(1, 3)), draw(_hs.integers(1, 2))
    activations = ["gelu", "gelu_tanh", "swiglu"] + ([] if for_gradcheck else ["relu"])
    config = LMConfig(
        vocab_size=draw(_hs.integers(2, 3)),
        d_model=d_model,
        n_layers=draw(_hs.integers(0, 1 if for_gradcheck else 2)),
        n_heads=heads,
        n_kv_heads=draw(_hs.sampled_from([1, heads])),
        d_ff=draw(_hs.integers(1, 3)),
        max_len=length + draw(_hs.integers(0, 1)),
        positions=positions,
        norm=draw(_hs.sampled_from(["layer", "rms"])),
        norm_position=draw(_hs.sampled_from(["pre", "post"])),
        activation=draw(_hs.sampled_from(activations)),
        tied_embeddings=draw(_hs.booleans()),
        causal=draw(_hs.booleans()),
        bias=draw(_hs.booleans()),
    )
    rng = np.random.default_rng(draw(_hs.integers(0, 2**32 - 1)))
    params = tree_map(lambda a: a + 0.3 * rng.standard_normal(a.shape), init_params(config, 0, std=0.5))
    tokens = rng.integers(0, config.vocab_size, (batch, length))
    options = {"config": config}
    if draw(_hs.booleans()):
        options["mask"] = rng.random((batch, length)) > 0.3
    if draw(_hs.booleans()):
        options["head_mask"] = rng.uniform(0.5, 1.5, (config.n_layers, heads))
    return _st.Case((params, tokens), options)


register(
    Op(
        "lm",
        _lm.lm_forward,
        _lm.lm_backward,
        ("params", "tokens"),
        ("params", "head_mask"),
        {"tokens": 1, "mask": 1},
        _lm_cases,
        "LMParams of the shapes param_shapes(config) gives, finite; int tokens (B, T) in [0, V), T <= max_len; "
        "mask bool (B, T) (a query with no real key gets 0); head_mask (L, H) finite; relu: kinked at 0",
        backends=(NUMPY, Backend("loops", _lm_loops.lm_forward_loops)),
        rejects=non_finite("params", "head_mask")
        + replaced("tokens", "an id out of range", lambda v: np.full(np.shape(v), -1))
        + replaced("tokens", "float ids", lambda v: np.zeros(np.shape(v)), RefAttnTypeError)
        + replaced("mask", "a float mask", lambda v: None if v is None else np.zeros(np.shape(v)), RefAttnTypeError)
        + replaced("head_mask", "one layer too many", lambda v: None if v is None else np.ones((len(v) + 1, 2)))
        + replaced("config", "not an LMConfig", "gpt2", RefAttnTypeError),
    )
)
