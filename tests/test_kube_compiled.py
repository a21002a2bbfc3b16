"""The compiled policy in the real API server (kube-apiserver v1.36): `outrigger serve
--compiled-policy-webhook` keeps its configuration's matchConditions and the guard (a
ValidatingAdmissionPolicy and binding), and the API server acts on them.

- Pods the policy leaves alone never reach the webhook (its review counter does not move),
  for 200 pods; for a sample of pods, the API server calls it exactly when
  `CompiledPolicy.decides` says so.
- The webhook down with failurePolicy Ignore: a pod a `require` rule covers is refused by the
  guard, naming the rule and the sidecar; others are created at once, an opted-in one without
  its sidecar (the trade-off docs/platform/compiled-policy.md states).
- Another mutating webhook that strips the native sidecar's restartPolicy: refused.
- A policy change through the ConfigMap: conditions and guard follow within seconds.
- With the chart's own RBAC (rendered by the real Helm, a ServiceAccount token): every call is
  allowed, and deleting the webhook configuration deletes the guard (garbage collector).
- CEL's limits: the API server's own refusal past 100,000 code points, and a policy past it
  falls back to calling for every pod.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.fake_kube import https_server, send_json
from tests.kube_env import ControlPlane
from tests.kube_webhook import (
    CONFIGURATIONS,
    configuration,
    new_selector,
    registered,
    selected_namespace,
)
from tests.test_https import Server, start_server, stop_server
from webhook.cluster.compiledpolicy import FIELD_MANAGER, VERSION_ANNOTATION
from webhook.core import annotations as ann
from webhook.core.compiled import MAX_EXPRESSION_CODE_POINTS, Subject, compile_policy
from webhook.core.policy import (
    Policy,
    default_policy,
    load_policy,
    load_policy_text,
    parse_policy,
)

pytestmark = pytest.mark.kube

ADMISSION = "/apis/admissionregistration.k8s.io/v1"
POLICIES = f"{ADMISSION}/validatingadmissionpolicies"
BINDINGS = f"{ADMISSION}/validatingadmissionpolicybindings"
PUBLISH_SECONDS = 30.0
LOG = {ann.INJECT: "log-watcher"}


def rbac(fullname: str) -> set[tuple[str, str]]:
    """The (verb, API path) pairs the compiled policy needs (tests/test_chart.py checks that
    the chart grants them): its webhook configuration and its guard by name, and creating
    the guard's two objects. `delete` is called only to remove a guard that no longer
    compiles, and needed to set their ownerReference (OwnerReferencesPermissionEnforcement)."""
    guard = f"{fullname}-guard"
    return {
        ("get", f"{CONFIGURATIONS}/{fullname}"),
        ("patch", f"{CONFIGURATIONS}/{fullname}"),
        *((verb, f"{POLICIES}/{guard}") for verb in ("get", "patch", "delete")),
        *((verb, f"{BINDINGS}/{guard}") for verb in ("get", "patch", "delete")),
        ("create", POLICIES),
        ("create", BINDINGS),
    }


RBAC = rbac("outrigger")


def policy_with_rules() -> Policy:
    document = default_policy().model_dump(mode="json")
    document["rules"] = [
        {"name": "logs-required", "namespaces": ["req-*"], "require": ["log-watcher"]},
        {"name": "logs-by-default", "namespaces": ["def-*"], "inject": ["log-watcher"]},
        {
            "name": "no-operators",
            "podSelector": {"matchLabels": {"component": "operator"}},
            "exclude": True,
        },
    ]
    return parse_policy(document)


def pod(name: str, annotations: dict[str, str] | None = None, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels, "annotations": annotations or {}},
        "spec": {"containers": [{"name": "app", "image": "registry.local/app:1.0"}]},
    }


def write_policy(root: Path, policy: Policy) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "policy.yaml"
    path.write_text(yaml.safe_dump(policy.model_dump(mode="json")))
    return path


@contextmanager
def compiling_server(root: Path, kubeconfig: Path, webhook: str, *extra: str) -> Iterator[Server]:
    server, process = start_server(
        root, "--kubeconfig", str(kubeconfig), "--compiled-policy-webhook", webhook, *extra
    )
    try:
        yield server
    finally:
        stop_server(server, process)


def metrics(server: Server) -> str:
    with httpx.Client(verify=server.trusting_ca(), timeout=5) as client:
        return client.get(f"{server.url}/metrics").text


def reviews(server: Server) -> float:
    values = re.findall(r"^outrigger_admission_reviews_total\{.*\} (\S+)$", metrics(server), re.M)
    return sum(float(value) for value in values)


def wait_for(what: str, check: Callable[[], Any], seconds: float = PUBLISH_SECONDS) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {seconds:g}s"
        time.sleep(0.2)


def published(kube: ControlPlane, name: str, version: str) -> bool:
    """The webhook configuration has matchConditions, and the guard's binding and policy of
    `version` exist."""
    status, hook = kube.request("GET", f"{CONFIGURATIONS}/{name}")
    status_policy, guard = kube.request("GET", f"{POLICIES}/{name}-guard")
    status_binding, _ = kube.request("GET", f"{BINDINGS}/{name}-guard")
    return (
        status == 200
        and bool(hook["webhooks"][0].get("matchConditions"))
        and status_policy == 200
        and guard["metadata"]["annotations"][VERSION_ANNOTATION] == version
        and status_binding == 200
    )


@contextmanager
def served(
    kube: ControlPlane,
    root: Path,
    *,
    failure_policy: str = "Fail",
    policy: Policy | None = None,
    extra: tuple[str, ...] = (),
) -> Iterator[tuple[Server, str, str]]:
    """`outrigger serve` keeping the compiled policy for a url configuration that selects a
    fresh label (registered once the server listens): (the server, the configuration's name,
    the label). The configuration and the guard are deleted afterwards."""
    label = "c" + new_selector()
    name = f"outrigger-{label}"
    source = ("--policy", str(write_policy(root / "policy", policy or policy_with_rules())))
    if "--policy-configmap" in extra:
        source = ()
    with compiling_server(root / "serve", kube.kubeconfig, name, *source, *extra) as server:
        body = configuration(
            server.ip_url + "/mutate",
            server.cert_dir / "ca.crt",
            label,
            failure_policy=failure_policy,
            name=name,
        )
        try:
            with registered(kube, body):
                yield server, name, label
        finally:
            kube.request("DELETE", f"{BINDINGS}/{name}-guard")
            kube.request("DELETE", f"{POLICIES}/{name}-guard")


def taking_effect(
    kube: ControlPlane,
    namespace: str,
    body: dict[str, Any],
    status: int,
    also: Callable[[], bool] = lambda: True,
) -> None:
    """Waits until a dry-run creation of `body` answers `status` (and `also` holds): the API
    server's cache of admission configurations follows a change a moment later."""

    def answered() -> bool:
        query = f"/api/v1/namespaces/{namespace}/pods?dryRun=All"
        return kube.request("POST", query, body)[0] == status and also()

    wait_for("the configuration to take effect", answered, seconds=10)


