"""refattn.model.loops: the loop twin of the LM agrees with refattn.model.lm (logits, attention maps and
every gradient) within 1e-12, on every pair of options, and the comparison catches a broken twin."""

import numpy as np
import pytest

from refattn import RefAttnError
from refattn.model import lm, loops
from refattn.model.params import tree_items
from tests.model.test_lm import EVERY, EVERY_IDS, PAIRWISE, PAIRWISE_IDS, model
from tests.mutation import property_table

TOL = 1e-12


def _assert_close(got, want, name, floor=0.0):
    """``max|got − want| <= 1e-12 · max(max|want|, floor)``: relative to the array's scale (``floor``:
    for a gradient that is 0 in exact arithmetic, the scale of the whole gradient)."""
    scale = max(float(np.max(np.abs(want), initial=0.0)), floor, 1e-300)
    err = float(np.max(np.abs(np.asarray(got) - np.asarray(want)), initial=0.0))
    assert err <= TOL * scale, f"{name}: {err:.3e} > {TOL:g} · {scale:.3e}"


def check_agreement(m):
    """Logits, maps and every gradient of the loops twin against lm.py's."""
    opts = dict(config=m.config, mask=m.mask, head_mask=m.head_mask)
    logits, maps = lm.lm_forward(m.params, m.tokens, **opts, return_attentions=True)
    got, got_maps = loops.lm_forward_loops(m.params, m.tokens, **opts, return_attentions=True)
    _assert_close(got, logits, "logits")
    for i, (p, q) in enumerate(zip(got_maps, maps, strict=True)):
        _assert_close(p, q, f"attentions[{i}]")
    d = np.random.default_rng(3).standard_normal(logits.shape)
    want = lm.lm_backward(d, m.params, m.tokens, **opts)
    grads = loops.lm_backward_loops(d, m.params, m.tokens, **opts)
    items, want_items = tree_items(grads.dparams), tree_items(want.dparams)
    assert [n for n, _ in items] == [n for n, _ in want_items]
    floor = max(float(np.max(np.abs(g))) for _, g in want_items)
    for (n, g), (_, w) in zip(items, want_items):
        _assert_close(g, w, n, floor)
    _assert_close(grads.dhead_mask, want.dhead_mask, "dhead_mask")


@pytest.mark.parametrize("row", PAIRWISE, ids=PAIRWISE_IDS)
def test_the_loops_agree_with_lm_on_every_pair_of_options(row):
    check_agreement(model(*row["options"], causal=row["causal"], bias=row["bias"]))


@pytest.mark.parametrize("options", EVERY, ids=EVERY_IDS)
def test_the_loops_agree_with_lm_on_every_combination(options):
    k = EVERY.index(options)
    check_agreement(model(*options, n_layers=1, causal=k % 3 != 1, bias=k % 2 == 1, seed=k))


def test_without_a_head_mask_the_loops_give_no_head_mask_gradient():
    m = model("alibi", "layer", "post", "relu", True, 1)
    d = np.random.default_rng(0).standard_normal((2, 3, 5))
    grads = loops.lm_backward_loops(d, m.params, m.tokens, m.config, mask=m.mask)
    want = lm.lm_backward(d, m.params, m.tokens, m.config, mask=m.mask)
    assert grads.dhead_mask is None and want.dhead_mask is None
    _assert_close(grads.dparams.wte, want.dparams.wte, "wte")


def test_the_loops_validate_as_lm_does():
    m = model("learned", "rms", "pre", "gelu", False, 2)
    with pytest.raises(RefAttnError, match=r"^tokens: expected ids in \[0, vocab_size=5\)"):
        loops.lm_forward_loops(m.params, m.tokens + 5, m.config)
    with pytest.raises(RefAttnError, match=r"^d_logits: expected shape \(2, 3, 5\)"):
        loops.lm_backward_loops(np.zeros((2, 3)), m.params, m.tokens, m.config)
    with pytest.raises(RefAttnError, match="unknown option 'maks'"):
        loops.lm_forward_loops(m.params, m.tokens, m.config, maks=None)


# ---- the agreement check catches a broken twin ----------------------------------------------------


def _cases():
    from hypothesis import strategies as st

    from tests.model.test_lm import FACTORS

    return st.tuples(*(st.sampled_from(f) for f in FACTORS), st.booleans(), st.integers(0, 50))


def loops_agree_with_lm(drawn):
    *options, causal, seed = drawn
    check_agreement(model(*options, n_layers=1, causal=causal, seed=seed))


def _alibi_slopes_reversed(monkeypatch):
    real = loops._slopes
    monkeypatch.setattr(loops, "_slopes", lambda n: real(n)[::-1])


def _rms_backward_without_the_projection(monkeypatch):
    """RMSNorm's backward missing the ``− x Σ(g x) / (E r³)`` term (the part through r)."""
    real = loops._norm_backward

    def broken(dy, x, p, config):
        dx, g = real(dy, x, p, config)
        if config.norm == "rms":
            r = np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + config.norm_eps)
            dx = dy * p.weight / r
        return dx, g

    monkeypatch.setattr(loops, "_norm_backward", broken)


PROPERTIES = [(loops_agree_with_lm, _cases(), ("alibi_slopes_reversed", "rms_backward_without_the_projection"))]
MUTANTS = {
    "alibi_slopes_reversed": _alibi_slopes_reversed,
    "rms_backward_without_the_projection": _rms_backward_without_the_projection,
}
test_property, test_property_catches_its_mutant = property_table(PROPERTIES, MUTANTS)
