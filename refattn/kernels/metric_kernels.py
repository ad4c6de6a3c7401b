"""Numba kernel for the attention metrics: every per-row statistic of ``refattn.metrics.summarize`` in
one read of the maps (``specs/kernels.md``, Metric kernels).

:func:`row_stats` reads each row of a map once and writes, per row, the sums that the metrics of
:mod:`refattn.metrics` reduce (:data:`FIELDS`: the row sum and its negative entries for the
probability check, the maximum, the mean distance, the allowed keys, the entropy, the diagonal, the
first real token, the previous token, the duplicate- and induction-pattern masses) and, per map and
block of rows, the heads' Gram matrix (head diversity).  The NumPy definitions are the metrics'
(``refattn/metrics/distribution.py``, ``position.py``, ``detectors.py``, ``summary.py``); results
agree to ≤ 1e-12.  Tasks own a block of :data:`ROW_BLOCK` query rows of one batch element (all its
heads), and each row's sums are reduced inside one task in an order fixed by the compiled code:
bitwise identical for any number of threads.  ``fastmath={"reassoc", "contract"}`` lets LLVM
vectorise those reductions (no finite-math flag: non-finite entries are found from their bits).

:func:`log` is the vectorisable natural logarithm the entropy uses (libm's ``log`` is a call LLVM
cannot vectorise): fdlibm's ``e_log.c`` method, branch-free, within 1 ulp.  Both compile with
``error_model="numpy"``: numba's default (Python's) can guard a float division with a zero check that
keeps LLVM from vectorising the loop around it (measured on ``log`` alone: 1.7 vs 6.6 ns per element).
"""

from typing import NamedTuple

import numba as nb
import numpy as np

from refattn.kernels.fastexp import _bits, _from_bits

__all__ = ["ENTROPY_GUARD", "FIELDS", "ROW_BLOCK", "Wanted", "log", "row_stats"]

#: Query rows per task of :func:`row_stats` (each task: one batch element, every head, these rows).
ROW_BLOCK = 16

#: The per-row statistics :func:`row_stats` writes, ``stats[..., FIELDS.index(name)]``, each over the row's
#: allowed keys (masked entries count as 0; every field is 0 on a row that is not real):
#: ``sum`` Σ_j P_ij; ``negative`` the number of allowed entries < 0; ``max`` max_j of the masked row;
#: ``distance`` ``Σ_j P_ij |i − j|``; ``count`` the number of allowed keys; ``entropy`` −Σ_j P_ij log P_ij
#: over P_ij > 0 (with ``Wanted.entropy``); ``diagonal`` P_ii and ``diagonal_kept`` (1.0 when key i
#: exists and is allowed); ``first`` P_i,f, f the map's first real key; ``previous`` P_i,i−1;
#: ``duplicate`` Σ_{j<i, t_j = t_i} P_ij and ``induction`` Σ_{1≤j≤i, t_{j−1} = t_i, j−1 real} P_ij (with
#: ``Wanted.tokens``; ``t`` the tokens).
FIELDS = (
    "sum",
    "negative",
    "max",
    "distance",
    "count",
    "entropy",
    "diagonal",
    "diagonal_kept",
    "first",
    "previous",
    "duplicate",
    "induction",
)
(_SUM, _NEGATIVE, _MAX, _DISTANCE, _COUNT, _ENTROPY, _DIAGONAL, _KEPT, _FIRST, _PREVIOUS, _DUPLICATE, _INDUCTION) = (
    range(len(FIELDS))
)


class Wanted(NamedTuple):
    """Which optional parts :func:`row_stats` computes (the rest it always does).

    Fields
    ------
    entropy : bool
        The ``entropy`` field (one :func:`log` per entry).
    tokens : bool
        The ``duplicate`` and ``induction`` fields (square maps; ``tokens`` real).
    gram : bool
        The heads' Gram matrices into ``gram``.
    """

    entropy: bool
    tokens: bool
    gram: bool


