"""The PyTorch adapter: every translated option agrees with refattn; CUDA in fp16/bf16 when present."""

import numpy as np
import pytest

import refattn
from refattn import io, lowp

torch = pytest.importorskip("torch")
from refattn.adapters import torch as ta  # noqa: E402

pytestmark = pytest.mark.torch
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SUITE = {c.name: c for c in io.standard_suite()}
UNTRANSLATABLE = {"softcap", "sinks", "dropout_mask"}  # options or arrays torch SDPA has no form for
TRANSLATED = [
    n
    for n, c in SUITE.items()
    if not UNTRANSLATABLE & (set(c.arrays) | set(c.options))
    and c.options.get("empty_rows", "zero") == "zero"
    and "d_lse" not in c.cotangents
]
# Written out so that a filter bug (or a suite change) fails here instead of silently dropping
# cases: the standard suite less softcap, sinks, dropout, empty_rows_nan/uniform and the d_lse cases.
EXPECTED_TRANSLATED = [
    "plain",
    "scale",
    "cross_lengths",
    "tile_63",
    "tile_64",
    "tile_65",
    "tile_127_129",
    "tile_128",
    "causal_square",
    "causal_top_left",
    "causal_bottom_right",
    "window_bottom_right",
    "window_top_left",
    "key_padding",
    "empty_rows_zero",
    "bias",
    "alibi",
    "gqa",
    "mqa",
    "value_dim",
    "rope",
    "decode",
    "varlen",
    "large_logits",
    "near_ties",
    "head_dim_128",
]


def test_the_translated_cases_are_the_expected_list():
    assert TRANSLATED == EXPECTED_TRANSLATED


@pytest.mark.parametrize("name", EXPECTED_TRANSLATED)
def test_every_translated_option_agrees_in_float64(name):
    case = SUITE[name]
    got = ta.torch_sdpa(case.q, case.k, case.v, d_out=case.cotangents["d_out"], **case.sdpa_options())
    golden = io.golden_outputs(case)
    for key, value in got.items():
        np.testing.assert_allclose(value, golden[key], rtol=1e-10, atol=1e-12, err_msg=f"{name}:{key}")
    assert set(got) == {"out", "dq", "dk", "dv"} | ({"dbias"} if "bias" in case.arrays else set())


def test_is_causal_is_used_only_for_top_left_alignment():
    q = k = v = np.zeros((1, 1, 3, 4))
    assert ta.translate_options(q, k, v, causal=True)["is_causal"] is True
    bottom = ta.translate_options(q, np.zeros((1, 1, 5, 4)), np.zeros((1, 1, 5, 4)), causal=True, align="bottom_right")
    assert "is_causal" not in bottom and bottom["attn_mask"].dtype == bool
    assert ta.translate_options(np.zeros((1, 4, 3, 4)), k, v)["enable_gqa"] is True


@pytest.mark.parametrize("option", [{"softcap": 2.0}, {"sinks": np.zeros(1)}, {"empty_rows": "nan"}])
def test_untranslatable_options_are_refused(option):
    q = np.zeros((1, 1, 3, 4))
    with pytest.raises(refattn.Unsupported):
        ta.torch_sdpa(q, q, q, **option)


LOW_PRECISION = [("cpu", "float32"), ("cpu", "bfloat16")] + (
    [("cuda", "float16"), ("cuda", "bfloat16")] if torch.cuda.is_available() else []  # the GPU kernels' dtypes
)


@pytest.mark.parametrize("device, dtype", LOW_PRECISION)
def test_low_precision_torch_passes_the_flash_rule(device, dtype):
    case = SUITE["causal_bottom_right"]
    verdict = ta.check_torch(
        case.q, case.k, case.v, dtype=dtype, device=device, d_out=case.cotangents["d_out"], **case.sdpa_options()
    )
    assert verdict.passed, verdict.report()


def test_a_user_callable_with_a_bug_is_caught():
    case = SUITE["causal_square"]

    def my_attention(q, k, v):  # forgets the causal mask
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    verdict = ta.check_callable(my_attention, case.q, case.k, case.v, dtype="float32", options={"causal": True})
    assert not verdict.passed and "out: FAIL" in verdict.report()

    def right(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    assert ta.check_callable(
        right, case.q, case.k, case.v, dtype="bfloat16", d_out=case.cotangents["d_out"], options={"causal": True}
    ).passed


def test_multihead_attention_weights_round_trip():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 8))
    tx = torch.tensor(x, requires_grad=True)
    y, _ = mha(tx, tx, tx, need_weights=False)
    d_y = rng.standard_normal(y.shape)  # random: an all-ones cotangent cancels across softmax rows
    y.backward(torch.tensor(d_y))
    params = ta.mha_params(mha)
    np.testing.assert_allclose(
        refattn.multihead_attention(x, params, num_heads=2), y.detach().numpy(), rtol=1e-12, atol=1e-13
    )
    grads = refattn.multihead_attention_backward(d_y, x, params, num_heads=2)
    for ours, theirs in zip(grads.dparams, ta.mha_param_grads(mha)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)


def test_rounded_inputs_are_what_the_golden_sees():
    q = np.full((1, 1, 2, 2), 1 + 2**-9)  # not a bfloat16 value
    got = ta.torch_sdpa(q, q, q, dtype="bfloat16")
    np.testing.assert_array_equal(got["out"], lowp.round_to(got["out"], "bfloat16"))


@pytest.mark.parametrize("cross, padding, causal", [(False, False, False), (True, True, False), (False, True, True)])
def test_check_mha_float64_and_float32(cross, padding, causal):
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 8))
    kv = rng.standard_normal((2, 6, 8)) if cross else None
    lk = 6 if cross else 5
    real = np.ones((2, lk), dtype=bool)
    real[1, -2:] = False  # the last two keys of item 1 are padding
    kw = dict(kv=kv, key_is_real=real if padding else None, causal=causal, d_y=rng.standard_normal((2, 5, 8)))
    for dtype in (torch.float64, torch.float32):
        mha = torch.nn.MultiheadAttention(8, 2, batch_first=True, dtype=dtype)
        verdict = ta.check_mha(mha, x, **kw)
        assert verdict.passed, verdict.report()
        assert [j.quantity for j in verdict.judgements] == ["out", "dx"] + (["dkv"] if cross else [])


def test_check_mha_catches_swapped_projections(monkeypatch):
    torch.manual_seed(2)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    x = np.random.default_rng(2).standard_normal((1, 4, 8))
    real = ta.mha_params
    monkeypatch.setattr(ta, "mha_params", lambda m: real(m)._replace(w_q=real(m).w_k, w_k=real(m).w_q))
    assert not ta.check_mha(mha, x).passed


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_a_padded_batch_with_per_sequence_structure_is_judged(dtype):
    """Per-sequence lengths and starts, bottom-right causal, a window and chunks reach torch as one
    explicit attn_mask; its zeros on fully masked rows are refattn's padded rows: torch passes."""
    rng = np.random.default_rng(11)
    q, k, v = rng.standard_normal((3, 2, 6, 8)), rng.standard_normal((3, 2, 7, 8)), rng.standard_normal((3, 2, 7, 8))
    options = dict(
        causal=True,
        align="bottom_right",
        window=(3, None),
        chunk=4,
        q_lengths=np.array([6, 3, 0]),
        k_lengths=np.array([7, 4, 2]),
        k_starts=np.array([0, 2, 5]),
    )
    verdict = ta.check_torch(q, k, v, dtype=dtype, d_out=rng.standard_normal((3, 2, 6, 8)), **options)
    assert verdict.passed, verdict
