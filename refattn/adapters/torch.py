"""Run PyTorch attention (CPU or CUDA, any dtype) and judge it against refattn.

* :func:`torch_sdpa` runs ``F.scaled_dot_product_attention`` with refattn's options translated
  (refattn's bool ``mask`` is True = keep, as torch's bool ``attn_mask``; causal/window with either
  alignment become an explicit mask unless plain ``is_causal`` means the same; ``bias`` joins the mask
  as a float ``attn_mask`` whose gradient is ``dbias``; GQA via ``enable_gqa``) and returns
  float64 NumPy outputs and autograd gradients.
* :func:`run_callable` does the same for any function of torch tensors ``(q, k, v) -> out``.
* :func:`check_torch` / :func:`check_callable` run one and return the
  :class:`refattn.testing.compare.Verdict` of the tolerance rule for the tensor dtype.
* :func:`mha_params` / :func:`mha_param_grads` read an ``nn.MultiheadAttention``'s weights (and
  their ``.grad``) as :class:`refattn.MHAParams`; :func:`check_mha` runs the module (batch-first,
  any dtype and device) and judges its output and input gradients against
  :func:`refattn.multihead_attention` on its own weights.

Options torch SDPA has no form for (softcap, sinks, dropout with an explicit keep-mask, the
``"nan"``/``"uniform"`` empty-row policies) raise :class:`Unsupported`.

Axes as :func:`refattn.sdpa`: ``...`` batch, ``Hq``/``Hk`` query/kv heads, ``Lq``/``Lk`` lengths,
``D``/``Dv`` head dims; for ``nn.MultiheadAttention``, ``B`` batch, ``L`` length, ``E`` embedding.
PyTorch is imported when a function runs (a :class:`~refattn.RefAttnError` without it).
"""

from __future__ import annotations

import numpy as np

from refattn import lowp
from refattn._validate import RefAttnError, Unsupported, check_keywords_of, unbroadcast
from refattn.adapters.peer import rounded_inputs
from refattn.attention.multihead import MHAParams, multihead_attention, multihead_attention_backward
from refattn.attention.options import takes_sdpa_options
from refattn.attention.sdpa import validate
from refattn.testing.compare import Verdict, check_attention, judge

__all__ = [
    "Unsupported",
    "check_callable",
    "check_mha",
    "check_torch",
    "mha_param_grads",
    "mha_params",
    "run_callable",
    "torch_dtype",
    "torch_sdpa",
    "translate_options",
]


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - exercised only without torch
        raise RefAttnError("refattn.adapters.torch needs PyTorch: pip install 'refattn[torch]'") from exc
    return torch


def torch_dtype(dtype):
    """The torch dtype of a refattn format.

    Parameters
    ----------
    dtype : str, dtype or Format
        A format as :func:`refattn.lowp.format_of` takes it (``"bfloat16"``, ``"fp16"``,
        ``"float8_e4m3"``, ``torch.float32``, ...).

    Returns
    -------
    torch.dtype
        ``torch.float64`` ... ``torch.float8_e5m2``; ``"float8_e4m3"`` is ``torch.float8_e4m3fn``.
    """
    torch = _torch()
    name = lowp.format_of(dtype).name
    return {"float8_e4m3": torch.float8_e4m3fn}.get(name) or getattr(torch, name)


_NO_BACKEND = "the candidate is PyTorch's F.scaled_dot_product_attention, not a refattn backend"
_NO_LSE = "F.scaled_dot_product_attention returns no lse"
_REFUSED = {"return_lse": _NO_LSE, "backend": _NO_BACKEND}


