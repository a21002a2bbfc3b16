"""`outrigger register` against the real API server (the `kube` fixture: etcd and
kube-apiserver v1.36.2, see tests/kube_env.py).

The real `outrigger register` runs in a subprocess (the installed entry point, so the official
`kubernetes` client does the HTTP) with the admin's kubeconfig, or with a ServiceAccount's token
where RBAC is the point. What it did is read back with the control plane's own small client
(`kube.request`), never with the code under test. The other tools are the real ones where they
can run here: Helm installs a chart (the real helm binary, .cache/bin/helm), kubectl applies
server-side and client-side, creates and patches, so the metadata and `managedFields` that
`outrigger register` judges are those the real API server records for each.

The conflict tests run the CLI in-process (`webhook.cli.main`): a concurrent writer has to
change the object between register's read and its write, on cue, and only a hook on that read
can time it. The writer, the 409 and what survives the retry are the real server's.

Each test registers under its own `--name` and deletes it at the end. The configurations point
at a Service that does not exist, in opt-in mode: the API server calls the webhook only for
pods created in namespaces labelled outrigger.dev/injection=enabled, and no test namespace is.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import outrigger_executable, validate_strict
from tests.kube_env import ControlPlane, kubeconfig
from webhook.cli import main
from webhook.cluster.registration import webhook_configuration
from webhook.serving.certs import write_certificates

NAMESPACE = "outrigger-system"  # the webhook's Service namespace: only a name in the object
COLLECTION = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
WRITER = "example.com/concurrent-writer"  # the annotation a concurrent writer sets


# The cluster side ----------------------------------------------------------------------------


@pytest.fixture
def name(kube: ControlPlane) -> Iterator[str]:
    """A configuration name of this test's own, deleted at its end whoever made it."""
    chosen = f"outrigger-test-{uuid.uuid4().hex[:8]}"
    yield chosen
    status, answer = kube.request("DELETE", f"{COLLECTION}/{chosen}")
    assert status in (200, 404), answer


def read(kube: ControlPlane, name: str) -> dict[str, Any] | None:
    """The stored configuration, or None when the API server has none of that name."""
    status, answer = kube.request("GET", f"{COLLECTION}/{name}")
    if status == 404:
        return None
    assert status == 200, answer
    return dict(answer)


def stored(kube: ControlPlane, name: str) -> dict[str, Any]:
    found = read(kube, name)
    assert found is not None, f"{name} does not exist"
    return found


def managers(obj: dict[str, Any]) -> list[tuple[str, str]]:
    """(manager, operation) of each `managedFields` entry the API server recorded, sorted."""
    return sorted((e["manager"], e["operation"]) for e in obj["metadata"]["managedFields"])


