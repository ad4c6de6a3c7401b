"""Precision-aware tolerance rules: is a candidate's attention output (and gradient) right?

A candidate computed in ``dtype`` is compared with the float64 golden (:func:`refattn.sdpa`), and
its error is judged against the error of the low-precision twins (:mod:`refattn.lowp`), the same
computation done the ways correct kernels in that dtype do it (:data:`refattn.lowp.TWIN_VARIANTS`:
where the scale is applied, exp2, online softmax in tiles, P recomputed from the stored lse); the
largest twin error sets the budget.  Rules (``specs/compare.md``):

* ``"flash"`` (flash-attn, FA3/FA4): ``max|actual − golden| ≤ k · max|twin − golden| + floor``,
  ``k = 2`` for outputs and 3 for gradients, ``floor = 2 · max|rd(rd(rd(g) + 0.3) − 0.3) − rd(g)|``
  (the rounding error of one addition at the scale of the values, in ``dtype``).
* ``"torch"`` (PyTorch's SDPA tests): elementwise ``|actual − golden| ≤ atol + rtol · |golden|`` with
  ``atol = fudge · max(max|twin − golden|, atol₀)``, ``rtol = fudge · max(max |twin − golden|/|golden|,
  rtol₀)`` (the max over elements with ``|golden| > atol``), ``fudge = 5`` by default, ``atol₀/rtol₀``
  PyTorch's per-dtype defaults.
* ``"allclose"``: fixed elementwise ``atol + rtol · |golden|`` per dtype, for outputs and for
  gradients (xformers' forward and backward values).

A float64 candidate has no meaningful twin (a float64 twin is the golden); every rule then allows
``FLOAT64_BUDGET · max(1, max|golden|)``, the budget refattn holds its own kernels to.
NaN and ±inf must sit where the golden has them; elsewhere they fail.

Axes as :func:`refattn.sdpa`: ``...`` batch, ``Hq``/``Hk`` query/kv heads, ``Lq``/``Lk`` lengths,
``D``/``Dv`` head dims.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from refattn import lowp
from refattn._validate import RefAttnError, RefAttnTypeError, as_choice, check_keywords_of, is_extension_float, to_numpy
from refattn.attention.options import takes_sdpa_options
from refattn.attention.sdpa import sdpa, sdpa_backward, validate

__all__ = [
    "ALLCLOSE_GRAD_TOLERANCES",
    "ALLCLOSE_TOLERANCES",
    "AttentionMismatch",
    "FLOAT64_BUDGET",
    "Judgement",
    "RULES",
    "TORCH_DEFAULTS",
    "Verdict",
    "assert_attention_close",
    "check_attention",
    "judge",
]

#: The tolerance rules (``rule=``).
RULES = ("flash", "torch", "allclose")
FLASH_FACTOR = {"output": 2.0, "gradient": 3.0}
TORCH_FUDGE = 5.0
#: A float64 candidate's budget, relative to ``max(1, max|golden|)``, under every rule.
FLOAT64_BUDGET = 1e-12
#: The torch rule's ``{dtype: (atol₀, rtol₀)}``, PyTorch test_transformers.py's
#: default_atol/default_rtol (float32, float16, bfloat16); float8: the bfloat16 values scaled by the
#: ratio of unit roundoffs (refattn's extension, not PyTorch's).
TORCH_DEFAULTS = {
    "float32": (1e-5, 1.3e-6),
    "float16": (1e-3, 1e-3),
    "bfloat16": (1e-3, 1.6e-2),
    "float8_e4m3": (1.6e-2, 2.56e-1),
    "float8_e5m2": (3.2e-2, 5.12e-1),
}
#: The allclose rule's ``{dtype: (atol, rtol)}`` for outputs, xformers' memory-efficient attention
#: ERROR_ATOL / ERROR_RTOL (float32, float16, bfloat16); float8: the bfloat16 values scaled by the
#: ratio of unit roundoffs.
ALLCLOSE_TOLERANCES = {
    "float32": (3e-4, 2e-5),
    "float16": (4e-3, 4e-4),
    "bfloat16": (2e-2, 5e-3),
    "float8_e4m3": (3.2e-1, 8e-2),
    "float8_e5m2": (6.4e-1, 1.6e-1),
}
#: The allclose rule's ``{dtype: (atol, rtol)}`` for gradients, xformers' AttentionBwOpBase
#: ERROR_ATOL / ERROR_RTOL; float8 scaled as above.
ALLCLOSE_GRAD_TOLERANCES = {
    "float32": (9e-4, 1e-4),
    "float16": (0.2, 0.02),
    "bfloat16": (0.9, 0.1),
    "float8_e4m3": (14.4, 1.6),
    "float8_e5m2": (28.8, 3.2),
}
_KIND = {"out": "output", "lse": "output"}


class AttentionMismatch(AssertionError):
    """A candidate outside the tolerance rule; the message is the full report."""

    def __init__(self, verdict):
        super().__init__(verdict.report())
        self.verdict = verdict


@dataclass
class Judgement:
    """The rule applied to one quantity (``out``, ``lse``, ``dq``, ...)."""

    quantity: str
    rule: str
    dtype: str
    passed: bool
    max_error: float  # max |actual − golden| over positions finite in both
    allowed: float  # the budget at the worst element (flash: the whole bound)
    twin_error: float  # max |twin − golden| (0 for float64)
    floor: float
    worst_index: tuple | None
    actual_value: float
    golden_value: float
    over_budget: int  # elements over the budget
    size: int
    worst_rows: list = field(default_factory=list)  # [(row index, max error)], worst first
    rows_over: int = 0
    rows: int = 0
    confined_to_masked: bool | None = None  # every failing row is a masked/padded row
    nonfinite: str = ""  # NaN/inf placement differences, "" when identical
    twin_name: str = ""  # the admissible twin whose error is largest (sets the budget)
    closest_twin: str = ""  # the admissible twin nearest the candidate: the choices it most likely makes
    closest_distance: float = math.nan  # max |actual − that twin|

    @property
    def ratio(self):
        """max error / allowed: ≤ 1 passes (the ratio of the worst element for elementwise rules)."""
        return self.max_error / self.allowed if self.allowed > 0 else (0.0 if self.max_error == 0 else math.inf)

    def report(self):
        """This quantity's lines of the report: status; the worst element (index, actual, golden);
        allowed, floor, twin error and the twin that sets it; the closest twin; the error ratios;
        the elements and rows over budget, the worst rows and whether the failures are confined to
        masked/padded rows; NaN/inf placement differences."""
        status = "ok" if self.passed else "FAIL"
        lines = [f"{self.quantity}: {status} (rule {self.rule!r}, dtype {self.dtype})"]
        if self.worst_index is not None:
            lines.append(
                f"  max |actual − golden| = {self.max_error:.3e} at index {self.worst_index}: "
                f"actual {self.actual_value!r}, golden {self.golden_value!r}"
            )
        named = f" ({self.twin_name})" if self.twin_name else ""
        twin = f"; twin error {self.twin_error:.3e}{named}" if self.dtype != "float64" else ""
        ratio = f"error/twin {self.max_error / self.twin_error:.2f}" if self.twin_error > 0 else "twin exact"
        lines.append(
            f"  allowed {self.allowed:.3e} (floor {self.floor:.3e}{twin}); error ratio {self.ratio:.2f}, {ratio}"
        )
        if self.closest_twin and self.dtype != "float64":
            lines.append(f"  closest twin: {self.closest_twin} (max |actual − twin| = {self.closest_distance:.3e})")
        if self.over_budget:
            where = ""
            if self.confined_to_masked is not None:
                where = "; all in masked/padded rows" if self.confined_to_masked else "; not only in masked/padded rows"
            counts = f"{self.over_budget} of {self.size} elements over budget"
            lines.append(f"  {counts}, in {self.rows_over} of {self.rows} rows{where}")
            shown = ", ".join(f"{idx}: {err:.3e}" for idx, err in self.worst_rows)
            lines.append(f"  worst rows (index: max error): {shown}")
        if self.nonfinite:
            lines.append(f"  NaN/inf: {self.nonfinite}")
        return "\n".join(lines)


@dataclass
class Verdict:
    """Every quantity judged for one candidate; truthy when all pass."""

    judgements: list

    @property
    def passed(self):
        return all(j.passed for j in self.judgements)

    def __bool__(self):
        return self.passed

    def __getitem__(self, quantity):
        for j in self.judgements:
            if j.quantity == quantity:
                return j
        raise KeyError(quantity)

    def report(self):
        """The full report: a headline (``refattn: candidate matches`` or ``does NOT match``), then
        each :meth:`Judgement.report` (the message of :class:`AttentionMismatch`)."""
        head = "refattn: candidate matches" if self.passed else "refattn: candidate does NOT match"
        return "\n".join([head] + [j.report() for j in self.judgements])


def _floor(golden, fmt):
    """flash-attn's floor ``2 · max|rd(rd(rd(g) + 0.3) − 0.3) − rd(g)|`` computed in ``fmt``."""
    g = lowp.round_to(golden, fmt)
    return 2.0 * float(np.max(np.abs(lowp.round_to(lowp.round_to(g + 0.3, fmt) - 0.3, fmt) - g), initial=0.0))


