"""Identities the HTTP integration tests share: the hr service and the
payroll agent, both in ca_a's trust domain (a.org)."""

from __future__ import annotations

import pytest

from tests.pki import Issued, TestCA


@pytest.fixture
def hr(ca_a: TestCA) -> Issued:
    return ca_a.issue("spiffe://a.org/svc/hr")


@pytest.fixture
def payroll(ca_a: TestCA) -> Issued:
    return ca_a.issue("spiffe://a.org/agent/payroll")
