"""Issue 21 on the real kube-apiserver (v1.36.2 here): what Outrigger injected into Windows pods
and pods with pod-level resources was refused, and what it injects now is accepted.

Each pod is the webhook's answer (the whole envelope, `review`) applied to the request, created
with `dryRun=All`: the API server's defaulting, admission and validation run, nothing is stored.
"""

from __future__ import annotations

import base64
import copy
import random
from decimal import Decimal
from typing import Any

import jsonpatch
import orjson
import pytest

from tests.conftest import FIXTURES, admission_review
from tests.kube_env import ControlPlane
from webhook.admission.review import review
from webhook.core.injector import RequestContext, inject
from webhook.core.podresources import canonical
from webhook.core.policy import Policy, default_policy, load_policy, parse_policy
from webhook.core.selection import ALREADY_INJECTED

pytestmark = pytest.mark.kube

TEAM = load_policy(FIXTURES / "policies" / "good-platform-team.yaml")
CLASSIC = parse_policy({**default_policy().model_dump(mode="json"), "nativeSidecars": False})
BOTH = {
    "outrigger.dev/inject": "log-watcher,ambassador",
    "outrigger.dev/ambassador-upstream": "api.example.com:443",
}
# The pod and its one app container alike: no room left for a sidecar.
SIZED = {
    "requests": {"cpu": "100m", "memory": "64Mi"},
    "limits": {"cpu": "500m", "memory": "256Mi"},
}


@pytest.fixture(scope="module")
def namespace(kube: ControlPlane) -> str:
    return kube.namespace("fit")


def app_pod(annotations: dict[str, str], **spec: Any) -> dict[str, Any]:
    app = {"name": "app", "image": "registry.example.com/app:1"}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "app", "annotations": annotations},
        "spec": {"containers": [app], **spec},
    }


def answer(pod: dict[str, Any], namespace: str, policy: Policy) -> dict[str, Any]:
    status, body = review(orjson.dumps(admission_review(pod, namespace=namespace)), policy)
    assert status == 200
    response: dict[str, Any] = orjson.loads(body)["response"]
    return response


def applied(pod: dict[str, Any], namespace: str, policy: Policy) -> dict[str, Any]:
    """The pod with the webhook's patch applied, as the API server applies it."""
    response = answer(pod, namespace, policy)
    assert response["allowed"] and "patch" in response, response
    result: dict[str, Any] = jsonpatch.apply_patch(
        pod, orjson.loads(base64.b64decode(response["patch"]))
    )
    return result


def dry_run(kube: ControlPlane, namespace: str, pod: dict[str, Any]) -> tuple[int, Any]:
    return kube.request("POST", f"/api/v1/namespaces/{namespace}/pods?dryRun=All", pod)


# Windows --------------------------------------------------------------------------------------


def test_injected_sidecars_are_refused_in_a_windows_pod(kube: ControlPlane, namespace: str) -> None:
    """What the webhook injected before: its securityContext is Linux-only."""
    linux = applied(app_pod({"outrigger.dev/inject": "log-watcher"}), namespace, default_policy())
    windows = copy.deepcopy(linux)
    windows["spec"]["os"] = {"name": "windows"}
    status, refusal = dry_run(kube, namespace, windows)
    assert status == 422, refusal
    causes = {(c["field"], c["message"]) for c in refusal["details"]["causes"]}
    forbidden = "Forbidden: cannot be set for a windows pod"
    for field in ("runAsUser", "runAsGroup", "seccompProfile", "capabilities"):
        assert (f"spec.initContainers[0].securityContext.{field}", forbidden) in causes


def test_a_windows_pod_is_denied_what_it_asks_for_and_spared_a_rule_default(
    kube: ControlPlane, namespace: str
) -> None:
    asked = answer(app_pod(BOTH, os={"name": "windows"}), namespace, default_policy())
    assert not asked["allowed"]
    assert asked["status"]["message"].startswith(
        "outrigger: log-watcher cannot be injected into a Windows pod (spec.os.name: windows)"
    )
    upstream = {"outrigger.dev/ambassador-upstream": "payments.example.com:443"}
    spared = app_pod(upstream, os={"name": "windows"})
    response = answer(spared, "payments", TEAM)  # rule payments-egress: ambassador by default
    assert response["allowed"] and "patch" not in response
    assert "not injected into this Windows pod" in response["warnings"][0]
    status, created = dry_run(kube, namespace, spared)
    assert status == 201, created


