"""The package keeps the layout of specs/architecture.md: layered imports, no cycles, no shadowed modules."""

import ast
import fnmatch
import importlib
import pathlib
import re
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "refattn"
SPEC = ROOT / "specs" / "architecture.md"


def _modules():
    """``{dotted name: path}`` of every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name, path):
    """The refattn modules ``name`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "refattn")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "refattn":
                continue
            for alias in node.names:
                full = f"{module}.{alias.name}"
                found.add(full if full in MODULES else module)
    found.discard(name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer_table(text):
    """``[(pattern, layer)]`` from the spec's layer table (rows ``| n | `a`, `b.*` | ... |``)."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            rows.extend((pattern, int(cells[0])) for pattern in re.findall(r"`([\w.*]+)`", cells[1]))
    return rows


TABLE = _layer_table(SPEC.read_text(encoding="utf-8"))


def layer_of(name, table=TABLE):
    """The layer of the most specific pattern naming ``name`` (exact names beat ``pkg.*``)."""
    exact = [layer for pattern, layer in table if pattern == name]
    if exact:
        return exact[0]
    matches = [(len(p), layer) for p, layer in table if "*" in p and fnmatch.fnmatchcase(name, p)]
    return max(matches)[1] if matches else None


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep) :] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _violations(graph, table):
    return [
        f"{name} (layer {layer_of(name, table)}) imports {dep} (layer {layer_of(dep, table)})"
        for name, deps in sorted(graph.items())
        for dep in sorted(deps)
        if dep in MODULES and layer_of(dep, table) > layer_of(name, table)
    ]


def test_the_spec_table_names_every_module():
    assert TABLE, "no layer table found in specs/architecture.md"
    unplaced = [name for name in MODULES if layer_of(name) is None]
    assert unplaced == [], f"modules missing from specs/architecture.md's layer table: {unplaced}"


def test_imports_respect_the_layers():
    assert _violations(GRAPH, TABLE) == []


def test_the_import_graph_has_no_cycle():
    assert _cycle(GRAPH) is None


def test_the_checks_catch_an_upward_import_and_a_cycle():
    """Mutants of the graph: a layer-0 module importing the top, and a two-module cycle."""
    upward = dict(GRAPH, **{"refattn._validate": {"refattn.cli"}})
    assert _violations(upward, TABLE) == ["refattn._validate (layer 0) imports refattn.cli (layer 7)"]
    looped = dict(GRAPH, **{"refattn.masks": GRAPH["refattn.masks"] | {"refattn.attention.sdpa"}})
    assert _cycle(looped) is not None


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.endswith("__main__")))
def test_importing_a_module_gives_the_module(name):
    """``import refattn.x.y as m`` binds the package attribute ``y``: no public function may share a
    module's name (``refattn.softmax`` is a function; its module is ``refattn.softmax_family``)."""
    if name.startswith("refattn.kernels."):
        pytest.importorskip("numba")  # the kernel modules are numba code (the nonumba env has none)
    module = importlib.import_module(name)
    assert isinstance(module, types.ModuleType)
    if "." in name:
        parent, last = name.rsplit(".", 1)
        assert getattr(importlib.import_module(parent), last) is module
