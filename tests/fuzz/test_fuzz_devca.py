"""The dev CA's files (ca.pem, ca_key.pem) as found on disk, whatever a
crash or a careless edit left there: DevCA.load raises only DevCAError."""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path

from hypothesis import given

from proxy.devca import CA_CERT_FILE, CA_KEY_FILE, DevCA, DevCAError
from proxy.identity import TrustDomain
from tests.fuzz import seeds
from tests.fuzz.strategies import inputs

_DIR = Path(tempfile.mkdtemp(prefix="fuzz-devca-"))


@cache
def _real() -> tuple[bytes, bytes]:
    directory = Path(tempfile.mkdtemp(prefix="fuzz-devca-seed-")) / "ca"
    DevCA.init(directory, TrustDomain("a.org"))
    return (directory / CA_CERT_FILE).read_bytes(), (directory / CA_KEY_FILE).read_bytes()


@given(
    inputs((_real()[0], *seeds.certificates_pem())),
    inputs((_real()[1], *seeds.keys())),
)
def test_load(cert: bytes, key: bytes) -> None:
    (_DIR / CA_CERT_FILE).write_bytes(cert)
    (_DIR / CA_KEY_FILE).write_bytes(key)
    try:
        DevCA.load(_DIR)
    except DevCAError as exc:
        assert "PRIVATE" not in str(exc)