def create(kube: ControlPlane, namespace: str, body: dict[str, Any]) -> tuple[int, Any]:
    return kube.request("POST", f"/api/v1/namespaces/{namespace}/pods", body)


def init_names(stored: dict[str, Any]) -> list[str]:
    return [c["name"] for c in stored["spec"].get("initContainers") or ()]


def test_pods_the_policy_leaves_alone_never_reach_the_webhook(
    kube: ControlPlane, tmp_path: Path
) -> None:
    policy = policy_with_rules()
    with served(kube, tmp_path, policy=policy) as (server, name, label):
        version = load_policy(tmp_path / "policy" / "policy.yaml").version
        wait_for("publication", lambda: published(kube, name, version))
        free = selected_namespace(kube, label, "free")
        before = reviews(server)
        for index in range(200):
            status, answer = create(kube, free, pod(f"p{index}", app="web"))
            assert status == 201, answer
            assert "initContainers" not in answer["spec"]
        assert reviews(server) == before  # 200 pods, not one call
        # What the policy touches is still injected.
        status, annotated = create(kube, free, pod("asked", LOG))
        assert status == 201 and init_names(annotated) == ["log-watcher"], annotated
        by_default = selected_namespace(kube, label, "def")
        status, defaulted = create(kube, by_default, pod("defaulted"))
        assert status == 201 and init_names(defaulted) == ["log-watcher"], defaulted
        # (An injected pod is reviewed twice: reinvocationPolicy IfNeeded.)
        touched = reviews(server)
        assert touched >= before + 2
        # Without the conditions (removed by hand), every one of them is a call.
        kube.call(
            "PATCH",
            f"{CONFIGURATIONS}/{name}",
            [{"op": "remove", "path": "/webhooks/0/matchConditions"}],
            content_type="application/json-patch+json",
        )
        taking_effect(kube, free, pod("probe", app="web"), 201, lambda: reviews(server) > touched)
        touched = reviews(server)
        for index in range(20):
            assert create(kube, free, pod(f"q{index}", app="web"))[0] == 201
        assert reviews(server) >= touched + 20


