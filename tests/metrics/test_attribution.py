"""``refattn.metrics.attention_attribution``: its definitions (against explicit loops), one result for
every container and chunking, padding equals cropping, and streaming memory (issue 14, item 4)."""

from __future__ import annotations

import gc
import math
import tracemalloc
import weakref

import numpy as np
import pytest
from hypothesis import strategies as st

import refattn
from refattn import metrics, rollout_flow
from refattn.metrics import attribution
from tests.mutation import property_table

CLOSE = dict(rtol=1e-12, atol=1e-14)
ARRAYS = attribution.ATTRIBUTION_KEYS[:6]


def _softmax_over(real_keys, logits):
    """Rows of ``softmax(logits)`` over the real keys; padded keys hold garbage in [0, 1)."""
    garbage = np.random.default_rng(99).uniform(0.0, 1.0, logits.shape)
    s = np.where(real_keys, logits, -np.inf)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return np.where(real_keys, e / e.sum(axis=-1, keepdims=True), garbage)


def make_maps(seed, layers, batch, heads, n, real=None, scale=2.0):
    """Maps ``(L, B, H, n, n)``, each real row a softmax over the real keys of its example."""
    rng = np.random.default_rng(seed)
    logits = scale * rng.standard_normal((layers, batch, heads, n, n))
    keys = np.ones((batch, n), dtype=bool) if real is None else real
    if not keys.any(axis=-1).all():  # an example without a real token: its rows are all garbage
        keys = keys | ~keys.any(axis=-1, keepdims=True)
    return _softmax_over(keys[None, :, None, None, :], logits)


class Case:
    def __init__(self, maps, mask, residual, chunk_size):
        self.maps, self.mask, self.residual, self.chunk_size = maps, mask, residual, chunk_size

    def __repr__(self):
        mask = None if self.mask is None else self.mask.astype(int).tolist()
        return f"Case(maps {self.maps.shape}, mask={mask}, residual={self.residual}, chunk_size={self.chunk_size})"


@st.composite
def cases(draw):
    layers, batch, heads, n = (draw(st.integers(1, k)) for k in (3, 3, 3, 5))
    mask = None
    if draw(st.booleans()):
        mask = np.array([[draw(st.booleans()) for _ in range(n)] for _ in range(batch)])
    maps = make_maps(draw(st.integers(0, 2**16)), layers, batch, heads, n, mask)
    residual = draw(st.sampled_from([0.0, 0.3, 0.5, 1.0]))
    return Case(maps, mask, residual, draw(st.one_of(st.none(), st.integers(1, batch))))


def _call(case, attentions=None, **options):
    opts = dict(mask=case.mask, residual=case.residual, chunk_size=case.chunk_size, backend="numpy")
    opts.update(options)
    return metrics.attention_attribution(case.maps if attentions is None else attentions, **opts)


def reference(maps, mask, residual):
    """The definitions of ``specs/metrics.md`` as explicit loops (rollout included, by hand)."""
    layers, batch, heads, n, _ = maps.shape
    real = np.ones((batch, n), dtype=bool) if mask is None else mask
    out = {key: np.zeros((batch, n)) for key in ARRAYS}
    for b in range(batch):
        rows = [i for i in range(n) if real[b, i]]
        r = np.eye(n)
        for layer in range(layers):
            fused = np.zeros((n, n))
            for h in range(heads):
                p = maps[layer, b, h]
                for j in rows:
                    col = [p[i, j] for i in rows]
                    out["mean_attention"][b, j] += math.fsum(col) / len(rows)
                    out["max_attention"][b, j] += max(col)
                for i in rows:
                    row = [p[i, j] for j in rows]
                    out["attention_entropy"][b, i] -= math.fsum(x * math.log(x) for x in row if x > 0)
                    out["attention_concentration"][b, i] += math.fsum(x * x for x in row)
                    for j in rows:
                        fused[i, j] += p[i, j] / heads
            m = np.zeros((n, n))
            for i in rows:
                for j in rows:
                    m[i, j] = residual * (i == j) + (1 - residual) * fused[i, j]
                total = math.fsum(m[i])
                m[i] = m[i] / total
            r = m @ r if layer else m
        for i in rows:
            row = [r[i, j] for j in rows]
            out["rollout_max"][b, i] = max(row)
            out["rollout_entropy"][b, i] = -math.fsum(x * math.log(x) for x in row if x > 0)
    for key in ARRAYS[:4]:
        out[key] /= layers * heads
    return out


