"""TLS settings for the webhook's HTTPS listener, and the serving pair reloaded when it changes.

cert-manager renews the serving certificate into its Secret, and kubelet updates the mounted
volume the way it updates a ConfigMap (see `webhook.serving.reload`): a new timestamped
directory, the `..data` symlink swapped to it, `tls.crt` and `tls.key` symlinks through
`..data`. The server polls the pair and loads a new one into the context it already serves
with, so new handshakes present the new certificate while established connections keep the
one they negotiated (OpenSSL copies the certificate and key into each connection when the
connection is created).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import os
import ssl
import tempfile
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from webhook.serving.background import running
from webhook.serving.metrics import Metrics

log = logging.getLogger("outrigger.tls")


def server_ssl_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server context presenting `cert_file` (leaf first, then any chain) and `key_file`."""
    context = _new_context()
    context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    return context


def _new_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # Kubernetes API servers speak TLS 1.2 and 1.3; refusing anything older costs no client and
    # removes the legacy protocols' known weaknesses.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class CertificateError(ValueError):
    """A serving certificate and key that cannot be served: unreadable, unparsable, mismatched."""


@dataclass(frozen=True)
class ServingPair:
    """A certificate chain and its key, read and validated together; never shows the key."""

    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    leaf: x509.Certificate
    digest: str  # of both files' content: what tells one version from another

    def describe(self) -> str:
        """Subject, SANs, issuer, expiry and fingerprint, for the log (nothing secret)."""
        try:
            sans = self.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = ", ".join(
                [*sans.get_values_for_type(x509.DNSName)]
                + [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
            )
        except x509.ExtensionNotFound:
            names = "none"
        fingerprint = self.leaf.fingerprint(hashes.SHA256()).hex()
        return (
            f"subject {self.leaf.subject.rfc4514_string()!r}, SANs [{names}], issuer "
            f"{self.leaf.issuer.rfc4514_string()!r}, notAfter {self.not_after.isoformat()}, "
            f"sha256 {fingerprint}"
        )

    @property
    def not_after(self) -> datetime.datetime:
        return self.leaf.not_valid_after_utc


class ServingCertificate:
    """The one `ssl.SSLContext` uvicorn serves with, reloaded when `cert_file`/`key_file` change.

    Each poll reads both files (a few KiB, in a worker thread: cheaper than being clever about
    `stat`, and immune to same-size rewrites within a timestamp tick). Content that differs from
    the pair in force is validated first, entirely outside the live context: both parse, the key
    matches the leaf certificate, and OpenSSL itself accepts the pair in a scratch context. Only
    then is it loaded into the live context. That order matters: a failed `load_cert_chain` on a
    context leaves it with the new certificate and no key, and every later handshake fails.

    Races with a rotation in progress:

    - kubelet's symlink swap can fall between the read of `tls.crt` and that of `tls.key`. The
      certificate is therefore read before and after the key; if it changed, the files are in
      flux and the poll ends silently, the next one reads a settled version.
    - A writer that replaces the files one after the other (not kubelet) leaves a mismatched
      pair for a moment: it is rejected (logged once per content), the old pair keeps serving,
      and the next poll applies the completed pair.
    - The files may change again between validation and loading, so the live context is never
      loaded from the paths: it is loaded from the very bytes that were validated, through
      anonymous in-memory files (`memfd_create`): on Linux the key never touches a disk, nor
      needs a writable root filesystem. Elsewhere a private (0o700) temporary directory.

    Loading happens on the event loop's thread (`poll`), the thread that creates every TLS
    connection from this context: an `SSL_CTX` must not be modified while another thread
    creates connections from it, and a load of an in-memory pair takes microseconds. Should it
    fail all the same, the previous pair is loaded back from memory.
    """

    def __init__(
        self,
        cert_file: Path,
        key_file: Path,
        *,
        interval: float = 5.0,
        metrics: Metrics | None = None,
    ) -> None:
        """Load the pair now; raises `CertificateError`, so that a bad pair fails the start."""
        if not 0 < interval < float("inf"):
            raise ValueError(f"poll interval must be a positive number of seconds, not {interval}")
        self.cert_file = cert_file
        self.key_file = key_file
        self.interval = interval
        self.metrics = Metrics() if metrics is None else metrics
        try:
            content = _read(cert_file, key_file)
        except OSError as error:
            raise CertificateError(f"cannot read the serving certificate: {error}") from None
        if content is None:
            raise CertificateError(f"{cert_file} changed while it was read; try again")
        try:
            pair = _validated(*content)
        except CertificateError as error:
            raise CertificateError(f"{cert_file} / {key_file}: {error}") from None
        self.context = _new_context()
        _load(self.context, pair)
        self._pair = pair
        self._rejected: str | None = None  # what was last rejected, so it is reported once
        self.metrics.set_certificate_expiry(pair.not_after)
        log.info("serving certificate from %s: %s", cert_file, pair.describe())

    @property
    def pair(self) -> ServingPair:
        """The pair in force: new handshakes present its certificate."""
        return self._pair

    def ssl_context(self) -> ssl.SSLContext:
        """The context to serve with; it stays the same object across reloads."""
        return self.context

    def check(self) -> bool:
        """Read, validate and apply a changed pair; True when it was swapped in.

        Call it from the thread that creates connections from `context` (or while none does);
        the server's poller reads in a worker thread and applies on the event loop.
        """
        pair = self.changed()
        if pair is None:
            return False
        self.apply(pair)
        return True

    def changed(self) -> ServingPair | None:
        """A new, valid pair on disk, or None (unchanged, in flux, or rejected and logged).

        Touches neither the context nor the pair in force: safe in a worker thread.
        """
        try:
            content = _read(self.cert_file, self.key_file)
        except OSError as error:
            self._reject(f"unreadable: {error}", f"cannot read it: {error}")
            return None
        if content is None:
            log.debug("%s changed while it was read; checking again later", self.cert_file)
            return None
        digest = _digest(*content)
        if digest == self._pair.digest:  # unchanged, or back to the pair in force
            self._rejected = None
            return None
        if digest == self._rejected:  # reported already; wait for another version
            return None
        try:
            return _validated(*content)
        except CertificateError as error:
            self._reject(digest, str(error))
            return None

    def apply(self, pair: ServingPair) -> None:
        """Load a pair returned by `changed()` into the live context."""
        previous = self._pair
        try:
            _load(self.context, pair)
        except (OSError, ValueError) as error:
            _load(self.context, previous)  # cannot fail: the same bytes loaded before
            self._reject(pair.digest, f"OpenSSL refused it: {error}")
            return
        self._pair = pair
        self._rejected = None
        self.metrics.set_certificate_expiry(pair.not_after)
        log.info("serving certificate reloaded from %s: %s", self.cert_file, pair.describe())
        now = datetime.datetime.now(datetime.UTC)
        if not pair.leaf.not_valid_before_utc <= now <= pair.not_after:
            log.warning("the new serving certificate is not valid now (%s)", now.isoformat())

    async def poll(self) -> None:
        """Check every `interval` seconds until cancelled; an unexpected error never stops it."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                pair = await asyncio.to_thread(self.changed)
                if pair is not None:
                    self.apply(pair)  # here, on the event loop's thread: see the class doc
            except Exception:
                log.exception(
                    "cannot check the serving certificate %s; retrying in %ss",
                    self.cert_file,
                    self.interval,
                )

    def watching(self) -> AbstractAsyncContextManager[None]:
        """Poll in the background for the duration of the `async with` (the app's lifespan)."""
        return running(self.poll(), f"outrigger certificate poll {self.cert_file}")

    def _reject(self, key: str, reason: str) -> None:
        if key == self._rejected:
            return
        self._rejected = key
        log.error(
            "rejected a new serving certificate %s / %s; the one expiring %s stays in use: %s",
            self.cert_file,
            self.key_file,
            self._pair.not_after.isoformat(),
            reason,
        )


def _read(cert_file: Path, key_file: Path) -> tuple[bytes, bytes] | None:
    """Both files' content; None when the certificate changed while the key was read."""
    cert_pem = cert_file.read_bytes()
    key_pem = key_file.read_bytes()
    if cert_file.read_bytes() != cert_pem:
        return None
    return cert_pem, key_pem


def _digest(cert_pem: bytes, key_pem: bytes) -> str:
    """Tells one version of the pair from another (the length keeps the split unambiguous)."""
    return hashlib.sha256(len(cert_pem).to_bytes(8, "big") + cert_pem + key_pem).hexdigest()


def _validated(cert_pem: bytes, key_pem: bytes) -> ServingPair:
    """The pair, if it can be served; raises `CertificateError` saying why not."""
    leaf = _validate(cert_pem, key_pem)
    return ServingPair(cert_pem, key_pem, leaf, _digest(cert_pem, key_pem))


def _validate(cert_pem: bytes, key_pem: bytes) -> x509.Certificate:
    """The leaf certificate, if the pair parses, matches and OpenSSL accepts it as a server pair.

    Error messages never quote the key's content.
    """
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as error:
        raise CertificateError(f"the certificate does not parse: {error}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):  # message withheld: it could echo part of the key
        raise CertificateError("the key does not parse as an unencrypted PEM key") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        raise CertificateError("the key does not match the certificate")
    try:
        _load(_new_context(), ServingPair(cert_pem, key_pem, chain[0], ""))
    except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
        raise CertificateError(f"OpenSSL refused the pair: {error}") from None
    return chain[0]


def _load(context: ssl.SSLContext, pair: ServingPair) -> None:
    """`load_cert_chain` from the pair's bytes, not from paths that may have changed since."""
    with _in_memory(pair.cert_pem) as cert_path, _in_memory(pair.key_pem) as key_path:
        context.load_cert_chain(certfile=cert_path, keyfile=key_path)


@contextlib.contextmanager
def _in_memory(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open that holds `data`: an anonymous memory file, else a private one."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("outrigger-tls", os.MFD_CLOEXEC)
        try:
            _write_all(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="outrigger-tls-") as directory:  # mode 0o700
        path = os.path.join(directory, "pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        yield path


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
