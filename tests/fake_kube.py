"""A stand-in for the Kubernetes API server, for the tests of code that talks to it.

No API server can run on these machines. This is a local HTTPS server (`http.server`, TLS on
127.0.0.1, certificate from `webhook.serving.certs`) that keeps objects by path and answers the
way the API server does for the calls Outrigger makes:

- GET an object: 200 with it, or 404 with a NotFound Status;
- POST to a collection: 201 with the object stored (resourceVersion, uid, creationTimestamp),
  or 409 AlreadyExists when that name exists;
- PUT an object: 200, or 409 Conflict when the body's resourceVersion is not the stored one,
  or 404;
- PATCH an object with `application/json-patch+json` (applied with the `jsonpatch` library; a
  failed `test` or path is a 422 Invalid, as the API server answers);
- every write gets a new resourceVersion from one cluster-wide counter.

`allow` emulates RBAC: when set, a request whose (verb, path) matches none of its entries gets
403 Forbidden, so a test proves that the Role the chart grants is enough. `hold` makes the
first requests matching a (verb, path) wait until that many have arrived: two replicas'
reads then both happen before either writes, which is the race a test wants to see. Every
request is recorded. What is NOT emulated: admission, validation, field managers, watches.
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

from webhook.serving.certs import write_certificates

TOKEN = "fake-api-token-0123456789"
VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


@dataclass
class Request:
    verb: str  # get, create, update, patch, delete
    path: str
    query: str
    headers: dict[str, str]
    body: Any
    code: int = 0


@dataclass
class FakeKube:
    url: str
    ca_file: Path
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    allow: set[tuple[str, str]] | None = None  # (verb, path); None: everything
    lock: threading.Lock = field(default_factory=threading.Lock)
    _version: int = 100
    _holds: dict[tuple[str, str], threading.Barrier] = field(default_factory=dict)

    def put(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Store `obj` at `path` as the API server would (a new resourceVersion)."""
        with self.lock:
            return self._store(path, obj)

    def get(self, path: str) -> dict[str, Any] | None:
        with self.lock:
            return self.objects.get(path)

    def delete(self, path: str) -> None:
        with self.lock:
            self.objects.pop(path, None)

    def hold(self, verb: str, path: str, count: int, timeout: float = 20.0) -> None:
        """The first `count` requests (verb, path) wait for each other (up to `timeout`)."""
        self._holds[(verb, path)] = threading.Barrier(count, timeout=timeout)

    def made(self, verb: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.verb == verb and r.path == path]

    def _store(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        self._version += 1
        previous = self.objects.get(path, {}).get("metadata", {})
        metadata = {
            **obj.get("metadata", {}),
            "resourceVersion": str(self._version),
            "uid": previous.get("uid", f"uid-{self._version}"),
            "creationTimestamp": previous.get("creationTimestamp", "2026-12-01T00:00:00Z"),
        }
        stored = {**obj, "metadata": metadata}
        self.objects[path] = stored
        return stored

    def answer(self, verb: str, path: str, body: Any, headers: dict[str, str]) -> tuple[int, Any]:
        if self.allow is not None and (verb, path) not in self.allow:
            return 403, status(403, "Forbidden", f"{verb} {path} is forbidden")
        barrier = self._holds.get((verb, path))
        if barrier is not None:
            with suppress(threading.BrokenBarrierError):  # a lone request goes on after the timeout
                barrier.wait()
        with self.lock:
            return self._answer(verb, path, body, headers)

    def _answer(self, verb: str, path: str, body: Any, headers: dict[str, str]) -> tuple[int, Any]:
        if verb == "create":
            name = (body.get("metadata") or {}).get("name", "")
            target = f"{path}/{name}"
            if target in self.objects:
                return 409, status(409, "AlreadyExists", f'"{name}" already exists')
            return 201, self._store(target, body)
        existing = self.objects.get(path)
        if existing is None:
            return 404, status(404, "NotFound", f'"{path.rsplit("/", 1)[-1]}" not found')
        if verb == "get":
            return 200, existing
        if verb == "delete":
            del self.objects[path]
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        if verb == "update":
            version = (body.get("metadata") or {}).get("resourceVersion")
            if version is not None and version != existing["metadata"]["resourceVersion"]:
                message = "the object has been modified; please apply your changes to the latest"
                return 409, status(409, "Conflict", message)
            return 200, self._store(path, body)
        if verb == "patch":
            if headers.get("content-type") != "application/json-patch+json":
                return 415, status(415, "UnsupportedMediaType", "only JSON patch is emulated")
            try:
                patched = jsonpatch.apply_patch(existing, body)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
                return 422, status(422, "Invalid", f"the patch does not apply: {error}")
            return 200, self._store(path, patched)
        return 405, status(405, "MethodNotAllowed", verb)


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    """A meta/v1 Status, the body the API server sends with an error."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def send_json(handler: BaseHTTPRequestHandler, code: int, answer: Any) -> None:
    """Answer with `answer` as JSON, as the API server does."""
    data = json.dumps(answer).encode()
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 30

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        path, _, query = self.path.partition("?")
        headers = {key.lower(): value for key, value in self.headers.items()}
        body: Any = json.loads(raw) if raw else None
        verb = VERBS.get(self.command, self.command.lower())
        request = Request(verb, path, query, headers, body)
        kube = self.server.kube
        with kube.lock:
            kube.requests.append(request)
        if headers.get("authorization") != f"Bearer {TOKEN}":
            code, answer = 401, status(401, "Unauthorized", "Unauthorized")
        else:
            code, answer = kube.answer(verb, path, body, headers)
        request.code = code
        send_json(self, code, answer)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    kube: FakeKube


@contextmanager
def https_server(directory: Path, server: ThreadingHTTPServer) -> Iterator[tuple[str, Path]]:
    """Serve `server` over TLS on its 127.0.0.1 port: (its URL, the CA file that trusts it)."""
    paths = write_certificates(directory / "fake-api-certs", ["localhost"], ["127.0.0.1"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(paths.cert, paths.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", paths.ca_cert
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextmanager
def fake_kube(directory: Path) -> Iterator[FakeKube]:
    """A running FakeKube on 127.0.0.1; stopped on exit."""
    server = _Server(("127.0.0.1", 0), _Handler)
    with https_server(directory, server) as (url, ca_file):
        server.kube = FakeKube(url, ca_file)
        yield server.kube


def write_kubeconfig(directory: Path, url: str, ca_file: Path, token: str = TOKEN) -> Path:
    """A kubeconfig for the API server at `url`, trusting `ca_file`, with a bearer token."""
    kubeconfig = directory / "kubeconfig"
    ca_data = base64.b64encode(ca_file.read_bytes()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "fake", "cluster": {"server": url, "certificate-authority-data": ca_data}}
        ],
        "users": [{"name": "webhook", "user": {"token": token}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "webhook"}}],
        "current-context": "fake",
    }
    kubeconfig.write_text(yaml.safe_dump(config), encoding="utf-8")
    return kubeconfig
