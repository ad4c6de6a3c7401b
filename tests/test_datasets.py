"""Datasets of maps on Dask (specs/datasets.md): the chunked calls equal the in-memory ones, bitwise."""

import faulthandler
import subprocess
import sys

import numpy as np
import pytest

import refattn
from refattn import RefAttnError, RefAttnTypeError, datasets, io
from refattn.metrics import (
    attention_attribution,
    diagonal_strength,
    entropy,
    head_confidence,
    previous_token_score,
    summarize,
)

pytestmark = pytest.mark.dask
da = pytest.importorskip("dask.array")
pytest.importorskip("zarr")

N, L, H, n = 11, 3, 2, 6


def _maps(count=N, seed=0, fused=False, shared=False):
    """Probability maps ``(count, L, H, n, n)`` with left and right padding in some examples (with
    ``shared``, the same in every example), the mask, tokens."""
    rng = np.random.default_rng(seed)
    mask = np.ones((count, n), dtype=bool)
    mask[::3, -2:] = False  # right padding
    mask[1::4, :1] = False  # left padding
    if shared:
        mask[:] = mask[1]
    x = rng.random((count, L) + (() if fused else (H,)) + (n, n))
    keys = mask[:, None, None, :] if fused else mask[:, None, None, None, :]
    x = np.where(keys, x, 0.0)
    x /= x.sum(axis=-1, keepdims=True)
    return x, mask, rng.integers(0, 4, (count, n))


def _layers(x):
    return [x[:, layer] for layer in range(x.shape[1])]


def assert_same(got, want):
    """Bitwise equal (within 1e-12 first: the bar where the summation order cannot be kept)."""
    if isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            assert_same(got[key], want[key])
    elif isinstance(want, np.ndarray):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300)
        assert np.array_equal(got, want), f"not bitwise: max difference {np.abs(got - want).max()}"
    else:
        assert got == want


CHUNKS = [4, (5, 1, 5), N]


@pytest.mark.parametrize("chunks", CHUNKS, ids=["4", "uneven", "one"])
@pytest.mark.parametrize("with_mask", ["none", "numpy", "dask", "shared"])
@pytest.mark.parametrize("with_tokens", ["none", "per_example", "shared_strings"])
def test_summarize_equals_the_in_memory_summary(chunks, with_mask, with_tokens):
    x, mask, tokens = _maps(shared=with_mask == "shared")
    masks = {"none": (None, None), "numpy": (mask, mask), "dask": (da.from_array(mask, chunks=3), mask)}
    masks["shared"] = (mask[0], mask)  # (n,): the same real tokens in every example
    given_mask, memory_mask = masks[with_mask]
    if with_tokens == "shared_strings":
        given_tokens = memory_tokens = np.array(list("abcabd"))
    else:
        given_tokens = memory_tokens = None if with_tokens == "none" else tokens
    maps = da.from_array(x, chunks=(chunks, L, H, n, n))
    got = summarize(maps, given_tokens, mask=given_mask)
    want = summarize(_layers(x), memory_tokens, mask=memory_mask)
    assert_same(got, want)


def test_summarize_rechunks_a_dataset_chunked_along_other_axes():
    x, mask, tokens = _maps()
    maps = da.from_array(x, chunks=(4, 1, 1, 3, n))
    assert_same(datasets.summarize(maps, tokens, mask=mask), summarize(_layers(x), tokens, mask=mask))


def test_float32_maps_are_read_in_float64_as_in_memory():
    x, mask, _ = _maps()
    x32 = x.astype(np.float32)
    maps = da.from_array(x32, chunks=(4, L, H, n, n))
    assert_same(summarize(maps, mask=mask), summarize(_layers(x32), mask=mask))


ROLLOUT_OPTIONS = [
    {},
    {"rows": 0},
    {"rows": [0, 2]},
    {"return_all": True},
    {"residual": 0.3, "head_fusion": "max", "discard_ratio": 0.2},
    {"start_layer": 1, "renormalize": False},
]


