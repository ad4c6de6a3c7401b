"""refattn.model.layers: gradients by finite differences, PyTorch float64 agreement, bad inputs, and
properties each shown to catch a broken variant."""

import math

import numpy as np
import pytest
from hypothesis import strategies as st

from refattn import RefAttnError, RefAttnTypeError
from refattn.model import layers
from refattn.model.layers import MLPParams
from refattn.testing import GradcheckError, check_vjp, gradcheck
from refattn.testing import model_strategies as mst
from tests.mutation import property_table

RNG = np.random.default_rng(20240501)


def _rand(*shape, rng=RNG):
    return rng.standard_normal(shape)


def _mlp_params(e, f, *, biases=True, gate=False, rng=RNG):
    return MLPParams(
        0.5 * _rand(e, f, rng=rng),
        _rand(f, rng=rng) if biases else None,
        0.5 * _rand(f, e, rng=rng),
        _rand(e, rng=rng) if biases else None,
        0.5 * _rand(e, f, rng=rng) if gate else None,
    )


# ---- gradients --------------------------------------------------------------------------------

GRADIENT_CASES = {
    "embedding_repeated_ids": (
        layers.embedding,
        layers.embedding_backward,
        (np.array([[0, 2, 2], [2, 0, 3]]), _rand(5, 3)),
        {},
    ),
    "embedding_scalar_id": (layers.embedding, layers.embedding_backward, (np.array(1), _rand(3, 2)), {}),
    "linear_bias": (layers.linear, layers.linear_backward, (_rand(2, 3, 4), _rand(4, 5), _rand(5)), {}),
    "linear_no_bias_1d": (layers.linear, layers.linear_backward, (_rand(4), _rand(4, 2)), {}),
    "layer_norm": (layers.layer_norm, layers.layer_norm_backward, (_rand(2, 3, 5), _rand(5), _rand(5)), {}),
    "layer_norm_no_affine": (layers.layer_norm, layers.layer_norm_backward, (_rand(3, 4), None, None), {"eps": 1e-3}),
    "rms_norm": (layers.rms_norm, layers.rms_norm_backward, (_rand(2, 3, 5), _rand(5)), {}),
    "rms_norm_no_weight": (layers.rms_norm, layers.rms_norm_backward, (_rand(4, 3), None), {"eps": 1e-2}),
    "gelu_exact": (layers.gelu, layers.gelu_backward, (3 * _rand(3, 4),), {}),
    "gelu_tanh": (layers.gelu, layers.gelu_backward, (3 * _rand(3, 4),), {"approximate": "tanh"}),
    "silu": (layers.silu, layers.silu_backward, (3 * _rand(3, 4),), {}),
    "swiglu": (layers.swiglu, layers.swiglu_backward, (3 * _rand(3, 4), _rand(3, 4)), {}),
    "mlp_gelu": (layers.mlp, layers.mlp_backward, (_rand(2, 3, 4), _mlp_params(4, 6)), {}),
    "mlp_gelu_tanh_no_bias": (
        layers.mlp,
        layers.mlp_backward,
        (_rand(3, 4), _mlp_params(4, 5, biases=False)),
        {"activation": "gelu_tanh"},
    ),
    "mlp_swiglu": (
        layers.mlp,
        layers.mlp_backward,
        (_rand(2, 3, 4), _mlp_params(4, 6, biases=False, gate=True)),
        {"activation": "swiglu"},
    ),
    "cross_entropy": (
        layers.cross_entropy,
        layers.cross_entropy_backward,
        (_rand(2, 3, 5), np.array([[0, 4, 1], [2, 2, 3]])),
        {},
    ),
    "cross_entropy_smoothed_ignored": (
        layers.cross_entropy,
        layers.cross_entropy_backward,
        (_rand(6, 4), np.array([1, -100, 3, 0, -100, 3])),
        {"label_smoothing": 0.15},
    ),
    "cross_entropy_custom_ignore": (
        layers.cross_entropy,
        layers.cross_entropy_backward,
        (_rand(5, 3), np.array([1, 0, 2, 0, 1])),
        {"ignore_index": 0, "label_smoothing": 1.0},
    ),
}


