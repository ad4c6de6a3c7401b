"""KV-cache decoding and paged KV gathering.

* ``decode(q (B, Hq, Lq, D), k_cache (B, Hk, Lc, D), v_cache (B, Hk, Lc, Dv), *, cache_lengths (B,))``:
  the new queries (the last ``Lq`` tokens of each sequence, already appended to the cache)
  attend to the first ``cache_lengths[b]`` cached keys; ``causal``/``window`` are aligned
  bottom-right to that valid length (query i sits at position ``cache_lengths[b] − Lq + i``).
* ``paged_gather(pages (P, Hk, page_size, D), block_table (B, max_pages), lengths (B,))``:
  dense ``(B, Hk, max_pages·page_size, D)`` keys (zero beyond each length) and a validity
  mask ``(B, max_pages·page_size)``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refattn import masks as _masks
from refattn._validate import RefAttnError, as_bool, as_cotangent, as_flag, as_float
from refattn.attention import sdpa as _sdpa

__all__ = ["DecodeGrads", "PagedGatherGrads", "decode", "decode_backward", "paged_gather", "paged_gather_backward"]


_NAMES = ("q", "k_cache", "v_cache")


class DecodeGrads(NamedTuple):
    dq: np.ndarray
    dk_cache: np.ndarray
    dv_cache: np.ndarray
    dbias: np.ndarray | None
    dsinks: np.ndarray | None


class PagedGatherGrads(NamedTuple):
    dpages: np.ndarray


def _int_array(x, name, ndim):
    a = np.asarray(x)
    if a.ndim != ndim or a.dtype.kind not in "iu":
        raise RefAttnError(f"{name}: expected a {ndim}-D integer array, got dtype {a.dtype} shape {a.shape}")
    return a.astype(np.int64)


def cache_band(lq, length, causal, window):
    """Causal/window mask ``(lq, length)`` of the new queries over a cache of ``length`` keys (bottom-right)."""
    return _masks.structural(lq, length, causal=causal, window=window, align="bottom_right")


def _decode_options(q, k_cache, cache_lengths, options):
    if "align" in options:
        raise RefAttnError("align: decode is always aligned bottom-right to each cache length; do not pass align")
    q = np.shape(q)
    kc = np.shape(k_cache)
    for name, shape in (("q", q), ("k_cache", kc)):
        if len(shape) != 4:
            raise RefAttnError(f"{name}: expected a (B, H, L, D) array, got shape {shape}")
    lens = _int_array(cache_lengths, "cache_lengths", 1)
    b, lq, lc = kc[0], q[2], kc[2]
    if lens.shape != (b,) or lens.min(initial=lq) < lq or lens.max(initial=0) > lc:
        raise RefAttnError(
            f"cache_lengths: expected {b} lengths in [Lq={lq}, Lc={lc}] (the new tokens are in the cache), "
            f"got {lens.tolist()}"
        )
    causal = options.pop("causal", False)
    window = options.pop("window", None)
    valid = np.arange(lc)[None, None, :] < lens[:, None, None]  # (B, 1, Lc)
    keep = np.broadcast_to(valid, (b, lq, lc)).copy()
    if causal or window is not None:
        for i in range(b):
            band = cache_band(lq, int(lens[i]), causal, window)
            keep[i, :, : lens[i]] &= band
    mask = keep[:, None]  # (B, 1, Lq, Lc)
    if options.get("mask") is not None:
        mask = mask & as_bool(options["mask"], "mask")
    return {**options, "mask": mask}


def decode(q, k_cache, v_cache, *, cache_lengths, return_lse=False, **options):
    """Attention of new queries over a KV cache; ``out (B, Hq, Lq, Dv)`` [, ``lse``]."""
    opts = _decode_options(q, k_cache, cache_lengths, dict(options))
    return _sdpa.run_forward(
        _sdpa.validate(q, k_cache, v_cache, names=_NAMES, **opts), as_flag(return_lse, "return_lse")
    )


def decode_backward(d_out, q, k_cache, v_cache, *, cache_lengths, d_lse=None, **options):
    """Gradients of :func:`decode` → :class:`DecodeGrads` (zero for cache entries past each length)."""
    opts = _decode_options(q, k_cache, cache_lengths, dict(options))
    return DecodeGrads(*_sdpa.run_backward(_sdpa.validate(q, k_cache, v_cache, names=_NAMES, **opts), d_out, d_lse))


def _paged_setup(pages, block_table, lengths):
    pages = as_float(pages, "pages", ndim_min=4)
    if pages.ndim != 4:
        raise RefAttnError(f"pages: expected (num_pages, Hk, page_size, D), got shape {pages.shape}")
    table = _int_array(block_table, "block_table", 2)
    lens = _int_array(lengths, "lengths", 1)
    n_pages, _, page, _ = pages.shape
    if lens.shape != table.shape[:1]:
        raise RefAttnError(f"lengths: expected shape {table.shape[:1]} (one per block_table row), got {lens.shape}")
    if lens.min(initial=0) < 0 or lens.max(initial=0) > table.shape[1] * page:
        raise RefAttnError(f"lengths: expected values in [0, {table.shape[1] * page}], got {lens.tolist()}")
    slot = np.arange(table.shape[1] * page)  # (S,)
    valid = slot[None, :] < lens[:, None]  # (B, S)
    page_of = table[:, slot // page]  # (B, S)
    used = page_of[valid]
    if used.size and (used.min() < 0 or used.max() >= n_pages):
        raise RefAttnError(f"block_table: expected page ids in [0, {n_pages}) for every used slot, got {used.tolist()}")
    return pages, np.where(valid, page_of, 0), slot % page, valid


def paged_gather(pages, block_table, lengths):
    """Paged KV → ``(dense (B, Hk, S, D), valid (B, S))`` with ``S = max_pages · page_size``."""
    pages, page_of, offset, valid = _paged_setup(pages, block_table, lengths)
    dense = pages[page_of, :, offset[None, :], :]  # (B, S, Hk, D)
    dense = np.where(valid[:, :, None, None], dense, 0.0)
    return np.moveaxis(dense, 1, 2), valid


def paged_gather_backward(d_dense, pages, block_table, lengths):
    """Gradient of :func:`paged_gather` w.r.t. ``pages``: scatter-add of the valid slots."""
    pages, page_of, offset, valid = _paged_setup(pages, block_table, lengths)
    b, s = valid.shape
    dd = as_cotangent(d_dense, (b, pages.shape[1], s, pages.shape[3]), "d_dense")
    dpages = np.zeros(pages.shape)
    bi, si = np.nonzero(valid)
    np.add.at(dpages, (page_of[bi, si], slice(None), offset[si]), dd[bi, :, si, :])
    return PagedGatherGrads(dpages)
