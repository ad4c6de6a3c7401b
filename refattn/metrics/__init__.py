"""Attention-analysis metrics, one module per family; each differentiable metric has ``*_backward``.

Conventions (``specs/metrics.md``): maps ``(..., H, Lq, Lk)``, rows = queries; ``mask`` is a
key-padding mask (True = real token) or a full bool mask; padded query rows are left out of every
average, and a contiguously padded map gives the cropped map's result; maps must be probabilities
(``check_probabilities=False`` measures them as they are); natural logs; float64; batch-safe.
Only the data arrays are positional, every option is keyword-only; ``name_backward(d_<output>, inputs...,
*, options)`` takes the cotangent of the output its forward's docstring names and returns a NamedTuple
with one field ``d<input>`` per differentiable input — :class:`MapGrads` ``(dP)`` for every metric of
one map ``P``.
"""

from refattn.metrics import (
    attribution,
    detectors,
    distribution,
    importance,
    linguistic,
    norms,
    position,
    regularizers,
    summary,
    tokens,
)
from refattn.metrics._maps import MapGrads as MapGrads
from refattn.metrics.attribution import *  # noqa: F403
from refattn.metrics.detectors import *  # noqa: F403
from refattn.metrics.distribution import *  # noqa: F403
from refattn.metrics.importance import *  # noqa: F403
from refattn.metrics.linguistic import *  # noqa: F403
from refattn.metrics.norms import *  # noqa: F403
from refattn.metrics.position import *  # noqa: F403
from refattn.metrics.regularizers import *  # noqa: F403
from refattn.metrics.summary import *  # noqa: F403
from refattn.metrics.tokens import *  # noqa: F403

__all__ = sorted(
    {"MapGrads"}.union(
        *(
            m.__all__
            for m in (
                attribution,
                detectors,
                distribution,
                importance,
                linguistic,
                norms,
                position,
                regularizers,
                summary,
                tokens,
            )
        )
    )
)