def _nonfinite_placement(actual, golden):
    """A description of where NaN/±inf differ, "" when they sit at the same places."""
    notes = []
    for what, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        a, g = test(actual), test(golden)
        extra, missing = a & ~g, g & ~a
        if extra.any():
            first = tuple(int(i) for i in np.argwhere(extra)[0])
            notes.append(f"actual has {int(extra.sum())} {what} where golden has none, first at {first}")
        if missing.any():
            first = tuple(int(i) for i in np.argwhere(missing)[0])
            notes.append(f"golden has {int(missing.sum())} {what} where actual has none, first at {first}")
    return "; ".join(notes)


def _as_real_array(x, name):
    """``x`` as a new float64 array; a complex, bool, string or object array is a
    :class:`RefAttnTypeError` (a cast would drop the imaginary part or invent numbers).  NaN and
    ±inf are kept: where they sit is judged."""
    a = to_numpy(x, name)
    if not (is_extension_float(a.dtype) or (a.dtype != bool and a.dtype.kind in "iuf")):
        what = "; its imaginary part would be dropped" if a.dtype.kind == "c" else ""
        raise RefAttnTypeError(
            f"{name}: expected real numbers (a float or int array), got dtype {a.dtype} with shape {a.shape}{what}"
        )
    return np.array(a, dtype=np.float64, copy=True)


