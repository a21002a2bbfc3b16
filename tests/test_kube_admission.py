"""The webhook called by a real kube-apiserver for pod creation.

`outrigger serve` runs for real and is registered by `url` with the configuration `outrigger
register` builds; the API server calls it, applies its JSON Patch, re-runs its own admission
plugins (ServiceAccount, LimitRanger) and defaults the pod, then stores it (or, with
`dryRun=All`, answers without storing). What each test then checks is the pod as the API
server stores it: injected once, valid, and seen by `inject` and `audit` as what the policy
renders (the false `mismatched` of issue 18 came from exactly that difference).
"""

from __future__ import annotations

import base64
import json
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import FIXTURES, validate_strict
from tests.fake_kube import https_server, send_json
from tests.kube_env import ControlPlane, free_port
from tests.kube_webhook import (
    CLASSIC,
    Webhook,
    configuration,
    new_selector,
    registered,
    running_webhook,
    selected_namespace,
)
from tests.test_properties import TOKEN_PATH, pods
from webhook.core.audit import classify
from webhook.core.injector import InjectionDenied, RequestContext, inject
from webhook.core.policy import load_policy
from webhook.core.selection import ALREADY_INJECTED

pytestmark = pytest.mark.kube

BOTH = {
    "outrigger.dev/inject": "log-watcher,ambassador",
    "outrigger.dev/ambassador-upstream": "payments.example.com:443",
}
LOG = {"outrigger.dev/inject": "log-watcher"}
# A namespace's LimitRange defaults every container's resources the pod did not set.
LIMIT_RANGE = {
    "metadata": {"name": "defaults"},
    "spec": {
        "limits": [
            {
                "type": "Container",
                "default": {"cpu": "300m", "memory": "200Mi"},
                "defaultRequest": {"cpu": "50m", "memory": "64Mi"},
            }
        ]
    },
}


def app_pod(name: str, annotations: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "registry.local/app:1.0"}], **spec},
    }


def create(kube: ControlPlane, namespace: str, pod: dict[str, Any], query: str = "") -> Any:
    return kube.call("POST", f"/api/v1/namespaces/{namespace}/pods{query}", pod)


def names(containers: list[dict[str, Any]] | None) -> list[str]:
    return [c["name"] for c in containers or ()]


@pytest.fixture(scope="module")
def webhooks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Webhook]]:
    """The webhook under each placement: native sidecars (the default) and classic."""
    root = tmp_path_factory.mktemp("webhooks")
    with (
        running_webhook(root / "native") as native,
        running_webhook(root / "classic", CLASSIC) as classic,
    ):
        yield {"native": native, "classic": classic}


@pytest.fixture(scope="module")
def selected(kube: ControlPlane, webhooks: dict[str, Webhook]) -> Iterator[dict[str, str]]:
    """Per placement, the label value that its registered configuration selects."""
    values = {placement: new_selector() for placement in webhooks}
    bodies = [
        configuration(hook.url, hook.server.cert_dir / "ca.crt", values[placement])
        for placement, hook in webhooks.items()
    ]
    with registered(kube, bodies[0]), registered(kube, bodies[1]):
        yield values


@pytest.mark.parametrize("placement", ["native", "classic"])
@pytest.mark.parametrize("limit_range", [False, True], ids=["plain", "limitrange"])
def test_a_pod_the_webhook_injected_is_fine_as_the_api_server_stores_it(
    kube: ControlPlane,
    webhooks: dict[str, Webhook],
    selected: dict[str, str],
    placement: str,
    limit_range: bool,
) -> None:
    namespace = selected_namespace(kube, selected[placement])
    if limit_range:
        kube.call("POST", f"/api/v1/namespaces/{namespace}/limitranges", LIMIT_RANGE)
    stored = create(kube, namespace, app_pod("web", BOTH))
    policy = webhooks[placement].policy
    sidecars = stored["spec"]["initContainers" if placement == "native" else "containers"]
    assert {"log-watcher", "ambassador"} <= set(names(sidecars))
    if limit_range:  # the app's resources came from the LimitRange, the sidecars' from us
        assert stored["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "300m"
    validate_strict(stored)
    assert classify(stored, namespace, policy) is None
    again = inject(stored, RequestContext(namespace), policy)
    assert (again.reason, again.pod) == (ALREADY_INJECTED, stored)


def reviews(webhook: Webhook) -> float:
    """The reviews the webhook has answered, by its /metrics."""
    url = webhook.server.ip_url + "/metrics"
    with urllib.request.urlopen(url, context=webhook.server.trusting_ca()) as answer:
        text = answer.read().decode()
    lines = text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(REVIEWS + "{"))


