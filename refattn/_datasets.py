"""The chunked evaluation behind a Dask array of maps: one task per chunk of examples (``specs/datasets.md``).

A dataset is a Dask array ``(N, L, H, n, n)``: ``N`` examples, each the maps of ``L`` layers, ``H``
heads, ``n`` tokens (``(N, L, n, n)`` for maps already fused over heads), chunked over ``N`` only.
:func:`refattn.metrics.summarize`, :func:`refattn.rollout`,
:func:`refattn.metrics.attention_attribution` and :func:`refattn.datasets.per_map` hand such an array
here, passing themselves as ``fn``: each chunk is read by one task that calls ``fn`` on it (on each of
its examples for the summary), so this module imports none of them (no import cycle) and Dask is
imported only here, only when a Dask array arrives.  The results are gathered in example order:
per-example results are concatenated, the summary's per-example values averaged as the in-memory
call averages them (so the result is bitwise the in-memory one when every call runs the same backend).
"""

from __future__ import annotations

import sys

import numpy as np

from refattn._validate import RefAttnError, RefAttnTypeError, as_flag

__all__ = ["attribution", "is_dask_array", "per_map", "rollout", "summary"]

_INSTALL = "pip install 'refattn[dask]'"


def is_dask_array(x):
    """Whether ``x`` is a Dask array (without importing Dask: an array of it implies it was imported)."""
    array = sys.modules.get("dask.array")
    return array is not None and isinstance(x, array.Array)


def dask_modules():
    """``(dask, dask.array)``, or a RefAttnError saying how to install them."""
    try:
        import dask
        import dask.array as da
    except ImportError as exc:  # pragma: no cover - an array of it cannot exist without it
        raise RefAttnError(f"datasets of maps need Dask ({exc}): {_INSTALL}") from exc
    return dask, da


def examples(maps, name="attentions", *, fused=False):
    """``maps`` checked — a Dask array ``(N, L, H, n, n)`` (``(N, L, n, n)`` with ``fused``) of real
    numbers with known chunk sizes, at least one example and layer — and chunked over ``N`` only
    (rechunked to whole examples otherwise)."""
    want = "(N, L, n, n)" if fused else "(N, L, H, n, n)"
    if not is_dask_array(maps):
        raise RefAttnTypeError(f"{name}: expected a Dask array {want}, got {type(maps).__name__}")
    if maps.ndim != (4 if fused else 5) or maps.shape[-1] != maps.shape[-2]:
        raise RefAttnError(f"{name}: expected a dataset of square maps {want} (chunked over N), got shape {maps.shape}")
    if any(np.isnan(c) for c in maps.chunks[0]):
        raise RefAttnError(f"{name}: expected known chunk sizes, got unknown ones: call compute_chunk_sizes() first")
    if maps.dtype == bool or maps.dtype.kind not in "iufV":
        raise RefAttnTypeError(f"{name}: expected real numbers (int or float dtype), got dtype {maps.dtype}")
    if maps.shape[0] == 0 or maps.shape[1] == 0:
        raise RefAttnError(f"{name}: expected at least one example and one layer, got shape {maps.shape}")
    if any(len(c) > 1 for c in maps.chunks[1:]):
        maps = maps.rechunk({axis: -1 for axis in range(1, maps.ndim)})  # whole examples per chunk
    return maps


def _pieces(x, maps, name, *, kind):
    """``mask`` or ``tokens`` per chunk of ``maps``: None, or one ``(N_c, n)`` piece (NumPy or delayed) per chunk.

    ``x``: None, ``(n,)`` shared by every example, or ``(N, n)`` (NumPy or Dask); ``kind`` ``"mask"``
    (bool) or ``"tokens"`` (ids or strings, not floats).
    """
    if x is None:
        return None
    n, count = maps.shape[-1], maps.shape[0]
    dtype = x.dtype if is_dask_array(x) else np.asarray(x).dtype
    if kind == "mask" and dtype.kind != "b":
        raise RefAttnTypeError(f"{name}: expected a bool array (True = real token), got dtype {dtype}")
    if kind == "tokens" and dtype.kind not in "iuUSO":
        raise RefAttnTypeError(f"{name}: expected integer ids or strings, got dtype {dtype}")
    shape = tuple(x.shape)
    if shape not in ((n,), (count, n)):
        raise RefAttnError(f"{name}: expected shape (n,) = ({n},) or (N, n) = ({count}, {n}), got {shape}")
    starts = np.cumsum((0,) + maps.chunks[0])
    if is_dask_array(x):
        if len(shape) == 1:
            x = x.compute()
        else:
            return list(x.rechunk((maps.chunks[0], -1)).to_delayed().ravel())
    x = np.asarray(x)
    if len(shape) == 1:
        return [np.broadcast_to(x, (int(b - a), n)) for a, b in zip(starts[:-1], starts[1:])]
    return [x[a:b] for a, b in zip(starts[:-1], starts[1:])]


def _blocks(maps):
    """``(start, delayed block)`` per chunk of examples."""
    starts = np.cumsum((0,) + maps.chunks[0])[:-1]
    return list(zip((int(s) for s in starts), maps.to_delayed().ravel()))


def _located(exc, where):
    """``exc`` again, its message prefixed with the examples it came from."""
    return type(exc)(f"{where}: {exc}")


def _chunk_name(start, block):
    return f"examples {start}-{start + block.shape[0] - 1} (a chunk; batch indices below are within it)"


