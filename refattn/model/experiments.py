"""Experiments with the models of :mod:`refattn.model`, each writing a Markdown table and a PNG figure.

``python -m refattn.model.experiments NAME`` (or ``refattn model NAME``) runs one of
:data:`EXPERIMENTS` and writes ``benchmarks/model/NAME.md`` and ``NAME.png`` (``--output DIR``
elsewhere; ``--tiny``: a seconds-long run of the same code at toy sizes, for tests):

* ``loops-vs-matrix``: the loop twin (:mod:`refattn.model.loops`) against the matrix LM
  (:mod:`refattn.model.lm`): the largest relative difference of the logits and of every gradient,
  and the time per batch of each (forward, and forward + backward);
* ``lm-vs-bengio``: the attention LM against Bengio et al.'s MLP at matched parameter counts, on the
  synthetic long-range recall task and on the standard-library docstring corpus (byte level):
  validation loss and perplexity, learning curves;
* ``heads``: a two-layer LM trained on the recall task; every head's Michel et al. importance (the
  gradient of its gate, per example and per token), its weight norm, its previous-token and
  induction scores and the loss when it alone is pruned; validation loss against the fraction of
  heads pruned, iteratively by importance, by weight norm and at random.

Every experiment is deterministic for its configuration (seeds included): the same configuration on
the same machine gives the same numbers.  The Markdown file is a pure function of its *record* (the
configuration, the results, the timings and the machine), which the file carries at its end as JSON
with the SHA-256 of the configuration and of the results: ``tests/model/test_experiments.py``
renders the committed record with the current code and compares it with the committed file, and
compares the committed configuration with the current one.  Interpretation: ``specs/model.md``,
"Experiments".
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from refattn._validate import RefAttnError, as_choice

__all__ = [
    "EXPERIMENTS",
    "OUTPUT",
    "add_arguments",
    "default_config",
    "main",
    "parse_record",
    "record_hashes",
    "render",
    "run",
    "run_command",
]

#: The experiments, in the order ``--help`` lists them.
EXPERIMENTS = ("loops-vs-matrix", "lm-vs-bengio", "heads")
#: Where the results go by default (relative to the working directory: run from the repository root).
OUTPUT = Path("benchmarks") / "model"

_TITLES = {
    "loops-vs-matrix": "the loop twin against the matrix LM",
    "lm-vs-bengio": "attention LM against Bengio's MLP at matched parameter counts",
    "heads": "head importance, pruning and the induction circuit of a trained LM",
}

# ---- configurations -------------------------------------------------------------------------------

_RECALL = {"vocab": 16, "seq_len": 16, "distance": 4, "n_train": 20000, "n_val": 512, "seed_train": 1, "seed_val": 2}
_RECALL_LM = {"d_model": 32, "n_layers": 2, "n_heads": 4, "std": 0.1, "seed": 0}
_RECALL_TRAIN = {"steps": 1200, "batch": 64, "lr": 3e-3, "warmup": 50, "eval_every": 100, "seed": 0}
_TINY_RECALL = {"vocab": 5, "seq_len": 6, "distance": 2, "n_train": 64, "n_val": 16, "seed_train": 1, "seed_val": 2}
_TINY_LM = {"d_model": 8, "n_layers": 2, "n_heads": 2, "std": 0.1, "seed": 0}
_TINY_TRAIN = {"steps": 4, "batch": 8, "lr": 3e-3, "warmup": 1, "eval_every": 2, "seed": 0}

_DEFAULTS = {
    "loops-vs-matrix": {
        "model": {"vocab_size": 32, "d_model": 16, "n_layers": 2, "n_heads": 2, "std": 0.1, "seed": 0},
        "batch": 4,
        "seq_len": 32,
        "repeats_loops": 3,
        "repeats_matrix": 20,
        "seed": 0,
    },
    "lm-vs-bengio": {
        "recall": {
            "task": _RECALL,
            "lm": _RECALL_LM,
            "bengio": {"context_size": 4, "embedding_dim": 16, "seed": 0},
            "train": _RECALL_TRAIN,
        },
        "corpus": {
            "text": "stdlib",
            "val_fraction": 0.1,
            "seq_len": 64,
            "eval_windows": 64,
            "lm": {"d_model": 48, "n_layers": 2, "n_heads": 4, "std": 0.02, "seed": 0},
            "bengio": {"context_size": 8, "embedding_dim": 16, "seed": 0},
            "train": {"steps": 800, "batch": 16, "lr": 3e-3, "warmup": 30, "eval_every": 50, "seed": 0},
        },
    },
    "heads": {
        "task": _RECALL,
        "lm": _RECALL_LM,
        "train": _RECALL_TRAIN,
        "n_importance": 256,
        "random_orders": 5,
        "groups": {"induction": 0.5, "previous_token": 0.3},
        "seed": 0,
    },
}

_TINY = {
    "loops-vs-matrix": {
        "model": {"vocab_size": 7, "d_model": 4, "n_layers": 1, "n_heads": 2, "std": 0.5, "seed": 0},
        "batch": 2,
        "seq_len": 4,
        "repeats_loops": 1,
        "repeats_matrix": 2,
        "seed": 0,
    },
    "lm-vs-bengio": {
        "recall": {
            "task": _TINY_RECALL,
            "lm": _TINY_LM,
            "bengio": {"context_size": 2, "embedding_dim": 4, "seed": 0},
            "train": _TINY_TRAIN,
        },
        "corpus": {
            "text": "small",
            "val_fraction": 0.1,
            "seq_len": 8,
            "eval_windows": 4,
            "lm": {"d_model": 8, "n_layers": 1, "n_heads": 2, "std": 0.02, "seed": 0},
            "bengio": {"context_size": 3, "embedding_dim": 4, "seed": 0},
            "train": {"steps": 4, "batch": 2, "lr": 3e-3, "warmup": 1, "eval_every": 2, "seed": 0},
        },
    },
    "heads": {
        "task": _TINY_RECALL,
        "lm": _TINY_LM,
        "train": _TINY_TRAIN,
        "n_importance": 6,
        "random_orders": 2,
        "groups": {"induction": 0.15, "previous_token": 0.2},
        "seed": 0,
    },
}


def default_config(name, *, tiny=False):
    """The configuration an experiment runs with: the committed one, or the toy one of ``--tiny``.

    Parameters
    ----------
    name : str
        One of :data:`EXPERIMENTS`.
    tiny : bool, default False
        The toy sizes (seconds; for tests) instead of the committed ones (minutes).

    Returns
    -------
    dict
        A JSON-able configuration (a fresh copy: changing it changes nothing here).
    """
    as_choice(name, "name", EXPERIMENTS)
    return json.loads(json.dumps((_TINY if tiny else _DEFAULTS)[name]))


# ---- shared helpers -------------------------------------------------------------------------------


def _lm_config(c, vocab, max_len):
    from refattn.model.config import LMConfig

    return LMConfig(
        vocab_size=vocab, d_model=c["d_model"], n_layers=c["n_layers"], n_heads=c["n_heads"], max_len=max_len
    )


def _count(tree):
    from refattn.model.params import tree_leaves

    return int(sum(leaf.size for leaf in tree_leaves(tree)))


def _lm_loss(config):
    from refattn.model.lm import lm_loss_and_grads

    def loss_and_grads(params, batch):
        loss, grads = lm_loss_and_grads(params, batch[0], batch[1], config)
        return loss, grads.dparams

    return loss_and_grads


def _lm_eval(config, tokens, targets, *, head_mask=None, chunk=256):
    """Mean cross-entropy of the LM over every counted target (chunks of ``chunk`` rows)."""
    from refattn.model.layers import cross_entropy
    from refattn.model.lm import lm_forward

    def evaluate(params):
        total, count = 0.0, 0
        for i in range(0, tokens.shape[0], chunk):
            t, y = tokens[i : i + chunk], targets[i : i + chunk]
            n = int((y != -100).sum())
            if n:
                total += float(cross_entropy(lm_forward(params, t, config, head_mask=head_mask), y)) * n
                count += n
        return total / count

    return evaluate


def _train(loss_and_grads, params, batches, train, evaluate, log):
    from refattn.model.train import train as fit

    return fit(
        loss_and_grads,
        params,
        batches,
        lr=train["lr"],
        steps=train["steps"],
        warmup=train["warmup"],
        seed=train["seed"],
        evaluate=evaluate,
        eval_every=train["eval_every"],
        log_every=max(train["steps"] // 4, 1) if log else None,
        log=log,
    )


def _curve(history):
    """``[[step, val_loss, mean training loss since the previous evaluation], ...]``."""
    out, since = [], []
    for h in history:
        since.append(h["loss"])
        if "val_loss" in h:
            out.append([h["step"], h["val_loss"], float(np.mean(since))])
            since = []
    return out


def _recall_data(task):
    from refattn.model import data

    train = data.recall_task(
        task["n_train"],
        seq_len=task["seq_len"],
        vocab=task["vocab"],
        distance=task["distance"],
        seed=task["seed_train"],
    )
    val = data.recall_task(
        task["n_val"], seq_len=task["seq_len"], vocab=task["vocab"], distance=task["distance"], seed=task["seed_val"]
    )
    return train, val


def _train_recall_lm(cfg, log):
    """The recall task's LM, trained: ``(config, params, history, (train, val))``."""
    from refattn.model import data
    from refattn.model.params import init_params

    train_set, val_set = _recall_data(cfg["task"])
    config = _lm_config(cfg["lm"], cfg["task"]["vocab"], cfg["task"]["seq_len"])
    params = init_params(config, cfg["lm"]["seed"], std=cfg["lm"]["std"])
    batch = cfg["train"]["batch"]

    def batches(step, rng):
        return data.minibatch(train_set.tokens, train_set.targets, batch_size=batch, rng=rng)

    evaluate = _lm_eval(config, val_set.tokens, val_set.targets)
    params, history = _train(_lm_loss(config), params, batches, cfg["train"], evaluate, log)
    return config, params, history, (train_set, val_set)


