"""Case files: SDPA inputs, options and outputs in a versioned ``.npz`` any language can read.

Schema version 1 (``specs/case-format.md``): arrays ``q (B, Hq, Lq, D)``, ``k (B, Hk, Lk, D)``,
``v (B, Hk, Lk, Dv)`` and optionally ``mask`` (bool), ``bias``, ``sinks``, ``dropout_mask`` (bool),
broadcastable as :func:`refattn.sdpa` states; ``options``: a JSON object of the scalar options; the
cotangents ``d_out`` [, ``d_lse``]; outputs ``out``, ``lse`` and gradients ``dq``, ``dk``, ``dv``,
``dbias``, ``dsinks``; ``version``; ``dtype``: the precision the outputs were computed in; ``name``
and ``implementation``: free text.

Files are read without pickle, and every array's ``.npy`` header (shape and dtype) and zip entry
(declared uncompressed size) is checked against a size cap (``max_bytes``, default
:data:`MAX_BYTES`) before anything is allocated or decompressed.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from refattn import lowp
from refattn._validate import RefAttnError, as_int

__all__ = [
    "CASE_VERSION",
    "MAX_BYTES",
    "MAX_JSON_DEPTH",
    "Case",
    "check_case",
    "golden_outputs",
    "load_attentions",
    "load_case",
    "save_attentions",
    "save_case",
    "standard_suite",
    "write_golden",
]

CASE_VERSION = 1
MAX_BYTES = 2 * 2**30  # default cap on the arrays of one file (their .npy headers' sizes, in all)
_NPY_HEADER_ROOM = 1 << 16  # a .npy header (read up to numpy's 10 000-byte limit) beside its data
MAX_JSON_DEPTH = 64  # nesting of the options JSON (a valid one nests 2 deep: {"window": [l, r]})
INPUT_KEYS = ("q", "k", "v")
OPTION_ARRAYS = {"mask": "b", "bias": "f", "sinks": "f", "dropout_mask": "b"}  # name: dtype kind
COTANGENT_KEYS = ("d_out", "d_lse")
OUTPUT_KEYS = ("out", "lse", "dq", "dk", "dv", "dbias", "dsinks")
TEXT_KEYS = ("options", "dtype", "name", "implementation")
SCALAR_OPTIONS = {
    "causal": (bool,),
    "window": (list, type(None)),
    "align": (str, type(None)),
    "scale": (int, float, type(None)),
    "softcap": (int, float, type(None)),
    "dropout_p": (int, float),
    "empty_rows": (str,),
}
_KNOWN = set(INPUT_KEYS) | set(OPTION_ARRAYS) | set(COTANGENT_KEYS) | set(OUTPUT_KEYS) | set(TEXT_KEYS) | {"version"}


@dataclass
class Case:
    """One case: inputs, sdpa options, cotangents, and (when written by an implementation) outputs."""

    name: str
    arrays: dict  # q, k, v and the option arrays present (mask, bias, sinks, dropout_mask)
    options: dict = field(default_factory=dict)  # JSON-able scalar options
    cotangents: dict = field(default_factory=dict)  # d_out [, d_lse]
    outputs: dict = field(default_factory=dict)  # out, lse, dq, ... (any subset)
    dtype: str = "float64"
    implementation: str = ""

    @property
    def q(self):
        return self.arrays["q"]

    @property
    def k(self):
        return self.arrays["k"]

    @property
    def v(self):
        return self.arrays["v"]

    def sdpa_options(self):
        """Keyword arguments for :func:`refattn.sdpa`: scalar options and option arrays."""
        kw = dict(self.options)
        if kw.get("window") is not None:
            kw["window"] = tuple(kw["window"])
        kw.update({n: a for n, a in self.arrays.items() if n in OPTION_ARRAYS})
        return kw

    def with_outputs(self, outputs, *, dtype="float64", implementation=""):
        """A copy carrying ``outputs`` (a mapping of output names to arrays)."""
        unknown = set(outputs) - set(OUTPUT_KEYS)
        if unknown:
            raise RefAttnError(f"outputs: expected keys among {OUTPUT_KEYS}, got {sorted(unknown)}")
        kept = {n: np.asarray(a, dtype=np.float64) for n, a in outputs.items() if a is not None}
        return Case(self.name, self.arrays, self.options, self.cotangents, kept, dtype, implementation)


def _text(value):
    return np.array(str(value))


def save_case(path, case: Case):
    """Write ``case`` to ``path`` (``.npz``, uncompressed; no pickled objects)."""
    payload = dict(case.arrays)
    payload.update(case.cotangents)
    payload.update(case.outputs)
    payload["options"] = _text(json.dumps(case.options, sort_keys=True))
    payload["version"] = np.array(CASE_VERSION, dtype=np.int64)
    payload["dtype"] = _text(lowp.format_of(case.dtype).name)
    payload["name"] = _text(case.name)
    payload["implementation"] = _text(case.implementation)
    np.savez(path, **payload)
    return Path(path) if str(path).endswith(".npz") else Path(f"{path}.npz")


def _read_text(data, key, path, default=""):
    if key not in data:
        return default
    a = data[key]
    if a.dtype.kind != "U" or a.ndim != 0:
        raise RefAttnError(f"{path}: key '{key}': expected a 0-d unicode string, got dtype {a.dtype} shape {a.shape}")
    return str(a)


_JSON_STRUCTURE = re.compile(r'[\[\]{}"\\]')


def _json_depth_exceeds(text, limit):
    """Whether ``text`` nests arrays/objects deeper than ``limit`` (brackets inside strings do not
    count); linear, stops at the first level past the limit."""
    depth, in_string, skip_to = 0, False, -1
    for m in _JSON_STRUCTURE.finditer(text):
        c, i = m.group(), m.start()
        if in_string:
            if i < skip_to:  # the character after a backslash
                continue
            if c == "\\":
                skip_to = i + 2
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            if depth > limit:
                return True
        elif c in "]}":
            depth -= 1
    return False


def _parse_options(text, path):
    """The options JSON text as a Python object: nesting limited to :data:`MAX_JSON_DEPTH`."""
    if _json_depth_exceeds(text, MAX_JSON_DEPTH):
        raise RefAttnError(
            f"{path}: key 'options': expected a JSON object nested at most {MAX_JSON_DEPTH} deep, "
            f"got deeper nesting ({len(text)} characters)"
        )
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, an integer of too many digits
        raise RefAttnError(f"{path}: key 'options': not valid JSON ({exc})") from exc


def _check_options(options, path):
    if not isinstance(options, dict):
        raise RefAttnError(f"{path}: key 'options': expected a JSON object, got {type(options).__name__}")
    for name, value in options.items():
        if name not in SCALAR_OPTIONS:
            raise RefAttnError(f"{path}: options: unknown option {name!r}; expected among {sorted(SCALAR_OPTIONS)}")
        if isinstance(value, bool) and bool not in SCALAR_OPTIONS[name]:
            raise RefAttnError(f"{path}: options: {name}: expected {SCALAR_OPTIONS[name]}, got a bool")
        if not isinstance(value, SCALAR_OPTIONS[name]):
            raise RefAttnError(f"{path}: options: {name}: expected {SCALAR_OPTIONS[name]}, got {value!r}")
    return options


def _size(n):
    """``n`` bytes, readable."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _looks_like_text(head):
    """Whether the first bytes of a file read as printable UTF-8 (a character cut at the end is fine)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:
            return False
        text = head[: exc.start].decode("utf-8")
    return bool(text) and all(ch.isprintable() or ch in "\t\r\n" for ch in text)


def _not_a_zip(path, what):
    """What the file is, for a file that is no zip archive."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    if not head:
        kind = "an empty file"
    elif head.startswith(npy_format.MAGIC_PREFIX):
        kind = "a .npy file (a single array)"
    elif head.startswith(b"PK"):
        kind = "a damaged or truncated zip archive"
    elif head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        kind = "a pickle (refused: pickles are never loaded)"
    else:
        kind = "a text file" if _looks_like_text(head) else f"not a zip archive (it starts with {head[:12]!r})"
    return RefAttnError(f"{path}: {kind}, expected a .npz {what} (a zip archive of .npy arrays, as numpy.savez writes)")


