"""The ``refattn`` command: check implementations, write the golden suite, analyse saved maps, bench.

Exit status: 0 when every check passes, 1 when one fails (or errors), 2 for bad input.  Bad input
(a missing or malformed file, a bad number, an unknown name) is one line on stderr, never a
traceback: a traceback is a bug in refattn.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
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
        files = sorted(p for p in path.glob("*.npz") if not p.is_dir())
        if not files:
            raise RefAttnError(f"{target}: no .npz case files in this directory")
        return files
    if not path.exists():
        raise RefAttnError(f"{target}: no such file or directory")
    return [path]


def _cap(args):
    """The ``max_bytes`` keyword of the file readers: ``--max-bytes`` when given."""
    return {} if args.max_bytes is None else {"max_bytes": args.max_bytes}


def _one_line(exc):
    return " ".join(str(exc).split())


def _check_file(path, args):
    from refattn import io
    from refattn.crosscheck import CheckRow

    case = io.load_case(path, **_cap(args))
    if not case.outputs:
        raise RefAttnError(f"{path}: no outputs to check (write the implementation's out/lse/dq/... keys)")
    verdict = io.check_case(case, rule=args.rule, dtype=args.dtype)
    dtype = args.dtype or case.dtype
    return CheckRow.from_verdict(case.name, case.implementation or path.name, dtype, verdict)


def _check_files(args, progress):
    """Judge every file of the target.  A broken file in a directory is an ``error`` row with the
    reason (the others are still judged); a single broken file is bad input (exit status 2)."""
    from refattn.crosscheck import CheckRow

    files = _case_files(args.target)
    single = not Path(args.target).is_dir()
    progress = None if single else progress
    if args.workers is not None:
        return _check_in_parallel(files, args, progress)
    rows = []
    for i, path in enumerate(files):
        if progress:
            progress(i, len(files), path.name)
        try:
            rows.append(_check_file(path, args))
        except (RefAttnError, OSError) as exc:
            if single:
                raise
            rows.append(CheckRow(path.stem, path.name, args.dtype or "-", "error", detail=_one_line(exc)))
    if progress:
        progress(len(files), len(files), "done")
    return rows


def _check_row(path, args):
    """One file's row, a broken file an ``error`` row with the reason (what a worker process returns)."""
    from refattn.crosscheck import CheckRow

    try:
        return _check_file(path, args)
    except (RefAttnError, OSError) as exc:
        return CheckRow(path.stem, path.name, args.dtype or "-", "error", detail=_one_line(exc))


def _check_in_parallel(files, args, progress):
    """Every file of a directory judged by ``--workers`` processes, progress as each finishes; the rows
    in file order, as the sequential run gives them."""
    import concurrent.futures
    import multiprocessing

    rows = [None] * len(files)
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked threads or compiled state
    with concurrent.futures.ProcessPoolExecutor(min(args.workers, len(files)), mp_context=context) as pool:
        futures = {pool.submit(_check_row, path, args): i for i, path in enumerate(files)}
        for done, future in enumerate(concurrent.futures.as_completed(futures), start=1):
            rows[futures[future]] = future.result()
            if progress:
                progress(done, len(files), files[futures[future]].name)
    if progress:
        progress(len(files), len(files), "done")
    return rows


def _builtin_checks(args, progress):
    from refattn import crosscheck, io

    impls = crosscheck.available_implementations(torch=not args.no_torch)
    if args.only:
        names = [i.name for i in impls]
        unmatched = [s for s in args.only if not any(s in n for n in names)]
        if unmatched:
            raise RefAttnError(f"--only: {unmatched} match no implementation available here; available: {names}")
        impls = [i for i in impls if any(s in i.name for s in args.only)]
    cases = io.standard_suite()
    if args.cases:
        names = [c.name for c in cases]
        unknown = [n for n in args.cases if n not in names]
        if unknown:
            raise RefAttnError(f"--cases: no such case {unknown} in the standard suite; its cases: {names}")
        cases = [c for c in cases if c.name in args.cases]
    return crosscheck.run_checks(cases, impls, rule=args.rule, progress=progress)