@pytest.mark.parametrize(
    ("prefix", "annotations", "labels"),
    [
        ("free", {}, {"app": "web"}),
        ("free", {"example.com/owner": "a"}, {}),
        ("free", LOG, {}),
        ("free", {ann.INJECT: "false"}, {}),
        ("free", {ann.STATUS: "{}"}, {}),
        ("free", {"log-watcher.outrigger.dev/fluent-bit.yaml": "x"}, {}),
        ("def", {}, {}),
        ("def", {}, {"component": "operator"}),
        ("def", LOG, {"component": "operator"}),
        ("req", {ann.INJECT: "false"}, {}),
        ("req", {}, {"component": "operator"}),
    ],
)
def test_the_api_server_calls_the_webhook_exactly_when_the_compiler_says(
    kube: ControlPlane,
    tmp_path: Path,
    prefix: str,
    annotations: dict[str, str],
    labels: dict[str, str],
) -> None:
    policy = policy_with_rules()
    compiled = compile_policy(policy, None)
    with served(kube, tmp_path, policy=policy) as (server, name, label):
        version = load_policy(tmp_path / "policy" / "policy.yaml").version
        wait_for("publication", lambda: published(kube, name, version))
        namespace = selected_namespace(kube, label, prefix)
        before = reviews(server)
        status, answer = create(kube, namespace, pod("p", annotations, **labels))
        assert status in (201, 400, 403), answer
        called = reviews(server) > before
        expected, why = compiled.decides(Subject(namespace, labels, annotations))
        assert called is expected, why


def test_with_the_webhook_down_the_guard_refuses_only_what_a_rule_requires(
    kube: ControlPlane, tmp_path: Path
) -> None:
    with served(kube, tmp_path, failure_policy="Ignore") as (_server, name, label):
        version = load_policy(tmp_path / "policy" / "policy.yaml").version
        wait_for("publication", lambda: published(kube, name, version))
        required = selected_namespace(kube, label, "req")
        free = selected_namespace(kube, label, "free")
        opted_in = selected_namespace(kube, label, "opt")
        assert init_names(create(kube, required, pod("up"))[1]) == ["log-watcher"]
        hook = kube.call("GET", f"{CONFIGURATIONS}/{name}")
        hook["webhooks"][0]["clientConfig"]["url"] = "https://127.0.0.1:1/mutate"  # it is down
        kube.call("PUT", f"{CONFIGURATIONS}/{name}", hook)
        taking_effect(kube, required, pod("needs-logs"), 403)
        status, refused = create(kube, required, pod("needs-logs"))
        assert status == 403, refused
        message = refused["message"]
        assert 'rule "logs-required" requires the sidecar log-watcher' in message
        assert f"ValidatingAdmissionPolicy '{name}-guard'" in message
        # The label an exclude rule selects by lifts no require: the guard refuses that pod too.
        status, refused = create(kube, required, pod("operator", component="operator"))
        assert status == 403, refused
        assert 'rule "logs-required" requires the sidecar log-watcher' in refused["message"]
        status, created = create(kube, free, pod("plain", app="web"))
        assert status == 201, created
        status, unsidecared = create(kube, opted_in, pod("asked", LOG))
        assert status == 201 and "initContainers" not in unsidecared["spec"], unsidecared


