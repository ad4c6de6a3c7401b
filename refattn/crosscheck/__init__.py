"""Cross-checking other implementations against refattn: files, the standard suite, goldens, verdicts.

Modules (each imports only those above it; ``specs/architecture.md``):

* :mod:`~refattn.crosscheck.npz`: the safe ``.npz`` container (no pickle, size caps, JSON depth).
* :mod:`~refattn.crosscheck.cases`: the case-file schema (:class:`Case`, :func:`save_case`, :func:`load_case`).
* :mod:`~refattn.crosscheck.maps`: attention-map files (:func:`save_attentions`, :func:`load_attentions`).
* :mod:`~refattn.crosscheck.suite`: the standard suite of cases (:func:`standard_suite`).
* :mod:`~refattn.crosscheck.golden`: refattn's outputs for a case (:func:`golden_outputs`, :func:`write_golden`).
* :mod:`~refattn.crosscheck.judge`: a case's outputs judged by the tolerance rules (:func:`check_case`).
* :mod:`~refattn.crosscheck.implementations`: every implementation on this machine run over the
  suite and judged (:func:`run_checks`: what ``refattn check`` prints).
"""

from refattn.crosscheck.cases import CASE_VERSION, Case, load_case, save_case
from refattn.crosscheck.golden import golden_outputs, write_golden
from refattn.crosscheck.implementations import CheckRow, Implementation, Progress, available_implementations, run_checks
from refattn.crosscheck.judge import check_case
from refattn.crosscheck.maps import MAP_VERSION, load_attentions, save_attentions
from refattn.crosscheck.npz import MAX_BYTES, MAX_JSON_DEPTH
from refattn.crosscheck.suite import standard_cases, standard_suite

__all__ = [
    "CASE_VERSION",
    "Case",
    "CheckRow",
    "Implementation",
    "MAP_VERSION",
    "MAX_BYTES",
    "MAX_JSON_DEPTH",
    "Progress",
    "available_implementations",
    "check_case",
    "golden_outputs",
    "load_attentions",
    "load_case",
    "run_checks",
    "save_attentions",
    "save_case",
    "standard_cases",
    "standard_suite",
    "write_golden",
]
