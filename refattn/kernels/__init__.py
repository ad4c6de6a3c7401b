"""Numba kernels for the hot core, selected with ``backend="auto" | "numpy" | "numba"``.

Each kernel has a NumPy twin that defines the math (``specs/kernels.md``); results agree to
≤ 1e-12 relative and are bitwise identical for any number of threads.  Nothing here imports
numba or compiles until a kernel is first used; compiled code is cached on disk, and the first
compile of each kernel family announces itself with one line on stderr (``set_quiet``).

This module is the kernels' Python side: the backend choice (:func:`resolve_backend`, the NumPy
path's memory limit :func:`numpy_max_bytes`), the flattening of validated arguments to the kernels'
layout, and the compile on first use.  The kernels themselves live in
:mod:`refattn.kernels.sdpa_kernels` (attention), :mod:`refattn.kernels.rollout_kernels`,
:mod:`refattn.kernels.metric_kernels` and :mod:`refattn.kernels.flow_kernels`; their named scalars in
:mod:`refattn.kernels.geometry`.  Callers are the ops' ``backend=`` switches (``refattn.sdpa``,
``refattn.rollout``, the metrics of ``refattn.metrics.summarize`` and ``summarize``,
``refattn.attention_flow``); the functions here take arguments those ops have already validated.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import os
import re
import sys
import threading
import time
import warnings

import numpy as np

from refattn._validate import RefAttnError, as_choice, unbroadcast
from refattn.kernels.geometry import Geometry, Scaling, numba_type

__all__ = [
    "BACKENDS",
    "AUTO_MIN_SCORES",
    "NUMPY_MAX_BYTES",
    "FLOW_EPS",
    "key_ranges",
    "layered_max_flows",
    "numba_available",
    "numpy_max_bytes",
    "resolve_backend",
    "rollout_fuse_mean",
    "rollout_rows_product",
    "set_quiet",
]

#: The values of every op's ``backend=`` argument.
BACKENDS = ("auto", "numpy", "numba")
#: ``backend="auto"`` takes the kernel from this many scores on (``N·Hq·Lq·Lk``; ``2**18``), when
#: numba is installed; smaller problems are faster in NumPy and never pay a compile.
AUTO_MIN_SCORES = 1 << 18
#: The NumPy path's limit on its score-sized float64 intermediates, in bytes: a number or text such
#: as ``"16GiB"``, ``"8e9"``, ``"inf"`` (no limit), set by assignment.  None (the default): the
#: environment variable ``REFATTN_NUMPY_MAX_BYTES``, else 8 GiB (:func:`numpy_max_bytes`).
NUMPY_MAX_BYTES = None
DEFAULT_NUMPY_MAX_BYTES = 8 << 30
_compiled = {}  # kernel name -> its dispatcher, compiled for its signatures
_families = {}  # kernel module -> {kernel name: dispatcher}, every kernel of it compiled
_compile_lock = threading.Lock()


def numba_available():
    """Whether numba is installed (found on the import path; it is not imported here).

    Returns
    -------
    bool
        True when ``backend="numba"`` can run and ``"auto"`` may pick the kernels.
    """
    return importlib.util.find_spec("numba") is not None


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_BYTES = re.compile(r"\s*([0-9.]+(?:e[+-]?[0-9]+)?|inf)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)


def _parse_bytes(value, name):
    """A number of bytes > 0 from ``value``: a number, or text such as ``"8589934592"``, ``"8e9"``,
    ``"16GiB"``, ``"512M"``, ``"inf"`` (no limit)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        nbytes = float(value)
    else:
        match = _BYTES.fullmatch(str(value))
        try:
            nbytes = float(match[1]) * _UNITS[match[2].lower()]
        except (TypeError, ValueError):  # no match, or "1.2.3"
            nbytes = math.nan
    if not nbytes > 0:
        raise RefAttnError(
            f"{name}: expected a number of bytes > 0 (e.g. 8589934592, 8e9, 16GiB, 512MiB or inf), got {value!r}"
        )
    return nbytes


def numpy_max_bytes():
    """The most bytes the NumPy path may allocate for its score-sized float64 intermediates.

    Read at every call, in this order: the module setting :data:`NUMPY_MAX_BYTES` when not None,
    else the environment variable ``REFATTN_NUMPY_MAX_BYTES`` (when set and not blank), else 8 GiB.
    Either setting is a number of bytes > 0 or text such as ``"8589934592"``, ``"8e9"``, ``"16GiB"``,
    ``"512M"`` (units k, M, G, T are powers of 1024, an optional ``B`` / ``iB`` suffix, any case) or
    ``"inf"``.

    Returns
    -------
    float
        The limit in bytes; ``inf``: no limit.

    Raises
    ------
    RefAttnError
        When the setting in use is not a number of bytes > 0 (the message names which setting).
    """
    if NUMPY_MAX_BYTES is not None:
        return _parse_bytes(NUMPY_MAX_BYTES, "refattn.kernels.NUMPY_MAX_BYTES")
    env = os.environ.get("REFATTN_NUMPY_MAX_BYTES", "").strip()
    return _parse_bytes(env, "REFATTN_NUMPY_MAX_BYTES") if env else float(DEFAULT_NUMPY_MAX_BYTES)


def _gib(nbytes):
    return f"{nbytes / 2**30:,.1f} GiB" if nbytes >= 2**30 / 10 else f"{nbytes / 2**20:,.1f} MiB"


