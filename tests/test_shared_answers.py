"""Pods that differ only in what the injector never reads share one memoised answer.

The API server makes every pod's name and token volume different, a StatefulSet's or an
indexed Job's controller gives each replica labels of its own (`statefulset.kubernetes.io/
pod-name`, `apps.kubernetes.io/pod-index`, `batch.kubernetes.io/job-completion-index`), and
each revision of a workload has annotations of its own (`kubectl.kubernetes.io/restartedAt`,
a Helm chart's `checksum/config`). None of these changes what is injected (a label does
where a rule selects on it); `tests/test_properties.py` checks, for generated pods, that the
answer is the one the whole pod gives.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import FIXTURES, admission_review
from webhook.admission import review as envelope
from webhook.core.injector import Injection, RequestContext, inject
from webhook.core.patch import diff
from webhook.core.policy import Policy, default_policy, load_policy
from webhook.limits import Recent

DEFAULT = default_policy()
PLATFORM = load_policy(FIXTURES / "policies" / "good-platform-team.yaml")


def replica(index: int, **labels: str) -> dict[str, Any]:
    """The `index`th pod of StatefulSet web, as its controller and the API server make it."""
    token = f"kube-api-access-{index:05d}"
    mount = {"name": token, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}
    return {
        "metadata": {
            "name": f"web-{index}",
            "labels": {
                "app": "web",
                "statefulset.kubernetes.io/pod-name": f"web-{index}",
                "apps.kubernetes.io/pod-index": str(index),
                **labels,
            },
            "annotations": {"outrigger.dev/inject": "log-watcher"},
        },
        "spec": {
            "containers": [
                {"name": "app", "image": "registry.example.com/app:1", "volumeMounts": [mount]}
            ],
            "volumes": [{"name": token, "projected": {"sources": []}}],
        },
    }


def answered(
    pod: dict[str, Any], policy: Policy, namespace: str = "shop"
) -> tuple[dict[str, Any], list[Any]]:
    body = orjson.dumps(admission_review(pod, namespace=namespace))
    status, answer = envelope.review(body, policy)
    assert status == 200
    response: dict[str, Any] = orjson.loads(answer)["response"]
    patch = orjson.loads(base64.b64decode(response["patch"])) if "patch" in response else []
    return response, patch


def misses() -> int:
    return envelope.ANSWERS.misses


@pytest.mark.parametrize("policy", [DEFAULT, PLATFORM], ids=["default", "platform"])
def test_the_replicas_of_a_statefulset_share_one_answer(policy: Policy) -> None:
    envelope.ANSWERS.clear()
    first, patch = answered(replica(0), policy)
    assert first["allowed"] and patch, first
    # The sidecar holds the token mount the ServiceAccount plugin would add after the
    # webhook (so that the API server does not call again), named as the pod's volume.
    (sidecars,) = [op["value"] for op in patch if op["path"] == "/spec/initContainers"]
    assert sidecars[0]["volumeMounts"][-1] == {
        "name": "kube-api-access-00000",
        "readOnly": True,
        "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
    }
    before = misses()
    for index in range(1, 6):
        _, again = answered(replica(index), policy)
        # The token volume's own name is in the patch (the log-watcher's mounts sit beside
        # it): only that differs.
        assert again == orjson.loads(
            orjson.dumps(patch).replace(
                b"kube-api-access-00000", f"kube-api-access-{index:05d}".encode()
            )
        )
    assert misses() == before


def test_a_label_a_rule_selects_on_still_makes_its_own_answer() -> None:
    """The platform policy's `frontend` rule requires the log-watcher for `tier: frontend`
    pods of prod-* namespaces, and its `operator` rule excludes
    `app.kubernetes.io/component: operator` ones."""
    envelope.ANSWERS.clear()
    plain = replica(0)
    del plain["metadata"]["annotations"]
    assert "patch" not in answered(plain, PLATFORM, "prod-eu")[0]
    frontend = replica(1, tier="frontend")
    del frontend["metadata"]["annotations"]
    _, patch = answered(frontend, PLATFORM, "prod-eu")
    assert any(op["path"] == "/spec/initContainers" for op in patch), patch
    operator = replica(2, **{"app.kubernetes.io/component": "operator"})
    assert "patch" not in answered(operator, PLATFORM)[0]
    assert "patch" in answered(replica(3), PLATFORM)[0]


def test_the_revisions_of_a_workload_share_one_answer() -> None:
    """`kubectl rollout restart` and a Helm chart's config checksum annotate each revision."""
    envelope.ANSWERS.clear()
    first = replica(0)
    first["metadata"]["annotations"]["checksum/config"] = "0" * 64
    _, patch = answered(first, DEFAULT)
    before = misses()
    for revision in range(1, 4):
        pod = replica(0)
        pod["metadata"]["annotations"].update(
            {"kubectl.kubernetes.io/restartedAt": f"2026-12-07T10:0{revision}:00Z"}
        )
        pod["metadata"]["annotations"]["checksum/config"] = str(revision) * 64
        assert answered(pod, DEFAULT)[1] == patch
    assert misses() == before


