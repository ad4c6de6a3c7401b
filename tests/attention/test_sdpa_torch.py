"""Cross-check against torch.nn.functional.scaled_dot_product_attention in float64 (tox env 'torch')."""

import numpy as np
import pytest

import refattn

torch = pytest.importorskip("torch")
F = torch.nn.functional
pytestmark = pytest.mark.torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _t(a, device, grad=True):
    return torch.tensor(a, dtype=torch.float64, device=device, requires_grad=grad)


def _run_torch(q, k, v, d_out, device, **kw):
    tq, tk, tv = (_t(a, device) for a in (q, k, v))
    mask = kw.pop("attn_mask", None)
    tmask = None
    if mask is not None:
        tmask = torch.tensor(mask, device=device) if mask.dtype == bool else _t(mask, device)
    out = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask, **kw)
    out.backward(torch.tensor(d_out, device=device))
    grads = [x.grad.cpu().numpy() for x in (tq, tk, tv)]
    dmask = tmask.grad.cpu().numpy() if tmask is not None and tmask.dtype == torch.float64 else None
    return out.detach().cpu().numpy(), grads, dmask


CASES = {
    "plain": lambda rng: ({}, {}),
    "bool_mask": lambda rng: (dict(mask=rng.random((2, 4, 5)) < 0.8), None),
    "float_mask_as_bias": lambda rng: (dict(bias=rng.standard_normal((4, 5))), None),
    "is_causal_is_top_left": lambda rng: (dict(causal=True, align="top_left"), dict(is_causal=True)),
    "scale": lambda rng: (dict(scale=0.37), dict(scale=0.37)),
    "gqa": lambda rng: ("gqa", dict(enable_gqa=True)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch_sdpa_and_autograd(name, device):
    rng = np.random.default_rng(0)
    ours, theirs = CASES[name](rng)
    hk = 1 if ours == "gqa" else 2
    ours = {} if ours == "gqa" else ours
    q = rng.standard_normal((3, 2, 4, 6))
    k = rng.standard_normal((3, hk, 5, 6))
    v = rng.standard_normal((3, hk, 5, 7))
    if theirs is None:
        theirs = {"attn_mask": ours.get("mask", ours.get("bias"))}
    d_out = rng.standard_normal((3, 2, 4, 7))
    out_t, grads_t, dmask_t = _run_torch(q, k, v, d_out, device, **theirs)
    out = refattn.sdpa(q, k, v, **ours)
    grads = refattn.sdpa_backward(d_out, q, k, v, **ours)
    np.testing.assert_allclose(out, out_t, rtol=1e-12, atol=1e-13)
    for g, gt in zip(grads[:3], grads_t):
        np.testing.assert_allclose(g, gt, rtol=1e-11, atol=1e-12)
    if "bias" in ours:
        np.testing.assert_allclose(grads.dbias, dmask_t, rtol=1e-11, atol=1e-12)


# refattn's default empty_rows="zero" is PyTorch's: from 2.5 its math path uses _safe_softmax and
# gives 0 (value and gradients) on a fully masked row, for bool and float (-inf) masks alike; older
# versions gave NaN there, which refattn states as empty_rows="nan" (specs/sdpa.md, "Empty rows").
@pytest.mark.skipif(
    tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 5), reason="PyTorch < 2.5 gives NaN rows"
)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_match_torch_zero_policy(kind):
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((1, 3, 4)), rng.standard_normal((1, 5, 4)), rng.standard_normal((1, 5, 2))
    keep = np.ones((3, 5), dtype=bool)
    keep[1] = False  # row 1 fully masked
    keep[0, 2] = False
    if kind == "bool":
        ours, theirs = dict(mask=keep), keep
    else:
        bias = np.where(keep, rng.standard_normal((3, 5)), -np.inf)
        ours, theirs = dict(bias=bias), bias
    d_out = rng.standard_normal((1, 3, 2))
    out_t, grads_t, dmask_t = _run_torch(q, k, v, d_out, "cpu", attn_mask=theirs)
    out = refattn.sdpa(q, k, v, **ours)
    grads = refattn.sdpa_backward(d_out, q, k, v, **ours)
    np.testing.assert_array_equal(out_t[:, 1], 0.0)
    np.testing.assert_array_equal(grads_t[0][:, 1], 0.0)  # dq of the empty row
    np.testing.assert_allclose(out, out_t, rtol=1e-12, atol=1e-13)
    for g, gt in zip(grads[:3], grads_t):
        np.testing.assert_allclose(g, gt, rtol=1e-11, atol=1e-12)
    if kind == "float":
        np.testing.assert_array_equal(dmask_t[1], 0.0)
        np.testing.assert_allclose(grads.dbias, dmask_t, rtol=1e-11, atol=1e-12)
