"""refattn.model.lm: the transformer LM's gradients (finite differences, every option), a PyTorch float64
autograd twin, the loss, the attention maps, argument checks and properties with their mutants."""

import itertools
from typing import NamedTuple

import numpy as np
import pytest

from refattn import RefAttnError, RefAttnTypeError, _registry
from refattn.attention import position
from refattn.model import lm
from refattn.model.config import LMConfig
from refattn.model.layers import cross_entropy, cross_entropy_backward
from refattn.model.params import init_params, tree_items, tree_map
from refattn.testing import check_vjp, gradcheck
from tests.mutation import property_table

POSITIONS = ("learned", "sinusoidal", "rope", "alibi")
NORMS = ("layer", "rms")
NORM_POSITIONS = ("pre", "post")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")
TIED = (True, False)
KV_HEADS = (2, 1)  # of n_heads = 2: multi-head and multi-query
FACTORS = (POSITIONS, NORMS, NORM_POSITIONS, ACTIVATIONS, TIED, KV_HEADS)


class Model(NamedTuple):
    config: LMConfig
    params: object
    tokens: np.ndarray
    mask: np.ndarray
    head_mask: np.ndarray


def model(positions, norm, norm_position, activation, tied, kv, *, n_layers=2, causal=True, bias=True, seed=0):
    """A tiny model (V 5, E 4, 2 heads of 2, F 3, B 2, T 3) whose every parameter is random (norm weights
    near 1, biases near 0), a padding mask with the first token of row 1 padded (under causal, that
    query has no key: an empty row) and a random head mask.  With ReLU, the first seed from ``seed`` on
    whose every pre-activation is at least 0.05 from the kink (so finite differences see a smooth map)."""
    config = LMConfig(
        vocab_size=5, d_model=4, n_layers=n_layers, n_heads=2, n_kv_heads=kv, d_ff=3, max_len=4,
        positions=positions, norm=norm, norm_position=norm_position, activation=activation,
        tied_embeddings=tied, causal=causal, bias=bias,
    )  # fmt: skip
    for s in range(seed, seed + 1000, 7):
        rng = np.random.default_rng(s)
        params = randomised(init_params(config, s, std=0.5), rng)
        tokens = rng.integers(0, 5, (2, 3))
        mask = np.array([[True, True, True], [False, True, True]])
        m = Model(config, params, tokens, mask, rng.uniform(0.5, 1.5, (n_layers, 2)))
        if activation != "relu" or relu_margin(m) >= 0.05:
            return m
    raise AssertionError("no seed keeps the ReLU pre-activations away from 0")


def randomised(params, rng):
    """``params`` plus N(0, 0.3²) noise on every leaf (norm weights off 1, biases off 0)."""
    return tree_map(lambda a: a + 0.3 * rng.standard_normal(a.shape), params)


def relu_margin(m):
    """The smallest |pre-activation| of the MLPs, ``|m_in w_in + b_in|``, over every layer and token."""
    trace = lm._forward(lm.validate(m.params, m.tokens, m.config, m.mask, m.head_mask))
    blocks = zip(trace.blocks, m.params.blocks)
    pre = [s["m_in"] @ b.mlp.w_in + (0.0 if b.mlp.b_in is None else b.mlp.b_in) for s, b in blocks]
    return min((float(np.abs(u).min()) for u in pre), default=np.inf)


def pairwise_rows():
    """16 option combinations covering every pair of levels of the six factors (and of causal and bias):
    positions and activation index a 4 × 4 grid (bits p0 p1, a0 a1); each binary factor is a distinct
    linear form of the four bits, so any two factors take every pair of values."""
    rows = []
    for p, a in itertools.product(range(4), range(4)):
        p0, p1, a0, a1 = p & 1, p >> 1, a & 1, a >> 1
        rows.append(
            dict(
                options=(
                    POSITIONS[p],
                    NORMS[p0 ^ a0],
                    NORM_POSITIONS[p1 ^ a1],
                    ACTIVATIONS[a],
                    TIED[p0 ^ a1],
                    KV_HEADS[p1 ^ a0],
                ),  # fmt: skip
                causal=not (p0 ^ p1 ^ a0),
                bias=not (p0 ^ a0 ^ a1),
            )
        )
    return rows


