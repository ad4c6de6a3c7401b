"""Hygiene of the test sources themselves: no constant cotangents, no default tolerances.

* A cotangent of all ones (or any constant) hides errors that cancel across a softmax row:
  softmax's backward of a constant cotangent is identically zero.  Flagged: a constant array
  (``ones``, ``ones_like``, ``full(..., c)``, a name bound to one, a multiple or ``torch.tensor`` of
  one) passed as the cotangent of a backward call (the first argument of ``.backward(...)`` /
  ``*_backward(...)``, ``grad_outputs``, a ``d_*=`` / ``dy=`` keyword of any call), assigned to a
  cotangent-named variable (``d_out = np.ones(...)``), or a plain ``y.sum().backward()``.
  Zero cotangents, calls inside ``pytest.raises`` (validation tests) and all-ones masks or weights
  are not flagged.
* A default tolerance is far looser than float64 and says nothing of what was meant: flagged are
  ``pytest.approx`` without ``rel=``/``abs=`` (rel=1e-6), ``assert_allclose`` / ``allclose`` /
  ``isclose`` without ``rtol`` (1e-7 / 1e-5) and ``torch.testing.assert_close`` without ``rtol``.

The detectors read the syntax tree (no regexes over text), and are tested on small snippets below.
"""

import ast
import pathlib

import pytest

TESTS = pathlib.Path(__file__).parent

_ONES = {"ones", "ones_like"}
_FULL = {"full", "full_like"}
_WRAPPERS = {"tensor", "as_tensor", "from_numpy", "asarray", "array", "ascontiguousarray"}
_METHODS = {"to", "double", "float", "cpu", "cuda", "clone", "detach", "copy", "astype"}
_COT_KEYWORDS = {"gradient", "grad_tensors", "grad_outputs", "dy", "dout", "cotangent", "cotangents"}


def _dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _last(func):
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _literal(node):
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        node = node.operand
    return isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool)


def _nonzero_literal(node):
    return _literal(node) and ast.literal_eval(node) != 0


def _constant_array(node, names):
    """True when ``node`` builds an array of one repeated nonzero value."""
    if isinstance(node, ast.Name):
        return node.id in names
    if isinstance(node, (ast.List, ast.Tuple)):  # torch.autograd's sequences of cotangents
        return any(_constant_array(e, names) for e in node.elts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div)):
        left, right = node.left, node.right
        return (_constant_array(left, names) and _literal(right)) or (_literal(left) and _constant_array(right, names))
    if not isinstance(node, ast.Call):
        return False
    last = _last(node.func)
    if last in _ONES:
        return True
    if last in _FULL:
        fill = (
            node.args[1]
            if len(node.args) > 1
            else next((k.value for k in node.keywords if k.arg == "fill_value"), None)
        )
        return fill is not None and _nonzero_literal(fill)
    if last in _WRAPPERS and node.args:
        return _constant_array(node.args[0], names)
    if last in _METHODS and isinstance(node.func, ast.Attribute):
        return _constant_array(node.func.value, names)
    return False


def _cotangent_name(name):
    return name.startswith("d_") or name in {"dy", "dout", "dh"} or name.startswith(("cot", "grad_out"))


def _plain_reduction(node):
    """``y.sum()`` / ``y.mean()`` / ``torch.sum(y)`` of anything but a product with a (non-constant) cotangent."""
    if not isinstance(node, ast.Call) or _last(node.func) not in {"sum", "mean"}:
        return False
    if isinstance(node.func, ast.Attribute) and not node.args:
        inner = node.func.value
    elif _dotted(node.func) in {"torch.sum", "torch.mean"} and node.args:
        inner = node.args[0]
    else:
        return False
    if isinstance(inner, ast.BinOp) and isinstance(inner.op, ast.Mult):
        return _literal(inner.left) or _literal(inner.right)
    return True


def _cotangents_of(call, signatures):
    """The argument nodes of ``call`` that are cotangents (``signatures``: the module's own functions'
    positional parameter names, so a helper's ``d_out`` parameter counts)."""
    last, dotted = _last(call.func), _dotted(call.func)
    found = [k.value for k in call.keywords if k.arg and (_cotangent_name(k.arg) or k.arg in _COT_KEYWORDS)]
    params = signatures.get(dotted, [])
    found += [a for a, name in zip(call.args, params) if _cotangent_name(name)]
    if dotted.endswith("autograd.backward") or dotted.endswith("autograd.grad"):
        found += call.args[1:2] if dotted.endswith("autograd.backward") else call.args[2:3]
    elif last == "backward" or last.endswith("_backward"):
        found += call.args[:1]
    return found


