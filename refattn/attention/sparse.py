"""Top-k attention: per query row only the ``top_k`` largest logits take part.

Axes as :func:`refattn.sdpa`: ``...`` batch, ``Hq``/``Hk`` query/kv heads, ``Lq``/``Lk`` query/key
lengths, ``D``/``Dv`` head dims; the logits are ``(..., Hq, Lq, Lk)``.

The selection is made on sdpa's softmax input (after scale, softcap, bias and
masks; disallowed keys are never selected), ties broken by the lower key index.
The backward treats the selection as fixed (it is piecewise constant), so its
gradient is sdpa's with the selection as an extra mask.  The local, strided and
block patterns are masks: :func:`refattn.masks.local`, ``strided``, ``block``.
"""

from __future__ import annotations

import numpy as np

from refattn._validate import as_int, check_keywords_of
from refattn.attention import sdpa as _sdpa
from refattn.attention.options import BACKWARD_RETURN_LSE, takes_sdpa_options

__all__ = ["topk_attention", "topk_attention_backward", "topk_mask"]

_NO_BACKEND = 'the top-k selection needs the (..., Hq, Lq, Lk) logits in NumPy (then sdpa runs, backend="auto")'


def topk_mask(logits, *, top_k):
    """The ``top_k`` largest finite logits of each row, as a mask.

    ``keep_ij = rank_i(j) < top_k and logits_ij finite``, ranks from a stable descending sort (a
    tie goes to the lower key index); ``-inf`` (disallowed) entries are never kept, so a row with
    fewer than ``top_k`` finite logits keeps them all.

    Parameters
    ----------
    logits : ndarray, shape (..., Lq, Lk)
        Real logits (sdpa's softmax input, ``-inf`` where disallowed); the last axis is the key axis.
    top_k : int
        Keyword-only: how many keys each row keeps, >= 1 (``top_k >= Lk`` keeps every finite one).

    Returns
    -------
    ndarray of bool, shape (..., Lq, Lk)
        True = the key is selected for that row.
    """
    order = np.argsort(-logits, axis=-1, kind="stable")  # (..., Lq, Lk)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(logits.shape[-1]), axis=-1)
    return (rank < top_k) & np.isfinite(logits)


def _selected_options(q, k, v, top_k, options):
    top_k = as_int(top_k, "top_k", minimum=1)
    a = _sdpa.validate(q, k, v, **options)
    keep = topk_mask(_sdpa.forward_scores(a).logits, top_k=top_k)  # (..., Hq, Lq, Lk)
    mask = keep if options.get("mask") is None else keep & np.asarray(options["mask"])
    return {**options, "mask": mask}


@takes_sdpa_options(refuses={"backend": _NO_BACKEND})
def topk_attention(q, k, v, *, top_k, return_lse=False, **options):
    """sdpa restricted to each row's ``top_k`` largest logits.

    ``out = sdpa(q, k, v, mask=mask ∧ topk_mask(s, top_k), **options)`` with ``s`` sdpa's softmax
    input ``(..., Hq, Lq, Lk)`` (after scale, softcap, bias and masks; disallowed keys are never
    selected; ties go to the lower key index).  A ``mask`` is intersected with the selection;
    dropout applies to the selected probabilities.  The options are :func:`refattn.sdpa`'s;
    ``backend`` is refused (the selection is made in NumPy, then sdpa runs with ``backend="auto"``).

    Parameters
    ----------
    q : array_like, shape (..., Hq, Lq, D)
        Queries; finite, converted to float64.
    k : array_like, shape (..., Hk, Lk, D)
        Keys; ``Hk`` divides ``Hq`` (GQA); finite.
    v : array_like, shape (..., Hk, Lk, Dv)
        Values; finite.
    top_k : int
        How many keys each query row keeps, >= 1; ``top_k >= Lk`` is dense sdpa.
    return_lse : bool, default False
        Also return ``lse``.

    Returns
    -------
    out : ndarray of float64, shape (..., Hq, Lq, Dv)
        ``...`` is the broadcast of q's, k's and v's batch dims.
    lse : ndarray of float64, shape (..., Hq, Lq)
        Only with ``return_lse=True``, as ``(out, lse)``: the log of each row's softmax
        denominator over the selected keys, the sink included; ``-inf`` on empty rows.
    """
    return _sdpa.sdpa(q, k, v, return_lse=return_lse, **_selected_options(q, k, v, top_k, options))


@takes_sdpa_options(refuses={"backend": _NO_BACKEND, "return_lse": BACKWARD_RETURN_LSE})
def topk_attention_backward(d_out, q, k, v, *, top_k, d_lse=None, **options):
    """Gradients of :func:`topk_attention`, the selection held fixed.

    The selection is piecewise constant in the inputs, so (away from ties between the k-th and
    the (k+1)-th logits, where no gradient exists) the gradient is
    ``sdpa_backward(d_out, q, k, v, d_lse=d_lse, mask=mask ∧ selected, **options)``.  The options
    must be those of the forward call; ``backend`` and ``return_lse`` are refused.

    Parameters
    ----------
    d_out : array_like, shape (..., Hq, Lq, Dv)
        Cotangent of ``out``: exactly the output's shape, finite.
    q, k, v : array_like
        As :func:`topk_attention`: ``(..., Hq, Lq, D)``, ``(..., Hk, Lk, D)``, ``(..., Hk, Lk, Dv)``.
    top_k : int
        As the forward's, >= 1.
    d_lse : array_like, shape (..., Hq, Lq), optional
        Cotangent of ``lse`` (when the forward returned it).  Default None: no lse term.

    Returns
    -------
    SDPAGrads
        ``(dq, dk, dv, dbias, dsinks)``, float64, each of its input's shape (GQA groups and
        broadcast dims summed); ``dbias``/``dsinks`` None without bias/sinks.
    """
    return _sdpa.sdpa_backward(d_out, q, k, v, d_lse=d_lse, **_selected_options(q, k, v, top_k, options))


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
