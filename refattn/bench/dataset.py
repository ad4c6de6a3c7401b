"""The dataset benchmark: a dataset of maps larger than memory summarised on Dask (``specs/datasets.md``).

``python -m refattn.bench.dataset [--gib 40] [--chunk-mib 64] [--workers 1 2]``: a dataset of ``--gib``
GiB of float64 maps ``(N, L, H, n, n)`` that exists only as a Dask graph — every chunk drawn from a
seed when a task needs it (random logits, softmax rows: :func:`random_chunk`) — is summarised by
:func:`refattn.datasets.summarize` on a local ``dask.distributed`` cluster of 1 worker, then of 2
(one thread each, :func:`refattn.datasets.local_cluster`).  Measured: the time and throughput of each,
and each worker's peak resident memory (``ru_maxrss``) beyond its RSS before the run, in chunks.  The
issue's targets: a worker's peak at most 4 chunks, 2 workers at least 1.7× as fast as one.  The table
(Markdown) goes to stdout, progress to stderr.  Needs ``refattn[dask]``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

__all__ = ["dataset", "main", "measure", "random_chunk", "worker_memory"]


def random_chunk(block_info=None, *, seed):
    """One chunk of the generated dataset: maps whose rows are the softmax of standard-normal logits.

    Drawn from ``(seed, chunk index)`` alone (``numpy.random.default_rng``), so every run and every
    worker draws the same maps; in place, one chunk-sized array.

    Parameters
    ----------
    block_info : dict, optional
        Dask's description of the chunk (``block_info[None]``: its ``chunk-location`` and
        ``chunk-shape``), passed by ``dask.array.map_blocks``.
    seed : int
        The dataset's seed.

    Returns
    -------
    ndarray of float64, shape (N_c, L, H, n, n)
        Rows summing to 1.
    """
    where = block_info[None]
    rng = np.random.default_rng([seed, where["chunk-location"][0]])
    p = rng.standard_normal(where["chunk-shape"])
    p -= p.max(axis=-1, keepdims=True)
    np.exp(p, out=p)
    p /= p.sum(axis=-1, keepdims=True)
    return p


def dataset(gib, *, chunk_mib=64, layers=12, heads=12, tokens=128, seed=0):
    """The lazy dataset: ``gib`` GiB of float64 maps ``(N, L, H, n, n)``, chunks of about ``chunk_mib`` MiB.

    Parameters
    ----------
    gib : float
        The dataset's size in GiB (``N`` rounded up to whole examples).
    chunk_mib : float, default 64
        The size of a chunk in MiB (rounded down to whole examples, at least one).
    layers, heads, tokens : int, default 12, 12, 128
        ``L``, ``H``, ``n``.
    seed : int, default 0
        The seed of :func:`random_chunk`.

    Returns
    -------
    dask.array.Array of float64, shape (N, L, H, n, n)
        Chunked over ``N`` only; nothing is drawn until a task needs its chunk.
    """
    import dask.array as da

    example = layers * heads * tokens * tokens * 8
    count = max(1, math.ceil(gib * 2**30 / example))
    per_chunk = max(1, min(count, int(chunk_mib * 2**20 // example)))
    sizes = (per_chunk,) * (count // per_chunk) + ((count % per_chunk,) if count % per_chunk else ())
    return da.map_blocks(
        random_chunk, chunks=(sizes, (layers,), (heads,), (tokens,), (tokens,)), dtype=np.float64, seed=seed
    )


def worker_memory():
    """This process's resident memory now and at its peak, in bytes (run in each worker by ``client.run``).

    Returns
    -------
    tuple of int
        ``(rss now, peak rss)``: ``/proc/self/statm`` and ``ru_maxrss`` (Linux: KiB).
    """
    import os
    import resource

    with open("/proc/self/statm") as fh:
        now = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(maps, workers, *, say=None):
    """Summarise ``maps`` on a local cluster of ``workers`` processes: time, and each worker's memory.

    A one-chunk run first loads refattn in every worker (not timed); the peak is then read from each
    worker after the timed run, beyond its RSS before it.

    Parameters
    ----------
    maps : dask.array.Array, shape (N, L, H, n, n)
        The dataset (:func:`dataset`).
    workers : int
        Worker processes (one thread each).
    say : callable, optional
        ``say(text)``: progress.  Default None: silent.

    Returns
    -------
    dict
        ``seconds``, ``workers``, ``peak_bytes`` (per worker, beyond its RSS before the run),
        ``rss_bytes`` (per worker, before the run), ``summary`` (the result).
    """
    from refattn import datasets

    with datasets.local_cluster(workers) as client:
        datasets.summarize(maps[: maps.chunks[0][0]], client=client)  # warm-up: imports in every worker
        before = client.run(worker_memory)
        if say:
            say(f"{workers} worker(s): summarising {maps.nbytes / 2**30:.2f} GiB in {len(maps.chunks[0])} chunks")
        start = time.perf_counter()
        summary = datasets.summarize(maps, client=client)
        seconds = time.perf_counter() - start
        after = client.run(worker_memory)
    return {
        "seconds": seconds,
        "workers": workers,
        "rss_bytes": [before[w][0] for w in sorted(before)],
        "peak_bytes": [max(0, after[w][1] - before[w][0]) for w in sorted(after)],
        "summary": summary,
    }


def _say(text):
    sys.stderr.write(f"refattn bench dataset: {text}\n")
    sys.stderr.flush()


def main(argv=None):
    """Run the dataset benchmark and print its Markdown table (``python -m refattn.bench.dataset``).

    Parameters
    ----------
    argv : list of str, optional
        ``--gib G`` (default 40), ``--chunk-mib M`` (64), ``--layers L`` (12), ``--heads H`` (12),
        ``--tokens n`` (128), ``--workers W…`` (1 2), ``--seed S`` (0).  Default None: ``sys.argv[1:]``.

    Returns
    -------
    int
        0.
    """
    p = argparse.ArgumentParser(
        prog="python -m refattn.bench.dataset",
        description="A dataset of maps larger than memory (generated lazily) summarised on Dask by 1 and 2 "
        "local workers: throughput and peak memory per worker (needs refattn[dask]).",
    )
    p.add_argument("--gib", type=float, default=40.0, help="the dataset's size in GiB of float64 maps (default 40)")
    p.add_argument("--chunk-mib", type=float, default=64.0, help="the size of a chunk in MiB (default 64)")
    p.add_argument("--layers", type=int, default=12, help="layers L (default 12)")
    p.add_argument("--heads", type=int, default=12, help="heads H (default 12)")
    p.add_argument("--tokens", type=int, default=128, help="tokens n (default 128)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="cluster sizes measured (default 1 2)")
    p.add_argument("--seed", type=int, default=0, help="the seed of the maps (default 0)")
    args = p.parse_args(argv)
    maps = dataset(
        args.gib, chunk_mib=args.chunk_mib, layers=args.layers, heads=args.heads, tokens=args.tokens, seed=args.seed
    )
    chunk = maps.chunks[0][0] * math.prod(maps.shape[1:]) * 8
    runs = [measure(maps, w, say=_say) for w in args.workers]
    for run in runs[1:]:
        same = all(np.array_equal(run["summary"][k], runs[0]["summary"][k]) for k in runs[0]["summary"])
        if not same:
            raise AssertionError(f"{run['workers']} workers gave another summary than {runs[0]['workers']}")
    lines = [
        f"## Dataset summary on Dask ({maps.nbytes / 2**30:.2f} GiB of float64 maps {maps.shape}, "
        f"{len(maps.chunks[0])} chunks of {chunk / 2**20:.0f} MiB, generated lazily)",
        "",
        "| workers | time (s) | throughput (MiB/s) | peak per worker beyond its RSS (MiB) | in chunks | RSS before |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        peak = max(run["peak_bytes"])
        lines.append(
            f"| {run['workers']} | {run['seconds']:.1f} | {maps.nbytes / 2**20 / run['seconds']:.0f} | "
            f"{peak / 2**20:.0f} | {peak / chunk:.2f} | {max(run['rss_bytes']) / 2**20:.0f} |"
        )
    lines += ["", "| target | measured | verdict |", "|---|---|---|"]
    worst = max(max(run["peak_bytes"]) for run in runs) / chunk
    lines.append(f"| peak per worker ≤ 4 chunks | {worst:.2f} | {'met' if worst <= 4 else '**not met**'} |")
    one = next((r for r in runs if r["workers"] == 1), None)
    two = next((r for r in runs if r["workers"] == 2), None)
    if one and two:
        ratio = one["seconds"] / two["seconds"]
        lines.append(f"| 2 workers ≥ 1.7× one | {ratio:.2f}× | {'met' if ratio >= 1.7 else '**not met**'} |")
    lines.append("")
    lines.append("Every run gave the same summary, bitwise.")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