def _member_header(zf, info, path):
    """``(key, shape, dtype, header bytes, data bytes)`` of one zip member, from its ``.npy`` header alone."""
    if not info.filename.endswith(".npy"):
        raise RefAttnError(f"{path}: member {info.filename!r}: expected only .npy arrays in the archive")
    key = info.filename[: -len(".npy")]
    with zf.open(info) as fh:  # decompresses the header's few bytes only
        try:
            version = npy_format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = npy_format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = npy_format.read_array_header_2_0(fh)
            else:
                raise ValueError(f".npy format version {version} is not supported (1.0 and 2.0 are)")
        except ValueError as exc:
            raise RefAttnError(f"{path}: key '{key}': not a readable .npy array ({exc})") from exc
        offset = fh.tell()
    if dtype.hasobject:
        raise RefAttnError(f"{path}: key '{key}': refused: the array holds pickled objects (dtype {dtype})")
    if any(n < 0 for n in shape):
        raise RefAttnError(f"{path}: key '{key}': the header declares a negative dimension, shape {shape}")
    return key, shape, dtype, offset, math.prod(shape) * dtype.itemsize


def _read_npz(path, max_bytes=MAX_BYTES, what="case file"):
    """Every array of an ``.npz`` as a dict, read without pickle; a :class:`RefAttnError` names the file.

    Before any array is allocated or decompressed, every member's declared uncompressed size and its
    ``.npy`` header (shape, dtype) are read and their sizes summed: over ``max_bytes``, the file is
    refused.  A header that disagrees with its member's size (a truncated or padded array) is refused."""
    max_bytes = as_int(max_bytes, "max_bytes", minimum=1)
    cap = f"the size cap max_bytes={max_bytes} ({_size(max_bytes)}); pass a larger max_bytes (refattn: --max-bytes)"
    if os.path.isdir(path):
        raise RefAttnError(f"{path}: a directory, expected a .npz {what}")
    if not os.path.exists(path):
        raise RefAttnError(f"{path}: not a readable .npz file (no such file)")
    try:
        if not zipfile.is_zipfile(path):
            raise _not_a_zip(path, what)
        with zipfile.ZipFile(path) as zf:
            members, total = [], 0
            infos = zf.infolist()
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                twice = sorted({n for n in names if names.count(n) > 1})
                raise RefAttnError(f"{path}: members {twice} appear more than once in the archive")
            for info in infos:
                if info.file_size > max_bytes + _NPY_HEADER_ROOM:  # the zip entry's own declaration
                    raise RefAttnError(
                        f"{path}: member {info.filename!r}: declares {_size(info.file_size)} uncompressed, over {cap}"
                    )
                key, shape, dtype, offset, nbytes = _member_header(zf, info, path)
                total += nbytes
                if total > max_bytes:
                    raise RefAttnError(
                        f"{path}: key '{key}': the header declares shape {shape} dtype {dtype} ({_size(nbytes)}; "
                        f"{_size(total)} in all so far), over {cap}"
                    )
                if offset + nbytes != info.file_size:
                    raise RefAttnError(
                        f"{path}: key '{key}': the header declares shape {shape} dtype {dtype} ({nbytes} bytes of "
                        f"data) but the member holds {info.file_size - offset} bytes: truncated or malformed"
                    )
                members.append((key, info))
            data = {}
            for key, info in members:
                with zf.open(info) as fh:
                    data[key] = npy_format.read_array(fh, allow_pickle=False)
            return data
    except RefAttnError:
        raise
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError, ValueError) as exc:
        # OSError: unreadable; BadZipFile/zlib/EOF: damaged data (a bad CRC); RuntimeError: encrypted;
        # NotImplementedError: an unknown compression method; ValueError: a malformed array
        raise RefAttnError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc


def load_case(path, *, max_bytes=MAX_BYTES) -> Case:
    """Read and validate a case file; a :class:`RefAttnError` names the file and the bad key.

    ``max_bytes``: the most bytes the file's arrays may hold in all (checked against their headers
    before anything is read; default :data:`MAX_BYTES`, 2 GiB)."""
    path = os.fspath(path)
    data = _read_npz(path, max_bytes, "case file")
    keys = set(data)
    unknown = keys - _KNOWN
    if "attentions" in keys or any(k.startswith("layer_") for k in keys):
        raise RefAttnError(
            f"{path}: an attention-map file (keys {sorted(keys)}), expected a case file; "
            "maps are read by `refattn rollout` / `refattn metrics`"
        )
    if unknown:
        raise RefAttnError(f"{path}: unknown keys {sorted(unknown)}; expected among {sorted(_KNOWN)}")
    missing = [key for key in (*INPUT_KEYS, "version", "options") if key not in keys]
    if missing:
        raise RefAttnError(f"{path}: missing required keys {missing}")
    version = data["version"]
    if version.shape != () or version.dtype.kind not in "iu":
        raise RefAttnError(
            f"{path}: key 'version': expected a 0-d integer, got dtype {version.dtype} shape {version.shape}"
        )
    if int(version) != CASE_VERSION:
        raise RefAttnError(
            f"{path}: unknown case-file version {int(version)}; this refattn reads version {CASE_VERSION}"
        )
    options = _parse_options(_read_text(data, "options", path), path)
    _check_options(options, path)
    arrays = {}
    for key in (*INPUT_KEYS, *OPTION_ARRAYS, *COTANGENT_KEYS, *OUTPUT_KEYS):
        if key not in data:
            continue
        a = data[key]
        want = OPTION_ARRAYS.get(key, "f")
        if want == "b" and a.dtype != bool:
            raise RefAttnError(f"{path}: key '{key}': expected a bool array, got dtype {a.dtype}")
        if want == "f" and a.dtype.kind not in "fiu":
            raise RefAttnError(f"{path}: key '{key}': expected a float array, got dtype {a.dtype}")
        arrays[key] = a if want == "b" else a.astype(np.float64, copy=False)
    for key in INPUT_KEYS:
        if arrays[key].ndim < 3:
            raise RefAttnError(
                f"{path}: key '{key}': expected at least 3 dims (..., H, L, D), got shape {arrays[key].shape}"
            )
    dtype = _read_text(data, "dtype", path, "float64")
    lowp.format_of(dtype)
    case = Case(
        name=_read_text(data, "name", path) or Path(path).stem,
        arrays={k: arrays[k] for k in (*INPUT_KEYS, *OPTION_ARRAYS) if k in arrays},
        options=options,
        cotangents={k: arrays[k] for k in COTANGENT_KEYS if k in arrays},
        outputs={k: arrays[k] for k in OUTPUT_KEYS if k in arrays},
        dtype=dtype,
        implementation=_read_text(data, "implementation", path),
    )
    _validate_call(case, path)
    return case


