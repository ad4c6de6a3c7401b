"""Rollout: properties, streaming memory, and mutation checks (attention flow: tests/test_flow.py)."""

import tracemalloc

import numpy as np
import pytest

import refattn
from refattn import rollout_flow as rollout_mod
from refattn.testing.strategies import Case, rollout_cases, rollout_discard_cases
from tests.mutation import property_table

CLOSE = dict(rtol=1e-12, atol=1e-13)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _a_hat(a, residual=0.5):
    """The textbook Â of one layer (mean fusion, renormalised), written independently."""
    m = residual * np.eye(a.shape[-1]) + (1 - residual) * a.mean(axis=-3)
    return m / m.sum(-1, keepdims=True)


def _plain(case):
    """Options without mask/discard (the naive-product reference below handles only those); maps drawn
    with a mask are normalised over the real tokens only, so their rows are renormalised over all."""
    (maps,) = case.inputs
    opts = {k: v for k, v in case.options.items() if k in ("residual", "start_layer")}
    return Case((maps / maps.sum(axis=-1, keepdims=True),), opts)


# ---- properties --------------------------------------------------------------------------------


def check_rows_stochastic_and_nonnegative(case):
    opts = {k: v for k, v in case.options.items() if k not in ("renormalize", "return_all")}
    r = refattn.rollout(*case.inputs, **opts)
    assert (r >= 0).all()
    real = opts.get("mask", np.ones(r.shape[-1], dtype=bool))
    np.testing.assert_allclose(r.sum(-1)[..., real], 1.0, **CLOSE)


def check_equals_naive_product_of_all_prefixes(case):
    (maps,) = case.inputs
    o = case.options
    start = o.get("start_layer", 0)
    hats = [_a_hat(a, o.get("residual", 0.5)) for a in maps[start:]]
    want, r = [], np.eye(maps.shape[-1])
    for h in hats:
        r = h @ r  # later layers on the left
        want.append(r)
    np.testing.assert_allclose(refattn.rollout(maps, return_all=True, **o), np.stack(want), **CLOSE)


def check_mean_fusion_invariant_to_head_permutation(case):
    (maps,) = case.inputs
    o = {**case.options, "head_fusion": "mean"}
    perm = np.arange(maps.shape[-3])[::-1]
    np.testing.assert_allclose(refattn.rollout(maps[..., perm, :, :], **o), refattn.rollout(maps, **o), **CLOSE)


def check_padding_equals_cropping(case):
    (maps,) = case.inputs
    o = {k: v for k, v in case.options.items() if k != "mask"}
    real = case.options.get("mask", np.ones(maps.shape[-1], dtype=bool))
    r = refattn.rollout(maps, mask=real, **o)
    crop = refattn.rollout(maps[..., real, :][..., real], **o)
    np.testing.assert_allclose(r[..., real, :][..., real], crop, **CLOSE)
    assert (r[..., ~real, :] == 0).all() and (r[..., :, ~real] == 0).all()


def check_rows_path_equals_rows_of_the_full_rollout(case):
    (maps,) = case.inputs
    o = {k: v for k, v in case.options.items() if k != "return_all"}
    full = refattn.rollout(maps, **o)
    n = maps.shape[-1]
    np.testing.assert_allclose(refattn.rollout(maps, rows=0, **o), full[..., 0, :], **CLOSE)
    picked = [n - 1, 0]
    np.testing.assert_allclose(refattn.rollout(list(maps), rows=picked, **o), full[..., picked, :], **CLOSE)


def test_rows_path_needs_a_sequence_and_has_gradients():
    maps = _softmax(np.random.default_rng(5).standard_normal((3, 2, 4, 4)))
    with pytest.raises(refattn.RefAttnError, match="last first"):
        refattn.rollout(iter(maps), rows=0)
    with pytest.raises(refattn.RefAttnError, match="rows"):
        refattn.rollout(maps, rows=[4])

    from refattn.testing import gradcheck

    # finite differences step off the probability simplex: the check is off for them
    opts = {"rows": [2, 0], "residual": 0.3, "check_probabilities": False}
    assert gradcheck(refattn.rollout, refattn.rollout_backward, (maps,), options=opts).passed


def test_identity_layers_give_identity():
    eye = np.broadcast_to(np.eye(5), (4, 2, 5, 5))
    np.testing.assert_array_equal(refattn.rollout(eye), np.eye(5))


def test_one_layer_gives_its_a_hat():
    a = _softmax(np.random.default_rng(0).standard_normal((1, 3, 4, 4)))
    np.testing.assert_allclose(refattn.rollout(a), _a_hat(a[0]), **CLOSE)


