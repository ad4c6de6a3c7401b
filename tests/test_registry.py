"""Generic tests over every registered op: gradients, no mutation, batching, determinism, validation."""

import copy

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from refattn import _registry
from refattn.attention import sdpa as sdpa_mod
from refattn.testing import GradcheckError, gradcheck
from tests.mutation import assert_catches

OPS = sorted(_registry.OPS)


def _call(op, case):
    return op.forward(*case.inputs, **case.options)


def _outputs(y):
    return y if isinstance(y, tuple) else (y,)


def check_gradients(op, case):
    gradcheck(op.forward, op.backward, case.inputs, options=case.options)


@pytest.mark.parametrize("name", OPS)
@given(data=st.data())
def test_backward_returns_one_field_per_differentiable_input(name, data):
    op = _registry.get(name)
    case = data.draw(op.cases())
    out = _outputs(_call(op, case))[0]
    opts = {k: v for k, v in case.options.items() if k != "return_lse"}
    grads = op.backward(np.zeros(out.shape), *case.inputs, **opts)
    assert grads._fields == tuple("d" + n for n in op.differentiable)
    for n, g in zip(op.differentiable, grads):
        given_arg = case.inputs[op.inputs.index(n)] if n in op.inputs else case.options.get(n)
        _assert_mirrors(g, given_arg)


def _assert_mirrors(g, arg):
    """A gradient has its input's structure: None for None, same fields, same shapes, float64."""
    assert (g is None) == (arg is None)
    if isinstance(arg, tuple):
        assert type(g) is type(arg)
        for gi, ai in zip(g, arg):
            _assert_mirrors(gi, ai)
    elif g is not None:
        assert g.shape == np.shape(arg) and g.dtype == np.float64


PUBLIC_MODULES = [refattn, refattn.attention.tiled, refattn.attention.cache, refattn.metrics]


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_public_ops_with_backward_are_registered(module):
    registered = {op.forward for op in _registry.OPS.values()}
    ops = [n for n in module.__all__ if callable(getattr(module, n)) and hasattr(module, n + "_backward")]
    assert ops
    for name in ops:
        assert getattr(module, name) in registered, f"{name} has a backward but is not in the registry"


@pytest.mark.parametrize("name", OPS)
@given(data=st.data())
def test_gradients_match_finite_differences(name, data):
    op = _registry.get(name)
    case = data.draw(op.cases(for_gradcheck=True))
    check_gradients(op, case)


@pytest.mark.parametrize("name", OPS)
@given(data=st.data())
def test_inputs_are_not_mutated(name, data):
    op = _registry.get(name)
    case = data.draw(op.cases())
    before = copy.deepcopy((case.inputs, case.options))
    outs = _outputs(_call(op, case))
    op.backward(np.ones_like(outs[0]), *case.inputs, **{k: v for k, v in case.options.items() if k != "return_lse"})
    _assert_same(case.inputs, before[0])
    _assert_same(case.options, before[1])


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, tuple):
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


def _slice_batch(op, case, b, nb):
    """Case for batch element b: arrays with nb batch dims lose their first axis."""

    def pick(name, x):
        if not isinstance(x, np.ndarray) or name not in op.core_ndim or x.ndim - op.core_ndim[name] != nb:
            return x
        return x[b if x.shape[0] > 1 else 0]

    names = op.inputs
    inputs = tuple(pick(n, x) for n, x in zip(names, case.inputs))
    options = {k: pick(k, v) for k, v in case.options.items()}
    return type(case)(inputs, options)


