"""Tools for test suites: the tolerance rules that judge a candidate attention implementation
against refattn, the finite-difference gradient checkers, and Hypothesis strategies.

Re-exports only (each name is documented where it is defined):

* from :mod:`refattn.testing.compare` (``specs/compare.md``):
  :func:`~refattn.testing.compare.check_attention` judges a candidate's output (and lse and
  gradients), computed in ``dtype``, against the float64 golden, within a budget set by the
  low-precision twins, and returns a :class:`~refattn.testing.compare.Verdict`;
  :func:`~refattn.testing.compare.assert_attention_close` raises
  :class:`~refattn.testing.compare.AttentionMismatch` (an AssertionError with the report) unless
  the candidate passes;
* from :mod:`refattn.testing.derivatives` (``specs/testing.md``):
  :func:`~refattn.testing.derivatives.gradcheck` compares a hand-written backward with central
  differences, entry by entry (a :class:`~refattn.testing.derivatives.GradcheckReport` of
  :class:`~refattn.testing.derivatives.InputCheck`; :class:`~refattn.testing.derivatives.GradcheckError`
  on failure), and :func:`~refattn.testing.derivatives.check_vjp`, the cheap check for
  kernel-sized inputs, with random directional derivatives (a
  :class:`~refattn.testing.derivatives.VjpReport` of :class:`~refattn.testing.derivatives.DirectionCheck`;
  :class:`~refattn.testing.derivatives.VjpError` on failure).

:mod:`refattn.testing.strategies` (a :class:`~refattn.testing.strategies.Case` strategy per op, and
:func:`~refattn.testing.strategies.attention_inputs` to property-test a kernel) imports Hypothesis,
the ``test`` extra, so this package does not import it: import ``refattn.testing.strategies``
explicitly.
"""

from refattn.testing.compare import AttentionMismatch, Verdict, assert_attention_close, check_attention
from refattn.testing.derivatives import (
    DirectionCheck,
    GradcheckError,
    GradcheckReport,
    InputCheck,
    VjpError,
    VjpReport,
    check_vjp,
    gradcheck,
)

__all__ = [
    "AttentionMismatch",
    "DirectionCheck",
    "GradcheckError",
    "GradcheckReport",
    "InputCheck",
    "Verdict",
    "VjpError",
    "VjpReport",
    "assert_attention_close",
    "check_attention",
    "check_vjp",
    "gradcheck",
]
