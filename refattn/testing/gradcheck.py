"""A central finite-difference gradient checker in float64, for any op with a backward.

``gradcheck(fn, backward, inputs, options=...)`` draws a random cotangent for
every output of ``fn``, evaluates the hand-written ``backward`` and compares it
with fourth-order central differences of the scalar
``L = Σ_outputs Σ cotangent · output`` (over the outputs' finite entries).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np

__all__ = ["GradcheckError", "GradcheckReport", "InputCheck", "gradcheck"]


@dataclass(frozen=True)
class InputCheck:
    """The comparison for one differentiable input."""

    name: str
    shape: tuple
    max_abs_error: float
    rel_error: float  # max|analytic - numeric| / max(max|numeric|, max|analytic|)
    allowed: float  # the max_abs_error that passes: atol + rtol · scale
    worst_index: tuple
    analytic: float
    numeric: float

    @property
    def passed(self):
        return bool(self.max_abs_error <= self.allowed)


@dataclass(frozen=True)
class GradcheckReport:
    """Per-input results of :func:`gradcheck`; ``str()`` gives a table."""

    checks: list = field(default_factory=list)
    eps: float = 0.0
    rtol: float = 0.0

    @property
    def passed(self):
        return all(c.passed for c in self.checks)

    @property
    def max_rel_error(self):
        return max((c.rel_error for c in self.checks), default=0.0)

    def __str__(self):
        head = f"gradcheck (eps={self.eps:g}, rtol={self.rtol:g}): {'passed' if self.passed else 'FAILED'}"
        columns = f"{'input':<10} {'shape':<18} {'rel.err':>10} {'abs.err':>10} {'allowed':>10}"
        rows = [columns + "  worst at: analytic vs numeric"]
        for c in self.checks:
            rows.append(
                f"{c.name:<10} {str(c.shape):<18} {c.rel_error:10.3e} {c.max_abs_error:10.3e} {c.allowed:10.3e}  "
                f"{c.worst_index}: {c.analytic:.12g} vs {c.numeric:.12g}{'' if c.passed else '  <-- FAIL'}"
            )
        return "\n".join([head] + rows)


class GradcheckError(AssertionError):
    """Raised when a backward disagrees with finite differences; ``.report`` holds the table."""

    def __init__(self, report):
        super().__init__(str(report))
        self.report = report


def _params(fn):
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None


def _backward_takes(name, bparams):
    """Whether an option goes to the backward.  Options named ``return_*`` select outputs: they go
    only to a backward that names them (``rollout_backward`` takes ``return_all``, ``sdpa_backward``
    does not take ``return_lse``).  Every other option goes to a backward that names it or takes
    ``**kwargs``."""
    if name in bparams:
        return True
    if name.startswith("return_"):
        return False
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in bparams.values())


def _outputs(y):
    """The float outputs of ``fn`` (bool outputs such as validity masks are not differentiated)."""
    ys = [np.asarray(o) for o in (y if isinstance(y, tuple) else (y,))]
    return [np.asarray(o, dtype=np.float64) for o in ys if o.dtype.kind == "f"]


def _copy(x):
    """A copy of an input (its dtype kept); NamedTuples and tuples of arrays are copied field by field."""
    if x is None:
        return None
    if isinstance(x, tuple):
        fields = [None if f is None else _copy(f) for f in x]
        return type(x)(*fields) if hasattr(x, "_fields") else tuple(fields)
    return np.array(x, copy=True)


def _leaves(name, x, g):
    """(name, input array, gradient) for every array leaf; ``gate.w1`` names a NamedTuple field."""
    if isinstance(x, tuple):
        names = getattr(x, "_fields", None) or [str(i) for i in range(len(x))]
        if not isinstance(g, tuple) or len(g) != len(x):
            raise ValueError(f"gradcheck: the gradient of {name!r} must mirror its structure, got {type(g).__name__}")
        for n, xi, gi in zip(names, x, g):
            if xi is not None and gi is not None:
                yield from _leaves(f"{name}.{n}", xi, gi)
        return
    if not (isinstance(x, np.ndarray) and x.dtype.kind == "f"):
        raise ValueError(f"gradcheck: {name!r} has a gradient but is not a float array")
    yield name, x, np.asarray(g, dtype=np.float64)


def _grad_targets(fn, grads, inputs, options):
    """Every (name, input array, gradient) named by the grads fields ``dNAME``."""
    params = _params(fn)
    positional = []
    if params is not None:
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        positional = [n for n, p in params.items() if p.kind in kinds][: len(inputs)]
    fields = getattr(grads, "_fields", None) or [f"d{i}" for i in range(len(grads))]
    for pos, (fname, g) in enumerate(zip(fields, grads)):
        if g is None:
            continue
        name = fname[1:] if fname.startswith("d") else fname
        if name in positional:
            x = inputs[positional.index(name)]
        elif name in options:
            x = options[name]
        elif not positional and pos < len(inputs):
            x = inputs[pos]
        else:
            raise ValueError(f"gradcheck: gradient field {fname!r} matches no input or option of {fn!r}")
        if x is not None:
            yield from _leaves(name, x, g)


def gradcheck(
    fn, backward, inputs, *, options=None, eps=1e-4, rtol=1e-6, atol=None, seed=0, raise_on_failure=True, **more_options
):
    """Compare ``backward`` with central differences of ``fn`` in float64.

    ``fn(*inputs, **options)`` returns an array or a tuple of arrays;
    ``backward(d_out, *inputs, d_<name>=..., **options)`` returns a NamedTuple
    whose fields ``d<input>`` name positional inputs or array options (e.g.
    ``dbias``); ``None`` fields are skipped.  Cotangents after the first are
    passed as the backward's keyword-only ``d_*`` parameters, in order.
    Options named ``return_*`` (e.g. ``return_lse``) select outputs and
    reach the backward only if it names them; other options always reach it.
    The numeric derivative is the fourth-order central difference
    ``(8(L(x+h) - L(x-h)) - (L(x+2h) - L(x-2h))) / 12h``.  An input passes
    when ``max|analytic - numeric| <= atol + rtol · max(|numeric|, |analytic|)``;
    ``atol`` defaults to the rounding error of the difference quotient,
    ``32 · eps_machine · (1 + Σ|cotangent · output|) / eps``.
    Returns a :class:`GradcheckReport`; raises :class:`GradcheckError` on failure.
    """
    options = dict(options or {}, **more_options)
    inputs = [_copy(x) for x in inputs]
    options = {k: (_copy(v) if isinstance(v, np.ndarray) or hasattr(v, "_fields") else v) for k, v in options.items()}
    rng = np.random.default_rng(seed)

    outs = _outputs(fn(*inputs, **options))
    finite = [np.isfinite(o) for o in outs]  # bool outputs (validity masks) take no cotangent
    cots = [np.where(f, rng.standard_normal(o.shape), 0.0) for o, f in zip(outs, finite)]

    bparams = _params(backward)
    b_opts = options if bparams is None else {k: v for k, v in options.items() if _backward_takes(k, bparams)}
    extra_names = (
        []
        if bparams is None
        else [n for n, p in bparams.items() if p.kind == inspect.Parameter.KEYWORD_ONLY and n.startswith("d_")]
    )
    if len(cots) - 1 > len(extra_names):
        raise ValueError(f"gradcheck: fn returns {len(cots)} outputs but backward takes cotangents {extra_names}")
    b_cots = dict(zip(extra_names, cots[1:]))
    grads = backward(cots[0], *inputs, **b_cots, **b_opts)

    def loss():
        ys = _outputs(fn(*inputs, **options))
        return sum(float(np.sum(c * np.where(f, y, 0.0))) for y, c, f in zip(ys, cots, finite))

    magnitude = sum(float(np.sum(np.abs(c * np.where(f, o, 0.0)))) for o, c, f in zip(outs, cots, finite))
    atol_used = 32 * np.finfo(np.float64).eps * (1.0 + magnitude) / eps if atol is None else float(atol)

    checks = []
    for name, x, g in _grad_targets(fn, grads, inputs, options):
        if g.shape != x.shape:
            raise ValueError(f"gradcheck: the gradient of {name} has shape {g.shape}, the input {x.shape}")
        numeric = np.zeros(x.shape)
        for idx in np.ndindex(*x.shape):
            x0 = x[idx]
            if not np.isfinite(x0):
                continue
            vals = []
            for step in (eps, -eps, 2 * eps, -2 * eps):
                x[idx] = x0 + step
                vals.append(loss())
            x[idx] = x0
            numeric[idx] = (8.0 * (vals[0] - vals[1]) - (vals[2] - vals[3])) / (12.0 * eps)
        diff = np.abs(g - numeric)
        diff = np.where(np.isnan(diff), np.inf, diff)
        worst = np.unravel_index(int(np.argmax(diff)), x.shape) if x.size else ()
        err = float(diff.max()) if x.size else 0.0
        scale = max(float(np.max(np.abs(numeric), initial=0.0)), float(np.nanmax(np.abs(g), initial=0.0)))
        rel = err / scale if scale > 0 else err
        checks.append(
            InputCheck(
                name=name,
                shape=x.shape,
                max_abs_error=err,
                rel_error=rel,
                allowed=atol_used + rtol * scale,
                worst_index=tuple(int(i) for i in worst),
                analytic=float(g[worst]) if x.size else 0.0,
                numeric=float(numeric[worst]) if x.size else 0.0,
            )
        )
    report = GradcheckReport(checks, eps, rtol)
    if raise_on_failure and not report.passed:
        raise GradcheckError(report)
    return report
