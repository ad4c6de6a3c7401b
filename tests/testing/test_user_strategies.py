"""The strategies users property-test their kernels with: valid, covering, and able to catch tile bugs."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import refattn
from refattn.attention import tiled
from refattn.testing import assert_attention_close
from refattn.testing.strategies import TILE_LENGTHS, attention_inputs
from tests.mutation import assert_catches


def _online_matches(case, block=64):
    out = tiled.sdpa_online(*case.inputs, block_q=block, block_k=block, **case.options)
    assert_attention_close(out, *case.inputs, dtype="float64", **case.options)


@settings(max_examples=25)
@given(attention_inputs())
def test_a_correct_tiled_kernel_passes(case):
    _online_matches(case)


@settings(max_examples=15)
@given(attention_inputs(dtype="bfloat16", options=("causal", "mask", "gqa")))
def test_bfloat16_inputs_are_exact_and_the_twin_passes(case):
    q, k, v = case.inputs
    np.testing.assert_array_equal(refattn.lowp.round_to(q, "bfloat16"), q)
    twin = refattn.lowp.sdpa_twin(q, k, v, dtype="bfloat16", reorder_ops=True, **case.options)
    assert_attention_close(twin, q, k, v, dtype="bfloat16", **case.options)


def test_every_tile_length_and_option_is_reachable():
    for length in (63, 64, 65, 127, 128, 129):
        assert_catches(attention_inputs(), lambda c, n=length: _assert(c.inputs[0].shape[2] != n))
    assert_catches(
        attention_inputs(),
        lambda c: _assert(not (refattn.sdpa(*c.inputs, return_lse=True, **c.options)[1] == -np.inf).any()),
    )
    assert_catches(attention_inputs(), lambda c: _assert(c.inputs[0].shape[1] == c.inputs[1].shape[1]))
    assert set(TILE_LENGTHS) >= {63, 64, 65, 127, 128, 129}


def _assert(condition):
    assert condition


def test_a_kernel_that_drops_the_last_partial_key_tile_is_caught(monkeypatch):
    """Mutant: the online kernel skips a trailing key block shorter than the tile (the classic bug at
    Lk = 65 or 129)."""
    real = tiled._blocks

    def full_blocks_only(n, size):
        blocks = list(real(n, size))
        return blocks[:-1] if len(blocks) > 1 and blocks[-1][1] - blocks[-1][0] < size else blocks

    monkeypatch.setattr(tiled, "_blocks", full_blocks_only)
    assert_catches(attention_inputs(options=()), _online_matches)


@settings(max_examples=10)
@given(attention_inputs(options=("softcap", "sinks")), st.sampled_from([16, 32]))
def test_softcap_and_sinks_are_drawn_validly(case, block):
    _online_matches(case, block)
