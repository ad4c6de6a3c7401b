"""refattn.plot: what each figure holds, read from the matplotlib Figure (axes, images, colorbars,
tick labels, patches, legends), not from pixels."""

import sys

import numpy as np
import pytest

import refattn
from refattn import plot
from refattn._validate import RefAttnError

pytest.importorskip("matplotlib")
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402


def _maps(layers=3, items=2, heads=4, n=8, seed=0):
    rng = np.random.default_rng(seed)
    return [refattn.softmax(3 * rng.standard_normal((items, heads, n, n))) for _ in range(layers)]


def _by_gid(fig, prefix):
    return [ax for ax in fig.axes if (ax.get_gid() or "").startswith(prefix)]


def _heads(fig):
    return {tuple(int(x) for x in ax.get_gid().split()[1:]): ax for ax in _by_gid(fig, "head ")}


def _drawn(fig):
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _labels(axis):
    return [t.get_text() for t in axis.get_ticklabels()]


def test_the_default_shows_every_head_of_the_last_layer_with_one_shared_scale_and_one_colorbar():
    layers = _maps()
    fig = plot.plot_heads(layers)
    heads = _heads(fig)
    assert sorted(heads) == [(2, h) for h in range(4)]
    clims = {ax.images[0].get_clim() for ax in heads.values()}
    assert len(clims) == 1  # one colour scale for every head panel
    vmin, vmax = clims.pop()
    assert vmin == 0.0 and vmax == pytest.approx(layers[2][0].max(), rel=0, abs=0)
    assert len({id(ax.images[0].norm) for ax in heads.values()}) == 1
    (bar,) = _by_gid(fig, "heads colorbar")
    assert bar.get_ylabel() == "attention weight"
    assert len(fig.axes) == 4 + 1  # the heads and the colorbar: nothing else, nothing empty
    np.testing.assert_array_equal(heads[(2, 3)].images[0].get_array(), layers[2][0, 3])


def test_layers_heads_and_batch_item_choose_the_panels():
    layers = _maps(layers=4)
    fig = plot.plot_heads(layers, layer=[0, -1], heads=[3, 1], item=1)
    heads = _heads(fig)
    assert sorted(heads) == [(0, 1), (0, 3), (3, 1), (3, 3)]
    for (lyr, h), ax in heads.items():
        np.testing.assert_array_equal(ax.images[0].get_array(), layers[lyr][1, h])
        assert ax.get_title() == f"layer {lyr}, head {h}"
    shown = np.stack([layers[lyr][1, h] for lyr, h in heads])
    assert {ax.images[0].get_clim() for ax in heads.values()} == {(0.0, shown.max())}
    assert "batch item 1" in fig._suptitle.get_text()
    assert sorted(_heads(plot.plot_heads(layers, layer="all", heads=[0]))) == [(i, 0) for i in range(4)]
    assert sorted(_heads(plot.plot_heads(layers, layer=2, item=-1))) == [(2, h) for h in range(4)]


@pytest.mark.parametrize("n_heads, columns", [(4, 4), (8, 8), (9, 5), (12, 6), (16, 8)])
def test_heads_wrap_into_balanced_rows_and_no_panel_is_empty(n_heads, columns):
    layers = _maps(layers=2, items=1, heads=n_heads)
    fig = plot.plot_heads(layers, layer=[0, 1])
    heads = _heads(fig)
    assert len(heads) == 2 * n_heads
    assert len(fig.axes) == 2 * n_heads + 1  # unused slots of the grid are removed, not left blank
    assert all(len(ax.images) == 1 for ax in heads.values())
    assert {ax.get_subplotspec().colspan.start for ax in heads.values()} == set(range(columns))


