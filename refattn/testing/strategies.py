"""Hypothesis strategies that draw valid inputs and options for refattn's ops.

Each ``*_cases`` strategy draws a :class:`Case` (positional ``inputs`` and keyword ``options``: the
call ``op(*case.inputs, **case.options)``).  Each op of the registry (``refattn/_registry.py``)
holds its strategy as a callable ``(*, for_gradcheck=False) -> SearchStrategy of Case``
(:func:`metric_strategy` makes the metrics' ones).  ``for_gradcheck=True`` keeps to the smooth,
finite part of the op's domain, where a finite-difference gradient check means something: no
``"nan"`` empty-row policy, and no inputs at or near a kink (relu, a top-k selection, ties of max
and min, ``|·|``), seeded continuous noise breaking the exact ties Hypothesis likes to draw; the
strategies of ops without a backward accept it and ignore it.

The arrays are small (each axis 1..4 or so; 0 where an empty input is valid) and float64.  Values
are bounded (``|x| <= 2``, 3 for softmax inputs) so nothing overflows; masks are random, so rows
with every key masked (empty rows) occur.  :func:`attention_inputs`, for users, draws larger inputs
at the lengths around kernel tile boundaries (:data:`TILE_LENGTHS`) to property-test an attention
kernel against refattn (``specs/testing.md``).

Needs Hypothesis (the ``test`` extra): :mod:`refattn.testing` does not import this module, import
``refattn.testing.strategies`` explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

__all__ = [
    "STRUCTURAL_OPTIONS",
    "attention_logits_cases",
    "TILE_LENGTHS",
    "alibi_bias_cases",
    "alibi_slopes_cases",
    "allocation_cases",
    "attention_inputs",
    "Case",
    "causal_mask_cases",
    "chunked_cases",
    "combine_cases",
    "decode_cases",
    "detect_collapse_cases",
    "detect_uniform_cases",
    "detector_strategy",
    "dropout_mask_cases",
    "finite_floats",
    "flow_cases",
    "from_lengths_cases",
    "head_importance_cases",
    "head_importance_mask_cases",
    "length_and_period_cases",
    "linear_cases",
    "local_mask_cases",
    "logits_cases",
    "map_cases",
    "metric_strategy",
    "multihead_cases",
    "online_cases",
    "paged_cases",
    "pattern_score_cases",
    "relative_cases",
    "rollout_cases",
    "rollout_discard_cases",
    "rope_cases",
    "round_to_cases",
    "sdpa_cases",
    "sdpa_twin_cases",
    "sinusoidal_cases",
    "softmax_cases",
    "special_token_cases",
    "summarize_cases",
    "token_pattern_cases",
    "top_tokens_cases",
    "topk_cases",
    "topk_mask_cases",
    "value_norm_cases",
    "varlen_cases",
    "weight_norm_cases",
    "weights_cases",
    "window_mask_cases",
    "softmax_axes_cases",
    "logsumexp_b_cases",
    "append_cases",
    "decode_ragged_cases",
    "extend_mask_cases",
]


@dataclass
class Case:
    """Inputs and options of one op call: ``fn(*inputs, **options)``.

    What every strategy here draws.  Its repr gives the shapes first, then the full values (what
    Hypothesis prints for a falsifying example).

    Fields
    ------
    inputs : tuple
        The positional arguments: arrays, lengths, parameter NamedTuples, ...
    options : dict
        The keyword arguments, array options included; default empty.
    """

    inputs: tuple
    options: dict = field(default_factory=dict)

    def __repr__(self):
        shapes = ", ".join(str(np.shape(x)) for x in self.inputs)
        opts = {k: (f"array{np.shape(v)}" if isinstance(v, np.ndarray) else v) for k, v in self.options.items()}
        return f"Case(inputs=[{shapes}], options={opts})\n  inputs={self.inputs!r}\n  options={self.options!r}"


def finite_floats(bound=2.0):
    """Floats in ``[-bound, bound]``: no NaN, no infinity, no subnormals.

    The elements of the arrays the strategies here draw.

    Parameters
    ----------
    bound : float, default 2.0
        The largest magnitude drawn (inclusive).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of float
    """
    return st.floats(-bound, bound, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def _floats_array(draw, shape, bound=2.0):
    return draw(hnp.arrays(np.float64, shape, elements=finite_floats(bound)))


def _sub_shape(draw, shape, min_dims=0):
    """A shape that broadcasts to ``shape`` without enlarging it (dims kept or set to 1, leading dims dropped)."""
    ndim = draw(st.integers(min(min_dims, len(shape)), len(shape)))
    tail = shape[len(shape) - ndim :]
    return tuple(draw(st.sampled_from([n, 1])) for n in tail)


def _with_neg_inf(draw, a, probability=0.15):
    holes = draw(hnp.arrays(np.float64, a.shape, elements=st.sampled_from([0.0] * 6 + [1.0]))) > 0
    if probability and holes.any():
        a = np.where(holes, -np.inf, a)
    return a


@st.composite
def _attention_case(draw, *, with_v, for_gradcheck):
    batch = draw(st.sampled_from([(), (1,), (2,)]))
    hk = draw(st.integers(1, 2))
    hq = hk * draw(st.integers(1, 2))
    lq, lk = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    d, dv = draw(st.integers(1, 3)), draw(st.integers(1, 3))

    def batch_of():
        return tuple(draw(st.sampled_from([n, 1])) for n in batch)

    q = _floats_array(draw, batch + (hq, lq, d))
    k = _floats_array(draw, batch_of() + (hk, lk, d))
    inputs = (q, k)
    if with_v:
        inputs += (_floats_array(draw, batch_of() + (hk, lk, dv)),)
    score = batch + (hq, lq, lk)
    opts = {}
    if draw(st.booleans()):
        opts["mask"] = draw(hnp.arrays(bool, _sub_shape(draw, score, 1), elements=st.booleans()))
    if draw(st.booleans()):
        opts["bias"] = _with_neg_inf(draw, _floats_array(draw, _sub_shape(draw, score, 1)))
    if draw(st.booleans()):
        opts["causal"] = True
    if draw(st.booleans()):
        side = st.one_of(st.none(), st.integers(-2, 3))
        opts["window"] = draw(st.one_of(st.tuples(side, side), st.integers(0, 3)))
    if draw(st.integers(0, 3)) == 0:
        opts["chunk"] = draw(st.integers(1, 3))
    if "window" in opts and draw(st.booleans()):
        opts["sink_tokens"] = draw(st.integers(0, 2))
    if batch and draw(st.integers(0, 2)) == 0:  # per-sequence lengths and starts over the batch dims
        starts = draw(hnp.arrays(np.int64, batch_of(), elements=st.integers(0, lk)))
        if draw(st.booleans()):
            opts["k_starts"] = starts
        else:
            starts = np.zeros((), np.int64)
        if draw(st.booleans()):
            room = np.broadcast_to(lk - starts, batch)
            opts["k_lengths"] = np.array([draw(st.integers(0, int(r))) for r in room.reshape(-1)]).reshape(batch)
        if draw(st.booleans()):
            opts["q_lengths"] = draw(hnp.arrays(np.int64, batch_of(), elements=st.integers(0, lq)))
    structural = opts.get("causal") or "window" in opts or "chunk" in opts
    aligns = st.one_of(st.sampled_from(["top_left", "bottom_right"]), st.integers(-3, 3))
    if structural and (lq != lk or any(n in opts for n in ("q_lengths", "k_lengths", "k_starts"))):
        opts["align"] = draw(aligns)
    elif draw(st.booleans()):
        opts["align"] = draw(aligns)
    if draw(st.booleans()):
        opts["scale"] = draw(st.floats(0.1, 2.0))
    if draw(st.booleans()):
        opts["softcap"] = draw(st.floats(0.5, 5.0))
    if draw(st.booleans()):
        sinks = _floats_array(draw, _sub_shape(draw, batch + (hq,), 1))
        opts["sinks"] = _with_neg_inf(draw, sinks)
    if with_v and draw(st.booleans()):
        p = draw(st.sampled_from([0.0, 0.25]))
        opts["dropout_p"] = p
        opts["dropout_mask"] = draw(hnp.arrays(bool, _sub_shape(draw, score, 1), elements=st.booleans()))
    policies = ["zero", "uniform"] if for_gradcheck else ["zero", "nan", "uniform"]
    opts["empty_rows"] = draw(st.sampled_from(policies))
    if with_v and draw(st.booleans()):
        opts["return_lse"] = True
    return Case(inputs, opts)


#: The default ``lengths`` of :func:`attention_inputs`, a few small ones and both sides of the 32, 64
#: and 128 tile boundaries (where a kernel's last tile is partial).
TILE_LENGTHS = (1, 2, 3, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129)


@st.composite
def attention_inputs(
    draw,
    *,
    lengths=TILE_LENGTHS,
    head_dims=(8, 16, 64),
    max_batch=2,
    max_heads=4,
    options=("causal", "window", "mask", "bias", "scale", "gqa"),
    adversarial=True,
    dtype=None,
):
    """Inputs for property-testing a user's attention kernel against refattn: a :class:`Case` with
    ``inputs = (q (B, Hq, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, D))`` and sdpa ``options``.

    The arrays are float64, standard normal, from a drawn seed (fast at 129 × 64); v has q's and k's
    head dim D.  Compare the kernel's output with ``refattn.sdpa(*case.inputs, **case.options)``, for
    example by :func:`~refattn.testing.compare.assert_attention_close`.

    Parameters
    ----------
    lengths : sequence of int, default ``TILE_LENGTHS``
        Lq and Lk are drawn from it, each on its own; by default both sides of the 32/64/128 tile
        boundaries.
    head_dims : sequence of int, default (8, 16, 64)
        D is drawn from it.
    max_batch : int, default 2
        B is drawn from ``1..max_batch``.
    max_heads : int, default 4
        Hk is drawn from ``1..max_heads``; Hq (with ``"gqa"``) is at most ``max_heads`` as well.
    options : collection of str, default ("causal", "window", "mask", "bias", "scale", "gqa")
        What may be drawn; each option named is drawn or left out: ``"causal"`` (``causal=True``),
        ``"window"`` (``window=(left, right)``, each side None, 0, 1, 31 or 64), ``"mask"`` (a padding
        mask ``(B, 1, Lq, Lk)`` from key lengths in ``1..Lk`` per batch item, sometimes with query
        lengths in ``0..Lq`` too: empty rows occur), ``"bias"`` (standard normal, ``(Hq, Lq, Lk)``),
        ``"scale"`` (0.05, 0.5 or 1.0), ``"gqa"`` (``Hq = g · Hk`` with g among 1, 2, 4 and ``Hq <=
        max_heads``; without it ``Hq = Hk``), ``"softcap"`` (5.0 or 30.0), ``"sinks"`` (standard
        normal, ``(Hq,)``).  With causal or a window an ``align`` (``"top_left"`` or
        ``"bottom_right"``) is drawn too, always when ``Lq != Lk``.
    adversarial : bool, default True
        Also draw (each or not) one query row scaled by 30, the same row in every batch item and head
        (large logits: a softmax that must not overflow), and, when ``Lk > 1``, key 1 set to key 0 plus
        1e-9 noise (near-tied keys).  False: plain standard normal arrays.
    dtype : str, optional
        A format of ``refattn.lowp.FORMATS`` or an alias (``"bfloat16"``, ``"float16"``,
        ``"float8_e4m3"``, ...): q, k, v and any bias and sinks are rounded to it
        (:func:`~refattn.lowp.round_to`; still float64 arrays), so a kernel's low-precision inputs hold
        exactly the values refattn sees.  Default None: no rounding.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    from refattn import lowp

    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    b = draw(st.integers(1, max_batch))
    hk = draw(st.integers(1, max_heads))
    groups = draw(st.sampled_from([g for g in (1, 2, 4) if hk * g <= max_heads] or [1])) if "gqa" in options else 1
    hq = hk * groups
    lq, lk, d = draw(st.sampled_from(lengths)), draw(st.sampled_from(lengths)), draw(st.sampled_from(head_dims))
    q, k, v = (
        rng.standard_normal((b, hq, lq, d)),
        rng.standard_normal((b, hk, lk, d)),
        rng.standard_normal((b, hk, lk, d)),
    )
    if adversarial and draw(st.booleans()):
        q[..., rng.integers(lq), :] *= 30.0  # one row of large logits: a softmax that must not overflow
    if adversarial and lk > 1 and draw(st.booleans()):
        k[..., 1, :] = k[..., 0, :] + 1e-9 * rng.standard_normal(k[..., 0, :].shape)  # near-tied keys
    opts = {}
    if "causal" in options and draw(st.booleans()):
        opts["causal"] = True
    if "window" in options and draw(st.booleans()):
        opts["window"] = (draw(st.sampled_from([None, 0, 1, 31, 64])), draw(st.sampled_from([None, 0, 1, 31, 64])))
    if opts and draw(st.booleans()) or (opts and lq != lk):
        opts["align"] = draw(st.sampled_from(["top_left", "bottom_right"]))
    if "mask" in options and draw(st.booleans()):
        from refattn.masks import from_lengths

        k_len = [int(rng.integers(1, lk + 1)) for _ in range(b)]
        q_len = [int(rng.integers(0, lq + 1)) for _ in range(b)] if draw(st.booleans()) else None
        opts["mask"] = from_lengths(q_len, k_len, lq, lk)[:, None]  # (B, 1, Lq, Lk)
    if "bias" in options and draw(st.booleans()):
        opts["bias"] = rng.standard_normal((hq, lq, lk))
    if "scale" in options and draw(st.booleans()):
        opts["scale"] = draw(st.sampled_from([0.05, 0.5, 1.0]))
    if "softcap" in options and draw(st.booleans()):
        opts["softcap"] = draw(st.sampled_from([5.0, 30.0]))
    if "sinks" in options and draw(st.booleans()):
        opts["sinks"] = rng.standard_normal(hq)
    if dtype is not None:
        rd = lambda x: lowp.round_to(x, dtype)  # noqa: E731
        q, k, v = rd(q), rd(k), rd(v)
        opts.update({n: rd(opts[n]) for n in ("bias", "sinks") if n in opts})
    return Case((q, k, v), opts)