REVIEWS = "outrigger_admission_reviews_total"


@pytest.mark.parametrize("placement", ["native", "classic"])
def test_the_api_server_calls_the_webhook_once_per_pod(
    kube: ControlPlane, webhooks: dict[str, Webhook], selected: dict[str, str], placement: str
) -> None:
    """The sidecars get the token mount the ServiceAccount plugin gives every container, as
    the plugin writes it: run again after the webhook, the plugin changes nothing, so the API
    server does not call the webhook a second time (`reinvocationPolicy: IfNeeded`), and the
    pod is stored as it would be had the plugin mounted it."""
    namespace = selected_namespace(kube, selected[placement])
    before = reviews(webhooks[placement])
    stored = create(kube, namespace, app_pod("once", BOTH))
    assert reviews(webhooks[placement]) - before == 1
    spec = stored["spec"]
    (token,) = [v["name"] for v in spec["volumes"] if v["name"].startswith("kube-api-access-")]
    mount = {"name": token, "readOnly": True, "mountPath": TOKEN_PATH}
    for container in [*spec["containers"], *spec.get("initContainers", ())]:
        assert [m for m in container["volumeMounts"] if m["mountPath"] == TOKEN_PATH] == [mount]
    assert len(spec["containers"]) + len(spec.get("initContainers", ())) == 3


@pytest.mark.parametrize("placement", ["native", "classic"])
def test_a_pod_injected_by_the_cli_then_created_is_fine(
    kube: ControlPlane, webhooks: dict[str, Webhook], placement: str
) -> None:
    """`outrigger inject`'s output applied with kubectl: here the ServiceAccount plugin runs
    after the injection, so the token volume and mounts come last, and sidecars get them too."""
    namespace = kube.namespace()  # not selected: the webhook is not called
    policy = webhooks[placement].policy
    injected = inject(app_pod("job", BOTH), RequestContext(namespace), policy).pod
    stored = create(kube, namespace, injected)
    assert stored["spec"]["volumes"][-1]["name"].startswith("kube-api-access-")
    assert classify(stored, namespace, policy) is None
    assert inject(stored, RequestContext(namespace), policy).reason == ALREADY_INJECTED


def test_a_stored_pod_shipping_to_loki_is_injected_already(kube: ControlPlane) -> None:
    """Under the docs' platform policy, a pod picking its Loki output (env from the
    downward API and a Secret, the CA Secret's volume) as the API server stores it: valid, and
    what the policy renders once the API server's defaults are allowed for."""
    namespace = kube.namespace()
    policy = load_policy(FIXTURES / "policies" / "good-platform-team.yaml")
    pod = app_pod("shop", {**LOG, "outrigger.dev/log-output": "loki"})
    stored = create(kube, namespace, inject(pod, RequestContext(namespace), policy).pod)
    watcher = stored["spec"]["initContainers"][0]
    assert watcher["env"][0]["valueFrom"]["fieldRef"] == {
        "apiVersion": "v1",  # defaulted by the API server
        "fieldPath": "metadata.name",
    }
    ca = next(v for v in stored["spec"]["volumes"] if v["name"] == "log-watcher-output-ca")
    assert ca["secret"]["defaultMode"] == 0o644  # likewise
    validate_strict(stored)
    assert classify(stored, namespace, policy) is None
    again = inject(stored, RequestContext(namespace), policy)
    assert (again.reason, again.pod) == (ALREADY_INJECTED, stored)


def test_a_tampered_stored_pod_is_still_mismatched(
    kube: ControlPlane, webhooks: dict[str, Webhook]
) -> None:
    """The tolerance for what the API server adds lets nothing else through."""
    namespace = kube.namespace()
    policy = webhooks["native"].policy
    injected = inject(app_pod("web", LOG), RequestContext(namespace), policy).pod
    tampered = json.loads(json.dumps(injected))
    tampered["spec"]["initContainers"][0]["securityContext"]["runAsUser"] = 0
    stored = create(kube, namespace, tampered)
    finding = classify(stored, namespace, policy)
    assert finding is not None and finding.kind == "mismatched"


