"""The file formats, by their user-facing names: case files, attention-map files, datasets of maps.

These are :mod:`refattn.crosscheck`'s (``specs/case-format.md``) and, for datasets beyond memory (a
Zarr store or a directory of map files, opened as Dask arrays), :mod:`refattn.datasets`'
(``specs/datasets.md``), gathered here because a user reading or writing files looks for them under
``refattn.io``; nothing is defined here.
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
from refattn.datasets import open_maps, save_maps

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
    "open_maps",
    "save_attentions",
    "save_case",
    "save_maps",
    "standard_suite",
    "write_golden",
]
