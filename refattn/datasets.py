"""Datasets of attention maps beyond memory, on Dask: their stores and their chunked evaluation (``specs/datasets.md``).

A dataset is a Dask array ``maps (N, L, H, n, n)``: ``N`` examples, each the maps of ``L`` layers with
``H`` heads over ``n`` tokens (rows = queries), chunked over ``N`` only, with an optional real-token
``mask (N, n)`` (True = real token) and token ids ``tokens (N, n)``.  :func:`open_maps` opens one from
a Zarr store (:func:`save_maps` writes one) or from a directory of attention-map files
(:func:`refattn.io.save_attentions`), without reading the maps.

:func:`refattn.metrics.summarize`, :func:`refattn.rollout` and
:func:`refattn.metrics.attention_attribution` take such an array in place of their in-memory
layers and compute on Dask's default scheduler (the local threaded one); the functions here are
the same calls with a ``client=`` (a ``dask.distributed.Client``), plus :func:`per_map` for any metric
of one map (the per-head statistics: ``head_confidence``, ``entropy``, ...).  Each reads the dataset
one chunk per task, and returns the in-memory result of the same maps: bitwise, when both run the
same backend (``specs/datasets.md``, "Exactness").  Dask (``pip install 'refattn[dask]'``: dask,
distributed, zarr) is imported only when one of these runs.

Axes: ``N`` examples, ``L`` layers, ``H`` heads, ``n`` (or ``T``) tokens.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import zipfile
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from refattn import _datasets
from refattn._validate import RefAttnError, RefAttnTypeError, as_int, check_keywords_of, unknown_option
from refattn.crosscheck import npz
from refattn.crosscheck.maps import MAP_VERSION, load_attentions
from refattn.metrics.attribution import attention_attribution as _attention_attribution
from refattn.metrics.summary import summarize as _summarize
from refattn.rollout_flow import rollout as _rollout

__all__ = [
    "STORE_KEYS",
    "attention_attribution",
    "local_cluster",
    "open_maps",
    "per_map",
    "rollout",
    "save_maps",
    "summarize",
]

#: The arrays of a Zarr store of maps (:func:`save_maps`): the maps, the real-token mask, the token ids.
STORE_KEYS = ("attentions", "mask", "tokens")
_INSTALL = "pip install 'refattn[dask]'"


def _modules():
    """``(dask.array, zarr)``, or a RefAttnError saying how to install them."""
    try:
        import dask.array as da
        import zarr
    except ImportError as exc:
        raise RefAttnError(f"datasets of maps need Dask and Zarr ({exc}): {_INSTALL}") from exc
    return da, zarr


def _is_zarr(path):
    return any((path / name).is_file() for name in ("zarr.json", ".zgroup", ".zarray"))


def _open_zarr(path, zarr, da):
    """``(maps, mask, tokens)`` of a Zarr store: a group of :data:`STORE_KEYS`, or one array (the maps)."""
    node = zarr.open(str(path), mode="r")
    if isinstance(node, zarr.Array):
        return da.from_zarr(node), None, None
    arrays = {name: node[name] for name in node.array_keys()}
    unknown = sorted(set(arrays) - set(STORE_KEYS))
    if unknown:
        raise RefAttnError(f"{path}: unknown arrays {unknown} in the Zarr store; expected {STORE_KEYS}")
    if "attentions" not in arrays:
        raise RefAttnError(f"{path}: expected an array 'attentions' (N, L, H, n, n) in the store, got {sorted(arrays)}")
    version = node.attrs.get("version", MAP_VERSION)
    if version != MAP_VERSION:
        raise RefAttnError(f"{path}: attribute 'version': expected {MAP_VERSION}, got {version!r}")
    maps = da.from_zarr(arrays["attentions"])
    if maps.dtype.kind != "f" or maps.ndim != 5 or maps.shape[-1] != maps.shape[-2]:
        raise RefAttnError(f"{path}: 'attentions': expected float maps (N, L, H, n, n), got {maps.dtype} {maps.shape}")
    extra = {}
    for key, kinds, what in (("mask", "b", "bool (True = real token)"), ("tokens", "iu", "integer ids")):
        if key not in arrays:
            extra[key] = None
            continue
        a = arrays[key]
        if a.dtype.kind not in kinds:
            raise RefAttnError(f"{path}: '{key}': expected {what}, got dtype {a.dtype}")
        if tuple(a.shape) != (maps.shape[0], maps.shape[-1]):
            raise RefAttnError(f"{path}: '{key}': expected (N, n) = {(maps.shape[0], maps.shape[-1])}, got {a.shape}")
        extra[key] = da.from_zarr(a)
    return maps, extra["mask"], extra["tokens"]


def _headers(path, max_bytes):
    """``{key: (shape, dtype)}`` of an attention-map file, from its ``.npy`` headers alone (under the size cap)."""
    found, total = {}, 0
    try:
        if not zipfile.is_zipfile(path):
            npz.read_npz(path, max_bytes, "attention-map file")  # names what the file is instead
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                key, shape, dtype, _, nbytes = npz._member_header(zf, info, path)
                total += nbytes
                if total > max_bytes:
                    raise RefAttnError(
                        f"{path}: key '{key}': {npz.readable_size(total)} in all so far, over the size cap "
                        f"max_bytes={max_bytes} ({npz.readable_size(max_bytes)}); pass a larger max_bytes"
                    )
                found[key] = (tuple(shape), dtype)
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise RefAttnError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    return found


def _file_layout(path, max_bytes):
    """``(examples, L, H, n, dtype, has mask, has tokens)`` of an attention-map file, from its headers."""
    heads = _headers(path, max_bytes)
    if "attentions" in heads:
        shape, dtype = heads["attentions"]
        layers, shape = (shape[0], shape[1:]) if len(shape) >= 4 else (None, shape)
    else:
        keys = [k for k in heads if k.startswith("layer_")]
        layers = len(keys)
        shape, dtype = heads[keys[0]] if keys else ((), None)
    if not layers or dtype is None or dtype.kind != "f" or len(shape) < 3 or shape[-1] != shape[-2]:
        load_attentions(path, max_bytes=max_bytes)  # raises the file's own error
        raise RefAttnError(f"{path}: expected float maps 'attentions' (L, ..., H, n, n)")  # pragma: no cover
    count, n = math.prod(shape[:-3]), shape[-1]
    for key in ("mask", "tokens"):
        if key in heads and heads[key][0] not in ((n,), shape[:-3] + (n,)):
            raise RefAttnError(
                f"{path}: key '{key}': expected shape (n,) or the maps' batch dims and n, {shape[:-3] + (n,)}, "
                f"got {heads[key][0]}"
            )
    return count, layers, shape[-3], n, dtype, "mask" in heads, "tokens" in heads


def _read_maps(path, max_bytes, dtype):
    """One file's maps in the dataset's layout ``(B, L, H, n, n)`` (its batch dims flattened), checked."""
    layers, _, _ = load_attentions(path, max_bytes=max_bytes)
    stacked = np.stack(layers)  # (L, ..., H, n, n)
    stacked = stacked.reshape((stacked.shape[0], -1) + stacked.shape[-3:])  # (L, B, H, n, n)
    return np.ascontiguousarray(np.swapaxes(stacked, 0, 1), dtype=dtype)  # (B, L, H, n, n)


def _read_member(path, key, count, n):
    """One small entry of a file (its ``mask`` or ``tokens``) as ``(B, n)``, the maps left unread."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as fh:
        a = npy_format.read_array(fh, allow_pickle=False)
    if key == "mask" and a.dtype != bool:
        raise RefAttnError(f"{path}: key 'mask': expected bool (True = real token), got dtype {a.dtype}")
    if key == "tokens" and a.dtype.kind not in "iu":
        raise RefAttnError(f"{path}: key 'tokens': expected integer ids, got dtype {a.dtype}")
    a = a.astype(bool if key == "mask" else np.int64, copy=False)
    return np.broadcast_to(a, (count, n)).copy() if a.shape == (n,) else a.reshape(count, n)


