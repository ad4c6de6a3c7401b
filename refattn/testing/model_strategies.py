"""Hypothesis strategies for the model layers (:mod:`refattn.model.layers`) and Bengio's model
(:mod:`refattn.model.bengio`): one ``*_cases`` per registered op, drawing a
:class:`~refattn.testing.strategies.Case`, as :mod:`refattn.testing.strategies` does for attention.

Shapes are small (each axis 1..4), leading dims ``()``, ``(2,)`` or ``(2, 3)``; values are finite
floats in ``[-2, 2]``; token ids uniform over the table.  ``for_gradcheck=True`` adds seeded
continuous noise to the float inputs (Hypothesis likes exact zeros and ties) and keeps ReLU's
pre-activations at least 0.01 from its kink and at least one counted target in a cross-entropy.

Needs Hypothesis (the ``test`` extra), as :mod:`refattn.testing.strategies`.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from refattn.testing.strategies import Case, finite_floats

__all__ = [
    "bengio_cases",
    "cross_entropy_cases",
    "embedding_cases",
    "gelu_cases",
    "layer_norm_cases",
    "linear_cases",
    "mlp_cases",
    "rms_norm_cases",
    "silu_cases",
    "swiglu_cases",
]

_LEADING = [(), (2,), (2, 3)]


def _floats(draw, shape, *, noise=False, bound=2.0):
    a = draw(hnp.arrays(np.float64, shape, elements=finite_floats(bound)))
    if noise:
        seed = draw(st.integers(0, 2**32 - 1))
        a = a + 0.1 * np.random.default_rng(seed).standard_normal(shape)
    return a


def _maybe(draw, shape, *, noise=False):
    return _floats(draw, shape, noise=noise) if draw(st.booleans()) else None


def _ids(draw, shape, size):
    return draw(hnp.arrays(np.int64, shape, elements=st.integers(0, size - 1)))


@st.composite
def embedding_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.model.layers.embedding`: ``inputs = (tokens, weight)``.

    ``tokens`` int64 of shape ``()``, ``(3,)`` or ``(2, 3)``, ids in ``[0, V)``; ``weight (V, E)``,
    V in 1..4, E in 1..3.  No options.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Noise on the table (the op is linear in it either way).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    v, e = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    tokens = _ids(draw, draw(st.sampled_from([(), (3,), (2, 3)])), v)
    return Case((tokens, _floats(draw, (v, e), noise=for_gradcheck)))


@st.composite
def linear_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.model.layers.linear`: ``inputs = (x (..., I), weight (I, O), bias)``,
    ``bias (O,)`` or None; I, O in 1..4.  No options.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Noise on the float inputs.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    i, o = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    lead = draw(st.sampled_from(_LEADING))
    g = for_gradcheck
    return Case((_floats(draw, lead + (i,), noise=g), _floats(draw, (i, o), noise=g), _maybe(draw, (o,), noise=g)))


def _norm_case(draw, for_gradcheck, with_bias):
    e = draw(st.integers(1, 4))
    lead = draw(st.sampled_from(_LEADING))
    g = for_gradcheck
    inputs = (_floats(draw, lead + (e,), noise=g), _maybe(draw, (e,), noise=g))
    if with_bias:
        inputs += (_maybe(draw, (e,), noise=g),)
    opts = {}
    if draw(st.booleans()):
        opts["eps"] = draw(st.sampled_from([1e-5, 1e-6, 1e-2, 1.0]))
    x = inputs[0]
    stat = np.mean((x - x.mean(axis=-1, keepdims=True)) ** 2 if with_bias else x * x, axis=-1)
    default = 1e-5 if with_bias else 1e-6
    if for_gradcheck and float(np.min(stat)) + opts.get("eps", default) < 1e-2:
        # sqrt(var + eps) is the scale on which the norm bends: keep it well above the difference step
        opts["eps"] = 1e-2
    return Case(inputs, opts)


@st.composite
def layer_norm_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.model.layers.layer_norm`: ``inputs = (x (..., E), weight, bias)``,
    weight and bias ``(E,)`` or None, E in 1..4; ``eps`` (1e-5, 1e-6, 1e-2 or 1) or not.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Noise on the float inputs, and ``eps = 1e-2`` where a row's variance plus eps is below 1e-2
        (the norm bends on the scale ``sqrt(var + eps)``: it must be far above the difference step).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    return _norm_case(draw, for_gradcheck, True)


@st.composite
def rms_norm_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.model.layers.rms_norm`: ``inputs = (x (..., E), weight)``, weight
    ``(E,)`` or None, E in 1..4; ``eps`` (1e-5, 1e-6, 1e-2 or 1) or not.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Noise on the float inputs, and ``eps = 1e-2`` where a row's mean square plus eps is below 1e-2.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    return _norm_case(draw, for_gradcheck, False)


@st.composite
def gelu_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.model.layers.gelu`: ``inputs = (x,)`` of shape ``(...)`` (leading
    dims as the other cases, plus a last dim 1..4), values in ``[-4, 4]``; ``approximate`` always.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Noise on x.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    shape = draw(st.sampled_from(_LEADING)) + (draw(st.integers(1, 4)),)
    x = _floats(draw, shape, noise=for_gradcheck, bound=4.0)
    return Case((x,), {"approximate": draw(st.sampled_from(["none", "tanh"]))})


@st.composite
def silu_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.model.layers.silu`: ``inputs = (x,)``, as :func:`gelu_cases` without options.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Noise on x.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    shape = draw(st.sampled_from(_LEADING)) + (draw(st.integers(1, 4)),)
    return Case((_floats(draw, shape, noise=for_gradcheck, bound=4.0),))


@st.composite
def swiglu_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.model.layers.swiglu`: ``inputs = (gate, up)`` of one shape.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Noise on both.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    shape = draw(st.sampled_from(_LEADING)) + (draw(st.integers(1, 4)),)
    return Case(tuple(_floats(draw, shape, noise=for_gradcheck, bound=4.0) for _ in range(2)))


def _relu_margin(case):
    x, p = case.inputs
    pre = x @ p.w_in + (0.0 if p.b_in is None else p.b_in)
    return float(np.min(np.abs(pre))) > 1e-2


@st.composite
def _mlp_case(draw, for_gradcheck):
    from refattn.model.layers import ACTIVATIONS, MLPParams

    e, f = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    lead = draw(st.sampled_from([(), (2,), (2, 2)]))
    activation = draw(st.sampled_from(ACTIVATIONS))
    g = for_gradcheck
    params = MLPParams(
        _floats(draw, (e, f), noise=g),
        _maybe(draw, (f,), noise=g),
        _floats(draw, (f, e), noise=g),
        _maybe(draw, (e,), noise=g),
        _floats(draw, (e, f), noise=g) if activation == "swiglu" else None,
    )
    return Case((_floats(draw, lead + (e,), noise=g), params), {"activation": activation})


def mlp_cases(*, for_gradcheck=False):
    """Cases for :func:`~refattn.model.layers.mlp`: ``inputs = (x (..., E), params)``.

    ``params`` an :class:`~refattn.model.layers.MLPParams` with ``w_in (E, F)``, ``w_out (F, E)``,
    each bias given or None, ``w_gate (E, F)`` for ``"swiglu"`` only; E in 1..3, F in 1..4; leading
    dims ``()``, ``(2,)`` or ``(2, 2)``.  ``activation`` (any of the four) always.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Noise on every float input, and ReLU's pre-activations at least 0.01 from 0.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    strategy = _mlp_case(for_gradcheck)
    if for_gradcheck:
        strategy = strategy.filter(lambda c: c.options["activation"] != "relu" or _relu_margin(c))
    return strategy