PAIRWISE = pairwise_rows()
PAIRWISE_IDS = ["-".join(map(str, r["options"])) + f"-causal{int(r['causal'])}-bias{int(r['bias'])}" for r in PAIRWISE]
EVERY = list(itertools.product(*FACTORS))
EVERY_IDS = ["-".join(map(str, c)) for c in EVERY]


def test_the_pairwise_rows_cover_every_pair():
    columns = [[r["options"][i] for r in PAIRWISE] for i in range(6)]
    columns += [[r["causal"] for r in PAIRWISE], [r["bias"] for r in PAIRWISE]]
    levels = list(FACTORS) + [(True, False), (True, False)]
    for i, j in itertools.combinations(range(len(columns)), 2):
        assert set(zip(columns[i], columns[j])) == set(itertools.product(levels[i], levels[j])), (i, j)


def _call(m, **options):
    return dict(config=m.config, mask=m.mask, head_mask=m.head_mask, **options)


# ---- gradients against finite differences -----------------------------------------------------


def _entrywise(m):
    report = gradcheck(lm.lm_forward, lm.lm_backward, (m.params, m.tokens), options=_call(m), rtol=1e-8)
    names = {c.name for c in report.checks}
    assert names == {f"params.{n}" for n, _ in tree_items(m.params)} | {"head_mask"}


@pytest.mark.parametrize("row", PAIRWISE, ids=PAIRWISE_IDS)
def test_every_parameter_entry_matches_finite_differences(row):
    """Entry by entry (sixth-order central differences, rtol 1e-8), every leaf of a one-layer model and
    the head mask, with a padding mask that leaves a query with no key; every pair of options."""
    _entrywise(model(*row["options"], n_layers=1, causal=row["causal"], bias=row["bias"]))


@pytest.mark.parametrize(
    "options", [("rope", "layer", "pre", "swiglu", False, 1), ("alibi", "rms", "post", "gelu", True, 2)], ids=str
)
def test_two_layers_match_finite_differences_entry_by_entry(options):
    """The residual stream between blocks, pre- and post-norm: every entry of a two-layer model."""
    _entrywise(model(*options, n_layers=2))


@pytest.mark.slow
@pytest.mark.parametrize("options", EVERY, ids=EVERY_IDS)
def test_every_option_combination_matches_a_random_direction_per_leaf(options):
    """Every combination of positions × norm × norm position × activation × tied × GQA (one layer,
    padding and head masks): one random direction per parameter leaf and for the head mask, rtol 1e-8."""
    m = model(*options, n_layers=1, seed=1)
    report = check_vjp(lm.lm_forward, lm.lm_backward, (m.params, m.tokens), options=_call(m), eps=1e-3, rtol=1e-8)
    assert len(report.checks) == len(tree_items(m.params)) + 2  # "all", each leaf, the head mask


def test_a_model_without_blocks_matches_finite_differences():
    m = model("learned", "rms", "pre", "gelu", False, 2, n_layers=0)
    gradcheck(lm.lm_forward, lm.lm_backward, (m.params, m.tokens), options=_call(m))
    d_logits = np.random.default_rng(5).standard_normal((2, 3, 5))
    g = lm.lm_backward(d_logits, m.params, m.tokens, m.config, head_mask=m.head_mask)
    assert g.dparams.blocks == () and g.dhead_mask.shape == (0, 2)


def test_without_a_head_mask_there_is_no_head_mask_gradient():
    m = model("rope", "layer", "pre", "swiglu", True, 1)
    d = np.random.default_rng(2).standard_normal((2, 3, 5))
    g = lm.lm_backward(d, m.params, m.tokens, m.config)
    ones = lm.lm_backward(d, m.params, m.tokens, m.config, head_mask=np.ones((2, 2)))
    assert g.dhead_mask is None and ones.dhead_mask.shape == (2, 2)
    for (n, a), (_, b) in zip(tree_items(g.dparams), tree_items(ones.dparams)):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15, err_msg=n)


