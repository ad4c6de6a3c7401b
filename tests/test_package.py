"""Package-level contracts: lazy imports, public names, version."""

import subprocess
import sys
from pathlib import Path

import pytest

import refattn


def test_import_does_not_import_numba_torch_or_hypothesis():
    code = "import sys, refattn; print(sorted(m for m in ('numba', 'torch', 'hypothesis') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_names_exist():
    for name in refattn.__all__:
        assert hasattr(refattn, name), name
    assert issubclass(refattn.RefAttnError, ValueError)
    assert issubclass(refattn.RefAttnTypeError, TypeError) and issubclass(refattn.RefAttnTypeError, ValueError)
    assert refattn.__version__


def test_the_version_is_pyproject_s():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert refattn.__version__ == pyproject["project"]["version"]