def test_past_the_readable_maximum_the_default_says_which_heads_are_shown():
    layers = _maps(layers=1, items=1, heads=20, n=4)
    fig = plot.plot_heads(layers)
    assert sorted(_heads(fig)) == [(0, h) for h in range(plot.MAX_HEADS)]
    assert "heads 0-15 of 20 shown" in fig._suptitle.get_text()
    ids, note = plot.select_heads(20)
    assert ids == list(range(16)) and "showing heads 0-15 of 20" in note and "heads" in note
    assert plot.select_heads(4) == ([0, 1, 2, 3], None)
    assert sorted(_heads(plot.plot_heads(layers, heads=range(4, 20)))) == [(0, h) for h in range(4, 20)]
    with pytest.raises(RefAttnError, match=r"heads: at most 16 heads fit a readable figure, got 17"):
        plot.plot_heads(layers, heads=range(17))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(layer=3), r"layer: expected layers in \[-3, 3\) \(the maps have 3\), got 3"),
        (dict(layer=-4), r"layer: expected layers in \[-3, 3\)"),
        (dict(layer=[]), r"layer: expected at least one layer"),
        (dict(layer="last"), r"layer: expected a layer index or a list of them"),
        (dict(heads=[0, 4]), r"heads: expected heads in \[0, 4\) \(the maps have 4\), got 4"),
        (dict(heads=[-1]), r"heads: expected heads in \[0, 4\)"),
        (dict(item=2), r"item: expected batch items in \[-2, 2\) \(the maps have 2\), got 2"),
        (dict(tokens=list("abc")), r"tokens: expected 8 labels \(the maps are n × n, n = 8\), got 3 labels"),
        (dict(tokens="abcdefgh"), r"tokens: expected a sequence of 8 labels, got the string"),
        (dict(tokens=np.zeros((3, 8), int)), r"tokens: expected one row of 8 labels or one per batch item \(2\)"),
        (dict(max_heads=0), r"max_heads: expected an integer >= 1"),
    ],
)
def test_bad_choices_name_the_argument(options, message):
    with pytest.raises(RefAttnError, match=message):
        plot.plot_heads(_maps(), **options)


def test_more_layers_than_fit_are_refused():
    layers = _maps(layers=plot.MAX_LAYERS + 1, items=1, heads=1, n=3)
    assert len(_heads(plot.plot_heads(layers, layer=list(range(plot.MAX_LAYERS))))) == plot.MAX_LAYERS
    with pytest.raises(RefAttnError, match=r"layer: at most 8 layers fit a readable figure, got 9 \(0-8\)"):
        plot.plot_heads(layers, layer="all")


def test_tokens_label_the_axes_of_the_outer_panels():
    layers = _maps(layers=1, items=2, heads=3, n=6)
    words = ["the", "cat", "sat", "on", "the", "mat"]
    fig = plot.plot_heads(layers, tokens=words)
    _drawn(fig)
    heads = _heads(fig)
    for h, ax in heads.items():
        assert _labels(ax.xaxis) == words  # one row of panels: each shows the keys' labels
        assert list(ax.get_xticks()) == list(range(6))
        assert _labels(ax.yaxis) == (words if h[1] == 0 else [])  # the first column only
    ids = np.array([[5, 9, 2, 7, 3, 8], [1, 1, 2, 2, 3, 3]])  # per batch item: item 1's row
    fig = plot.plot_heads(layers, tokens=ids, item=1)
    assert _labels(_heads(fig)[(0, 0)].yaxis) == ["1", "1", "2", "2", "3", "3"]
    fig = plot.plot_heads(layers, tokens=ids[:1], item=1)  # one row: shared by every item
    assert _labels(_heads(fig)[(0, 0)].yaxis) == ["5", "9", "2", "7", "3", "8"]


def test_long_token_sequences_label_every_kth_token():
    n = 40
    layers = _maps(layers=1, items=1, heads=1, n=n)
    words = [f"w{i}" for i in range(n)]
    ax = _heads(plot.plot_heads(layers, tokens=words))[(0, 0)]
    assert list(ax.get_xticks()) == list(range(0, n, 3))  # at most 16 labels on a head's panel
    assert _labels(ax.xaxis) == words[::3]
    fig = plot.plot_rollout(refattn.rollout(layers), tokens=words)
    assert _labels(_by_gid(fig, "rollout")[0].xaxis) == words[::2]  # 32 on the larger rollout map


def test_without_tokens_the_ticks_are_integers():
    for n in (5, 8, 16, 37):
        fig = plot.attention_report(
            _maps(layers=2, items=1, heads=2, n=n), rollout_map=refattn.rollout(_maps(2, 1, 2, n)), row=1
        )
        _drawn(fig)
        token_axes = [ax for ax in fig.axes if ax.get_gid().startswith("head ") or ax.get_gid() == "rollout"]
        token_axes = [(ax.xaxis, ax.yaxis) for ax in token_axes] + [(_by_gid(fig, "rollout row")[0].xaxis,)]
        assert len(token_axes) == 2 + 2
        for axis in (a for axes in token_axes for a in axes):
            visible = [t for t in axis.get_ticklocs() if -0.5 <= t <= n - 0.5]
            assert visible and all(float(t).is_integer() for t in visible), (n, visible)


