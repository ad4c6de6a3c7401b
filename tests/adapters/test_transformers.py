"""The Hugging Face adapter on tiny models built from configs (no download)."""

import numpy as np
import pytest

import refattn

pytest.importorskip("torch")
pytest.importorskip("transformers")
from refattn.adapters import transformers as hf  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 60, (2, 12))
    mask = np.ones((2, 12), dtype=np.int64)
    mask[1, 8:] = 0  # item 1 is padded
    return ids, mask


@pytest.mark.parametrize("kind", hf.ARCHITECTURES)
def test_every_layer_is_reproduced(kind, inputs):
    ids, mask = inputs
    model = hf.tiny_model(kind)
    for attention_mask in (None, mask):
        check = hf.check_model(model, ids, attention_mask=attention_mask)
        assert check.passed, check.report()
        assert len(check.layers) == 2 and len(check.attentions) == 2
        for layer in check.layers:
            if layer.softmax_dtype == "float64":
                assert max(layer.weights_error, layer.output_error) <= 1e-10
            else:  # Llama's eager attention: softmax in float32, documented
                assert kind == "llama" and layer.weights_error <= 1e-6 and layer.rope_error < 1e-6


def test_the_padding_mask_matters_and_a_lost_mask_is_caught(inputs, monkeypatch):
    ids, mask = inputs
    model = hf.tiny_model("bert")
    with_mask = hf.check_model(model, ids, attention_mask=mask)
    without = hf.check_model(model, ids)
    assert np.max(np.abs(with_mask.attentions[0][1] - without.attentions[0][1])) > 1e-3
    monkeypatch.setattr(hf, "_mask_from_additive", lambda m, shape: (None, None))
    assert not hf.check_model(model, ids, attention_mask=mask).passed


def test_a_wrong_gqa_head_map_is_caught(inputs, monkeypatch):
    ids, _ = inputs
    model = hf.tiny_model("llama")
    real = refattn.attention.sdpa.expand_kv
    monkeypatch.setattr(
        refattn.attention.sdpa, "expand_kv", lambda x, g: real(x, g) if g == 1 else np.concatenate([x] * g, axis=-3)
    )
    assert not hf.check_model(model, ids).passed


def test_rollout_and_metrics_on_the_model_attentions(inputs):
    ids, mask = inputs
    maps = hf.model_attentions(hf.tiny_model("bert"), ids, attention_mask=mask)
    real = mask.astype(bool)
    r = refattn.rollout(maps, mask=real)
    np.testing.assert_allclose(r[0].sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(r[1, :8].sum(-1), 1.0, rtol=1e-12)
    assert np.all(r[1, 8:] == 0)
    summary = refattn.metrics.summarize(maps, ids, mask=real)
    assert summary["entropy"].shape == (2, 4) and np.isfinite(summary["entropy"]).all()


# ---- attention attribution from a model ---------------------------------------------------------


@pytest.mark.parametrize("kind", hf.ARCHITECTURES)
def test_attention_attribution_streams_the_model_maps(kind, inputs):
    ids, mask = inputs
    model = hf.tiny_model(kind)
    got = hf.attention_attribution(model, ids, mask, chunk_size=1)
    maps = hf.model_attentions(model, ids, attention_mask=mask)
    want = refattn.metrics.attention_attribution(maps, mask=mask.astype(bool))
    assert list(got) == list(want)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-12, atol=1e-14, err_msg=key)
    assert got["batch_size"] == 2 and got["seq_length"] == 12
    assert np.all(got["attention_entropy"][1, 8:] == 0)  # padded positions left out
    unpadded = hf.attention_attribution(model, ids)
    assert np.all(unpadded["attention_entropy"][1, 8:] > 0)


def test_attention_attribution_refuses_a_bad_padding_mask(inputs):
    ids, mask = inputs
    model = hf.tiny_model("gpt2")
    with pytest.raises(refattn.RefAttnError, match=r"attention_mask: expected the shape of input_ids"):
        hf.attention_attribution(model, ids, mask[:, :5])
    with pytest.raises(refattn.RefAttnError, match=r"attention_mask: expected 0/1"):
        hf.attention_attribution(model, ids, 2 * mask)


