"""The ``refattn`` command: check implementations, write the golden suite, analyse saved maps, bench.

Exit status: 0 when every check passes, 1 when one fails (or errors), 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from refattn._validate import RefAttnError

__all__ = ["main"]


def _fmt(x):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2e}"


def _table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    line = "  ".join(f"{h:<{w}}" for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(f"{str(c):<{w}}" for c, w in zip(r, widths)) for r in rows]
    return "\n".join(x.rstrip() for x in out)


def _print_checks(rows, verbose):
    table = [
        (
            r.case,
            r.implementation,
            r.dtype,
            r.quantity or "-",
            _fmt(r.max_error),
            _fmt(r.allowed),
            "-" if math.isnan(r.ratio) else f"{r.ratio:.2f}",
            r.status,
        )
        for r in rows
    ]
    print(_table(("case", "implementation", "dtype", "worst", "max error", "allowed", "ratio", "result"), table))
    for r in rows:
        if r.status in ("FAIL", "error") or (verbose and r.detail):
            print(f"\n[{r.status}] {r.case} / {r.implementation}\n{r.detail}")
    counts = {s: sum(r.status == s for r in rows) for s in ("pass", "FAIL", "error", "unsupported")}
    print(
        f"\nsummary: {counts['pass']} pass, {counts['FAIL']} FAIL, {counts['error']} error, "
        f"{counts['unsupported']} unsupported (of {len(rows)} checks)"
    )


def _case_files(target):
    path = Path(target)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise RefAttnError(f"{target}: no .npz case files in this directory")
        return files
    if not path.exists():
        raise RefAttnError(f"{target}: no such file or directory")
    return [path]


def _check_files(args):
    from refattn import io
    from refattn.crosscheck import CheckRow

    rows = []
    for path in _case_files(args.target):
        case = io.load_case(path)
        if not case.outputs:
            raise RefAttnError(f"{path}: no outputs to check (write the implementation's out/lse/dq/... keys)")
        verdict = io.check_case(case, rule=args.rule, dtype=args.dtype)
        dtype = args.dtype or case.dtype
        rows.append(CheckRow.from_verdict(case.name, case.implementation or path.name, dtype, verdict))
    return rows


def cmd_check(args):
    from refattn import crosscheck, io

    if args.target:
        rows = _check_files(args)
    else:
        impls = crosscheck.available_implementations(torch=not args.no_torch)
        if args.only:
            impls = [i for i in impls if any(s in i.name for s in args.only)]
            if not impls:
                raise RefAttnError(f"--only {args.only}: matches no implementation available here")
        cases = io.standard_suite()
        if args.cases:
            cases = [c for c in cases if c.name in args.cases]
            if not cases:
                raise RefAttnError(f"--cases {args.cases}: no such case; see `refattn golden`")
        progress = None if args.json else crosscheck.stderr_progress
        rows = crosscheck.run_checks(cases, impls, rule=args.rule, progress=progress)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=1, default=float))
    else:
        _print_checks(rows, args.verbose)
    return 0 if all(r.status in ("pass", "unsupported") for r in rows) else 1


def cmd_golden(args):
    from refattn import io

    paths = io.write_golden(args.directory, suite=args.suite)
    print(f"wrote {len(paths)} case files to {args.directory}")
    return 0


def cmd_rollout(args):
    import refattn

    layers, mask, tokens = refattn.io.load_attentions(args.file)
    r = refattn.rollout(layers, residual=args.residual, head_fusion=args.head_fusion, mask=mask)
    flat = r.reshape((-1,) + r.shape[-2:])  # (items, n, n)
    row = args.row
    rows = []
    for item, m in enumerate(flat):
        order = np.argsort(-m[row], kind="stable")[: args.top]
        rows.append((item, row, f"{m[row].sum():.6f}", ", ".join(f"{int(j)}:{m[row, j]:.3f}" for j in order)))
    if args.json:
        print(json.dumps({"rollout_row": flat[:, row].tolist(), "layers": len(layers)}))
    else:
        print(
            f"rollout over {len(layers)} layers, maps {tuple(layers[0].shape)}, residual {args.residual}, "
            f"head fusion {args.head_fusion}"
        )
        print(_table(("item", "row", "row sum", f"top {args.top} input tokens (index:weight)"), rows))
    if args.plot:
        from refattn.plot import plot_attention_report

        plot_attention_report(args.plot, layers, rollout_map=r, summary=refattn.metrics.summarize(layers, mask=mask))
        print(f"plot written to {args.plot}")
    return 0


def cmd_metrics(args):
    import refattn

    layers, mask, tokens = refattn.io.load_attentions(args.file)
    summary = refattn.metrics.summarize(layers, tokens, mask=mask)
    per_head = {k: v for k, v in summary.items() if v.ndim == 2}
    if args.json:
        print(json.dumps({k: v.tolist() for k, v in summary.items()}))
    else:
        names = list(per_head)
        n_layers, n_heads = next(iter(per_head.values())).shape
        rows = [
            (layer, head, *(f"{per_head[k][layer, head]:.4f}" for k in names))
            for layer in range(n_layers)
            for head in range(n_heads)
        ]
        print(_table(("layer", "head", *names), rows))
        print("\nhead diversity per layer: " + ", ".join(f"{x:.4f}" for x in summary["diversity"]))
    if args.plot:
        from refattn.plot import plot_attention_report

        r = refattn.rollout(layers, mask=mask)
        plot_attention_report(args.plot, layers, rollout_map=r, summary=summary)
        print(f"plot written to {args.plot}")
    return 0


def cmd_bench(bench_args):
    try:
        from benchmarks.run import main as bench_main
    except ImportError as exc:
        raise RefAttnError(
            "refattn bench runs the benchmarks/ package of a source checkout (pip install -e .)"
        ) from exc
    return bench_main(bench_args) or 0


def _parser():
    from refattn.testing.compare import RULES

    p = argparse.ArgumentParser(prog="refattn", description="The float64 golden reference for attention.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="cross-check implementations (all available, or a case file/directory)")
    c.add_argument("target", nargs="?", help="a .npz case file or a directory of them, with outputs to judge")
    c.add_argument("--rule", choices=RULES, default="flash", help="tolerance rule (default flash)")
    c.add_argument("--dtype", help="the precision the file's outputs were computed in (overrides the file)")
    c.add_argument("--only", nargs="+", help="implementations whose name contains one of these")
    c.add_argument("--cases", nargs="+", help="cases of the standard suite to run")
    c.add_argument("--no-torch", action="store_true", help="skip PyTorch even when installed")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.add_argument("--verbose", action="store_true", help="print every report")
    c.set_defaults(func=cmd_check)
    g = sub.add_parser("golden", help="write the standard suite with refattn's outputs")
    g.add_argument("directory")
    g.add_argument("--suite", default="standard")
    g.set_defaults(func=cmd_golden)
    for name, func, text in (
        ("rollout", cmd_rollout, "attention rollout of saved maps"),
        ("metrics", cmd_metrics, "per-layer, per-head metrics of saved maps"),
    ):
        m = sub.add_parser(name, help=text)
        m.add_argument("file", help=".npz with 'attentions' (L, ..., H, n, n) [, 'mask', 'tokens']")
        m.add_argument("--plot", help="write a PNG: heatmaps, rollout map, per-layer metrics")
        m.add_argument("--json", action="store_true")
        if name == "rollout":
            m.add_argument("--row", type=int, default=0, help="output token to explain (default 0, [CLS])")
            m.add_argument("--top", type=int, default=5)
            m.add_argument("--residual", type=float, default=0.5)
            m.add_argument("--head-fusion", default="mean", choices=("mean", "max", "min"))
        m.set_defaults(func=func)
    b = sub.add_parser(
        "bench", help="run the benchmark table (python -m benchmarks; --help for its options)", add_help=False
    )
    b.set_defaults(func=None)  # main() hands every argument after "bench" to the benchmark script
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    if argv[:1] == ["bench"]:
        try:
            return cmd_bench(argv[1:])
        except RefAttnError as exc:
            print(f"refattn bench: {exc}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except RefAttnError as exc:
        print(f"refattn {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