def sdpa_cases(*, for_gradcheck=False):
    """Cases for :func:`~refattn.attention.sdpa.sdpa`: every option, GQA, broadcast batch dims,
    ``Lq != Lk``.

    ``inputs = (q (..., Hq, Lq, D), k (..., Hk, Lk, D), v (..., Hk, Lk, Dv))``: batch dims ``()``,
    ``(1,)`` or ``(2,)`` (k's and v's each broadcasting to q's: every batch dim kept or 1), Hk in 1..2,
    ``Hq = Hk`` or ``2 · Hk``, Lq and Lk in 1..4, D and Dv in 1..3; finite values in ``[-2, 2]``.

    Options, each drawn or left out: a bool ``mask`` and a float ``bias`` (some entries ``-inf``) of
    shapes broadcasting to the scores ``(..., Hq, Lq, Lk)`` (one or more trailing dims, each kept or
    1); ``causal=True``; ``window=(left, right)``, each side None or 0..3; ``align`` (``"top_left"`` or
    ``"bottom_right"``; always when causal or a window meets ``Lq != Lk``); ``scale`` in ``[0.1, 2]``;
    ``softcap`` in ``[0.5, 5]``; ``sinks`` broadcasting to ``(..., Hq)`` (some ``-inf``); ``dropout_p``
    0.0 or 0.25 with a bool ``dropout_mask`` broadcasting to the scores; ``return_lse=True``.
    ``empty_rows`` is always given.  Random masks make empty rows (every key masked) occur.

    Parameters
    ----------
    for_gradcheck : bool, default False
        True: ``empty_rows`` is ``"zero"`` or ``"uniform"`` only, not ``"nan"`` (whose NaN rows have no
        derivative to check); False: any of the three.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    return _attention_case(with_v=True, for_gradcheck=for_gradcheck)


def weights_cases(*, for_gradcheck=False):
    """Cases for :func:`~refattn.attention.sdpa.attention_weights`: ``inputs = (q, k)`` and sdpa's
    options without v's.

    As :func:`sdpa_cases` draws them, without v, ``dropout_p``, ``dropout_mask`` and ``return_lse``.

    Parameters
    ----------
    for_gradcheck : bool, default False
        True: ``empty_rows`` is ``"zero"`` or ``"uniform"`` only, not ``"nan"`` (whose NaN rows have no
        derivative to check); False: any of the three.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    return _attention_case(with_v=False, for_gradcheck=for_gradcheck)


#: The sdpa options that place keys relative to queries (positions, lengths and alignment): drop them
#: from a case before permuting keys or rows.
STRUCTURAL_OPTIONS = ("causal", "window", "align", "chunk", "sink_tokens", "q_lengths", "k_lengths", "k_starts")


