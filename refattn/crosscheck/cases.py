"""Case files: SDPA inputs, options and outputs in a versioned ``.npz`` any language can read.

Schema version 1 (``specs/case-format.md``): arrays ``q (B, Hq, Lq, D)``, ``k (B, Hk, Lk, D)``,
``v (B, Hk, Lk, Dv)`` and optionally ``mask`` (bool), ``bias``, ``sinks``, ``dropout_mask`` (bool),
broadcastable as :func:`refattn.sdpa` states; ``options``: a JSON object of the scalar options; the
cotangents ``d_out`` [, ``d_lse``]; outputs ``out``, ``lse`` and gradients ``dq``, ``dk``, ``dv``,
``dbias``, ``dsinks``; ``version``; ``dtype``: the precision the outputs were computed in; ``name``
and ``implementation``: free text.  Files are read by :mod:`refattn.crosscheck.npz` (no pickle, a
size cap ``max_bytes`` checked before anything is read).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from refattn import lowp
from refattn._validate import RefAttnError, check_keywords_of
from refattn.attention.sdpa import validate
from refattn.crosscheck import npz

__all__ = ["CASE_VERSION", "Case", "load_case", "save_case"]

CASE_VERSION = 1
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
    """One SDPA case: inputs, sdpa options, cotangents and, once an implementation ran it, its outputs.

    Fields: ``name`` (free text), ``arrays`` (``q (B, Hq, Lq, D)``, ``k (B, Hk, Lk, D)``,
    ``v (B, Hk, Lk, Dv)`` and the option arrays present: ``mask``, ``bias``, ``sinks``,
    ``dropout_mask``), ``options`` (the JSON-able scalar options: ``causal``, ``window``,
    ``align``, ``scale``, ``softcap``, ``dropout_p``, ``empty_rows``), ``cotangents``
    (``d_out`` [, ``d_lse``]), ``outputs`` (any of ``out``, ``lse``, ``dq``, ``dk``, ``dv``,
    ``dbias``, ``dsinks``), ``dtype`` (the precision the outputs were computed in, default
    ``"float64"``) and ``implementation`` (free text).  ``q``, ``k``, ``v`` are shortcuts to the
    arrays.  The file format is ``specs/case-format.md``.
    """

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
        """The case's keyword arguments for :func:`refattn.sdpa`: its scalar options (``window`` as a
        tuple) and its option arrays; call ``sdpa(case.q, case.k, case.v, **case.sdpa_options())``."""
        kw = dict(self.options)
        if kw.get("window") is not None:
            kw["window"] = tuple(kw["window"])
        kw.update({n: a for n, a in self.arrays.items() if n in OPTION_ARRAYS})
        return kw

    def with_outputs(self, outputs, *, dtype="float64", implementation=""):
        """A copy of the case (inputs shared, not copied) carrying an implementation's outputs.

        Parameters
        ----------
        outputs : mapping of str to array_like or None
            Names among ``out``, ``lse``, ``dq``, ``dk``, ``dv``, ``dbias``, ``dsinks``; arrays
            are kept as float64, None values dropped.
        dtype : str, default "float64"
            The precision the outputs were computed in (e.g. ``"bfloat16"``): it picks the
            tolerance they are judged at.
        implementation : str, default ""
            Who computed them (free text).

        Returns
        -------
        Case
        """
        unknown = set(outputs) - set(OUTPUT_KEYS)
        if unknown:
            raise RefAttnError(f"outputs: expected keys among {OUTPUT_KEYS}, got {sorted(unknown)}")
        kept = {n: np.asarray(a, dtype=np.float64) for n, a in outputs.items() if a is not None}
        return Case(self.name, self.arrays, self.options, self.cotangents, kept, dtype, implementation)


def _text(value):
    return np.array(str(value))


def save_case(path, case: Case):
    """Write a case file: a version-1 ``.npz`` any language can read (uncompressed, no pickled
    objects; ``specs/case-format.md``).

    Parameters
    ----------
    path : str or os.PathLike
        The file; ``.npz`` is appended when missing (as :func:`numpy.savez` does).
    case : Case
        Its arrays, cotangents and outputs are written under their names; ``options`` as JSON
        text, with ``version``, ``dtype``, ``name`` and ``implementation``.

    Returns
    -------
    pathlib.Path
        The path written.
    """
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


def load_case(path, *, max_bytes=npz.MAX_BYTES) -> Case:
    """Read and validate a case file: schema, dtypes, and that the inputs make a valid sdpa call
    whose outputs and cotangents have the right shapes.

    Read without pickle, under a size cap checked before anything is decompressed
    (:func:`refattn.crosscheck.npz.read_npz`).

    Parameters
    ----------
    path : str or os.PathLike
        A ``.npz`` case file (version 1).
    max_bytes : int, default MAX_BYTES (2 GiB)
        The most bytes the file's arrays may hold in all, checked against their ``.npy`` headers
        before anything is read.

    Returns
    -------
    Case
        Inputs as float64 (masks bool), outputs and cotangents as float64.

    Raises
    ------
    RefAttnError
        Naming the file and the bad key: not a zip, a pickle, an unknown key or version, a wrong
        dtype or shape, an invalid sdpa call, gradients without ``d_out``, over ``max_bytes``.
    """
    path = os.fspath(path)
    data = npz.read_npz(path, max_bytes, "case file")
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
    options = npz.parse_json(npz.read_text(data, "options", path), path)
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
    dtype = npz.read_text(data, "dtype", path, "float64")
    lowp.format_of(dtype)
    case = Case(
        name=npz.read_text(data, "name", path) or Path(path).stem,
        arrays={k: arrays[k] for k in (*INPUT_KEYS, *OPTION_ARRAYS) if k in arrays},
        options=options,
        cotangents={k: arrays[k] for k in COTANGENT_KEYS if k in arrays},
        outputs={k: arrays[k] for k in OUTPUT_KEYS if k in arrays},
        dtype=dtype,
        implementation=npz.read_text(data, "implementation", path),
    )
    _validate_call(case, path)
    return case


def _validate_call(case, path):
    """The inputs and options make a valid sdpa call (shapes, broadcasting, option values)."""
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


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
