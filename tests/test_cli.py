"""The `outrigger` command line, run as users run it: the installed entry point, in a subprocess."""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import FIXTURES, outrigger_executable, validate_strict
from webhook.core.policy import load_policy

MANIFESTS = """\
# A Deployment whose labels are shared through a YAML anchor, as hand-written manifests often do.
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: &labels
    app: web
spec:
  replicas: 2
  selector:
    matchLabels: *labels
  template:
    metadata:
      labels: *labels
      annotations:
        outrigger.dev/inject: log-watcher,ambassador
        outrigger.dev/ambassador-upstream: external-service:80
    spec:
      containers:
        - name: main-app
          image: registry.example.com/web:1.4.2
          ports:
            - containerPort: 8080
---
apiVersion: batch/v1
kind: CronJob
metadata:
  name: report
  namespace: jobs
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        metadata:
          annotations:
            outrigger.dev/inject: log-watcher
            outrigger.dev/log-path: /var/log/report
        spec:
          restartPolicy: OnFailure
          containers:
            - name: report
              image: registry.example.com/report:2.0.0
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  annotations:
    outrigger.dev/inject: log-watcher
data:
  level: debug
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector:
    app: web
  ports:
    - port: 80
      targetPort: 8080
"""

BROKEN = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: fine
data: {}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: broken
spec:
  selector:
    matchLabels: {app: broken}
  template:
    metadata:
      labels: {app: broken}
      annotations:
        outrigger.dev/inject: bogus
    spec:
      containers:
        - name: main-app
          image: registry.example.com/web:1.4.2
