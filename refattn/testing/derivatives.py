"""Finite-difference gradient checkers in float64, for any op with a backward.

``gradcheck(fn, backward, inputs, options=...)`` draws a random cotangent for
every output of ``fn``, evaluates the hand-written ``backward`` and compares it,
entry by entry, with sixth-order central differences of the scalar
``L = Σ_outputs Σ cotangent · output`` (over the outputs' finite entries).

``check_vjp(fn, backward, inputs, options=...)`` is the cheap variant for
kernel-sized inputs: one random direction ``δ`` per differentiable input, and
``Σ ⟨backward(d_out), δ⟩`` compared with an eighth-order central difference of
``t ↦ L(x + tδ)``: eight calls of ``fn`` per direction, whatever the size.

Both judge an error against the gradient's own scale, floored by the rounding
error of the difference quotient, at ``rtol = 1e-8`` by default (``specs/testing.md``).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from refattn._validate import check_keywords_of

__all__ = [
    "DirectionCheck",
    "GradcheckError",
    "GradcheckReport",
    "InputCheck",
    "VjpError",
    "VjpReport",
    "check_vjp",
    "gradcheck",
]

ROUNDING = 32  # the rounding error of one L, in units of ε_machine · (1 + ‖cotangent ⊙ output‖₂)
NOISE = 8  # the default atol's floor, in standard deviations of the quotient's measured noise
_EPS = np.finfo(np.float64).eps
_MEDIAN_ABS_NORMAL = 0.6744897501960817  # median of |Z|, Z standard normal
_FD6 = ((1, 3 / 4), (2, -3 / 20), (3, 1 / 60))  # f'(0)·h ≈ Σ c_m (f(mh) − f(−mh)), error O(h⁶)
_FD8 = ((1, 4 / 5), (2, -1 / 5), (3, 4 / 105), (4, -1 / 280))  # error O(h⁸)


def _relative(err, scale, atol, rtol):
    """``err / max(scale, atol / rtol)``: ≤ rtol exactly when ``err <= max(rtol · scale, atol)``."""
    floor = max(scale, atol / rtol if rtol > 0 else 0.0)
    if floor > 0:
        return err / floor
    return 0.0 if err == 0 else np.inf


@dataclass(frozen=True)
class InputCheck:
    """The comparison for one differentiable input of :func:`gradcheck`."""

    name: str
    shape: tuple
    max_abs_error: float  # max|analytic − numeric|
    rel_error: float  # max_abs_error / max(scale, atol / rtol): passes when ≤ rtol
    allowed: float  # the max_abs_error that passes: max(atol, rtol · scale)
    worst_index: tuple
    analytic: float
    numeric: float
    scale: float = 0.0  # the gradient's scale: max(max|numeric|, max|analytic|)

    @property
    def passed(self):
        return bool(self.max_abs_error <= self.allowed)


@dataclass(frozen=True)
class GradcheckReport:
    """Per-input results of :func:`gradcheck`; ``str()`` gives a table."""

    checks: list = field(default_factory=list)
    eps: float = 0.0
    rtol: float = 0.0
    atol: float = 0.0

    @property
    def passed(self):
        return all(c.passed for c in self.checks)

    @property
    def max_rel_error(self):
        return max((c.rel_error for c in self.checks), default=0.0)

    def __str__(self):
        head = (
            f"gradcheck (eps={self.eps:g}, rtol={self.rtol:g}, atol={self.atol:.3g}): "
            f"{'passed' if self.passed else 'FAILED'}"
        )
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


@dataclass(frozen=True)
class DirectionCheck:
    """One direction of :func:`check_vjp`: ``analytic = Σ ⟨gradient_i, δ_i⟩`` vs the directional
    derivative ``numeric = ⟨d_out, J δ⟩``.  ``name``: the input perturbed, or ``"all"``."""

    name: str
    analytic: float
    numeric: float
    abs_error: float  # |analytic − numeric|
    rel_error: float  # abs_error / max(|analytic|, |numeric|, atol / rtol): passes when ≤ rtol
    allowed: float  # the abs_error that passes: max(atol, rtol · max(|analytic|, |numeric|))

    @property
    def passed(self):
        return bool(self.abs_error <= self.allowed)


@dataclass(frozen=True)
class VjpReport(GradcheckReport):
    """Per-direction results of :func:`check_vjp` (its ``checks`` are :class:`DirectionCheck`)."""

    def __str__(self):
        head = (
            f"check_vjp (eps={self.eps:g}, rtol={self.rtol:g}, atol={self.atol:.3g}): "
            f"{'passed' if self.passed else 'FAILED'}"
        )
        rows = [f"{'direction':<12} {'rel.err':>10} {'abs.err':>10} {'allowed':>10}  Σ⟨grad, δ⟩ vs ⟨d_out, J δ⟩"]
        for c in self.checks:
            rows.append(
                f"{c.name:<12} {c.rel_error:10.3e} {c.abs_error:10.3e} {c.allowed:10.3e}  "
                f"{c.analytic:.15g} vs {c.numeric:.15g}{'' if c.passed else '  <-- FAIL'}"
            )
        return "\n".join([head] + rows)


class VjpError(GradcheckError):
    """Raised by :func:`check_vjp` on failure; ``.report`` holds the :class:`VjpReport`."""


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
    g = np.asarray(g, dtype=np.float64)
    if g.shape != x.shape:
        raise ValueError(f"gradcheck: the gradient of {name} has shape {g.shape}, the input {x.shape}")
    yield name, x, g


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


class _Linearised:
    """``fn`` at copies of its inputs with seeded cotangents: the scalar ``L = Σ cotangent · output``
    (``loss0`` at the inputs), the size ``magnitude = ‖cotangent ⊙ output‖₂`` its rounding error
    scales with, and ``targets``: (name, input array, gradient) for every differentiable leaf, the
    gradients from ``backward``.  :meth:`loss_along` moves target arrays in place, then restores them."""

    def __init__(self, fn, backward, inputs, options, rng):
        self.fn = fn
        self.inputs = [_copy(x) for x in inputs]
        self.options = {
            k: (_copy(v) if isinstance(v, np.ndarray) or hasattr(v, "_fields") else v) for k, v in options.items()
        }
        outs = _outputs(fn(*self.inputs, **self.options))
        self.finite = [np.isfinite(o) for o in outs]  # lse = -inf on empty rows takes no cotangent
        self.cots = [np.where(f, rng.standard_normal(o.shape), 0.0) for o, f in zip(outs, self.finite)]
        terms = [c * np.where(f, o, 0.0) for o, c, f in zip(outs, self.cots, self.finite)]
        self.loss0 = sum(float(np.sum(t)) for t in terms)
        self.magnitude = math.sqrt(sum(float(np.sum(np.square(t))) for t in terms))

        bparams = _params(backward)
        b_opts = (
            self.options if bparams is None else {k: v for k, v in self.options.items() if _backward_takes(k, bparams)}
        )
        extra_names = (
            []
            if bparams is None
            else [n for n, p in bparams.items() if p.kind == inspect.Parameter.KEYWORD_ONLY and n.startswith("d_")]
        )
        if len(self.cots) - 1 > len(extra_names):
            raise ValueError(
                f"gradcheck: fn returns {len(self.cots)} outputs but backward takes cotangents {extra_names}"
            )
        grads = backward(self.cots[0], *self.inputs, **dict(zip(extra_names, self.cots[1:])), **b_opts)
        self.targets = list(_grad_targets(fn, grads, self.inputs, self.options))

    def loss(self):
        ys = _outputs(self.fn(*self.inputs, **self.options))
        return sum(float(np.sum(c * np.where(f, y, 0.0))) for y, c, f in zip(ys, self.cots, self.finite))

    def loss_along(self, moves, t):
        """``L`` with every ``(array, index, δ)`` of ``moves`` set to ``array[index] + t·δ``, then restored."""
        saved = [np.array(x[i], copy=True) for x, i, _ in moves]
        for (x, i, d), x0 in zip(moves, saved):
            x[i] = x0 + t * d  # δ = 0 keeps a -inf bias entry at -inf
        try:
            return self.loss()
        finally:
            for (x, i, _), x0 in zip(moves, saved):
                x[i] = x0

    def atol(self, diffs, eps, stencil):
        """The default atol of a quotient with step ``eps``: the larger of the rounding bound
        ``ROUNDING · ε · (1 + magnitude) / eps`` and ``NOISE`` standard deviations of the noise
        measured from the differences ``diffs`` of :func:`_central` (ops that cancel inside).  The
        median of ``|Δ|``, not their mean square: an entry near a kink must not loosen the rest."""
        bound = ROUNDING * _EPS * (1.0 + self.magnitude) / eps
        if not diffs:
            return bound
        k = stencil[-1][0]
        sigma = float(np.median(np.abs(diffs))) / _MEDIAN_ABS_NORMAL / math.sqrt(math.comb(4 * k, 2 * k))  # one L's
        return max(bound, NOISE * sigma * math.sqrt(2 * math.fsum(c * c for _, c in stencil)) / eps)


def _central(phi, phi0, eps, stencil):
    """``(φ'(0), Δ)`` by the central ``stencil`` ``((1, c_1), ..., (k, c_k))``: the quotient
    ``Σ_m c_m (φ(m·eps) − φ(−m·eps)) / eps`` and, from the same values and ``phi0 = φ(0)``, the
    difference ``Δ = Σ_j (−1)^j C(2k, j) φ((j − k)·eps)``, which is ``O(eps^2k)`` for a smooth φ:
    what remains is the evaluations' rounding noise, of variance ``C(4k, 2k) σ²``."""
    k = stencil[-1][0]
    values = {0: phi0}
    for m, _ in stencil:
        values[m], values[-m] = phi(m * eps), phi(-m * eps)
    slope = sum(c * (values[m] - values[-m]) for m, c in stencil) / eps
    return slope, sum((-1) ** j * math.comb(2 * k, j) * values[j - k] for j in range(2 * k + 1))


def gradcheck(
    fn, backward, inputs, *, options=None, eps=1e-4, rtol=1e-8, atol=None, seed=0, raise_on_failure=True, **more_options
):
    """Compare ``backward`` with central differences of ``fn`` in float64, entry by entry.

    ``fn(*inputs, **options)`` returns an array or a tuple of arrays;
    ``backward(d_out, *inputs, d_<name>=..., **options)`` returns a NamedTuple
    whose fields ``d<input>`` name positional inputs or array options (e.g.
    ``dbias``); ``None`` fields are skipped.  Cotangents after the first are
    passed as the backward's keyword-only ``d_*`` parameters, in order.
    Options named ``return_*`` (e.g. ``return_lse``) select outputs and
    reach the backward only if it names them; other options always reach it.

    The numeric derivative of ``L = Σ cotangent · output`` is the sixth-order
    central difference ``(45(L₁ − L₋₁) − 9(L₂ − L₋₂) + (L₃ − L₋₃)) / 60h``,
    ``L_m = L(x + m·h)``, ``h = eps`` (six calls of ``fn`` per entry).  Per input,
    with ``err = max|analytic − numeric|`` and the gradient's scale
    ``scale = max(max|numeric|, max|analytic|)``, it passes when
    ``err <= max(rtol · scale, atol)``; then ``rel_error = err / max(scale, atol / rtol)``
    is ≤ rtol, so a gradient near 0 is judged by the absolute error the quotient
    can resolve instead of reading 1.0.  ``atol`` defaults to the quotient's
    rounding error: the larger of ``32 · eps_machine · (1 + ‖cotangent ⊙ output‖₂) / eps``
    and 8 standard deviations of the noise measured in the same calls (from
    the sixth differences of ``L``, their median over every entry).  NaN in
    the analytic gradient fails.  Returns a :class:`GradcheckReport`; raises
    :class:`GradcheckError` on failure.

    Parameters
    ----------
    fn : callable
        The forward, ``fn(*inputs, **options)``: an array or a tuple of arrays (float outputs are
        differentiated; bool outputs, such as validity masks, are not).
    backward : callable
        ``backward(d_out, *inputs, d_<name>=..., **options)`` returning a NamedTuple of
        gradients whose fields ``d<input>`` name ``fn``'s positional inputs or array options.
    inputs : sequence
        The positional inputs: float arrays (every entry perturbed, ``-inf`` entries left alone),
        NamedTuples or tuples of arrays (each leaf checked, named ``gate.w1``), or other values.
        Copied: never mutated.
    options : dict, optional
        Keyword options for ``fn`` (and ``backward``, as above); an array option with a gradient
        field (``bias`` with ``dbias``) is checked like an input.  Default None.
    eps : float, default 1e-4
        The finite-difference step ``h``.
    rtol : float, default 1e-8
        Relative tolerance, against the gradient's scale.
    atol : float, optional
        Absolute floor of the error.  Default None: the quotient's measured rounding error (above).
    seed : int, default 0
        Seeds the random cotangents.
    raise_on_failure : bool, default True
        Raise :class:`GradcheckError` on failure; False returns the failing report.
    **more_options
        More keyword options, merged into ``options``.

    Returns
    -------
    GradcheckReport
        An :class:`InputCheck` per differentiable leaf; ``str()`` gives a table.

    Raises
    ------
    GradcheckError
        When an input fails and ``raise_on_failure`` (its ``.report`` holds the table).
    """
    lin = _Linearised(fn, backward, inputs, dict(options or {}, **more_options), np.random.default_rng(seed))
    numerics, diffs = [], []
    for _, x, _ in lin.targets:
        numeric = np.zeros(x.shape)
        for idx in np.ndindex(*x.shape):
            if np.isfinite(x[idx]):  # -inf bias entries are not perturbed
                numeric[idx], d = _central(partial(lin.loss_along, [(x, idx, 1.0)]), lin.loss0, eps, _FD6)
                diffs.append(d)
        numerics.append(numeric)
    atol_used = lin.atol(diffs, eps, _FD6) if atol is None else float(atol)
    checks = []
    for (name, x, g), numeric in zip(lin.targets, numerics):
        diff = np.abs(g - numeric)
        diff = np.where(np.isnan(diff), np.inf, diff)
        worst = np.unravel_index(int(np.argmax(diff)), x.shape) if x.size else ()
        err = float(diff.max()) if x.size else 0.0
        scale = max(float(np.max(np.abs(numeric), initial=0.0)), float(np.nanmax(np.abs(g), initial=0.0)))
        checks.append(
            InputCheck(
                name=name,
                shape=x.shape,
                max_abs_error=err,
                rel_error=_relative(err, scale, atol_used, rtol),
                allowed=max(atol_used, rtol * scale),
                worst_index=tuple(int(i) for i in worst),
                analytic=float(g[worst]) if x.size else 0.0,
                numeric=float(numeric[worst]) if x.size else 0.0,
                scale=scale,
            )
        )
    report = GradcheckReport(checks, eps, rtol, atol_used)
    if raise_on_failure and not report.passed:
        raise GradcheckError(report)
    return report


def check_vjp(
    forward,
    backward,
    inputs,
    *,
    options=None,
    eps=1e-3,
    rtol=1e-8,
    atol=None,
    seed=0,
    per_input=True,
    raise_on_failure=True,
    **more_options,
):
    """Compare ``backward`` with random directional derivatives of ``forward``: cheap at any size.

    ``forward``, ``backward``, ``inputs`` and options as for :func:`gradcheck`, whose
    seeded cotangents ``d_out`` (one per float output) define
    ``L(x) = Σ ⟨d_out, forward(x)⟩``.  Each differentiable input ``x_i`` (every array
    leaf) gets a random direction ``δ_i = rms(x_i) · z_i``, ``z_i`` standard
    normal and 0 on non-finite entries, so ``eps`` is relative to the input's
    size.  The identity checked is ``⟨d_out, J δ⟩ = Σ_i ⟨backward(d_out)_i, δ_i⟩``;
    its left side is the eighth-order central difference of ``φ(t) = L(x + tδ)``,
    ``Σ_m c_m (φ(mh) − φ(−mh)) / h``, ``m = 1..4``, ``c = 4/5, −1/5, 4/105, −1/280``,
    ``h = eps`` (error ``O(h⁸)``; eight calls of ``forward``).  The directions are
    ``"all"`` (every input moved at once) and, with ``per_input``, each input
    alone, so a failure names the input: ``1 + 8 · (1 + inputs)`` calls in all.

    A direction passes when ``|analytic − numeric| <= max(rtol · scale, atol)``,
    ``scale = max(|analytic|, |numeric|)``; ``rel_error = |analytic − numeric| /
    max(scale, atol / rtol)``.  ``atol`` defaults as in :func:`gradcheck` (the
    noise measured from the eighth differences of φ, their median over the
    directions).  ``|⟨g, δ⟩|`` is of the order of ``‖g‖₂ · rms(x)``, so a
    gradient off by a factor ``1 + 3e-7`` fails ``rtol = 1e-8`` thirty times
    over.  Choose ``eps`` so that ``x ± 4·eps·δ`` stays where ``forward`` is smooth
    (attention maps with entries near 0 need ``eps ≈ 1e-4``).  Returns a
    :class:`VjpReport`; raises :class:`VjpError` on failure.

    Parameters
    ----------
    forward, backward, inputs
        As :func:`gradcheck`.
    options : dict, optional
        Keyword options, as :func:`gradcheck`.  Default None.
    eps : float, default 1e-3
        The step ``h`` along each direction, relative to the inputs' size (``δ_i`` has the rms of
        ``x_i``).
    rtol : float, default 1e-8
        Relative tolerance, against ``max(|analytic|, |numeric|)``.
    atol : float, optional
        Absolute floor of the error.  Default None: the measured rounding noise (above).
    seed : int, default 0
        Seeds the cotangents and the directions.
    per_input : bool, default True
        Also move each input alone, so that a failure names it; False checks the direction
        ``"all"`` only (9 calls of ``forward``).
    raise_on_failure : bool, default True
        Raise :class:`VjpError` on failure; False returns the failing report.
    **more_options
        More keyword options, merged into ``options``.

    Returns
    -------
    VjpReport
        A :class:`DirectionCheck` per direction; ``str()`` gives a table.

    Raises
    ------
    VjpError
        When a direction fails and ``raise_on_failure``.
    """
    rng = np.random.default_rng(seed)
    lin = _Linearised(forward, backward, inputs, dict(options or {}, **more_options), rng)
    moves, analytic = [], []
    for name, x, g in lin.targets:
        finite = np.isfinite(x)
        rms = float(np.sqrt(np.mean(np.square(x[finite])))) if finite.any() else 0.0
        delta = np.where(finite, (rms or 1.0) * rng.standard_normal(x.shape), 0.0)  # δ: (shape of x)
        moves.append((name, (x, Ellipsis, delta)))
        analytic.append(float(np.sum(g * delta)))
    directions = [("all", [m for _, m in moves], sum(analytic))] if len(moves) > 1 or not per_input else []
    if per_input:
        directions += [(name, [m], a) for (name, m), a in zip(moves, analytic)]
    numerics = [_central(partial(lin.loss_along, move), lin.loss0, eps, _FD8) for _, move, _ in directions]
    atol_used = lin.atol([d for _, d in numerics], eps, _FD8) if atol is None else float(atol)
    checks = []
    for (name, _, a), (n, _) in zip(directions, numerics):
        err = abs(a - n)
        err = np.inf if np.isnan(err) else err
        scale = max(abs(a), abs(n))
        checks.append(
            DirectionCheck(
                name=name,
                analytic=a,
                numeric=n,
                abs_error=err,
                rel_error=_relative(err, scale, atol_used, rtol),
                allowed=max(atol_used, rtol * scale),
            )
        )
    report = VjpReport(checks, eps, rtol, atol_used)
    if raise_on_failure and not report.passed:
        raise VjpError(report)
    return report


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