def test_dry_run_answers_the_injected_pod_and_stores_nothing(
    kube: ControlPlane, selected: dict[str, str]
) -> None:
    namespace = selected_namespace(kube, selected["native"])
    answer = create(kube, namespace, app_pod("dry", LOG), "?dryRun=All")
    assert names(answer["spec"]["initContainers"]) == ["log-watcher"]
    status, _ = kube.request("GET", f"/api/v1/namespaces/{namespace}/pods/dry")
    assert status == 404


def test_an_invalid_annotation_is_denied_naming_it(
    kube: ControlPlane, selected: dict[str, str]
) -> None:
    namespace = selected_namespace(kube, selected["native"])
    bad = app_pod("bad", {**LOG, "outrigger.dev/log-watcher-stop-delay": "forever"})
    status, answer = kube.request("POST", f"/api/v1/namespaces/{namespace}/pods", bad)
    assert status == 400, answer
    message = answer["message"]
    assert 'admission webhook "inject.outrigger.dev" denied the request' in message
    assert "outrigger.dev/log-watcher-stop-delay" in message


def test_a_pod_without_annotations_is_stored_as_sent(
    kube: ControlPlane, selected: dict[str, str]
) -> None:
    namespace = selected_namespace(kube, selected["native"])
    stored = create(kube, namespace, app_pod("plain", {}))
    assert "initContainers" not in stored["spec"]
    assert names(stored["spec"]["containers"]) == ["app"]
    assert "outrigger.dev/status" not in (stored["metadata"].get("annotations") or {})


# Reinvocation behind a second mutating webhook ------------------------------------------------


class _AddsAnAgent(BaseHTTPRequestHandler):
    """Another mutating webhook, called after Outrigger (its configuration sorts later): it
    adds a container of its own, as a monitoring agent's injector does, once."""

    calls: list[str] = []  # noqa: RUF012 (the test reads it)

    def do_POST(self) -> None:
        review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        request = review["request"]
        pod = request["object"]
        self.calls.append(",".join(names(pod["spec"].get("containers"))))
        response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
        if "agent" not in names(pod["spec"]["containers"]):
            agent = {"name": "agent", "image": "registry.local/app:1.0"}
            patch = [{"op": "add", "path": "/spec/containers/-", "value": agent}]
            response |= {"patchType": "JSONPatch", "patch": _b64(patch)}
        send_json(
            self, 200, {**{k: review[k] for k in ("apiVersion", "kind")}, "response": response}
        )

    def log_message(self, *args: Any) -> None:
        pass


def _b64(patch: list[dict[str, Any]]) -> str:
    return base64.b64encode(json.dumps(patch).encode()).decode()


def test_reinvoked_after_another_webhook_the_pod_is_injected_once(
    kube: ControlPlane, webhooks: dict[str, Webhook], tmp_path: Path
) -> None:
    """Outrigger injects first; the other webhook adds a container; the API server calls
    Outrigger again (reinvocationPolicy: IfNeeded), which shares the log volume with the new
    container and adds nothing twice."""
    label = "r" + new_selector()
    ours = configuration(
        webhooks["native"].url,
        webhooks["native"].server.cert_dir / "ca.crt",
        label,
        name=f"a-outrigger-{label}",
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AddsAnAgent)
    _AddsAnAgent.calls = []
    with https_server(tmp_path, server) as (url, ca_file):
        other = configuration(url, ca_file, label, name=f"z-agent-{label}")
        other["webhooks"][0] |= {"name": "agent.example.com", "reinvocationPolicy": "Never"}
        with registered(kube, ours), registered(kube, other):
            namespace = selected_namespace(kube, label)
            stored = create(kube, namespace, app_pod("web", LOG))
    assert _AddsAnAgent.calls == ["app"]  # once: its native sidecar is no app container
    assert names(stored["spec"]["initContainers"]) == ["log-watcher"]
    assert names(stored["spec"]["containers"]) == ["app", "agent"]
    for container in stored["spec"]["containers"]:
        mounts = [m["name"] for m in container["volumeMounts"]]
        assert mounts.count("shared-logs") == 1, container
    assert classify(stored, namespace, webhooks["native"].policy) is None


# failurePolicy while the webhook is down ------------------------------------------------------