"""


def outrigger(
    *args: str | Path,
    stdin: str | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [outrigger_executable(), *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
        env=None if env is None else {**os.environ, **env},
    )


def assert_clean_failure(result: subprocess.CompletedProcess[str], code: int) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert result.stderr.startswith("outrigger: ") or "error:" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("manifests") / "manifests.yaml"
    path.write_text(MANIFESTS)
    return path


@pytest.fixture(scope="module")
def injected(manifests: Path) -> subprocess.CompletedProcess[str]:
    """`outrigger inject -f manifests.yaml`, run once for the tests that read its output."""
    return outrigger("inject", "-f", manifests)


def has_anchors(text: str) -> bool:
    """Whether the YAML stream uses any anchor or alias, whatever its name."""
    return any(
        isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None)
        for event in yaml.parse(text, Loader=yaml.SafeLoader)
    )


def by_kind(documents: list[Any]) -> dict[str, dict[str, Any]]:
    return {document["kind"]: document for document in documents}


# Help -----------------------------------------------------------------------------------------


def test_help_lists_the_commands() -> None:
    result = outrigger("--help")
    assert result.returncode == 0, result.stderr
    for command in ("serve", "inject", "certs"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.MULTILINE), result.stdout


@pytest.mark.parametrize("command", ["serve", "inject", "certs"])
def test_each_command_has_help(command: str) -> None:
    result = outrigger(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: outrigger {command}")


def test_python_dash_m_webhook(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "webhook", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "inject" in result.stdout and "certs" in result.stdout


def test_no_command_is_a_usage_error() -> None:
    result = outrigger()
    assert result.returncode == 2
    assert "usage: outrigger" in result.stderr
    assert "Traceback" not in result.stderr


# inject ---------------------------------------------------------------------------------------


def test_inject_manifests(injected: subprocess.CompletedProcess[str]) -> None:
    result = injected
    assert result.returncode == 0, result.stderr
    assert not re.search(r"[&*]id\d+", result.stdout), "the output must not use YAML aliases"
    assert not has_anchors(result.stdout)

    sent = list(yaml.safe_load_all(MANIFESTS))
    out = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in out] == ["Deployment", "CronJob", "ConfigMap", "Service"]
    for document in out:
        validate_strict(document)
    before, after = by_kind(sent), by_kind(out)
    assert after["ConfigMap"] == before["ConfigMap"]
    assert after["Service"] == before["Service"]
    # Only the pod templates change; the workloads' own metadata and other fields do not.
    for kind in ("Deployment", "CronJob"):
        assert after[kind]["metadata"] == before[kind]["metadata"]

    deployment = after["Deployment"]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["selector"] == {"matchLabels": {"app": "web"}}
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["labels"] == {"app": "web"}
    assert "outrigger.dev/status" in pod["metadata"]["annotations"]
    containers = pod["spec"]["containers"]
    assert [c["name"] for c in containers] == ["main-app"]
    sidecars = pod["spec"]["initContainers"]
    assert [c["name"] for c in sidecars] == ["log-watcher", "ambassador"]
    assert [v["name"] for v in pod["spec"]["volumes"]] == [
        "shared-logs",
        "log-watcher-state",
        "log-watcher-config",
    ]
    assert {"name": "shared-logs", "mountPath": "/var/log/app"} in containers[0]["volumeMounts"]

    job_pod = after["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]
    assert after["CronJob"]["spec"]["schedule"] == "0 3 * * *"
    assert job_pod["spec"]["restartPolicy"] == "OnFailure"
    job_containers = job_pod["spec"]["containers"]
    assert [c["name"] for c in job_containers] == ["report"]
    (watcher,) = job_pod["spec"]["initContainers"]
    assert (watcher["name"], watcher["restartPolicy"]) == ("log-watcher", "Always")
    assert [v["name"] for v in job_pod["spec"]["volumes"]] == [
        "shared-logs",
        "log-watcher-state",
        "log-watcher-config",
    ]
    report_mount = {"name": "shared-logs", "mountPath": "/var/log/report"}
    assert report_mount in job_containers[0]["volumeMounts"]
    assert any(m["mountPath"] == "/var/log/report" for m in watcher["volumeMounts"])


def test_inject_list_of_workloads_has_no_aliases(tmp_path: Path) -> None:
    """Two pods injected in one document share policy objects; they must be written out."""
    manifest = next(yaml.safe_load_all(MANIFESTS))
    second = {**manifest, "metadata": {**manifest["metadata"], "name": "web-2"}}
    path = tmp_path / "list.yaml"
    path.write_text(
        yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [manifest, second]})
    )
    result = outrigger("inject", "-f", path)
    assert result.returncode == 0, result.stderr
    assert not re.search(r"[&*]id\d+", result.stdout)
    assert not has_anchors(result.stdout)
    (document,) = yaml.safe_load_all(result.stdout)
    for item in document["items"]:
        names = [c["name"] for c in item["spec"]["template"]["spec"]["initContainers"]]
        assert names == ["log-watcher", "ambassador"]
        validate_strict(item)


def test_inject_reads_standard_input(injected: subprocess.CompletedProcess[str]) -> None:
    from_file = injected
    from_stdin = outrigger("inject", "-f", "-", stdin=MANIFESTS)
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout == from_file.stdout
    assert "log-watcher" in from_stdin.stdout


def test_inject_is_idempotent(injected: subprocess.CompletedProcess[str]) -> None:
    first = injected
    assert first.returncode == 0, first.stderr
    second = outrigger("inject", "-f", "-", stdin=first.stdout)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout


def test_inject_uses_the_namespace_option(tmp_path: Path) -> None:
    """Objects without a namespace take -n's; kube-system is never injected."""
    path = tmp_path / "deployment.yaml"
    path.write_text(MANIFESTS.split("---")[0])
    untouched = outrigger("inject", "-f", path, "-n", "kube-system")
    assert untouched.returncode == 0, untouched.stderr
    assert "name: log-watcher" not in untouched.stdout
    injected = outrigger("inject", "-f", path, "-n", "apps")
    assert "name: log-watcher" in injected.stdout


def test_inject_never_injects_the_webhooks_own_namespace(tmp_path: Path) -> None:
    """$POD_NAMESPACE (the chart's downward API), read by the command and handed on."""
    path = tmp_path / "deployment.yaml"
    path.write_text(MANIFESTS.split("---")[0])
    own = outrigger("inject", "-f", path, "-n", "apps", env={"POD_NAMESPACE": "apps"})
    assert own.returncode == 0, own.stderr
    assert "name: log-watcher" not in own.stdout
    other = outrigger("inject", "-f", path, "-n", "apps", env={"POD_NAMESPACE": "other"})
    assert "name: log-watcher" in other.stdout


