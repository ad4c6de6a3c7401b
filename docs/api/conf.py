"""Sphinx configuration of refattn's API reference: ``tox -e docs`` (warnings are errors).

The reference is built from the docstrings (autodoc; napoleon reads their NumPy-style sections) and
the specifications, ``specs/*.md``, read by MyST.  Every documented module, class and function gets a
link to its spec page (:data:`SPEC_OF`), and a ``specs/<page>.md`` named in a docstring becomes a link.

The specs (and ``benchmarks/RESULTS.md``, which they link to) are read from copies made here at the
start of every build, under ``docs/api/specs/`` and ``docs/api/benchmarks/`` (ignored by git; edit
the originals): Sphinx resolves symlinks, so linked folders would put the specs' relative links
outside the documentation.
"""

import importlib
import importlib.util
import inspect
import pathlib
import re
import shutil
import sys

from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))  # the checkout, when built without installing refattn
COPIED = {"specs": "*.md", "benchmarks": "RESULTS.md"}  # folder of the checkout: the pages read from it


def copy_pages():
    """Fresh copies of the :data:`COPIED` pages under ``docs/api/`` (modification times kept, so an
    incremental build rereads only what changed)."""
    for folder, pattern in COPIED.items():
        shutil.rmtree(HERE / folder, ignore_errors=True)
        (HERE / folder).mkdir()
        for source in sorted((ROOT / folder).glob(pattern)):
            shutil.copy2(source, HERE / folder / source.name)


copy_pages()

import refattn  # noqa: E402

logger = logging.getLogger(__name__)

project = "refattn"
release = version = refattn.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
html_theme = "alabaster"

autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the Parameters sections state types and shapes; signatures stay short
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_param = False  # one entry for "q, k, v : ..." (not one copy each); types as written
napoleon_custom_sections = [("Fields", "params_style")]  # the fields of a grads NamedTuple
myst_heading_anchors = 3

# The spec page (specs/<page>.md) of each module; the longest prefix of a documented name decides.
SPEC_OF = {
    "refattn": "architecture",
    "refattn.RefAttnError": "sdpa",
    "refattn.RefAttnTypeError": "sdpa",
    "refattn.Unsupported": "adapters",
    "refattn.adapters": "adapters",
    "refattn.attention.allocation": "allocation",
    "refattn.attention.cache": "cache",
    "refattn.attention.linear": "linear",
    "refattn.attention.loops": "sdpa",
    "refattn.attention.multihead": "multihead",
    "refattn.attention.options": "sdpa",
    "refattn.attention.position": "position",
    "refattn.attention.relative": "relative",
    "refattn.attention.sdpa": "sdpa",
    "refattn.attention.sparse": "sparse",
    "refattn.attention.tiled": "tiled",
    "refattn.bench": "cli",
    "refattn.bench.dataset": "datasets",
    "refattn.cli": "cli",
    "refattn.crosscheck": "case-format",
    "refattn.crosscheck.implementations": "cli",
    "refattn.crosscheck.judge": "compare",
    "refattn.datasets": "datasets",
    "refattn.io": "case-format",
    "refattn.kernels": "kernels",
    "refattn.lowp": "lowp",
    "refattn.masks": "masks",
    "refattn.metrics": "metrics",
    "refattn.model": "model",
    "refattn.plot": "cli",
    "refattn.rollout_flow": "rollout",
    "refattn.softmax_family": "softmax",
    "refattn.testing": "testing",
    "refattn.testing.compare": "compare",
    "refattn.testing.derivatives": "testing",
    "refattn.testing.strategies": "testing",
    "refattn.testing.model_strategies": "testing",
}
_SPEC_LITERAL = re.compile(r"``(specs/([\w.-]+)\.md)``")


def spec_page(name):
    """The spec page of the documented object ``name`` (a dotted path), or None."""
    keys = [k for k in SPEC_OF if name == k or name.startswith(k + ".")]
    return SPEC_OF[max(keys, key=len)] if keys else None


def _link_literal(match):
    path, page = match.group(1), match.group(2)
    if (HERE / "specs" / f"{page}.md").is_file():
        return f":doc:`{path} </specs/{page}>`"
    return match.group(0)


def link_specs(app, what, name, obj, options, lines):
    """``specs/<page>.md`` in a docstring becomes a link; a link to its spec page ends every
    module's, class's and function's docstring that has none."""
    lines[:] = [_SPEC_LITERAL.sub(_link_literal, line) for line in lines]
    if what not in ("module", "class", "function", "exception"):
        return
    page = spec_page(name)
    if page is None:
        logger.warning(f"no spec page for {name}: add its module to SPEC_OF in docs/api/conf.py")
        return
    link = f":doc:`specs/{page}.md </specs/{page}>`"
    if not any(link in line for line in lines):
        lines += ["", f"Specification: {link}."]


def skip_field_aliases(app, what, name, obj, skip, options):
    """NamedTuple fields are described in their class's Fields section, not as attributes."""
    if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
        return True
    return None


class ReExports(SphinxDirective):
    """``.. reexports:: refattn.io``: every name of the module's ``__all__``, linked to where it is
    defined, with its summary line (modules with theirs, constants with their value)."""

    required_arguments = 1

    def run(self):
        module = importlib.import_module(self.arguments[0])
        lines = []
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                summary = (inspect.getdoc(obj) or "").split("\n\n")[0].replace("\n", " ")
                lines.append(f"* :py:mod:`{name} <{obj.__name__}>`: {summary}")
            elif inspect.isclass(obj) or inspect.isfunction(obj):
                role = "class" if inspect.isclass(obj) else "func"
                summary = (inspect.getdoc(obj) or "").split("\n\n")[0].replace("\n", " ")
                lines.append(f"* :py:{role}:`{name} <{obj.__module__}.{obj.__qualname__}>`: {summary}")
            else:
                lines.append(f"* ``{name} = {obj!r}``")
        return self.parse_text_to_nodes("\n".join(lines))


def setup(app):
    app.add_directive("reexports", ReExports)
    app.connect("autodoc-process-docstring", link_specs)
    app.connect("autodoc-skip-member", skip_field_aliases)
