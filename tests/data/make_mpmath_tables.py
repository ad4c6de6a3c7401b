"""Write the mpmath tables in tests/data: tiny cases evaluated with mpmath at 50 digits.

Run ``python -m tests.data.make_mpmath_tables [TABLE ...]`` to regenerate (all by default):

* ``sdpa_mpmath.json``: sdpa with every option (read by tests/attention/test_sdpa_mpmath.py);
* ``hard_points_mpmath.json``: the hard points of issue 11 — softmax / log_softmax / logsumexp at
  extreme logits (±700, huge spreads, near-ties, unmasked ``-inf``), entropy near 0 and near
  log n, entropy from logits, Jensen–Shannon from JS ≈ log 2 down to ≈ 1e-31, linear attention
  and the split-KV ``combine_partials`` (read by tests/test_mpmath_tables.py).

The forward is the spec's definition evaluated in 50-digit arithmetic; the gradients are
mpmath's numerical derivative (``mp.diff``) of ``L = Σ cotangent · output``, so they do not
depend on the hand-derived backward they check.  At an unmasked ``-inf`` input the gradient is
the limit ``x → -inf``, evaluated at ``x = -10⁴`` (``e^{-10⁴}`` is far below 50 digits).
"""

import json
import pathlib
import sys

import mpmath as mp
import numpy as np

mp.mp.dps = 50
PATH = pathlib.Path(__file__).with_name("sdpa_mpmath.json")
HARD_PATH = pathlib.Path(__file__).with_name("hard_points_mpmath.json")
FAR = -(mp.mpf(10) ** 4)  # stands for -inf in a gradient: the limit x -> -inf


def _cases():
    rng = np.random.default_rng(20261123)

    def arr(*shape, s=1.0):
        return np.round(rng.standard_normal(shape) * s, 6)

    yield "plain", dict(q=arr(1, 2, 2), k=arr(1, 3, 2), v=arr(1, 3, 2)), {}
    yield (
        "causal_bottom_right_softcap_scale",
        dict(q=arr(1, 2, 3), k=arr(1, 4, 3), v=arr(1, 4, 2)),
        dict(causal=True, align="bottom_right", softcap=1.5, scale=0.7),
    )
    bias = arr(2, 2, 3)
    bias[0, 1, 2] = -np.inf
    mask = np.array([[True, True, False], [False, False, False]])
    yield (
        "gqa_bias_mask_empty_row_sinks",
        dict(q=arr(2, 2, 2), k=arr(1, 3, 2), v=arr(1, 3, 2)),
        dict(bias=bias, mask=mask, sinks=np.array([0.3, -np.inf])),
    )
    yield (
        "dropout_window_uniform_empty",
        dict(q=arr(1, 3, 2), k=arr(1, 3, 2), v=arr(1, 3, 1)),
        dict(
            window=(1, 0),
            mask=np.array([[True, True, True], [False, True, True], [True, False, False]]),
            dropout_p=0.25,
            dropout_mask=np.array([[True, False, True], [True, True, True], [False, True, True]]),
            empty_rows="uniform",
        ),
    )
    yield "large_logits", dict(q=arr(1, 2, 2, s=20.0), k=arr(1, 3, 2, s=20.0), v=arr(1, 3, 2)), {}


def mp_sdpa(q, k, v, o):
    """The spec's sdpa on nested mpf lists (one batch-free case): (out, lse)."""
    hq, lq, d = len(q), len(q[0]), len(q[0][0])
    hk, lk, dv = len(k), len(k[0]), len(v[0][0])
    scale = mp.mpf(o["scale"]) if "scale" in o else 1 / mp.sqrt(d)
    off = lk - lq if o.get("align") == "bottom_right" else 0
    out = [[[mp.mpf(0)] * dv for _ in range(lq)] for _ in range(hq)]
    lse = [[None] * lq for _ in range(hq)]
    for h in range(hq):
        g = h // (hq // hk)
        for i in range(lq):
            s = []
            for j in range(lk):
                x = scale * mp.fsum(q[h][i][c] * k[g][j][c] for c in range(d))
                if "softcap" in o:
                    c_ = mp.mpf(o["softcap"])
                    x = c_ * mp.tanh(x / c_)
                if "bias" in o:
                    x = x + o["bias"][h][i][j]
                ok = "mask" not in o or o["mask"][i][j]
                if o.get("causal") and j > i + off:
                    ok = False
                if "window" in o:
                    left, right = o["window"]
                    if (left is not None and j < i + off - left) or (right is not None and j > i + off + right):
                        ok = False
                s.append(x if ok and x != mp.ninf else None)
            terms = [mp.exp(x) for x in s if x is not None]
            if "sinks" in o and o["sinks"][h] != mp.ninf:
                terms.append(mp.exp(o["sinks"][h]))
            if not terms:
                lse[h][i] = mp.ninf
                if o.get("empty_rows", "zero") == "uniform":
                    w = [mp.mpf(1) / lk] * lk
                else:
                    continue
            else:
                total = mp.fsum(terms)
                lse[h][i] = mp.log(total)
                w = [mp.exp(x) / total if x is not None else mp.mpf(0) for x in s]
            for j in range(lk):
                wj = w[j]
                if "dropout_mask" in o:
                    wj = wj * (1 if o["dropout_mask"][i][j] else 0) / (1 - mp.mpf(o["dropout_p"]))
                for c in range(dv):
                    out[h][i][c] += wj * v[g][j][c]
    return out, lse


