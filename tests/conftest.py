from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import support
from tests.pki import TestCA


@pytest.fixture(scope="session")
def ca_a() -> TestCA:
    return TestCA.create("a.org")


@pytest.fixture(scope="session")
def ca_b() -> TestCA:
    return TestCA.create("b.org")


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    yield from support.echo_server()
