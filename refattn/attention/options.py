"""The options of :func:`refattn.sdpa`, defined once, and the decorator that gives them to its variants.

The variants (multi-head, relative, top-k, tiled, decode, allocation, the loops and low-precision
twins, the tolerance checks and the torch adapter) forward sdpa's options through ``**options``.
:func:`takes_sdpa_options` makes that explicit:

* the function gets a ``__signature__``: its own parameters, then every sdpa option it forwards as a
  keyword-only parameter with sdpa's default, so ``help()`` and ``inspect.signature`` show them;
* its docstring's NumPy-style ``Parameters`` section gains one entry per forwarded option (its
  default and meaning, from :data:`SDPA_KEYWORDS`) and one entry naming the options it refuses,
  each with its reason (the section is created when the docstring has none);
* keyword arguments are checked by name before the function runs: an unknown one raises
  :class:`~refattn.RefAttnError` naming it and the closest valid name, an sdpa option the variant
  cannot take raises saying why.

:data:`SDPA_KEYWORDS` mirrors ``refattn.sdpa``'s keyword-only parameters (names, defaults and
order); ``tests/attention/test_options.py`` holds the two equal.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import NamedTuple

from refattn._validate import RefAttnError, unknown_option

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


#: What a variant forwards to sdpa (its masking, logits and softmax), the :class:`Option` of each in
#: sdpa's order.
SDPA_OPTIONS = (
    Option("mask", None, "bool, broadcastable to (..., Hq, Lq, Lk); True = may attend"),
    Option("bias", None, "float, broadcastable to (..., Hq, Lq, Lk), added to the logits; may hold -inf"),
    Option("causal", False, "query i attends keys j' <= i + o (o set by align; j' = j - k_start)"),
    Option(
        "window",
        None,
        "(left, right) or an int w = (w, w): keys i + o - left <= j' <= i + o + right; None = unbounded side; "
        "sides may be negative",
    ),
    Option(
        "align",
        None,
        '"top_left" (o = 0), "bottom_right" (o = k_length - q_length) or an int o; needed by causal/window/chunk '
        "if some q_length != k_length",
    ),
    Option("chunk", None, "c >= 1: query and key in the same chunk of c positions, (i + o) // c == j' // c"),
    Option("sink_tokens", 0, "n >= 0: keys j' < n are exempt from the window's left side (StreamingLLM)"),
    Option("q_lengths", None, "int, broadcastable to the batch dims: real queries i < q_length; padded rows give 0"),
    Option("k_lengths", None, "int, broadcastable to the batch dims: real keys k_start <= j < k_start + k_length"),
    Option("k_starts", None, "int, broadcastable to the batch dims: each sequence's first real key (left padding)"),
    Option("scale", None, "logit scale; None = 1/sqrt(D)"),
    Option("softcap", None, "c > 0: logits c·tanh(s/c), before bias and masks; None = off"),
    Option("sinks", None, "float, broadcastable to (..., Hq): a logit per head in the softmax denominator"),
    Option("dropout_p", 0.0, "dropout probability in [0, 1); > 0 needs dropout_mask"),
    Option("dropout_mask", None, "bool, broadcastable to (..., Hq, Lq, Lk); True = keep, P scaled by 1/(1 - p)"),
    Option("empty_rows", "zero", '"zero", "nan" or "uniform": the output of a row with every key masked'),
)
#: sdpa's output selector, ``return_lse=False``.
RETURN_LSE = Option("return_lse", False, "also return lse (..., Hq, Lq), -inf on empty rows")
#: sdpa's implementation selector, ``backend="auto"``.
BACKEND = Option("backend", "auto", '"auto", "numpy" or "numba": the implementation of sdpa')
#: refattn.sdpa's keyword-only parameters in order, :data:`SDPA_OPTIONS` then :data:`RETURN_LSE` and
#: :data:`BACKEND`.
SDPA_KEYWORDS = SDPA_OPTIONS + (RETURN_LSE, BACKEND)
_BY_NAME = {o.name: o for o in SDPA_KEYWORDS}

#: The reason a backward refuses ``return_lse`` (the forward's output selector).
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


_UNDERLINE = re.compile(r"^-{3,}$")


def _section_heads(lines):
    """The indices of the NumPy-style section titles in ``lines`` (a title line, then dashes)."""
    return [
        i
        for i in range(len(lines) - 1)
        if lines[i].strip() and not lines[i][0].isspace() and _UNDERLINE.match(lines[i + 1])
    ]


def _doc(doc, spec):
    """``doc`` with the forwarded options and the refused ones as entries of its Parameters section.

    Each forwarded option gets the entry ``<name> : forwarded to refattn.sdpa``, described as
    ``<name>=<default>``: its meaning; the refused options share one entry, ``<a>, <b> : not
    accepted``, whose description is a bullet list ``<a>``: reason.  The entries follow the
    section's own (the signature's order: own parameters, then the forwarded options); a docstring
    without a Parameters section gets one, before its first section (or at its end).
    """
    lines = inspect.cleandoc(doc or "").splitlines()
    entries = []
    for o in spec.forwarded:
        entries += [f"{o.name} : forwarded to :func:`refattn.sdpa`", f"    ``{o.name}={o.default!r}``: {o.doc}."]
    if spec.refused:
        entries += [
            f"{', '.join(spec.refused)} : not accepted",
            "    Refused with a :class:`~refattn.RefAttnError` if given:",
            "",
        ]
        entries += [f"    * ``{n}``: {reason}" for n, reason in spec.refused.items()]
    if not entries:
        return "\n".join(lines).strip() + "\n"
    heads = _section_heads(lines)
    own = next((i for i in heads if lines[i].strip() == "Parameters"), None)
    if own is not None:  # after the section's last entry, before the blank line that ends it
        at = next((i for i in heads if i > own), len(lines))
        while not lines[at - 1].strip():
            at -= 1
        lines[at:at] = entries
    elif heads:
        lines[heads[0] : heads[0]] = ["Parameters", "----------", *entries, ""]
    else:
        lines += ["", "Parameters", "----------", *entries]
    return "\n".join(lines).strip() + "\n"


def _reject(spec, kwargs):
    """The RefAttnError for the first keyword argument of ``kwargs`` that ``spec`` does not take."""
    bad = next(n for n in kwargs if n not in spec.valid)
    if bad in spec.refused:
        return RefAttnError(f"{spec.name}: option {bad!r} is not accepted: {spec.refused[bad]}")
    return unknown_option(spec.name, bad, spec.valid, spec.keywords)


def takes_sdpa_options(*, refuses=None, name=None, like=None):
    """Decorator: the function takes sdpa's options (those it does not name itself) as keyword-only
    parameters, forwarded through its ``**options``; keyword arguments are checked by name at call time.

    The decorated function gets ``__signature__`` = its own parameters (``**options`` dropped), then
    each forwarded option of :data:`SDPA_KEYWORDS` as a keyword-only parameter with sdpa's default,
    in sdpa's order; its docstring's Parameters section gains an entry per forwarded option and one
    for the refused ones (their reasons); it keeps its :class:`Spec` as ``fn.sdpa_options``.  A call
    with a keyword the signature lacks raises :class:`~refattn.RefAttnError` before the function
    runs: ``"<name>: unknown option 'casual' (did you mean 'causal'?); options: ..."`` or, for a
    refused option, ``"<name>: option 'backend' is not accepted: <reason>"``.  A valid call is the
    undecorated function's.

    Parameters
    ----------
    refuses : dict of {str: str}, optional
        ``{option: reason}`` for the sdpa options (names of :data:`SDPA_KEYWORDS`) the function
        cannot take: they are left out of its signature and refused with the reason.  An option the
        function names as its own parameter cannot be refused, and its default must be sdpa's.
        Default None: every option it does not name is forwarded.
    name : str, optional
        The function's name in error messages (e.g. ``"loops.sdpa"``).  Default None:
        ``fn.__name__``.
    like : callable, optional
        A function decorated by ``takes_sdpa_options`` whose parameters (signature, forwarded and
        refused options) this one takes and passes on, e.g. ``assert_attention_close`` takes
        ``check_attention``'s; excludes ``refuses``.  Default None.

    Returns
    -------
    callable
        The decorator: ``fn`` → its checking wrapper (``functools.wraps``; ``__wrapped__`` is ``fn``).

    Raises
    ------
    TypeError
        At decoration: ``refuses`` names no sdpa option, ``like`` and ``refuses`` are both given, the
        function refuses an option it takes itself, gives an sdpa option another default than
        sdpa's, or forwards options without having ``**options``.
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
        wrapper.keywords_checked = True  # refattn._validate.keyword_checked leaves it as it is
        return wrapper

    return decorate
