"""Judging the outputs a case file carries against the golden, with the tolerance rule of their dtype."""

from __future__ import annotations

from refattn._validate import RefAttnError, check_keywords_of
from refattn.crosscheck.cases import Case
from refattn.testing.compare import check_attention

__all__ = ["check_case"]


def check_case(case: Case, *, rule="flash", dtype=None, **rule_options):
    """Judge the outputs a case carries against refattn's golden, with the tolerance rule of their
    precision (:func:`refattn.testing.compare.check_attention`; ``specs/compare.md``).

    ``out`` is required; ``lse`` and the gradients present (``dq``, ``dk``, ``dv``, ``dbias``,
    ``dsinks``, for the case's cotangents) are judged too.

    Parameters
    ----------
    case : Case
        A case with outputs (:func:`refattn.crosscheck.cases.load_case` of an implementation's file).
    rule : {"flash", "torch", "allclose"}, default "flash"
        The tolerance rule.
    dtype : str, optional
        The precision the outputs were computed in.  Default None: the case's own ``dtype``.
    **rule_options
        More keyword options of :func:`~refattn.testing.compare.check_attention`: ``accumulate``,
        ``twins``, ``factor_out``, ``factor_grad``, ``fudge``, ``atol``, ``rtol``.

    Returns
    -------
    refattn.testing.compare.Verdict
        Per quantity, the error against the allowed error; ``.passed`` and ``.report()``.
    """
    if "out" not in case.outputs:
        raise RefAttnError(f"{case.name}: no 'out' in the file: write the implementation's output under 'out'")
    grads = {n: case.outputs[n] for n in ("dq", "dk", "dv", "dbias", "dsinks") if n in case.outputs}
    return check_attention(
        case.outputs["out"],
        case.q,
        case.k,
        case.v,
        dtype=dtype or case.dtype,
        lse=case.outputs.get("lse"),
        grads=grads or None,
        d_out=case.cotangents.get("d_out"),
        d_lse=case.cotangents.get("d_lse"),
        rule=rule,
        **rule_options,
        **case.sdpa_options(),
    )


check_keywords_of(globals())  # a typo in a keyword raises RefAttnError with a suggestion
