"""The certificate authority the webhook keeps for itself (`outrigger serve --tls-source self`):
what a stored bundle holds, whether it still serves, when it is due, and the next bundle.

Pure: bytes and a clock in, a decision or a new bundle out. `webhook.cluster.selftls` keeps
the bundle in a Secret, publishes its CAs in the webhook configuration's `caBundle` and writes
the serving pair where `webhook.serving.tls` reloads it from.

The bundle, as the Secret's data:

- `ca.crt`: every CA the API server must trust, the newest first, then older ones still valid;
- `ca.key`: the newest CA's key (nothing is signed with an older one again);
- `tls.crt`, `tls.key`: the serving certificate, signed by one of those CAs, and its key.

A new CA is introduced in two steps, so that no replica ever serves a certificate the API
server cannot verify yet: first the CA is added to `ca.crt` (and so to every replica's
`caBundle` publication) while the serving certificate signed by the old CA stays; only once the
new CA has been published for `ca_overlap` is a serving certificate signed with it.
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from webhook.serving.certs import (
    CA_CERT,
    CLOCK_SKEW,
    SERVING_CERT,
    SERVING_KEY,
    ca_certificate,
    private_key_pem,
    serving_certificate,
    validated_sans,
)

CA_KEY = "ca.key"
KEYS = (CA_CERT, CA_KEY, SERVING_CERT, SERVING_KEY)
_PEM = serialization.Encoding.PEM
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class BundleError(ValueError):
    """Stored data that is not a usable bundle; the message says what is wrong (never a key)."""


@dataclass(frozen=True)
class Settings:
    """How long certificates live and when they are replaced."""

    dns_names: tuple[str, ...]
    cert_validity: datetime.timedelta = datetime.timedelta(days=90)
    # A serving certificate is replaced once it expires within this.
    renew_before: datetime.timedelta = datetime.timedelta(days=30)
    ca_validity: datetime.timedelta = datetime.timedelta(days=3650)
    # How long a new CA is published before anything is signed with it.
    ca_overlap: datetime.timedelta = datetime.timedelta(minutes=10)

    def __post_init__(self) -> None:
        validated_sans(self.dns_names, ())
        zero = datetime.timedelta(0)
        if not zero < self.renew_before < self.cert_validity:
            raise ValueError(
                "the renewal window must be positive and shorter than the certificate's "
                f"validity ({self.renew_before} is not within {self.cert_validity})"
            )
        if not zero <= self.ca_overlap < self.renew_before:
            raise ValueError(
                f"the CA overlap ({self.ca_overlap}) must be shorter than the renewal window "
                f"({self.renew_before}): a due certificate waits for it"
            )
        if self.ca_validity < 2 * (self.cert_validity + self.renew_before):
            raise ValueError(
                f"the CA's validity ({self.ca_validity}) must be at least twice the "
                "certificate's validity plus its renewal window"
            )

    @property
    def ca_renew_before(self) -> datetime.timedelta:
        """A CA is replaced once it expires within this: a certificate signed now outlives it
        never, and the next CA is published well before the old one's last certificate is due."""
        return self.cert_validity + self.renew_before


@dataclass(frozen=True)
class Bundle:
    """The CAs, the newest CA's key, and the serving pair; parsed and checked together."""

    cas: tuple[x509.Certificate, ...]  # newest (the signing one) first
    ca_key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def from_data(cls, data: Mapping[str, bytes]) -> Bundle:
        """Parse the Secret's data; raises `BundleError` saying what is missing or wrong."""
        missing = [name for name in KEYS if not data.get(name)]
        if missing:
            raise BundleError(f"missing {', '.join(missing)}")
        try:
            cas = tuple(x509.load_pem_x509_certificates(data[CA_CERT]))
            cert = x509.load_pem_x509_certificates(data[SERVING_CERT])[0]
        except ValueError:
            raise BundleError("a certificate does not parse as PEM") from None
        ca_key, key = _ec_key(data[CA_KEY], CA_KEY), _ec_key(data[SERVING_KEY], SERVING_KEY)
        if not _same_key(ca_key, cas[0]):
            raise BundleError(f"{CA_KEY} does not belong to the first CA of {CA_CERT}")
        if not _same_key(key, cert):
            raise BundleError(f"{SERVING_KEY} does not belong to {SERVING_CERT}")
        return cls(cas, ca_key, cert, key)

    def data(self) -> dict[str, bytes]:
        """The Secret's data (PEM bytes; the API client base64-encodes them)."""
        return {
            CA_CERT: b"".join(ca.public_bytes(_PEM) for ca in self.cas),
            CA_KEY: private_key_pem(self.ca_key),
            SERVING_CERT: self.cert.public_bytes(_PEM),
            SERVING_KEY: private_key_pem(self.key),
        }

    @property
    def newest_ca(self) -> x509.Certificate:
        return self.cas[0]

    def issuer_of_cert(self) -> x509.Certificate | None:
        """The CA of the bundle whose key signed the serving certificate, if any."""
        for ca in self.cas:
            try:
                self.cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return ca
        return None


class Action(enum.Enum):
    KEEP = "keep"
    NEW_CA = "new-ca"  # publish a new CA beside the old one, keep the serving certificate
    NEW_CERT = "new-cert"  # sign a new serving certificate with the newest CA
    NEW_ALL = "new-all"  # nothing worth keeping: a new CA and a new serving certificate