def compute(tasks, client):
    """The values of ``tasks``: on ``client`` when given, else on Dask's default scheduler (the local
    threaded one unless the user configured another)."""
    dask, _ = dask_modules()
    if client is None:
        return list(dask.compute(*tasks))
    if not (callable(getattr(client, "compute", None)) and callable(getattr(client, "gather", None))):
        raise RefAttnTypeError(f"client: expected a dask.distributed.Client, got {type(client).__name__}")
    return list(client.gather(client.compute(tasks)))


def _summary_block(fn, block, tokens, mask, start, check):
    """The per-example values of one chunk: ``fn`` (summarize) on each example alone, stacked
    ``{key: (N_c, L, ...)}`` (the mean over one example is its value, exactly)."""
    values = {}
    for i in range(block.shape[0]):
        try:
            one = fn(
                list(block[i]),
                None if tokens is None else tokens[i],
                mask=None if mask is None else mask[i],
                check_probabilities=check,
            )
        except RefAttnError as exc:
            raise _located(exc, f"example {start + i}") from exc
        for key, value in one.items():
            values.setdefault(key, []).append(value)
    return {key: np.stack(v) for key, v in values.items()}


def summary(fn, maps, tokens=None, *, mask=None, check_probabilities=True, client=None):
    """:func:`refattn.metrics.summarize` (``fn``) of a dataset: every example summarised alone, chunk by
    chunk, then each entry averaged over the examples as ``fn`` averages a batch (a contiguous
    ``(N, ...)`` array per layer, ``mean(axis=0)``)."""
    dask, _ = dask_modules()
    maps = examples(maps)
    check = as_flag(check_probabilities, "check_probabilities")
    if isinstance(tokens, (list, tuple)):
        tokens = np.asarray(tokens)
    tokens = _pieces(tokens, maps, "tokens", kind="tokens")
    mask = _pieces(mask, maps, "mask", kind="mask")
    tasks = [
        dask.delayed(_summary_block, pure=True)(
            fn, block, None if tokens is None else tokens[c], None if mask is None else mask[c], start, check
        )
        for c, (start, block) in enumerate(_blocks(maps))
    ]
    parts = compute(tasks, client)
    out = {}
    for key in parts[0]:
        values = np.concatenate([p[key] for p in parts])  # (N, L, ...) per-example values
        out[key] = np.stack([np.ascontiguousarray(values[:, layer]).mean(axis=0) for layer in range(values.shape[1])])
    return out


def _layers_call(fn, block, mask, start, options, as_list):
    """``fn`` on one chunk, its layers first: a list of ``(N_c, ...)`` layers, or the ``(L, N_c, ...)`` view."""
    layers = np.swapaxes(block, 0, 1)
    try:
        return fn(list(layers) if as_list else layers, **({} if mask is None else {"mask": mask}), **options)
    except RefAttnError as exc:
        raise _located(exc, _chunk_name(start, block)) from exc


def _chunked(fn, maps, mask, client, options, *, as_list=True, fused=False, call=_layers_call):
    """One task per chunk, ``call(fn, block, mask piece, start, options, as_list)``: their values, the checked maps."""
    dask, _ = dask_modules()
    maps = examples(maps, fused=fused)
    mask = _pieces(mask, maps, "mask", kind="mask")
    tasks = [
        dask.delayed(call, pure=True)(fn, block, None if mask is None else mask[c], start, options, as_list)
        for c, (start, block) in enumerate(_blocks(maps))
    ]
    return compute(tasks, client), maps


def rollout(fn, maps, *, mask=None, client=None, **options):
    """:func:`refattn.rollout` (``fn``) of a dataset, chunk by chunk: ``R (N, n, n)`` (``(N, n)`` or
    ``(N, k, n)`` with ``rows``, ``(L', N, n, n)`` with ``return_all``), bitwise the in-memory result
    when both run the same backend."""
    parts, _ = _chunked(fn, maps, mask, client, options, fused=options.get("head_fusion", "mean") is None)
    return np.concatenate(parts, axis=1 if options.get("return_all") else 0)


def attribution(fn, maps, *, mask=None, client=None, **options):
    """:func:`refattn.metrics.attention_attribution` (``fn``) of a dataset, chunk by chunk: its dict, the
    ``(N, T)`` entries concatenated over the chunks, ``batch_size`` = ``N``."""
    parts, maps = _chunked(fn, maps, mask, client, options, as_list=False)
    out = {}
    for key, value in parts[0].items():
        out[key] = np.concatenate([p[key] for p in parts]) if isinstance(value, np.ndarray) else value
    out["batch_size"] = int(maps.shape[0])
    return out


def _metric_call(fn, block, mask, start, options, as_list):
    """``fn`` (a metric of maps ``(..., H, n, n)``) on one chunk ``(N_c, L, H, n, n)``, the mask per example
    ``(N_c, n)`` broadcast to every layer ``(N_c, L, n)``."""
    extra = {} if mask is None else {"mask": np.broadcast_to(mask[:, None, :], block.shape[:2] + mask.shape[-1:])}
    try:
        return fn(block, **extra, **options)
    except RefAttnError as exc:
        raise _located(exc, _chunk_name(start, block)) from exc


def per_map(fn, maps, *, mask=None, client=None, **options):
    """A metric of one map (``fn``, e.g. :func:`refattn.metrics.head_confidence`) on every map of a dataset,
    chunk by chunk: its per-map result for every example and layer, ``(N, L, ...)``."""
    parts, _ = _chunked(fn, maps, mask, client, options, call=_metric_call)
    return np.concatenate(parts)