def test_an_annotation_a_template_writes_still_makes_its_own_answer() -> None:
    """A pod that already holds the log-watcher's configuration annotation gets it replaced,
    not added: that annotation stays in what the answer is memoised on."""
    envelope.ANSWERS.clear()
    policy = DEFAULT
    path = "/metadata/annotations/" + policy.templates["log-watcher"].config_annotation.replace(
        "/", "~1"
    )
    _, patch = answered(replica(0), policy)
    assert [op["op"] for op in patch if op["path"] == path] == ["add"]
    holding = replica(0)
    holding["metadata"]["annotations"][policy.templates["log-watcher"].config_annotation] = "x"
    _, replaced = answered(holding, policy)
    assert [op["op"] for op in replaced if op["path"] == path] == ["replace"]


def test_the_placeholder_named_otherwise_in_the_patch_is_never_replaced() -> None:
    """A memoised answer names each pod's token volume by replacing the placeholder, but only
    where the placeholder names token mounts alone: here a container named so (a name the API
    server would refuse, but after the webhooks) is listed in the log-watcher's
    configuration, and the answer is made from the pod as sent."""
    pod = replica(3)
    pod["spec"]["containers"][0]["name"] = "kube-api-access-*"
    pod["metadata"]["annotations"]["outrigger.dev/log-output"] = "loki"
    response, patch = answered(pod, PLATFORM)
    assert response["allowed"]
    written = orjson.dumps(patch)
    assert written.count(b"kube-api-access-*") == 1  # the container's name, in the config
    assert written.count(b"kube-api-access-00003") == 1  # the log-watcher's token mount


@pytest.mark.parametrize("suffix", ['q"\\x', "\u00e9t\u00e9", "a" * 3000])
def test_a_token_volume_of_any_name_is_written_as_json(suffix: str) -> None:
    """The name joined into a memoised patch is escaped as orjson writes a string (the API
    server validates names only after the webhooks)."""
    token = f"kube-api-access-{suffix}"
    pod = replica(4)
    pod["spec"]["volumes"][0]["name"] = token
    pod["spec"]["containers"][0]["volumeMounts"][0]["name"] = token
    response, patch = answered(pod, DEFAULT)
    assert response["allowed"]
    (sidecars,) = [op["value"] for op in patch if op["path"] == "/spec/initContainers"]
    assert sidecars[0]["volumeMounts"][-1]["name"] == token


def test_a_token_volume_name_that_makes_the_patch_too_large_is_denied() -> None:
    """Its normalised pod's patch is small; named, it would pass MAX_PATCH_BYTES."""
    token = "kube-api-access-" + "a" * envelope.MAX_PATCH_BYTES
    pod = replica(5)
    pod["spec"]["volumes"][0]["name"] = token
    pod["spec"]["containers"][0]["volumeMounts"][0]["name"] = token
    response, _ = answered(pod, DEFAULT)
    assert not response["allowed"]
    assert "more than the 524288 accepted" in response["status"]["message"]


