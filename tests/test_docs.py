"""Docs a user reads: every public function of a covered module has a docstring with a NumPy-style
``Parameters`` section naming each of its parameters (``inspect.signature``), and the module has its
page in the API reference (``docs/api``, built by ``tox -e docs``).

A module is covered once its docstrings state the maths, the axes and, per parameter, shape, dtype,
default and meaning (as ``help(refattn.sdpa)`` does).  Every public module is in :data:`COVERED`, so
a new module cannot be forgotten: it fails here until it is documented and has its page.
"""

import functools
import importlib
import inspect
import os
import pathlib
import pkgutil
import re

import pytest

import refattn

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "api"
SPECS = ROOT / "specs"

# Modules documented to that standard and tested below: every public module (issue 12, point 5). A new
# module goes here, with its page in docs/api (index.rst's toctree, SPEC_OF in docs/api/conf.py).
COVERED = [
    "refattn",
    "refattn.adapters",
    "refattn.adapters.jax",
    "refattn.adapters.layout",
    "refattn.adapters.onnx",
    "refattn.adapters.peer",
    "refattn.adapters.torch",
    "refattn.adapters.transformers",
    "refattn.attention",
    "refattn.attention.allocation",
    "refattn.attention.cache",
    "refattn.attention.linear",
    "refattn.attention.loops",
    "refattn.attention.multihead",
    "refattn.attention.options",
    "refattn.attention.position",
    "refattn.attention.relative",
    "refattn.attention.sdpa",
    "refattn.attention.sparse",
    "refattn.attention.tiled",
    "refattn.bench",
    "refattn.bench.dataset",
    "refattn.bench.model",
    "refattn.bench.options",
    "refattn.bench.run",
    "refattn.cli",
    "refattn.crosscheck",
    "refattn.crosscheck.cases",
    "refattn.crosscheck.golden",
    "refattn.crosscheck.implementations",
    "refattn.crosscheck.judge",
    "refattn.crosscheck.maps",
    "refattn.crosscheck.npz",
    "refattn.crosscheck.suite",
    "refattn.datasets",
    "refattn.io",
    "refattn.kernels",
    "refattn.kernels.fastexp",
    "refattn.kernels.flow_kernels",
    "refattn.kernels.geometry",
    "refattn.kernels.metric_kernels",
    "refattn.kernels.rollout_kernels",
    "refattn.kernels.sdpa_kernels",
    "refattn.lowp",
    "refattn.masks",
    "refattn.metrics",
    "refattn.metrics.attribution",
    "refattn.metrics.detectors",
    "refattn.metrics.distribution",
    "refattn.metrics.importance",
    "refattn.metrics.linguistic",
    "refattn.metrics.norms",
    "refattn.metrics.position",
    "refattn.metrics.regularizers",
    "refattn.metrics.summary",
    "refattn.metrics.tokens",
    "refattn.model",
    "refattn.model.bengio",
    "refattn.model.config",
    "refattn.model.data",
    "refattn.model.experiments",
    "refattn.model.layers",
    "refattn.model.lm",
    "refattn.model.loops",
    "refattn.model.params",
    "refattn.model.train",
    "refattn.plot",
    "refattn.rollout_flow",
    "refattn.softmax_family",
    "refattn.testing",
    "refattn.testing.compare",
    "refattn.testing.derivatives",
    "refattn.testing.model_strategies",
    "refattn.testing.strategies",
]

_UNDERLINE = re.compile(r"^\s*-{3,}\s*$")


def public_modules():
    """Every module of the package whose dotted name has no ``_``-prefixed part (found without
    importing the modules themselves)."""
    names = ["refattn"] + [m.name for m in pkgutil.walk_packages(refattn.__path__, "refattn.")]
    return sorted(n for n in names if not any(part.startswith("_") for part in n.split(".")))


def public_names(module):
    """The module's ``__all__``; without one, its names without ``_`` defined in the module itself."""
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return [
        n
        for n, obj in vars(module).items()
        if not n.startswith("_") and getattr(obj, "__module__", None) == module.__name__
    ]


def public_functions(module):
    """``(qualified name, function)`` for the module's public functions and the public methods of
    its public classes."""
    found = []
    for name in public_names(module):
        obj = getattr(module, name)
        if inspect.isfunction(obj):
            found.append((name, obj))
        elif inspect.isclass(obj) and obj.__module__.startswith("refattn"):
            for attr, member in vars(obj).items():
                fn = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                if not attr.startswith("_") and inspect.isfunction(fn):
                    found.append((f"{name}.{attr}", fn))
    return found


def public_classes(module):
    return [(n, getattr(module, n)) for n in public_names(module) if inspect.isclass(getattr(module, n))]