@st.composite
def cross_entropy_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.model.layers.cross_entropy`: ``inputs = (logits (..., V), targets (...))``.

    Leading dims ``()``, ``(3,)`` or ``(2, 3)``, V in 1..4, logits in ``[-3, 3]``; targets in
    ``[0, V)``, each replaced by ``ignore_index`` with probability 1/4 (all of them, sometimes: the
    loss is NaN).  Options, each or not: ``ignore_index`` (-1 or 0; default -100) and
    ``label_smoothing`` (0, 0.1 or 1).

    Parameters
    ----------
    for_gradcheck : bool, default False
        Noise on the logits, and at least one counted target (a finite loss).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    v = draw(st.integers(1, 4))
    lead = draw(st.sampled_from([(), (3,), (2, 3)]))
    logits = _floats(draw, lead + (v,), noise=for_gradcheck, bound=3.0)
    opts = {}
    if draw(st.booleans()):
        opts["ignore_index"] = draw(st.sampled_from([-1, 0]))
    if draw(st.booleans()):
        opts["label_smoothing"] = draw(st.sampled_from([0.0, 0.1, 1.0]))
    ignore = opts.get("ignore_index", -100)
    targets = _ids(draw, lead, v)
    dropped = draw(hnp.arrays(bool, lead, elements=st.sampled_from([False, False, False, True])))
    targets = np.where(dropped, ignore, targets)
    if for_gradcheck and np.all(targets == ignore):
        targets = np.full(lead, v - 1 if ignore != v - 1 else 0, dtype=np.int64)
        if np.all(targets == ignore):  # v = 1 and ignore_index = 0: class 0 is the only one
            opts.pop("ignore_index")
    return Case((logits, np.asarray(targets, dtype=np.int64)), opts)


@st.composite
def bengio_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.model.bengio.bengio_forward`: ``inputs = (params, contexts)``,
    options ``{"config": BengioConfig}`` (the config is an option so that gradcheck's copies of the
    inputs leave it alone).

    V in 1..4 words, ``n`` in 1..3, ``m`` in 1..2, ``h`` in 1..3, direct connections or not; contexts
    ``(n,)``, ``(2, n)`` or ``(2, 2, n)``; the :class:`~refattn.model.bengio.BengioParams` in ``[-2, 2]``.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Noise on the parameters.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    from refattn.model.bengio import BengioParams
    from refattn.model.config import BengioConfig

    v, n, m, h = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    config = BengioConfig(v, n, m, h, direct_connections=draw(st.booleans()))
    g = for_gradcheck
    params = BengioParams(
        _floats(draw, (v, m), noise=g),
        _floats(draw, (n * m, h), noise=g),
        _floats(draw, (h,), noise=g),
        _floats(draw, (h, v), noise=g),
        _floats(draw, (n * m, v), noise=g) if config.direct_connections else None,
        _floats(draw, (v,), noise=g),
    )
    contexts = _ids(draw, draw(st.sampled_from([(), (2,), (2, 2)])) + (n,), v)
    return Case((params, contexts), {"config": config})
