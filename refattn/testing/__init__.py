"""Tools for test suites: the gradient checkers, the tolerance rules that judge a candidate
implementation against refattn, and (in ``strategies``) Hypothesis strategies.

``refattn.testing.strategies`` imports Hypothesis; import it explicitly.
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
