"""Reloading the serving certificate: `ServingCertificate` in process, then the real server.

The end-to-end test mounts the pair the way kubelet mounts a kubernetes.io/tls Secret
(timestamped directory, `..data` symlink swapped atomically, `tls.crt`/`tls.key` symlinks
through it), starts `outrigger serve` on it and rotates the pair under load, each request on a
new connection (so a new handshake) from a client trusting the old, the new and a third CA.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import admission_review, outrigger_executable
from tests.test_https import Server, _free_port, _stop, _wait_until_healthy, applied, pod
from tests.test_reload import WAIT_SECONDS, BackgroundLoad
from webhook.serving.certs import CertificatePaths, write_certificates
from webhook.serving.metrics import Metrics
from webhook.serving.tls import CertificateError, ServingCertificate

POLL_SECONDS = 0.2
EXPIRY = "outrigger_serving_certificate_expiry_timestamp_seconds"
REJECTED = "rejected a new serving certificate"
RELOADED = "serving certificate reloaded"


def make_pair(directory: Path, days: int) -> CertificatePaths:
    """A new CA and a serving certificate for localhost and 127.0.0.1 signed by it."""
    return write_certificates(directory, ["localhost"], ["127.0.0.1"], days=days)


def der(paths: CertificatePaths) -> bytes:
    cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


def not_after(paths: CertificatePaths) -> float:
    return x509.load_pem_x509_certificate(paths.cert.read_bytes()).not_valid_after_utc.timestamp()


def secret_files(
    paths: CertificatePaths, key_of: CertificatePaths | None = None
) -> dict[str, bytes]:
    """A kubernetes.io/tls Secret's files; `key_of` another pair makes a mismatched one."""
    return {
        "ca.crt": paths.ca_cert.read_bytes(),
        "tls.crt": paths.cert.read_bytes(),
        "tls.key": (key_of or paths).key.read_bytes(),
    }


class SecretVolume:
    """A directory laid out and updated as kubelet's atomic writer does for a Secret volume."""

    def __init__(self, root: Path, files: dict[str, bytes]) -> None:
        self.root = root
        self._versions = itertools.count()
        root.mkdir()
        (root / "..data").symlink_to(self._write_version(files))
        for name in files:
            (root / name).symlink_to(Path("..data") / name)

    def update(self, files: dict[str, bytes]) -> None:
        """A new timestamped directory, `..data_tmp` pointing at it renamed over `..data`."""
        old = self.root / os.readlink(self.root / "..data")
        staging = self.root / "..data_tmp"
        staging.symlink_to(self._write_version(files))
        os.rename(staging, self.root / "..data")
        shutil.rmtree(old)

    def _write_version(self, files: dict[str, bytes]) -> str:
        name = f"..2026_11_27_10_00_{next(self._versions):02d}.{uuid.uuid4().int % 10**9}"
        (self.root / name).mkdir()
        for file, content in files.items():
            (self.root / name / file).write_bytes(content)
        return name


# ServingCertificate in process ------------------------------------------------------------------