# ---- properties -----------------------------------------------------------------------------------


def check_definitions(case):
    got, want = _call(case), reference(case.maps, case.mask, case.residual)
    assert list(got) == list(attribution.ATTRIBUTION_KEYS)
    assert got["batch_size"] == case.maps.shape[1] and got["seq_length"] == case.maps.shape[-1]
    for key in ARRAYS:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=1e-13, err_msg=key)


def check_every_container_and_chunking_agree(case):
    layers, batch = case.maps.shape[:2]
    want = _call(case, chunk_size=None)
    for name, attentions in (
        ("array", case.maps),
        ("list", list(case.maps)),
        ("tuple", tuple(case.maps)),
        ("generator", (a for a in case.maps)),
    ):
        for size in sorted({1, batch, case.chunk_size or batch}):
            got = _call(case, attentions if name != "generator" else (a for a in case.maps), chunk_size=size)
            for key in ARRAYS:
                np.testing.assert_allclose(got[key], want[key], **CLOSE, err_msg=f"{name}, chunk_size={size}: {key}")


def _pad(case, rng):
    """The case with each example padded contiguously (garbage in the pads) and its left offsets."""
    layers, batch, heads, n, _ = case.maps.shape
    real = np.ones((batch, n), dtype=bool) if case.mask is None else case.mask
    total = int(rng.integers(1, 4))
    lefts = rng.integers(0, total + 1, batch)
    size = n + total
    maps = rng.uniform(0.0, 1.0, (layers, batch, heads, size, size))
    mask = np.zeros((batch, size), dtype=bool)
    for b, lo in enumerate(lefts):
        inner = (slice(None), b, slice(None), slice(lo, lo + n), slice(lo, lo + n))
        maps[inner] = np.where(real[b], case.maps[:, b], maps[inner])
        mask[b, lo : lo + n] = real[b]
    return Case(maps, mask, case.residual, case.chunk_size), lefts


def check_padding_equals_cropping(case):
    padded, lefts = _pad(case, np.random.default_rng(case.maps.size))
    want, got = _call(case), _call(padded)
    n = case.maps.shape[-1]
    real = np.ones(want["mean_attention"].shape, dtype=bool) if case.mask is None else case.mask
    for key in ARRAYS:
        for b, lo in enumerate(lefts):
            np.testing.assert_allclose(
                got[key][b, lo : lo + n], np.where(real[b], want[key][b], 0.0), **CLOSE, err_msg=f"{key}, example {b}"
            )
            outside = np.ones(got[key].shape[-1], dtype=bool)
            outside[lo : lo + n] = False
            assert np.all(got[key][b, outside] == 0), (key, b)
    assert got["seq_length"] == padded.maps.shape[-1] and got["batch_size"] == want["batch_size"]


def check_bounds(case):
    got = _call(case)
    layers, batch, heads, n, _ = case.maps.shape
    real = np.ones((batch, n), dtype=bool) if case.mask is None else case.mask
    count = real.sum(axis=-1)
    has = count > 0
    np.testing.assert_allclose(got["mean_attention"].sum(axis=-1)[has], 1.0, rtol=1e-12)  # each row sums to 1
    n_real = np.maximum(count, 1)[:, None]
    eps = 1e-12
    for key, low, high in (
        ("attention_concentration", 1.0 / n_real, 1.0),
        ("attention_entropy", 0.0, np.log(n_real)),
        ("rollout_max", 1.0 / n_real, 1.0),
        ("rollout_entropy", 0.0, np.log(n_real)),
        ("max_attention", 0.0, 1.0),
    ):
        value = np.broadcast_to(got[key], real.shape)
        assert np.all(value[real] >= np.broadcast_to(low, real.shape)[real] - eps), key
        assert np.all(value[real] <= np.broadcast_to(high, real.shape)[real] + eps), key
        assert np.all(value[~real] == 0), key
    assert np.all(got["max_attention"] >= got["mean_attention"] - eps)