def test_non_commuting_layers_fix_the_product_order():
    rng = np.random.default_rng(1)
    maps = _softmax(rng.standard_normal((2, 1, 4, 4)) * 3)
    h1, h2 = _a_hat(maps[0]), _a_hat(maps[1])
    assert np.abs(h2 @ h1 - h1 @ h2).max() > 1e-2
    np.testing.assert_allclose(refattn.rollout(maps), h2 @ h1, **CLOSE)


def test_discard_is_per_row_with_ties_to_the_lower_index():
    a = np.array([[[[0.1, 0.1, 0.3, 0.5], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]]]])
    r = refattn.rollout(a, discard_ratio=0.5, residual=0.0, renormalize=False)
    assert r[0].tolist() == [0.0, 0.0, 0.3, 0.5]
    assert r[1].tolist() == [0.4, 0.3, 0.0, 0.0]
    assert r[2].tolist() == [0.0, 0.0, 0.25, 0.25]  # ties: the lower indices go first


def _peak_bytes(layers, heads=4, n=192):
    base = _softmax(np.random.default_rng(2).standard_normal((heads, n, n)))

    def stream():
        for i in range(layers):
            yield np.roll(base, i, axis=-1)  # one new layer per step, as a model's hook would hand them over

    tracemalloc.start()
    refattn.rollout(stream())
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, heads * n * n * 8


def test_an_iterator_of_many_large_layers_keeps_peak_memory_at_a_few_layers():
    shallow, layer_bytes = _peak_bytes(4)
    deep, _ = _peak_bytes(16)
    assert deep < shallow + layer_bytes // 2, (shallow, deep)  # no growth with depth
    assert deep < 3 * layer_bytes, (deep, layer_bytes)  # a few layers' worth, temporaries included


def test_bad_arguments_are_named():
    a = np.full((1, 1, 2, 2), 0.5)
    with pytest.raises(refattn.RefAttnError, match="residual"):
        refattn.rollout(a, residual=1.5)
    with pytest.raises(refattn.RefAttnError, match="head_fusion"):
        refattn.rollout(a, head_fusion="median")
    with pytest.raises(refattn.RefAttnError, match="start_layer"):
        refattn.rollout(a, start_layer=3)
    with pytest.raises(refattn.RefAttnError, match=r"attentions\[1\]"):
        refattn.rollout([a[0], np.full((1, 3, 3), 1 / 3)])
    with pytest.raises(refattn.RefAttnError, match="square"):
        refattn.rollout(np.ones((1, 1, 2, 3)))


# ---- the discard over the whole map (vit-explain) and protected entries ----------------------------


def vit_explain_rollout(attentions, discard_ratio, head_fusion):
    """jacobgil/vit-explain ``vit_rollout.py: rollout`` transcribed in NumPy (batch of one), line by line,
    with ``keepdim=True`` in the row normalisation (its issue #16: ``a / a.sum(dim=-1)`` divides columns)
    and its ``mask = result[0, 0, 1:]`` post-processing left out: the rollout matrix itself."""
    result = np.eye(attentions[0].shape[-1])
    for attention in attentions:
        if head_fusion == "mean":
            attention_heads_fused = attention.mean(axis=1)
        elif head_fusion == "max":
            attention_heads_fused = attention.max(axis=1)
        else:
            attention_heads_fused = attention.min(axis=1)
        # Drop the lowest attentions, but don't drop the class token
        flat = attention_heads_fused.reshape(attention_heads_fused.shape[0], -1)  # a view, as torch's .view
        k = int(flat.shape[-1] * discard_ratio)
        indices = np.argsort(flat, axis=-1, kind="stable")[:, :k]  # flat.topk(k, -1, largest=False)
        indices = indices[indices != 0]
        flat[0, indices] = 0
        eye = np.eye(attention_heads_fused.shape[-1])
        a = (attention_heads_fused + 1.0 * eye) / 2
        a = a / a.sum(axis=-1, keepdims=True)
        result = a @ result
    return result


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.1, 0.5, 0.9])
def test_map_scope_equals_vit_explain(head_fusion, discard_ratio):
    rng = np.random.default_rng(int(discard_ratio * 10) + len(head_fusion))
    maps = _softmax(rng.standard_normal((4, 1, 3, 7, 7)) * 2)  # (L, B = 1, H, n, n), tie-free
    want = vit_explain_rollout(list(maps.copy()), discard_ratio, head_fusion)
    got = refattn.rollout(maps, head_fusion=head_fusion, discard_ratio=discard_ratio, discard_scope="map")
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    if discard_ratio >= 0.5:  # a real difference, not a relabelling: the per-row discard differs
        per_row = refattn.rollout(maps, head_fusion=head_fusion, discard_ratio=discard_ratio)
        assert np.abs(per_row - want).max() > 1e-3