def resolve_backend(backend, score_count, numpy_bytes=None, *, what="the NumPy path", shape=None):
    """The backend that runs a call: ``"numpy"`` or ``"numba"`` (``specs/kernels.md``, Backend choice).

    * ``"numba"``: the kernels, whatever the size (no memory check: they need O(N·D) memory);
    * ``"numpy"``: the NumPy definition, unless it would need more than :func:`numpy_max_bytes`;
    * ``"auto"``: the kernels when numba is installed and either ``score_count >=``
      :data:`AUTO_MIN_SCORES` or the NumPy path is over the limit; NumPy otherwise.

    Parameters
    ----------
    backend : {"auto", "numpy", "numba"}
        The caller's ``backend=`` argument (:data:`BACKENDS`).
    score_count : int
        The number of scores of the call, ``N·Hq·Lq·Lk`` (for rollout and the metrics: the entries of
        the maps); compared with :data:`AUTO_MIN_SCORES`.
    numpy_bytes : float, optional
        Bytes the NumPy path would allocate for its score-sized intermediates.  Default None: the
        memory limit is not checked (rollout and the metrics pass none).
    what : str, default "the NumPy path"
        What the NumPy path is, for the error message (e.g. ``"the NumPy path of sdpa"``).
    shape : tuple of int, optional
        The score shape ``(..., Hq, Lq, Lk)``, named in the error message.  Default None: not named.

    Returns
    -------
    str
        ``"numpy"`` or ``"numba"``.

    Raises
    ------
    RefAttnError
        ``backend`` not one of :data:`BACKENDS`; ``"numba"`` without numba installed; a NumPy path
        (``"numpy"``, or ``"auto"`` without numba) over the memory limit: the message names the size,
        the limit and ``backend="numba"``.
    """
    as_choice(backend, "backend", BACKENDS)
    if backend == "numba":
        if not numba_available():
            raise RefAttnError("backend: 'numba' was asked for but numba is not installed (pip install numba)")
        return "numba"
    limit = None if numpy_bytes is None else numpy_max_bytes()
    too_big = limit is not None and numpy_bytes > limit
    if backend == "auto" and (score_count >= AUTO_MIN_SCORES or too_big) and numba_available():
        return "numba"
    if too_big:
        text = numpy_too_big_message("backend", what, numpy_bytes, limit, shape)
        if backend == "auto":  # auto stays on numpy only without numba
            raise RefAttnError(text + '; backend="numba" (O(N·D) memory) would do it: pip install numba')
        hint = "" if numba_available() else " (pip install numba)"
        raise RefAttnError(text + f'; use backend="numba" (O(N·D) memory){hint}')
    return "numpy"


def numpy_too_big_message(name, what, numpy_bytes, limit, shape=None):
    """The start of the message of a NumPy path refused for its size; the caller adds what to do instead.

    ``"{name}: {what} needs … GiB for its score-sized float64 intermediates (scores (…)), over the
    limit of … GiB (REFATTN_NUMPY_MAX_BYTES or refattn.kernels.NUMPY_MAX_BYTES raise it)"``, sizes
    in GiB (in MiB below 0.1 GiB).

    Parameters
    ----------
    name : str
        The argument(s) the message is about, e.g. ``"q, k"`` or ``"backend"``.
    what : str
        The refused computation, e.g. ``"the NumPy path of sdpa"``.
    numpy_bytes : float
        The bytes it would need.
    limit : float
        The limit it exceeds (:func:`numpy_max_bytes`).
    shape : tuple of int, optional
        The score shape, named in the message.  Default None: not named.

    Returns
    -------
    str
        The message, without a final period.
    """
    scores = "" if shape is None else f" (scores {tuple(shape)})"
    return (
        f"{name}: {what} needs {_gib(numpy_bytes)} for its score-sized float64 intermediates{scores}, over the "
        f"limit of {_gib(limit)} (REFATTN_NUMPY_MAX_BYTES or refattn.kernels.NUMPY_MAX_BYTES raise it)"
    )


def _sdpa_signatures(t):
    """``{kernel: [{parameter: numba type}]}`` of the attention kernels: one signature each, by name
    (``_compile`` orders it by the kernel's own parameter list and refuses a mismatch)."""
    f8, b1, i8 = t.float64, t.boolean, t.int64
    in4 = t.Array(f8, 4, "C", readonly=True)  # inputs: contiguous, read only
    in3 = t.Array(f8, 3, "C", readonly=True)
    out4 = t.Array(f8, 4, "C")  # outputs
    out3 = t.Array(f8, 3, "C")
    idx2, idx1 = t.Array(i8, 2, "C"), t.Array(i8, 1, "C")
    common = {
        "q": in4,
        "k": in4,
        "v": in4,
        "bias": t.Array(f8, 4, "A", readonly=True),  # per-score views, any strides (broadcast)
        "mask": t.Array(b1, 4, "A", readonly=True),
        "keep": t.Array(f8, 4, "A", readonly=True),
        "maps": idx2,  # (3, N): the bias, mask, keep batch element of each score batch element
        "seq": idx2,  # (N, 4): q_length, k_start, k_length, offset of each sequence
        "geometry": numba_type(Geometry, t),
        "scaling": numba_type(Scaling, t),
        "ranges": t.Array(i8, 3, "C"),  # (N, query blocks, 2): key range per query block of each sequence
    }
    backward = {
        **common,
        "pairs": idx2,  # (n, head) pairs of the task groups
        "starts": idx1,  # group starts
        "lse": in3,
        "d_o": in4,
        "delta": in3,
        "dl": in3,
        "dbias": t.Array(f8, 5, "C"),
        "want_dbias": b1,
    }
    return {
        "forward": [{**common, "sink": t.Array(f8, 2, "A", readonly=True), "out": out4, "lse": out3}],
        "backward_dq": [{**backward, "dq": out4}],
        "backward_dkv": [{**backward, "dk": out4, "dv": out4}],
    }


def _parameters(kernel):
    """The parameter names of a numba dispatcher's Python function, in order."""
    return tuple(inspect.signature(kernel.py_func).parameters)


