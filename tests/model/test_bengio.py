"""refattn.model.bengio: Bengio et al. (2003)'s model — gradients, a loop twin, PyTorch agreement,
initialisation, bad inputs, and that training it lowers the loss."""

from typing import NamedTuple

import numpy as np
import pytest

from refattn import RefAttnError, RefAttnTypeError
from refattn.model import bengio, data, train
from refattn.model.bengio import BengioParams
from refattn.model.config import BengioConfig
from refattn.testing import gradcheck


def _model(direct=True, *, v=7, n=3, m=2, h=4, seed=0):
    config = BengioConfig(v, n, m, h, direct_connections=direct)
    rng = np.random.default_rng(seed)
    params = bengio.init_bengio_params(config, rng)
    return config, params._replace(d=rng.standard_normal(h), b=rng.standard_normal(v))  # nonzero biases


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("shape", [(3,), (5, 3), (2, 2, 3)])
def test_gradients_match_finite_differences(direct, shape):
    config, params = _model(direct)
    contexts = np.random.default_rng(1).integers(0, 7, shape)
    contexts.flat[0] = contexts.flat[-1]  # a word repeated across slots and rows
    report = gradcheck(bengio.bengio_forward, bengio.bengio_backward, (params, contexts), options={"config": config})
    assert {c.name for c in report.checks} == {f"params.{f}" for f in BengioParams._fields if direct or f != "W"}


def _loops_forward(params, contexts, config):
    """The model as explicit loops over rows, words, features and units (the independent twin)."""
    c, hw, d, u, w, b = params
    n, m, h, v = config.context_size, config.embedding_dim, config.hidden_units, config.vocab_size
    rows = contexts.reshape(-1, n)
    out = np.zeros((rows.shape[0], v))
    for r, ctx in enumerate(rows):
        x = [c[ctx[j], k] for j in range(n) for k in range(m)]
        t = [np.tanh(d[a] + sum(x[i] * hw[i, a] for i in range(n * m))) for a in range(h)]
        for o in range(v):
            y = b[o] + sum(t[a] * u[a, o] for a in range(h))
            if w is not None:
                y += sum(x[i] * w[i, o] for i in range(n * m))
            out[r, o] = y
    return out.reshape(contexts.shape[:-1] + (v,))


@pytest.mark.parametrize("direct", [True, False])
def test_forward_equals_the_loops_twin(direct):
    config, params = _model(direct)
    contexts = np.random.default_rng(2).integers(0, 7, (2, 4, 3))
    got, want = bengio.bengio_forward(params, contexts, config), _loops_forward(params, contexts, config)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)


def test_loops_twin_catches_a_context_concatenated_newest_first():
    config, params = _model()
    contexts = np.random.default_rng(3).integers(0, 7, (4, 3))
    reversed_ctx = bengio.bengio_forward(params, contexts[:, ::-1], config)
    assert np.max(np.abs(reversed_ctx - _loops_forward(params, contexts, config))) > 1e-3


class _LossGrads(NamedTuple):
    dparams: BengioParams


def _loss(params, contexts, targets, config):
    return np.asarray(bengio.bengio_loss_and_grads(params, contexts, targets, config)[0])


def _loss_backward(d_loss, params, contexts, targets, config):
    grads = bengio.bengio_loss_and_grads(params, contexts, targets, config)[1]
    return _LossGrads(BengioParams(*(None if g is None else float(d_loss) * g for g in grads)))


@pytest.mark.parametrize("direct", [True, False])
def test_loss_gradients_match_finite_differences(direct):
    config, params = _model(direct)
    rng = np.random.default_rng(4)
    contexts, targets = rng.integers(0, 7, (6, 3)), rng.integers(0, 7, 6)
    targets[2] = -100  # an ignored target
    gradcheck(_loss, _loss_backward, (params, contexts, targets), options={"config": config})


def test_loss_is_the_mean_cross_entropy_of_the_logits():
    config, params = _model()
    rng = np.random.default_rng(5)
    contexts, targets = rng.integers(0, 7, (6, 3)), rng.integers(0, 7, 6)
    logits = bengio.bengio_forward(params, contexts, config)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    loss, grads = bengio.bengio_loss_and_grads(params, contexts, targets, config)
    assert isinstance(loss, float) and isinstance(grads, BengioParams)
    assert loss == pytest.approx(-logp[np.arange(6), targets].mean(), rel=1e-13)