def presented(context: ssl.SSLContext, trust: bytes) -> bytes:
    """The certificate a handshake with a server using `context` presents, in memory."""
    client = ssl.create_default_context(cadata=trust.decode())
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    server = context.wrap_bio(server_in, server_out, server_side=True)
    tls = client.wrap_bio(client_in, client_out, server_hostname="localhost")
    for _ in range(10):
        for side in (tls, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        server_in.write(client_out.read())
        client_in.write(server_out.read())
    peer = tls.getpeercert(binary_form=True)
    assert peer is not None
    return peer


def expiry(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value(EXPIRY)


@pytest.fixture()
def pairs(tmp_path: Path) -> list[CertificatePaths]:
    return [make_pair(tmp_path / f"pair{number}", days=30 + number) for number in range(3)]


def test_a_new_pair_is_applied_to_the_same_context(
    tmp_path: Path, pairs: list[CertificatePaths], caplog: pytest.LogCaptureFixture
) -> None:
    live = tmp_path / "live"
    shutil.copytree(pairs[0].cert.parent, live)
    metrics = Metrics()
    serving = ServingCertificate(live / "tls.crt", live / "tls.key", metrics=metrics)
    context = serving.ssl_context()
    trust = b"".join(pair.ca_cert.read_bytes() for pair in pairs)
    assert presented(context, trust) == der(pairs[0])
    assert expiry(metrics) == not_after(pairs[0])
    assert not serving.check()

    with caplog.at_level(logging.INFO, logger="outrigger.tls"):
        shutil.copy(pairs[1].key, live / "tls.key")
        shutil.copy(pairs[1].cert, live / "tls.crt")
        assert serving.check()
    assert serving.ssl_context() is context
    assert presented(context, trust) == der(pairs[1])
    assert expiry(metrics) == not_after(pairs[1])
    (record,) = caplog.records
    assert record.levelno == logging.INFO and RELOADED in record.message
    assert "CN=localhost" in record.message and "127.0.0.1" in record.message
    assert serving.pair.not_after.isoformat() in record.message
    assert "PRIVATE KEY" not in record.message


def test_a_half_written_pair_is_rejected_once_then_completed(
    tmp_path: Path, pairs: list[CertificatePaths], caplog: pytest.LogCaptureFixture
) -> None:
    live = tmp_path / "live"
    shutil.copytree(pairs[0].cert.parent, live)
    metrics = Metrics()
    serving = ServingCertificate(live / "tls.crt", live / "tls.key", metrics=metrics)
    trust = b"".join(pair.ca_cert.read_bytes() for pair in pairs)
    with caplog.at_level(logging.INFO, logger="outrigger.tls"):
        shutil.copy(pairs[1].cert, live / "tls.crt")  # the key is not written yet
        for _ in range(3):
            assert not serving.check()
        assert presented(serving.ssl_context(), trust) == der(pairs[0])
        assert expiry(metrics) == not_after(pairs[0])
        (live / "tls.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\ntruncat")
        assert not serving.check()
        (live / "tls.key").unlink()
        assert not serving.check()
        assert not serving.check()
        assert presented(serving.ssl_context(), trust) == der(pairs[0])
        shutil.copy(pairs[1].cert, live / "tls.crt")
        shutil.copy(pairs[1].key, live / "tls.key")
        assert serving.check()
    assert presented(serving.ssl_context(), trust) == der(pairs[1])
    assert expiry(metrics) == not_after(pairs[1])
    errors = [r.message for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3, errors  # once per bad content, not once per check
    assert "does not match" in errors[0]
    assert "does not parse" in errors[1]
    assert "cannot read" in errors[2]
    key_body = pairs[1].key.read_text().splitlines()[1]
    assert not any(key_body in r.message or "PRIVATE" in r.message for r in caplog.records)


def test_a_bad_pair_fails_the_start(tmp_path: Path, pairs: list[CertificatePaths]) -> None:
    with pytest.raises(CertificateError, match="does not match"):
        ServingCertificate(pairs[0].cert, pairs[1].key)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(pairs[0].cert, mixed / "tls.crt")
    shutil.copy(pairs[1].key, mixed / "tls.key")
    command = [outrigger_executable(), "serve", "--port", str(_free_port())]
    result = subprocess.run(
        [*command, "--cert-dir", str(mixed)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "does not match" in result.stderr and "Traceback" not in result.stderr


# End to end: the real server, rotated under load -----------------------------------------------


class HandshakeLoad(BackgroundLoad[bytes]):
    """AdmissionReviews back to back, each on a new connection, recording the peer cert."""

    name = "handshake-load"

    def __init__(self, url: str, trust: ssl.SSLContext) -> None:
        self.url = url
        self.trust = trust
        super().__init__()

    @property
    def presented(self) -> list[bytes]:
        return self.answers

    @contextlib.contextmanager
    def _session(self) -> Iterator[Callable[[], bytes]]:
        def request() -> bytes:
            with httpx.Client(base_url=self.url, verify=self.trust, timeout=10.0) as client:
                return admit(client)[1]

        yield request


def admit(client: httpx.Client) -> tuple[Any, bytes]:
    """POST a review injecting the log-watcher; the connection's local address and peer cert."""
    sent = pod({"outrigger.dev/inject": "log-watcher"})
    reply = client.post(
        "/mutate",
        content=orjson.dumps(admission_review(sent, uid=str(uuid.uuid4()))),
        headers={"content-type": "application/json"},
    )
    assert reply.status_code == 200, reply.text
    result = applied(reply.json()["response"], sent)
    assert [c["name"] for c in result["spec"]["initContainers"]] == ["log-watcher"]
    stream = reply.extensions["network_stream"]
    peer = stream.get_extra_info("ssl_object").getpeercert(True)  # _ssl object: positional
    assert isinstance(peer, bytes)
    return stream.get_extra_info("client_addr"), peer


class KeptAlive:
    """One connection opened before the rotation, used throughout: it must never change."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.address, self.peer = admit(client)
        self.requests = 1

    def use(self) -> None:
        assert admit(self.client) == (self.address, self.peer), "the kept connection changed"
        self.requests += 1


def wait_for(
    condition: Callable[[], bool], what: str, load: HandshakeLoad, kept: KeptAlive
) -> None:
    """Until `condition()`, bounded, using the kept connection meanwhile; fails on a failure."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert not load.failures, load.failures[:5]
        if time.monotonic() > deadline:
            pytest.fail(f"waited {WAIT_SECONDS}s for {what}")
        kept.use()
        time.sleep(0.02)


def scraped_expiry(url: str, trust: ssl.SSLContext) -> float:
    with httpx.Client(verify=trust, timeout=10.0) as client:
        reply = client.get(f"{url}/metrics")
    assert reply.status_code == 200
    for line in reply.text.splitlines():
        if line.startswith(f"{EXPIRY} "):
            return float(line.split()[-1])
    raise AssertionError(f"no {EXPIRY} in /metrics")


def handshake(port: int, trust: ssl.SSLContext) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        trust.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        peer = tls.getpeercert(binary_form=True)
    assert peer is not None
    return peer


@pytest.fixture()
def rotating_server(
    tmp_path: Path, pairs: list[CertificatePaths]
) -> Iterator[tuple[Server, SecretVolume]]:
    volume = SecretVolume(tmp_path / "secret", secret_files(pairs[0]))
    server = Server(port=_free_port(), cert_dir=volume.root, log=tmp_path / "serve.log")
    command = [outrigger_executable(), "serve", "--host", "127.0.0.1", "--port", str(server.port)]
    command += ["--cert-dir", str(volume.root), "--policy-poll-seconds", str(POLL_SECONDS)]
    with server.log.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        _wait_until_healthy(process, server)
        yield server, volume
    finally:
        returncode = _stop(process)
    output = server.log.read_text(errors="replace")
    assert "Traceback" not in output, output
    assert returncode in (0, -signal.SIGTERM), output


def test_certificate_rotates_under_load(
    rotating_server: tuple[Server, SecretVolume], pairs: list[CertificatePaths], tmp_path: Path
) -> None:
    server, volume = rotating_server
    old, new, third = pairs
    bundle = tmp_path / "trusted-cas.pem"
    bundle.write_bytes(b"".join(pair.ca_cert.read_bytes() for pair in pairs))
    trust = ssl.create_default_context(cafile=str(bundle))
    log = server.log

    with (
        HandshakeLoad(server.url, trust) as load,
        httpx.Client(base_url=server.url, verify=trust, timeout=10.0) as client,
    ):
        kept = KeptAlive(client)
        assert kept.peer == der(old)
        wait_for(lambda: len(load.presented) >= 10, "the first answers", load, kept)
        assert scraped_expiry(server.url, trust) == not_after(old)

        rotated_at = time.monotonic()
        volume.update(secret_files(new))
        wait_for(lambda: load.presented[-1] == der(new), "the new certificate", load, kept)
        assert time.monotonic() - rotated_at < WAIT_SECONDS
        assert handshake(server.port, trust) == der(new)
        assert scraped_expiry(server.url, trust) == not_after(new)
        for _ in range(10):
            kept.use()  # the connection from before the rotation still has the old certificate

        volume.update(secret_files(third, key_of=new))  # a certificate with the wrong key
        wait_for(lambda: REJECTED in log.read_text(), "the rejection", load, kept)
        answered, rejected_at = len(load.presented), time.monotonic()
        wait_for(
            lambda: (
                len(load.presented) >= answered + 20
                and time.monotonic() - rejected_at > 5 * POLL_SECONDS
            ),
            "answers after the rejection",
            load,
            kept,
        )
        assert set(load.presented[answered:]) == {der(new)}
        assert handshake(server.port, trust) == der(new)
        assert scraped_expiry(server.url, trust) == not_after(new)

        volume.update(secret_files(third))  # the completed rotation
        wait_for(lambda: load.presented[-1] == der(third), "the third certificate", load, kept)
        assert scraped_expiry(server.url, trust) == not_after(third)
        kept.use()

    assert not load.failures, load.failures[:5]
    assert load.seen() == [der(old), der(new), der(third)]
    assert kept.requests > 10 and kept.peer == der(old)
    output = log.read_text(errors="replace")
    assert output.count(REJECTED) == 1, output  # logged once, though polled many times
    assert "the key does not match the certificate" in output
    assert output.count(RELOADED) == 2, output
    assert "CN=localhost" in output and "notAfter" in output
    for pair in pairs:
        assert pair.key.read_text().splitlines()[1] not in output
    assert "PRIVATE KEY" not in output
