"""The package version (pyproject.toml's, checked by tests/test_package.py)."""

__version__ = "0.1.0"