def _check_onnx(args):
    """Every Attention node of the model ``args.target`` run by ``--runtime`` and judged
    (:func:`refattn.adapters.onnx.check_onnx`): one row per node."""
    from refattn.adapters import onnx as onnx_adapter
    from refattn.crosscheck.npz import read_npz

    if args.dtype is not None:
        raise RefAttnError("--dtype: an ONNX model's nodes are judged at their own dtype; drop --dtype")
    if not Path(args.target).is_file():
        raise RefAttnError(f"{args.target}: no such file")
    if args.inputs is not None:
        inputs = read_npz(args.inputs, **_cap(args), what="inputs file (one array per model input)")
    else:
        inputs = onnx_adapter.random_inputs(args.target, seed=0 if args.seed is None else args.seed)
    verdict = onnx_adapter.check_onnx(args.target, inputs, runtime=args.runtime or "onnxruntime", rule=args.rule)
    return verdict.rows()


def cmd_check(args):
    from refattn import crosscheck

    if args.target:
        selectors = (("--only", args.only), ("--cases", args.cases), ("--no-torch", args.no_torch))
        given = [flag for flag, value in selectors if value]
        if given:
            raise RefAttnError(
                f"{given[0]}: selects built-in implementations or cases, but a TARGET was given "
                f"({args.target}): its files' own outputs are judged; drop {given[0]} or the TARGET"
            )
    else:
        for flag, value in (("--dtype", args.dtype), ("--max-bytes", args.max_bytes)):
            if value is not None:
                raise RefAttnError(f"{flag}: applies to case files: give a TARGET (a .npz file or a directory)")
    onnx_model = bool(args.target) and args.target.lower().endswith(".onnx")
    if args.workers is not None and (onnx_model or not args.target or not Path(args.target).is_dir()):
        raise RefAttnError(
            "--workers: judges the files of a directory in parallel: give a TARGET directory of case files"
        )
    if not onnx_model:
        for flag, value in (("--inputs", args.inputs), ("--runtime", args.runtime), ("--seed", args.seed)):
            if value is not None:
                raise RefAttnError(f"{flag}: applies to an ONNX model: give a TARGET model.onnx")
    progress = None if args.quiet else crosscheck.Progress("refattn check")
    if onnx_model:
        rows = _check_onnx(args)
    else:
        rows = _check_files(args, progress) if args.target else _builtin_checks(args, progress)
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


@contextlib.contextmanager
def _flag_names():
    """The library's advice in the command's words: ``check_probabilities=False`` is
    ``--no-check-probabilities`` here."""
    try:
        yield
    except RefAttnError as exc:
        text = str(exc)
        if "check_probabilities=False" not in text:
            raise
        raise RefAttnError(text.replace("check_probabilities=False", "--no-check-probabilities")) from exc


_PLOT_ONLY = (("--layer", "layer"), ("--heads", "heads"), ("--batch", "batch"), ("--tokens", "tokens"))


def _plot_path(args):
    """``--plot`` checked before any work (folder, suffix, matplotlib), or None; the options that
    choose what the figure shows are refused without it."""
    if args.plot is None:
        given = [flag for flag, dest in _PLOT_ONLY if getattr(args, dest) is not None]
        if given:
            raise RefAttnError(f"{given[0]}: chooses what the figure shows: add --plot FIG (or drop {given[0]})")
        return None
    from refattn.plot import check_plot_path

    return check_plot_path(args.plot, "--plot")


