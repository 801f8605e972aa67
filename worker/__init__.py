"""The reference service: a small payments API on idemtasks.

``uvicorn worker.web:app`` serves HTTP; ``celery -A worker worker`` runs the tasks. See ``worker.settings``.
"""

from __future__ import annotations

from .celery_app import app

__all__ = ["app"]
