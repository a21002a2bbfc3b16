"""A real Kubernetes control plane for the tests, started the way controller-runtime's envtest
starts one: etcd and kube-apiserver (and kube-controller-manager on demand) on free loopback
ports, with certificates made here, torn down at the end of the pytest session.

The binaries come from the folder `OUTRIGGER_KUBE_ASSETS` names (kube-apiserver,
kube-controller-manager, kubectl; etcd from that folder or PATH): Kubernetes' release binaries,
envtest's assets, or what `../shared/k8s/install.sh` unpacks. Where it is unset, the tests that
need the API server are skipped with one line that says so.

What took finding out (checked on v1.36.2 with etcd 3.4):
- etcd 3.4 cannot answer the API server's on-demand watch-progress requests, so it is asked
  for periodic progress notifications, or the watch cache lags behind writes;
- a loopback-only API server needs `--endpoint-reconciler-type=none`, and the service-account
  key, signing key and issuer flags;
- without the controller manager nothing creates a namespace's `default` ServiceAccount, which
  the ServiceAccount admission plugin requires before any pod: `namespace()` creates it.

Beyond the default admission plugins, OwnerReferencesPermissionEnforcement is on, as OpenShift
has it: changing an object's ownerReferences takes the right to delete it.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

T = TypeVar("T")
ASSETS_VARIABLE = "OUTRIGGER_KUBE_ASSETS"
SKIP_REASON = (
    f"no Kubernetes binaries: set {ASSETS_VARIABLE} to a folder holding kube-apiserver "
    "(e.g. $(../shared/k8s/install.sh)) and install etcd to run the API-server tier"
)
START_SECONDS = 90.0  # etcd and the API server start in ~10 s here; a loaded CI takes longer
STOP_SECONDS = 20.0


class KubeUnavailable(Exception):
    """The assets are missing: the message says which and how to provide them."""


@dataclass(frozen=True)
class Assets:
    apiserver: Path
    controller_manager: Path
    kubectl: Path
    etcd: Path


def find_assets() -> Assets:
    """The binaries `OUTRIGGER_KUBE_ASSETS` points at, or KubeUnavailable saying what lacks."""
    folder = os.environ.get(ASSETS_VARIABLE)
    if not folder:
        raise KubeUnavailable(SKIP_REASON)
    root = Path(folder)
    found = {name: root / name for name in ("kube-apiserver", "kube-controller-manager", "kubectl")}
    etcd = root / "etcd" if (root / "etcd").is_file() else Path(shutil.which("etcd") or "")
    missing = [str(path) for path in (*found.values(), etcd) if not path.is_file()]
    if missing or not etcd.name:
        raise KubeUnavailable(f"{ASSETS_VARIABLE}={folder}: missing {', '.join(missing) or 'etcd'}")
    return Assets(found["kube-apiserver"], found["kube-controller-manager"], found["kubectl"], etcd)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# Certificates ---------------------------------------------------------------------------------


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    parts = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        parts.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(parts)


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _sign(
    subject: x509.Name,
    key: rsa.RSAPrivateKey,
    issuer: tuple[x509.Name, rsa.RSAPrivateKey] | None,
    extensions: Sequence[x509.ExtensionType],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(path: Path, obj: x509.Certificate | rsa.RSAPrivateKey) -> Path:
    if isinstance(obj, x509.Certificate):
        path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            obj.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return path


@dataclass(frozen=True)
class Pki:
    ca: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path


def make_pki(folder: Path) -> Pki:
    """A CA, the API server's serving pair (127.0.0.1, localhost, the `kubernetes` Service
    names), an admin client in `system:masters`, and the service-account signing key."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_name = _name("outrigger-test-ca")
    ca = _sign(ca_name, ca_key, None, [x509.BasicConstraints(ca=True, path_length=None)])
    serving_key = _key()
    sans: list[x509.GeneralName] = [
        x509.DNSName(n) for n in ("localhost", "kubernetes", "kubernetes.default.svc")
    ]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "10.0.0.1")]
    serving = _sign(
        _name("kube-apiserver"), serving_key, (ca_name, ca_key), [x509.SubjectAlternativeName(sans)]
    )
    admin_key = _key()
    admin = _sign(_name("admin", "system:masters"), admin_key, (ca_name, ca_key), [])
    return Pki(
        ca=_pem(folder / "ca.crt", ca),
        ca_key=_pem(folder / "ca.key", ca_key),
        serving_cert=_pem(folder / "apiserver.crt", serving),
        serving_key=_pem(folder / "apiserver.key", serving_key),
        admin_cert=_pem(folder / "admin.crt", admin),
        admin_key=_pem(folder / "admin.key", admin_key),
        sa_key=_pem(folder / "sa.key", _key()),
    )


def kubeconfig(url: str, pki: Pki, *, token: str | None = None) -> dict[str, Any]:
    """A kubeconfig for `url`: the admin's client certificate, or a bearer token."""
    user: dict[str, str] = (
        {"token": token}
        if token
        else {"client-certificate": str(pki.admin_cert), "client-key": str(pki.admin_key)}
    )
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "test", "cluster": {"server": url, "certificate-authority": str(pki.ca)}}
        ],
        "users": [{"name": "test", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        "current-context": "test",
    }


# Processes ------------------------------------------------------------------------------------


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=STOP_SECONDS)


