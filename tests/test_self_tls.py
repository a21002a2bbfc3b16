"""`outrigger serve --tls-source self` end to end, against a real kube-apiserver.

The webhook runs for real: the installed `outrigger serve`, in subprocesses, talking through
the official `kubernetes` client to the session's etcd and kube-apiserver (tests/kube_env.py,
the `kube` fixture). Each test installs what the chart installs for self mode, rendered by the
real Helm (`helm template`): the ServiceAccount, the Role and ClusterRole and their bindings,
and the MutatingWebhookConfiguration, under a release name and in a namespace of its own, so
that no two tests share a Secret, a webhook configuration or a ClusterRole. The replicas
authenticate as that ServiceAccount with a token from the TokenRequest API: RBAC is the API
server's, with the OwnerReferencesPermissionEnforcement admission plugin on as in OpenShift, so
the chart's Role and ClusterRole are shown to be enough (and tests/test_chart.py checks that
they grant `RBAC` and nothing more).

Between the replicas and the API server sits a `Relay`, which forwards every request as it
came and records its verb, its path and the API server's status: the audit these tests read
(which calls were made, that none was refused, how often the Secret was written). It changes
nothing. Only the race test asks it to hold both replicas' first reads of the Secret until
both have arrived, the one thing that cannot be made to happen on cue otherwise; which create
wins, and the loser's 409 AlreadyExists, are the API server's.

The test's HTTPS client plays the API server calling the webhook. The serving certificate is
for the Service's DNS name (RELEASE.NAMESPACE.svc), which the real API server could only
reach through a Service with endpoints, and it refuses loopback addresses, where the replicas
listen, as endpoint IPs. So before each call the client reads the caBundle of the
MutatingWebhookConfiguration stored in the API server, trusts only that, and names the
Service's DNS name in SNI, as the API server does. The configurations installed are inert for
the session's other tests: failurePolicy Ignore, and an objectSelector that no pod matches.

One test stays on tests/fake_kube.py, the hand-written stand-in: Secret data the API server
refuses to store (not a map, not base64; `test_the_api_server_refuses_such_data` shows it),
which the webhook must nevertheless survive reading from whatever answers it.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from tests.conftest import admission_review, outrigger_executable
from tests.fake_kube import VERBS, FakeKube, fake_kube, https_server, write_kubeconfig
from tests.kube_env import ControlPlane, free_port, kubeconfig
from webhook.cluster.registration import webhook_configuration
from webhook.cluster.selftls import OWNER_KIND, REASON_ANNOTATION
from webhook.serving.authority import Action, Settings, carry_out

pytestmark = pytest.mark.kube

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "outrigger"
STARTUP_SECONDS = 40.0
GC_SECONDS = 30.0  # the garbage collector took well under a second here
# A held read waits at most this, under the client's 10 s read timeout: a lone one goes on.
HOLD_SECONDS = 8.0
# The chart's kinds that self mode's calls depend on: what each test installs.
INSTALLED = (
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
    "MutatingWebhookConfiguration",
)
WEBHOOKS = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"


def rbac(namespace: str, fullname: str) -> set[tuple[str, str]]:
    """The (verb, API path) pairs self mode needs for a release: what the chart's Role and
    ClusterRole must grant, and nothing more. `delete` on the Secret is never called: the
    OwnerReferencesPermissionEnforcement admission plugin (on by default in OpenShift, and in
    this API server) lets only who may delete an object change its ownerReferences
    (`test_without_delete_the_owner_reference_is_refused_and_said`)."""
    secrets = f"/api/v1/namespaces/{namespace}/secrets"
    secret = f"{secrets}/{fullname}-self-tls"
    webhook = f"{WEBHOOKS}/{fullname}"
    return {
        ("get", secret),
        ("update", secret),
        ("delete", secret),
        ("create", secrets),
        ("get", webhook),
        ("patch", webhook),
    }


# The release tests/test_chart.py renders (outrigger in outrigger-system), and the fake's.
NAMESPACE = "outrigger-system"
RBAC = rbac(NAMESPACE, "outrigger")


# Where the replicas run ------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """What the replicas are given (namespace, release name, kubeconfig), and how the test
    reads an object back from the API server they use (None: absent)."""

    namespace: str
    name: str  # the chart's full name: Service, webhook configuration, Secret NAME-self-tls
    kubeconfig: Path
    read: Callable[[str], dict[str, Any] | None]

    @property
    def secret(self) -> str:
        return f"{self.name}-self-tls"

    @property
    def secrets_path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/secrets"

    @property
    def secret_path(self) -> str:
        return f"{self.secrets_path}/{self.secret}"

    @property
    def webhook_path(self) -> str:
        return f"{WEBHOOKS}/{self.name}"

    @property
    def service_dns(self) -> str:
        return f"{self.name}.{self.namespace}.svc"


@dataclass
class Release:
    """What the chart installs for self mode, for one test, in the real API server."""

    kube: ControlPlane
    namespace: str
    name: str
    docs: dict[str, dict[str, Any]]  # the rendered objects, by kind
    token: str = ""

    def read(self, path: str) -> dict[str, Any] | None:
        status, answer = self.kube.request("GET", path)
        if status == 404:
            return None
        assert status == 200, (path, status, answer)
        assert isinstance(answer, dict)
        return answer

    def create_webhook(self) -> str:
        """The chart's MutatingWebhookConfiguration, created; returns its uid."""
        created = self.kube.call("POST", WEBHOOKS, self.docs["MutatingWebhookConfiguration"])
        return str(created["metadata"]["uid"])

    def delete_webhook(self) -> None:
        """As `helm uninstall` does, through kubectl: background propagation."""
        self.kube.kubectl("delete", "mutatingwebhookconfiguration", self.name)

    def remove(self) -> None:
        """The cluster-scoped objects; the namespace stays, the session's plane goes."""
        for path in (
            f"{WEBHOOKS}/{self.name}",
            f"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{self.name}",
            f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{self.name}",
        ):
            status, answer = self.kube.request("DELETE", path)
            assert status in (200, 202, 404), (path, status, answer)