def _ordered(name, kernel, sig):
    """The argument types of signature ``sig`` (``{parameter: type}``) in ``kernel``'s parameter order;
    RuntimeError when the names differ (a kernel changed without its signature, or the reverse)."""
    params = _parameters(kernel)
    if set(params) != set(sig):
        missing, extra = sorted(set(params) - set(sig)), sorted(set(sig) - set(params))
        raise RuntimeError(f"kernel {name}: signature does not match its parameters (missing {missing}, extra {extra})")
    return tuple(sig[p] for p in params)


def _kernels():
    """The attention kernels, each compiled for its one signature (first call only)."""
    import scipy.linalg.cython_blas  # noqa: F401  the BLAS numba's np.dot calls: loaded before any limit

    with warnings.catch_warnings():  # numba's performance notes on BLAS operands: known
        warnings.simplefilter("ignore")
        return _compile("sdpa_kernels", _sdpa_signatures)


# Each kernel module is a family compiled together on first use: what the first-compile line calls it
# and how long its compile takes (2-core machine, idle / loaded: 17.7 / 42 s, 6.3 / 9.6 s, 1.2 s; flow: 17 s loaded).
_FAMILY_NOTES = {
    "sdpa_kernels": ("the attention kernels", "~20-40 s"),
    "rollout_kernels": ("the rollout kernels", "~6-10 s"),
    "metric_kernels": ("the metric kernels", "~10-30 s"),
    "flow_kernels": ("the attention-flow kernel", "~10-20 s"),
}
_quiet = None  # set_quiet: True / False override $REFATTN_QUIET; None follows it


def set_quiet(quiet=True):
    """Silence or restore the line on stderr that announces a kernel family's first compile.

    Parameters
    ----------
    quiet : bool or None, default True
        ``True``: silent; ``False``: the line is printed (overriding the environment); ``None``:
        follow the environment variable ``REFATTN_QUIET`` again (set and not ``0``: silent).  Any
        other value is taken as a bool.

    Returns
    -------
    bool or None
        The previous setting (None: it followed ``REFATTN_QUIET``), to restore it with.
    """
    global _quiet
    previous = _quiet
    _quiet = None if quiet is None else bool(quiet)
    return previous


def _is_quiet():
    if _quiet is not None:
        return _quiet
    return os.environ.get("REFATTN_QUIET", "").strip() not in ("", "0")


def _cached(kernel, sigs):
    """Whether numba's on-disk cache holds ``kernel`` for every signature in ``sigs`` (its index entry
    for this source, machine and numba version, and the data file it names); None when numba's cache
    cannot be asked (its internals moved)."""
    try:
        cache = kernel._cache
        index = cache._cache_file._load_index()
        codegen = kernel.targetctx.codegen()
        for sig in sigs:
            data = index.get(cache._index_key(sig, codegen))
            if data is None or not os.path.exists(os.path.join(cache.cache_path, data)):
                return False
        return True
    except Exception:  # private numba API: any failure means "unknown"
        return None


def _cache_dir(kernel, kern):
    """Where numba caches ``kernel``: its own answer, else ``$NUMBA_CACHE_DIR`` or the module's
    ``__pycache__``."""
    try:
        return kernel._cache.cache_path
    except AttributeError:
        return os.environ.get("NUMBA_CACHE_DIR") or os.path.join(os.path.dirname(kern.__file__), "__pycache__")


def _say(line):
    """One line on stderr; on a terminal it first clears the line (a progress bar drawn with ``\\r``)."""
    stream = sys.stderr
    if stream is None:
        return
    try:
        isatty = getattr(stream, "isatty", None)
        prefix = "\r\x1b[K" if isatty is not None and isatty() else ""
        stream.write(f"{prefix}{line}\n")
        stream.flush()
    except (OSError, ValueError, AttributeError):  # a closed or odd stderr must not break the computation
        pass


def _compile(module, signatures):
    """The kernels of ``refattn.kernels.<module>`` compiled for their explicit signatures (first call
    only, then cached on disk); ``signatures``: a callable ``types -> {kernel name: [signature, ...]}``,
    each signature a ``{parameter name: numba type}`` (ordered here by the kernel's parameters).

    Before compiling a family that numba's cache does not hold, one line on stderr says so (once per
    family per process; ``set_quiet``, ``$REFATTN_QUIET``); should the cache serve it after all (the
    check could not tell), a second line says it was loaded."""
    kernels = _families.get(module)
    if kernels is not None:
        return kernels
    with _compile_lock:
        if module in _families:
            return _families[module]
        from numba import types

        kern = importlib.import_module(f"refattn.kernels.{module}")
        todo = {}  # kernel name -> (dispatcher, signatures)
        for name, sigs in signatures(types).items():
            if name not in _compiled:
                kernel = getattr(kern, name)
                todo[name] = (kernel, [types.void(*_ordered(name, kernel, sig)) for sig in sigs])
        announced = False
        if todo and not _is_quiet():
            cached = [_cached(kernel, sigs) for kernel, sigs in todo.values()]
            if not all(cached):  # False (a miss) or None (unknown)
                what, expect = _FAMILY_NOTES.get(module, (f"the {module} kernels", "a few seconds"))
                kernel = next(iter(todo.values()))[0]
                _say(f"refattn: compiling {what} (once, {expect}; cached in {_cache_dir(kernel, kern)})")
                announced = True
        start = time.perf_counter()
        for name, (kernel, sigs) in todo.items():  # compiled once per process, then looked up
            for sig in sigs:
                kernel.compile(sig)
            kernel.disable_compile()
            _compiled[name] = kernel
        if announced and _all_loaded(todo):
            what = _FAMILY_NOTES.get(module, (f"the {module} kernels",))[0]
            _say(f"refattn: {what}: loaded from the cache after all ({time.perf_counter() - start:.1f} s)")
        kernels = {name: _compiled[name] for name in signatures(types)}
        _families[module] = kernels
        return kernels


