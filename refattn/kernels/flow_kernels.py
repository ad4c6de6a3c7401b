"""Numba kernel for attention flow: the maximum flow from every node of the output layer to every input
token of the layered graph (Abnar & Zuidema 2020), by Dinic's algorithm on float64 capacities.

The definition is the linear program of ``refattn.rollout_flow._max_flow`` (solved by HiGHS, the NumPy
backend); results agree to ≤ 1e-12 (``specs/rollout.md``, Flow).  Tasks own one (map, source) pair and
solve its ``n`` sinks one after another, each from a zero flow, so results are bitwise identical for any
number of threads.
"""

import numba as nb
import numpy as np

_UNSEEN = 1 << 62  # the level of a node the search has not reached (or found to be a dead end)


@nb.njit(cache=True)
def _phase_levels(R, FT, rs, rt, eps, level, qs, qa):
    """BFS levels from the source over the residual arcs ``> eps``; returns the sink's level, or
    ``_UNSEEN`` when it cannot be reached (the flow is then maximum).

    ``level[l, a]`` of node ``(l, a)``, l = 1..top; the source is level 0.  The search stops at the
    first layer-1 node with an open sink arc: every node of a lower level is labelled by then (FIFO),
    and no node of the sink's level or above can lie on a shortest path."""
    top = level.shape[0] - 1
    n = level.shape[1]
    for l in range(1, top + 1):
        for a in range(n):
            level[l, a] = _UNSEEN
    tail = 0
    for b in range(n):
        if rs[b] > eps:
            level[top, b] = 1
            qs[tail] = top
            qa[tail] = b
            tail += 1
    head = 0
    while head < tail:
        l = qs[head]
        a = qa[head]
        head += 1
        d = level[l, a]
        if l == 1:
            if rt[a] > eps:
                return d + 1
        else:
            row = R[l - 1, a]  # down arcs (l, a) -> (l - 1, b)
            for b in range(n):
                if row[b] > eps and level[l - 1, b] == _UNSEEN:
                    level[l - 1, b] = d + 1
                    qs[tail] = l - 1
                    qa[tail] = b
                    tail += 1
        if l < top:
            row = FT[l, a]  # up arcs (l, a) -> (l + 1, c): the flow on (l + 1, c) -> (l, a)
            for c in range(n):
                if row[c] > eps and level[l + 1, c] == _UNSEEN:
                    level[l + 1, c] = d + 1
                    qs[tail] = l + 1
                    qa[tail] = c
                    tail += 1
    return _UNSEEN


@nb.njit(cache=True)
def _blocking_flow(R, FT, rs, rt, eps, level, tlev, arcs, it, sl, sa):
    """Augment along shortest paths (levels +1 per arc) until none is left; returns the flow added.

    A depth-first search from the source with a current arc per node (``it``); a node without an
    admissible arc is a dead end (its level set to ``_UNSEEN``).  ``arcs``: ``n`` (down arcs only, the
    first phase: no flow yet, so no up arc) or ``2n`` (down, then up).  Each augmentation subtracts
    the bottleneck ``delta`` (one of the residuals on the path, so that arc becomes exactly 0) and adds
    it to the reverse arcs; the search resumes at the tail of the first arc left ``<= eps``."""
    top = level.shape[0] - 1
    n = level.shape[1]
    for l in range(1, top + 1):
        for a in range(n):
            it[l, a] = 0
    added = 0.0
    src_it = 0  # the source's current arc
    depth = 0  # sl/sa[1..depth]: the path's nodes below the source
    while True:
        if depth == 0:
            while src_it < n and not (rs[src_it] > eps and level[top, src_it] == 1):
                src_it += 1
            if src_it == n:
                return added
            depth = 1
            sl[1] = top
            sa[1] = src_it
            continue
        l = sl[depth]
        a = sa[depth]
        d = level[l, a]
        if l == 1 and d + 1 == tlev and rt[a] > eps:  # the sink arc is admissible: augment
            delta = min(rs[sa[1]], rt[a])
            for k in range(1, depth):
                l1, l2 = sl[k], sl[k + 1]
                r = R[l2, sa[k], sa[k + 1]] if l2 < l1 else FT[l1, sa[k], sa[k + 1]]
                if r < delta:
                    delta = r
            added += delta
            first = depth  # the tail of the first arc left closed (depth: the sink arc's, re-tested)
            rs[sa[1]] -= delta
            if not rs[sa[1]] > eps:
                first = 0
            for k in range(1, depth):
                l1, l2 = sl[k], sl[k + 1]
                a1, a2 = sa[k], sa[k + 1]
                if l2 < l1:  # down: (l1, a1) -> (l1 - 1, a2)
                    r = R[l2, a1, a2] - delta
                    R[l2, a1, a2] = r
                    FT[l2, a2, a1] += delta
                else:  # up: cancels flow on (l1 + 1, a2) -> (l1, a1)
                    r = FT[l1, a1, a2] - delta
                    FT[l1, a1, a2] = r
                    R[l1, a2, a1] += delta
                if not r > eps and k < first:
                    first = k
            rt[a] -= delta
            depth = first
            continue
        k = it[l, a]
        if l == 1 and k < n:
            k = n  # layer 1's only down arc is the sink's, tested above
        while k < arcs:
            if k < n:
                if R[l - 1, a, k] > eps and level[l - 1, k] == d + 1 and d + 1 < tlev:
                    break
            elif l < top:
                c = k - n
                if FT[l, a, c] > eps and level[l + 1, c] == d + 1 and d + 1 < tlev:
                    break
            k += 1
        it[l, a] = k
        if k < arcs:
            depth += 1
            sl[depth] = l - 1 if k < n else l + 1
            sa[depth] = k if k < n else k - n
            continue
        level[l, a] = _UNSEEN  # a dead end: retreat
        depth -= 1
        if depth == 0:
            src_it += 1
        else:
            it[sl[depth], sa[depth]] += 1


