"""Data for the model experiments: a synthetic long-range recall task, a byte-level corpus made of
the Python standard library's own docstrings, and batching (``specs/model.md``, "Data").

Everything here is deterministic: the task from its ``seed``, the corpus from the Python it runs
on, the batches from the generator they are given.  The corpus is text the interpreter carries, so
it needs no download; but docstrings change between Python releases, so **the corpus (and every
result trained on it) depends on the Python version**: record :func:`corpus_info` (Python version,
size, SHA-256) next to any result.  :data:`SMALL_TEXT` is a fixed text for tests and quick runs that
does not.

Tokens are int64 arrays; the corpus is byte-level (ids 0..255, the UTF-8 bytes of the text).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import platform
import warnings
from typing import NamedTuple

import numpy as np

from refattn._validate import RefAttnError, RefAttnTypeError, as_int, as_real, check_keywords_of, to_numpy

__all__ = [
    "CORPUS_MODULES",
    "IGNORE_INDEX",
    "SMALL_TEXT",
    "Batch",
    "CorpusSplit",
    "RecallTask",
    "context_windows",
    "corpus_info",
    "corpus_split",
    "decode",
    "encode",
    "lm_batches",
    "lm_windows",
    "minibatch",
    "recall_task",
    "stdlib_corpus",
]

#: The target value that takes no part in the loss (``cross_entropy``'s default ``ignore_index``).
IGNORE_INDEX = -100

#: The standard-library modules whose docstrings make :func:`stdlib_corpus`, in this order: pure
#: Python modules present in every CPython build from 3.10 on, importing without side effects.
CORPUS_MODULES = (
    "abc",
    "argparse",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "inspect",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "operator",
    "os",
    "pathlib",
    "pprint",
    "queue",
    "random",
    "re",
    "shlex",
    "shutil",
    "statistics",
    "string",
    "tempfile",
    "textwrap",
    "threading",
    "unittest",
    "urllib.parse",
    "uuid",
    "zipfile",
)

#: A fixed English text (1293 characters, ASCII) for tests and quick runs: independent of the Python version.
SMALL_TEXT = (
    "Attention lets every position of a sequence read from every other position. A query is compared "
    "with every key; the scores are scaled, masked and turned into weights by a softmax, and the output "
    "is the weighted sum of the values. A causal mask lets a position read only from itself and from "
    "the positions before it, so that a language model can be trained to predict the next token from "
    "the tokens it has seen.\n\n"
    "A model that reads a fixed window of the last few words, like the neural probabilistic language "
    "model of Bengio and his colleagues, learns a feature vector for every word and a smooth function "
    "of the window. It shares what it learns between similar words, but it cannot see past its window: "
    "a word that decides the next one from further back is invisible to it. Attention has no window. "
    "An induction head finds the earlier occurrence of the current token and copies the token that "
    "followed it, however far back that was.\n\n"
    "A reference implementation computes in double precision, checks every argument and derives every "
    "gradient by hand, so that a fast implementation can be compared with it and a mistake found. It "
    "is slow on purpose and clear on purpose: each line of a backward pass undoes one line of the "
    "forward pass, and a test compares each gradient with finite differences.\n"
)


class RecallTask(NamedTuple):
    """The examples of :func:`recall_task`.

    Fields
    ------
    tokens : ndarray of int64, shape (N, L)
        The sequences; the last token is the query key.
    targets : ndarray of int64, shape (N, L)
        Next-token targets for a language model: :data:`IGNORE_INDEX` everywhere but the last
        position, whose target is the answer.
    answers : ndarray of int64, shape (N,)
        The answer of each example: the token that followed the key's earlier occurrence.
    distances : ndarray of int64, shape (N,)
        How far before the query the answer stands (``tokens[i, L - 1 - distances[i]] ==
        answers[i]``), each >= the task's ``distance``.
    """

    tokens: np.ndarray
    targets: np.ndarray
    answers: np.ndarray
    distances: np.ndarray


class CorpusSplit(NamedTuple):
    """A token stream split into training and validation parts (:func:`corpus_split`).

    Fields
    ------
    train : ndarray of int64, shape (n_train,)
    val : ndarray of int64, shape (n_val,)
    """

    train: np.ndarray
    val: np.ndarray


class Batch(NamedTuple):
    """Language-model inputs and their next-token targets.

    Fields
    ------
    inputs : ndarray of int64, shape (B, T)
    targets : ndarray of int64, shape (B, T)
        ``targets[b, t]`` is the token after ``inputs[b, t]``.
    """

    inputs: np.ndarray
    targets: np.ndarray


def _rng(rng, name="rng"):
    if not isinstance(rng, np.random.Generator):
        raise RefAttnTypeError(f"{name}: expected a numpy.random.Generator, got {type(rng).__name__}")
    return rng


def _tokens(tokens, name="tokens"):
    a = to_numpy(tokens, name)
    if a.dtype == bool or a.dtype.kind not in "iu":
        raise RefAttnTypeError(f"{name}: expected integer token ids, got dtype {a.dtype}")
    if a.ndim != 1:
        raise RefAttnError(f"{name}: expected a 1-D token stream, got shape {a.shape}")
    return np.asarray(a, dtype=np.int64)


# ---- the recall task --------------------------------------------------------------------------


def recall_task(n_examples, *, seq_len, vocab, distance, seed):
    """A synthetic associative-recall (induction) task whose answer lies ``distance`` or more tokens
    back, out of reach of any model that reads fewer than ``distance + 1`` tokens.

    Each sequence ``s`` of length ``L = seq_len``: a key ``k`` and a value ``v ≠ k`` (uniform over
    the vocabulary), ``s[q] = k``, ``s[q + 1] = v`` at a position ``q`` uniform in
    ``[0, L − 2 − distance]``, ``s[L − 1] = k`` (the query), and every other token uniform over the
    vocabulary without ``k``, so that ``k`` occurs exactly twice.  The answer — the next token after
    the query — is ``v``: the token that followed the key's earlier occurrence, at ``L − 1 − (q + 1) >=
    distance`` tokens before the query.  The filler is drawn independently of ``v``, so the last
    ``n <= distance`` tokens carry no information about the answer: a model that reads them (a
    Bengio model of context ``n``) can do no better than chance, ``1 / (vocab − 1)``, while one head
    of attention can answer exactly (find the earlier ``k``, copy its successor).

    Parameters
    ----------
    n_examples : int
        ``N`` >= 0 sequences.
    seq_len : int
        ``L`` >= ``distance + 2``.
    vocab : int
        The number of token ids, >= 3 (a key, a value and at least one filler).
    distance : int
        >= 1, the least distance between the answer and the query.
    seed : int
        >= 0; the same seed gives the same examples.

    Returns
    -------
    RecallTask
        ``(tokens (N, L), targets (N, L), answers (N,), distances (N,))``, int64.
    """
    n = as_int(n_examples, "n_examples", minimum=0)
    distance = as_int(distance, "distance", minimum=1)
    length = as_int(seq_len, "seq_len", minimum=distance + 2)
    vocab = as_int(vocab, "vocab", minimum=3)
    rng = np.random.default_rng(as_int(seed, "seed", minimum=0))
    keys = rng.integers(0, vocab, n)
    values = (keys + rng.integers(1, vocab, n)) % vocab  # uniform over the vocabulary without k
    starts = rng.integers(0, length - 1 - distance, n)  # q in [0, L − 2 − distance]
    tokens = (keys[:, None] + rng.integers(1, vocab, (n, length))) % vocab  # filler: never k
    rows = np.arange(n)
    tokens[rows, starts] = keys
    tokens[rows, starts + 1] = values
    tokens[:, -1] = keys
    targets = np.full((n, length), IGNORE_INDEX, dtype=np.int64)
    targets[:, -1] = values
    return RecallTask(tokens.astype(np.int64), targets, values.astype(np.int64), (length - 2 - starts).astype(np.int64))


# ---- the standard-library corpus --------------------------------------------------------------


def _docs_of(module):
    """The docstrings of a module: its own, then, in sorted order of the names it defines (public,
    ``obj.__module__`` the module), each function's and class's, each class followed by its public
    methods' (sorted)."""
    parts = [inspect.getdoc(module) or ""]
    for name in sorted(vars(module)):
        obj = getattr(module, name)
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        parts.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                member = vars(obj)[attr]
                if attr.startswith("_") or not inspect.isfunction(member):
                    continue
                parts.append(inspect.getdoc(member) or "")
    return [p for p in parts if p.strip()]