def render(helm: Path, name: str, namespace: str) -> dict[str, dict[str, Any]]:
    """The chart's objects of `INSTALLED`, by kind, for release `name` in `namespace`; the
    webhook made inert for every other test of the session (no pod has that label)."""
    rendered = subprocess.run(
        [str(helm), "template", name, str(CHART), "--namespace", namespace,
         "--set", "failurePolicy=Ignore"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d and d["kind"] in INSTALLED]
    by_kind = {d["kind"]: d for d in docs}
    assert sorted(by_kind) == sorted(INSTALLED) and len(docs) == len(INSTALLED)
    for hook in by_kind["MutatingWebhookConfiguration"]["webhooks"]:
        hook["objectSelector"] = {"matchLabels": {"outrigger.dev/self-tls-test": "never"}}
    return by_kind


def without_create(role: dict[str, Any]) -> None:
    """The chart's Role without its rule that grants creating Secrets."""
    rules = [rule for rule in role["rules"] if rule["verbs"] != ["create"]]
    assert len(rules) == len(role["rules"]) - 1
    role["rules"] = rules


def without_delete(role: dict[str, Any]) -> None:
    """The chart's Role without `delete` on the Secret (its rule keeps get and update)."""
    (rule,) = [rule for rule in role["rules"] if "delete" in rule["verbs"]]
    rule["verbs"] = [verb for verb in rule["verbs"] if verb != "delete"]
    assert rule["verbs"] == ["get", "update"]


def install(
    kube: ControlPlane,
    helm: Path,
    *,
    webhook: bool = True,
    grant_create: bool = True,
    grant_delete: bool = True,
) -> Release:
    """A namespace, the chart's RBAC and (unless not `webhook`) its webhook configuration,
    and a token for its ServiceAccount."""
    namespace = kube.namespace("selftls")
    name = f"outrigger-{namespace.rsplit('-', 1)[1]}"  # contains the chart's name: the fullname
    docs = render(helm, name, namespace)
    if not grant_create:
        without_create(docs["Role"])
    if not grant_delete:
        without_delete(docs["Role"])
    release = Release(kube, namespace, name, docs)
    rbac_docs = [docs[kind] for kind in INSTALLED if kind != "MutatingWebhookConfiguration"]
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rbac_docs))
    if webhook:
        release.create_webhook()
    account = docs["ServiceAccount"]["metadata"]["name"]
    release.token = kube.service_account_token(namespace, account)
    return release


@pytest.fixture
def releases(kube: ControlPlane, helm: Path) -> Iterator[Callable[..., Release]]:
    """Installs releases (see `install`); their cluster-scoped objects go afterwards."""
    made: list[Release] = []

    def make(**options: bool) -> Release:
        made.append(install(kube, helm, **options))
        return made[-1]

    yield make
    for release in made:
        release.remove()


@pytest.fixture
def release(releases: Callable[..., Release]) -> Release:
    return releases()


# The relay -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    verb: str  # get, create, update, patch, delete
    path: str
    code: int


@dataclass
class _Hold:
    barrier: threading.Barrier
    left: int  # requests still to hold


