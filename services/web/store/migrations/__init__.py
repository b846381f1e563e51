"""Alembic migrations of the web UI's database (``store/database.py`` runs them; no alembic.ini)."""
