"""Generic tests over every registered op: gradients, no mutation, batching, determinism, validation."""

import copy
import functools
import inspect

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from refattn import _registry, kernels
from refattn.attention import sdpa as sdpa_mod
from refattn.testing import GradcheckError, VjpError, check_vjp, gradcheck
from tests.mutation import assert_catches

OPS = sorted(_registry.OPS)


def _call(op, case):
    return op.forward(*case.inputs, **case.options)


def _outputs(y):
    return y if isinstance(y, tuple) else (y,)


def check_gradients(op, case):
    gradcheck(op.forward, op.backward, case.inputs, options=case.options, rtol=op.tolerance)


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


def test_a_looser_gradient_tolerance_needs_a_reason():
    op = _registry.get("softmax")
    with pytest.raises(ValueError, match="without a reason"):
        _registry.register(type(op)(**{**op.__dict__, "name": "loose", "tolerance": 1e-6}))


# ---- kernel-sized gradients: one random direction per input (check_vjp), on every backend ----------


def _sdpa_tiles(rng):
    """Lq = 200, Lk = 300 (both across the 128 tile), GQA 4:2, a padding mask, a broadcast bias,
    causal bottom-right, softcap and sinks."""
    q = rng.standard_normal((1, 4, 200, 16))
    k, v = rng.standard_normal((1, 2, 300, 16)), rng.standard_normal((1, 2, 300, 8))
    options = dict(
        mask=rng.random((1, 1, 200, 300)) > 0.1,
        bias=0.5 * rng.standard_normal((200, 300)),
        causal=True,
        align="bottom_right",
        softcap=5.0,
        sinks=0.3 * rng.standard_normal(4),
        return_lse=True,
    )
    return (q, k, v), options, 1e-3


def _multihead_tiles(rng):
    """Cross-attention of 200 queries on 300 keys, d_model 32, 4 query heads on 2 kv heads of dim 8,
    biases, a head gate, a padding mask and causal bottom-right (sdpa's kernel underneath)."""
    d, e = 32, 8
    params = refattn.MHAParams(
        *(0.3 * rng.standard_normal(shape) for shape in ((d, 4 * e), (d, 2 * e), (d, 2 * e), (4 * e, d))),
        *(0.1 * rng.standard_normal(n) for n in (4 * e, 2 * e, 2 * e, d)),
    )
    x, kv = rng.standard_normal((1, 200, d)), rng.standard_normal((1, 300, d))
    options = dict(
        num_heads=4,
        num_kv_heads=2,
        kv=kv,
        head_mask=rng.uniform(0.5, 1.5, 4),
        mask=rng.random((1, 1, 200, 300)) > 0.1,
        causal=True,
        align="bottom_right",
    )
    return (x, params), options, 1e-3


def _rollout_tiles(rng):
    """Three layers of 4 heads over 200 tokens, every prefix returned (mean fusion: the kernel's path)."""
    maps = refattn.softmax(rng.standard_normal((3, 1, 4, 200, 200)))
    return (maps,), dict(residual=0.3, return_all=True, check_probabilities=False), 1e-3


def _entropy_tiles(rng):
    """Maps (2, 4, 200, 300) with entries ≥ 3e-4: steps up to 4·eps·rms(P)·|z| < 1e-5 stay far from P = 0."""
    maps = refattn.softmax(0.5 * rng.standard_normal((2, 4, 200, 300)))
    return (maps,), dict(normalize=True, check_probabilities=False), 1e-4


KERNEL_CASES = {
    "sdpa": _sdpa_tiles,
    "multihead_attention": _multihead_tiles,
    "rollout": _rollout_tiles,
    "entropy": _entropy_tiles,
}
needs_numba = pytest.mark.skipif(not kernels.numba_available(), reason="numba is not installed")
BACKENDS = ["numpy", pytest.param("numba", marks=needs_numba)]


