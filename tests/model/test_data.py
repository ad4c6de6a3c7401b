"""refattn.model.data: the recall task (deterministic, and out of reach of a short context), the
standard-library corpus, byte-level tokens and batching."""

import hashlib
import platform

import numpy as np
import pytest
from hypothesis import strategies as st

from refattn import RefAttnError, RefAttnTypeError
from refattn.model import data
from tests.mutation import property_table

# ---- the recall task --------------------------------------------------------------------------


def test_recall_task_is_deterministic_for_a_seed():
    a = data.recall_task(50, seq_len=12, vocab=6, distance=5, seed=3)
    b = data.recall_task(50, seq_len=12, vocab=6, distance=5, seed=3)
    c = data.recall_task(50, seq_len=12, vocab=6, distance=5, seed=4)
    assert [x.tobytes() for x in a] == [x.tobytes() for x in b]
    assert a.tokens.tobytes() != c.tokens.tobytes()


def test_recall_task_shapes_and_targets():
    task = data.recall_task(40, seq_len=10, vocab=5, distance=4, seed=0)
    assert task.tokens.shape == task.targets.shape == (40, 10) and task.answers.shape == task.distances.shape == (40,)
    assert all(x.dtype == np.int64 for x in task)
    assert task.tokens.min() >= 0 and task.tokens.max() < 5
    np.testing.assert_array_equal(task.targets[:, :-1], np.full((40, 9), data.IGNORE_INDEX))
    np.testing.assert_array_equal(task.targets[:, -1], task.answers)


def test_recall_answer_follows_the_earlier_key_at_least_distance_back():
    task = data.recall_task(500, seq_len=16, vocab=7, distance=6, seed=1)
    rows = np.arange(500)
    keys = task.tokens[:, -1]
    assert np.all((task.tokens == keys[:, None]).sum(axis=1) == 2)  # the key: once earlier, once as the query
    first = np.argmax(task.tokens == keys[:, None], axis=1)
    np.testing.assert_array_equal(task.tokens[rows, first + 1], task.answers)
    np.testing.assert_array_equal(task.tokens[rows, 15 - task.distances], task.answers)
    assert task.distances.min() >= 6 and task.distances.max() == 14 and np.all(task.answers != keys)


def _window_lookup_accuracy(task, n):
    """How well the best lookup table from the last ``n`` tokens to the answer, fitted on one half,
    predicts the other half (the most a model of context ``n`` can learn from this data)."""
    windows = [tuple(w) for w in task.tokens[:, -n:]]
    half = len(windows) // 2
    table = {}
    for w, a in zip(windows[:half], task.answers[:half]):
        table.setdefault(w, []).append(a)
    best = {w: np.bincount(a).argmax() for w, a in table.items()}
    hits = [best.get(w, -1) == a for w, a in zip(windows[half:], task.answers[half:])]
    return float(np.mean(hits))


@st.composite
def _recall_setups(draw):
    vocab, distance = draw(st.sampled_from([3, 4])), draw(st.integers(2, 3))
    return vocab, distance, draw(st.integers(1, distance)), draw(st.integers(0, 2**16))


def check_a_short_context_is_at_chance(setup):
    """Contexts of ``n <= distance`` tokens say nothing about the answer: a lookup table from them is
    at chance, ``1 / (vocab − 1)`` (4000 held-out examples: 6 standard deviations allowed)."""
    vocab, distance, n, seed = setup
    task = data.recall_task(8000, seq_len=distance + 4, vocab=vocab, distance=distance, seed=seed)
    chance = 1 / (vocab - 1)
    assert _window_lookup_accuracy(task, n) <= chance + 6 * np.sqrt(chance * (1 - chance) / 4000)


def test_one_more_token_of_context_sees_the_answer_at_a_fixed_distance():
    """With ``seq_len = distance + 2`` the answer is always ``distance`` back: a context of
    ``distance + 1`` tokens contains it, and the lookup table is exact."""
    task = data.recall_task(4000, seq_len=5, vocab=3, distance=3, seed=0)
    assert np.all(task.distances == 3)
    assert _window_lookup_accuracy(task, 4) == 1.0 and _window_lookup_accuracy(task, 3) < 0.6


def _patch_filler_without_the_value(monkeypatch):
    """The broken variant: the filler avoids the value too, so its absence from a window leaks it."""
    real = data.recall_task

    def leaky(n_examples, *, seq_len, vocab, distance, seed):
        task = real(n_examples, seq_len=seq_len, vocab=vocab, distance=distance, seed=seed)
        tokens = task.tokens.copy()
        rng = np.random.default_rng(seed + 1)
        keys, values = tokens[:, -1], task.answers
        q = seq_len - 2 - task.distances
        options = [[t for t in range(vocab) if t not in (k, v)] for k, v in zip(keys, values)]
        for i in range(seq_len - 1):
            fresh = np.array([o[rng.integers(0, len(o))] for o in options])
            tokens[:, i] = np.where((i != q) & (i != q + 1), fresh, tokens[:, i])
        return task._replace(tokens=tokens)

    monkeypatch.setattr(data, "recall_task", leaky)


PROPERTIES = [(check_a_short_context_is_at_chance, _recall_setups(), "filler_without_the_value")]
MUTANTS = {"filler_without_the_value": _patch_filler_without_the_value}
test_property, test_property_catches_its_mutant = property_table(PROPERTIES, MUTANTS)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (dict(seq_len=5, distance=4), RefAttnError, r"seq_len: expected an integer >= 6"),
        (dict(vocab=2), RefAttnError, r"vocab: expected an integer >= 3"),
        (dict(distance=0), RefAttnError, r"distance: expected an integer >= 1"),
        (dict(seed=-1), RefAttnError, r"seed: expected an integer >= 0"),
        (dict(seed=1.5), RefAttnTypeError, r"seed: expected an integer"),
    ],
)
def test_recall_task_refuses_bad_sizes(options, error, match):
    kw = dict(seq_len=10, vocab=5, distance=3, seed=0) | options
    with pytest.raises(error, match=match):
        data.recall_task(10, **kw)


