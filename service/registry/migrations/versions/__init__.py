"""The registry's Alembic revisions, oldest first.

``0001_initial`` creates every table; ``0002_api_tokens`` adds the operator API's tokens.
"""