# ---- whole-model mapping: LMParams <-> GPT2LMHeadModel / LlamaForCausalLM ------------------------

GPT2_TOLERANCE = 1e-10  # float64 throughout: measured 1e-15
# HF's Llama computes three steps in float32 even in a float64 model: RMSNorm (hidden_states.to(float32)),
# the RoPE angles (inv_freq and position · inv_freq) and the eager softmax (dtype=torch.float32).
# Measured on these tiny models: logits 8e-8, gradients 3e-7 (relative); with those three steps in
# float64 (the patch below) 1e-15, so the mapping itself is exact.
LLAMA_LOGITS_TOLERANCE = 1e-6
LLAMA_GRADS_TOLERANCE = 1e-5


def _gpt2(tied=True, seed=0):
    tf = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    config = tf.GPT2Config(
        n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=32, bos_token_id=49, eos_token_id=49,
        tie_word_embeddings=tied, attn_implementation="eager",
    )  # fmt: skip
    return tf.GPT2LMHeadModel(config).double().eval()


def _llama(tied=False, seed=0):
    tf = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tied, attn_implementation="eager",
    )  # fmt: skip
    model = tf.LlamaForCausalLM(config).double().eval()
    with torch.no_grad():  # RMSNorm weights off 1, so that a misplaced norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


MODELS = {
    "gpt2": _gpt2,
    "gpt2 untied": lambda: _gpt2(tied=False),
    "llama": _llama,
    "llama tied": lambda: _llama(tied=True),
}


def _leaves(tree):
    from refattn.model.params import tree_items

    return tree_items(tree)


@pytest.mark.parametrize("name", MODELS)
def test_params_round_trip_exactly(name):
    model = MODELS[name]()
    params, config = hf.params_from_hf(model)
    assert config.tied_embeddings == ("untied" not in name and name != "llama")
    again, config2 = hf.params_from_hf(hf.to_hf(params, config))
    assert config2 == config
    assert [n for n, _ in _leaves(again)] == [n for n, _ in _leaves(params)]
    for (path, a), (_, b) in zip(_leaves(params), _leaves(again)):
        assert a.dtype == np.float64 and np.array_equal(a, b), path
    rebuilt = hf.to_hf(params, config).state_dict()
    for key, value in model.state_dict().items():  # buffers (RoPE's inv_freq) too
        assert np.array_equal(value.numpy(), rebuilt[key].numpy()), key


def test_the_fused_qkv_and_the_transposes():
    gpt2, llama = _gpt2(), _llama()
    p, config = hf.params_from_hf(gpt2)
    c_attn = gpt2.transformer.h[1].attn.c_attn
    e = config.d_model
    np.testing.assert_array_equal(p.blocks[1].attn.w_k, c_attn.weight.detach().numpy()[:, e : 2 * e])
    np.testing.assert_array_equal(p.blocks[1].attn.b_v, c_attn.bias.detach().numpy()[2 * e :])
    assert p.lm_head is None and p.wpe.shape == (32, 16) and config.activation == "gelu_tanh"
    q, lconfig = hf.params_from_hf(llama)
    np.testing.assert_array_equal(
        q.blocks[0].attn.w_k, llama.model.layers[0].self_attn.k_proj.weight.detach().numpy().T
    )
    assert q.blocks[0].attn.w_k.shape == (16, 8) and lconfig.n_kv_heads == 2 and lconfig.norm_eps == 1e-6
    np.testing.assert_array_equal(q.lm_head, llama.lm_head.weight.detach().numpy().T)
    assert q.blocks[0].ln_1.bias is None and q.wpe is None and q.blocks[0].attn.b_q is None


def _autograd(model, ids, targets, mask=None):
    """HF logits, loss and grads_from_hf after backward of the mean next-token cross-entropy."""
    import torch

    model.zero_grad()
    attention_mask = None if mask is None else torch.as_tensor(mask.astype(np.int64))
    logits = model(input_ids=torch.as_tensor(ids), attention_mask=attention_mask).logits
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.as_tensor(targets).reshape(-1), ignore_index=-100
    )
    loss.backward()
    return logits.detach().numpy(), float(loss.detach()), hf.grads_from_hf(model)