@dataclass
class Relay:
    """Forwards each request to the real API server as it came, and records it."""

    kube: ControlPlane
    url: str = ""
    ca_file: Path = Path()
    calls: list[Call] = field(default_factory=list)
    _holds: dict[tuple[str, str], _Hold] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def hold(self, verb: str, path: str, count: int) -> None:
        """The next `count` requests (verb, path) wait for each other, HOLD_SECONDS at most."""
        barrier = threading.Barrier(count, timeout=HOLD_SECONDS)
        with self._lock:
            self._holds[(verb, path)] = _Hold(barrier, count)

    def made(self, verb: str, path: str) -> list[int]:
        """The API server's status for each request (verb, path), in order."""
        return [call.code for call in self.recorded() if (call.verb, call.path) == (verb, path)]

    def recorded(self) -> list[Call]:
        with self._lock:
            return list(self.calls)

    def forward(
        self, method: str, target: str, headers: dict[str, str], body: bytes | None
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        path = target.partition("?")[0]
        verb = VERBS.get(method, method.lower())
        self._wait_if_held(verb, path)
        context = ssl.create_default_context(cafile=str(self.kube.pki.ca))
        upstream = http.client.HTTPSConnection(
            "127.0.0.1", self.kube.port, context=context, timeout=30
        )
        try:
            upstream.request(method, target, body=body, headers=headers)
            answer = upstream.getresponse()
            result = answer.status, answer.getheaders(), answer.read()
        finally:
            upstream.close()
        with self._lock:
            self.calls.append(Call(verb, path, result[0]))
        return result

    def _wait_if_held(self, verb: str, path: str) -> None:
        with self._lock:
            hold = self._holds.get((verb, path))
            if hold is None or hold.left == 0:
                return
            hold.left -= 1
        with suppress(threading.BrokenBarrierError):  # alone after HOLD_SECONDS: it goes on
            hold.barrier.wait()


_HOP_HEADERS = {"host", "connection", "keep-alive", "transfer-encoding", "content-length"}
_OWN_HEADERS = _HOP_HEADERS | {"date", "server"}  # the relay's http.server sends its own


class _RelayHandler(BaseHTTPRequestHandler):
    server: _RelayServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects of the API server
    timeout = 60

    def _relay(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
        code, answer_headers, data = self.server.relay.forward(
            self.command, self.path, headers, body
        )
        self.send_response(code)
        for key, value in answer_headers:
            if key.lower() not in _OWN_HEADERS:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _relay

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _RelayServer(ThreadingHTTPServer):
    daemon_threads = True
    relay: Relay


@pytest.fixture
def relay(kube: ControlPlane, tmp_path: Path) -> Iterator[Relay]:
    server = _RelayServer(("127.0.0.1", 0), _RelayHandler)
    server.relay = Relay(kube)
    with https_server(tmp_path / "relay", server) as (url, ca_file):
        server.relay.url, server.relay.ca_file = url, ca_file
        yield server.relay


def site_of(release: Release, relay: Relay, directory: Path) -> Site:
    """The replicas of `release`, calling the API server through `relay` with its token."""
    directory.mkdir(parents=True, exist_ok=True)
    config = write_kubeconfig(directory, relay.url, relay.ca_file, release.token)
    return Site(release.namespace, release.name, config, release.read)


@pytest.fixture
def site(release: Release, relay: Relay, tmp_path: Path) -> Site:
    return site_of(release, relay, tmp_path / "site")


def unreachable_site(kube: ControlPlane, directory: Path) -> Site:
    """A kubeconfig whose server nothing listens on."""
    config = directory / "unreachable-kubeconfig"
    url = f"https://127.0.0.1:{free_port()}"
    config.write_text(json.dumps(kubeconfig(url, kube.pki, token="unused")))
    return Site(NAMESPACE, "outrigger", config, lambda path: None)


def assert_rbac_was_enough(relay: Relay, site: Site) -> None:
    """Nothing the replicas asked for was refused, and they asked only for what self mode
    needs (`rbac`), which the chart grants."""
    calls = relay.recorded()
    assert calls, "the replicas made no call through the relay"
    assert [c for c in calls if c.code == 403] == []
    asked = {(c.verb, c.path) for c in calls}
    assert asked <= rbac(site.namespace, site.name), asked - rbac(site.namespace, site.name)


# The replicas ----------------------------------------------------------------------------------


@dataclass
class Replica:
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start(root: Path, site: Site, name: str, *extra: str) -> Replica:
    """One `outrigger serve --tls-source self` replica, not yet waited for."""
    directory = root / name
    directory.mkdir()
    port = free_port()
    command = [outrigger_executable(), "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--cert-dir", str(directory / "tls"), "--policy-poll-seconds", "0.2"]
    command += ["--tls-source", "self", "--kubeconfig", str(site.kubeconfig)]
    command += ["--self-tls-namespace", site.namespace, "--self-tls-secret", site.secret]
    command += ["--self-tls-webhook", site.name, "--self-tls-service", site.name]
    command += ["--self-tls-sync-seconds", "0.5", *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "POD_"))}
    log = directory / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    return Replica(port, process, log)