class _StripsRestartPolicy(BaseHTTPRequestHandler):
    """Another mutating webhook that drops restartPolicy from the init containers, as
    kops#16802 and eks-pod-identity-webhook#208 did to native sidecars; reinvoked as needed."""

    def do_POST(self) -> None:
        review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        request = review["request"]
        patch = [
            {"op": "remove", "path": f"/spec/initContainers/{index}/restartPolicy"}
            for index, container in enumerate(request["object"]["spec"].get("initContainers", []))
            if "restartPolicy" in container
        ]
        response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
        if patch:
            encoded = base64.b64encode(json.dumps(patch).encode()).decode()
            response |= {"patchType": "JSONPatch", "patch": encoded}
        send_json(self, 200, {"apiVersion": review["apiVersion"], "kind": review["kind"],
                              "response": response})  # fmt: skip

    def log_message(self, *args: Any) -> None:
        pass


def test_a_webhook_that_strips_the_restart_policy_is_refused_by_the_guard(
    kube: ControlPlane, tmp_path: Path
) -> None:
    """With a native sidecar that has no preStop hook nor probe: where it has one, the API
    server's own validation refuses an init container without restartPolicy: Always (422,
    "may not be set for init containers without restartPolicy=Always")."""
    document = policy_with_rules().model_dump(mode="json")
    document["sidecars"][0]["nativePreStopSleep"] = None
    with served(kube, tmp_path, policy=parse_policy(document)) as (_server, name, label):
        version = load_policy(tmp_path / "policy" / "policy.yaml").version
        wait_for("publication", lambda: published(kube, name, version))
        other_server = ThreadingHTTPServer(("127.0.0.1", 0), _StripsRestartPolicy)
        with https_server(tmp_path, other_server) as (url, ca_file):
            other = configuration(url, ca_file, label, name=f"z-strip-{label}")
            other["webhooks"][0]["name"] = "strip.example.com"
            with registered(kube, other):
                namespace = selected_namespace(kube, label, "free")
                taking_effect(kube, namespace, pod("p", LOG), 403)
                status, refused = create(kube, namespace, pod("p", LOG))
    assert status == 403, refused
    assert (
        "the injected sidecar log-watcher is an init container without restartPolicy"
        in (refused["message"])
    )


def test_a_policy_change_through_the_configmap_is_followed(
    kube: ControlPlane, tmp_path: Path
) -> None:
    namespace = kube.namespace("policy")
    first_text = yaml.safe_dump(default_policy().model_dump(mode="json"))
    first = load_policy_text(first_text, "first")  # its version is the text's, as served
    kube.call(
        "POST",
        f"/api/v1/namespaces/{namespace}/configmaps",
        {"metadata": {"name": "policy"}, "data": {"policy.yaml": first_text}},
    )
    extra = ("--policy-configmap", f"{namespace}/policy")
    with served(kube, tmp_path, extra=extra) as (server, name, _label):
        wait_for("the first publication", lambda: published(kube, name, first.version))
        second_text = yaml.safe_dump(policy_with_rules().model_dump(mode="json"))
        second = load_policy_text(second_text, "second")
        kube.call(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/configmaps/policy",
            {"data": {"policy.yaml": second_text}},
            content_type="application/merge-patch+json",
        )
        wait_for("the change", lambda: published(kube, name, second.version), seconds=10)
        hook = kube.call("GET", f"{CONFIGURATIONS}/{name}")
        conditions = {c["name"]: c["expression"] for c in hook["webhooks"][0]["matchConditions"]}
        compiled = compile_policy(second, None)
        assert compiled.match_conditions is not None
        assert conditions == {c.name: c.expression for c in compiled.match_conditions}
        info = re.search(r"^outrigger_compiled_policy_info\{(.*)\} 1.0$", metrics(server), re.M)
        assert info and f'version="{second.version}"' in info.group(1), metrics(server)
        # Nothing else of the configuration is owned by the webhook's field manager.
        managers = [m for m in hook["metadata"]["managedFields"] if m["manager"] == FIELD_MANAGER]
        (owned,) = managers
        assert "f:matchConditions" in json.dumps(owned["fieldsV1"])
        assert "f:clientConfig" not in json.dumps(owned["fieldsV1"])


