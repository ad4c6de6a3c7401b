"""Case files: round trip, the golden suite, and corrupted or hostile files rejected."""

import io as pyio
import json
import pickle
import struct
import zipfile

import numpy as np
import pytest
from numpy.lib import format as npy_format

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
    with pytest.raises(refattn.RefAttnError, match="junk.npz: not a zip archive"):
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


# ---- files that are not case files, sizes over the cap, hostile JSON ---------------------------


def _not_npz(tmp_path, kind):
    path = tmp_path / f"{kind}.npz"
    if kind == "npy":
        with open(path, "wb") as fh:
            np.save(fh, np.ones(3))
    elif kind == "text":
        path.write_text("q,k,v\n1,2,3\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"q": [1.0]}))
    elif kind == "truncated_zip":
        np.savez(path, q=np.ones((1, 1, 4, 2)))
        path.write_bytes(path.read_bytes()[:-30])  # the central directory cut off
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("npy", "a .npy file \\(a single array\\), expected a .npz case file"),
        ("text", "a text file, expected a .npz case file"),
        ("empty", "an empty file, expected a .npz case file"),
        ("pickle", "a pickle \\(refused"),
        ("truncated_zip", "a damaged or truncated zip archive"),
    ],
)
def test_files_that_are_not_npz_archives_are_named(tmp_path, kind, message):
    path = _not_npz(tmp_path, kind)
    before = path.read_bytes()
    with pytest.raises(refattn.RefAttnError, match=f"{kind}.npz: {message}"):
        io.load_case(path)
    assert path.read_bytes() == before


def test_map_reader_names_what_it_expected(tmp_path):
    with pytest.raises(refattn.RefAttnError, match="a .npy file \\(a single array\\), expected a .npz attention-map"):
        io.load_attentions(_not_npz(tmp_path, "npy"))
    with pytest.raises(refattn.RefAttnError, match="a directory, expected a .npz attention-map file"):
        io.load_attentions(tmp_path)


def test_case_and_map_files_mistaken_for_each_other(tmp_path):
    _, case_path = _valid(tmp_path)
    with pytest.raises(refattn.RefAttnError, match="a case file .* expected an attention-map file"):
        io.load_attentions(case_path)
    io.save_attentions(tmp_path / "maps.npz", [np.full((1, 2, 3, 3), 1 / 3)])
    with pytest.raises(refattn.RefAttnError, match="an attention-map file .* expected a case file"):
        io.load_case(tmp_path / "maps.npz")


def _npy_bytes(shape, descr="<f8", data=b""):
    """A .npy header declaring ``shape``/``descr``, followed by ``data`` (not necessarily matching)."""
    buf = pyio.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


def _zip(path, members, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        for name, payload in members.items():
            z.writestr(name, payload)
    return path


def _reading_arrays_fails(monkeypatch):
    """Make any array read an error: a refusal must come from the headers alone."""

    def refuse(*args, **kwargs):
        raise AssertionError("an array was read although the header is over the cap")

    monkeypatch.setattr(npy_format, "read_array", refuse)


def test_a_declared_1e13_element_array_is_refused_from_its_header(tmp_path, monkeypatch):
    path = _zip(tmp_path / "huge.npz", {"bias.npy": _npy_bytes((10**13,), data=b"\0" * 8)})
    _reading_arrays_fails(monkeypatch)
    with pytest.raises(
        refattn.RefAttnError, match="key 'bias': the header declares shape \\(10000000000000,\\)"
    ) as info:
        io.load_case(path)
    assert "max_bytes=2147483648" in str(info.value)
    with pytest.raises(refattn.RefAttnError, match="key 'bias': the header declares"):
        io.load_attentions(path)


def test_a_small_compressed_file_that_unpacks_past_the_cap_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, attentions=np.zeros((2, 1, 4, 256, 256)))  # 4 MiB of maps in a few KiB
    assert path.stat().st_size < 2**16
    assert io.load_attentions(path, max_bytes=2**23)[0][0].shape == (1, 4, 256, 256)  # a raised cap reads it
    _reading_arrays_fails(monkeypatch)
    with pytest.raises(refattn.RefAttnError, match="member 'attentions.npy': declares 4.0 MiB uncompressed") as info:
        io.load_attentions(path, max_bytes=2**20)
    assert "max_bytes=1048576" in str(info.value)


def test_the_cap_counts_every_array_of_the_file(tmp_path, monkeypatch):
    path = tmp_path / "two.npz"
    np.savez(path, q=np.zeros(100_000), k=np.zeros(100_000))  # 800 000 bytes each
    _reading_arrays_fails(monkeypatch)
    with pytest.raises(refattn.RefAttnError, match="key 'k': .*1.5 MiB in all so far\\), over the size cap"):
        io.load_case(path, max_bytes=1_000_000)


def test_a_zip_entry_that_declares_more_than_the_cap_is_refused_before_decompressing(tmp_path, monkeypatch):
    path = _zip(tmp_path / "liar.npz", {"q.npy": _npy_bytes((2,), data=b"\0" * 16)})
    raw = bytearray(path.read_bytes())
    central = raw.index(b"PK\x01\x02")  # the central directory entry: uncompressed size at +24
    raw[central + 24 : central + 28] = struct.pack("<I", 0xFFFFFFF0)
    path.write_bytes(bytes(raw))
    _reading_arrays_fails(monkeypatch)
    with pytest.raises(refattn.RefAttnError, match="member 'q.npy': declares 4.0 GiB uncompressed, over the size cap"):
        io.load_case(path)