_EXPONENT = 0x7FF0000000000000  # the exponent bits: all set for ±inf and NaN
_MAGNITUDE = 0x7FFFFFFFFFFFFFFF
_LOWEST_KEY = -(1 << 62)  # below the order key of -inf
_TINY = 2.2250738585072014e-308  # the smallest normal float64
_TWO54 = 18014398509481984.0  # 2**54: scales a subnormal to a normal number
_LN2_HI = 6.93147180369123816490e-01  # 32 significant bits: k·_LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10
_LG1, _LG2, _LG3, _LG4, _LG5, _LG6, _LG7 = (
    6.666666666666735130e-01,
    3.999999999940941908e-01,
    2.857142874366239149e-01,
    2.222219843214978396e-01,
    1.818357216161805012e-01,
    1.531383769920937332e-01,
    1.479819860511658591e-01,
)


@nb.njit(inline="always", cache=True, error_model="numpy")
def log(x):
    """``log(x)`` (natural) within 1 ulp for finite ``x > 0``; straight-line code that LLVM vectorises.

    fdlibm's ``e_log.c``: ``x = 2^k · m`` with ``m ∈ [√2/2, √2)`` (read from the bits; a subnormal is
    first scaled by 2⁵⁴), ``f = m − 1`` (exact), ``s = f / (2 + f)``, ``log(1 + f) = f − (f²/2 − s·(f²/2 +
    R(s²)))`` with fdlibm's degree-14 minimax ``R`` (error < 2⁻⁵⁸), ``k·ln 2`` in two parts (``k·ln2_hi``
    exact).  fdlibm's second final form for ``m`` near √2 is left out (no branch, 12 % faster): measured
    at most 0.83 ulp against 120-bit mpmath (``tests/metrics/test_metric_kernels.py``).  Inlined into the
    kernels (``inline="always"``); callable from Python too.

    Parameters
    ----------
    x : float
        A float64 > 0 and finite (subnormals included).  Other values give a meaningless number, never
        a trap: the kernels select it away (``x > 0``) or report the entry as non-finite.

    Returns
    -------
    float
        ``log(x)`` in float64.
    """
    sub = x < _TINY
    return _log_of_normal(x * _TWO54 if sub else x, 1077 if sub else 1023)


@nb.njit(inline="always", cache=True, error_model="numpy")
def _log_of_normal(x, bias):
    """``log(x) − (bias − 1023)·ln 2`` for a normal ``x > 0`` (:func:`log`'s method; ``bias`` 1023, or 1077
    for an ``x`` scaled by 2⁵⁴).  A subnormal ``x`` with ``bias = 1023`` gives a number within 37 of its
    log (its exponent read as −1023, its bits as a mantissa in [1, 2))."""
    bits = _bits(x)
    hx = bits >> 32
    k = (hx >> 20) - bias
    hx &= 0x000FFFFF
    i = (hx + 0x95F64) & 0x100000  # m ≥ √2: halve it (exponent of 0.5) and count it in k
    m = _from_bits(((hx | (i ^ 0x3FF00000)) << 32) | (bits & 0xFFFFFFFF))
    k += i >> 20
    f = m - 1.0
    s = f / (2.0 + f)
    dk = float(k)
    z = s * s
    w = z * z
    r = z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7))) + w * (_LG2 + w * (_LG4 + w * _LG6))
    hfsq = 0.5 * f * f
    return dk * _LN2_HI - ((hfsq - (s * (hfsq + r) + dk * _LN2_LO)) - f)


@nb.njit(inline="always", cache=True)
def _order_key(bits):
    """An int64 ordered as the float64 whose bits are ``bits`` (an involution: it is its own inverse)."""
    return bits ^ ((bits >> 63) & _MAGNITUDE)


@nb.njit(inline="always", cache=True)
def _non_finite(src):
    """The number of entries of the row ``src`` that are NaN or ±inf (from their exponent bits)."""
    bad = 0
    for j in range(src.shape[0]):
        bad += (_bits(np.float64(src[j])) & _EXPONENT) == _EXPONENT
    return bad


