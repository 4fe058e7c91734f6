"""Alembic environment of the registry, shipped inside the package (see ``migrate.py``)."""
