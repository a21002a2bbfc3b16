"""A stand-in for the Kubernetes API server, kept only for what the real one cannot be made
to do on cue.

The tests of code that talks to the API server run against a real etcd and kube-apiserver
(tests/kube_env.py, the `kube` fixture). This hand-written server remains for the few cases
where a real one will not answer as the test needs, each said in the test's docstring:

- tests/test_self_tls.py, `test_unstorable_data_is_replaced_all_the_same`: a Secret whose data
  is not a map, not base64, or a TLS Secret without its keys. The real API server refuses to
  store such data (`test_the_api_server_refuses_such_data` shows it), yet the webhook must
  survive reading it from whatever answers in its place;
- tests/test_policy_watch.py, `test_bookmarks_keep_a_renewed_watch_from_expiring`: a
  resourceVersion saved from a bookmark that then expires. The real watch cache ignores etcd
  compaction and keeps every event younger than 75 s, and an API server that starts anew
  expires every earlier resourceVersion, bookmarked or not;
- tests/test_policy_watch.py, `test_watches_that_end_at_once_are_not_renewed_in_a_hot_loop`:
  watch streams that end as soon as they open. The real server keeps a watch open for the
  timeoutSeconds asked; only a misbehaving server or proxy ends every stream at once.

Its helpers serve other tests too, without the stand-in: `https_server` runs any
`ThreadingHTTPServer` over TLS (the relay in tests/test_self_tls.py, another mutating webhook
in tests/test_kube_admission.py, with `send_json`), and `write_kubeconfig` writes a token
kubeconfig (the relay's in tests/test_self_tls.py, the unreachable cluster of
tests/test_audit.py, and the stand-in's own).

It is a local HTTPS server (`http.server`, TLS on 127.0.0.1, certificate from
`webhook.serving.certs`) that keeps objects by path and answers the way the API server does
for the calls Outrigger makes:

- GET an object: 200 with it, or 404 with a NotFound Status;
- POST to a collection: 201 with the object stored (resourceVersion, uid, creationTimestamp),
  or 409 AlreadyExists when that name exists;
- PUT an object: 200, or 409 Conflict when the body's resourceVersion is not the stored one,
  or 404;
- PATCH an object with `application/json-patch+json` (applied with the `jsonpatch` library; a
  failed `test` or path is a 422 Invalid, as the API server answers);
- every write gets a new resourceVersion from one cluster-wide counter;
- GET a collection with `fieldSelector=metadata.name=NAME`: a List holding that object, with
  the collection's current resourceVersion;
- the same with `watch=true`: a chunked stream of watch events, one JSON object per line, for
  the changes after the `resourceVersion` asked for (ADDED, MODIFIED, DELETED, from a history
  of every write), then each new one as it happens; BOOKMARK events every `bookmark_seconds`
  when `allowWatchBookmarks=true`; the stream ends after `timeoutSeconds` (or
  `max_watch_seconds`, or `end_watches()`); a resourceVersion older than the history kept
  (`compact()`) gets an ERROR event with a 410 Expired Status, as etcd compaction causes.

`allow` emulates RBAC: when set, a request whose (verb, path) matches none of its entries gets
403 Forbidden (a list or watch with a `metadata.name` field selector is checked as
(list|watch, COLLECTION/NAME), as the API server authorizes it by resourceNames). `hold` makes
the first requests matching a (verb, path) wait until that many have arrived, and
`pause_watches` holds new watches back (no test uses either now: the race tests run on the real
server). Every request is recorded. What is NOT emulated: admission, validation, field
managers, label selectors, watches on collections without a name selector.
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jsonpatch
import yaml

from webhook.serving.certs import write_certificates

TOKEN = "fake-api-token-0123456789"
VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


@dataclass(frozen=True)
class Change:
    version: int
    kind: str  # ADDED, MODIFIED, DELETED
    path: str
    obj: dict[str, Any]


@dataclass
class Request:
    verb: str  # get, list, watch, create, update, patch, delete
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
    history: list[Change] = field(default_factory=list)
    compacted: int = 0  # watches from a resourceVersion below this get 410
    bookmark_seconds: float | None = 1.0  # None: no bookmarks even when asked for
    max_watch_seconds: float = 300.0
    watches_paused: bool = False  # new watches wait while True
    _version: int = 100
    _holds: dict[tuple[str, str], threading.Barrier] = field(default_factory=dict)
    _watch_epoch: int = 0  # end_watches() moves it: open streams end

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def put(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Store `obj` at `path` as the API server would (a new resourceVersion)."""
        with self.lock:
            return self._store(path, obj)

    def get(self, path: str) -> dict[str, Any] | None:
        with self.lock:
            return self.objects.get(path)

    def delete(self, path: str) -> None:
        with self.lock:
            obj = self.objects.pop(path, None)
            if obj is not None:
                self._version += 1
                self._record("DELETED", path, obj)

    def compact(self) -> int:
        """Forget the history up to now (etcd compaction); returns the current version."""
        with self.lock:
            self.compacted = self._version
            self.history.clear()
            return self._version

    def end_watches(self) -> None:
        """End every open watch stream (a timeout, an API server restart)."""
        with self.lock:
            self._watch_epoch += 1
            self.changed.notify_all()

    def pause_watches(self, paused: bool) -> None:
        with self.lock:
            self.watches_paused = paused
            self.changed.notify_all()

    def hold(self, verb: str, path: str, count: int, timeout: float = 20.0) -> None:
        """The first `count` requests (verb, path) wait for each other (up to `timeout`)."""
        self._holds[(verb, path)] = threading.Barrier(count, timeout=timeout)

    def made(self, verb: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.verb == verb and r.path == path]

    def _store(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        self._version += 1
        kind = "MODIFIED" if path in self.objects else "ADDED"
        previous = self.objects.get(path, {}).get("metadata", {})
        metadata = {
            **obj.get("metadata", {}),
            "resourceVersion": str(self._version),
            "uid": previous.get("uid", f"uid-{self._version}"),
            "creationTimestamp": previous.get("creationTimestamp", "2026-12-01T00:00:00Z"),
        }
        stored = {**obj, "metadata": metadata}
        self.objects[path] = stored
        self._record(kind, path, stored)
        return stored

    def _record(self, kind: str, path: str, obj: dict[str, Any]) -> None:
        self.history.append(Change(self._version, kind, path, obj))
        self.changed.notify_all()

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
        if verb == "list":
            items = [self.objects[path]] if path in self.objects else []
            collection = path.rsplit("/", 1)[0]
            return 200, {"kind": "List", "apiVersion": "v1", "items": items,
                         "metadata": {"resourceVersion": str(self._version)},
                         "selfLink": collection}  # fmt: skip
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

    def events(self, path: str, since: int, bookmarks: bool, seconds: float) -> Iterator[Any]:
        """The watch events on `path` after version `since`, as they happen, for `seconds`.
        Collected under the lock, yielded outside it: a slow reader blocks nobody."""
        deadline = time.monotonic() + min(seconds, self.max_watch_seconds)
        with self.lock:
            while self.watches_paused:
                self.changed.wait(0.05)
            if since < self.compacted:
                message = f"too old resource version: {since} ({self.compacted})"
                expired = {"type": "ERROR", "object": status(410, "Expired", message)}
            else:
                expired = None
            epoch, seen, last_bookmark = self._watch_epoch, since, time.monotonic()
        if expired is not None:
            yield expired
            return
        while True:
            with self.lock:
                if epoch != self._watch_epoch or time.monotonic() >= deadline:
                    return
                batch = [
                    {"type": c.kind, "object": c.obj}
                    for c in self.history
                    if c.version > seen and c.path == path
                ]
                seen = self._version  # every version is in the history: all were sent
                every = self.bookmark_seconds
                if bookmarks and every is not None and time.monotonic() - last_bookmark >= every:
                    last_bookmark = time.monotonic()
                    batch.append({"type": "BOOKMARK", "object": {
                        "kind": "ConfigMap", "apiVersion": "v1",
                        "metadata": {"resourceVersion": str(self._version)}}})  # fmt: skip
                if not batch:
                    self.changed.wait(0.05)
            yield from batch


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
    protocol_version = "HTTP/1.1"  # keep-alive and chunked watch streams, as the API server

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        path, _, query = self.path.partition("?")
        headers = {key.lower(): value for key, value in self.headers.items()}
        body: Any = json.loads(raw) if raw else None
        verb = VERBS.get(self.command, self.command.lower())
        params = {key: values[-1] for key, values in parse_qs(query).items()}
        selected = params.get("fieldSelector", "")
        if verb == "get" and selected.startswith("metadata.name="):  # list or watch, by name
            verb = "watch" if params.get("watch") in ("true", "1") else "list"
            path = f"{path}/{selected.removeprefix('metadata.name=')}"
        request = Request(verb, path, query, headers, body)
        kube = self.server.kube
        with kube.lock:
            kube.requests.append(request)
        if headers.get("authorization") != f"Bearer {TOKEN}":
            code, answer = 401, status(401, "Unauthorized", "Unauthorized")
        elif verb == "watch" and (kube.allow is None or (verb, path) in kube.allow):
            request.code = 200
            self._stream(kube, path, params)
            return
        else:
            code, answer = kube.answer(verb, path, body, headers)
        request.code = code
        send_json(self, code, answer)

    def _stream(self, kube: FakeKube, path: str, params: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        since = int(params.get("resourceVersion") or 0)
        bookmarks = params.get("allowWatchBookmarks") == "true"
        seconds = float(params.get("timeoutSeconds") or 1800)
        try:
            for event in kube.events(path, since, bookmarks, seconds):
                line = json.dumps(event).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client went away
            self.close_connection = True

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