@pytest.mark.parametrize("failure_policy", ["Fail", "Ignore"])
def test_failure_policy_when_the_webhook_is_down(
    kube: ControlPlane, webhooks: dict[str, Webhook], failure_policy: str
) -> None:
    label = "d" + new_selector()
    nowhere = f"https://127.0.0.1:{free_port()}/mutate"  # nothing listens there
    body = configuration(
        nowhere, webhooks["native"].server.cert_dir / "ca.crt", label, failure_policy=failure_policy
    )
    with registered(kube, body):
        namespace = selected_namespace(kube, label)
        status, answer = kube.request(
            "POST", f"/api/v1/namespaces/{namespace}/pods", app_pod("web", LOG)
        )
    if failure_policy == "Fail":
        assert status == 500, answer
        assert 'failed calling webhook "inject.outrigger.dev"' in answer["message"]
    else:
        assert status == 201, answer
        assert "initContainers" not in answer["spec"]  # created, without its sidecar


# Idempotence for any pod, as the real API server stores it --------------------------------


def _valid_keys(pod: dict[str, Any]) -> dict[str, Any]:
    """Without the generator's annotation key that the API server refuses (a `~` and two
    `/`: there to test the patch's escaping)."""
    annotations = pod["metadata"].get("annotations")
    if annotations:
        annotations.pop("example.com/a~b/c", None)
    return pod


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    pod=pods().map(_valid_keys),
    placement=st.sampled_from(["native", "classic"]),
    through=st.booleans(),
)
def test_any_injected_pod_as_the_api_server_stores_it_is_injected_already(
    kube: ControlPlane,
    webhooks: dict[str, Webhook],
    selected: dict[str, str],
    pod: dict[str, Any],
    placement: str,
    through: bool,
) -> None:
    """Generated pods, injected by the webhook (`through`) or beforehand by `inject` (the
    ServiceAccount plugin then runs after the injection), created with `dryRun=All`: the
    answer is the pod as it would be stored, and injecting it again changes nothing."""
    policy = webhooks[placement].policy
    namespaces = _namespaces(kube, selected)
    namespace = namespaces[placement if through else "none"]
    try:
        sent = pod if through else inject(pod, RequestContext(namespace), policy).pod
    except InjectionDenied:
        event("denied by inject")
        return
    status, stored = kube.request("POST", f"/api/v1/namespaces/{namespace}/pods?dryRun=All", sent)
    if status == 400 and through:  # denied by the webhook, as `inject` would
        assert "denied the request" in stored["message"], stored
        event("denied by the webhook")
        return
    if status == 422:  # invalid: so must the pod as generated be, before any injection
        plain, _ = kube.request(
            "POST", f"/api/v1/namespaces/{namespaces['none']}/pods?dryRun=All", pod
        )
        assert plain == 422, stored["message"]
        event("invalid as generated")
        return
    assert status == 201, stored["message"]
    again = inject(stored, RequestContext(namespace), policy)
    assert again.pod == stored, again.explanation
    if "outrigger.dev/status" in stored["metadata"].get("annotations", {}):
        event("stored injected")
        assert again.reason == ALREADY_INJECTED


_NAMESPACES: dict[str, str] = {}


def _namespaces(kube: ControlPlane, selected: dict[str, str]) -> dict[str, str]:
    """One namespace per placement that its webhook selects, and one no webhook selects,
    made once for every example."""
    if not _NAMESPACES:
        _NAMESPACES.update({p: selected_namespace(kube, value) for p, value in selected.items()})
        _NAMESPACES["none"] = kube.namespace()
    return _NAMESPACES


@pytest.mark.parametrize("placement", ["native", "classic"])
@pytest.mark.parametrize("grace", [0, 1, 3, 12])
def test_a_short_grace_period_shortens_the_sleeps_the_api_server_would_refuse(
    kube: ControlPlane, selected: dict[str, str], placement: str, grace: int
) -> None:
    """The API server refuses a preStop sleep longer than terminationGracePeriodSeconds (found
    by the property above): the webhook shortens it to the grace period, none for 0, and
    warns; the pod is admitted."""
    namespace = selected_namespace(kube, selected[placement])
    sent = app_pod("web", BOTH, terminationGracePeriodSeconds=grace)
    stored = create(kube, namespace, sent, "?dryRun=All")
    spec = stored["spec"]
    sidecars = spec["initContainers"] if placement == "native" else spec["containers"][1:]
    sleeps = {
        c["name"]: c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
        for c in sidecars
    }
    wanted = {"native": {"log-watcher": 3}, "classic": {"log-watcher": 10, "ambassador": 5}}
    expected = {
        name: (min(seconds, grace) or None) if name in wanted[placement] else None
        for name, seconds in {"log-watcher": 0, "ambassador": 0, **wanted[placement]}.items()
    }
    assert sleeps == expected
