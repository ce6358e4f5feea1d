"""agent-mtls-proxy: a SPIFFE mTLS sidecar for AI agents."""

__version__ = "0.1.0"