@nb.njit(cache=True)
def _max_flow(C, src, snk, eps, R, FT, rs, rt, level, it, qs, qa, sl, sa):
    """The maximum flow from ``(Lo, src)`` to ``(0, snk)`` in the layered graph ``C (Lo, n, n)`` (edge
    ``(l + 1, a) -> (l, b)`` of capacity ``C[l, a, b]``), by Dinic's algorithm from a zero flow.

    Residuals: ``rs[b]`` of the source arc to ``(Lo − 1, b)``, ``rt[a]`` of ``(1, a)``'s arc to the
    sink, and for the interior layers l = 1..Lo−2 ``R[l, a, b]`` of ``(l + 1, a) -> (l, b)`` and
    ``FT[l, b, a]`` its flow (the residual of the reverse arc, stored lower node first so that a
    node's up arcs are one contiguous row).  The other top nodes never carry flow and the other
    bottom nodes are dead ends: neither is a node here.  Stops when the source or the sink has no
    open arc left, or when the search finds no path; an arc is open when its residual is ``> eps``."""
    Lo, n, _ = C.shape
    if Lo == 1:
        return C[0, src, snk]
    top = Lo - 1
    for b in range(n):
        rs[b] = C[top, src, b]
        rt[b] = C[0, b, snk]
    for l in range(1, top):
        R[l] = C[l]
        FT[l] = 0.0
    total = 0.0
    phase = 0
    while True:
        if phase == 0:  # no flow: every arc goes down one layer, so the levels are the layers'
            for l in range(1, top + 1):
                for a in range(n):
                    level[l, a] = Lo - l
            tlev = Lo
        else:
            tlev = _phase_levels(R, FT, rs, rt, eps, level, qs, qa)
            if tlev == _UNSEEN:
                break
        phase += 1
        total += _blocking_flow(R, FT, rs, rt, eps, level, tlev, n if phase == 1 else 2 * n, it, sl, sa)
        source_open = False
        sink_open = False
        for b in range(n):
            source_open |= rs[b] > eps
            sink_open |= rt[b] > eps
        if not (source_open and sink_open):  # a saturated cut: the flow is maximum
            break
    return total


@nb.njit(parallel=True, cache=True)
def pair_flows(caps, eps, out):
    """``out[m, i, j]`` = the maximum flow from node i of the top layer to token j of the bottom layer
    of the layered graph ``caps[m]``, for every map m and pair (i, j).

    Tasks own one (map, source) pair (``prange`` over ``M·n``), with their own residual arrays, and
    solve the n sinks in order, each from a zero flow: bitwise identical for any number of threads.
    Compiled for one explicit signature; called by :func:`refattn.kernels.layered_max_flows`, by
    keyword.

    Parameters
    ----------
    caps : ndarray, shape (M, Lo, n, n)
        float64, C-contiguous, read only, ``>= 0``: ``caps[m, l, a, b]`` is the capacity of the edge
        from node ``(l + 1, a)`` to node ``(l, b)`` (layer 0: the input tokens, layer Lo: the sources).
    eps : ndarray, shape (M,)
        float64, C-contiguous, read only: map m's arcs count as saturated once their residual is
        ``<= eps[m]`` (``FLOW_EPS ×`` its largest capacity).
    out : ndarray, shape (M, n, n)
        float64, C-contiguous; receives the flows.

    Returns
    -------
    None
        The results are written into ``out``.
    """
    n_maps, depth, n, _ = caps.shape
    for task in nb.prange(n_maps * n):
        m = task // n
        i = task % n
        R = np.empty((depth, n, n))
        FT = np.empty((depth, n, n))
        rs = np.empty(n)
        rt = np.empty(n)
        level = np.empty((depth, n), np.int64)
        it = np.empty((depth, n), np.int64)
        qs = np.empty(depth * n, np.int64)
        qa = np.empty(depth * n, np.int64)
        sl = np.empty(depth * n + 2, np.int64)
        sa = np.empty(depth * n + 2, np.int64)
        for j in range(n):
            out[m, i, j] = _max_flow(caps[m], i, j, eps[m], R, FT, rs, rt, level, it, qs, qa, sl, sa)
