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