def judge(
    quantity,
    actual,
    golden,
    twin=None,
    *,
    dtype,
    rule="flash",
    kind=None,
    masked_rows=None,
    factor=None,
    fudge=TORCH_FUDGE,
    atol=None,
    rtol=None,
    max_rows=5,
):
    """Apply ``rule`` to one quantity; returns a :class:`Judgement` (raises nothing on a mismatch).

    With ``e = |actual − golden|`` where both are finite, ``g = golden`` and ``t`` the twin
    envelope (elementwise the largest ``|twin_i − golden|``): ``"flash"`` passes when
    ``max e <= k · max t + floor``; ``"torch"`` and ``"allclose"`` when elementwise
    ``e <= atol + rtol · |g|`` (see the module docstring and ``specs/compare.md``).  For
    ``dtype="float64"`` every rule allows ``FLOAT64_BUDGET · max(1, max|g|)``.  NaN and ``±inf``
    must sit where the golden has them.

    Parameters
    ----------
    quantity : str
        Its name in the report (``"out"``, ``"lse"``, ``"dq"``, ...); also sets ``kind``'s default.
    actual : array_like
        The candidate's values, any shape; real (float, int, bfloat16/float8), NaN and ``±inf``
        allowed.
    golden : array_like
        The float64 reference, of ``actual``'s shape.
    twin : array_like or mapping of str to array_like, optional
        The low-precision twin's values, of that shape, or ``{name: array}`` of several admissible
        twins (the one with the largest error is named in the report).  Ignored for float64.
        Default None: no twin (twin error 0).
    dtype : str, dtype or Format
        The precision the candidate computed in (:func:`refattn.lowp.format_of`).
    rule : {"flash", "torch", "allclose"}, default "flash"
        The tolerance rule.
    kind : {"output", "gradient"}, optional
        Sets flash's ``k`` (2 or 3) and the allclose table.  Default None: ``"output"`` for
        ``out`` and ``lse``, ``"gradient"`` otherwise.
    masked_rows : array_like of bool, broadcastable to actual.shape[:-1], optional
        True on rows that are masked or padded: the report says whether every failing row is one.
        Default None.
    factor : float, optional
        Overrides flash's ``k``.  Default None.
    fudge : float, default 5.0
        The torch rule's multiplier of the twin's errors (``TORCH_FUDGE``).
    atol, rtol : float, optional
        Override the torch/allclose tolerances (the torch rule's derived ones included).  Default
        None.
    max_rows : int, default 5
        How many of the worst rows the judgement keeps for the report.

    Returns
    -------
    Judgement
        Pass or fail, the errors, the budget and where the worst elements and rows are.

    Raises
    ------
    RefAttnError
        Shapes that differ, an unknown rule, kind or dtype (``RefAttnTypeError`` for a complex,
        bool or non-numeric array).
    """
    as_choice(rule, "rule", RULES)
    fmt = lowp.format_of(dtype)
    kind = kind or _KIND.get(quantity, "gradient")
    as_choice(kind, "kind", ("output", "gradient"))
    actual = _as_real_array(actual, f"actual ({quantity!r})")  # also bfloat16/float8 (ml_dtypes) arrays
    golden = _as_real_array(golden, f"golden ({quantity!r})")
    if actual.shape != golden.shape:
        raise RefAttnError(f"{quantity}: expected shape {golden.shape} (the golden's), got {actual.shape}")
    twins = {} if twin is None or fmt.name == "float64" else (twin if isinstance(twin, Mapping) else {"": twin})
    twins = {name: _as_real_array(t, f"twin {name!r} ({quantity!r})") for name, t in twins.items()}
    both = np.isfinite(actual) & np.isfinite(golden)
    with np.errstate(invalid="ignore"):  # inf − inf where both are infinite: not an error, skipped
        err = np.where(both, np.abs(actual - golden), 0.0)
        twin_diffs = {}
        for name, t in twins.items():
            if t.shape != golden.shape:
                raise RefAttnError(f"twin {name!r}: expected shape {golden.shape}, got {t.shape}")
            twin_diffs[name] = np.where(np.isfinite(t) & np.isfinite(golden), np.abs(t - golden), 0.0)
    twin_diff = np.zeros(golden.shape)  # the envelope: elementwise the largest admissible error
    twin_err, twin_name = 0.0, ""
    for name, d in twin_diffs.items():
        twin_diff = np.maximum(twin_diff, d)
        if float(d.max(initial=0.0)) > twin_err:
            twin_err, twin_name = float(d.max()), name
    closest_twin, closest_distance = "", math.nan
    for name, t in twins.items():
        with np.errstate(invalid="ignore"):
            dist = float(np.max(np.where(both & np.isfinite(t), np.abs(actual - t), 0.0), initial=0.0))
        if name and (not closest_twin or dist < closest_distance):  # the first of equals
            closest_twin, closest_distance = name, dist
    scale_g = float(np.max(np.abs(np.where(np.isfinite(golden), golden, 0.0)), initial=0.0))
    floor = 0.0
    if fmt.name == "float64":
        budget = np.full(err.shape, FLOAT64_BUDGET * max(1.0, scale_g))
    elif rule == "flash":
        floor = _floor(np.where(np.isfinite(golden), golden, 0.0), fmt)
        k = FLASH_FACTOR[kind] if factor is None else float(factor)
        budget = np.full(err.shape, k * twin_err + floor)
    else:
        if rule == "torch":
            atol0, rtol0 = TORCH_DEFAULTS[fmt.name]
            atol_ = fudge * max(twin_err, atol0) if atol is None else atol
            # relative twin error only where |golden| exceeds atol: near-zero goldens (already
            # covered by atol) would otherwise make rtol unbounded (PyTorch takes every element)
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.where(both & (np.abs(golden) > atol_), twin_diff / np.abs(golden), 0.0)
            rtol_ = fudge * max(float(np.max(rel, initial=0.0)), rtol0) if rtol is None else rtol
        else:
            table = ALLCLOSE_TOLERANCES if kind == "output" else ALLCLOSE_GRAD_TOLERANCES
            atol0, rtol0 = table[fmt.name]
            atol_, rtol_ = (atol0 if atol is None else atol), (rtol0 if rtol is None else rtol)
        floor = atol_
        budget = atol_ + rtol_ * np.abs(np.where(np.isfinite(golden), golden, 0.0))
    over = err > budget
    nonfinite = _nonfinite_placement(actual, golden)
    worst = None
    actual_value = golden_value = math.nan
    if err.size:
        flat = int(np.argmax(err / np.maximum(budget, 1e-300))) if over.any() else int(np.argmax(err))
        worst = tuple(int(i) for i in np.unravel_index(flat, err.shape))
        actual_value, golden_value = float(actual[worst]), float(golden[worst])
    max_error = float(err.max(initial=0.0))
    allowed = float(budget[worst]) if worst is not None else float(budget.max(initial=0.0))
    j = Judgement(
        quantity,
        rule,
        fmt.name,
        not over.any() and not nonfinite,
        max_error,
        allowed,
        twin_err,
        floor,
        worst,
        actual_value,
        golden_value,
        int(over.sum()),
        int(err.size),
        nonfinite=nonfinite,
        twin_name=twin_name,
        closest_twin=closest_twin,
        closest_distance=closest_distance,
    )
    if err.ndim >= 1 and err.size:
        bad_rows = over.reshape(-1, err.shape[-1]).any(axis=-1) if err.ndim > 1 else over
        row_err = err.reshape(-1, err.shape[-1]).max(axis=-1) if err.ndim > 1 else err
        row_shape = err.shape[:-1] if err.ndim > 1 else err.shape
        j.rows, j.rows_over = int(bad_rows.size), int(bad_rows.sum())
        order = np.argsort(-row_err, kind="stable")[:max_rows]
        j.worst_rows = [(tuple(int(i) for i in np.unravel_index(r, row_shape)), float(row_err[r])) for r in order]
        if masked_rows is not None and bad_rows.any():
            m = np.broadcast_to(np.asarray(masked_rows, dtype=bool), row_shape).reshape(-1)
            j.confined_to_masked = bool(np.all(m[bad_rows]))
    return j


