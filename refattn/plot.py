"""Figures for saved attention maps: per-head heatmaps, the rollout map and row, per-layer metric curves.

Needs matplotlib (``pip install 'refattn[plot]'``).  Every ``plot_*`` function and
:func:`attention_report` returns a :class:`matplotlib.figure.Figure` built without pyplot (no
global state, no backend switch; it shows in a notebook and ``fig.savefig(path)`` writes it);
:func:`plot_attention_report` writes the report to a file.

Axis legend: ``layers`` per-layer maps ``(..., H, n, n)`` (query rows, key columns), first layer
first; the batch dims ``...`` are flattened and ``item`` indexes them; ``rollout_map`` ``(..., n, n)``
(output rows, input columns).  Heads share one colour scale (0 to the largest weight shown) and one
colorbar; token labels (``tokens``) label both axes, integer ticks otherwise.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import numpy as np

from refattn._validate import RefAttnError, as_int, check_keywords_of

__all__ = [
    "MAX_HEADS",
    "MAX_LAYERS",
    "PLOT_FORMATS",
    "attention_report",
    "check_plot_path",
    "plot_attention_report",
    "plot_heads",
    "plot_metrics",
    "plot_rollout",
    "select_heads",
    "select_item",
    "select_layers",
    "token_labels",
]

PLOT_FORMATS = (".png", ".pdf", ".svg")  # the suffix picks matplotlib's writer
MAX_HEADS = 16  # heads per layer a figure shows: the default shows the first ones and says so
MAX_LAYERS = 8  # layers (rows of heads) a figure shows
HEAD_COLUMNS = 8  # a layer's heads wrap after this many panels
MAX_TICK_LABELS = 32  # token labels per axis of a large panel (16 on a head's); past that every k-th token
CURVES = ("normalized_entropy", "confidence", "locality", "previous_token", "attention_to_first", "induction")
_PANEL = 1.55  # inches per head panel
_HEADS_CMAP, _ROLLOUT_CMAP, _MARK = "viridis", "magma", "#00d5ff"


def _matplotlib():
    """matplotlib's Figure and helpers, or a :class:`RefAttnError` saying how to install it."""
    try:
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise RefAttnError("plotting needs matplotlib: pip install 'refattn[plot]'") from exc
    return Figure, Normalize, Rectangle, MaxNLocator


def check_plot_path(path, name="path"):
    """Check, before any work, that a figure can be written to ``path``: a ``.png``, ``.pdf`` or
    ``.svg`` file name in an existing folder, and matplotlib importable.

    Parameters
    ----------
    path : str or os.PathLike
        Where the figure will go; its suffix (any case) picks the format.
    name : str, default "path"
        The argument's name in error messages (the command passes ``"--plot"``).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    RefAttnError
        Another suffix, a directory, a missing folder, or no matplotlib.
    """
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


# ---- choosing what to show: each check names its argument (the command passes its flag) ----------


def _spans(ids):
    """``[0, 1, 2, 5]`` as ``'0-2, 5'``."""
    out, start = [], None
    for a, b in zip(ids, ids[1:] + [None]):
        start = a if start is None else start
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = None
    return ", ".join(out)


def _index_list(value, count, name, what, *, negative):
    if isinstance(value, (str, bytes)) or np.ndim(value) > 1:
        raise RefAttnError(f"{name}: expected a {what} index or a list of them, got {value!r}")
    raw = [value] if np.ndim(value) == 0 else list(value)
    if not raw:
        raise RefAttnError(f"{name}: expected at least one {what}, got none")
    low = -count if negative else 0
    ids = []
    for v in raw:
        i = as_int(v, name)
        if not low <= i < count:
            raise RefAttnError(f"{name}: expected {what}s in [{low}, {count}) (the maps have {count}), got {i}")
        ids.append(i % count)
    return sorted(set(ids))


def select_layers(n_layers, layer=-1, *, name="layer"):
    """The layers a figure shows, as sorted indices without repeats.

    Parameters
    ----------
    n_layers : int
        How many layers the maps have, >= 1.
    layer : int, sequence of int, or "all", default -1
        An index (negative counts from the end: ``-1`` is the last), a list of them, or
        ``"all"``; at most :data:`MAX_LAYERS` (8) in all.
    name : str, default "layer"
        The argument's name in error messages (the command passes ``"--layer"``).

    Returns
    -------
    list of int
        In ``[0, n_layers)``.
    """
    n_layers = as_int(n_layers, "n_layers", minimum=1)
    if isinstance(layer, str) and layer == "all":
        ids = list(range(n_layers))
    else:
        ids = _index_list(layer, n_layers, name, "layer", negative=True)
    if len(ids) > MAX_LAYERS:
        raise RefAttnError(
            f"{name}: at most {MAX_LAYERS} layers fit a readable figure, got {len(ids)} "
            f"({_spans(ids)}); choose some, e.g. 0,{n_layers // 2},{n_layers - 1}"
        )
    return ids


