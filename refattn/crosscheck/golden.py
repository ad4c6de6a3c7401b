"""refattn's float64 outputs for a case (the golden), and the golden files of the standard suite."""

from __future__ import annotations

from pathlib import Path

from refattn._validate import RefAttnError, check_keywords_of
from refattn.attention.sdpa import sdpa, sdpa_backward
from refattn.crosscheck.cases import Case, save_case
from refattn.crosscheck.suite import standard_cases

__all__ = ["golden_outputs", "write_golden"]


def golden_outputs(case: Case):
    """refattn's float64 outputs for a case (the golden): ``sdpa(q, k, v, **options)`` and, when
    the case carries ``d_out``, ``sdpa_backward`` for its cotangents.

    Parameters
    ----------
    case : Case
        Inputs, options and (optionally) cotangents ``d_out`` [, ``d_lse``].

    Returns
    -------
    dict of str to ndarray
        ``out (B, Hq, Lq, Dv)`` and ``lse (B, Hq, Lq)``; with ``d_out`` also ``dq``, ``dk``,
        ``dv`` and, when the case has them, ``dbias``, ``dsinks``.
    """
    opts = case.sdpa_options()
    out, lse = sdpa(case.q, case.k, case.v, return_lse=True, **opts)
    outputs = {"out": out, "lse": lse}
    if "d_out" in case.cotangents:
        grads = sdpa_backward(
            case.cotangents["d_out"], case.q, case.k, case.v, d_lse=case.cotangents.get("d_lse"), **opts
        )
        outputs.update({n: g for n, g in grads._asdict().items() if g is not None})
    return outputs


def write_golden(directory, suite="standard"):
    """Write every case of a suite with refattn's float64 outputs (``refattn golden DIR``): one
    case file per case, ``<name>.npz``.

    Parameters
    ----------
    directory : str or os.PathLike
        The folder, created when missing (not a file).
    suite : {"standard"}, default "standard"
        Which suite (:func:`refattn.crosscheck.suite.standard_cases`).

    Returns
    -------
    list of pathlib.Path
        The files written.
    """
    if suite != "standard":
        raise RefAttnError(f"suite: expected 'standard', got {suite!r}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise RefAttnError(f"directory: expected a directory (existing or to create), got the file {str(directory)!r}")
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for case in standard_cases():
        golden = case.with_outputs(golden_outputs(case), implementation="refattn golden (float64)")
        paths.append(save_case(directory / f"{case.name}.npz", golden))
    return paths


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
