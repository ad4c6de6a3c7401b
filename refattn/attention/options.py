"""The options of :func:`refattn.sdpa`, defined once, and the decorator that gives them to its variants.

The variants (multi-head, relative, top-k, tiled, decode, allocation, the loops and low-precision
twins, the tolerance checks and the torch adapter) forward sdpa's options through ``**options``.
:func:`takes_sdpa_options` makes that explicit:

* the function gets a ``__signature__``: its own parameters, then every sdpa option it forwards as a
  keyword-only parameter with sdpa's default, so ``help()`` and ``inspect.signature`` show them, and
  its docstring gains a list of those options with their meaning;
* keyword arguments are checked by name before the function runs: an unknown one raises
  :class:`~refattn.RefAttnError` naming it and the closest valid name, an sdpa option the variant
  cannot take raises saying why.

:data:`SDPA_KEYWORDS` mirrors ``refattn.sdpa``'s keyword-only parameters (names, defaults and
order); ``tests/attention/test_options.py`` holds the two equal.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import NamedTuple

from refattn._validate import RefAttnError

__all__ = [
    "BACKEND",
    "BACKWARD_RETURN_LSE",
    "Option",
    "RETURN_LSE",
    "SDPA_KEYWORDS",
    "SDPA_OPTIONS",
    "Spec",
    "takes_sdpa_options",
]


class Option(NamedTuple):
    """One keyword-only parameter of :func:`refattn.sdpa`: its name, default and one-line meaning."""

    name: str
    default: object
    doc: str


# What a variant forwards to sdpa (its masking, logits and softmax), in sdpa's order.
SDPA_OPTIONS = (
    Option("mask", None, "bool, broadcastable to (..., Hq, Lq, Lk); True = may attend"),
    Option("bias", None, "float, broadcastable to (..., Hq, Lq, Lk), added to the logits; may hold -inf"),
    Option("causal", False, "query i attends keys j <= i + o (o set by align)"),
    Option("window", None, "(left, right): keys i + o - left <= j <= i + o + right; None = unbounded side"),
    Option("align", None, '"top_left" (o = 0) or "bottom_right" (o = Lk - Lq); needed by causal/window if Lq != Lk'),
    Option("scale", None, "logit scale; None = 1/sqrt(D)"),
    Option("softcap", None, "c > 0: logits c·tanh(s/c), before bias and masks; None = off"),
    Option("sinks", None, "float, broadcastable to (..., Hq): a logit per head in the softmax denominator"),
    Option("dropout_p", 0.0, "dropout probability in [0, 1); > 0 needs dropout_mask"),
    Option("dropout_mask", None, "bool, broadcastable to (..., Hq, Lq, Lk); True = keep, P scaled by 1/(1 - p)"),
    Option("empty_rows", "zero", '"zero", "nan" or "uniform": the output of a row with every key masked'),
)
RETURN_LSE = Option("return_lse", False, "also return lse (..., Hq, Lq), -inf on empty rows")
BACKEND = Option("backend", "auto", '"auto", "numpy" or "numba": the implementation of sdpa')
SDPA_KEYWORDS = SDPA_OPTIONS + (RETURN_LSE, BACKEND)  # refattn.sdpa's keyword-only parameters, in order
_BY_NAME = {o.name: o for o in SDPA_KEYWORDS}

# The reason a backward refuses ``return_lse`` (the forward's output selector).
BACKWARD_RETURN_LSE = "a backward returns gradients; give the lse cotangent as d_lse="

_TAKES_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class Spec(NamedTuple):
    """What a decorated function takes: ``forwarded`` (sdpa options added to its signature),
    ``refused`` ({option: reason}) and ``keywords`` (every keyword-only parameter, in order)."""

    name: str
    signature: inspect.Signature
    forwarded: tuple
    refused: dict
    keywords: tuple
    valid: frozenset  # every name a caller may pass by keyword


def _spec(fn, name, refuses):
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    has_var_kw = len(params) < len(sig.parameters)
    own = {p.name: p for p in params}
    for n, p in own.items():
        if n in _BY_NAME and p.default != _BY_NAME[n].default:
            raise TypeError(f"{name}: parameter {n} defaults to {p.default!r}, sdpa's to {_BY_NAME[n].default!r}")
    both = set(refuses) & set(own)
    if both:
        raise TypeError(f"{name}: refuses {sorted(both)}, which it takes as its own parameters")
    forwarded = tuple(o for o in SDPA_KEYWORDS if o.name not in own and o.name not in refuses)
    if forwarded and not has_var_kw:
        raise TypeError(f"{name}: forwards {[o.name for o in forwarded]} but has no **options")
    added = [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default) for o in forwarded]
    signature = sig.replace(parameters=params + added)
    keywords = tuple(p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY)
    valid = frozenset(p.name for p in signature.parameters.values() if p.kind in _TAKES_KEYWORD)
    return Spec(name, signature, forwarded, dict(refuses), keywords, valid)


def _doc(doc, spec):
    """``doc`` with the forwarded options (default and meaning) and the refused ones (reason) appended."""
    lines = [inspect.cleandoc(doc or "")]
    if spec.forwarded:
        lines += ["", "Options forwarded to :func:`refattn.sdpa` (keyword-only, ``refattn.attention.options``):", ""]
        lines += [f"* ``{o.name}={o.default!r}``: {o.doc}" for o in spec.forwarded]
    if spec.refused:
        lines += ["", "Not accepted (``RefAttnError`` if given):", ""]
        lines += [f"* ``{n}``: {reason}" for n, reason in spec.refused.items()]
    return "\n".join(lines).strip() + "\n"


def _reject(spec, kwargs):
    """The RefAttnError for the first keyword argument of ``kwargs`` that ``spec`` does not take."""
    bad = next(n for n in kwargs if n not in spec.valid)
    if bad in spec.refused:
        return RefAttnError(f"{spec.name}: option {bad!r} is not accepted: {spec.refused[bad]}")
    close = difflib.get_close_matches(bad, sorted(spec.valid), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return RefAttnError(f"{spec.name}: unknown option {bad!r}{hint}; options: {', '.join(spec.keywords)}")


def takes_sdpa_options(*, refuses=None, name=None, like=None):
    """Decorator: the function takes sdpa's options (those it does not name itself) as keyword-only
    parameters, forwarded through its ``**options``; keyword arguments are checked by name at call time.

    ``refuses``: ``{option: reason}`` for the sdpa options (:data:`SDPA_KEYWORDS`) the function cannot
    take; they are left out of its signature and refused with the reason.  ``name``: the name in
    error messages (default ``fn.__name__``).  ``like``: a decorated function whose parameters this
    one takes and passes on (``assert_attention_close`` takes ``check_attention``'s).  The spec is
    kept as ``fn.sdpa_options`` (a :class:`Spec`).
    """
    refuses = dict(refuses or {})
    unknown = set(refuses) - set(_BY_NAME)
    if unknown:
        raise TypeError(f"takes_sdpa_options: refuses={sorted(unknown)} are not sdpa options")
    if like is not None and refuses:
        raise TypeError("takes_sdpa_options: like= takes the other function's refusals; do not pass refuses=")

    def decorate(fn):
        label = name or fn.__name__
        spec = _spec(fn, label, refuses) if like is None else like.sdpa_options._replace(name=label)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not spec.valid.issuperset(kwargs):
                raise _reject(spec, kwargs)
            return fn(*args, **kwargs)

        wrapper.__signature__ = spec.signature
        wrapper.__doc__ = _doc(fn.__doc__, spec)
        wrapper.sdpa_options = spec
        return wrapper

    return decorate