# Pod-level resources --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "refusals"),
    [
        (
            default_policy(),
            [
                'spec.resources.requests[cpu]: Invalid value: "100m": must be greater than or '
                "equal to aggregate container requests of 160m",
                'spec.resources.requests[memory]: Invalid value: "64Mi": must be greater than or '
                "equal to aggregate container requests of 160Mi",
            ],
        ),
        (
            CLASSIC,  # the sidecars in spec.containers: each limit within the pod's too
            [
                'spec.resources.requests[cpu]: Invalid value: "100m": must be greater than or '
                "equal to aggregate container requests of 160m",
                'spec.resources.containers[2][cpu].limits: Invalid value: "1": must be less '
                "than or equal to pod limits of 500m",
            ],
        ),
    ],
    ids=["native", "classic"],
)
def test_raised_pod_level_resources_are_accepted_and_the_unraised_refused(
    kube: ControlPlane, namespace: str, policy: Policy, refusals: list[str]
) -> None:
    # Two copies: jsonpatch would change the app's as well if the pod's were the same dict.
    app = {"name": "app", "image": "registry.example.com/app:1", "resources": copy.deepcopy(SIZED)}
    sent = app_pod(BOTH, resources=copy.deepcopy(SIZED), containers=[app])
    injected = applied(sent, namespace, policy)
    status, created = dry_run(kube, namespace, injected)
    assert status == 201, created
    assert created["spec"]["resources"] == injected["spec"]["resources"]  # stored as written
    again = inject(created, RequestContext(namespace), policy)
    assert again.reason == ALREADY_INJECTED  # the API server's form of it, injected once
    unraised = {**injected, "spec": {**injected["spec"], "resources": sent["spec"]["resources"]}}
    status, refusal = dry_run(kube, namespace, unraised)
    assert status == 422, refusal
    for message in refusals:
        assert message in refusal["message"]


def test_the_api_server_stores_each_value_as_it_is_written(
    kube: ControlPlane, namespace: str
) -> None:
    """`canonical` is the API server's own form: a pod full of its values comes back as is."""
    draw = random.Random(21)
    values = [Decimal(draw.randrange(1, 10 ** draw.randrange(1, 13))) for _ in range(60)]
    values += [Decimal(2**40), Decimal(3 * 2**20), Decimal(10**9), Decimal(1536), Decimal(1)]
    containers = []
    for index in range(0, len(values), 3):
        cpu, memory, storage = (values[index : index + 3] + [Decimal(1)] * 2)[:3]
        requests = {
            "cpu": canonical(cpu.scaleb(-6), "cpu"),  # from 1 micro-core to a million cores
            "memory": canonical(memory, "memory"),
            "ephemeral-storage": canonical(storage, "ephemeral-storage"),
        }
        containers.append(
            {"name": f"c{index}", "image": "x:1", "resources": {"requests": requests}}
        )
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "q"}, "spec": {}}
    pod["spec"]["containers"] = containers
    status, created = dry_run(kube, namespace, pod)
    assert status == 201, created
    assert [c["resources"] for c in created["spec"]["containers"]] == [
        c["resources"] for c in containers
    ]


def test_a_sidecar_without_a_limit_raises_the_pod_limit_by_its_request(
    kube: ControlPlane, namespace: str
) -> None:
    """Else the pod's raised requests would pass its limits; and a sidecar with a limit alone
    adds it to the requests, as the API server makes its request that limit."""
    document = default_policy().model_dump(mode="json")
    document["containerDefaults"]["resources"] = {}
    watcher, ambassador = (s["container"] for s in document["sidecars"])
    watcher["resources"] = {"requests": {"cpu": "10m", "memory": "32Mi"}}
    ambassador["resources"] = {"limits": {"cpu": "1", "memory": "256Mi"}}
    policy = parse_policy(document)
    guaranteed = {"requests": {"cpu": "500m"}, "limits": {"cpu": "500m"}}
    sent = app_pod(BOTH, resources=copy.deepcopy(guaranteed))
    injected = applied(sent, namespace, policy)
    assert injected["spec"]["resources"] == {
        "requests": {"cpu": "1510m"},
        "limits": {"cpu": "1510m"},
    }
    status, created = dry_run(kube, namespace, injected)
    assert status == 201, created
    by_limits_alone = {"requests": {"cpu": "1510m"}, "limits": {"cpu": "1500m"}}
    status, refusal = dry_run(
        kube, namespace, {**injected, "spec": {**injected["spec"], "resources": by_limits_alone}}
    )
    assert status == 422, refusal
    assert (
        'spec.resources.requests: Invalid value: "1510m": must be less than or equal to cpu '
        "limit of 1500m"
    ) in refusal["message"]