_GRAD_NAMES = ("dq", "dk", "dv", "dbias", "dsinks")


def _as_grad_map(grads):
    if grads is None:
        return {}
    if isinstance(grads, Mapping):
        unknown = set(grads) - set(_GRAD_NAMES)
        if unknown:
            raise RefAttnError(f"grads: expected keys among {_GRAD_NAMES}, got {sorted(unknown)}")
        return {k: v for k, v in grads.items() if v is not None}
    grads = tuple(grads)
    if not 3 <= len(grads) <= 5:
        raise RefAttnError(f"grads: expected (dq, dk, dv[, dbias, dsinks]) or a mapping, got {len(grads)} items")
    return {name: g for name, g in zip(_GRAD_NAMES, grads) if g is not None}


def _masked_rows(q, k, v, options):
    """Rows of out/dq (..., Hq, Lq) with no allowed key, and rows of dk/dv (..., Hk, Lk) no query sees."""
    a = validate(q, k, v, **options)
    if a.allowed is None:
        return None, None
    allowed = np.broadcast_to(a.allowed, a.score_shape)
    query_rows = ~allowed.any(axis=-1)
    *lead, hq, lq, lk = a.score_shape
    key_rows = ~allowed.reshape(*lead, hq // a.groups, a.groups, lq, lk).any(axis=(-3, -2))
    return query_rows, key_rows


@takes_sdpa_options(
    refuses={"backend": 'the golden is refattn.sdpa with backend="auto" (every backend within 1e-12 of it)'}
)
def check_attention(
    actual,
    q,
    k,
    v,
    *,
    dtype,
    lse=None,
    grads=None,
    d_out=None,
    d_lse=None,
    rule="flash",
    accumulate="float32",
    twins="admissible",
    intermediate_dtype=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    factor_out=None,
    factor_grad=None,
    fudge=TORCH_FUDGE,
    atol=None,
    rtol=None,
    return_lse=False,
    **options,
):
    """Judge a candidate's ``out`` (and ``lse``, gradients) against the golden; returns a :class:`Verdict`.

    The golden is :func:`refattn.sdpa` / :func:`refattn.sdpa_backward` in float64 on ``q, k, v``
    and the sdpa options; the twins are :func:`refattn.lowp.sdpa_twin` /
    :func:`~refattn.lowp.sdpa_twin_backward` in ``dtype``, once per admissible implementation;
    each quantity is judged by :func:`judge` under ``rule``, its twin error the largest over the
    twins.  The options are :func:`refattn.sdpa`'s, as passed to the candidate; ``return_lse`` is
    accepted and ignored (the options of an sdpa call pass as they are; ``lse`` is judged when
    given); ``backend`` is refused (the golden uses ``backend="auto"``).

    Parameters
    ----------
    actual : array_like, shape (..., Hq, Lq, Dv)
        The candidate's output for these inputs and options; any real dtype.
    q : array_like, shape (..., Hq, Lq, D)
        The float64 values the candidate's query input held (its low-precision inputs converted
        exactly; the twins round to ``dtype``, which leaves them unchanged).
    k : array_like, shape (..., Hk, Lk, D)
        Keys, likewise; ``Hk`` divides ``Hq``.
    v : array_like, shape (..., Hk, Lk, Dv)
        Values, likewise.
    dtype : str, dtype or Format
        The precision the candidate computed in (:func:`refattn.lowp.format_of`); ``"float64"``
        gets the fixed float64 budget.
    lse : array_like, shape (..., Hq, Lq), optional
        The candidate's log-sum-exp, judged as an output.  Default None: not judged.
    grads : mapping or tuple, optional
        The candidate's gradients for ``d_out`` (and ``d_lse``): a mapping with keys among dq, dk,
        dv, dbias, dsinks or a tuple ``(dq, dk, dv[, dbias, dsinks])``; None entries are skipped.
        Default None: no gradient judged.
    d_out : array_like, shape (..., Hq, Lq, Dv), optional
        The cotangent the gradients were computed for; required with ``grads``.  Default None.
    d_lse : array_like, shape (..., Hq, Lq), optional
        The lse cotangent, if the gradients include one.  Default None.
    rule : {"flash", "torch", "allclose"}, default "flash"
        The tolerance rule for every quantity (module docstring, ``specs/compare.md``).
    accumulate : {"float32", "float64"}, default "float32"
        The twins' accumulation precision.
    twins : str or mapping, default "admissible"
        The implementations the budget covers: ``"admissible"`` (every entry of
        :data:`refattn.lowp.TWIN_VARIANTS`), one of their names, or a mapping ``{name: choices}``
        of :func:`refattn.lowp.sdpa_twin` keyword choices.
    intermediate_dtype : str, dtype or Format, optional
        The format the kernel rounds P to before the P·V product, given to every twin
        (:func:`refattn.lowp.sdpa_twin`; FA3's fp8: ``"float8_e4m3"`` with ``dtype="bfloat16"``).
        Default None.
    q_descale, k_descale, v_descale : array_like, shape broadcastable to (..., Hk), optional
        FA3's fp8 descales, given to every twin; the golden is sdpa on ``q·q_descale`` (repeated
        over each GQA group), ``k·k_descale``, ``v·v_descale`` in float64, its gradients taken back
        to ``q, k, v`` by the chain rule.  Default None each.
    factor_out : float, optional
        Overrides flash's ``k`` for ``out`` and ``lse``.  Default None: 2.
    factor_grad : float, optional
        Overrides flash's ``k`` for the gradients.  Default None: 3.
    fudge : float, default 5.0
        The torch rule's multiplier of the twin's errors.
    atol, rtol : float, optional
        Override the torch/allclose tolerances of every quantity.  Default None.
    return_lse : bool, default False
        Accepted and ignored.

    Returns
    -------
    Verdict
        One :class:`Judgement` for ``out``, then ``lse`` and each gradient given; truthy when all
        pass; ``.report()`` explains.

    Raises
    ------
    RefAttnError
        A bad shape, value or option; ``grads`` without ``d_out``; a gradient of an input the
        call does not have (``dbias`` without ``bias``).  A mismatch is not raised: it is the
        verdict.
    """
    # the candidate's arrays first: a complex or non-numeric one is refused before any work
    actual = _as_real_array(actual, "actual")
    lse = None if lse is None else _as_real_array(lse, "lse")
    cand = {name: _as_real_array(g, f"grads[{name!r}]") for name, g in _as_grad_map(grads).items()}
    # the kernel's data path, the same for every twin: P's intermediate format and the fp8 descales
    path = dict(intermediate_dtype=intermediate_dtype, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
    path = {n: x for n, x in path.items() if x is not None}
    (gq, gk, gv), chain = lowp._descaled_inputs(q, k, v, q_descale, k_descale, v_descale, options)
    golden, golden_lse = sdpa(gq, gk, gv, return_lse=True, **options)
    fmt = lowp.format_of(dtype)
    variants = _twin_variants(twins)
    for name, choices in variants.items():
        both = sorted(set(choices) & set(path))
        if both:
            raise RefAttnError(f"twins: {name!r} sets {both}, which check_attention was also given")
    twin, twin_lse = (None, None)
    if fmt.name != "float64":
        twin, twin_lse = {}, {}
        for name, choices in variants.items():
            twin[name], twin_lse[name] = lowp.sdpa_twin(
                q, k, v, dtype=fmt.name, accumulate=accumulate, return_lse=True, **choices, **path, **options
            )
    rows_q, rows_k = _masked_rows(q, k, v, options)
    common = dict(dtype=fmt.name, rule=rule, fudge=fudge, atol=atol, rtol=rtol)
    judgements = [judge("out", actual, golden, twin, masked_rows=rows_q, factor=factor_out, **common)]
    if lse is not None:
        if lse.shape != golden_lse.shape:
            raise RefAttnError(f"lse: expected shape {golden_lse.shape} (the golden's (..., Hq, Lq)), got {lse.shape}")
        judgements.append(
            judge(
                "lse",
                lse[..., None],
                golden_lse[..., None],
                None if twin_lse is None else {n: t[..., None] for n, t in twin_lse.items()},
                masked_rows=rows_q,
                factor=factor_out,
                **common,
            )
        )
    if cand:
        if d_out is None:
            raise RefAttnError("d_out: gradients were given, so the cotangent they were computed for is needed")
        g = chain(sdpa_backward(d_out, gq, gk, gv, d_lse=d_lse, **options))._asdict()
        t = {}
        if fmt.name != "float64":
            for name, choices in variants.items():
                tg = lowp.sdpa_twin_backward(
                    d_out, q, k, v, dtype=fmt.name, accumulate=accumulate, d_lse=d_lse, **choices, **path, **options
                )
                for quantity, value in tg._asdict().items():
                    t.setdefault(quantity, {})[name] = value
        rows = {"dq": rows_q, "dk": rows_k, "dv": rows_k}
        for name, value in cand.items():
            if g[name] is None:
                raise RefAttnError(f"grads: {name} was given but the call has no {name[1:]} argument")
            judgements.append(
                judge(
                    name,
                    value,
                    g[name],
                    t.get(name),
                    kind="gradient",
                    masked_rows=rows.get(name),
                    factor=factor_grad,
                    **common,
                )
            )
    return Verdict(judgements)


def _twin_variants(twins):
    """``twins`` as a mapping ``{name: sdpa_twin choices}``."""
    if isinstance(twins, str):
        if twins == "admissible":
            return dict(lowp.TWIN_VARIANTS)
        as_choice(twins, "twins", ("admissible",) + tuple(lowp.TWIN_VARIANTS))
        return {twins: lowp.TWIN_VARIANTS[twins]}
    if not isinstance(twins, Mapping) or not twins:
        raise RefAttnError(f"twins: expected 'admissible', a name or a non-empty mapping of choices, got {twins!r}")
    return {str(n): dict(c) for n, c in twins.items()}


@takes_sdpa_options(like=check_attention)
def assert_attention_close(actual, q, k, v, *, dtype, **kwargs):
    """Raise :class:`AttentionMismatch` (an AssertionError with the report) unless the candidate
    passes; returns the :class:`Verdict` otherwise.  Arguments as :func:`check_attention`.

    Parameters
    ----------
    actual, q, k, v, dtype, lse, grads, d_out, d_lse
        The candidate, its inputs and what it returned, as :func:`check_attention`'s.
    rule, accumulate, twins, factor_out, factor_grad, fudge, atol, rtol, return_lse
        The rule and its settings, as :func:`check_attention`'s (same defaults).
    intermediate_dtype, q_descale, k_descale, v_descale
        The kernel's data path (P's intermediate format, FA3's fp8 descales), as
        :func:`check_attention`'s (default None each).

    Returns
    -------
    Verdict
        The passing verdict.

    Raises
    ------
    AttentionMismatch
        The candidate fails; its message is ``verdict.report()``, its ``verdict`` attribute the
        :class:`Verdict`.
    """
    verdict = check_attention(actual, q, k, v, dtype=dtype, **kwargs)
    if not verdict.passed:
        raise AttentionMismatch(verdict)
    return verdict


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