@pytest.mark.parametrize("options", ROLLOUT_OPTIONS, ids=lambda o: ",".join(o) or "default")
@pytest.mark.parametrize("masked", [False, True])
def test_rollout_equals_the_in_memory_rollout(options, masked):
    x, mask, _ = _maps()
    maps = da.from_array(x, chunks=((5, 1, 5), L, H, n, n))
    m = mask if masked else None
    got = refattn.rollout(maps, mask=m, backend="numpy", **options)
    assert_same(got, refattn.rollout(_layers(x), mask=m, backend="numpy", **options))


def test_rollout_of_fused_maps():
    x, mask, _ = _maps(fused=True)
    maps = da.from_array(x, chunks=(4, L, n, n))
    got = refattn.rollout(maps, head_fusion=None, mask=mask, rows=0, backend="numpy")
    assert_same(got, refattn.rollout(_layers(x), head_fusion=None, mask=mask, rows=0, backend="numpy"))


@pytest.mark.parametrize("masked", [False, True])
def test_attention_attribution_equals_the_in_memory_one(masked):
    x, mask, _ = _maps()
    maps = da.from_array(x, chunks=(4, L, H, n, n))
    m = mask if masked else None
    got = attention_attribution(maps, mask=m, residual=0.4, backend="numpy")
    want = attention_attribution(np.swapaxes(x, 0, 1), mask=m, residual=0.4, backend="numpy")
    assert_same(got, want)
    assert got["batch_size"] == N


@pytest.mark.parametrize(
    ("metric", "options"),
    [(head_confidence, {}), (entropy, {"normalize": True, "backend": "numpy"}), (diagonal_strength, {})]
    + [(previous_token_score, {})],
    ids=["head_confidence", "entropy", "diagonal_strength", "previous_token_score"],
)
def test_per_map_statistics_equal_the_metric_on_the_whole_array(metric, options):
    x, mask, _ = _maps()
    maps = da.from_array(x, chunks=((2, 9), L, H, n, n))
    got = datasets.per_map(metric, maps, mask=mask, **options)
    assert_same(got, metric(x, mask=np.broadcast_to(mask[:, None, :], (N, L, n)), **options))


def test_a_zarr_store_round_trip(tmp_path):
    x, mask, tokens = _maps()
    datasets.save_maps(tmp_path / "maps.zarr", da.from_array(x, chunks=(5, L, H, n, n)), mask=mask, tokens=tokens)
    maps, got_mask, got_tokens = io.open_maps(tmp_path / "maps.zarr")
    assert maps.shape == x.shape and maps.chunks[0] == (5, 5, 1) and maps.dtype == np.float64
    assert np.array_equal(got_mask.compute(), mask) and np.array_equal(got_tokens.compute(), tokens)
    assert_same(summarize(maps, got_tokens, mask=got_mask), summarize(_layers(x), tokens, mask=mask))
    rechunked, _, _ = io.open_maps(tmp_path / "maps.zarr", chunk_size=3)
    assert rechunked.chunks[0] == (3, 3, 3, 2)


def test_a_zarr_store_keeps_float32_and_a_bare_array_is_maps(tmp_path):
    import zarr

    x, _, _ = _maps()
    io.save_maps(tmp_path / "f32.zarr", x.astype(np.float32), chunk_size=4)
    maps, mask, tokens = io.open_maps(tmp_path / "f32.zarr")
    assert maps.dtype == np.float32 and mask is None and tokens is None
    assert_same(summarize(maps), summarize(_layers(x.astype(np.float32))))
    bare = zarr.create_array(str(tmp_path / "bare.zarr"), shape=x.shape, chunks=(4, L, H, n, n), dtype="f8")
    bare[...] = x
    maps, _, _ = io.open_maps(tmp_path / "bare.zarr")
    rows = refattn.rollout(maps, rows=0, backend="numpy")
    assert rows.shape == (N, n)
    assert_same(rows, refattn.rollout(_layers(x), rows=0, backend="numpy"))


