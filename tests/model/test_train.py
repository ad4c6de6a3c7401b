"""refattn.model.train: the optimisers equal PyTorch's in float64, clipping and the schedule follow
their definitions, runs are bitwise reproducible, bad inputs are refused; properties with mutants."""

import math

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from refattn import RefAttnError, RefAttnTypeError
from refattn.model import train
from refattn.model.layers import MLPParams
from tests.mutation import property_table


def _tree(rng, scale=1.0):
    """A parameter tree with a None leaf (MLPParams without b_out)."""
    return MLPParams(
        scale * rng.standard_normal((3, 4)), scale * rng.standard_normal(4), scale * rng.standard_normal((4, 3)), None
    )


def _leaves(tree):
    return [a for a in tree if a is not None]


PARAMS = _tree(np.random.default_rng(0))
GRADS = [_tree(np.random.default_rng(s)) for s in range(1, 7)]


# ---- PyTorch equality -------------------------------------------------------------------------


def _torch_run(torch, make_optimizer, grads):
    tensors = [torch.tensor(a, requires_grad=True) for a in _leaves(PARAMS)]
    opt = make_optimizer(tensors)
    for g in grads:
        for t, a in zip(tensors, _leaves(g)):
            t.grad = torch.tensor(a)
        opt.step()
    return [t.detach().numpy() for t in tensors]


def _ours(step, grads, **options):
    params, state = PARAMS, None
    for g in grads:
        params, state = step(params, g, state, **options)
    return _leaves(params), state


# Not bitwise: torch's CPU kernels fuse the multiply-adds of lerp (and, vectorised, of addcmul/addcdiv)
# into FMAs, which NumPy has no form for; the difference is a few ulps.
ADAM = [
    {},
    {"betas": (0.8, 0.99), "eps": 1e-6},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "decoupled_weight_decay": True},
]


@pytest.mark.torch
@pytest.mark.parametrize("options", ADAM, ids=["default", "betas_eps", "l2", "adamw"])
def test_adam_equals_torch(options):
    torch = pytest.importorskip("torch")
    want = _torch_run(torch, lambda ts: torch.optim.Adam(ts, lr=0.01, foreach=False, **options), GRADS)
    got, state = _ours(train.adam, GRADS, lr=0.01, **options)
    assert state.step == len(GRADS)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-14, atol=1e-15)


SGD = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.05},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 0.05},
]


@pytest.mark.torch
@pytest.mark.parametrize("options", SGD, ids=["plain", "momentum", "dampening_decay", "nesterov"])
def test_sgd_equals_torch(options):
    torch = pytest.importorskip("torch")
    want = _torch_run(torch, lambda ts: torch.optim.SGD(ts, lr=0.05, foreach=False, **options), GRADS)
    got, _ = _ours(train.sgd, GRADS, lr=0.05, **options)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-14, atol=1e-14)


@pytest.mark.torch
@pytest.mark.parametrize(("max_norm", "norm_type"), [(1.0, 2.0), (100.0, 2.0), (0.5, math.inf), (2.0, 1.0), (1.0, 3.0)])
def test_clip_grad_norm_equals_torch(max_norm, norm_type):
    torch = pytest.importorskip("torch")
    tensors = [torch.tensor(a, requires_grad=True) for a in _leaves(GRADS[0])]
    for t, a in zip(tensors, _leaves(GRADS[0])):
        t.grad = torch.tensor(a)
    want = torch.nn.utils.clip_grad_norm_(tensors, max_norm, norm_type=norm_type, foreach=False)
    got, norm = train.clip_grad_norm(GRADS[0], max_norm, norm_type=norm_type)
    assert norm == pytest.approx(want.item(), rel=1e-14)
    for g, t in zip(_leaves(got), tensors):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-14, atol=1e-15)


# ---- definitions ------------------------------------------------------------------------------


def test_plain_sgd_is_p_minus_lr_g():
    new, state = train.sgd(PARAMS, GRADS[0], lr=0.25)
    for p, g, q in zip(_leaves(PARAMS), _leaves(GRADS[0]), _leaves(new)):
        np.testing.assert_array_equal(q, p - 0.25 * g)
    assert state == train.SGDState(1, None) and new.b_out is None


def test_adam_first_step_moves_each_entry_by_about_lr():
    """Bias-corrected, the first step is ``lr · g / (|g| + eps)``."""
    new, _ = train.adam(PARAMS, GRADS[0], lr=0.01, eps=0.0)
    for p, g, q in zip(_leaves(PARAMS), _leaves(GRADS[0]), _leaves(new)):
        np.testing.assert_allclose(q - p, -0.01 * np.sign(g), rtol=1e-12)


