"""Run the ``Attention`` nodes of an ONNX model (opset 23+) and judge each against refattn.

:func:`check_onnx` runs a model with ONNX Runtime (``runtime="onnxruntime"``) or ONNX's own
reference evaluator (``runtime="reference"``), the inputs and outputs of every ``Attention`` node of
its main graph exposed as graph outputs, translates each node's attributes and inputs to
:func:`refattn.sdpa`'s options, and judges its outputs at the node's dtype with the tolerance rules
(:mod:`refattn.testing.compare`):

* ``Y`` by :func:`refattn.testing.check_attention` (the low-precision twins set the budget);
* ``present_key`` / ``present_value`` against :func:`refattn.attention.cache.append` (ONNX's
  concatenation of the past and the new keys/values; it should be exact);
* ``qk_matmul_output`` against :func:`refattn.attention_logits` at the stage its
  ``qk_matmul_output_mode`` names (0 ``"scaled"``, 1 ``"softcapped"``, 2 ``"masked"``) or, for mode 3,
  :func:`refattn.attention_weights`; the budget is set by a twin of ONNX's own pattern
  (``Q·√scale``, ``K·√scale`` rounded to the node's dtype, the product accumulated in float32,
  softcap and the additive mask in the node's dtype, the softmax in ``softmax_precision``).

Translation (the operator's schema, ``onnx/defs/nn/defs.cc`` and its reference
``onnx/reference/ops/op_attention.py``): 3-D ``(B, S, H·D)`` inputs are split into heads with
``q_num_heads``/``kv_num_heads`` (4-D ``(B, H, S, D)`` are refattn's layout); ``K``, ``V`` are
``present = concat(past, new)``; ``attn_mask`` bool → ``mask`` (True = attend, the same polarity),
float → ``bias``, a last dim shorter than the total length padded with False/``-inf``
(:func:`refattn.attention.cache.extend_mask`); ``is_causal`` → ``causal`` with ONNX's offset: query
``i`` sits at key ``past_sequence_length + i`` (``align=past_length``), at ``nonpad_kv_seqlen[b] −
q_sequence_length`` with an external cache (``k_lengths=nonpad_kv_seqlen``,
``align="bottom_right"``), at ``i`` without a cache; ``left_window_size``/``right_window_size``
(Attention-25, ``-1`` unbounded) → ``window`` with the same offset; ``scale``, ``softcap`` (0 = off)
as they are; GQA heads grouped as refattn groups them.  ONNX's order is refattn's (softcap before
the mask, per the operator's errata in onnx 1.23: "The soft cap is applied before mask / bias
addition and softmax"), and a fully masked row gives 0 in both.

A node refattn cannot judge (an integer mask, an unknown mode, a runtime that cannot run the model)
is reported ``"unsupported"`` with the reason; nothing is raised unless ``raise_on=`` asks.
Attention nodes inside subgraphs (``If``/``Loop`` bodies) are not visited.  ``onnx`` (and
``onnxruntime`` for that runtime) are imported when a function runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from refattn import lowp
from refattn._validate import RefAttnError, as_choice, check_keywords_of
from refattn.adapters.peer import PeerVerdict, finish
from refattn.attention import cache
from refattn.attention.sdpa import attention_logits, attention_weights, expand_kv, validate
from refattn.testing.compare import check_attention, judge

__all__ = ["MODE_STAGES", "RUNTIMES", "OnnxVerdict", "check_onnx", "random_inputs"]

#: The runtimes :func:`check_onnx` runs a model with.
RUNTIMES = ("onnxruntime", "reference")
#: ``qk_matmul_output_mode`` → the :func:`refattn.attention_logits` stage it outputs (3: the
#: probabilities, :func:`refattn.attention_weights`).
MODE_STAGES = {0: "scaled", 1: "softcapped", 2: "masked", 3: "weights"}
_OUTPUTS = ("Y", "present_key", "present_value", "qk_matmul_output")
_INPUTS = ("Q", "K", "V", "attn_mask", "past_key", "past_value", "nonpad_kv_seqlen")


def _onnx():
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - exercised only without onnx
        raise RefAttnError("refattn.adapters.onnx needs ONNX: pip install 'refattn[onnx]'") from exc
    return onnx


@dataclass
class OnnxVerdict:
    """The verdicts of every ``Attention`` node of a model, ``{node name: PeerVerdict}`` in graph
    order; ``status`` is ``"FAIL"`` when a node failed, else ``"unsupported"`` when one was not (fully)
    judged, else ``"pass"``; truthy when ``"pass"``."""

    runtime: str
    nodes: dict = field(default_factory=dict)

    @property
    def status(self):
        statuses = {v.status for v in self.nodes.values()}
        return next((s for s in ("FAIL", "unsupported") if s in statuses), "pass")

    @property
    def passed(self):
        return self.status == "pass"

    def __bool__(self):
        return self.passed

    def __getitem__(self, node):
        return self.nodes[node]

    def report(self):
        """Each node's :meth:`PeerVerdict.report`, under a line ``node <name>:``."""
        return "\n\n".join(f"node {name}:\n{v.report()}" for name, v in self.nodes.items())

    def rows(self, dtype_of=None):
        """One :class:`refattn.crosscheck.CheckRow` per node (what ``refattn check model.onnx``
        prints): the case is the node's name, the implementation ``onnx <runtime>``.

        Parameters
        ----------
        dtype_of : mapping of str to str, optional
            The dtype to print per node.  Default None: the dtype of the node's first judgement
            (``"-"`` when nothing was judged).

        Returns
        -------
        list of CheckRow
            ``"pass"``, ``"FAIL"`` or ``"unsupported"`` rows; the detail is the node's report.
        """
        from refattn.crosscheck import CheckRow

        rows = []
        for name, v in self.nodes.items():
            dtype = (dtype_of or {}).get(name) or (v.judgements[0].dtype if v.judgements else "-")
            impl = f"onnx {self.runtime}"
            if v.status == "unsupported":
                rows.append(CheckRow(name, impl, dtype, "unsupported", detail=v.report()))
            else:
                row = CheckRow.from_verdict(name, impl, dtype, v)
                rows.append(row)
        return rows


