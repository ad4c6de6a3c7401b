"""Attention-map files: per-layer maps ``(L, ..., H, n, n)`` with an optional real-token mask and token
ids, for ``refattn rollout`` / ``refattn metrics`` (``specs/case-format.md``).  A schema of their
own (``MAP_VERSION``), read through :mod:`refattn.crosscheck.npz` (no pickle, a size cap)."""

from __future__ import annotations

import os

import numpy as np

from refattn._validate import RefAttnError, check_keywords_of
from refattn.crosscheck import npz

__all__ = ["ATTENTION_KEYS", "MAP_VERSION", "load_attentions", "save_attentions"]

MAP_VERSION = 1
ATTENTION_KEYS = ("attentions", "mask", "tokens", "version")


def save_attentions(path, attentions, *, mask=None, tokens=None):
    """Write an attention-map file for ``refattn rollout`` / ``refattn metrics``: the maps stacked
    under the key ``attentions (L, ..., H, n, n)``, with ``mask``, ``tokens`` and ``version``.

    Axes: ``L`` layers, ``...`` batch dims, ``H`` heads, ``n`` tokens (query rows, key columns).

    Parameters
    ----------
    path : str or os.PathLike
        The ``.npz`` file (``.npz`` appended when missing).
    attentions : sequence of array_like, each shape (..., H, n, n)
        Per-layer maps, first layer first, of one shape; stored as float64.
    mask : array_like of bool, shape (..., n), optional
        True = real token (padding False).  Default None.
    tokens : array_like of int, shape (..., n), optional
        Token ids (used by the token metrics and as figure labels).  Default None.

    Returns
    -------
    None
    """
    payload = {
        "attentions": np.stack([np.asarray(a, dtype=np.float64) for a in attentions]),
        "version": np.array(MAP_VERSION, dtype=np.int64),
    }
    if mask is not None:
        payload["mask"] = np.asarray(mask, dtype=bool)
    if tokens is not None:
        payload["tokens"] = np.asarray(tokens, dtype=np.int64)
    np.savez(path, **payload)


def load_attentions(path, *, max_bytes=npz.MAX_BYTES):
    """Read an attention-map file: one written by :func:`save_attentions`, or any ``.npz`` with its
    keys (per-layer keys ``layer_0``, ``layer_1``, ... are accepted instead of ``attentions``).

    Checked: float maps ``(..., H, n, n)`` of one shape with ``n >= 1``, a bool ``mask`` and an
    integer ``tokens`` of shape ``(..., n)``, the version; read without pickle under a size cap.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.npz`` file.
    max_bytes : int, default MAX_BYTES (2 GiB)
        The size cap, as :func:`refattn.crosscheck.cases.load_case`.

    Returns
    -------
    layers : list of ndarray, each shape (..., H, n, n)
        The maps, first layer first, in the file's float dtype.
    mask : ndarray of bool, shape (..., n), or None
        True = real token.
    tokens : ndarray of int, shape (..., n), or None
        Token ids.

    Raises
    ------
    RefAttnError
        Naming the file and the key (a case file given instead, bad shapes or dtypes, unknown
        keys, over ``max_bytes``).
    """
    path = os.fspath(path)
    data = npz.read_npz(path, max_bytes, "attention-map file")
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
        if version.shape != () or version.dtype.kind not in "iu" or int(version) != MAP_VERSION:
            got = int(version) if version.shape == () and version.dtype.kind in "iu" else f"dtype {version.dtype}"
            raise RefAttnError(
                f"{path}: key 'version': expected the 0-d integer {MAP_VERSION}, got {got} (shape {version.shape})"
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


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