@functools.lru_cache(maxsize=1)
def stdlib_corpus():
    """Text taken from the docstrings of the standard-library modules :data:`CORPUS_MODULES`.

    For each module in that order: its docstring, then those of its public functions and classes
    (sorted by name, with each class's public methods), by ``inspect.getdoc`` (indentation cleaned),
    joined by blank lines.  Deterministic for a given Python, but **it varies with the Python
    version** (docstrings are edited between releases): record :func:`corpus_info` with results.

    Returns
    -------
    str
        The text (about 250 kB, 3.11); :func:`encode` makes it byte-level tokens.
    """
    texts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # reading a deprecated alias's docstring warns
        for name in CORPUS_MODULES:
            texts.extend(_docs_of(importlib.import_module(name)))
    return "\n\n".join(texts) + "\n"


def corpus_info(text):
    """What identifies a corpus: the Python it came from, its size and digest.

    Parameters
    ----------
    text : str
        E.g. :func:`stdlib_corpus`'s.

    Returns
    -------
    dict
        ``python`` (``platform.python_version()``), ``implementation``, ``chars``, ``bytes`` (UTF-8)
        and ``sha256`` (of the UTF-8 bytes).
    """
    if not isinstance(text, str):
        raise RefAttnTypeError(f"text: expected a str, got {type(text).__name__}")
    raw = text.encode("utf-8")
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "chars": len(text),
        "bytes": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
    }


