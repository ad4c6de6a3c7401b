"""Run ``jax.nn.dot_product_attention`` (``implementation="xla"``) and judge it against refattn.

* :func:`translate_options` maps refattn's sdpa options to JAX's keyword arguments (its own
  ``is_causal``, ``local_window_size``, ``query_seq_lengths``, ``key_value_seq_lengths``, ``bias``,
  ``mask``, ``scale``; never an explicit mask built by refattn in their place), or raises
  :class:`~refattn.Unsupported` with every reason JAX cannot compute the call.
* :func:`jax_sdpa` runs it (op by op, or under ``jax.jit``) on inputs rounded to ``dtype`` and returns float64
  NumPy ``out`` [``lse``] and the ``jax.vjp`` gradients ``dq, dk, dv`` [``dbias``].
* :func:`check_jax` runs it and returns a :class:`refattn.adapters.peer.PeerVerdict` (a
  :class:`~refattn.testing.compare.Verdict`): the tolerance rule applied by
  :func:`refattn.testing.check_attention`, or ``"unsupported"`` with the reasons; it raises only
  what ``raise_on=`` asks for.

What JAX computes (``jax/_src/nn/functions.py``, ``dot_product_attention`` →
``_dot_product_attention_xla`` → ``_dot_product_attention_core``): logits ``einsum("BTNH,BSNH->BNTS")``
with ``preferred_element_type = promote(dtype, float32)``, ``· scale``, ``+ bias``; every masked
logit (``mask``, ``is_causal``: ``tril``, i.e. top-left; ``local_window_size``; the key and query
padding of the lengths) replaced by ``-0.7 · float32 max`` (``_get_large_negative``), a finite
fill; the softmax **always in float32** (also for float64 inputs), cast to the value dtype; the
output rows of padded queries multiplied by 0.  Hence:

* the verdict is given at the float32 rule for float64 inputs (and at the input dtype's for
  float16/bfloat16, coarser than float32); the report says so;
* a real query row without any allowed key averages every value (the fill makes its logits
  equal): that is refattn's ``empty_rows="uniform"``; with ``"zero"`` or ``"nan"`` such inputs are
  unsupported;
* JAX's ``lse`` (``return_residual``) of a row without keys (padded or empty) is the fill plus
  ``log Lk``, not ``-inf``: those rows' lse is set to ``-inf`` (refattn's convention) before it
  is judged, and the report says how many.

Float64 needs ``jax_enable_x64``: :func:`jax_sdpa` enables it for its own call only, through the
thread-local context manager ``jax.enable_x64(True)``; the global setting is never changed.

Axes as :func:`refattn.sdpa`: ``...`` batch, ``Hq``/``Hk`` query/kv heads, ``Lq``/``Lk`` lengths,
``D``/``Dv`` head dims; JAX's layout is BTNH (``refattn.adapters.layout``), its batch one axis
(refattn's batch dims are flattened into it).  JAX is imported when a function runs (a
:class:`~refattn.RefAttnError` without it).
"""

from __future__ import annotations

import math

import numpy as np

from refattn import lowp
from refattn._validate import RefAttnError, Unsupported, check_keywords_of, unbroadcast
from refattn.adapters.peer import PeerVerdict, finish, rounded_inputs
from refattn.attention.options import takes_sdpa_options
from refattn.attention.sdpa import validate
from refattn.testing.compare import check_attention

__all__ = ["DTYPES", "SOFTMAX_DTYPE", "check_jax", "jax_sdpa", "judged_dtype", "translate_options"]

#: The input dtypes :func:`jax_sdpa` runs (``jax.nn.dot_product_attention`` on CPU and GPU).
DTYPES = ("float64", "float32", "float16", "bfloat16")
#: The precision of JAX's softmax, whatever the inputs' (``_dot_product_attention_core``:
#: ``padded_logits.astype(np.float32)``).
SOFTMAX_DTYPE = "float32"
_SOFTMAX_NOTE = (
    "jax.nn.dot_product_attention computes its softmax in float32 whatever the input dtype "
    "(jax/_src/nn/functions.py, _dot_product_attention_core: padded_logits.astype(np.float32))"
)
_NO_BACKEND = "the candidate is jax.nn.dot_product_attention, not a refattn backend"
_REFUSED = {"backend": _NO_BACKEND}


def _jax():
    try:
        import jax
        import jax.numpy as jnp
    except ImportError as exc:  # pragma: no cover - exercised only without jax
        raise RefAttnError("refattn.adapters.jax needs JAX: pip install 'refattn[jax]'") from exc
    return jax, jnp