def _mp(a):
    """Nested lists of mpf (``mp.ninf`` for -inf) from an array; bool arrays as nested lists of bool.

    NumPy scalars (what iterating a 1-D array yields) are converted too: left as float64 they
    would round every product to 53 bits before mpmath saw it."""
    if isinstance(a, np.ndarray) and a.dtype == bool:
        return a.tolist()
    if isinstance(a, np.ndarray) and a.ndim:
        return [_mp(x) for x in a]
    if isinstance(a, (np.ndarray, np.floating, float, np.integer)) and not isinstance(a, (bool, np.bool_)):
        return mp.ninf if np.isneginf(a) else mp.mpf(float(a))
    return a


def _flat(x):
    return [y for z in x for y in _flat(z)] if isinstance(x, list) else [x]


def _json_float(x):
    return None if x is None else ("-inf" if x == mp.ninf else mp.nstr(x, 25))


def evaluate(inputs, options, d_out, d_lse):
    """(out, lse, grads) in mpmath for one case; grads by mp.diff of the scalar loss."""
    mpo = {k: _mp(v) if isinstance(v, np.ndarray) else v for k, v in options.items()}
    q, k, v = (_mp(inputs[n]) for n in "qkv")
    out, lse = mp_sdpa(q, k, v, mpo)
    grads = {}
    diff_names = ["q", "k", "v"] + [n for n in ("bias", "sinks") if n in options]
    for name in diff_names:
        arr = inputs[name] if name in inputs else options[name]
        g = np.zeros(arr.shape, dtype=object)
        for idx in np.ndindex(*arr.shape):
            if np.isneginf(arr[idx]):
                g[idx] = mp.mpf(0)
                continue

            def loss(t, name=name, idx=idx, arr=arr):
                vals = {n: _mp(inputs[n]) for n in "qkv"}
                opts = dict(mpo)
                target = vals if name in vals else opts
                nested = _mp(arr)
                ref = nested
                for i in idx[:-1]:
                    ref = ref[i]
                ref[idx[-1]] = t
                target[name] = nested
                o_, l_ = mp_sdpa(vals["q"], vals["k"], vals["v"], opts)
                total = mp.fsum(a * b for a, b in zip(_flat(o_), d_out.ravel()) if a is not None)
                total += mp.fsum(a * b for a, b in zip(_flat(l_), d_lse.ravel()) if a is not None and a != mp.ninf)
                return total

            g[idx] = mp.diff(loss, mp.mpf(float(arr[idx])))
        grads["d" + name] = [_json_float(x) for x in g.ravel()]
    return out, lse, grads


def _encode(a):
    if isinstance(a, np.ndarray) and a.dtype == bool:
        return {"bool": a.tolist()}
    if isinstance(a, np.ndarray):
        return {"shape": list(a.shape), "values": ["-inf" if np.isneginf(x) else repr(float(x)) for x in a.ravel()]}
    return a


def write_sdpa():
    rng = np.random.default_rng(7)
    table = []
    for name, inputs, options in _cases():
        hq, lq = inputs["q"].shape[:2]
        d_out = np.round(rng.standard_normal((hq, lq, inputs["v"].shape[-1])), 6)
        d_lse = np.round(rng.standard_normal((hq, lq)), 6)
        out, lse, grads = evaluate(inputs, options, d_out, d_lse)
        table.append(
            {
                "name": name,
                "inputs": {n: _encode(a) for n, a in inputs.items()},
                "options": {n: _encode(a) for n, a in options.items()},
                "d_out": _encode(d_out),
                "d_lse": _encode(d_lse),
                "expected": {
                    "out": [_json_float(x) for x in _flat(out)],
                    "lse": [_json_float(x) for x in _flat(lse)],
                    **grads,
                },
            }
        )
    doc = {"digits": 50, "tolerance": {"forward": 1e-14, "backward": 1e-14}, "cases": table}
    PATH.write_text(json.dumps(doc, indent=1) + "\n")


