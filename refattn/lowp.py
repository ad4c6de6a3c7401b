"""Low-precision emulation: exact rounding to fp32/fp16/bf16/fp8 and the SDPA "twin".

The twin is the reference run the way a kernel in a low-precision dtype runs it (what
flash-attn's tests call ``attention_ref(..., upcast=False, reorder_ops=...)``): inputs, the scaled
operand, logits, ``P`` and outputs rounded to ``dtype``; products and softmax sums accumulated in
``accumulate`` precision.  Its distance from the float64 golden is the error budget of the tolerance
rules in :mod:`refattn.testing.compare`.  Every value returned is a float64 array holding values
representable in ``dtype``.  Conventions and derivations: ``specs/lowp.md``.

Axes as :func:`refattn.sdpa`: ``...`` batch, ``Hq``/``Hk`` query/kv heads, ``Lq``/``Lk`` lengths,
``D``/``Dv`` head dims.  ``dtype`` names a :class:`Format` (:data:`FORMATS`: float64, float32,
float16, bfloat16, float8_e4m3, float8_e5m2, or an alias); ``accumulate`` is one of
:data:`ACCUMULATE`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refattn._validate import (
    RefAttnError,
    as_choice,
    as_cotangent,
    as_float,
    check_broadcast_to,
    check_keywords_of,
    to_numpy,
    unbroadcast,
)
from refattn.attention.options import BACKWARD_RETURN_LSE, takes_sdpa_options
from refattn.attention.sdpa import SDPAGrads, expand_kv, reduce_kv, validate

__all__ = [
    "FORMATS",
    "ACCUMULATE",
    "Format",
    "format_of",
    "round_arrays",
    "round_to",
    "SCALE_AT",
    "TWIN_VARIANTS",
    "sdpa_twin",
    "sdpa_twin_backward",
]


class Format(NamedTuple):
    """A binary floating-point format: stored fraction bits, smallest normal exponent, largest finite
    value, and what overflow (and ``±inf``) becomes."""

    name: str
    fraction_bits: int
    min_exponent: int
    max_finite: float
    overflow: float  # inf, or nan for formats without infinities (float8_e4m3fn)

    @property
    def eps(self):
        """Distance from 1 to the next representable value."""
        return 2.0**-self.fraction_bits


#: The supported formats by name, ``{name: Format}``.
FORMATS = {
    f.name: f
    for f in (
        Format("float64", 52, -1022, float(np.finfo(np.float64).max), np.inf),
        Format("float32", 23, -126, float(np.finfo(np.float32).max), np.inf),
        Format("float16", 10, -14, 65504.0, np.inf),
        Format("bfloat16", 7, -126, (2.0 - 2.0**-7) * 2.0**127, np.inf),
        Format("float8_e4m3", 3, -6, 448.0, np.nan),  # OCP E4M3 "fn": no inf, overflow is NaN
        Format("float8_e5m2", 2, -14, 57344.0, np.inf),
    )
}
_ALIASES = {
    "fp64": "float64",
    "fp32": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "fp8_e4m3": "float8_e4m3",
    "float8_e4m3fn": "float8_e4m3",
    "fp8_e5m2": "float8_e5m2",
}
#: The accumulation precisions a twin models (``accumulate=``).
ACCUMULATE = ("float32", "float64")


def format_of(dtype) -> Format:
    """The :class:`Format` named by ``dtype``.

    Parameters
    ----------
    dtype : str, dtype, torch.dtype or Format
        A name in :data:`FORMATS` (``"float64"``, ``"float32"``, ``"float16"``, ``"bfloat16"``,
        ``"float8_e4m3"``, ``"float8_e5m2"``) or an alias (``"fp32"``, ``"fp16"``, ``"half"``,
        ``"bf16"``, ``"fp8_e4m3"``, ``"float8_e4m3fn"``, ``"fp8_e5m2"``); a NumPy or ml_dtypes
        dtype (``np.float16``, ``ml_dtypes.bfloat16``); a torch dtype (``torch.bfloat16``); or a
        :class:`Format`, returned as it is.

    Returns
    -------
    Format
        Its fraction bits, smallest normal exponent, largest finite value and overflow value.

    Raises
    ------
    RefAttnError
        ``dtype`` names no supported format (the message lists them).
    """
    if isinstance(dtype, Format):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if not isinstance(dtype, str):
        try:
            name = np.dtype(dtype).name
        except TypeError:
            pass
    name = _ALIASES.get(name, name)
    if name not in FORMATS:
        raise RefAttnError(f"dtype: expected one of {sorted(FORMATS)} (or an alias {sorted(_ALIASES)}), got {dtype!r}")
    return FORMATS[name]


def round_to(x, dtype):
    """``x`` rounded to the nearest value of ``dtype`` (ties to even), as float64; same shape.

    One rounding straight from float64 (no detour through float32, which would round twice)::

        e       = max(⌊log2 |x|⌋, e_min)
        quantum = 2^(e − fraction_bits)                the format's spacing at |x|
        r       = round_half_even(|x| / quantum) · quantum,  sign of x restored

    Results below the smallest normal are rounded to the format's subnormal grid; values past the
    largest finite one become ``inf`` (``nan`` for float8_e4m3, which has no infinity); NaN stays
    NaN, ``-0.0`` stays ``-0.0``.

    Parameters
    ----------
    x : array_like
        Real numbers of any shape (an int or float dtype, or ml_dtypes' bfloat16/float8); NaN and
        ``±inf`` allowed; not mutated.  A bool, complex or non-numeric array is refused.
    dtype : str, dtype or Format
        The target format, as :func:`format_of` takes it.

    Returns
    -------
    ndarray of float64, shape of ``x``
        The rounded values (a copy, also for ``dtype="float64"``).
    """
    fmt = format_of(dtype)
    a = to_numpy(x, "x")
    if a.dtype == bool or a.dtype.kind not in "iufV":
        raise RefAttnError(f"x: expected real numbers, got dtype {a.dtype}")
    x = np.asarray(a, dtype=np.float64)
    if fmt.name == "float64":
        return x.copy()
    mag = np.abs(x)
    with np.errstate(invalid="ignore", over="ignore"):
        _, e2 = np.frexp(mag)  # mag = m·2^e2 with m in [0.5, 1): exponent = e2 − 1
        exponent = np.maximum(e2 - 1, fmt.min_exponent)
        quantum = np.ldexp(1.0, exponent - fmt.fraction_bits)  # spacing of the format at mag
        r = np.round(mag / quantum) * quantum  # both steps exact but the rounding; np.round: ties to even
        r = np.where(r > fmt.max_finite, fmt.overflow, r)
        r = np.where(np.isinf(mag), fmt.overflow, r)
        r = np.where(np.isnan(mag), np.nan, r)
    return np.copysign(r, x)


def round_arrays(arrays, dtype):
    """The values a candidate computing in ``dtype`` receives: every numeric array rounded to
    ``dtype``, bool masks kept as they are, None entries dropped.

    Parameters
    ----------
    arrays : mapping of str to array_like or None
        E.g. ``{"q": q, "k": k, "v": v, "bias": bias, "mask": mask}``.
    dtype : str, dtype or Format
        The target format, as :func:`format_of` takes it.

    Returns
    -------
    dict of str to ndarray
        The same keys in the same order, without those whose value is None: ``round_to(a, dtype)``
        for numeric arrays, bool arrays unchanged.
    """
    return {n: (a if np.asarray(a).dtype == bool else round_to(a, dtype)) for n, a in arrays.items() if a is not None}


class _Precision:
    """Rounding to the storage dtype (``rd``), accumulation in ``accumulate`` precision (``ra``) and
    the rounding of P before the P·V product (``ri``, ``intermediate_dtype``)."""

    def __init__(self, dtype, accumulate, intermediate_dtype=None):
        self.fmt = format_of(dtype)
        as_choice(accumulate, "accumulate", ACCUMULATE)
        self.acc = np.float32 if accumulate == "float32" else np.float64
        self.inter = None
        if intermediate_dtype is not None:
            try:
                self.inter = format_of(intermediate_dtype)
            except RefAttnError as e:
                raise RefAttnError(f"intermediate_dtype: {str(e).removeprefix('dtype: ')}") from None

    def rd(self, x):
        return round_to(x, self.fmt)

    def ri(self, p):
        """P rounded to ``intermediate_dtype`` (after its rounding to ``dtype``, as flash-attn's
        ``attention_drop.to(intermediate_dtype).to(attention_drop.dtype)``); unchanged without one."""
        return p if self.inter is None else round_to(p, self.inter)

    def ra(self, x):
        """Rounded to the accumulation precision."""
        return np.asarray(x, dtype=self.acc).astype(np.float64)

    def mm(self, a, b):
        """``a @ b`` with products and sums in the accumulation precision (BLAS in that precision)."""
        return np.matmul(a.astype(self.acc), b.astype(self.acc)).astype(np.float64)

    def sum(self, x, axis=-1):
        return x.astype(self.acc).sum(axis=axis, dtype=self.acc).astype(np.float64)


#: Where a twin applies the scale (``scale_at=``), to q, to k or to the scores.
SCALE_AT = ("q", "k", "scores")
LOG2E = 1.4426950408889634  # log2(e), correctly rounded in float64


class _Choices(NamedTuple):
    """The implementation choices a low-precision kernel may make (``specs/lowp.md``)."""

    scale_at: str  # "q": rd(scale·q) kᵀ;  "k": q rd(scale·k)ᵀ;  "scores": rd(scale · rd(q kᵀ))
    exp2: bool  # softmax exponent formed in base 2: exp2(ra(s·log2 e) − ra(m·log2 e))
    recompute_p: bool  # backward: P = exp(s − lse) from the stored lse, Δ = rowsum(dO ∘ O)
    block_k: int | None  # forward: online softmax over key blocks of this size, P unnormalised in PV


#: The admissible implementations a tolerance rule must not condemn, ``{name: sdpa_twin choices}``.
#: Each is a coherent set of choices that correct low-precision kernels make; a rule's budget covers
#: all (``specs/compare.md``).
TWIN_VARIANTS = {
    "reference": {"scale_at": "k"},  # flash-attn's same-dtype reference (reorder_ops=True)
    "scale_on_q": {"scale_at": "q"},  # PyTorch's math backend: q scaled before the product
    # PyTorch's fused CPU flash kernel: scale after the product, P recomputed in the backward from
    # the stored float32 lse, Δ = rowsum(dO ∘ O)
    "fused_cpu": {"scale_at": "scores", "recompute_p": True},
    # FA2-style GPU kernel: exp2 with the scale folded into log2 e, online softmax over key blocks
    # of 64 (rescaled float32 accumulators), P recomputed in the backward
    "flash2": {"scale_at": "scores", "exp2": True, "recompute_p": True, "block_k": 64},
}


def _choices(reorder_ops, scale_at, exp2, recompute_p, block_k):
    if scale_at is None:
        scale_at = "k" if reorder_ops else "q"
    as_choice(scale_at, "scale_at", SCALE_AT)
    if reorder_ops and scale_at != "k":
        raise RefAttnError(f"scale_at: reorder_ops=True moves the scale to k, got scale_at={scale_at!r}")
    if block_k is not None and (isinstance(block_k, bool) or not isinstance(block_k, int) or block_k < 1):
        raise RefAttnError(f"block_k: expected a positive int or None, got {block_k!r}")
    return _Choices(scale_at, bool(exp2), bool(recompute_p), block_k)


class _TwinForward(NamedTuple):
    qs: np.ndarray  # (..., Hq, Lq, D)  the query operand of the product (scaled when scale_at="q")
    ks: np.ndarray  # (..., Hq, Lk, D)  the expanded key operand (scaled when scale_at="k")
    ve: np.ndarray  # (..., Hq, Lk, Dv) expanded values, rounded
    tanh: np.ndarray | None  # (..., Hq, Lq, Lk)
    s: np.ndarray  # (..., Hq, Lq, Lk)  final logits, rounded, -inf where masked
    sink: np.ndarray | None  # (..., Hq, Lq) rounded sink logits
    p: np.ndarray  # (..., Hq, Lq, Lk)  rounded probabilities (before dropout)
    pd: np.ndarray  # (..., Hq, Lq, Lk) after dropout, rounded
    lse: np.ndarray  # (..., Hq, Lq)     in accumulation precision, -inf on empty rows
    empty: np.ndarray  # (..., Hq, Lq)
    p_sink: np.ndarray | None  # (..., Hq, Lq)
    out: np.ndarray  # (..., Hq, Lq, Dv) rounded


class _Descales(NamedTuple):
    """fp8 descale factors (FA3's ``q_descale``, ``k_descale``, ``v_descale``) ready to multiply the
    inputs, in the accumulation precision; None where not given."""

    q: np.ndarray | None  # (..., Hq, 1, 1) q_descale (..., Hk) repeated over each GQA group
    k: np.ndarray | None  # (..., Hk, 1, 1)
    v: np.ndarray | None  # (..., Hk, 1, 1)


def _descales(a, q_descale, k_descale, v_descale, ra=None):
    """The descale factors of a validated call ``a``; each given one must be finite and broadcast to
    ``(..., Hk)`` (FA3's ``(B, Hk)``: one factor per batch entry and kv head).  ``ra`` rounds them
    (to the accumulation precision, FA3's float32); None keeps them as float64 (the golden)."""
    target = tuple(a.score_shape[:-3]) + (a.k.shape[-3],)
    factors = []
    for name, d in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale)):
        if d is None:
            factors.append(None)
            continue
        d = as_float(d, name)
        check_broadcast_to(d, target, name, "(..., Hk) (a factor per batch entry and kv head, FA3's (B, Hk)):")
        d = np.broadcast_to(d if ra is None else ra(d), target)[..., None, None]  # (..., Hk, 1, 1)
        factors.append(expand_kv(d, a.groups) if name == "q_descale" else d)  # q: (..., Hq, 1, 1)
    return _Descales(*factors)


def _descaled_inputs(q, k, v, q_descale, k_descale, v_descale, options):
    """The float64 golden of a descaled call: ``(q·q_descale, k·k_descale, v·v_descale)`` (exact
    float64 products of the given values, the descales not rounded) and ``chain(grads)``, which
    takes :class:`SDPAGrads` of those inputs back to ``q, k, v`` (``dq = dq' · q_descale``, ...)."""
    if q_descale is None and k_descale is None and v_descale is None:
        return (q, k, v), lambda g: g
    a = validate(q, k, v, **options)
    desc = _descales(a, q_descale, k_descale, v_descale)
    scaled = tuple(x if d is None else x * d for x, d in zip((a.q, a.k, a.v), desc))

    def chain(g):
        back = (x if d is None else unbroadcast(x * d, y.shape) for x, d, y in zip(g[:3], desc, (a.q, a.k, a.v)))
        return SDPAGrads(*back, g.dbias, g.dsinks)

    return scaled, chain


def _dropped(p, a, pr: _Precision):
    """``P̃ = rd(ri(P) · keep/(1 − p))``: P rounded to the intermediate dtype, then dropout."""
    p = pr.ri(p)
    return p if a.keep_scale is None else pr.rd(p * a.keep_scale)


def _exp(x, pr: _Precision, exp2):
    """``exp(x)`` in the accumulation precision; with ``exp2`` the exponent is formed in base 2, one
    rounding per scaled term: ``exp2(ra(a·log2 e) − ra(b·log2 e))`` for ``x = a − b`` (pass the pair)."""
    a, b = x
    with np.errstate(invalid="ignore"):
        if exp2:
            return pr.ra(np.exp2(pr.ra(pr.ra(a * LOG2E) - pr.ra(b * LOG2E))))
        return pr.ra(np.exp(pr.ra(a - b)))


def _twin_forward(a, pr: _Precision, c: _Choices, desc: _Descales):
    rd, ra = pr.rd, pr.ra
    q, k, v = rd(a.q), rd(a.k), rd(a.v)
    # fp8 descales after the inputs' rounding, before the GQA repeat and the scale, each product
    # rounded back to dtype: FA3's attention_ref, (q.float() * q_descale).to(q.dtype)
    if desc.q is not None:
        q = rd(ra(q * desc.q))  # (..., Hq, Lq, D)
    if desc.k is not None:
        k = rd(ra(k * desc.k))  # (..., Hk, Lk, D)
    if desc.v is not None:
        v = rd(ra(v * desc.v))  # (..., Hk, Lk, Dv)
    ke, ve = expand_kv(k, a.groups), expand_kv(v, a.groups)
    if c.scale_at == "k":  # the scale moved from q to k (flash-attn's reorder_ops=True)
        qs, ks = q, rd(ke * a.scale)
    elif c.scale_at == "q":
        qs, ks = rd(q * a.scale), ke
    else:
        qs, ks = q, ke
    s = rd(pr.mm(qs, np.swapaxes(ks, -1, -2)))  # (..., Hq, Lq, Lk)
    if c.scale_at == "scores":
        s = rd(a.scale * s)
    t = None
    if a.softcap is not None:
        t = rd(np.tanh(rd(s / a.softcap)))
        s = rd(a.softcap * t)
    if a.bias is not None:
        s = rd(s + rd(a.bias))
    if a.allowed is not None:
        s = np.where(a.allowed, s, -np.inf)
    s = np.broadcast_to(s, a.score_shape)
    sink = None
    if a.sinks is not None:
        sink = np.broadcast_to(rd(a.sinks)[..., None], a.score_shape[:-1])  # (..., Hq, Lq)
    m = s.max(axis=-1)
    if sink is not None:
        m = np.maximum(m, sink)
    empty = np.isneginf(m)
    m_safe = np.where(empty, 0.0, m)
    e = _exp((s, m_safe[..., None]), pr, c.exp2)  # softmax in the accumulation precision
    denom = pr.sum(e)
    p_sink = None
    if sink is not None:
        p_sink = _exp((sink, m_safe), pr, c.exp2)
        denom = ra(denom + p_sink)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = rd(ra(e / denom[..., None]))
        lse = np.where(empty, -np.inf, ra(m_safe + np.log(np.where(empty, 1.0, denom))))
        if p_sink is not None:
            p_sink = np.where(empty, 0.0, ra(p_sink / denom))
    if empty.any():
        fill = {"zero": 0.0, "nan": np.nan, "uniform": rd(1.0 / a.score_shape[-1])}[a.empty_rows]
        p = np.where(empty[..., None], fill, p)
    pad = a.padded_rows  # (B..., 1, Lq): padded query rows, 0 under every policy
    if pad is not None:
        p = np.where(pad[..., None], 0.0, p)
        lse = np.where(pad, -np.inf, lse)
        empty = empty | pad
        p_sink = None if p_sink is None else np.where(pad, 0.0, p_sink)
    pd = _dropped(p, a, pr)  # the P·V operand: rd(ri(P) · keep/(1 − p))
    out = rd(pr.mm(pd, ve))
    if c.block_k is not None:
        blocked_out, blocked_lse = _online_forward(s, sink, ve, a, pr, c)
        out = np.where(empty[..., None], out, blocked_out)
        lse = np.where(empty, lse, blocked_lse)
    return _TwinForward(qs, ks, ve, t, s, sink, p, pd, lse, empty, p_sink, out)


def _rescale_factor(m_old, m_new, pr: _Precision, exp2):
    """``exp(m_old − m_new)``: what the accumulators are multiplied by when the row max grows (0 while
    the row has seen no key)."""
    return np.where(np.isneginf(m_old), 0.0, _exp((m_old, m_new), pr, exp2))


def _online_forward(s, sink, ve, a, pr: _Precision, c: _Choices):
    """The forward of a flash-style kernel (FA2's online softmax) over key blocks of ``c.block_k``:
    a running max ``m``, a running sum ``l`` and an accumulator rescaled by ``exp(m_old − m_new)`` in
    the accumulation precision; each block's *unnormalised* ``rd(exp(s − m))`` enters the PV
    product; ``out = rd(acc / l)``.  A sink is the first "key" (value 0).  Empty rows are left to
    the caller.  Returns ``out (..., Hq, Lq, Dv)`` and ``lse (..., Hq, Lq)``."""
    rd, ra = pr.rd, pr.ra
    lead = s.shape[:-1]
    m = np.full(lead, -np.inf) if sink is None else np.array(sink, dtype=np.float64)
    l_sum = np.where(np.isneginf(m), 0.0, 1.0)
    acc = np.zeros(lead + (ve.shape[-1],))
    keep = None if a.keep_scale is None else np.broadcast_to(a.keep_scale, s.shape)
    for j0 in range(0, s.shape[-1], c.block_k):
        sj = s[..., j0 : j0 + c.block_k]  # (..., Hq, Lq, bk)
        m_new = np.maximum(m, sj.max(axis=-1))
        m_safe = np.where(np.isneginf(m_new), 0.0, m_new)
        alpha = _rescale_factor(m, m_safe, pr, c.exp2)  # (..., Hq, Lq)
        e = np.where(np.isneginf(sj), 0.0, _exp((sj, m_safe[..., None]), pr, c.exp2))
        l_sum = ra(ra(l_sum * alpha) + pr.sum(e))
        pj = pr.ri(rd(e))  # the unnormalised tile enters the P·V product in the intermediate dtype
        if keep is not None:
            pj = rd(pj * keep[..., j0 : j0 + c.block_k])
        acc = ra(ra(acc * alpha[..., None]) + pr.mm(pj, ve[..., j0 : j0 + c.block_k, :]))
        m = m_new
    with np.errstate(invalid="ignore", divide="ignore"):
        out = rd(ra(acc / l_sum[..., None]))
        lse = ra(np.where(np.isneginf(m), 0.0, m) + np.log(l_sum))
    return out, lse


_NO_BACKEND = "the twin emulates a low-precision kernel in NumPy; it has one implementation"


@takes_sdpa_options(refuses={"backend": _NO_BACKEND})
def sdpa_twin(
    q,
    k,
    v,
    *,
    dtype,
    accumulate="float32",
    reorder_ops=False,
    scale_at=None,
    exp2=False,
    recompute_p=False,
    block_k=None,
    intermediate_dtype=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    return_lse=False,
    **options,
):
    """SDPA as a kernel in ``dtype`` computes it: ``out (..., Hq, Lq, Dv)`` [, ``lse (..., Hq, Lq)``].

    ``options`` are :func:`refattn.sdpa`'s (mask, bias, causal, window, align, scale, softcap, sinks,
    dropout_p, dropout_mask, empty_rows); ``backend`` is refused.  Order of operations and roundings
    (``rd`` to ``dtype``, ``ra`` to ``accumulate``, ``ri`` to ``intermediate_dtype``)::

        q, k, v, bias, sinks = rd(·)
        q = rd(ra(q · ra(q_descale)))         fp8 descales (FA3), q_descale repeated over the GQA
        k = rd(ra(k · ra(k_descale)))         group; then the kv heads are repeated
        v = rd(ra(v · ra(v_descale)))
        s = rd(mm(rd(scale·q), kᵀ))          scale_at="q" (default; reorder_ops=False)
            rd(mm(q, rd(scale·k)ᵀ))          scale_at="k" (reorder_ops=True: flash-attn's ref)
            rd(scale · rd(mm(q, kᵀ)))        scale_at="scores" (scale applied to the scores)
        s = rd(c·rd(tanh(rd(s/c))))           softcap
        s = rd(s + bias); −inf where masked
        P = rd(ra(e / ra(Σ e + e_sink))), e = ra(exp(ra(s − m)))
            exp2=True: e = ra(exp2(ra(ra(s·log2 e) − ra(m·log2 e))))
        out = rd(mm(rd(ri(P)·keep/(1−p)), v))
            block_k=b: FA2's online softmax over key blocks of b (rescaled float accumulators,
            unnormalised ri(rd(e)) in the PV product, out = rd(acc / l))

    ``mm`` multiplies in the accumulation precision (BLAS in float32 for ``"float32"``).  ``lse``
    stays in the accumulation precision.  ``recompute_p`` changes only the backward
    (:func:`sdpa_twin_backward`).  With ``dtype="float64", accumulate="float64"`` the twin equals
    :func:`refattn.sdpa` up to float64 reassociation, whatever the choices (on the descaled inputs
    ``q·q_descale``, ``k·k_descale``, ``v·v_descale`` when descales are given, and without
    ``intermediate_dtype``).  :data:`TWIN_VARIANTS` names the coherent sets of choices
    (``scale_at``, ``exp2``, ``recompute_p``, ``block_k``) that the tolerance rules of
    :mod:`refattn.testing.compare` cover; ``intermediate_dtype`` and the descales describe the
    kernel's data path, the same for every variant.  FA3's fp8 test is ``dtype="bfloat16",
    intermediate_dtype="float8_e4m3", reorder_ops=True`` with its descales (``specs/lowp.md``).

    Parameters
    ----------
    q : array_like, shape (..., Hq, Lq, D)
        Queries as float64 values (rounded to ``dtype`` here; values already on its grid stay).
    k : array_like, shape (..., Hk, Lk, D)
        Keys; ``Hk`` divides ``Hq`` (GQA).
    v : array_like, shape (..., Hk, Lk, Dv)
        Values.
    dtype : str, dtype or Format
        The kernel's storage precision, as :func:`format_of` takes it (``"bfloat16"``, ``"fp16"``,
        ``torch.float8_e4m3fn``, ...).
    accumulate : {"float32", "float64"}, default "float32"
        The precision of products, sums and the softmax statistics (``ra``).
    reorder_ops : bool, default False
        flash-attn's ``reorder_ops``: the scale moves to k (implies ``scale_at="k"``; any other
        ``scale_at`` is refused).
    scale_at : {"q", "k", "scores"}, optional
        Where the scale is applied, as above.  Default None: ``"k"`` with ``reorder_ops``, else
        ``"q"``.
    exp2 : bool, default False
        Form the softmax exponent in base 2 with the scale folded into ``log2 e`` (FA2 on GPUs).
    recompute_p : bool, default False
        Backward only: P recomputed from the stored lse, ``Δ`` from the rounded output.
    block_k : int, optional
        A positive int: the forward is FA2's online softmax over key blocks of that size.
        Default None: one softmax over all keys.
    intermediate_dtype : str, dtype or Format, optional
        flash-attn (hopper) ``attention_ref``'s ``intermediate_dtype``: P, once rounded to
        ``dtype``, is rounded to this format before the P·V product (FA3's fp8 kernels feed P to
        the second product in fp8).  Default None: P enters the product in ``dtype``.
    q_descale : array_like, shape broadcastable to (..., Hk), optional
        FA3's fp8 query descale, ``(B, Hk)`` there: query head ``h`` of batch entry ``b`` is
        multiplied by ``q_descale[b, h // (Hq // Hk)]`` after its rounding to ``dtype``, the
        product rounded back to ``dtype``.  Finite.  Default None: no descale.
    k_descale : array_like, shape broadcastable to (..., Hk), optional
        The key descale, one factor per batch entry and kv head, as ``q_descale``.  Default None.
    v_descale : array_like, shape broadcastable to (..., Hk), optional
        The value descale, likewise.  Default None.
    return_lse : bool, default False
        Also return ``lse``.

    Returns
    -------
    out : ndarray of float64, shape (..., Hq, Lq, Dv)
        Values representable in ``dtype``.
    lse : ndarray of float64, shape (..., Hq, Lq)
        Only with ``return_lse=True``, as ``(out, lse)``: in the accumulation precision; ``-inf``
        on empty rows.

    Raises
    ------
    RefAttnError
        A bad shape, value or option; an unknown ``dtype``, ``accumulate``, ``intermediate_dtype``
        or ``scale_at``; ``reorder_ops`` with ``scale_at`` other than ``"k"``; ``block_k`` not a
        positive int; a descale that is not finite or does not broadcast to ``(..., Hk)`` (the
        message names it).
    """
    pr = _Precision(dtype, accumulate, intermediate_dtype)
    c = _choices(reorder_ops, scale_at, exp2, recompute_p, block_k)
    a = validate(q, k, v, **options)
    f = _twin_forward(a, pr, c, _descales(a, q_descale, k_descale, v_descale, pr.ra))
    return (f.out, f.lse) if return_lse else f.out


@takes_sdpa_options(refuses={"backend": _NO_BACKEND, "return_lse": BACKWARD_RETURN_LSE})
def sdpa_twin_backward(
    d_out,
    q,
    k,
    v,
    *,
    dtype,
    accumulate="float32",
    reorder_ops=False,
    scale_at=None,
    exp2=False,
    recompute_p=False,
    block_k=None,
    intermediate_dtype=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    d_lse=None,
    **options,
):
    """The backward a kernel in ``dtype`` computes (autograd of :func:`sdpa_twin`'s graph, every
    intermediate rounded to ``dtype``, products and row sums in ``accumulate``): :class:`SDPAGrads`.

    ``dP = rd(mm(dO, vᵀ))·keep``, ``Δ = ra(Σ P dP)``, ``ds = rd(P (dP − Δ + dlse))``
    [``· rd(1 − t²)``], ``dq = rd(scale · rd(mm(ds, k)))``, ``dk = rd(mm(dsᵀ, q_scaled))``
    (the scale on the other side with scale_at="k"; after the product with "scores"),
    ``dv = rd(mm(P̃ᵀ, dO))``; GQA groups summed in the accumulation precision.  With ``recompute_p``
    (what flash-style backward kernels do) ``P = rd(ra(exp(ra(s − lse))))`` is recomputed from the
    forward's lse (exp2 as in the forward) and ``Δ = ra(Σ dO ∘ out)`` from the forward's rounded
    output.  ``intermediate_dtype`` is straight-through: ``P̃ = rd(ri(P)·keep/(1−p))`` is the
    operand of ``dv`` as it was of the forward's product, ``dP`` passes the rounding unchanged and
    the softmax's Jacobian uses P.  Descales scale the inputs, so by the chain rule
    ``dq = rd(ra(dq' · q_descale))`` (``dq'`` the gradient of the descaled q; ``dk``, ``dv``
    likewise, after the GQA sum); the descales get no gradient (FA3 takes them as constants).  In
    float64 these are :func:`refattn.sdpa_backward`'s gradients (of the descaled inputs, chained).
    Rounding is piecewise constant, so this is not the derivative of :func:`sdpa_twin`: it is what
    a low-precision kernel computes, whose distance from the float64 gradient is the tolerance
    rules' gradient budget.  Options as :func:`sdpa_twin`'s (``backend`` and ``return_lse``
    refused).

    Parameters
    ----------
    d_out : array_like, shape (..., Hq, Lq, Dv)
        Cotangent of ``out``: exactly the output's shape, finite (rounded to ``dtype``).
    q, k, v : array_like
        As :func:`sdpa_twin`: ``(..., Hq, Lq, D)``, ``(..., Hk, Lk, D)``, ``(..., Hk, Lk, Dv)``.
    dtype, accumulate, reorder_ops, scale_at, exp2, recompute_p, block_k
        As :func:`sdpa_twin` (same defaults); ``recompute_p`` acts here.
    intermediate_dtype, q_descale, k_descale, v_descale
        As :func:`sdpa_twin` (default None each).
    d_lse : array_like, shape (..., Hq, Lq), optional
        Cotangent of ``lse`` (rounded to ``dtype``; 0 on empty rows).  Default None: no lse term.

    Returns
    -------
    SDPAGrads
        ``(dq, dk, dv, dbias, dsinks)``, float64 arrays of values representable in ``dtype``,
        each of its input's shape; ``dbias``/``dsinks`` None without bias/sinks.
    """
    pr = _Precision(dtype, accumulate, intermediate_dtype)
    rd, ra = pr.rd, pr.ra
    c = _choices(reorder_ops, scale_at, exp2, recompute_p, block_k)
    a = validate(q, k, v, **options)
    desc = _descales(a, q_descale, k_descale, v_descale, ra)
    f = _twin_forward(a, pr, c, desc)
    out_shape = a.score_shape[:-1] + (a.v.shape[-1],)
    d_o = rd(as_cotangent(d_out, out_shape, "d_out"))
    dl = np.zeros(f.lse.shape)
    if d_lse is not None:
        dl = np.where(f.empty, 0.0, rd(as_cotangent(d_lse, out_shape[:-1], "d_lse")))
    p, pd, p_sink = f.p, f.pd, f.p_sink
    if c.recompute_p:  # P from the stored lse, as the kernel's backward recomputes it
        live = ~f.empty[..., None]
        lse_safe = np.where(f.empty, 0.0, f.lse)[..., None]
        p = np.where(live & ~np.isneginf(f.s), rd(_exp((f.s, lse_safe), pr, c.exp2)), p)
        pd = _dropped(p, a, pr)
        if f.sink is not None:
            p_sink = np.where(f.empty, 0.0, _exp((f.sink, lse_safe[..., 0]), pr, c.exp2))
    dve = pr.mm(np.swapaxes(pd, -1, -2), d_o)  # (..., Hq, Lk, Dv)
    dp = rd(pr.mm(d_o, np.swapaxes(f.ve, -1, -2)))  # (..., Hq, Lq, Lk)
    if a.keep_scale is not None:
        dp = rd(dp * a.keep_scale)
    if c.recompute_p:  # Δ = Σ_j P dP = dO · out, from the forward's rounded output
        delta = pr.sum(d_o * f.out)  # (..., Hq, Lq); empty rows: as Σ P dP with the policy's fill
    else:
        delta = pr.sum(p * dp)  # (..., Hq, Lq)
    ds = rd(ra(p * ra(ra(dp - delta[..., None]) + dl[..., None])))
    if a.empty_rows == "uniform" and f.empty.any():
        ds = np.where(f.empty[..., None], 0.0, ds)
    dsinks = None
    if a.sinks is not None:
        dsinks = rd(unbroadcast(pr.sum(p_sink * (dl - delta), axis=-1), a.sinks.shape))
    dbias = None if a.bias is None else rd(unbroadcast(ds, a.bias.shape))
    if f.tanh is not None:
        ds = rd(ds * rd(1.0 - f.tanh**2))
    if c.scale_at == "k":  # s = q (scale k)ᵀ
        dq = rd(pr.mm(ds, f.ks))
        dke = rd(a.scale * rd(pr.mm(np.swapaxes(ds, -1, -2), f.qs)))
    elif c.scale_at == "q":  # s = (scale q) kᵀ
        dq = rd(a.scale * rd(pr.mm(ds, f.ks)))
        dke = rd(pr.mm(np.swapaxes(ds, -1, -2), f.qs))
    else:  # s = scale (q kᵀ)
        dq = rd(a.scale * rd(pr.mm(ds, f.ks)))
        dke = rd(a.scale * rd(pr.mm(np.swapaxes(ds, -1, -2), f.qs)))
    dk = rd(ra(reduce_kv(dke, a.groups)))
    dv = rd(ra(reduce_kv(dve, a.groups)))
    # the descales undone by the chain rule: x' = rd(ra(x · descale)) ⇒ dx = rd(ra(dx' · descale))
    if desc.q is not None:
        dq = rd(ra(dq * desc.q))  # (..., Hq, Lq, D)
    if desc.k is not None:
        dk = rd(ra(dk * desc.k))  # (..., Hk, Lk, D)
    if desc.v is not None:
        dv = rd(ra(dv * desc.v))  # (..., Hk, Lk, Dv)
    return SDPAGrads(unbroadcast(dq, a.q.shape), unbroadcast(dk, a.k.shape), unbroadcast(dv, a.v.shape), dbias, dsinks)


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
