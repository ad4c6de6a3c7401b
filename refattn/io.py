"""The file formats, by their user-facing names: case files and attention-map files.

These are :mod:`refattn.crosscheck`'s (``specs/case-format.md``), gathered here because a user reading
or writing files looks for them under ``refattn.io``; nothing is defined here.
"""

from refattn.crosscheck import (
    CASE_VERSION,
    MAP_VERSION,
    MAX_BYTES,
    MAX_JSON_DEPTH,
    Case,
    check_case,
    golden_outputs,
    load_attentions,
    load_case,
    save_attentions,
    save_case,
    standard_suite,
    write_golden,
)

__all__ = [
    "CASE_VERSION",
    "Case",
    "MAP_VERSION",
    "MAX_BYTES",
    "MAX_JSON_DEPTH",
    "check_case",
    "golden_outputs",
    "load_attentions",
    "load_case",
    "save_attentions",
    "save_case",
    "standard_suite",
    "write_golden",
]