# ---- the hard points (issue 11) -----------------------------------------------------------------


def _row_softmax(x, keep):
    """(softmax, log_softmax, logsumexp) of one row of mpf (``mp.ninf`` allowed); None on an empty row."""
    on = [k and xi != mp.ninf for xi, k in zip(x, keep)]
    if not any(on):
        return None
    lse = mp.log(mp.fsum(mp.exp(xi) for xi, o in zip(x, on) if o))
    p = [mp.exp(xi - lse) if o else mp.mpf(0) for xi, o in zip(x, on)]
    logp = [xi - lse if o else mp.ninf for xi, o in zip(x, on)]
    return p, logp, lse


def mp_softmax_family(op, x, keep):
    """``op`` of rows ``x`` (nested lists, last axis normalised) → a flat list of mpf."""
    out = []
    for row, k in zip(x, keep):
        p, logp, lse = _row_softmax(row, k)
        out += {"softmax": p, "log_softmax": logp, "logsumexp": [lse]}[op]
    return out


def mp_entropy(p):
    return [-mp.fsum(x * mp.log(x) for x in row if x > 0) for row in p]


def mp_entropy_from_logits(s):
    return mp_entropy([_row_softmax(row, [True] * len(row))[0] for row in s])


def mp_js(p1, p2):
    out = []
    for a, b in zip(p1, p2):
        terms = []
        for x, y in zip(a, b):
            m = (x + y) / 2
            terms += [x * mp.log(x / m)] if x > 0 else []
            terms += [y * mp.log(y / m)] if y > 0 else []
        out.append(mp.fsum(terms) / 2)
    return out


def mp_linear(q, k, v, o):
    """Linear attention on nested lists ``q (Hq, Lq, D)``, ``k (Hk, Lk, D)``, ``v (Hk, Lk, Dv)``."""
    phi = (
        (lambda x: x + 1 if x > 0 else mp.exp(x))
        if o.get("feature_map", "elu+1") == "elu+1"
        else (lambda x: x if x > 0 else mp.mpf(0))
    )
    eps = mp.mpf(o.get("eps", 1e-6))
    g = len(q) // len(k)
    out = []
    for h in range(len(q)):
        kv = h // g
        for i in range(len(q[h])):
            a = [phi(x) for x in q[h][i]]
            keys = range(i + 1) if o.get("causal") else range(len(k[kv]))
            w = [mp.fsum(ai * phi(bj) for ai, bj in zip(a, k[kv][j])) for j in keys]
            den = mp.fsum(w) + eps
            out += [mp.fsum(wj * v[kv][j][c] for wj, j in zip(w, keys)) / den for c in range(len(v[kv][0]))]
    return out


def mp_combine(outs, lses):
    """Split-KV merge of nested lists ``outs (S, R, Dv)``, ``lses (S, R)`` → (out flat, lse flat)."""
    out, lse = [], []
    for r in range(len(lses[0])):
        finite = [s for s in range(len(lses)) if lses[s][r] != mp.ninf]
        if not finite:
            out += [mp.mpf(0)] * len(outs[0][r])
            lse.append(mp.ninf)
            continue
        total = mp.log(mp.fsum(mp.exp(lses[s][r]) for s in finite))
        w = {s: mp.exp(lses[s][r] - total) for s in finite}
        out += [mp.fsum(w[s] * outs[s][r][c] for s in finite) for c in range(len(outs[0][r]))]
        lse.append(total)
    return out, lse


def _softmax_case(op, x, mask=None):
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    keep = np.ones(x.shape, dtype=bool) if mask is None else np.atleast_2d(mask)
    fn = lambda a: mp_softmax_family(op, a, keep.tolist())  # noqa: E731
    return {"x": x}, ({} if mask is None else {"mask": keep}), fn, ["x"]


