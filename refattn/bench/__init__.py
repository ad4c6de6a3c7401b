"""refattn's benchmarks: ``python -m refattn.bench`` (``refattn bench``); the table is ``benchmarks/RESULTS.md``."""
