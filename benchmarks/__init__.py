"""refattn's benchmarks: ``python -m benchmarks`` (see ``benchmarks/RESULTS.md``)."""