def _hard_cases():
    """(name, op, inputs, options, mp function of the inputs → outputs, differentiable inputs, note)."""
    x_issue = [0.3, -np.inf, 1.2, -0.4]
    rows = {
        "pm700": [700.0, -700.0, 0.0, 699.5],
        "minus700": [-700.0, -700.5, -701.0, -745.0],
        "huge_spread": [0.0, -50.0, -1000.0, -1e5],
        "near_ties": [3.0, np.nextafter(3.0, 4.0), 3.0 - 1e-15, 3.0],
        "near_ties_at_1000": [1000.0, 1000.0 - 2.0**-40, 1000.0 + 2.0**-40],
        "tiny_logits": [1e-300, -1e-300, 0.0, 5e-324],
        "max_spread": [709.0, 0.0, -709.0],
        "unmasked_neg_inf": x_issue,
    }
    for op in ("softmax", "log_softmax", "logsumexp"):
        for name, x in rows.items():
            yield (f"{op}/{name}", op) + _softmax_case(op, x)
        yield (f"{op}/masked_and_neg_inf", op) + _softmax_case(
            op, [x_issue + [2.0]], np.array([[True, True, True, True, False]])
        )
    # entropy near 0 and near log n: rows of stored floats, measured as they are
    near_zero = {
        "1e-3": [1 - 1e-3, 5e-4, 5e-4],
        "1e-8": [1 - 1e-8, 1e-8 / 3, 1e-8 / 3, 1e-8 / 3],
        "1e-14": [1 - 1e-14, 1e-14],
        "ulp": [1 - 2.0**-52, 2.0**-53, 2.0**-53],
        "1e-300": [1.0, 1e-300],
    }
    for name, p in near_zero.items():
        yield f"entropy/near_0/{name}", "entropy", {"P": np.array([p])}, {}, mp_entropy, ["P"]
    for d in (1e-3, 1e-8, 1e-12):
        p = [[0.25 + d, 0.25 - d, 0.25, 0.25]]
        yield f"entropy/near_log_n/{d:g}", "entropy", {"P": np.array(p)}, {}, mp_entropy, ["P"]
    yield (
        "entropy/normalized_near_1",
        "entropy",
        {"P": np.array([[0.2 + 1e-9, 0.2 - 1e-9, 0.2, 0.2, 0.2]])},
        {"normalize": True},
        (lambda p: [h / mp.log(5) for h in mp_entropy(p)]),
        ["P"],
    )
    logits = {
        "dominant_40": [100.0, 60.0],
        "dominant_700": [0.0, -40.0, -45.0, -700.0],
        "near_uniform": [1.0, 1.0 + 1e-9, 1.0 - 1e-9],
    }
    for name, s in logits.items():
        yield (
            f"entropy_from_logits/{name}",
            "entropy_from_logits",
            {"s": np.array([s])},
            {},
            mp_entropy_from_logits,
            ["s"],
        )
    # Jensen–Shannon from log 2 down to ≈ 1e-31: q = p ⊙ (1 + δ v), v of zero p-weighted mean
    rng = np.random.default_rng(11)
    base = rng.dirichlet(np.ones(5))
    v = rng.standard_normal(5)
    v -= base @ v
    for delta in (0.5, 1e-2, 1e-4, 1e-6, 1e-8, 1e-10, 1e-12, 1e-14, 1e-15):
        q = base * (1 + delta * v)
        q = q / q.sum()
        inputs = {"P1": np.array([base]), "P2": np.array([q])}
        for op in ("js_divergence", "js_distance"):
            fn = mp_js if op == "js_divergence" else (lambda a, b: [mp.sqrt(j) for j in mp_js(a, b)])
            yield f"{op}/delta_{delta:g}", op, inputs, {}, fn, ["P1", "P2"]
    disjoint = {"P1": np.array([[0.5, 0.5, 0.0, 0.0]]), "P2": np.array([[0.0, 0.0, 0.25, 0.75]])}
    yield "js_divergence/disjoint_log2", "js_divergence", disjoint, {}, mp_js, []
    # linear attention
    arr = lambda *shape, s=1.0: np.round(rng.standard_normal(shape) * s, 6) + 0.01  # noqa: E731  (off elu's kink)
    qkv = {"q": arr(1, 3, 2), "k": arr(1, 3, 2), "v": arr(1, 3, 2)}
    lin = lambda o: lambda q, k, v: mp_linear(q, k, v, o)  # noqa: E731
    yield "linear_attention/elu", "linear_attention", qkv, {}, lin({}), ["q", "k", "v"]
    yield (
        "linear_attention/elu_causal_eps0",
        "linear_attention",
        qkv,
        {"causal": True, "eps": 0.0},
        lin({"causal": True, "eps": 0.0}),
        ["q", "k", "v"],
    )
    gqa = {"q": arr(2, 2, 3, s=3.0), "k": arr(1, 4, 3, s=3.0), "v": arr(1, 4, 2)}
    yield "linear_attention/elu_gqa_large", "linear_attention", gqa, {"eps": 0.5}, lin({"eps": 0.5}), ["q", "k", "v"]
    relu_opts = {"feature_map": "relu", "causal": True}
    pos = {"q": np.abs(arr(1, 3, 2)) + 0.1, "k": np.abs(arr(1, 3, 2)) + 0.1, "v": arr(1, 3, 2)}
    yield "linear_attention/relu_causal", "linear_attention", pos, relu_opts, lin(relu_opts), ["q", "k", "v"]
    # split-KV merge: ordinary, ±700 spreads, a dominant partial at lse 0, an empty partial, an empty row
    outs = np.round(rng.standard_normal((3, 1, 5, 2)), 6)
    lses = np.array(
        [
            [[0.3, 700.0, 0.0, -np.inf, 1.0]],
            [[-0.2, -700.0, -50.0, 2.0, 1.0 + 2.0**-40]],
            [[1.1, 699.0, -1e3, -np.inf, 1.0]],
        ]
    )
    lses[:, 0, 4] = [1.0, 1.0 + 2.0**-40, 1.0 - 2.0**-40]  # near ties
    empty = np.array([[[-np.inf, -np.inf]]] * 2)
    yield (
        "combine_partials/hard_rows",
        "combine_partials",
        {"outs": outs, "lses": lses},
        {},
        mp_combine,
        [
            "outs",
            "lses",
        ],
    )
    yield (
        "combine_partials/empty_row",
        "combine_partials",
        {"outs": outs[:2, :, :2], "lses": empty},
        {},
        mp_combine,
        [
            "outs",
            "lses",
        ],
    )


