"""Attention flow: the Dinic kernel against networkx and the HiGHS linear programs (the definition), its
exactness on float capacities, determinism, the options, and mutation checks (specs/rollout.md, Flow)."""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import strategies as st

import refattn
from refattn import kernels
from refattn import rollout_flow as flow_mod
from refattn.testing.strategies import Case, flow_cases
from tests.mutation import property_table

needs_numba = pytest.mark.skipif(not kernels.numba_available(), reason="numba is not installed")
BACKENDS = ["numpy", pytest.param("numba", marks=needs_numba)]


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _a_hat(a, residual=0.5):
    """The textbook Â of one layer (mean fusion, renormalised), written independently."""
    m = residual * np.eye(a.shape[-1]) + (1 - residual) * a.mean(axis=-3)
    return m / m.sum(-1, keepdims=True)


def _graph(caps):
    """The layered graph as networkx builds it: every node of every layer, edge (l + 1, a) -> (l, b)."""
    nx = pytest.importorskip("networkx")
    depth, n, _ = caps.shape
    g = nx.DiGraph()
    g.add_nodes_from((layer, a) for layer in range(depth + 1) for a in range(n))
    for layer in range(depth):
        for a in range(n):
            for b in range(n):
                g.add_edge((layer + 1, a), (layer, b), capacity=float(caps[layer, a, b]))
    return g


def _networkx_flows(caps, pairs=None):
    """networkx's ``maximum_flow_value`` (preflow-push, float capacities) of each (source, sink) pair."""
    import networkx as nx

    g = _graph(caps)
    depth, n, _ = caps.shape
    pairs = [(i, j) for i in range(n) for j in range(n)] if pairs is None else pairs
    return np.array([nx.maximum_flow_value(g, (depth, i), (0, j)) for i, j in pairs])


def _networkx_maps_flow(maps, residual=0.5):
    caps = np.stack([_a_hat(a, residual) for a in maps])
    n = caps.shape[-1]
    return _networkx_flows(caps).reshape(n, n)


def _maps(seed, shape, sharpness=2.0):
    return _softmax(np.random.default_rng(seed).standard_normal(shape) * sharpness)


# ---- agreement with networkx and the LPs ------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layers, n", [(1, 3), (2, 4), (3, 3), (4, 5)])
def test_flow_agrees_with_networkx(layers, n, backend):
    maps = _maps(layers * 10 + n, (layers, 2, n, n))
    raw = _networkx_maps_flow(maps)
    got = refattn.attention_flow(maps, normalize=False, backend=backend)
    np.testing.assert_allclose(got, raw, rtol=1e-12, atol=1e-14)
    normalized = refattn.attention_flow(maps, backend=backend)
    np.testing.assert_allclose(normalized, raw / raw.sum(-1, keepdims=True), rtol=1e-12, atol=1e-14)


@needs_numba
@pytest.mark.parametrize(
    "layers, n, sharpness, pairs",
    [(12, 32, 2.0, [(0, 0), (3, 17), (31, 5)]), (4, 48, 6.0, [(1, 2), (47, 40)])],
    ids=["L12-n32", "L4-n48-peaked"],
)
def test_kernel_sized_flows_agree_with_networkx_and_the_lp(layers, n, sharpness, pairs):
    """Every pair by the kernel; a few of them by networkx and by HiGHS (each ~0.2 s a pair here)."""
    from scipy.optimize import linprog

    caps = np.stack([_a_hat(a) for a in _maps(n, (layers, 2, n, n), sharpness)])
    flows = kernels.layered_max_flows(caps)
    assert flows.shape == (n, n) and (flows > 0).all() and (flows <= 1 + 1e-12).all()
    got = np.array([flows[i, j] for i, j in pairs])
    np.testing.assert_allclose(got, _networkx_flows(caps, pairs), rtol=1e-12)
    np.testing.assert_allclose(got, [flow_mod._max_flow(caps, i, j, linprog) for i, j in pairs], rtol=1e-12)


@needs_numba
def test_sparse_and_tied_capacities_agree_with_networkx():
    """Zeros (unreachable nodes, dead ends), exact ties and capacities 7 decades apart."""
    rng = np.random.default_rng(5)
    for depth, n in [(3, 6), (5, 5), (6, 4)]:
        caps = rng.random((depth, n, n)) ** 3
        caps[rng.random(caps.shape) < 0.5] = 0.0
        caps[0] = np.round(caps[0] * 4) / 4
        caps[1] *= 1e-7
        np.testing.assert_allclose(
            kernels.layered_max_flows(caps).ravel(), _networkx_flows(caps), rtol=1e-12, atol=1e-15 * caps.max()
        )