def select_heads(n_heads, heads=None, *, max_heads=MAX_HEADS, name="heads"):
    """The heads a figure shows, and what was left out.

    Parameters
    ----------
    n_heads : int
        Heads per layer, >= 1.
    heads : int or sequence of int, optional
        Indices in ``[0, n_heads)``, at most ``max_heads`` of them.  Default None: every head, or
        the first ``max_heads`` when there are more (the note says so).
    max_heads : int, default MAX_HEADS (16)
        The most heads a figure shows, >= 1.
    name : str, default "heads"
        The argument's name in error messages and in the note (the command passes ``"--heads"``).

    Returns
    -------
    ids : list of int
        Sorted, without repeats.
    note : str or None
        A sentence saying which heads were left out, or None when none was.
    """
    n_heads = as_int(n_heads, "n_heads", minimum=1)
    max_heads = as_int(max_heads, "max_heads", minimum=1)
    if heads is None:
        ids = list(range(min(n_heads, max_heads)))
        if n_heads <= max_heads:
            return ids, None
        return ids, f"showing heads {_spans(ids)} of {n_heads} (at most {max_heads}); choose others with {name}"
    ids = _index_list(heads, n_heads, name, "head", negative=False)
    if len(ids) > max_heads:
        raise RefAttnError(
            f"{name}: at most {max_heads} heads fit a readable figure, got {len(ids)} ({_spans(ids)}); choose fewer"
        )
    return ids, None


def select_item(n_items, item=0, *, name="item"):
    """The batch item a figure shows, as an index into the flattened batch dims.

    Parameters
    ----------
    n_items : int
        How many items the flattened batch dims hold, >= 1.
    item : int, default 0
        An index; negative counts from the end.
    name : str, default "item"
        The argument's name in error messages (the command passes ``"--batch"``).

    Returns
    -------
    int
        In ``[0, n_items)``.
    """
    return _index_list(item, as_int(n_items, "n_items", minimum=1), name, "batch item", negative=True)[0]


def token_labels(tokens, n, *, item=0, n_items=1, name="tokens"):
    """The ``n`` tick labels of batch item ``item``, as strings.

    Parameters
    ----------
    tokens : sequence of str or int, or array_like of shape (..., n), or None
        ``n`` labels (strings or integer ids), or ids ``(..., n)`` whose batch dims flatten to
        one row (shared by every item) or to ``n_items`` rows (a string is refused: split it
        first).
    n : int
        Tokens per map (the maps are ``n × n``).
    item : int, default 0
        The batch item whose row is used, when there is one row per item.
    n_items : int, default 1
        How many items the maps' flattened batch dims hold.
    name : str, default "tokens"
        The argument's name in error messages.

    Returns
    -------
    list of str or None
        ``n`` labels, or None without ``tokens``.
    """
    if tokens is None:
        return None
    if isinstance(tokens, (str, bytes)):
        raise RefAttnError(f"{name}: expected a sequence of {n} labels, got the string {tokens!r} (split it first)")
    arr = np.asarray(tokens)
    if arr.ndim == 0 or arr.shape[-1] != n:
        got = f"{arr.shape[0]} labels" if arr.ndim == 1 else f"shape {arr.shape}"
        raise RefAttnError(f"{name}: expected {n} labels (the maps are n × n, n = {n}), got {got}")
    rows = arr.reshape(-1, n)
    if rows.shape[0] not in (1, n_items):
        raise RefAttnError(
            f"{name}: expected one row of {n} labels or one per batch item ({n_items}), got shape {arr.shape}"
        )
    return [str(t) for t in rows[item if rows.shape[0] > 1 else 0]]


# ---- drawing -------------------------------------------------------------------------------------


def _items(a, core, name):
    a = np.asarray(a, dtype=np.float64)
    if a.ndim < core or a.shape[-1] != a.shape[-2]:
        raise RefAttnError(f"{name}: expected maps (..., {'H, ' if core == 3 else ''}n, n), got shape {a.shape}")
    return a.reshape((-1,) + a.shape[-core:])


