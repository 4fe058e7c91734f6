"""The operator REST API (FastAPI): fleets, devices, drift events, parameter sets, audit, tokens.

:func:`create_app` builds the app over a :class:`~service.registry.store.Registry`;
:class:`~service.api.server.ApiServer` hosts it in a thread of ``tinydrift serve``. See README.md.
"""

from service.api.app import create_app
from service.api.auth import Principal
from service.api.state import ServiceStateLike, ServiceStateProvider

__all__ = ["Principal", "ServiceStateLike", "ServiceStateProvider", "create_app"]