def _eval(fn, values):
    """``fn`` on nested mpf lists; one output list, or a tuple of them (combine: out, lse)."""
    out = fn(*values)
    return out if isinstance(out, tuple) else (out,)


def _far(a):
    """Inputs for a gradient: ``-inf`` entries at ``FAR`` (the limit), empty rows left at ``-inf``."""
    a = np.asarray(a, dtype=np.float64)
    nested = _mp(a)
    if not np.isneginf(a).any():
        return nested
    flat_rows = a.reshape(-1, a.shape[-1])
    for r, row in enumerate(flat_rows):
        if np.isneginf(row).all():
            continue
        idx = np.unravel_index(r * a.shape[-1], a.shape)[:-1]
        target = nested
        for i in idx:
            target = target[i]
        for j, x in enumerate(row):
            if np.isneginf(x):
                target[j] = FAR
    return nested


def _combine_far(lses):
    """combine_partials' rows run over the first axis: an empty row (every partial -inf) stays -inf."""
    a = np.asarray(lses, dtype=np.float64)
    nested = _mp(a)
    for idx in np.ndindex(*a.shape[1:]):
        col = a[(slice(None),) + idx]
        if np.isneginf(col).all():
            continue
        for s_ in range(a.shape[0]):
            if np.isneginf(col[s_]):
                target = nested[s_]
                for i in idx[:-1]:
                    target = target[i]
                target[idx[-1]] = FAR
    return nested


def _flat_inputs(op, inputs):
    """The mp function's arguments: combine's partials flattened to (S, rows, Dv) / (S, rows)."""
    if op == "combine_partials":
        outs, lses = inputs["outs"], inputs["lses"]
        return [outs.reshape(outs.shape[0], -1, outs.shape[-1]), lses.reshape(lses.shape[0], -1)]
    return list(inputs.values())


def evaluate_hard(op, inputs, fn, diff_names, cotangents):
    """(outputs, grads) in mpmath: outputs by ``fn``, grads by ``mp.diff`` of ``Σ cotangent · output``."""
    arrays = _flat_inputs(op, inputs)
    outputs = _eval(fn, [_mp(np.asarray(a, dtype=np.float64)) for a in arrays])
    names = list(inputs)
    grads = {}
    far = [(_combine_far(a) if op == "combine_partials" and n == "lses" else _far(a)) for n, a in zip(names, arrays)]
    for name in diff_names:
        pos = names.index(name)
        arr = np.asarray(arrays[pos], dtype=np.float64)
        g = np.zeros(arr.shape, dtype=object)
        for idx in np.ndindex(*arr.shape):
            ref = far[pos]
            for i in idx[:-1]:
                ref = ref[i]
            x0 = ref[idx[-1]]
            if x0 == mp.ninf:  # an empty row: the policy's zero gradient
                g[idx] = mp.mpf(0)
                continue

            def loss(t, pos=pos, idx=idx):
                vals = [_copy_nested(f) for f in far]
                target = vals[pos]
                for i in idx[:-1]:
                    target = target[i]
                target[idx[-1]] = t
                outs = _eval(fn, vals)
                return mp.fsum(
                    c * o for out, cot in zip(outs, cotangents) for o, c in zip(out, cot.ravel()) if o != mp.ninf
                )

            g[idx] = _diff(loss, x0)
        grads["d" + name] = [_json_float(x) for x in g.ravel()]
    return outputs, grads