def test_each_flow_is_at_most_one_and_scales_with_the_capacities():
    maps = _maps(3, (3, 2, 4, 4), 1.0)
    raw = refattn.attention_flow(maps, normalize=False, backend="numpy")
    assert (raw <= 1 + 1e-9).all() and (raw >= 0).all()
    from scipy.optimize import linprog

    caps = np.stack([_a_hat(a) for a in maps])
    for c in (0.5, 7.0):
        assert flow_mod._max_flow(c * caps, 1, 2, linprog) == pytest.approx(
            c * flow_mod._max_flow(caps, 1, 2, linprog), rel=1e-9
        )


def test_the_sparse_constraints_are_conservation_at_every_intermediate_node():
    """Row (layer − 1)·n + j of the LP's constraints: out of node (layer, j) minus into it."""
    depth, n = 3, 2
    a = flow_mod._conservation(depth, n).toarray().reshape((depth - 1) * n, depth, n, n)
    for layer in range(1, depth):
        for j in range(n):
            want = np.zeros((depth, n, n))
            want[layer - 1, j, :] += 1.0
            want[layer, :, j] -= 1.0
            np.testing.assert_array_equal(a[(layer - 1) * n + j], want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flow_output_layer_and_batch(backend):
    maps = _maps(4, (3, 2, 2, 3, 3), 1.0)
    full = refattn.attention_flow(maps, output_layer=2, backend=backend)
    for b in range(2):
        one = refattn.attention_flow(maps[:2, b], output_layer=2, backend=backend)
        np.testing.assert_allclose(full[b], one, rtol=1e-12, atol=1e-14)
    with pytest.raises(refattn.RefAttnError, match="output_layer"):
        refattn.attention_flow(maps, output_layer=4, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_layer_flows_are_its_capacities(backend):
    maps = _maps(6, (1, 2, 4, 4))
    got = refattn.attention_flow(maps, normalize=False, backend=backend)
    np.testing.assert_allclose(got, _a_hat(maps[0]), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_gives_the_cropped_flow_and_zero_padded_rows(backend):
    real = np.array([True, True, False, True, False])
    maps = _maps(7, (3, 2, 5, 5))
    maps = np.where(real, maps / (maps * real).sum(-1, keepdims=True), 9.0)  # garbage in the padded entries
    got = refattn.attention_flow(maps, mask=real, backend=backend)
    cropped = refattn.attention_flow(maps[..., real, :][..., real], backend=backend)
    np.testing.assert_allclose(got[np.ix_(real, real)], cropped, rtol=1e-12, atol=1e-14)
    assert (got[~real] == 0).all() and (got[:, ~real] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_output_node_without_flow_is_refused(backend):
    maps = np.full((2, 1, 3, 3), 1 / 3)
    maps[1, 0, 1] = 0.0  # residual 0: node 1 of the top layer has no edge out (a zero row stays 0)
    with pytest.raises(refattn.RefAttnError, match=r"output node 1 \(batch index \(\)\) carries no flow"):
        refattn.attention_flow(maps, residual=0.0, check_probabilities=False, backend=backend)


def test_bad_backend_is_refused_before_any_layer_is_read():
    def layers():
        raise AssertionError("a layer was read")
        yield

    with pytest.raises(refattn.RefAttnError, match="backend"):
        refattn.attention_flow(layers(), backend="gpu")


def test_auto_takes_the_kernel_from_the_lp_work_threshold(monkeypatch):
    chosen = []
    real = kernels.resolve_backend
    monkeypatch.setattr(kernels, "resolve_backend", lambda b, count, *a, **k: chosen.append(count) or real(b, count))
    refattn.attention_flow(_maps(8, (4, 2, 3, 2, 2)), backend="auto")
    assert chosen[-1] == 4 * 2**4 * 2  # L_o · n⁴ · batch: the LPs' work


_DETERMINISM = """
import hashlib, numpy as np, refattn
rng = np.random.default_rng(0)
e = np.exp(2 * rng.standard_normal((6, 2, 3, 2, 24, 24)))
maps = e / e.sum(-1, keepdims=True)
print(hashlib.sha256(refattn.attention_flow(maps, backend="numba", normalize=False).tobytes()).hexdigest())
"""


@needs_numba
def test_bitwise_identical_for_one_and_two_threads():
    digests = []
    for threads in ("1", "2"):
        env = {**os.environ, "NUMBA_NUM_THREADS": threads}
        run = subprocess.run([sys.executable, "-c", _DETERMINISM], capture_output=True, text=True, env=env, check=True)
        digests.append(run.stdout.strip())
    assert len(set(digests)) == 1, digests


# ---- properties and their mutants -------------------------------------------------------------


@st.composite
def layered_graphs(draw):
    """Random layered graphs ``caps (Lo, n, n)``, Lo in 1..4, n in 1..5: capacities ``u³`` (many small
    ones), a drawn share of zeros, exact ties (quarters) or not, scaled by 10^-3 .. 10^3."""
    depth, n = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    caps = rng.random((depth, n, n)) ** 3
    caps[rng.random(caps.shape) < draw(st.sampled_from([0.0, 0.3, 0.6]))] = 0.0
    if draw(st.booleans()):
        caps = np.round(caps * 4) / 4
    return Case((caps * 10.0 ** draw(st.integers(-3, 3)),), {})


def check_kernel_equals_networkx(case):
    (caps,) = case.inputs
    got = kernels.layered_max_flows(caps).ravel()
    np.testing.assert_allclose(got, _networkx_flows(caps), rtol=1e-12, atol=1e-14 * caps.max())


def check_kernel_equals_the_lp(case):
    numba = refattn.attention_flow(*case.inputs, **case.options, backend="numba")
    lp = refattn.attention_flow(*case.inputs, **case.options, backend="numpy")
    np.testing.assert_allclose(numba, lp, rtol=1e-12, atol=1e-14)


def check_flows_scale_with_the_capacities(case):
    """``flow(c · caps) = c · flow(caps)``, down to capacities far below 1e-15 (the threshold is relative)."""
    (caps,) = case.inputs
    want = kernels.layered_max_flows(caps)
    for c in (1e-20, 1e20):
        np.testing.assert_allclose(kernels.layered_max_flows(c * caps), c * want, rtol=1e-12, atol=1e-14 * c)


def _first_phase_only(mp):
    """One blocking flow on the layered DAG, never rerouting through reverse arcs (the Python twin of the
    kernel with its later phases removed)."""
    from refattn.kernels import flow_kernels as fk

    mp.setattr(fk, "_phase_levels", lambda *args: fk._UNSEEN)
    mp.setattr(fk, "_blocking_flow", fk._blocking_flow.py_func)

    def flows(caps):
        depth, n = caps.shape[-3:-1]
        arrays = [np.empty((depth, n, n)), np.empty((depth, n, n)), np.empty(n), np.empty(n)]  # R, FT, rs, rt
        level_and_arcs = [np.empty((depth, n), np.int64) for _ in range(2)]
        queue_and_path = [np.empty(depth * n + 2, np.int64) for _ in range(4)]
        eps = kernels.FLOW_EPS * caps.max()
        work = (*arrays, *level_and_arcs, *queue_and_path)
        return np.array([[fk._max_flow.py_func(caps, i, j, eps, *work) for j in range(n)] for i in range(n)])

    mp.setattr(kernels, "layered_max_flows", flows)


def _absolute_threshold(mp):
    """Arcs saturated below 1e-15 whatever the capacities' scale."""
    pair_flows = kernels._compile("flow_kernels", kernels._flow_signatures)["pair_flows"]

    def flows(caps):
        graphs = np.ascontiguousarray(caps, dtype=np.float64).reshape((-1,) + caps.shape[-3:])
        graphs.flags.writeable = False
        eps = np.full(graphs.shape[0], kernels.FLOW_EPS)
        eps.flags.writeable = False
        out = np.zeros((graphs.shape[0],) + caps.shape[-2:])
        pair_flows(caps=graphs, eps=eps, out=out)
        return out.reshape(caps.shape[:-3] + caps.shape[-2:])

    mp.setattr(kernels, "layered_max_flows", flows)


def _sources_and_sinks_swapped(mp):
    real = kernels.layered_max_flows
    mp.setattr(kernels, "layered_max_flows", lambda caps: np.swapaxes(real(caps), -1, -2))


PROPERTIES = [
    (check_kernel_equals_networkx, layered_graphs(), "first_phase_only"),
    (check_kernel_equals_the_lp, flow_cases(), "sources_and_sinks_swapped"),
    (check_flows_scale_with_the_capacities, layered_graphs(), "absolute_threshold"),
]
MUTANTS = {
    "first_phase_only": _first_phase_only,
    "absolute_threshold": _absolute_threshold,
    "sources_and_sinks_swapped": _sources_and_sinks_swapped,
}

test_property, test_property_catches_its_mutant = (
    needs_numba(t) for t in property_table(PROPERTIES, MUTANTS)
)  # every property runs the kernel