def test_clip_leaves_a_small_gradient_as_it_is():
    small = MLPParams(*(None if a is None else 1e-3 * a for a in GRADS[0]))
    clipped, norm = train.clip_grad_norm(small, 1.0)
    want = math.sqrt(sum(float(np.sum(a * a)) for a in _leaves(small)))
    assert norm == pytest.approx(want, rel=1e-14)
    for a, b in zip(_leaves(clipped), _leaves(small)):
        assert a.tobytes() == b.tobytes()


def test_clip_scales_to_the_max_norm():
    clipped, norm = train.clip_grad_norm(GRADS[0], 0.5)
    after = math.sqrt(sum(float(np.sum(a * a)) for a in _leaves(clipped)))
    assert norm > 0.5 and after == pytest.approx(0.5 * norm / (norm + 1e-6), rel=1e-14)


def test_cosine_schedule_values():
    kw = dict(warmup=4, total=14, lr_max=1.0, lr_min=0.1)
    lrs = [train.cosine_schedule(s, **kw) for s in range(17)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[9] == pytest.approx(0.55, rel=1e-15)  # the midpoint of the decay
    assert lrs[14:] == [0.1, 0.1, 0.1]
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_optimisers_do_not_write_to_their_inputs():
    params = MLPParams(*(None if a is None else a.copy() for a in PARAMS))
    grads = MLPParams(*(None if a is None else a.copy() for a in GRADS[0]))
    _, state = train.adam(params, grads, lr=0.1, weight_decay=0.1, decoupled_weight_decay=True)
    train.adam(params, grads, state, lr=0.1)
    train.sgd(params, grads, train.sgd(params, grads, lr=0.1, momentum=0.9)[1], lr=0.1, momentum=0.9)
    train.clip_grad_norm(grads, 1e-3)
    for a, b in zip(_leaves(params) + _leaves(grads), _leaves(PARAMS) + _leaves(GRADS[0])):
        np.testing.assert_array_equal(a, b)


# ---- the loop ---------------------------------------------------------------------------------

TARGET = _tree(np.random.default_rng(99))


def _quadratic(params, batch):
    """``½ Σ w ‖p − target‖²`` with a random weight per batch: a loss with a known gradient."""
    w = float(batch)
    diff = MLPParams(*(None if p is None else p - t for p, t in zip(params, TARGET)))
    loss = 0.5 * w * sum(float(np.sum(d * d)) for d in _leaves(diff))
    return loss, MLPParams(*(None if d is None else w * d for d in diff))


def _run(seed=0, **options):
    return train.train(_quadratic, PARAMS, lambda step, rng: rng.uniform(0.5, 1.5), seed=seed, **options)


def test_two_runs_give_bitwise_the_same_parameters_and_history():
    (p1, h1), (p2, h2) = _run(steps=30, log=None), _run(steps=30, log=None)
    assert [a.tobytes() for a in _leaves(p1)] == [a.tobytes() for a in _leaves(p2)]
    assert h1 == h2


def test_another_seed_gives_another_run():
    (p1, _), (p2, _) = _run(steps=5, log=None), _run(seed=1, steps=5, log=None)
    assert p1.w_in.tobytes() != p2.w_in.tobytes()


@pytest.mark.parametrize("optimizer", train.OPTIMIZERS)
def test_training_converges_on_a_quadratic(optimizer):
    lr = 0.1 if optimizer == "adam" else 0.5
    params, history = _run(steps=200, log=None, optimizer=optimizer, lr=lr, clip=None, schedule="constant")
    assert history[-1]["loss"] < 1e-3 * history[0]["loss"]
    np.testing.assert_allclose(params.w_in, TARGET.w_in, rtol=0, atol=0.05)


def test_history_records_each_step_and_the_log_every_log_every_steps():
    lines = []
    _, history = _run(steps=25, log=lines.append, log_every=10, clip=0.5, warmup=5, evaluate=lambda p: 1.0)
    assert [h["step"] for h in history] == list(range(25))
    assert set(history[0]) == {"step", "loss", "lr", "grad_norm", "val_loss"} and "val_loss" not in history[1]
    assert [h["lr"] for h in history[:5]] == [
        train.cosine_schedule(s, warmup=5, total=25, lr_max=1e-3) for s in range(5)
    ]
    assert len(lines) == 4 and lines[0].startswith("step      0/25 loss") and "step     24/25" in lines[-1]
    first_batch = np.random.default_rng(0).uniform(0.5, 1.5)  # what the run drew at step 0
    norm = train.clip_grad_norm(_quadratic(PARAMS, first_batch)[1], 0.5)[1]
    assert history[0]["grad_norm"] == norm and norm > 0.5  # the norm before clipping


def test_a_sequence_of_batches_is_taken_in_turn():
    seen = []
    train.train(lambda p, b: (seen.append(b), _quadratic(p, b))[1], PARAMS, [1.0, 2.0], steps=5, log=None)
    assert seen == [1.0, 2.0, 1.0, 2.0, 1.0]


BAD = [
    (
        lambda: train.sgd(PARAMS, GRADS[0]._replace(b_out=np.zeros(3)), lr=0.1),
        RefAttnError,
        r"grads: expected the structure of params",
    ),
    (
        lambda: train.sgd(PARAMS, GRADS[0]._replace(b_in=np.zeros(5)), lr=0.1),
        RefAttnError,
        r"grads.b_in: expected shape \(4,\)",
    ),
    (
        lambda: train.adam(PARAMS, GRADS[0]._replace(b_in=np.full(4, np.nan)), lr=0.1),
        RefAttnError,
        r"grads.b_in: expected finite",
    ),
    (lambda: train.adam(PARAMS, GRADS[0], lr=-1.0), RefAttnError, r"lr: expected a number >= 0"),
    (
        lambda: train.adam(PARAMS, GRADS[0], lr=0.1, betas=(0.9, 1.0)),
        RefAttnError,
        r"betas: expected values in \[0, 1\)",
    ),
    (
        lambda: train.adam(PARAMS, GRADS[0], train.SGDState(0, None), lr=0.1),
        RefAttnTypeError,
        r"state: expected an AdamState",
    ),
    (lambda: train.sgd(PARAMS, GRADS[0], lr=0.1, nesterov=True), RefAttnError, r"nesterov: needs momentum > 0"),
    (lambda: train.sgd([1.0], [1.0], lr=0.1), RefAttnTypeError, r"params: expected a parameter tree"),
    (lambda: train.clip_grad_norm(GRADS[0], 0.0), RefAttnError, r"max_norm: expected a number > 0"),
    (lambda: train.cosine_schedule(3, warmup=5, total=4, lr_max=1.0), RefAttnError, r"total: expected an integer >= 5"),
    (
        lambda: train.cosine_schedule(3, warmup=1, total=4, lr_max=1.0, lr_min=2.0),
        RefAttnError,
        r"lr_min: expected a number <= lr_max",
    ),
    (lambda: _run(steps=2, optimizer="adamw"), RefAttnError, r"optimizer: expected one of 'adam', 'sgd'"),
    (lambda: _run(steps=2, schedule="linear"), RefAttnError, r"schedule: expected one of 'cosine', 'constant'"),
    (lambda: train.train(_quadratic, PARAMS, 3.0, steps=2), RefAttnTypeError, r"batches: expected a callable"),
    (
        lambda: train.train(lambda p, b: (math.nan, p), PARAMS, [1.0], steps=2, log=None),
        RefAttnError,
        r"loss_and_grads: returned a non-finite loss nan at step 0",
    ),
    (lambda: _run(steps=2, stesp=3), RefAttnError, r"unknown option 'stesp' \(did you mean 'steps'\?\)"),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_inputs_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---- properties, each with the broken variant it catches --------------------------------------


@st.composite
def _grad_trees(draw):
    scale = draw(st.sampled_from([1e-4, 1e-2, 1.0, 100.0]))
    shapes = [(3, 4), (4,), (4, 3)]
    leaves = [scale * draw(hnp.arrays(np.float64, s, elements=st.floats(-1, 1))) for s in shapes]
    return MLPParams(leaves[0], leaves[1], leaves[2], None), draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0]))


