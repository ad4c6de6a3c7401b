"""Top-k attention: per query row only the ``top_k`` largest logits take part.

The selection is made on sdpa's softmax input (after scale, softcap, bias and
masks; disallowed keys are never selected), ties broken by the lower key index.
The backward treats the selection as fixed (it is piecewise constant), so its
gradient is sdpa's with the selection as an extra mask.  The local, strided and
block patterns are masks: :func:`refattn.masks.local`, ``strided``, ``block``.
"""

from __future__ import annotations

import numpy as np

from refattn._validate import as_int
from refattn.attention import sdpa as _sdpa
from refattn.attention.options import BACKWARD_RETURN_LSE, takes_sdpa_options

__all__ = ["topk_attention", "topk_attention_backward", "topk_mask"]

_NO_BACKEND = 'the top-k selection needs the (..., Hq, Lq, Lk) logits in NumPy (then sdpa runs, backend="auto")'


def topk_mask(logits, *, top_k):
    """bool ``(..., Lq, Lk)``: the ``top_k`` largest finite logits of each row (ties: lower index)."""
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
    """sdpa restricted to each row's ``top_k`` largest logits; ``options`` as :func:`refattn.sdpa`
    but ``backend`` (refused: the selection is NumPy).  A ``mask`` is intersected with the selection; dropout
    applies to the selected probabilities."""
    return _sdpa.sdpa(q, k, v, return_lse=return_lse, **_selected_options(q, k, v, top_k, options))


@takes_sdpa_options(refuses={"backend": _NO_BACKEND, "return_lse": BACKWARD_RETURN_LSE})
def topk_attention_backward(d_out, q, k, v, *, top_k, d_lse=None, **options):
    """Gradients of :func:`topk_attention` with the selection held fixed → ``SDPAGrads``; options as
    the forward's (``backend`` and ``return_lse`` refused)."""
    return _sdpa.sdpa_backward(d_out, q, k, v, d_lse=d_lse, **_selected_options(q, k, v, top_k, options))
