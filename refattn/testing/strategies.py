"""Hypothesis strategies that draw valid inputs and options for refattn's ops.

Each strategy draws a :class:`Case` (positional ``inputs`` and keyword
``options``); the op registry names one per op.  Values are bounded
(``|x| <= 2``) so nothing overflows; masks are random, so rows with every key
masked (empty rows) occur.  Needs Hypothesis (the ``test`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

__all__ = ["Case", "finite_floats", "sdpa_cases", "softmax_cases", "weights_cases"]


@dataclass
class Case:
    """Inputs and options of one op call: ``fn(*inputs, **options)``."""

    inputs: tuple
    options: dict = field(default_factory=dict)

    def __repr__(self):
        shapes = ", ".join(str(np.shape(x)) for x in self.inputs)
        opts = {k: (f"array{np.shape(v)}" if isinstance(v, np.ndarray) else v) for k, v in self.options.items()}
        return f"Case(inputs=[{shapes}], options={opts})\n  inputs={self.inputs!r}\n  options={self.options!r}"


def finite_floats(bound=2.0):
    return st.floats(-bound, bound, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def _floats_array(draw, shape, bound=2.0):
    return draw(hnp.arrays(np.float64, shape, elements=finite_floats(bound)))


def _sub_shape(draw, shape, min_dims=0):
    """A shape that broadcasts to ``shape`` without enlarging it (dims kept or set to 1, leading dims dropped)."""
    ndim = draw(st.integers(min(min_dims, len(shape)), len(shape)))
    tail = shape[len(shape) - ndim:]
    return tuple(draw(st.sampled_from([n, 1])) for n in tail)


def _with_neg_inf(draw, a, probability=0.15):
    holes = draw(hnp.arrays(np.float64, a.shape, elements=st.sampled_from([0.0] * 6 + [1.0]))) > 0
    if probability and holes.any():
        a = np.where(holes, -np.inf, a)
    return a


@st.composite
def _attention_case(draw, *, with_v, for_gradcheck):
    batch = draw(st.sampled_from([(), (1,), (2,)]))
    hk = draw(st.integers(1, 2))
    hq = hk * draw(st.integers(1, 2))
    lq, lk = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    d, dv = draw(st.integers(1, 3)), draw(st.integers(1, 3))

    def batch_of():
        return tuple(draw(st.sampled_from([n, 1])) for n in batch)

    q = _floats_array(draw, batch + (hq, lq, d))
    k = _floats_array(draw, batch_of() + (hk, lk, d))
    inputs = (q, k)
    if with_v:
        inputs += (_floats_array(draw, batch_of() + (hk, lk, dv)),)
    score = batch + (hq, lq, lk)
    opts = {}
    if draw(st.booleans()):
        opts["mask"] = draw(hnp.arrays(bool, _sub_shape(draw, score, 1), elements=st.booleans()))
    if draw(st.booleans()):
        opts["bias"] = _with_neg_inf(draw, _floats_array(draw, _sub_shape(draw, score, 1)))
    if draw(st.booleans()):
        opts["causal"] = True
    if draw(st.booleans()):
        opts["window"] = (draw(st.one_of(st.none(), st.integers(0, 3))), draw(st.one_of(st.none(), st.integers(0, 3))))
    structural = opts.get("causal") or "window" in opts
    if structural and lq != lk:
        opts["align"] = draw(st.sampled_from(["top_left", "bottom_right"]))
    elif draw(st.booleans()):
        opts["align"] = draw(st.sampled_from(["top_left", "bottom_right"]))
    if draw(st.booleans()):
        opts["scale"] = draw(st.floats(0.1, 2.0))
    if draw(st.booleans()):
        opts["softcap"] = draw(st.floats(0.5, 5.0))
    if draw(st.booleans()):
        sinks = _floats_array(draw, _sub_shape(draw, batch + (hq,), 1))
        opts["sinks"] = _with_neg_inf(draw, sinks)
    if with_v and draw(st.booleans()):
        p = draw(st.sampled_from([0.0, 0.25]))
        opts["dropout_p"] = p
        opts["dropout_mask"] = draw(hnp.arrays(bool, _sub_shape(draw, score, 1), elements=st.booleans()))
    policies = ["zero", "uniform"] if for_gradcheck else ["zero", "nan", "uniform"]
    opts["empty_rows"] = draw(st.sampled_from(policies))
    if with_v and draw(st.booleans()):
        opts["return_lse"] = True
    return Case(inputs, opts)


def sdpa_cases(*, for_gradcheck=False):
    """Cases for :func:`refattn.sdpa`: every option, GQA, broadcast batch dims, lq != lk."""
    return _attention_case(with_v=True, for_gradcheck=for_gradcheck)


def weights_cases(*, for_gradcheck=False):
    """Cases for :func:`refattn.attention_weights` (sdpa's options without v and dropout)."""
    return _attention_case(with_v=False, for_gradcheck=for_gradcheck)


@st.composite
def softmax_cases(draw, *, for_gradcheck=False):
    """Cases for softmax / log_softmax / logsumexp: ``x (B?, m, n)``, axis -1 or -2, masks, -inf entries."""
    batch = draw(st.sampled_from([(), (2,)]))
    shape = batch + (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    x = _floats_array(draw, shape, 3.0)
    if draw(st.booleans()):
        x = _with_neg_inf(draw, x)
    opts = {"axis": draw(st.sampled_from([-1, -2]))}
    if draw(st.booleans()):
        opts["mask"] = draw(hnp.arrays(bool, _sub_shape(draw, shape, 1), elements=st.booleans()))
    policies = ["zero", "uniform"] if for_gradcheck else ["zero", "nan", "uniform"]
    opts["empty_rows"] = draw(st.sampled_from(policies))
    return Case((x,), opts)