def test_a_directory_of_map_files(tmp_path):
    x, mask, tokens = _maps()
    mask[5] = True  # the file without a mask: every token real
    io.save_attentions(tmp_path / "a.npz", _layers(x[:5]), mask=mask[:5], tokens=tokens[:5])
    io.save_attentions(tmp_path / "b.npz", [x[5, layer] for layer in range(L)], tokens=tokens[5])  # one example
    io.save_attentions(
        tmp_path / "c.npz",
        [x[6:, layer].reshape(5, 1, H, n, n) for layer in range(L)],
        mask=mask[6:].reshape(5, 1, n),
        tokens=tokens[6:].reshape(5, 1, n),
    )  # two batch dims, flattened
    maps, got_mask, got_tokens = io.open_maps(tmp_path)
    assert maps.chunks[0] == (5, 1, 5)
    assert np.array_equal(got_mask.compute(), mask) and np.array_equal(got_tokens.compute(), tokens)
    assert_same(summarize(maps, got_tokens, mask=got_mask), summarize(_layers(x), tokens, mask=mask))
    one, _, _ = io.open_maps(tmp_path / "a.npz")
    assert one.shape == (5, L, H, n, n)


def test_a_distributed_client_gives_the_same_results():
    """A LocalCluster(n_workers=2, processes=True, threads_per_worker=1) on loopback, started and
    stopped here; a hung cluster ends the run (faulthandler) instead of blocking it."""
    pytest.importorskip("distributed")
    x, mask, tokens = _maps()
    maps = da.from_array(x, chunks=(3, L, H, n, n))
    bad = x.copy()
    bad[7, 1, 0, 2] *= 2.0  # example 7, layer 1: a row summing to 2
    faulthandler.dump_traceback_later(240, exit=True)
    try:
        with datasets.local_cluster(2) as client:
            workers = client.scheduler_info()["workers"]
            assert len(workers) == 2 and all(w["nthreads"] == 1 for w in workers.values())
            assert all(address.startswith("tcp://127.0.0.1:") for address in workers)
            got = datasets.summarize(maps, tokens, mask=mask, client=client)
            rows = datasets.rollout(maps, mask=mask, rows=0, backend="numpy", client=client)
            with pytest.raises(RefAttnError, match=r"^example 7: attentions\[1\]: expected probabilities"):
                datasets.summarize(da.from_array(bad, chunks=(3, L, H, n, n)), client=client)
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert_same(got, summarize(_layers(x), tokens, mask=mask))
    assert_same(rows, refattn.rollout(_layers(x), mask=mask, rows=0, backend="numpy"))


def _explode(block):
    raise AssertionError("a chunk was read before the arguments were checked")


def _unread(x):
    """A dataset of ``x``'s shape whose chunks cannot be read: a check that passes reads nothing."""
    return da.from_array(x, chunks=(4,) + x.shape[1:]).map_blocks(_explode, dtype=x.dtype)


BAD = [
    (lambda x, m, t: datasets.summarize(x), RefAttnTypeError, r"^attentions: expected a Dask array"),
    (lambda x, m, t: summarize(_unread(x)[:, 0]), RefAttnError, r"expected a dataset of square maps \(N, L, H"),
    (lambda x, m, t: summarize(_unread(x[..., :-1])), RefAttnError, r"expected a dataset of square maps"),
    (lambda x, m, t: summarize(_unread(x).astype(bool)), RefAttnTypeError, r"expected real numbers"),
    (lambda x, m, t: summarize(_unread(x)[:0]), RefAttnError, r"at least one example"),
    (lambda x, m, t: summarize(_unread(x), mask=m.astype(float)), RefAttnTypeError, r"^mask: expected a bool"),
    (lambda x, m, t: summarize(_unread(x), mask=m[:, :-1]), RefAttnError, r"^mask: expected shape \(n,\)"),
    (lambda x, m, t: summarize(_unread(x), t + 0.5), RefAttnTypeError, r"^tokens: expected integer ids"),
    (lambda x, m, t: summarize(_unread(x), t[:-1]), RefAttnError, r"^tokens: expected shape"),
    (lambda x, m, t: summarize(_unread(x), check_probabilities=1), RefAttnTypeError, r"check_probabilities"),
    (lambda x, m, t: datasets.rollout(_unread(x), residul=0.3), RefAttnError, r"did you mean 'residual'"),
    (lambda x, m, t: datasets.attention_attribution(_unread(x), rows=0), RefAttnError, r"unknown option 'rows'"),
    (lambda x, m, t: datasets.summarize(_unread(x), client="tcp://x"), RefAttnTypeError, r"^client: expected"),
    (lambda x, m, t: datasets.per_map("entropy", _unread(x)), RefAttnTypeError, r"^metric: expected"),
    (lambda x, m, t: summarize((u := _unread(x))[u[:, 0, 0, 0, 0] > 0.5]), RefAttnError, r"compute_chunk_sizes"),
]