def encode(text):
    """Byte-level tokens of a text: its UTF-8 bytes as ids 0..255.

    Parameters
    ----------
    text : str
        Any text.

    Returns
    -------
    ndarray of int64, shape (n_bytes,)
    """
    if not isinstance(text, str):
        raise RefAttnTypeError(f"text: expected a str, got {type(text).__name__}")
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def decode(tokens):
    """The text of byte-level tokens (invalid UTF-8, e.g. a cut multi-byte character, as U+FFFD).

    Parameters
    ----------
    tokens : array_like of int, shape (n,)
        Ids in 0..255.

    Returns
    -------
    str
    """
    t = _tokens(tokens)
    if t.size and (t.min() < 0 or t.max() > 255):
        raise RefAttnError(f"tokens: expected byte ids in [0, 255], got values in [{t.min()}, {t.max()}]")
    return t.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def corpus_split(text, *, val_fraction=0.1):
    """A fixed training/validation split: the byte-level tokens of ``text``, the last
    ``val_fraction`` of them for validation (contiguous, so no window straddles both).

    Parameters
    ----------
    text : str or array_like of int
        The corpus, or its tokens already.
    val_fraction : float, default 0.1
        In ``[0, 1)``; the validation part has ``floor(n · val_fraction)`` tokens.

    Returns
    -------
    CorpusSplit
        ``(train, val)``, int64.
    """
    tokens = encode(text) if isinstance(text, str) else _tokens(text, "text")
    f = as_real(val_fraction, "val_fraction", allow_none=False)
    if not 0.0 <= f < 1.0:
        raise RefAttnError(f"val_fraction: expected a number in [0, 1), got {f}")
    n_val = int(tokens.size * f)
    cut = tokens.size - n_val
    return CorpusSplit(tokens[:cut].copy(), tokens[cut:].copy())


# ---- batching ---------------------------------------------------------------------------------


