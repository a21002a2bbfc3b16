"""Local receivers for the log-watcher's outputs, to count what the real Fluent Bit ships.

Each HTTP receiver is a `ThreadingHTTPServer` on 127.0.0.1 (a free port, a daemon thread)
that speaks just enough of one protocol to decode every record and to answer as the real
service does, so that Fluent Bit neither retries nor drops: Loki's push API, the
Elasticsearch/OpenSearch bulk API, OTLP/HTTP logs (protobuf, decoded by hand: the wire format
is small and the project then needs no opentelemetry-proto), and plain HTTP (JSON lines).
Optionally TLS (a certificate from `make_pki`) and an `Authorization` header it requires.
The forward receiver is a second real Fluent Bit (`-i forward`, `-o stdout json_lines`).

Bounded everywhere: requests are read up to MAX_BODY, waits end at their timeout, and the
fixtures that start them stop them (threads and processes) in their finalizers.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import ipaddress
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.real_fluentbit import HOW, configured_binary

MAX_BODY = 64 * 1024 * 1024
STOP_TIMEOUT = 15.0  # Fluent Bit's 5 s grace and then some
POLL = 0.05

Record = dict[str, Any]


# The binary -----------------------------------------------------------------------------


def skip_reason() -> str | None:
    """Why these tests cannot run here: the binary, found as tests/real_fluentbit.py finds
    it (they need no mount namespace, so neither root nor util-linux)."""
    binary = configured_binary()
    if binary is None:
        return HOW
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        return f"{HOW} ({binary} is not an executable file)"
    return None


class FluentBit:
    """One Fluent Bit process, its output in a file; `stop` ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        binary = configured_binary()
        assert binary is not None, HOW
        self.log = log
        self._out = log.open("wb")
        self.process = subprocess.Popen(
            [str(binary), *argv],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, as the kubelet does: Fluent Bit flushes what it holds, then exits."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        self._out.close()
        return self.process.returncode


def free_port() -> int:
    """A port free now on 127.0.0.1 (another process could take it before it is used)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(POLL)
    return condition()


# Certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    cert_file: Path
    key_file: Path


def make_pki(directory: Path, name: str = "test") -> Pki:
    """A CA and a server certificate for 127.0.0.1 and localhost, as PEM files."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca = (
        _builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (
        _builder(server_name, ca_name, key.public_key())
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    pki.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pki


def _builder(subject: x509.Name, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def basic_auth(user: str, password: str) -> str:
    """The `Authorization` header value of HTTP basic authentication."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# HTTP receivers -------------------------------------------------------------------------


@dataclass
class Received:
    """What one receiver has decoded, shared by its handler threads."""

    records: list[Record] = field(default_factory=list)
    requests: int = 0
    rejected: int = 0  # requests refused for a wrong or missing Authorization
    failing: int = 0  # authorized requests still to answer 503, as a receiver having trouble
    paths: set[str] = field(default_factory=set)
    headers: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


Decoder = Callable[[bytes], tuple[list[Record], int, str, bytes]]


class Receiver:
    """One protocol on 127.0.0.1: `decoder(body)` gives the records and the answer."""

    def __init__(
        self,
        decoder: Decoder,
        pki: Pki | None = None,
        auth: str | None = None,
        fail_first: int = 0,
    ) -> None:
        self.received = Received(failing=fail_first)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(decoder, self.received, auth))
        self.server.daemon_threads = True
        if pki is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(pki.cert_file, pki.key_file)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def records(self) -> list[Record]:
        with self.received.lock:
            return list(self.received.records)

    def wait_for(self, count: int, timeout: float) -> list[Record]:
        """The records once there are `count` (or at the timeout)."""
        wait_until(lambda: len(self.records()) >= count, timeout)
        return self.records()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(STOP_TIMEOUT)


def _handler(
    decoder: Decoder, received: Received, auth: str | None
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # Fluent Bit keeps connections alive

        def do_POST(self) -> None:
            body = self._body()
            with received.lock:
                received.requests += 1
                received.paths.add(self.path)
                received.headers.append(dict(self.headers.items()))
            if auth is not None and self.headers.get("Authorization") != auth:
                with received.lock:
                    received.rejected += 1
                self._answer(401, "text/plain", b"unauthorized")
                return
            if self._fails():
                self._answer(503, "text/plain", b"try again")
                return
            records, status, content_type, answer = decoder(body)
            with received.lock:
                received.records.extend(records)
            self._answer(status, content_type, answer)

        do_PUT = do_POST

        def _fails(self) -> bool:
            with received.lock:
                received.failing -= 1
                return received.failing >= 0

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(min(length, MAX_BODY))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            return body

        def _answer(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: the test asserts on what arrived

    return Handler


def decode_loki(body: bytes) -> tuple[list[Record], int, str, bytes]:
    """Loki's push API in JSON: each value's line is the record (line_format json); its
    stream's labels go into `_stream`. Loki answers 204."""
    records = []
    for stream in json.loads(body)["streams"]:
        for _timestamp, line in stream["values"]:
            records.append({**json.loads(line), "_stream": stream["stream"]})
    return records, 204, "text/plain", b""


def decode_bulk(body: bytes) -> tuple[list[Record], int, str, bytes]:
    """The bulk API: an action line then a document line; `_index` and `_op` from the
    action. Answers as Elasticsearch does, item by item, with no errors."""
    lines = [line for line in body.split(b"\n") if line.strip()]
    records, items = [], []
    for action_line, document in zip(lines[::2], lines[1::2], strict=True):
        ((operation, meta),) = json.loads(action_line).items()
        records.append({**json.loads(document), "_index": meta.get("_index"), "_op": operation})
        items.append(
            {operation: {"_index": meta.get("_index"), "status": 201, "result": "created"}}
        )
    answer = {"took": 1, "errors": False, "items": items}
    return records, 200, "application/json", json.dumps(answer).encode()


def decode_json_lines(body: bytes) -> tuple[list[Record], int, str, bytes]:
    records = [json.loads(line) for line in body.split(b"\n") if line.strip()]
    return records, 200, "application/json", b"{}"


def decode_otlp_logs(body: bytes) -> tuple[list[Record], int, str, bytes]:
    """An ExportLogsServiceRequest: each log record's body (a kvlist: the Fluent Bit record)
    with `_attributes` and `_resource`; answers an empty ExportLogsServiceResponse."""
    records = []
    for _, resource_logs in _fields(body, 1):
        resource = _attributes(b"".join(v for _, v in _fields(resource_logs, 1)))
        for _, scope_logs in _fields(resource_logs, 2):
            for _, log_record in _fields(scope_logs, 2):
                records.append({**_log_record(log_record), "_resource": resource})
    return records, 200, "application/x-protobuf", b""


# Protobuf, the part OTLP logs use ------------------------------------------------------------


def _varint(data: bytes, index: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[index]
        index += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, index


def _all_fields(data: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value): an int, or bytes for length-delimited and fixed."""
    index = 0
    while index < len(data):
        tag, index = _varint(data, index)
        number, wire = tag >> 3, tag & 7
        value: int | bytes
        if wire == 0:
            value, index = _varint(data, index)
        elif wire == 2:
            length, index = _varint(data, index)
            value, index = data[index : index + length], index + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, index = data[index : index + size], index + size
        else:
            raise ValueError(f"protobuf wire type {wire} is not used by OTLP")
        yield number, wire, value


def _fields(data: bytes, number: int) -> Iterator[tuple[int, Any]]:
    return ((wire, value) for n, wire, value in _all_fields(data) if n == number)


def _any_value(data: bytes) -> Any:
    for number, _wire, value in _all_fields(data):
        match number:
            case 1:
                return value.decode()
            case 2:
                return bool(value)
            case 3:
                return value - (1 << 64) if value >= 1 << 63 else value
            case 4:
                return struct.unpack("<d", value)[0]
            case 5:
                return [_any_value(item) for _, item in _fields(value, 1)]
            case 6:
                return _attributes(value)
            case 7:
                return value
    return None


def _attributes(data: bytes) -> dict[str, Any]:
    """The KeyValues in field 1 of `data` (a Resource or a KeyValueList)."""
    return dict(_key_value(pair) for _, pair in _fields(data, 1))


def _key_value(pair: bytes) -> tuple[str, Any]:
    key = next((v.decode() for _, v in _fields(pair, 1)), "")
    return key, next((_any_value(v) for _, v in _fields(pair, 2)), None)


def _log_record(data: bytes) -> Record:
    body = next((_any_value(v) for _, v in _fields(data, 5)), None)
    record: Record = dict(body) if isinstance(body, dict) else {"_body": body}
    record["_attributes"] = dict(_key_value(pair) for _, pair in _fields(data, 6))
    return record


# The forward receiver: a second Fluent Bit ---------------------------------------------------


class ForwardReceiver:
    """A real Fluent Bit listening with `in_forward`, printing what it gets as JSON lines."""

    def __init__(
        self, directory: Path, shared_key: str | None = None, pki: Pki | None = None
    ) -> None:
        self.port = free_port()
        argv = ["-f", "1", "-i", "forward", "-p", "listen=127.0.0.1", "-p", f"port={self.port}"]
        if shared_key is not None:
            argv += ["-p", f"shared_key={shared_key}", "-p", "self_hostname=receiver"]
        if pki is not None:
            argv += ["-p", "tls=on", "-p", f"tls.crt_file={pki.cert_file}"]
            argv += ["-p", f"tls.key_file={pki.key_file}"]
        argv += ["-o", "stdout", "-m", "*", "-p", "format=json_lines"]
        self.fluentbit = FluentBit(argv, {}, directory / "forward-receiver.log")
        if not wait_until(self._listening, STOP_TIMEOUT):
            self.fluentbit.stop()
            raise AssertionError(f"the forward receiver did not listen:\n{self.fluentbit.text()}")

    def _listening(self) -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def records(self) -> list[Record]:
        complete = self.fluentbit.text().rpartition("\n")[0]  # not a line still being written
        return [json.loads(line) for line in complete.splitlines() if line.startswith("{")]

    def wait_for(self, count: int, timeout: float) -> list[Record]:
        wait_until(lambda: len(self.records()) >= count, timeout)
        return self.records()

    def stop(self) -> None:
        self.fluentbit.stop()
