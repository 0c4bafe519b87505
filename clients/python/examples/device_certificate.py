"""Get a device certificate the normal way: the key is made here and never leaves; the platform
signs a CSR for it (`POST /v1/devices/{device}:issueCertificate`).

    MEDMESH_TOKEN=$(.venv/bin/medmesh token) .venv/bin/python clients/python/examples/device_certificate.py SN-0042

Writes SN-0042.key (mode 0600) and SN-0042.crt into the current directory (or --out). The device
must be registered first (register_device.py). Set MEDMESH_GATEWAY (host:port) and MEDMESH_CA for
another platform than the local one.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("device", help="the device id (its manufacturer serial)")
    parser.add_argument("--out", type=Path, default=Path.cwd(), help="directory for <device>.key and <device>.crt")
    args = parser.parse_args()
    token = os.environ.get("MEDMESH_TOKEN", "")
    if not token:
        sys.exit("set MEDMESH_TOKEN, for example MEDMESH_TOKEN=$(.venv/bin/medmesh token)")
    gateway = os.environ.get("MEDMESH_GATEWAY", "localhost:8443")
    ca = Path(os.environ.get("MEDMESH_CA", ROOT / ".medmesh" / "tls" / "ca.crt"))

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, args.device)]))
        .sign(key, hashes.SHA256())
    )
    with httpx.Client(
        base_url=f"https://{gateway}",
        verify=ssl.create_default_context(cafile=str(ca)),
        headers={"authorization": f"Bearer {token}"},
        timeout=15.0,
    ) as client:
        reply = client.post(
            f"/v1/devices/{args.device}:issueCertificate",
            json={"csr": csr.public_bytes(serialization.Encoding.PEM).decode()},
        )
    if reply.status_code != 200:
        sys.exit(f"HTTP {reply.status_code}: {reply.text}")
    args.out.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = args.out / f"{args.device}.key", args.out / f"{args.device}.crt"
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_text(reply.json()["pem"])
    print(f"{cert_path} (serial {reply.json()['serial_number']}) and {key_path}")


if __name__ == "__main__":
    main()