def _ticks(ax, n, labels, MaxNLocator, *, x=True, y=True, only_x=False, fontsize=6, most=MAX_TICK_LABELS):
    """Token labels (every k-th past ``most``) or integer ticks, never 2.5, on the x and (unless
    ``only_x``) y axes; ``x``/``y`` False: ticks without labels."""
    axes = ((ax.xaxis, x, {"labelbottom": False}),) + (() if only_x else ((ax.yaxis, y, {"labelleft": False}),))
    for axis, on, hide in axes:
        if labels is None:
            axis.set_major_locator(MaxNLocator(nbins=5, integer=True, min_n_ticks=1))
            axis.set_tick_params(labelsize=fontsize + 1)
        else:
            step = math.ceil(n / most)
            where = list(range(0, n, step))
            axis.set_ticks(where, [labels[i] for i in where], fontsize=fontsize)
        if not on:
            axis.set_tick_params(**hide)
    if labels is not None and x:
        ax.tick_params(axis="x", labelrotation=90)


def _draw_heads(fig, maps, layer_ids, head_ids, labels, *, note=None, title=None):
    """The heads of ``maps[l] (H, n, n)`` for l in ``layer_ids`` on ``fig`` (a Figure or SubFigure):
    a row of panels per layer (wrapped into balanced rows past :data:`HEAD_COLUMNS`; unused slots
    removed), one colour scale, one colorbar."""
    _, Normalize, _, MaxNLocator = _matplotlib()
    n = maps[layer_ids[0]].shape[-1]
    cols, rows = _head_rows(layer_ids, head_ids)
    per_layer = rows // len(layer_ids)
    shown = np.stack([maps[lyr][head_ids] for lyr in layer_ids])
    vmax = float(np.nanmax(shown)) if np.isfinite(shown).any() else 1.0
    norm = Normalize(vmin=0.0, vmax=vmax if vmax > 0 else 1.0)
    grid = fig.subplots(len(layer_ids) * per_layer, cols, squeeze=False)
    panels = []
    for li, lyr in enumerate(layer_ids):
        for k, h in enumerate(head_ids):
            r, c = li * per_layer + k // cols, k % cols
            ax = grid[r, c]
            ax.imshow(maps[lyr][h], cmap=_HEADS_CMAP, norm=norm, interpolation="nearest")
            ax.set_title(f"layer {lyr}, head {h}", fontsize=8)
            ax.set_gid(f"head {lyr} {h}")
            panels.append((r, c, ax))
        for k in range(len(head_ids), per_layer * cols):  # no empty panels
            grid[li * per_layer + k // cols, k % cols].remove()
    lowest = {c: max(r for r, cc, _ in panels if cc == c) for c in range(cols)}
    for r, c, ax in panels:
        _ticks(ax, n, labels, MaxNLocator, x=r == lowest[c], y=c == 0, most=MAX_TICK_LABELS // 2)
        if r == lowest[c]:
            ax.set_xlabel("key", fontsize=8)
        if c == 0:
            ax.set_ylabel("query", fontsize=8)
    axes = [ax for _, _, ax in panels]
    bar = fig.colorbar(axes[0].images[0], ax=axes, shrink=0.9 if len(axes) > cols else 0.8)
    bar.set_label("attention weight", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    bar.ax.set_gid("heads colorbar")
    heading = title or "attention maps"
    fig.suptitle(heading + (f" — {note}" if note else ""), fontsize=9)
    return axes


def _draw_rollout(fig, ax_map, ax_row, r, row, labels):
    """The rollout map ``r (n, n)`` on ``ax_map`` with ``row`` (or None) outlined, and that row's
    weights over the input tokens as bars on ``ax_row`` (when given)."""
    _, _, Rectangle, MaxNLocator = _matplotlib()
    n = r.shape[-1]
    im = ax_map.imshow(r, cmap=_ROLLOUT_CMAP, vmin=0.0, interpolation="nearest")
    ax_map.set_gid("rollout")
    title = "rollout R = Â_L ⋯ Â_1"
    if row is not None:
        mark = Rectangle((-0.5, row - 0.5), n, 1, fill=False, edgecolor=_MARK, linewidth=1.6, clip_on=False)
        mark.set_gid("rollout row mark")
        ax_map.add_patch(mark)
        title += f", row {row} outlined"
    ax_map.set_title(title, fontsize=9)
    ax_map.set_xlabel("input token", fontsize=8)
    ax_map.set_ylabel("output token", fontsize=8)
    _ticks(ax_map, n, labels, MaxNLocator, fontsize=7)
    bar = fig.colorbar(im, ax=ax_map, shrink=0.85)
    bar.set_label("rollout weight", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    bar.ax.set_gid("rollout colorbar")
    if ax_row is None or row is None:
        return
    ax_row.bar(np.arange(n), r[row], color=_MARK, edgecolor="#0a5d75", gid="rollout row bars")
    name = f"row {row}" + (f" ({labels[row]})" if labels is not None else "")
    ax_row.set_title(f"rollout {name}: the input tokens it draws on", fontsize=9)
    ax_row.set_xlabel("input token", fontsize=8)
    ax_row.set_ylabel("weight", fontsize=8)
    ax_row.set_xlim(-0.6, n - 0.4)
    ax_row.set_ylim(0.0, max(float(np.nanmax(r[row])), 1e-12) * 1.12)
    ax_row.set_gid("rollout row")
    _ticks(ax_row, n, labels, MaxNLocator, only_x=True, fontsize=7)
    ax_row.yaxis.set_major_locator(MaxNLocator(nbins=5))
    ax_row.tick_params(axis="y", labelsize=7)
    ax_row.grid(axis="y", color="0.9")
    ax_row.set_axisbelow(True)


def _curves(summary):
    return {k: np.asarray(summary[k], dtype=np.float64) for k in CURVES if k in summary and np.ndim(summary[k]) == 2}


def _draw_metrics(ax, curves, layer_ids=(), band="layers shown above"):
    """Each metric ``(L, H)`` averaged over heads, per layer; the legend outside the axes, on the
    right; the layers whose heads are drawn get a light band."""
    _, _, _, MaxNLocator = _matplotlib()
    n_layers = next(iter(curves.values())).shape[0]
    x = np.arange(n_layers)
    for name, values in curves.items():
        ax.plot(x, values.mean(axis=-1), marker="o", markersize=4, label=name)
    for k, lyr in enumerate(layer_ids):
        label = band if k == 0 else None
        ax.axvspan(lyr - 0.3, lyr + 0.3, color="0.92", zorder=0, linewidth=0, label=label)
    ax.set_title("per-layer metrics (mean over heads and items)", fontsize=9)
    ax.set_xlabel("layer", fontsize=8)
    ax.set_ylabel("score", fontsize=8)
    if n_layers <= 16:
        ax.set_xticks(x)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
    ax.set_xlim(-0.5, n_layers - 0.5)
    ax.set_ylim(-0.05, 1.05)
    ax.tick_params(labelsize=7)
    ax.grid(axis="y", color="0.92")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=7, frameon=False)
    ax.set_gid("metrics")


def _heads_setup(layers, layer, item, heads, tokens, max_heads):
    maps = [_items(a, 3, f"layers[{i}]") for i, a in enumerate(layers)]
    if not maps:
        raise RefAttnError("layers: expected at least one attention map (..., H, n, n), got none")
    if any(m.shape != maps[0].shape for m in maps):
        raise RefAttnError(f"layers: expected maps of one shape, got {sorted({m.shape for m in maps})}")
    n_items, n_heads, n = maps[0].shape[:3]
    item = select_item(n_items, item)
    layer_ids = select_layers(len(maps), layer)
    head_ids, left_out = select_heads(n_heads, heads, max_heads=max_heads)
    note = f"heads {_spans(head_ids)} of {n_heads} shown" if left_out else None
    labels = token_labels(tokens, n, item=item, n_items=n_items)
    return [m[item] for m in maps], n_items, item, layer_ids, head_ids, note, labels


def _head_rows(layer_ids, head_ids):
    """``(columns, rows)`` of the head grid: each layer's heads in balanced rows of at most
    :data:`HEAD_COLUMNS` (12 heads: two rows of 6, not 8 and 4)."""
    per_layer = -(-len(head_ids) // HEAD_COLUMNS)
    return -(-len(head_ids) // per_layer), len(layer_ids) * per_layer


def plot_heads(layers, *, layer=-1, item=0, heads=None, tokens=None, max_heads=MAX_HEADS):
    """Heatmaps of the attention heads of the chosen layers, for one batch item.

    A row of panels per layer (past 8 heads, balanced rows), query rows against key columns; one
    colour scale, 0 to the largest weight shown, with one colorbar.  Axes: ``...`` batch dims
    (flattened), ``H`` heads, ``n`` tokens.

    Parameters
    ----------
    layers : sequence of array_like, each shape (..., H, n, n)
        Per-layer attention maps, first layer first, all of one shape.
    layer : int, sequence of int, or "all", default -1
        The layers drawn (:func:`select_layers`); default the last.
    item : int, default 0
        The batch item drawn (:func:`select_item`).
    heads : sequence of int, optional
        The heads drawn (:func:`select_heads`).  Default None: all, at most ``max_heads``.
    tokens : sequence or array_like, optional
        Labels of both axes (:func:`token_labels`).  Default None: integer ticks.
    max_heads : int, default MAX_HEADS (16)
        The most heads drawn per layer.

    Returns
    -------
    matplotlib.figure.Figure
        Built without pyplot: ``fig.savefig(path)`` writes it.
    """
    Figure = _matplotlib()[0]
    maps, _, item, layer_ids, head_ids, note, labels = _heads_setup(layers, layer, item, heads, tokens, max_heads)
    cols, rows = _head_rows(layer_ids, head_ids)
    extra = 0.5 if labels is not None else 0.0
    fig = Figure(figsize=(max(cols * _PANEL + 1.3, 4.0), rows * _PANEL + 0.7 + extra), layout="constrained")
    _draw_heads(fig, maps, layer_ids, head_ids, labels, note=note, title=f"attention maps, batch item {item}")
    return fig


def plot_rollout(rollout_map, *, item=0, row=None, tokens=None):
    """The attention-rollout map of one batch item: output tokens (rows) against the input tokens
    (columns) they draw on, with its colorbar.

    Parameters
    ----------
    rollout_map : array_like, shape (..., n, n)
        :func:`refattn.rollout`'s result; ``...`` batch dims, flattened.
    item : int, default 0
        The batch item drawn (:func:`select_item`).
    row : int, optional
        An output token (negative counts from the end): its row is outlined and its weights over
        the input tokens drawn as bars beside the map.  Default None: the map alone.
    tokens : sequence or array_like, optional
        The ``n`` labels (:func:`token_labels`).  Default None: integer ticks.

    Returns
    -------
    matplotlib.figure.Figure
    """
    Figure = _matplotlib()[0]
    flat = _items(rollout_map, 2, "rollout_map")
    item = select_item(flat.shape[0], item)
    n = flat.shape[-1]
    row = None if row is None else _index_list(row, n, "row", "output token", negative=True)[0]
    labels = token_labels(tokens, n, item=item, n_items=flat.shape[0])
    fig = Figure(figsize=(8.2 if row is not None else 4.4, 3.6), layout="constrained")
    fig.get_layout_engine().set(wspace=0.06)
    if row is None:
        _draw_rollout(fig, fig.subplots(), None, flat[item], None, labels)
    else:
        ax_map, ax_row = fig.subplots(1, 2, width_ratios=(1.0, 1.15))
        _draw_rollout(fig, ax_map, ax_row, flat[item], row, labels)
    fig.suptitle(f"batch item {item}", fontsize=9)
    return fig


def plot_metrics(summary, *, layer=()):
    """Per-layer metric curves, each averaged over the heads, the legend outside the data.

    Parameters
    ----------
    summary : mapping of str to array_like
        :func:`refattn.metrics.summarize`'s result: the metrics of :data:`CURVES` it holds as
        ``(L, H)`` arrays (layers, heads), each in [0, 1], are drawn.
    layer : int, sequence of int, or "all", default ()
        Layers to shade (those whose heads a report draws; :func:`select_layers`).  Default: none.

    Returns
    -------
    matplotlib.figure.Figure
    """
    Figure = _matplotlib()[0]
    curves = _curves(summary or {})
    if not curves:
        raise RefAttnError(f"summary: expected some of {list(CURVES)} as (L, H) arrays, got {sorted(summary or {})}")
    n_layers = next(iter(curves.values())).shape[0]
    fig = Figure(figsize=(5.6, 3.4), layout="constrained")
    shaded = select_layers(n_layers, layer) if isinstance(layer, str) or np.size(layer) else ()
    _draw_metrics(fig.subplots(), curves, shaded, band="chosen layers")
    return fig


def attention_report(
    layers,
    *,
    rollout_map=None,
    summary=None,
    layer=-1,
    item=0,
    heads=None,
    tokens=None,
    row=None,
    max_heads=MAX_HEADS,
):
    """One figure of a model's attention: the heads of the chosen layers (:func:`plot_heads`) on
    top; below, the rollout map with ``row`` outlined and that row's bars (:func:`plot_rollout`,
    with ``rollout_map``) and the per-layer metrics (:func:`plot_metrics`, with ``summary``; the
    drawn layers shaded).  Every panel drawn holds data: no empty axes.

    Axes: ``...`` batch dims (flattened), ``H`` heads, ``n`` tokens, ``L`` layers.

    Parameters
    ----------
    layers : sequence of array_like, each shape (..., H, n, n)
        Per-layer attention maps, first layer first, all of one shape.
    rollout_map : array_like, shape (..., n, n), optional
        :func:`refattn.rollout` of the maps (same batch dims and ``n``).  Default None: no
        rollout panel.
    summary : mapping, optional
        :func:`refattn.metrics.summarize` of the maps.  Default None: no metrics panel.
    layer : int, sequence of int, or "all", default -1
        The layers whose heads are drawn (:func:`select_layers`).
    item : int, default 0
        The batch item drawn (:func:`select_item`).
    heads : sequence of int, optional
        The heads drawn (:func:`select_heads`).  Default None: all, at most ``max_heads``.
    tokens : sequence or array_like, optional
        The ``n`` labels (:func:`token_labels`).  Default None: integer ticks.
    row : int, optional
        The rollout row to outline and draw as bars; needs ``rollout_map``.  Default None.
    max_heads : int, default MAX_HEADS (16)
        The most heads drawn per layer.

    Returns
    -------
    matplotlib.figure.Figure
    """
    Figure = _matplotlib()[0]
    maps, n_items, item, layer_ids, head_ids, note, labels = _heads_setup(layers, layer, item, heads, tokens, max_heads)
    n = maps[0].shape[-1]
    r = None
    if rollout_map is None and row is not None:
        raise RefAttnError(f"row: marks a row of the rollout map, but no rollout_map was given (row={row!r})")
    if rollout_map is not None:
        flat = _items(rollout_map, 2, "rollout_map")
        if flat.shape[-1] != n or flat.shape[0] != n_items:
            raise RefAttnError(
                f"rollout_map: expected the maps' batch and n × n ({n}), got shape {np.shape(rollout_map)}"
            )
        r = flat[item]
        row = None if row is None else _index_list(row, n, "row", "output token", negative=True)[0]
    curves = _curves(summary or {})
    widths = []  # the bottom row: rollout map, its row's bars, the metric curves (+ legend)
    if r is not None:
        widths.append(3.6)
        if row is not None:
            widths.append(4.2)
    if curves:
        widths.append(4.6)
    cols, rows = _head_rows(layer_ids, head_ids)
    extra = 0.5 if labels is not None else 0.0
    top_h = rows * _PANEL + 0.6 + extra
    bottom_h = 3.3 + extra if widths else 0.0
    width = max(cols * _PANEL + 1.3, sum(widths), 4.0)
    fig = Figure(figsize=(width, top_h + bottom_h), layout="constrained")
    fig.get_layout_engine().set(wspace=0.05)
    top, bottom = fig.subfigures(2, 1, height_ratios=(top_h, bottom_h)) if widths else (fig, None)
    need = cols * _PANEL + 1.3
    if width - need > 0.5:  # keep the head panels their size, centred, rather than spread apart
        pad = (width - need) / 2
        top = top.subfigures(1, 3, width_ratios=(pad, need, pad))[1]
    _draw_heads(top, maps, layer_ids, head_ids, labels, note=note, title=f"attention maps, batch item {item}")
    if widths:
        axes = list(np.ravel(bottom.subplots(1, len(widths), width_ratios=widths, squeeze=False)))
        if r is not None:
            ax_map = axes.pop(0)
            _draw_rollout(bottom, ax_map, axes.pop(0) if row is not None else None, r, row, labels)
        if curves:
            _draw_metrics(axes.pop(0), curves, layer_ids)
    return fig


def plot_attention_report(path, layers, **options):
    """Write :func:`attention_report` to a file (at 120 dpi).

    Parameters
    ----------
    path : str or os.PathLike
        A ``.png``, ``.pdf`` or ``.svg`` file name (the suffix picks the format) in an existing
        folder (:func:`check_plot_path`).
    layers : sequence of array_like, each shape (..., H, n, n)
        Per-layer attention maps, as :func:`attention_report`.
    **options
        :func:`attention_report`'s keyword options: ``rollout_map``, ``summary``, ``layer``,
        ``item``, ``heads``, ``tokens``, ``row``, ``max_heads``.

    Returns
    -------
    str or os.PathLike
        ``path``, as given.
    """
    check_plot_path(path)
    fig = attention_report(layers, **options)
    fig.savefig(path, dpi=120)
    return path


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
