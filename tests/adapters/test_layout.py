"""Layout helpers (framework-free)."""

import numpy as np
import pytest

import refattn
from refattn.adapters import from_bhld, to_bhld


@pytest.mark.parametrize("layout", ["bshd", "btnh"])
def test_bshd_round_trip_and_sdpa_equivalence(layout):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 7, 3, 4)) for _ in range(3))  # (B, S, H, D)
    ours = refattn.sdpa(*(to_bhld(x, layout) for x in (q, k, v)), causal=True)
    out = from_bhld(ours, layout)
    assert out.shape == (2, 7, 3, 4)
    np.testing.assert_array_equal(to_bhld(out, layout), ours)
    per_head = [
        refattn.sdpa(q[:, :, h][:, None], k[:, :, h][:, None], v[:, :, h][:, None], causal=True)[:, 0] for h in range(3)
    ]
    np.testing.assert_allclose(out, np.stack(per_head, axis=2), rtol=1e-14)
    lse = rng.standard_normal((2, 7, 3))  # (B, S, H) → (B, H, S)
    assert to_bhld(lse, layout).shape == (2, 3, 7)


def test_bhld_is_the_identity_and_bad_layouts_are_named():
    x = np.ones((1, 2, 3, 4))
    assert to_bhld(x, "bhld") is x
    with pytest.raises(refattn.RefAttnError, match="layout"):
        to_bhld(x, "sbhd")
    with pytest.raises(refattn.RefAttnError, match="at least 3 dims"):
        to_bhld(np.ones((2, 3)), "bshd", name="q")


# ---- issue 13: the packed layout "bsd" (B, S, H·D) and num_heads ---------------------------------


def test_bsd_unpacks_heads_as_onnx_reshapes_them_and_packs_them_back():
    """Head h of a packed (B, S, H·D) array is columns h·D .. (h+1)·D - 1: ONNX's reshape of its 3-D
    inputs to (B, S, H, D) and transpose to (B, H, S, D)."""
    rng = np.random.default_rng(1)
    packed = rng.standard_normal((2, 5, 12))  # H = 3 heads of D = 4
    x = to_bhld(packed, "bsd", num_heads=3)
    assert x.shape == (2, 3, 5, 4)
    np.testing.assert_array_equal(x, np.transpose(packed.reshape(2, 5, 3, 4), (0, 2, 1, 3)))
    np.testing.assert_array_equal(x[:, 1], packed[:, :, 4:8])
    assert np.shares_memory(x, packed)  # a view
    back = from_bhld(x, "bsd")
    assert back.shape == (2, 5, 12)
    np.testing.assert_array_equal(back, packed)
    np.testing.assert_array_equal(from_bhld(x, "bsd", num_heads=3), packed)


def test_bsd_round_trip_through_sdpa_equals_the_per_head_computation():
    rng = np.random.default_rng(2)
    q, k, v = rng.standard_normal((1, 4, 6)), rng.standard_normal((1, 5, 6)), rng.standard_normal((1, 5, 4))
    out = from_bhld(
        refattn.sdpa(to_bhld(q, "bsd", num_heads=2), to_bhld(k, "bsd", num_heads=2), to_bhld(v, "bsd", num_heads=2)),
        "bsd",
    )
    assert out.shape == (1, 4, 4)
    for h in range(2):
        want = refattn.sdpa(q[..., 3 * h : 3 * h + 3], k[..., 3 * h : 3 * h + 3], v[..., 2 * h : 2 * h + 2])
        np.testing.assert_allclose(out[..., 2 * h : 2 * h + 2], want, rtol=1e-14)


def test_bsd_needs_num_heads_dividing_the_last_dim():
    packed = np.zeros((2, 5, 12))
    with pytest.raises(refattn.RefAttnError, match=r'num_heads: required to unpack the "bsd" layout'):
        to_bhld(packed, "bsd")
    with pytest.raises(refattn.RefAttnError, match=r"num_heads: expected a divisor of the last dim H·D = 12 of q"):
        to_bhld(packed, "bsd", num_heads=5, name="q")
    with pytest.raises(refattn.RefAttnError, match=r"num_heads: expected an integer >= 1, got 0"):
        to_bhld(packed, "bsd", num_heads=0)
    with pytest.raises(refattn.RefAttnTypeError, match="num_heads: expected an integer"):
        to_bhld(packed, "bsd", num_heads=1.5)
    with pytest.raises(refattn.RefAttnError, match=r"x: expected at least 3 dims \(batch, length, heads·dim\)"):
        to_bhld(np.zeros((5, 12)), "bsd", num_heads=3)
    with pytest.raises(refattn.RefAttnError, match=r'out: expected at least 4 dims .* \(no lse form: use "bshd"\)'):
        from_bhld(np.zeros((2, 3, 5)), "bsd", name="out")


@pytest.mark.parametrize("layout", ["bhld", "bshd", "btnh"])
def test_num_heads_is_checked_against_the_heads_axis_of_the_other_layouts(layout):
    x = np.zeros((2, 3, 3, 4)) if layout == "bhld" else np.zeros((2, 7, 3, 4))  # 3 heads
    assert to_bhld(x, layout, num_heads=3).shape[-3] == 3
    with pytest.raises(refattn.RefAttnError, match=r"num_heads: expected 3, the heads of k"):
        to_bhld(x, layout, num_heads=2, name="k")
    lse = np.zeros((2, 3, 7)) if layout == "bhld" else np.zeros((2, 7, 3))
    assert to_bhld(lse, layout, num_heads=3).shape == (2, 3, 7)
    with pytest.raises(refattn.RefAttnError, match="num_heads: expected 3"):
        to_bhld(lse, layout, num_heads=4)
    ours = np.zeros((2, 3, 7, 4))
    assert from_bhld(ours, layout, num_heads=3).shape[-2 if layout != "bhld" else -3] == 3
    with pytest.raises(
        refattn.RefAttnError, match=r"num_heads: expected 3, the heads of x \(2, 3, 7, 4\) in \(\.\.\., H, L, D\)"
    ):
        from_bhld(ours, layout, num_heads=1)