def _next_tokens(ids, mask=None):
    targets = np.full(ids.shape, -100)
    targets[:, :-1] = ids[:, 1:]
    if mask is not None:
        targets[:, :-1][~mask[:, 1:].astype(bool)] = -100  # no loss on predicting a pad
    return targets


def _relative(a, b, scale):
    """max |a − b| over max |b|, or over ``scale`` where b is smaller (a gradient that is 0 in exact
    arithmetic, such as the key bias's: both sides hold rounding noise)."""
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), scale))


def _compare_with_autograd(model, ids, mask=None):
    from refattn.model import lm

    params, config = hf.params_from_hf(model)
    targets = _next_tokens(ids, mask)
    real = None if mask is None else mask.astype(bool)
    loss, grads = lm.lm_loss_and_grads(params, ids, targets, config, mask=real)
    logits = lm.lm_forward(params, ids, config, mask=real)
    hf_logits, hf_loss, hf_grads = _autograd(model, ids, targets, mask)
    keep = np.ones(ids.shape, dtype=bool) if mask is None else mask.astype(bool)
    errors = {"logits": _relative(logits[keep], hf_logits[keep], 0.0), "loss": abs(loss - hf_loss) / abs(hf_loss)}
    scale = 1e-6 * max(float(np.max(np.abs(g))) for _, g in _leaves(hf_grads))
    for (path, g), (_, h) in zip(_leaves(grads.dparams), _leaves(hf_grads), strict=True):
        errors[path] = _relative(g, h, scale)
    return errors


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(14)
    ids = rng.integers(0, 50, (2, 11))
    mask = np.ones((2, 11), dtype=np.int64)
    mask[1, 7:] = 0  # item 1 right-padded
    return ids, mask


@pytest.mark.parametrize("name", ["gpt2", "gpt2 untied"])
def test_gpt2_logits_and_every_gradient_match_autograd(name, tokens):
    ids, mask = tokens
    model = MODELS[name]()
    for m in (None, mask):
        errors = _compare_with_autograd(model, ids, m)
        assert len(errors) == 2 + 36 + (name == "gpt2 untied")  # logits, loss; wte, wpe, 16 per block, ln_f (2)
        worst = max(errors, key=errors.get)
        assert errors[worst] <= GPT2_TOLERANCE, (worst, errors[worst])


@pytest.mark.parametrize("name", ["llama", "llama tied"])
def test_llama_logits_and_every_gradient_match_autograd_to_float32(name, tokens):
    ids, _ = tokens
    errors = _compare_with_autograd(MODELS[name](), ids)
    assert errors["logits"] <= LLAMA_LOGITS_TOLERANCE and errors["loss"] <= LLAMA_LOGITS_TOLERANCE, errors
    worst = max(errors, key=errors.get)
    assert errors[worst] <= LLAMA_GRADS_TOLERANCE, (worst, errors[worst])
    assert errors[worst] > 1e-9  # HF's float32 steps are really there (the float64 patch below removes them)


@pytest.fixture
def float64_llama(monkeypatch):
    """HF's Llama with its three float32 steps (RMSNorm, RoPE angles, eager softmax) in float64."""
    import torch
    from transformers.models.llama import modeling_llama as ml

    def rms_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary(self, x, position_ids):
        dim = 2 * self.inv_freq.shape[0]
        inv_freq = 1.0 / (self.config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2).double() / dim))
        angles = position_ids[..., None].double() * inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        k, v = (ml.repeat_kv(t, module.num_key_value_groups) for t in (key, value))
        w = torch.matmul(query, k.transpose(2, 3)) * scaling
        w = torch.softmax(w if attention_mask is None else w + attention_mask, dim=-1)
        return torch.matmul(w, v).transpose(1, 2).contiguous(), w

    monkeypatch.setattr(ml.LlamaRMSNorm, "forward", rms_norm)
    monkeypatch.setattr(ml.LlamaRotaryEmbedding, "forward", rotary)
    monkeypatch.setattr(ml, "eager_attention_forward", eager)


