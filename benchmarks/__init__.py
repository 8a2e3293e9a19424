"""The side-by-side benchmark of issue 5: gittornado vs git http-backend behind nginx + fcgiwrap.

Run ``python -m benchmarks.run`` (full) or ``python -m benchmarks.run --smoke``
(tiny repositories, one round; what the test suite runs).  See
``docs/benchmarks.md`` for what each workload means.
"""