DIFF_BITS = 1100  # extra working bits: a derivative down to 1e-308 of a loss of size 1 keeps 50 digits


def _diff(f, x):
    """``f'(x)`` by ``mp.diff``: a step relative to ``|x|`` when ``|x| < 1`` (mpmath's default step
    is absolute, ~1e-54, and would cross zero at an entry such as 1e-300), and ``DIFF_BITS`` more
    working bits (plus those of ``1/|x|``), so that a derivative as small as e^-709 next to a loss of
    size 1 (softmax at logits 709, 0, -709) is resolved rather than read as 0."""
    if x == 0 or abs(x) >= 1:
        return mp.diff(f, x, addprec=DIFF_BITS)
    m = int(mp.mag(x))
    return mp.diff(f, x, h=mp.ldexp(1, m - mp.mp.prec - DIFF_BITS), addprec=DIFF_BITS - m)


def _copy_nested(x):
    return [_copy_nested(y) for y in x] if isinstance(x, list) else x


LOOSER = {
    "linear_attention/relu_causal": {
        "tolerance": {"backward": 1e-10},
        "why": (
            "dq of the causal first row: out_0 = v_0 (a·b_0)/(a·b_0 + eps) depends on q_0 only through "
            "eps = 1e-6, and the prefix-sum backward forms it as (S_0 d_out − z_0 (d_out·out_0)) / den_0, "
            "a difference of terms 1e6 times larger: an absolute error of a few ulps of those terms, "
            "2e-11 of the row's gradient (measured); every other row and input is within 1e-14"
        ),
    }
}


def write_hard_points():
    rng = np.random.default_rng(20261124)
    cases = []
    for name, op, inputs, options, fn, diff_names in _hard_cases():
        shapes = [np.shape(o) for o in _reference_shapes(op, inputs, options)]
        cotangents = [np.round(rng.standard_normal(shape), 6) for shape in shapes]
        outputs, grads = evaluate_hard(op, inputs, fn, diff_names, cotangents)
        out_names = ["out", "lse"] if op == "combine_partials" else ["out"]
        case = {
            "name": name,
            "op": op,
            "inputs": {n: _encode(np.asarray(a, dtype=np.float64)) for n, a in inputs.items()},
            "options": {n: _encode(a) for n, a in options.items()},
            "cotangents": [_encode(c) for c in cotangents],
            "expected": {**{n: [_json_float(x) for x in o] for n, o in zip(out_names, outputs)}, **grads},
        }
        cases.append({**case, **LOOSER.get(name, {})})
    doc = {
        "digits": 50,
        "tolerance": {"forward": 1e-14, "backward": 1e-14},
        "measure": "per row: max |actual − expected| / max |expected| over the row (one value: relative error)",
        "cases": cases,
    }
    HARD_PATH.write_text(json.dumps(doc, indent=1) + "\n")


def _reference_shapes(op, inputs, options):
    """The shapes of the op's outputs (for the cotangents), from the inputs alone."""
    if op in ("softmax", "log_softmax"):
        return [inputs["x"]]
    if op == "logsumexp":
        return [inputs["x"][..., 0]]
    if op in ("entropy", "js_divergence", "js_distance"):
        return [next(iter(inputs.values()))[..., 0]]
    if op == "entropy_from_logits":
        return [inputs["s"][..., 0]]
    if op == "linear_attention":
        q, v = inputs["q"], inputs["v"]
        return [np.zeros(q.shape[:-1] + v.shape[-1:])]
    outs = inputs["outs"]
    return [outs[0], outs[0][..., 0]]


TABLES = {"sdpa": write_sdpa, "hard_points": write_hard_points}


def main(argv=None):
    names = list(sys.argv[1:] if argv is None else argv) or list(TABLES)
    for name in names:
        TABLES[name]()


if __name__ == "__main__":
    main()