_PIECES = [
    envelope._PLACEHOLDER,
    envelope._PLACEHOLDER_MOUNT,
    envelope._PLACEHOLDER_MOUNT[:-1],  # a mount cut short
    envelope._MOUNT_BEFORE + envelope._PLACEHOLDER,  # the mount's start alone
    envelope._PLACEHOLDER + envelope._MOUNT_AFTER,  # its end alone
    b"*",
    b"kube-api-access-",
    b'{"op":"add","path":"/spec/initContainers","value":[',
    b"**",
]


@given(st.lists(st.one_of(st.sampled_from(_PIECES), st.binary(max_size=12)), max_size=12))
def test_the_split_at_the_placeholder_is_bytes_split(pieces: list[bytes]) -> None:
    """The patch is split at the placeholder as `bytes.split` splits it, and found to name
    token mounts alone exactly where it is as often in a mount as in the whole."""
    operations = b"".join(pieces)
    parts, in_mounts_only = envelope.split_at_placeholder(operations)
    assert parts == operations.split(envelope._PLACEHOLDER)
    mounts = operations.count(envelope._PLACEHOLDER_MOUNT)
    assert in_mounts_only == (mounts == len(parts) - 1)


def shaped(app_name: str, **security: int) -> dict[str, Any]:
    """A new shape of pod: `replica(0)` with its app container named `app_name`."""
    pod = replica(0)
    pod["metadata"]["annotations"]["outrigger.dev/inject"] = "log-watcher,ambassador"
    pod["metadata"]["annotations"]["outrigger.dev/ambassador-upstream"] = "api.example.com:443"
    pod["spec"]["containers"][0]["name"] = app_name
    if security:
        pod["spec"]["securityContext"] = security
    return pod


def injected_sidecars(injection: Injection) -> list[dict[str, Any]]:
    return list(injection.pod["spec"]["initContainers"])


def test_new_pods_that_ask_alike_share_their_sidecars_and_their_json() -> None:
    """Pods of new shapes (here a new app container name each, and their token volumes named
    as the answers name them) get the very sidecar containers the pods before them got,
    whose JSON is written once (`Injection.written`), and their patches hold that JSON."""
    first, second = (
        inject(orjson.loads(pod_json(shaped(name))), RequestContext("shop"), DEFAULT)
        for name in ("app", "api")
    )
    assert [id(c) for c in injected_sidecars(first)] == [id(c) for c in injected_sidecars(second)]
    assert [(id(c), json) for c, json in second.written] == [
        (id(c), orjson.dumps(c)) for c in injected_sidecars(second)
    ]
    envelope.ANSWERS.clear()
    for name in ("web", "worker"):
        pod = shaped(name)
        _, patch = answered(pod, DEFAULT)
        assert patch == diff(pod, inject(pod, RequestContext("shop"), DEFAULT).pod)


def test_a_sidecar_made_for_one_pod_is_its_own() -> None:
    """The log-watcher runs as the app's user, so pods of other users get other containers:
    nothing of one pod's sidecars is kept for the next."""
    root, other = (
        inject(shaped("app", runAsUser=user, runAsGroup=user), RequestContext("shop"), DEFAULT)
        for user in (1000, 2000)
    )
    watchers = [injected_sidecars(injection)[0] for injection in (root, other)]
    assert [w["securityContext"]["runAsUser"] for w in watchers] == [1000, 2000]
    for injection in (root, other):
        for container, json in injection.written:
            assert orjson.loads(json) == container


def pod_json(pod: dict[str, Any]) -> bytes:
    """The pod as a review hands it to `mutation` (its token volume named the placeholder)."""
    request = envelope.decode_review(orjson.dumps(admission_review(pod, namespace="shop")))
    assert request.pod_json is not None
    return request.pod_json


def test_recent_keeps_the_last_used_values() -> None:
    recent: Recent[str, int] = Recent(2)
    recent.keep("a", 1)
    recent.keep("b", 2)
    assert recent.get("a") == 1  # now the most recently used
    recent.keep("c", 3)
    assert (recent.get("b"), recent.get("a"), recent.get("c")) == (None, 1, 3)
    assert recent.misses == 1
    recent.keep("a", 4)
    assert recent.get("a") == 4
    recent.clear()
    assert recent.get("a") is None