@pytest.mark.parametrize("name", sorted(GRADIENT_CASES))
def test_gradients_match_finite_differences(name):
    fn, backward, inputs, options = GRADIENT_CASES[name]
    report = gradcheck(fn, backward, inputs, options=options, rtol=1e-8)
    assert report.passed


def test_relu_mlp_gradients_off_the_kink():
    x, p = _rand(3, 4), _mlp_params(4, 6)
    pre = x @ p.w_in + p.b_in
    assert np.min(np.abs(pre)) > 1e-2  # the seeded draw keeps the kink out of reach of the step
    assert gradcheck(layers.mlp, layers.mlp_backward, (x, p), options={"activation": "relu"}).passed


# relu is left out: among 512 pre-activations some lie within the directional steps (4e-3) of its kink
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "swiglu"])
def test_mlp_gradients_at_model_size_along_random_directions(activation):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 16, 8))
    p = _mlp_params(8, 32, gate=activation == "swiglu", rng=rng)
    report = check_vjp(layers.mlp, layers.mlp_backward, (x, p), options={"activation": activation}, rtol=1e-8)
    assert report.passed


def test_cross_entropy_gradient_at_model_size_along_a_random_direction():
    rng = np.random.default_rng(8)
    logits = 3 * rng.standard_normal((4, 32, 50))
    targets = np.where(rng.random((4, 32)) < 0.2, -100, rng.integers(0, 50, (4, 32)))
    options = {"label_smoothing": 0.1}
    report = check_vjp(layers.cross_entropy, layers.cross_entropy_backward, (logits, targets), options=options)
    assert report.passed


def test_gradcheck_catches_an_embedding_backward_that_drops_repeated_ids():
    """A fancy-index ``+=`` keeps one contribution per repeated id: the scatter-add must accumulate."""

    def dropping(d_out, tokens, weight):
        dw = np.zeros(np.shape(weight))
        dw[np.asarray(tokens).reshape(-1)] += np.asarray(d_out).reshape(-1, dw.shape[1])
        return layers.EmbeddingGrads(dw)

    fn, _, inputs, _ = GRADIENT_CASES["embedding_repeated_ids"]
    with pytest.raises(GradcheckError):
        gradcheck(fn, dropping, inputs)


def test_all_targets_ignored_gives_nan_and_zero_gradient():
    logits, targets = _rand(3, 4), np.full(3, -100)
    assert math.isnan(float(layers.cross_entropy(logits, targets)))
    grads = layers.cross_entropy_backward(1.5, logits, targets)
    np.testing.assert_array_equal(grads.dlogits, np.zeros((3, 4)))


def test_cross_entropy_returns_a_0d_float64_array():
    loss = layers.cross_entropy(_rand(2, 3), np.array([0, 2]))
    assert isinstance(loss, np.ndarray) and loss.shape == () and loss.dtype == np.float64


def test_backwards_give_none_for_absent_weights():
    g = layers.layer_norm_backward(_rand(2, 3), _rand(2, 3), None, None)
    assert (g.dweight, g.dbias) == (None, None)
    assert layers.linear_backward(_rand(2), _rand(3), _rand(3, 2)).dbias is None
    grads = layers.mlp_backward(_rand(2, 4), _rand(2, 4), _mlp_params(4, 3, biases=False))
    assert (grads.dparams.b_in, grads.dparams.b_out, grads.dparams.w_gate) == (None, None, None)


# ---- PyTorch float64 agreement ----------------------------------------------------------------


def _torch():
    return pytest.importorskip("torch")


def _torch_grads(torch, fn, arrays, d_out):
    """``(output, grads)`` of a torch function of float64 arrays (None stays None) under cotangent ``d_out``."""
    ts = [None if a is None else torch.tensor(a, requires_grad=a.dtype.kind == "f") for a in arrays]
    y = fn(*ts)
    y.backward(torch.tensor(d_out))
    return y.detach().numpy(), [None if t is None or t.grad is None else t.grad.numpy() for t in ts]


