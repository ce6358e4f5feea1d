"""The README's configuration examples must stay valid configs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from proxy.config import parse_config

README = Path(__file__).resolve().parents[2] / "README.md"
IDENTITY = {"source": "files", "cert": "svid.pem", "key": "svid_key.pem", "bundle": "b.pem"}


def _blocks() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)


def test_reference_and_payroll_examples_parse() -> None:
    blocks = _blocks()
    assert len(blocks) >= 3
    reference = tomllib.loads(blocks[0])
    parse_config(reference, "README reference")
    payroll = next(b for b in blocks if "payroll-pays-up-to-10k" in b)
    config = parse_config({"identity": IDENTITY, **tomllib.loads(payroll)}, "README payroll")
    names = [r.name for r in config.inbound[0].guard.rules]
    assert names == [
        "payroll-reads-timesheets",
        "payroll-pays-up-to-10k",
        "payroll-pays-more-with-approval",
        "marketing-own-tools-only",
    ]
    guard = next(b for b in blocks if b.lstrip().startswith("[guard]"))
    parse_config(
        {"identity": IDENTITY, **tomllib.loads(guard), **{"inbound": reference["inbound"]}},
        "README guard",
    )