def test_inject_invalid_annotation_fails(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    result = outrigger("inject", "-f", path)
    assert_clean_failure(result, 1)
    assert "Deployment/broken" in result.stderr
    assert "outrigger.dev/inject" in result.stderr
    assert "bogus" in result.stderr
    assert "ConfigMap/fine" not in result.stderr
    # Everything is still printed, the refused object unchanged.
    out = by_kind(list(yaml.safe_load_all(result.stdout)))
    assert out == by_kind(list(yaml.safe_load_all(BROKEN)))


def test_inject_list_reports_the_denied_item_and_injects_the_rest() -> None:
    items = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "annotations": {"outrigger.dev/inject": inject}},
            "spec": {"containers": [{"name": "a", "image": "a:1"}]},
        }
        for name, inject in (("p1", "bogus"), ("p2", "log-watcher"))
    ]
    result = outrigger(
        "inject",
        "-f",
        "-",
        stdin=yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items}),
    )
    assert_clean_failure(result, 1)
    assert "Pod/p1" in result.stderr and "List/" not in result.stderr
    out = yaml.safe_load(result.stdout)["items"]
    assert out[0] == items[0]
    assert [c["name"] for c in out[1]["spec"]["initContainers"]] == ["log-watcher"]


def test_workload_without_template_is_unchanged() -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d"},
        "spec": {"replicas": 1},
    }
    result = outrigger("inject", "-f", "-", stdin=yaml.safe_dump(deployment))
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == deployment


def test_inject_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    result = outrigger("inject", "-f", missing)
    assert_clean_failure(result, 2)
    assert str(missing) in result.stderr
    assert result.stdout == ""


def test_inject_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("kind: [unclosed\n")
    result = outrigger("inject", "-f", path)
    assert_clean_failure(result, 2)
    assert str(path) in result.stderr


# --policy -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["inject", "serve"])
def test_missing_policy_file(tmp_path: Path, manifests: Path, command: str) -> None:
    policy = tmp_path / "no-such-policy.yaml"
    if command == "inject":
        result = outrigger("inject", "-f", manifests, "--policy", policy)
    else:
        # Must fail before it generates certificates or binds a port.
        cert_dir = tmp_path / "certs"
        serve = ("serve", "--host", "127.0.0.1", "--port", "1", "--cert-dir", cert_dir)
        result = outrigger(*serve, "--policy", policy)
        assert not cert_dir.exists()
    assert_clean_failure(result, 2)
    assert str(policy) in result.stderr
    assert result.stdout == ""


def test_invalid_policy_file_names_the_field(tmp_path: Path, manifests: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "apiVersion: outrigger.dev/v1alpha1\nkind: InjectionPolicy\n"
        "images: {allowed: [docker.io/]}\nsidecars:\n"
        "  - {name: log-watcher, container: {image: 'docker.io/fluent/fluent-bit:4.2.0'}}\n"
        "  - {name: ambassador, container: {image: 'docker.io/envoyproxy/envoy:latest'}}\n"
    )
    result = outrigger("inject", "-f", manifests, "--policy", policy)
    assert_clean_failure(result, 2)
    assert str(policy) in result.stderr
    assert "sidecars[1].container.image: image 'docker.io/envoyproxy/envoy:latest'" in result.stderr


def test_policy_check(tmp_path: Path) -> None:
    good = FIXTURES / "policies" / "good-platform-team.yaml"
    result = outrigger("policy", "check", good)
    assert result.returncode == 0, result.stderr
    assert f"version {load_policy(good).version}" in result.stdout
    bad = outrigger("policy", "check", FIXTURES / "policies" / "bad-unknown-reference.yaml")
    assert_clean_failure(bad, 2)
    assert "sidecars[0]: container refers to ${log-dir}" in bad.stderr