def _open_files(files, max_bytes, da):
    """``(maps, mask, tokens)`` of attention-map files: one chunk per file, in the order given."""
    import dask

    layouts = [_file_layout(f, max_bytes) for f in files]
    _, layers, heads, n, _, _, _ = layouts[0]
    for f, (_, l_f, h_f, n_f, _, _, _) in zip(files, layouts):
        if (l_f, h_f, n_f) != (layers, heads, n):
            raise RefAttnError(
                f"{f}: expected maps of {layers} layers, {heads} heads, {n} tokens (as {files[0].name}), "
                f"got {l_f}, {h_f}, {n_f}"
            )
    dtype = np.result_type(*(lay[4] for lay in layouts))
    maps, masks, tokens = [], [], []
    for f, (count, _, _, _, _, has_mask, has_tokens) in zip(files, layouts):
        part = dask.delayed(_read_maps, pure=True)(str(f), max_bytes, dtype)
        maps.append(da.from_delayed(part, shape=(count, layers, heads, n, n), dtype=dtype))
        if has_mask:
            masks.append(da.from_delayed(dask.delayed(_read_member)(str(f), "mask", count, n), (count, n), bool))
        else:
            masks.append(da.ones((count, n), dtype=bool, chunks=(count, n)))
        if has_tokens:
            tokens.append(da.from_delayed(dask.delayed(_read_member)(str(f), "tokens", count, n), (count, n), np.int64))
    if 0 < len(tokens) < len(files):
        lacking = next(f for f, lay in zip(files, layouts) if not lay[6])
        raise RefAttnError(f"{lacking}: no 'tokens', which other files of the dataset have: give every file or none")
    mask = da.concatenate(masks) if any(lay[5] for lay in layouts) else None
    return da.concatenate(maps), mask, da.concatenate(tokens) if tokens else None


