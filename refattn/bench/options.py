"""The options of ``python -m refattn.bench`` (``refattn bench``), the plan they make, and what the run says.

``--quick`` changes only the defaults: a flag given explicitly keeps its value, and the plan printed
up front says which values came from where.  Before measuring anything the run prints the plan and an
estimate of its duration (from a quick float64 GEMM probe and the shares of the GEMM rate each
method reached in ``benchmarks/RESULTS.md``); while it runs, one line per section goes to stderr,
whether or not it is a terminal.  Without numba the kernel rows are left out, and the run says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["FULL", "QUICK", "estimate_seconds", "numba_version", "parse_args", "parser", "plan_lines", "progress"]

#: The defaults of a full run: SDPA sizes, repeats, peak-memory sizes, whether the rollout section runs.
FULL = {"sizes": [1024, 4096, 16384], "repeats": 5, "memory_sizes": [8192, 16384, 32768], "rollout": True}
#: The defaults under ``--quick`` (same keys as :data:`FULL`).
QUICK = {"sizes": [1024, 4096], "repeats": 3, "memory_sizes": [4096, 8192], "rollout": False}
#: The metrics section's layer ``(B, H, N)`` unless ``--metrics-shape`` is given (float64 ``(B, H, N, N)``).
METRICS_SHAPE = (32, 16, 256)
#: The attention-flow section's token counts n unless ``--flow-sizes`` is given (L=12, H=4).
FLOW_SIZES = (16, 32, 64, 128)
#: The NumPy SDPA rows (an N×N score matrix per head) and every backward row stop at this N.
NUMPY_MAX_N = 4096

# Share of the float64 GEMM rate each method reaches (non-causal, causal), as measured in
# benchmarks/RESULTS.md; the estimate divides each row's flops by share × this machine's rate.
_SHARE = {
    ("forward", "kernel"): (0.65, 0.6),
    ("forward", "numpy"): (0.16, 0.08),
    ("forward", "torch float64"): (0.7, 0.65),
    ("forward", "torch float32"): (1.8, 1.6),
    ("forward+backward", "kernel"): (0.55, 0.5),
    ("forward+backward", "numpy"): (0.16, 0.09),
    ("forward+backward", "torch float64"): (0.54, 0.45),
}
_PAUSE = 0.15  # the pause after each timed call (refattn/bench/run.py: _median_times)
_REFERENCE_RATE = 55.9e9  # the GEMM rate of the machine RESULTS.md was measured on
_ROLLOUT_SECONDS = 40.0  # the rollout section there (5 repeats of 7 methods)
_METRICS_SECONDS = 25.0  # the metrics section at METRICS_SHAPE, 5 repeats (loaded 2-core machine)
_ATTRIBUTION_SECONDS = 30.0  # the attribution section (4 calls of 3 methods; measured on a loaded 2-core machine)
_MODEL_SECONDS = 3.0  # the LM-step section per repeat: refattn's step and torch's (quiet 2-core machine, one thread)
# the attention-flow section per n at L=12: the kernel on every pair, 4 pairs by networkx and by HiGHS, the graph
# build (loaded 2-core machine; n=128 extrapolated from the kernel's n^3.2 and the others' n^2 growth)
_FLOW_SECONDS = {16: 1.0, 32: 2.5, 64: 9.0, 128: 45.0}


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parser(prog=None):
    """The argument parser of the benchmark command (every option has help; ``--help`` lists them).

    Options: ``--quick``, ``--sizes N…``, ``--repeats R``, ``--memory-sizes N…``,
    ``--rollout`` / ``--no-rollout``, ``--metrics`` / ``--no-metrics``, ``--metrics-shape B H N``, ``--output FILE``,
    ``--flow`` / ``--no-flow``, ``--flow-sizes N…``, ``--model`` / ``--no-model``, ``--plan``, ``--quiet``.  The
    sizing options default to None here: :func:`parse_args` fills them from :data:`FULL` or :data:`QUICK`.

    Parameters
    ----------
    prog : str, optional
        The program name in usage and errors (``"refattn bench"`` from the CLI).  Default None:
        ``"python -m refattn.bench"``.

    Returns
    -------
    argparse.ArgumentParser
    """
    p = argparse.ArgumentParser(
        prog=prog or "python -m refattn.bench",
        description="Side-by-side measurements in one run: refattn kernel vs refattn NumPy vs PyTorch CPU vs "
        "float64 GEMM, as a Markdown table on stdout (plan, estimate and progress on stderr).",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a shorter run: sizes 1024 4096, 3 repeats, memory sizes 4096 8192, no rollout section; "
        "a flag given explicitly keeps its value",
    )
    p.add_argument(
        "--sizes",
        type=_positive_int,
        nargs="+",
        metavar="N",
        help="sequence lengths of the SDPA rows (default 1024 4096 16384; --quick: 1024 4096); "
        f"NumPy and backward rows up to N = {NUMPY_MAX_N}",
    )
    p.add_argument(
        "--repeats",
        type=_positive_int,
        metavar="R",
        help="timed runs of each method, the median is reported (default 5; --quick: 3)",
    )
    p.add_argument(
        "--memory-sizes",
        type=_positive_int,
        nargs="+",
        metavar="N",
        help="sequence lengths of the peak-memory rows (default 8192 16384 32768; --quick: 4096 8192)",
    )
    p.add_argument(
        "--rollout",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the rollout section (L=28, H=16, n=256, B=32) and the attribution section (L=12, H=12, n=256, B=4); "
        "default on; --quick: off",
    )
    p.add_argument(
        "--metrics",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the metrics section: every metric of summarize by the metric kernel, and summarize of a layer, "
        "against one NumPy read of the layer; default: on with the rollout section",
    )
    p.add_argument(
        "--metrics-shape",
        type=_positive_int,
        nargs=3,
        metavar=("B", "H", "N"),
        help=f"the metrics section's float64 layer (B, H, N, N) (default {' '.join(map(str, METRICS_SHAPE))})",
    )
    p.add_argument(
        "--flow",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the attention-flow section: attention_flow's kernel on every pair against networkx and HiGHS on 4 "
        "pairs, L=12, H=4 (needs numba); default: on with the rollout section",
    )
    p.add_argument(
        "--flow-sizes",
        type=_positive_int,
        nargs="+",
        metavar="N",
        help=f"token counts n of the attention-flow section (default {' '.join(map(str, FLOW_SIZES))})",
    )
    p.add_argument(
        "--model",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the LM training-step section: refattn's forward + backward of a 4-layer LM (d_model 256, 8 heads, "
        "T=256, batch 8) against the same model in torch autograd, float64; default: on with the rollout section",
    )
    p.add_argument("--output", metavar="FILE", help="also write the Markdown table to FILE (its folder must exist)")
    p.add_argument("--plan", action="store_true", help="print the plan and the time estimate, then stop")
    p.add_argument("--quiet", action="store_true", help="no plan, estimate or progress lines on stderr")
    return p


def parse_args(argv=None, prog=None):
    """The parsed options with ``--quick`` resolved.

    ``--quick`` changes only the defaults: an option given explicitly keeps its value.

    Parameters
    ----------
    argv : list of str, optional
        The arguments (without the program name).  Default None: ``sys.argv[1:]``.
    prog : str, optional
        The program name for usage and errors (:func:`parser`).  Default None:
        ``"python -m refattn.bench"``.

    Returns
    -------
    argparse.Namespace
        ``sizes`` (list of int), ``repeats`` (int), ``memory_sizes`` (list of int), ``rollout``
        (bool), ``metrics`` (bool: the rollout flag's value unless given), ``metrics_shape`` (list of 3 int),
        ``flow`` (bool: the rollout flag's value unless given), ``flow_sizes`` (list of int):
        the values to run with; ``explicit``: the names among those four given on the
        command line; ``quick``, ``output`` (str or None), ``plan``, ``quiet`` as given.

    Raises
    ------
    SystemExit
        argparse's exit (status 2, message on stderr) for a bad option, a non-positive size or
        repeat count, or an ``--output`` that is a directory or whose folder does not exist.
    """
    p = parser(prog)
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    args.explicit = [name for name in FULL if getattr(args, name) is not None]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.metrics is None:  # the metrics section goes with the rollout section unless asked
        args.metrics = args.rollout
    if args.metrics_shape is None:
        args.metrics_shape = list(METRICS_SHAPE)
    if args.flow is None:  # the attention-flow section goes with the rollout section unless asked
        args.flow = args.rollout
    if args.flow_sizes is None:
        args.flow_sizes = list(FLOW_SIZES)
    if args.model is None:  # the LM-step section goes with the rollout section unless asked
        args.model = args.rollout
    if args.output is not None:
        out = Path(args.output)
        if out.is_dir():
            p.error(f"--output: expected a file name, got the directory {args.output!r}")
        if not out.parent.is_dir():
            p.error(f"--output: the folder {str(out.parent)!r} does not exist (create it first)")
    return args


def numba_version():
    """numba's version, or None when it is not installed (the kernel rows are then left out).

    Returns
    -------
    str or None
        ``numba.__version__`` (numba is imported only when installed).
    """
    if importlib.util.find_spec("numba") is None:
        return None
    import numba

    return numba.__version__


def _torch_available():
    return importlib.util.find_spec("torch") is not None


def gemm_probe(n=1024, repeats=3):
    """This machine's float64 GEMM rate from a few quick products (for the estimate only).

    Parameters
    ----------
    n : int, default 1024
        The products are ``n × n`` float64 matrices (``2·n³`` flops each).
    repeats : int, default 3
        Products timed; the fastest counts.

    Returns
    -------
    float
        FLOP/s.
    """
    a = np.random.default_rng(0).standard_normal((n, n))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / max(best, 1e-9)


def estimate_seconds(args, rate, *, kernel, torch):
    """The run's duration in seconds, estimated for ``args`` on a machine of GEMM rate ``rate``.

    Each timed row's flops (forward ``4·N²·D·H``, forward+backward ``14·N²·D·H``, causal half)
    divided by the share of the GEMM rate its method reached in ``benchmarks/RESULTS.md``, times
    the repeats, plus the pauses between timed calls, the GEMM measurement, the peak-memory rows
    and the rollout and attribution sections (scaled from their time there).  An estimate, not a bound.

    Parameters
    ----------
    args : argparse.Namespace
        The options (:func:`parse_args`): ``sizes``, ``repeats``, ``memory_sizes``, ``rollout``.
    rate : float
        This machine's float64 GEMM rate in FLOP/s (:func:`gemm_probe`).
    kernel : bool
        Whether the kernel rows run (numba installed).
    torch : bool
        Whether the PyTorch rows run (torch installed).

    Returns
    -------
    float
        Seconds.
    """

    def timed(flops, share):
        return args.repeats * (flops / (share * rate) + _PAUSE)

    seconds = 5 * (2 * 2048**3 / rate + _PAUSE) + 1.0  # the GEMM rate, the loops section
    methods = {
        "forward": (["kernel"] if kernel else []) + ["numpy"] + (["torch float64", "torch float32"] if torch else []),
        "forward+backward": (["kernel"] if kernel else []) + ["numpy"] + (["torch float64"] if torch else []),
    }
    for n in args.sizes:
        for causal in (0, 1):
            for kind, per_flop in (("forward", 4), ("forward+backward", 14)):
                if kind == "forward+backward" and n > NUMPY_MAX_N:
                    continue
                flops = per_flop * n * n * 64 * 8 / (2 if causal else 1)
                for method in methods[kind]:
                    if method == "numpy" and n > NUMPY_MAX_N:
                        continue
                    seconds += timed(flops, _SHARE[(kind, method)][causal])
    for n in args.memory_sizes:  # one call per backend and pass, H = 1 (refattn/bench/run.py: memory_rows)
        forward, backward = 4 * n * n * 64, 14 * n * n * 64
        if kernel:
            seconds += forward / (0.6 * rate) + (backward / (0.5 * rate) if n <= 2 * NUMPY_MAX_N else 0.0)
        seconds += forward / (0.1 * rate) if n <= 2 * NUMPY_MAX_N else 0.0  # NumPy: slowed by its N×N arrays
        seconds += backward / (0.1 * rate) if n <= NUMPY_MAX_N else 0.0
    if args.rollout:
        seconds += (_ROLLOUT_SECONDS + _ATTRIBUTION_SECONDS) * _REFERENCE_RATE / rate
    if getattr(args, "metrics", args.rollout):
        batch, heads, n = getattr(args, "metrics_shape", METRICS_SHAPE)
        share = batch * heads * n * n / (METRICS_SHAPE[0] * METRICS_SHAPE[1] * METRICS_SHAPE[2] ** 2)
        seconds += _METRICS_SECONDS * share * args.repeats / 5 * _REFERENCE_RATE / rate
    if getattr(args, "flow", args.rollout) and kernel:
        for n in getattr(args, "flow_sizes", FLOW_SIZES):
            seconds += _FLOW_SECONDS.get(n, _FLOW_SECONDS[64] * (n / 64) ** 3.2) * _REFERENCE_RATE / rate
    if getattr(args, "model", args.rollout):  # one untimed step of each side, then the repeats
        seconds += (args.repeats + 1) * _MODEL_SECONDS * (1.0 if torch else 0.6) * _REFERENCE_RATE / rate
    return seconds


def _duration(seconds):
    if seconds < 90:
        return f"about {max(5, 5 * round(seconds / 5)):.0f} s"
    return f"about {round(seconds / 60):.0f} min"


def plan_lines(args, rate=None):
    """What the run will do and how long it should take, as lines for stderr.

    The plan (each value and where it came from: ``given``, ``--quick`` or ``default``), the estimate
    of this run, of the full run and of ``--quick`` (:func:`estimate_seconds`), and a line each when
    numba or torch is not installed (their rows left out).

    Parameters
    ----------
    args : argparse.Namespace
        The options from :func:`parse_args` (with ``explicit`` and ``quick``).
    rate : float, optional
        The float64 GEMM rate in FLOP/s.  Default None: measured by :func:`gemm_probe` (about a
        second).

    Returns
    -------
    list of str
        The lines, without newlines.
    """
    kernel, torch = numba_version() is not None, _torch_available()
    rate = gemm_probe() if rate is None else rate
    source = {name: "given" if name in args.explicit else ("--quick" if args.quick else "default") for name in FULL}
    lines = [
        f"SDPA sizes {' '.join(map(str, args.sizes))} ({source['sizes']}), {args.repeats} repeats "
        f"({source['repeats']}); memory sizes {' '.join(map(str, args.memory_sizes))} ({source['memory_sizes']}); "
        f"rollout section {'on' if args.rollout else 'off'} ({source['rollout']}); metrics section "
        + (f"on, layer {'x'.join(map(str, args.metrics_shape))}" if args.metrics else "off")
        + "; attention-flow section "
        + (f"on, n {' '.join(map(str, args.flow_sizes))}" if args.flow else "off")
        + f"; LM-step section {'on' if getattr(args, 'model', args.rollout) else 'off'}"
    ]
    full = argparse.Namespace(**FULL, explicit=[])
    quick = argparse.Namespace(**QUICK, explicit=[])
    this = estimate_seconds(args, rate, kernel=kernel, torch=torch)
    lines.append(
        f"this run: {_duration(this)} on this machine (the full run: "
        f"{_duration(estimate_seconds(full, rate, kernel=kernel, torch=torch))}, --quick: "
        f"{_duration(estimate_seconds(quick, rate, kernel=kernel, torch=torch))}; estimated from its float64 "
        f"GEMM rate, {rate / 1e9:.0f} GFLOP/s)" + ("; a first kernel compile adds ~20 s" if kernel else "")
    )
    if not kernel:
        lines.append("numba is not installed: NumPy and PyTorch rows only, no kernel rows (pip install numba)")
    if not torch:
        lines.append("torch is not installed: no PyTorch rows")
    return lines


def progress(args, stream=None):
    """The progress reporter of a run: ``say(text)`` writes one line ``refattn bench: [elapsed] text``.

    Parameters
    ----------
    args : argparse.Namespace
        The options; with ``args.quiet`` true, ``say`` writes nothing.
    stream : file-like, optional
        Where the lines go (flushed after each).  Default None: ``sys.stderr`` at the time of each
        line.

    Returns
    -------
    callable
        ``say(text)``; elapsed seconds are counted from this call.
    """
    start = time.perf_counter()

    def say(text):
        if args.quiet:
            return
        out = sys.stderr if stream is None else stream
        out.write(f"refattn bench: [{time.perf_counter() - start:5.0f} s] {text}\n")
        out.flush()

    return say