def _validate_call(case, path):
    """The inputs and options make a valid sdpa call (shapes, broadcasting, option values)."""
    from refattn.attention.sdpa import validate

    try:
        a = validate(case.q, case.k, case.v, **case.sdpa_options())
    except (RefAttnError, TypeError) as exc:
        raise RefAttnError(f"{path}: the inputs do not make a valid sdpa call: {exc}") from exc
    out_shape = a.score_shape[:-1] + (a.v.shape[-1],)
    if "d_out" in case.cotangents and case.cotangents["d_out"].shape != out_shape:
        raise RefAttnError(f"{path}: key 'd_out': expected shape {out_shape}, got {case.cotangents['d_out'].shape}")
    if "d_lse" in case.cotangents and case.cotangents["d_lse"].shape != out_shape[:-1]:
        raise RefAttnError(
            f"{path}: key 'd_lse': expected shape {out_shape[:-1]}, got {case.cotangents['d_lse'].shape}"
        )
    wanted = {"out": out_shape, "lse": out_shape[:-1], "dq": a.q.shape, "dk": a.k.shape, "dv": a.v.shape}
    wanted.update({n: case.arrays[n[1:]].shape for n in ("dbias", "dsinks") if n[1:] in case.arrays})
    for name, value in case.outputs.items():
        if name not in wanted:
            raise RefAttnError(f"{path}: key '{name}': the case has no {name[1:]} input to differentiate")
        if value.shape != wanted[name]:
            raise RefAttnError(f"{path}: key '{name}': expected shape {wanted[name]}, got {value.shape}")
    if any(n in case.outputs for n in ("dq", "dk", "dv", "dbias", "dsinks")) and "d_out" not in case.cotangents:
        raise RefAttnError(f"{path}: gradients are present but the cotangent 'd_out' is missing")