@pytest.mark.parametrize("name", ["llama", "llama tied"])
def test_llama_in_float64_matches_autograd_to_1e_10(name, tokens, float64_llama):
    """With HF's float32 steps lifted to float64 the mapping is exact: RoPE is rotate-half in both
    (refattn.rope style="half"), GQA groups heads as repeat_kv does, SwiGLU is silu(gate)·up."""
    ids, mask = tokens
    for m in (None, mask):
        errors = _compare_with_autograd(MODELS[name](), ids, m)
        worst = max(errors, key=errors.get)
        assert errors[worst] <= GPT2_TOLERANCE, (worst, errors[worst])


def test_refattn_rope_pairs_dims_as_hf_rotate_half():
    import torch
    from transformers.models.llama import modeling_llama as ml

    rng = np.random.default_rng(5)
    q, k = rng.standard_normal((2, 1, 2, 6, 8))
    angles = np.arange(6)[:, None] * 10000.0 ** (-np.arange(0, 8, 2) / 8)  # (T, D/2)
    emb = np.concatenate([angles, angles], axis=-1)[None]  # (1, T, D): HF's cos/sin layout
    hq, hk = ml.apply_rotary_pos_emb(*(torch.as_tensor(x) for x in (q, k, np.cos(emb), np.sin(emb))))
    np.testing.assert_allclose(refattn.rope(q), hq.numpy(), rtol=0, atol=1e-15)
    np.testing.assert_allclose(refattn.rope(k, style="half"), hk.numpy(), rtol=0, atol=1e-15)
    assert np.max(np.abs(refattn.rope(q, style="interleaved") - hq.numpy())) > 1e-2


def test_a_mapping_without_the_transpose_is_caught(tokens, monkeypatch):
    ids, _ = tokens
    model = _llama()
    table = hf._table
    monkeypatch.setattr(
        hf, "_table", lambda config, kind: [(n, t and "q_proj" not in n, parts) for n, t, parts in table(config, kind)]
    )
    errors = _compare_with_autograd(model, ids)
    assert errors["logits"] > 1e-3


def test_grads_need_a_backward_and_unsupported_models_are_named():
    from refattn.model.config import LMConfig
    from refattn.model.params import init_params

    with pytest.raises(refattn.RefAttnError, match=r"model: parameter 'transformer.wte.weight' has no .grad"):
        hf.grads_from_hf(_gpt2())
    with pytest.raises(refattn.Unsupported, match=r"model: expected the causal-LM class"):
        hf.params_from_hf(hf.tiny_model("gpt2"))  # a GPT2Model: no LM head
    with pytest.raises(refattn.Unsupported, match=r"model: expected a GPT2LMHeadModel or a LlamaForCausalLM"):
        hf.params_from_hf(hf.tiny_model("bert"))
    for fields, match in (
        ({"positions": "alibi"}, r"config.positions: a GPT-2 model has positions='learned'"),
        ({"norm_position": "post"}, r"config.norm_position"),
        ({"positions": "rope", "norm": "rms", "bias": True, "activation": "swiglu"}, r"config.bias: a Llama"),
        ({"activation": "swiglu"}, r"config.activation: GPT-2's MLP has no gate"),
        ({"n_kv_heads": 1}, r"config.n_kv_heads: GPT-2 has no GQA"),
    ):
        config = LMConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, max_len=8, **fields)
        with pytest.raises(refattn.Unsupported, match=match):
            hf.to_hf(init_params(config, 0), config)
    config = LMConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, max_len=8)
    params = init_params(config, 0)
    bad = params._replace(wte=params.wte[:, :4])
    with pytest.raises(refattn.RefAttnError, match=r"params.wte: expected shape \(11, 8\), got \(11, 4\)"):
        hf.to_hf(bad, config)
    with pytest.raises(refattn.RefAttnTypeError, match=r"config: expected an LMConfig"):
        hf.to_hf(params, {"d_model": 8})