@takes_sdpa_options(refuses=_REFUSED)
def translate_options(q, k, v, **options):
    """refattn sdpa options → keyword arguments of ``F.scaled_dot_product_attention`` (NumPy arrays
    for ``attn_mask``); raises :class:`Unsupported` for what SDPA cannot express.

    ``scale`` is always given (sdpa's default ``1/sqrt(D)`` made explicit); ``enable_gqa=True``
    when ``Hq != Hk``; plain ``causal`` with offset 0 (top-left, or ``Lq == Lk``) and no other
    mask or bias becomes ``is_causal=True``; otherwise the allowed set (mask ∧ causal ∧ window,
    either alignment) becomes a bool ``attn_mask`` (True = take part, refattn's polarity), and a
    ``bias`` a float ``attn_mask = where(allowed, bias, -inf)``.  The options are
    :func:`refattn.sdpa`'s; ``return_lse`` and ``backend`` are refused.

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
        ``scale`` and, as needed, ``enable_gqa``, ``is_causal`` or ``attn_mask`` (an ndarray of
        bool or float64, broadcastable to ``(..., Hq, Lq, Lk)``).

    Raises
    ------
    Unsupported
        ``softcap``, ``sinks``, ``dropout_mask`` or ``empty_rows`` other than ``"zero"``.
    """
    a = validate(q, k, v, **options)
    if a.softcap is not None:
        raise Unsupported("softcap: torch SDPA has no logit soft-capping")
    if a.sinks is not None:
        raise Unsupported("sinks: torch SDPA has no attention sinks")
    if a.keep_scale is not None:
        raise Unsupported("dropout_mask: torch SDPA draws its own dropout mask (no explicit keep-mask)")
    if a.empty_rows != "zero":
        raise Unsupported(f"empty_rows={a.empty_rows!r}: torch SDPA gives zeros on fully masked rows")
    kw = {"scale": a.scale}
    if a.groups > 1:
        kw["enable_gqa"] = True
    lq, lk = a.score_shape[-2:]
    only_causal = a.window == (None, None) and a.chunk is None and not a.seqs.padded and a.user_mask is None
    plain_causal = a.causal and only_causal and not np.any(a.seqs.offsets)
    if plain_causal and a.bias is None:
        kw["is_causal"] = True  # top-left alignment: torch's is_causal
    elif a.bias is not None:
        kw["attn_mask"] = a.bias if a.allowed is None else np.where(a.allowed, a.bias, -np.inf)
    elif a.allowed is not None:
        kw["attn_mask"] = np.broadcast_to(a.allowed, np.broadcast_shapes(a.allowed.shape, (lq, lk)))
    return kw


def _tensor(torch, x, dtype, device, grad):
    t = torch.tensor(np.asarray(x, dtype=np.float64), device=device).to(dtype)
    return t.requires_grad_(grad)


def _numpy(t):
    return None if t is None else t.detach().to("cpu", dtype=_torch().float64).numpy()


def run_callable(fn, q, k, v, *, dtype="float64", device="cpu", d_out=None, bias=None, **fn_kwargs):
    """``fn(q, k, v, **fn_kwargs) -> out`` on torch tensors of ``dtype`` on ``device``; returns a dict
    of float64 arrays: ``out`` and, with a cotangent ``d_out``, ``dq``, ``dk``, ``dv`` (``dbias`` when
    a ``bias`` tensor is passed to ``fn`` as ``attn_mask``).

    The inputs are converted to float64 tensors, then to ``dtype`` (the conversion rounds them);
    with ``d_out`` they require grad and ``out.backward(d_out)`` runs.

    Parameters
    ----------
    fn : callable
        ``fn(q, k, v, **fn_kwargs)`` on torch tensors, returning the output tensor
        ``(..., Hq, Lq, Dv)``.
    q : array_like, shape (..., Hq, Lq, D)
        Queries (float64 values).
    k : array_like, shape (..., Hk, Lk, D)
        Keys.
    v : array_like, shape (..., Hk, Lk, Dv)
        Values.
    dtype : str, dtype or Format, default "float64"
        The tensors' dtype (:func:`torch_dtype`).
    device : str or torch.device, default "cpu"
        Where the tensors live (``"cuda"``, ...).
    d_out : array_like, shape of the output, optional
        Cotangent of ``out``: with it the gradients are computed.  Default None: forward only.
    bias : array_like, broadcastable to (..., Hq, Lq, Lk), optional
        Passed to ``fn`` as ``attn_mask``: a float array as a tensor of ``dtype`` (its gradient is
        ``dbias``), a bool array as a bool tensor (True = take part; no gradient).  Default None.
    **fn_kwargs
        More keyword arguments of ``fn`` (``is_causal=True``, ``scale=...``).

    Returns
    -------
    dict of str to ndarray
        float64 NumPy arrays: ``"out"``; with ``d_out`` also ``"dq"``, ``"dk"``, ``"dv"`` and, for a
        float ``bias``, ``"dbias"`` (the full ``attn_mask`` shape).
    """
    torch = _torch()
    tdt = torch_dtype(dtype)
    grad = d_out is not None
    tq, tk, tv = (_tensor(torch, x, tdt, device, grad) for x in (q, k, v))
    if bias is not None:
        if np.asarray(bias).dtype == bool:
            fn_kwargs["attn_mask"] = torch.tensor(np.asarray(bias), device=device)
            bias = None
        else:
            tb = _tensor(torch, bias, tdt, device, grad)
            fn_kwargs["attn_mask"] = tb
    out = fn(tq, tk, tv, **fn_kwargs)
    outputs = {"out": _numpy(out)}
    if grad:
        out.backward(_tensor(torch, d_out, tdt, device, False))
        outputs.update(dq=_numpy(tq.grad), dk=_numpy(tk.grad), dv=_numpy(tv.grad))
        if bias is not None:
            outputs["dbias"] = _numpy(tb.grad)
    return outputs