def _received_over_all_rows(P, *, mask=None, check_probabilities=True):
    return np.asarray(P).mean(axis=-2)


def _entropy_without_mask(real):
    def broken(P, *, mask=None, **options):
        return real(P, **options)

    return broken


def _rollout_without_mask(real):
    def broken(attentions, *, mask=None, **options):
        return real(attentions, **options)

    return broken


MUTANTS = {
    "concentration without the square": lambda mp: mp.setattr(attribution, "_concentration", lambda p: p.sum(-1)),
    "mean over every query row, padded ones too": lambda mp: mp.setattr(
        attribution, "attention_received", _received_over_all_rows
    ),
    "the last partial chunk dropped": lambda mp: mp.setattr(
        attribution, "_chunks", lambda batch, size: [slice(s, s + size) for s in range(0, batch - batch % size, size)]
    ),
    "the entropy of padded keys' garbage": lambda mp: mp.setattr(
        attribution, "entropy", _entropy_without_mask(attribution.entropy)
    ),
    "the rollout of padded tokens' garbage": lambda mp: mp.setattr(
        rollout_flow, "rollout", _rollout_without_mask(rollout_flow.rollout)
    ),
    "the head sums divided by the layers only": lambda mp: mp.setattr(
        attribution, "_average", lambda total, layers, heads: total / layers
    ),
}

PROPERTIES = [
    (check_definitions, cases(), ("concentration without the square", "mean over every query row, padded ones too")),
    (check_every_container_and_chunking_agree, cases(), "the last partial chunk dropped"),
    (
        check_padding_equals_cropping,
        cases(),
        ("the entropy of padded keys' garbage", "the rollout of padded tokens' garbage"),
    ),
    (check_bounds, cases(), "the head sums divided by the layers only"),
]

test_property, test_property_catches_its_mutant = property_table(PROPERTIES, MUTANTS)


# ---- examples -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def padded_batch():
    """4 examples of 7 tokens: unpadded, right-padded, left-padded, padded both sides."""
    mask = np.ones((4, 7), dtype=bool)
    mask[1, 5:] = False
    mask[2, :3] = False
    mask[3, [0, 6]] = False
    return make_maps(7, 3, 4, 2, 7, mask), mask


def test_keys_types_and_the_registered_metrics(padded_batch):
    maps, mask = padded_batch
    got = metrics.attention_attribution(maps, mask=mask)
    assert tuple(got) == attribution.ATTRIBUTION_KEYS
    assert got["batch_size"] == 4 and got["seq_length"] == 7
    assert type(got["batch_size"]) is int and type(got["seq_length"]) is int
    for key in ARRAYS:
        assert got[key].shape == (4, 7) and got[key].dtype == np.float64, key
    # each entry is a registered metric averaged over layers and heads, or a metric of refattn.rollout
    layers = list(maps)
    received = np.mean([metrics.attention_received(p, mask=mask).mean(axis=1) for p in layers], axis=0)
    np.testing.assert_allclose(got["mean_attention"], received, **CLOSE)
    rows = np.mean([metrics.entropy(p, mask=mask).mean(axis=1) for p in layers], axis=0)
    np.testing.assert_allclose(got["attention_entropy"], rows, **CLOSE)
    r = refattn.rollout(layers, mask=mask)
    np.testing.assert_allclose(got["rollout_max"], metrics.max_weight(r, mask=mask), **CLOSE)
    np.testing.assert_allclose(got["rollout_entropy"], metrics.entropy(r, mask=mask), **CLOSE)
    hhi = np.mean([(np.where(mask[:, None, None, :], p, 0) ** 2).sum(-1).mean(axis=1) for p in layers], axis=0)
    np.testing.assert_allclose(got["attention_concentration"], np.where(mask, hhi, 0.0), **CLOSE)


