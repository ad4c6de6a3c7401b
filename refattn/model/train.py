"""Training in float64: optimisers as pure functions on parameter trees, gradient clipping, a
learning-rate schedule and a deterministic training loop (``specs/model.md``, "Training").

A *tree* is a NamedTuple (or tuple) of arrays, None and trees (:mod:`refattn.model.params`): a
:class:`~refattn.model.bengio.BengioParams`, an :class:`~refattn.model.params.LMParams`, ...; a
gradient is a tree of the same structure.  The optimisers return new trees and a new state and
never write to their inputs; everything a step depends on is in its arguments (the state holds the
step count and the moments), so a run is a pure function of its inputs and seed: the same call
gives bitwise the same parameters.

The update rules are PyTorch's, operation for operation (``torch.optim.SGD``, ``torch.optim.Adam``
with ``foreach=False``, ``torch.nn.utils.clip_grad_norm_``), so that a float64 torch run takes the
same steps to a few ulps (torch fuses some multiply-adds; checked in ``tests/model/test_train.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from refattn._validate import (
    RefAttnError,
    RefAttnTypeError,
    as_choice,
    as_flag,
    as_float,
    as_int,
    as_real,
    check_keywords_of,
)
from refattn.model.params import tree_items, tree_leaves, tree_map

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "AdamState",
    "SGDState",
    "adam",
    "clip_grad_norm",
    "cosine_schedule",
    "sgd",
    "train",
]

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "constant")


class SGDState(NamedTuple):
    """The state of :func:`sgd` between steps.

    Fields
    ------
    step : int
        The number of steps taken.
    momentum_buffer : tree or None
        The momentum buffers (the params' structure); None without momentum.
    """

    step: int
    momentum_buffer: tuple | None


class AdamState(NamedTuple):
    """The state of :func:`adam` between steps (torch's ``state_steps``, ``exp_avg``, ``exp_avg_sq``).

    Fields
    ------
    step : int
        The number of steps taken (``t`` of the bias corrections).
    exp_avg : tree
        The first moments ``m`` (the params' structure).
    exp_avg_sq : tree
        The second moments ``v``.
    """

    step: int
    exp_avg: tuple
    exp_avg_sq: tuple


def _tree(tree, name):
    """``tree`` with float64 leaves, each checked finite (named ``grads.blocks.0.attn.w_q``)."""
    if not isinstance(tree, tuple):
        raise RefAttnTypeError(f"{name}: expected a parameter tree (a NamedTuple of arrays), got {type(tree).__name__}")
    for path, leaf in tree_items(tree):
        as_float(leaf, f"{name}.{path}", copy=False)
    return tree_map(lambda a: np.asarray(a, dtype=np.float64), tree)


def _pair(params, grads):
    p, g = _tree(params, "params"), _tree(grads, "grads")
    try:
        tree_map(lambda a, b: None, p, g)
    except RefAttnError as exc:
        raise RefAttnError(f"grads: expected the structure of params ({exc})") from None
    for (path, a), (_, b) in zip(tree_items(p), tree_items(g)):
        if a.shape != b.shape:
            raise RefAttnError(f"grads.{path}: expected shape {a.shape} (as params.{path}), got {b.shape}")
    return p, g


def _lr(lr):
    v = as_real(lr, "lr", allow_none=False)
    if v < 0:
        raise RefAttnError(f"lr: expected a number >= 0, got {v}")
    return v


def _nonneg(value, name):
    v = as_real(value, name, allow_none=False)
    if v < 0:
        raise RefAttnError(f"{name}: expected a number >= 0, got {v}")
    return v


def sgd(params, grads, state=None, *, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
    """One step of stochastic gradient descent, as ``torch.optim.SGD`` (``foreach=False``)::

        g = grad + weight_decay · p
        buf = g (first step),  buf = momentum · buf + (1 − dampening) · g (later)   [momentum > 0]
        g = g + momentum · buf (nesterov),  g = buf (otherwise)                    [momentum > 0]
        p = p − lr · g

    Parameters
    ----------
    params : tree
        The parameters (a NamedTuple of float arrays and None).
    grads : tree
        Their gradients, the same structure and shapes; finite.
    state : SGDState, optional
        From the previous step.  Default None: the first step.
    lr : float
        The learning rate, >= 0.
    momentum : float, default 0.0
        >= 0; 0 for plain SGD.
    dampening : float, default 0.0
        >= 0.
    nesterov : bool, default False
        Nesterov momentum (needs momentum > 0 and dampening 0, as torch).
    weight_decay : float, default 0.0
        L2 penalty coefficient, >= 0.

    Returns
    -------
    params : tree
        The updated parameters (new arrays).
    state : SGDState
        To pass to the next step.
    """
    p, g = _pair(params, grads)
    lr = _lr(lr)
    momentum, dampening = _nonneg(momentum, "momentum"), _nonneg(dampening, "dampening")
    wd = _nonneg(weight_decay, "weight_decay")
    nesterov = as_flag(nesterov, "nesterov")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise RefAttnError(f"nesterov: needs momentum > 0 and dampening 0, got {momentum} and {dampening}")
    state = SGDState(0, None) if state is None else state
    if not isinstance(state, SGDState):
        raise RefAttnTypeError(f"state: expected an SGDState or None, got {type(state).__name__}")
    if wd:
        g = tree_map(lambda gi, pi: gi + wd * pi, g, p)
    buf = None
    if momentum:
        if state.momentum_buffer is None:
            buf = tree_map(np.copy, g)
        else:
            buf = tree_map(lambda b, gi: b * momentum + (1.0 - dampening) * gi, state.momentum_buffer, g)
        g = tree_map(lambda gi, b: gi + momentum * b, g, buf) if nesterov else buf
    return tree_map(lambda pi, gi: pi + (-lr) * gi, p, g), SGDState(state.step + 1, buf)


def _lerp(a, b, w):
    """torch's ``lerp``: ``a + w (b − a)`` for ``w < 0.5``, ``b − (b − a)(1 − w)`` otherwise."""
    return a + w * (b - a) if w < 0.5 else b - (b - a) * (1.0 - w)


def _bias_corrections(step, b1, b2):
    """``(1 − β₁ᵗ, 1 − β₂ᵗ)``: the moments' bias corrections at step ``t``."""
    return 1.0 - b1**step, 1.0 - b2**step


def adam(
    params, grads, state=None, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False
):
    """One step of Adam (Kingma & Ba 2015), as ``torch.optim.Adam`` (``foreach=False``)::

        t = t + 1
        p = p · (1 − lr · wd) (decoupled: AdamW),  or  g = g + wd · p (L2)
        m = lerp(m, g, 1 − β₁),  v = β₂ v + (1 − β₂) g²
        p = p − lr / (1 − β₁ᵗ) · m / (sqrt(v) / sqrt(1 − β₂ᵗ) + eps)

    (eps added after the bias correction of ``sqrt(v)``, as torch).

    Parameters
    ----------
    params : tree
        The parameters.
    grads : tree
        Their gradients, the same structure and shapes; finite.
    state : AdamState, optional
        From the previous step.  Default None: the first step (moments 0).
    lr : float
        The learning rate, >= 0.
    betas : (float, float), default (0.9, 0.999)
        ``β₁, β₂`` in ``[0, 1)``.
    eps : float, default 1e-8
        >= 0.
    weight_decay : float, default 0.0
        >= 0.
    decoupled_weight_decay : bool, default False
        AdamW's decay of the parameters instead of an L2 term in the gradient.

    Returns
    -------
    params : tree
        The updated parameters (new arrays).
    state : AdamState
        To pass to the next step.
    """
    p, g = _pair(params, grads)
    lr, eps, wd = _lr(lr), _nonneg(eps, "eps"), _nonneg(weight_decay, "weight_decay")
    decoupled = as_flag(decoupled_weight_decay, "decoupled_weight_decay")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise RefAttnError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
    b1, b2 = (as_real(b, "betas", allow_none=False) for b in betas)
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise RefAttnError(f"betas: expected values in [0, 1), got {(b1, b2)}")
    if state is None:
        zeros = tree_map(np.zeros_like, p)
        state = AdamState(0, zeros, zeros)
    if not isinstance(state, AdamState):
        raise RefAttnTypeError(f"state: expected an AdamState or None, got {type(state).__name__}")
    step = state.step + 1
    if wd:
        if decoupled:
            p = tree_map(lambda pi: pi * (1.0 - lr * wd), p)
        else:
            g = tree_map(lambda gi, pi: gi + wd * pi, g, p)
    m = tree_map(lambda mi, gi: _lerp(mi, gi, 1.0 - b1), state.exp_avg, g)
    v = tree_map(lambda vi, gi: vi * b2 + (1.0 - b2) * gi * gi, state.exp_avg_sq, g)
    bc1, bc2 = _bias_corrections(step, b1, b2)
    step_size = lr / bc1
    bc2_sqrt = bc2**0.5
    new = tree_map(lambda pi, mi, vi: pi + (-step_size) * mi / (np.sqrt(vi) / bc2_sqrt + eps), p, m, v)
    return new, AdamState(step, m, v)


def clip_grad_norm(grads, max_norm, *, norm_type=2.0):
    """Scale the gradients so that their total norm is at most ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_``::

        norm = ‖(‖g_1‖, ‖g_2‖, ...)‖   (the p-norm of the leaves' p-norms: the norm of all entries)
        g = g · min(1, max_norm / (norm + 1e-6))

    Parameters
    ----------
    grads : tree
        The gradients; finite.
    max_norm : float
        The largest total norm, > 0.
    norm_type : float, default 2.0
        ``p`` > 0 of the norm, or ``inf`` (the largest ``|g|``).

    Returns
    -------
    grads : tree
        The scaled gradients (new arrays; the same values times 1 when the norm is within ``max_norm``).
    norm : float
        The total norm before clipping.
    """
    g = _tree(grads, "grads")
    max_norm = as_real(max_norm, "max_norm", positive=True, allow_none=False)
    p = as_real(norm_type, "norm_type", positive=True, allow_none=False) if norm_type != math.inf else math.inf
    norm = _total_norm(tree_leaves(g), p)
    coef = _clip_coef(norm, max_norm)
    return tree_map(lambda gi: gi * coef, g), norm


def _clip_coef(norm, max_norm):
    """torch's ``clamp(max_norm / (norm + 1e-6), max=1)``."""
    return min(max_norm / (norm + 1e-6), 1.0)


def _total_norm(leaves, p):
    if p == math.inf:
        return max((float(np.max(np.abs(a), initial=0.0)) for a in leaves), default=0.0)
    if p == 2.0:
        norms = [math.sqrt(float(np.sum(a * a))) for a in leaves]
        return math.sqrt(sum(n * n for n in norms))
    norms = [float(np.sum(np.abs(a) ** p)) ** (1.0 / p) for a in leaves]
    return sum(n**p for n in norms) ** (1.0 / p)


def cosine_schedule(step, *, warmup, total, lr_max, lr_min=0.0):
    """A learning rate with linear warmup and cosine decay (nanoGPT's ``get_lr``)::

        lr = lr_max · (step + 1) / warmup                                    step < warmup
        lr = lr_min + ½ (1 + cos(π (step − warmup) / (total − warmup))) (lr_max − lr_min)   warmup <= step < total
        lr = lr_min                                                          step >= total

    Parameters
    ----------
    step : int
        >= 0, counted from 0.
    warmup : int
        >= 0 warmup steps.
    total : int
        The step at which the decay reaches ``lr_min``, >= warmup.
    lr_max : float
        The peak learning rate, >= 0.
    lr_min : float, default 0.0
        The final learning rate, in ``[0, lr_max]``.

    Returns
    -------
    float
    """
    step = as_int(step, "step", minimum=0)
    warmup = as_int(warmup, "warmup", minimum=0)
    total = as_int(total, "total", minimum=warmup)
    lr_max, lr_min = _nonneg(lr_max, "lr_max"), _nonneg(lr_min, "lr_min")
    if lr_min > lr_max:
        raise RefAttnError(f"lr_min: expected a number <= lr_max = {lr_max}, got {lr_min}")
    if step < warmup:
        return lr_max * (step + 1) / warmup
    if step >= total:
        return lr_min
    ratio = (step - warmup) / (total - warmup)
    return lr_min + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr_max - lr_min)


def _batch_source(batches):
    if callable(batches):
        return batches
    if isinstance(batches, Sequence) and not isinstance(batches, (str, bytes)) and len(batches):
        return lambda step, rng: batches[step % len(batches)]
    raise RefAttnTypeError(
        "batches: expected a callable (step, rng) -> batch or a non-empty sequence of batches, "
        f"got {type(batches).__name__}"
    )


def train(
    loss_and_grads,
    params,
    batches,
    *,
    optimizer="adam",
    lr=1e-3,
    steps=100,
    clip=1.0,
    schedule="cosine",
    warmup=0,
    lr_min=0.0,
    weight_decay=0.0,
    momentum=0.0,
    betas=(0.9, 0.999),
    eps=1e-8,
    seed=0,
    log_every=10,
    log=print,
    evaluate=None,
    eval_every=None,
):
    """Train ``params`` for ``steps`` steps; bitwise reproducible for a seed.

    Step ``s = 0, 1, ..., steps − 1``: ``batch = batches(s, rng)`` (or ``batches[s % len]``),
    ``loss, grads = loss_and_grads(params, batch)``, the total gradient norm clipped to ``clip``
    (:func:`clip_grad_norm`), the rate ``lr_s`` of the schedule, then one :func:`adam` or
    :func:`sgd` step.  ``rng = numpy.random.default_rng(seed)`` is made once and handed to the
    batch source, the only randomness of a run.

    Parameters
    ----------
    loss_and_grads : callable
        ``loss_and_grads(params, batch) -> (loss, grads)``, grads a tree of params' structure
        (e.g. ``lambda p, b: bengio_loss_and_grads(p, *b, config)``).
    params : tree
        The initial parameters (not modified).
    batches : callable or sequence
        ``batches(step, rng) -> batch`` (e.g. a sampler of :mod:`refattn.model.data`), or a
        sequence of batches taken in turn.
    optimizer : {"adam", "sgd"}, default "adam"
        The update rule.
    lr : float, default 1e-3
        The (peak) learning rate, >= 0.
    steps : int, default 100
        The number of steps, >= 0.
    clip : float or None, default 1.0
        The largest gradient norm (> 0); None: no clipping (the norm is still recorded).
    schedule : {"cosine", "constant"} or callable, default "cosine"
        :func:`cosine_schedule` with ``warmup``, ``total = steps``, ``lr_max = lr``, ``lr_min``; a
        constant ``lr``; or ``schedule(step) -> lr``.
    warmup : int, default 0
        The cosine schedule's warmup steps.
    lr_min : float, default 0.0
        The cosine schedule's final rate.
    weight_decay : float, default 0.0
        The optimiser's weight decay (L2, as torch's Adam and SGD).
    momentum : float, default 0.0
        SGD's momentum.
    betas : (float, float), default (0.9, 0.999)
        Adam's betas.
    eps : float, default 1e-8
        Adam's eps.
    seed : int, default 0
        Seeds the generator handed to ``batches``.
    log_every : int or None, default 10
        Log a line every this many steps (and at the last); None or 0: never.
    log : callable or None, default print
        Receives each progress line (a str); None: silent.
    evaluate : callable, optional
        ``evaluate(params) -> float`` (e.g. a validation loss), recorded as ``val_loss`` at the
        params of the steps ``s % eval_every == 0`` and the last (before that step's update).
        Default None.
    eval_every : int, optional
        >= 1; default None: ``log_every`` (or never without it).

    Returns
    -------
    params : tree
        The trained parameters.
    history : list of dict
        One per step: ``step``, ``loss`` (at the params before the step), ``lr``, ``grad_norm``
        (before clipping) and, at evaluated steps, ``val_loss``.
    """
    if not callable(loss_and_grads):
        raise RefAttnTypeError(f"loss_and_grads: expected a callable, got {type(loss_and_grads).__name__}")
    optimizer = as_choice(optimizer, "optimizer", OPTIMIZERS)
    steps = as_int(steps, "steps", minimum=0)
    lr = _lr(lr)
    clip = None if clip is None else as_real(clip, "clip", positive=True)
    if callable(schedule):
        lr_at = schedule
    elif as_choice(schedule, "schedule", SCHEDULES) == "cosine":
        warmup = as_int(warmup, "warmup", minimum=0)
        cosine_schedule(0, warmup=warmup, total=max(steps, warmup), lr_max=lr, lr_min=lr_min)  # validates

        def lr_at(step):
            return cosine_schedule(step, warmup=warmup, total=max(steps, warmup), lr_max=lr, lr_min=lr_min)
    else:

        def lr_at(step):
            return lr

    source = _batch_source(batches)
    log_every = 0 if log_every is None else as_int(log_every, "log_every", minimum=0)
    if log is not None and not callable(log):
        raise RefAttnTypeError(f"log: expected a callable or None, got {type(log).__name__}")
    if evaluate is not None and not callable(evaluate):
        raise RefAttnTypeError(f"evaluate: expected a callable or None, got {type(evaluate).__name__}")
    eval_every = log_every if eval_every is None else as_int(eval_every, "eval_every", minimum=1)
    rng = np.random.default_rng(as_int(seed, "seed", minimum=0))
    params = _tree(params, "params")
    state, history = None, []
    for s in range(steps):
        loss, grads = loss_and_grads(params, source(s, rng))
        loss = float(loss)
        if not math.isfinite(loss):
            raise RefAttnError(f"loss_and_grads: returned a non-finite loss {loss} at step {s}")
        if clip is None:
            grads = _tree(grads, "grads")
            norm = _total_norm(tree_leaves(grads), 2.0)
        else:
            grads, norm = clip_grad_norm(grads, clip)
        rate = float(lr_at(s))
        entry = {"step": s, "loss": loss, "lr": rate, "grad_norm": norm}
        if evaluate is not None and eval_every and (s % eval_every == 0 or s == steps - 1):
            entry["val_loss"] = float(evaluate(params))
        if optimizer == "adam":
            params, state = adam(params, grads, state, lr=rate, betas=betas, eps=eps, weight_decay=weight_decay)
        else:
            params, state = sgd(params, grads, state, lr=rate, momentum=momentum, weight_decay=weight_decay)
        history.append(entry)
        if log is not None and log_every and (s % log_every == 0 or s == steps - 1):
            val = f" val_loss {entry['val_loss']:.6f}" if "val_loss" in entry else ""
            log(f"step {s:6d}/{steps} loss {loss:.6f} lr {rate:.3e} grad_norm {norm:.3e}{val}")
    return params, history


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