@takes_sdpa_options(refuses=_REFUSED)
def torch_sdpa(q, k, v, *, dtype="float64", device="cpu", d_out=None, **options):
    """``F.scaled_dot_product_attention`` on refattn's inputs and options; outputs as :func:`run_callable`.
    The inputs are rounded to ``dtype`` by the conversion to torch.  ``return_lse`` and ``backend`` are
    refused.

    The options are :func:`refattn.sdpa`'s, translated by :func:`translate_options` (which raises
    :class:`Unsupported` for softcap, sinks, an explicit dropout keep-mask and the ``"nan"`` and
    ``"uniform"`` empty-row policies).

    Parameters
    ----------
    q : array_like, shape (..., Hq, Lq, D)
        Queries (float64 values).
    k : array_like, shape (..., Hk, Lk, D)
        Keys; ``Hk`` divides ``Hq`` (GQA through ``enable_gqa``).
    v : array_like, shape (..., Hk, Lk, Dv)
        Values.
    dtype : str, dtype or Format, default "float64"
        The tensors' dtype (:func:`torch_dtype`).
    device : str or torch.device, default "cpu"
        Where the tensors live.
    d_out : array_like, shape (..., Hq, Lq, Dv), optional
        Cotangent of ``out``: with it the gradients are computed.  Default None: forward only.

    Returns
    -------
    dict of str to ndarray
        float64 NumPy arrays: ``"out"`` ``(..., Hq, Lq, Dv)``; with ``d_out`` also ``"dq"``,
        ``"dk"``, ``"dv"`` and, with a ``bias``, ``"dbias"`` of bias's shape (0 at disallowed
        entries).
    """
    torch = _torch()
    kw = translate_options(q, k, v, **options)
    mask = kw.pop("attn_mask", None)
    outputs = run_callable(
        torch.nn.functional.scaled_dot_product_attention,
        q,
        k,
        v,
        dtype=dtype,
        device=device,
        d_out=d_out,
        bias=mask,
        **kw,
    )
    if "dbias" in outputs and options.get("bias") is not None:
        dbias = np.where(np.isfinite(outputs["dbias"]), outputs["dbias"], 0.0)  # the mask's full shape
        outputs["dbias"] = unbroadcast(dbias, np.shape(options["bias"]))
    else:
        outputs.pop("dbias", None)
    return outputs


def check_callable(fn, q, k, v, *, dtype="float64", device="cpu", d_out=None, rule="flash", options=None, **fn_kwargs):
    """Run ``fn`` (as :func:`run_callable`) and judge it against refattn for the sdpa ``options`` it
    is meant to compute; returns the :class:`refattn.testing.compare.Verdict`.

    The golden and the twins are computed on the inputs (and a float ``bias`` of ``options``)
    rounded to ``dtype``, what the candidate received; :func:`refattn.testing.check_attention`
    judges ``out`` and, with ``d_out``, ``dq``, ``dk``, ``dv``.

    Parameters
    ----------
    fn : callable
        ``fn(q, k, v, **fn_kwargs)`` on torch tensors, returning ``out`` ``(..., Hq, Lq, Dv)``.
    q : array_like, shape (..., Hq, Lq, D)
        Queries (float64 values).
    k : array_like, shape (..., Hk, Lk, D)
        Keys.
    v : array_like, shape (..., Hk, Lk, Dv)
        Values.
    dtype : str, dtype or Format, default "float64"
        The tensors' dtype, and the precision the candidate is judged at.
    device : str or torch.device, default "cpu"
        Where the tensors live.
    d_out : array_like, shape (..., Hq, Lq, Dv), optional
        Cotangent of ``out``: with it the gradients are judged too.  Default None.
    rule : {"flash", "torch", "allclose"}, default "flash"
        The tolerance rule (:func:`refattn.testing.check_attention`).
    options : dict, optional
        The :func:`refattn.sdpa` options ``fn`` is meant to compute (``{"causal": True}``); they
        define the golden only: pass ``fn`` its own arguments through ``fn_kwargs``.  Default
        None: none.
    **fn_kwargs
        Keyword arguments of ``fn`` (and ``bias``, as :func:`run_callable` takes it).

    Returns
    -------
    Verdict
        The :class:`refattn.testing.compare.Verdict` over ``out`` [and ``dq``, ``dk``, ``dv``].
    """
    options = dict(options or {})
    outputs = run_callable(fn, q, k, v, dtype=dtype, device=device, d_out=d_out, **fn_kwargs)
    q, k, v, options = rounded_inputs(q, k, v, options, dtype)
    grads = {n: outputs[n] for n in ("dq", "dk", "dv") if n in outputs}
    d = None if d_out is None else lowp.round_to(d_out, dtype)
    return check_attention(outputs["out"], q, k, v, dtype=dtype, grads=grads or None, d_out=d, rule=rule, **options)


