"""The language-model section of the benchmarks: one training step (forward + backward) of
:func:`refattn.model.lm.lm_loss_and_grads` against the same model in PyTorch CPU autograd, float64,
side by side in one process.

``python -m refattn.bench --model`` adds the section to the table (with ``--no-rollout --sizes 256
--memory-sizes 256`` little else runs).  The model (:data:`SHAPE`) is GPT-2's layout at a small
size: byte vocabulary (256), ``d_model=256``, 4 layers, 8 heads, learned positions, pre-LayerNorm,
exact GELU, tied embeddings, causal, biases; batch 8 of 256 tokens.  The PyTorch twin
(:func:`torch_step`) takes refattn's parameters (:class:`~refattn.model.params.LMParams`, weights
``(in, out)``) as leaf tensors and runs ``torch.nn.functional`` (``layer_norm``,
``scaled_dot_product_attention``, ``gelu``, ``cross_entropy``) with autograd.  Both sides get the
same number of threads (the BLAS threads NumPy runs with, read by threadpoolctl); steps alternate
(refattn, torch, refattn, ...) with a pause after each, and the best and the median of each side are
reported: on a shared machine the best of several interleaved runs is the fairest number.  The
issue's target: refattn ≤ 1.5× torch.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from refattn._validate import RefAttnError, as_int
from refattn.model.config import LMConfig
from refattn.model.lm import lm_loss_and_grads
from refattn.model.params import init_params, tree_items

__all__ = ["SHAPE", "TARGET", "blas_threads", "model_lines", "model_rows", "torch_step"]

#: The benchmark model's :class:`~refattn.model.config.LMConfig` fields and the batch shape.
SHAPE = {"vocab_size": 256, "d_model": 256, "n_layers": 4, "n_heads": 8, "batch": 8, "seq_len": 256}
#: The issue's target: refattn's step at most this many times PyTorch's.
TARGET = 1.5
_PAUSE = 0.15


def blas_threads():
    """The number of threads NumPy's BLAS runs with (threadpoolctl), or None when it reports none.

    Returns
    -------
    int or None
    """
    from threadpoolctl import threadpool_info

    counts = [info["num_threads"] for info in threadpool_info() if info.get("user_api") == "blas"]
    return max(counts) if counts else None


def _config(shape):
    return LMConfig(
        vocab_size=shape["vocab_size"],
        d_model=shape["d_model"],
        n_layers=shape["n_layers"],
        n_heads=shape["n_heads"],
        max_len=shape["seq_len"],
    )


def torch_step(torch, params, config):
    """The PyTorch twin of refattn's LM: ``step(tokens, targets) -> (loss, {name: grad})``.

    Covers the configurations of the benchmark: learned or no positions, LayerNorm or RMSNorm,
    pre-norm, GELU (exact or tanh) or ReLU, tied or untied, GQA, causal or not, with or without
    biases (a config outside these raises).  Each call clears the gradients, runs the forward and
    ``loss.backward()``.

    Parameters
    ----------
    torch : module
        The imported ``torch``.
    params : LMParams
        refattn's parameters (:func:`refattn.model.params.init_params`), copied into float64 leaf
        tensors that require grad (names as :func:`refattn.model.params.tree_items`).
    config : LMConfig
        The model.

    Returns
    -------
    callable
        ``step(tokens (B, T) int, targets (B, T) int) -> (loss: float, grads: dict name -> ndarray)``.
    """
    import torch.nn.functional as F

    if config.positions not in ("learned", "sinusoidal") or config.norm_position != "pre":
        raise RefAttnError(
            f"config: the torch twin covers learned or sinusoidal positions and pre-norm, got positions="
            f"{config.positions!r}, norm_position={config.norm_position!r}"
        )
    if config.activation == "swiglu" or config.positions == "sinusoidal":
        raise RefAttnError(f"config: the torch twin has no {config.activation!r}/{config.positions!r} layer")
    tp = {name: torch.tensor(leaf, requires_grad=True) for name, leaf in tree_items(params)}
    e, h, hk = config.d_model, config.n_heads, config.n_kv_heads

    def lin(t, w, b):
        y = t @ tp[w]
        return y + tp[b] if b in tp else y

    def norm(t, prefix):
        if config.norm == "layer":
            return F.layer_norm(t, (e,), tp[prefix + ".weight"], tp.get(prefix + ".bias"), config.norm_eps)
        return F.rms_norm(t, (e,), tp[prefix + ".weight"], config.norm_eps)

    def act(t):
        if config.activation == "relu":
            return F.relu(t)
        return F.gelu(t, approximate="tanh" if config.activation == "gelu_tanh" else "none")

    def step(tokens, targets):
        for t in tp.values():
            t.grad = None
        ids = torch.as_tensor(tokens)
        b, length = ids.shape
        x = tp["wte"][ids]
        if config.positions == "learned":
            x = x + tp["wpe"][:length]
        for layer in range(config.n_layers):
            pre = f"blocks.{layer}."
            a = norm(x, pre + "ln_1")
            q = lin(a, pre + "attn.w_q", pre + "attn.b_q").view(b, length, h, -1).transpose(1, 2)
            k = lin(a, pre + "attn.w_k", pre + "attn.b_k").view(b, length, hk, -1).transpose(1, 2)
            v = lin(a, pre + "attn.w_v", pre + "attn.b_v").view(b, length, hk, -1).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=config.causal, enable_gqa=hk != h)
            x = x + lin(o.transpose(1, 2).reshape(b, length, e), pre + "attn.w_o", pre + "attn.b_o")
            m = norm(x, pre + "ln_2")
            hidden = act(lin(m, pre + "mlp.w_in", pre + "mlp.b_in"))
            x = x + lin(hidden, pre + "mlp.w_out", pre + "mlp.b_out")
        x = norm(x, "ln_f")
        logits = x @ (tp["wte"].T if config.tied_embeddings else tp["lm_head"])
        loss = F.cross_entropy(logits.reshape(-1, config.vocab_size), torch.as_tensor(targets).reshape(-1))
        loss.backward()
        return float(loss.detach()), {name: t.grad.numpy() for name, t in tp.items()}

    return step


def _max_rel(ours, theirs):
    """The largest ``max|a − b| / max|b|`` over the leaves (a leaf's scale floored at 1e-3 of the whole
    gradient's: ``b_k``'s gradient is 0 in exact arithmetic)."""
    floor = 1e-3 * max(float(np.max(np.abs(g))) for g in theirs.values())
    worst = 0.0
    for name, g in ours.items():
        scale = max(float(np.max(np.abs(theirs[name]))), floor)
        worst = max(worst, float(np.max(np.abs(g - theirs[name]))) / scale)
    return worst


def model_rows(*, repeats=5, shape=None, seed=0, say=None):
    """Time one training step of refattn's LM and of its PyTorch twin, interleaved, and compare them.

    Parameters
    ----------
    repeats : int, default 5
        Timed steps of each side (after one untimed step each: compiles, caches).
    shape : dict, optional
        :data:`SHAPE`'s keys.  Default None: :data:`SHAPE`.
    seed : int, default 0
        Seeds the parameters (:func:`~refattn.model.params.init_params`) and the tokens.
    say : callable, optional
        ``say(text)`` for progress.  Default None.

    Returns
    -------
    dict
        ``shape``, ``params`` (parameter count), ``refattn`` and ``torch`` (lists of seconds, None
        for torch without torch installed), ``loss_rel`` and ``grad_rel`` (refattn vs torch, None
        without torch), ``threads`` (torch's, BLAS's, numba's), ``load`` (``os.getloadavg()`` before
        and after).
    """
    shape = dict(SHAPE if shape is None else shape)
    repeats = as_int(repeats, "repeats", minimum=1)
    config = _config(shape)
    params = init_params(config, seed)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (shape["batch"], shape["seq_len"]))
    targets = rng.integers(0, config.vocab_size, tokens.shape)
    blas = blas_threads()
    try:
        import torch
    except ImportError:
        torch = None
    threads = {"blas": blas, "numba": _numba_threads(), "torch": None}
    if torch is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(blas or previous)
        threads["torch"] = torch.get_num_threads()

    def ours():
        return lm_loss_and_grads(params, tokens, targets, config)

    load = [os.getloadavg()]
    out = {"shape": shape, "params": sum(leaf.size for _, leaf in tree_items(params)), "threads": threads}
    try:
        if say:
            say(f"LM step: one untimed step each (B={shape['batch']}, T={shape['seq_len']})")
        loss, grads = ours()
        methods = {"refattn": ours}
        if torch is not None:
            twin = torch_step(torch, params, config)
            t_loss, t_grads = twin(tokens, targets)
            mine = dict(tree_items(grads.dparams))
            out["loss_rel"] = abs(loss - t_loss) / abs(t_loss)
            out["grad_rel"] = _max_rel(mine, t_grads)
            methods["torch"] = lambda: twin(tokens, targets)
        times = {name: [] for name in methods}
        for r in range(repeats):
            if say:
                say(f"LM step: repeat {r + 1}/{repeats}")
            for name, fn in methods.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
                time.sleep(_PAUSE)
    finally:
        if torch is not None:
            torch.set_num_threads(previous)
    load.append(os.getloadavg())
    out.update(refattn=times["refattn"], torch=times.get("torch"), load=load)
    out.setdefault("loss_rel", None)
    out.setdefault("grad_rel", None)
    return out


def _numba_threads():
    import importlib.util

    if importlib.util.find_spec("numba") is None:
        return None
    import numba

    return numba.get_num_threads()


def model_lines(m):
    """The Markdown of :func:`model_rows`' result: a section, its table and the target's verdict.

    Parameters
    ----------
    m : dict
        What :func:`model_rows` returned.

    Returns
    -------
    section : list of str
        The section's lines (heading, the table of best and median seconds, the agreement).
    target : list of str
        One row of the targets table (``| target | measured | verdict |``), empty without torch.
    """
    s = m["shape"]
    th = m["threads"]
    lines = [
        "",
        f"## LM training step (forward + backward, float64): V={s['vocab_size']}, d_model={s['d_model']}, "
        f"{s['n_layers']} layers, {s['n_heads']} heads, T={s['seq_len']}, batch {s['batch']}",
        "",
        f"GPT-2 layout (learned positions, pre-LayerNorm, GELU, tied), {m['params']:,} parameters. "
        f"Threads: BLAS {th['blas']}, numba {th['numba']}, torch {th['torch']}. "
        f"Load average (1 min) {m['load'][0][0]:.2f} before, {m['load'][1][0]:.2f} after. "
        f"{len(m['refattn'])} interleaved steps each.",
        "",
        "| method | best (s) | median (s) |",
        "|---|---|---|",
        f"| refattn `lm_loss_and_grads` | {min(m['refattn']):.3f} | {statistics.median(m['refattn']):.3f} |",
    ]
    target = []
    if m["torch"]:
        lines.append(f"| torch autograd (same params) | {min(m['torch']):.3f} | {statistics.median(m['torch']):.3f} |")
        best = min(m["refattn"]) / min(m["torch"])
        median = statistics.median(m["refattn"]) / statistics.median(m["torch"])
        lines += [
            "",
            f"refattn / torch: **{best:.2f}×** (best), {median:.2f}× (median). Agreement: loss "
            f"{m['loss_rel']:.1e} relative, gradients {m['grad_rel']:.1e} (the largest relative difference of "
            "a leaf).",
        ]
        verdict = "met" if best <= TARGET else "**not met**"
        target = [f"| LM training step: refattn ≤ {TARGET}× torch autograd (float64) | {best:.2f}× | {verdict} |"]
    else:
        lines += ["", "torch is not installed: no PyTorch row."]
    return lines, target