def golden_outputs(case: Case):
    """refattn's float64 outputs for ``case``: out, lse and, with a cotangent, the gradients."""
    import refattn

    opts = case.sdpa_options()
    out, lse = refattn.sdpa(case.q, case.k, case.v, return_lse=True, **opts)
    outputs = {"out": out, "lse": lse}
    if "d_out" in case.cotangents:
        grads = refattn.sdpa_backward(
            case.cotangents["d_out"], case.q, case.k, case.v, d_lse=case.cotangents.get("d_lse"), **opts
        )
        outputs.update({n: g for n, g in grads._asdict().items() if g is not None})
    return outputs


def check_case(case: Case, *, rule="flash", dtype=None, **rule_options):
    """Judge the outputs a case file carries against the golden: a :class:`refattn.testing.compare.Verdict`."""
    from refattn.testing.compare import check_attention

    if "out" not in case.outputs:
        raise RefAttnError(f"{case.name}: no 'out' in the file: write the implementation's output under 'out'")
    grads = {n: case.outputs[n] for n in ("dq", "dk", "dv", "dbias", "dsinks") if n in case.outputs}
    return check_attention(
        case.outputs["out"],
        case.q,
        case.k,
        case.v,
        dtype=dtype or case.dtype,
        lse=case.outputs.get("lse"),
        grads=grads or None,
        d_out=case.cotangents.get("d_out"),
        d_lse=case.cotangents.get("d_lse"),
        rule=rule,
        **rule_options,
        **case.sdpa_options(),
    )


def standard_suite():
    """The built-in cases (no outputs): every sdpa option and the variants expressible as sdpa inputs."""
    from refattn.testing.suite import standard_cases

    return standard_cases()