def _plot_view(args, layers, tokens):
    """What the figure shows (``--layer``, ``--heads``, ``--batch``, ``--tokens``, else the file's
    ``tokens``), checked against the file's shapes before any work: keywords of ``attention_report``."""
    from refattn import plot

    shape = layers[0].shape  # (..., H, n, n)
    n_items, n_heads, n = int(np.prod(shape[:-3], dtype=np.int64)), shape[-3], shape[-1]
    item = plot.select_item(n_items, 0 if args.batch is None else args.batch, name="--batch")
    layer = plot.select_layers(len(layers), -1 if args.layer is None else args.layer, name="--layer")
    _, note = plot.select_heads(n_heads, args.heads, name="--heads")  # the figure selects them again
    if args.tokens is not None:
        labels = plot.token_labels(args.tokens, n, name="--tokens")
    else:
        labels = plot.token_labels(tokens, n, item=item, n_items=n_items, name=f"{args.file}: key 'tokens'")
    if note:
        print(f"refattn {args.command}: --plot: {note}", file=sys.stderr)
    return {"layer": layer, "item": item, "heads": args.heads, "tokens": labels}


def _plot_written(args, plot):
    print(f"plot written to {plot}", file=sys.stderr if args.json else sys.stdout)


def cmd_rollout(args):
    from refattn.crosscheck import load_attentions
    from refattn.metrics import summarize
    from refattn.rollout_flow import rollout

    plot = _plot_path(args)
    layers, mask, tokens = load_attentions(args.file, **_cap(args))
    n = layers[0].shape[-1]
    if not -n <= args.row < n:
        raise RefAttnError(
            f"--row: expected an output token index in [-{n}, {n}) (the maps are n × n, n = {n}), got {args.row}"
        )
    row = args.row % n
    view = _plot_view(args, layers, tokens) if plot else None
    check = {"check_probabilities": args.check_probabilities}
    with _flag_names():
        r = rollout(layers, residual=args.residual, head_fusion=args.head_fusion, mask=mask, **check)
    flat = r.reshape((-1,) + r.shape[-2:])  # (items, n, n)
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
    if plot:
        from refattn.plot import plot_attention_report

        with _flag_names():
            summary = summarize(layers, tokens, mask=mask, **check)
        plot_attention_report(plot, layers, rollout_map=r, summary=summary, row=row, **view)
        _plot_written(args, plot)
    return 0


def _print_summary(summary, as_json):
    """A summary (:func:`refattn.metrics.summarize`'s dict) as JSON, or as the per-head table and the diversity line."""
    per_head = {k: v for k, v in summary.items() if v.ndim == 2}
    if as_json:
        print(json.dumps({k: v.tolist() for k, v in summary.items()}))
        return
    names = list(per_head)
    n_layers, n_heads = next(iter(per_head.values())).shape
    rows = [
        (layer, head, *(f"{per_head[k][layer, head]:.4f}" for k in names))
        for layer in range(n_layers)
        for head in range(n_heads)
    ]
    print(_table(("layer", "head", *names), rows))
    print("\nhead diversity per layer: " + ", ".join(f"{x:.4f}" for x in summary["diversity"]))


def _dataset_metrics(args):
    """``refattn metrics STORE``: the summary of a dataset (a Zarr store, a directory of map files),
    chunk by chunk, on ``--workers`` local processes (else Dask's threaded scheduler)."""
    from refattn import datasets

    given = [flag for flag, dest in (("--plot", "plot"), *_PLOT_ONLY) if getattr(args, dest) is not None]
    if given:
        raise RefAttnError(f"{given[0]}: draws the maps of one .npz file, not of a dataset ({args.file})")
    maps, mask, tokens = datasets.open_maps(args.file, **_cap(args))
    count, layers, heads, n = maps.shape[:4]
    where = f"{args.workers} worker processes" if args.workers else "Dask's threaded scheduler"
    if not args.json:
        print(f"dataset {args.file}: {count} examples, {layers} layers, {heads} heads, {n} tokens, ", end="")
        print(f"{len(maps.chunks[0])} chunks, on {where}", flush=True)
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(datasets.local_cluster(args.workers)) if args.workers else None
        with _flag_names():
            summary = datasets.summarize(
                maps, tokens, mask=mask, check_probabilities=args.check_probabilities, client=client
            )
    _print_summary(summary, args.json)
    return 0