@dataclass(frozen=True)
class Plan:
    action: Action
    reason: str


def plan(bundle: Bundle | None, settings: Settings, now: datetime.datetime) -> Plan:
    """What to do with `bundle` (None: nothing usable is stored) at `now`."""
    if bundle is None:
        return Plan(Action.NEW_ALL, "no usable certificate is stored")
    ca = bundle.newest_ca
    ca_problem = _ca_problem(ca, now)
    if ca_problem:
        return Plan(Action.NEW_ALL, f"the CA {ca_problem}")
    issuer = bundle.issuer_of_cert()
    cert_problem = _cert_problem(bundle, issuer, settings, now)
    if ca.not_valid_after_utc - now <= settings.ca_renew_before:
        expiry = f"the CA expires {ca.not_valid_after_utc.isoformat()}"
        if cert_problem:
            return Plan(Action.NEW_ALL, f"{expiry} and the serving certificate {cert_problem}")
        return Plan(Action.NEW_CA, f"{expiry}: a new CA is published first")
    if cert_problem:
        return Plan(Action.NEW_CERT, f"the serving certificate {cert_problem}")
    moving = issuer is not ca  # signed by an older CA of the bundle
    due = bundle.cert.not_valid_after_utc - now <= settings.renew_before
    if moving and not _established(ca, settings, now):
        waiting = "renewal due" if due else "valid"
        return Plan(Action.KEEP, f"{waiting}; waiting until the new CA has been published")
    if due:
        expiry = bundle.cert.not_valid_after_utc.isoformat()
        return Plan(Action.NEW_CERT, f"the serving certificate expires {expiry}")
    if moving:
        return Plan(Action.NEW_CERT, "the new CA has been published: the certificate moves to it")
    return Plan(Action.KEEP, "valid")


def carry_out(
    action: Action, bundle: Bundle | None, settings: Settings, now: datetime.datetime
) -> Bundle:
    """The bundle after `action` (from `plan`); CAs that have expired are dropped."""
    if action is Action.KEEP:
        if bundle is None:
            raise ValueError("nothing to keep")
        return bundle
    if action is Action.NEW_ALL or bundle is None:
        ca, ca_key = _new_ca(settings, now)
        return _with_new_cert((ca,), ca_key, settings, now)
    trusted = tuple(ca for ca in bundle.cas if ca.not_valid_after_utc > now)
    if action is Action.NEW_CA:
        ca, ca_key = _new_ca(settings, now)
        return Bundle((ca, *trusted), ca_key, bundle.cert, bundle.key)
    return _with_new_cert(trusted, bundle.ca_key, settings, now)


def _ca_problem(ca: x509.Certificate, now: datetime.datetime) -> str:
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return "is not a CA certificate"
    if not constraints.ca:
        return "is not a CA certificate"
    return _validity_problem(ca, now)


def _cert_problem(
    bundle: Bundle, issuer: x509.Certificate | None, settings: Settings, now: datetime.datetime
) -> str:
    if issuer is None:
        return "is not signed by a CA of the bundle"
    problem = _validity_problem(bundle.cert, now)
    if problem:
        return problem
    try:
        sans = bundle.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "has no DNS names"
    missing = sorted(set(settings.dns_names) - set(sans.get_values_for_type(x509.DNSName)))
    if missing:
        return f"lacks the DNS names {', '.join(missing)}"
    return ""


def _validity_problem(certificate: x509.Certificate, now: datetime.datetime) -> str:
    if certificate.not_valid_after_utc <= now:
        return f"expired {certificate.not_valid_after_utc.isoformat()}"
    if certificate.not_valid_before_utc > now + CLOCK_SKEW:
        return f"is not valid before {certificate.not_valid_before_utc.isoformat()}"
    return ""


def _established(ca: x509.Certificate, settings: Settings, now: datetime.datetime) -> bool:
    """Whether `ca` was made `ca_overlap` ago (certificates start CLOCK_SKEW early)."""
    return ca.not_valid_before_utc + CLOCK_SKEW + settings.ca_overlap <= now


def _new_ca(
    settings: Settings, now: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    # A name per CA, as kube-apiserver's self-signed ones have: two CAs in one caBundle never
    # share a subject.
    name = f"outrigger-ca@{int(now.timestamp())}"
    return ca_certificate(key, now - CLOCK_SKEW, now + settings.ca_validity, name), key


def _with_new_cert(
    cas: Sequence[x509.Certificate],
    ca_key: ec.EllipticCurvePrivateKey,
    settings: Settings,
    now: datetime.datetime,
) -> Bundle:
    ca = cas[0]
    key = ec.generate_private_key(ec.SECP256R1())
    not_after = min(now + settings.cert_validity, ca.not_valid_after_utc)
    names = list(settings.dns_names)
    cert = serving_certificate(key, ca, ca_key, names, [], now - CLOCK_SKEW, not_after)
    return Bundle(tuple(cas), ca_key, cert, key)


def _ec_key(pem: bytes, name: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):  # the message could quote the key: withheld
        raise BundleError(f"{name} does not parse as an unencrypted PEM key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise BundleError(f"{name} is not an EC key")
    return key


def _same_key(key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> bool:
    ours = key.public_key().public_bytes(*_SPKI)
    return bool(ours == certificate.public_key().public_bytes(*_SPKI))