@takes_sdpa_options(refuses=_REFUSED)
def check_torch(q, k, v, *, dtype="float64", device="cpu", d_out=None, rule="flash", **options):
    """Run :func:`torch_sdpa` and judge it: a :class:`refattn.testing.compare.Verdict`.  Options as
    :func:`torch_sdpa`'s (``return_lse`` and ``backend`` refused).

    The golden and the twins are computed on the inputs (and ``bias``) rounded to ``dtype``, what
    PyTorch received; ``out`` and, with ``d_out``, ``dq``, ``dk``, ``dv`` [``dbias``] are judged.

    Parameters
    ----------
    q : array_like, shape (..., Hq, Lq, D)
        Queries (float64 values).
    k : array_like, shape (..., Hk, Lk, D)
        Keys; ``Hk`` divides ``Hq``.
    v : array_like, shape (..., Hk, Lk, Dv)
        Values.
    dtype : str, dtype or Format, default "float64"
        The tensors' dtype, and the precision PyTorch is judged at.
    device : str or torch.device, default "cpu"
        Where the tensors live.
    d_out : array_like, shape (..., Hq, Lq, Dv), optional
        Cotangent of ``out``: with it the gradients are judged too.  Default None.
    rule : {"flash", "torch", "allclose"}, default "flash"
        The tolerance rule (:func:`refattn.testing.check_attention`).

    Returns
    -------
    Verdict
        The :class:`refattn.testing.compare.Verdict` over ``out`` [and the gradients].
    """
    outputs = torch_sdpa(q, k, v, dtype=dtype, device=device, d_out=d_out, **options)
    q, k, v, options = rounded_inputs(q, k, v, options, dtype)
    grads = {n: outputs[n] for n in ("dq", "dk", "dv", "dbias") if n in outputs}
    d = None if d_out is None else lowp.round_to(d_out, dtype)
    return check_attention(outputs["out"], q, k, v, dtype=dtype, grads=grads or None, d_out=d, rule=rule, **options)


def mha_params(mha):
    """An ``nn.MultiheadAttention``'s weights as :class:`refattn.MHAParams` (float64 NumPy, ``x @ W``).

    ``w_q = in_proj_weight[:E].T`` (or ``q_proj_weight.T`` when kdim/vdim differ), ``w_k`` and
    ``w_v`` likewise, ``w_o = out_proj.weight.T``, the biases from ``in_proj_bias`` and
    ``out_proj.bias``.

    Parameters
    ----------
    mha : torch.nn.MultiheadAttention
        A module with biases (``bias=True``); any dtype and device.

    Returns
    -------
    MHAParams
        ``w_q (E, E)``, ``w_k (kdim, E)``, ``w_v (vdim, E)``, ``w_o (E, E)`` and the four biases,
        float64.

    Raises
    ------
    Unsupported
        A module without biases.
    """
    return _mha_arrays(mha, lambda t: t.detach().to("cpu", dtype=_torch().float64).numpy())


def mha_param_grads(mha):
    """The ``.grad`` of an ``nn.MultiheadAttention``'s weights as :class:`refattn.MHAParams`.

    Parameters
    ----------
    mha : torch.nn.MultiheadAttention
        A module with biases after a backward pass (every weight has its ``.grad``).

    Returns
    -------
    MHAParams
        The gradients in :func:`mha_params`' layout (transposed to ``x @ W``), float64.
    """
    return _mha_arrays(mha, lambda t: t.grad.detach().to("cpu", dtype=_torch().float64).numpy())


