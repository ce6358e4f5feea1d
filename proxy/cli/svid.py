"""``agent-proxy svid inspect``: show an X509-SVID and say whether it is valid.

Exit status: 0 valid; 1 not valid (one line ``invalid: <reason>`` on stderr,
or ``"valid": false`` in ``--json``); 2 operator mistake (a file that cannot
be read, a malformed ``--bundle TD=FILE``). Key material is never printed:
the key file is only used to check that it matches the leaf.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from proxy.cli.envflags import EnvFlag, env_help, fill_from_env
from proxy.errors import UsageError
from proxy.identity import (
    ChainError,
    SvidError,
    TrustBundle,
    TrustBundleSet,
    TrustDomain,
    check_validity,
    load_certificates,
    load_x509_svid,
    validate_leaf,
    verify_x509_svid,
)

INSPECT_FLAGS = (
    EnvFlag("key", "--key"),
    EnvFlag("bundle", "--bundle", multi=True),
)


def register(sub: Any) -> None:
    svid = sub.add_parser(
        "svid",
        help="inspect X509-SVIDs",
        description="Work with X509-SVID files.",
    )
    actions = svid.add_subparsers(dest="svid_command", metavar="ACTION")
    actions.required = True

    inspect = actions.add_parser(
        "inspect",
        help="show an X509-SVID and check it",
        description=(
            "Show an X509-SVID (PEM: leaf then intermediates) and check it: the "
            "X509-SVID leaf rules, validity period, the key (with --key) and the "
            "chain to its own trust domain's bundle (with --bundle). "
            "Exit 0 valid, 1 not valid, 2 usage error."
        ),
    )
    inspect.add_argument("cert", metavar="CERT", help="SVID certificate file (PEM)")
    inspect.add_argument(
        "--key",
        metavar="KEY",
        default=None,
        help=env_help("private key file; checked to match the leaf, never printed", "--key"),
    )
    inspect.add_argument(
        "--bundle",
        metavar="TD=FILE",
        action="append",
        default=None,
        help=env_help(
            "trust bundle for a trust domain (repeatable); the SVID must chain to "
            "the bundle of its own trust domain",
            "--bundle",
        ),
    )
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(handler=run_inspect)


# -- reading input -------------------------------------------------------------


def _read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path}: is a directory") from None
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None


def _parse_bundle_args(values: list[str]) -> TrustBundleSet:
    bundles: list[TrustBundle] = []
    seen: set[str] = set()
    for value in values:
        td_text, sep, file = value.partition("=")
        if not sep or not td_text or not file:
            raise UsageError(f"--bundle {value!r}: expected TD=FILE")
        try:
            td = TrustDomain.parse(td_text)
        except ValueError as exc:
            raise UsageError(f"--bundle {value!r}: {exc}") from None
        if td.name in seen:
            raise UsageError(f"--bundle: trust domain {td.name} given twice")
        seen.add(td.name)
        _read_file(file, "--bundle")  # one clear line for missing/unreadable files
        try:
            bundles.append(TrustBundle.load(td, Path(file)))
        except (ValueError, OSError) as exc:  # BundleError is a ValueError
            raise UsageError(f"--bundle {value!r}: {exc}") from None
    try:
        return TrustBundleSet(bundles)
    except ValueError as exc:
        raise UsageError(f"--bundle: {exc}") from None


# -- the report ------------------------------------------------------------------


def _rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def _chain_entry(cert: x509.Certificate) -> dict[str, str]:
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": _serial(cert),
        "not_before": _rfc3339(cert.not_valid_before_utc),
        "not_after": _rfc3339(cert.not_valid_after_utc),
    }


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


@dataclass
class Report:
    spiffe_id: str | None = None
    serial: str | None = None
    not_before: str | None = None
    not_after: str | None = None
    valid: bool = False
    error: str | None = None
    reason: str | None = None
    chain: list[dict[str, str]] = field(default_factory=list)

    def fail(self, message: str, reason: str) -> Report:
        self.valid = False
        self.error = message
        self.reason = reason
        return self

    def as_json(self) -> dict[str, object]:
        return {
            "spiffe_id": self.spiffe_id,
            "serial": self.serial,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "valid": self.valid,
            "error": self.error,
            "reason": self.reason,
            "chain": self.chain,
        }


def _reason(exc: Exception, default: str) -> str:
    reason = getattr(exc, "reason", None)
    return reason if isinstance(reason, str) else default


def inspect_svid(
    cert_data: bytes,
    key_data: bytes | None,
    bundles: TrustBundleSet | None,
    now: datetime,
) -> Report:
    """Describe and check an SVID; never raises for a bad SVID."""
    report = Report()
    if b"PRIVATE KEY-----" in cert_data and b"CERTIFICATE-----" not in cert_data:
        # Say so, and let no parser error quote any of it.
        return report.fail("the file holds a private key, not a certificate", "invalid_svid")
    try:
        certs = list(load_certificates(cert_data))
    except (SvidError, ValueError) as exc:
        return report.fail(str(exc) or "no certificate found", _reason(exc, "invalid_svid"))
    if not certs:
        return report.fail("no certificate found", "invalid_svid")
    leaf, intermediates = certs[0], certs[1:]
    report.serial = _serial(leaf)
    report.not_before = _rfc3339(leaf.not_valid_before_utc)
    report.not_after = _rfc3339(leaf.not_valid_after_utc)
    report.chain = [_chain_entry(cert) for cert in certs]
    uris = _uri_sans(leaf)
    report.spiffe_id = uris[0] if len(uris) == 1 else None

    try:
        spiffe_id = validate_leaf(leaf)
    except (SvidError, ValueError) as exc:
        return report.fail(str(exc), _reason(exc, "invalid_svid"))
    report.spiffe_id = str(spiffe_id)

    if key_data is not None:
        try:
            load_x509_svid(cert_data, key_data)
        except (SvidError, ValueError) as exc:
            return report.fail(str(exc), _reason(exc, "invalid_svid"))

    for cert in certs:
        try:
            check_validity(cert, now)
        except (SvidError, ChainError, ValueError) as exc:
            return report.fail(str(exc), _reason(exc, "certificate_expired"))

    if bundles is not None:
        # Only the bundle of the SVID's own trust domain may anchor it; with
        # none for that trust domain, verify_x509_svid refuses.
        try:
            verify_x509_svid(leaf, intermediates, bundles, now)
        except (ChainError, SvidError, ValueError) as exc:
            return report.fail(str(exc), _reason(exc, "untrusted_chain"))

    report.valid = True
    return report


def _print_text(report: Report) -> None:
    out = sys.stdout
    out.write(f"spiffe_id   {report.spiffe_id or '-'}\n")
    out.write(f"serial      {report.serial or '-'}\n")
    out.write(f"not_before  {report.not_before or '-'}\n")
    out.write(f"not_after   {report.not_after or '-'}\n")
    if report.chain:
        out.write("chain\n")
        for index, entry in enumerate(report.chain):
            out.write(f"  [{index}] subject     {entry['subject'] or '(empty)'}\n")
            out.write(f"      issuer      {entry['issuer'] or '(empty)'}\n")
            out.write(f"      serial      {entry['serial']}\n")
            out.write(f"      not_before  {entry['not_before']}\n")
            out.write(f"      not_after   {entry['not_after']}\n")
    out.write(f"valid       {'yes' if report.valid else 'no'}\n")


def run_inspect(args: argparse.Namespace) -> int:
    fill_from_env(args, INSPECT_FLAGS)
    cert_data = _read_file(args.cert, "CERT")
    key_data = _read_file(args.key, "--key") if args.key is not None else None
    bundles = _parse_bundle_args(args.bundle) if args.bundle else None
    report = inspect_svid(cert_data, key_data, bundles, datetime.now(UTC))
    if args.json:
        sys.stdout.write(json.dumps(report.as_json(), sort_keys=False) + "\n")
    else:
        _print_text(report)
        if not report.valid:
            sys.stdout.flush()
            message = " ".join((report.error or "invalid").split())
            sys.stderr.write(f"invalid: {message}\n")
    return 0 if report.valid else 1