@pytest.mark.torch
@pytest.mark.parametrize("direct", [True, False])
def test_logits_and_gradients_equal_torch(direct):
    torch = pytest.importorskip("torch")
    config, params = _model(direct)
    contexts = np.random.default_rng(6).integers(0, 7, (5, 3))
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params._asdict().items() if v is not None}
    x = torch.nn.functional.embedding(torch.tensor(contexts), t["C"]).reshape(5, -1)
    y = t["b"] + torch.tanh(t["d"] + x @ t["H"]) @ t["U"]
    if direct:
        y = y + x @ t["W"]
    d_logits = np.random.default_rng(7).standard_normal((5, 7))
    y.backward(torch.tensor(d_logits))
    np.testing.assert_allclose(bengio.bengio_forward(params, contexts, config), y.detach().numpy(), rtol=0, atol=1e-12)
    grads = bengio.bengio_backward(d_logits, params, contexts, config).dparams
    for name, g in grads._asdict().items():
        if g is None:
            assert name == "W" and not direct
        else:
            np.testing.assert_allclose(g, t[name].grad.numpy(), rtol=0, atol=1e-12)


def test_init_is_deterministic_and_shaped_by_the_config():
    config = BengioConfig(11, 4, 3, 5)
    a = bengio.init_bengio_params(config, np.random.default_rng(9))
    b = bengio.init_bengio_params(config, np.random.default_rng(9))
    assert [x.tobytes() for x in a] == [x.tobytes() for x in b]
    assert [x.shape for x in a] == [(11, 3), (12, 5), (5,), (5, 11), (12, 11), (11,)]
    assert np.max(np.abs(a.H)) <= 1 / np.sqrt(12) and np.max(np.abs(a.U)) <= 1 / np.sqrt(5)
    assert (
        bengio.init_bengio_params(BengioConfig(11, 4, 3, 5, direct_connections=False), np.random.default_rng(9)).W
        is None
    )


def test_init_params_of_a_bengio_config_uses_init_bengio_params():
    from refattn.model.params import init_params

    config = BengioConfig(6, 2, 3, 4)
    want = bengio.init_bengio_params(config, np.random.Generator(np.random.PCG64(5)))
    got = init_params(config, 5)
    assert [x.tobytes() for x in got] == [x.tobytes() for x in want]


_CFG = BengioConfig(5, 2, 2, 3)
_P = bengio.init_bengio_params(_CFG, np.random.default_rng(0))
_CTX = np.array([[0, 1], [4, 2]])
BAD = [
    (lambda: bengio.bengio_forward(_P, np.array([[0, 5]]), _CFG), RefAttnError, r"contexts: expected ids in \[0, 5\)"),
    (
        lambda: bengio.bengio_forward(_P, np.array([[0, 1, 2]]), _CFG),
        RefAttnError,
        r"contexts: expected shape \(\.\.\., 2\)",
    ),
    (lambda: bengio.bengio_forward(_P, _CTX.astype(float), _CFG), RefAttnTypeError, r"contexts: expected integer ids"),
    (
        lambda: bengio.bengio_forward(_P._replace(H=np.zeros((4, 4))), _CTX, _CFG),
        RefAttnError,
        r"params.H: expected shape \(4, 3\)",
    ),
    (lambda: bengio.bengio_forward(_P._replace(W=None), _CTX, _CFG), RefAttnError, r"params.W: expected an array"),
    (
        lambda: bengio.bengio_forward(_P, _CTX, BengioConfig(5, 2, 2, 3, direct_connections=False)),
        RefAttnError,
        r"params.W: expected None \(config.direct_connections is False\)",
    ),
    (lambda: bengio.bengio_forward(_P[:5], _CTX, _CFG), RefAttnError, r"params: expected BengioParams"),
    (lambda: bengio.bengio_forward(_P, _CTX, (5, 2, 2, 3)), RefAttnTypeError, r"config: expected a BengioConfig"),
    (
        lambda: bengio.bengio_forward(_P._replace(C=np.full((5, 2), np.nan)), _CTX, _CFG),
        RefAttnError,
        r"params.C: expected finite",
    ),
    (
        lambda: bengio.bengio_backward(np.zeros((2, 4)), _P, _CTX, _CFG),
        RefAttnError,
        r"d_logits: expected shape \(2, 5\)",
    ),
    (lambda: bengio.bengio_loss_and_grads(_P, _CTX, np.array([0, 5]), _CFG), RefAttnError, r"targets: expected ids"),
    (lambda: bengio.init_bengio_params(_CFG, 0), RefAttnTypeError, r"rng: expected a numpy.random.Generator"),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_inputs_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_training_on_the_small_text_lowers_the_loss():
    tokens = data.encode(data.SMALL_TEXT)
    config = BengioConfig(256, 3, 8, 16)
    params = bengio.init_bengio_params(config, np.random.default_rng(0))
    contexts, targets = data.context_windows(tokens, context_size=3)

    def loss_and_grads(p, batch):
        return bengio.bengio_loss_and_grads(p, *batch, config)

    def batches(step, rng):
        return data.minibatch(contexts, targets, batch_size=64, rng=rng)

    _, history = train.train(loss_and_grads, params, batches, lr=3e-2, steps=40, log=None, seed=1)
    last = np.mean([h["loss"] for h in history[-10:]])
    assert history[0]["loss"] > np.log(256) - 0.5 and last < history[0]["loss"] - 2.0  # 5.7 -> about 2.6