def open_maps(path, *, chunk_size=None, max_bytes=npz.MAX_BYTES):
    """Open a dataset of attention maps as Dask arrays, without reading the maps.

    ``path`` is a Zarr store written by :func:`save_maps` (a group of :data:`STORE_KEYS`, or a bare
    array of maps ``(N, L, H, n, n)``), a directory of attention-map ``.npz`` files (each as
    :func:`refattn.io.save_attentions` writes it, ``(L, ..., H, n, n)``: its batch dims are its examples;
    files in name order, one chunk each), or one such file.  Shapes and dtypes are checked from the
    stores' metadata and the files' headers before anything is read; each file is read (under the
    size cap, without pickle) by the task of its chunk.

    Parameters
    ----------
    path : str or os.PathLike
        The Zarr store, the directory of ``.npz`` files, or a ``.npz`` file.
    chunk_size : int, optional
        >= 1: rechunk to this many examples per chunk.  Default None: the store's chunks (one file per
        chunk for ``.npz`` files).
    max_bytes : int, default MAX_BYTES (2 GiB)
        The size cap of each ``.npz`` file (:func:`refattn.io.load_attentions`).

    Returns
    -------
    maps : dask.array.Array of float, shape (N, L, H, n, n)
        The maps, in the store's float dtype (each metric reads them in float64), chunked over ``N``.
    mask : dask.array.Array of bool, shape (N, n), or None
        True = real token (files without a mask: all True); None when no file or store has one.
    tokens : dask.array.Array of int, shape (N, n), or None
        Token ids; None when the store has none.

    Raises
    ------
    RefAttnError
        Naming the path: missing, neither a Zarr store nor ``.npz`` files, maps of different shapes,
        unknown arrays, bad dtypes, a file over ``max_bytes``; without Dask or Zarr, how to install them.
    """
    da, zarr = _modules()
    size = None if chunk_size is None else as_int(chunk_size, "chunk_size", minimum=1)
    max_bytes = as_int(max_bytes, "max_bytes", minimum=1)
    where = Path(os.fspath(path))
    if where.is_dir() and _is_zarr(where):
        maps, mask, tokens = _open_zarr(where, zarr, da)
    elif where.is_dir():
        files = sorted(p for p in where.glob("*.npz") if p.is_file())
        if not files:
            raise RefAttnError(f"{where}: neither a Zarr store nor a directory of .npz attention-map files")
        maps, mask, tokens = _open_files(files, max_bytes, da)
    elif where.is_file():
        maps, mask, tokens = _open_files([where], max_bytes, da)
    else:
        raise RefAttnError(f"{where}: no such file or directory")
    maps = _datasets.examples(maps, str(where))
    if size is not None:
        maps = maps.rechunk({0: size})
    return maps, mask, tokens


