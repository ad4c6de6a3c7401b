"""Case files: round trip, the golden suite, and corrupted or hostile files rejected."""

import json
import zipfile

import numpy as np
import pytest

import refattn
from refattn import io


@pytest.fixture(scope="module")
def golden_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("golden")
    io.write_golden(d)
    return d


def test_suite_covers_every_sdpa_option():
    cases = io.standard_suite()
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    seen = set()
    for c in cases:
        seen |= set(c.options) | set(c.arrays) - {"q", "k", "v"}
        if c.q.shape[1] != c.k.shape[1]:
            seen.add("gqa")
    for option in (
        "causal",
        "window",
        "align",
        "scale",
        "softcap",
        "dropout_p",
        "empty_rows",
        "mask",
        "bias",
        "sinks",
        "dropout_mask",
        "gqa",
    ):
        assert option in seen, option
    lengths = {c.q.shape[2] for c in cases} | {c.k.shape[2] for c in cases}
    assert {63, 64, 65, 127, 128, 129} <= lengths


def test_golden_round_trip_reproduces_refattn(golden_dir):
    paths = sorted(golden_dir.glob("*.npz"))
    assert len(paths) == len(io.standard_suite())
    for path in paths:
        case = io.load_case(path)
        fresh = io.golden_outputs(case)
        assert set(case.outputs) == set(fresh)
        for name, value in fresh.items():
            np.testing.assert_array_equal(case.outputs[name], value, err_msg=f"{path.name}:{name}")
        assert io.check_case(case).passed


def test_write_is_reproducible(golden_dir, tmp_path):
    io.write_golden(tmp_path)
    for path in sorted(golden_dir.glob("*.npz")):
        a, b = np.load(path), np.load(tmp_path / path.name)
        assert a.files == b.files
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])


def test_a_case_written_by_another_implementation_is_judged(golden_dir, tmp_path):
    case = io.load_case(golden_dir / "causal_bottom_right.npz")
    twin = refattn.lowp.sdpa_twin(case.q, case.k, case.v, dtype="bfloat16", reorder_ops=True, **case.sdpa_options())
    mine = case.with_outputs({"out": twin}, dtype="bfloat16", implementation="my kernel")
    path = io.save_case(tmp_path / "mine", mine)
    loaded = io.load_case(path)
    assert loaded.implementation == "my kernel" and loaded.dtype == "bfloat16"
    assert io.check_case(loaded).passed
    wrong = case.with_outputs({"out": refattn.sdpa(case.q, case.k, case.v, causal=True, align="top_left")})
    assert not io.check_case(wrong).passed  # the classic alignment bug


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def _valid(tmp_path):
    case = io.standard_suite()[0]
    return case, io.save_case(tmp_path / "ok.npz", case.with_outputs(io.golden_outputs(case)))


def _rewrite(src, dst, drop=(), **replace):
    data = dict(np.load(src))
    for key in drop:
        data.pop(key)
    data.update(replace)
    return _write(dst, **data)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"drop": ("q",)}, "missing required keys \\['q'\\]"),
        ({"drop": ("version",)}, "missing required keys \\['version'\\]"),
        ({"version": np.array(2)}, "unknown case-file version 2"),
        ({"version": np.array("1")}, "expected a 0-d integer"),
        ({"options": np.array("{not json")}, "not valid JSON"),
        ({"options": np.array(json.dumps({"casual": True}))}, "unknown option 'casual'"),
        ({"options": np.array(json.dumps({"causal": 1}))}, "causal: expected"),
        ({"options": np.array(json.dumps([1, 2]))}, "expected a JSON object"),
        ({"mask": np.ones((32, 32))}, "key 'mask': expected a bool array"),
        ({"q": np.array(["a", "b"])}, "key 'q': expected a float array"),
        ({"q": np.ones((2, 16))}, "key 'q': expected at least 3 dims"),
        ({"k": np.ones((1, 2, 32, 8))}, "do not make a valid sdpa call"),
        ({"out": np.ones((1, 2, 32, 15))}, "key 'out': expected shape"),
        ({"dbias": np.ones((1, 2, 32, 32))}, "no bias input"),
        ({"drop": ("d_out",)}, "cotangent 'd_out' is missing"),
        ({"dtype": np.array("float12")}, "dtype: expected one of"),
        ({"extra": np.ones(3)}, "unknown keys \\['extra'\\]"),
    ],
)
def test_bad_files_are_rejected_with_the_key_named(tmp_path, change, message):
    _, good = _valid(tmp_path)
    path = _rewrite(good, tmp_path / "bad.npz", **change)
    with pytest.raises(refattn.RefAttnError, match=message):
        io.load_case(path)


class _Boom:
    def __reduce__(self):  # executed on unpickling: must never run
        return (pytest.fail, ("a pickled object was executed",))


def test_hostile_files_are_refused_without_executing_anything(tmp_path):
    _, good = _valid(tmp_path)
    data = dict(np.load(good))
    data["q"] = np.array([_Boom()], dtype=object)
    hostile = tmp_path / "hostile.npz"
    np.savez(hostile, **data)  # numpy pickles the object array
    with pytest.raises(refattn.RefAttnError, match="refused"):
        io.load_case(hostile)
    (tmp_path / "junk.npz").write_bytes(b"\x00not a zip at all" * 10)  # np.load would try to unpickle it
    with pytest.raises(refattn.RefAttnError, match="junk.npz: refused"):
        io.load_case(tmp_path / "junk.npz")
    with zipfile.ZipFile(tmp_path / "truncated.npz", "w") as z:
        z.writestr("q.npy", b"\x93NUMPY garbage")
    with pytest.raises(refattn.RefAttnError):
        io.load_case(tmp_path / "truncated.npz")
    with pytest.raises(refattn.RefAttnError, match="not a readable"):
        io.load_case(tmp_path / "missing.npz")


def test_attention_map_files(tmp_path):
    rng = np.random.default_rng(0)
    layers = [refattn.softmax(rng.standard_normal((2, 3, 5, 5))) for _ in range(4)]
    mask = np.ones((2, 5), dtype=bool)
    io.save_attentions(tmp_path / "maps.npz", layers, mask=mask, tokens=np.arange(10).reshape(2, 5))
    got, m, t = io.load_attentions(tmp_path / "maps.npz")
    assert len(got) == 4 and m.dtype == bool and t.shape == (2, 5)
    np.testing.assert_array_equal(got[2], layers[2])
    _write(tmp_path / "per_layer.npz", layer_0=layers[0], layer_1=layers[1])
    assert len(io.load_attentions(tmp_path / "per_layer.npz")[0]) == 2
    _write(tmp_path / "gap.npz", layer_0=layers[0], layer_2=layers[1])
    with pytest.raises(refattn.RefAttnError, match="layer_0 … layer_1"):
        io.load_attentions(tmp_path / "gap.npz")
    _write(tmp_path / "none.npz", maps=layers[0])
    with pytest.raises(refattn.RefAttnError, match="expected a key 'attentions'"):
        io.load_attentions(tmp_path / "none.npz")
    _write(tmp_path / "fmask.npz", attentions=np.stack(layers), mask=np.ones((2, 5)))
    with pytest.raises(refattn.RefAttnError, match="key 'mask': expected bool"):
        io.load_attentions(tmp_path / "fmask.npz")
