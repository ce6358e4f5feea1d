"""``make certs``: the dev PKI of the demo, written into ``certs/``.

What goes where (certs/README.md says who reads each file):

- ``dev-ca/``: the dev CA of ``payroll.example`` (``ca.pem``, ``ca_key.pem``
  0600), its JWT signing key (``jwt_key.pem`` 0600) and the SPIFFE bundle
  (``bundle.spiffe.json``: x509-svid and jwt-svid entries).
- ``svid/<name>/``: an X509-SVID per member of the demo's cast
  (``svid.pem``, ``svid_key.pem`` 0600, ``bundle.pem``), spiffe-helper's layout.
- ``bank/``: the brownfield side, made with trustme as an ordinary WebPKI
  would: ``ca.pem`` (the bank's private CA), ``bank.pem``/``bank_key.pem``
  (the bank API, DNS name ``bank.example``), ``idp.pem``/``idp_key.pem``
  (its OAuth 2.0 token endpoint, ``idp.bank.example`` and 127.0.0.1), and
  ``api-key`` (0600), a legacy static API key for the ``file`` credential.

An existing dev CA is kept (peers may trust it); SVIDs and the bank's
certificates are issued afresh on every run, since they are short-lived.
"""

from __future__ import annotations

import secrets
import sys
from datetime import timedelta
from pathlib import Path

from proxy.credentials.devjwt import DevJwtAuthority
from proxy.devca import CA_CERT_FILE, DevCA, write_svid_files
from proxy.fileutil import PRIVATE_FILE_MODE, PUBLIC_FILE_MODE, ensure_private_dir, write_atomic
from proxy.identity import SpiffeId, TrustDomain

__all__ = ["CAST", "TRUST_DOMAIN", "write_certs"]

TRUST_DOMAIN = "payroll.example"
CAST = {
    "hr": "/svc/hr",
    "bank": "/svc/bank",
    "payroll": "/agent/payroll",
    "marketing": "/agent/marketing",
}
SVID_TTL = timedelta(hours=24)
BANK_NAME = "bank.example"
IDP_NAME = "idp.bank.example"


def write_certs(root: Path) -> dict[str, Path]:
    """Write everything into ``root``; returns the main paths by name."""
    import trustme  # the test extra: make certs runs in the project's venv

    td = TrustDomain.parse(TRUST_DOMAIN)
    ca_dir = root / "dev-ca"
    # An existing CA is kept: sidecars and peers may already trust it.
    ca = DevCA.load(ca_dir) if (ca_dir / CA_CERT_FILE).exists() else DevCA.init(ca_dir, td)
    DevJwtAuthority.load_or_create(ca_dir, td, ca.certificate)
    for name, path in CAST.items():
        issued = ca.issue(SpiffeId.parse(f"spiffe://{TRUST_DOMAIN}{path}"), ttl=SVID_TTL)
        write_svid_files(root / "svid" / name, issued)

    bank_dir = root / "bank"
    ensure_private_dir(bank_dir)
    bank_ca = trustme.CA(organization_name="Example Bank (brownfield)")
    bank = bank_ca.issue_cert(BANK_NAME)
    idp = bank_ca.issue_cert(IDP_NAME, "127.0.0.1")
    write_atomic(bank_dir / "ca.pem", bank_ca.cert_pem.bytes(), PUBLIC_FILE_MODE)
    for name, leaf in (("bank", bank), ("idp", idp)):
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        write_atomic(bank_dir / f"{name}.pem", chain, PUBLIC_FILE_MODE)
        write_atomic(bank_dir / f"{name}_key.pem", leaf.private_key_pem.bytes(), PRIVATE_FILE_MODE)
    api_key = bank_dir / "api-key"
    write_atomic(api_key, f"demo-{secrets.token_urlsafe(18)}\n".encode(), PRIVATE_FILE_MODE)
    return {
        "dev_ca": ca_dir,
        "svid": root / "svid",
        "bank_ca": bank_dir / "ca.pem",
        "bank": bank_dir / "bank.pem",
        "idp": bank_dir / "idp.pem",
        "api_key": api_key,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0] if args else "certs")
    written = write_certs(root)
    print(f"wrote the dev PKI into {root}/:")
    for name, path in written.items():
        print(f"  {name:8} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
