"""Identity sources: where our SVID and trust bundles come from.

* ``files``: watched certificate, key and bundle files (spiffe-helper,
  cert-manager, Kubernetes secrets), see files.py;
* ``workload-api``: the SPIFFE Workload API as SPIRE's agent serves it, see
  workload_api.py;
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
from proxy.sources.dev import DEV_WARNING, DevSource
from proxy.sources.files import FilesSource, load_snapshot_from_files
from proxy.sources.workload_api import (
    ENDPOINT_ENV,
    WorkloadApiSource,
    parse_endpoint,
    snapshot_from_response,
)

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