@st.composite
def attention_logits_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.attention.sdpa.attention_logits`: ``inputs = (q, k)`` and the
    options that shape the logits, with a ``stage``.

    As :func:`weights_cases` draws them, without ``sinks`` and ``empty_rows`` (which act in the
    softmax), and ``stage`` one of ``"scaled"``, ``"softcapped"``, ``"biased"``, ``"masked"``.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Unused (every case is smooth where the logits are finite); taken as every strategy takes it.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    case = draw(_attention_case(with_v=False, for_gradcheck=for_gradcheck))
    opts = {n: x for n, x in case.options.items() if n not in ("sinks", "empty_rows")}
    opts["stage"] = draw(st.sampled_from(["scaled", "softcapped", "biased", "masked"]))
    return Case(case.inputs, opts)


@st.composite
def softmax_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.softmax_family.softmax`, :func:`~refattn.softmax_family.log_softmax`
    and :func:`~refattn.softmax_family.logsumexp`: ``inputs = (x,)``.

    ``x (B?, m, n)`` (no batch dim or one of 2; m and n in 1..4), finite values in ``[-3, 3]``, sometimes
    with ``-inf`` entries (weight 0).  Options: ``axis`` (-1 or -2) and ``empty_rows`` always; a bool
    ``mask`` broadcasting to x (one or more trailing dims, each kept or 1) or not.

    Parameters
    ----------
    for_gradcheck : bool, default False
        True: ``empty_rows`` is ``"zero"`` or ``"uniform"`` only, not ``"nan"`` (whose NaN rows have no
        derivative to check); False: any of the three.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    batch = draw(st.sampled_from([(), (2,)]))
    shape = batch + (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    x = _floats_array(draw, shape, 3.0)
    if draw(st.booleans()):
        x = _with_neg_inf(draw, x)
    opts = {"axis": draw(st.sampled_from([-1, -2]))}
    if draw(st.booleans()):
        opts["mask"] = draw(hnp.arrays(bool, _sub_shape(draw, shape, 1), elements=st.booleans()))
    policies = ["zero", "uniform"] if for_gradcheck else ["zero", "nan", "uniform"]
    opts["empty_rows"] = draw(st.sampled_from(policies))
    return Case((x,), opts)


# ---- variants (issue: every attention variant) ------------------------------------------------


def _seeded_noise(draw, shape, scale):
    """Continuous noise from a drawn seed: breaks the exact ties Hypothesis likes to produce."""
    seed = draw(st.integers(0, 2**32 - 1))
    return scale * np.random.default_rng(seed).standard_normal(shape)


@st.composite
def relative_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.attention.relative.relative_attention`: an :func:`sdpa_cases` case
    plus the relative-position tables.

    ``inputs = (q, k, v, rel_k (2m + 1, D), rel_v (2m + 1, Dv))``, the tables' values finite in
    ``[-2, 2]``; sdpa's options plus ``max_distance = m``, m in 0..3.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Passed to :func:`sdpa_cases` (True: no ``"nan"`` empty-row policy).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    case = draw(sdpa_cases(for_gradcheck=for_gradcheck))
    q, k, v = case.inputs
    m = draw(st.integers(0, 3))
    rel_k = _floats_array(draw, (2 * m + 1, q.shape[-1]))
    rel_v = _floats_array(draw, (2 * m + 1, v.shape[-1]))
    return Case((q, k, v, rel_k, rel_v), {**case.options, "max_distance": m})


def _topk_gap(case, top_k):
    from refattn.attention import sdpa as core

    opts = {n: v for n, v in case.options.items() if n not in ("return_lse", "top_k")}
    logits = core.forward_scores(core.validate(*case.inputs, **opts)).logits
    finite = np.where(np.isfinite(logits), logits, -1e300)
    srt = -np.sort(-finite, axis=-1)
    if top_k >= logits.shape[-1]:
        return np.inf
    return float(np.min(srt[..., top_k - 1] - srt[..., top_k]))


@st.composite
def topk_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.attention.sparse.topk_attention`: an :func:`sdpa_cases` case plus
    ``top_k`` in 1..4.

    q gets seeded Gaussian noise (σ = 0.1), which breaks the exact ties Hypothesis likes to draw.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Passed to :func:`sdpa_cases` (True: no ``"nan"`` empty-row policy); True also keeps only cases
        whose k-th and (k+1)-th largest logits (as sdpa computes them) are more than 1e-3 apart in every
        row, so that no finite difference flips the selection (``top_k >= Lk`` always qualifies).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    case = draw(sdpa_cases(for_gradcheck=for_gradcheck))
    q, k, v = case.inputs
    q = q + _seeded_noise(draw, q.shape, 0.1)
    case = Case((q, k, v), {**case.options, "top_k": draw(st.integers(1, 4))})
    if for_gradcheck:
        from hypothesis import assume

        assume(_topk_gap(case, case.options["top_k"]) > 1e-3)
    return case


@st.composite
def linear_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.attention.linear.linear_attention`: ``inputs = (q, k, v)``, causal or
    not.

    ``q (B?, Hq, Lq, D)``, ``k (B?, Hk, Lk, D)``, ``v (B?, Hk, Lk, Dv)``: batch dims ``()`` or ``(2,)``,
    the same for all three; Hk in 1..2, ``Hq = Hk`` or ``2 · Hk``; Lq in 1..4, ``Lk = Lq`` when causal
    (else 1..4); D and Dv in 1..3; finite values in ``[-2, 2]``.  Options: ``feature_map`` and
    ``causal`` always, ``eps`` (0.0, 1e-3 or 0.5) or not.

    Parameters
    ----------
    for_gradcheck : bool, default False
        True: ``feature_map="elu+1"`` only (``"relu"`` has a kink at 0), ``eps=0.5`` when given, and q
        and k get seeded noise (σ = 0.05) and keep every entry more than 1e-3 from 0 (elu+1 is C¹ but
        not C² there).  False: ``"elu+1"`` or ``"relu"``.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    batch = draw(st.sampled_from([(), (2,)]))
    hk = draw(st.integers(1, 2))
    hq = hk * draw(st.integers(1, 2))
    causal = draw(st.booleans())
    lq = draw(st.integers(1, 4))
    lk = lq if causal else draw(st.integers(1, 4))
    d, dv = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    inputs = (
        _floats_array(draw, batch + (hq, lq, d)),
        _floats_array(draw, batch + (hk, lk, d)),
        _floats_array(draw, batch + (hk, lk, dv)),
    )
    if for_gradcheck:  # elu+1 is C¹ but not C² at 0: keep finite differences off the kink
        from hypothesis import assume

        q, k = (x + _seeded_noise(draw, x.shape, 0.05) for x in inputs[:2])
        assume(min(np.min(np.abs(q), initial=1.0), np.min(np.abs(k), initial=1.0)) > 1e-3)
        inputs = (q, k, inputs[2])
    maps = ["elu+1"] if for_gradcheck else ["elu+1", "relu"]
    opts = {"feature_map": draw(st.sampled_from(maps)), "causal": causal}
    if draw(st.booleans()):
        opts["eps"] = draw(st.sampled_from([0.0, 1e-3, 0.5])) if not for_gradcheck else 0.5
    return Case(inputs, opts)


@st.composite
def chunked_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.attention.tiled.sdpa_chunked`: an :func:`sdpa_cases` case plus
    ``chunk_size`` in 1..5.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Passed to :func:`sdpa_cases` (True: no ``"nan"`` empty-row policy).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    case = draw(sdpa_cases(for_gradcheck=for_gradcheck))
    return Case(case.inputs, {**case.options, "chunk_size": draw(st.integers(1, 5))})


@st.composite
def online_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.attention.tiled.sdpa_online`: an :func:`sdpa_cases` case plus
    ``block_q`` and ``block_k``, each in 1..5.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Passed to :func:`sdpa_cases` (True: no ``"nan"`` empty-row policy).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    case = draw(sdpa_cases(for_gradcheck=for_gradcheck))
    return Case(case.inputs, {**case.options, "block_q": draw(st.integers(1, 5)), "block_k": draw(st.integers(1, 5))})


@st.composite
def combine_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.attention.tiled.combine_partials`: split-KV partial results
    ``inputs = (outs, lses)``.

    ``outs (S, H, Lq, Dv)`` (S splits in 1..3, H in 1..2, Lq in 1..4, Dv in 1..3) with finite values in
    ``[-2, 2]``; ``lses (S, H, Lq)`` in ``[-3, 3]`` with some ``-inf`` (an empty split).  No options.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: the same cases either way.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    s, h, lq, dv = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    outs = _floats_array(draw, (s, h, lq, dv))
    lses = _with_neg_inf(draw, _floats_array(draw, (s, h, lq), 3.0))
    return Case((outs, lses), {})


@st.composite
def decode_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.attention.cache.decode`: KV-cache decoding.

    ``inputs = (q (B, Hq, Lq, D), k_cache (B, Hk, Lc, D), v_cache (B, Hk, Lc, Dv))``: B and Hk in 1..2,
    ``Hq = Hk`` or ``2 · Hk``, Lq in 1..3, Lc in 1..5, D and Dv in 1..3; finite values in ``[-2, 2]``.
    Options: ``cache_lengths (B,)``, each in ``1..Lc``, ``causal`` (True or False) and ``empty_rows``
    always; ``window`` (each side None or 0..3), ``softcap`` in ``[0.5, 5]`` and ``sinks (Hq,)``, each
    or not.

    Parameters
    ----------
    for_gradcheck : bool, default False
        True: ``empty_rows`` is ``"zero"`` or ``"uniform"`` only, not ``"nan"`` (whose NaN rows have no
        derivative to check); False: any of the three.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    b, hk = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    hq = hk * draw(st.integers(1, 2))
    lq, lc = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    d, dv = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    inputs = (
        _floats_array(draw, (b, hq, lq, d)),
        _floats_array(draw, (b, hk, lc, d)),
        _floats_array(draw, (b, hk, lc, dv)),
    )
    lengths = np.array([draw(st.integers(1, lc)) for _ in range(b)])
    opts = {"cache_lengths": lengths, "causal": draw(st.booleans())}
    if draw(st.booleans()):
        opts["window"] = (draw(st.one_of(st.none(), st.integers(0, 3))), draw(st.one_of(st.none(), st.integers(0, 3))))
    if draw(st.booleans()):
        opts["softcap"] = draw(st.floats(0.5, 5.0))
    if draw(st.booleans()):
        opts["sinks"] = _floats_array(draw, (hq,))
    opts["empty_rows"] = draw(st.sampled_from(["zero", "uniform"] if for_gradcheck else ["zero", "nan", "uniform"]))
    return Case(inputs, opts)


@st.composite
def paged_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.attention.cache.paged_gather`: a paged KV cache.

    ``inputs = (pages,)``, ``pages (P, Hk, page, D)`` (P in 1..4 pages of ``page`` in 1..3 slots, Hk in
    1..2, D in 1..3) with finite values in ``[-2, 2]``.  Options ``block_table (B, max_pages)`` (B in
    1..2, max_pages in 1..3): page ids in ``-1..P-1`` (-1 unused; ids may repeat), and ``lengths (B,)``,
    each within the pages its row lists before its first -1.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: the same cases either way (the gather is linear in the pages).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    n_pages, hk, page, d = (
        draw(st.integers(1, 4)),
        draw(st.integers(1, 2)),
        draw(st.integers(1, 3)),
        draw(st.integers(1, 3)),
    )
    b, max_pages = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    table = np.array([[draw(st.integers(-1, n_pages - 1)) for _ in range(max_pages)] for _ in range(b)])
    lengths = []
    for row in table:
        usable = 0
        while usable < max_pages and row[usable] >= 0:
            usable += 1
        lengths.append(draw(st.integers(0, usable * page)))
    return Case((_floats_array(draw, (n_pages, hk, page, d)),), {"block_table": table, "lengths": np.array(lengths)})


@st.composite
def allocation_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.attention.allocation.allocation_attention`: an :func:`sdpa_cases`
    case plus its gate.

    ``inputs = (q, k, v, gate)``, ``gate`` an :class:`~refattn.attention.allocation.AllocationGate`
    with G in 1..3 hidden units: ``w1 (D, G)`` (plus seeded noise, σ = 0.1), ``b1 (G,)`` (plus 0.05),
    ``w2 (G,)`` and ``b2 ()``, finite values of about ``[-2, 2]``; sdpa's options.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Passed to :func:`sdpa_cases` (True: no ``"nan"`` empty-row policy); True also keeps only gates
        whose hidden pre-activations ``q w1 + b1`` are all more than 1e-3 from 0 (off relu's kink).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    from refattn.attention.allocation import AllocationGate

    case = draw(sdpa_cases(for_gradcheck=for_gradcheck))
    q = case.inputs[0]
    g = draw(st.integers(1, 3))
    w1 = _floats_array(draw, (q.shape[-1], g)) + _seeded_noise(draw, (q.shape[-1], g), 0.1)
    gate = AllocationGate(
        w1, _floats_array(draw, (g,)) + 0.05, _floats_array(draw, (g,)), np.array(draw(finite_floats()))
    )
    if for_gradcheck:
        from hypothesis import assume

        z1 = np.asarray(q) @ w1 + gate.b1
        assume(np.min(np.abs(z1)) > 1e-3)  # away from relu's kink
    return Case(case.inputs + (gate,), case.options)


@st.composite
def multihead_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.attention.multihead.multihead_attention`: self or cross attention,
    GQA, optional biases, head gate, key mask, causal.

    ``inputs = (x (B?, Lq, d_model), params)``: batch dims ``()`` or ``(2,)``, Lq and d_model in 1..3;
    ``params`` an :class:`~refattn.attention.multihead.MHAParams` with ``w_q (d_model, Hq·dk)``,
    ``w_k (d_kv, Hk·dk)``, ``w_v (d_kv, Hk·dv)``, ``w_o (Hq·dv, d_model)`` and each bias given or None
    (Hk in 1..2, ``Hq = Hk`` or ``2 · Hk``, dk and dv in 1..2); finite values in ``[-2, 2]``.

    Options: ``num_heads = Hq``, ``num_kv_heads = Hk`` and ``empty_rows`` always; cross attention (drawn
    or not) adds ``kv (B?, Lk, d_kv)``, Lk and d_kv in 1..3 (self attention: ``Lk = Lq``,
    ``d_kv = d_model``); then, each or not, ``head_mask (Hq,)``, a bool key ``mask (B?, 1, 1, Lk)`` and
    ``causal=True`` (with an ``align`` when ``Lq != Lk``).

    Parameters
    ----------
    for_gradcheck : bool, default False
        True: ``empty_rows`` is ``"zero"`` or ``"uniform"`` only, not ``"nan"`` (whose NaN rows have no
        derivative to check); False: any of the three.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    from refattn.attention.multihead import MHAParams

    batch = draw(st.sampled_from([(), (2,)]))
    hk = draw(st.integers(1, 2))
    hq = hk * draw(st.integers(1, 2))
    dk, dv, d_model = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    lq = draw(st.integers(1, 3))
    cross = draw(st.booleans())
    lk = draw(st.integers(1, 3)) if cross else lq
    d_kv = draw(st.integers(1, 3)) if cross else d_model
    x = _floats_array(draw, batch + (lq, d_model))

    def maybe(shape):
        return _floats_array(draw, shape) if draw(st.booleans()) else None

    params = MHAParams(
        _floats_array(draw, (d_model, hq * dk)),
        _floats_array(draw, (d_kv, hk * dk)),
        _floats_array(draw, (d_kv, hk * dv)),
        _floats_array(draw, (hq * dv, d_model)),
        maybe((hq * dk,)),
        maybe((hk * dk,)),
        maybe((hk * dv,)),
        maybe((d_model,)),
    )
    opts = {"num_heads": hq, "num_kv_heads": hk}
    if cross:
        opts["kv"] = _floats_array(draw, batch + (lk, d_kv))
    if draw(st.booleans()):
        opts["head_mask"] = _floats_array(draw, (hq,))
    if draw(st.booleans()):
        opts["mask"] = draw(hnp.arrays(bool, batch + (1, 1, lk), elements=st.booleans()))
    if draw(st.booleans()):
        opts["causal"] = True
        if lq != lk:
            opts["align"] = draw(st.sampled_from(["top_left", "bottom_right"]))
    opts["empty_rows"] = draw(st.sampled_from(["zero", "uniform"] if for_gradcheck else ["zero", "nan", "uniform"]))
    return Case((x, params), opts)


@st.composite
def rope_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.attention.position.rope`: ``inputs = (x,)``, ``x (B?, H?, L, D)`` with
    D even.

    Leading dims ``()``, ``(2,)`` or ``(2, 2)``; L in 1..4; ``D = 2 · half``, half in 1..3; finite values
    in ``[-2, 2]``.  Options: ``style`` (``"half"`` or ``"interleaved"``) always; ``positions (L,)``
    (floats in ``[-50, 50]``), an even ``rotary_dim`` in ``0..D`` and ``base`` (10000, 500 or 1e6), each
    or not.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: the same cases either way (rope is linear in x).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    lead = draw(st.sampled_from([(), (2,), (2, 2)]))
    length, half = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    x = _floats_array(draw, lead + (length, 2 * half))
    opts = {"style": draw(st.sampled_from(["half", "interleaved"]))}
    if draw(st.booleans()):
        opts["positions"] = draw(hnp.arrays(np.float64, (length,), elements=st.floats(-50, 50)))
    if draw(st.booleans()):
        opts["rotary_dim"] = 2 * draw(st.integers(0, half))
    if draw(st.booleans()):
        opts["base"] = draw(st.sampled_from([10000.0, 500.0, 1e6]))
    return Case((x,), opts)


# ---- attention maps for rollout and the metrics ----------------------------------------------


def _softmax_rows(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _maps(draw, shape):
    """Row-stochastic maps with strictly positive, tie-free entries (softmax of noisy logits)."""
    logits = _floats_array(draw, shape) + _seeded_noise(draw, shape, 0.3)
    return _softmax_rows(logits)


@st.composite
def rollout_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.rollout_flow.rollout`: stacked per-layer maps and every option.

    ``inputs = (attentions,)``, ``attentions (L, H, n, n)`` (L and H in 1..3, n in 1..4): strictly
    positive, tie-free, row-stochastic maps (the softmax of noisy logits).  Options: ``head_fusion``
    (``"mean"``, ``"max"`` or ``"min"``) always; ``residual`` (0, 0.3, 0.5 or 1), ``start_layer`` in
    ``0..L-1``, ``discard_ratio`` (0.25 or 0.5), ``renormalize=False`` and ``return_all=True``, each or
    not; and a real-token ``mask (n,)`` (token 0 real) or not, the maps' rows then summing to 1 over
    the real tokens, as a model gives them.

    Parameters
    ----------
    for_gradcheck : bool, default False
        True: only cases whose selections no finite difference flips (with ``"max"`` or ``"min"``
        fusion of several heads, the two largest and the two smallest heads of every entry more than
        1e-3 apart; with a ``discard_ratio``, the fused real entries of every row more than 1e-3
        apart), and ``check_probabilities=False`` (finite differences step off the probability
        simplex).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    layers, heads, n = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    opts = {"head_fusion": draw(st.sampled_from(["mean", "max", "min"]))}
    maps = _maps(draw, (layers, heads, n, n))
    if draw(st.booleans()):
        opts["residual"] = draw(st.sampled_from([0.0, 0.3, 0.5, 1.0]))
    if draw(st.booleans()):
        opts["start_layer"] = draw(st.integers(0, layers - 1))
    if draw(st.booleans()):
        opts["discard_ratio"] = draw(st.sampled_from([0.25, 0.5]))
    if draw(st.booleans()):
        opts["renormalize"] = False
    if draw(st.booleans()):
        real = np.array([True] + [draw(st.booleans()) for _ in range(n - 1)])
        opts["mask"] = real
        # as a model gives them: real rows sum to 1 over the real tokens (what padded entries hold is ignored)
        maps = np.where(real, maps / (maps * real).sum(axis=-1, keepdims=True), maps)
    if draw(st.booleans()):
        opts["return_all"] = True
    if for_gradcheck and opts["head_fusion"] != "mean" and heads > 1:
        from hypothesis import assume

        srt = np.sort(maps, axis=1)
        assume(np.min(srt[:, -1] - srt[:, -2]) > 1e-3 and np.min(srt[:, 1] - srt[:, 0]) > 1e-3)  # no tied heads
    if for_gradcheck and opts.get("discard_ratio"):
        from hypothesis import assume

        fuse = {"mean": np.mean, "max": np.max, "min": np.min}[opts["head_fusion"]]
        fused = fuse(maps, axis=1)  # (L, n, n), as rollout fuses the heads
        real = opts.get("mask", np.ones(n, dtype=bool))
        ranked = np.sort(fused[..., real], axis=-1)  # the discard ranks the real keys only
        assume(ranked.shape[-1] < 2 or np.min(np.diff(ranked, axis=-1)) > 1e-3)  # the selection must not flip
    if for_gradcheck:
        opts["check_probabilities"] = False  # finite differences step off the probability simplex
    return Case((maps,), opts)


@st.composite
def map_cases(draw, *, for_gradcheck=False, square=False, extra=None, second_map=False):
    """Attention maps for the metrics: ``inputs = (P,)`` or, with ``second_map``, ``(P1, P2)``.

    Each map ``(B?, H, Lq, Lk)`` (batch dims ``()`` or ``(2,)``, H in 1..3, Lq and Lk in 1..4) is strictly
    positive, tie-free and row-stochastic (the softmax of logits in ``[-2, 2]`` plus seeded noise).
    Options: the metric's own (``extra``) and a key-padding ``mask (B?, Lk)`` (bool, True = real; key 0
    always real) or not; with a mask, the padded keys of every map weigh 0 and its rows sum to 1 over
    the real keys, as a model gives them.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored here: :func:`metric_strategy` applies the gradient check's restrictions.
    square : bool, default False
        True: ``Lk = Lq`` (for the metrics that compare query and key positions).
    extra : callable, optional
        ``extra(draw, shape) -> dict``: the metric's own options, drawn (``draw``, Hypothesis's draw
        function) for the maps' shape ``(B?, H, Lq, Lk)``.  Default None: none.
    second_map : bool, default False
        True: a second map of the same shape and mask (for the metrics of two maps, ``js_divergence``
        and ``js_distance``).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    batch = draw(st.sampled_from([(), (2,)]))
    lq = draw(st.integers(1, 4))
    lk = lq if square else draw(st.integers(1, 4))
    shape = batch + (draw(st.integers(1, 3)), lq, lk)
    opts = {} if extra is None else extra(draw, shape)
    key_mask = None
    if draw(st.booleans()):
        rows = [[True] + [draw(st.booleans()) for _ in range(lk - 1)] for _ in range(max(int(np.prod(batch)), 1))]
        key_mask = np.array(rows).reshape(batch + (lk,))
        opts["mask"] = key_mask

    def one_map():
        p = _maps(draw, shape)
        if key_mask is None:
            return p
        p = p * key_mask[..., None, None, :]  # as a model gives them: softmax over the real keys only
        return p / p.sum(axis=-1, keepdims=True)

    return Case((one_map(),) + ((one_map(),) if second_map else ()), opts)


def _token_ids(draw, shape):
    return {
        "tokens": np.array([draw(st.integers(0, 2)) for _ in range(int(np.prod(shape[:-3] + shape[-1:])))]).reshape(
            shape[:-3] + shape[-1:]
        )
    }


def _key_choice(name):
    def extra(draw, shape):
        lk = shape[-1]
        return {name: sorted(draw(st.sets(st.integers(0, lk - 1), min_size=1, max_size=lk)))}

    return extra


def _words(draw, shape):
    return {"tokens": [draw(st.sampled_from(["the", "cat", "of", "sat", "a", "mat"])) for _ in range(shape[-1])]}


def _pairs(draw, shape):
    lq, lk = shape[-2:]
    return {
        "pairs": [(draw(st.integers(0, lq - 1)), draw(st.integers(0, lk - 1))) for _ in range(draw(st.integers(1, 3)))]
    }


def _groups(draw, shape):
    n = min(shape[-2:])
    idx = list(range(n))
    cut = draw(st.integers(0, n))
    return {"groups": [g for g in (idx[:cut], idx[cut:]) if g]}


def _tags(draw, shape):
    return {"pos_tags": [draw(st.sampled_from(["DET", "ADJ", "NOUN", "VERB"])) for _ in range(min(shape[-2:]))]}


def _offset(draw, shape):
    return {"offset": draw(st.integers(-2, 2))}


def metric_strategy(name):
    """The case strategy of the metric ``name`` (a function of :mod:`refattn.metrics`), as the
    registry holds it.

    Parameters
    ----------
    name : str
        The metric.  :func:`map_cases` with ``Lq = Lk`` for ``previous_token_score``,
        ``duplicate_token_score`` and ``induction_score``; with a second map for ``js_divergence`` and
        ``js_distance``; and with the metric's own options: ``tokens`` (ids 0..2, ``(B?, Lk)``) for
        ``duplicate_token_score`` and ``induction_score``; sorted distinct key indices, ``positions``
        for ``attention_to`` and ``important`` for ``allocation_efficiency``; ``tokens``, Lk words
        among "the", "cat", "of", "sat", "a", "mat", for ``function_word_ratio``; ``pairs``, 1..3
        (query, key) index pairs, for ``pair_attention``; ``groups``, ``range(min(Lq, Lk))`` cut into
        one or two contiguous groups, for ``group_attention``; ``pos_tags``, ``min(Lq, Lk)`` tags among
        DET, ADJ, NOUN, VERB, for ``phrase_attention``; ``offset`` in -2..2 for ``offset_attention``.
        Any other name: plain map cases.

    Returns
    -------
    callable
        ``cases(*, for_gradcheck=False) -> SearchStrategy of Case``.  With ``for_gradcheck=True`` its
        cases carry ``check_probabilities=False`` (finite differences step off the probability simplex)
        and, for the metrics with a kink, keep away from it: the largest and second-largest entries of
        every row more than 1e-3 apart (``max_weight``, ``head_confidence``), every real row's expected
        offset more than 1e-3 from 0 (``expected_offset``), the two maps' JS divergence above 1e-3 in
        every row (``js_distance``), every real row's entropy more than 1e-3 from the default target
        ``log(n / 4)``, n its real keys (``entropy_regularizer``).
    """
    square = name in ("previous_token_score", "duplicate_token_score", "induction_score")
    extra = {
        "duplicate_token_score": _token_ids,
        "induction_score": _token_ids,
        "attention_to": _key_choice("positions"),
        "allocation_efficiency": _key_choice("important"),
        "function_word_ratio": _words,
        "pair_attention": _pairs,
        "group_attention": _groups,
        "phrase_attention": _tags,
        "offset_attention": _offset,
    }.get(name)

    def cases(*, for_gradcheck=False):
        strategy = map_cases(
            for_gradcheck=for_gradcheck, square=square, extra=extra, second_map=name in ("js_divergence", "js_distance")
        )
        if for_gradcheck and name in _SMOOTHNESS:
            strategy = strategy.filter(_SMOOTHNESS[name])
        if for_gradcheck:  # finite differences step off the probability simplex
            strategy = strategy.map(lambda case: Case(case.inputs, {**case.options, "check_probabilities": False}))
        return strategy

    return cases


def _gap_to_second(case):
    p = np.sort(case.inputs[0], axis=-1)
    return p.shape[-1] < 2 or np.min(p[..., -1] - p[..., -2]) > 1e-3


def _offset_away_from_zero(case):
    from refattn.metrics._maps import attention_map

    m = attention_map(case.inputs[0], case.options.get("mask"))
    centre = (m.p * np.arange(m.p.shape[-1])).sum(-1) - np.arange(m.p.shape[-2])
    return np.min(np.abs(np.where(m.rows, centre, 1.0))) > 1e-3


def _distinct_maps(case):
    from refattn.metrics import js_divergence

    # sqrt(JS) curves sharply near 0: central differences with eps = 1e-4 need the maps well apart
    return np.min(js_divergence(*case.inputs, mask=case.options.get("mask"))) > 1e-3


def _entropy_off_target(case):
    from refattn.metrics import entropy
    from refattn.metrics._maps import attention_map, key_counts

    m = attention_map(case.inputs[0], case.options.get("mask"))
    gap = entropy(m.p, mask=m.allowed) - np.log(np.maximum(key_counts(m), 1) / 4.0)
    return np.min(np.abs(np.where(m.rows, gap, 1.0))) > 1e-3


_SMOOTHNESS = {
    "max_weight": _gap_to_second,
    "head_confidence": _gap_to_second,
    "expected_offset": _offset_away_from_zero,
    "js_distance": _distinct_maps,
    "entropy_regularizer": _entropy_off_target,
}


@st.composite
def logits_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.metrics.distribution.entropy_from_logits`: ``inputs = (s,)``, the log
    of a :func:`map_cases` map.

    ``s (B?, H, Lq, Lk)``: finite logits, ``-inf`` at the padded keys when the case has a key-padding
    ``mask`` (kept as its option).

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: the same cases either way.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    case = draw(map_cases())
    with np.errstate(divide="ignore"):  # masked keys become -inf logits
        return Case((np.log(case.inputs[0]),), case.options)


@st.composite
def value_norm_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.metrics.norms.value_norms`: ``inputs = (P, x, w_v, b_v, w_o)``.

    ``P (B?, H, Lq, Lk)`` a :func:`map_cases` map (its padded keys, if any, weigh 0; the mask itself is
    not passed); token states ``x (B?, Lk, d_model)`` (d_model in 1..3, plus seeded noise); per-head
    value and output weights ``w_v (d_model, H·dv)`` and ``w_o (H·dv, d_model)`` (dv in 1..2, plus 0.1)
    and a bias ``b_v (H·dv,)`` or None; finite values of about ``[-2, 2]``.

    Parameters
    ----------
    for_gradcheck : bool, default False
        True: only cases where every head's transformed value ``‖f(x_j)‖`` exceeds 1e-2 (away from the
        norm's kink at 0), with the option ``check_probabilities=False``.  False: no options.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    case = draw(map_cases())
    p = case.inputs[0]
    h, lk = p.shape[-3], p.shape[-1]
    d_model, dv = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    x = _floats_array(draw, p.shape[:-3] + (lk, d_model)) + _seeded_noise(draw, p.shape[:-3] + (lk, d_model), 0.1)
    b_v = _floats_array(draw, (h * dv,)) if draw(st.booleans()) else None
    w_v, w_o = _floats_array(draw, (d_model, h * dv)) + 0.1, _floats_array(draw, (h * dv, d_model)) + 0.1
    if for_gradcheck:  # ‖f(x_j)‖ has a kink at 0: keep every head's transformed value away from it
        from hypothesis import assume

        v = (x @ w_v + (0.0 if b_v is None else b_v)).reshape(x.shape[:-1] + (h, dv))
        f = np.einsum("...lhd,hdm->...lhm", v, w_o.reshape(h, dv, d_model))
        assume(np.min(np.linalg.norm(f, axis=-1)) > 1e-2)
    return Case((p, x, w_v, b_v, w_o), {"check_probabilities": False} if for_gradcheck else {})


# ---- the low-precision twin -------------------------------------------------------------------


@st.composite
def sdpa_twin_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.lowp.sdpa_twin`: an sdpa case (no ``backend``) in a drawn format and
    accumulation, with the kernel's choices (``scale_at``, ``exp2``, ``block_k``, ``recompute_p``).

    The :func:`sdpa_cases` case's inputs and options, plus ``dtype`` (a format of
    ``refattn.lowp.FORMATS``, or ``"bf16"`` or ``"fp16"``) and ``accumulate`` (``"float32"`` or
    ``"float64"``) always, and, each or not, ``scale_at`` (``"q"``, ``"k"`` or ``"scores"``),
    ``exp2=True``, ``block_k`` in 1..3 and ``recompute_p=True``.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Passed to :func:`sdpa_cases` (True: no ``"nan"`` empty-row policy); True also draws
        ``dtype = accumulate = "float64"`` only: there the twin is sdpa and its backward a derivative;
        in a low-precision format the forward is piecewise constant and the backward is the kernel's
        rounded gradient, which no finite difference measures.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    from refattn import lowp

    case = draw(sdpa_cases(for_gradcheck=for_gradcheck))
    if for_gradcheck:
        dtype, accumulate = "float64", "float64"
    else:
        dtype = draw(st.sampled_from(sorted(lowp.FORMATS) + ["bf16", "fp16"]))
        accumulate = draw(st.sampled_from(lowp.ACCUMULATE))
    opts = {**case.options, "dtype": dtype, "accumulate": accumulate}
    if draw(st.booleans()):
        opts["scale_at"] = draw(st.sampled_from(lowp.SCALE_AT))
    if draw(st.booleans()):
        opts["exp2"] = True
    if draw(st.booleans()):
        opts["block_k"] = draw(st.integers(1, 3))
    if draw(st.booleans()):
        opts["recompute_p"] = True
    return Case(case.inputs, opts)


@st.composite
def round_to_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.lowp.round_to`: ``round_to(x, dtype)``, x of any real values.

    ``inputs = (x,)`` with ``x (B?, n)`` (no batch dim or one of 2; n in 0..4): finite values in
    ``[-1e6, 1e6]`` or special ones — ±0, 1e-42 and 3e-8 (subnormal in float32 and float16), 65520 and
    1e39 (past float16's and float32's largest finite values), -1e300, ``±inf`` and NaN.  Option
    ``dtype``: a format name of ``refattn.lowp.FORMATS`` or an alias (``"bf16"``, ``"fp8_e5m2"``,
    ``"half"``).

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: round_to has no backward (accepted, as by every strategy here).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    from refattn import lowp

    batch = draw(st.sampled_from([(), (2,)]))
    shape = batch + (draw(st.integers(0, 4)),)
    special = st.sampled_from([0.0, -0.0, 1e-42, 3e-8, 65520.0, 1e39, -1e300, np.inf, -np.inf, np.nan])
    x = draw(hnp.arrays(np.float64, shape, elements=st.one_of(finite_floats(1e6), special)))
    return Case((x,), {"dtype": draw(st.sampled_from(sorted(lowp.FORMATS) + ["bf16", "fp8_e5m2", "half"]))})


# ---- ops without a backward: masks, position tables, detectors, flow, rankings -------------------


def _align(draw, lq, lk, needed=True):
    """``{"align": ...}``: required when ``lq != lk`` (``needed``), optional otherwise."""
    if needed and lq != lk or draw(st.booleans()):
        return {"align": draw(st.sampled_from(["top_left", "bottom_right"]))}
    return {}


def _side(draw):
    return draw(st.one_of(st.none(), st.integers(0, 3)))


@st.composite
def causal_mask_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.masks.causal`: ``inputs = (lq, lk)``, each in 0..5 (empty masks
    included); an ``align`` (``"top_left"`` or ``"bottom_right"``) always when ``lq != lk``, otherwise or
    not.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: masks.causal has no backward (accepted, as by every strategy here).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    lq, lk = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    return Case((lq, lk), _align(draw, lq, lk))


@st.composite
def window_mask_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.masks.window`: ``inputs = (lq, lk, left, right)``, lq and lk in 0..5,
    each side None (unbounded) or 0..3; an ``align`` as :func:`causal_mask_cases` draws it.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: masks.window has no backward (accepted, as by every strategy here).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    lq, lk = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    return Case((lq, lk, _side(draw), _side(draw)), _align(draw, lq, lk))


@st.composite
def local_mask_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.masks.local`: ``inputs = (l, window_size)``, l in 0..6 and
    window_size in 0..14 (windows wider than the sequence included).

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: masks.local has no backward (accepted, as by every strategy here).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    return Case((draw(st.integers(0, 6)), draw(st.integers(0, 14))))


@st.composite
def length_and_period_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.masks.strided` and :func:`~refattn.masks.block`, which take the same
    inputs: ``inputs = (l, n)``, a length l in 0..6 and a stride or block size n in 1..4.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: the masks have no backward (accepted, as by every strategy here).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    return Case((draw(st.integers(0, 6)), draw(st.integers(1, 4))))


@st.composite
def from_lengths_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.masks.from_lengths`: ``inputs = (q_lengths, k_lengths, lq, lk)``.

    lq and lk in 0..4; a batch of 1..3 int64 lengths, ``k_lengths`` each in ``0..lk`` and ``q_lengths``
    either None (every query kept) or each in ``0..lq``.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: masks.from_lengths has no backward (accepted, as by every strategy here).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    b, lq, lk = draw(st.integers(1, 3)), draw(st.integers(0, 4)), draw(st.integers(0, 4))
    k_lengths = np.array([draw(st.integers(0, lk)) for _ in range(b)], dtype=np.int64)
    q_lengths = None
    if draw(st.booleans()):
        q_lengths = np.array([draw(st.integers(0, lq)) for _ in range(b)], dtype=np.int64)
    return Case((q_lengths, k_lengths, lq, lk))


@st.composite
def varlen_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.masks.varlen`: ``inputs = (cu_seqlens_q, cu_seqlens_k)``, 1..3 packed
    sequences of 0..3 tokens each.

    The cumulative lengths are int64, ``(S + 1,)``, starting at 0.  Options, each or not: ``causal=True``
    and ``window`` (each side None or 0..3), applied within each sequence; ``align`` (``"top_left"`` or
    ``"bottom_right"``), always when causal or a window meets query and key lengths that differ.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: masks.varlen has no backward (accepted, as by every strategy here).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    s = draw(st.integers(1, 3))
    lq = [draw(st.integers(0, 3)) for _ in range(s)]
    lk = [draw(st.integers(0, 3)) for _ in range(s)]
    opts = {}
    if draw(st.booleans()):
        opts["causal"] = True
    if draw(st.booleans()):
        opts["window"] = (_side(draw), _side(draw))
    if opts and lq != lk or draw(st.booleans()):
        opts["align"] = draw(st.sampled_from(["top_left", "bottom_right"]))
    cu = [np.concatenate([[0], np.cumsum(n)]).astype(np.int64) for n in (lq, lk)]
    return Case(tuple(cu), opts)


@st.composite
def dropout_mask_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.masks.dropout_mask`: ``inputs = (shape, p, seed)``.

    ``shape`` a tuple of 0..3 dims, each in 0..4; ``p`` 0.0, 0.1, 0.5 or 0.9; ``seed`` any 64-bit
    unsigned integer.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: masks.dropout_mask has no backward (accepted, as by every strategy here).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    p = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9]))
    return Case((shape, p, draw(st.integers(0, 2**64 - 1))))


@st.composite
def alibi_slopes_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.attention.position.alibi_slopes`: ``inputs = (num_heads,)``, 1..20
    (powers of two and not).

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: alibi_slopes has no backward (accepted, as by every strategy here).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    return Case((draw(st.integers(1, 20)),))


@st.composite
def alibi_bias_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.attention.position.alibi_bias`: ``inputs = (slopes, lq, lk)``.

    ``slopes (B?, H)`` (no batch dim or one of 2, H in 1..3) with finite values in ``[-2, 2]``; lq and lk
    in 0..4.  Options: ``style`` (``"abs"`` or ``"signed"``) always; an ``align`` always when
    ``lq != lk``, otherwise or not.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: alibi_bias has no backward (accepted, as by every strategy here).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    batch = draw(st.sampled_from([(), (2,)]))
    slopes = _floats_array(draw, batch + (draw(st.integers(1, 3)),))
    lq, lk = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    opts = {"style": draw(st.sampled_from(["abs", "signed"])), **_align(draw, lq, lk)}
    return Case((slopes, lq, lk), opts)


@st.composite
def sinusoidal_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.attention.position.sinusoidal_positions`: ``inputs = (length, dim)``,
    length in 0..6 and dim in 1..7 (odd dims included); option ``base`` (10000, 500 or 1e6) or not.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: sinusoidal_positions has no backward (accepted, as by every strategy here).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    opts = {"base": draw(st.sampled_from([10000.0, 500.0, 1e6]))} if draw(st.booleans()) else {}
    return Case((draw(st.integers(0, 6)), draw(st.integers(1, 7))), opts)


@st.composite
def topk_mask_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.attention.sparse.topk_mask`: ``inputs = (logits,)`` and ``top_k``.

    ``logits (B?, Lq, Lk)`` (no batch dim or one of 2, Lq in 1..3, Lk in 1..4), entries among -1, 0, 0.5
    and 2 (ties) with some ``-inf`` (masked); option ``top_k`` in 1..5 (it may exceed Lk).

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: topk_mask has no backward (accepted, as by every strategy here).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    batch = draw(st.sampled_from([(), (2,)]))
    shape = batch + (draw(st.integers(1, 3)), draw(st.integers(1, 4)))
    logits = _with_neg_inf(draw, draw(hnp.arrays(np.float64, shape, elements=st.sampled_from([-1.0, 0.0, 0.5, 2.0]))))
    return Case((logits,), {"top_k": draw(st.integers(1, 5))})


@st.composite
def flow_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.rollout_flow.attention_flow`: small, since each entry of the result
    is a linear program.

    ``inputs = (attentions,)``, ``attentions (L, H, n, n)`` (L and H in 1..2, n in 1..3), row-stochastic
    maps as :func:`rollout_cases` draws them.  Options: ``head_fusion`` (``"mean"``, ``"max"`` or
    ``"min"``) always; ``residual`` (0, 0.5 or 1), ``output_layer`` in ``1..L``, ``normalize=False``
    and a real-token ``mask (n,)`` (token 0 real; the rows then sum to 1 over the real tokens), each or
    not.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: attention_flow has no backward (accepted, as by every strategy here).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    layers, heads, n = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    maps = _maps(draw, (layers, heads, n, n))
    opts = {"head_fusion": draw(st.sampled_from(["mean", "max", "min"]))}
    if draw(st.booleans()):
        opts["residual"] = draw(st.sampled_from([0.0, 0.5, 1.0]))
    if draw(st.booleans()):
        opts["output_layer"] = draw(st.integers(1, layers))
    if draw(st.booleans()):
        opts["normalize"] = False
    if draw(st.booleans()):
        real = np.array([True] + [draw(st.booleans()) for _ in range(n - 1)])
        opts["mask"] = real
        maps = np.where(real, maps / (maps * real).sum(axis=-1, keepdims=True), maps)
    return Case((maps,), opts)


def _map_options(strategy, **draws):
    """``strategy`` (of map cases) with each option of ``draws`` drawn from its strategy."""
    return st.builds(
        lambda case, more: Case(case.inputs, {**case.options, **more}), strategy, st.fixed_dictionaries(draws)
    )


def detect_collapse_cases(*, for_gradcheck=False):
    """Cases for :func:`~refattn.metrics.distribution.detect_collapse`: :func:`map_cases` plus
    ``threshold`` (0.3, 0.5 or 0.8) and ``fraction`` (0.25 or 1.0).

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: detect_collapse has no backward (accepted, as by every strategy here).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    return _map_options(map_cases(), threshold=st.sampled_from([0.3, 0.5, 0.8]), fraction=st.sampled_from([0.25, 1.0]))


def detect_uniform_cases(*, for_gradcheck=False):
    """Cases for :func:`~refattn.metrics.distribution.detect_uniform`: :func:`map_cases` plus
    ``tolerance`` (0.02, 0.2 or 1.0).

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: detect_uniform has no backward (accepted, as by every strategy here).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    return _map_options(map_cases(), tolerance=st.sampled_from([0.02, 0.2, 1.0]))


def _special_positions(draw, shape):
    return {"special_positions": sorted(draw(st.sets(st.integers(0, shape[-1] - 1), min_size=1)))}


def special_token_cases(*, for_gradcheck=False):
    """Cases for :func:`~refattn.metrics.tokens.special_token_bias`: :func:`map_cases` plus
    ``special_positions`` (sorted distinct key indices, at least one; given as a keyword) and ``factor``
    (0.5, 1.0 or 2.0).

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: special_token_bias has no backward (accepted, as by every strategy here).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    return _map_options(map_cases(extra=_special_positions), factor=st.sampled_from([0.5, 1.0, 2.0]))


@st.composite
def top_tokens_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.metrics.tokens.top_tokens`: :func:`map_cases` plus ``k`` in ``1..Lk``.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: top_tokens has no backward (accepted, as by every strategy here).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    case = draw(map_cases())
    return Case(case.inputs, {**case.options, "k": draw(st.integers(1, case.inputs[0].shape[-1]))})


@st.composite
def summarize_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.metrics.summary.summarize`: ``inputs = (attentions,)``, a list of 1 or
    2 layers of square maps of one shape.

    The layers ``(B?, H, n, n)``: a square :func:`map_cases` map and, drawn or not, a second map of
    its shape (its rows then renormalised over the real keys when there is a mask).  Options: the
    map case's key-padding ``mask``, if any, and ``tokens`` (ids 0..2, ``(n,)`` shared by the batch
    or ``(B?, n)`` per example) or not.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: summarize has no backward (accepted, as by every strategy here).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    case = draw(map_cases(square=True))
    (p,) = case.inputs
    layers = [p] + ([_maps(draw, p.shape)] if draw(st.booleans()) else [])
    if "mask" in case.options:
        real = case.options["mask"][..., None, None, :]
        layers = [np.where(real, a / (a * real).sum(axis=-1, keepdims=True), a) for a in layers]
    opts = dict(case.options)
    if draw(st.booleans()):
        shape = draw(st.sampled_from([p.shape[-1:], p.shape[:-3] + p.shape[-1:]]))
        opts["tokens"] = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, 2)))
    return Case((layers,), opts)