def _all_loaded(todo):
    """Whether every signature in ``todo`` came from numba's cache (the dispatchers' own counters)."""
    try:
        return all(kernel.stats.cache_hits.get(sig, 0) for kernel, sigs in todo.values() for sig in sigs)
    except AttributeError:
        return False


def _rollout_signatures(t):
    maps = [t.Array(f, 4, layout, readonly=True) for f in (t.float32, t.float64) for layout in ("C", "A")]
    bad = t.Array(t.boolean, 1, "C")  # contiguous maps vectorise; any strides (views) as the fallback
    flags = {"residual": t.float64, "renormalize": t.boolean, "bad": bad}
    return {
        "fuse_mean": [{"a": m, **flags, "out": t.Array(t.float64, 3, "C")} for m in maps],
        "fuse_mean_rows": [
            {
                "a": m,
                **flags,
                "v": t.Array(t.float64, 3, "C", readonly=True),
                "partial": t.Array(t.float64, 4, "C"),
            }
            for m in maps
        ],
    }


def _metric_signatures(t):
    """The metric kernel's two signatures (float32 / float64 maps), by parameter name."""
    from refattn.kernels.metric_kernels import Wanted

    i8, b1, f8 = t.int64, t.boolean, t.float64
    common = {
        "keys": t.Array(b1, 4, "C", readonly=True),
        "key_map": t.Array(i8, 1, "C", readonly=True),
        "rows": t.Array(b1, 3, "C", readonly=True),
        "real": t.Array(b1, 3, "C", readonly=True),
        "first": t.Array(i8, 2, "C", readonly=True),
        "tokens": t.Array(i8, 2, "C", readonly=True),
        "token_map": t.Array(i8, 1, "C", readonly=True),
        "wanted": numba_type(Wanted, t),
        "stats": t.Array(f8, 4, "C"),
        "gram": t.Array(f8, 4, "C"),
        "bad": t.Array(b1, 3, "C"),
    }
    return {"row_stats": [{"p": t.Array(f, 4, "C", readonly=True), **common} for f in (t.float32, t.float64)]}


def _flow_signatures(t):
    f8 = t.float64
    return {
        "pair_flows": [
            {
                "caps": t.Array(f8, 4, "C", readonly=True),
                "eps": t.Array(f8, 1, "C", readonly=True),
                "out": t.Array(f8, 3, "C"),
            }
        ]
    }


def _read_only(x, shape):
    """``x`` (float32 kept, other dtypes as float64) reshaped to ``shape``, as a read-only view: it matches
    the kernels' read-only signatures exactly and the caller's array is never written."""
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    view = x.reshape(shape).view()
    view.flags.writeable = False
    return view


def rollout_fuse_mean(a, residual, renormalize):
    """One rollout layer's ``Â`` by the kernel (:func:`refattn.kernels.rollout_kernels.fuse_mean`).

    ``M = residual·I + (1 − residual)·mean_h a``, then, with ``renormalize``, each row divided by its
    sum (a row summing to 0 is left as it is): the NumPy definition's mean fusion without a mask or
    discarding (``refattn.rollout_flow``, ``specs/rollout.md``), ≤ 1e-12 from it.  Numba is
    compiled on first use (the rollout family).

    Parameters
    ----------
    a : ndarray, shape (..., H, n, n)
        One layer's attention maps, float32 (read as it is) or float64 (another dtype is converted to
        float64); any strides; never written.
    residual : float
        The weight of the identity, ``α`` in ``α·I + (1 − α)·mean_h a``.
    renormalize : bool
        Whether each row of ``M`` is divided by its sum.

    Returns
    -------
    ndarray or None
        ``Â``, float64 of shape ``(..., n, n)`` (the heads averaged away); None when a row of some map
        is not finite (a NaN or inf in any head): the caller raises its own error.
    """
    heads, n = a.shape[-3:-1]
    maps = _read_only(a, (-1, heads, n, n))
    out = np.empty((maps.shape[0], n, n))
    bad = np.empty(maps.shape[0] * n, dtype=bool)
    kernel = _compile("rollout_kernels", _rollout_signatures)["fuse_mean"]
    kernel(a=maps, residual=float(residual), renormalize=bool(renormalize), out=out, bad=bad)
    return None if bad.any() else out.reshape(a.shape[:-3] + (n, n))


ROLLOUT_ROW_BLOCKS = 8  # row blocks per map in rollout_rows_product: tasks for the threads, summed in order


def rollout_rows_product(v, a, residual, renormalize):
    """``v Â`` for rows ``v`` and one layer ``a``, ``Â`` formed row by row inside the kernel.

    ``Â`` is :func:`rollout_fuse_mean`'s; it is never formed as an ``n × n`` array: one read of the
    maps (:func:`refattn.kernels.rollout_kernels.fuse_mean_rows`), the row blocks' partial products
    summed here in a fixed order (bitwise identical for any number of threads).  Used by rollout's
    row-only path (``rows=``), which carries ``k`` rows back through the layers.

    Parameters
    ----------
    v : array_like, shape (..., k, n)
        The rows to multiply, float64 (converted); leading dims broadcast to ``a``'s batch dims.
    a : ndarray, shape (..., H, n, n)
        One layer's attention maps, float32 or float64 (another dtype is converted to float64); any
        strides; never written.
    residual : float
        The weight of the identity in ``Â`` (see :func:`rollout_fuse_mean`).
    renormalize : bool
        Whether the rows of ``Â`` are divided by their sums.

    Returns
    -------
    ndarray or None
        ``v Â``, float64 of shape ``a.shape[:-3] + (k, n)``; None when a row of some map is not
        finite.
    """
    heads, n = a.shape[-3:-1]
    maps = _read_only(a, (-1, heads, n, n))
    rows = _read_only(
        np.ascontiguousarray(np.broadcast_to(v, a.shape[:-3] + v.shape[-2:]), dtype=np.float64),
        (maps.shape[0],) + v.shape[-2:],
    )
    partial = np.empty((maps.shape[0], ROLLOUT_ROW_BLOCKS) + v.shape[-2:])
    bad = np.empty(maps.shape[0] * n, dtype=bool)
    kernel = _compile("rollout_kernels", _rollout_signatures)["fuse_mean_rows"]
    kernel(a=maps, residual=float(residual), renormalize=bool(renormalize), v=rows, partial=partial, bad=bad)
    if bad.any():
        return None
    return partial.sum(axis=1).reshape(a.shape[:-3] + v.shape[-2:])