def _accuracy(logits, answers):
    return float(np.mean(np.argmax(logits, axis=-1) == answers))


# ---- loops vs matrix ------------------------------------------------------------------------------


def _rel(a, b, floor=0.0):
    scale = max(float(np.max(np.abs(b), initial=0.0)), floor, 1e-300)
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)), initial=0.0)) / scale


def _loops_vs_matrix(cfg, log):
    from refattn.model import lm, loops
    from refattn.model.params import init_params, tree_items

    m = cfg["model"]
    config = _lm_config(m, m["vocab_size"], cfg["seq_len"])
    params = init_params(config, m["seed"], std=m["std"])
    rng = np.random.default_rng(cfg["seed"])
    shape = (cfg["batch"], cfg["seq_len"])
    tokens = rng.integers(0, config.vocab_size, shape)
    d_logits = rng.standard_normal(shape + (config.vocab_size,))
    mask = np.ones(shape, dtype=bool)
    mask[0, : shape[1] // 2] = False  # the first row left-padded: empty rows under causal attention
    head_mask = rng.uniform(0.5, 1.5, (config.n_layers, config.n_heads))
    agreement = {}
    for label, options in (("plain", {}), ("padding mask and head mask", {"mask": mask, "head_mask": head_mask})):
        want = lm.lm_forward(params, tokens, config, **options)
        got = loops.lm_forward_loops(params, tokens, config, **options)
        g_want = lm.lm_backward(d_logits, params, tokens, config, **options)
        g_got = loops.lm_backward_loops(d_logits, params, tokens, config, **options)
        items, want_items = tree_items(g_got.dparams), tree_items(g_want.dparams)
        floor = max(float(np.max(np.abs(g))) for _, g in want_items)
        grads = {n: _rel(g, w, floor) for (n, g), (_, w) in zip(items, want_items, strict=True)}
        worst = max(grads, key=grads.get)
        row = {"logits": _rel(got, want), "gradients": grads[worst], "worst_leaf": worst}
        if g_want.dhead_mask is not None:
            row["dhead_mask"] = _rel(g_got.dhead_mask, g_want.dhead_mask)
        agreement[label] = row
    if log:
        log("timing the loops and the matrix LM")
    methods = {
        "loops forward": (lambda: loops.lm_forward_loops(params, tokens, config), cfg["repeats_loops"]),
        "loops forward + backward": (
            lambda: loops.lm_backward_loops(d_logits, params, tokens, config),
            cfg["repeats_loops"],
        ),
        "matrix forward": (lambda: lm.lm_forward(params, tokens, config), cfg["repeats_matrix"]),
        "matrix forward + backward": (lambda: lm.lm_backward(d_logits, params, tokens, config), cfg["repeats_matrix"]),
    }
    timings = {}
    for name, (fn, repeats) in methods.items():
        fn()  # first call untimed (imports, caches)
        ts = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
        timings[name] = statistics.median(ts)
    results = {"params": _count(params), "agreement": agreement}
    return results, timings


def _render_loops(record):
    c, r, t = record["config"], record["results"], record["timings"]
    m = c["model"]
    lines = [
        f"Model: V={m['vocab_size']}, d_model={m['d_model']}, {m['n_layers']} layers, {m['n_heads']} heads, "
        f"learned positions, pre-LayerNorm, GELU, tied ({r['params']:,} parameters), init std {m['std']}; "
        f"batch {c['batch']} × {c['seq_len']} tokens; a random cotangent of the logits.",
        "",
        "### Agreement (max |loops − matrix| / max |matrix|; a gradient leaf against the whole gradient's scale "
        "when it is smaller)",
        "",
        "| inputs | logits | gradients (worst leaf) | dhead_mask |",
        "|---|---|---|---|",
    ]
    for label, row in r["agreement"].items():
        dhm = f"{row['dhead_mask']:.1e}" if "dhead_mask" in row else "—"
        lines.append(f"| {label} | {row['logits']:.1e} | {row['gradients']:.1e} (`{row['worst_leaf']}`) | {dhm} |")
    lines += [
        "",
        f"### Time per batch (medians of {c['repeats_loops']} loop runs and {c['repeats_matrix']} matrix runs)",
        "",
        "| pass | loops (s) | matrix (s) | loops / matrix |",
        "|---|---|---|---|",
    ]
    for kind in ("forward", "forward + backward"):
        a, b = t[f"loops {kind}"], t[f"matrix {kind}"]
        lines.append(f"| {kind} | {a:.3f} | {b:.4f} | {a / b:.0f}× |")
    lines += [
        "",
        "(`lm_backward` and `lm_backward_loops` each run their own forward pass: the second row is a "
        "whole training step's gradient.)",
    ]
    return lines


def _figure_loops(record, path):
    t = record["timings"]
    fig, (ax,) = _figure(1, 6.0)
    kinds = ("forward", "forward + backward")
    x = np.arange(len(kinds))
    ax.bar(x - 0.2, [t[f"loops {k}"] for k in kinds], 0.4, label="loops (refattn.model.loops)")
    ax.bar(x + 0.2, [t[f"matrix {k}"] for k in kinds], 0.4, label="matrix (refattn.model.lm)")
    ax.set_xticks(x, kinds)
    ax.set_yscale("log")
    ax.set_ylabel("seconds per batch (log scale)")
    ax.set_title("Loops twin vs matrix LM")
    ax.legend()
    _save(fig, path)


# ---- LM vs Bengio ---------------------------------------------------------------------------------


def _bengio_count(v, n, m, h):
    """Parameters of a Bengio model with direct connections: C, H, d, U, W, b."""
    return v * m + n * m * h + h + h * v + n * m * v + v


def _matched_hidden(target, v, n, m):
    """The hidden units h whose Bengio model (direct connections) has the parameter count nearest ``target``."""
    fixed, per = _bengio_count(v, n, m, 0), n * m + 1 + v
    return max(1, round((target - fixed) / per))


def _bengio_model(b, vocab, target):
    from refattn.model.config import BengioConfig
    from refattn.model.params import init_params

    h = _matched_hidden(target, vocab, b["context_size"], b["embedding_dim"])
    config = BengioConfig(vocab, b["context_size"], b["embedding_dim"], h)
    return config, init_params(config, b["seed"])


def _bengio_eval(config, contexts, targets, chunk=4096):
    from refattn.model.bengio import bengio_forward
    from refattn.model.layers import cross_entropy

    def evaluate(params):
        total = 0.0
        for i in range(0, contexts.shape[0], chunk):
            y = targets[i : i + chunk]
            total += float(cross_entropy(bengio_forward(params, contexts[i : i + chunk], config), y)) * y.size
        return total / contexts.shape[0]

    return evaluate


def _bengio_loss(config):
    from refattn.model.bengio import bengio_loss_and_grads

    return lambda params, batch: bengio_loss_and_grads(params, batch[0], batch[1], config)


def _recall_part(cfg, log):
    from refattn.model import data
    from refattn.model.bengio import bengio_forward
    from refattn.model.lm import lm_forward

    task = cfg["task"]
    config, params, history, (train_set, val_set) = _train_recall_lm(cfg, log)
    lm_row = {
        "params": _count(params),
        "val_loss": history[-1]["val_loss"],
        "accuracy": _accuracy(lm_forward(params, val_set.tokens, config)[:, -1], val_set.answers),
        "curve": _curve(history),
    }
    n = cfg["bengio"]["context_size"]
    b_config, b_params = _bengio_model(cfg["bengio"], task["vocab"], lm_row["params"])
    contexts, answers = train_set.tokens[:, -n:], train_set.answers  # the last n tokens: the query and before
    val_contexts = val_set.tokens[:, -n:]
    batch = cfg["train"]["batch"]

    def batches(step, rng):
        return data.minibatch(contexts, answers, batch_size=batch, rng=rng)

    evaluate = _bengio_eval(b_config, val_contexts, val_set.answers)
    b_params, b_history = _train(_bengio_loss(b_config), b_params, batches, cfg["train"], evaluate, log)
    bengio_row = {
        "params": _count(b_params),
        "hidden_units": b_config.hidden_units,
        "val_loss": b_history[-1]["val_loss"],
        "accuracy": _accuracy(bengio_forward(b_params, val_contexts, b_config), val_set.answers),
        "curve": _curve(b_history),
    }
    return {"lm": lm_row, "bengio": bengio_row, "chance_loss": math.log(task["vocab"] - 1)}


def _corpus_text(name):
    from refattn.model import data

    return data.stdlib_corpus() if name == "stdlib" else data.SMALL_TEXT


def _corpus_part(cfg, log):
    from refattn.model import data
    from refattn.model.params import init_params

    text = _corpus_text(cfg["text"])
    info = data.corpus_info(text)
    split = data.corpus_split(text, val_fraction=cfg["val_fraction"])
    length, tr = cfg["seq_len"], cfg["train"]
    config = _lm_config(cfg["lm"], 256, length)
    params = init_params(config, cfg["lm"]["seed"], std=cfg["lm"]["std"])
    val = data.lm_windows(split.val, seq_len=length)
    k = cfg["eval_windows"]

    def batches(step, rng):
        return data.lm_batches(split.train, batch_size=tr["batch"], seq_len=length, rng=rng)

    params, history = _train(
        _lm_loss(config), params, batches, tr, _lm_eval(config, val.inputs[:k], val.targets[:k]), log
    )
    n = cfg["bengio"]["context_size"]
    later = val.targets.copy()
    later[:, :n] = -100  # the bytes with at least n earlier bytes in their window: Bengio's context or more
    lm_row = {
        "params": _count(params),
        "val_loss": _lm_eval(config, val.inputs, val.targets)(params),
        "val_loss_context": _lm_eval(config, val.inputs, later)(params),
        "curve": _curve(history),
    }
    b_config, b_params = _bengio_model(cfg["bengio"], 256, lm_row["params"])
    contexts, targets = data.context_windows(split.train, context_size=n)
    val_contexts, val_targets = data.context_windows(split.val, context_size=n)
    sub = slice(0, k * length)  # the curve's subset: the stretch of text the LM's windows cover

    def b_batches(step, rng):  # the LM's tokens per step: batch × seq_len predictions
        return data.minibatch(contexts, targets, batch_size=tr["batch"] * length, rng=rng)

    b_params, b_history = _train(
        _bengio_loss(b_config),
        b_params,
        b_batches,
        tr,
        _bengio_eval(b_config, val_contexts[sub], val_targets[sub]),
        log,
    )
    bengio_row = {
        "params": _count(b_params),
        "hidden_units": b_config.hidden_units,
        "val_loss": _bengio_eval(b_config, val_contexts, val_targets)(b_params),
        "curve": _curve(b_history),
    }
    corpus = {"bytes_train": int(split.train.size), "bytes_val": int(split.val.size), **info}
    unigram = np.bincount(split.train, minlength=256) + 1.0
    unigram /= unigram.sum()
    corpus["unigram_loss"] = float(-np.mean(np.log(unigram[split.val])))
    return {"lm": lm_row, "bengio": bengio_row, "corpus": corpus}


def _lm_vs_bengio(cfg, log):
    if log:
        log("recall task: the LM, then Bengio's model")
    recall = _recall_part(cfg["recall"], log)
    if log:
        log("corpus: the LM, then Bengio's model")
    corpus = _corpus_part(cfg["corpus"], log)
    return {"recall": recall, "corpus": corpus}, None


def _render_lm_vs_bengio(record):
    c, r = record["config"], record["results"]
    rc, cc = c["recall"], c["corpus"]
    t, rr, cr = rc["task"], r["recall"], r["corpus"]
    lm, lmc = rc["lm"], cc["lm"]
    co = cr["corpus"]
    lines = [
        "### Recall task (`refattn.model.data.recall_task`)",
        "",
        f"Vocabulary {t['vocab']}, length {t['seq_len']}, the answer at least {t['distance']} tokens before the "
        f"query; {t['n_train']:,} training and {t['n_val']} validation sequences (seeds {t['seed_train']}, "
        f"{t['seed_val']}); the loss is the answer's (the last position's) cross-entropy. LM: d_model={lm['d_model']}, "
        f"{lm['n_layers']} layers, {lm['n_heads']} heads, learned positions, init std {lm['std']}. Bengio: context "
        f"{rc['bengio']['context_size']} (the query and the {rc['bengio']['context_size'] - 1} tokens before it: the "
        f"answer is out of its reach), embedding {rc['bengio']['embedding_dim']}, direct connections. Both: Adam, "
        f"lr {rc['train']['lr']} (cosine, warmup {rc['train']['warmup']}), {rc['train']['steps']} steps of "
        f"{rc['train']['batch']} sequences, gradient norm clipped at 1.",
        "",
        "| model | parameters | val loss (nats) | perplexity | accuracy |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("lm", "attention LM"), ("bengio", f"Bengio MLP (h={rr['bengio']['hidden_units']})")):
        row = rr[name]
        lines.append(
            f"| {label} | {row['params']:,} | {row['val_loss']:.4f} | {math.exp(row['val_loss']):.3f} | "
            f"{100 * row['accuracy']:.1f} % |"
        )
    chance = rr["chance_loss"]
    lines += [
        f"| chance (uniform over the {t['vocab'] - 1} tokens other than the query) | — | {chance:.4f} | "
        f"{math.exp(chance):.3f} | {100 / (t['vocab'] - 1):.1f} % |",
        "",
        "### Standard-library docstrings, byte level (`refattn.model.data.stdlib_corpus`)"
        if cc["text"] == "stdlib"
        else "### `refattn.model.data.SMALL_TEXT`, byte level",
        "",
        f"Python {co['python']} ({co['implementation']}): {co['bytes']:,} bytes (sha256 `{co['sha256'][:16]}…`), the "
        f"last {cc['val_fraction']:.0%} for validation ({co['bytes_val']:,} bytes). LM: d_model={lmc['d_model']}, "
        f"{lmc['n_layers']} layers, {lmc['n_heads']} heads, windows of {cc['seq_len']} bytes, init std {lmc['std']}. "
        f"Bengio: context {cc['bengio']['context_size']} bytes, embedding {cc['bengio']['embedding_dim']}, direct "
        f"connections. Both: Adam, lr {cc['train']['lr']} (cosine, warmup {cc['train']['warmup']}), "
        f"{cc['train']['steps']} steps of {cc['train']['batch']} × {cc['seq_len']} predicted bytes. Validation: the "
        f"LM on every non-overlapping window of the validation bytes (a byte sees the earlier bytes of its window), "
        f"Bengio on every byte with a full context.",
        "",
        "| model | parameters | val loss (nats/byte) | perplexity | bits per byte |",
        "|---|---|---|---|---|",
    ]
    n = cc["bengio"]["context_size"]
    rows = (
        ("attention LM", cr["lm"]["params"], cr["lm"]["val_loss"]),
        (f"attention LM, the bytes with >= {n} earlier bytes in their window", "″", cr["lm"]["val_loss_context"]),
        (f"Bengio MLP (h={cr['bengio']['hidden_units']})", cr["bengio"]["params"], cr["bengio"]["val_loss"]),
    )
    for label, count, loss in rows:
        count = f"{count:,}" if isinstance(count, int) else count
        lines.append(f"| {label} | {count} | {loss:.4f} | {math.exp(loss):.3f} | {loss / math.log(2):.3f} |")
    uni = co["unigram_loss"]
    lines += [
        f"| unigram (training byte frequencies, add-one) | 256 | {uni:.4f} | {math.exp(uni):.3f} | "
        f"{uni / math.log(2):.3f} |",
        "",
        "Learning curves (the figure): validation loss every "
        f"{rc['train']['eval_every']} / {cc['train']['eval_every']} steps; for the corpus on the first "
        f"{cc['eval_windows']} validation windows (the same bytes for both models), the table on all of them.",
    ]
    return lines


def _figure_lm_vs_bengio(record, path):
    r = record["results"]
    fig, axes = _figure(2, 11.0)
    for ax, key, title in ((axes[0], "recall", "recall task"), (axes[1], "corpus", "docstring corpus (bytes)")):
        for name, label, color in (("lm", "attention LM", "C0"), ("bengio", "Bengio MLP", "C1")):
            curve = np.array(r[key][name]["curve"])
            ax.plot(curve[:, 0], curve[:, 1], marker="o", ms=3, color=color, label=f"{label}, validation")
            ax.plot(curve[:, 0], curve[:, 2], ls=":", color=color, label=f"{label}, training (mean since last)")
        if key == "recall":
            ax.axhline(r["recall"]["chance_loss"], color="grey", ls="--", lw=1, label="chance")
        else:
            ax.axhline(r["corpus"]["corpus"]["unigram_loss"], color="grey", ls="--", lw=1, label="unigram")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    _save(fig, path)


# ---- heads ----------------------------------------------------------------------------------------


def _example_grads(params, config, tokens, targets, head_mask):
    """Per-example and per-token head-gate gradients ``(N, L, H)``, ``(N, T, L, H)`` (the loss of each
    target token alone; an example's loss is the mean over its targets) and the real-token mask."""
    from refattn.model.layers import cross_entropy_backward
    from refattn.model.lm import lm_backward, lm_forward

    n, length = tokens.shape
    shape = head_mask.shape
    per_token = np.zeros((n, length) + shape)
    per_example = np.zeros((n,) + shape)
    counted = targets != -100
    for i in range(n):
        logits = lm_forward(params, tokens[i : i + 1], config, head_mask=head_mask)
        positions = np.flatnonzero(counted[i])
        for t in positions:
            y = np.full((1, length), -100)
            y[0, t] = targets[i, t]
            d = cross_entropy_backward(1.0, logits, y).dlogits
            per_token[i, t] = lm_backward(d, params, tokens[i : i + 1], config, head_mask=head_mask).dhead_mask
        per_example[i] = per_token[i, positions].sum(axis=0) / max(len(positions), 1)
    return per_example, per_token, counted


def _heads(cfg, log):
    from refattn.metrics import head_importance, induction_score, previous_token_score, weight_norm_importance
    from refattn.model.lm import lm_forward

    config, params, history, (_, val) = _train_recall_lm(cfg, log)
    n_layers, n_heads = config.n_layers, config.n_heads
    total = n_layers * n_heads
    ones = np.ones((n_layers, n_heads))

    def loss_at(mask):
        return _lm_eval(config, val.tokens, val.targets, head_mask=mask)(params)

    k = cfg["n_importance"]
    imp_tokens, imp_targets = val.tokens[:k], val.targets[:k]
    if log:
        log(f"head importance on {k} validation examples")
    per_example, per_token, counted = _example_grads(params, config, imp_tokens, imp_targets, ones)
    michel_example = head_importance(per_example, per="example")
    michel_token = head_importance(per_token, per="token", mask=counted)
    michel_raw = head_importance(per_example, per="example", normalize=None)
    norms = weight_norm_importance([b.attn for b in params.blocks], num_heads=n_heads)
    logits, maps = lm_forward(params, val.tokens, config, return_attentions=True)
    last_row = np.zeros((val.tokens.shape[1],) * 2, dtype=bool)
    last_row[-1] = True  # the query's row: the one that must copy the answer
    prev = np.stack([previous_token_score(p).mean(axis=0) for p in maps])  # (L, H)
    induction = np.stack([induction_score(p, val.tokens, mask=last_row).mean(axis=0) for p in maps])
    base = loss_at(ones)
    alone = np.zeros((n_layers, n_heads))
    for flat in range(total):
        mask = ones.copy()
        mask.flat[flat] = 0.0
        alone.flat[flat] = loss_at(mask) - base
    if log:
        log("pruning curves: iterative (Michel et al.), weight norm, random orders")

    def curve(order):
        mask, losses = ones.copy(), [base]
        for flat in order:
            mask.flat[flat] = 0.0
            losses.append(loss_at(mask))
        return losses

    def iterative(normalize):
        """Michel et al.: prune the least important remaining head, recompute the importance, repeat."""
        mask, order = ones.copy(), []
        for _ in range(total):
            g = _example_grads(params, config, imp_tokens, imp_targets, mask)[0]
            score = head_importance(g, per="example", normalize=normalize).ravel()
            score[np.asarray(order, dtype=int)] = np.inf
            order.append(int(np.argmin(score)))
            mask.flat[order[-1]] = 0.0
        return order

    orders = {"iterative": iterative("layer"), "iterative_raw": iterative(None)}
    orders["weight_norm"] = [int(i) for i in np.argsort(norms.ravel(), kind="stable")]
    pruning = {name: curve(order) for name, order in orders.items()}
    rng = np.random.default_rng(cfg["seed"])
    pruning["random"] = [curve(list(rng.permutation(total))) for _ in range(cfg["random_orders"])]
    g = cfg["groups"]
    below_last = np.arange(n_layers)[:, None] < n_layers - 1
    groups = {
        "induction": np.flatnonzero(induction.ravel() >= g["induction"]),
        "previous_token": np.flatnonzero((prev >= g["previous_token"]) & below_last),
    }
    group_rows = {}
    for name, members in groups.items():
        mask = ones.copy()
        mask.flat[members] = 0.0
        subsets = [rng.choice(total, size=members.size, replace=False) for _ in range(cfg["random_orders"])]
        random_losses = []
        for subset in subsets:
            other = ones.copy()
            other.flat[subset] = 0.0
            random_losses.append(loss_at(other))
        group_rows[name] = {
            "heads": [[int(i) for i in np.unravel_index(f, ones.shape)] for f in members],
            "loss": loss_at(mask) if members.size else base,
            "random_same_size": random_losses if members.size else [],
        }
    results = {
        "params": _count(params),
        "val_loss": base,
        "accuracy": _accuracy(logits[:, -1], val.answers),
        "chance_loss": math.log(cfg["task"]["vocab"] - 1),
        "curve": _curve(history),
        "importance_example": michel_example.tolist(),
        "importance_token": michel_token.tolist(),
        "importance_raw": michel_raw.tolist(),
        "importance_max_difference": float(np.max(np.abs(michel_example - michel_token))),
        "weight_norm": norms.tolist(),
        "previous_token": prev.tolist(),
        "induction": induction.tolist(),
        "pruned_alone": alone.tolist(),
        "orders": {name: [[int(i) for i in np.unravel_index(f, ones.shape)] for f in o] for name, o in orders.items()},
        "pruning": pruning,
        "groups": group_rows,
    }
    return results, None


def _ranks(values):
    """1 = the largest."""
    flat = np.asarray(values).ravel()
    order = np.argsort(-flat, kind="stable")
    ranks = np.empty(flat.size, dtype=int)
    ranks[order] = np.arange(1, flat.size + 1)
    return ranks.reshape(np.shape(values))


def _head_names(heads):
    return ", ".join(f"{a}.{b}" for a, b in heads) or "none"


def _render_heads(record):
    c, r = record["config"], record["results"]
    t, lm, tr = c["task"], c["lm"], c["train"]
    alone = np.array(r["pruned_alone"])
    ranks = _ranks(alone)
    n_layers, n_heads = alone.shape
    lines = [
        f"LM: d_model={lm['d_model']}, {lm['n_layers']} layers × {lm['n_heads']} heads ({r['params']:,} parameters), "
        f"trained on the recall task (vocabulary {t['vocab']}, length {t['seq_len']}, distance >= {t['distance']}) "
        f"for {tr['steps']} steps of {tr['batch']} (Adam, lr {tr['lr']}): validation loss **{r['val_loss']:.4f}** "
        f"(chance {r['chance_loss']:.4f}), accuracy {100 * r['accuracy']:.1f} % on {t['n_val']} sequences. "
        f"Importance on the first {c['n_importance']} of them.",
        "",
        "### Every head",
        "",
        "Michel et al.'s importance `mean |∂L/∂ξ_h|` (`refattn.metrics.head_importance`; ℓ2-normalised per layer "
        "as in the paper, per example and per token, and raw per example); the weight norm of its q, k, v slices "
        "(`weight_norm_importance`); the previous-token score (`previous_token_score`, every query row) and the "
        "induction score of the query row (`induction_score` on the last row: the attention on the token after "
        "the key's earlier copy); the validation loss added when this head alone is pruned (`head_mask` 0) and "
        "its rank (1 = hurts most).",
        "",
        "| layer.head | importance (example) | importance (token) | raw importance | weight norm | previous-token | "
        "induction (query row) | Δ loss pruned alone | rank |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ie, it, raw = (np.array(r[k]) for k in ("importance_example", "importance_token", "importance_raw"))
    wn, pt, ind = np.array(r["weight_norm"]), np.array(r["previous_token"]), np.array(r["induction"])
    for layer in range(n_layers):
        for h in range(n_heads):
            lines.append(
                f"| {layer}.{h} | {ie[layer, h]:.3f} | {it[layer, h]:.3f} | {raw[layer, h]:.2e} | {wn[layer, h]:.2f} | "
                f"{pt[layer, h]:.3f} | {ind[layer, h]:.3f} | {alone[layer, h]:+.4f} | {ranks[layer, h]} |"
            )
    gr, th = r["groups"], c["groups"]
    lines += [
        "",
        f"Per example and per token agree to {r['importance_max_difference']:.1e}: each recall sequence has one "
        "target, so an example's gradient is its one token's.",
        "",
        "### Pruned together",
        "",
        "| heads | pruned | validation loss | random heads, as many (mean [min, max]) |",
        "|---|---|---|---|",
    ]
    for name, label in (
        ("induction", f"induction score >= {th['induction']}"),
        ("previous_token", f"previous-token score >= {th['previous_token']}, below the last layer"),
    ):
        row = gr[name]
        rand = row["random_same_size"]
        spread = f"{np.mean(rand):.4f} [{min(rand):.4f}, {max(rand):.4f}]" if rand else "—"
        lines.append(f"| {label} | {_head_names(row['heads'])} | {row['loss']:.4f} | {spread} |")
    lines += [
        "",
        "### Validation loss against the fraction of heads pruned",
        "",
        "Iterative: Michel et al.'s procedure, one head at a time, the least important (per example) of the "
        "remaining heads, the importance recomputed under the current mask (normalised per layer, as the paper; "
        "raw: without the normalisation); weight norm: the smallest norm first; "
        f"random: {c['random_orders']} random orders (seed {c['seed']}), mean [min, max]. In brackets: the head "
        "each iterative run prunes at that step.",
        "",
        "| heads pruned | iterative | iterative, raw | weight norm | random mean [min, max] |",
        "|---|---|---|---|---|",
    ]
    p, o = r["pruning"], r["orders"]
    rand = np.array(p["random"])
    for i in range(n_layers * n_heads + 1):
        a = f" ({o['iterative'][i - 1][0]}.{o['iterative'][i - 1][1]})" if i else ""
        b = f" ({o['iterative_raw'][i - 1][0]}.{o['iterative_raw'][i - 1][1]})" if i else ""
        lines.append(
            f"| {i}/{n_layers * n_heads} | {p['iterative'][i]:.4f}{a} | {p['iterative_raw'][i]:.4f}{b} | "
            f"{p['weight_norm'][i]:.4f} | {rand[:, i].mean():.4f} [{rand[:, i].min():.4f}, {rand[:, i].max():.4f}] |"
        )
    return lines


def _figure_heads(record, path):
    r = record["results"]
    fig, (ax, bx) = _figure(2, 11.0)
    p = r["pruning"]
    total = len(p["iterative"]) - 1
    x = np.arange(total + 1) / total
    rand = np.array(p["random"])
    ax.plot(x, p["iterative"], marker="o", label="iterative (Michel importance, per layer)")
    ax.plot(x, p["iterative_raw"], marker="v", label="iterative (raw importance)")
    ax.plot(x, p["weight_norm"], marker="s", label="weight norm")
    ax.plot(x, rand.mean(axis=0), marker="^", label=f"random (mean of {rand.shape[0]})")
    ax.fill_between(x, rand.min(axis=0), rand.max(axis=0), color="C3", alpha=0.15)
    ax.axhline(r["chance_loss"], color="grey", ls="--", lw=1, label="chance")
    ax.set_xlabel("fraction of heads pruned")
    ax.set_ylabel("validation loss (nats)")
    ax.set_title("pruning")
    ax.legend(fontsize=7)
    alone = np.array(r["pruned_alone"])
    names = [f"{a}.{b}" for a in range(alone.shape[0]) for b in range(alone.shape[1])]
    xs = np.arange(len(names))
    bx.bar(xs - 0.3, alone.ravel(), 0.3, label="Δ loss pruned alone")
    bx.bar(xs, np.array(r["previous_token"]).ravel(), 0.3, label="previous-token score")
    bx.bar(xs + 0.3, np.array(r["induction"]).ravel(), 0.3, label="induction score (query row)")
    bx.set_xticks(xs, names)
    bx.set_xlabel("layer.head")
    bx.set_title("heads")
    bx.legend(fontsize=7)
    _save(fig, path)


# ---- records, rendering, figures ------------------------------------------------------------------

_RUN = {"loops-vs-matrix": _loops_vs_matrix, "lm-vs-bengio": _lm_vs_bengio, "heads": _heads}
_RENDER = {"loops-vs-matrix": _render_loops, "lm-vs-bengio": _render_lm_vs_bengio, "heads": _render_heads}
_FIGURE = {"loops-vs-matrix": _figure_loops, "lm-vs-bengio": _figure_lm_vs_bengio, "heads": _figure_heads}
_RECORD_HEADING = "## Record"


def _sha(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, allow_nan=False).encode()).hexdigest()


def record_hashes(record):
    """The SHA-256 of a record's configuration and of its results (canonical JSON, keys sorted).

    Parameters
    ----------
    record : dict
        A record (:func:`run`'s, or :func:`parse_record`'s).

    Returns
    -------
    dict
        ``{"config_sha256": ..., "results_sha256": ...}`` (hex digests).
    """
    return {"config_sha256": _sha(record["config"]), "results_sha256": _sha(record["results"])}


def render(record):
    """The Markdown file of a record: title, command, machine, the tables, the record as JSON.

    Parameters
    ----------
    record : dict
        ``name``, ``config``, ``results``, ``timings`` (None when the experiment has none), ``meta``
        (``command``, ``machine``, ``python``, ``numpy``, ``threads``, ``seconds``) and the hashes
        (:func:`record_hashes`).

    Returns
    -------
    str
        The file's text (a pure function of the record).
    """
    name, meta = record["name"], record["meta"]
    lines = [
        f"# Experiment `{name}`: {_TITLES[name]}",
        "",
        f"Command: `{meta['command']}` ({meta['seconds']:.0f} s). Machine: {meta['machine']}; Python "
        f"{meta['python']}, numpy {meta['numpy']}; BLAS threads {meta['threads']}. Produced by "
        "`refattn/model/experiments.py` from the record at the end of this file (the configuration and results "
        'hashed); the interpretation is in `specs/model.md`, "Experiments"; the figure is '
        f"[{name}.png]({name}.png).",
        "",
        "## Results",
        "",
        *_RENDER[name](record),
        "",
        _RECORD_HEADING,
        "",
        "```json",
        json.dumps(record, sort_keys=True, indent=1, allow_nan=False),
        "```",
    ]
    return "\n".join(lines) + "\n"


def parse_record(text):
    """The record a file written by :func:`run` carries (the JSON block after its ``## Record`` heading).

    Parameters
    ----------
    text : str
        The Markdown file's text.

    Returns
    -------
    dict

    Raises
    ------
    RefAttnError
        No record in the text.
    """
    head, sep, tail = text.partition(f"\n{_RECORD_HEADING}\n")
    start, end = tail.find("```json\n"), tail.rfind("\n```")
    if not sep or start < 0 or end < 0:
        raise RefAttnError("text: expected a '## Record' section with a ```json block, found none")
    return json.loads(tail[start + len("```json\n") : end])


def _figure(n, width):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, n, squeeze=False)[0]


def _save(fig, path):
    fig.savefig(path, format="png", metadata={"Software": None})


def _machine():
    from refattn.bench.run import cpu_description

    return f"{cpu_description()}, {os.cpu_count()} CPUs"


def _blas_threads():
    from threadpoolctl import threadpool_info

    counts = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
    return max(counts) if counts else None


def run(name, *, config=None, tiny=False, output=None, log=None, command=None):
    """Run one experiment; write ``NAME.md`` and ``NAME.png`` into ``output`` when given.

    Parameters
    ----------
    name : str
        One of :data:`EXPERIMENTS`.
    config : dict, optional
        The configuration (:func:`default_config`'s keys).  Default None: ``default_config(name,
        tiny=tiny)``.
    tiny : bool, default False
        With ``config=None``: the toy configuration.
    output : str or path, optional
        The folder of the two files (created if missing).  Default None: nothing written.
    log : callable, optional
        ``log(text)`` receives progress lines (training every quarter, each stage).  Default None.
    command : str, optional
        The command recorded in the file.  Default None: ``python -m refattn.model.experiments NAME``
        (with ``--tiny`` when tiny).

    Returns
    -------
    dict
        The record (:func:`render`): ``name``, ``config``, ``results`` (deterministic for the
        configuration), ``timings`` (None but for loops-vs-matrix), ``meta`` and the two hashes.
    """
    as_choice(name, "name", EXPERIMENTS)
    config = default_config(name, tiny=tiny) if config is None else json.loads(json.dumps(config))
    start = time.perf_counter()
    results, timings = _RUN[name](config, log)
    results = json.loads(json.dumps(results, allow_nan=False))  # plain JSON types: what a file gives back
    command = command or f"python -m refattn.model.experiments {name}" + (" --tiny" if tiny else "")
    record = {
        "name": name,
        "config": config,
        "results": results,
        "timings": timings,
        "meta": {
            "command": command,
            "machine": _machine(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "threads": _blas_threads(),
            "seconds": time.perf_counter() - start,
        },
    }
    record.update(record_hashes(record))
    if output is not None:
        folder = Path(output)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.md").write_text(render(record))
        _FIGURE[name](record, folder / f"{name}.png")
    return record


def add_arguments(parser):
    """The options of the experiments command (``refattn model`` and ``python -m refattn.model.experiments``).

    ``NAME`` (one of :data:`EXPERIMENTS`), ``--output DIR``, ``--tiny``, ``--quiet``.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        Receives the arguments.

    Returns
    -------
    argparse.ArgumentParser
        ``parser``.
    """
    parser.add_argument("name", choices=EXPERIMENTS, help="the experiment: " + ", ".join(EXPERIMENTS))
    parser.add_argument(
        "--output",
        default=str(OUTPUT),
        metavar="DIR",
        help=f"where NAME.md and NAME.png go (default {OUTPUT}, relative to the working directory)",
    )
    parser.add_argument("--tiny", action="store_true", help="toy sizes (seconds; what the tests run)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def main(argv=None, prog=None):
    """Run one experiment from the command line and write its table and figure.

    Parameters
    ----------
    argv : list of str, optional
        The arguments (without the program name).  Default None: ``sys.argv[1:]``.
    prog : str, optional
        The program name in usage and in the recorded command.  Default None:
        ``"python -m refattn.model.experiments"``.

    Returns
    -------
    int
        0 (bad arguments exit through argparse with status 2).
    """
    import argparse

    prog = prog or "python -m refattn.model.experiments"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    return run_command(add_arguments(parser).parse_args(argv), prog=prog)


def run_command(args, *, prog):
    """Run the experiment the parsed arguments name (:func:`add_arguments`), with progress on stderr
    unless ``--quiet``, and say on stdout where the files went.

    Parameters
    ----------
    args : argparse.Namespace
        ``name``, ``output``, ``tiny``, ``quiet``.
    prog : str
        The program name for the progress lines and the recorded command (``"refattn model"``).

    Returns
    -------
    int
        0.
    """
    start = time.perf_counter()

    def log(text):
        print(f"{prog}: [{time.perf_counter() - start:5.0f} s] {text}", file=sys.stderr, flush=True)

    command = f"{prog} {args.name}" + (" --tiny" if args.tiny else "")
    record = run(args.name, tiny=args.tiny, output=args.output, log=None if args.quiet else log, command=command)
    print(f"wrote {Path(args.output) / (args.name + '.md')} and .png ({record['meta']['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