def test_a_header_that_disagrees_with_its_data_is_refused(tmp_path):
    path = _zip(tmp_path / "short.npz", {"q.npy": _npy_bytes((1000,), data=b"\0" * 8)})
    with pytest.raises(refattn.RefAttnError, match="key 'q': .* but the member holds 8 bytes: truncated"):
        io.load_case(path)


@pytest.mark.parametrize(
    "members, message",
    [
        ({"readme.txt": b"hello"}, "member 'readme.txt': expected only .npy arrays"),
        ({"q.npy": _npy_bytes((-5,))}, "key 'q': the header declares a negative dimension"),
        ({"q.npy": b"\x93NUMPY\x09\x00 nonsense"}, "key 'q': not a readable .npy array"),
    ],
)
def test_malformed_members_are_refused(tmp_path, members, message):
    with pytest.raises(refattn.RefAttnError, match=message):
        io.load_case(_zip(tmp_path / "bad.npz", members))


def test_duplicate_members_are_refused(tmp_path):
    path = tmp_path / "twice.npz"
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(path, "w") as z:
        z.writestr("q.npy", _npy_bytes((0,)))
        z.writestr("q.npy", _npy_bytes((0,)))
    with pytest.raises(refattn.RefAttnError, match="members \\['q.npy'\\] appear more than once"):
        io.load_case(path)


@pytest.mark.parametrize("bad, error", [(0, refattn.RefAttnError), ("2G", refattn.RefAttnTypeError)])
def test_max_bytes_is_validated(tmp_path, bad, error):
    _, good = _valid(tmp_path)
    with pytest.raises(error, match="max_bytes: expected an integer"):
        io.load_case(good, max_bytes=bad)


def _nested(depth):
    return json.dumps({"causal": True, "x": json.loads("[" * (depth - 1) + "]" * (depth - 1))})


def test_options_json_is_depth_limited(tmp_path):
    _, good = _valid(tmp_path)
    deep = _rewrite(good, tmp_path / "deep.npz", options=np.array("[" * 100_000 + "]" * 100_000))
    with pytest.raises(refattn.RefAttnError, match="key 'options': expected a JSON object nested at most 64 deep"):
        io.load_case(deep)
    at_limit = _rewrite(good, tmp_path / "at_limit.npz", options=np.array(_nested(io.MAX_JSON_DEPTH)))
    with pytest.raises(refattn.RefAttnError, match="unknown option 'x'"):  # parsed: the depth is allowed
        io.load_case(at_limit)
    past = _rewrite(good, tmp_path / "past.npz", options=np.array(_nested(io.MAX_JSON_DEPTH + 1)))
    with pytest.raises(refattn.RefAttnError, match="nested at most 64 deep"):
        io.load_case(past)
    in_string = _rewrite(good, tmp_path / "in_string.npz", options=np.array(json.dumps({"x": "[{" * 100})))
    with pytest.raises(refattn.RefAttnError, match="unknown option 'x'"):  # brackets in a string do not nest
        io.load_case(in_string)


def test_an_options_integer_of_too_many_digits_is_invalid_json(tmp_path):
    _, good = _valid(tmp_path)
    path = _rewrite(good, tmp_path / "digits.npz", options=np.array('{"scale": 1' + "0" * 5000 + "}"))
    with pytest.raises(refattn.RefAttnError, match="key 'options': not valid JSON"):
        io.load_case(path)


def test_map_file_version_is_checked(tmp_path):
    _write(tmp_path / "v2.npz", attentions=np.full((1, 1, 2, 3, 3), 1 / 3), version=np.array(2))
    with pytest.raises(refattn.RefAttnError, match="key 'version': expected the 0-d integer 1, got 2"):
        io.load_attentions(tmp_path / "v2.npz")


def test_golden_into_a_file_path_is_refused_and_the_file_kept(tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    with pytest.raises(refattn.RefAttnError, match="directory: expected a directory .* got the file"):
        io.write_golden(target)
    assert target.read_text() == "keep me"


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"attentions": np.zeros((0, 1, 2, 3, 3))}, "key 'attentions': expected at least one layer"),
        ({"attentions": np.zeros((2, 1, 2, 0, 0))}, "expected maps of at least one token"),
        (
            {"layer_0": np.full((1, 2, 3, 3), 1 / 3), "layer_1": np.full((1, 2, 4, 4), 1 / 4)},
            "layer 1: expected the shape of layer 0, \\(1, 2, 3, 3\\), got \\(1, 2, 4, 4\\)",
        ),
        (
            {"attentions": np.full((2, 1, 2, 3, 3), 1 / 3), "mask": np.ones((1, 4), dtype=bool)},
            "key 'mask': expected shape \\(..., n\\) with n = 3",
        ),
        (
            {"attentions": np.full((2, 1, 2, 3, 3), 1 / 3), "tokens": np.arange(7)},
            "key 'tokens': expected shape \\(..., n\\) with n = 3",
        ),
    ],
)
def test_map_files_with_no_layers_no_tokens_or_mismatched_shapes_are_refused(tmp_path, arrays, message):
    with pytest.raises(refattn.RefAttnError, match=message):
        io.load_attentions(_write(tmp_path / "maps.npz", **arrays))
