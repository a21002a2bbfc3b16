"""Development certificates: X.509 contents, file handling, and a real TLS handshake."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import socket
import ssl
import stat
import threading
from pathlib import Path
from typing import NamedTuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from webhook.serving.certs import (
    CA_CERT,
    SERVING_CERT,
    SERVING_KEY,
    CertificatePaths,
    ca_bundle,
    certificate_not_after,
    ensure_serving_certificates,
    write_certificates,
)
from webhook.serving.tls import server_ssl_context

DNS_NAMES = ["outrigger.outrigger-system.svc", "localhost"]
IP_ADDRESSES = ["127.0.0.1", "::1"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> CertificatePaths:
    return write_certificates(tmp_path_factory.mktemp("certs"), DNS_NAMES, IP_ADDRESSES, days=30)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_writes_exactly_the_ca_certificate_and_serving_pair(paths: CertificatePaths) -> None:
    assert paths == CertificatePaths.in_dir(paths.cert.parent)
    # In particular no CA key: the development CA must not be able to sign again.
    assert sorted(p.name for p in paths.cert.parent.iterdir()) == [
        CA_CERT,
        SERVING_CERT,
        SERVING_KEY,
    ]


def test_serving_certificate_is_issued_by_the_ca(paths: CertificatePaths) -> None:
    ca, cert = load(paths.ca_cert), load(paths.cert)
    cert.verify_directly_issued_by(ca)
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_serving_key_matches_certificate(paths: CertificatePaths) -> None:
    key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    assert b"BEGIN PRIVATE KEY" in paths.key.read_bytes()  # PKCS#8, unencrypted
    assert key.public_key() == load(paths.cert).public_key()


def test_sans_are_exactly_those_requested(paths: CertificatePaths) -> None:
    san = load(paths.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == DNS_NAMES
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address(i) for i in IP_ADDRESSES
    ]
    cn = load(paths.cert).subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert cn[0].value == DNS_NAMES[0]


def test_serving_certificate_is_a_server_leaf(paths: CertificatePaths) -> None:
    extensions = load(paths.cert).extensions
    eku = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign


def test_ca_is_a_ca_that_only_signs_leaves(paths: CertificatePaths) -> None:
    ca = load(paths.ca_cert)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert ca.subject == ca.issuer
    assert (
        ca.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "outrigger-dev-ca"
    )


def test_validity_tolerates_clock_skew_and_honours_days(paths: CertificatePaths) -> None:
    now = datetime.datetime.now(datetime.UTC)
    cert = load(paths.cert)
    assert cert.not_valid_before_utc < now - datetime.timedelta(minutes=1)
    expiry = certificate_not_after(paths.cert)
    assert expiry.tzinfo is not None and expiry.utcoffset() == datetime.timedelta(0)
    assert abs(expiry - (now + datetime.timedelta(days=30))) < datetime.timedelta(minutes=5)


def test_key_file_is_private_whatever_the_umask(tmp_path: Path) -> None:
    (tmp_path / SERVING_KEY).write_bytes(b"old")
    (tmp_path / SERVING_KEY).chmod(0o644)
    previous = os.umask(0)
    try:
        paths = write_certificates(tmp_path, ["localhost"], [])
    finally:
        os.umask(previous)
    assert stat.S_IMODE(paths.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.cert.stat().st_mode) == 0o644


def test_cn_falls_back_to_first_ip(tmp_path: Path) -> None:
    cert = load(write_certificates(tmp_path, [], ["10.0.0.7"]).cert)
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "10.0.0.7"


def test_ensure_creates_missing_certificates(tmp_path: Path) -> None:
    cert_dir = tmp_path / "nested" / "certs"
    paths, created = ensure_serving_certificates(cert_dir)
    assert created
    assert paths.cert.is_file() and paths.key.is_file() and paths.ca_cert.is_file()
    san = load(paths.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_ensure_keeps_existing_certificates(tmp_path: Path) -> None:
    first, _ = ensure_serving_certificates(tmp_path)
    before = {p: p.read_bytes() for p in (first.ca_cert, first.cert, first.key)}
    second, created = ensure_serving_certificates(tmp_path, ["other.example"], ["10.1.2.3"])
    assert not created
    assert second == first
    assert {p: p.read_bytes() for p in before} == before


def test_ca_bundle_is_one_line_base64_of_the_pem(paths: CertificatePaths) -> None:
    bundle = ca_bundle(paths.ca_cert)
    assert "\n" not in bundle
    assert base64.b64decode(bundle, validate=True) == paths.ca_cert.read_bytes()


def test_bad_ip_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not-an-ip"):
        write_certificates(tmp_path, ["localhost"], ["not-an-ip"])
    assert not list(tmp_path.iterdir())


def test_no_names_at_all_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one DNS name or IP"):
        write_certificates(tmp_path, [], [])


# --- a real handshake against server_ssl_context -------------------------------------------


class Outcome(NamedTuple):
    version: str | None  # negotiated by the client; None if the handshake failed
    client_error: Exception | None
    server_error: Exception | None


def handshake(
    paths: CertificatePaths, client: ssl.SSLContext, server_hostname: str = "localhost"
) -> Outcome:
    """Serve one TLS connection on 127.0.0.1 from a thread and connect to it with `client`."""
    server_context = server_ssl_context(paths.cert, paths.key)
    server_errors: list[Exception] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve_one() -> None:
            try:
                conn, _ = listener.accept()
                with server_context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except OSError as error:  # ssl.SSLError is an OSError
                server_errors.append(error)

        thread = threading.Thread(target=serve_one, daemon=True)
        thread.start()
        version, client_error = None, None
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=10) as raw,
                client.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                version = tls.version()
                assert tls.recv(2) == b"ok"
        except ssl.SSLError as error:
            client_error = error
        finally:
            thread.join(timeout=10)
    assert not thread.is_alive()
    return Outcome(version, client_error, server_errors[0] if server_errors else None)


def client_context(paths: CertificatePaths) -> ssl.SSLContext:
    """A client that trusts only the development CA and checks the hostname."""
    context = ssl.create_default_context(cafile=str(paths.ca_cert))
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    return context


def test_tls_handshake_verifies_against_the_ca(paths: CertificatePaths) -> None:
    outcome = handshake(paths, client_context(paths))
    assert outcome.client_error is None and outcome.server_error is None
    assert outcome.version in {"TLSv1.2", "TLSv1.3"}


def test_tls_client_rejects_a_name_not_in_the_sans(paths: CertificatePaths) -> None:
    outcome = handshake(paths, client_context(paths), server_hostname="evil.example")
    assert isinstance(outcome.client_error, ssl.SSLCertVerificationError)
    assert outcome.version is None


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_client_is_refused_by_the_server(paths: CertificatePaths) -> None:
    context = client_context(paths)
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    # Let the client really offer TLS 1.1 (distro OpenSSL disables it at the default security
    # level), so the refusal comes from the server's minimum_version, not the client's config.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    outcome = handshake(paths, context)
    assert outcome.version is None
    assert isinstance(outcome.client_error, ssl.SSLError)
    assert isinstance(outcome.server_error, ssl.SSLError)
    # Not NO_SHARED_CIPHER: the server must refuse because of the protocol version itself.
    assert "UNSUPPORTED_PROTOCOL" in str(outcome.server_error).upper()
