"""The local development PKI: creation, idempotence, re-issue rules, and real TLS handshakes."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import socket
import ssl
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from medmesh.launcher import tls
from medmesh.launcher.tls import LocalPki, ensure_local_pki, issue_client_certificate

HANDSHAKE_TIMEOUT = 10.0


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _snapshot(pki: LocalPki) -> dict[str, tuple[bytes, int]]:
    paths = {
        "ca_cert": pki.ca_cert,
        "ca_key": pki.ca_key,
        "server_cert": pki.server_cert,
        "server_key": pki.server_key,
    }
    return {name: (p.read_bytes(), p.stat().st_mtime_ns) for name, p in paths.items()}


def _sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(san.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return dns, ips


def test_first_run_creates_ca_and_server_certificate(tmp_path: Path) -> None:
    tls_dir = tmp_path / "state" / "tls"
    pki = ensure_local_pki(tls_dir)

    assert stat.S_IMODE(tls_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(pki.ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pki.server_key.stat().st_mode) == 0o600

    ca = _cert(pki.ca_cert)
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == ("medmesh local development CA")
    assert ca.subject == ca.issuer
    public_key = ca.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    assert not usage.digital_signature
    ca_lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert datetime.timedelta(days=3649) < ca_lifetime < datetime.timedelta(days=3651)

    server = _cert(pki.server_cert)
    assert server.issuer == ca.subject
    assert _sans(server) == ({"localhost"}, {"127.0.0.1", "::1"})
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert server.not_valid_after_utc - server.not_valid_before_utc <= datetime.timedelta(days=825, minutes=5)


def test_second_run_changes_no_file(tmp_path: Path) -> None:
    first = ensure_local_pki(tmp_path / "tls")
    before = _snapshot(first)

    second = ensure_local_pki(tmp_path / "tls")

    assert second == first
    assert _snapshot(second) == before


def test_same_names_in_other_order_or_case_are_not_a_change(tmp_path: Path) -> None:
    pki = ensure_local_pki(tmp_path / "tls", ("localhost", "gw.test"), ("127.0.0.1",))
    before = _snapshot(pki)

    ensure_local_pki(tmp_path / "tls", ("GW.test", "localhost"), ("127.0.0.1",))

    assert _snapshot(pki) == before


def test_san_change_reissues_server_certificate_and_keeps_ca(tmp_path: Path) -> None:
    pki = ensure_local_pki(tmp_path / "tls")
    before = _snapshot(pki)

    ensure_local_pki(tmp_path / "tls", ("localhost", "gateway.medmesh.test"), ("127.0.0.1",))

    after = _snapshot(pki)
    assert after["ca_cert"] == before["ca_cert"]
    assert after["ca_key"] == before["ca_key"]
    assert after["server_cert"][0] != before["server_cert"][0]
    server = _cert(pki.server_cert)
    assert _sans(server) == ({"localhost", "gateway.medmesh.test"}, {"127.0.0.1"})
    server.verify_directly_issued_by(_cert(pki.ca_cert))


def test_server_certificate_close_to_expiry_is_reissued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pki = ensure_local_pki(tmp_path / "tls")
    before = _snapshot(pki)
    old_expiry = _cert(pki.server_cert).not_valid_after_utc
    # 20 days before the server certificate expires; the 10-year CA is still good.
    later = old_expiry - datetime.timedelta(days=20)
    monkeypatch.setattr(tls, "_utcnow", lambda: later)

    ensure_local_pki(tmp_path / "tls")

    after = _snapshot(pki)
    assert after["ca_cert"] == before["ca_cert"]
    assert _cert(pki.server_cert).not_valid_after_utc > old_expiry


def test_server_certificate_from_another_ca_is_reissued(tmp_path: Path) -> None:
    pki = ensure_local_pki(tmp_path / "tls")
    foreign = ensure_local_pki(tmp_path / "foreign")
    shutil.copyfile(foreign.server_cert, pki.server_cert)
    shutil.copyfile(foreign.server_key, pki.server_key)

    ensure_local_pki(tmp_path / "tls")

    _cert(pki.server_cert).verify_directly_issued_by(_cert(pki.ca_cert))


def test_loosened_key_permissions_are_tightened(tmp_path: Path) -> None:
    pki = ensure_local_pki(tmp_path / "tls")
    pki.server_key.chmod(0o644)
    pki.ca_key.chmod(0o640)

    ensure_local_pki(tmp_path / "tls")

    assert stat.S_IMODE(pki.server_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pki.ca_key.stat().st_mode) == 0o600


def test_chain_verifies_for_requested_names_only(tmp_path: Path) -> None:
    pki = ensure_local_pki(tmp_path / "tls")
    builder = PolicyBuilder().store(Store([_cert(pki.ca_cert)]))
    leaf = _cert(pki.server_cert)

    for name in (
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ):
        chain = builder.build_server_verifier(name).verify(leaf, [])
        assert chain[-1] == _cert(pki.ca_cert)

    with pytest.raises(VerificationError):
        builder.build_server_verifier(x509.DNSName("example.com")).verify(leaf, [])


# --- real handshakes ---------------------------------------------------------------------------


def _handshake(
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    on_server_connection: Callable[[ssl.SSLSocket], None] | None = None,
) -> str:
    """Connect a client to a one-shot TLS server on 127.0.0.1; return what the server sent."""
    server_errors: list[BaseException] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(HANDSHAKE_TIMEOUT)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(HANDSHAKE_TIMEOUT)
                with server_context.wrap_socket(conn, server_side=True) as tls_conn:
                    if on_server_connection is not None:
                        on_server_connection(tls_conn)
                    tls_conn.sendall(f"hello {tls_conn.version()}".encode())
            except (OSError, ssl.SSLError) as exc:
                server_errors.append(exc)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=HANDSHAKE_TIMEOUT) as raw,
                client_context.wrap_socket(raw, server_hostname="localhost") as client,
            ):
                received = client.recv(1024).decode()
        finally:
            thread.join(HANDSHAKE_TIMEOUT)
    assert not thread.is_alive()
    if server_errors and received == "":
        raise server_errors[0]
    return received


def _server_context(pki: LocalPki) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(pki.server_cert, pki.server_key)
    return context


def _client_context(ca_cert: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_cert))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    assert context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED
    return context


def test_tls_handshake_verifies_localhost_against_local_ca(tmp_path: Path) -> None:
    pki = ensure_local_pki(tmp_path / "tls")

    received = _handshake(_server_context(pki), _client_context(pki.ca_cert))

    assert received == "hello TLSv1.3"


def test_tls_handshake_fails_against_another_ca(tmp_path: Path) -> None:
    pki = ensure_local_pki(tmp_path / "tls")
    other = ensure_local_pki(tmp_path / "other")

    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(_server_context(pki), _client_context(other.ca_cert))


def test_client_certificate_authenticates_over_mutual_tls(tmp_path: Path) -> None:
    pki = ensure_local_pki(tmp_path / "tls")
    cert_path, key_path = issue_client_certificate(pki, "devices/SN-0001", tmp_path / "clients")

    assert cert_path.name == "devices_SN-0001.crt"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    client_cert = _cert(cert_path)
    eku = client_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]

    server_context = _server_context(pki)
    server_context.verify_mode = ssl.CERT_REQUIRED
    server_context.load_verify_locations(cafile=str(pki.ca_cert))
    client_context = _client_context(pki.ca_cert)
    client_context.load_cert_chain(cert_path, key_path)
    peers: list[str] = []

    def record_peer(conn: ssl.SSLSocket) -> None:
        der = conn.getpeercert(binary_form=True)
        assert der is not None
        subject = x509.load_der_x509_certificate(der).subject
        peers.extend(str(attr.value) for attr in subject.get_attributes_for_oid(NameOID.COMMON_NAME))

    received = _handshake(server_context, client_context, record_peer)

    assert received == "hello TLSv1.3"
    assert peers == ["devices/SN-0001"]


def test_client_certificate_needs_an_existing_ca(tmp_path: Path) -> None:
    missing = LocalPki(
        ca_cert=tmp_path / "ca.crt",
        ca_key=tmp_path / "ca.key",
        server_cert=tmp_path / "server.crt",
        server_key=tmp_path / "server.key",
    )
    with pytest.raises(FileNotFoundError):
        issue_client_certificate(missing, "tester", tmp_path / "clients")