def _frozen(x, dtype):
    """``x`` as a C-contiguous read-only array of ``dtype`` (a view where it already is one)."""
    view = np.ascontiguousarray(x, dtype=dtype).view()
    view.flags.writeable = False
    return view


def metric_rows(p, keys, key_map, rows, real, first, tokens, token_map, *, entropy, tokens_wanted, gram):
    """Every per-row statistic of the metrics in one read of the maps, by the kernel
    :func:`refattn.kernels.metric_kernels.row_stats` (``specs/kernels.md``, Metric kernels).

    The arguments are the kernel's, already in its layout (``refattn.metrics._maps.kernel_rows`` builds
    them from a validated map and mask); no check that rows are probabilities is made here.  ≤ 1e-12
    from the NumPy definitions; bitwise identical for any number of threads.

    Parameters
    ----------
    p : ndarray, shape (N, H, Lq, Lk)
        The maps, float32 (read as it is) or float64 (another dtype is converted to float64).
    keys : ndarray of bool, shape (Nk, Hk, Lqk, Lk)
        The allowed keys over their own batch elements (``Hk`` 1 or H, ``Lqk`` 1 or Lq).
    key_map : ndarray of int, shape (N,)
        The ``keys`` batch element of each batch element.
    rows : ndarray of bool, shape (N, H, Lq)
        The real query rows.
    real : ndarray of bool, shape (N, H, Lk)
        The real keys of each map (read with ``tokens_wanted`` only: any 3-d placeholder otherwise).
    first : ndarray of int, shape (N, H)
        The first real key of each map.
    tokens : ndarray of int, shape (Nt, Lk)
        Token codes (read with ``tokens_wanted`` only).
    token_map : ndarray of int, shape (N,)
        The ``tokens`` batch element of each batch element.
    entropy, tokens_wanted, gram : bool
        Compute the row entropies, the pattern masses (square maps), the heads' Gram matrices.

    Returns
    -------
    fields : dict of str to ndarray of float64, each (N, H, Lq)
        ``metric_kernels.FIELDS`` by name (0 on rows that are not real).
    gram : ndarray of float64, shape (N, ⌈Lq / ROW_BLOCK⌉, H, H)
        Per row block, the Gram matrices of the masked maps (summed over the blocks by the caller, in
        order); ``(1, 1, 1, 1)`` zeros without ``gram``.
    bad : ndarray of bool, shape (N, H, Lq)
        Rows holding a NaN or ±inf.
    """
    kern = _compile("metric_kernels", _metric_signatures)  # imports metric_kernels (and numba)
    from refattn.kernels.metric_kernels import FIELDS, ROW_BLOCK, Wanted

    n, heads, lq, _ = p.shape
    stats = np.empty((n, heads, lq, len(FIELDS)))
    grams = np.zeros((n, -(-lq // ROW_BLOCK), heads, heads) if gram else (1, 1, 1, 1))
    bad = np.empty((n, heads, lq), dtype=bool)
    kern["row_stats"](
        p=_read_only(p, p.shape),
        keys=_frozen(keys, bool),
        key_map=_frozen(key_map, np.int64),
        rows=_frozen(rows, bool),
        real=_frozen(real, bool),
        first=_frozen(first, np.int64),
        tokens=_frozen(tokens, np.int64),
        token_map=_frozen(token_map, np.int64),
        wanted=Wanted(entropy=bool(entropy), tokens=bool(tokens_wanted), gram=bool(gram)),
        stats=stats,
        gram=grams,
        bad=bad,
    )
    return {name: stats[..., f] for f, name in enumerate(FIELDS)}, grams, bad


def row_entropy(p):
    """Row entropy ``H_r = −Σ_j p_rj log p_rj`` by the metric kernel (:func:`metric_rows`).

    Natural log, ``0 log 0 = 0``; only entries ``> 0`` contribute (no mask, no check that rows are
    probabilities: ``refattn.metrics.entropy`` validates and checks).  ≤ 1e-12 from the NumPy
    definition; bitwise identical for any number of threads.

    Parameters
    ----------
    p : ndarray, shape (..., n)
        Attention maps, rows along the last axis; float32 (read as it is) or float64 (another dtype is
        converted to float64).

    Returns
    -------
    ndarray or None
        float64 of shape ``(...,)``, one entropy per row; None when some entry is not finite.
    """
    n = p.shape[-1]
    r = math.prod(p.shape[:-1])
    none = np.zeros(r, dtype=np.int64)
    fields, _, bad = metric_rows(
        np.ascontiguousarray(p).reshape(r, 1, 1, n),
        np.ones((1, 1, 1, n), dtype=bool),
        none,
        np.ones((r, 1, 1), dtype=bool),
        np.zeros((1, 1, 1), dtype=bool),
        none.reshape(r, 1),
        np.zeros((1, n), dtype=np.int64),
        none,
        entropy=True,
        tokens_wanted=False,
        gram=False,
    )
    return None if bad.any() else fields["entropy"].reshape(p.shape[:-1])


#: Attention flow's saturation threshold, relative to each map's largest capacity: an arc whose residual
#: is at most ``FLOW_EPS · max(caps)`` counts as saturated (``specs/rollout.md``, Flow).
FLOW_EPS = 1e-15


def layered_max_flows(caps):
    """The maximum flow of every (source, sink) pair of layered graphs, by the kernel
    (:func:`refattn.kernels.flow_kernels.pair_flows`: Dinic's algorithm in float64).

    Node ``(l, a)``, l = 0..Lo, a = 0..n−1; edges ``(l + 1, a) → (l, b)`` of capacity ``caps[..., l, a,
    b]``; sources the nodes of layer Lo, sinks those of layer 0.  An arc counts as saturated once its
    residual is ``<= FLOW_EPS · max(caps)`` of its map (:data:`FLOW_EPS`).  The definition is the linear
    program ``refattn.rollout_flow._max_flow``; ≤ 1e-12 from it.  Bitwise identical for any number of
    threads.  Numba is compiled on first use (the flow family).

    Parameters
    ----------
    caps : ndarray, shape (..., Lo, n, n)
        Capacities ``>= 0``, finite (converted to float64, never written); ``...`` independent maps.

    Returns
    -------
    ndarray of float64, shape (..., n, n)
        ``[..., i, j]``: the maximum flow from node ``(Lo, i)`` to node ``(0, j)``.
    """
    depth, n = caps.shape[-3:-1]
    graphs = np.ascontiguousarray(caps, dtype=np.float64).reshape((-1, depth, n, n)).view()
    graphs.flags.writeable = False
    eps = FLOW_EPS * graphs.max(axis=(1, 2, 3), initial=0.0)
    eps.flags.writeable = False
    out = np.zeros((graphs.shape[0], n, n))
    _compile("flow_kernels", _flow_signatures)["pair_flows"](caps=graphs, eps=eps, out=out)
    return out.reshape(caps.shape[:-3] + (n, n))


def _one_blas_thread():
    """BLAS limited to one thread while a kernel's parallel tasks call it (load the kernels first)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


def _flat(x, batch, n):
    return np.ascontiguousarray(np.broadcast_to(x, batch + x.shape[-3:])).reshape((n,) + x.shape[-3:])


def _aligned(x, ndim):
    """``x`` with leading axes of length 1 up to ``ndim`` axes (a view)."""
    return x.reshape((1,) * (ndim - x.ndim) + x.shape)


def _own_batch(shape, batch):
    """int64 ``(N,)``: for each element of the flattened ``batch``, the flat index of the element that
    an array with (aligned, broadcastable) batch shape ``shape`` gives it."""
    own = np.arange(math.prod(shape), dtype=np.int64).reshape(shape)
    return np.ascontiguousarray(np.broadcast_to(own, batch)).reshape(-1)


def _per_score(x, score_shape, dtype):
    """A broadcastable per-score array as the kernels read it: a read-only view ``(Nx, Hq, Lq, Lk)``
    over its own ``Nx`` batch elements (zero strides where it broadcasts: nothing of the score shape
    is allocated) and its batch map ``(N,)``; a dummy and zeros when absent (``Geometry.has_*``)."""
    batch = score_shape[:-3]
    if x is None:
        return np.broadcast_to(np.zeros(1, dtype=dtype), (1, 1, 1, 1)), np.zeros(math.prod(batch), np.int64)
    x = _aligned(np.asarray(x, dtype=dtype), len(score_shape))
    own = x.shape[:-3]
    view = np.broadcast_to(x.reshape((math.prod(own),) + x.shape[-3:]), (math.prod(own),) + score_shape[-3:])
    return view, _own_batch(own, batch)


def key_ranges(lq, lk, seq, causal, window, chunk, sink_tokens, block):
    """For each sequence and block of query rows, the keys ``[lo, hi)`` that the structure lets some
    real row of it attend.

    The kernels skip every key tile outside the range.  For the real rows ``[i0, i1)`` of a block
    (``i1 <= q_length``), in key positions ``j' = j − k_start`` of the sequence, with ``p = i +
    offset``: ``lo' = p(i0) − left`` (0 when sink tokens are exempt from the left side) and ``hi' =
    p(i1 − 1) + right + 1`` (``right ≤ 0`` under causal), narrowed to the chunks of ``p(i0)`` ..
    ``p(i1 − 1)`` and clipped to ``[0, k_length]``; an unbounded side gives ``0`` / ``k_length``.
    A block without real rows gets an empty range.  Exactly the keys the structure allows (tested):
    keys a mask disallows are not removed.

    Parameters
    ----------
    lq, lk : int
        Query and key lengths ``Lq``, ``Lk``.
    seq : ndarray of int64, shape (N, 4)
        Per sequence: q_length, k_start, k_length, offset (the kernels' ``seq``).
    causal : bool
        Whether row i may attend only keys ``j' <= i + offset``.
    window : (int or None, int or None)
        ``(left, right)`` window sides, ints of any sign (as validation clips them) or None
        (unbounded); ``(None, None)``: no window.
    chunk : int or None
        The chunk size c, or None.
    sink_tokens : int
        Keys ``j' < sink_tokens`` exempt from the left side.
    block : int
        Query rows per block (the kernels' ``BLOCK_Q``).

    Returns
    -------
    ndarray of int64, shape (N, ⌈lq / block⌉, 2)
        ``[n, b]`` is ``[lo, hi)`` (absolute key indices) for query rows ``[b·block, min((b + 1)·block,
        lq))`` of sequence n; an empty range has ``lo == hi``.
    """
    left, right = window
    if causal:
        right = 0 if right is None else min(right, 0)
    ql, ks, kl, off = (seq[:, c : c + 1] for c in range(4))  # (N, 1) each
    i0 = np.arange(0, lq, block, dtype=np.int64)[None, :]  # (1, blocks): first rows
    i1 = np.minimum(np.minimum(i0 + block, lq), ql)  # (N, blocks): one past the last real rows
    p0, p1 = i0 + off, i1 - 1 + off  # the first and last real rows' positions
    lo = np.zeros(np.broadcast_shapes(p0.shape, i1.shape), dtype=np.int64)
    hi = np.broadcast_to(kl, lo.shape).copy()
    if left is not None and sink_tokens == 0:
        lo = np.maximum(lo, p0 - left)
    if right is not None:
        hi = np.minimum(hi, p1 + right + 1)
    if chunk:
        lo = np.maximum(lo, np.floor_divide(p0, chunk) * chunk)
        hi = np.minimum(hi, (np.floor_divide(p1, chunk) + 1) * chunk)
    lo = np.clip(lo, 0, kl)
    hi = np.clip(hi, lo, kl)
    real = i1 > i0
    lo, hi = np.where(real, lo + ks, 0), np.where(real, hi + ks, 0)
    return np.ascontiguousarray(np.stack([lo, hi], axis=-1))


def _task_groups(key, heads):
    """``(pairs (M, 2), starts (G + 1,))``: the ``M`` (n, head) pairs of flat index ``n·heads + head``,
    sorted by ``key (M,)`` (stable: in index order within a group), and where each group of equal keys
    starts; a task owns a group, so pairs that write the same dbias entries share one task."""
    order = np.argsort(key, kind="stable")
    _, first = np.unique(key[order], return_index=True)
    pairs = np.stack(np.divmod(order, heads), axis=1).astype(np.int64)
    return pairs, np.append(first, key.size).astype(np.int64)


class _Flat:
    """The validated sdpa arguments flattened to the kernels' layout."""

    def __init__(self, a):
        self.a = a
        self.batch = a.score_shape[:-3]
        self.n = math.prod(self.batch)
        self.q = _flat(a.q, self.batch, self.n)
        self.k = _flat(a.k, self.batch, self.n)
        self.v = _flat(a.v, self.batch, self.n)
        self.bias, bias_map = _per_score(a.bias, a.score_shape, np.float64)
        self.mask, mask_map = _per_score(a.user_mask, a.score_shape, bool)  # causal/window: on the fly
        self.keep, keep_map = _per_score(a.keep_scale, a.score_shape, np.float64)
        self.maps = np.stack([bias_map, mask_map, keep_map])  # (3, N)
        hq, lq, lk = a.score_shape[-3:]
        sink = np.full(self.batch + (hq,), -np.inf) if a.sinks is None else np.broadcast_to(a.sinks, self.batch + (hq,))
        self.sink = np.asarray(sink, dtype=np.float64).reshape(self.n, hq)
        seqs = a.seqs
        per = [np.broadcast_to(x, self.batch).reshape(-1) for x in (seqs.q_lengths, seqs.k_starts, seqs.k_lengths)]
        self.seq = np.ascontiguousarray(np.stack(per + [np.broadcast_to(seqs.offsets, self.batch).reshape(-1)], 1))
        self.geometry = Geometry.of(a)
        self.scaling = Scaling.of(a)

    def common(self):
        """The arguments every attention kernel takes, by name (``_sdpa_signatures``)."""
        return {
            "q": self.q,
            "k": self.k,
            "v": self.v,
            "bias": self.bias,
            "mask": self.mask,
            "keep": self.keep,
            "maps": self.maps,
            "seq": self.seq,
            "geometry": self.geometry,
            "scaling": self.scaling,
        }

    def key_ranges(self, every_key=False):
        """The key range of each query block of each sequence (``key_ranges``); ``every_key``: all of
        ``[0, Lk)``."""
        from refattn.kernels.sdpa_kernels import BLOCK_Q

        a = self.a
        lq, lk = a.score_shape[-2:]
        if every_key:
            return np.tile(np.array([0, lk], dtype=np.int64), (self.n, -(-lq // BLOCK_Q), 1))
        return key_ranges(lq, lk, self.seq, a.causal, a.window, a.chunk, a.sink_tokens, BLOCK_Q)


def sdpa_forward(a):
    """``(out, lse)`` of sdpa on validated arguments, by the forward kernel.

    The kernel :func:`refattn.kernels.sdpa_kernels.forward` (compiled on first use) on the arguments
    flattened to its layout; per-score options are read through broadcast views, nothing of the
    score shape is allocated.  BLAS runs one thread per task during the call.

    Parameters
    ----------
    a : refattn.attention.sdpa.Args
        Validated arguments of one sdpa call (``refattn.attention.sdpa.validate``), with ``v``.

    Returns
    -------
    out : ndarray, shape (..., Hq, Lq, Dv)
        float64; ``...`` the broadcast batch dims.  Empty rows filled per ``a.empty_rows``.
    lse : ndarray, shape (..., Hq, Lq)
        float64 log-sum-exp of each row (sink included); ``-inf`` on empty rows.
    """
    kern = _kernels()  # before the limit: loading the kernels loads the BLAS they call
    f = _Flat(a)
    hq, lq = a.score_shape[-3:-1]
    out = np.zeros((f.n, hq, lq, a.v.shape[-1]))
    lse = np.zeros((f.n, hq, lq))
    with _one_blas_thread():
        kern["forward"](**f.common(), sink=f.sink, ranges=f.key_ranges(), out=out, lse=lse)
    return out.reshape(a.score_shape[:-1] + (a.v.shape[-1],)), lse.reshape(a.score_shape[:-1])


class _BiasGrad:
    """Where the backward kernels add dbias, and their task groups.

    ``acc (P, Nb, Hb, Lqb, Lkb)`` is the bias' own shape (aligned to the scores, batch flattened to
    ``Nb``) times ``P`` slots.  A bias with its own query rows is reduced by the dQ kernel (``rows``:
    its tasks own query blocks, ``P = 1``); one without (``Lqb = 1 < Lq``) by the dK/dV kernel
    (``keys``: its tasks own key blocks; with ``Lkb = 1`` too every block adds into the same entries,
    so each block gets a slot, ``P`` = the number of key blocks, summed here in a fixed order).  The
    pairs that add into the same entries form one task group: one writer per entry, one order."""

    def __init__(self, f):
        from refattn.kernels.sdpa_kernels import BLOCK_K

        a = f.a
        hq, lq, lk = a.score_shape[-3:]
        hk = a.k.shape[-3]
        dq_key, dkv_key = np.arange(f.n * hq), np.arange(f.n * hk)  # one pair per group
        self.rows = self.keys = False
        self.acc = None
        if a.bias is not None:
            shape = _aligned(a.bias, len(a.score_shape)).shape
            hb, lqb, lkb = shape[-3:]
            self.rows, self.keys = lqb == lq, lqb != lq
            slots = -(-lk // BLOCK_K) if self.keys and lkb == 1 else 1
            self.acc = np.zeros((slots, math.prod(shape[:-3]), hb, lqb, lkb))
            own = f.maps[0]  # (N,) the bias batch element of each score batch element
            if self.rows:  # pair (n, h) adds into acc[0, own[n], h or 0]
                n, h = np.divmod(dq_key, hq)
                dq_key = own[n] * hb + (h if hb > 1 else 0)
            else:  # pair (n, kv head) adds into acc[:, own[n], its group's query heads or 0]
                n, kvh = np.divmod(dkv_key, hk)
                dkv_key = own[n] * hb + (kvh * (hq // hk) if hb > 1 else 0)
        self.dq_groups, self.dkv_groups = _task_groups(dq_key, hq), _task_groups(dkv_key, hk)

    def dq_args(self):
        """``pairs, starts, dbias, want_dbias`` of the dQ kernel, by name (a placeholder dbias when it
        adds none)."""
        return self._args(self.dq_groups, self.rows)

    def dkv_args(self):
        """``pairs, starts, dbias, want_dbias`` of the dK/dV kernel, by name."""
        return self._args(self.dkv_groups, self.keys)

    def _args(self, groups, want):
        pairs, starts = groups
        return {"pairs": pairs, "starts": starts, "dbias": self.acc if want else np.zeros((1,) * 5), "want_dbias": want}

    def dbias(self, bias_shape):
        """dbias in the bias' own shape (slots summed in order)."""
        return (self.acc[0] if self.acc.shape[0] == 1 else self.acc.sum(axis=0)).reshape(bias_shape)


def sdpa_backward(a, d_out, d_lse, saved=None):
    """The gradients of sdpa by the backward kernels (P recomputed from lse).

    :func:`refattn.kernels.sdpa_kernels.backward_dq`, then
    :func:`~refattn.kernels.sdpa_kernels.backward_dkv`; ``dsinks`` is computed here in NumPy.
    Extra memory O(N·H·L·D) plus dbias in the bias' own shape: dbias is reduced inside the
    kernels, never materialised at the score shape.

    Parameters
    ----------
    a : refattn.attention.sdpa.Args
        Validated arguments of one sdpa call (``refattn.attention.sdpa.validate``), with ``v``.
    d_out : ndarray, shape (..., Hq, Lq, Dv)
        Cotangent of ``out``, float64, of the full (broadcast) output shape.
    d_lse : ndarray, shape (..., Hq, Lq), or None
        Cotangent of ``lse``, float64 (ignored on empty rows); None: zero.
    saved : (ndarray, ndarray), optional
        The forward's ``(out, lse)`` as :func:`sdpa_forward` returns them.  Default None: recomputed
        by the forward kernel (+25 % time).

    Returns
    -------
    tuple
        ``(dq, dk, dv, dbias, dsinks)``, float64, each of its input's shape (broadcast dims and GQA
        groups summed back); ``dbias`` None without a bias, ``dsinks`` None without sinks.
    """
    kern = _kernels()
    f = _Flat(a)
    hq, lq = a.score_shape[-3:-1]
    dv_dim = a.v.shape[-1]
    out, lse = sdpa_forward(a) if saved is None else saved
    out = out.reshape(f.n, hq, lq, dv_dim)
    lse = lse.reshape(f.n, hq, lq)
    d_o = np.ascontiguousarray(np.reshape(d_out, out.shape))
    empty = np.isneginf(lse)
    dl = np.zeros(lse.shape) if d_lse is None else np.where(empty, 0.0, np.reshape(d_lse, lse.shape))
    delta = np.einsum("nhie,nhie->nhi", d_o, out)  # Δ = rowsum(dO ∘ O)
    ranges = f.key_ranges(every_key=a.empty_rows != "zero")  # NaN / uniform rows reach every key
    g = _BiasGrad(f)
    dq, dk, dv = np.zeros(f.q.shape), np.zeros(f.k.shape), np.zeros(f.v.shape)
    common = {**f.common(), "ranges": ranges, "lse": lse, "d_o": d_o, "delta": delta, "dl": dl}
    with _one_blas_thread():
        kern["backward_dq"](**common, **g.dq_args(), dq=dq)
        kern["backward_dkv"](**common, **g.dkv_args(), dk=dk, dv=dv)
    dsinks = None
    if a.sinks is not None:
        p_sink = np.where(empty, 0.0, np.exp(f.sink[..., None] - np.where(empty, 0.0, lse)))
        dsinks = unbroadcast((p_sink * (dl - delta)).sum(axis=-1).reshape(f.batch + (hq,)), a.sinks.shape)
    shape = f.batch
    return (
        unbroadcast(dq.reshape(shape + f.q.shape[1:]), a.q.shape),
        unbroadcast(dk.reshape(shape + f.k.shape[1:]), a.k.shape),
        unbroadcast(dv.reshape(shape + f.v.shape[1:]), a.v.shape),
        None if a.bias is None else g.dbias(a.bias.shape),
        dsinks,
    )