def save_maps(path, maps, *, mask=None, tokens=None, chunk_size=None):
    """Write a dataset of maps as a Zarr store (a group: ``attentions``, ``mask``, ``tokens``, attribute ``version``).

    Written chunk by chunk (a Dask array is never held in memory whole); :func:`open_maps` reads it.

    Parameters
    ----------
    path : str or os.PathLike
        The store (a directory), which must not exist yet.
    maps : dask.array.Array or array_like, shape (N, L, H, n, n)
        The maps, rows = queries, stored as float64 (float32 and float16 maps keep their dtype).
    mask : array_like of bool, shape (N, n), optional
        True = real token.  Default None.
    tokens : array_like of int, shape (N, n), optional
        Token ids.  Default None.
    chunk_size : int, optional
        Examples per chunk of the store.  Default None: the chunks of a Dask ``maps``, else 64 examples.

    Returns
    -------
    None

    Raises
    ------
    RefAttnError
        ``path`` exists, maps that are not ``(N, L, H, n, n)`` floats, a mask or tokens not ``(N, n)``.
    """
    da, zarr = _modules()
    where = Path(os.fspath(path))
    if where.exists():
        raise RefAttnError(f"{where}: already exists; save_maps writes a new store")
    if not _datasets.is_dask_array(maps):
        a = np.asarray(maps)
        if a.dtype.kind != "f":
            a = a.astype(np.float64)
        maps = da.from_array(a, chunks=(64,) + a.shape[1:] if a.ndim == 5 else a.shape)
    elif maps.dtype.kind != "f":
        maps = maps.astype(np.float64)
    maps = _datasets.examples(maps, "maps")
    if chunk_size is not None:
        maps = maps.rechunk({0: as_int(chunk_size, "chunk_size", minimum=1)})
    count, n = maps.shape[0], maps.shape[-1]
    extra = {}
    for key, value, kinds in (("mask", mask, "b"), ("tokens", tokens, "iu")):
        if value is None:
            continue
        value = value if _datasets.is_dask_array(value) else np.asarray(value)
        if value.dtype.kind not in kinds:
            what = "bool" if kinds == "b" else "integer"
            raise RefAttnTypeError(f"{key}: expected {what} values, got dtype {value.dtype}")
        if tuple(value.shape) != (count, n):
            raise RefAttnError(f"{key}: expected shape (N, n) = {(count, n)}, got {tuple(value.shape)}")
        value = value if _datasets.is_dask_array(value) else da.from_array(value, chunks=(maps.chunks[0], -1))
        extra[key] = value.rechunk((maps.chunks[0], -1))
    group = zarr.open_group(str(where), mode="w-")
    group.attrs.update({"refattn": "attention maps (N, L, H, n, n)", "version": MAP_VERSION})
    maps.to_zarr(str(where), component="attentions")
    for key, value in extra.items():
        value.to_zarr(str(where), component=key)


def _options_of(fn, options, taken):
    """``options`` checked against ``fn``'s keywords (less ``taken``) before any work."""
    valid = [n for n, p in inspect.signature(fn).parameters.items() if p.kind == p.KEYWORD_ONLY and n not in taken]
    for name in options:
        if name not in valid:
            raise unknown_option(fn.__name__, name, valid)
    return options


def summarize(maps, tokens=None, *, mask=None, check_probabilities=True, client=None):
    """:func:`refattn.metrics.summarize` of a dataset: per layer and head, the means over every example ``summary``.

    Every example is summarised alone, chunk by chunk (one task per chunk), and each entry averaged
    over the examples as the in-memory call averages a batch: the result is that of
    ``refattn.metrics.summarize([maps[:, l] for l in range(L)], tokens, mask=mask)`` — bitwise when
    every call runs the same backend (``specs/datasets.md``).

    Parameters
    ----------
    maps : dask.array.Array, shape (N, L, H, n, n)
        The dataset, chunked over ``N`` (:func:`open_maps`); any real dtype, read in float64.
    tokens : array_like of int or str, shape (n,) or (N, n), optional
        One sequence for every example, or one per example (NumPy or Dask).  Default None: no detector scores.
    mask : array_like of bool, shape (n,) or (N, n), optional
        True = real token (NumPy or Dask).  Default None: every token real.
    check_probabilities : bool, default True
        Refuse (RefAttnError naming the example and layer) maps whose real rows are not probabilities.
    client : dask.distributed.Client, optional
        Where to compute.  Default None: Dask's default scheduler (the local threaded one).

    Returns
    -------
    summary : dict of str to ndarray of float64
        The keys of :func:`refattn.metrics.summarize`, ``(L, H)`` arrays (``diversity`` ``(L,)``).

    Raises
    ------
    RefAttnError
        Maps not ``(N, L, H, n, n)``, a mask or tokens of another shape, maps that are not
        probabilities (``RefAttnTypeError`` for a non-bool mask or float tokens).
    """
    return _datasets.summary(
        _summarize, maps, tokens, mask=mask, check_probabilities=check_probabilities, client=client
    )