@nb.njit(inline="always", cache=True)
def _masked_row(src, allowed, i, row, out):
    """Row ``i``: ``row[j] = src[j]`` where allowed, else 0, and its always-computed fields into
    ``out`` (sum, negative, max, distance, count); returns its number of non-finite entries (masked
    ones included)."""
    bad = 0
    total = 0.0
    negative = 0
    count = 0
    top = _LOWEST_KEY
    distance = 0.0
    for j in range(src.shape[0]):
        raw = np.float64(src[j])
        bad += (_bits(raw) & _EXPONENT) == _EXPONENT
        x = raw if allowed[j] else 0.0
        row[j] = x
        total += x
        negative += x < 0.0
        count += allowed[j]
        top = max(top, _order_key(_bits(x)))
        distance += x * abs(i - j)
    out[_SUM] = total
    out[_NEGATIVE] = negative
    out[_MAX] = _from_bits(_order_key(top))
    out[_DISTANCE] = distance
    out[_COUNT] = count
    return bad


#: Below this magnitude a row's entropy is recomputed with subnormal entries' logs exact.
ENTROPY_GUARD = 1e-280


@nb.njit(inline="always", cache=True)
def _entropy(row):
    """``−Σ_j row_j log row_j`` over the entries > 0.

    One pass with the normal-range log (:func:`_log_of_normal`, no subnormal scaling: 19 % faster), in
    which a subnormal entry's term is off by at most 2.3e-308 · 37 < 1e-306; a result smaller than
    :data:`ENTROPY_GUARD` in magnitude is recomputed with :func:`log`.  Above it the n such terms
    change the result by at most ``n · 1e-306 / ENTROPY_GUARD`` relative (1e-14 at n = 10¹²)."""
    total = 0.0
    for j in range(row.shape[0]):
        x = row[j]
        total += x * _log_of_normal(x, 1023) if x > 0.0 else 0.0
    if abs(total) < ENTROPY_GUARD:  # a one-hot row, or one whose entropy a subnormal term can move
        total = 0.0
        for j in range(row.shape[0]):
            x = row[j]
            total += x * log(x) if x > 0.0 else 0.0
    return -total


@nb.njit(inline="always", cache=True)
def _pattern_masses(row, i, tok, real):
    """``(duplicate, induction)`` masses of row ``i`` (square map): keys ``j < i`` carrying the query's
    token, and keys ``1 ≤ j ≤ i`` whose predecessor carries it and is a real token."""
    t = tok[i]
    duplicate = 0.0
    for j in range(i):
        duplicate += row[j] if tok[j] == t else 0.0
    induction = 0.0
    for j in range(1, i + 1):
        induction += row[j] if (tok[j - 1] == t) & real[j - 1] else 0.0
    return duplicate, induction