def judged_dtype(dtype):
    """The precision a JAX result computed from ``dtype`` inputs is judged at: the coarser of
    ``dtype`` and float32 (:data:`SOFTMAX_DTYPE`), since JAX's softmax is float32.

    Parameters
    ----------
    dtype : str, dtype or Format
        The inputs' dtype (:func:`refattn.lowp.format_of`).

    Returns
    -------
    str
        ``"float32"`` for float64 and float32 inputs, else the dtype's name.
    """
    fmt = lowp.format_of(dtype)
    return SOFTMAX_DTYPE if fmt.fraction_bits >= lowp.format_of(SOFTMAX_DTYPE).fraction_bits else fmt.name


def _reasons(a):
    """Every reason JAX cannot compute the validated sdpa call ``a``."""
    why = []
    if a.v.shape[-1] != a.q.shape[-1]:
        why.append(
            f"v: jax.nn.dot_product_attention needs values of the keys' shape (Dv = D = {a.q.shape[-1]}), "
            f"got Dv = {a.v.shape[-1]}"
        )
    if a.softcap is not None:
        why.append("softcap: jax.nn.dot_product_attention has no logit soft-capping")
    if a.sinks is not None:
        why.append("sinks: jax.nn.dot_product_attention has no attention sinks")
    if a.keep_scale is not None:
        why.append("dropout_mask: jax.nn.dot_product_attention has no dropout")
    if a.chunk is not None:
        why.append("chunk: jax.nn.dot_product_attention has no chunked attention")
    if a.sink_tokens and a.window[0] is not None:
        why.append("sink_tokens: jax.nn.dot_product_attention's local_window_size exempts no sink tokens")
    if np.any(a.seqs.k_starts != 0):
        why.append("k_starts: jax.nn.dot_product_attention has no key start (left padding); only key_value_seq_lengths")
    structured = a.causal or a.window != (None, None)
    if structured and np.any(a.seqs.offsets != 0):
        offsets = sorted({int(o) for o in np.ravel(a.seqs.offsets)})
        why.append(
            f"align: JAX's is_causal (tril) and local_window_size put query i at key i (top-left, offset 0), "
            f"this call's offsets are {offsets[:5]}"
        )
    why += _empty_row_reasons(a)
    return why


def _empty_row_reasons(a):
    """Rows JAX fills differently from refattn's ``empty_rows`` policy (module docstring)."""
    allowed = a.allowed
    if allowed is None and a.bias is None:
        return []
    shape = a.score_shape
    allowed = np.ones(shape[-2:], bool) if allowed is None else np.broadcast_to(allowed, shape)
    real = np.ones(shape[:-1], bool)
    if a.padded_rows is not None:
        real = real & ~np.broadcast_to(a.padded_rows, shape[:-1])
    why = []
    empty = real & ~allowed.any(axis=-1)
    if empty.any() and a.empty_rows != "uniform":
        why.append(
            f"empty_rows={a.empty_rows!r}: {int(empty.sum())} real query rows have no allowed key; JAX fills "
            "masked logits with -0.7·float32 max (_get_large_negative), so such a row averages every value: "
            "refattn's empty_rows='uniform'"
        )
    if a.bias is not None:
        finite = allowed & np.isfinite(np.broadcast_to(a.bias, shape))
        only_bias = real & allowed.any(axis=-1) & ~finite.any(axis=-1)
        if only_bias.any():
            why.append(
                f"bias: {int(only_bias.sum())} query rows have bias -inf at every allowed key; JAX's softmax then "
                "gives NaN or averages the masked keys (the -inf is not its mask fill)"
            )
    return why


def _flat_batch(a):
    """The batch shape ``...`` and its size (JAX's B; 1 for no batch dims)."""
    batch = tuple(a.score_shape[:-3])
    return batch, int(math.prod(batch))


def _to_btnh(x, batch, n):
    """``(..., H, L, E)`` broadcast to the batch shape, flattened to ``(B, L, H, E)``."""
    x = np.broadcast_to(x, batch + x.shape[-3:]).reshape((n,) + x.shape[-3:])
    return np.swapaxes(x, 1, 2)


def _from_btnh(x, batch):
    """JAX's ``(B, L, H, E)`` back to ``(..., H, L, E)``."""
    return np.swapaxes(x, 1, 2).reshape(batch + (x.shape[2], x.shape[1], x.shape[3]))


