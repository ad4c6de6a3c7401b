"""Cross-check every implementation available on this machine over a suite of cases.

An :class:`Implementation` runs a :class:`refattn.crosscheck.Case` and returns its outputs; each run is
judged by :func:`refattn.crosscheck.check_case` (the tolerance rule for the implementation's dtype).  The
built-in implementations: refattn's own forms (Numba kernel, FlashAttention-2 tiled NumPy, chunked
NumPy, Python loops) against the NumPy definition, and PyTorch SDPA on CPU (float64, float32,
bfloat16) and on CUDA (float16, bfloat16) when torch (and a GPU) are there.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from refattn import lowp
from refattn._validate import RefAttnError, Unsupported, check_keywords_of
from refattn.attention import loops, tiled
from refattn.attention.sdpa import sdpa, sdpa_backward
from refattn.crosscheck.cases import Case
from refattn.crosscheck.judge import check_case

__all__ = ["CheckRow", "Implementation", "Progress", "available_implementations", "run_checks"]


@dataclass(frozen=True)
class Implementation:
    """A candidate implementation to cross-check.

    Fields: ``name`` (as ``refattn check`` prints it), ``dtype`` (the precision it computes in: it
    picks the tolerance), ``run`` (``run(case) -> {"out": ..., "lse": ..., "dq": ...}``, any subset
    with ``out``; raise :class:`~refattn.Unsupported` for a case it cannot express) and ``note``
    (free text).
    """

    name: str
    dtype: str
    run: Callable
    note: str = ""


@dataclass
class CheckRow:
    """One (case, implementation) result of :func:`run_checks`: its status and worst quantity.

    Fields: ``case``, ``implementation``, ``dtype``, ``status`` (``"pass"``, ``"FAIL"``,
    ``"unsupported"`` or ``"error"``), ``quantity`` (the worst by error ratio, e.g. ``"dq"``),
    ``max_error`` and ``allowed`` (its largest error and the error allowed), ``ratio``
    (``max_error / allowed``), ``seconds`` (the run's time) and ``detail`` (the report of a failure,
    the reason of an unsupported case, the exception of an error).
    """

    case: str
    implementation: str
    dtype: str
    status: str  # "pass", "FAIL", "unsupported", "error"
    quantity: str = ""
    max_error: float = float("nan")
    allowed: float = float("nan")
    ratio: float = float("nan")
    seconds: float = 0.0
    detail: str = ""

    def as_dict(self):
        """The fields as a dict (what ``refattn check --json`` prints)."""
        return dict(self.__dict__)

    @classmethod
    def from_verdict(cls, case, implementation, dtype, verdict, seconds=0.0):
        """The row of a :class:`refattn.testing.compare.Verdict`: its worst quantity by error ratio
        (a NaN/inf misplacement counts as the worst).

        Parameters
        ----------
        case, implementation, dtype : str
            The row's labels.
        verdict : refattn.testing.compare.Verdict
            The judgement (:func:`refattn.crosscheck.judge.check_case`).
        seconds : float, default 0.0
            How long the implementation ran.

        Returns
        -------
        CheckRow
            ``"pass"`` or ``"FAIL"`` (with the report as ``detail``).
        """
        worst = max(verdict.judgements, key=lambda j: j.ratio if not j.nonfinite else float("inf"))
        status = "pass" if verdict.passed else "FAIL"
        detail = "" if verdict.passed else verdict.report()
        return cls(
            case,
            implementation,
            dtype,
            status,
            worst.quantity,
            worst.max_error,
            worst.allowed,
            worst.ratio,
            seconds,
            detail,
        )


def _refattn_kernel(case):
    opts = case.sdpa_options()
    out, lse = sdpa(case.q, case.k, case.v, return_lse=True, backend="numba", **opts)
    grads = sdpa_backward(
        case.cotangents["d_out"], case.q, case.k, case.v, d_lse=case.cotangents.get("d_lse"), backend="numba", **opts
    )
    return {"out": out, "lse": lse, **{n: g for n, g in grads._asdict().items() if g is not None}}


def _refattn_tiled(forward, backward, **tiles):
    def run(case):
        opts = case.sdpa_options()
        out, lse = forward(case.q, case.k, case.v, return_lse=True, **tiles, **opts)
        grads = backward(
            case.cotangents["d_out"], case.q, case.k, case.v, d_lse=case.cotangents.get("d_lse"), **tiles, **opts
        )
        return {"out": out, "lse": lse, **{n: g for n, g in grads._asdict().items() if g is not None}}

    return run


def _refattn_loops(case):
    out, lse = loops.sdpa(case.q, case.k, case.v, return_lse=True, **case.sdpa_options())
    return {"out": out, "lse": lse}


def _torch_run(dtype, device):
    def run(case):
        from refattn.adapters.torch import torch_sdpa

        if "d_lse" in case.cotangents:
            raise Unsupported("d_lse: torch SDPA returns no lse, so its gradients take no lse cotangent")
        return torch_sdpa(
            case.q,
            case.k,
            case.v,
            dtype=dtype,
            device=device,
            d_out=case.cotangents.get("d_out"),
            **case.sdpa_options(),
        )

    return run


def available_implementations(*, torch=True, kernels=True):
    """The implementations this machine can run, refattn's own first: the Numba kernel (when numba
    is installed), FlashAttention-2 tiled NumPy, chunked NumPy and the Python loops (forward only),
    then PyTorch SDPA on CPU (float64, float32, bfloat16) and on CUDA (float16, bfloat16) when
    torch, and a GPU, are there.

    Parameters
    ----------
    torch : bool, default True
        Include PyTorch's (``refattn check --no-torch``: False).
    kernels : bool, default True
        Include refattn's Numba kernel.

    Returns
    -------
    list of Implementation
    """
    impls = []
    if kernels and importlib.util.find_spec("numba") is not None:
        impls.append(Implementation("refattn numba kernel", "float64", _refattn_kernel, "tiled, 128×128"))
    impls += [
        Implementation(
            "refattn online (FA2)",
            "float64",
            _refattn_tiled(tiled.sdpa_online, tiled.sdpa_online_backward, block_q=16, block_k=24),
        ),
        Implementation(
            "refattn chunked", "float64", _refattn_tiled(tiled.sdpa_chunked, tiled.sdpa_chunked_backward, chunk_size=7)
        ),
        Implementation("refattn loops", "float64", _refattn_loops, "forward only"),
    ]
    if torch and importlib.util.find_spec("torch") is not None:
        import torch as _t

        for dt in ("float64", "float32", "bfloat16"):
            impls.append(Implementation(f"torch sdpa cpu {dt}", dt, _torch_run(dt, "cpu")))
        if _t.cuda.is_available():
            for dt in ("float16", "bfloat16"):
                impls.append(Implementation(f"torch sdpa cuda {dt}", dt, _torch_run(dt, "cuda")))
    return impls


def _judge(case: Case, impl: Implementation, rule):
    t0 = time.perf_counter()
    try:
        outputs = impl.run(case)
    except Unsupported as exc:
        return CheckRow(case.name, impl.name, impl.dtype, "unsupported", detail=str(exc))
    seconds = time.perf_counter() - t0
    if impl.dtype != "float64":  # the candidate computed on rounded inputs: judge it on those
        case = _rounded_case(case, impl.dtype)
    verdict = check_case(case.with_outputs(outputs, dtype=impl.dtype, implementation=impl.name), rule=rule)
    return CheckRow.from_verdict(case.name, impl.name, impl.dtype, verdict, seconds)


def _rounded_case(case: Case, dtype):
    arrays, cot = lowp.round_arrays(case.arrays, dtype), lowp.round_arrays(case.cotangents, dtype)
    return Case(case.name, arrays, case.options, cot, case.outputs, case.dtype, case.implementation)


def run_checks(cases, implementations, *, rule="flash", progress=None):
    """Run every implementation on every case and judge each run
    (:func:`refattn.crosscheck.judge.check_case`): what ``refattn check`` prints.

    A candidate that raises is an ``"error"`` row (reported, not raised); one that raises
    :class:`~refattn.Unsupported` is an ``"unsupported"`` row.  A candidate computing in low
    precision is judged on the inputs rounded to its dtype.

    Parameters
    ----------
    cases : sequence of Case
        E.g. :func:`refattn.crosscheck.suite.standard_cases`.
    implementations : sequence of Implementation
        At least one (:func:`available_implementations`).
    rule : {"flash", "torch", "allclose"}, default "flash"
        The tolerance rule.
    progress : callable, optional
        ``progress(done, total, label)``, called before each check with the label
        ``"implementation: case"`` and once at the end (e.g. a :class:`Progress`).  Default None.

    Returns
    -------
    list of CheckRow
        Implementation by implementation, case by case.
    """
    if not implementations:
        raise RefAttnError("implementations: none to check")
    rows = []
    total = len(cases) * len(implementations)
    for impl in implementations:
        for case in cases:
            if progress:
                progress(len(rows), total, f"{impl.name}: {case.name}")
            try:
                rows.append(_judge(case, impl, rule))
            except Exception as exc:  # a crashing candidate is a failed check, reported, not a crash of ours
                rows.append(CheckRow(case.name, impl.name, impl.dtype, "error", detail=f"{type(exc).__name__}: {exc}"))
    if progress:
        progress(total, total, "done")
    return rows


class Progress:
    """A run's progress on a stream (stderr by default), as a ``progress(done, total, label)`` callable.

    On a terminal: a bar redrawn in place.  Otherwise (piped, redirected, a CI log): one line each time
    the group of work changes (the label's text before ``": "``: an implementation, or a file) and one
    at the end, so a run that is not watched on a terminal still says what it is doing.

    Parameters
    ----------
    prefix : str, default "refattn"
        Starts every line (``"refattn check"``).
    stream : file-like, optional
        Where to write.  Default None: ``sys.stderr``.
    width : int, default 30
        The bar's width in characters.
    """

    def __init__(self, prefix="refattn", stream=None, width=30):
        self.prefix = prefix
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.group = None
        self.start = time.perf_counter()

    def __call__(self, done, total, label):
        if self.tty:
            filled = int(self.width * done / max(total, 1))
            bar = f"[{'#' * filled}{'.' * (self.width - filled)}]"
            self.stream.write(f"\r{bar} {done}/{total} {label[:50]:<50}")
            if done == total:
                self.stream.write("\n")
        elif done == total:
            self.stream.write(f"{self.prefix}: {done}/{total} done in {time.perf_counter() - self.start:.1f} s\n")
        else:
            group = label.split(": ", 1)[0]
            if group != self.group:
                self.group = group
                self.stream.write(f"{self.prefix}: {done}/{total} {group}\n")
        self.stream.flush()


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
