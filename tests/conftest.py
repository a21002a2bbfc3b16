"""Shared test helpers: the default policy, AdmissionReview builders, strict schema validation."""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import kubernetes_validate
import pytest
import yaml

from tests.kube_env import ControlPlane, KubeUnavailable, control_plane_session, find_assets
from webhook.core.policy import Policy, default_policy

# Kubernetes version whose OpenAPI schema every mutated object is validated against.
KUBERNETES_VERSION = "1.31.0"
# The schema of pods with pod-level resources (spec.resources: alpha in 1.32, beta and on by
# default from 1.34), which 1.31's does not know. The API server tier checks them for real.
POD_RESOURCES_VERSION = "1.34.0"
ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
T = TypeVar("T")
HELM = ROOT / ".cache" / "bin" / "helm"
FETCH_HELM = ROOT / "charts" / "fetch-helm.py"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to run the suite against compiled modules older than the sources: the
    extension, not the edited source, is what Python imports (make recompiles them)."""
    newer = stale_sources()
    if newer:
        pytest.exit(
            f"{len(newer)} source(s) changed since the hot path was compiled ({newer[0]}...): "
            "run `make .venv/.compiled` (make test does), or delete webhook/**/*.so",
            returncode=4,
        )


def stale_sources() -> list[str]:
    """The package's sources newer than its oldest compiled module (none when none is)."""
    built = [path.stat().st_mtime for path in (ROOT / "webhook").rglob("*.so")]
    if not built:
        return []
    oldest = min(built)
    sources = (ROOT / "webhook").rglob("*.py")
    return sorted(str(path.relative_to(ROOT)) for path in sources if path.stat().st_mtime > oldest)


@pytest.fixture(scope="session")
def policy() -> Policy:
    return default_policy()


def validate_strict(obj: dict[str, Any]) -> None:
    """Raise if `obj` is not valid against the Kubernetes schema (unknown fields included):
    the oldest supported version's, or for a pod that sets pod-level resources the first in
    which they are on by default."""
    pod_resources = obj.get("kind") == "Pod" and "resources" in (obj.get("spec") or {})
    version = POD_RESOURCES_VERSION if pod_resources else KUBERNETES_VERSION
    kubernetes_validate.validate(obj, version, strict=True)


def as_pod(pod: dict[str, Any]) -> dict[str, Any]:
    """A pod template or pod body as a complete Pod object, for schema validation."""
    return {"apiVersion": "v1", "kind": "Pod", **pod}


def fields(record: Any) -> dict[str, Any]:
    """A review record's fields by name (`AdmissionRequest`, `Verdict`...: plain classes,
    compared by identity), every field its constructor takes: to compare two by value."""
    return {name: _by_value(value) for name, value in _arguments(record).items()}


def _arguments(record: Any) -> dict[str, Any]:
    """What a record's constructor took, by name: its fields as they are."""
    names = inspect.signature(type(record)).parameters
    return {name: getattr(record, name) for name in names}


def _by_value(value: Any) -> Any:
    """A record held by a record (a request's `OwnerReference`) by its fields too."""
    return fields(value) if type(value).__module__.startswith("webhook.") else value


def replaced(record: T, **changes: Any) -> T:
    """A copy of a review record with `changes` (what NamedTuple's `_replace` did); the
    records it holds are kept as they are (`fields` would give them as dicts)."""
    made: T = type(record)(**{**_arguments(record), **changes})
    return made


def admission_review(
    pod: Any,
    *,
    namespace: str = "default",
    operation: str = "CREATE",
    uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002",
    kind: dict[str, str] | None = None,
    sub_resource: str | None = None,
) -> dict[str, Any]:
    """An admission.k8s.io/v1 AdmissionReview request as the API server sends it."""
    kind = kind or {"group": "", "version": "v1", "kind": "Pod"}
    request: dict[str, Any] = {
        "uid": uid,
        "kind": kind,
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": kind,
        "requestResource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": namespace,
        "operation": operation,
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
        "object": pod,
        "oldObject": None,
        "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
    }
    if sub_resource:
        request["subResource"] = sub_resource
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


def outrigger_executable() -> str:
    """The installed `outrigger` console script of the environment running the tests."""
    beside_python = Path(sys.executable).parent / "outrigger"
    found = str(beside_python) if beside_python.exists() else shutil.which("outrigger")
    if not found:
        raise RuntimeError("the outrigger entry point is not installed (pip install -e .)")
    return found


def run_against_cluster(
    command: str, home: Path, kubeconfig: Path, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`outrigger COMMAND --kubeconfig KUBECONFIG ARGS` through the entry point, with a bare
    environment (no $KUBECONFIG, HOME a test folder), as a user would run it."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home)}
    return subprocess.run(
        [outrigger_executable(), command, "--kubeconfig", str(kubeconfig), *args],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )  # fmt: skip


def largest_admissible_config() -> str:
    """An `ambassador-config` at every bound at once: the costliest review still admitted."""
    upstreams = {
        f"u{i}": {
            "address": f"u{i}.example.com:443",
            "port": 10000 + i,
            "tls": {"caSecret": f"ambassador-u{i}", "clientCertSecret": f"ambassador-c{i}"},
            "retries": {"count": 10},
            "circuitBreaker": {"maxConnections": 4294967295},
            "outlierDetection": {},
        }
        for i in range(32)
    }
    return yaml.safe_dump({"upstreams": upstreams}, default_flow_style=True, width=1 << 20)


# The real Helm -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def helm() -> Path:
    """The real Helm binary (.cache/bin/helm), fetched with charts/fetch-helm.py (as `make test`
    does first) when missing, and checked to run and be Helm 3 or 4. Never a skip: where it
    cannot be had the tests that need it FAIL, since CI must prove the chart."""
    if not (HELM.is_file() and os.access(HELM, os.X_OK)):
        fetched = subprocess.run(
            [sys.executable, str(FETCH_HELM)],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        if fetched.returncode != 0:
            pytest.fail(f"cannot fetch helm with {FETCH_HELM.name}:\n{fetched.stderr}")
    version = subprocess.run(
        [str(HELM), "version", "--short"], capture_output=True, text=True, check=False, timeout=60
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith(("v3.", "v4.")), version.stdout
    return HELM


# The real API server -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kube() -> Iterator[ControlPlane]:
    """etcd and kube-apiserver, once per session (skipped, saying how, without the binaries)."""
    try:
        find_assets()
    except KubeUnavailable as missing:
        pytest.skip(str(missing))
    yield from control_plane_session()


@pytest.fixture(scope="session")
def kube_controllers(kube: ControlPlane) -> ControlPlane:
    """The same control plane with kube-controller-manager running (GC, Deployments, Jobs)."""
    kube.start_controller_manager()
    return kube