def _mha_arrays(mha, read):
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        w = read(mha.in_proj_weight)
        w_q, w_k, w_v = w[:e].T, w[e : 2 * e].T, w[2 * e :].T
    else:
        w_q, w_k, w_v = (read(getattr(mha, n)).T for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight"))
    if mha.in_proj_bias is None:
        raise Unsupported("nn.MultiheadAttention(bias=False): refattn's MHAParams carries biases; pass zeros")
    b = read(mha.in_proj_bias)
    return MHAParams(
        w_q, w_k, w_v, read(mha.out_proj.weight).T, b[:e], b[e : 2 * e], b[2 * e :], read(mha.out_proj.bias)
    )


def check_mha(mha, x, *, kv=None, key_is_real=None, causal=False, d_y=None, rule=None):
    """Run ``nn.MultiheadAttention`` ``mha`` (``batch_first=True``) on ``x (B, L, E)`` [and ``kv``] and
    judge it: a :class:`refattn.testing.compare.Verdict` over ``out`` and, with a cotangent ``d_y``,
    ``dx`` (and ``dkv``).  ``key_is_real`` ``(B, Lk)``: refattn's polarity, True = a real key (the module receives
    ``key_padding_mask = ~key_is_real``, PyTorch's True = ignore).  The golden is
    :func:`refattn.multihead_attention` in float64 on the module's weights; float64 modules get the
    float64 budget, others the ``"allclose"`` rule (no low-precision twin of the projections exists).

    Parameters
    ----------
    mha : torch.nn.MultiheadAttention
        The module, ``batch_first=True``, with biases; its dtype and device are used.
    x : array_like, shape (B, Lq, E)
        The query input (float64 values, converted to the module's dtype).
    kv : array_like, shape (B, Lk, kdim), optional
        The key and value input (cross-attention).  Default None: ``x`` (self-attention).
    key_is_real : array_like of bool, shape (B, Lk), optional
        True = a real key, False = padding (the module gets ``key_padding_mask = ~key_is_real``,
        refattn ``mask = key_is_real[:, None, None, :]``).  Default None: every key real.
    causal : bool, default False
        Causal attention, top-left aligned (the module gets a ``triu`` bool ``attn_mask``).
    d_y : array_like, shape (B, Lq, E), optional
        Cotangent of the output: with it ``dx`` (and ``dkv``) are judged.  Default None.
    rule : {"flash", "torch", "allclose"}, optional
        Default None: ``"flash"`` (the float64 budget) for float64 modules, ``"allclose"`` for
        others.

    Returns
    -------
    Verdict
        The :class:`refattn.testing.compare.Verdict` over ``out`` [and ``dx``, ``dkv``].
    """

    torch = _torch()
    dtype = str(next(mha.parameters()).dtype).removeprefix("torch.")
    fmt = lowp.format_of(dtype).name
    rule = rule or ("flash" if fmt == "float64" else "allclose")
    device = next(mha.parameters()).device
    grad = d_y is not None
    tx = _tensor(torch, x, torch_dtype(fmt), device, grad)
    tkv = tx if kv is None else _tensor(torch, kv, torch_dtype(fmt), device, grad)
    kw = {}
    ours = {}
    if key_is_real is not None:
        real = np.asarray(key_is_real, dtype=bool)
        kw["key_padding_mask"] = torch.tensor(~real, device=device)
        ours["mask"] = real[:, None, None, :]
    if causal:
        lq, lk = tx.shape[1], tkv.shape[1]
        kw["attn_mask"] = torch.triu(torch.ones(lq, lk, dtype=torch.bool, device=device), 1)  # True = blocked
        ours.update(causal=True, align="top_left")
    y, _ = mha(tx, tkv, tkv, need_weights=False, **kw)
    params = mha_params(mha)
    x64 = _numpy(tx)
    kv64 = None if kv is None else _numpy(tkv)
    golden = multihead_attention(x64, params, num_heads=mha.num_heads, kv=kv64, **ours)
    judgements = [judge("out", _numpy(y), golden, dtype=fmt, rule=rule, kind="output")]
    if grad:
        y.backward(_tensor(torch, d_y, torch_dtype(fmt), device, False))
        d64 = lowp.round_to(d_y, fmt)
        g = multihead_attention_backward(d64, x64, params, num_heads=mha.num_heads, kv=kv64, **ours)
        judgements.append(judge("dx", _numpy(tx.grad), g.dx, dtype=fmt, rule=rule, kind="gradient"))
        if kv is not None:
            judgements.append(judge("dkv", _numpy(tkv.grad), g.dkv, dtype=fmt, rule=rule, kind="gradient"))
    return Verdict(judgements)


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