def check_adam_steps_are_bounded_by_lr(case):
    """Every entry of Adam's first step moves by at most lr (bias-corrected: ``lr |g| / (|g| + eps)``)."""
    grads, lr = case
    new, _ = train.adam(PARAMS, grads, lr=lr)
    for p, q in zip(_leaves(PARAMS), _leaves(new)):
        assert np.max(np.abs(q - p)) <= lr * (1 + 1e-12)


def check_clipping_never_raises_the_norm(case):
    """After clipping the norm is ``min(norm, ~max_norm)``: small gradients are left alone."""
    grads, max_norm = case
    clipped, norm = train.clip_grad_norm(grads, max_norm)
    after = math.sqrt(sum(float(np.sum(a * a)) for a in _leaves(clipped)))
    assert after <= norm * (1 + 1e-12) + 1e-300 and after <= max_norm * (1 + 1e-12)


def _patch_no_bias_correction(monkeypatch):
    monkeypatch.setattr(train, "_bias_corrections", lambda step, b1, b2: (1.0, 1.0))


def _patch_clip_scales_up(monkeypatch):
    monkeypatch.setattr(train, "_clip_coef", lambda norm, max_norm: max_norm / (norm + 1e-6))


PROPERTIES = [
    (check_adam_steps_are_bounded_by_lr, _grad_trees(), "no_bias_correction"),
    (check_clipping_never_raises_the_norm, _grad_trees(), "clip_scales_small_gradients_up"),
]
MUTANTS = {"no_bias_correction": _patch_no_bias_correction, "clip_scales_small_gradients_up": _patch_clip_scales_up}

test_property, test_property_catches_its_mutant = property_table(PROPERTIES, MUTANTS)
