"""Loading an SVID (certificates and key, PEM or DER) and the Workload API's
inputs (a FetchX509SVID message, the endpoint address): only the documented
error, whatever the bytes."""

from __future__ import annotations

import contextlib
import datetime as dt

from hypothesis import given
from hypothesis import strategies as st

from proxy.identity import (
    IdentityLoadError,
    SvidError,
    load_certificates,
    load_private_key,
    load_x509_svid,
)
from proxy.sources import parse_endpoint, snapshot_from_response
from proxy.sources.proto import workload_pb2
from tests.fuzz import seeds
from tests.fuzz.strategies import any_text, inputs

CERTS = seeds.certificates_pem() + seeds.certificates_der()


@given(inputs(CERTS))
def test_load_certificates(data: bytes) -> None:
    with contextlib.suppress(SvidError):
        assert load_certificates(data)


@given(inputs(seeds.keys()))
def test_load_private_key(data: bytes) -> None:
    try:
        load_private_key(data)
    except SvidError as exc:
        assert b"PRIVATE" not in str(exc).encode()  # fixed messages: no key bytes


@given(st.one_of(inputs(CERTS), st.just(seeds.pki()[2].cert_pem())), inputs(seeds.keys()))
def test_load_x509_svid(cert: bytes, key: bytes) -> None:
    try:
        svid = load_x509_svid(cert, key)
    except SvidError:
        return
    assert svid.spiffe_id.path


# Protobuf strings are valid UTF-8 on the wire (no lone surrogates).
_proto_text = st.text(max_size=100)
_ENTRY_IDS = st.one_of(st.just("spiffe://a.org/agent/payroll"), _proto_text)


@given(
    cert=inputs(seeds.certificates_der()),
    key=st.one_of(st.just(seeds.keys()[1]), inputs(seeds.keys())),
    bundle=inputs(seeds.certificates_der()),
    declared=_ENTRY_IDS,
    federated=st.dictionaries(
        st.one_of(st.just("spiffe://b.org"), _proto_text),
        inputs(seeds.certificates_der()),
        max_size=3,
    ),
)
def test_workload_api_message(
    cert: bytes, key: bytes, bundle: bytes, declared: str, federated: dict[str, bytes]
) -> None:
    response = workload_pb2.X509SVIDResponse(
        svids=[
            workload_pb2.X509SVID(
                spiffe_id=declared, x509_svid=cert, x509_svid_key=key, bundle=bundle
            )
        ],
        federated_bundles=federated,
    )
    with contextlib.suppress(IdentityLoadError):
        snapshot_from_response(response, dt.datetime.now(dt.UTC))


_near_endpoint = st.builds(
    lambda scheme, rest: scheme + rest,
    st.sampled_from(("unix://", "unix:", "tcp://", "tcp:", "")),
    st.text(st.one_of(st.sampled_from("/:@%?#[]127.0.0.1abc8081"), st.characters()), max_size=40),
)


@given(st.one_of(_near_endpoint, any_text))
def test_workload_api_endpoint(text: str) -> None:
    with contextlib.suppress(IdentityLoadError):
        parse_endpoint(text)
