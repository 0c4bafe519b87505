"""The device CA and what it signs: `ensure_device_ca`, loading the CA, the issued certificate's
contents (verified by an X.509 client verifier and a real TLS 1.3 handshake), and CSR checks."""

from __future__ import annotations

import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from medmesh.launcher.tls import ensure_device_ca, ensure_local_pki
from medmesh.runtime.errors import InvalidArgument
from services.device.certificates import (
    CLOCK_SKEW,
    CertificateAuthority,
    CertificateSettings,
    describe_key,
    fingerprint_of,
    normalize_fingerprint,
    parse_certificate_name,
    parse_csr,
    require_validity,
)
from tests.unit.test_device_credentials_fakes import make_authority, make_csr

AT = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return make_authority(tmp_path_factory.mktemp("device-ca"))


def _issue(
    authority: CertificateAuthority, device_id: str = "SN-1", validity: timedelta = timedelta(days=365)
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    return authority.issue(device_id, key.public_key(), datetime.now(UTC), validity), key


# --- ensure_device_ca -------------------------------------------------------------------------------


def test_ensure_device_ca_creates_a_p256_ca_for_ten_years(tmp_path: Path) -> None:
    directory = tmp_path / "state" / "tls"
    cert_path, key_path = ensure_device_ca(directory)

    assert (cert_path.name, key_path.name) == ("device-ca.crt", "device-ca.key")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert ca.subject == ca.issuer
    ca.verify_directly_issued_by(ca)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is True
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign is True
    assert usage.value.digital_signature is False
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert timedelta(days=3649) < lifetime < timedelta(days=3651)


def test_ensure_device_ca_is_created_once(tmp_path: Path) -> None:
    cert_path, key_path = ensure_device_ca(tmp_path)
    before = (cert_path.read_bytes(), key_path.read_bytes(), cert_path.stat().st_mtime_ns)

    again = ensure_device_ca(tmp_path)

    assert again == (cert_path, key_path)
    assert (cert_path.read_bytes(), key_path.read_bytes(), cert_path.stat().st_mtime_ns) == before


def test_ensure_device_ca_tightens_a_loosened_key(tmp_path: Path) -> None:
    _, key_path = ensure_device_ca(tmp_path)
    key_path.chmod(0o644)

    ensure_device_ca(tmp_path)

    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


@pytest.mark.parametrize("damage", ["lose the key", "garble the certificate", "swap in another key"])
def test_ensure_device_ca_never_replaces_an_unusable_ca(tmp_path: Path, damage: str) -> None:
    cert_path, key_path = ensure_device_ca(tmp_path)
    if damage == "lose the key":
        key_path.unlink()
    elif damage == "garble the certificate":
        cert_path.write_text("not a certificate")
    else:
        other = ec.generate_private_key(ec.SECP256R1())
        key_path.write_bytes(
            other.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    left = cert_path.read_bytes()

    with pytest.raises(ValueError, match="not replaced automatically"):
        ensure_device_ca(tmp_path)

    assert cert_path.read_bytes() == left
    assert key_path.exists() == (damage != "lose the key")


# --- loading the CA ---------------------------------------------------------------------------------


def test_load_refuses_a_key_of_another_certificate(tmp_path: Path) -> None:
    cert_path, _ = ensure_device_ca(tmp_path / "one")
    _, other_key = ensure_device_ca(tmp_path / "two")

    with pytest.raises(ValueError, match="does not belong"):
        CertificateAuthority.load(cert_path, other_key)


def test_load_refuses_a_certificate_that_is_not_a_ca(tmp_path: Path, authority: CertificateAuthority) -> None:
    leaf, key = _issue(authority)
    (tmp_path / "leaf.crt").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )

    with pytest.raises(ValueError, match="not a CA"):
        CertificateAuthority.load(tmp_path / "leaf.crt", tmp_path / "leaf.key")


def test_settings_need_both_ca_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDMESH_DEVICE_CA_CERT_FILE", "/x/device-ca.crt")
    monkeypatch.delenv("MEDMESH_DEVICE_CA_KEY_FILE", raising=False)

    with pytest.raises(ValueError, match="MEDMESH_DEVICE_CA_KEY_FILE"):
        CertificateSettings.from_env()


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDMESH_DEVICE_CA_CERT_FILE", "/x/device-ca.crt")
    monkeypatch.setenv("MEDMESH_DEVICE_CA_KEY_FILE", "/x/device-ca.key")
    monkeypatch.setenv("MEDMESH_DEVICE_CERTIFICATE_VALIDITY_DAYS", "90")
    monkeypatch.setenv("MEDMESH_DEVICE_CERTIFICATE_GENERATE", "false")

    settings = CertificateSettings.from_env()

    assert settings == CertificateSettings(
        Path("/x/device-ca.crt"), Path("/x/device-ca.key"), timedelta(days=90), False
    )


@pytest.mark.parametrize("days", ["0", "4000", "soon"])
def test_settings_refuse_a_bad_validity(monkeypatch: pytest.MonkeyPatch, days: str) -> None:
    monkeypatch.setenv("MEDMESH_DEVICE_CA_CERT_FILE", "/x/device-ca.crt")
    monkeypatch.setenv("MEDMESH_DEVICE_CA_KEY_FILE", "/x/device-ca.key")
    monkeypatch.setenv("MEDMESH_DEVICE_CERTIFICATE_VALIDITY_DAYS", days)

    with pytest.raises(ValueError, match="MEDMESH_DEVICE_CERTIFICATE_VALIDITY_DAYS"):
        CertificateSettings.from_env()


def test_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDMESH_DEVICE_CA_CERT_FILE", "/x/device-ca.crt")
    monkeypatch.setenv("MEDMESH_DEVICE_CA_KEY_FILE", "/x/device-ca.key")
    monkeypatch.delenv("MEDMESH_DEVICE_CERTIFICATE_VALIDITY_DAYS", raising=False)
    monkeypatch.delenv("MEDMESH_DEVICE_CERTIFICATE_GENERATE", raising=False)

    settings = CertificateSettings.from_env()

    assert (settings.default_validity, settings.allow_generate) == (timedelta(days=365), True)


# --- what the CA issues -----------------------------------------------------------------------------


def test_issued_certificate_identifies_the_device_for_client_auth_only(authority: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = authority.issue("SN-1", key.public_key(), AT, timedelta(days=365))

    assert certificate.subject.rfc4514_string() == "CN=SN-1"
    assert certificate.issuer == authority.certificate.subject
    assert certificate.not_valid_before_utc == AT - CLOCK_SKEW
    assert certificate.not_valid_after_utc == AT + timedelta(days=365)
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:medmesh:device:SN-1"]
    assert san.get_values_for_type(x509.DNSName) == []
    assert list(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert (constraints.critical, constraints.value.ca) == (True, False)
    usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    assert (usage.digital_signature, usage.key_cert_sign, usage.key_encipherment) == (True, False, False)
    assert certificate.public_key() == key.public_key()
    assert authority.issued(certificate)


def test_issued_certificate_passes_an_x509_client_verifier(authority: CertificateAuthority) -> None:
    certificate, _ = _issue(authority)
    verifier = PolicyBuilder().store(Store([authority.certificate])).build_client_verifier()

    verified = verifier.verify(certificate, [])

    assert verified.subjects is not None
    assert [s.value for s in verified.subjects] == ["urn:medmesh:device:SN-1"]


def test_a_device_with_its_certificate_completes_a_mutual_tls_13_handshake(
    tmp_path: Path, authority: CertificateAuthority
) -> None:
    """What the MQTT broker will do: require a client certificate from the device CA."""
    pki = ensure_local_pki(tmp_path / "server")
    device_cert, device_key = _issue(authority)
    (tmp_path / "device.crt").write_bytes(device_cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "device.key").write_bytes(
        device_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(pki.server_cert, pki.server_key)
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(cadata=authority.certificate.public_bytes(serialization.Encoding.PEM).decode())
    client = ssl.create_default_context(cafile=str(pki.ca_cert))
    client.load_cert_chain(tmp_path / "device.crt", tmp_path / "device.key")

    server_end, client_end = _handshake(server, client)

    peer = server_end.getpeercert()
    assert server_end.version() == "TLSv1.3"
    assert peer is not None
    assert (("commonName", "SN-1"),) in peer["subject"]
    assert client_end.version() == "TLSv1.3"


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Both ends over memory BIOs, pumping bytes across until both are done."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    from_server, from_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_end = server.wrap_bio(to_server, from_server, server_side=True)
    client_end = client.wrap_bio(to_client, from_client, server_hostname="localhost")
    done = {"server": False, "client": False}
    for _ in range(20):
        for name, end in (("client", client_end), ("server", server_end)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        to_server.write(from_client.read())
        to_client.write(from_server.read())
        if all(done.values()):
            # TLS 1.3: the server checks the client certificate on the client's last flight.
            server_end.write(b"x")
            to_client.write(from_server.read())
            assert client_end.read(1) == b"x"
            return server_end, client_end
    raise AssertionError("handshake did not finish")


def test_validity_never_outlives_the_ca(authority: CertificateAuthority) -> None:
    ca_end = authority.certificate.not_valid_after_utc
    key = ec.generate_private_key(ec.SECP256R1())

    certificate = authority.issue("SN-1", key.public_key(), ca_end - timedelta(days=10), timedelta(days=365))

    assert certificate.not_valid_after_utc == ca_end


def test_foreign_certificates_are_not_ours(tmp_path: Path, authority: CertificateAuthority) -> None:
    foreign = make_authority(tmp_path)
    certificate, _ = _issue(foreign)

    assert not authority.issued(certificate)
    assert foreign.issued(certificate)


# --- CSR checks -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "key_type"),
    [
        (ec.generate_private_key(ec.SECP256R1()), "EC P-256"),
        (ec.generate_private_key(ec.SECP384R1()), "EC P-384"),
        (rsa.generate_private_key(65537, 2048), "RSA 2048"),
    ],
)
def test_csr_with_an_allowed_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, key_type: str) -> None:
    pem, _ = make_csr(["SN-1"], key)

    request = parse_csr(pem, "SN-1")

    assert request.key_type == key_type
    assert request.public_key == key.public_key()


@pytest.mark.parametrize(
    "key", [ec.generate_private_key(ec.SECP521R1()), rsa.generate_private_key(65537, 1024)], ids=["P-521", "RSA-1024"]
)
def test_csr_with_another_key_is_refused(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    pem, _ = make_csr(["SN-1"], key)

    with pytest.raises(InvalidArgument) as caught:
        parse_csr(pem, "SN-1")

    assert caught.value.reason == "UNSUPPORTED_KEY"
    assert [v.field for v in caught.value.field_violations] == ["csr"]


def test_csr_with_an_ed25519_key_is_refused() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "SN-1")]))
        .sign(key, None)
    )

    with pytest.raises(InvalidArgument) as caught:
        parse_csr(csr.public_bytes(serialization.Encoding.PEM).decode(), "SN-1")

    assert caught.value.reason == "UNSUPPORTED_KEY"