def content(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The webhooks as written: without the `objectSelector: {}` the API server defaults."""
    webhooks = [dict(webhook) for webhook in obj["webhooks"]]
    for webhook in webhooks:
        if webhook.get("objectSelector") == {}:
            del webhook["objectSelector"]
    return webhooks


def write_change(kube: ControlPlane, name: str, value: str) -> str:
    """Another client's change (an annotation): the resourceVersion it made."""
    patch = {"metadata": {"annotations": {WRITER: value}}}
    changed = kube.call(
        "PATCH", f"{COLLECTION}/{name}", patch, content_type="application/merge-patch+json"
    )
    return str(changed["metadata"]["resourceVersion"])


# The command ---------------------------------------------------------------------------------


@pytest.fixture
def webhook_ca(tmp_path: Path) -> Path:
    """The CA the webhook's serving certificate chains to: what goes into caBundle."""
    return write_certificates(
        tmp_path / "webhook-certs", ["outrigger.outrigger-system.svc"], []
    ).ca_cert


def register(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`outrigger register` in a subprocess that can find no other cluster credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "HTTP", "http"))}
    env["HOME"] = str(tmp_path / "home")
    return subprocess.run(
        [outrigger_executable(), "register", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
        check=False,
    )


def register_against(
    tmp_path: Path, kube: ControlPlane, ca_file: Path, name: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """`outrigger register --name NAME` with the admin's kubeconfig."""
    return register(tmp_path, "--namespace", NAMESPACE, "--name", name, "--ca-file",
                    str(ca_file), "--kubeconfig", str(kube.kubeconfig), *args)  # fmt: skip


def unregister(tmp_path: Path, kube: ControlPlane, name: str, *args: str) -> Any:
    return register(tmp_path, "--namespace", NAMESPACE, "--name", name, "--kubeconfig",
                    str(kube.kubeconfig), "--delete", *args)  # fmt: skip


def expected(ca_file: Path, name: str, **options: Any) -> dict[str, Any]:
    bundle = base64.b64encode(ca_file.read_bytes()).decode()
    return webhook_configuration(namespace=NAMESPACE, ca_bundle=bundle, name=name, **options)


def assert_clean_failure(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("outrigger: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == ""


# Create, replace -----------------------------------------------------------------------------


@pytest.mark.kube
def test_creates_when_absent(
    tmp_path: Path, kube: ControlPlane, webhook_ca: Path, name: str
) -> None:
    result = register_against(tmp_path, kube, webhook_ca, name)
    assert result.returncode == 0, result.stderr
    obj = stored(kube, name)
    assert content(obj) == expected(webhook_ca, name)["webhooks"]
    assert obj["metadata"]["labels"] == {"app.kubernetes.io/name": "outrigger"}
    assert managers(obj) == [("outrigger", "Update")]  # its field manager, a plain create
    version = obj["metadata"]["resourceVersion"]
    assert f"mutatingwebhookconfiguration/{name} created (resourceVersion {version})" in (
        result.stdout
    )


@pytest.mark.kube
def test_replaces_keeping_resource_version(
    tmp_path: Path, kube: ControlPlane, webhook_ca: Path, name: str
) -> None:
    """The same object (uid) gets the new CA and options; the API server accepted the write
    with the resourceVersion read (a stale one is refused: the conflict tests below)."""
    old_ca = write_certificates(tmp_path / "old-certs", ["old.example"], []).ca_cert
    before = kube.call("POST", COLLECTION, expected(old_ca, name, failure_policy="Ignore"))
    result = register_against(tmp_path, kube, webhook_ca, name, "--timeout-seconds", "10")
    assert result.returncode == 0, result.stderr
    after = stored(kube, name)
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert after["metadata"]["generation"] == 2
    assert content(after) == expected(webhook_ca, name, timeout_seconds=10)["webhooks"]
    bundle = after["webhooks"][0]["clientConfig"]["caBundle"]
    assert base64.b64decode(bundle) == webhook_ca.read_bytes() != old_ca.read_bytes()
    versions = f"{before['metadata']['resourceVersion']} -> {after['metadata']['resourceVersion']}"
    assert f"mutatingwebhookconfiguration/{name} replaced (resourceVersion {versions})" in (
        result.stdout
    )


@pytest.mark.kube
def test_registering_the_same_again_changes_nothing(
    tmp_path: Path, kube: ControlPlane, webhook_ca: Path, name: str
) -> None:
    """What the real API server does with a replace that changes nothing: no new
    resourceVersion, no new generation (the output says so by its `A -> A`)."""
    assert register_against(tmp_path, kube, webhook_ca, name).returncode == 0
    first = stored(kube, name)["metadata"]
    again = register_against(tmp_path, kube, webhook_ca, name)
    assert again.returncode == 0, again.stderr
    second = stored(kube, name)["metadata"]
    assert (second["resourceVersion"], second["generation"]) == (first["resourceVersion"], 1)
    assert f"(resourceVersion {first['resourceVersion']} -> {first['resourceVersion']})" in (
        again.stdout
    )


# Other tools' objects ------------------------------------------------------------------------


CERT_MANAGER = {"cert-manager.io/inject-ca-from": "outrigger-system/outrigger-serving"}


def helm_install(tmp_path: Path, kube: ControlPlane, helm: Path, obj: dict[str, Any]) -> str:
    """`helm install outrigger` of a chart holding only `obj`, in a namespace of its own;
    returns that namespace. Helm writes its ownership metadata and applies server-side."""
    chart = tmp_path / "chart"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: tiny\nversion: 0.1.0\n")
    (chart / "templates" / "webhook.yaml").write_text(json.dumps(obj))
    namespace = kube.namespace("helm")
    homes = {f"HELM_{kind}_HOME": str(tmp_path / f"helm-{kind}") for kind in
             ("CACHE", "CONFIG", "DATA")}  # fmt: skip
    result = subprocess.run(
        [str(helm), "install", "outrigger", str(chart), "--namespace", namespace,
         "--kubeconfig", str(kube.kubeconfig), "--wait=false"],
        capture_output=True, text=True, timeout=120, check=False, env={**os.environ, **homes},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return namespace


def helm_installed(tmp_path: Path, kube: ControlPlane, helm: Path, ca: Path, name: str) -> str:
    """The configuration `name` installed by Helm, with cert-manager's annotation in the
    chart as Outrigger's chart has it (cert-manager mode); returns the release namespace."""
    obj = expected(ca, name)
    obj["metadata"]["annotations"] = dict(CERT_MANAGER)
    namespace = helm_install(tmp_path, kube, helm, obj)
    metadata = stored(kube, name)["metadata"]
    assert metadata["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert metadata["annotations"]["meta.helm.sh/release-name"] == "outrigger"
    assert managers(stored(kube, name)) == [("helm", "Apply")]  # Helm 4: server-side apply
    return namespace


@pytest.mark.kube
def test_refuses_to_replace_a_helm_release_s_configuration(
    tmp_path: Path, kube: ControlPlane, helm: Path, webhook_ca: Path, name: str
) -> None:
    """What a real install showed: replacing the chart's object breaks the release."""
    namespace = helm_installed(tmp_path, kube, helm, webhook_ca, name)
    before = stored(kube, name)
    result = register_against(tmp_path, kube, webhook_ca, name, "--failure-policy", "Ignore")
    assert_clean_failure(
        result,
        f"mutatingwebhookconfiguration {name} is managed by Helm release "
        f"{namespace}/outrigger: helm upgrade outrigger CHART -n {namespace} "
        "--reuse-values --set failurePolicy=Ignore --set timeoutSeconds=5 "
        "--set injection.mode=opt-in; --force would replace it anyway",
    )
    assert stored(kube, name) == before  # nothing written


def kubectl_apply(kube: ControlPlane, obj: dict[str, Any], *options: str) -> None:
    kube.kubectl("apply", *options, "-f", "-", input=json.dumps(obj))


def with_metadata(ca: Path, name: str, **metadata: dict[str, str]) -> dict[str, Any]:
    obj = expected(ca, name)
    for key, values in metadata.items():
        obj["metadata"].setdefault(key, {}).update(values)
    return obj


CHART_LABELS = {"app.kubernetes.io/managed-by": "Helm"}  # what `helm template` renders too
FLUX_KUSTOMIZATION = {"kustomize.toolkit.fluxcd.io/name": "webhooks",
                      "kustomize.toolkit.fluxcd.io/namespace": "flux-system"}  # fmt: skip
FLUX_HELMRELEASE = {"helm.toolkit.fluxcd.io/name": "outrigger",
                    "helm.toolkit.fluxcd.io/namespace": "platform"}  # fmt: skip
ARGO_CD = "argocd.argoproj.io/tracking-id"


@dataclass(frozen=True)
class Tools:
    """What another tool needs to write a configuration the way it does."""

    tmp_path: Path
    kube: ControlPlane
    helm: Path


def by_flux_kustomization(tools: Tools, ca: Path, name: str) -> None:
    """kustomize-controller applying a rendered chart server-side, with its labels."""
    obj = with_metadata(ca, name, labels={**CHART_LABELS, **FLUX_KUSTOMIZATION})
    kubectl_apply(tools.kube, obj, "--server-side", "--field-manager=kustomize-controller")


def by_flux_helmrelease(tools: Tools, ca: Path, name: str) -> None:
    """helm-controller: a real Helm release, whose objects it labels as its own."""
    helm_install(tools.tmp_path, tools.kube, tools.helm, with_metadata(ca, name,
                 labels=FLUX_HELMRELEASE))  # fmt: skip


def by_argo_cd(tools: Tools, ca: Path, name: str) -> None:
    """Argo CD applying `helm template` output client-side, with its tracking annotation."""
    tracking = f"platform:admissionregistration.k8s.io/MutatingWebhookConfiguration:/{name}"
    obj = with_metadata(ca, name, labels=CHART_LABELS, annotations={ARGO_CD: tracking})
    kubectl_apply(tools.kube, obj, "--field-manager=argocd-controller")


def by_someone_server_side(tools: Tools, ca: Path, name: str) -> None:
    kubectl_apply(tools.kube, expected(ca, name), "--server-side", "--field-manager=someone")


FOREIGN: dict[str, tuple[Callable[[Tools, Path, str], None], str]] = {
    "flux-kustomization": (by_flux_kustomization, "Flux Kustomization flux-system/webhooks"),
    "flux-helmrelease": (by_flux_helmrelease, "Flux HelmRelease platform/outrigger"),
    "argo-cd": (by_argo_cd, "Argo CD application platform"),
    "server-side-apply": (by_someone_server_side, "server-side apply (someone)"),
}


@pytest.mark.kube
@pytest.mark.parametrize("tool", list(FOREIGN))
def test_refuses_what_another_tool_manages(
    tmp_path: Path, kube: ControlPlane, helm: Path, webhook_ca: Path, name: str, tool: str
) -> None:
    """Each tool's object as that tool writes it: Flux and Argo CD are named even where the
    chart they deploy left Helm's marks, since a `helm upgrade` would be undone."""
    write, who = FOREIGN[tool]
    write(Tools(tmp_path, kube, helm), webhook_ca, name)
    before = stored(kube, name)
    result = register_against(tmp_path, kube, webhook_ca, name)
    assert_clean_failure(result, f"is managed by {who}: ", "--force would replace it anyway")
    assert stored(kube, name) == before


def by_kubectl_create(kube: ControlPlane, obj: dict[str, Any]) -> None:
    kube.kubectl("create", "-f", "-", input=json.dumps(obj))


def by_client_side_apply(kube: ControlPlane, obj: dict[str, Any]) -> None:
    kubectl_apply(kube, obj)


def by_cainjector(kube: ControlPlane, obj: dict[str, Any]) -> None:
    """cert-manager's cainjector: an update of the caBundle under its own field manager."""
    by_kubectl_create(kube, obj)
    patch = [{"op": "replace", "path": "/webhooks/0/clientConfig/caBundle",
              "value": base64.b64encode(b"not yet the right CA").decode()}]  # fmt: skip
    kube.kubectl("patch", "mutatingwebhookconfiguration", obj["metadata"]["name"],
                 "--type=json", "--field-manager=cainjector", "-p", json.dumps(patch))  # fmt: skip


def by_its_own_apply(kube: ControlPlane, obj: dict[str, Any]) -> None:
    kubectl_apply(kube, obj, "--server-side", "--field-manager=outrigger")


NOT_FOREIGN: dict[str, tuple[Callable[[ControlPlane, dict[str, Any]], None], list[Any]]] = {
    "kubectl-create": (by_kubectl_create, [("kubectl-create", "Update")]),
    "kubectl-apply": (by_client_side_apply, [("kubectl-client-side-apply", "Update")]),
    "cainjector": (by_cainjector, [("cainjector", "Update"), ("kubectl-create", "Update")]),
    "its-own-apply": (by_its_own_apply, [("outrigger", "Apply")]),
}


@pytest.mark.kube
@pytest.mark.parametrize("writer", list(NOT_FOREIGN))
def test_plain_updates_and_its_own_apply_are_not_foreign(
    tmp_path: Path, kube: ControlPlane, webhook_ca: Path, name: str, writer: str
) -> None:
    """Client-side kubectl, an update by cert-manager's cainjector or outrigger's own field
    manager leave no other manager's Apply entry: the configuration is replaced."""
    write, recorded = NOT_FOREIGN[writer]
    old_ca = write_certificates(tmp_path / "old-certs", ["old.example"], []).ca_cert
    write(kube, expected(old_ca, name))
    assert managers(stored(kube, name)) == recorded  # what the real API server recorded
    result = register_against(tmp_path, kube, webhook_ca, name)
    assert result.returncode == 0, result.stderr
    assert f"mutatingwebhookconfiguration/{name} replaced" in result.stdout
    assert content(stored(kube, name)) == expected(webhook_ca, name)["webhooks"]


@pytest.mark.kube
def test_force_replaces_keeping_helm_and_cert_manager_metadata(
    tmp_path: Path, kube: ControlPlane, helm: Path, webhook_ca: Path, name: str
) -> None:
    old_ca = write_certificates(tmp_path / "old-certs", ["old.example"], []).ca_cert
    namespace = helm_installed(tmp_path, kube, helm, old_ca, name)
    result = register_against(tmp_path, kube, webhook_ca, name, "--force")
    assert result.returncode == 0, result.stderr
    after = stored(kube, name)
    assert content(after) == expected(webhook_ca, name)["webhooks"]
    assert after["metadata"]["labels"] == {
        "app.kubernetes.io/managed-by": "Helm", "app.kubernetes.io/name": "outrigger",
    }  # fmt: skip
    assert after["metadata"]["annotations"] == {
        "meta.helm.sh/release-name": "outrigger",
        "meta.helm.sh/release-namespace": namespace,
        **CERT_MANAGER,
    }


# Delete --------------------------------------------------------------------------------------


@pytest.mark.kube
def test_delete_removes_its_own_configuration(
    tmp_path: Path, kube: ControlPlane, webhook_ca: Path, name: str
) -> None:
    assert register_against(tmp_path, kube, webhook_ca, name).returncode == 0
    version = stored(kube, name)["metadata"]["resourceVersion"]
    result = unregister(tmp_path, kube, name)  # no CA needed to delete
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"mutatingwebhookconfiguration/{name} deleted (was resourceVersion {version})\n"
    )
    assert read(kube, name) is None


@pytest.mark.kube
def test_delete_of_nothing_says_so(tmp_path: Path, kube: ControlPlane, name: str) -> None:
    result = unregister(tmp_path, kube, name)
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout == f"mutatingwebhookconfiguration/{name} does not exist: nothing to delete\n"
    )


@pytest.mark.kube
def test_delete_refuses_a_helm_release_s_configuration_unless_forced(
    tmp_path: Path, kube: ControlPlane, helm: Path, webhook_ca: Path, name: str
) -> None:
    namespace = helm_installed(tmp_path, kube, helm, webhook_ca, name)
    result = unregister(tmp_path, kube, name)
    assert_clean_failure(result, f"managed by Helm release {namespace}/outrigger",
                         "helm uninstall", "--force would delete it anyway")  # fmt: skip
    assert read(kube, name) is not None
    forced = unregister(tmp_path, kube, name, "--force")
    assert forced.returncode == 0, forced.stderr
    assert read(kube, name) is None


# Concurrent writers (in-process: the hook times the other writer) ----------------------------


def hook_reads(
    monkeypatch: pytest.MonkeyPatch, change: Callable[[], object], at: set[int] | None = None
) -> list[str]:
    """Run `change()` after register's n-th read of a configuration (found or not) for each n
    in `at` (every read if None): another writer's change, just when it makes register's next
    write stale. Returns the names read, one per read."""
    from kubernetes import client

    api = client.AdmissionregistrationV1Api
    original = api.read_mutating_webhook_configuration
    reads: list[str] = []

    def read_then_change(self: Any, name: str, **options: Any) -> Any:
        try:
            return original(self, name, **options)
        finally:
            reads.append(name)
            if at is None or len(reads) in at:
                change()

    monkeypatch.setattr(api, "read_mutating_webhook_configuration", read_then_change)
    return reads


def register_in_process(
    capsys: pytest.CaptureFixture[str], kube: ControlPlane, name: str, *args: str
) -> tuple[int, str, str]:
    """`outrigger register` in this process (where `hook_reads` works): status, out, err."""
    code = main(["register", "--namespace", NAMESPACE, "--name", name,
                 "--kubeconfig", str(kube.kubeconfig), *args])  # fmt: skip
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.kube
def test_conflict_is_retried_with_the_fresh_resource_version(
    kube: ControlPlane, webhook_ca: Path, name: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The write with the resourceVersion read is refused (409), the retry reads again and
    writes over the other writer's version, whose change (an annotation) survives."""
    kube.call("POST", COLLECTION, expected(webhook_ca, name, failure_policy="Ignore"))
    versions: list[str] = []
    hook_reads(monkeypatch, lambda: versions.append(write_change(kube, name, "1")), at={1})
    code, out, err = register_in_process(capsys, kube, name, "--ca-file", str(webhook_ca))
    assert code == 0, err
    after = stored(kube, name)
    assert f"(resourceVersion {versions[0]} -> {after['metadata']['resourceVersion']}, " in out
    assert "after 1 conflict(s)" in out
    assert after["metadata"]["annotations"] == {WRITER: "1"}
    assert after["webhooks"][0]["failurePolicy"] == "Fail"


@pytest.mark.kube
def test_create_that_loses_a_race_replaces(
    kube: ControlPlane, webhook_ca: Path, name: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Absent when read, created by another writer before register's create (409
    AlreadyExists): register reads again and replaces."""
    other = with_metadata(webhook_ca, name, annotations={WRITER: "first"})
    other["webhooks"][0]["failurePolicy"] = "Ignore"
    reads = hook_reads(monkeypatch, lambda: kube.call("POST", COLLECTION, other), at={1})
    code, out, err = register_in_process(capsys, kube, name, "--ca-file", str(webhook_ca))
    assert code == 0, err
    assert len(reads) == 2
    assert f"mutatingwebhookconfiguration/{name} replaced" in out
    assert "after 1 conflict(s)" in out
    after = stored(kube, name)
    assert after["webhooks"][0]["failurePolicy"] == "Fail"
    assert after["metadata"]["annotations"] == {WRITER: "first"}


@pytest.mark.kube
def test_endless_conflicts_give_up(
    kube: ControlPlane, webhook_ca: Path, name: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    kube.call("POST", COLLECTION, expected(webhook_ca, name, failure_policy="Ignore"))
    reads = hook_reads(monkeypatch, lambda: write_change(kube, name, uuid.uuid4().hex))
    code, out, err = register_in_process(capsys, kube, name, "--ca-file", str(webhook_ca))
    assert code == 2
    assert out == ""
    assert err == (
        f"outrigger: mutatingwebhookconfiguration {name}: still conflicting after 5 attempts "
        "(someone else keeps changing it)\n"
    )
    assert len(reads) == 5
    assert stored(kube, name)["webhooks"][0]["failurePolicy"] == "Ignore"  # never written


@pytest.mark.kube
def test_delete_after_a_concurrent_change_reads_again(
    kube: ControlPlane, webhook_ca: Path, name: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The delete's resourceVersion precondition fails (409) after another change; register
    reads again and deletes the version it has now seen."""
    kube.call("POST", COLLECTION, expected(webhook_ca, name))
    versions: list[str] = []
    reads = hook_reads(monkeypatch, lambda: versions.append(write_change(kube, name, "1")), at={1})
    code, out, err = register_in_process(capsys, kube, name, "--delete")
    assert code == 0, err
    assert len(reads) == 2
    assert (
        out == f"mutatingwebhookconfiguration/{name} deleted (was resourceVersion {versions[0]})\n"
    )
    assert read(kube, name) is None


@pytest.mark.kube
def test_delete_does_not_remove_an_object_made_again_in_between(
    kube: ControlPlane, webhook_ca: Path, name: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Read, then deleted and created again by Helm (say) before register's delete: the
    preconditions (uid, resourceVersion) fail it, and the look again finds Helm's object,
    which register refuses to delete."""
    kube.call("POST", COLLECTION, expected(webhook_ca, name))
    helm_owned = with_metadata(webhook_ca, name, labels={"app.kubernetes.io/managed-by": "Helm"})

    def recreate() -> None:
        kube.call("DELETE", f"{COLLECTION}/{name}")
        kube.call("POST", COLLECTION, helm_owned)

    reads = hook_reads(monkeypatch, recreate, at={1})
    code, out, err = register_in_process(capsys, kube, name, "--delete")
    assert code == 2, out
    assert len(reads) == 2
    assert "is managed by Helm release NAMESPACE/RELEASE" in err
    assert stored(kube, name)["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"


# Failures ------------------------------------------------------------------------------------


@pytest.mark.kube
def test_forbidden(tmp_path: Path, kube: ControlPlane, webhook_ca: Path, name: str) -> None:
    """A ServiceAccount without a role: the API server's RBAC answers 403, said in one line."""
    namespace = kube.namespace("reg")
    config = kube.token_kubeconfig(tmp_path, namespace, "deployer")
    result = register(tmp_path, "--namespace", NAMESPACE, "--name", name, "--ca-file",
                      str(webhook_ca), "--kubeconfig", str(config))  # fmt: skip
    assert_clean_failure(
        result,
        "API server: 403 Forbidden: ",
        f'User "system:serviceaccount:{namespace}:deployer" cannot get resource '
        '"mutatingwebhookconfigurations" in API group "admissionregistration.k8s.io"',
    )
    assert read(kube, name) is None


def write_kubeconfig(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(json.dumps(config))
    return path


@pytest.mark.kube
def test_unreachable_api_server(
    tmp_path: Path, kube: ControlPlane, webhook_ca: Path, name: str
) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: connections are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = kubeconfig(f"https://127.0.0.1:{port}", kube.pki)
    written = write_kubeconfig(tmp_path / "kubeconfig", config)
    result = register(tmp_path, "--namespace", NAMESPACE, "--name", name, "--ca-file",
                      str(webhook_ca), "--kubeconfig", str(written))  # fmt: skip
    assert_clean_failure(result, "cannot reach the API server")


@pytest.mark.kube
def test_untrusted_api_server_certificate(
    tmp_path: Path, kube: ControlPlane, webhook_ca: Path, name: str
) -> None:
    """The real API server's certificate, checked against another CA: refused before any
    request (nothing is created)."""
    config = kubeconfig(kube.url, kube.pki)
    config["clusters"][0]["cluster"]["certificate-authority"] = str(webhook_ca)  # the wrong CA
    written = write_kubeconfig(tmp_path / "kubeconfig", config)
    result = register(tmp_path, "--namespace", NAMESPACE, "--name", name, "--ca-file",
                      str(webhook_ca), "--kubeconfig", str(written))  # fmt: skip
    assert_clean_failure(result, "cannot reach the API server", "CERTIFICATE_VERIFY_FAILED")
    assert read(kube, name) is None


@pytest.mark.kube
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read CA file"),
        (b"not a certificate\n", "holds no PEM certificate"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "no PEM certificate"),
    ],
)
def test_bad_ca_file(
    tmp_path: Path, kube: ControlPlane, name: str, content: bytes | None, message: str
) -> None:
    ca_file = tmp_path / "ca.crt"
    if content is not None:
        ca_file.write_bytes(content)
    result = register_against(tmp_path, kube, ca_file, name)
    assert_clean_failure(result, message)
    assert read(kube, name) is None


@pytest.mark.kube
def test_ca_bundle_option(tmp_path: Path, kube: ControlPlane, webhook_ca: Path, name: str) -> None:
    bundle = base64.b64encode(webhook_ca.read_bytes()).decode()
    result = register(tmp_path, "--namespace", NAMESPACE, "--name", name, "--ca-bundle", bundle,
                      "--kubeconfig", str(kube.kubeconfig))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert content(stored(kube, name)) == expected(webhook_ca, name)["webhooks"]
    bad = register(tmp_path, "--namespace", NAMESPACE, "--ca-bundle", "%%%", "--dry-run")
    assert_clean_failure(bad, "not valid base64")


@pytest.mark.kube
def test_dry_run_prints_what_the_api_server_accepts_and_writes_nothing(
    tmp_path: Path, kube: ControlPlane, webhook_ca: Path, name: str
) -> None:
    """The printed document is valid for the schema and for the real API server's own
    validation (a server-side dry run of it), and the dry run itself wrote nothing."""
    result = register_against(tmp_path, kube, webhook_ca, name, "--dry-run",
                              "--failure-policy", "Ignore")  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = yaml.safe_load(result.stdout)
    validate_strict(document)
    assert document == expected(webhook_ca, name, failure_policy="Ignore")
    assert read(kube, name) is None
    status, answer = kube.request("POST", f"{COLLECTION}?dryRun=All", document)
    assert status == 201, answer
    assert read(kube, name) is None


# Without a server ----------------------------------------------------------------------------


def test_options_are_checked(tmp_path: Path, webhook_ca: Path) -> None:
    for args in (
        ["--timeout-seconds", "0"],
        ["--timeout-seconds", "31"],
        ["--failure-policy", "Maybe"],
        ["--injection-mode", "everywhere"],
    ):
        result = register(
            tmp_path, "--namespace", NAMESPACE, "--ca-file", str(webhook_ca), "--dry-run", *args
        )
        assert result.returncode == 2, args
        assert "Traceback" not in result.stderr
    result = register(tmp_path, "--namespace", "Bad_NS", "--ca-file", str(webhook_ca), "--dry-run")
    assert_clean_failure(result, "invalid namespace")


@pytest.mark.parametrize(
    ("mode", "selector"),
    [
        ("opt-in", {"key": "outrigger.dev/injection", "operator": "In", "values": ["enabled"]}),
        (
            "opt-out",
            {"key": "outrigger.dev/injection", "operator": "NotIn", "values": ["disabled"]},
        ),
    ],
)
def test_builder(mode: str, selector: dict[str, Any]) -> None:
    obj = webhook_configuration(
        namespace="hooks", ca_bundle=base64.b64encode(b"pem").decode(), injection_mode=mode
    )
    validate_strict(obj)
    assert obj["apiVersion"] == "admissionregistration.k8s.io/v1"
    assert obj["kind"] == "MutatingWebhookConfiguration"
    assert obj["metadata"] == {
        "name": "outrigger",
        "labels": {"app.kubernetes.io/name": "outrigger"},
    }
    [webhook] = obj["webhooks"]
    assert webhook["name"] == "inject.outrigger.dev"
    assert webhook["namespaceSelector"]["matchExpressions"] == [
        selector,
        {
            "key": "kubernetes.io/metadata.name",
            "operator": "NotIn",
            "values": ["kube-system", "kube-public", "hooks"],
        },
    ]
    assert webhook["clientConfig"]["service"] == {
        "name": "outrigger",
        "namespace": "hooks",
        "path": "/mutate",
        "port": 443,
    }
    # Nothing a pod's creator can write skips the call (a required sidecar would be skipped).
    assert "objectSelector" not in webhook and "matchConditions" not in webhook
    assert webhook["failurePolicy"] == "Fail"
    assert webhook["timeoutSeconds"] == 5
    assert webhook["sideEffects"] == "None"
    assert webhook["reinvocationPolicy"] == "IfNeeded"
    assert webhook["matchPolicy"] == "Equivalent"


def test_builder_rejects_what_the_api_server_would() -> None:
    for options in (
        {"timeout_seconds": 31},
        {"timeout_seconds": 0},
        {"failure_policy": "Retry"},
        {"injection_mode": "all"},
        {"name": "Outrigger"},
        {"service": "1svc"},
    ):
        with pytest.raises(ValueError):
            webhook_configuration(namespace="hooks", ca_bundle="cGVt", **options)