def _one_layer_fused(case):
    """One layer, its fused map returned as it is: residual 0, no renormalisation."""
    (maps,) = case.inputs
    o = {k: v for k, v in case.options.items() if k in ("head_fusion", "mask", "discard_scope", "protect")}
    return Case((maps[:1],), {**o, "discard_ratio": case.options.get("discard_ratio", 0.5)})


def check_discard_removes_the_smallest_real_entries(case):
    """Exactly the ⌊r·count⌋ smallest real entries of each row ("row") or of the map ("map") are 0,
    minus the protected ones among them ([CLS] by default under "map")."""
    (maps,) = case.inputs
    o = case.options
    scope, r = o.get("discard_scope", "row"), o["discard_ratio"]
    fused = {"mean": np.mean, "max": np.max, "min": np.min}[o["head_fusion"]](maps[0], axis=0)  # (n, n)
    n = fused.shape[-1]
    real = o.get("mask", np.ones(n, dtype=bool))
    got = refattn.rollout(maps, residual=0.0, renormalize=False, **o)
    protect = o.get("protect")
    if protect is None:
        protect = [(int(np.argmax(real)),) * 2] if scope == "map" else []
    spared = np.zeros((n, n), dtype=bool)
    for i, j in protect:
        spared[i, j] = True
    pair = real[:, None] & real[None, :]
    want = np.where(pair, fused, 0.0)
    groups = [(i, real) for i in np.flatnonzero(real)] if scope == "row" else [(None, None)]
    for row, _ in groups:
        entries = [(row, j) for j in np.flatnonzero(real)] if scope == "row" else list(zip(*np.nonzero(pair)))
        values = np.array([fused[e] for e in entries])
        k = int(np.floor(r * (real.sum() if scope == "row" else real.sum() ** 2)))
        for e in np.array(entries)[np.argsort(values, kind="stable")[:k]]:
            if not spared[tuple(e)]:
                want[tuple(e)] = 0.0
    np.testing.assert_array_equal(got, want)


def check_map_discard_gradient_holds_the_selection(case):
    """rollout_backward through a map-wide discard: a random direction against central differences
    (the strategy keeps every selection away from a tie)."""
    from refattn.testing import check_vjp

    o = {**case.options, "discard_scope": "map", "discard_ratio": case.options.get("discard_ratio", 0.25)}
    assert check_vjp(refattn.rollout, refattn.rollout_backward, case.inputs, options=o, rtol=1e-8).passed


def test_protect_works_in_either_scope_and_is_checked():
    a = np.array([[[[0.1, 0.1, 0.3, 0.5], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]]]])
    o = dict(discard_ratio=0.5, residual=0.0, renormalize=False)
    r = refattn.rollout(a, protect=[(0, 0), (1, 3)], **o)
    assert r[0].tolist() == [0.1, 0.0, 0.3, 0.5]  # (0, 0) spared: only (0, 1) goes
    assert r[1].tolist() == [0.4, 0.3, 0.0, 0.1]
    # the whole map: its 8 smallest of 16 entries (six 0.1, the 0.2, the first 0.25: ties go to the lower
    # flat index), [CLS]→[CLS] spared by default, so 7 go
    m = refattn.rollout(a, discard_scope="map", **o)
    assert m.tolist() == [[0.1, 0.0, 0.3, 0.5], [0.4, 0.3, 0.0, 0.0], [0.0, 0.25, 0.25, 0.25], [0.7, 0.0, 0.0, 0.0]]
    nothing = refattn.rollout(a, discard_scope="map", protect=(), **o)
    assert nothing[0].tolist() == [0.0, 0.0, 0.3, 0.5]
    with pytest.raises(refattn.RefAttnError, match="discard_scope"):
        refattn.rollout(a, discard_scope="column")
    with pytest.raises(refattn.RefAttnError, match="protect"):
        refattn.rollout(a, protect=[(4, 0)])
    with pytest.raises(refattn.RefAttnError, match="protect"):
        refattn.rollout(a, protect=[[0, 1, 2]])  # neither flat indices nor pairs


def test_the_kernel_takes_only_layers_without_a_discard():
    opts = rollout_mod._options(0.5, "mean", 0, 0.2, True, discard_scope="map")  # ⌊0.2·3⌋ = 0, ⌊0.2·9⌋ = 1
    a = np.ones((2, 3, 3)) / 3
    assert not rollout_mod._kernel_applies(a, opts, None, "numba")
    assert rollout_mod._discarded(opts._replace(discard_scope="row"), 3) == 0
    maps = _softmax(np.random.default_rng(8).standard_normal((2, 1, 2, 3, 3)))
    for backend in ("numpy", "numba"):
        pytest.importorskip("numba") if backend == "numba" else None
        got = refattn.rollout(maps, discard_ratio=0.2, discard_scope="map", backend=backend)
        np.testing.assert_array_equal(got, vit_explain_rollout(list(maps.copy()), 0.2, "mean"))


