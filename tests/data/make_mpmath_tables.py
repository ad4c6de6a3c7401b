"""Write tests/data/sdpa_mpmath.json: tiny sdpa cases evaluated with mpmath at 50 digits.

Run ``python -m tests.data.make_mpmath_tables`` to regenerate.  The forward is
the spec's definition evaluated in 50-digit arithmetic; the gradients are
mpmath's numerical derivative (``mp.diff``) of ``L = Σ d_out·out + Σ d_lse·lse``,
so they do not depend on the hand-derived backward they check.
"""

import json
import pathlib

import mpmath as mp
import numpy as np

mp.mp.dps = 50
PATH = pathlib.Path(__file__).with_name("sdpa_mpmath.json")


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
    if isinstance(a, np.ndarray) and a.dtype == bool:
        return a.tolist()
    if isinstance(a, np.ndarray):
        return [_mp(x) for x in a] if a.ndim else (mp.ninf if np.isneginf(a) else mp.mpf(float(a)))
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


def main():
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


if __name__ == "__main__":
    main()