def stop(replica: Replica) -> None:
    if replica.process.poll() is None:
        replica.process.send_signal(signal.SIGTERM)
        try:
            replica.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            replica.process.kill()
            replica.process.wait()
    assert "Traceback" not in replica.output(), replica.output()


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    started: list[Replica] = []
    yield started
    for replica in started:
        stop(replica)


# What the API server would see -----------------------------------------------------------------


def published_ca(site: Site) -> bytes:
    """The PEM CA bundle the API server would trust: the stored webhook's caBundle."""
    configuration = site.read(site.webhook_path)
    assert configuration is not None
    value = configuration["webhooks"][0]["clientConfig"].get("caBundle", "")
    return base64.b64decode(value)


def trusting(ca_pem: bytes) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=ca_pem.decode())


def served_certificate(replica: Replica, site: Site, ca_pem: bytes | None = None) -> bytes:
    """The DER certificate the replica presents to a client that trusts `ca_pem` (by default
    the published caBundle)."""
    context = trusting(published_ca(site) if ca_pem is None else ca_pem)
    with (
        socket.create_connection(("127.0.0.1", replica.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=site.service_dns) as tls,
    ):
        certificate = tls.getpeercert(binary_form=True)
    assert certificate is not None
    return certificate


def review(replica: Replica, site: Site, client: httpx.Client | None = None) -> dict[str, Any]:
    """One AdmissionReview through a fresh connection (or `client`), as the API server sends."""
    body = admission_review({"metadata": {"name": "web", "namespace": "shop"}, "spec": {
        "containers": [{"name": "app", "image": "nginx"}]}})  # fmt: skip
    url = f"https://127.0.0.1:{replica.port}/mutate"
    extensions = {"sni_hostname": site.service_dns}
    if client is not None:
        response = client.post(url, json=body, extensions=extensions)
    else:
        with httpx.Client(verify=trusting(published_ca(site)), timeout=5) as fresh:
            response = fresh.post(url, json=body, extensions=extensions)
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    return answer


def wait_serving(replica: Replica, site: Site) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if replica.process.poll() is not None:
            pytest.fail(f"serve exited with {replica.process.returncode}:\n{replica.output()}")
        try:
            if review(replica, site)["response"]["allowed"]:
                return
        except (httpx.HTTPError, ssl.SSLError, OSError, ValueError, AssertionError):
            time.sleep(0.2)  # AssertionError: no webhook configuration yet
    pytest.fail(f"serve did not answer within {STARTUP_SECONDS}s:\n{replica.output()}")


def wait_for(found: Callable[[], T], what: str, seconds: float = STARTUP_SECONDS) -> T:
    """`found()` once it is truthy, polled; fails saying `what` did not happen in time."""
    deadline = time.monotonic() + seconds
    while True:
        value = found()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {seconds:g}s")
        time.sleep(0.05)


def stored_secret(site: Site) -> dict[str, Any]:
    secret = site.read(site.secret_path)
    assert secret is not None
    return secret


def stored_secret_data(site: Site) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in stored_secret(site)["data"].items()}


def owner_uids(secret: dict[str, Any], site: Site) -> list[str]:
    """The uids the Secret's ownerReferences give for the webhook configuration."""
    references = secret["metadata"].get("ownerReferences") or []
    return [r["uid"] for r in references if (r["kind"], r["name"]) == (OWNER_KIND, site.name)]


def webhook_uid(site: Site) -> str:
    configuration = site.read(site.webhook_path)
    assert configuration is not None
    return str(configuration["metadata"]["uid"])