def test_with_the_charts_rbac_the_guard_is_kept_and_collected_with_its_configuration(
    kube_controllers: ControlPlane, helm: Path, tmp_path: Path
) -> None:
    from tests.test_self_tls import install

    kube = kube_controllers
    release = install(kube, helm)  # the chart's RBAC, its webhook configuration, a token
    try:
        account = release.docs["ServiceAccount"]["metadata"]["name"]
        config = kube.token_kubeconfig(tmp_path, release.namespace, account)
        policy_file = write_policy(tmp_path / "policy", policy_with_rules())
        version = load_policy(policy_file).version
        arguments = ("--policy", str(policy_file))
        with compiling_server(tmp_path / "serve", config, release.name, *arguments) as server:
            wait_for("publication", lambda: published(kube, release.name, version))
            guard = kube.call("GET", f"{POLICIES}/{release.name}-guard")
            log = server.log.read_text()
        assert "cannot" not in log and "forbidden" not in log.lower(), log
        (owner,) = guard["metadata"]["ownerReferences"]
        assert owner["kind"] == "MutatingWebhookConfiguration" and owner["name"] == release.name
        release.delete_webhook()
        wait_for(
            "the garbage collector",
            lambda: (
                kube.request("GET", f"{POLICIES}/{release.name}-guard")[0] == 404
                and kube.request("GET", f"{BINDINGS}/{release.name}-guard")[0] == 404
            ),
        )
    finally:
        release.remove()


def test_the_expression_limit_is_the_api_servers_and_a_policy_past_it_falls_back(
    kube: ControlPlane,
) -> None:
    def body(expression: str) -> dict[str, Any]:
        return {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "limit"},
            "webhooks": [
                {
                    "name": "limit.example.com",
                    "admissionReviewVersions": ["v1"],
                    "sideEffects": "None",
                    "clientConfig": {"url": "https://127.0.0.1:1/mutate"},
                    "matchConditions": [{"name": "long", "expression": expression}],
                }
            ],
        }

    literal = "'" + "a" * (MAX_EXPRESSION_CODE_POINTS - 20) + "'"
    at_limit = f"{literal} != ''"
    assert len(at_limit) <= MAX_EXPRESSION_CODE_POINTS
    status, answer = kube.request("POST", f"{CONFIGURATIONS}?dryRun=All", body(at_limit))
    assert status == 201, answer
    past = f"{literal} != 'aaaaaaaaaaaaaaaaaaaaa'"
    assert len(past) > MAX_EXPRESSION_CODE_POINTS
    status, answer = kube.request("POST", f"{CONFIGURATIONS}?dryRun=All", body(past))
    assert status == 422 and "exceeds limit" in answer["message"], answer
    document = copy.deepcopy(default_policy().model_dump(mode="json"))
    document["rules"] = [
        {"name": f"r{i}", "namespaces": [f"team-{i:05d}-*"], "inject": ["log-watcher"]}
        for i in range(2000)
    ]
    compiled = compile_policy(parse_policy(document), None)
    assert compiled.match_conditions is None and compiled.problems