# ---- the property table and its mutants ---------------------------------------------------------

PROPERTIES = [
    (check_rows_stochastic_and_nonnegative, rollout_cases(), "renormalisation_without_keepdims"),
    (check_equals_naive_product_of_all_prefixes, rollout_cases().map(_plain), "earlier_layers_on_the_left"),
    (check_mean_fusion_invariant_to_head_permutation, rollout_cases(), "first_head_only"),
    (check_padding_equals_cropping, rollout_cases(), "padding_not_removed"),
    (check_rows_path_equals_rows_of_the_full_rollout, rollout_cases(), "rows_chained_first_layer_first"),
    (
        check_discard_removes_the_smallest_real_entries,
        rollout_discard_cases().map(_one_layer_fused),
        ("map_discard_counts_a_row", "cls_not_protected"),
    ),
    (
        check_map_discard_gradient_holds_the_selection,
        rollout_discard_cases(for_gradcheck=True).filter(lambda c: c.options.get("discard_scope") == "map"),
        "map_discard_gradient_not_masked",
    ),
]


def _fuse_mutant(change):
    def patch(mp):
        real = rollout_mod._fuse
        mp.setattr(rollout_mod, "_fuse", lambda a, opts, valid, *name: change(real, a, opts, valid))

    return patch


def _divide_columns(m):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.nan_to_num(m / m.sum(axis=-1)[..., None, :])


def _earlier_layers_on_the_left(mp):
    """The column-vector form without transposes: Â_1 ⋯ Â_k instead of Â_k ⋯ Â_1."""
    real = rollout_mod.rollout

    def mutant(attentions, *, return_all=False, start_layer=0, **o):
        maps = np.asarray(attentions)[start_layer:]
        prefixes = [real(maps[: k + 1][::-1], **o) for k in range(len(maps))]
        return np.stack(prefixes) if return_all else prefixes[-1]

    mp.setattr(refattn, "rollout", mutant)


def _only_given_pairs(real):
    """vit-explain without ``indices[indices != 0]``: the default protects nothing."""
    return lambda opts, valid, shape: None if opts.protect is None else real(opts, valid, shape)


MUTANTS = {
    # vit-explain issue #16: dividing by a row sum without keepdims divides columns instead of rows
    "renormalisation_without_keepdims": _fuse_mutant(
        lambda real, a, o, v: (lambda f: f._replace(a_hat=_divide_columns(f.m)))(real(a, o, v))
    ),
    "earlier_layers_on_the_left": _earlier_layers_on_the_left,
    "rows_chained_first_layer_first": lambda mp: mp.setattr(
        rollout_mod,
        "_rollout_rows",
        lambda attentions, opts, mask, rows, backend: (lambda r: r[..., rows, :])(
            rollout_mod.rollout(list(attentions)[::-1], **opts._asdict(), mask=mask)
        ),
    ),
    "first_head_only": _fuse_mutant(lambda real, a, o, v: real(a[..., :1, :, :], o, v)),
    "padding_not_removed": _fuse_mutant(lambda real, a, o, v: real(a, o, None)),
    "map_discard_counts_a_row": lambda mp: mp.setattr(
        rollout_mod, "_discarded", lambda opts, n_real: np.floor(opts.discard_ratio * np.asarray(n_real)).astype(int)
    ),
    "cls_not_protected": lambda mp: mp.setattr(rollout_mod, "_spared", _only_given_pairs(rollout_mod._spared)),
    # the backward forgetting that a discarded entry has no gradient
    "map_discard_gradient_not_masked": _fuse_mutant(
        lambda real, a, o, v: (lambda f: f._replace(keep=None))(real(a, o, v))
    ),
}


test_property, test_property_catches_its_mutant = property_table(PROPERTIES, MUTANTS)


def test_protect_takes_vit_explains_flat_indices_or_pairs():
    """protect=(0,) is vit-explain's flat index 0, the entry (0, 0); a flat index k is (k // n, k % n)."""
    rng = np.random.default_rng(21)
    maps = [refattn.softmax(rng.standard_normal((2, 3, 5, 5))) for _ in range(3)]
    opts = dict(discard_ratio=0.5, discard_scope="map")
    np.testing.assert_array_equal(
        refattn.rollout(maps, **opts, protect=(0,)), refattn.rollout(maps, **opts, protect=[(0, 0)])
    )
    np.testing.assert_array_equal(
        refattn.rollout(maps, **opts, protect=(7, 24)), refattn.rollout(maps, **opts, protect=[(1, 2), (4, 4)])
    )
    with pytest.raises(refattn.RefAttnError, match=r"protect: expected flat indices in \[-25, 25\), got 25"):
        refattn.rollout(maps, **opts, protect=(25,))