def _load(model):
    onnx = _onnx()
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise RefAttnError(f"model: {path}: no such file")
        try:
            return onnx.load(path)
        except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file
            raise RefAttnError(f"model: {path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    raise RefAttnError(f"model: expected an onnx.ModelProto or a path, got {type(model).__name__}")


def _attention_nodes(graph):
    nodes = [(i, n) for i, n in enumerate(graph.node) if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    named, seen = [], set()
    for i, n in nodes:
        name = n.name or f"Attention_{i}"
        while name in seen:
            name += "_"
        seen.add(name)
        named.append((name, n))
    return named


def _io(node):
    """The node's inputs and outputs by their schema names (absent or empty: None)."""
    ins = {n: (node.input[i] if i < len(node.input) and node.input[i] else None) for i, n in enumerate(_INPUTS)}
    outs = {n: (node.output[i] if i < len(node.output) and node.output[i] else None) for i, n in enumerate(_OUTPUTS)}
    return ins, outs


def _graph_input_names(model):
    init = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in init]


def random_inputs(model, *, seed=0):
    """Random values for a model's graph inputs: standard normal for float inputs, random bools for
    bool ones, in each input's dtype and shape (what ``refattn check model.onnx`` feeds without
    ``--inputs``).

    Parameters
    ----------
    model : onnx.ModelProto or str or os.PathLike
        The model (or its file).
    seed : int, default 0
        ``numpy.random.default_rng`` seed.

    Returns
    -------
    dict of str to ndarray
        One array per graph input that is not an initializer.

    Raises
    ------
    RefAttnError
        An input of symbolic or unknown shape, or of an integer type (a length such as
        ``nonpad_kv_seqlen`` cannot be guessed): give the inputs yourself.
    """
    onnx = _onnx()
    model = _load(model)
    rng = np.random.default_rng(seed)
    init = {t.name for t in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in init:
            continue
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if not t.HasField("shape") or any(d is None for d in dims):
            raise RefAttnError(
                f"model input {vi.name!r}: shape {[d.dim_param or '?' for d in t.shape.dim]} is not fixed; "
                "give its values (refattn check: --inputs FILE.npz)"
            )
        dt = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
        if dt == np.bool_:
            out[vi.name] = rng.random(dims) < 0.8
        elif dt.kind in "iu":
            raise RefAttnError(
                f"model input {vi.name!r}: integer input (dtype {dt}) cannot be drawn at random; "
                "give its values (refattn check: --inputs FILE.npz)"
            )
        else:
            out[vi.name] = rng.standard_normal(dims).astype(dt)
    return out


def _elem_types(model):
    """``{value name: elem_type}`` from the graph and its shape inference."""
    onnx = _onnx()
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - an uninferable model still runs; types then come from the graph
        inferred = model
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def _exposed(model, wanted):
    """A copy of ``model`` with the names ``wanted`` (intermediate values) added as graph outputs."""
    onnx = _onnx()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output} | set(_graph_input_names(m)) | {t.name for t in m.graph.initializer}
    types = _elem_types(model)
    for name in wanted:
        if name in have:
            continue
        if name not in types:
            raise RefAttnError(f"model: the type of {name!r} is unknown (shape inference could not find it)")
        m.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
        have.add(name)
    return m


def _run(model, feeds, runtime):
    """Every graph output of ``model`` (with the exposed ones) by name, run by ``runtime``."""
    names = [o.name for o in model.graph.output]
    if runtime == "reference":
        from onnx.reference import ReferenceEvaluator

        got = ReferenceEvaluator(model).run(None, feeds)
    else:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - exercised only without onnxruntime
            raise RefAttnError("runtime='onnxruntime' needs ONNX Runtime: pip install 'refattn[onnx]'") from exc
        so = ort.SessionOptions()
        so.log_severity_level = 4  # a kernel's refusal is reported as the verdict's reason, not logged
        session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        got = session.run(names, feeds)
    return dict(zip(names, got))


def _attrs(node):
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _format(np_dtype):
    return lowp.format_of(np_dtype).name


def _coarser(a, b):
    fa, fb = lowp.format_of(a), lowp.format_of(b)
    return fa.name if fa.fraction_bits <= fb.fraction_bits else fb.name


def _heads(x, heads, name):
    """``(B, S, H·E)`` → ``(B, H, S, E)``; 4-D as it is."""
    if x.ndim == 4:
        return x
    if heads is None:
        raise RefAttnError(f"{name}: a 3-D input needs the q_num_heads and kv_num_heads attributes")
    b, s, hidden = x.shape
    if hidden % heads:
        raise RefAttnError(f"{name}: hidden size {hidden} is not a multiple of the {heads} heads")
    return x.reshape(b, s, heads, hidden // heads).transpose(0, 2, 1, 3)


@dataclass
class _Call:
    """One node translated: refattn's q, k, v (the present keys/values), sdpa options, dtypes."""

    q: np.ndarray  # (B, Hq, Lq, D)
    k: np.ndarray  # (B, Hk, Lt, D) present keys
    v: np.ndarray  # (B, Hk, Lt, Dv)
    options: dict
    dtype: str  # the node's T1
    softmax_dtype: str  # softmax_precision, or T1
    mode: int
    three_d: bool
    notes: list


_SOFTMAX_PRECISIONS = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}


def _translate(node, values, old_reference=False):
    """The node as a :class:`_Call`, or a list of reasons it cannot be judged."""
    ins, _ = _io(node)
    at = _attrs(node)
    arr = {n: (None if name is None else values[name]) for n, name in ins.items()}
    why = []
    q_raw = arr["Q"]
    dtype = _format(q_raw.dtype)
    f64 = {n: None if x is None else np.asarray(x).astype(np.float64) for n, x in arr.items() if n != "attn_mask"}
    three_d = q_raw.ndim == 3
    qh, kvh = at.get("q_num_heads"), at.get("kv_num_heads")
    q = _heads(f64["Q"], qh, "Q")
    k_new, v_new = _heads(f64["K"], kvh, "K"), _heads(f64["V"], kvh, "V")
    k, v = cache.append(f64["past_key"], f64["past_value"], k_new, v_new)
    past = 0 if f64["past_key"] is None else f64["past_key"].shape[2]
    total = k.shape[2]
    options = {}
    notes = []
    scale = at.get("scale")
    if scale is not None:
        options["scale"] = float(scale)
    softcap = float(at.get("softcap", 0.0))
    if softcap > 0:
        options["softcap"] = softcap
    nonpad = arr["nonpad_kv_seqlen"]
    if nonpad is not None:
        options["k_lengths"] = np.asarray(nonpad, dtype=np.int64)
    causal = int(at.get("is_causal", 0)) == 1
    left, right = int(at.get("left_window_size", -1)), int(at.get("right_window_size", -1))
    window = None if left < 0 and right < 0 else (None if left < 0 else left, None if right < 0 else right)
    if causal:
        options["causal"] = True
    if window is not None:
        options["window"] = window
    if causal or window is not None:
        if past:
            options["align"] = past  # query i sits at key past_sequence_length + i
            notes.append(f"causal/window offset: past_sequence_length = {past} (align={past})")
        elif nonpad is not None:
            options["align"] = "bottom_right"  # nonpad_kv_seqlen[b] - q_sequence_length
            notes.append("causal/window offset: nonpad_kv_seqlen - q_sequence_length (align='bottom_right')")
        else:
            options["align"] = "top_left"
    mask = arr["attn_mask"]
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype != np.bool_ and m.dtype.kind in "iu":
            why.append(f"attn_mask: an integer mask (dtype {m.dtype}); the operator names bool and float masks")
        else:
            m = m if m.dtype == np.bool_ else m.astype(np.float64)
            if m.shape[-1] < total:
                notes.append(f"attn_mask's {m.shape[-1]} columns padded to the {total} keys (masked)")
                m = cache.extend_mask(m, total)
            options["mask" if m.dtype == np.bool_ else "bias"] = m
    if softcap > 0 and old_reference:
        why.append(
            f"softcap: onnx {_onnx().__version__}'s reference soft-caps after the additive mask (before onnx 1.23's "
            "errata), which refattn's order (softcap before bias and masks) cannot reproduce"
        )
    mode = int(at.get("qk_matmul_output_mode", 0))
    sp = at.get("softmax_precision")
    softmax_dtype = dtype
    if sp is not None:
        if int(sp) not in _SOFTMAX_PRECISIONS:
            why.append(f"softmax_precision={sp}: expected one of {sorted(_SOFTMAX_PRECISIONS)} (FLOAT, FLOAT16, ...)")
        else:
            softmax_dtype = _SOFTMAX_PRECISIONS[int(sp)]
    if why:
        return why
    return _Call(q, k, v, options, dtype, softmax_dtype, mode, three_d, notes)


def _qk_golden(call, stage):
    if stage == "weights":
        return attention_weights(call.q, call.k, **call.options)
    return attention_logits(call.q, call.k, stage=stage, **call.options)


def _qk_twin(call, stage):
    """ONNX's pattern in the node's dtype: ``rd(Q·rd(√scale))``, ``rd(K·rd(√scale))``, their product
    accumulated in float32 (float64 for double) and rounded; ``rd(c·rd(tanh(rd(s/c))))``;
    ``rd(s + mask)``, ``-inf`` where disallowed; the softmax in ``softmax_precision``."""
    fmt = call.dtype
    acc = np.float64 if fmt == "float64" else np.float32

    def rd(x):
        return lowp.round_to(x, fmt)

    a = validate(call.q, call.k, call.v, **call.options)
    root = rd(np.sqrt(a.scale))
    qs, ks = rd(call.q * root), rd(expand_kv(call.k, a.groups) * root)  # (B, Hq, Lq, D), (B, Hq, Lt, D)
    s = rd((qs.astype(acc) @ np.swapaxes(ks, -1, -2).astype(acc)).astype(np.float64))  # (B, Hq, Lq, Lt)
    if stage == "scaled":
        return s
    if a.softcap is not None:
        s = rd(a.softcap * rd(np.tanh(rd(s / a.softcap))))
    if stage == "softcapped":
        return s
    if a.bias is not None:
        s = rd(s + a.bias)
    if a.allowed is not None:
        s = np.where(a.allowed, s, -np.inf)
    if stage == "masked":
        return np.broadcast_to(s, a.score_shape)
    sp = call.softmax_dtype
    x = lowp.round_to(s, sp)
    m = np.max(x, axis=-1, keepdims=True)
    empty = np.isneginf(m)
    with np.errstate(invalid="ignore"):
        e = lowp.round_to(np.exp(lowp.round_to(x - np.where(empty, 0.0, m), sp)), sp)
    total = np.sum(e.astype(acc), axis=-1, keepdims=True).astype(np.float64)
    p = lowp.round_to(e / np.where(empty, 1.0, total), sp)
    return rd(np.where(empty, 0.0, p))


def _judge_node(name, node, call, values, rule, runtime):
    _, outs = _io(node)
    judged = _coarser(call.dtype, call.softmax_dtype)
    notes = list(call.notes)
    if judged != call.dtype:
        notes.append(f"softmax_precision {call.softmax_dtype}: Y judged at the {judged} rule")
    unsupported = []
    judgements = []
    y = values[outs["Y"]].astype(np.float64)
    if call.three_d:  # (B, S, Hq·Dv) → (B, Hq, S, Dv)
        y = _heads(y, call.q.shape[1], "Y")
    judgements += check_attention(y, call.q, call.k, call.v, dtype=judged, rule=rule, **call.options).judgements
    for out, expected in (("present_key", call.k), ("present_value", call.v)):
        if outs[out] is not None:
            got = values[outs[out]].astype(np.float64)
            judgements.append(judge(out, got, expected, dtype=call.dtype, rule=rule, kind="output"))
    if outs["qk_matmul_output"] is not None:
        stage = MODE_STAGES.get(call.mode)
        if stage is None:
            unsupported.append(f"qk_matmul_output_mode={call.mode}: the operator defines modes 0-3")
        else:
            golden = np.broadcast_to(_qk_golden(call, stage), call.q.shape[:3] + (call.k.shape[2],))
            dt = call.dtype if stage != "weights" else _coarser(call.dtype, call.softmax_dtype)
            got = values[outs["qk_matmul_output"]].astype(np.float64)
            twin = None if dt == "float64" else _qk_twin(call, stage)
            quantity = f"qk_matmul_output (mode {call.mode}: {stage})"
            judgements.append(judge(quantity, got, golden, twin, dtype=dt, rule=rule, kind="output"))
    peer = f"ONNX Attention node {name!r} ({runtime}, {call.dtype})"
    return PeerVerdict(judgements, peer=peer, unsupported=unsupported, notes=notes)


def check_onnx(model, inputs, *, runtime="onnxruntime", rule="flash", raise_on=()):
    """Run ``model`` with ``runtime`` and judge every ``Attention`` node of its main graph: an
    :class:`OnnxVerdict` with one :class:`refattn.adapters.peer.PeerVerdict` per node.

    Each node's ``Y`` is judged by :func:`refattn.testing.check_attention` at the coarser of its
    dtype and its ``softmax_precision``, ``present_key``/``present_value`` against ONNX's
    concatenation, ``qk_matmul_output`` at the stage of its mode (module docstring).  A node (or
    output) refattn cannot judge is ``"unsupported"`` with the reason, as is every node when the
    runtime cannot run the model (its error is the reason).

    Parameters
    ----------
    model : onnx.ModelProto or str or os.PathLike
        The model (opset 23+ for ``Attention``), or its ``.onnx`` file.
    inputs : mapping of str to array_like
        A value per graph input (initializers excluded), in the input's dtype
        (:func:`random_inputs` draws some).
    runtime : {"onnxruntime", "reference"}, default "onnxruntime"
        ONNX Runtime's CPU execution provider, or ``onnx.reference.ReferenceEvaluator``.
    rule : {"flash", "torch", "allclose"}, default "flash"
        The tolerance rule (:func:`refattn.testing.compare.judge`).
    raise_on : str or iterable of str, default ()
        ``"unsupported"`` and/or ``"mismatch"``: raise for the first node so judged
        (:func:`refattn.adapters.peer.finish`).  Default (): raise nothing.

    Returns
    -------
    OnnxVerdict
        ``nodes``: ``{node name: PeerVerdict}`` (a node without a name is ``Attention_<index>``).

    Raises
    ------
    RefAttnError
        No ``Attention`` node in the main graph, a missing or unknown input, a model that cannot be
        read; what ``raise_on`` asks for.
    """
    as_choice(runtime, "runtime", RUNTIMES)
    model = _load(model)
    found = _attention_nodes(model.graph)
    if not found:
        raise RefAttnError("model: no Attention node (ONNX opset 23+) in its main graph")
    expected = _graph_input_names(model)
    feeds = dict(inputs)
    missing = [n for n in expected if n not in feeds]
    unknown = [n for n in feeds if n not in expected]
    if missing or unknown:
        raise RefAttnError(f"inputs: expected the model's inputs {expected}, missing {missing}, unknown {unknown}")
    feeds = {n: np.asarray(x) for n, x in feeds.items()}
    wanted = []
    for _, node in found:
        ins, outs = _io(node)
        wanted += [n for n in list(ins.values()) + list(outs.values()) if n is not None]
    exposed = _exposed(model, wanted)
    verdict = OnnxVerdict(runtime)
    try:
        values = _run(exposed, feeds, runtime)
    except Exception as exc:  # noqa: BLE001 - the runtime's refusal is the verdict, not our crash
        reason = f"{runtime} could not run the model: {type(exc).__name__}: {' '.join(str(exc).split())}"
        for name, _ in found:
            peer = f"ONNX Attention node {name!r} ({runtime})"
            verdict.nodes[name] = PeerVerdict([], peer=peer, unsupported=[reason])
        return _finish_all(verdict, raise_on)
    onnx = _onnx()
    values.update({t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer})
    values.update(feeds)
    for name, node in found:
        try:
            call = _translate(node, values, old_reference=runtime == "reference" and _before_errata())
            if not isinstance(call, list):
                verdict.nodes[name] = _judge_node(name, node, call, values, rule, runtime)
                continue
        except RefAttnError as exc:  # e.g. a NaN in a float mask, a length past the keys
            call = [f"refattn refuses the node's inputs: {' '.join(str(exc).split())}"]
        verdict.nodes[name] = PeerVerdict([], peer=f"ONNX Attention node {name!r} ({runtime})", unsupported=call)
    return _finish_all(verdict, raise_on)


def _before_errata():
    """Whether the installed onnx predates 1.23 (its reference soft-caps after the mask)."""
    digits = [int(p) if p.isdigit() else 0 for p in _onnx().__version__.split(".")[:2]]
    return tuple(digits) < (1, 23)


def _finish_all(verdict, raise_on):
    for v in verdict.nodes.values():
        finish(v, raise_on)
    return verdict


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
