"""refattn.model.config and refattn.model.params: validated configs, parameter trees, deterministic init."""

import dataclasses
import itertools

import numpy as np
import pytest

from refattn import MHAParams, RefAttnError, RefAttnTypeError
from refattn.model.bengio import BengioParams, init_bengio_params
from refattn.model.config import BengioConfig, LMConfig
from refattn.model.layers import MLPParams
from refattn.model.params import (
    BlockParams,
    LMParams,
    NormParams,
    init_params,
    param_shapes,
    tree_items,
    tree_leaves,
    tree_map,
)


def small(**changes):
    return LMConfig(**{**dict(vocab_size=7, d_model=8, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=12), **changes})


# ---- configs ----------------------------------------------------------------------------------


def test_the_defaults_are_resolved_at_construction():
    c = LMConfig(vocab_size=5, d_model=8, n_layers=1, n_heads=2)
    assert (c.n_kv_heads, c.d_ff, c.head_dim) == (2, 32, 4)
    assert (c.positions, c.norm, c.norm_position, c.activation) == ("learned", "layer", "pre", "gelu")
    assert c.tied_embeddings and c.causal and c.bias
    assert (c.max_len, c.norm_eps, c.rope_base) == (1024, 1e-5, 10000.0)
    assert c == LMConfig(vocab_size=5, d_model=8, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32)


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        small().d_model = 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        BengioConfig(5, 3, 2, 4).hidden_units = 1


@pytest.mark.parametrize(
    ("changes", "field", "error"),
    [
        (dict(vocab_size=0), "vocab_size", RefAttnError),
        (dict(d_model=0), "d_model", RefAttnError),
        (dict(n_layers=-1), "n_layers", RefAttnError),
        (dict(n_heads=3), "n_heads", RefAttnError),  # does not divide d_model = 8
        (dict(n_kv_heads=3), "n_kv_heads", RefAttnError),  # does not divide n_heads = 4
        (dict(d_ff=0), "d_ff", RefAttnError),
        (dict(max_len=0), "max_len", RefAttnError),
        (dict(positions="absolute"), "positions", RefAttnError),
        (dict(norm="batch"), "norm", RefAttnError),
        (dict(norm_position="sandwich"), "norm_position", RefAttnError),
        (dict(activation="tanh"), "activation", RefAttnError),
        (dict(tied_embeddings="yes"), "tied_embeddings", RefAttnTypeError),
        (dict(causal=1), "causal", RefAttnTypeError),
        (dict(bias=None), "bias", RefAttnTypeError),
        (dict(norm_eps=0.0), "norm_eps", RefAttnError),
        (dict(rope_base=-1.0), "rope_base", RefAttnError),
        (dict(d_model=2.5), "d_model", RefAttnTypeError),
        (dict(d_model=12, n_heads=4, positions="rope"), "positions", RefAttnError),  # head dim 3 is odd
    ],
)
def test_a_bad_lm_config_field_is_named(changes, field, error):
    with pytest.raises(error, match=rf"^LMConfig\.{field}: expected"):
        small(**changes)


@pytest.mark.parametrize(
    ("changes", "field", "error"),
    [
        (dict(vocab_size=0), "vocab_size", RefAttnError),
        (dict(context_size=0), "context_size", RefAttnError),
        (dict(embedding_dim=1.0), "embedding_dim", RefAttnTypeError),
        (dict(hidden_units=0), "hidden_units", RefAttnError),
        (dict(direct_connections="no"), "direct_connections", RefAttnTypeError),
    ],
)
def test_a_bad_bengio_config_field_is_named(changes, field, error):
    with pytest.raises(error, match=rf"^BengioConfig\.{field}: expected"):
        BengioConfig(**{**dict(vocab_size=5, context_size=3, embedding_dim=2, hidden_units=4), **changes})


# ---- the tree of parameters -------------------------------------------------------------------

CONFIG_OPTIONS = list(
    itertools.product(["learned", "sinusoidal", "rope", "alibi"], ["layer", "rms"], ["pre", "post"], [True, False])
)