@pytest.mark.parametrize("common_names", [["SN-2"], [], ["SN-1", "SN-1"], ["sn-1"]])
def test_csr_subject_must_name_this_device(common_names: list[str]) -> None:
    pem, _ = make_csr(common_names)

    with pytest.raises(InvalidArgument) as caught:
        parse_csr(pem, "SN-1")

    assert caught.value.reason == "CSR_SUBJECT_MISMATCH"


def test_csr_other_subject_attributes_are_allowed_and_ignored(authority: CertificateAuthority) -> None:
    pem, _ = make_csr(["SN-1"], extra=[x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme")])

    request = parse_csr(pem, "SN-1")
    certificate = authority.issue("SN-1", request.public_key, AT, timedelta(days=1))

    assert certificate.subject.rfc4514_string() == "CN=SN-1"


def test_csr_with_a_broken_signature_is_refused() -> None:
    pem, _ = make_csr(["SN-1"])
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature's last integer
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()

    with pytest.raises(InvalidArgument) as caught:
        parse_csr(tampered, "SN-1")

    assert caught.value.reason == "CSR_SIGNATURE_INVALID"


def test_csr_whose_subject_was_swapped_after_signing_is_refused() -> None:
    """Proof of possession: a CSR for SN-2 edited to say SN-1 no longer verifies."""
    pem, _ = make_csr(["SN-2"])
    der = x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER)
    tampered = der.replace(b"SN-2", b"SN-1")

    with pytest.raises(InvalidArgument) as caught:
        parse_csr(x509.load_der_x509_csr(tampered).public_bytes(serialization.Encoding.PEM).decode(), "SN-1")

    assert caught.value.reason == "CSR_SIGNATURE_INVALID"


@pytest.mark.parametrize(
    "text", ["", "hello", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----"]
)
def test_garbage_is_not_a_csr(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_csr(text, "SN-1")

    assert caught.value.reason == "INVALID_CSR"


def test_describe_key_refuses_a_huge_rsa_key() -> None:
    public_key = rsa.generate_private_key(65537, 2048).public_key()
    assert describe_key(public_key) == "RSA 2048"
    with pytest.raises(InvalidArgument):
        describe_key(ec.generate_private_key(ec.SECP256K1()).public_key())


# --- names and values -------------------------------------------------------------------------------


def test_certificate_names() -> None:
    assert parse_certificate_name("devices/SN-1/certificates/0a1b") == ("devices/SN-1", "0a1b")
    for bad in ["devices/SN-1/certificates/0A1B", "devices//certificates/1", "devices/SN-1/certificates/", "x/1"]:
        with pytest.raises(InvalidArgument) as caught:
            parse_certificate_name(bad)
        assert caught.value.reason == "INVALID_NAME"


def test_fingerprints_are_normalized(authority: CertificateAuthority) -> None:
    certificate, _ = _issue(authority)
    fingerprint = fingerprint_of(certificate)
    with_colons = ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()

    assert fingerprint == certificate.fingerprint(hashes.SHA256()).hex()
    assert normalize_fingerprint(with_colons) == fingerprint
    with pytest.raises(InvalidArgument):
        normalize_fingerprint(fingerprint[:-1])


@pytest.mark.parametrize("validity", [timedelta(minutes=59), timedelta(days=3651)])
def test_validity_bounds(validity: timedelta) -> None:
    with pytest.raises(InvalidArgument) as caught:
        require_validity(validity)

    assert caught.value.reason == "INVALID_VALIDITY"
    assert require_validity(None, default=timedelta(days=30)) == timedelta(days=30)