def test_a_uniform_and_a_one_hot_row():
    """Concentration 1/n for uniform rows, 1 for one-hot rows; entropy log n and 0."""
    n = 5
    uniform = np.full((1, 1, 1, n, n), 1.0 / n)
    one_hot = np.broadcast_to(np.eye(n), (1, 1, 1, n, n))
    u, o = metrics.attention_attribution(uniform), metrics.attention_attribution(one_hot)
    np.testing.assert_allclose(u["attention_concentration"], 1.0 / n, rtol=1e-15)
    np.testing.assert_allclose(u["attention_entropy"], np.log(n), rtol=1e-15)
    np.testing.assert_allclose(u["mean_attention"], 1.0 / n, rtol=1e-15)
    np.testing.assert_allclose(o["attention_concentration"], 1.0, rtol=1e-15)
    np.testing.assert_array_equal(o["attention_entropy"], 0.0)
    np.testing.assert_allclose(o["rollout_max"], 1.0, rtol=1e-15)  # identity maps: R = I


def test_array_list_generator_and_chunks_give_one_result(padded_batch):
    maps, mask = padded_batch
    want = metrics.attention_attribution(maps, mask=mask)
    for chunk_size in (None, 1, 2, 3, 4, 9):
        for attentions in (maps, list(maps), iter(list(maps)), (a.astype(np.float64) for a in maps)):
            got = metrics.attention_attribution(attentions, mask=mask, chunk_size=chunk_size)
            for key in ARRAYS:
                np.testing.assert_allclose(got[key], want[key], **CLOSE, err_msg=f"chunk_size={chunk_size}: {key}")


def test_padded_items_equal_their_unpadded_selves(padded_batch):
    maps, mask = padded_batch
    got = metrics.attention_attribution(maps, mask=mask)
    for b in range(4):
        keep = np.flatnonzero(mask[b])
        alone = maps[:, b : b + 1][..., keep[:, None], keep]
        want = metrics.attention_attribution(alone)
        for key in ARRAYS:
            np.testing.assert_allclose(got[key][b, keep], want[key][0], **CLOSE, err_msg=f"{key}, example {b}")
            assert np.all(np.delete(got[key][b], keep) == 0), key


def test_float32_maps_are_read_in_float64(padded_batch):
    maps, mask = padded_batch
    low = maps.astype(np.float32)
    got = metrics.attention_attribution(low, mask=mask)
    want = metrics.attention_attribution(low.astype(np.float64), mask=mask)
    for key in ARRAYS:
        np.testing.assert_array_equal(got[key], want[key])


# ---- streaming ------------------------------------------------------------------------------------

LAYERS, BATCH, HEADS, N = 12, 4, 4, 64
LAYER_BYTES = BATCH * HEADS * N * N * 8


def _stream(layers, seed=0, alive=None):
    """A generator of softmax maps made on demand; with ``alive``, it asserts before making each layer
    that no layer it yielded before is still referenced."""
    rng = np.random.default_rng(seed)
    refs = []
    for _ in range(layers):
        if alive is not None:
            gc.collect()
            alive.append(sum(r() is not None for r in refs))
        s = rng.standard_normal((BATCH, HEADS, N, N))
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        refs.append(weakref.ref(s))
        yield s
        del s


def test_a_generator_is_read_once_layer_by_layer():
    alive = []
    stream = _stream(5, alive=alive)
    got = metrics.attention_attribution(stream, chunk_size=2)
    assert alive == [0, 0, 0, 0, 0]  # the previous layer was released before the next one was made
    assert next(stream, None) is None  # consumed: every layer was read, once
    want = metrics.attention_attribution(list(_stream(5)))
    for key in ARRAYS:
        np.testing.assert_allclose(got[key], want[key], **CLOSE)


def _peak(layers, **options):
    metrics.attention_attribution(_stream(1), **options)  # first calls (imports, caches) outside the trace
    tracemalloc.start()
    try:
        metrics.attention_attribution(_stream(layers), **options)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("mask", [None, np.ones((BATCH, N), dtype=bool)], ids=["no mask", "mask"])
def test_streaming_peak_is_at_most_three_layers(mask):
    """12 layers × 4 heads × 64² × batch 4 from a generator: the traced peak (the generator's own layer
    included) stays under 3 layers of maps with ``chunk_size=1`` (measured: 2.3) and does not grow with
    the depth."""
    deep = _peak(LAYERS, chunk_size=1, mask=mask, backend="numpy")
    shallow = _peak(3, chunk_size=1, mask=mask, backend="numpy")
    assert deep <= 3 * LAYER_BYTES, f"peak {deep / LAYER_BYTES:.2f} layers"
    assert deep <= shallow + 0.1 * LAYER_BYTES, f"{deep / LAYER_BYTES:.2f} layers vs {shallow / LAYER_BYTES:.2f}"


