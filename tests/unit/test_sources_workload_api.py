"""Workload API: endpoint addresses (Workload Endpoint 4) and message validation."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.sources import IdentityLoadError, WorkloadApiSource, parse_endpoint
from proxy.sources.proto import workload_pb2
from proxy.sources.workload_api import ENDPOINT_ENV, snapshot_from_response
from tests.pki import Issued, TestCA


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("unix:///run/spire/sockets/agent.sock", "unix:///run/spire/sockets/agent.sock"),
        ("unix:/run/spire/agent.sock", "unix:///run/spire/agent.sock"),
        ("UNIX:///tmp/agent.sock", "unix:///tmp/agent.sock"),
        ("tcp://127.0.0.1:8081", "ipv4:127.0.0.1:8081"),
        ("tcp://[::1]:8081", "ipv6:[::1]:8081"),
        ("tcp://169.254.1.2:65535", "ipv4:169.254.1.2:65535"),
    ],
)
def test_endpoint_accepted(text: str, target: str) -> None:
    assert parse_endpoint(text) == target


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        ("/run/spire/agent.sock", "scheme must be unix or tcp"),
        ("http://127.0.0.1:8081", "scheme must be unix or tcp"),
        ("unix://host/run/agent.sock", "no authority"),
        ("unix:relative/agent.sock", "must be absolute"),
        ("unix://", "must be absolute"),
        ("unix:///tmp/agent.sock?x=1", "no query or fragment"),
        ("unix:///tmp/agent.sock#frag", "no query or fragment"),
        ("unix:///tmp/a%20b.sock", "percent-encoding"),
        ("unix:///tmp/a b.sock", "whitespace"),
        ("tcp://localhost:8081", "must be an IP address"),
        ("tcp://spire-agent.example:8081", "must be an IP address"),
        ("tcp://127.0.0.1", "port is required"),
        ("tcp://127.0.0.1:0", "port is required"),
        ("tcp://127.0.0.1:99999", "invalid port"),
        ("tcp://127.0.0.1:8081/", "no path"),
        ("tcp://127.0.0.1:8081/foo", "no path"),
        ("tcp://user@127.0.0.1:8081", "userinfo"),
        ("tcp://127.0.0.1:8081?q", "no query or fragment"),
    ],
)
def test_endpoint_refused(text: str, problem: str) -> None:
    with pytest.raises(IdentityLoadError, match=problem):
        parse_endpoint(text)


def test_endpoint_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENDPOINT_ENV, "unix:///run/spire/agent.sock")
    assert WorkloadApiSource().target == "unix:///run/spire/agent.sock"
    # An explicit endpoint wins over the environment.
    assert WorkloadApiSource("tcp://127.0.0.1:1").target == "ipv4:127.0.0.1:1"
    monkeypatch.delenv(ENDPOINT_ENV)
    with pytest.raises(IdentityLoadError, match=ENDPOINT_ENV):
        WorkloadApiSource()
    monkeypatch.setenv(ENDPOINT_ENV, "tcp://localhost:1")
    with pytest.raises(IdentityLoadError, match="IP address"):
        WorkloadApiSource()


# -- messages ----------------------------------------------------------------------


def _key_der(issued: Issued) -> bytes:
    return issued.key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _response(
    issued: Issued, ca: TestCA, federated: dict[str, bytes] | None = None, **override: object
) -> workload_pb2.X509SVIDResponse:
    san = issued.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    svid = {
        "spiffe_id": san.get_values_for_type(x509.UniformResourceIdentifier)[0],
        "x509_svid": issued.cert_der(),
        "x509_svid_key": _key_der(issued),
        "bundle": ca.bundle_der(),
    }
    svid.update(override)
    return workload_pb2.X509SVIDResponse(
        svids=[workload_pb2.X509SVID(**svid)],  # type: ignore[arg-type]
        federated_bundles=federated or {},
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def test_message_with_intermediate_and_federation(ca_a: TestCA, ca_b: TestCA) -> None:
    issued = ca_a.intermediate().issue("spiffe://a.org/agent/payroll")
    response = _response(issued, ca_a, {"spiffe://b.org": ca_b.bundle_der()})
    snapshot = snapshot_from_response(response, _now())
    assert snapshot.local_id == "spiffe://a.org/agent/payroll"
    assert len(snapshot.svid.intermediates) == 1
    assert {str(td) for td in snapshot.bundles.trust_domains} == {"a.org", "b.org"}


def test_federated_entry_for_own_trust_domain_is_ignored(ca_a: TestCA) -> None:
    issued = ca_a.issue("spiffe://a.org/agent/payroll")
    other_root = TestCA.create("a.org")
    response = _response(issued, ca_a, {"spiffe://a.org": other_root.bundle_der()})
    snapshot = snapshot_from_response(response, _now())
    bundle = snapshot.bundles.get(snapshot.svid.spiffe_id.trust_domain)
    assert bundle is not None and bundle.authorities == (ca_a.cert,)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no_svids", "has no X509-SVID"),
        ("bad_spiffe_id", "spiffe_id: invalid SPIFFE ID"),
        ("other_spiffe_id", "not the declared one"),
        ("garbage_chain", "x509_svid/x509_svid_key: "),
        ("empty_key", "x509_svid/x509_svid_key: no private key"),
        ("mismatched_key", "private key does not match"),
        ("empty_bundle", "bundle of a.org is empty"),
        ("garbage_bundle", "bundle: trust bundle for a.org"),
        ("wrong_bundle", "does not verify against our own trust bundle"),
        ("bad_federated_key", "federated_bundles key: invalid"),
        ("garbage_federated", "federated bundle b.org: "),
    ],
)
def test_malformed_message_refused(ca_a: TestCA, ca_b: TestCA, case: str, expected: str) -> None:
    issued = ca_a.issue("spiffe://a.org/agent/payroll")
    response = {
        "no_svids": lambda: workload_pb2.X509SVIDResponse(),
        "bad_spiffe_id": lambda: _response(issued, ca_a, spiffe_id="not a spiffe id"),
        "other_spiffe_id": lambda: _response(issued, ca_a, spiffe_id="spiffe://a.org/other"),
        "garbage_chain": lambda: _response(issued, ca_a, x509_svid=b"\x30\x03abc"),
        "empty_key": lambda: _response(issued, ca_a, x509_svid_key=b""),
        "mismatched_key": lambda: _response(
            issued, ca_a, x509_svid_key=_key_der(ca_a.issue("spiffe://a.org/x"))
        ),
        "empty_bundle": lambda: _response(issued, ca_a, bundle=b""),
        "garbage_bundle": lambda: _response(issued, ca_a, bundle=b"garbage"),
        "wrong_bundle": lambda: _response(issued, ca_a, bundle=TestCA.create("a.org").bundle_der()),
        "bad_federated_key": lambda: _response(issued, ca_a, {"spiffe://B.org": b""}),
        "garbage_federated": lambda: _response(issued, ca_a, {"spiffe://b.org": b"\x01\x02"}),
    }[case]()
    with pytest.raises(IdentityLoadError, match=expected) as info:
        snapshot_from_response(response, _now())
    message = str(info.value)
    assert "\n" not in message
    assert _key_der(issued).hex()[:32] not in message