@pytest.mark.parametrize(("positions", "norm", "norm_position", "tied"), CONFIG_OPTIONS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_the_tree_has_the_shapes_of_its_config(positions, norm, norm_position, tied, bias, activation):
    c = small(
        positions=positions, norm=norm, norm_position=norm_position, tied_embeddings=tied, bias=bias,
        activation=activation, max_len=9,
    )  # fmt: skip
    p = init_params(c, 0)
    assert type(p) is LMParams and type(p.blocks) is tuple and len(p.blocks) == 2
    b = p.blocks[0]
    assert type(b) is BlockParams and type(b.attn) is MHAParams and type(b.mlp) is MLPParams
    assert type(b.ln_1) is NormParams
    assert p.wte.shape == (7, 8)
    assert (p.wpe is None) == (positions != "learned") and (p.wpe is None or p.wpe.shape == (9, 8))
    assert (p.lm_head is None) == tied and (tied or p.lm_head.shape == (8, 7))
    assert (p.ln_f is None) == (norm_position == "post")
    assert (b.attn.w_q.shape, b.attn.w_k.shape, b.attn.w_v.shape, b.attn.w_o.shape) == ((8, 8), (8, 4), (8, 4), (8, 8))
    assert all((x is None) == (not bias) for x in (b.attn.b_q, b.attn.b_k, b.attn.b_v, b.attn.b_o, b.mlp.b_in))
    assert (b.ln_1.bias is None) == (not bias or norm == "rms")
    assert (b.mlp.w_in.shape, b.mlp.w_out.shape) == ((8, 12), (12, 8))
    assert (b.mlp.w_gate is None) == (activation != "swiglu")
    assert tree_map(np.shape, p) == param_shapes(c)  # None in the same places
    assert all(x.dtype == np.float64 for x in tree_leaves(p))


def test_init_draws_gpt2_statistics():
    c = LMConfig(vocab_size=400, d_model=64, n_layers=8, n_heads=4, d_ff=256, max_len=300, tied_embeddings=False)
    p = init_params(c, 3)
    residual = 0.02 / np.sqrt(2 * 8)
    for name, leaf in tree_items(p):
        field = name.rsplit(".", 1)[-1]
        if leaf.ndim == 2:
            want = residual if field in ("w_o", "w_out") else 0.02
            assert abs(leaf.std() / want - 1) < 0.08, name  # >= 4096 draws: the sample std is within ~2%
            assert abs(leaf.mean()) < 4 * want / np.sqrt(leaf.size), name
        elif field == "weight":
            np.testing.assert_array_equal(leaf, np.ones(64))
        else:
            np.testing.assert_array_equal(leaf, np.zeros(leaf.shape))
    unscaled = init_params(c, 3, std=0.1, scale_residual=False)
    assert abs(unscaled.blocks[0].attn.w_o.std() / 0.1 - 1) < 0.08


def test_init_is_deterministic_for_a_seed():
    c = small(activation="swiglu", tied_embeddings=False)
    first, again, other = init_params(c, 11), init_params(c, 11), init_params(c, 12)
    for a, b, o in zip(tree_leaves(first), tree_leaves(again), tree_leaves(other)):
        assert a.tobytes() == b.tobytes()
        assert a.ndim == 1 or a.tobytes() != o.tobytes()


def test_init_draws_in_the_order_of_the_tree():
    """The first draw is wte: its first entries are a PCG64 generator's first normal draws."""
    p = init_params(small(), 5)
    want = np.random.Generator(np.random.PCG64(5)).normal(0.0, 0.02, (7, 8))
    np.testing.assert_array_equal(p.wte, want)


def test_init_of_a_bengio_config_is_init_bengio_params():
    c = BengioConfig(vocab_size=6, context_size=3, embedding_dim=2, hidden_units=4)
    got = init_params(c, 7)
    want = init_bengio_params(c, np.random.Generator(np.random.PCG64(7)))
    assert type(got) is BengioParams
    for a, b in zip(tree_leaves(got), tree_leaves(want)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: init_params(small(), -1), RefAttnError, "^seed: expected an integer >= 0"),
        (lambda: init_params(small(), 1.5), RefAttnTypeError, "^seed: expected an integer"),
        (lambda: init_params("gpt2", 0), RefAttnTypeError, "^config: expected an LMConfig or a BengioConfig"),
        (lambda: init_params(small(), 0, std=0.0), RefAttnError, "^std: expected a number > 0"),
        (lambda: init_params(small(), 0, scale_residual=1), RefAttnTypeError, "^scale_residual: expected True"),
        (lambda: init_params(BengioConfig(5, 3, 2, 4), 0, std=0.1), RefAttnError, "^std: an LMConfig option"),
        (lambda: init_params(small(), 0, sdt=0.1), RefAttnError, "unknown option 'sdt' \\(did you mean 'std'"),
        (lambda: param_shapes(BengioConfig(5, 3, 2, 4)), RefAttnTypeError, "^config: expected an LMConfig"),
    ],
)
def test_bad_init_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_a_model_without_layers_has_no_blocks():
    p = init_params(small(n_layers=0), 0)
    assert p.blocks == () and p.ln_f is not None


