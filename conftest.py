"""Root pytest configuration.

pytest-celery 1.x rebinds ``celery_worker`` and friends to Docker-based fixtures; there is no Docker engine where
these tests run, so the embedded (in-thread) fixtures from ``celery.contrib.pytest`` are re-exported here.
"""

from celery.contrib.pytest import (  # noqa: F401 - re-exported fixtures
    celery_app,
    celery_session_app,
    celery_session_worker,
    celery_worker,
)