def _scopes(tree):
    """Node lists to resolve names in: each top-level function or class (with what it nests), and the
    module's other statements together."""
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    module = [n for stmt in tree.body if not isinstance(stmt, defs) for n in ast.walk(stmt)]
    return [list(ast.walk(stmt)) for stmt in tree.body if isinstance(stmt, defs)] + [module]


def cotangent_findings(source):
    """[(line, message)] of constant cotangents in ``source``."""
    out = []
    tree = ast.parse(source)
    signatures = {
        f.name: [a.arg for a in f.args.posonlyargs + f.args.args]
        for f in tree.body
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
    }
    for nodes in _scopes(tree):
        constants, reduced = set(), set()
        for node in nodes:
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    for name in (n.id for n in ast.walk(target) if isinstance(n, ast.Name)):
                        if _constant_array(node.value, set()):
                            constants.add(name)
                            if _cotangent_name(name):
                                out.append((node.lineno, f"{name} = a constant array (a cotangent of all ones?)"))
                        if _plain_reduction(node.value):
                            reduced.add(name)
        raising = {
            id(n)
            for w in nodes
            if isinstance(w, ast.With)
            and any(_last(getattr(i.context_expr, "func", i.context_expr)) == "raises" for i in w.items)
            for n in ast.walk(w)
        }
        for node in nodes:
            if not isinstance(node, ast.Call) or id(node) in raising:  # a call that must raise computes nothing
                continue
            for arg in _cotangents_of(node, signatures):
                if _constant_array(arg, constants):
                    out.append((node.lineno, f"constant cotangent passed to {_dotted(node.func) or 'a call'}"))
            if _last(node.func) == "backward" and isinstance(node.func, ast.Attribute) and not node.args:
                receiver = node.func.value
                if _plain_reduction(receiver) or (isinstance(receiver, ast.Name) and receiver.id in reduced):
                    out.append((node.lineno, "y.sum().backward(): an all-ones cotangent"))
    return sorted(set(out))


_NEEDS = {  # call -> keyword names of which one must be given (or this many positional arguments)
    "approx": ({"rel", "abs"}, 2),
    "assert_allclose": ({"rtol"}, 3),
    "allclose": ({"rtol"}, 3),
    "isclose": ({"rtol"}, 3),
    "assert_close": ({"rtol"}, 3),
}