# ---- tree helpers -----------------------------------------------------------------------------


def test_tree_items_names_every_leaf_in_order():
    p = init_params(small(n_layers=1, bias=False, tied_embeddings=False, positions="rope"), 0)
    names = [n for n, _ in tree_items(p)]
    assert names == [
        "wte",
        "blocks.0.ln_1.weight",
        "blocks.0.attn.w_q",
        "blocks.0.attn.w_k",
        "blocks.0.attn.w_v",
        "blocks.0.attn.w_o",
        "blocks.0.ln_2.weight",
        "blocks.0.mlp.w_in",
        "blocks.0.mlp.w_out",
        "ln_f.weight",
        "lm_head",
    ]
    assert all(a is b for a, (_, b) in zip(tree_leaves(p), tree_items(p)))


def test_tree_map_combines_trees_leaf_by_leaf():
    p = init_params(small(activation="swiglu"), 1)
    g = tree_map(np.ones_like, p)
    stepped = tree_map(lambda w, d: w - 0.5 * d, p, g)
    assert type(stepped) is LMParams and type(stepped.blocks[1].attn) is MHAParams
    assert stepped.wpe is not None and stepped.lm_head is None
    for w, s in zip(tree_leaves(p), tree_leaves(stepped)):
        np.testing.assert_array_equal(s, w - 0.5)


@pytest.mark.parametrize(
    ("other", "where"),
    [
        (lambda p: p._replace(lm_head=np.zeros((8, 7))), "lm_head"),
        (lambda p: p._replace(blocks=p.blocks[:1]), "blocks"),
        (lambda p: p._replace(wte=None), "wte"),
        (lambda p: p._replace(ln_f=np.ones(8)), "ln_f"),
    ],
)
def test_tree_map_refuses_trees_of_another_structure(other, where):
    p = init_params(small(), 0)
    with pytest.raises(RefAttnError, match=rf"^trees: expected .* at {where}\b"):
        tree_map(lambda a, b: a + b, p, other(p))
    with pytest.raises(RefAttnError, match="^trees: expected at least one tree"):
        tree_map(np.negative)


def test_vocab_is_an_alias_of_vocab_size():
    assert LMConfig(vocab=11, d_model=4, n_layers=1, n_heads=2) == LMConfig(11, 4, 1, 2)
    assert LMConfig(vocab=11, d_model=4, n_layers=1, n_heads=2).vocab == 11
    assert BengioConfig(vocab=7, context_size=2, embedding_dim=3, hidden_units=4).vocab_size == 7
    with pytest.raises(RefAttnError, match="vocab_size or its alias vocab, not both"):
        LMConfig(11, vocab=11, d_model=4, n_layers=1, n_heads=2)


def test_gradients_read_like_the_parameters():
    """lm_loss_and_grads's grads and bengio_backward's read the parameters' fields directly."""
    from refattn.model.bengio import bengio_backward, bengio_forward
    from refattn.model.lm import lm_loss_and_grads
    from refattn.model.params import init_params

    rng = np.random.default_rng(3)
    config = LMConfig(vocab=11, d_model=8, n_layers=1, n_heads=2, max_len=8)
    tokens = rng.integers(0, 11, (2, 5))
    _, grads = lm_loss_and_grads(init_params(config, 0), tokens, tokens, config)
    assert grads.wte is grads.dparams.wte and grads.blocks is grads.dparams.blocks
    with pytest.raises(AttributeError):
        grads.not_a_parameter  # noqa: B018
    bc = BengioConfig(vocab=7, context_size=2, embedding_dim=3, hidden_units=4)
    bp = init_params(bc, 0)
    contexts = rng.integers(0, 7, (3, 2))
    g = bengio_backward(rng.standard_normal((3, 7)), bp, contexts, bc)
    assert g.C is g.dparams.C and bengio_forward(bp, contexts, bc).shape == (3, 7)