# ---- the corpus and tokens --------------------------------------------------------------------


def test_stdlib_corpus_is_deterministic_and_substantial():
    text = data.stdlib_corpus()
    data.stdlib_corpus.cache_clear()
    again = data.stdlib_corpus()
    assert text == again and len(text) > 100_000
    assert text.startswith("Abstract Base Classes (ABCs) according to PEP 3119.")  # abc's docstring first


def test_corpus_info_identifies_the_python_and_the_text():
    info = data.corpus_info("héllo")
    assert info == {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "chars": 5,
        "bytes": 6,
        "sha256": hashlib.sha256("héllo".encode()).hexdigest(),
    }


def test_small_text_is_fixed():
    assert data.SMALL_TEXT.isascii() and len(data.SMALL_TEXT) == 1293
    assert data.corpus_info(data.SMALL_TEXT)["sha256"] == hashlib.sha256(data.SMALL_TEXT.encode()).hexdigest()


def test_encode_and_decode_are_byte_level_inverses():
    text = "naïve — ok\n"
    tokens = data.encode(text)
    assert tokens.dtype == np.int64 and tokens.tolist() == list(text.encode("utf-8"))
    assert data.decode(tokens) == text
    assert data.decode(tokens[:3]) == "na\ufffd"  # a cut multi-byte character


def test_corpus_split_is_fixed_and_contiguous():
    split = data.corpus_split(data.SMALL_TEXT, val_fraction=0.25)
    tokens = data.encode(data.SMALL_TEXT)
    assert split.val.size == int(tokens.size * 0.25)
    np.testing.assert_array_equal(np.concatenate(split), tokens)
    np.testing.assert_array_equal(data.corpus_split(tokens, val_fraction=0.25).val, split.val)
    assert data.corpus_split(data.SMALL_TEXT, val_fraction=0.0).val.size == 0


# ---- batching ---------------------------------------------------------------------------------

TOKENS = np.arange(100) * 7 % 256


def test_lm_batches_are_windows_with_next_token_targets():
    batch = data.lm_batches(TOKENS, batch_size=5, seq_len=8, rng=np.random.default_rng(0))
    assert batch.inputs.shape == batch.targets.shape == (5, 8)
    np.testing.assert_array_equal(batch.targets[:, :-1], batch.inputs[:, 1:])
    for row, target in zip(batch.inputs, batch.targets):
        start = int(np.nonzero(TOKENS == row[0])[0][0])
        np.testing.assert_array_equal(row, TOKENS[start : start + 8])
        assert target[-1] == TOKENS[start + 8]


def test_lm_batches_follow_the_generator():
    a = data.lm_batches(TOKENS, batch_size=4, seq_len=99, rng=np.random.default_rng(1))
    b = data.lm_batches(TOKENS, batch_size=4, seq_len=99, rng=np.random.default_rng(1))
    assert a.inputs.tobytes() == b.inputs.tobytes() and np.all(a.inputs[:, 0] == TOKENS[0])  # the only window


def test_lm_windows_cover_the_stream_once():
    windows = data.lm_windows(TOKENS, seq_len=8)
    assert windows.inputs.shape == (12, 8)
    np.testing.assert_array_equal(windows.inputs.reshape(-1), TOKENS[:96])
    np.testing.assert_array_equal(windows.targets.reshape(-1), TOKENS[1:97])


def test_context_windows_pair_each_context_with_its_next_token():
    contexts, targets = data.context_windows(TOKENS, context_size=3)
    assert contexts.shape == (97, 3) and targets.shape == (97,)
    for i in (0, 50, 96):
        np.testing.assert_array_equal(contexts[i], TOKENS[i : i + 3])
        assert targets[i] == TOKENS[i + 3]


def test_minibatch_takes_the_same_rows_of_each_array():
    contexts, targets = data.context_windows(TOKENS, context_size=2)
    c, t = data.minibatch(contexts, targets, batch_size=16, rng=np.random.default_rng(2))
    assert c.shape == (16, 2) and t.shape == (16,)
    for row, target in zip(c, t):
        i = int(np.nonzero((contexts == row).all(axis=1))[0][0])
        assert targets[i] == target


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: data.lm_batches(TOKENS, batch_size=2, seq_len=100, rng=np.random.default_rng()),
            RefAttnError,
            "tokens: expected at least seq_len",
        ),
        (lambda: data.lm_batches(TOKENS, batch_size=2, seq_len=4, rng=0), RefAttnTypeError, "rng: expected a numpy"),
        (
            lambda: data.lm_batches(TOKENS.astype(float), batch_size=2, seq_len=4, rng=np.random.default_rng()),
            RefAttnTypeError,
            "tokens: expected integer",
        ),
        (lambda: data.context_windows(TOKENS.reshape(10, 10), context_size=2), RefAttnError, "tokens: expected a 1-D"),
        (
            lambda: data.minibatch(TOKENS, TOKENS[:5], batch_size=2, rng=np.random.default_rng()),
            RefAttnError,
            r"arrays\[1\]: expected first dim 100",
        ),
        (
            lambda: data.corpus_split("abc", val_fraction=1.0),
            RefAttnError,
            r"val_fraction: expected a number in \[0, 1\)",
        ),
        (lambda: data.encode(b"abc"), RefAttnTypeError, "text: expected a str"),
        (lambda: data.decode(np.array([300])), RefAttnError, r"tokens: expected byte ids in \[0, 255\]"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