def _scores_array(x, batch, n):
    """A mask or bias broadcastable to ``(..., Hq, Lq, Lk)`` as a 4-D array JAX broadcasts to
    ``(B, N, T, S)``: as it is when it has at most one batch dim, else its batch flattened."""
    x = np.asarray(x)
    if x.ndim <= 4 and len(batch) <= 1:
        return x
    x = x.reshape((1,) * max(0, 3 - x.ndim) + x.shape)
    return np.broadcast_to(x, batch + x.shape[-3:]).reshape((n,) + x.shape[-3:])


def _lengths(x, batch, n):
    """Per-sequence lengths broadcast to the batch shape, as JAX's int32 ``(B,)``."""
    return np.broadcast_to(np.asarray(x, dtype=np.int32), batch).reshape(n)


def _translate(a, options):
    """JAX keyword arguments (NumPy arrays) of a validated call, or Unsupported with every reason."""
    why = _reasons(a)
    if why:
        raise Unsupported("; ".join(why))
    batch, n = _flat_batch(a)
    lq, lk = a.score_shape[-2:]
    kw = {"scale": float(a.scale)}
    if a.causal:
        kw["is_causal"] = True
    if a.window != (None, None):
        reach = lq + lk  # no key is further than this from any query: an unbounded side
        left, right = a.window
        kw["local_window_size"] = (reach if left is None else int(left), reach if right is None else int(right))
    if options.get("q_lengths") is not None:
        kw["query_seq_lengths"] = _lengths(a.seqs.q_lengths, batch, n)
    if options.get("k_lengths") is not None:
        kw["key_value_seq_lengths"] = _lengths(a.seqs.k_lengths, batch, n)
    if a.user_mask is not None:
        kw["mask"] = _scores_array(a.user_mask, batch, n)
    if a.bias is not None:
        kw["bias"] = _scores_array(a.bias, batch, n)
    return kw


@takes_sdpa_options(refuses=_REFUSED)
def translate_options(q, k, v, **options):
    """refattn sdpa options → keyword arguments of ``jax.nn.dot_product_attention`` (NumPy arrays;
    the layout change of q, k, v is :func:`jax_sdpa`'s); raises :class:`~refattn.Unsupported` with
    every reason JAX cannot compute the call.

    ``scale`` is always given; ``causal`` → ``is_causal=True`` and ``window=(left, right)`` →
    ``local_window_size=(left, right)`` (a None side: ``Lq + Lk``, further than any key), both only
    at offset 0 (JAX is top-left); ``q_lengths``/``k_lengths`` → ``query_seq_lengths`` /
    ``key_value_seq_lengths`` (int32, one per flattened batch entry); ``mask`` and ``bias`` → JAX's
    ``mask`` and ``bias`` (4-D, the batch dims flattened when there are several).  GQA needs no
    argument (JAX groups query head i with kv head ``i // (Hq // Hk)``, as refattn).  ``backend`` is
    refused.

    Parameters
    ----------
    q : array_like, shape (..., Hq, Lq, D)
        Queries (validated as sdpa validates them).
    k : array_like, shape (..., Hk, Lk, D)
        Keys.
    v : array_like, shape (..., Hk, Lk, Dv)
        Values.

    Returns
    -------
    dict
        ``scale`` and, as needed, ``is_causal``, ``local_window_size``, ``query_seq_lengths``,
        ``key_value_seq_lengths``, ``mask``, ``bias``.

    Raises
    ------
    Unsupported
        ``softcap``, ``sinks``, ``dropout_mask``, ``chunk``, ``sink_tokens`` (with a left window
        side), ``k_starts``, an alignment offset other than 0 under causal/window, real rows without
        keys unless ``empty_rows="uniform"``, rows whose every allowed key has bias ``-inf``.
    """
    return _translate(validate(q, k, v, **_sdpa_only(options)), options)


def _sdpa_only(options):
    return {n: x for n, x in options.items() if n != "return_lse"}