def der_of(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


def secret_of(site: Site, secret_type: str, data: Any, reason: str = "") -> dict[str, Any]:
    """A Secret object for the site's name, as some earlier writer left it."""
    metadata: dict[str, Any] = {"name": site.secret, "namespace": site.namespace}
    if reason:
        metadata["annotations"] = {REASON_ANNOTATION: reason}
    return {"apiVersion": "v1", "kind": "Secret", "type": secret_type, "metadata": metadata,
            "data": data}  # fmt: skip


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


# Start -----------------------------------------------------------------------------------------


def test_two_replicas_racing_agree_on_one_secret(
    tmp_path: Path, site: Site, relay: Relay, replicas: list[Replica]
) -> None:
    """Both replicas' first reads of the Secret are held by the relay until both have arrived:
    both see 404, both create, and the API server takes one create and answers the other 409
    AlreadyExists; the loser reads the winner's Secret and serves it."""
    relay.hold("get", site.secret_path, 2)
    replicas += [start(tmp_path, site, "a"), start(tmp_path, site, "b")]
    for replica in replicas:
        wait_serving(replica, site)

    assert sorted(relay.made("create", site.secrets_path)) == [201, 409]
    assert relay.made("update", site.secret_path) == []
    secret = stored_secret(site)
    data = stored_secret_data(site)
    assert set(data) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
    assert secret["type"] == "kubernetes.io/tls"
    # Created owned by the webhook configuration, which existed.
    assert owner_uids(secret, site) == [webhook_uid(site)]
    # One CA published, one certificate served by both, the one in the Secret.
    assert published_ca(site) == data["ca.crt"]
    served = {served_certificate(replica, site) for replica in replicas}
    assert served == {der_of(data["tls.crt"])}
    assert_rbac_was_enough(relay, site)
    # The loser says so, and the key is in no log line.
    outputs = [replica.output() for replica in replicas]
    assert sum("another replica wrote Secret" in output for output in outputs) == 1
    assert all(data["tls.key"].decode().splitlines()[1] not in output for output in outputs)


# Renewal ---------------------------------------------------------------------------------------


def _hammer(replica: Replica, site: Site, seconds: float) -> tuple[int, list[str], set[bytes]]:
    """Reviews for `seconds`: fresh connections on one thread, one keep-alive client on
    another. Returns (answered, failures, certificates seen on the fresh connections)."""
    failures: list[str] = []
    seen: set[bytes] = set()
    answered = [0, 0]
    deadline = time.monotonic() + seconds

    def fresh() -> None:
        while time.monotonic() < deadline:
            try:
                seen.add(hashlib.sha256(served_certificate(replica, site)).digest())
                assert review(replica, site)["response"]["allowed"]
                answered[0] += 1
            except Exception as error:  # every failure is counted and shown
                failures.append(f"fresh: {type(error).__name__}: {error}")
            time.sleep(0.02)

    def kept_alive() -> None:
        # Trust is fixed at connect time, as for an established API server connection.
        with httpx.Client(verify=trusting(published_ca(site)), timeout=5) as client:
            while time.monotonic() < deadline:
                try:
                    assert review(replica, site, client)["response"]["allowed"]
                    answered[1] += 1
                except Exception as error:
                    failures.append(f"keep-alive: {type(error).__name__}: {error}")
                time.sleep(0.02)

    threads = [threading.Thread(target=fresh), threading.Thread(target=kept_alive)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(answered), failures, seen


def _rotating(
    root: Path, site: Site, replicas: list[Replica], lifetimes: tuple[str, str, str]
) -> tuple[Replica, bytes, set[bytes]]:
    """A replica with short (certificate, renew-before, CA) lifetimes and a 1 s CA overlap,
    under reviews for 10 s that must all succeed. Returns it, the CA published first, and the
    certificates seen."""
    cert, renew, ca = lifetimes
    replica = start(
        root, site, "a",
        "--self-tls-cert-validity", cert, "--self-tls-renew-before", renew,
        "--self-tls-ca-validity", ca, "--self-tls-ca-overlap", "1s",
    )  # fmt: skip
    replicas.append(replica)
    wait_serving(replica, site)
    first_ca = published_ca(site)
    answered, failures, seen = _hammer(replica, site, 10.0)
    assert failures == [], failures[:5]
    assert answered > 50
    return replica, first_ca, seen


def test_renewal_while_serving_drops_nothing(
    tmp_path: Path, site: Site, relay: Relay, replicas: list[Replica]
) -> None:
    # Certificates of 6 s renewed when 4 s remain: a renewal every 2 s or so.
    replica, first_ca, seen = _rotating(tmp_path, site, replicas, ("6s", "4s", "1h"))
    assert len(seen) >= 3, "the served certificate was renewed at least twice"
    assert relay.made("update", site.secret_path).count(200) >= 2
    assert published_ca(site) == first_ca  # renewals keep the CA: no caBundle change
    assert "serving certificate reloaded" in replica.output()
    assert owner_uids(stored_secret(site), site) == [webhook_uid(site)]  # updates keep it
    assert_rbac_was_enough(relay, site)


def test_ca_rotation_while_serving_drops_nothing(
    tmp_path: Path, site: Site, relay: Relay, replicas: list[Replica]
) -> None:
    # CAs of 13 s, replaced when 6 s remain; certificates of 4 s renewed when 2 s remain.
    replica, first_ca, _ = _rotating(tmp_path, site, replicas, ("4s", "2s", "13s"))
    final_ca = published_ca(site)
    assert final_ca != first_ca
    # The served certificate now chains to a CA that the first bundle did not hold.
    newest = final_ca.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n"
    assert newest not in first_ca
    only_newest = ssl.create_default_context(cadata=newest.decode())
    with (
        socket.create_connection(("127.0.0.1", replica.port), timeout=5) as raw,
        only_newest.wrap_socket(raw, server_hostname=site.service_dns),
    ):
        pass
    assert "new-ca" in replica.output()
    assert_rbac_was_enough(relay, site)


# Repair ----------------------------------------------------------------------------------------


def test_a_deleted_secret_is_written_back_unchanged(
    tmp_path: Path, site: Site, release: Release, relay: Relay, replicas: list[Replica]
) -> None:
    replica = start(tmp_path, site, "a")
    replicas.append(replica)
    wait_serving(replica, site)
    before = stored_secret_data(site)
    release.kube.call("DELETE", site.secret_path)
    secret = wait_for(lambda: site.read(site.secret_path), "the Secret written back", 15)
    assert stored_secret_data(site) == before
    assert served_certificate(replica, site) == der_of(before["tls.crt"])
    assert "restored" in secret["metadata"]["annotations"][REASON_ANNOTATION]
    assert owner_uids(secret, site) == [webhook_uid(site)]
    assert sorted(relay.made("create", site.secrets_path)) == [201, 201]
    assert_rbac_was_enough(relay, site)


@pytest.mark.parametrize(
    ("secret_type", "data", "problem"),
    [
        ("kubernetes.io/tls", {n: b64(b"not PEM") for n in ("ca.crt", "ca.key", "tls.crt",
         "tls.key")}, "a certificate does not parse as PEM"),
        ("kubernetes.io/tls", {"tls.crt": b64(b"x"), "tls.key": b64(b"y")},
         "missing ca.crt, ca.key"),
        ("Opaque", {}, "missing ca.crt, ca.key, tls.crt, tls.key"),
    ],
    ids=["garbage", "half", "opaque-empty"],
)  # fmt: skip
def test_a_spoiled_secret_at_start_is_replaced(
    tmp_path: Path,
    site: Site,
    release: Release,
    relay: Relay,
    replicas: list[Replica],
    secret_type: str,
    data: dict[str, str],
    problem: str,
) -> None:
    release.kube.call("POST", site.secrets_path, secret_of(site, secret_type, data))
    replica = start(tmp_path, site, "a")
    replicas.append(replica)
    wait_serving(replica, site)
    assert relay.made("update", site.secret_path) == [200]  # one write: bundle and owner
    assert set(stored_secret_data(site)) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
    secret = stored_secret(site)
    assert secret["type"] == secret_type  # immutable: kept
    assert f"(stored: {problem})" in secret["metadata"]["annotations"][REASON_ANNOTATION]
    assert owner_uids(secret, site) == [webhook_uid(site)]
    assert_rbac_was_enough(relay, site)


UNSTORABLE = [["not", "a", "map"], {"tls.crt": "bm90IGEgY2VydA==", "tls.key": "!!"}, {}]


def test_the_api_server_refuses_such_data(kube: ControlPlane) -> None:
    """Why `test_unstorable_data_is_replaced_all_the_same` runs on the fake: the API server
    does not store a Secret whose data is not a map of base64, nor a TLS Secret lacking its
    keys; the webhook only meets such data from something else answering in its place."""
    namespace = kube.namespace("selftls")
    path = f"/api/v1/namespaces/{namespace}/secrets"
    for data in UNSTORABLE:
        status, answer = kube.request("POST", path, {
            "metadata": {"name": "outrigger-self-tls"}, "type": "kubernetes.io/tls",
            "data": data})  # fmt: skip
        assert status in (400, 422), (data, status, answer)
        assert kube.request("GET", f"{path}/outrigger-self-tls")[0] == 404


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeKube]:
    """tests/fake_kube.py with the chart's webhook configuration and its RBAC emulated."""
    with fake_kube(tmp_path / "fake") as api:
        configuration = webhook_configuration(namespace=NAMESPACE, ca_bundle="unused")
        del configuration["webhooks"][0]["clientConfig"]["caBundle"]  # as the chart renders it
        api.put(f"{WEBHOOKS}/outrigger", configuration)
        api.allow = set(RBAC)
        yield api


@pytest.mark.parametrize("data", UNSTORABLE, ids=["data-a-list", "not-base64", "tls-empty"])
def test_unstorable_data_is_replaced_all_the_same(
    tmp_path: Path, fake: FakeKube, replicas: list[Replica], data: Any
) -> None:
    """On tests/fake_kube.py: the real API server refuses to store this data (see
    `test_the_api_server_refuses_such_data`), so only a stand-in can answer with it."""
    site = Site(NAMESPACE, "outrigger", write_kubeconfig(tmp_path, fake.url, fake.ca_file),
                fake.get)  # fmt: skip
    fake.put(site.secret_path, secret_of(site, "kubernetes.io/tls", data))
    replica = start(tmp_path, site, "a")
    replicas.append(replica)
    wait_serving(replica, site)
    assert [r.code for r in fake.made("update", site.secret_path)] == [200]
    assert set(stored_secret_data(site)) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
    reason = stored_secret(site)["metadata"]["annotations"][REASON_ANNOTATION]
    assert "(stored: " in reason


# The webhook configuration, and the Secret's owner ---------------------------------------------


def test_a_missing_webhook_configuration_is_published_once_it_exists(
    tmp_path: Path, releases: Callable[..., Release], relay: Relay, replicas: list[Replica]
) -> None:
    """At install Helm may create the configuration after the pods start: the Secret is
    created without an owner, and the ownerReference added once the configuration exists."""
    release = releases(webhook=False)
    site = site_of(release, relay, tmp_path / "site")
    # Syncs every minute, but an unpublished round is retried within 5 s.
    replica = start(tmp_path, site, "a", "--self-tls-sync-seconds", "60")
    replicas.append(replica)
    wait_for(lambda: "does not exist; not published" in replica.output(), "unpublished")
    unowned = stored_secret(site)
    assert "ownerReferences" not in unowned["metadata"]
    uid = release.create_webhook()  # e.g. applied by Helm just after the Deployment
    published_at = time.monotonic()
    wait_serving(replica, site)
    assert time.monotonic() - published_at < 15
    assert published_ca(site) == stored_secret_data(site)["ca.crt"]
    owned = stored_secret(site)
    assert owner_uids(owned, site) == [uid]  # set in the round that published
    assert owned["data"] == unowned["data"]
    assert relay.made("update", site.secret_path) == [200]
    assert "now belongs to mutatingwebhookconfiguration" in replica.output()
    assert_rbac_was_enough(relay, site)


def test_a_secret_of_an_older_version_gets_an_owner_and_keeps_its_bundle(
    tmp_path: Path, site: Site, release: Release, relay: Relay, replicas: list[Replica]
) -> None:
    """Before the ownerReference, uninstalling left the Secret behind; an upgrade adds it."""
    names = (site.name, f"{site.name}.{site.namespace}", site.service_dns)
    now = datetime.datetime.now(datetime.UTC)
    bundle = carry_out(Action.NEW_ALL, None, Settings(names), now)
    data = {name: b64(value) for name, value in bundle.data().items()}
    older = secret_of(site, "kubernetes.io/tls", data, reason="no usable certificate is stored")
    release.kube.call("POST", site.secrets_path, older)
    replica = start(tmp_path, site, "a")
    replicas.append(replica)
    wait_serving(replica, site)
    secret = stored_secret(site)
    assert owner_uids(secret, site) == [webhook_uid(site)]
    assert secret["data"] == data
    assert served_certificate(replica, site) == der_of(bundle.data()["tls.crt"])
    annotations = secret["metadata"]["annotations"]
    assert annotations[REASON_ANNOTATION] == "no usable certificate is stored"  # not rewritten
    assert relay.made("update", site.secret_path) == [200]
    assert relay.made("create", site.secrets_path) == []
    assert_rbac_was_enough(relay, site)


def test_without_delete_the_owner_reference_is_refused_and_said(
    tmp_path: Path, releases: Callable[..., Release], relay: Relay, replicas: list[Replica]
) -> None:
    """Why the chart's Role grants `delete` on the Secret, which is never called: with the
    OwnerReferencesPermissionEnforcement admission plugin, only who may delete an object may
    change its ownerReferences. Without it the Secret is created (unowned: the configuration
    does not exist yet), but the update that adds the owner once it exists is refused, every
    round. The replica says so (what to grant) and goes on: the certificate is served and its
    CA published all the same, only an uninstall would leave the Secret behind."""
    release = releases(webhook=False, grant_delete=False)
    site = site_of(release, relay, tmp_path / "site")
    replica = start(tmp_path, site, "a")
    replicas.append(replica)
    wait_for(lambda: "does not exist; not published" in replica.output(), "unpublished")
    unowned = stored_secret(site)
    assert "ownerReferences" not in unowned["metadata"]
    release.create_webhook()
    refused = (
        f"cannot update Secret {site.namespace}/{site.secret}: 403 Forbidden: "
        f'secrets "{site.secret}" is forbidden: '
        "cannot set an ownerRef on a resource you can't delete"
    )
    wait_for(lambda: replica.output().count(refused) >= 3, "three refused rounds")

    assert replica.process.poll() is None
    lines = [line for line in replica.output().splitlines() if refused in line]
    assert all(f" WARNING outrigger.selftls {refused}" in line for line in lines), lines
    assert all("the Secret stays without its owner" in line for line in lines), lines
    assert all(line.endswith("grant delete on it, as the chart's Role does") for line in lines)
    updates = relay.made("update", site.secret_path)
    assert len(updates) >= 3 and set(updates) == {403}
    assert {(c.verb, c.path) for c in relay.recorded() if c.code == 403} == {
        ("update", site.secret_path)
    }
    assert stored_secret(site) == unowned  # not written
    data = stored_secret_data(site)
    assert served_certificate(replica, site, data["ca.crt"]) == der_of(data["tls.crt"])
    wait_for(lambda: published_ca(site) == data["ca.crt"], "the CA published")


def test_deleting_the_webhook_configuration_deletes_the_secret(
    kube_controllers: ControlPlane,
    tmp_path: Path,
    site: Site,
    release: Release,
    relay: Relay,
    replicas: list[Replica],
) -> None:
    """What `helm uninstall` does: the configuration goes, and the garbage collector takes
    the Secret with it. The replica, still running, does not write it back while no
    configuration exists; a new one (another uid) gets it back, from the replica's memory."""
    replica = start(tmp_path, site, "a")
    replicas.append(replica)
    wait_serving(replica, site)
    before, ca = stored_secret_data(site), published_ca(site)
    first_uid = webhook_uid(site)
    release.delete_webhook()
    wait_for(lambda: site.read(site.secret_path) is None, "the Secret collected", GC_SECONDS)
    # Three rounds of the replica (0.5 s apart) saw it gone and left it so.
    held = "was deleted with mutatingwebhookconfiguration"
    wait_for(lambda: replica.output().count(held) >= 3, "the replica's rounds")
    assert site.read(site.secret_path) is None
    assert relay.made("create", site.secrets_path) == [201]
    assert served_certificate(replica, site, ca) == der_of(before["tls.crt"])

    second_uid = release.create_webhook()
    assert second_uid != first_uid
    secret = wait_for(lambda: site.read(site.secret_path), "the Secret written back")
    assert owner_uids(secret, site) == [second_uid]
    assert stored_secret_data(site) == before
    wait_serving(replica, site)  # and published into the new configuration
    assert published_ca(site) == before["ca.crt"]
    assert_rbac_was_enough(relay, site)


def test_a_recreated_webhook_configuration_owns_the_secret(
    kube_controllers: ControlPlane,
    tmp_path: Path,
    site: Site,
    release: Release,
    relay: Relay,
    replicas: list[Replica],
) -> None:
    """The configuration deleted and created again at once (a quick reinstall): the Secret's
    ownerReference names a uid that no longer exists. Either the replica moves it to the new
    uid before the garbage collector looks, or the collector deletes the Secret and the
    replica writes it back owned by the new one: which one is the collector's timing, and
    both converge on the same bundle, owned by the new configuration, and kept."""
    replica = start(tmp_path, site, "a")
    replicas.append(replica)
    wait_serving(replica, site)
    before = stored_secret_data(site)
    release.delete_webhook()
    uid = release.create_webhook()

    def converged() -> dict[str, Any] | None:
        secret = site.read(site.secret_path)
        return secret if secret is not None and owner_uids(secret, site) == [uid] else None

    secret = wait_for(converged, "the Secret owned by the new configuration", GC_SECONDS)
    assert stored_secret_data(site) == before
    # Four more rounds later it is the same object: the collector leaves it alone.
    reads = len(relay.made("get", site.secret_path))
    wait_for(lambda: len(relay.made("get", site.secret_path)) >= reads + 4, "four rounds")
    assert stored_secret(site)["metadata"]["uid"] == secret["metadata"]["uid"]
    wait_serving(replica, site)
    assert published_ca(site) == before["ca.crt"]
    assert_rbac_was_enough(relay, site)


# Failures --------------------------------------------------------------------------------------


def _failed_start(replica: Replica) -> str:
    assert replica.process.wait(timeout=60) == 1
    output = replica.output()
    assert "Traceback" not in output, output
    return output.strip().splitlines()[-1]


def test_an_unreachable_api_server_fails_the_start_with_a_message(
    tmp_path: Path, kube: ControlPlane
) -> None:
    site = unreachable_site(kube, tmp_path)
    replica = start(tmp_path, site, "a", "--api-startup-seconds", "2")
    line = _failed_start(replica)
    assert line.startswith("outrigger: cannot read mutatingwebhookconfiguration outrigger: ")
    assert "API server unreachable" in line and "gave up after 2s" in line


def test_a_role_without_create_fails_the_start_naming_it(
    tmp_path: Path, releases: Callable[..., Release], relay: Relay
) -> None:
    release = releases(grant_create=False)
    site = site_of(release, relay, tmp_path / "site")
    replica = start(tmp_path, site, "a", "--api-startup-seconds", "1")
    line = _failed_start(replica)
    assert f"cannot create Secret {site.namespace}/{site.secret}: 403 Forbidden" in line
    account = f"system:serviceaccount:{site.namespace}:{site.name}"
    assert f'User "{account}" cannot create resource "secrets"' in line  # the API server's
    assert set(relay.made("create", site.secrets_path)) == {403}


def test_self_mode_options_are_checked(tmp_path: Path, kube: ControlPlane) -> None:
    replica = start(tmp_path, unreachable_site(kube, tmp_path), "a", "--self-tls-renew-before",
                    "91d")  # fmt: skip
    assert replica.process.wait(timeout=60) == 2
    assert "renewal window" in replica.output()
    assert "Traceback" not in replica.output()
