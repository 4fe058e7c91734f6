"""tinydrift service: ingest, drift detection, registry, metrics, CLI."""

__version__ = "0.1.0"