# ---- the loss -----------------------------------------------------------------------------------


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_loss_and_grads_are_cross_entropy_of_the_logits(label_smoothing):
    m = model("alibi", "layer", "post", "gelu_tanh", False, 1)
    targets = np.array([[1, 4, -100], [-100, 0, 2]])
    opts = dict(ignore_index=-100, label_smoothing=label_smoothing)
    loss, grads = lm.lm_loss_and_grads(m.params, m.tokens, targets, **_call(m), **opts)
    logits = lm.lm_forward(m.params, m.tokens, **_call(m))
    assert isinstance(loss, float)
    assert loss == pytest.approx(float(cross_entropy(logits, targets, **opts)), rel=1e-15)
    d = cross_entropy_backward(1.0, logits, targets, **opts).dlogits
    want = lm.lm_backward(d, m.params, m.tokens, **_call(m))
    for (n, a), (_, b) in zip(tree_items(grads), tree_items(want)):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-16, err_msg=n)


# ---- the attention maps -------------------------------------------------------------------------


@pytest.mark.parametrize("positions", POSITIONS)
def test_the_attention_maps_are_softmax_rows_over_the_allowed_keys(positions):
    m = model(positions, "layer", "pre", "gelu", True, 1)
    logits, maps = lm.lm_forward(m.params, m.tokens, **_call(m), return_attentions=True)
    np.testing.assert_array_equal(logits, lm.lm_forward(m.params, m.tokens, **_call(m)))
    assert len(maps) == 2 and all(p.shape == (2, 2, 3, 3) for p in maps)
    allowed = np.tril(np.ones((3, 3), bool)) & m.mask[:, None, None, :]  # (B, 1, T, T)
    for p in maps:
        np.testing.assert_array_equal(p[~np.broadcast_to(allowed, p.shape)], 0.0)
        sums = p.sum(axis=-1)  # (B, H, T): 1, or 0 on the empty row (row 1, query 0)
        want = np.ones((2, 2, 3))
        want[1, :, 0] = 0.0
        np.testing.assert_allclose(sums, want, rtol=1e-14, atol=1e-15)


# ---- argument checks ------------------------------------------------------------------------------


def _bad(m, **changes):
    args = dict(params=m.params, tokens=m.tokens, config=m.config, mask=m.mask, head_mask=m.head_mask)
    args.update(changes)
    return args


M = model("learned", "layer", "pre", "swiglu", True, 1)


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        (dict(params=M.params._replace(wte=np.zeros((5, 3)))), RefAttnError, r"^params\.wte: expected shape \(5, 4\)"),
        (
            dict(params=M.params._replace(blocks=(M.params.blocks[0], M.params.blocks[1]._replace(attn=None)))),
            RefAttnTypeError,
            r"^params\.blocks\.1\.attn: expected a MHAParams of 8 fields",
        ),
        (dict(params=M.params._replace(lm_head=np.zeros((4, 5)))), RefAttnError, r"^params\.lm_head: expected None"),
        (dict(params=M.params._replace(wpe=None)), RefAttnError, r"^params\.wpe: expected an array of shape \(4, 4\)"),
        (dict(params=M.params[:4]), RefAttnTypeError, r"^params: expected a LMParams of 5 fields"),
        (dict(tokens=np.full((2, 3), 5)), RefAttnError, r"^tokens: expected ids in \[0, vocab_size=5\), got 5"),
        (dict(tokens=np.zeros((2, 3))), RefAttnTypeError, "^tokens: expected integer token ids"),
        (dict(tokens=np.zeros(3, int)), RefAttnError, r"^tokens: expected shape \(B, T\)"),
        (dict(tokens=np.zeros((1, 5), int), mask=None), RefAttnError, "^tokens: expected at most max_len=4"),
        (dict(mask=np.ones((2, 3))), RefAttnTypeError, "^mask: expected a bool array"),
        (dict(mask=np.ones((2, 2), bool)), RefAttnError, r"^mask: expected the shape of tokens \(2, 3\)"),
        (dict(head_mask=np.ones(2)), RefAttnError, r"^head_mask: expected shape \(n_layers, n_heads\) = \(2, 2\)"),
        (dict(head_mask=np.full((2, 2), np.nan)), RefAttnError, "^head_mask: expected finite values"),
        (dict(config="gpt2"), RefAttnTypeError, "^config: expected an LMConfig"),
    ],
)
def test_bad_arguments_are_named(changes, error, match):
    args = _bad(M, **changes)
    with pytest.raises(error, match=match):
        lm.lm_forward(args.pop("params"), args.pop("tokens"), **args)
    args = _bad(M, **changes)
    with pytest.raises(error, match=match):
        lm.lm_backward(np.zeros((2, 3, 5)), args.pop("params"), args.pop("tokens"), **args)


