"""Judging the outputs a case file carries against the golden, with the tolerance rule of their dtype."""

from __future__ import annotations

from refattn._validate import RefAttnError
from refattn.crosscheck.cases import Case
from refattn.testing.compare import check_attention

__all__ = ["check_case"]


def check_case(case: Case, *, rule="flash", dtype=None, **rule_options):
    """Judge the outputs a case file carries against the golden: a :class:`refattn.testing.compare.Verdict`."""
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
