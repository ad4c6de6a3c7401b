"""Tools for test suites: the gradient checker, the tolerance rules that judge a candidate
implementation against refattn, and (in ``strategies``) Hypothesis strategies.

``refattn.testing.strategies`` imports Hypothesis; import it explicitly.
"""

from refattn.testing.compare import AttentionMismatch, Verdict, assert_attention_close, check_attention
from refattn.testing.gradcheck import GradcheckError, GradcheckReport, InputCheck, gradcheck

__all__ = [
    "AttentionMismatch",
    "GradcheckError",
    "GradcheckReport",
    "InputCheck",
    "Verdict",
    "assert_attention_close",
    "check_attention",
    "gradcheck",
]
