"""The ONNX adapter: Attention nodes run by ONNX Runtime and by ONNX's reference, judged by refattn.

The configurations are ONNX's own node tests (onnx/backend/test/case/node/attention.py, same shapes
and attributes) plus the opset-24/25 inputs and attributes; the runtimes' known departures from the
operator's schema are pinned as FAIL or unsupported verdicts (specs/adapters.md, "ONNX").
"""

import numpy as np
import pytest

import refattn
from refattn.testing import AttentionMismatch

onnx = pytest.importorskip("onnx")
from onnx import TensorProto as TP  # noqa: E402
from onnx import helper  # noqa: E402

from refattn.adapters import onnx as oa  # noqa: E402
from refattn.cli import main  # noqa: E402

pytestmark = pytest.mark.onnx
HAVE_ORT = True
try:
    import onnxruntime  # noqa: F401
except ImportError:  # pragma: no cover - the tox env onnx installs it
    HAVE_ORT = False
RUNTIMES = [
    pytest.param("onnxruntime", marks=pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime is not installed")),
    "reference",
]
NP = {TP.FLOAT: np.float32, TP.DOUBLE: np.float64, TP.FLOAT16: np.float16, TP.BOOL: np.bool_, TP.INT64: np.int64}
ORDER = ("Q", "K", "V", "attn_mask", "past_key", "past_value", "nonpad_kv_seqlen")
OUTPUTS = ("Y", "present_key", "present_value", "qk")


def _model(opset, attrs, arrays, outputs=None):
    """A one-node model whose graph inputs are ``arrays`` ({name: (TensorProto type, array)}); its
    outputs Y, present_key, present_value and, with a qk_matmul_output_mode, qk_matmul_output."""
    outputs = outputs or OUTPUTS[: 4 if "qk_matmul_output_mode" in attrs else 3]
    ins = [n if n in arrays else "" for n in ORDER]
    while not ins[-1]:
        ins.pop()
    inputs = [helper.make_tensor_value_info(n, t, a.shape) for n, (t, a) in arrays.items()]
    node = helper.make_node("Attention", ins, list(outputs), name="attention", **attrs)
    elem = arrays["Q"][0]
    outs = [helper.make_tensor_value_info(o, elem, None) for o in outputs if o]
    graph = helper.make_graph([node], "g", inputs, outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return model, {n: a for n, (_, a) in arrays.items()}


def _rand(seed):
    rng = np.random.default_rng(seed)

    def arr(t, shape):
        return t, rng.random(shape).astype(NP[t])  # ONNX's node tests: np.random.rand

    return arr, rng


def _cases():
    """ONNX's node tests (names as theirs) and the newer opsets' inputs."""
    a, rng = _rand(0)
    past = 12
    cases = {
        # test_attention_4d_with_past_and_present_qk_matmul_bias_3d_mask_causal: 4 queries, 6 new keys
        # after 12 cached ones: query i sits at key 12 + i (not at 18 - 4 + i)
        "4d_past_qk_bias_3d_mask_causal": (
            23,
            dict(qk_matmul_output_mode=2, is_causal=1),
            dict(
                Q=a(TP.FLOAT, (2, 3, 4, 8)),
                K=a(TP.FLOAT, (2, 3, 6, 8)),
                V=a(TP.FLOAT, (2, 3, 6, 8)),
                attn_mask=a(TP.FLOAT, (2, 1, 4, 6 + past)),
                past_key=a(TP.FLOAT, (2, 3, past, 8)),
                past_value=a(TP.FLOAT, (2, 3, past, 8)),
            ),
        ),
        "4d_gqa_with_past_and_present": (
            23,
            {},
            dict(
                Q=a(TP.FLOAT, (2, 9, 4, 8)),
                K=a(TP.FLOAT, (2, 3, 6, 8)),
                V=a(TP.FLOAT, (2, 3, 6, 8)),
                attn_mask=a(TP.FLOAT, (4, 6 + past)),
                past_key=a(TP.FLOAT, (2, 3, past, 8)),
                past_value=a(TP.FLOAT, (2, 3, past, 8)),
            ),
        ),
        "4d_gqa_with_past_and_present_fp16": (
            23,
            {},
            dict(
                Q=a(TP.FLOAT16, (2, 9, 4, 8)),
                K=a(TP.FLOAT16, (2, 3, 6, 8)),
                V=a(TP.FLOAT16, (2, 3, 6, 8)),
                attn_mask=a(TP.FLOAT16, (4, 6 + past)),
                past_key=a(TP.FLOAT16, (2, 3, past, 8)),
                past_value=a(TP.FLOAT16, (2, 3, past, 8)),
            ),
        ),
        "4d_attn_mask_bool_4d": (
            23,
            {},
            dict(
                Q=a(TP.FLOAT, (2, 3, 4, 8)),
                K=a(TP.FLOAT, (2, 3, 6, 8)),
                V=a(TP.FLOAT, (2, 3, 6, 8)),
                attn_mask=(TP.BOOL, rng.random((2, 3, 4, 6)) < 0.6),
            ),
        ),
        "4d_with_qk_matmul_softmax": (
            23,
            dict(qk_matmul_output_mode=3),
            dict(Q=a(TP.FLOAT, (2, 3, 4, 8)), K=a(TP.FLOAT, (2, 3, 6, 8)), V=a(TP.FLOAT, (2, 3, 6, 8))),
        ),
        "4d_gqa_softcap": (
            23,
            dict(softcap=2.0),
            dict(Q=a(TP.FLOAT, (2, 9, 4, 8)), K=a(TP.FLOAT, (2, 3, 6, 8)), V=a(TP.FLOAT, (2, 3, 6, 8))),
        ),
        # test_attention_3d_with_past_and_present_qk_matmul_softcap: (B, S, H·D) inputs, 4-D caches
        "3d_with_past_and_present_qk_matmul_softcap": (
            23,
            dict(q_num_heads=3, kv_num_heads=3, softcap=2.0, qk_matmul_output_mode=1),
            dict(
                Q=a(TP.FLOAT, (2, 4, 24)),
                K=a(TP.FLOAT, (2, 6, 24)),
                V=a(TP.FLOAT, (2, 6, 24)),
                attn_mask=a(TP.FLOAT, (4, 6 + past)),
                past_key=a(TP.FLOAT, (2, 3, past, 8)),
                past_value=a(TP.FLOAT, (2, 3, past, 8)),
            ),
        ),
        "3d_gqa_causal_decode": (
            23,
            dict(q_num_heads=4, kv_num_heads=2, is_causal=1),
            dict(
                Q=a(TP.FLOAT, (2, 1, 32)),
                K=a(TP.FLOAT, (2, 1, 16)),
                V=a(TP.FLOAT, (2, 1, 16)),
                past_key=a(TP.FLOAT, (2, 2, 5, 8)),
                past_value=a(TP.FLOAT, (2, 2, 5, 8)),
            ),
        ),
        # Attention-24: an external cache, query i at key nonpad_kv_seqlen[b] - 3 + i
        "24_nonpad_causal": (
            24,
            dict(is_causal=1, qk_matmul_output_mode=3),
            dict(
                Q=a(TP.FLOAT, (2, 2, 3, 8)),
                K=a(TP.FLOAT, (2, 2, 7, 8)),
                V=a(TP.FLOAT, (2, 2, 7, 8)),
                nonpad_kv_seqlen=(TP.INT64, np.array([4, 7], np.int64)),
            ),
        ),
        # Attention-25: a sliding window (left 2, right 0) on top of a bool mask
        "25_window_bool_mask": (
            25,
            dict(left_window_size=2, right_window_size=0, qk_matmul_output_mode=2),
            dict(
                Q=a(TP.FLOAT, (1, 2, 5, 8)),
                K=a(TP.FLOAT, (1, 2, 5, 8)),
                V=a(TP.FLOAT, (1, 2, 5, 8)),
                attn_mask=(TP.BOOL, rng.random((5, 5)) < 0.8),
            ),
        ),
    }
    return cases


CASES = _cases()
# What each runtime gets wrong, by (case, runtime): the quantity that fails and a fragment of its report.
KNOWN = {
    # ONNX Runtime (CPU) fills the masked logits of qk_matmul_output mode 2 with -FLT_MAX for
    # Attention-23/24 (-inf from Attention-25 on): finite where the operator adds -inf
    ("4d_past_qk_bias_3d_mask_causal", "onnxruntime"): ("qk_matmul_output (mode 2: masked)", "-inf where actual"),
}


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("name", list(CASES))
def test_onnx_node_tests_pass_on_both_runtimes(name, runtime):
    opset, attrs, arrays = CASES[name]
    model, feeds = _model(opset, attrs, arrays)
    verdict = oa.check_onnx(model, feeds, runtime=runtime)
    node = verdict["attention"]
    known = KNOWN.get((name, runtime))
    if known is None:
        assert verdict.status == "pass", verdict.report()
    else:
        quantity, fragment = known
        assert [j.quantity for j in node.judgements if not j.passed] == [quantity], verdict.report()
        assert fragment in node[quantity].report()
    judged = {j.quantity for j in node.judgements}
    assert {"out", "present_key", "present_value"} <= judged


def test_the_past_length_is_the_causal_offset():
    opset, attrs, arrays = CASES["4d_past_qk_bias_3d_mask_causal"]
    model, feeds = _model(opset, attrs, arrays)
    node = oa.check_onnx(model, feeds, runtime="reference")["attention"]
    assert "align=12" in " ".join(node.notes)
    assert node.passed


def test_a_wrong_alignment_is_caught(monkeypatch):
    """Mutant: the causal offset of a cache taken as bottom-right (18 - 4) instead of the past length."""
    opset, attrs, arrays = CASES["4d_past_qk_bias_3d_mask_causal"]
    model, feeds = _model(opset, attrs, arrays)
    translate = oa._translate

    def bottom_right(node, values, **kw):
        call = translate(node, values, **kw)
        call.options["align"] = "bottom_right"
        return call

    monkeypatch.setattr(oa, "_translate", bottom_right)
    node = oa.check_onnx(model, feeds, runtime="reference")["attention"]
    assert not node["out"].passed
    assert not node["qk_matmul_output (mode 2: masked)"].passed


def test_a_cache_appended_in_the_wrong_order_is_caught(monkeypatch):
    """Mutant: present = concat(new, past)."""
    opset, attrs, arrays = CASES["4d_gqa_with_past_and_present"]
    model, feeds = _model(opset, attrs, arrays)
    monkeypatch.setattr(
        oa.cache, "append", lambda pk, pv, k, v: (np.concatenate([k, pk], 2), np.concatenate([v, pv], 2))
    )
    node = oa.check_onnx(model, feeds, runtime="reference")["attention"]
    assert [j.quantity for j in node.judgements if not j.passed] == ["out", "present_key", "present_value"]


def test_a_short_mask_is_padded_with_masked_keys():
    a, _ = _rand(1)
    arrays = dict(
        Q=a(TP.FLOAT16, (1, 2, 4, 8)),
        K=a(TP.FLOAT16, (1, 2, 6, 8)),
        V=a(TP.FLOAT16, (1, 2, 6, 8)),
        attn_mask=a(TP.FLOAT16, (4, 4)),
    )
    model, feeds = _model(24, dict(qk_matmul_output_mode=2), arrays)
    verdict = oa.check_onnx(model, feeds, runtime="reference")
    assert verdict.passed, verdict.report()
    assert "padded to the 6 keys" in " ".join(verdict["attention"].notes)


@pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime is not installed")
def test_a_runtime_that_cannot_run_the_model_is_unsupported():
    """ONNX Runtime refuses an attn_mask shorter than the keys (Attention-24 allows it)."""
    a, _ = _rand(1)
    arrays = dict(
        Q=a(TP.FLOAT, (1, 2, 4, 8)),
        K=a(TP.FLOAT, (1, 2, 6, 8)),
        V=a(TP.FLOAT, (1, 2, 6, 8)),
        attn_mask=a(TP.FLOAT, (4, 4)),
    )
    model, feeds = _model(24, {}, arrays)
    verdict = oa.check_onnx(model, feeds)
    assert verdict.status == "unsupported"
    assert "onnxruntime could not run the model" in verdict["attention"].unsupported[0]
    assert "total_sequence_length" in verdict["attention"].unsupported[0]


def test_the_reference_returns_softcapped_scores_for_mode_0():
    """The schema: mode 0 is the QK product; onnx's reference returns it softcapped."""
    a, _ = _rand(2)
    arrays = dict(Q=a(TP.FLOAT, (1, 2, 3, 8)), K=a(TP.FLOAT, (1, 2, 5, 8)), V=a(TP.FLOAT, (1, 2, 5, 8)))
    model, feeds = _model(23, dict(softcap=0.5, qk_matmul_output_mode=0), arrays)
    node = oa.check_onnx(model, feeds, runtime="reference")["attention"]
    assert [j.quantity for j in node.judgements if not j.passed] == ["qk_matmul_output (mode 0: scaled)"]
    with pytest.raises(AttentionMismatch, match="mode 0: scaled"):
        oa.check_onnx(model, feeds, runtime="reference", raise_on="mismatch")
    if HAVE_ORT:
        assert oa.check_onnx(model, feeds).passed


def test_an_onnx_before_the_errata_soft_caps_after_the_mask(monkeypatch):
    """onnx < 1.23's reference: softcap(QK + mask), which refattn's order cannot give."""
    opset, attrs, arrays = CASES["4d_gqa_softcap"]
    model, feeds = _model(opset, attrs, arrays)
    monkeypatch.setattr(oa, "_before_errata", lambda: True)
    node = oa.check_onnx(model, feeds, runtime="reference")["attention"]
    assert node.status == "unsupported" and "soft-caps after the additive mask" in node.unsupported[0]
    if HAVE_ORT:
        assert oa.check_onnx(model, feeds).passed


@pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime is not installed")
def test_onnxruntime_double_attention_rounds_the_scale_to_float32():
    """√scale of a double node in float32: 1e-8 errors where float64 allows 1e-12; an exact √scale passes."""
    a, _ = _rand(3)
    arrays = dict(Q=a(TP.DOUBLE, (2, 2, 3, 4)), K=a(TP.DOUBLE, (2, 2, 6, 4)), V=a(TP.DOUBLE, (2, 2, 6, 4)))
    model, feeds = _model(23, dict(qk_matmul_output_mode=0), arrays)
    node = oa.check_onnx(model, feeds)["attention"]
    assert [j.quantity for j in node.judgements if not j.passed] == ["out", "qk_matmul_output (mode 0: scaled)"]
    assert 1e-9 < node["out"].max_error < 1e-6
    assert oa.check_onnx(model, feeds, runtime="reference").passed
    exact, feeds = _model(23, dict(qk_matmul_output_mode=0, scale=0.25), arrays)
    assert oa.check_onnx(exact, feeds).passed


def test_softmax_precision_sets_the_rule():
    a, _ = _rand(4)
    arrays = dict(Q=a(TP.DOUBLE, (1, 2, 3, 8)), K=a(TP.DOUBLE, (1, 2, 3, 8)), V=a(TP.DOUBLE, (1, 2, 3, 8)))
    model, feeds = _model(23, dict(softmax_precision=TP.FLOAT, is_causal=1, scale=0.25), arrays)
    node = oa.check_onnx(model, feeds, runtime="reference")["attention"]
    assert node.passed, node.report()
    assert node["out"].dtype == "float32"
    assert node["present_key"].dtype == "float64"


def test_intermediate_values_are_exposed():
    """Q comes from a MatMul and Y feeds a Relu: both are read from the run."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["q"]),
        helper.make_node("Attention", ["q", "k", "v"], ["y"], name="att"),
        helper.make_node("Relu", ["y"], ["out"]),
    ]
    shape = (1, 2, 3, 8)
    inputs = [helper.make_tensor_value_info(n, TP.FLOAT, shape) for n in ("x", "k", "v")]
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info("out", TP.FLOAT, None)],
        initializer=[onnx.numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    feeds = {n: rng.standard_normal(shape).astype(np.float32) for n in ("x", "k", "v")}
    for runtime in ("reference",) + (("onnxruntime",) if HAVE_ORT else ()):
        verdict = oa.check_onnx(model, feeds, runtime=runtime)
        assert verdict.passed, verdict.report()
        assert [j.quantity for j in verdict["att"].judgements] == ["out"]


def test_unsupported_nodes_and_bad_calls():
    a, rng = _rand(6)
    arrays = dict(
        Q=a(TP.FLOAT, (1, 2, 3, 8)),
        K=a(TP.FLOAT, (1, 2, 3, 8)),
        V=a(TP.FLOAT, (1, 2, 3, 8)),
        attn_mask=(TP.INT64, rng.integers(0, 2, (3, 3))),
    )
    model, feeds = _model(23, {}, arrays, outputs=("Y",))
    node = oa.check_onnx(model, feeds, runtime="reference")["attention"]
    assert node.status == "unsupported" and "integer mask" in node.unsupported[0]
    assert not node
    with pytest.raises(refattn.Unsupported, match="integer mask"):
        oa.check_onnx(model, feeds, runtime="reference", raise_on="unsupported")
    with pytest.raises(refattn.RefAttnError, match="missing \\['V'\\]"):
        oa.check_onnx(model, {n: feeds[n] for n in ("Q", "K", "attn_mask")}, runtime="reference")
    with pytest.raises(refattn.RefAttnError, match="runtime"):
        oa.check_onnx(model, feeds, runtime="tvm")
    relu = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, (2,))],
        [helper.make_tensor_value_info("y", TP.FLOAT, (2,))],
    )
    with pytest.raises(refattn.RefAttnError, match="no Attention node"):
        oa.check_onnx(helper.make_model(relu), {"x": np.zeros(2, np.float32)})


def test_random_inputs_follow_the_graph_and_refuse_what_cannot_be_drawn():
    opset, attrs, arrays = CASES["4d_attn_mask_bool_4d"]
    model, feeds = _model(opset, attrs, arrays)
    drawn = oa.random_inputs(model, seed=1)
    assert {n: (x.shape, x.dtype) for n, x in drawn.items()} == {n: (x.shape, x.dtype) for n, x in feeds.items()}
    opset, attrs, arrays = CASES["24_nonpad_causal"]
    with pytest.raises(refattn.RefAttnError, match="nonpad_kv_seqlen.*integer input"):
        oa.random_inputs(_model(opset, attrs, arrays)[0])
    symbolic = helper.make_graph(
        [helper.make_node("Attention", ["Q", "Q", "Q"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("Q", TP.FLOAT, ("batch", 2, 3, 8))],
        [helper.make_tensor_value_info("Y", TP.FLOAT, None)],
    )
    with pytest.raises(refattn.RefAttnError, match="'batch'.*is not fixed"):
        oa.random_inputs(helper.make_model(symbolic, opset_imports=[helper.make_opsetid("", 23)]))


def _save(tmp_path, name, attrs, opset=23):
    a, _ = _rand(7)
    arrays = dict(Q=a(TP.FLOAT, (1, 2, 3, 8)), K=a(TP.FLOAT, (1, 2, 5, 8)), V=a(TP.FLOAT, (1, 2, 5, 8)))
    model, feeds = _model(opset, attrs, arrays)
    path = tmp_path / name
    onnx.save(model, str(path))
    return path, feeds


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_refattn_check_model_onnx(tmp_path, capsys, runtime):
    path, feeds = _save(tmp_path, "good.onnx", dict(softcap=1.5, qk_matmul_output_mode=1))
    assert main(["check", str(path), "--runtime", runtime, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"attention  onnx {runtime}  float32" in out and "1 pass, 0 FAIL" in out
    np.savez(tmp_path / "inputs.npz", **feeds)
    assert main(["check", str(path), "--runtime", runtime, "--inputs", str(tmp_path / "inputs.npz"), "--json"]) == 0


def test_refattn_check_model_onnx_fails_with_status_1(tmp_path, capsys):
    path, _ = _save(tmp_path, "mode0.onnx", dict(softcap=0.5, qk_matmul_output_mode=0))
    assert main(["check", str(path), "--runtime", "reference", "--quiet", "--seed", "2"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] attention / onnx reference" in out and "qk_matmul_output (mode 0: scaled): FAIL" in out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["check", "MODEL", "--dtype", "float32"], "--dtype: an ONNX model's nodes are judged at their own dtype"),
        (["check", "MODEL", "--inputs", "MISSING"], "not a readable .npz file"),
        (["check", "NOFILE"], "no such file"),
    ],
)
def test_refattn_check_model_onnx_bad_input_exits_2(tmp_path, capsys, argv, fragment):
    path, _ = _save(tmp_path, "m.onnx", {})
    subs = {"MODEL": str(path), "MISSING": str(tmp_path / "none.npz"), "NOFILE": str(tmp_path / "none.onnx")}
    assert main([subs.get(a, a) for a in argv]) == 2
    assert fragment in capsys.readouterr().err