def _on(fn, backend):
    """``fn`` with ``backend=`` bound where it takes one (rollout's and entropy's backwards do not)."""
    return functools.partial(fn, backend=backend) if "backend" in inspect.signature(fn).parameters else fn


def check_kernel_sized(op, backend):
    inputs, options, eps = KERNEL_CASES[op.name](np.random.default_rng(0))
    return check_vjp(
        _on(op.forward, backend), _on(op.backward, backend), inputs, options=options, eps=eps, rtol=op.tolerance
    )


def test_every_op_with_a_kernel_has_a_kernel_sized_case():
    with_backend = {n for n, op in _registry.OPS.items() if "backend" in inspect.signature(op.forward).parameters}
    assert with_backend == set(KERNEL_CASES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(KERNEL_CASES))
def test_kernel_sized_gradients_match_a_random_direction(name, backend):
    op = _registry.get(name)
    report = check_kernel_sized(op, backend)
    assert {c.name.split(".")[0] for c in report.checks} >= set(op.inputs)  # a direction per input (and field)


@pytest.mark.parametrize("name", OPS)
@given(data=st.data())
def test_inputs_are_not_mutated(name, data):
    op = _registry.get(name)
    case = data.draw(op.cases())
    before = copy.deepcopy((case.inputs, case.options))
    outs = _outputs(_call(op, case))
    d_out = np.random.default_rng(0).standard_normal(np.shape(outs[0]))
    op.backward(d_out, *case.inputs, **{k: v for k, v in case.options.items() if k != "return_lse"})
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


def _scaled(op, field, factor=1 + 3e-7):
    """``op`` with the ``field`` of its backward's gradients scaled by ``factor``."""

    @functools.wraps(op.backward)  # the checkers read the backward's signature
    def backward(*args, **kwargs):
        grads = op.backward(*args, **kwargs)
        return grads._replace(**{field: getattr(grads, field) * factor})

    return type(op)(**{**op.__dict__, "backward": backward})


@pytest.mark.parametrize(
    ("name", "field"),
    [("sdpa", "dq"), ("sdpa", "dk"), ("softmax", "dx"), ("rollout", "dattentions"), ("entropy_from_logits", "ds")],
)
def test_gradcheck_catches_a_gradient_off_by_3e_7(name, field):
    """Off by 3e-7: under the old rtol of 1e-6 (sdpa's dq and dk so scaled passed 400 searched cases),
    over the bar of 1e-8."""
    _assert_gradcheck_catches(_scaled(_registry.get(name), field))


def _kv_scaled(grads, factor=1 + 3e-7):
    dq, dk, dv, dbias, dsinks = grads
    return dq, dk * factor, dv * factor, dbias, dsinks


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_sized_check_catches_kv_gradients_off_by_3e_7(monkeypatch, backend):
    """Mutant: dk and dv scaled by 1 + 3e-7, in the GQA reduction (NumPy) or the kernel's result."""
    if backend == "numba":
        real = kernels.sdpa_backward
        monkeypatch.setattr(kernels, "sdpa_backward", lambda *args: _kv_scaled(real(*args)))
    else:
        real = sdpa_mod.reduce_kv
        monkeypatch.setattr(sdpa_mod, "reduce_kv", lambda dx, groups: real(dx, groups) * (1 + 3e-7))
    with pytest.raises(VjpError) as info:
        check_kernel_sized(_registry.get("sdpa"), backend)
    assert {c.name for c in info.value.report.checks if not c.passed} - {"all"} == {"k", "v"}  # named


def test_batch_check_catches_normalisation_across_the_batch(monkeypatch):
    real = refattn.softmax

    def across_batch(x, *, axis=-1, mask=None, empty_rows="zero"):
        y = real(x, axis=axis, mask=mask, empty_rows=empty_rows)
        return y / y.sum(axis=0, keepdims=True) if y.ndim == 3 else y

    op = _registry.get("softmax")
    mutant = type(op)(**{**op.__dict__, "forward": across_batch})
    assert_catches(op.cases(), lambda case: check_batched_equals_loop(mutant, case))
