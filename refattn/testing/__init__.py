"""Tools for test suites: the gradient checker (and Hypothesis strategies in ``strategies``).

``refattn.testing.strategies`` imports Hypothesis; import it explicitly.
"""

from refattn.testing.gradcheck import GradcheckError, GradcheckReport, InputCheck, gradcheck

__all__ = ["GradcheckError", "GradcheckReport", "InputCheck", "gradcheck"]
