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
