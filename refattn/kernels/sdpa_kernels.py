"""Numba kernels for tiled (online-softmax) SDPA: forward and backward.

The NumPy twin that defines the math is :mod:`refattn.attention.tiled` (``sdpa_online`` and
``sdpa_online_backward``); ``refattn.attention.sdpa`` defines the values.  Layout: q, k, v and the
outputs are flattened to ``(N, H, L, E)`` with ``N`` the broadcast batch; per-score options (bias,
mask, dropout keep-scale) are never materialised: each is a 4-D view ``(Nx, Hq, Lq, Lk)`` over its
own ``Nx`` batch elements, zero strides where it broadcasts, and ``maps[0|1|2, n]`` is the element
that score batch ``n`` reads (bias, mask, keep).  Only ``BLOCK_Q × BLOCK_K`` tiles are allocated,
per task.  Which keys a query block visits comes from the caller (``ranges[query block] = [lo, hi)``,
``refattn.kernels.key_ranges``).  The scalars come as two NamedTuples
(``refattn.kernels.geometry``): ``geometry`` (causal, window sides, chunk, sink tokens, empty-row policy, which
per-score arrays are real) and ``scaling`` (scale, softcap); the helpers get a tile's coordinates
as a ``Tile``, built by keyword.

Tile products go to BLAS (``np.dot``), one BLAS thread per task (the caller limits BLAS with
threadpoolctl: a multithreaded BLAS inside the parallel loop runs 2.6–4.5× slower).
Parallelism without races, so results are bitwise identical for any thread count:
forward tasks own (n, h, query block); the backward's tasks own (group of (n, head) pairs, block):
dQ tasks a query block, dK/dV tasks a key block, looping over their pairs, query heads and blocks in
a fixed order.  A group is one pair unless ``dbias`` is reduced into a broadcast bias: then a group
holds every pair that adds into the same ``dbias`` entries, so each entry has one writer and one
summation order.
"""

import math

import numba as nb
import numpy as np

from refattn.kernels.fastexp import exp
from refattn.kernels.geometry import Tile

#: Query rows per tile (a compile-time constant; :func:`refattn.kernels.key_ranges` gets it as ``block``).
BLOCK_Q = 128
#: Keys per tile (a compile-time constant).
BLOCK_K = 128

_NOT_ALLOWED = -np.inf