def rollout(maps, *, mask=None, client=None, **options):
    """:func:`refattn.rollout` of every example of a dataset, chunk by chunk: ``R (N, n, n)``.

    The in-memory result of ``refattn.rollout([maps[:, l] for l in range(L)], mask=mask, **options)``
    (bitwise when both run the same backend).  The result is gathered in memory: ``rows=`` keeps it
    ``(N, n)`` or ``(N, k, n)``.

    Parameters
    ----------
    maps : dask.array.Array, shape (N, L, H, n, n)
        The dataset, chunked over ``N`` (``(N, L, n, n)`` with ``head_fusion=None``).
    mask : array_like of bool, shape (n,) or (N, n), optional
        True = real token.  Default None: every token real.
    client : dask.distributed.Client, optional
        Where to compute.  Default None: Dask's default scheduler (the local threaded one).
    **options
        The keywords of :func:`refattn.rollout` (``residual``, ``head_fusion``, ``rows``, ``backend``, ...),
        checked by name before any work.

    Returns
    -------
    R : ndarray of float64, shape (N, n, n)
        ``(N, n)`` / ``(N, k, n)`` with ``rows``; ``(L', N, n, n)`` with ``return_all``.

    Raises
    ------
    RefAttnError
        An unknown option, and what :func:`refattn.rollout` raises (naming the chunk's examples).
    """
    return _datasets.rollout(_rollout, maps, mask=mask, client=client, **_options_of(_rollout, options, ("mask",)))


def attention_attribution(maps, *, mask=None, client=None, **options):
    """:func:`refattn.metrics.attention_attribution` of a dataset, chunk by chunk: its dict ``attribution``.

    The in-memory result of ``attention_attribution(maps.swapaxes(0, 1), mask=mask, **options)``: the
    ``(N, T)`` entries of every chunk concatenated, ``batch_size`` ``N`` (bitwise when both run the
    same backend).

    Parameters
    ----------
    maps : dask.array.Array, shape (N, L, H, T, T)
        The dataset, chunked over ``N``.
    mask : array_like of bool, shape (N, T), optional
        True = real token.  Default None: every token real.
    client : dask.distributed.Client, optional
        Where to compute.  Default None: Dask's default scheduler (the local threaded one).
    **options
        The keywords of :func:`refattn.metrics.attention_attribution` (``residual``, ``backend``, ...).

    Returns
    -------
    attribution : dict
        Its :data:`~refattn.metrics.attribution.ATTRIBUTION_KEYS`: ``(N, T)`` float64 arrays and two ints.

    Raises
    ------
    RefAttnError
        An unknown option, and what :func:`refattn.metrics.attention_attribution` raises.
    """
    checked = _options_of(_attention_attribution, options, ("mask",))
    return _datasets.attribution(_attention_attribution, maps, mask=mask, client=client, **checked)


def per_map(metric, maps, *, mask=None, client=None, **options):
    """A metric of one map on every map of a dataset, chunk by chunk: ``values (N, L, ...)``.

    ``metric`` is any function of maps ``(..., H, n, n)`` of :mod:`refattn.metrics` — the per-head
    statistics (``head_confidence`` → ``(N, L, H)``, ``entropy`` → ``(N, L, H, n)``, ``diagonal_strength``,
    ...) — called on each chunk ``(N_c, L, H, n, n)`` with the examples' key-padding mask
    ``(N_c, L, n)``: bitwise its in-memory result on the whole array (for the same backend).

    Parameters
    ----------
    metric : callable
        ``metric(P, *, mask=None, **options)``.
    maps : dask.array.Array, shape (N, L, H, n, n)
        The dataset, chunked over ``N``.
    mask : array_like of bool, shape (n,) or (N, n), optional
        True = real token, passed to ``metric`` only when given.  Default None.
    client : dask.distributed.Client, optional
        Where to compute.  Default None: Dask's default scheduler (the local threaded one).
    **options
        ``metric``'s keywords (``check_probabilities``, ``normalize``, ...).

    Returns
    -------
    values : ndarray of float64, shape (N, L, ...)
        ``metric``'s result, examples first.

    Raises
    ------
    RefAttnError
        ``metric`` not callable, and what ``metric`` raises (naming the chunk's examples).
    """
    if not callable(metric):
        raise RefAttnTypeError(f"metric: expected a metric function such as refattn.metrics.entropy, got {metric!r}")
    return _datasets.per_map(metric, maps, mask=mask, client=client, **options)


@contextlib.contextmanager
def local_cluster(workers):
    """A ``dask.distributed`` cluster on this machine, for ``client=``: ``workers`` processes of one thread.

    Loopback only (``127.0.0.1``), no dashboard; closed when the ``with`` block ends.

    Parameters
    ----------
    workers : int
        Worker processes, >= 1.

    Returns
    -------
    contextlib.AbstractContextManager
        Yields the ``dask.distributed.Client``.

    Raises
    ------
    RefAttnError
        ``workers`` < 1; without ``distributed``, how to install it.
    """
    workers = as_int(workers, "workers", minimum=1)
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise RefAttnError(f"a cluster of workers needs dask.distributed ({exc}): {_INSTALL}") from exc
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.CRITICAL,  # its shutdown races log tracebacks that are no error of the user's
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
