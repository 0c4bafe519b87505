"""Local development PKI: one private CA and the certificates the launcher's servers present.

Everything here is for a developer's machine and the test suite: the CA key sits unencrypted
next to the certificates (mode 0600, directory 0700). Production certificates come from the
deployment's own issuer, never from this module.

`ensure_local_pki` is idempotent so that every `medmesh` start can call it: the CA is created
once and then kept (clients and browsers may have been told to trust it), while the server
certificate is re-issued whenever it is close to expiry or no longer covers the names asked for.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_COMMON_NAME = "medmesh local development CA"
CA_VALIDITY = datetime.timedelta(days=3650)
# 825 days is the longest lifetime Apple platforms accept for a TLS server certificate.
LEAF_VALIDITY = datetime.timedelta(days=825)
RENEW_BEFORE = datetime.timedelta(days=30)
# Backdate notBefore a little so a peer whose clock is slightly behind still accepts a fresh cert.
CLOCK_SKEW = datetime.timedelta(minutes=5)

_ORGANIZATION = "medmesh local development"
_SAFE_FILE_STEM = re.compile(r"[^A-Za-z0-9._-]")

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class LocalPki:
    """Paths of the local CA and of the server certificate it signed (all PEM)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def ensure_local_pki(
    tls_dir: Path,
    dns_names: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1", "::1"),
) -> LocalPki:
    """Create (first run) or reuse the local CA and a server certificate for the given names.

    The server certificate is re-issued, with the existing CA, when it is missing, unreadable,
    not signed by that CA, does not match its key, expires within 30 days, or its subject
    alternative names differ from `dns_names` + `ip_addresses`. The CA itself is only
    replaced when it is missing, unreadable or about to expire (which also forces a new server
    certificate). Files that need no change are not rewritten.
    """
    wanted_dns = _normalize_dns_names(dns_names)
    wanted_ips = _normalize_ips(ip_addresses)
    if not wanted_dns and not wanted_ips:
        raise ValueError("a server certificate needs at least one DNS name or IP address")

    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(tls_dir, 0o700)
    pki = LocalPki(
        ca_cert=tls_dir / "ca.crt",
        ca_key=tls_dir / "ca.key",
        server_cert=tls_dir / "server.crt",
        server_key=tls_dir / "server.key",
    )
    now = _utcnow()
    # Several processes (a developer's launcher and a test session) may share one state dir.
    with _locked(tls_dir / ".lock"):
        ca = _load_ca(pki, now)
        if ca is None:
            ca_cert, ca_key = _create_ca(now)
            _write_key(pki.ca_key, ca_key)
            _write_file(pki.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
            server_ok = False
        else:
            ca_cert, ca_key = ca
            _restrict(pki.ca_key)
            server_ok = _server_cert_is_current(pki, ca_cert, wanted_dns, wanted_ips, now)

        if server_ok:
            _restrict(pki.server_key)
        else:
            leaf_key = ec.generate_private_key(ec.SECP256R1())
            leaf = _issue_leaf(
                ca_cert,
                ca_key,
                leaf_key.public_key(),
                common_name=wanted_dns[0] if wanted_dns else "medmesh local server",
                san=_san(wanted_dns, wanted_ips),
                usage=ExtendedKeyUsageOID.SERVER_AUTH,
                now=now,
            )
            # Key first: a reader racing us sees at worst an old cert with a new key, which fails
            # loudly at startup, rather than silently serving a stale identity.
            _write_key(pki.server_key, leaf_key)
            _write_file(pki.server_cert, leaf.public_bytes(serialization.Encoding.PEM), 0o644)
    return pki


def issue_client_certificate(pki: LocalPki, common_name: str, out_dir: Path) -> tuple[Path, Path]:
    """Issue a clientAuth certificate signed by the local CA, for mutual-TLS tests.

    Writes `<name>.crt` and `<name>.key` into `out_dir` (created 0700 if missing), where
    `<name>` is `common_name` with characters unsafe in file names replaced by `_`.
    Always issues a fresh key and certificate. Returns (certificate path, key path).
    """
    if not common_name:
        raise ValueError("common_name must not be empty")
    stem = _SAFE_FILE_STEM.sub("_", common_name)
    if stem in {".", ".."}:
        raise ValueError(f"common_name {common_name!r} cannot be used as a file name")

    now = _utcnow()
    ca = _load_ca(pki, now)
    if ca is None:
        raise FileNotFoundError(f"no usable local CA at {pki.ca_cert}; run ensure_local_pki first")
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue_leaf(
        ca_cert,
        ca_key,
        key.public_key(),
        common_name=common_name,
        san=None,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        now=now,
    )
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path = out_dir / f"{stem}.crt"
    key_path = out_dir / f"{stem}.key"
    _write_key(key_path, key)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


DEVICE_CA_COMMON_NAME = "medmesh device CA"
DEVICE_CA_CERT_FILE = "device-ca.crt"
DEVICE_CA_KEY_FILE = "device-ca.key"


def ensure_device_ca(directory: Path) -> tuple[Path, Path]:
    """Create once, then keep, the platform's device CA; returns (certificate path, key path).

    The device service signs device client certificates with it (`MEDMESH_DEVICE_CA_CERT_FILE`
    and `MEDMESH_DEVICE_CA_KEY_FILE`), and the MQTT broker trusts it. EC P-256, ten years,
    CA:TRUE with no intermediates below it, keyCertSign and cRLSign. Unlike the local server CA
    it is never replaced automatically, not even when it nears expiry: a new CA would orphan
    every certificate already on a device. Files that exist but are unusable (only one of the
    two, unreadable, mismatched, not a CA) are an error for a person to resolve, never
    overwritten.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    cert_path = directory / DEVICE_CA_CERT_FILE
    key_path = directory / DEVICE_CA_KEY_FILE
    with _locked(directory / ".device-ca.lock"):
        if not cert_path.exists() and not key_path.exists():
            cert, key = _create_device_ca(_utcnow())
            # Key first: a certificate without its key is the state a person must fix, not the reverse.
            _write_key(key_path, key)
            _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
            return cert_path, key_path
        problem = _device_ca_problem(cert_path, key_path)
        if problem:
            raise ValueError(f"the device CA in {directory} is unusable ({problem}); it is not replaced automatically")
        _restrict(key_path)
    return cert_path, key_path


def _create_device_ca(now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE_CA_COMMON_NAME)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _device_ca_problem(cert_path: Path, key_path: Path) -> str:
    """Why the existing device CA files cannot be used, or "" when they can."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        return f"cannot read both files: {error}"
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not _same_public_key(cert, key):
        return "the key does not belong to the certificate"
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return "the certificate is not a CA"
    return "" if constraints.ca else "the certificate is not a CA"


# --- certificate construction -------------------------------------------------------------


def _create_ca(
    now: datetime.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    public_key: ec.EllipticCurvePublicKey,
    *,
    common_name: str,
    san: x509.SubjectAlternativeName | None,
    usage: x509.ObjectIdentifier,
    now: datetime.datetime,
) -> x509.Certificate:
    # A leaf must not outlive its issuer, or verifiers reject it near the end of the CA's life.
    not_after = min(now + LEAF_VALIDITY, ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _san(dns_names: Sequence[str], ips: Sequence[IpAddress]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    entries.extend(x509.IPAddress(ip) for ip in ips)
    return x509.SubjectAlternativeName(entries)


# --- reuse checks -------------------------------------------------------------------------


def _load_ca(pki: LocalPki, now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The existing CA, or None if it is missing, unreadable, mismatched or about to expire."""
    try:
        cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not _same_public_key(cert, key):
        return None
    if cert.not_valid_after_utc - now < RENEW_BEFORE:
        return None
    return cert, key


def _server_cert_is_current(
    pki: LocalPki,
    ca_cert: x509.Certificate,
    wanted_dns: Sequence[str],
    wanted_ips: Sequence[IpAddress],
    now: datetime.datetime,
) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
        key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
        cert.verify_directly_issued_by(ca_cert)
    except (OSError, ValueError, TypeError, InvalidSignature):
        return False
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not _same_public_key(cert, key):
        return False
    if cert.not_valid_after_utc - now < RENEW_BEFORE or cert.not_valid_before_utc > now:
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have_dns = set(_normalize_dns_names(san.get_values_for_type(x509.DNSName)))
    have_ips = set(san.get_values_for_type(x509.IPAddress))
    return have_dns == set(wanted_dns) and have_ips == set(wanted_ips)


def _same_public_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def _normalize_dns_names(names: Sequence[str]) -> list[str]:
    # DNS names compare case-insensitively; keep the caller's order, drop duplicates.
    return list(dict.fromkeys(name.strip().lower().rstrip(".") for name in names if name.strip()))


def _normalize_ips(addresses: Sequence[str]) -> list[IpAddress]:
    return list(dict.fromkeys(ipaddress.ip_address(address.strip()) for address in addresses))


# --- files ----------------------------------------------------------------------------------


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_file(path, pem, 0o600)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Atomically replace `path`; the temporary file has `mode` from creation, never wider."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # A leftover from a crash may have a wider mode: never reopen it, start afresh.
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # O_CREAT's mode is filtered by the umask
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _restrict(path: Path) -> None:
    """Tighten a reused private key's permissions if someone loosened them."""
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
