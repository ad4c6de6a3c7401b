"""Head importance with a real-token mask: a padded batch of per-token head-gate gradients gives the
result of its items unpadded, for both accumulations (Michel, Levy & Neubig 2019; the original code
divides the accumulated ``|∂L/∂ξ|`` by the number of real tokens, ``tot_tokens``)."""

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import refattn
from refattn import metrics
from tests.mutation import property_table

CLOSE = dict(rtol=1e-13, atol=1e-15)  # the padded sums run over extra zeros, in another order


@st.composite
def padded_batches(draw):
    """Items of 1..3 tokens (gradients ``(T_n, L, H)``), right- or left-padded into ``(N, T, L, H)``
    with garbage in the pads, their real-token mask ``(N, T)``, ``per`` and ``normalize``."""
    layers, heads = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    lengths = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    floats = st.floats(-2.0, 2.0, allow_subnormal=False)
    items = [draw(hnp.arrays(np.float64, (t, layers, heads), elements=floats)) for t in lengths]
    total = max(lengths) + draw(st.integers(0, 2))
    garbage = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    padded = garbage.uniform(-5.0, 5.0, (len(items), total, layers, heads))
    mask = np.zeros((len(items), total), dtype=bool)
    for n, item in enumerate(items):
        left = draw(st.integers(0, total - len(item)))
        padded[n, left : left + len(item)] = item
        mask[n, left : left + len(item)] = True
    opts = {"per": draw(st.sampled_from(["example", "token"])), "normalize": draw(st.sampled_from(["layer", None]))}
    return items, padded, mask, opts


def check_padded_batch_equals_its_items(drawn):
    """``"token"``: the items laid end to end as one example; ``"example"``: the mean over the items of
    each one's importance (un-normalised, then normalised as the batch is)."""
    items, padded, mask, opts = drawn
    got = metrics.head_importance(padded, mask=mask, **opts)
    if opts["per"] == "token":
        want = metrics.head_importance(np.concatenate(items)[None], **opts)
    else:
        raw = np.mean([metrics.head_importance(item[None], normalize=None) for item in items], axis=0)
        norm = np.linalg.norm(raw, axis=-1, keepdims=True)
        want = raw if opts["normalize"] is None else np.where(norm > 0, raw / np.where(norm > 0, norm, 1.0), 0.0)
    np.testing.assert_allclose(got, want, **CLOSE)


def test_unmasked_per_token_equals_an_all_true_mask_and_the_plain_mean():
    g = np.random.default_rng(0).standard_normal((3, 4, 2, 5))
    plain = metrics.head_importance(g, per="token", normalize=None)
    np.testing.assert_allclose(plain, np.abs(g).mean(axis=(0, 1)), rtol=1e-15, atol=0.0)
    masked = metrics.head_importance(g, per="token", normalize=None, mask=np.ones((3, 4), dtype=bool))
    np.testing.assert_array_equal(masked, plain)


def test_the_token_count_is_the_real_tokens_of_the_batch():
    g = np.zeros((2, 3, 1, 1))
    g[0, :2, 0, 0] = [1.0, -3.0]  # example 0: 2 real tokens
    g[1, 0, 0, 0] = 2.0  # example 1: 1 real token
    g[:, 2] = 100.0  # padding: ignored
    g[1, 1] = -100.0
    mask = np.array([[True, True, False], [True, False, False]])
    # (|1| + |-3| + |2|) / 3 real tokens; small integers: exact
    assert metrics.head_importance(g, per="token", normalize=None, mask=mask)[0, 0] == 2.0
    # per example: (|1 - 3| + |2|) / 2 examples
    assert metrics.head_importance(g, per="example", normalize=None, mask=mask)[0, 0] == 2.0
    none_real = np.zeros((2, 3), dtype=bool)
    assert metrics.head_importance(g, per="token", mask=none_real).tolist() == [[0.0]]


def test_bad_masks_are_named():
    g = np.ones((2, 3, 1, 2))
    with pytest.raises(refattn.RefAttnError, match=r"mask: expected the real tokens \(2, 3\)"):
        metrics.head_importance(g, mask=np.ones((2, 2), dtype=bool))
    with pytest.raises(refattn.RefAttnTypeError, match="mask"):
        metrics.head_importance(g, mask=np.ones((2, 3)))
    with pytest.raises(refattn.RefAttnError, match="mask"):
        metrics.head_importance(np.ones((2, 1, 2)), mask=np.ones((2, 1), dtype=bool))  # no token axis


# ---- the property table and its mutant -------------------------------------------------------------

PROPERTIES = [(check_padded_batch_equals_its_items, padded_batches(), "padded_tokens_counted")]


def _padded_tokens_counted(mp):
    """The pads' gradients dropped but the pads still counted (the mean over N·T)."""
    real = metrics.head_importance

    def mutant(g, *, mask=None, **options):
        return real(np.where(mask[..., None, None], g, 0.0) if mask is not None else g, **options)

    mp.setattr(metrics, "head_importance", mutant)


MUTANTS = {"padded_tokens_counted": _padded_tokens_counted}

test_property, test_property_catches_its_mutant = property_table(PROPERTIES, MUTANTS)