def check_batched_equals_loop(op, case):
    nb = max(
        (x.ndim - op.core_ndim[n] for n, x in zip(op.inputs, case.inputs) if n in op.core_ndim and x is not None),
        default=0,
    )
    batched = _outputs(_call(op, case))
    if nb == 0:
        return
    if case.options.get("axis", -1) < -op.core_ndim.get("x", 99):
        return
    for b in range(batched[0].shape[0]):
        single = _outputs(_call(op, _slice_batch(op, case, b, nb)))
        for y, y1 in zip(batched, single):
            np.testing.assert_allclose(y[b], y1, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("name", OPS)
@given(data=st.data())
def test_batched_call_equals_loop_over_batch(name, data):
    op = _registry.get(name)
    if op.reduces_batch:
        pytest.skip(f"{name} reduces over the batch: {op.reduces_batch}")
    check_batched_equals_loop(op, data.draw(op.cases()))


@pytest.mark.parametrize("name", OPS)
@given(data=st.data())
def test_deterministic(name, data):
    op = _registry.get(name)
    case = data.draw(op.cases())
    for y1, y2 in zip(_outputs(_call(op, case)), _outputs(_call(op, case))):
        assert y1.tobytes() == y2.tobytes()


@pytest.mark.parametrize("name", OPS)
@given(data=st.data())
def test_non_finite_differentiable_inputs_rejected(name, data):
    op = _registry.get(name)
    case = data.draw(op.cases())
    for i, x in enumerate(case.inputs):
        for bad in (np.nan, np.inf):
            broken = list(case.inputs)
            broken[i] = _poison(x, bad)
            if broken[i] is None:
                continue
            with pytest.raises(refattn.RefAttnError, match=op.inputs[i]):
                op.forward(*broken, **case.options)


def _poison(x, bad):
    """A copy of ``x`` with its first float entry set to ``bad`` (the first array field of a NamedTuple)."""
    if x is None:
        return None
    if isinstance(x, tuple):
        fields = list(x)
        for j, f in enumerate(fields):
            if isinstance(f, np.ndarray) and f.size:
                fields[j] = _poison(f, bad)
                return type(x)(*fields)
        return None
    if x.size == 0:
        return None
    y = x.astype(np.float64, copy=True)
    y.flat[0] = bad
    return y


@pytest.mark.parametrize("name", OPS)
@given(data=st.data())
def test_wrong_types_and_cotangent_shapes_rejected(name, data):
    op = _registry.get(name)
    case = data.draw(op.cases())
    with pytest.raises(refattn.RefAttnTypeError, match=op.inputs[0]):
        op.forward(np.full(case.inputs[0].shape, "a"), *case.inputs[1:], **case.options)
    out = _outputs(_call(op, case))[0]
    opts = {k: v for k, v in case.options.items() if k != "return_lse"}
    with pytest.raises(refattn.RefAttnError, match="expected shape"):
        op.backward(np.zeros(out.shape + (2,)), *case.inputs, **opts)


# ---- mutation checks: each generic property fails on a broken variant -------------------------


def _assert_gradcheck_catches(op):
    def check(case):
        try:
            check_gradients(op, case)
        except GradcheckError as exc:
            raise AssertionError(str(exc)) from None

    assert_catches(op.cases(for_gradcheck=True), check)


def test_gradcheck_catches_a_backward_missing_the_softcap_factor(monkeypatch):
    real = sdpa_mod.backward_scores

    def no_softcap_derivative(a, f, dp, d_lse):
        return real(a, f._replace(tanh=None), dp, d_lse)

    monkeypatch.setattr(sdpa_mod, "backward_scores", no_softcap_derivative)
    _assert_gradcheck_catches(_registry.get("sdpa"))


def test_gradcheck_catches_gqa_gradients_not_summed_over_the_group(monkeypatch):
    monkeypatch.setattr(sdpa_mod, "reduce_kv", lambda dx, g: dx if g == 1 else dx[..., ::g, :, :])
    _assert_gradcheck_catches(_registry.get("sdpa"))


def test_batch_check_catches_normalisation_across_the_batch(monkeypatch):
    real = refattn.softmax

    def across_batch(x, *, axis=-1, mask=None, empty_rows="zero"):
        y = real(x, axis=axis, mask=mask, empty_rows=empty_rows)
        return y / y.sum(axis=0, keepdims=True) if y.ndim == 3 else y

    op = _registry.get("softmax")
    mutant = type(op)(**{**op.__dict__, "forward": across_batch})
    assert_catches(op.cases(), lambda case: check_batched_equals_loop(mutant, case))
