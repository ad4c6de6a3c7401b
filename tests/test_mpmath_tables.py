"""The hard points of issue 11 against 50-digit mpmath values stored as data
(tests/data/hard_points_mpmath.json, written by tests/data/make_mpmath_tables.py).

Softmax, log-softmax and log-sum-exp at extreme logits (±700, spreads to 1e5, near-ties, unmasked
``-inf``), entropy near 0 and near log n, entropy from logits, Jensen–Shannon divergence and
distance from log 2 down to ≈ 1e-31, linear attention and the split-KV merge: forward and
backward, each within 1e-14 of mpmath relative to its row (``_rel_error``; the log-sum-exp of
each attention row, and its gradient, entry by entry).  A case with a looser bound says why.
"""

import json
import pathlib

import numpy as np
import pytest

from refattn import softmax_family
from refattn.attention import linear, tiled
from refattn.metrics import distribution

TABLE = json.loads((pathlib.Path(__file__).parent / "data" / "hard_points_mpmath.json").read_text())
TOL = TABLE["tolerance"]

softmax_mod = softmax_family
dist_mod = distribution

OPS = {  # op -> (its module, names of the outputs); the backward is op + "_backward"
    "softmax": (softmax_mod, ("out",)),
    "log_softmax": (softmax_mod, ("out",)),
    "logsumexp": (softmax_mod, ("out",)),
    "entropy": (dist_mod, ("out",)),
    "entropy_from_logits": (dist_mod, ("out",)),
    "js_divergence": (dist_mod, ("out",)),
    "js_distance": (dist_mod, ("out",)),
    "linear_attention": (linear, ("out",)),
    "combine_partials": (tiled, ("out", "lse")),
}


def _decode(x):
    if isinstance(x, dict) and "bool" in x:
        return np.array(x["bool"], dtype=bool)
    if isinstance(x, dict):
        return np.array([float(v) for v in x["values"]]).reshape(x["shape"])
    return x


def _expected(values, shape):
    return np.array([np.nan if v is None else float(v) for v in values]).reshape(shape)


ENTRYWISE = ("lse", "dlses")  # one value per attention row (the last axis is Lq): each its own relative error


def _rel_error(actual, expected, entrywise=False):
    """Per row of the last axis: ``max |actual − expected| / max |expected|`` (for a single value, its
    relative error), the worst over the rows; a row whose expected values are all 0 (a structural
    zero, e.g. the gradient of a row that does not depend on that input) is measured against the
    whole array's scale.  Non-finite expected entries must be matched exactly."""
    actual, expected = np.atleast_1d(actual), np.atleast_1d(expected)
    if entrywise:
        actual, expected = actual[..., None], expected[..., None]
    finite = np.isfinite(expected)
    assert np.array_equal(actual[~finite], expected[~finite]), "non-finite entries differ"
    err = np.where(finite, np.abs(actual - np.where(finite, expected, 0.0)), 0.0)
    size = np.where(finite, np.abs(expected), 0.0)
    scale = np.max(size, axis=-1, keepdims=True)
    scale = np.where(scale > 0, scale, np.max(size, initial=0.0))
    rel = np.where(scale > 0, err / np.where(scale > 0, scale, 1.0), np.where(err > 0, np.inf, 0.0))
    return float(np.max(rel, initial=0.0))


def _run(case):
    module, out_names = OPS[case["op"]]
    forward, backward = getattr(module, case["op"]), getattr(module, case["op"] + "_backward")
    inputs = [_decode(a) for a in case["inputs"].values()]
    options = {n: _decode(a) for n, a in case["options"].items()}
    outs = forward(*inputs, **options)
    outs = outs if isinstance(outs, tuple) else (outs,)
    cot = [_decode(c) for c in case["cotangents"]]
    extra = {"d_lse": cot[1]} if len(cot) > 1 else {}
    grads = backward(cot[0], *inputs, **extra, **options)
    return dict(zip(out_names, outs)), grads


@pytest.mark.parametrize("case", TABLE["cases"], ids=[c["name"] for c in TABLE["cases"]])
def test_forward_and_backward_match_mpmath(case):
    tol = {**TOL, **case.get("tolerance", {})}  # a looser bound comes with its reason, case["why"]
    assert tol == TOL or case.get("why")
    outs, grads = _run(case)
    for name, got in outs.items():
        err = _rel_error(got, _expected(case["expected"][name], np.shape(got)), name in ENTRYWISE)
        assert err <= tol["forward"], f"{name}: relative error {err:.3g}"
    checked = 0
    for field, values in case["expected"].items():
        if field.startswith("d"):
            got = getattr(grads, field)
            err = _rel_error(got, _expected(values, np.shape(got)), field in ENTRYWISE)
            assert err <= tol["backward"], f"{field}: relative error {err:.3g}"
            checked += 1
    assert checked == sum(g is not None for g in grads) or case["name"] == "js_divergence/disjoint_log2"