def cmd_metrics(args):
    from refattn.crosscheck import load_attentions
    from refattn.metrics import summarize
    from refattn.rollout_flow import rollout

    if args.workers is not None or Path(args.file).is_dir():  # a dataset: a Zarr store or a directory of files
        return _dataset_metrics(args)
    plot = _plot_path(args)
    layers, mask, tokens = load_attentions(args.file, **_cap(args))
    view = _plot_view(args, layers, tokens) if plot else None
    check = {"check_probabilities": args.check_probabilities}
    with _flag_names():
        summary = summarize(layers, tokens, mask=mask, **check)
    _print_summary(summary, args.json)
    if plot:
        from refattn.plot import plot_attention_report

        with _flag_names():
            r = rollout(layers, mask=mask, **check)
        plot_attention_report(plot, layers, rollout_map=r, summary=summary, **view)
        _plot_written(args, plot)
    return 0


def cmd_bench(bench_args):
    from refattn.bench.run import main as bench_main

    return bench_main(bench_args, prog="refattn bench") or 0


def cmd_model(args):
    from refattn.model import experiments

    return experiments.run_command(args, prog="refattn model")


def _int_at_least(minimum):
    def integer(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return integer


def _index_spec(*, negative):
    """``--layer`` / ``--heads``: ``3``, ``0,2,4-6`` (ranges inclusive), ``all`` (layers); with
    ``negative``, single indices may count from the end (``-1``).  Ranges are checked against the
    file's shapes later (``refattn.plot.select_*``)."""
    item = r"-?\d+" if negative else r"\d+"

    def spec(text):
        if negative and text.strip() == "all":
            return "all"
        out = []
        for part in text.split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d+)-(\d+)", part)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if lo > hi:
                    raise argparse.ArgumentTypeError(f"expected a range low-high with low <= high, got {part!r}")
                if hi - lo >= 10_000:  # no figure has that many; refused before building the list
                    raise argparse.ArgumentTypeError(f"expected a range of fewer than 10000 indices, got {part!r}")
                out.extend(range(lo, hi + 1))
            elif re.fullmatch(item, part):
                out.append(int(part))
            else:
                example = "0,2,4-6, -1 or all" if negative else "0,2,4-6"
                raise argparse.ArgumentTypeError(f"expected indices and ranges such as {example}, got {text!r}")
        return out

    return spec


def _token_list(text):
    """``--tokens``: comma-separated labels (surrounding spaces dropped)."""
    labels = [t.strip() for t in text.split(",")]
    if not any(labels):
        raise argparse.ArgumentTypeError(f"expected comma-separated token labels such as the,cat,sat, got {text!r}")
    return labels