def _assert_close(got, want, tol=1e-12):
    want = np.asarray(want)
    scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)


def _torch_cases(torch):
    F = torch.nn.functional
    tokens = np.array([[0, 3, 3], [1, 0, 3]])
    mp = _mlp_params(4, 6, gate=True)
    return {
        "embedding": (layers.embedding, layers.embedding_backward, (tokens, _rand(4, 3)), {}, F.embedding),
        "linear": (
            layers.linear,
            layers.linear_backward,
            (_rand(2, 3, 4), _rand(4, 5), _rand(5)),
            {},
            lambda x, w, b: F.linear(x, w.T, b),
        ),
        "layer_norm": (
            layers.layer_norm,
            layers.layer_norm_backward,
            (_rand(2, 3, 5), _rand(5), _rand(5)),
            {"eps": 1e-5},
            lambda x, w, b: F.layer_norm(x, (5,), w, b, eps=1e-5),
        ),
        "layer_norm_no_affine": (
            layers.layer_norm,
            layers.layer_norm_backward,
            (_rand(3, 5), None, None),
            {},
            lambda x, w, b: F.layer_norm(x, (5,), None, None, eps=1e-5),
        ),
        "rms_norm": (
            layers.rms_norm,
            layers.rms_norm_backward,
            (_rand(2, 3, 5), _rand(5)),
            {"eps": 1e-6},
            lambda x, w: F.rms_norm(x, (5,), w, eps=1e-6),
        ),
        "gelu": (layers.gelu, layers.gelu_backward, (3 * _rand(3, 4),), {}, F.gelu),
        "gelu_tanh": (
            layers.gelu,
            layers.gelu_backward,
            (3 * _rand(3, 4),),
            {"approximate": "tanh"},
            lambda x: F.gelu(x, approximate="tanh"),
        ),
        "silu": (layers.silu, layers.silu_backward, (8 * _rand(3, 4),), {}, F.silu),
        "swiglu": (
            layers.swiglu,
            layers.swiglu_backward,
            (3 * _rand(3, 4), _rand(3, 4)),
            {},
            lambda g, u: F.silu(g) * u,
        ),
        "mlp_swiglu": (
            lambda x, w_in, b_in, w_out, b_out, w_gate: layers.mlp(
                x, MLPParams(w_in, b_in, w_out, b_out, w_gate), activation="swiglu"
            ),
            lambda d, x, *p: (lambda g: (g.dx, *g.dparams))(
                layers.mlp_backward(d, x, MLPParams(*p), activation="swiglu")
            ),
            (_rand(2, 3, 4), *mp),
            {},
            lambda x, w_in, b_in, w_out, b_out, w_gate: (F.silu(x @ w_gate) * (x @ w_in + b_in)) @ w_out + b_out,
        ),
        "mlp_gelu_tanh": (
            lambda x, w_in, b_in, w_out, b_out: layers.mlp(
                x, MLPParams(w_in, b_in, w_out, b_out), activation="gelu_tanh"
            ),
            lambda d, x, *p: (lambda g: (g.dx, *g.dparams[:4]))(
                layers.mlp_backward(d, x, MLPParams(*p), activation="gelu_tanh")
            ),
            (_rand(2, 3, 4), *_mlp_params(4, 6)[:4]),
            {},
            lambda x, w_in, b_in, w_out, b_out: F.gelu(x @ w_in + b_in, approximate="tanh") @ w_out + b_out,
        ),
    }


TORCH_CASES = [
    "embedding",
    "linear",
    "layer_norm",
    "layer_norm_no_affine",
    "rms_norm",
    "gelu",
    "gelu_tanh",
    "silu",
    "swiglu",
    "mlp_swiglu",
    "mlp_gelu_tanh",
]