def test_a_cotangent_of_another_shape_is_refused():
    with pytest.raises(RefAttnError, match=r"^d_logits: expected shape \(2, 3, 5\)"):
        lm.lm_backward(np.zeros((2, 3, 4)), M.params, M.tokens, M.config)


def test_a_typo_in_an_option_is_refused():
    with pytest.raises(RefAttnError, match="unknown option 'head_masks' \\(did you mean 'head_mask'"):
        lm.lm_forward(M.params, M.tokens, M.config, head_masks=None)


def test_inputs_are_not_mutated():
    m = model("rope", "rms", "post", "swiglu", False, 1)
    before = [a.copy() for _, a in tree_items(m.params)] + [m.tokens.copy(), m.mask.copy(), m.head_mask.copy()]
    d = np.random.default_rng(0).standard_normal((2, 3, 5))
    lm.lm_backward(d, m.params, m.tokens, **_call(m))
    after = [a for _, a in tree_items(m.params)] + [m.tokens, m.mask, m.head_mask]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


# ---- properties, each with the mutant it catches ------------------------------------------------

_CASES = _registry.get("lm").cases()
_GRAD_CASES = _registry.get("lm").cases(for_gradcheck=True)


def _options(case):
    return dict(case.options)


def causal_logits_ignore_later_tokens(case):
    """Under causal attention, the logits at positions < T − 1 do not change when the last token does."""
    params, tokens = case.inputs
    config = case.options["config"]
    if not config.causal or tokens.shape[1] < 2 or config.n_layers == 0:
        return
    other = tokens.copy()
    other[:, -1] = (other[:, -1] + 1) % config.vocab_size
    a = lm.lm_forward(params, tokens, **_options(case))[:, :-1]
    b = lm.lm_forward(params, other, **_options(case))[:, :-1]
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def padding_tokens_do_not_reach_real_positions(case):
    """The logits at real positions do not change when the padded tokens do."""
    params, tokens = case.inputs
    mask, config = case.options.get("mask"), case.options["config"]
    if mask is None or mask.all() or config.n_layers == 0:
        return
    other = np.where(mask, tokens, (tokens + 1) % config.vocab_size)
    a = lm.lm_forward(params, tokens, **_options(case))[mask]
    b = lm.lm_forward(params, other, **_options(case))[mask]
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def backward_matches_a_random_direction(case):
    """⟨lm_backward(d), δ⟩ = ⟨d, J δ⟩ along one random direction of every input at once (rtol 1e-8)."""
    from refattn.testing import VjpError

    try:
        check_vjp(lm.lm_forward, lm.lm_backward, case.inputs, options=case.options, eps=1e-3, per_input=False)
    except VjpError as exc:
        raise AssertionError(str(exc)) from None


def _no_causal(monkeypatch):
    real = lm.sdpa_options
    monkeypatch.setattr(lm, "sdpa_options", lambda a: {**real(a), "causal": False})


def _no_key_mask(monkeypatch):
    real = lm.sdpa_options
    monkeypatch.setattr(lm, "sdpa_options", lambda a: {**real(a), "mask": None})


def _rope_backward_forward_rotation(monkeypatch):
    """RoPE's backward rotating the cotangent by +θ (the forward's rotation) instead of −θ."""
    monkeypatch.setattr(position, "rope_backward", lambda d_y, x, **o: position.RopeGrads(position.rope(d_y, **o)))


