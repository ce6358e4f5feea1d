"""TLS for the sidecar: contexts with in-handshake SPIFFE verification, and a
trio stream for TLS on the socket (OpenSSL does the syscalls)."""

from proxy.tls.context import TlsSide, TlsVersion, build_side
from proxy.tls.peercheck import PeerVerification
from proxy.tls.raw_io import peer_alert
from proxy.tls.stream import TLSHandshakeError, TLSStream

__all__ = [
    "PeerVerification",
    "TLSHandshakeError",
    "TLSStream",
    "TlsSide",
    "TlsVersion",
    "build_side",
    "peer_alert",
]
