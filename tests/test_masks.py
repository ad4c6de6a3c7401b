"""Masks: alignment, windows, padding, varlen and the counter-based dropout mask."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from refattn import masks


def test_causal_alignments_match_torch_and_flash_attn_conventions():
    # PyTorch: ones(L, S).tril(diagonal=0); flash-attn: key j allowed iff j <= i + sk - sq
    assert masks.causal(2, 4, align="top_left").astype(int).tolist() == [[1, 0, 0, 0], [1, 1, 0, 0]]
    assert masks.causal(2, 4, align="bottom_right").astype(int).tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert masks.causal(4, 2, align="bottom_right").astype(int).tolist() == [[0, 0], [0, 0], [1, 0], [1, 1]]
    np.testing.assert_array_equal(masks.causal(3, 3), np.tril(np.ones((3, 3), dtype=bool)))


@given(
    st.integers(0, 6),
    st.integers(0, 6),
    st.one_of(st.none(), st.integers(0, 7)),
    st.one_of(st.none(), st.integers(0, 7)),
    st.sampled_from(["top_left", "bottom_right"]),
)
def test_window_is_the_band_around_the_aligned_diagonal(lq, lk, left, right, align):
    w = masks.window(lq, lk, left, right, align=align)
    o = lk - lq if align == "bottom_right" else 0
    for i in range(lq):
        for j in range(lk):
            ok = (left is None or j >= i + o - left) and (right is None or j <= i + o + right)
            assert w[i, j] == ok


def test_window_zero_right_is_causal():
    np.testing.assert_array_equal(
        masks.window(3, 5, None, 0, align="bottom_right"), masks.causal(3, 5, align="bottom_right")
    )


def test_ambiguous_alignment_raises():
    with pytest.raises(refattn.RefAttnError, match="align"):
        masks.causal(2, 3)
    with pytest.raises(refattn.RefAttnError, match="align"):
        masks.window(2, 3, 1, 1)


def test_from_lengths():
    m = masks.from_lengths([1, 3], [2, 0], 3, 2)
    assert m.shape == (2, 3, 2)
    assert m[0].astype(int).tolist() == [[1, 1], [0, 0], [0, 0]]
    assert not m[1].any()
    np.testing.assert_array_equal(masks.from_lengths(None, [1], 2, 2)[0], [[True, False], [True, False]])
    with pytest.raises(refattn.RefAttnError, match=r"k_lengths: expected lengths in \[0, 2\]"):
        masks.from_lengths(None, [3], 2, 2)
    np.testing.assert_array_equal(masks.from_lengths([2, 3], None, 4, 5)[0, :, 0], [True, True, False, False])
    assert masks.from_lengths([2, 3], None, 4, 5)[:, :, 4].sum() == 5  # every key real
    with pytest.raises(refattn.RefAttnError, match="expected at least one"):
        masks.from_lengths(None, None, 2, 2)


def test_varlen_is_block_diagonal_with_per_sequence_alignment():
    m = masks.varlen([0, 2, 5], [0, 3, 5])
    assert m.shape == (5, 5)
    assert m[:2, :3].all() and m[2:, 3:].all() and not m[:2, 3:].any() and not m[2:, :3].any()
    c = masks.varlen([0, 2, 5], [0, 3, 5], causal=True, align="bottom_right")
    np.testing.assert_array_equal(c[:2, :3], masks.causal(2, 3, align="bottom_right"))
    np.testing.assert_array_equal(c[2:, 3:], masks.causal(3, 2, align="bottom_right"))
    with pytest.raises(refattn.RefAttnError, match="align"):
        masks.varlen([0, 2], [0, 3], causal=True)
    with pytest.raises(refattn.RefAttnError, match="cu_seqlens_q"):
        masks.varlen([1, 2], [0, 3])


def test_varlen_sdpa_equals_separate_sequences():
    rng = np.random.default_rng(0)
    cq, ck = [0, 2, 5], [0, 3, 7]
    q, k, v = rng.standard_normal((1, 5, 3)), rng.standard_normal((1, 7, 3)), rng.standard_normal((1, 7, 2))
    packed = refattn.sdpa(q, k, v, mask=masks.varlen(cq, ck, causal=True, align="bottom_right"))
    for s in range(2):
        qs, ks = slice(cq[s], cq[s + 1]), slice(ck[s], ck[s + 1])
        alone = refattn.sdpa(q[:, qs], k[:, ks], v[:, ks], causal=True, align="bottom_right")
        np.testing.assert_allclose(packed[:, qs], alone, rtol=1e-14, atol=1e-15)


def test_dropout_mask_is_reproducible_and_has_the_right_rate():
    a = masks.dropout_mask((64, 128), 0.3, seed=42)
    np.testing.assert_array_equal(a, masks.dropout_mask((64, 128), 0.3, seed=42))
    assert not np.array_equal(a, masks.dropout_mask((64, 128), 0.3, seed=43))
    assert abs(a.mean() - 0.7) < 0.02
    assert masks.dropout_mask((5,), 0.0, 1).all()
    # counter-based: element n depends only on (seed, n), not on the shape
    np.testing.assert_array_equal(masks.dropout_mask((8, 16), 0.5, 7).ravel(), masks.dropout_mask(128, 0.5, 7))
    # pinned values: the spec's formula, so other languages can reproduce the mask
    assert masks.dropout_mask((2, 8), 0.5, 0).astype(int).ravel().tolist() == PINNED


PINNED = [0, 1, 0, 1, 1, 1, 0, 1, 1, 0, 0, 0, 1, 0, 0, 1]


def test_dropout_mask_formula_by_hand():
    mask64 = (1 << 64) - 1

    def splitmix64(z):
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & mask64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & mask64
        return z ^ (z >> 31)

    seed, p = 12345, 0.4
    expected = [((splitmix64((seed * 0x9E3779B97F4A7C15 + n + 1) & mask64) >> 11) * 2.0**-53) >= p for n in range(40)]
    assert masks.dropout_mask(40, p, seed).tolist() == expected


def test_dropout_mask_arguments():
    with pytest.raises(refattn.RefAttnError, match=r"p: expected a dropout probability in \[0, 1\)"):
        masks.dropout_mask((2,), 1.0, 0)
    with pytest.raises(refattn.RefAttnError, match="seed"):
        masks.dropout_mask((2,), 0.5, -1)
