"""refattn's benchmarks: ``python -m refattn.bench`` (``refattn bench``); the table is ``benchmarks/RESULTS.md``.

:mod:`refattn.bench.options` holds the options, the plan and the time estimate printed before a run;
:mod:`refattn.bench.run` the measurements and the table.  The command is specified in ``specs/cli.md``
(``refattn bench``), the targets it judges in ``specs/kernels.md`` (Performance).
"""
