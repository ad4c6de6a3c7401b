"""The Numba kernels against their NumPy definition, determinism across thread counts, backend choice."""

import os
import subprocess
import sys
import tracemalloc
import zlib
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refattn
from refattn import kernels
from refattn.testing.strategies import rollout_cases, sdpa_cases
from tests.mutation import assert_catches

needs_numba = pytest.mark.skipif(not kernels.numba_available(), reason="numba is not installed")


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert np.array_equal(np.isnan(a), np.isnan(b)) and np.array_equal(np.isinf(a), np.isinf(b))
    finite = np.isfinite(b)
    scale = max(float(np.max(np.abs(b[finite]), initial=0.0)), 1e-300)
    return float(np.max(np.abs(a[finite] - b[finite]), initial=0.0)) / scale


@needs_numba
@settings(max_examples=40)
@given(sdpa_cases())
def test_kernel_equals_numpy_definition_for_every_option(case):
    opts = {k: v for k, v in case.options.items() if k != "return_lse"}
    fast = refattn.sdpa(*case.inputs, return_lse=True, backend="numba", **opts)
    ref = refattn.sdpa(*case.inputs, return_lse=True, backend="numpy", **opts)
    for a, b in zip(fast, ref):
        assert _rel(a, b) <= 1e-12
    rng = np.random.default_rng(0)
    d_out, d_lse = rng.standard_normal(ref[0].shape), rng.standard_normal(ref[1].shape)
    g_fast = refattn.sdpa_backward(d_out, *case.inputs, d_lse=d_lse, backend="numba", **opts)
    g_ref = refattn.sdpa_backward(d_out, *case.inputs, d_lse=d_lse, backend="numpy", **opts)
    g_saved = refattn.sdpa_backward(d_out, *case.inputs, d_lse=d_lse, backend="numba", saved=fast, **opts)
    for a, b in zip(g_saved, g_fast):  # the saved forward is the one the kernel would recompute
        assert (a is None and b is None) or np.array_equal(a, b, equal_nan=True)
    for name, a, b in zip(g_ref._fields, g_fast, g_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            assert _rel(a, b) <= 1e-12, name


class TileCase(NamedTuple):
    """A kernel-vs-definition case at lengths that cross the 128-wide tiles (``D = 8``, ``Dv = 5``)."""

    name: str
    lq: int
    lk: int
    batch: tuple = ((1,), (1,), (1,))  # leading dims of q, k, v
    heads: tuple = (2, 2)  # Hq, Hk
    options: Callable = lambda rng, score: {}  # noqa: E731  (rng, score shape) -> sdpa options
    empty: bool = False  # whether some rows are empty (every key disallowed)


def _padding(rng, score, empty_rows):
    """Key padding per batch element and two query rows without any key: ``(B, 1, Lq, Lk)``."""
    lk = score[-1]
    keys = np.arange(lk) < rng.integers(lk // 2, lk, size=score[:-3] + (1, 1, 1))
    rows = np.ones((score[-2], 1), dtype=bool)
    rows[[3, score[-2] - 2]] = False
    return {"mask": keys & rows, "empty_rows": empty_rows}


def _dropout(score, p=0.25):
    return {"dropout_p": p, "dropout_mask": refattn.masks.dropout_mask(score, p, seed=5)}


def _with_neg_inf(x, every=7):
    x = x.copy()
    x.reshape(-1)[::every] = -np.inf
    return x


TILE_CASES = [
    TileCase("plain, Lq < Lk", 127, 300),
    TileCase("plain, Lq > Lk, GQA", 300, 129, heads=(4, 2)),
    TileCase(
        "Lq = 128, Lk = 256: whole tiles, causal", 128, 256, options=lambda r, s: {"causal": True, "align": "top_left"}
    ),
    TileCase(
        "one query row, bias (Lk,), causal",
        1,
        300,
        options=lambda r, s: {"bias": r.standard_normal(s[-1]), "causal": True, "align": "bottom_right"},
    ),
    TileCase("full bias, GQA", 200, 129, ((2,),) * 3, (4, 2), lambda r, s: {"bias": r.standard_normal(s)}),
    TileCase("bias (Lk,)", 300, 200, options=lambda r, s: {"bias": r.standard_normal(s[-1])}),
    TileCase(
        "bias (Lq, 1) over heads", 129, 300, ((2,),) * 3, options=lambda r, s: {"bias": r.standard_normal((s[-2], 1))}
    ),
    TileCase("bias (Hq, 1, 1)", 200, 300, options=lambda r, s: {"bias": r.standard_normal((s[-3], 1, 1))}),
    TileCase("bias (1, 1) scalar-like, Lk = 129", 129, 129, options=lambda r, s: {"bias": r.standard_normal((1, 1))}),
    TileCase(
        "bias (2, 1, 1, Lq, Lk) under batch (2, 3)",
        200,
        300,
        ((2, 3), (2, 1), (1, 3)),
        options=lambda r, s: {"bias": r.standard_normal((2, 1, 1) + s[-2:])},
    ),
    TileCase(
        "bias (3, 1, 1, Lk) with -inf under batch (2, 3), GQA",
        129,
        200,
        ((2, 3), (1, 3), (2, 1)),
        (4, 2),
        lambda r, s: {"bias": _with_neg_inf(r.standard_normal((3, 1, 1, s[-1])))},
    ),
    TileCase(
        "mask and empty rows, zero", 200, 300, ((2,),) * 3, options=lambda r, s: _padding(r, s, "zero"), empty=True
    ),
    TileCase("mask and empty rows, nan", 300, 200, ((2,),) * 3, options=lambda r, s: _padding(r, s, "nan"), empty=True),
    TileCase(
        "mask and empty rows, uniform, dropout",
        129,
        300,
        ((2,),) * 3,
        options=lambda r, s: {**_padding(r, s, "uniform"), **_dropout(s)},
        empty=True,
    ),
    TileCase("causal top_left, Lq > Lk", 300, 129, options=lambda r, s: {"causal": True, "align": "top_left"}),
    TileCase(
        "causal bottom_right, Lq > Lk: empty rows, uniform",
        300,
        129,
        options=lambda r, s: {"causal": True, "align": "bottom_right", "empty_rows": "uniform"},
        empty=True,
    ),
    TileCase(
        "causal bottom_right, Lq > Lk: empty rows, zero, bias (Lk,)",
        300,
        200,
        options=lambda r, s: {"causal": True, "align": "bottom_right", "bias": r.standard_normal(s[-1])},
        empty=True,
    ),
    TileCase("causal bottom_right, Lq < Lk", 129, 300, options=lambda r, s: {"causal": True, "align": "bottom_right"}),
    TileCase("window (30, 5) top_left", 200, 300, options=lambda r, s: {"window": (30, 5), "align": "top_left"}),
    TileCase(
        "window (30, 5) bottom_right, Lq > Lk: empty rows",
        300,
        200,
        options=lambda r, s: {"window": (30, 5), "align": "bottom_right"},
        empty=True,
    ),
    TileCase(
        "window (0, 0) top_left, Lq > Lk: empty rows, nan",
        300,
        129,
        options=lambda r, s: {"window": (0, 0), "align": "top_left", "empty_rows": "nan"},
        empty=True,
    ),
    TileCase(
        "window (None, 10), causal, softcap",
        200,
        257,
        options=lambda r, s: {"window": (None, 10), "causal": True, "align": "bottom_right", "softcap": 2.0},
    ),
    TileCase(
        "window (200, None), scale",
        129,
        300,
        options=lambda r, s: {"window": (200, None), "align": "top_left", "scale": 0.3},
    ),
    TileCase(
        "window (2**70, sys.maxsize) is no window",
        200,
        300,
        options=lambda r, s: {"window": (2**70, sys.maxsize), "align": "bottom_right"},
    ),
    TileCase(
        "dropout and sinks", 200, 300, heads=(4, 2), options=lambda r, s: {**_dropout(s), "sinks": r.standard_normal(4)}
    ),
    TileCase(
        "per-sequence lengths and starts, causal bottom_right, nan",
        300,
        400,
        ((3,),) * 3,
        options=lambda r, s: {
            "q_lengths": np.array([300, 129, 0]),
            "k_starts": np.array([0, 37, 200]),
            "k_lengths": np.array([400, 150, 131]),
            "causal": True,
            "align": "bottom_right",
            "empty_rows": "nan",
        },
        empty=True,
    ),
    TileCase(
        "q_lengths with sinks and uniform: padded rows stay 0",
        200,
        300,
        ((2,),) * 3,
        options=lambda r, s: {
            "q_lengths": np.array([130, 7]),
            "k_lengths": np.array([300, 0]),
            "sinks": r.standard_normal(2),
            "empty_rows": "uniform",
        },
        empty=True,
    ),
    TileCase(
        "negative window (-3, 40), int offset -50",
        300,
        300,
        options=lambda r, s: {"window": (-3, 40), "align": -50},
        empty=True,
    ),
    TileCase(
        "chunk 100, causal, int offset 37",
        300,
        400,
        options=lambda r, s: {"chunk": 100, "causal": True, "align": 37},
    ),
    TileCase(
        "window (64, 0), 4 sink tokens, k_starts (left padding), bias",
        257,
        300,
        ((2,),) * 3,
        options=lambda r, s: {
            "window": (64, 0),
            "sink_tokens": 4,
            "k_starts": np.array([0, 43]),
            "align": "bottom_right",
            "bias": r.standard_normal(s[-1]),
        },
    ),
    TileCase("int window 5", 200, 200, options=lambda r, s: {"window": 5, "chunk": 130}),
    TileCase(
        "sinks keep masked rows non-empty",
        300,
        129,
        ((2,),) * 3,
        options=lambda r, s: {**_padding(r, s, "nan"), "sinks": np.array([0.5, -np.inf])},
        empty=True,
    ),
    TileCase(
        "softcap, bias (Lk,), GQA",
        200,
        300,
        heads=(4, 1),
        options=lambda r, s: {"softcap": 1.5, "bias": r.standard_normal(s[-1])},
    ),
    TileCase(
        "batch 0",
        129,
        300,
        ((0,), (1,), (1,)),
        options=lambda r, s: {
            "bias": r.standard_normal(s[-1]),
            "sinks": np.zeros(2),
            "causal": True,
            "align": "top_left",
        },
    ),
    TileCase(
        "everything, batch (2, 3)",
        300,
        200,
        ((2, 3), (1, 3), (2, 1)),
        (4, 2),
        lambda r, s: {
            **_padding(r, s, "nan"),
            **_dropout(s),
            "bias": _with_neg_inf(r.standard_normal((1, 4, 1, s[-1])), 11),
            "sinks": _with_neg_inf(r.standard_normal((3, 4)), 5),
            "softcap": 3.0,
            "window": (100, 20),
            "align": "bottom_right",
        },
        empty=True,
    ),
]


def _tile_case(case):
    """``(q, k, v), options`` of a :class:`TileCase`, drawn from a seed of its name."""
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    (bq, bk, bv), (hq, hk) = case.batch, case.heads
    q = rng.standard_normal(bq + (hq, case.lq, 8))
    k = rng.standard_normal(bk + (hk, case.lk, 8))
    v = rng.standard_normal(bv + (hk, case.lk, 5))
    score = np.broadcast_shapes(bq, bk, bv) + (hq, case.lq, case.lk)
    return (q, k, v), case.options(rng, score)


def _kernel_matches_at_tile_sizes(case):
    """Forward (out, lse) and backward (every gradient, random d_out and d_lse) of the kernel against
    the NumPy definition, ≤ 1e-12 relative, NaN and ±inf at the same places."""
    inputs, opts = _tile_case(case)
    fast = refattn.sdpa(*inputs, return_lse=True, backend="numba", **opts)
    ref = refattn.sdpa(*inputs, return_lse=True, backend="numpy", **opts)
    for name, a, b in zip(("out", "lse"), fast, ref):
        assert a.shape == b.shape, (case.name, name)
        assert _rel(a, b) <= 1e-12, (case.name, name)
    rng = np.random.default_rng(1)
    d_out, d_lse = rng.standard_normal(ref[0].shape), rng.standard_normal(ref[1].shape)
    g_fast = refattn.sdpa_backward(d_out, *inputs, d_lse=d_lse, backend="numba", **opts)
    g_ref = refattn.sdpa_backward(d_out, *inputs, d_lse=d_lse, backend="numpy", **opts)
    for name, a, b in zip(g_ref._fields, g_fast, g_ref):
        assert (a is None) == (b is None), (case.name, name)
        if a is not None:
            assert a.shape == b.shape, (case.name, name)
            assert _rel(a, b) <= 1e-12, (case.name, name)


@needs_numba
@pytest.mark.parametrize("case", TILE_CASES, ids=[c.name for c in TILE_CASES])
def test_kernel_equals_numpy_definition_across_tiles(case):
    _kernel_matches_at_tile_sizes(case)


def test_tile_cases_cross_tiles_and_have_the_empty_rows_they_claim():
    for case in TILE_CASES:
        assert max(case.lq, case.lk) > 128, case.name
        inputs, opts = _tile_case(case)
        lse = refattn.sdpa(*inputs, return_lse=True, backend="numpy", **opts)[1]
        assert bool(np.isneginf(lse).any()) == case.empty, case.name


def _first_row_ranges(real):
    """Mutant: each query block's key range is its first row's, so the block's later rows lose keys."""
    return lambda lq, lk, seq, causal, window, chunk, sinks, block: np.ascontiguousarray(
        real(lq, lk, seq, causal, window, chunk, sinks, 1)[:, ::block]
    )


def _partial_tile_dropped(real):
    """Mutant: a key range longer than one tile loses its last, partial tile."""

    def ranges(lq, lk, seq, causal, window, chunk, sinks, block):
        r = real(lq, lk, seq, causal, window, chunk, sinks, block)
        lo, hi = r[..., 0], r[..., 1]
        cut = (hi - lo > block) & ((hi - lo) % block > 0)
        return np.ascontiguousarray(np.stack([lo, np.where(cut, hi - (hi - lo) % block, hi)], axis=-1))

    return ranges


@needs_numba
@pytest.mark.parametrize("mutant", [_first_row_ranges, _partial_tile_dropped], ids=lambda m: m.__name__)
def test_tile_test_catches_a_wrong_key_range(mutant, monkeypatch):
    """The key tiles each query block visits come from ``kernels.key_ranges``: both mutants of it are
    caught by the multi-tile comparison (and the real ranges are the tightest that lose no key)."""
    monkeypatch.setattr(kernels, "key_ranges", mutant(kernels.key_ranges))
    assert_catches(st.sampled_from(TILE_CASES), _kernel_matches_at_tile_sizes)


def test_key_ranges_are_the_keys_the_band_allows():
    """Each (sequence, query block) range is exactly the span of keys the structure allows some of its
    rows (``refattn.masks.allowed_positions``), with lengths, starts, offsets of any sign, negative
    window sides, chunks and sink tokens."""
    rng = np.random.default_rng(8)
    for _ in range(300):
        lq, lk, block = (int(x) for x in rng.integers(1, 40, size=3))
        causal = bool(rng.integers(2))
        window = tuple(None if rng.integers(3) == 0 else int(rng.integers(-10, 50)) for _ in range(2))
        chunk = None if rng.integers(2) else int(rng.integers(1, 12))
        sinks = int(rng.integers(0, 4)) if rng.integers(2) else 0
        starts = rng.integers(0, lk + 1, size=3)
        lengths = {
            "q_lengths": rng.integers(0, lq + 1, size=3),
            "k_starts": starts,
            "k_lengths": np.array([rng.integers(0, lk - s + 1) for s in starts]),
        }
        align = rng.choice(["top_left", "bottom_right", int(rng.integers(-20, 20))])
        align = int(align) if align not in ("top_left", "bottom_right") else str(align)
        seqs = refattn.masks.sequences((3,), lq, lk, **lengths, align=align)
        allowed = refattn.masks.allowed_positions(
            lq, lk, seqs, causal=causal, window=window, chunk=chunk, sink_tokens=sinks
        )[:, 0]
        seq = np.stack([seqs.q_lengths, seqs.k_starts, seqs.k_lengths, seqs.offsets], axis=1)
        ranges = kernels.key_ranges(lq, lk, seq, causal, window, chunk, sinks, block)
        left, right = window
        right = (0 if right is None else min(right, 0)) if causal else right
        # every row's band non-empty and no sink exemption or chunk: the span is exact
        exact = not sinks and chunk is None and (left is None or right is None or left + right >= 0)
        for n in range(3):
            for b, (lo, hi) in enumerate(ranges[n]):
                keys = np.flatnonzero(allowed[n, b * block : (b + 1) * block].any(axis=0))
                case = (lq, lk, block, causal, window, chunk, sinks, align, n, b)
                if keys.size:  # the range covers every allowed key
                    assert lo <= keys[0] and hi >= keys[-1] + 1, case
                if exact:
                    span = (int(keys[0]), int(keys[-1]) + 1) if keys.size else (int(lo), int(lo))
                    assert (int(lo), int(hi)) == span, case


@needs_numba
def test_kernel_backward_takes_several_batch_dims_and_empty_batches():
    """Regression: the kernel backward raised a raw ValueError for q (2, 3, 1, 4, 8) and for batch 0."""
    rng = np.random.default_rng(9)
    for q_shape, kv_batch in (((2, 3, 1, 4, 8), (3,)), ((0, 1, 4, 8), (1,))):
        q = rng.standard_normal(q_shape)
        k, v = rng.standard_normal(kv_batch + (1, 6, 8)), rng.standard_normal(kv_batch + (1, 6, 3))
        d_out = rng.standard_normal(q_shape[:-1] + (3,))
        g_fast = refattn.sdpa_backward(d_out, q, k, v, backend="numba")
        g_ref = refattn.sdpa_backward(d_out, q, k, v, backend="numpy")
        for name, a, b in zip(("dq", "dk", "dv"), g_fast[:3], g_ref[:3]):
            assert a.shape == b.shape, (q_shape, name)
            assert _rel(a, b) <= 1e-12, (q_shape, name)


@needs_numba
def test_huge_window_sides_equal_unbounded_ones_on_both_backends():
    """Regression: window=(0, sys.maxsize) gave zeros on the kernel (int64 overflow), (0, 2**63) an
    OverflowError.  Sides are clipped to Lq + Lk at validation: any int >= 0 is accepted."""
    rng = np.random.default_rng(10)
    q, k, v = rng.standard_normal((1, 2, 5, 8)), rng.standard_normal((1, 2, 7, 8)), rng.standard_normal((1, 2, 7, 3))
    d_out = rng.standard_normal((1, 2, 5, 3))
    for huge, same in (
        ((0, sys.maxsize), (0, None)),
        ((0, 2**63), (0, None)),
        ((2**70, 1), (None, 1)),
        ((2**64, 2**64), None),
    ):
        for backend in ("numpy", "numba"):
            opts = {"align": "bottom_right", "backend": backend, "return_lse": True}
            for a, b in zip(refattn.sdpa(q, k, v, window=huge, **opts), refattn.sdpa(q, k, v, window=same, **opts)):
                assert np.array_equal(a, b), (huge, backend)
            del opts["return_lse"]
            g = refattn.sdpa_backward(d_out, q, k, v, window=huge, **opts)
            g_same = refattn.sdpa_backward(d_out, q, k, v, window=same, **opts)
            for name, a, b in zip(("dq", "dk", "dv"), g[:3], g_same[:3]):
                assert np.array_equal(a, b), (huge, backend, name)


@needs_numba
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_overflowing_logits_raise_on_both_backends(backend):
    """Regression: finite q, k whose logits overflow float64 gave zeros and lse -inf on the kernel
    (posing as empty rows) and NaN on NumPy; both now raise, forward and backward."""
    huge = np.full((1, 1, 3, 4), 1e200)
    cancel = huge * np.array([1.0, 1.0, 1.0, -1.0])  # products ±inf: q·k is inf − inf
    near = np.full((1, 1, 3, 4), 4e153)  # q·k = 6.4e307: finite, above the limit 2**1022 = 4.5e307
    for q, k in ((huge, huge), (huge, cancel), (near, near)):
        v = np.ones((1, 1, 3, 2))
        with pytest.raises(refattn.RefAttnError, match=r"q, k, scale: the logits .* overflow float64"):
            refattn.sdpa(q, k, v, backend=backend)
        with pytest.raises(refattn.RefAttnError, match=r"q, k, scale: the logits .* overflow float64"):
            refattn.sdpa_backward(np.ones((1, 1, 3, 2)), q, k, v, backend=backend)
    with pytest.raises(refattn.RefAttnError, match=r"bias: expected entries <= 2\*\*1022"):
        refattn.sdpa(
            np.ones((1, 3, 4)), np.ones((1, 3, 4)), np.ones((1, 3, 2)), bias=np.full(3, 1e308), backend=backend
        )


@needs_numba
def test_large_entries_that_do_not_overflow_are_accepted():
    """``D · max|q| · max|k|`` overflows here, but every Σ_d |q_id k_jd| is small: the exact check passes
    and both backends agree."""
    rng = np.random.default_rng(12)
    q, k, v = (
        rng.standard_normal((1, 2, 130, 8)),
        rng.standard_normal((1, 2, 140, 8)),
        rng.standard_normal((1, 2, 140, 3)),
    )
    q[..., 0], k[..., 1] = 0.0, 0.0
    q[0, 1, 7, 1], k[0, 1, 9, 0] = 1e160, 1e160  # never multiplied together
    fast = refattn.sdpa(q, k, v, backend="numba", return_lse=True)
    ref = refattn.sdpa(q, k, v, backend="numpy", return_lse=True)
    for a, b in zip(fast, ref):
        assert np.isfinite(b).all()
        assert _rel(a, b) <= 1e-12


def _peak_mib(fn):
    """Peak traced allocation of ``fn()`` in MiB (tracemalloc sees every NumPy array; the kernels'
    per-task tiles, from numba's allocator, are O(tile) and not counted)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


@needs_numba
def test_kernel_memory_with_a_broadcast_bias_is_that_of_no_bias():
    """Regression: the kernel backward allocated dbias at the score shape (N, Hq, Lq, Lk) and summed
    it, 16 MiB here for a (Lk,) bias.  Now dbias is reduced inside the kernels into the bias' own
    shape: a broadcast bias costs its own size, not one Lq × Lk array (8 MiB).  Per-score views over
    a broadcast batch are not copied either (a (3, 1, Lq, Lk) bias under batch (2, 3) was)."""
    rng = np.random.default_rng(13)
    lq = lk = 1024
    q, k, v = (rng.standard_normal((2, 2, n, 8)) for n in (lq, lk, lk))
    d_out = rng.standard_normal(q.shape)
    score_mib = lq * lk * 8 / 2**20
    refattn.sdpa_backward(d_out[..., :4, :], q[..., :4, :], k, v, backend="numba")  # compiled or loaded first
    fwd_none = _peak_mib(lambda: refattn.sdpa(q, k, v, backend="numba"))
    bwd_none = _peak_mib(lambda: refattn.sdpa_backward(d_out, q, k, v, backend="numba"))
    for bias in (rng.standard_normal(lk), rng.standard_normal((lq, 1)), rng.standard_normal((2, 1, 1))):
        fwd = _peak_mib(lambda b=bias: refattn.sdpa(q, k, v, bias=b, backend="numba"))
        bwd = _peak_mib(lambda b=bias: refattn.sdpa_backward(d_out, q, k, v, bias=b, backend="numba"))
        assert fwd - fwd_none <= score_mib / 8, bias.shape
        assert bwd - bwd_none <= score_mib / 8, bias.shape
    q, k, v, d_out = (x[:1, None, :1, :512].repeat(2, axis=0).repeat(3, axis=1) for x in (q, k, v, d_out))
    bias = rng.standard_normal((3, 1, 512, 512))  # 6 MiB; copied per score batch element: 12 MiB more
    fwd_none = _peak_mib(lambda: refattn.sdpa(q, k, v, backend="numba"))
    bwd_none = _peak_mib(lambda: refattn.sdpa_backward(d_out, q, k, v, backend="numba"))
    fwd = _peak_mib(lambda: refattn.sdpa(q, k, v, bias=bias, backend="numba"))
    bwd = _peak_mib(lambda: refattn.sdpa_backward(d_out, q, k, v, bias=bias, backend="numba"))
    bias_mib = bias.nbytes / 2**20
    assert fwd - fwd_none <= 1.5 * bias_mib  # the validated copy and its finiteness check
    assert bwd - bwd_none <= 2.5 * bias_mib  # and dbias


_DETERMINISM = """
import hashlib, numpy as np, refattn
rng = np.random.default_rng(0)
q = rng.standard_normal((2, 4, 200, 16))
k, v = rng.standard_normal((2, 2, 300, 16)), rng.standard_normal((2, 2, 300, 8))
opts = dict(causal=True, align="bottom_right", softcap=3.0, sinks=np.zeros(4), bias=rng.standard_normal((200, 300)))
out, lse = refattn.sdpa(q, k, v, return_lse=True, backend="numba", **opts)
g = refattn.sdpa_backward(rng.standard_normal(out.shape), q, k, v, backend="numba", **opts)
biased = []  # dbias reduced into broadcast shapes: by the dQ kernel, by the dK/dV kernel, in slots
for bias in (rng.standard_normal(300), rng.standard_normal((200, 1)), rng.standard_normal((4, 1, 1))):
    biased += refattn.sdpa_backward(rng.standard_normal(out.shape), q, k, v, bias=bias, backend="numba")[:4]
h = hashlib.sha256()
maps = [refattn.softmax(rng.standard_normal((3, 4, 64, 64))).astype(np.float32) for _ in range(5)]
r = refattn.rollout(maps, backend="numba")
r0 = refattn.rollout(maps, rows=[0, 5], backend="numba")
for a in (out, lse) + tuple(g) + tuple(biased) + (r, r0):
    h.update(np.ascontiguousarray(a).tobytes())
print(h.hexdigest())
"""


@needs_numba
def test_bitwise_identical_for_one_and_two_threads():
    digests = []
    for threads in ("1", "2", "2"):
        env = {**os.environ, "NUMBA_NUM_THREADS": threads}
        run = subprocess.run([sys.executable, "-c", _DETERMINISM], capture_output=True, text=True, env=env, check=True)
        digests.append(run.stdout.strip())
    assert len(set(digests)) == 1, digests


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("REFATTN_NUMPY_MAX_BYTES", raising=False)
    assert kernels.resolve_backend("numpy", 10**9) == "numpy"
    assert kernels.resolve_backend("auto", 10) == "numpy"
    with pytest.raises(refattn.RefAttnError, match="backend"):
        refattn.sdpa(np.ones((1, 2, 2)), np.ones((1, 2, 2)), np.ones((1, 2, 2)), backend="gpu")
    huge = 2.0**43  # bytes of NumPy intermediates, over the default 8 GiB limit
    assert kernels.numpy_max_bytes() == 8 * 2**30
    with pytest.raises(refattn.RefAttnError, match=r'8,192\.0 GiB .* limit of 8\.0 GiB.*use backend="numba"'):
        kernels.resolve_backend("numpy", 10, numpy_bytes=huge, what="the NumPy path of op")
    assert kernels.resolve_backend("numpy", 10, numpy_bytes=8 * 2**30) == "numpy"  # at the limit: allowed
    if kernels.numba_available():
        assert kernels.resolve_backend("auto", kernels.AUTO_MIN_SCORES) == "numba"
        assert kernels.resolve_backend("auto", 10, numpy_bytes=huge) == "numba"  # never numpy over the limit
    else:
        assert kernels.resolve_backend("auto", 10**9) == "numpy"
        with pytest.raises(refattn.RefAttnError, match="numba is not installed"):
            kernels.resolve_backend("numba", 1)
        with pytest.raises(refattn.RefAttnError, match="pip install numba"):
            kernels.resolve_backend("auto", 10, numpy_bytes=huge)


# ---- the first compile of a kernel family says so on stderr (issue 11) ------------------------

_ENTROPY = """
import sys, numpy as np
from refattn import kernels
if "patch" in sys.argv:  # the cache check cannot tell: the line is printed, then corrected
    kernels._cached = lambda kernel, sigs: None
if "silence" in sys.argv:
    kernels.set_quiet(True)
p = np.full((3, 8), 1 / 8)
for _ in range(2):  # twice, and both signatures: one family, one line at most
    for maps in (p, p.astype(np.float32)):
        print(round(float(kernels.row_entropy(maps)[0]), 6))
"""


def _entropy_run(cache, *args, **env):
    """stdout and stderr lines of a fresh process computing row entropy by the kernel, numba's cache in
    ``cache``; ``env``: extra environment variables."""
    environ = {k: v for k, v in os.environ.items() if k != "REFATTN_QUIET"}
    environ.update(NUMBA_CACHE_DIR=str(cache), **env)
    run = subprocess.run(
        [sys.executable, "-c", _ENTROPY, *args], capture_output=True, text=True, env=environ, check=True
    )
    assert run.stdout.split() == ["2.079442"] * 4  # log 8: the results, alone on stdout
    return run.stderr.splitlines()


@needs_numba
def test_first_compile_prints_one_line_on_stderr_then_the_cache_is_silent(tmp_path):
    cache = tmp_path / "numba cache"
    first = _entropy_run(cache)
    assert len(first) == 1, first
    line = first[0]
    assert line.startswith("refattn: compiling the metric kernels (once, ~10-30 s; cached in "), line
    assert line.endswith(")") and str(cache) in line, line
    assert list(cache.rglob("metric_kernels.row_stats-*.nbi")), "numba wrote no cache index"
    assert _entropy_run(cache) == []  # loaded from the cache: nothing to say
    second = _entropy_run(cache, "patch")  # a line for a load must say "loaded"
    assert len(second) == 2 and second[0] == line, second
    assert second[1].startswith("refattn: the metric kernels: loaded from the cache after all ("), second
    assert _entropy_run(cache, "patch", "silence") == []  # kernels.set_quiet(True)


@needs_numba
def test_first_compile_line_is_silenced_by_refattn_quiet(tmp_path):
    assert _entropy_run(tmp_path / "fresh", REFATTN_QUIET="1") == []


def test_quiet_setting(monkeypatch):
    monkeypatch.setattr(kernels, "_quiet", None)
    monkeypatch.delenv("REFATTN_QUIET", raising=False)
    assert not kernels._is_quiet()
    for value, quiet in (("1", True), ("yes", True), ("0", False), ("", False)):
        monkeypatch.setenv("REFATTN_QUIET", value)
        assert kernels._is_quiet() is quiet, value
    assert kernels.set_quiet(True) is None and kernels._is_quiet()  # returns the previous setting
    assert kernels.set_quiet(False) is True and not kernels._is_quiet()  # overrides the environment
    monkeypatch.setenv("REFATTN_QUIET", "1")
    assert not kernels._is_quiet()
    assert kernels.set_quiet(None) is False and kernels._is_quiet()  # follows the environment again


def test_the_line_goes_to_stderr_only(capsys):
    kernels._say("refattn: compiling the test kernels (once, ~1 s; cached in /nowhere)")
    out, err = capsys.readouterr()
    assert out == "" and err == "refattn: compiling the test kernels (once, ~1 s; cached in /nowhere)\n"


def test_kernel_catches_a_wrong_alignment(monkeypatch):
    """Mutation check: the agreement test fails when the kernel's alignment offset is off by one."""
    if not kernels.numba_available():
        pytest.skip("numba is not installed")
    real = kernels._Flat.__init__

    def shifted(self, a):
        real(self, a)
        self.seq = self.seq + np.array([0, 0, 0, 1])  # every sequence's offset, one too far

    monkeypatch.setattr(kernels._Flat, "__init__", shifted)
    rng = np.random.default_rng(2)
    q, k, v = rng.standard_normal((1, 4, 3)), rng.standard_normal((1, 6, 3)), rng.standard_normal((1, 6, 2))
    fast = refattn.sdpa(q, k, v, causal=True, align="bottom_right", backend="numba")
    ref = refattn.sdpa(q, k, v, causal=True, align="bottom_right", backend="numpy")
    assert _rel(fast, ref) > 1e-3


# The kernels' parameters, as documented in specs/kernels.md ("Parameters"): every scalar of the
# attention kernels is a field of ``geometry`` (Geometry) or ``scaling`` (Scaling), except the dbias flag.
KERNEL_PARAMETERS = {
    "sdpa_kernels": {
        "forward": "q k v bias mask keep maps seq sink geometry scaling ranges out lse",
        "backward_dq": "q k v bias mask keep maps seq geometry scaling ranges pairs starts lse d_o delta dl"
        " dq dbias want_dbias",
        "backward_dkv": "q k v bias mask keep maps seq geometry scaling ranges pairs starts lse d_o delta dl"
        " dk dv dbias want_dbias",
    },
    "rollout_kernels": {
        "fuse_mean": "a residual renormalize out bad",
        "fuse_mean_rows": "a residual renormalize v partial bad",
    },
    "metric_kernels": {"row_stats": "p keys key_map rows real first tokens token_map wanted stats gram bad"},
    "flow_kernels": {"pair_flows": "caps eps out"},
}
_SIGNATURES = {
    "sdpa_kernels": "_sdpa_signatures",
    "rollout_kernels": "_rollout_signatures",
    "metric_kernels": "_metric_signatures",
    "flow_kernels": "_flow_signatures",
}


def test_geometry_and_scaling_fields_and_types():
    """The named scalars: exactly these fields, annotated bool / int / float (the numba types)."""
    from refattn.kernels.geometry import Geometry, Scaling, Tile

    assert Geometry._fields == (
        "causal",
        "has_left",
        "left",
        "has_right",
        "right",
        "chunk",
        "sink_tokens",
        "empty_policy",
        "has_bias",
        "has_mask",
        "has_keep",
    )
    assert Scaling._fields == ("scale", "softcap")
    assert Tile._fields == ("n", "h", "kvh", "bn", "mn", "kn", "i0", "bq", "j0", "bk")
    for cls in (Geometry, Scaling, Tile):
        assert set(cls.__annotations__.values()) <= {bool, int, float}, cls


def test_geometry_is_built_by_name_from_the_validated_arguments():
    from refattn.attention.sdpa import validate
    from refattn.kernels.geometry import Geometry, Scaling

    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((1, 2, 4, 3)), rng.standard_normal((1, 2, 6, 3)), rng.standard_normal((1, 2, 6, 2))
    a = validate(
        q, k, v, causal=True, window=(2, None), align="bottom_right", empty_rows="nan", bias=np.zeros(6), softcap=4.0
    )
    g, sc = Geometry.of(a), Scaling.of(a)
    assert g == Geometry(
        causal=True,
        has_left=True,
        left=2,
        has_right=False,
        right=0,
        chunk=0,
        sink_tokens=0,
        empty_policy=1,
        has_bias=True,
        has_mask=False,
        has_keep=False,
    )
    np.testing.assert_array_equal(kernels._Flat(a).seq, [[4, 0, 6, 2]])  # q_length, k_start, k_length, offset
    assert sc == Scaling(scale=float(a.scale), softcap=4.0)
    for named in (g, sc):  # the exact Python types: numba.typeof of the tuple is the compiled type
        assert [type(x) for x in named] == list(type(named).__annotations__.values()), named
    m = rng.random((4, 6)) < 0.5
    a = validate(q, k, v, mask=m, dropout_p=0.5, dropout_mask=m, window=(None, 1), align="top_left")
    assert Geometry.of(a) == Geometry(
        causal=False,
        has_left=False,
        left=0,
        has_right=True,
        right=1,
        chunk=0,
        sink_tokens=0,
        empty_policy=0,
        has_bias=False,
        has_mask=True,
        has_keep=True,
    )
    a = validate(q, k, v, window=(-2, 3), chunk=2, sink_tokens=1, align=-1, q_lengths=[3], k_starts=1)
    assert Geometry.of(a)[:7] == (False, True, -2, True, 3, 2, 1)
    np.testing.assert_array_equal(kernels._Flat(a).seq, [[3, 1, 5, -1]])
    assert Scaling.of(a).softcap == 0.0


@needs_numba
@pytest.mark.parametrize("module", list(KERNEL_PARAMETERS))
def test_kernel_parameters_match_their_documented_names_and_signatures(module):
    """Each kernel's Python parameters are exactly the documented ones; its compile signatures are
    given by parameter name, ordered by the kernel's own parameter list (same arity, a type for each
    name), with the Geometry / Scaling types built from those NamedTuples' fields; no kernel or helper
    takes a Geometry or Scaling field as a loose parameter."""
    import importlib

    from numba import types

    from refattn.kernels.geometry import Geometry, Scaling, numba_type

    kern = importlib.import_module(f"refattn.kernels.{module}")
    signatures = getattr(kernels, _SIGNATURES[module])(types)
    assert set(signatures) == set(KERNEL_PARAMETERS[module])
    for name, documented in KERNEL_PARAMETERS[module].items():
        kernel = getattr(kern, name)
        params = kernels._parameters(kernel)
        assert params == tuple(documented.split()), name
        for sig in signatures[name]:
            assert set(sig) == set(params), name
            ordered = kernels._ordered(name, kernel, sig)
            assert len(ordered) == len(params) and ordered == tuple(sig[p] for p in params), name
            if "geometry" in sig:
                assert sig["geometry"] == numba_type(Geometry, types)
                assert sig["scaling"] == numba_type(Scaling, types)
                assert sig["geometry"].instance_class is Geometry and sig["scaling"].instance_class is Scaling
                assert [str(t) for t in sig["geometry"].types] == (
                    ["bool", "bool", "int64", "bool"] + ["int64"] * 4 + ["bool"] * 3
                )
                assert [str(t) for t in sig["scaling"].types] == ["float64", "float64"]
    loose = set(Geometry._fields) | set(Scaling._fields) | {"off"}
    for fn_name, fn in vars(kern).items():
        py_func = getattr(fn, "py_func", None)
        if py_func is not None:
            assert not loose & set(kernels._parameters(fn)), fn_name


@needs_numba
def test_a_signature_that_does_not_name_the_kernel_parameters_is_refused():
    from refattn.kernels import metric_kernels

    sig = {name: 1 for name in kernels._parameters(metric_kernels.row_stats) if name != "bad"} | {"flags": 3}
    with pytest.raises(RuntimeError, match=r"row_stats: .*missing \['bad'\], extra \['flags'\]"):
        kernels._ordered("row_stats", metric_kernels.row_stats, sig)


@needs_numba
def test_swapped_named_scalars_do_not_match_the_kernel():
    """A geometry and a scaling swapped, or a geometry field of the wrong type, is a TypeError (no
    compiled signature matches), not a silent wrong result."""
    from refattn.attention.sdpa import validate

    rng = np.random.default_rng(6)
    q, k, v = rng.standard_normal((1, 1, 3, 2)), rng.standard_normal((1, 1, 3, 2)), rng.standard_normal((1, 1, 3, 2))
    a = validate(q, k, v, causal=True)
    kern = kernels._kernels()
    f = kernels._Flat(a)
    out, lse = np.zeros((1, 1, 3, 2)), np.zeros((1, 1, 3))
    call = {**f.common(), "sink": f.sink, "ranges": f.key_ranges(), "out": out, "lse": lse}
    kern["forward"](**call)
    np.testing.assert_allclose(out, refattn.sdpa(q, k, v, causal=True, backend="numpy"), rtol=1e-12)
    with pytest.raises(TypeError):
        kern["forward"](**{**call, "geometry": f.scaling, "scaling": f.geometry})
    with pytest.raises(TypeError):
        kern["forward"](**{**call, "geometry": f.geometry._replace(chunk=1.0)})


def _exp_ulp_errors(exp_fn, x):
    """Error of ``exp_fn(x)`` in ulps of the exact value (150-bit mpmath), on the points where it
    differs most from NumPy's exp (a screen: NumPy's exp is itself within ~0.5 ulp)."""
    mpmath = pytest.importorskip("mpmath")
    got = exp_fn(x)
    ref = np.exp(x)
    screen = np.abs(got - ref) / np.spacing(ref)
    worst = np.argsort(-screen)[:400]
    errors = []
    with mpmath.workprec(150):
        for i in worst:
            exact = mpmath.exp(mpmath.mpf(float(x[i])))
            errors.append(float(abs(mpmath.mpf(float(got[i])) - exact) / mpmath.mpf(float(np.spacing(float(exact))))))
    return max(errors)


def _exp_points():
    rng = np.random.default_rng(7)
    return np.concatenate(
        [
            rng.uniform(-745.0, 0.0, 100_000),  # the kernels' domain: x − max ≤ 0
            rng.uniform(-1.0, 0.0, 50_000),
            rng.uniform(-40.0, 0.0, 50_000),
            rng.uniform(-708.0, -700.0, 5_000),
            rng.uniform(0.0, 709.7, 20_000),
        ]
    )


@needs_numba
def test_fast_exp_is_within_one_ulp_and_keeps_special_values():
    import numba as nb

    from refattn.kernels.fastexp import exp

    @nb.njit(fastmath={"contract"})  # compiled as the kernels compile it
    def exp_array(x):
        out = np.empty_like(x)
        for i in range(x.size):
            out[i] = exp(x[i])
        return out

    assert _exp_ulp_errors(exp_array, _exp_points()) <= 1.0
    special = np.array([0.0, -0.0, -np.inf, np.inf, -746.0, -745.13, 709.78, 709.79, 5e-324])
    got = exp_array(special)
    with np.errstate(over="ignore"):
        assert np.array_equal(got, np.exp(special))
    assert np.isnan(exp_array(np.array([np.nan]))[0])
    subnormal = np.linspace(-745.1, -708.5, 2001)  # rounded once: within one subnormal step
    assert np.max(np.abs(exp_array(subnormal) - np.exp(subnormal))) <= 5e-324


def test_exp_ulp_check_catches_a_two_ulp_error():
    x = _exp_points()[:20_000]
    assert _exp_ulp_errors(lambda y: np.exp(y) * (1.0 + 4.5e-16), x) > 1.0


def test_saved_forward_is_shape_checked():
    q = k = v = np.ones((1, 2, 3, 4))
    out, lse = refattn.sdpa(q, k, v, return_lse=True)
    with pytest.raises(refattn.RefAttnError, match="saved: expected the pair"):
        refattn.sdpa_backward(out, q, k, v, saved=out)
    with pytest.raises(refattn.RefAttnError, match=r"saved lse: expected shape \(1, 2, 3\)"):
        refattn.sdpa_backward(out, q, k, v, saved=(out, lse[..., :2]))
    g = refattn.sdpa_backward(out, q, k, v, saved=(out, lse), backend="numpy")
    np.testing.assert_array_equal(g.dq, refattn.sdpa_backward(out, q, k, v, backend="numpy").dq)


def _rollout_kernel_matches(case):
    opts = {k: v for k, v in case.options.items() if k not in ("return_all",)}
    layers = case.inputs[0]
    for maps in (layers, [np.asarray(a, dtype=np.float32) for a in layers]):
        ref = refattn.rollout(maps, backend="numpy", **opts)
        fast = refattn.rollout(maps, backend="numba", **opts)
        assert _rel(fast, ref) <= 1e-12
        rows = refattn.rollout(maps, rows=[0, -1], backend="numba", **opts)
        assert _rel(rows, ref[..., [0, -1], :]) <= 1e-12


@needs_numba
@settings(max_examples=40)
@given(rollout_cases())
def test_rollout_kernel_equals_numpy_definition(case):
    _rollout_kernel_matches(case)


@needs_numba
def test_rollout_kernel_property_catches_a_missing_residual(monkeypatch):
    """Mutant: the kernel path called with residual 0 (the identity term forgotten)."""
    real = kernels.rollout_fuse_mean
    monkeypatch.setattr(kernels, "rollout_fuse_mean", lambda a, residual, renormalize: real(a, 0.0, renormalize))
    assert_catches(rollout_cases(), _rollout_kernel_matches)


@needs_numba
def test_rollout_kernel_reads_strided_maps_and_rejects_non_finite():
    rng = np.random.default_rng(3)
    base = refattn.softmax(rng.standard_normal((2, 3, 40, 40))).astype(np.float32)
    layers = [base, base[..., ::-1, :], base[:, ::-1]]  # negative strides, no copies
    ref = refattn.rollout(layers, backend="numpy")
    assert _rel(refattn.rollout(layers, backend="numba"), ref) <= 1e-12
    assert _rel(refattn.rollout(layers, rows=[3, 0], backend="numba"), ref[..., [3, 0], :]) <= 1e-12
    bad = base.copy()
    bad[1, 2, 5, 7] = np.nan
    with pytest.raises(refattn.RefAttnError, match=r"attentions\[1\]: expected finite values"):
        refattn.rollout([base, bad], backend="numba")
    with pytest.raises(refattn.RefAttnError, match=r"attentions\[1\]: expected finite values"):
        refattn.rollout([base, bad], rows=0, backend="numba")


@needs_numba
def test_entropy_kernel_equals_numpy_definition():
    rng = np.random.default_rng(4)
    p = refattn.softmax(3 * rng.standard_normal((2, 3, 50, 50)))
    p[0, 0, 0, :10] = 0.0  # 0 log 0 = 0
    p[0, 0, 0] /= p[0, 0, 0].sum()  # still a probability row
    for maps in (p, p.astype(np.float32), p[:, :, ::2]):
        for normalize in (False, True):
            fast = refattn.metrics.entropy(maps, normalize=normalize, backend="numba")
            ref = refattn.metrics.entropy(maps, normalize=normalize, backend="numpy")
            assert _rel(fast, ref) <= 1e-12
    bad = p.copy()
    bad[1, 2, 3, 4] = np.inf
    with pytest.raises(refattn.RefAttnError, match="expected finite values"):
        refattn.metrics.entropy(bad, backend="numba")