@pytest.mark.torch
@pytest.mark.parametrize("name", TORCH_CASES)
def test_layer_and_gradients_equal_torch(name):
    torch = _torch()
    fn, backward, inputs, options, torch_fn = _torch_cases(torch)[name]
    y = fn(*inputs, **options)
    d_out = np.random.default_rng(3).standard_normal(y.shape)
    want_y, want_grads = _torch_grads(torch, torch_fn, inputs, d_out)
    _assert_close(y, want_y)
    grads = backward(d_out, *inputs, **options)
    float_inputs = [a is not None and a.dtype.kind == "f" for a in inputs]
    got = [g for g, f in zip(grads, float_inputs[1:] if name == "embedding" else float_inputs) if f]
    want = [g for g in want_grads if g is not None]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        _assert_close(g, w)


@pytest.mark.torch
@pytest.mark.parametrize(
    ("ignore_index", "label_smoothing"), [(-100, 0.0), (-100, 0.2), (2, 0.0), (2, 0.35), (-100, 1.0)]
)
def test_cross_entropy_and_gradient_equal_torch(ignore_index, label_smoothing):
    torch = _torch()
    rng = np.random.default_rng(4)
    logits = 3 * rng.standard_normal((2, 5, 6))
    targets = np.where(rng.random((2, 5)) < 0.3, ignore_index, rng.integers(0, 6, (2, 5)))
    options = {"ignore_index": ignore_index, "label_smoothing": label_smoothing}
    z = torch.tensor(logits.reshape(-1, 6), requires_grad=True)
    want = torch.nn.functional.cross_entropy(z, torch.tensor(targets.reshape(-1)), **options)
    want.backward(torch.tensor(0.7, dtype=torch.float64))
    _assert_close(layers.cross_entropy(logits, targets, **options), want.item())
    got = layers.cross_entropy_backward(0.7, logits, targets, **options).dlogits
    _assert_close(got, z.grad.numpy().reshape(2, 5, 6))


@pytest.mark.torch
def test_all_ignored_matches_torch():
    torch = _torch()
    z = torch.tensor(_rand(3, 4), requires_grad=True)
    want = torch.nn.functional.cross_entropy(z, torch.full((3,), -100), label_smoothing=0.1)
    want.backward()
    assert math.isnan(want.item()) and math.isnan(float(layers.cross_entropy(z.detach().numpy(), np.full(3, -100))))
    np.testing.assert_array_equal(z.grad.numpy(), np.zeros((3, 4)))


# ---- bad inputs -------------------------------------------------------------------------------