PROPERTIES = [
    (causal_logits_ignore_later_tokens, _CASES, "no_causal"),
    (padding_tokens_do_not_reach_real_positions, _CASES, "no_key_mask"),
    (backward_matches_a_random_direction, _GRAD_CASES, "rope_backward_forward_rotation"),
]
MUTANTS = {
    "no_causal": _no_causal,
    "no_key_mask": _no_key_mask,
    "rope_backward_forward_rotation": _rope_backward_forward_rotation,
}
test_property, test_property_catches_its_mutant = property_table(PROPERTIES, MUTANTS)


# ---- PyTorch float64 autograd: the same model written with torch ---------------------------------


def _torch_model(torch, tp, tokens, config, mask, head_mask):
    """The model of refattn.model.lm in torch (float64, autograd): logits and the attention maps."""
    import torch.nn.functional as F

    B, T = tokens.shape
    E, H, Hk = config.d_model, config.n_heads, config.n_kv_heads
    dk = E // H
    ids = torch.as_tensor(tokens)
    x = tp["wte"][ids]  # (B, T, E)
    if config.positions == "learned":
        x = x + tp["wpe"][:T]
    elif config.positions == "sinusoidal":
        pos = torch.arange(T, dtype=torch.float64)[:, None]
        inv = 10000.0 ** (-torch.arange(0, E, 2, dtype=torch.float64) / E)
        pe = torch.zeros(T, E, dtype=torch.float64)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * inv), torch.cos(pos * inv[: E // 2])
        x = x + pe
    allowed = torch.ones(B, 1, T, T, dtype=torch.bool)
    if config.causal:
        allowed = allowed & torch.tril(torch.ones(T, T, dtype=torch.bool))
    if mask is not None:
        allowed = allowed & torch.as_tensor(mask)[:, None, None, :]
    bias = 0.0
    if config.positions == "alibi":
        slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / H) for i in range(H)], dtype=torch.float64)  # H a power of 2
        dist = -(torch.arange(T)[None, :] - torch.arange(T)[:, None]).abs().to(torch.float64)
        bias = slopes[:, None, None] * dist  # (H, T, T)

    def norm(t, prefix):
        if config.norm == "layer":
            return F.layer_norm(t, (E,), tp[prefix + ".weight"], tp.get(prefix + ".bias"), config.norm_eps)
        return F.rms_norm(t, (E,), tp[prefix + ".weight"], config.norm_eps)

    def lin(t, w, b):
        return t @ tp[w] + (tp[b] if b in tp else 0.0)

    def rope(t):  # (B, h, T, dk), rotate-half (GPT-NeoX / Hugging Face Llama)
        inv = 1.0 / config.rope_base ** (torch.arange(0, dk, 2, dtype=torch.float64) / dk)
        freqs = torch.arange(T, dtype=torch.float64)[:, None] * inv  # (T, dk/2)
        cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
        rotated = torch.cat([-t[..., dk // 2 :], t[..., : dk // 2]], -1)
        return t * cos + rotated * sin

    maps = []

    def attention(t, layer):
        pre = f"blocks.{layer}.attn."
        q = lin(t, pre + "w_q", pre + "b_q").view(B, T, H, dk).transpose(1, 2)
        k = lin(t, pre + "w_k", pre + "b_k").view(B, T, Hk, dk).transpose(1, 2)
        v = lin(t, pre + "w_v", pre + "b_v").view(B, T, Hk, dk).transpose(1, 2)
        if config.positions == "rope":
            q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // Hk, dim=1), v.repeat_interleave(H // Hk, dim=1)
        s = q @ k.transpose(-1, -2) / dk**0.5 + bias  # (B, H, T, T)
        s = s.masked_fill(~allowed, float("-inf"))
        some = allowed.any(-1, keepdim=True)  # rows with a key; an empty row gives 0 (not NaN)
        p = torch.softmax(torch.where(some, s, torch.zeros_like(s)), -1) * some
        maps.append(p)
        o = p @ v  # (B, H, T, dk)
        if head_mask is not None:
            o = o * head_mask[layer][None, :, None, None]
        return lin(o.transpose(1, 2).reshape(B, T, E), pre + "w_o", pre + "b_o")

    def mlp(t, layer):
        pre = f"blocks.{layer}.mlp."
        u = lin(t, pre + "w_in", pre + "b_in")
        if config.activation == "swiglu":
            h = F.silu(t @ tp[pre + "w_gate"]) * u
        elif config.activation == "relu":
            h = F.relu(u)
        else:
            h = F.gelu(u, approximate="tanh" if config.activation == "gelu_tanh" else "none")
        return lin(h, pre + "w_out", pre + "b_out")

    for layer in range(config.n_layers):
        ln1, ln2 = f"blocks.{layer}.ln_1", f"blocks.{layer}.ln_2"
        if config.norm_position == "pre":
            x = x + attention(norm(x, ln1), layer)
            x = x + mlp(norm(x, ln2), layer)
        else:
            x = norm(x + attention(x, layer), ln1)
            x = norm(x + mlp(x, layer), ln2)
    if config.norm_position == "pre":
        x = norm(x, "ln_f")
    head = tp["wte"].T if config.tied_embeddings else tp["lm_head"]
    return x @ head, maps


def _rel(a, b, floor=1e-300):
    """``max|a − b| / max(max|b|, floor)``: a gradient that is 0 in exact arithmetic (``b_k``'s without
    RoPE: a shift of every key's logit by one constant) is judged against ``floor``."""
    scale = max(float(np.max(np.abs(b), initial=0.0)), floor)
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)), initial=0.0)) / scale