def test_the_table_covers_every_hard_point():
    names = {c["name"] for c in TABLE["cases"]}
    for op in ("softmax", "log_softmax", "logsumexp"):
        assert {f"{op}/pm700", f"{op}/huge_spread", f"{op}/near_ties", f"{op}/unmasked_neg_inf"} <= names
    js = sorted(
        float(json.loads(json.dumps(c["expected"]["out"]))[0]) for c in TABLE["cases"] if c["op"] == "js_divergence"
    )
    assert js[0] < 1e-29 and js[-1] == pytest.approx(np.log(2), rel=1e-15)  # from log 2 down to ~1e-31
    assert any(n.startswith("entropy/near_0") for n in names) and any(n.startswith("entropy/near_log_n") for n in names)
    assert any(n.startswith("linear_attention") for n in names) and any(n.startswith("combine_partials") for n in names)


def test_log_softmax_limit_at_an_unmasked_neg_inf_is_in_the_table():
    """The issue's example, in the table: ``dx_1 = dy_1`` at ``x_1 = -inf`` (mpmath's derivative at -10⁴)."""
    case = next(c for c in TABLE["cases"] if c["name"] == "log_softmax/unmasked_neg_inf")
    dy = _decode(case["cotangents"][0])
    assert float(case["expected"]["dx"][1]) == pytest.approx(dy[0, 1], rel=1e-15, abs=0.0)


def test_table_is_the_mpmath_evaluation_of_its_inputs():
    """Recompute a few forward values with mpmath: the stored data is not stale."""
    mp = pytest.importorskip("mpmath")
    from tests.data import make_mpmath_tables as gen

    by_name = {c[0]: c for c in gen._hard_cases()}
    for case in TABLE["cases"][::7]:
        _, op, inputs, _, fn, _ = by_name[case["name"]]
        want = gen._eval(fn, [gen._mp(np.asarray(a, dtype=np.float64)) for a in gen._flat_inputs(op, inputs)])
        for got, stored in zip(want[0], case["expected"]["out"]):
            if got == mp.ninf:
                assert stored == "-inf"
            else:
                assert abs(got - mp.mpf(stored)) <= mp.mpf("1e-20") * (1 + abs(got))


# ---- mutants: the cancellations this table was written to catch --------------------------------


def _js_kernel_by_definition(r):
    """``(1 + r) log1p(r) + (1 − r) log1p(−r)`` for every r: two O(r) terms cancel to O(r²)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(r > -1.0, (1.0 + r) * np.log1p(r), 0.0)
        down = np.where(r < 1.0, (1.0 - r) * np.log1p(-r), 0.0)
    return up + down


def _js_as_a_difference_of_entropies(P1, P2, *, mask=None, check_probabilities=True):
    """The formula before issue 11: ``½ Σ (p log p + q log q) − Σ m log m`` (O(d) terms, O(d²) sum)."""
    m1, m2, total, _ = dist_mod._js_parts(P1, P2, mask, check_probabilities)
    xlogx = dist_mod._xlogx
    js = 0.5 * (xlogx(m1.p) + xlogx(m2.p)).sum(axis=-1) - xlogx(0.5 * total).sum(axis=-1)
    return np.where(m1.rows, np.maximum(js, 0.0), 0.0)


def _lse_by_log_of_the_sum(mp):
    """``lse = m + log(Σ e^{s−m})``: a tail below ε rounds away (the form before issue 11)."""
    real = softmax_mod.normalize_last_axis

    def rounded(s, empty_rows, sink=None):
        nz = real(s, empty_rows, sink)
        log_tail = np.log(1.0 + np.expm1(nz.log_tail))  # log of the rounded sum 1 + t
        return nz._replace(lse=np.where(nz.empty, -np.inf, nz.shift + log_tail), log_tail=log_tail)

    mp.setattr(softmax_mod, "normalize_last_axis", rounded)
    mp.setattr(tiled, "normalize_last_axis", rounded)


def _vjp_with_cancellation(p, dp):
    delta = np.einsum("...j,...j->...", p, dp)
    return p * (dp - delta[..., None])


MUTANTS = {
    "js_kernel_by_definition": ("js_", lambda mp: mp.setattr(dist_mod, "_js_kernel", _js_kernel_by_definition)),
    "js_difference_of_entropies": (
        "js_divergence/",
        lambda mp: mp.setattr(dist_mod, "js_divergence", _js_as_a_difference_of_entropies),
    ),
    "lse_by_log_of_the_sum": ("", _lse_by_log_of_the_sum),
    "softmax_vjp_with_cancellation": (
        "softmax/",
        lambda mp: mp.setattr(softmax_mod, "softmax_vjp", _vjp_with_cancellation),
    ),
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_table_catches_its_mutant(mutant, monkeypatch):
    prefix, patch = MUTANTS[mutant]
    patch(monkeypatch)
    failed = []
    for case in TABLE["cases"]:
        if case["name"].startswith(prefix):
            try:
                test_forward_and_backward_match_mpmath(case)
            except AssertionError:
                failed.append(case["name"])
    assert failed, f"no case of the table fails on the mutant {mutant}"
