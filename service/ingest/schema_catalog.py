"""Parameter schemas and parameter sets the service knows, by ``schema_id`` and version.

Ingest needs a device's schema to check its telemetry (feature count, class count) and name
its features; the cohort monitor needs the parameter set of a model version to quantise
features exactly as the device does. Both come from signed blobs registered with the service
(``tinydrift registry import-blob``, or the parameter sets the service itself signs).

>>> from edge_agent.blob import ParameterSchema
>>> cat = SchemaCatalog()
>>> s = ParameterSchema(features=("a", "b"), classes=("x", "y"), rows=1)
>>> cat.add_schema(s)
>>> cat.schema(s.schema_id_hex) is s, cat.schema("00" * 8)
(True, None)
"""

from __future__ import annotations

import threading

from edge_agent.blob import ParameterSchema, ParameterSet, VerifiedBlob


class SchemaCatalog:
    """Thread-safe lookup of schemas and parameter sets."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._schemas: dict[str, ParameterSchema] = {}
        self._params: dict[tuple[str, int], ParameterSet] = {}

    def add_schema(self, schema: ParameterSchema) -> None:
        """Register a schema."""
        with self._lock:
            self._schemas[schema.schema_id_hex] = schema

    def add_blob(self, blob: VerifiedBlob) -> None:
        """Register a verified blob's schema and parameter set."""
        schema = blob.params.schema
        with self._lock:
            self._schemas[schema.schema_id_hex] = schema
            self._params[(schema.schema_id_hex, blob.header.param_version)] = blob.params

    def schema(self, schema_id: str) -> ParameterSchema | None:
        """The schema with this id (16 hex characters), if known."""
        with self._lock:
            return self._schemas.get(schema_id)

    def parameter_set(self, schema_id: str, version: int) -> ParameterSet | None:
        """The parameter set ``version`` of ``schema_id``, if known."""
        with self._lock:
            return self._params.get((schema_id, version))

    def __len__(self) -> int:
        with self._lock:
            return len(self._schemas)