def _start(name: str, argv: Sequence[str], logs: Path) -> Process:
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Process(name, popen, log)


def _wait(process: Process, ready: Any, what: str) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(
                f"{process.name} exited with {process.popen.returncode}:\n{process.tail()}"
            )
        if ready():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready within {START_SECONDS}s:\n{process.tail()}")


# The control plane ----------------------------------------------------------------------------


@dataclass
class ControlPlane:
    """A running etcd and kube-apiserver (and controller manager once asked for)."""

    assets: Assets
    folder: Path
    pki: Pki
    port: int
    etcd_url: str = ""
    processes: list[Process] = field(default_factory=list)
    apiserver: Process | None = None
    controller_manager: Process | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def kubeconfig(self) -> Path:
        return self.folder / "kubeconfig"

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        context.load_cert_chain(str(self.pki.admin_cert), str(self.pki.admin_key))
        return context

    # A small client of its own: the tests check what Outrigger's client code did, so they
    # read and write with another one.
    def request(
        self, method: str, path: str, body: Any = None, *, content_type: str = "application/json"
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, context=self.ssl_context(), timeout=30) as answer:
                return answer.status, json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as error:
            text = error.read()
            try:
                return error.code, json.loads(text)
            except ValueError:
                return error.code, text.decode(errors="replace")

    def call(self, method: str, path: str, body: Any = None, **options: Any) -> Any:
        """`request`, asserting a 2xx answer (the failure shows the API server's Status)."""
        status, answer = self.request(method, path, body, **options)
        if not 200 <= status < 300:
            raise AssertionError(f"{method} {path}: {status} {answer}")
        return answer

    def wait_for_pods(
        self, namespace: str, selector: str, count: int = 1, seconds: float = 60
    ) -> list[Any]:
        """The pods a controller made (`selector`, a label selector), once there are at least
        `count` (bounded wait)."""
        path = f"/api/v1/namespaces/{namespace}/pods?labelSelector={selector}"

        def enough() -> list[Any] | None:
            items: list[Any] = self.call("GET", path)["items"]
            return items if len(items) >= count else None

        return poll(enough, seconds, f"{count} pods {selector} in {namespace}")

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        result = subprocess.run(
            [str(self.assets.kubectl), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr}")
        return result.stdout

    def service_account_token(
        self, namespace: str, account: str, *, create: bool = False, seconds: int = 3600
    ) -> str:
        """A token of the ServiceAccount `account` from the TokenRequest API, as `kubectl
        create token` asks for one (with `create`, the account is made first if missing):
        what RBAC then allows that token is the API server's own decision."""
        accounts = f"/api/v1/namespaces/{namespace}/serviceaccounts"
        if create:
            status, answer = self.request("POST", accounts, {"metadata": {"name": account}})
            assert status in (201, 409), answer  # 409: it exists
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": seconds},
        }
        answer = self.call("POST", f"{accounts}/{account}/token", request)
        return str(answer["status"]["token"])

    def token_kubeconfig(self, directory: Path, namespace: str, account: str) -> Path:
        """DIRECTORY/ACCOUNT.kubeconfig for this API server with a token of the ServiceAccount
        `account` (made if missing; see `service_account_token`)."""
        token = self.service_account_token(namespace, account, create=True)
        written = directory / f"{account}.kubeconfig"
        written.write_text(json.dumps(kubeconfig(self.url, self.pki, token=token)))
        return written

    def namespace(self, prefix: str = "t", labels: dict[str, str] | None = None) -> str:
        """A new namespace with its `default` ServiceAccount (pods need it)."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.call(
            "POST",
            "/api/v1/namespaces",
            {"metadata": {"name": name, "labels": labels or {}}},
        )
        status, _ = self.request(
            "POST", f"/api/v1/namespaces/{name}/serviceaccounts", {"metadata": {"name": "default"}}
        )
        assert status in (201, 409), status  # 409: the controller manager made it first
        return name

    def start_controller_manager(self) -> None:
        """Deployments, ReplicaSets, Jobs, garbage collection: the controllers, once."""
        if self.controller_manager is not None:
            return
        port = free_port()
        process = _start(
            "kube-controller-manager",
            [
                str(self.assets.controller_manager),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                f"--service-account-private-key-file={self.pki.sa_key}",
                f"--root-ca-file={self.pki.ca}",
                "--use-service-account-credentials=false",
                "--controllers=*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-route,-service",
                "--concurrent-gc-syncs=5",
            ],
            self.folder / "logs",
        )
        self.processes.append(process)
        self.controller_manager = process
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE

        def healthy() -> bool:
            try:
                url = f"https://127.0.0.1:{port}/healthz"
                with urllib.request.urlopen(url, context=context, timeout=2) as answer:
                    return bool(answer.status == 200)
            except (OSError, urllib.error.URLError):
                return False

        _wait(process, healthy, "kube-controller-manager")

    def start_apiserver(self) -> None:
        """kube-apiserver on this plane's port and etcd, until ready: at start, or again after
        `kill_apiserver` (a new watch cache, beginning at etcd's current revision)."""
        if self.apiserver is not None:
            raise RuntimeError(f"kube-apiserver on {self.url} is already running")
        _start_apiserver(self, self.folder / "logs")

    def kill_apiserver(self) -> None:
        """SIGKILL the kube-apiserver, as a crash does (on SIGTERM it would wait for the open
        watches to reach their timeout), and wait for it to be gone."""
        process, self.apiserver = self.apiserver, None
        if process is None:
            return
        self.processes.remove(process)
        process.popen.kill()
        process.popen.wait(timeout=STOP_SECONDS)

    def second_apiserver(self, folder: Path) -> ControlPlane:
        """Another kube-apiserver on this plane's etcd and with its certificates, on a port of
        its own, as an HA control plane has several: one a test may kill and start again
        while this one stays up. Stop it with `kill_apiserver` (or `stop`)."""
        (folder / "logs").mkdir(parents=True, exist_ok=True)
        other = ControlPlane(self.assets, folder, self.pki, free_port(), etcd_url=self.etcd_url)
        _start_apiserver_on_a_free_port(other)
        return other

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


def poll(found: Callable[[], T | None], seconds: float, what: str) -> T:
    """What `found` returns once it is not None (or empty), asked every 0.2 s for at most
    `seconds`: the API server acts on what the tests create in the background."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        answer = found()
        if answer:
            return answer
        time.sleep(0.2)
    raise AssertionError(f"{what}: not there within {seconds:g} s")


def start_control_plane(assets: Assets, folder: Path) -> ControlPlane:
    """etcd, then kube-apiserver on free loopback ports, ready to serve."""
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pki = make_pki(folder / "pki")
    plane = ControlPlane(assets, folder, pki, free_port())
    try:
        _start_etcd(plane, logs)
        _start_apiserver_on_a_free_port(plane)
    except BaseException:
        plane.stop()
        raise
    return plane


# Tries at a port for the API server: one found free may be taken before the server binds it
# (by an outgoing connection's ephemeral port: seen once in a whole test run).
PORT_ATTEMPTS = 3


def _start_apiserver_on_a_free_port(plane: ControlPlane) -> None:
    """kube-apiserver on `plane.port`, or on another found free if that one was taken."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        plane.kubeconfig.write_text(json.dumps(kubeconfig(plane.url, plane.pki)))
        try:
            plane.start_apiserver()
            return
        except RuntimeError as error:
            if "address already in use" not in str(error) or attempt == PORT_ATTEMPTS:
                raise
            plane.kill_apiserver()  # exited already: forgotten
            plane.port = free_port()


def _start_etcd(plane: ControlPlane, logs: Path) -> None:
    client, peer = free_port(), free_port()
    plane.etcd_url = f"http://127.0.0.1:{client}"
    process = _start(
        "etcd",
        [
            str(plane.assets.etcd),
            f"--data-dir={plane.folder / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{client}",
            f"--advertise-client-urls=http://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=default=http://127.0.0.1:{peer}",
            "--unsafe-no-fsync",
            "--experimental-watch-progress-notify-interval=1s",
        ],
        logs,
    )
    plane.processes.append(process)

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{client}/health", timeout=2) as answer:
                return b'"health":"true"' in answer.read()
        except (OSError, urllib.error.URLError):
            return False

    _wait(process, healthy, "etcd")


def _start_apiserver(plane: ControlPlane, logs: Path) -> None:
    pki = plane.pki
    process = _start(
        "kube-apiserver",
        [
            str(plane.assets.apiserver),
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={plane.port}",
            f"--etcd-servers={plane.etcd_url}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki.sa_key}",
            f"--service-account-signing-key-file={pki.sa_key}",
            f"--tls-cert-file={pki.serving_cert}",
            f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca}",
            "--authorization-mode=RBAC",
            # Added to the default plugins, as OpenShift enables it.
            "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
            "--endpoint-reconciler-type=none",
            f"--cert-dir={plane.folder / 'apiserver-certs'}",
        ],
        logs,
    )
    plane.processes.append(process)
    plane.apiserver = process  # before it is ready: killable, stopped

    def ready() -> bool:
        try:
            with urllib.request.urlopen(
                plane.url + "/readyz", context=plane.ssl_context(), timeout=2
            ) as answer:
                return bool(answer.read() == b"ok")
        except (OSError, urllib.error.URLError):
            return False

    _wait(process, ready, "kube-apiserver")


def control_plane_session() -> Iterator[ControlPlane]:
    """Start once, yield, tear down: the body of the session fixture."""
    assets = find_assets()
    folder = Path(tempfile.mkdtemp(prefix="outrigger-kube-"))
    plane = start_control_plane(assets, folder)
    try:
        yield plane
    finally:
        plane.stop()
        shutil.rmtree(folder, ignore_errors=True)