def _dtype_of(jnp, name):
    return {"float64": jnp.float64, "float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}[name]


def _run(jax, jnp, arrays, kw, jdt, want_lse, d_out, jit):
    """JAX's forward [lse] and vjp on BTNH arrays (q, k, v[, bias])."""
    static = {n: x for n, x in kw.items() if n not in ("bias", "mask", "query_seq_lengths", "key_value_seq_lengths")}
    if "local_window_size" in static:
        static["local_window_size"] = tuple(static["local_window_size"])
    fixed = {n: jnp.asarray(kw[n]) for n in ("mask", "query_seq_lengths", "key_value_seq_lengths") if n in kw}
    primals = [jnp.asarray(x, dtype=jdt) for x in arrays]

    def attention(q, k, v, bias=None, residual=False):
        return jax.nn.dot_product_attention(
            q, k, v, bias, implementation="xla", return_residual=residual, **fixed, **static
        )

    compiled = jax.jit if jit else (lambda f: f)
    out, vjp = jax.vjp(compiled(attention), *primals)
    result = {"out": out}
    if want_lse:
        result["lse"] = compiled(lambda *p: attention(*p, residual=True)[1])(*primals)
    if d_out is not None:
        grads = vjp(jnp.asarray(d_out, dtype=jdt))
        result.update(zip(("dq", "dk", "dv", "dbias"), grads))
    return {n: np.asarray(x).astype(np.float64) for n, x in result.items()}


@takes_sdpa_options(refuses=_REFUSED)
def jax_sdpa(q, k, v, *, dtype="float64", d_out=None, jit=False, **options):
    """``jax.nn.dot_product_attention(..., implementation="xla")`` (op by op, or under ``jax.jit``) on refattn's
    inputs and options (translated by :func:`translate_options`), with ``jax.vjp`` gradients.

    The inputs, ``bias`` and ``d_out`` are rounded to ``dtype`` in float64 (one rounding:
    :func:`refattn.lowp.round_to`) and then converted, exactly, to JAX arrays of ``dtype``;
    float64 runs inside ``jax.enable_x64(True)`` (thread-local; the global setting is untouched).
    ``return_lse=True`` also returns JAX's ``return_residual`` lse.  ``backend`` is refused.

    Parameters
    ----------
    q : array_like, shape (..., Hq, Lq, D)
        Queries (float64 values).
    k : array_like, shape (..., Hk, Lk, D)
        Keys; ``Hk`` divides ``Hq``.
    v : array_like, shape (..., Hk, Lk, Dv)
        Values.
    dtype : {"float64", "float32", "float16", "bfloat16"}, default "float64"
        The JAX arrays' dtype (:data:`DTYPES`; aliases as :func:`refattn.lowp.format_of`).
    d_out : array_like, shape (..., Hq, Lq, Dv), optional
        Cotangent of ``out``: with it the gradients are computed.  Default None: forward only.
    jit : bool, default False
        Run under ``jax.jit`` (XLA compiles the whole call) instead of op by op.  On CPU, float16
        under jit raises in JAX itself: its fallback for the dot precision ``F16_F16_F32`` (which
        the CPU lacks) is a ``try`` around the traced einsum, which only eager execution reaches.

    Returns
    -------
    dict of str to ndarray
        float64 NumPy arrays in refattn's layout: ``"out"`` ``(..., Hq, Lq, Dv)``; ``"lse"``
        ``(..., Hq, Lq)`` with ``return_lse`` (JAX's values: finite on rows without keys); with
        ``d_out`` also ``"dq"``, ``"dk"``, ``"dv"`` and, with a ``bias``, ``"dbias"`` of bias's shape.

    Raises
    ------
    Unsupported
        What :func:`translate_options` refuses, or a dtype outside :data:`DTYPES`.
    """
    name = _dtype_name(dtype)
    want_lse = bool(options.get("return_lse", False))
    a = validate(q, k, v, **_sdpa_only(options))
    kw = _translate(a, options)
    jax, jnp = _jax()
    batch, n = _flat_batch(a)
    rounded = lowp.round_arrays({"q": a.q, "k": a.k, "v": a.v}, name)
    arrays = [_to_btnh(rounded[x], batch, n) for x in ("q", "k", "v")]
    if "bias" in kw:
        arrays.append(lowp.round_to(kw.pop("bias"), name))
    d = None
    if d_out is not None:
        d = _to_btnh(lowp.round_to(np.broadcast_to(d_out, a.score_shape[:-1] + (a.v.shape[-1],)), name), batch, n)
    with jax.enable_x64(name == "float64"):
        got = _run(jax, jnp, arrays, kw, _dtype_of(jnp, name), want_lse, d, jit)
    hq, lq = a.score_shape[-3:-1]
    outputs = {"out": _from_btnh(got["out"], batch)}
    if want_lse:
        outputs["lse"] = np.swapaxes(got["lse"], 1, 2).reshape(batch + (hq, lq))
    for g in ("dq", "dk", "dv"):
        if g in got:
            outputs[g] = _from_btnh(got[g], batch)
    if "dbias" in got:
        dbias = got["dbias"]
        bias_shape = np.shape(options["bias"])
        if dbias.shape != bias_shape:  # a flattened batch: back to the batch dims, then bias's shape
            dbias = unbroadcast(dbias.reshape(batch + dbias.shape[1:]), bias_shape)
        outputs["dbias"] = dbias
    return outputs


def _dtype_name(dtype):
    name = lowp.format_of(dtype).name
    if name not in DTYPES:
        raise Unsupported(_dtype_reason(name))
    return name


def _dtype_reason(name):
    return f"dtype={name!r}: refattn.adapters.jax runs {', '.join(DTYPES)} inputs"


def _rows_without_keys(a):
    """bool ``(..., Hq, Lq)``: rows with no allowed key (padded or empty), or None when none."""
    if a.allowed is None:
        return None
    rows = ~np.broadcast_to(a.allowed, a.score_shape).any(axis=-1)
    return rows if rows.any() else None


@takes_sdpa_options(refuses=_REFUSED)
def check_jax(q, k, v, *, dtype="float64", d_out=None, jit=False, rule="flash", seed=0, raise_on=(), **options):
    """Run :func:`jax_sdpa` and judge it: a :class:`refattn.adapters.peer.PeerVerdict` over ``out``,
    ``dq``, ``dk``, ``dv`` [``dbias``, ``lse``], or ``"unsupported"`` with the reasons.

    The golden and the twins are computed on the inputs (and ``bias``) rounded to ``dtype``, what
    JAX received, by :func:`refattn.testing.check_attention` at :func:`judged_dtype` (float32 for
    float64 inputs: JAX's softmax is float32; the report's notes say so).  With
    ``return_lse=True`` JAX's lse is judged too, after its rows without keys are set to ``-inf``
    (refattn's convention; JAX returns its fill value there).  Options as :func:`jax_sdpa`'s
    (``backend`` refused).

    Parameters
    ----------
    q : array_like, shape (..., Hq, Lq, D)
        Queries (float64 values).
    k : array_like, shape (..., Hk, Lk, D)
        Keys; ``Hk`` divides ``Hq``.
    v : array_like, shape (..., Hk, Lk, Dv)
        Values.
    dtype : {"float64", "float32", "float16", "bfloat16"}, default "float64"
        The dtype JAX computes in (:data:`DTYPES`).
    d_out : array_like, shape (..., Hq, Lq, Dv), optional
        Cotangent of ``out`` for the gradients.  Default None: a standard normal one drawn with
        ``seed`` (gradients are always judged).
    jit : bool, default False
        Run under ``jax.jit`` (:func:`jax_sdpa`).
    rule : {"flash", "torch", "allclose"}, default "flash"
        The tolerance rule (:func:`refattn.testing.check_attention`).
    seed : int, default 0
        Seed of the random ``d_out`` (``numpy.random.default_rng``).
    raise_on : str or iterable of str, default ()
        ``"unsupported"`` and/or ``"mismatch"``: raise :class:`~refattn.Unsupported` or
        :class:`refattn.testing.AttentionMismatch` instead of returning such a verdict
        (:func:`refattn.adapters.peer.finish`).  Default (): raise nothing.

    Returns
    -------
    PeerVerdict
        ``status`` ``"pass"``, ``"FAIL"`` or ``"unsupported"``; ``report()`` explains.
    """
    name = lowp.format_of(dtype).name
    judged = judged_dtype(name)
    peer = f"jax.nn.dot_product_attention (xla) {name}"
    notes = [_SOFTMAX_NOTE + f": judged at the {judged} rule"]
    a = validate(q, k, v, **_sdpa_only(options))
    why = ([] if name in DTYPES else [_dtype_reason(name)]) + _reasons(a)
    if why:
        return finish(PeerVerdict([], peer=peer, unsupported=why, notes=notes), raise_on)
    if d_out is None:
        d_out = np.random.default_rng(seed).standard_normal(a.score_shape[:-1] + (a.v.shape[-1],))
    outputs = jax_sdpa(q, k, v, dtype=name, d_out=d_out, jit=jit, **options)
    lse = outputs.get("lse")
    rows = _rows_without_keys(a)
    if lse is not None and rows is not None:
        lse = np.where(rows, -np.inf, lse)
        notes.append(f"lse of {int(rows.sum())} rows without keys set to -inf (JAX returns its fill value there)")
    q, k, v, opts = rounded_inputs(q, k, v, options, name)
    grads = {g: outputs[g] for g in ("dq", "dk", "dv", "dbias") if g in outputs}
    d = lowp.round_to(d_out, name)
    verdict = check_attention(outputs["out"], q, k, v, dtype=judged, lse=lse, grads=grads, d_out=d, rule=rule, **opts)
    return finish(PeerVerdict(verdict.judgements, peer=peer, notes=notes), raise_on)


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