@st.composite
def token_pattern_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.metrics.detectors.duplicate_token_pattern` and
    :func:`~refattn.metrics.detectors.induction_pattern`: ``inputs = (tokens,)``.

    ``tokens (B?, L)`` (no batch dim or one of 2, L in 1..5): int64 ids 0..2, or the strings "a", "b",
    "c"; option ``real`` (bool, of tokens' shape) or not.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: the token patterns have no backward (accepted, as by every strategy here).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    shape = draw(st.sampled_from([(), (2,)])) + (draw(st.integers(1, 5)),)
    ids = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, 2)))
    tokens = np.array(["a", "b", "c"])[ids] if draw(st.booleans()) else ids
    opts = {"real": draw(hnp.arrays(bool, shape, elements=st.booleans()))} if draw(st.booleans()) else {}
    return Case((tokens,), opts)


@st.composite
def head_importance_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.metrics.importance.head_importance`:
    ``inputs = (grads_of_head_mask,)``.

    Head-gate gradients ``(N, L, H)`` or, per token, ``(N, T, L, H)`` (N, T, L and H in 1..3), finite
    values in ``[-2, 2]``.  Options: ``per`` (``"example"`` or ``"token"``; the token axis T always with
    ``"token"``, drawn or not with ``"example"``) and ``normalize`` (``"layer"`` or None).

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: head_importance has no backward (accepted, as by every strategy here).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    per = draw(st.sampled_from(["example", "token"]))
    tokens = (draw(st.integers(1, 3)),) if per == "token" or draw(st.booleans()) else ()
    shape = (draw(st.integers(1, 3)),) + tokens + (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    opts = {"per": per, "normalize": draw(st.sampled_from(["layer", None]))}
    return Case((_floats_array(draw, shape),), opts)


@st.composite
def weight_norm_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.metrics.importance.weight_norm_importance`: ``inputs = (params,)``.

    ``params``: the :class:`~refattn.attention.multihead.MHAParams` of a :func:`multihead_cases` case
    (GQA included), or a list of two layers (the second with ``w_q`` negated); option
    ``num_heads``, its query heads.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: weight_norm_importance has no backward (accepted, as by every strategy here).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    case = draw(multihead_cases())
    params = case.inputs[1]
    if draw(st.booleans()):
        params = [params, params._replace(w_q=-params.w_q)]
    return Case((params,), {"num_heads": case.options["num_heads"]})


# ---- issue 13: softmax over several axes, logsumexp's b, KV append, ragged decode, short masks ------


def _axis_option(draw, ndim):
    """An ``axis`` for an ``ndim``-D array: None, an int, or a tuple of distinct axes (any order, either sign)."""
    kind = draw(st.sampled_from(["none", "int", "tuple"]))
    if kind == "none":
        return None
    if kind == "int":
        return draw(st.integers(-ndim, ndim - 1))
    axes = draw(st.permutations(range(ndim)))[: draw(st.integers(1, ndim))]
    return tuple(a - ndim if draw(st.booleans()) else a for a in axes)


@st.composite
def softmax_axes_cases(draw, *, for_gradcheck=False):
    """Cases for the softmax family over several axes: ``inputs = (x,)``, ``x`` of 1..3 dims of 1..3
    entries, finite values in ``[-3, 3]``, sometimes with ``-inf`` entries.

    Options: ``axis`` None (every axis), an int, or a tuple of distinct axes (any order, negative or
    not), and ``empty_rows`` always; a bool ``mask`` broadcasting to x, or not.  A row (the entries
    over ``axis``) may span every dim, the leading ones included.

    Parameters
    ----------
    for_gradcheck : bool, default False
        True: ``empty_rows`` is ``"zero"`` or ``"uniform"`` only (no NaN rows); False: any of the three.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    shape = tuple(draw(st.integers(1, 3)) for _ in range(draw(st.integers(1, 3))))
    x = _floats_array(draw, shape, 3.0)
    if draw(st.booleans()):
        x = _with_neg_inf(draw, x)
    opts = {"axis": _axis_option(draw, len(shape))}
    if draw(st.booleans()):
        opts["mask"] = draw(hnp.arrays(bool, _sub_shape(draw, shape, 1), elements=st.booleans()))
    opts["empty_rows"] = draw(st.sampled_from(["zero", "uniform"] if for_gradcheck else ["zero", "nan", "uniform"]))
    return Case((x,), opts)


def _signed_sums(x, mask, b, axis):
    """``(S, A)`` per row: ``Σ b e^x`` and ``Σ |b| e^x`` over the entries taking part."""
    e = np.exp(np.where(True if mask is None else mask, x, -np.inf))
    return np.sum(b * e, axis=axis), np.sum(np.abs(b) * e, axis=axis)


@st.composite
def logsumexp_b_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.softmax_family.logsumexp` with scale factors: a
    :func:`softmax_axes_cases` case plus ``b`` and ``return_sign``.

    ``b`` broadcasts to x (its trailing dims, each kept or 1; 0-D too), values in ``[-2, 2]`` with
    exact zeros, so sums may be negative (NaN without ``return_sign``) or zero.

    Parameters
    ----------
    for_gradcheck : bool, default False
        True: ``|b|`` in ``[0.25, 2]`` with random signs, and every row with entries is well
        conditioned, ``|S| >= 0.2 Σ |b| e^x`` (and ``S > 0`` without ``return_sign``): ``b`` is negated,
        or made positive, where the drawn one is not.  False: any ``b`` above.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    case = draw(softmax_axes_cases(for_gradcheck=for_gradcheck))
    (x,) = case.inputs
    opts = dict(case.options)
    shape = _sub_shape(draw, x.shape)
    opts["return_sign"] = draw(st.booleans())
    if not for_gradcheck:
        elements = st.one_of(st.just(0.0), finite_floats(2.0))
        opts["b"] = np.asarray(draw(hnp.arrays(np.float64, shape, elements=elements)))
        return Case((x,), opts)
    size = draw(hnp.arrays(np.float64, shape, elements=st.floats(0.25, 2.0)))
    b = np.where(draw(hnp.arrays(bool, shape, elements=st.booleans())), -size, size)
    for candidate in (b, -b, size):
        s, a = _signed_sums(x, opts.get("mask"), candidate, opts["axis"])
        ok = (a == 0) | (np.abs(s) >= 0.2 * a)
        if not opts["return_sign"]:
            ok &= (a == 0) | (s > 0)
        if np.all(ok):
            break
    opts["b"] = np.asarray(candidate, dtype=np.float64)  # a 0-d array, not a NumPy scalar
    return Case((x,), opts)


@st.composite
def append_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.attention.cache.append`: ``inputs = (past_k, past_v, k, v)``.

    ``past_k (B, Hk, Lp, D)``, ``past_v (B, Hk, Lp, Dv)`` (both None, or ``Lp`` in 0..3), ``k (B, Hk, Ln,
    D)``, ``v (B, Hk, Ln, Dv)`` with ``Ln`` in 0..3; B, Hk in 1..2, D, Dv in 1..3; finite values in ``[-2, 2]``.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: every case is smooth (a concatenation).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    b, hk = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    d, dv, ln = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(0, 3))
    past = (None, None)
    if draw(st.booleans()):
        lp = draw(st.integers(0, 3))
        past = (_floats_array(draw, (b, hk, lp, d)), _floats_array(draw, (b, hk, lp, dv)))
    return Case(past + (_floats_array(draw, (b, hk, ln, d)), _floats_array(draw, (b, hk, ln, dv))))


@st.composite
def decode_ragged_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.attention.cache.decode` with empty sequences and short masks: a
    :func:`decode_cases` case whose ``cache_lengths`` lie in ``0..Lc`` (0 at least once), and, each or
    not, a bool ``mask`` and a float ``bias`` of ``(B, 1 or Hq, Lq, m)`` whose last dim ``m`` may be
    shorter than ``Lc`` (padded as ONNX pads ``attn_mask``: :func:`~refattn.attention.cache.extend_mask`).

    Parameters
    ----------
    for_gradcheck : bool, default False
        Passed to :func:`decode_cases` (True: no ``"nan"`` empty-row policy).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    case = draw(decode_cases(for_gradcheck=for_gradcheck))
    q, k_cache, _ = case.inputs
    b, hq, lq = q.shape[:3]
    lc = k_cache.shape[2]
    opts = dict(case.options)
    lengths = np.array([draw(st.integers(0, lc)) for _ in range(b)])
    lengths[draw(st.integers(0, b - 1))] = 0
    opts["cache_lengths"] = lengths
    heads = draw(st.sampled_from([1, hq]))
    if draw(st.booleans()):
        m = draw(st.integers(1, lc))
        opts["mask"] = draw(hnp.arrays(bool, (b, heads, lq, m), elements=st.booleans()))
    if draw(st.booleans()):
        m = draw(st.integers(1, lc))
        opts["bias"] = _floats_array(draw, (b, heads, lq, m))
    return Case(case.inputs, opts)


@st.composite
def extend_mask_cases(draw, *, for_gradcheck=False, additive=False):
    """Cases for :func:`~refattn.attention.cache.extend_mask`: ``inputs = (mask, total_length)``.

    ``mask (..., m)``: 1..3 dims of 1..3 entries; bool, or (``additive=True``) float in ``[-2, 2]`` with
    ``-inf`` entries sometimes (not for the gradient check); ``total_length`` in ``m..m + 3``.

    Parameters
    ----------
    for_gradcheck : bool, default False
        True: no ``-inf`` entries in an additive mask.
    additive : bool, default False
        Draw float (additive) masks instead of bool ones.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    shape = tuple(draw(st.integers(1, 3)) for _ in range(draw(st.integers(1, 3))))
    if additive:
        mask = _floats_array(draw, shape)
        if not for_gradcheck and draw(st.booleans()):
            mask = _with_neg_inf(draw, mask)
    else:
        mask = draw(hnp.arrays(bool, shape, elements=st.booleans()))
    return Case((mask, shape[-1] + draw(st.integers(0, 3))))


# ---- issue 13, item 5: discard scopes, detection patterns, error measures, head subsets, token masks ----


@st.composite
def rollout_discard_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.rollout_flow.rollout` with the discard's scope and protected entries.

    A :func:`rollout_cases` case with, each or not, ``discard_scope`` (``"row"`` or ``"map"``) and
    ``protect``: 0..3 distinct ``(query, key)`` position pairs (sorted lists of tuples; none drawn:
    the scope's default).  Under ``"map"`` the discard ranks the whole fused map.

    Parameters
    ----------
    for_gradcheck : bool, default False
        True: as :func:`rollout_cases`, and with ``"map"`` and a ``discard_ratio`` the fused real
        entries of every map (not only of every row) more than 1e-3 apart, so no finite difference
        flips the selection.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    case = draw(rollout_cases(for_gradcheck=for_gradcheck))
    (maps,) = case.inputs
    n = maps.shape[-1]
    opts = dict(case.options)
    if draw(st.booleans()):
        opts["discard_scope"] = draw(st.sampled_from(["row", "map"]))
    if draw(st.booleans()):
        pairs = st.tuples(st.integers(0, n - 1), st.integers(0, n - 1))
        opts["protect"] = sorted(draw(st.sets(pairs, max_size=3)))
    if for_gradcheck and opts.get("discard_ratio") and opts.get("discard_scope") == "map":
        from hypothesis import assume

        fuse = {"mean": np.mean, "max": np.max, "min": np.min}[opts["head_fusion"]]
        fused = fuse(maps, axis=1)  # (L, n, n)
        real = opts.get("mask", np.ones(n, dtype=bool))
        ranked = np.sort(fused[:, real][..., real].reshape(fused.shape[0], -1), axis=-1)  # real entries, per map
        assume(ranked.shape[-1] < 2 or np.min(np.diff(ranked, axis=-1)) > 1e-3)
    return Case((maps,), opts)


def _heads_option(draw, heads):
    """None, one head index (negative too) or a list of 1..3 of them (repeats allowed)."""
    kind = draw(st.sampled_from(["all", "one", "list"]))
    if kind == "all":
        return None
    if kind == "one":
        return draw(st.integers(-heads, heads - 1))
    return draw(st.lists(st.integers(0, heads - 1), min_size=1, max_size=3))


def _single_key_free(case):
    """No entry of the map at 1 (a row with one key): |P − D| of a 0/1 pattern stays off its kink."""
    return case.inputs[0].max() < 1.0 - 1e-3


def detector_strategy(name):
    """The case strategy of the built-in detector ``name`` (``previous_token_score``,
    ``duplicate_token_score``, ``induction_score``), as the registry holds it.

    :func:`metric_strategy`'s cases (square maps, ``tokens`` for the last two) with the options
    ``exclude_bos`` and ``exclude_current_token`` (each or not), ``error_measure`` (``"mul"`` or
    ``"abs"``, always) and ``heads`` (None, one index or a list of 1..3, repeats allowed).

    Parameters
    ----------
    name : str
        The detector.

    Returns
    -------
    callable
        ``cases(*, for_gradcheck=False) -> SearchStrategy of Case``; with ``for_gradcheck=True`` as
        :func:`metric_strategy`'s, and under ``"abs"`` no map entry within 1e-3 of 1 (``|P − D|`` is
        kinked where P meets the 0/1 pattern; P is positive, so only rows of one key reach it).
    """
    base = metric_strategy(name)

    @st.composite
    def with_options(draw, for_gradcheck):
        case = draw(base(for_gradcheck=for_gradcheck))
        opts = dict(case.options)
        for flag in ("exclude_bos", "exclude_current_token"):
            if draw(st.booleans()):
                opts[flag] = True
        opts["error_measure"] = draw(st.sampled_from(["mul", "abs"]))
        heads = _heads_option(draw, case.inputs[0].shape[-3])
        if heads is not None:
            opts["heads"] = heads
        return Case(case.inputs, opts)

    def cases(*, for_gradcheck=False):
        strategy = with_options(for_gradcheck)
        if for_gradcheck:
            strategy = strategy.filter(lambda c: c.options["error_measure"] == "mul" or _single_key_free(c))
        return strategy

    return cases


@st.composite
def pattern_score_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.metrics.detectors.pattern_score`: ``inputs = (P, pattern)``.

    Square :func:`map_cases` maps ``(B?, H, L, L)`` (with a key-padding ``mask`` or not) and a
    pattern of shape ``(L, L)``, ``(H, L, L)`` or P's: 0/1 entries, or values in [0, 1].  Options:
    ``error_measure`` (``"mul"`` or ``"abs"``, always), ``exclude_bos``, ``exclude_current_token``
    (each or not) and ``heads`` (None, one index or a list of 1..3).

    Parameters
    ----------
    for_gradcheck : bool, default False
        True: ``check_probabilities=False`` (finite differences step off the simplex) and, under
        ``"abs"``, every entry of P on a real key more than 1e-3 from the pattern (``|P − D|`` is
        kinked where they meet).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    case = draw(map_cases(square=True))
    (p,) = case.inputs
    shape = draw(st.sampled_from([p.shape[-2:], p.shape[-3:], p.shape]))
    if draw(st.booleans()):
        pattern = draw(hnp.arrays(np.float64, shape, elements=st.sampled_from([0.0, 1.0])))
    else:
        pattern = draw(hnp.arrays(np.float64, shape, elements=st.floats(0.0, 1.0, allow_subnormal=False)))
    opts = dict(case.options)
    opts["error_measure"] = draw(st.sampled_from(["mul", "abs"]))
    for flag in ("exclude_bos", "exclude_current_token"):
        if draw(st.booleans()):
            opts[flag] = True
    heads = _heads_option(draw, p.shape[-3])
    if heads is not None:
        opts["heads"] = heads
    if for_gradcheck:
        from hypothesis import assume

        if opts["error_measure"] == "abs":
            keys = opts.get("mask", np.ones(p.shape[:-3] + p.shape[-1:], dtype=bool))[..., None, None, :]
            gap = np.abs(p - pattern)
            assume(np.min(np.where(keys, gap, 1.0)) > 1e-3)
        opts["check_probabilities"] = False
    return Case((p, pattern), opts)


@st.composite
def head_importance_mask_cases(draw, *, for_gradcheck=False):
    """Cases for :func:`~refattn.metrics.importance.head_importance` with real-token masks.

    A :func:`head_importance_cases` case and, for a per-token input ``(N, T, L, H)``, a real-token
    ``mask (N, T)`` (bool, True = real token; each example's first token real) or not.

    Parameters
    ----------
    for_gradcheck : bool, default False
        Ignored: head_importance has no backward (accepted, as by every strategy here).

    Returns
    -------
    hypothesis.strategies.SearchStrategy of Case
    """
    case = draw(head_importance_cases())
    (g,) = case.inputs
    opts = dict(case.options)
    if g.ndim == 4 and draw(st.booleans()):
        mask = draw(hnp.arrays(bool, g.shape[:2], elements=st.booleans()))
        mask[:, 0] = True
        opts["mask"] = mask
    return Case(case.inputs, opts)
