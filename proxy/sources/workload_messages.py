"""What the Workload API source reads from outside, as pure functions: the
endpoint address (Workload Endpoint 4) and FetchX509SVID messages.

Every message is the full current state, so each is validated on its own
into an :class:`IdentitySnapshot` and any problem is one IdentityLoadError
naming the field; workload_api.py discards such a message and keeps going.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime
from urllib.parse import urlsplit

from proxy.identity import (
    BundleError,
    IdentityLoadError,
    IdentitySnapshot,
    SpiffeId,
    SpiffeIdError,
    SvidError,
    TrustBundle,
    TrustDomain,
    build_snapshot,
    load_x509_svid,
)
from proxy.sources.base import loading
from proxy.sources.proto import workload_pb2

__all__ = ["ENDPOINT_ENV", "SECURITY_HEADER", "parse_endpoint", "snapshot_from_response"]

ENDPOINT_ENV = "SPIFFE_ENDPOINT_SOCKET"
# Workload Endpoint section 3: every request carries this, against SSRF.
SECURITY_HEADER = ("workload.spiffe.io", "true")


# -- endpoint --------------------------------------------------------------------


def parse_endpoint(text: str) -> str:
    """The gRPC target for a Workload Endpoint address (Workload Endpoint 4).

    Accepts ``unix:///absolute/path`` (also the equivalent ``unix:/absolute/
    path``) and ``tcp://IP:PORT``; the host must be an IP address, not a
    name. Nothing else may be set: no authority for unix, no path for tcp,
    no userinfo, query or fragment. Raises IdentityLoadError otherwise.
    """
    shown = repr(text[:120])
    if not text:
        raise IdentityLoadError("Workload API endpoint is empty")
    if any(ch.isspace() or not ch.isprintable() for ch in text):
        raise IdentityLoadError(
            f"Workload API endpoint {shown}: contains whitespace or control characters"
        )
    if "?" in text or "#" in text:
        raise IdentityLoadError(f"Workload API endpoint {shown}: no query or fragment is allowed")
    if "%" in text:
        raise IdentityLoadError(f"Workload API endpoint {shown}: percent-encoding is not supported")
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise IdentityLoadError(f"Workload API endpoint {shown}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme == "unix":
        if parts.netloc:
            raise IdentityLoadError(
                f"Workload API endpoint {shown}: a unix URI has no authority "
                "(write unix:///absolute/path)"
            )
        if not parts.path.startswith("/"):
            raise IdentityLoadError(
                f"Workload API endpoint {shown}: the unix socket path must be absolute "
                "(write unix:///absolute/path)"
            )
        return "unix://" + parts.path
    if scheme == "tcp":
        if "@" in parts.netloc:
            raise IdentityLoadError(f"Workload API endpoint {shown}: userinfo is not allowed")
        if parts.path:
            raise IdentityLoadError(
                f"Workload API endpoint {shown}: a tcp URI has no path (write tcp://IP:PORT)"
            )
        host = parts.hostname or ""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise IdentityLoadError(
                f"Workload API endpoint {shown}: the host must be an IP address, not a name"
            ) from None
        try:
            port = parts.port
        except ValueError:
            raise IdentityLoadError(f"Workload API endpoint {shown}: invalid port") from None
        if port is None or port == 0:
            raise IdentityLoadError(f"Workload API endpoint {shown}: a port is required")
        if address.version == 6:
            return f"ipv6:[{address.compressed}]:{port}"
        return f"ipv4:{address.compressed}:{port}"
    raise IdentityLoadError(
        f"Workload API endpoint {shown}: the scheme must be unix or tcp "
        "(unix:///path/to/socket or tcp://IP:PORT)"
    )


# -- messages --------------------------------------------------------------------


def snapshot_from_response(
    response: workload_pb2.X509SVIDResponse, now: datetime
) -> IdentitySnapshot:
    """Validate one FetchX509SVID message into a snapshot, or IdentityLoadError."""
    return loading("Workload API message", lambda: _snapshot(response, now))


def _snapshot(response: workload_pb2.X509SVIDResponse, now: datetime) -> IdentitySnapshot:
    if not response.svids:
        raise IdentityLoadError("Workload API message has no X509-SVID")
    entry = response.svids[0]
    try:
        declared = SpiffeId.parse(entry.spiffe_id)
    except SpiffeIdError as exc:
        raise IdentityLoadError(f"Workload API X509-SVID spiffe_id: {exc}") from None
    origin = f"Workload API X509-SVID {declared}"
    try:
        svid = load_x509_svid(entry.x509_svid, entry.x509_svid_key)
    except SvidError as exc:
        raise IdentityLoadError(f"{origin}: x509_svid/x509_svid_key: {exc}") from None
    if svid.spiffe_id != declared:
        raise IdentityLoadError(
            f"{origin}: the certificate's SPIFFE ID is {svid.spiffe_id}, not the declared one"
        )
    own_td = svid.spiffe_id.trust_domain
    if not entry.bundle:
        raise IdentityLoadError(f"{origin}: the bundle of {own_td} is empty")
    try:
        own_bundle = TrustBundle.from_der(own_td, entry.bundle)
    except BundleError as exc:
        raise IdentityLoadError(f"{origin}: bundle: {exc}") from None
    federated: list[TrustBundle] = []
    for key in sorted(response.federated_bundles):
        try:
            td = TrustDomain.parse(key)
        except SpiffeIdError as exc:
            raise IdentityLoadError(f"Workload API federated_bundles key: {exc}") from None
        if td == own_td:
            # The SVID entry's own bundle is authoritative for our trust domain.
            continue
        try:
            federated.append(TrustBundle.from_der(td, response.federated_bundles[key]))
        except BundleError as exc:
            raise IdentityLoadError(f"Workload API federated bundle {td}: {exc}") from None
    return build_snapshot(svid, own_bundle, federated, now, origin=origin)