@pytest.mark.torch
@pytest.mark.parametrize("options", EVERY, ids=EVERY_IDS)
def test_matches_pytorch_autograd(options):
    """Logits, attention maps and every gradient (each parameter, the head mask) within 1e-10 relative of
    the same model in torch float64 with autograd; causal and bias alternate over the combinations."""
    torch = pytest.importorskip("torch")
    k = EVERY.index(options)
    m = model(*options, causal=k % 3 != 2, bias=k % 2 == 0, seed=k)
    tp = {n: torch.tensor(a, requires_grad=True) for n, a in tree_items(m.params)}
    hm = torch.tensor(m.head_mask, requires_grad=True)
    logits_t, maps_t = _torch_model(torch, tp, m.tokens, m.config, m.mask, hm)
    d = np.random.default_rng(k).standard_normal(logits_t.shape)
    (logits_t * torch.tensor(d)).sum().backward()

    logits, maps = lm.lm_forward(m.params, m.tokens, **_call(m), return_attentions=True)
    grads = lm.lm_backward(d, m.params, m.tokens, **_call(m))
    assert _rel(logits, logits_t.detach().numpy()) <= 1e-10
    for p, pt in zip(maps, maps_t, strict=True):
        assert _rel(p, pt.detach().numpy()) <= 1e-10
    floor = 1e-3 * max(float(np.max(np.abs(g))) for _, g in tree_items(grads.dparams))  # of the whole gradient
    for n, g in tree_items(grads.dparams):
        assert _rel(g, tp[n].grad.numpy(), floor) <= 1e-10, n
    assert _rel(grads.dhead_mask, hm.grad.numpy()) <= 1e-10
    assert {n for n, _ in tree_items(grads.dparams)} == set(tp)


@pytest.mark.torch
def test_the_loss_matches_pytorch_cross_entropy():
    torch = pytest.importorskip("torch")
    m = model("rope", "rms", "pre", "swiglu", False, 1)
    targets = np.array([[1, 4, -100], [-100, 0, 2]])
    tp = {n: torch.tensor(a, requires_grad=True) for n, a in tree_items(m.params)}
    logits_t, _ = _torch_model(torch, tp, m.tokens, m.config, m.mask, torch.tensor(m.head_mask))
    loss_t = torch.nn.functional.cross_entropy(logits_t.reshape(-1, 5), torch.as_tensor(targets).reshape(-1))
    loss_t.backward()
    loss, grads = lm.lm_loss_and_grads(m.params, m.tokens, targets, m.config, mask=m.mask, head_mask=m.head_mask)
    assert loss == pytest.approx(loss_t.item(), rel=1e-12)
    floor = 1e-3 * max(float(np.max(np.abs(g))) for _, g in tree_items(grads.dparams))
    for n, g in tree_items(grads.dparams):
        assert _rel(g, tp[n].grad.numpy(), floor) <= 1e-10, n