@nb.njit(parallel=True, cache=True, fastmath={"reassoc", "contract"}, error_model="numpy")
def row_stats(p, keys, key_map, rows, real, first, tokens, token_map, wanted, stats, gram, bad):
    """Every per-row statistic of :data:`FIELDS` for every row of ``p``, and the heads' Gram matrices.

    Tasks own ``(n, b)``: batch element ``n``, query rows ``[b·ROW_BLOCK, (b + 1)·ROW_BLOCK)`` of all
    its heads (``prange`` over ``N·⌈Lq / ROW_BLOCK⌉``).  Each row is copied once, masked, into a task
    buffer, its fields are reduced from there, and with ``wanted.gram`` the block's Gram matrix
    ``Σ_i ⟨row_h, row_h'⟩`` is accumulated over its rows in order.  Compiled for two explicit
    signatures (float32 and float64 ``p``); called by :func:`refattn.kernels.metric_rows`, by keyword.

    Parameters
    ----------
    p : ndarray, shape (N, H, Lq, Lk)
        The maps, float32 or float64, C-contiguous, read only; ``N`` batch elements of ``H`` heads.
    keys : ndarray of bool, shape (Nk, Hk, Lqk, Lk)
        The allowed keys over their own batch elements, ``Hk`` 1 or H, ``Lqk`` 1 or Lq (a length-1
        axis is shared by every head / row); C-contiguous, read only.
    key_map : ndarray of int64, shape (N,)
        The ``keys`` batch element of each batch element.
    rows : ndarray of bool, shape (N, H, Lq)
        The real query rows (a row that is not real has no allowed key and every field 0).
    real : ndarray of bool, shape (N, H, Lk)
        The real keys of each map (allowed for some real row): the induction pattern's condition.
    first : ndarray of int64, shape (N, H)
        The first real key of each map (0 when it has none).
    tokens : ndarray of int64, shape (Nt, Lk)
        Token codes (equal codes = equal tokens) over their own batch elements; read with
        ``wanted.tokens`` only (then ``Lq = Lk``).
    token_map : ndarray of int64, shape (N,)
        The ``tokens`` batch element of each batch element.
    wanted : Wanted
        The optional parts to compute.
    stats : ndarray of float64, shape (N, H, Lq, len(FIELDS))
        C-contiguous; receives each row's fields (``entropy`` without ``wanted.entropy`` and
        ``duplicate``, ``induction`` without ``wanted.tokens`` are 0).
    gram : ndarray of float64, shape (N, ⌈Lq / ROW_BLOCK⌉, H, H)
        C-contiguous; with ``wanted.gram`` receives each block's ``Σ_{i in block} Σ_j P_hij P_h'ij``
        over the masked maps (else not touched: any shape).
    bad : ndarray of bool, shape (N, H, Lq)
        C-contiguous; receives whether the row holds a NaN or ±inf (masked entries included).

    Returns
    -------
    None
        The results are written into ``stats``, ``gram`` and ``bad``.
    """
    n_maps, heads, lq, lk = p.shape
    blocks = (lq + ROW_BLOCK - 1) // ROW_BLOCK
    hk, qk = keys.shape[1], keys.shape[2]
    for task in nb.prange(n_maps * blocks):
        n = task // blocks
        b = task - n * blocks
        kn, tn = key_map[n], token_map[n]
        buf = np.empty((heads, lk))
        g = np.zeros((heads, heads))
        for i in range(b * ROW_BLOCK, min(lq, (b + 1) * ROW_BLOCK)):
            for h in range(heads):
                row = buf[h]
                allowed = keys[kn, h % hk, i % qk]
                out = stats[n, h, i]
                for f in range(len(FIELDS)):
                    out[f] = 0.0
                if rows[n, h, i]:
                    bad[n, h, i] = _masked_row(p[n, h, i], allowed, i, row, out) > 0
                    if wanted.entropy:
                        out[_ENTROPY] = _entropy(row)
                    if i < lk:
                        out[_DIAGONAL] = row[i]
                        out[_KEPT] = 1.0 if allowed[i] else 0.0
                    if 0 < i <= lk:
                        out[_PREVIOUS] = row[i - 1]
                    out[_FIRST] = row[first[n, h]]
                    if wanted.tokens:
                        out[_DUPLICATE], out[_INDUCTION] = _pattern_masses(row, i, tokens[tn], real[n, h])
                else:
                    bad[n, h, i] = _non_finite(p[n, h, i]) > 0
                    for j in range(lk):
                        row[j] = 0.0
            if wanted.gram:
                for h in range(heads):
                    for h2 in range(h, heads):
                        acc = 0.0
                        for j in range(lk):
                            acc += buf[h, j] * buf[h2, j]
                        g[h, h2] += acc
        if wanted.gram:
            for h in range(heads):
                for h2 in range(h, heads):
                    gram[n, b, h, h2] = g[h, h2]
                    gram[n, b, h2, h] = g[h, h2]