def write_golden(directory, suite="standard"):
    """Write every case of ``suite`` with refattn's outputs to ``directory``; returns the paths."""
    if suite != "standard":
        raise RefAttnError(f"suite: expected 'standard', got {suite!r}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise RefAttnError(f"directory: expected a directory (existing or to create), got the file {str(directory)!r}")
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for case in standard_suite():
        golden = case.with_outputs(golden_outputs(case), implementation="refattn golden (float64)")
        paths.append(save_case(directory / f"{case.name}.npz", golden))
    return paths


ATTENTION_KEYS = ("attentions", "mask", "tokens", "version")


def save_attentions(path, attentions, *, mask=None, tokens=None):
    """Write per-layer attention maps ``(..., H, n, n)`` (first layer first) for ``refattn rollout`` /
    ``refattn metrics``: key ``attentions`` ``(L, ..., H, n, n)``, optional ``mask`` (bool ``(..., n)``,
    True = real token) and ``tokens`` (int ``(..., n)``), ``version``."""
    payload = {
        "attentions": np.stack([np.asarray(a, dtype=np.float64) for a in attentions]),
        "version": np.array(CASE_VERSION, dtype=np.int64),
    }
    if mask is not None:
        payload["mask"] = np.asarray(mask, dtype=bool)
    if tokens is not None:
        payload["tokens"] = np.asarray(tokens, dtype=np.int64)
    np.savez(path, **payload)


def load_attentions(path, *, max_bytes=MAX_BYTES):
    """Read a file written by :func:`save_attentions` (or any ``.npz`` with those keys; per-layer keys
    ``layer_0``, ``layer_1``, ... are accepted instead of ``attentions``): ``(layers, mask, tokens)``.
    ``max_bytes``: the size cap, as :func:`load_case`."""
    path = os.fspath(path)
    data = _read_npz(path, max_bytes, "attention-map file")
    layer_keys = sorted(
        (k for k in data if k.startswith("layer_")), key=lambda k: int(k[6:]) if k[6:].isdigit() else -1
    )
    if "attentions" in data:
        stacked = data["attentions"]
        if stacked.ndim < 4:
            raise RefAttnError(f"{path}: key 'attentions': expected (L, ..., H, n, n), got shape {stacked.shape}")
        layers = list(stacked)
    elif layer_keys:
        if [k[6:] for k in layer_keys] != [str(i) for i in range(len(layer_keys))]:
            raise RefAttnError(f"{path}: expected keys layer_0 … layer_{len(layer_keys) - 1}, got {layer_keys}")
        layers = [data[k] for k in layer_keys]
    elif "q" in data and "options" in data:
        raise RefAttnError(
            f"{path}: a case file (keys q, k, v, options, ...), expected an attention-map file with a key "
            "'attentions' (L, ..., H, n, n); case files are judged by `refattn check`"
        )
    else:
        raise RefAttnError(f"{path}: expected a key 'attentions' (L, ..., H, n, n) or keys layer_0, layer_1, ...")
    unknown = set(data) - set(ATTENTION_KEYS) - set(layer_keys)
    if unknown:
        raise RefAttnError(f"{path}: unknown keys {sorted(unknown)}; expected {ATTENTION_KEYS} or layer_<i>")
    if not layers:
        raise RefAttnError(
            f"{path}: key 'attentions': expected at least one layer, got shape {data['attentions'].shape}"
        )
    for i, a in enumerate(layers):
        if a.dtype.kind != "f" or a.ndim < 3 or a.shape[-1] != a.shape[-2]:
            raise RefAttnError(f"{path}: layer {i}: expected float maps (..., H, n, n), got {a.dtype} {a.shape}")
        if a.shape != layers[0].shape:
            raise RefAttnError(f"{path}: layer {i}: expected the shape of layer 0, {layers[0].shape}, got {a.shape}")
    n = layers[0].shape[-1]
    if n == 0:
        raise RefAttnError(f"{path}: expected maps of at least one token (n ≥ 1), got shape {layers[0].shape}")
    if "version" in data:
        version = data["version"]
        if version.shape != () or version.dtype.kind not in "iu" or int(version) != CASE_VERSION:
            got = int(version) if version.shape == () and version.dtype.kind in "iu" else f"dtype {version.dtype}"
            raise RefAttnError(
                f"{path}: key 'version': expected the 0-d integer {CASE_VERSION}, got {got} (shape {version.shape})"
            )
    mask, tokens = data.get("mask"), data.get("tokens")
    if mask is not None and mask.dtype != bool:
        raise RefAttnError(f"{path}: key 'mask': expected bool (True = real token), got dtype {mask.dtype}")
    if tokens is not None and tokens.dtype.kind not in "iu":
        raise RefAttnError(f"{path}: key 'tokens': expected integer ids, got dtype {tokens.dtype}")
    for key, value in (("mask", mask), ("tokens", tokens)):
        if value is not None and (value.ndim == 0 or value.shape[-1] != n):
            raise RefAttnError(
                f"{path}: key '{key}': expected shape (..., n) with n = {n} (the maps'), got {value.shape}"
            )
    return layers, mask, tokens
