"""The standard suite of SDPA cases: every option of :func:`refattn.sdpa` and the variants that
reduce to sdpa inputs (ALiBi as a bias, RoPE-rotated q/k, decode, varlen, GQA/MQA), at lengths on
both sides of the 64/128 tile boundaries, plus adversarial rows (large logits, near ties).

Every array is drawn from a seeded generator: the suite is the same on every machine.  Shapes are
4-D ``(B, H, L, D)`` so that readers in other languages need no broadcasting of q, k, v.
"""

from __future__ import annotations

import math

import numpy as np

from refattn import masks
from refattn._validate import check_keywords_of
from refattn.attention.position import alibi_bias, alibi_slopes, rope
from refattn.crosscheck.cases import Case

__all__ = ["standard_cases", "standard_suite"]


def _qkv(seed, b=1, hq=2, hk=None, lq=32, lk=None, d=16, dv=None, scale=1.0):
    rng = np.random.default_rng(seed)
    hk, lk, dv = hk or hq, lk or lq, dv or d
    q = scale * rng.standard_normal((b, hq, lq, d))
    k = scale * rng.standard_normal((b, hk, lk, d))
    v = rng.standard_normal((b, hk, lk, dv))
    return rng, {"q": q, "k": k, "v": v}


def _case(name, seed, arrays_kw=None, options=None, extra=None, d_lse=False, **shape):
    rng, arrays = _qkv(seed, **shape)
    if extra is not None:
        arrays.update(extra(rng, arrays))
    b, hq, lq = arrays["q"].shape[:3]
    dv = arrays["v"].shape[-1]
    cot = {"d_out": rng.standard_normal((b, hq, lq, dv))}
    if d_lse:
        cot["d_lse"] = rng.standard_normal((b, hq, lq))
    return Case(name, arrays, options or {}, cot)


def _padding(lengths_q, lengths_k, lq, lk):
    return lambda rng, a: {"mask": masks.from_lengths(lengths_q, lengths_k, lq, lk)[:, None]}


def _rotated(rng, a):
    return {"q": rope(a["q"]), "k": rope(a["k"])}


def _near_ties(rng, a):
    q = a["q"].copy()
    k = np.repeat(a["k"][:, :, :1], a["k"].shape[2], axis=2) + 1e-9 * rng.standard_normal(a["k"].shape)
    return {"q": q, "k": k}


def standard_cases():
    """The standard suite's cases (inputs, options and cotangents; no outputs), the same on every
    machine: drawn from seeded generators, 4-D ``(B, H, L, D)`` arrays.

    Every sdpa option (scale, causal and windows in both alignments, padding and the three
    empty-row policies, bias, ALiBi, softcap, sinks, dropout, GQA/MQA, ``Dv != D``, RoPE-rotated
    inputs, decode, varlen), lengths on both sides of the 64/128 tiles, large logits and near ties;
    ``specs/case-format.md`` lists them.

    Returns
    -------
    list of Case
        What ``refattn golden`` writes and ``refattn check`` runs.
    """
    slopes = alibi_slopes(4)
    cases = [
        _case("plain", 1),
        _case("scale", 2, options={"scale": 0.3}),
        _case("cross_lengths", 3, lq=20, lk=45),
        _case("tile_63", 4, lq=63, d=32),
        _case("tile_64", 5, lq=64, d=32),
        _case("tile_65", 6, lq=65, d=32),
        _case("tile_127_129", 7, lq=127, lk=129, d=32),
        _case("tile_128", 8, lq=128, d=32),
        _case("causal_square", 9, lq=65, options={"causal": True}),
        _case("causal_top_left", 10, lq=20, lk=45, options={"causal": True, "align": "top_left"}),
        _case("causal_bottom_right", 11, lq=20, lk=45, options={"causal": True, "align": "bottom_right"}),
        _case("window_bottom_right", 12, lq=40, lk=70, options={"window": [8, 0], "align": "bottom_right"}),
        _case("window_top_left", 13, lq=40, options={"window": [5, 3], "align": "top_left"}),
        _case("key_padding", 14, b=2, lq=30, extra=_padding(None, [30, 17], 30, 30)),
        _case("empty_rows_zero", 15, b=2, lq=30, extra=_padding([30, 21], [30, 17], 30, 30)),
        _case(
            "empty_rows_nan", 16, b=2, lq=30, extra=_padding([30, 21], [30, 17], 30, 30), options={"empty_rows": "nan"}
        ),
        _case(
            "empty_rows_uniform",
            17,
            b=2,
            lq=30,
            extra=_padding([30, 21], [30, 17], 30, 30),
            options={"empty_rows": "uniform"},
        ),
        _case("bias", 18, extra=lambda rng, a: {"bias": rng.standard_normal((1, 2, 32, 32))}),
        _case(
            "alibi",
            19,
            hq=4,
            lq=48,
            options={"causal": True},
            extra=lambda rng, a: {"bias": alibi_bias(slopes, 48, 48)[None]},
        ),
        _case("softcap", 20, scale=3.0, options={"softcap": 5.0}),
        _case("sinks", 21, extra=lambda rng, a: {"sinks": rng.standard_normal((1, 2))}, d_lse=True),
        _case(
            "dropout",
            22,
            options={"dropout_p": 0.25},
            extra=lambda rng, a: {"dropout_mask": masks.dropout_mask((1, 2, 32, 32), 0.25, seed=22)},
        ),
        _case("gqa", 23, hq=8, hk=2, lq=40),
        _case("mqa", 24, hq=4, hk=1, lq=40),
        _case("value_dim", 25, d=32, dv=8),
        _case("rope", 26, d=32, lq=50, options={"causal": True}, extra=_rotated),
        _case("decode", 27, lq=1, lk=300, d=64, hq=4, hk=2, options={"causal": True, "align": "bottom_right"}),
        _case(
            "varlen",
            28,
            lq=50,
            options={},
            extra=lambda rng, a: {
                "mask": masks.varlen([0, 12, 30, 50], [0, 12, 30, 50], causal=True, align="bottom_right")
            },
        ),
        _case("large_logits", 29, scale=30.0, d=16),
        _case("near_ties", 30, extra=_near_ties),
        _case("lse_cotangent", 31, d_lse=True, options={"causal": True}),
        _case("head_dim_128", 32, d=128, lq=40, options={"scale": 1.0 / math.sqrt(128)}),
    ]
    return cases


def standard_suite():
    """The built-in suite (no outputs): every sdpa option and the variants expressible as sdpa
    inputs, as :func:`standard_cases`.

    Returns
    -------
    list of Case
    """
    return standard_cases()


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