_W = _rand(4, 3)
BAD = [
    (
        "embedding",
        lambda: layers.embedding(np.array([0, 4]), _W),
        RefAttnError,
        r"tokens: expected ids in \[0, 4\), got 4 at index \(1,\)",
    ),
    (
        "embedding",
        lambda: layers.embedding(np.array([-1]), _W),
        RefAttnError,
        r"tokens: expected ids in \[0, 4\), got -1",
    ),
    ("embedding", lambda: layers.embedding(np.array([0.0]), _W), RefAttnTypeError, r"tokens: expected integer ids"),
    ("embedding", lambda: layers.embedding(np.array([True]), _W), RefAttnTypeError, r"tokens: expected integer ids"),
    ("embedding", lambda: layers.embedding(np.array([0]), _rand(4)), RefAttnError, r"weight: expected a 2-D"),
    ("linear", lambda: layers.linear(_rand(2, 5), _W), RefAttnError, r"x: expected last dim 4 \(the rows of weight"),
    ("linear", lambda: layers.linear(_rand(2, 4), _W, _rand(4)), RefAttnError, r"bias: expected shape \(3,\)"),
    ("linear", lambda: layers.linear(np.float64(1.0), _W), RefAttnError, r"x: expected at least 1 dimensions"),
    (
        "layer_norm",
        lambda: layers.layer_norm(_rand(2, 3), _rand(4), None),
        RefAttnError,
        r"weight: expected shape \(3,\)",
    ),
    (
        "layer_norm",
        lambda: layers.layer_norm(_rand(2, 3), None, _rand(2)),
        RefAttnError,
        r"bias: expected shape \(3,\)",
    ),
    (
        "layer_norm",
        lambda: layers.layer_norm(_rand(2, 3), None, None, eps=0.0),
        RefAttnError,
        r"eps: expected a number > 0",
    ),
    ("rms_norm", lambda: layers.rms_norm(_rand(2, 3), _rand(2)), RefAttnError, r"weight: expected shape \(3,\)"),
    ("rms_norm", lambda: layers.rms_norm(np.array([np.nan]), None), RefAttnError, r"x: expected finite values"),
    (
        "gelu",
        lambda: layers.gelu(_rand(3), approximate="erf"),
        RefAttnError,
        r"approximate: expected one of 'none', 'tanh'",
    ),
    ("gelu", lambda: layers.gelu(_rand(3), approximate=None), RefAttnError, r"approximate: expected one of"),
    ("gelu", lambda: layers.gelu(_rand(3), approximat="tanh"), RefAttnError, r"unknown option 'approximat'"),
    ("swiglu", lambda: layers.swiglu(_rand(3), _rand(4)), RefAttnError, r"up: expected the shape of gate \(3,\)"),
    (
        "mlp",
        lambda: layers.mlp(_rand(2, 4), _mlp_params(4, 3), activation="tanh"),
        RefAttnError,
        r"activation: expected one of",
    ),
    (
        "mlp",
        lambda: layers.mlp(_rand(2, 4), _mlp_params(4, 3), activation="swiglu"),
        RefAttnError,
        r"params.w_gate: expected an \(E, F\)",
    ),
    (
        "mlp",
        lambda: layers.mlp(_rand(2, 4), _mlp_params(4, 3, gate=True)),
        RefAttnError,
        r"params.w_gate: expected None for activation 'gelu'",
    ),
    ("mlp", lambda: layers.mlp(_rand(2, 5), _mlp_params(4, 3)), RefAttnError, r"x: expected last dim 4"),
    (
        "mlp",
        lambda: layers.mlp(_rand(2, 4), _mlp_params(4, 3)._replace(w_out=_rand(3, 5))),
        RefAttnError,
        r"params.w_out: expected shape \(F, E\) = \(3, 4\)",
    ),
    (
        "mlp",
        lambda: layers.mlp(_rand(2, 4), _mlp_params(4, 3)._replace(b_in=_rand(4))),
        RefAttnError,
        r"params.b_in: expected shape \(3,\)",
    ),
    ("mlp", lambda: layers.mlp(_rand(2, 4), (_W,)), RefAttnError, r"params: expected MLPParams"),
    (
        "cross_entropy",
        lambda: layers.cross_entropy(_rand(2, 3), np.array([0, 3])),
        RefAttnError,
        r"targets: expected ids in \[0, 3\) or ignore_index -100, got 3 at index \(1,\)",
    ),
    (
        "cross_entropy",
        lambda: layers.cross_entropy(_rand(2, 3), np.array([0, -1])),
        RefAttnError,
        r"targets: expected ids in \[0, 3\) or ignore_index -100, got -1",
    ),
    (
        "cross_entropy",
        lambda: layers.cross_entropy(_rand(2, 3), np.array([0, 1, 2])),
        RefAttnError,
        r"targets: expected shape \(2,\)",
    ),
    (
        "cross_entropy",
        lambda: layers.cross_entropy(_rand(2, 3), np.array([0.0, 1.0])),
        RefAttnTypeError,
        r"targets: expected integer ids",
    ),
    (
        "cross_entropy",
        lambda: layers.cross_entropy(_rand(2, 3), np.array([0, 1]), label_smoothing=1.5),
        RefAttnError,
        r"label_smoothing: expected a number in \[0, 1\]",
    ),
    (
        "cross_entropy",
        lambda: layers.cross_entropy(_rand(2, 3), np.array([0, 1]), ignore_index=1.5),
        RefAttnTypeError,
        r"ignore_index: expected an integer",
    ),
    (
        "cross_entropy",
        lambda: layers.cross_entropy(np.array([0.0, np.inf]), np.array(0)),
        RefAttnError,
        r"logits: expected finite values",
    ),
    (
        "cross_entropy_backward",
        lambda: layers.cross_entropy_backward(_rand(2), _rand(2, 3), np.array([0, 1])),
        RefAttnError,
        r"d_loss: expected shape \(\)",
    ),
    (
        "linear_backward",
        lambda: layers.linear_backward(_rand(2, 4), _rand(2, 4), _W),
        RefAttnError,
        r"d_out: expected shape \(2, 3\)",
    ),
]


