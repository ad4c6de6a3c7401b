"""Figures for saved attention maps: per-head heatmaps, the rollout map, per-layer metric curves.

Needs matplotlib (``pip install 'refattn[plot]'``); drawn with the non-interactive Agg backend.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from refattn._validate import RefAttnError, as_int

__all__ = ["PLOT_FORMATS", "check_plot_path", "plot_attention_report"]

PLOT_FORMATS = (".png", ".pdf", ".svg")  # the suffix picks matplotlib's writer


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise RefAttnError("--plot needs matplotlib: pip install 'refattn[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_plot_path(path, name="path"):
    """``path`` as a :class:`~pathlib.Path` a figure can be written to: a ``.png`` (``.pdf``, ``.svg``)
    name in an existing folder, and matplotlib importable; a :class:`RefAttnError` names ``name``."""
    p = Path(os.fspath(path))
    if p.suffix.lower() not in PLOT_FORMATS:
        raise RefAttnError(f"{name}: expected a file name ending in {', '.join(PLOT_FORMATS)}, got {str(p)!r}")
    if p.is_dir():
        raise RefAttnError(f"{name}: expected a file name, got the directory {str(p)!r}")
    if not p.parent.is_dir():
        raise RefAttnError(f"{name}: the folder {str(p.parent)!r} does not exist (create it first), got {str(p)!r}")
    if importlib.util.find_spec("matplotlib") is None:
        raise RefAttnError(f"{name}: writing a figure needs matplotlib: pip install 'refattn[plot]'")
    return p


def plot_attention_report(path, layers, *, rollout_map=None, summary=None, item=0, max_heads=8):
    """Write a PNG (or ``.pdf``, ``.svg``, by the suffix of ``path``): the last layer's heads
    ``(H, n, n)`` of batch item ``item``, the rollout map ``(n, n)`` of that item, and each per-layer
    metric of ``summary`` (``(L, H)`` arrays) averaged over heads.  Returns ``path``."""
    check_plot_path(path)
    max_heads = as_int(max_heads, "max_heads", minimum=1)
    layers = list(layers)
    if not layers:
        raise RefAttnError("layers: expected at least one attention map (..., H, n, n), got none")
    last = np.asarray(layers[-1], dtype=np.float64)
    if last.ndim < 3:
        raise RefAttnError(f"layers[-1]: expected maps (..., H, n, n), got shape {last.shape}")
    last = last.reshape((-1,) + last.shape[-3:])  # (items, H, n, n)
    item = as_int(item, "item")
    if not 0 <= item < last.shape[0]:
        raise RefAttnError(f"item: expected a batch item in [0, {last.shape[0]}), got {item}")
    last = last[item]  # (H, n, n)
    plt = _pyplot()
    heads = min(last.shape[0], max_heads)
    shown = ("normalized_entropy", "confidence", "locality", "previous_token", "attention_to_first", "induction")
    curves = {k: v for k, v in (summary or {}).items() if k in shown and np.ndim(v) == 2}  # each in [0, 1]
    panels = heads + (rollout_map is not None) + (1 if curves else 0)
    cols = min(4, panels)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    flat = list(axes.ravel())
    for h in range(heads):
        ax = flat.pop(0)
        ax.imshow(last[h], cmap="viridis", vmin=0.0, interpolation="nearest")
        ax.set_title(f"layer {len(layers) - 1}, head {h}", fontsize=9)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    if rollout_map is not None:
        ax = flat.pop(0)
        r = np.asarray(rollout_map).reshape((-1,) + np.shape(rollout_map)[-2:])[item]
        ax.imshow(r, cmap="magma", vmin=0.0, interpolation="nearest")
        ax.set_title("rollout R = Â_L ⋯ Â_1", fontsize=9)
        ax.set_xlabel("input token")
        ax.set_ylabel("output token")
    if curves:
        ax = flat.pop(0)
        x = np.arange(len(layers))
        for name, values in curves.items():
            ax.plot(x, np.asarray(values, dtype=np.float64).mean(axis=-1), marker="o", label=name)
        ax.set_title("per-layer metrics (mean over heads)", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_xticks(x)
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=6)
    for ax in flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
