"""Benchmarks of idemtasks against bare Celery and the other de-duplication libraries (``python -m bench.run``).

Not a test suite: nothing here asserts a timing. The figures go to ``bench/results/`` (see ``bench/README.md``).
"""