def test_inject_explain_says_why(tmp_path: Path) -> None:
    manifests = tmp_path / "in.yaml"
    manifests.write_text(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: quiet\n  namespace: kube-system\n"
        "  annotations: {outrigger.dev/inject: log-watcher}\n"
        "spec: {containers: [{name: a, image: a:1}]}\n---\n"
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n"
        "  annotations: {outrigger.dev/inject: log-watcher, outrigger.dev/logpath: /x}\n"
        "spec: {containers: [{name: a, image: a:1}]}\n"
    )
    result = outrigger("inject", "--explain", "-n", "shop", "-f", manifests)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "Pod/quiet in namespace kube-system: nothing injected (namespace-excluded)",
        "  API server: admits its pods without calling the webhook "
        "(outrigger.dev/namespace-not-excluded is false: the namespace is excluded "
        "(kube-system, kube-public, the webhook's own, or excludedNamespaces))",
        "  namespace 'kube-system' is excluded",
        "Pod/web in namespace shop: injected log-watcher",
        "  API server: calls the webhook "
        "(outrigger.dev/namespace-not-excluded, outrigger.dev/policy-applies hold)",
        "  log-watcher: asked for by outrigger.dev/inject",
        "  log-watcher resources: cpu request 10m (template); ephemeral-storage request 64Mi "
        "(template); memory request 32Mi (template); cpu limit 200m (template); memory limit "
        "128Mi (template); Fluent Bit mem_buf_limit 16MB",
        "  warning: annotation outrigger.dev/logpath is not an Outrigger annotation and is ignored",
        "  warning: log-watcher reads the app's files as user 65534, as the pod does not set the "
        "app's runAsUser: files not readable by all (umask 027, 077) are not shipped; set "
        "runAsUser (and runAsGroup) of the app in the pod's securityContext",
    ]


# certs ----------------------------------------------------------------------------------------


def test_certs(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    result = outrigger("certs", "--dns", "a.example", "--ip", "10.1.2.3", "--out", out)
    assert result.returncode == 0, result.stderr
    ca_path, cert_path, key_path = out / "ca.crt", out / "tls.crt", out / "tls.key"
    assert ca_path.is_file() and cert_path.is_file() and key_path.is_file()

    # stdout is exactly the caBundle: one line of base64 of ca.crt's bytes.
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert base64.b64decode(lines[0], validate=True) == ca_path.read_bytes()

    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["a.example"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    assert len(list(sans)) == 2

    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    cert.verify_directly_issued_by(ca)
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert stat.S_IMODE(key_path.stat().st_mode) & 0o077 == 0, "tls.key must be private"
    assert not list(out.glob("*ca*.key")), "the CA key must not be written"


def test_certs_days(tmp_path: Path) -> None:
    result = outrigger("certs", "--dns", "a.example", "--out", tmp_path, "--days", "7")
    assert result.returncode == 0, result.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "tls.crt").read_bytes())
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 7 * 86400 <= lifetime.total_seconds() <= 7 * 86400 + 3600


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        pytest.param(("--ip", "not-an-ip"), "not-an-ip", id="bad-ip"),
        pytest.param(("--dns", "a.example", "--ip", "10.1.2"), "10.1.2", id="short-ip"),
        pytest.param((), "DNS name or IP", id="no-names"),
        pytest.param(("--dns", "a.example", "--days", "0"), "day", id="zero-days"),
        pytest.param(("--dns", "bad name!"), "bad name!", id="bad-dns-name"),
    ],
)
def test_certs_rejects(tmp_path: Path, args: tuple[str, ...], mentions: str) -> None:
    out = tmp_path / "certs"
    result = outrigger("certs", *args, "--out", out)
    assert_clean_failure(result, 2)
    assert mentions in result.stderr
    assert result.stdout == ""
    assert not (out / "tls.key").exists()


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path: Path) -> None:
    """`outrigger inject -f pods.yaml | head -5`: once the reader has gone, the command ends
    without a traceback, with the status a shell gives a process ended by SIGPIPE."""
    pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"
    pod += "spec: {containers: [{name: a, image: a:1}]}\n"
    manifests = tmp_path / "pods.yaml"
    manifests.write_text("---\n".join([pod] * 3000))  # far more output than a pipe holds
    process = subprocess.Popen(
        [outrigger_executable(), "inject", "-f", str(manifests)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stdout.read(64)  # the first lines, as `head` reads them
    process.stdout.close()  # the reader goes away
    _, stderr = process.communicate(timeout=60)
    assert stderr == b""
    assert process.returncode == 141