def tolerance_findings(source):
    """[(line, message)] of comparisons left at a default tolerance in ``source``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        last, dotted = _last(node.func), _dotted(node.func)
        if dotted == "math.isclose":
            needed, positional = {"rel_tol"}, 3
        elif last in _NEEDS:
            needed, positional = _NEEDS[last]
        else:
            continue
        given = {k.arg for k in node.keywords}
        if None in given or given & needed or len(node.args) >= positional:  # ** splats count as explicit
            continue
        out.append((node.lineno, f"{dotted or last} at its default tolerance (give {' / '.join(sorted(needed))})"))
    return out


DETECTORS = {"constant cotangent": cotangent_findings, "default tolerance": tolerance_findings}


def _sources():
    return sorted(p for p in TESTS.rglob("*.py") if p.resolve() != pathlib.Path(__file__).resolve())


def test_the_test_sources_have_no_constant_cotangents_or_default_tolerances():
    paths = _sources()
    assert len(paths) >= 20, [str(p) for p in paths]  # the glob found the suite
    bad = []
    for path in paths:
        source = path.read_text()
        lines = source.splitlines()
        rel = path.relative_to(TESTS.parent).as_posix()
        for detect in DETECTORS.values():
            for line, message in detect(source):
                text = lines[line - 1].strip()
                bad.append(f"{rel}:{line}: {message}: {text}")
    assert not bad, "\n".join(bad)


BAD_COTANGENTS = [
    "y.sum().backward()",
    "y.mean().backward()",
    "torch.sum(y).backward()",
    "(2.0 * y).sum().backward()",
    "loss = out.sum()\nloss.backward()",
    "y.backward(torch.ones_like(y))",
    "y.backward(gradient=torch.ones_like(y))",
    "y.backward(torch.tensor(np.ones(y.shape)))",
    "y.backward(torch.ones(3, 4).double())",
    "def f():\n    g = torch.ones_like(y)\n    y.backward(g)",
    "refattn.softmax_backward(np.ones((2, 2)), x)",
    "refattn.sdpa_backward(\n    np.ones_like(out),\n    q, k, v,\n)",
    "grads = refattn.multihead_attention_backward(np.ones(y.shape), x, params, num_heads=2)",
    "op.backward(np.full(out.shape, 1.0), *xs)",
    "op.backward(0.5 * np.ones(out.shape), *xs)",
    "d_out = np.ones_like(out)",
    "dy = np.ones((2, 2))",
    "q = np.ones((1, 2, 4))\nwith pytest.raises(RefAttnError):\n    pass\nlowp.sdpa_twin_backward(q, q, q, q)",
    "ta.check_torch(q, k, v, d_out=np.ones(q.shape))",
    "torch.autograd.grad(y, x, grad_outputs=torch.ones_like(y))",
    "torch.autograd.grad(y, x, torch.ones_like(y))",
    "torch.autograd.backward([y], [torch.ones_like(y)])",
    "def _run(q, k, v, d_out, device):\n    pass\n\n\ndef test():\n    _run(q, k, v, np.ones((1, 3, 2)), 'cpu')",
]

GOOD_COTANGENTS = [
    "mask = np.ones((3, 5), dtype=bool)\nout = refattn.sdpa(q, k, v, mask=mask)",
    "mask = np.ones((3, 5), dtype=bool)\ng = refattn.sdpa_backward(d_out, q, k, v, mask=mask)",
    "w = np.ones((2, 4))\np = refattn.MHAParams(w, w, w, w)",
    "x = np.ones((2, 6))\ny = refattn.rope(x, rotary_dim=4)",
    "(y * torch.tensor(d_y)).sum().backward()",
    "y.backward(torch.tensor(rng.standard_normal(y.shape)))",
    "d_out = rng.standard_normal(out.shape)\ny.backward(torch.tensor(d_out))",
    "refattn.sdpa_backward(np.zeros((2, 4, 3, 5)), q, k, v)",
    "refattn.logsumexp_backward(np.zeros(3), np.ones((2, 3)))",
    "op.backward(np.full(out.shape, 0.0), *xs)",
    "q = np.ones((1, 2, 4))\nwith pytest.raises(RefAttnError):\n    lowp.sdpa_twin_backward(q, q, q, q, block_k=0)",
    "assert y.sum() == 3.0",
    "def _run(q, k, v, d_out, device):\n    pass\n\n\ndef test():\n    _run(np.ones(3), k, v, d_out, 'cpu')",
    "def f():\n    g = torch.ones_like(y)\n\ndef h():\n    y.backward(torch.tensor(d_y))",
]


@pytest.mark.parametrize("snippet", BAD_COTANGENTS)
def test_a_constant_cotangent_is_flagged(snippet):
    assert cotangent_findings(snippet)


@pytest.mark.parametrize("snippet", GOOD_COTANGENTS)
def test_a_random_cotangent_or_a_mask_of_ones_is_not_flagged(snippet):
    assert cotangent_findings(snippet) == []


BAD_TOLERANCES = [
    "assert a == pytest.approx(b)",
    "assert a == approx(b)",
    "assert a == pytest.approx(\n    b,\n)",
    "np.testing.assert_allclose(a, b)",
    "np.testing.assert_allclose(a, b, atol=1e-12)",
    "numpy.testing.assert_allclose(a, b, err_msg='x')",
    "assert np.allclose(a, b)",
    "assert np.isclose(a, b).all()",
    "assert torch.allclose(a, b)",
    "torch.testing.assert_close(a, b)",
    "assert math.isclose(a, b)",
]

GOOD_TOLERANCES = [
    "assert a == pytest.approx(b, rel=1e-12)",
    "assert a == pytest.approx(b, abs=1e-15)",
    "assert a == pytest.approx(b, 1e-12)",
    "np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)",
    "np.testing.assert_allclose(a, b, 1e-12)",
    "np.testing.assert_allclose(a, b, **CLOSE)",
    "np.testing.assert_array_equal(a, b)",
    "assert np.allclose(a, b, rtol=1e-12, atol=0)",
    "torch.testing.assert_close(a, b, rtol=0, atol=0)",
    "assert math.isclose(a, b, rel_tol=1e-12)",
]


@pytest.mark.parametrize("snippet", BAD_TOLERANCES)
def test_a_default_tolerance_is_flagged(snippet):
    assert tolerance_findings(snippet)


@pytest.mark.parametrize("snippet", GOOD_TOLERANCES)
def test_an_explicit_tolerance_is_not_flagged(snippet):
    assert tolerance_findings(snippet) == []
