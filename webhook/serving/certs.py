"""Development certificates: a throwaway CA and a serving certificate the API server can trust.

In a cluster the serving pair comes from a Secret (cert-manager, the Helm chart, or the webhook's
own authority, `webhook.serving.authority`); these helpers make the certificates for all of
them but cert-manager, and let `outrigger certs` and `outrigger serve` work on a laptop or in
kind without extra tools.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DNS_SAN = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
CA_CERT = "ca.crt"
SERVING_CERT = "tls.crt"
SERVING_KEY = "tls.key"

CA_COMMON_NAME = "outrigger-dev-ca"
# Certificates start a little in the past so a node whose clock lags ours still accepts them.
CLOCK_SKEW = datetime.timedelta(minutes=5)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class CertificatePaths:
    """Where the CA certificate and the serving pair live."""

    ca_cert: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> CertificatePaths:
        """The standard file names inside `directory`, matching a kubernetes.io/tls Secret."""
        return cls(directory / CA_CERT, directory / SERVING_CERT, directory / SERVING_KEY)


def write_certificates(
    out_dir: Path,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str],
    *,
    days: int = 365,
) -> CertificatePaths:
    """Generate a CA and a serving certificate for the given SANs and write them to `out_dir`.

    Only the CA certificate is written, never its key: a development CA that cannot sign again
    cannot be misused to mint certificates for other names, even if `ca.crt` ends up trusted.
    """
    dns, ips = validated_sans(dns_names, ip_addresses)
    if days < 1:
        raise ValueError(f"certificate validity must be at least one day, got {days}")
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - CLOCK_SKEW, now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = ca_certificate(ca_key, not_before, not_after)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = serving_certificate(key, ca_cert, ca_key, dns, ips, not_before, not_after)

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = CertificatePaths.in_dir(out_dir)
    write_file(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    write_file(paths.key, private_key_pem(key), 0o600)
    write_file(paths.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return paths


def ensure_serving_certificates(
    cert_dir: Path,
    dns_names: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1",),
) -> tuple[CertificatePaths, bool]:
    """Return the serving pair in `cert_dir`, generating one first if it is missing.

    Existing files are never replaced: they may be a mounted Secret or a CA someone already trusts.
    The boolean is True when new certificates were written.
    """
    paths = CertificatePaths.in_dir(cert_dir)
    if paths.cert.is_file() and paths.key.is_file():
        return paths, False
    return write_certificates(cert_dir, dns_names, ip_addresses), True


def ca_bundle(ca_cert: Path) -> str:
    """The PEM file as one line of standard base64, the form `webhooks[].clientConfig.caBundle`
    expects."""
    return base64.b64encode(ca_cert.read_bytes()).decode("ascii")


def certificate_not_after(cert_file: Path) -> datetime.datetime:
    """When the (first) certificate in `cert_file` expires, as an aware UTC datetime."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return cert.not_valid_after_utc


def validated_sans(
    dns_names: Sequence[str], ip_addresses: Sequence[str]
) -> tuple[list[str], list[IPAddress]]:
    """Reject unusable SANs up front, naming the culprit, rather than deep inside cryptography."""
    if not dns_names and not ip_addresses:
        raise ValueError("a serving certificate needs at least one DNS name or IP address")
    for name in dns_names:
        if not _DNS_SAN.fullmatch(name) or len(name) > 253:
            raise ValueError(
                f"invalid DNS name {name!r}: expected lowercase labels of letters, digits and "
                "'-' separated by dots, optionally starting with '*.'"
            )
    ips: list[IPAddress] = []
    for value in ip_addresses:
        try:
            ips.append(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError(f"invalid IP address {value!r}") from None
    return list(dns_names), ips


def ca_certificate(
    key: ec.EllipticCurvePrivateKey,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    common_name: str = CA_COMMON_NAME,
) -> x509.Certificate:
    """A self-signed CA limited to signing end-entity certificates (path length 0)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    usage = _key_usage(digital_signature=False, key_cert_sign=True, crl_sign=True)
    return (
        _builder(name, name, key.public_key(), not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def serving_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    dns_names: list[str],
    ips: list[IPAddress],
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.Certificate:
    """A TLS server certificate; clients match the SANs, the CN is only for humans."""
    common_name = dns_names[0] if dns_names else str(ips[0])
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    sans += [x509.IPAddress(ip) for ip in ips]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    usage = _key_usage(digital_signature=True, key_cert_sign=False, crl_sign=False)
    return (
        _builder(subject, ca_cert.subject, key.public_key(), not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.CertificateBuilder:
    """The fields every certificate shares; a random serial keeps reissues distinguishable."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def _key_usage(*, digital_signature: bool, key_cert_sign: bool, crl_sign: bool) -> x509.KeyUsage:
    """KeyUsage with only the named bits settable; the rest never apply to these certificates."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8, which uvicorn, Go and kubectl's TLS Secrets all read."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file and rename, so readers never see a partial file.

    mkstemp creates the file as 0o600, so a private key is never readable by others, not even
    for an instant and whatever the umask; the final mode is then set explicitly.
    """
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