def test_the_rollout_row_is_outlined_and_its_weights_drawn():
    layers = _maps()
    r = refattn.rollout(layers)
    fig = plot.plot_rollout(r, item=1, row=-2, tokens=list("abcdefgh"))
    (ax_map,) = _by_gid(fig, "rollout")[:1]
    np.testing.assert_array_equal(ax_map.images[0].get_array(), r[1])
    (mark,) = [p for p in ax_map.patches if p.get_gid() == "rollout row mark"]
    assert mark.get_y() == 6 - 0.5 and mark.get_height() == 1 and mark.get_width() == 8
    assert "row 6 outlined" in ax_map.get_title()
    (ax_row,) = _by_gid(fig, "rollout row")
    np.testing.assert_array_equal([b.get_height() for b in ax_row.patches], r[1, 6])
    assert _labels(ax_row.xaxis) == list("abcdefgh")
    assert "row 6 (g)" in ax_row.get_title()
    assert len(_by_gid(fig, "rollout colorbar")) == 1
    fig = plot.plot_rollout(r)  # no row: the map alone, nothing outlined
    assert [ax.get_gid() for ax in fig.axes] == ["rollout", "rollout colorbar"]
    assert not fig.axes[0].patches
    with pytest.raises(RefAttnError, match=r"row: expected output tokens in \[-8, 8\)"):
        plot.plot_rollout(r, row=8)


def test_the_metric_legend_is_outside_the_curves():
    layers = _maps(layers=4)
    tokens = np.tile(np.arange(4), 2)
    summary = refattn.metrics.summarize(layers, tokens)
    fig = plot.plot_metrics(summary, layer=[1, 3])
    renderer = _drawn(fig)
    (ax,) = _by_gid(fig, "metrics")
    names = [line.get_label() for line in ax.get_lines()]
    assert names == [k for k in plot.CURVES if k in summary]  # induction (a token curve) included
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), summary[names[0]].mean(axis=-1), rtol=0, atol=0)
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == names + ["chosen layers"]
    assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1  # beside, not over
    assert fig.get_window_extent(renderer).contains(*legend.get_window_extent(renderer).max)  # not cut off
    assert list(ax.get_xticks()) == [0, 1, 2, 3]
    with pytest.raises(RefAttnError, match="summary: expected some of"):
        plot.plot_metrics({"diversity": np.ones(4)})


def test_the_report_has_every_panel_once_and_none_empty(tmp_path):
    layers = _maps(layers=3, items=2, heads=12, n=8)
    r = refattn.rollout(layers)
    summary = refattn.metrics.summarize(layers)
    fig = plot.attention_report(layers, rollout_map=r, summary=summary, layer=[0, 2], item=1, row=0, heads=range(9))
    _drawn(fig)
    gids = [ax.get_gid() for ax in fig.axes]
    assert sorted(g for g in gids if not g.startswith("head ")) == sorted(
        ["heads colorbar", "rollout", "rollout colorbar", "rollout row", "metrics"]
    )
    assert len(_heads(fig)) == 2 * 9
    assert all(ax.images or ax.lines or ax.patches or "colorbar" in ax.get_gid() for ax in fig.axes)
    np.testing.assert_array_equal(_by_gid(fig, "rollout")[0].images[0].get_array(), r[1])
    assert _by_gid(fig, "rollout row")[0].patches  # the bars
    heads_only = plot.attention_report(layers)
    assert len(heads_only.axes) == 12 + 1
    with pytest.raises(RefAttnError, match="row: marks a row of the rollout map, but no rollout_map"):
        plot.attention_report(layers, row=0)
    with pytest.raises(RefAttnError, match="rollout_map: expected the maps' batch and n × n"):
        plot.attention_report(layers, rollout_map=r[:1])
    path = plot.plot_attention_report(tmp_path / "report.png", layers, rollout_map=r, summary=summary, row=3)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_maps_without_batch_dims_and_a_single_head():
    rng = np.random.default_rng(3)
    layers = [refattn.softmax(rng.standard_normal((1, 5, 5))) for _ in range(2)]  # (H, n, n)
    fig = plot.attention_report(layers, rollout_map=refattn.rollout(layers), row=4)
    assert sorted(_heads(fig)) == [(1, 0)]


def test_without_matplotlib_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(RefAttnError, match=r"plotting needs matplotlib: pip install 'refattn\[plot\]'"):
        plot.plot_heads(_maps())
    monkeypatch.setattr(plot.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RefAttnError, match=r"path: writing a figure needs matplotlib"):
        plot.check_plot_path(tmp_path / "fig.png")