@pytest.mark.parametrize(("call", "error", "message"), BAD, ids=[b[2][:40] for b in BAD])
def test_bad_arguments_are_refused_before_any_chunk_is_read(call, error, message):
    x, mask, tokens = _maps()
    with pytest.raises(error, match=message):
        call(x, mask, tokens)


def test_an_error_found_by_a_task_names_its_examples():
    x, _, _ = _maps()
    x[9, 2] *= 3.0
    maps = da.from_array(x, chunks=(4, L, H, n, n))
    with pytest.raises(RefAttnError, match=r"^example 9: attentions\[2\]: expected probabilities"):
        summarize(maps)
    with pytest.raises(RefAttnError, match=r"^examples 8-10 \(a chunk; batch indices below are within it\): "):
        refattn.rollout(maps)
    with pytest.raises(RefAttnError, match=r"^examples 8-10 .*residual"):
        refattn.rollout(maps, residual=2.0)


def test_bad_stores_are_refused(tmp_path):
    x, mask, tokens = _maps()
    with pytest.raises(RefAttnError, match="no such file or directory"):
        io.open_maps(tmp_path / "missing")
    with pytest.raises(RefAttnError, match="neither a Zarr store nor a directory of .npz"):
        io.open_maps(tmp_path)
    io.save_maps(tmp_path / "s.zarr", x)
    with pytest.raises(RefAttnError, match="already exists"):
        io.save_maps(tmp_path / "s.zarr", x)
    with pytest.raises(RefAttnError, match=r"^mask: expected shape \(N, n\)"):
        io.save_maps(tmp_path / "t.zarr", x, mask=mask[:-1])
    import zarr

    zarr.open_group(str(tmp_path / "s.zarr"), mode="a").create_array("extra", shape=(2,), dtype="f8")
    with pytest.raises(RefAttnError, match=r"unknown arrays \['extra'\]"):
        io.open_maps(tmp_path / "s.zarr")
    files = tmp_path / "files"
    files.mkdir()
    io.save_attentions(files / "a.npz", _layers(x[:2]), tokens=tokens[:2])
    io.save_attentions(files / "b.npz", _layers(x[2:4]))
    with pytest.raises(RefAttnError, match=r"b.npz: no 'tokens', which other files of the dataset have"):
        io.open_maps(files)
    io.save_attentions(files / "b.npz", _layers(x[2:4, :2]), tokens=tokens[2:4])
    with pytest.raises(RefAttnError, match=r"b.npz: expected maps of 3 layers, 2 heads, 6 tokens"):
        io.open_maps(files)
    (files / "b.npz").write_text("not a zip")
    with pytest.raises(RefAttnError, match=r"b.npz: a text file"):
        io.open_maps(files)


def test_dask_is_imported_only_for_a_dataset():
    code = (
        "import sys, numpy as np, refattn\n"
        "p = np.full((2, 1, 2, 3, 3), 1 / 3)\n"
        "refattn.metrics.summarize(list(p)); refattn.rollout(list(p), rows=0)\n"
        "refattn.metrics.attention_attribution(p)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'dask', 'distributed', 'zarr'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