def test_chunks_lower_the_peak():
    whole = _peak(3, backend="numpy")
    sliced = _peak(3, chunk_size=1, backend="numpy")
    assert sliced < 0.7 * whole, (sliced / LAYER_BYTES, whole / LAYER_BYTES)


# ---- refusals -------------------------------------------------------------------------------------


def _bad_rows(maps):
    bad = maps.copy()
    bad[1, 2, 0, 3] *= 1.5
    return bad


@pytest.mark.parametrize(
    ("attentions", "options", "error", "match"),
    [
        ([], {}, refattn.RefAttnError, r"attentions: expected at least one layer"),
        (np.zeros((2, 3, 3)), {}, refattn.RefAttnError, r"attentions: expected per-layer maps \(L, B, H, T, T\)"),
        ([np.full((1, 1, 2, 3), 1 / 3)], {}, refattn.RefAttnError, r"attentions\[0\]: expected square maps"),
        ([np.full((1, 2, 2), 0.5)], {}, refattn.RefAttnError, r"attentions\[0\]: expected square maps \(B, H, T, T\)"),
        (
            [np.full((1, 1, 2, 2), 0.5), np.full((1, 2, 2, 2), 0.5)],
            {},
            refattn.RefAttnError,
            r"attentions\[1\]: expected shape \(1, 1, 2, 2\)",
        ),
        ([np.full((1, 1, 2, 2), "a")], {}, refattn.RefAttnTypeError, r"attentions\[0\]: expected real numbers"),
        ([np.full((1, 1, 2, 2), np.nan)], {}, refattn.RefAttnError, r"attentions\[0\]"),
        ([np.full((1, 1, 2, 2), 0.5)], {"mask": np.ones((1, 3), bool)}, refattn.RefAttnError, r"mask: expected"),
        ([np.full((1, 1, 2, 2), 0.5)], {"mask": np.ones((1, 2))}, refattn.RefAttnTypeError, r"mask: expected a bool"),
        ([np.full((1, 1, 2, 2), 0.5)], {"residual": 1.5}, refattn.RefAttnError, r"residual: expected a weight"),
        ([np.full((1, 1, 2, 2), 0.5)], {"chunk_size": 0}, refattn.RefAttnError, r"chunk_size: expected an integer"),
        ([np.full((1, 1, 2, 2), 0.5)], {"chunk_size": 1.5}, refattn.RefAttnTypeError, r"chunk_size"),
        ([np.full((1, 1, 2, 2), 0.5)], {"backend": "cuda"}, refattn.RefAttnError, r"backend"),
        ([np.full((1, 1, 2, 2), 0.5)], {"chunk_sise": 2}, refattn.RefAttnError, r"did you mean 'chunk_size'"),
    ],
)
def test_bad_inputs_are_refused(attentions, options, error, match):
    with pytest.raises(error, match=match):
        metrics.attention_attribution(attentions, **options)


def test_rows_that_are_not_probabilities_are_named_with_their_slice():
    maps = make_maps(3, 2, 4, 2, 5)
    with pytest.raises(refattn.RefAttnError, match=r"attentions\[1\]: expected probabilities.*row \(2, 0, 3\)"):
        metrics.attention_attribution(_bad_rows(maps))
    with pytest.raises(refattn.RefAttnError, match=r"attentions\[1\]\[2:4\]: expected probabilities.*row \(0, 0, 3\)"):
        metrics.attention_attribution(_bad_rows(maps), chunk_size=2)
    got = metrics.attention_attribution(_bad_rows(maps), check_probabilities=False)
    assert np.isfinite(got["attention_entropy"]).all()


def test_inputs_are_not_mutated(padded_batch):
    maps, mask = padded_batch
    before = maps.copy(), mask.copy()
    metrics.attention_attribution(maps, mask=mask, chunk_size=3)
    np.testing.assert_array_equal(maps, before[0])
    np.testing.assert_array_equal(mask, before[1])