@pytest.mark.parametrize(("fn", "call", "error", "match"), BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs_raise_naming_the_argument(fn, call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_inputs_are_not_mutated():
    x, p = _rand(2, 4), _mlp_params(4, 3, gate=True)
    before = (x.copy(), [a.copy() for a in p])
    layers.mlp_backward(_rand(2, 4), x, p, activation="swiglu")
    np.testing.assert_array_equal(x, before[0])
    for a, b in zip(p, before[1]):
        np.testing.assert_array_equal(a, b)


# ---- properties, each with the broken variant it catches --------------------------------------


def _close(a, b, tol=1e-12):
    scale = max(1.0, float(np.max(np.abs(b), initial=0.0)))
    assert np.all(np.abs(np.asarray(a) - np.asarray(b)) <= tol * scale), (a, b)


def check_layer_norm_standardises(case):
    """Without gain and bias, each row has mean 0 and mean square var / (var + eps) (biased variance)."""
    x, eps = case.inputs[0], case.options.get("eps", 1e-5)
    y = layers.layer_norm(x, None, None, eps=eps)
    var = np.var(x, axis=-1)
    _close(y.mean(axis=-1), np.zeros(var.shape))
    _close(np.mean(y * y, axis=-1), var / (var + eps))


def check_rms_norm_mean_square(case):
    """Without gain, each row's mean square is ms / (ms + eps): eps inside the square root."""
    x, eps = case.inputs[0], case.options.get("eps", 1e-6)
    y = layers.rms_norm(x, None, eps=eps)
    ms = np.mean(x * x, axis=-1)
    _close(np.mean(y * y, axis=-1), ms / (ms + eps))


def check_gelu_odd_part_is_x(case):
    """``gelu(x) − gelu(−x) = x`` in both forms (Φ(x) + Φ(−x) = 1; tanh is odd)."""
    x = case.inputs[0]
    a = case.options["approximate"]
    _close(layers.gelu(x, approximate=a) - layers.gelu(-x, approximate=a), x)


def check_ignored_rows_change_nothing(case):
    """Appending ignored rows leaves the mean loss as it is: the mean is over the counted rows."""
    logits, targets = case.inputs
    if logits.ndim < 2 or np.all(targets == case.options.get("ignore_index", -100)):
        return
    ignore = case.options.get("ignore_index", -100)
    v = logits.shape[-1]
    more_logits = np.concatenate([logits.reshape(-1, v), np.zeros((3, v))])
    more_targets = np.concatenate([targets.reshape(-1), np.full(3, ignore)])
    _close(
        layers.cross_entropy(more_logits, more_targets, **case.options),
        layers.cross_entropy(logits, targets, **case.options),
    )


def check_smoothing_is_the_uniform_mixture(case):
    """With smoothing ε the loss is the cross-entropy against ``(1 − ε) onehot + ε / V`` (torch's)."""
    logits, targets = case.inputs
    ignore = case.options.get("ignore_index", -100)
    keep = targets != ignore
    if not keep.any():
        return
    eps = case.options.get("label_smoothing", 0.0)
    z = logits[keep] if logits.ndim > 1 else logits[None]
    t = targets[keep] if logits.ndim > 1 else np.asarray(targets)[None]
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    q = (1 - eps) * np.eye(z.shape[-1])[t] + eps / z.shape[-1]
    _close(layers.cross_entropy(logits, targets, **case.options), float(np.mean(-(q * logp).sum(-1))))


@st.composite
def _swiglu_mlp_cases(draw):
    case = draw(mst.mlp_cases())
    x, p = case.inputs
    if p.w_gate is None:
        p = p._replace(w_gate=np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(p.w_in.shape))
    return type(case)((x, p), {"activation": "swiglu"})


def check_swiglu_mlp_composes_the_layers(case):
    """``mlp(swiglu) = linear(swiglu(linear(x, w_gate), linear(x, w_in, b_in)), w_out, b_out)``."""
    x, p = case.inputs
    h = layers.swiglu(layers.linear(x, p.w_gate), layers.linear(x, p.w_in, p.b_in))
    _close(layers.mlp(x, p, activation="swiglu"), layers.linear(h, p.w_out, p.b_out))


def _patch_layer_norm_unbiased(monkeypatch):
    def unbiased(x, eps):
        xc = x - x.mean(axis=-1, keepdims=True)
        r = 1.0 / np.sqrt(np.sum(xc * xc, axis=-1, keepdims=True) / max(x.shape[-1] - 1, 1) + eps)
        return xc * r, r

    monkeypatch.setattr(layers, "_layer_norm_core", unbiased)


def _patch_rms_eps_outside(monkeypatch):
    def outside(x, eps):
        r = 1.0 / (np.sqrt(np.mean(x * x, axis=-1, keepdims=True)) + eps)
        return x * r, r

    monkeypatch.setattr(layers, "_rms_core", outside)


def _patch_gelu_without_half(monkeypatch):
    real = layers._gelu_parts

    def no_half(x, approximate):
        y, dy = real(x, approximate)
        return (x * (1.0 + layers.special.erf(x / math.sqrt(2.0))), dy) if approximate == "none" else (y, dy)

    monkeypatch.setattr(layers, "_gelu_parts", no_half)


def _patch_mean_over_every_row(monkeypatch):
    real = layers._cross_entropy_parts

    def every_row(*args):
        ce = real(*args)
        return ce._replace(count=ce.valid.size)

    monkeypatch.setattr(layers, "_cross_entropy_parts", every_row)


def _patch_smoothing_over_other_classes(monkeypatch):
    def others(ce):
        picked = np.take_along_axis(ce.logp, np.where(ce.valid, ce.ids, 0)[..., None], axis=-1)[..., 0]
        v = ce.logp.shape[-1]
        rest = (ce.logp.sum(axis=-1) - picked) / max(v - 1, 1)
        return -(1.0 - ce.smoothing) * picked - ce.smoothing * rest

    monkeypatch.setattr(layers, "_row_losses", others)


def _patch_swiglu_gate_and_up_swapped(monkeypatch):
    real = layers._mlp_hidden

    def swapped(x, p, act):
        if act != "swiglu":
            return real(x, p, act)
        pre = x @ p.w_gate
        gate = x @ p.w_in + (0.0 if p.b_in is None else p.b_in)
        return layers._silu_parts(gate)[0] * pre, pre, gate

    monkeypatch.setattr(layers, "_mlp_hidden", swapped)


PROPERTIES = [
    (check_layer_norm_standardises, mst.layer_norm_cases(), "unbiased_variance"),
    (check_rms_norm_mean_square, mst.rms_norm_cases(), "eps_outside_the_square_root"),
    (check_gelu_odd_part_is_x, mst.gelu_cases(), "gelu_cdf_without_the_half"),
    (check_ignored_rows_change_nothing, mst.cross_entropy_cases(), "mean_over_every_row"),
    (check_smoothing_is_the_uniform_mixture, mst.cross_entropy_cases(), "smoothing_over_the_other_classes"),
    (check_swiglu_mlp_composes_the_layers, _swiglu_mlp_cases(), "swiglu_gate_and_up_swapped"),
]
MUTANTS = {
    "unbiased_variance": _patch_layer_norm_unbiased,
    "eps_outside_the_square_root": _patch_rms_eps_outside,
    "gelu_cdf_without_the_half": _patch_gelu_without_half,
    "mean_over_every_row": _patch_mean_over_every_row,
    "smoothing_over_the_other_classes": _patch_smoothing_over_other_classes,
    "swiglu_gate_and_up_swapped": _patch_swiglu_gate_and_up_swapped,
}

test_property, test_property_catches_its_mutant = property_table(PROPERTIES, MUTANTS)