@nb.njit(inline="always", cache=True)
def _row_keys(i, g, seq, n):
    """The keys row i of sequence ``n`` may attend, as two half-open ranges of absolute key indices
    ``[lo, hi)`` ∪ ``[sink_lo, sink_hi)`` (``g``: Geometry, ``seq[n]``: q_length, k_start, k_length,
    offset).  With ``j' = j − k_start`` and ``pos = i + offset``: a real key of its sequence, ``j' <=
    pos`` under causal, ``j' <= pos + right``, ``j' >= pos − left`` unless ``j' < sink_tokens``, and
    ``j'`` in the chunk of ``pos`` (floor division) — the rules of ``refattn.masks.allowed_positions``,
    each bound computed once per row.  A padded row (``i >= q_length``) gets empty ranges."""
    if i >= seq[n, 0]:
        return 0, 0, 0, 0
    ks = seq[n, 1]
    pos = i + seq[n, 3]
    hi = seq[n, 2]  # relative bounds: every condition but the left side caps the range above or below
    lo = 0
    if g.causal:
        hi = min(hi, pos + 1)
    if g.has_right:
        hi = min(hi, pos + g.right + 1)
    if g.chunk > 0:
        start = (pos // g.chunk) * g.chunk  # int floor division, as Python's
        lo = max(lo, start)
        hi = min(hi, start + g.chunk)
    sink_lo, sink_hi = 0, 0
    if g.has_left:
        if g.sink_tokens > 0:
            sink_lo, sink_hi = lo, min(hi, g.sink_tokens)
        lo = max(lo, pos - g.left)
    return ks + lo, ks + hi, ks + sink_lo, ks + sink_hi


@nb.njit(inline="always", cache=True)
def _tile_inside(t, g, seq):
    """Whether every (row, key) of tile ``t`` is allowed by the structure: real rows and keys, and the
    offsets ``d`` spanning ``[j0' − (i0 + bq − 1 + o), j0' + bk − 1 − (i0 + o)]`` inside the window
    (sink tokens not counted: a conservative False), all in one chunk."""
    n = t.n
    if t.i0 + t.bq > seq[n, 0]:
        return False
    jr0 = t.j0 - seq[n, 1]
    jr1 = jr0 + t.bk - 1
    if jr0 < 0 or jr1 >= seq[n, 2]:
        return False
    p0 = t.i0 + seq[n, 3]
    p1 = p0 + t.bq - 1
    d_min = jr0 - p1
    d_max = jr1 - p0
    if g.causal and d_max > 0:
        return False
    if g.has_right and d_max > g.right:
        return False
    if g.has_left and d_min < -g.left:
        return False
    if g.chunk > 0:
        c = p0 // g.chunk
        if p1 // g.chunk != c or jr0 // g.chunk != c or jr1 // g.chunk != c:
            return False
    return True


@nb.njit(inline="always", cache=True)
def _scaled_rows(q, n, h, i0, bq, sc, qs_buf):
    """``sc.scale · q[n, h, i0:i0 + bq]`` ``(bq, D)`` in the task's buffer ``qs_buf``: the scale applied
    once per block of query rows instead of once per score (a power-of-two scale, 1/√D for D = 4ᵏ,
    gives bitwise the scaled product)."""
    d_dim = q.shape[3]
    qs = qs_buf[: bq * d_dim].reshape((bq, d_dim))
    for r in range(bq):
        for c in range(d_dim):
            qs[r, c] = sc.scale * q[n, h, i0 + r, c]
    return qs


@nb.njit(inline="always", cache=True)
def _tile_logits(qs, k, bias, mask, seq, t, g, sc, tanh_t, s_buf):
    """Logits ``(bq, bk)`` of tile ``t`` (−inf where disallowed), a view of the task's buffer
    ``s_buf``; the product ``qs k̃ᵀ`` by BLAS, ``qs`` the tile's scaled query rows
    (:func:`_scaled_rows`).  ``g``: Geometry, ``sc``: Scaling; ``tanh_t`` receives tanh(s0/c) when
    softcap > 0."""
    i0, bq, j0, bk, h = t.i0, t.bq, t.j0, t.bk, t.h
    softcap = sc.softcap
    s = s_buf[: bq * bk].reshape((bq, bk))
    np.dot(qs, k[t.n, t.kvh][j0 : j0 + bk].T, s)
    if softcap == 0.0 and not g.has_mask and _tile_inside(t, g, seq):
        if g.has_bias:  # every key allowed: the bias added, a loop the compiler vectorises
            for r in range(bq):
                for jj in range(bk):
                    s[r, jj] += bias[t.bn, h, i0 + r, j0 + jj]
        return s
    for r in range(bq):
        i = i0 + r
        lo, hi, sink_lo, sink_hi = _row_keys(i, g, seq, t.n)
        if softcap == 0.0 and not g.has_mask:  # the structure alone: a loop of selects that vectorises
            for jj in range(bk):
                j = j0 + jj
                x = s[r, jj]
                if g.has_bias:
                    x += bias[t.bn, h, i, j]
                inside = (j >= lo and j < hi) or (j >= sink_lo and j < sink_hi)
                s[r, jj] = x if inside else _NOT_ALLOWED
            continue
        for jj in range(bk):
            j = j0 + jj
            x = s[r, jj]
            if softcap > 0.0:
                th = math.tanh(x / softcap)
                tanh_t[r, jj] = th
                x = softcap * th
            if g.has_bias:
                x += bias[t.bn, h, i, j]
            inside = (j >= lo and j < hi) or (j >= sink_lo and j < sink_hi)
            if not inside or (g.has_mask and not mask[t.mn, h, i, j]):
                x = _NOT_ALLOWED
            s[r, jj] = x
    return s


@nb.njit(inline="always", cache=True)
def _row_max(s, r, bk):
    """max of s[r, :bk] by four interleaved chains (a fixed order: deterministic, not latency-bound)."""
    m0 = m1 = m2 = m3 = -np.inf
    j4 = bk - bk % 4
    for jj in range(0, j4, 4):
        m0 = max(m0, s[r, jj])
        m1 = max(m1, s[r, jj + 1])
        m2 = max(m2, s[r, jj + 2])
        m3 = max(m3, s[r, jj + 3])
    for jj in range(j4, bk):
        m0 = max(m0, s[r, jj])
    return max(max(m0, m1), max(m2, m3))


@nb.njit(inline="always", cache=True)
def _row_sum(s, r, bk):
    """sum of s[r, :bk] by four interleaved partial sums, combined in a fixed order."""
    a0 = a1 = a2 = a3 = 0.0
    j4 = bk - bk % 4
    for jj in range(0, j4, 4):
        a0 += s[r, jj]
        a1 += s[r, jj + 1]
        a2 += s[r, jj + 2]
        a3 += s[r, jj + 3]
    for jj in range(j4, bk):
        a0 += s[r, jj]
    return (a0 + a1) + (a2 + a3)


@nb.njit(parallel=True, cache=True, fastmath={"contract"})
def forward(q, k, v, bias, mask, keep, maps, seq, sink, geometry, scaling, ranges, out, lse):
    """sdpa's forward: ``out`` and ``lse`` by tiles, with an online softmax.

    Tasks own (n, query head, query block of ``BLOCK_Q``); over the key tiles of the block's range:
    the logits ``scale · q kᵀ`` (BLAS), softcap, bias, masks, the online softmax (running max ``m``
    and sum ``l`` starting from the sink, accumulator rescaled by ``exp(m − m')``) and
    ``acc += P̃ v`` (BLAS).  Empty rows (no allowed key, no finite sink) get ``lse = −inf`` and
    ``out`` per ``geometry.empty_policy``: zeros, NaN, or the keep-weighted mean of every value.

    Parameters
    ----------
    q : ndarray, shape (N, Hq, Lq, D)
        Queries, float64, C-contiguous, read only; ``N`` the flattened broadcast batch.
    k : ndarray, shape (N, Hk, Lk, D)
        Keys, float64, C-contiguous, read only; ``Hk`` divides ``Hq`` (query head ``h`` reads kv
        head ``h // (Hq // Hk)``).
    v : ndarray, shape (N, Hk, Lk, Dv)
        Values, float64, C-contiguous, read only.
    bias : ndarray, shape (Nb, Hq, Lq, Lk)
        float64 view over the bias' own ``Nb`` batch elements (zero strides where it broadcasts),
        read only; a 1-element placeholder when ``geometry.has_bias`` is False.
    mask : ndarray of bool, shape (Nm, Hq, Lq, Lk)
        True = allowed; the same kind of view, or a placeholder when ``geometry.has_mask`` is False.
    keep : ndarray, shape (Nk, Hq, Lq, Lk)
        The dropout keep-scale ``keep / (1 − dropout_p)``, float64; the same kind of view, or a
        placeholder when ``geometry.has_keep`` is False.
    maps : ndarray of int64, shape (3, N)
        ``maps[0 | 1 | 2, n]``: the bias, mask and keep batch element that score batch element ``n``
        reads.
    seq : ndarray of int64, shape (N, 4)
        Per sequence: ``q_length`` (rows past it are padding), ``k_start``, ``k_length`` (its real
        keys) and the alignment ``offset`` (row i's diagonal is key ``k_start + i + offset``).
    sink : ndarray, shape (N, Hq)
        Each head's sink logit, float64, read only, any strides; ``-inf``: no sink.
    geometry : refattn.kernels.geometry.Geometry
        Causal, window sides, chunk, sink tokens, empty-row policy and which per-score arrays are real.
    scaling : refattn.kernels.geometry.Scaling
        ``scale`` and ``softcap`` (0: none).
    ranges : ndarray of int64, shape (N, ⌈Lq / BLOCK_Q⌉, 2)
        The keys ``[lo, hi)`` each query block of each sequence visits
        (:func:`refattn.kernels.key_ranges`; the backward passes every key, ``[0, Lk)``, under
        ``empty_rows`` ``"nan"`` / ``"uniform"``).
    out : ndarray, shape (N, Hq, Lq, Dv)
        float64, C-contiguous; receives the output.
    lse : ndarray, shape (N, Hq, Lq)
        float64, C-contiguous; receives each row's log-sum-exp (sink included).

    Returns
    -------
    None
        The results are written into ``out`` and ``lse``.
    """
    g = geometry
    n_batch, hq, lq, d_dim = q.shape
    hk, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hk
    nqb = (lq + BLOCK_Q - 1) // BLOCK_Q
    for task in nb.prange(n_batch * hq * nqb):
        n = task // (hq * nqb)
        h = (task // nqb) % hq
        qb = task % nqb
        i0 = qb * BLOCK_Q
        i1 = min(i0 + BLOCK_Q, lq)
        bq = i1 - i0
        kvh = h // group
        bn, mn, kn = maps[0, n], maps[1, n], maps[2, n]
        tanh_t = np.empty((BLOCK_Q, BLOCK_K))
        s_buf = np.empty(BLOCK_Q * BLOCK_K)  # tile buffers, once per task: no allocation per tile
        qs = _scaled_rows(q, n, h, i0, bq, scaling, np.empty(BLOCK_Q * d_dim))
        pv = np.empty((bq, dv))
        acc = np.zeros((bq, dv))
        m = np.empty(BLOCK_Q)
        l_sum = np.empty(BLOCK_Q)
        for r in range(bq):
            m[r] = sink[n, h]
            l_sum[r] = 1.0 if sink[n, h] > -np.inf else 0.0
        lo, hi = ranges[n, qb, 0], ranges[n, qb, 1]
        for j0 in range(lo, hi, BLOCK_K):
            bk = min(j0 + BLOCK_K, hi) - j0
            t = Tile(n=n, h=h, kvh=kvh, bn=bn, mn=mn, kn=kn, i0=i0, bq=bq, j0=j0, bk=bk)
            s = _tile_logits(qs, k, bias, mask, seq, t, g, scaling, tanh_t, s_buf)
            for r in range(bq):  # online softmax: s becomes exp(s − m_new), the acc rescaled by alpha
                row_max = _row_max(s, r, bk)
                m_new = max(m[r], row_max)
                if m_new == -np.inf:
                    for jj in range(bk):
                        s[r, jj] = 0.0
                    continue
                if m_new > m[r]:  # a new running max: rescale the sums (alpha = 1 otherwise)
                    alpha = exp(m[r] - m_new)  # exp(−inf) = 0: no branch, the loops vectorise
                    l_sum[r] *= alpha
                    for c in range(dv):
                        acc[r, c] *= alpha
                for jj in range(bk):
                    s[r, jj] = exp(s[r, jj] - m_new)
                total = _row_sum(s, r, bk)
                if g.has_keep:
                    for jj in range(bk):
                        s[r, jj] *= keep[kn, h, i0 + r, j0 + jj]
                l_sum[r] += total
                m[r] = m_new
            np.dot(s, v[n, kvh][j0 : j0 + bk], pv)
            acc += pv
        for r in range(bq):
            i = i0 + r
            if i >= seq[n, 0]:  # a padded query row: 0 and lse -inf under every policy
                lse[n, h, i] = -np.inf
                for c in range(dv):
                    out[n, h, i, c] = 0.0
                continue
            if l_sum[r] > 0.0:
                inv = 1.0 / l_sum[r]
                for c in range(dv):
                    out[n, h, i, c] = acc[r, c] * inv
                lse[n, h, i] = m[r] + math.log(l_sum[r])
            else:
                lse[n, h, i] = -np.inf
                for c in range(dv):
                    out[n, h, i, c] = 0.0
                if g.empty_policy == 1:
                    for c in range(dv):
                        out[n, h, i, c] = np.nan
                elif g.empty_policy == 2:
                    for j in range(lk):
                        w = 1.0 / lk
                        if g.has_keep:
                            w *= keep[kn, h, i, j]
                        for c in range(dv):
                            out[n, h, i, c] += w * v[n, kvh, j, c]


@nb.njit(inline="always", cache=True)
def _tile_probabilities(s, t, lse, lk, g, seq):
    """P = exp(s − lse) in place for tile ``t``; rows with lse = −inf get the empty-row fill (0 on
    padded query rows)."""
    for r in range(t.bq):
        row_lse = lse[t.n, t.h, t.i0 + r]
        if row_lse == -np.inf:
            fill = 0.0 if g.empty_policy == 0 else (np.nan if g.empty_policy == 1 else 1.0 / lk)
            if t.i0 + r >= seq[t.n, 0]:
                fill = 0.0
            for jj in range(t.bk):
                s[r, jj] = fill
        else:
            for jj in range(t.bk):
                s[r, jj] = exp(s[r, jj] - row_lse)  # exp(−inf) = 0


@nb.njit(inline="always", cache=True)
def _tile_ds(p, dp, keep, t, g, sc, delta, dl, lse, tanh_t, dbias, part, want_dbias):
    """ds = P (dP − Δ + dlse) [· (1 − tanh²)] in place of ``dp`` for tile ``t``; ``dp`` holds dO vᵀ
    on entry.  ``g``: Geometry, ``sc``: Scaling.

    With ``want_dbias``, the ds before the softcap factor is added into ``dbias[part, bn]``
    ``(Hb, Lqb, Lkb)``: a head, row or key axis of length 1 takes the sum over it (the broadcast)."""
    n, h, kn, bn, i0, j0 = t.n, t.h, t.kn, t.bn, t.i0, t.j0
    softcap = sc.softcap
    plain = not g.has_keep and not want_dbias and softcap == 0.0
    hb = h if dbias.shape[2] > 1 else 0
    i_step = 1 if dbias.shape[3] > 1 else 0
    j_step = 1 if dbias.shape[4] > 1 else 0
    for r in range(t.bq):
        i = i0 + r
        d_row, dl_row = delta[n, h, i], dl[n, h, i]
        if lse[n, h, i] == -np.inf and g.empty_policy == 2:  # the uniform fill does not depend on s
            for jj in range(t.bk):
                dp[r, jj] = 0.0
            continue
        if plain:  # no branch in the loop: it vectorises
            for jj in range(t.bk):
                dp[r, jj] = p[r, jj] * ((dp[r, jj] - d_row) + dl_row)
            continue
        for jj in range(t.bk):
            j = j0 + jj
            gr = dp[r, jj]
            if g.has_keep:
                gr *= keep[kn, h, i, j]
            gr = p[r, jj] * ((gr - d_row) + dl_row)
            if want_dbias:
                dbias[part, bn, hb, i * i_step, j * j_step] += gr
            if softcap > 0.0:
                gr *= 1.0 - tanh_t[r, jj] * tanh_t[r, jj]
            dp[r, jj] = gr


@nb.njit(parallel=True, cache=True, fastmath={"contract"})
def backward_dq(
    q,
    k,
    v,
    bias,
    mask,
    keep,
    maps,
    seq,
    geometry,
    scaling,
    ranges,
    pairs,
    starts,
    lse,
    d_o,
    delta,
    dl,
    dq,
    dbias,
    want_dbias,
):
    """sdpa's backward to q (and to a bias with its own query rows).

    Tasks own (group, query block); for each pair of the group and each key tile of the block's
    range: ``P = exp(s − lse)`` recomputed, ``dP = dO vᵀ`` (times ``keep``),
    ``ds = P (dP − Δ + dlse)`` (times ``1 − tanh²`` under a softcap), ``dq += scale · ds k``.

    Parameters
    ----------
    q : ndarray, shape (N, Hq, Lq, D)
        Queries, float64, C-contiguous, read only; ``N`` the flattened broadcast batch.
    k : ndarray, shape (N, Hk, Lk, D)
        Keys, float64, C-contiguous, read only; ``Hk`` divides ``Hq`` (query head ``h`` reads kv
        head ``h // (Hq // Hk)``).
    v : ndarray, shape (N, Hk, Lk, Dv)
        Values, float64, C-contiguous, read only.
    bias : ndarray, shape (Nb, Hq, Lq, Lk)
        float64 view over the bias' own ``Nb`` batch elements (zero strides where it broadcasts),
        read only; a 1-element placeholder when ``geometry.has_bias`` is False.
    mask : ndarray of bool, shape (Nm, Hq, Lq, Lk)
        True = allowed; the same kind of view, or a placeholder when ``geometry.has_mask`` is False.
    keep : ndarray, shape (Nk, Hq, Lq, Lk)
        The dropout keep-scale ``keep / (1 − dropout_p)``, float64; the same kind of view, or a
        placeholder when ``geometry.has_keep`` is False.
    maps : ndarray of int64, shape (3, N)
        ``maps[0 | 1 | 2, n]``: the bias, mask and keep batch element that score batch element ``n``
        reads.
    seq : ndarray of int64, shape (N, 4)
        Per sequence: ``q_length`` (rows past it are padding), ``k_start``, ``k_length`` (its real
        keys) and the alignment ``offset`` (row i's diagonal is key ``k_start + i + offset``).
    geometry : refattn.kernels.geometry.Geometry
        Causal, window sides, chunk, sink tokens, empty-row policy and which per-score arrays are real.
    scaling : refattn.kernels.geometry.Scaling
        ``scale`` and ``softcap`` (0: none).
    ranges : ndarray of int64, shape (N, ⌈Lq / BLOCK_Q⌉, 2)
        The keys ``[lo, hi)`` each query block of each sequence visits
        (:func:`refattn.kernels.key_ranges`; the backward passes every key, ``[0, Lk)``, under
        ``empty_rows`` ``"nan"`` / ``"uniform"``).
    pairs : ndarray of int64, shape (M, 2)
        The task groups' pairs, group by group: ``(n, h)``, batch element and query head.
    starts : ndarray of int64, shape (G + 1,)
        Group ``g`` is ``pairs[starts[g]:starts[g + 1]]``; the pairs of a group add into the same
        ``dbias`` entries (one pair per group when no dbias is reduced here).
    lse : ndarray, shape (N, Hq, Lq)
        The forward's log-sum-exp, float64, read only; ``-inf`` marks an empty row.
    d_o : ndarray, shape (N, Hq, Lq, Dv)
        Cotangent of ``out``, float64, C-contiguous, read only.
    delta : ndarray, shape (N, Hq, Lq)
        ``Δ = rowsum(dO ∘ O)``, float64, read only.
    dl : ndarray, shape (N, Hq, Lq)
        Cotangent of ``lse``, float64 (0 on empty rows), read only.
    dq : ndarray, shape (N, Hq, Lq, D)
        float64, C-contiguous; receives ``dq`` for every pair in ``pairs``.
    dbias : ndarray, shape (1, Nb, Hb, Lq, Lkb)
        float64, C-contiguous: the bias' own shape (batch flattened to ``Nb``; ``Hb`` 1 or ``Hq``,
        ``Lkb`` 1 or ``Lk``); ``ds`` before the softcap factor is added into it (summed over the
        axes of length 1) when ``want_dbias``; else a 1-element placeholder.
    want_dbias : bool
        Whether this kernel reduces ``dbias`` (the bias has its own query rows).

    Returns
    -------
    None
        The results are written into ``dq`` (and added into ``dbias``).
    """
    g = geometry
    hq, lq, d_dim = q.shape[1], q.shape[2], q.shape[3]
    hk, lk = k.shape[1], k.shape[2]
    group = hq // hk
    nqb = (lq + BLOCK_Q - 1) // BLOCK_Q
    for task in nb.prange((starts.shape[0] - 1) * nqb):
        grp = task // nqb
        qb = task % nqb
        i0 = qb * BLOCK_Q
        i1 = min(i0 + BLOCK_Q, lq)
        bq = i1 - i0
        tanh_t = np.empty((BLOCK_Q, BLOCK_K))
        s_buf, ds_buf = np.empty(BLOCK_Q * BLOCK_K), np.empty(BLOCK_Q * BLOCK_K)
        dq_part = np.empty((bq, d_dim))
        dq_blk = np.empty((bq, d_dim))
        qs_buf = np.empty(BLOCK_Q * d_dim)
        for pair in range(starts[grp], starts[grp + 1]):
            n, h = pairs[pair, 0], pairs[pair, 1]
            lo, hi = ranges[n, qb, 0], ranges[n, qb, 1]
            kvh = h // group
            bn, mn, kn = maps[0, n], maps[1, n], maps[2, n]
            dq_blk[:, :] = 0.0
            qs = _scaled_rows(q, n, h, i0, bq, scaling, qs_buf)
            for j0 in range(lo, hi, BLOCK_K):
                bk = min(j0 + BLOCK_K, hi) - j0
                t = Tile(n=n, h=h, kvh=kvh, bn=bn, mn=mn, kn=kn, i0=i0, bq=bq, j0=j0, bk=bk)
                s = _tile_logits(qs, k, bias, mask, seq, t, g, scaling, tanh_t, s_buf)
                _tile_probabilities(s, t, lse, lk, g, seq)
                ds = ds_buf[: bq * bk].reshape((bq, bk))
                np.dot(d_o[n, h][i0:i1], v[n, kvh][j0 : j0 + bk].T, ds)
                _tile_ds(s, ds, keep, t, g, scaling, delta, dl, lse, tanh_t, dbias, 0, want_dbias)
                np.dot(ds, k[n, kvh][j0 : j0 + bk], dq_part)
                dq_blk += dq_part
            for r in range(bq):
                for d in range(d_dim):
                    dq[n, h, i0 + r, d] = scaling.scale * dq_blk[r, d]


@nb.njit(parallel=True, cache=True, fastmath={"contract"})
def backward_dkv(
    q,
    k,
    v,
    bias,
    mask,
    keep,
    maps,
    seq,
    geometry,
    scaling,
    ranges,
    pairs,
    starts,
    lse,
    d_o,
    delta,
    dl,
    dk,
    dv,
    dbias,
    want_dbias,
):
    """sdpa's backward to k and v (and to a bias without query rows).

    Tasks own (group, key block of ``BLOCK_K``), looping over the group's pairs, their query heads
    and the query blocks whose range meets the key block, in a fixed order: ``P`` recomputed,
    ``dv += P̃ᵀ dO``, ``ds`` as in :func:`backward_dq`, ``dk += scale · dsᵀ q``.

    Parameters
    ----------
    q : ndarray, shape (N, Hq, Lq, D)
        Queries, float64, C-contiguous, read only; ``N`` the flattened broadcast batch.
    k : ndarray, shape (N, Hk, Lk, D)
        Keys, float64, C-contiguous, read only; ``Hk`` divides ``Hq`` (query head ``h`` reads kv
        head ``h // (Hq // Hk)``).
    v : ndarray, shape (N, Hk, Lk, Dv)
        Values, float64, C-contiguous, read only.
    bias : ndarray, shape (Nb, Hq, Lq, Lk)
        float64 view over the bias' own ``Nb`` batch elements (zero strides where it broadcasts),
        read only; a 1-element placeholder when ``geometry.has_bias`` is False.
    mask : ndarray of bool, shape (Nm, Hq, Lq, Lk)
        True = allowed; the same kind of view, or a placeholder when ``geometry.has_mask`` is False.
    keep : ndarray, shape (Nk, Hq, Lq, Lk)
        The dropout keep-scale ``keep / (1 − dropout_p)``, float64; the same kind of view, or a
        placeholder when ``geometry.has_keep`` is False.
    maps : ndarray of int64, shape (3, N)
        ``maps[0 | 1 | 2, n]``: the bias, mask and keep batch element that score batch element ``n``
        reads.
    seq : ndarray of int64, shape (N, 4)
        Per sequence: ``q_length`` (rows past it are padding), ``k_start``, ``k_length`` (its real
        keys) and the alignment ``offset`` (row i's diagonal is key ``k_start + i + offset``).
    geometry : refattn.kernels.geometry.Geometry
        Causal, window sides, chunk, sink tokens, empty-row policy and which per-score arrays are real.
    scaling : refattn.kernels.geometry.Scaling
        ``scale`` and ``softcap`` (0: none).
    ranges : ndarray of int64, shape (N, ⌈Lq / BLOCK_Q⌉, 2)
        The keys ``[lo, hi)`` each query block of each sequence visits
        (:func:`refattn.kernels.key_ranges`; the backward passes every key, ``[0, Lk)``, under
        ``empty_rows`` ``"nan"`` / ``"uniform"``).
    pairs : ndarray of int64, shape (M, 2)
        The task groups' pairs, group by group: ``(n, kvh)``, batch element and key/value head.
    starts : ndarray of int64, shape (G + 1,)
        Group ``g`` is ``pairs[starts[g]:starts[g + 1]]``; the pairs of a group add into the same
        ``dbias`` entries (one pair per group when no dbias is reduced here).
    lse : ndarray, shape (N, Hq, Lq)
        The forward's log-sum-exp, float64, read only; ``-inf`` marks an empty row.
    d_o : ndarray, shape (N, Hq, Lq, Dv)
        Cotangent of ``out``, float64, C-contiguous, read only.
    delta : ndarray, shape (N, Hq, Lq)
        ``Δ = rowsum(dO ∘ O)``, float64, read only.
    dl : ndarray, shape (N, Hq, Lq)
        Cotangent of ``lse``, float64 (0 on empty rows), read only.
    dk : ndarray, shape (N, Hk, Lk, D)
        float64, C-contiguous; receives ``dk`` for every pair in ``pairs``.
    dv : ndarray, shape (N, Hk, Lk, Dv)
        float64, C-contiguous; receives ``dv`` for every pair in ``pairs``.
    dbias : ndarray, shape (P, Nb, Hb, 1, Lkb)
        float64, C-contiguous: the bias' own shape times ``P`` slots (``P`` = the number of key
        blocks when ``Lkb = 1``: one slot per block, summed by the caller in block order; else 1);
        ``ds`` before the softcap factor is added into it when ``want_dbias``; else a 1-element
        placeholder.
    want_dbias : bool
        Whether this kernel reduces ``dbias`` (the bias has no query rows of its own, ``Lqb = 1 < Lq``).

    Returns
    -------
    None
        The results are written into ``dk`` and ``dv`` (and added into ``dbias``).
    """
    g = geometry
    hq, lq, d_dim = q.shape[1], q.shape[2], q.shape[3]
    hk, lk, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hk
    nqb = (lq + BLOCK_Q - 1) // BLOCK_Q
    nkb = (lk + BLOCK_K - 1) // BLOCK_K
    for task in nb.prange((starts.shape[0] - 1) * nkb):
        grp = task // nkb
        kb = task % nkb
        j0 = kb * BLOCK_K
        bk = min(j0 + BLOCK_K, lk) - j0
        part = kb if dbias.shape[0] > 1 else 0
        tanh_t = np.empty((BLOCK_Q, BLOCK_K))
        s_buf, ds_buf, pk_buf = np.empty(BLOCK_Q * BLOCK_K), np.empty(BLOCK_Q * BLOCK_K), np.empty(BLOCK_Q * BLOCK_K)
        dk_part, dv_part = np.empty((bk, d_dim)), np.empty((bk, dv_dim))
        qs_buf = np.empty(BLOCK_Q * d_dim)
        dk_blk = np.empty((bk, d_dim))
        dv_blk = np.empty((bk, dv_dim))
        for pair in range(starts[grp], starts[grp + 1]):
            n, kvh = pairs[pair, 0], pairs[pair, 1]
            bn, mn, kn = maps[0, n], maps[1, n], maps[2, n]
            dk_blk[:, :] = 0.0
            dv_blk[:, :] = 0.0
            for h in range(kvh * group, (kvh + 1) * group):
                for qb in range(nqb):
                    i0 = qb * BLOCK_Q
                    i1 = min(i0 + BLOCK_Q, lq)
                    bq = i1 - i0
                    if j0 >= ranges[n, qb, 1] or j0 + bk <= ranges[n, qb, 0]:
                        continue
                    t = Tile(n=n, h=h, kvh=kvh, bn=bn, mn=mn, kn=kn, i0=i0, bq=bq, j0=j0, bk=bk)
                    qs = _scaled_rows(q, n, h, i0, bq, scaling, qs_buf)
                    s = _tile_logits(qs, k, bias, mask, seq, t, g, scaling, tanh_t, s_buf)
                    _tile_probabilities(s, t, lse, lk, g, seq)
                    ds = ds_buf[: bq * bk].reshape((bq, bk))
                    np.dot(d_o[n, h][i0:i1], v[n, kvh][j0 : j0 + bk].T, ds)
                    if g.has_keep:  # dv += P̃ᵀ dO
                        pk = pk_buf[: bq * bk].reshape((bq, bk))
                        for r in range(bq):
                            for jj in range(bk):
                                pk[r, jj] = s[r, jj] * keep[kn, h, i0 + r, j0 + jj]
                        np.dot(pk.T, d_o[n, h][i0:i1], dv_part)
                    else:
                        np.dot(s.T, d_o[n, h][i0:i1], dv_part)
                    dv_blk += dv_part
                    _tile_ds(s, ds, keep, t, g, scaling, delta, dl, lse, tanh_t, dbias, part, want_dbias)
                    np.dot(ds.T, q[n, h][i0:i1], dk_part)  # dk += scale dsᵀ q
                    dk_blk += dk_part
            for jj in range(bk):
                for d in range(d_dim):
                    dk[n, kvh, j0 + jj, d] = scaling.scale * dk_blk[jj, d]
                for c in range(dv_dim):
                    dv[n, kvh, j0 + jj, c] = dv_blk[jj, c]
