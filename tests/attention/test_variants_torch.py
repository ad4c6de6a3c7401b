"""Cross-checks of multi-head attention and RoPE against PyTorch in float64 (tox env 'torch')."""

import numpy as np
import pytest

import refattn

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


def _params_from_torch(mha):
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        w = mha.in_proj_weight.detach().numpy()
        w_q, w_k, w_v = w[:e].T, w[e : 2 * e].T, w[2 * e :].T
    else:
        w_q, w_k, w_v = (
            getattr(mha, n).detach().numpy().T for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        )
    b = mha.in_proj_bias.detach().numpy()
    return refattn.MHAParams(
        w_q,
        w_k,
        w_v,
        mha.out_proj.weight.detach().numpy().T,
        b[:e],
        b[e : 2 * e],
        b[2 * e :],
        mha.out_proj.bias.detach().numpy(),
    )


def _grads_from_torch(mha):
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        g = mha.in_proj_weight.grad.numpy()
        gw = (g[:e].T, g[e : 2 * e].T, g[2 * e :].T)
    else:
        gw = tuple(getattr(mha, n).grad.numpy().T for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight"))
    gb = mha.in_proj_bias.grad.numpy()
    return refattn.MHAParams(
        *gw, mha.out_proj.weight.grad.numpy().T, gb[:e], gb[e : 2 * e], gb[2 * e :], mha.out_proj.bias.grad.numpy()
    )


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross_kdim_vdim"])
@pytest.mark.parametrize("masking", ["none", "key_padding", "causal"])
def test_multihead_attention_matches_torch(cross, masking):
    torch.manual_seed(0)
    e, h, b, lq = 6, 3, 2, 4
    lk, d_kv = (5, 4) if cross else (lq, e)
    mha = torch.nn.MultiheadAttention(e, h, kdim=d_kv, vdim=d_kv, batch_first=True, dtype=torch.float64)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, lq, e))
    kv = rng.standard_normal((b, lk, d_kv)) if cross else None
    tx = torch.tensor(x, requires_grad=True)
    tkv = torch.tensor(kv, requires_grad=True) if cross else tx
    kw, ours = {}, {}
    if masking == "key_padding":
        pad = np.zeros((b, lk), dtype=bool)
        pad[0, -2:] = True  # torch: True = ignore
        kw["key_padding_mask"] = torch.tensor(pad)
        ours["mask"] = ~pad[:, None, None, :]
    if masking == "causal":
        kw["attn_mask"] = torch.triu(torch.ones(lq, lk, dtype=torch.bool), 1)  # True = not allowed
        ours.update(causal=True, align="top_left")
    y_t, _ = mha(tx, tkv, tkv, need_weights=False, **kw)
    d_y = rng.standard_normal(y_t.shape)
    y_t.backward(torch.tensor(d_y))
    params = _params_from_torch(mha)
    y = refattn.multihead_attention(x, params, num_heads=h, kv=kv, **ours)
    np.testing.assert_allclose(y, y_t.detach().numpy(), rtol=1e-12, atol=1e-13)
    g = refattn.multihead_attention_backward(d_y, x, params, num_heads=h, kv=kv, **ours)
    np.testing.assert_allclose(g.dx, tx.grad.numpy(), rtol=1e-11, atol=1e-12)
    if cross:
        np.testing.assert_allclose(g.dkv, tkv.grad.numpy(), rtol=1e-11, atol=1e-12)
    for ours_g, theirs_g in zip(g.dparams, _grads_from_torch(mha)):
        np.testing.assert_allclose(ours_g, theirs_g, rtol=1e-11, atol=1e-12)


def _torch_rope(x, positions, base, style):
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = torch.outer(positions, inv_freq)
    if style == "half":  # GPT-NeoX / Llama rotate_half
        emb = torch.cat([freqs, freqs], dim=-1)
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        rotated = torch.cat([-x2, x1], dim=-1)
    else:  # GPT-J rotate_every_two
        emb = freqs.repeat_interleave(2, dim=-1)
        rotated = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
    return x * emb.cos() + rotated * emb.sin()


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_rope_matches_torch_formulation_and_autograd(style):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 5, 8))
    pos = rng.uniform(0, 100, 5)
    tx = torch.tensor(x, requires_grad=True)
    y_t = _torch_rope(tx, torch.tensor(pos), 500.0, style)
    dy = rng.standard_normal(x.shape)
    y_t.backward(torch.tensor(dy))
    np.testing.assert_allclose(
        refattn.rope(x, pos, base=500.0, style=style), y_t.detach().numpy(), rtol=1e-12, atol=1e-13
    )
    np.testing.assert_allclose(
        refattn.rope_backward(dy, x, pos, base=500.0, style=style).dx, tx.grad.numpy(), rtol=1e-12, atol=1e-13
    )
