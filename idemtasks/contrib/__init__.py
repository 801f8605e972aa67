"""Web framework adapters. Each is imported on its own: ``idemtasks.contrib.fastapi``, ``.flask``, ``.django``."""