def _weight(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _byte_count(text):
    """A size in bytes: ``2147483648``, ``2G``, ``512MiB`` (K, M, G, T: powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"expected a size in bytes such as 4096, 512M or 8GiB, got {text!r}")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a size of at least 1 byte, got {text!r}")
    return value


def _dtype_name(text):
    from refattn import lowp

    try:
        return lowp.format_of(text).name
    except RefAttnError as exc:
        raise argparse.ArgumentTypeError(_one_line(exc)) from None


_MAX_BYTES_HELP = (
    "refuse files whose arrays hold more than this, checked against their headers before reading "
    "(bytes, or with K, M, G, T: powers of 1024; default 2G)"
)


def _parser():
    from refattn._version import __version__
    from refattn.testing.compare import RULES

    p = argparse.ArgumentParser(
        prog="refattn",
        description="The float64 golden reference for attention.",
        epilog="Exit status: 0 every check passes, 1 a check fails or errors, 2 bad input (one line on stderr).",
    )
    p.add_argument("--version", action="version", version=f"refattn {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser(
        "check",
        help="cross-check implementations (all available, or a case file/directory)",
        description="Without TARGET: every implementation available here over the standard suite. With "
        "TARGET: judge the outputs that case files carry (every file of a directory; a broken file is "
        "an error row); with TARGET model.onnx: run the model and judge each Attention node (a row per "
        "node). Progress goes to stderr: a bar on a terminal, a line per group otherwise.",
    )
    c.add_argument(
        "target",
        nargs="?",
        help="a .npz case file or a directory of them, with outputs to judge; or an ONNX model (.onnx) "
        "whose Attention nodes are run and judged",
    )
    c.add_argument("--rule", choices=RULES, default="flash", help="tolerance rule (default flash)")
    c.add_argument(
        "--dtype",
        type=_dtype_name,
        help="with TARGET: the precision the files' outputs were computed in (overrides the files' own)",
    )
    c.add_argument("--only", nargs="+", metavar="NAME", help="implementations whose name contains one of these")
    c.add_argument("--cases", nargs="+", metavar="CASE", help="cases of the standard suite to run (default: all)")
    c.add_argument("--no-torch", action="store_true", help="skip PyTorch even when installed")
    c.add_argument("--max-bytes", type=_byte_count, metavar="SIZE", help="with TARGET: " + _MAX_BYTES_HELP)
    c.add_argument(
        "--inputs",
        metavar="FILE",
        help="with TARGET model.onnx: a .npz with one array per model input (default: random values, "
        "which needs fixed shapes and float or bool inputs)",
    )
    c.add_argument(
        "--runtime",
        choices=("onnxruntime", "reference"),
        help="with TARGET model.onnx: ONNX Runtime (CPU, the default) or ONNX's reference evaluator",
    )
    c.add_argument(
        "--seed", type=_int_at_least(0), help="with TARGET model.onnx: seed of the random inputs (default 0)"
    )
    c.add_argument(
        "--workers",
        type=_int_at_least(1),
        metavar="N",
        help="with TARGET a directory: judge its files in N worker processes (progress as each finishes; "
        "the rows in file order)",
    )
    c.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    c.add_argument("--verbose", action="store_true", help="print every report, not only the failures")
    c.add_argument("--quiet", action="store_true", help="no progress on stderr")
    c.set_defaults(func=cmd_check)
    g = sub.add_parser("golden", help="write the standard suite with refattn's outputs")
    g.add_argument("directory", help="folder to write the case files into (created if missing)")
    g.add_argument("--suite", default="standard", choices=("standard",), help="which suite (default standard)")
    g.set_defaults(func=cmd_golden)
    for name, func, text in (
        ("rollout", cmd_rollout, "attention rollout of saved maps"),
        ("metrics", cmd_metrics, "per-layer, per-head metrics of saved maps"),
    ):
        m = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        m.add_argument(
            "file",
            help=".npz with 'attentions' (L, ..., H, n, n) [, 'mask', 'tokens']"
            + ("; or a dataset: a Zarr store or a directory of such files (dask)" if name == "metrics" else ""),
        )
        m.add_argument(
            "--plot",
            metavar="FIG",
            help="also write a figure (.png, .pdf or .svg, in an existing folder): the chosen heads' heatmaps, "
            "the rollout map"
            + (" with --row outlined and its weights" if name == "rollout" else "")
            + ", per-layer metrics; needs matplotlib",
        )
        m.add_argument(
            "--layer",
            type=_index_spec(negative=True),
            metavar="LAYERS",
            help="with --plot: the layers whose heads are drawn, a row each: an index (default -1, the last), "
            "a list with ranges such as 0,2,4-6 (--layer=-2,-1 for negative ones) or 'all'; at most 8",
        )
        m.add_argument(
            "--heads",
            type=_index_spec(negative=False),
            metavar="HEADS",
            help="with --plot: the heads drawn, such as 0-3,8 (default all, at most 16: past that the first 16, "
            "said on stderr)",
        )
        m.add_argument(
            "--batch",
            type=int,
            metavar="B",
            help="with --plot: the batch item drawn (default 0; an index into the flattened batch dims, "
            "negative counts from the end)",
        )
        m.add_argument(
            "--tokens",
            type=_token_list,
            metavar="LIST",
            help="with --plot: the n token labels of the axes, comma-separated (default: the file's 'tokens' "
            "ids, else integer positions); labels only, the metrics use the file's ids",
        )
        m.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
        m.add_argument("--max-bytes", type=_byte_count, metavar="SIZE", help=_MAX_BYTES_HELP)
        m.add_argument(
            "--no-check-probabilities",
            dest="check_probabilities",
            action="store_false",
            help="measure maps whose real rows are not probabilities as they are (refused by default: "
            "raw logits saved by mistake)",
        )
        if name == "metrics":
            m.add_argument(
                "--workers",
                type=_int_at_least(1),
                metavar="N",
                help="summarise a dataset (FILE a Zarr store or a directory of .npz map files, read chunk by "
                "chunk) on N local worker processes (default for a directory: Dask's threaded scheduler); "
                "needs refattn[dask]",
            )
        if name == "rollout":
            m.add_argument(
                "--row",
                type=int,
                default=0,
                help="output token to explain (default 0, [CLS]; negative counts from the end: -1 the last)",
            )
            m.add_argument("--top", type=_int_at_least(1), default=5, help="input tokens to list per item (default 5)")
            m.add_argument(
                "--residual",
                type=_weight,
                default=0.5,
                help="weight of the identity (the skip connection) in each layer, in [0, 1] (default 0.5)",
            )
            m.add_argument(
                "--head-fusion",
                default="mean",
                choices=("mean", "max", "min"),
                help="how each layer's heads are combined (default mean)",
            )
        m.set_defaults(func=func)
    b = sub.add_parser(
        "bench",
        help="run the benchmark table (python -m refattn.bench; refattn bench --help for its options)",
        add_help=False,
    )
    b.set_defaults(func=None)  # main() hands every argument after "bench" to the benchmark script
    from refattn.model import experiments

    e = sub.add_parser(
        "model",
        help="run a model experiment (loops-vs-matrix, lm-vs-bengio, heads): its table and figure in benchmarks/model/",
        description="Run one experiment of refattn.model.experiments and write NAME.md and NAME.png.",
    )
    experiments.add_arguments(e)
    e.set_defaults(func=cmd_model)
    return p


def _exit_code(exc):
    """The exit status a :class:`SystemExit` (argparse: --help, --version, a usage error) carries."""
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1


def _quiet_stdout():
    """After a broken pipe (``refattn check | head``): drop what is left to print."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (captured): nothing to redirect
        pass


def main(argv=None):
    """Run the ``refattn`` command: ``check``, ``golden``, ``rollout``, ``metrics``, ``bench`` or ``model``
    (``refattn --help``, ``refattn COMMAND --help``; ``specs/cli.md``).

    A :class:`RefAttnError` or :class:`OSError` (bad input: a file, a number, a name) is one line
    ``refattn COMMAND: message`` on stderr and status 2; any other exception is a bug and propagates.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after the program name, e.g. ``["check", "--only", "numba"]``.  Default
        None: ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status: 0 every check passed, 1 a check failed or errored (also after a broken
        pipe), 2 bad input, 130 interrupted; ``--help`` and ``--version`` give 0.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv[:1] == ["bench"] else None
    try:
        if command == "bench":
            return cmd_bench(argv[1:])
        args = _parser().parse_args(argv)
        command = args.command
        return args.func(args)
    except SystemExit as exc:
        return _exit_code(exc)
    except RefAttnError as exc:
        print(f"refattn {command}: {_one_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        _quiet_stdout()
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"refattn {command}: {where}{exc.strerror or _one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"refattn {command}: interrupted" if command else "refattn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
