"""The registry: devices, parameter sets, drift events, detector checkpoints, labels, audit log.

``Registry`` (``store.py``) is the typed API over SQLite or PostgreSQL; ``RegistryWriter``
(``writer.py``) batches hot-path writes off the hot path; ``records.py`` holds the dataclasses
that go in and out; ``models.py`` the tables; ``migrations/`` the Alembic revisions.
"""

from service.registry.errors import RegistryError
from service.registry.records import (
    AuditRecord,
    CheckpointRecord,
    DeviceRecord,
    DriftEventRecord,
    LabelArrays,
    LabelRecord,
    ParameterSetRecord,
)
from service.registry.store import Registry
from service.registry.writer import RegistryWriter

__all__ = [
    "AuditRecord",
    "CheckpointRecord",
    "DeviceRecord",
    "DriftEventRecord",
    "LabelArrays",
    "LabelRecord",
    "ParameterSetRecord",
    "Registry",
    "RegistryError",
    "RegistryWriter",
]