def parameters_section(doc):
    """The names a NumPy-style ``Parameters`` section documents (``a, b : type`` names two), or None
    when the docstring has no such section."""
    lines = inspect.cleandoc(doc).splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.strip() == "Parameters" and _UNDERLINE.match(lines[i + 1]):
            indent = len(line) - len(line.lstrip())
            body = lines[i + 2 :]
            break
    else:
        return None
    names = set()
    for j, line in enumerate(body):
        if j + 1 < len(body) and _UNDERLINE.match(body[j + 1]):
            break  # the next section
        if line.strip() and len(line) - len(line.lstrip()) == indent:
            head = line.split(" : ")[0]
            names.update(n.strip().lstrip("*") for n in head.split(","))
    return names


def _parameters(fn):
    params = list(inspect.signature(fn).parameters)
    return params[1:] if params[:1] in (["self"], ["cls"]) else params


def test_every_public_module_is_covered():
    listed = set(COVERED)
    missing = [m for m in public_modules() if m not in listed]
    gone = sorted(listed - set(public_modules()))
    assert not missing, f"document these modules and add them to COVERED in {__file__}: {missing}"
    assert not gone, f"these modules no longer exist: remove them from {__file__}: {gone}"
    assert len(COVERED) == len(listed), "a module is listed twice in COVERED"


@pytest.mark.parametrize("name", COVERED)
def test_public_functions_document_every_parameter(name):
    if name.startswith("refattn.kernels.") and name != "refattn.kernels.geometry":
        pytest.importorskip("numba")  # the kernel modules are numba code (the tox env nonumba has none)
    module = importlib.import_module(name)
    assert inspect.getdoc(module), f"{name}: no module docstring"
    problems = []
    for qualname, fn in public_functions(module):
        doc = inspect.getdoc(fn)
        if not doc:
            problems.append(f"{qualname}: no docstring")
            continue
        params = _parameters(fn)
        if not params:
            continue
        documented = parameters_section(doc)
        if documented is None:
            problems.append(f"{qualname}: no Parameters section (parameters {params})")
            continue
        undocumented = [p for p in params if p not in documented]
        if undocumented:
            problems.append(f"{qualname}: the Parameters section does not name {undocumented}")
    for qualname, cls in public_classes(module):
        if not (cls.__doc__ or "").strip() or re.fullmatch(rf"{cls.__name__}\(.*\)", cls.__doc__.strip(), re.S):
            problems.append(f"{qualname}: no class docstring")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", COVERED)
def test_covered_modules_have_a_page_in_the_api_reference(name):
    pages = {p.stem: p.read_text() for p in DOCS.glob("*.rst")}
    assert name in pages, f"docs/api/{name}.rst is missing"
    assert re.search(rf"^\.\. (automodule|reexports):: {re.escape(name)}$", pages[name], re.M)
    assert re.search(rf"^\s+{re.escape(name)}$", pages["index"], re.M), f"docs/api/index.rst does not list {name}"


@functools.cache
def _repo_markdown_names():
    """The names of the repository's Markdown files (not the copies a docs build makes)."""
    found = set()
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in ("build", "dist", "_build")]
        if pathlib.Path(folder) != DOCS:  # docs/api/specs holds a docs build's copies
            found.update(f for f in files if f.endswith(".md"))
        else:
            subfolders.clear()
    return frozenset(found)


@pytest.mark.parametrize("spec", sorted(p.name for p in SPECS.glob("*.md")))
def test_specs_are_self_contained(spec):
    """A spec names no file the repository lacks (``ANCHORS.md`` lives outside it) and links
    nowhere outside it: the API reference includes every spec, and a reader has only the repo."""
    text = (SPECS / spec).read_text()
    names = _repo_markdown_names()
    missing = sorted({m for m in re.findall(r"[\w.-]+\.md\b", text) if m not in names})
    assert not missing, f"specs/{spec} names files that are not in the repository: {missing}"
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        assert not re.match(r"[a-z]+:", target), f"specs/{spec} links outside the repository: {target}"
        path = target.split("#")[0]
        if path:
            resolved = (SPECS / path).resolve()
            assert resolved.is_relative_to(ROOT) and resolved.exists(), f"specs/{spec}: broken link {target}"


def test_the_parameters_parser():
    doc = """Summary.

    Parameters
    ----------
    q, k : array_like
        Two names.
    mask : bool
        Indented lines are descriptions: not_a_name : x
    **options
        Keywords.

    Returns
    -------
    out : ndarray
    """
    assert parameters_section(doc) == {"q", "k", "mask", "options"}
    assert parameters_section("Summary.\n\nNo sections.") is None
