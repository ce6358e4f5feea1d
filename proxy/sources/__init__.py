"""Identity sources: where our SVID and trust bundles come from.

* ``files``: watched certificate, key and bundle files (spiffe-helper,
  cert-manager, Kubernetes secrets), see files.py;
* ``workload-api``: the SPIFFE Workload API as SPIRE's agent serves it, see
  workload_api.py (the pure parts: workload_messages.py);
* ``dev``: an embedded development CA, see dev.py.

All of them implement :class:`IdentitySource` (base.py): ``initial()`` for
the first identity, ``run(state)`` to keep swapping in new ones, and
``request_reload()`` for SIGHUP.
"""

from proxy.sources.base import (
    EXPIRY_WARNING_FRACTION,
    ExpiryWarner,
    IdentityLoadError,
    IdentitySource,
    Pulse,
    SourceStats,
    lifetime_remaining_fraction,
)
from proxy.sources.files import FilesSource, load_snapshot_from_files

__all__ = [
    "DEV_WARNING",
    "ENDPOINT_ENV",
    "EXPIRY_WARNING_FRACTION",
    "DevSource",
    "ExpiryWarner",
    "FilesSource",
    "IdentityLoadError",
    "IdentitySource",
    "Pulse",
    "SourceStats",
    "WorkloadApiSource",
    "lifetime_remaining_fraction",
    "load_snapshot_from_files",
    "parse_endpoint",
    "snapshot_from_response",
]

# The Workload API source pulls in grpc and protobuf (a large share of the
# start-up time), the dev source the embedded CA; import each only when one
# of its names is used.
_WORKLOAD_API = frozenset(
    {"ENDPOINT_ENV", "WorkloadApiSource", "parse_endpoint", "snapshot_from_response"}
)
_DEV = frozenset({"DEV_WARNING", "DevSource"})


def __getattr__(name: str) -> object:
    if name in _WORKLOAD_API:
        from proxy.sources import workload_api

        return getattr(workload_api, name)
    if name in _DEV:
        from proxy.sources import dev

        return getattr(dev, name)
    raise AttributeError(f"module 'proxy.sources' has no attribute {name!r}")