def lm_batches(tokens, *, batch_size, seq_len, rng):
    """One batch of random windows of a token stream, with next-token targets.

    Window ``b`` starts at ``i_b`` (uniform in ``[0, n − seq_len − 1]``, drawn from ``rng``):
    ``inputs[b] = tokens[i_b : i_b + T]``, ``targets[b] = tokens[i_b + 1 : i_b + T + 1]``.  Use as
    :func:`refattn.model.train.train`'s ``batches``: ``lambda step, rng: lm_batches(train_tokens,
    batch_size=8, seq_len=64, rng=rng)``.

    Parameters
    ----------
    tokens : array_like of int, shape (n,)
        The stream; ``n >= seq_len + 1``.
    batch_size : int
        ``B`` >= 1.
    seq_len : int
        ``T`` >= 1.
    rng : numpy.random.Generator
        The source of the offsets (advanced).

    Returns
    -------
    Batch
        ``(inputs (B, T), targets (B, T))``, int64.
    """
    t = _tokens(tokens)
    b = as_int(batch_size, "batch_size", minimum=1)
    length = as_int(seq_len, "seq_len", minimum=1)
    if t.size < length + 1:
        raise RefAttnError(f"tokens: expected at least seq_len + 1 = {length + 1} tokens, got {t.size}")
    starts = _rng(rng).integers(0, t.size - length, b)  # (B,)
    idx = starts[:, None] + np.arange(length)  # (B, T)
    return Batch(t[idx], t[idx + 1])


def lm_windows(tokens, *, seq_len):
    """Every consecutive, non-overlapping window of a token stream, with next-token targets (for
    evaluation: each token after the first is predicted once).

    Parameters
    ----------
    tokens : array_like of int, shape (n,)
        The stream.
    seq_len : int
        ``T`` >= 1.

    Returns
    -------
    Batch
        ``(inputs (N, T), targets (N, T))``, ``N = (n − 1) // T`` (the remainder dropped).
    """
    t = _tokens(tokens)
    length = as_int(seq_len, "seq_len", minimum=1)
    n = max(t.size - 1, 0) // length
    return Batch(t[: n * length].reshape(n, length), t[1 : n * length + 1].reshape(n, length))


def context_windows(tokens, *, context_size):
    """Every (context, next token) pair of a token stream, for a Bengio model.

    ``contexts[i] = tokens[i : i + n]``, ``targets[i] = tokens[i + n]``.

    Parameters
    ----------
    tokens : array_like of int, shape (N_tokens,)
        The stream.
    context_size : int
        ``n`` >= 1.

    Returns
    -------
    contexts : ndarray of int64, shape (N_tokens − n, n)
    targets : ndarray of int64, shape (N_tokens − n,)
    """
    t = _tokens(tokens)
    n = as_int(context_size, "context_size", minimum=1)
    count = max(t.size - n, 0)
    idx = np.arange(count)[:, None] + np.arange(n)  # (count, n)
    return t[idx].reshape(count, n), t[n : n + count].copy()


def minibatch(*arrays, batch_size, rng):
    """The same random rows of each array (drawn with replacement from ``rng``).

    E.g. ``lambda step, rng: minibatch(contexts, targets, batch_size=32, rng=rng)`` as
    :func:`refattn.model.train.train`'s ``batches``.

    Parameters
    ----------
    *arrays : array_like
        One or more arrays with the same first dim ``N`` >= 1.
    batch_size : int
        ``B`` >= 1 rows.
    rng : numpy.random.Generator
        The source of the row indices (advanced).

    Returns
    -------
    tuple of ndarray
        ``a[rows]`` for each array, each of first dim ``B``.
    """
    if not arrays:
        raise RefAttnError("arrays: expected at least one array, got none")
    arrs = [to_numpy(a, f"arrays[{i}]") for i, a in enumerate(arrays)]
    n = arrs[0].shape[0] if arrs[0].ndim else 0
    for i, a in enumerate(arrs):
        if a.ndim == 0 or a.shape[0] != n:
            raise RefAttnError(f"arrays[{i}]: expected first dim {n} (as arrays[0]), got shape {a.shape}")
    if n == 0:
        raise RefAttnError("arrays[0]: expected at least one row, got 0")
    rows = _rng(rng).integers(0, n, as_int(batch_size, "batch_size", minimum=1))
    return tuple(a[rows] for a in arrs)


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
