"""The policy at work through the whole admission envelope: rules, native sidecars, what
annotations may and may not do, and the restricted Pod Security Standard."""

from __future__ import annotations

import base64
import copy
from typing import Any

import jsonpatch
import orjson
import pytest

from tests.conftest import FIXTURES, admission_review, as_pod, validate_strict
from webhook.admission.review import review
from webhook.core.injector import RequestContext, inject
from webhook.core.patch import diff
from webhook.core.policy import Policy, PolicyError, default_policy, load_policy, parse_policy

TEAM = load_policy(FIXTURES / "policies" / "good-platform-team.yaml")
UPSTREAM = {"outrigger.dev/ambassador-upstream": "payments.example.com:443"}


def pod(
    annotations: dict[str, str] | None = None, labels: dict[str, str] | None = None, **spec: Any
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"generateName": "web-", "labels": labels or {"app": "web"}}
    if annotations is not None:
        metadata["annotations"] = annotations
    containers = spec.pop("containers", [{"name": "app", "image": "registry.example.com/app:1"}])
    return {"metadata": metadata, "spec": {"containers": containers, **spec}}


def answer(policy: Policy, sent: dict[str, Any], namespace: str) -> dict[str, Any]:
    status, body = review(orjson.dumps(admission_review(sent, namespace=namespace)), policy)
    assert status == 200
    response: dict[str, Any] = orjson.loads(body)["response"]
    return response


def injected(policy: Policy, sent: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
    """The pod the API server would store: the webhook's patch applied, and checked."""
    original = copy.deepcopy(sent)
    response = answer(policy, sent, namespace)
    assert response["allowed"], response
    operations = orjson.loads(base64.b64decode(response["patch"]))
    assert operations == diff(sent, inject(sent, RequestContext(namespace), policy).pod)
    result: dict[str, Any] = jsonpatch.apply_patch(sent, operations)
    assert sent == original
    validate_strict(as_pod(result))
    again = answer(policy, result, namespace)
    assert again["allowed"] and "patch" not in again
    return result


def names(containers: list[dict[str, Any]]) -> list[str]:
    return [container["name"] for container in containers]


# Rules -------------------------------------------------------------------------------------


def test_required_sidecar_is_injected_without_annotation() -> None:
    result = injected(TEAM, pod(labels={"tier": "frontend"}), "prod-eu")
    assert names(result["spec"]["initContainers"]) == ["log-watcher"]
    assert names(result["spec"]["containers"]) == ["app"]


def test_required_sidecar_survives_opt_out_with_a_warning() -> None:
    sent = pod({"outrigger.dev/inject": "false"}, labels={"tier": "frontend"})
    response = answer(TEAM, sent, "prod-eu")
    assert response["allowed"] and "patch" in response
    assert any("requires log-watcher" in w for w in response["warnings"])


def test_rule_default_is_injected_and_its_parameters_are_required() -> None:
    result = injected(TEAM, pod(UPSTREAM), "payments")
    assert names(result["spec"]["initContainers"]) == ["ambassador"]
    response = answer(TEAM, pod(), "payments")
    assert not response["allowed"]
    assert "outrigger.dev/ambassador-upstream is required" in response["status"]["message"]


def test_opt_out_removes_a_rule_default() -> None:
    response = answer(TEAM, pod({"outrigger.dev/inject": "false", **UPSTREAM}), "payments")
    assert response["allowed"] and "patch" not in response


@pytest.mark.parametrize(
    ("namespace", "labels"),
    [
        pytest.param("batch-nightly", {"tier": "frontend"}, id="excluded-namespace-glob"),
        pytest.param("kube-system", {"tier": "frontend"}, id="kube-system"),
        pytest.param(
            "prod-eu",
            {"tier": "backend", "app.kubernetes.io/component": "operator"},
            id="rule-exclude-beats-an-ask",
        ),
    ],
)
def test_exclusions_win(namespace: str, labels: dict[str, str]) -> None:
    sent = pod({"outrigger.dev/inject": "log-watcher"}, labels=labels)
    response = answer(TEAM, sent, namespace)
    assert response["allowed"] and "patch" not in response


# Native sidecars ---------------------------------------------------------------------------


def test_native_sidecars_go_first_in_init_containers() -> None:
    migrate = {"name": "migrate", "image": "registry.example.com/app:1"}
    sent = pod(
        {"outrigger.dev/inject": "ambassador,log-watcher", **UPSTREAM}, initContainers=[migrate]
    )
    result = injected(TEAM, sent, "shop")
    init = result["spec"]["initContainers"]
    assert names(init) == ["ambassador", "log-watcher", "migrate"]
    assert [c.get("restartPolicy") for c in init] == ["Always", "Always", None]
    assert names(result["spec"]["containers"]) == ["app"]


def with_template(policy: Policy, name: str, **changes: Any) -> Policy:
    document = policy.model_dump(mode="json", exclude_none=True)
    for template in document["sidecars"]:
        if template["name"] == name:
            template.update(changes)
    return parse_policy(document)


def test_a_template_overrides_the_policy_switch() -> None:
    mixed = with_template(TEAM, "log-watcher", native=False)
    sent = pod({"outrigger.dev/inject": "ambassador,log-watcher", **UPSTREAM})
    result = injected(mixed, sent, "shop")
    assert names(result["spec"]["initContainers"]) == ["ambassador"]
    assert names(result["spec"]["containers"]) == ["app", "log-watcher"]
    watcher = result["spec"]["containers"][1]
    assert watcher["lifecycle"] == {"preStop": {"sleep": {"seconds": 15}}}  # the policy's


CLASSIC = parse_policy({**default_policy().model_dump(mode="json"), "nativeSidecars": False})
BOTH = {"outrigger.dev/inject": "log-watcher,ambassador", **UPSTREAM}


def test_native_placement_orders_start_and_stop_by_itself() -> None:
    result = injected(default_policy(), pod(BOTH))
    watcher, ambassador = result["spec"]["initContainers"]
    assert names(result["spec"]["containers"]) == ["app"]
    # The kubelet starts the app once this probe passes: every second, on Envoy's /ready.
    assert ambassador["startupProbe"] == {
        "httpGet": {"path": "/ready", "port": 9902},
        "periodSeconds": 1,
        "timeoutSeconds": 1,
        "failureThreshold": 600,
    }
    assert "startupProbe" not in watcher
    # The kubelet stops native sidecars after the app: only the watcher sleeps first (to find
    # and read what a Job wrote last, as Fluent Bit stops reading at SIGTERM), 3 s.
    assert watcher["lifecycle"] == {"preStop": {"sleep": {"seconds": 3}}}
    assert "lifecycle" not in ambassador


def test_classic_placement_gets_pre_stop_sleeps_and_no_startup_probe() -> None:
    result = injected(CLASSIC, pod(BOTH))
    assert "initContainers" not in result["spec"]
    app, watcher, ambassador = result["spec"]["containers"]
    assert names([app, watcher, ambassador]) == ["app", "log-watcher", "ambassador"]
    assert watcher["lifecycle"] == {"preStop": {"sleep": {"seconds": 10}}}
    assert ambassador["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}
    assert "startupProbe" not in ambassador and "restartPolicy" not in ambassador


@pytest.mark.parametrize(
    ("annotations", "watcher_sleep", "ambassador_sleep"),
    [
        pytest.param({"outrigger.dev/log-watcher-stop-delay": "30"}, 30, 5, id="watcher-30"),
        # Within the pod's default grace period of 30 s, which the API server holds it to.
        pytest.param({"outrigger.dev/ambassador-stop-delay": "120"}, 10, 30, id="envoy-max"),
        pytest.param({"outrigger.dev/log-watcher-stop-delay": "0"}, None, 5, id="watcher-none"),
    ],
)
def test_classic_stop_delays_are_parameters(
    annotations: dict[str, str], watcher_sleep: int | None, ambassador_sleep: int
) -> None:
    result = injected(CLASSIC, pod({**BOTH, **annotations}))
    _, watcher, ambassador = result["spec"]["containers"]
    sleep = watcher.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
    assert sleep == watcher_sleep
    assert ambassador["lifecycle"]["preStop"]["sleep"]["seconds"] == ambassador_sleep


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        pytest.param("outrigger.dev/log-watcher-stop-delay", "121", id="watcher-too-long"),
        pytest.param("outrigger.dev/ambassador-stop-delay", "-1", id="envoy-negative"),
        pytest.param("outrigger.dev/log-volume-size", "10Ti", id="volume-unit"),
        pytest.param("outrigger.dev/log-volume-size", "0Mi", id="volume-zero"),
    ],
)
def test_bad_lifecycle_values_are_denied_by_name(annotation: str, value: str) -> None:
    response = answer(CLASSIC, pod({**BOTH, annotation: value}), "default")
    assert not response["allowed"]
    message = response["status"]["message"]
    assert f"annotation {annotation}: {value!r} is not accepted; expected " in message


@pytest.mark.parametrize("restart_policy", ["Never", "OnFailure"])
def test_a_job_pod_gets_native_sidecars_and_completes(restart_policy: str) -> None:
    result = injected(default_policy(), pod(BOTH, restartPolicy=restart_policy))
    assert [c["restartPolicy"] for c in result["spec"]["initContainers"]] == ["Always"] * 2


@pytest.mark.parametrize("restart_policy", ["Never", "OnFailure"])
def test_a_job_pod_with_classic_sidecars_is_denied_with_the_way_out(restart_policy: str) -> None:
    response = answer(CLASSIC, pod(BOTH, restartPolicy=restart_policy), "default")
    assert not response["allowed"]
    message = response["status"]["message"]
    assert "log-watcher, ambassador would run in spec.containers" in message
    assert f"(restartPolicy: {restart_policy}, as in a Job or CronJob) would never complete" in (
        message
    )
    assert "nativeSidecars: false" in message and 'outrigger.dev/inject: "false"' in message


def test_a_classic_sidecar_is_fine_in_a_pod_that_restarts() -> None:
    result = injected(CLASSIC, pod(BOTH, restartPolicy="Always"))
    assert names(result["spec"]["containers"]) == ["app", "log-watcher", "ambassador"]


# What annotations can and cannot do --------------------------------------------------------


def test_image_parameter_inside_the_allowlist_is_used() -> None:
    image = "registry.example.com/tools/config-reloader:1.5.0"
    sent = pod(
        {"outrigger.dev/inject": "config-reloader", "outrigger.dev/config-reloader-image": image}
    )
    result = injected(TEAM, sent)
    reloader = result["spec"]["initContainers"][0]  # a native sidecar under this policy
    assert (reloader["name"], reloader["image"]) == ("config-reloader", image)


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        pytest.param(
            {
                "outrigger.dev/inject": "config-reloader",
                "outrigger.dev/config-reloader-image": "docker.io/evil/miner:1.0",
            },
            "annotation outrigger.dev/config-reloader-image: image 'docker.io/evil/miner:1.0' "
            "is not in images.allowed",
            id="image-outside-allowlist",
        ),
        pytest.param(
            {
                "outrigger.dev/inject": "config-reloader",
                "outrigger.dev/config-reloader-image": "registry.example.com/tools/x:latest",
            },
            "must be a valid reference pinned to a version tag",
            id="image-not-pinned",
        ),
        pytest.param(
            {"outrigger.dev/inject": "log-watcher", "outrigger.dev/privileged": "true"},
            "annotation outrigger.dev/privileged is not an Outrigger annotation",
            id="privileged",
        ),
        pytest.param(
            {"outrigger.dev/inject": "log-watcher", "outrigger.dev/log-volume": "hostPath:/"},
            "annotation outrigger.dev/log-volume is not an Outrigger annotation",
            id="host-path-volume",
        ),
        pytest.param(
            {
                "outrigger.dev/inject": "log-watcher",
                "outrigger.dev/log-path": "/var/log/app\n  privileged: true",
            },
            "annotation outrigger.dev/log-path",
            id="yaml-smuggled-in-a-value",
        ),
        pytest.param(
            {
                "outrigger.dev/inject": "ambassador",
                "outrigger.dev/ambassador-upstream": 'x.com:80","admin":{"address":"0.0.0.0"',
            },
            "annotation outrigger.dev/ambassador-upstream",
            id="json-smuggled-into-envoy",
        ),
        pytest.param(
            {"outrigger.dev/inject": "log-watcher", "outrigger.dev/log-format": "raw"},
            "expected one of: json_lines, msgpack",
            id="enum",
        ),
    ],
)
def test_escalation_attempts_are_denied(annotations: dict[str, str], message: str) -> None:
    response = answer(TEAM, pod(annotations), "shop")
    assert not response["allowed"]
    assert message in response["status"]["message"]


def test_unknown_annotations_only_warn_under_the_default_policy() -> None:
    sent = pod(
        {
            "outrigger.dev/inject": "log-watcher",
            "outrigger.dev/privileged": "true",
            "outrigger.dev/log-volume": "hostPath:/",
        }
    )
    response = answer(default_policy(), sent, "shop")
    assert response["allowed"]
    assert sorted(w for w in response["warnings"] if w.startswith("annotation ")) == [
        "annotation outrigger.dev/log-volume is not an Outrigger annotation and is ignored",
        "annotation outrigger.dev/privileged is not an Outrigger annotation and is ignored",
    ]
    result = injected(default_policy(), sent, "shop")
    spec = orjson.dumps(result["spec"]).decode()
    assert "privileged" not in spec and "hostPath" not in spec


# Pod Security Standards --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "annotations"),
    [
        pytest.param(
            default_policy(),
            {"outrigger.dev/inject": "log-watcher,ambassador", **UPSTREAM},
            id="default-policy",
        ),
        pytest.param(
            TEAM,
            {"outrigger.dev/inject": "log-watcher,ambassador,config-reloader", **UPSTREAM},
            id="platform-team-policy",
        ),
    ],
)
def test_injected_containers_pass_the_restricted_profile(
    policy: Policy, annotations: dict[str, str]
) -> None:
    from tests.pod_security import container_violations, volume_violations

    result = injected(policy, pod(annotations), "shop")
    status = orjson.loads(result["metadata"]["annotations"]["outrigger.dev/status"])
    assert status["policy"] == policy.version
    for name in status["injected"]:
        assert container_violations(as_pod(result), name) == [], name
    for volume in result["spec"].get("volumes", ()):
        assert volume_violations(as_pod(result), volume["name"]) == []


def test_a_required_sidecar_with_ports_is_denied_in_a_hostnetwork_pod() -> None:
    document = TEAM.model_dump(mode="json", exclude_none=True)
    document["rules"].append(
        {"name": "edge-egress", "namespaces": ["edge"], "require": ["ambassador"]}
    )
    strict = parse_policy(document)
    sent = pod(UPSTREAM, hostNetwork=True)
    response = answer(strict, sent, "edge")
    assert not response["allowed"]
    assert "ambassador cannot be injected into a hostNetwork pod" in response["status"]["message"]


def test_a_rule_default_skipped_in_a_hostnetwork_pod_is_explained() -> None:
    result = inject(pod(UPSTREAM, hostNetwork=True), RequestContext("payments"), TEAM)
    assert (
        result.reason == "host-network-skipped" and result.pod["spec"].get("initContainers") is None
    )
    assert any("not injected into this hostNetwork pod" in line for line in result.explanation)


@pytest.mark.parametrize("name", ["Mirror", "a_b", "-x", "x" * 254])
def test_image_pull_secret_names_are_validated(name: str) -> None:
    document = TEAM.model_dump(mode="json", exclude_none=True)
    document["sidecars"][0]["imagePullSecrets"] = [name]
    with pytest.raises(PolicyError, match="imagePullSecrets"):
        parse_policy(document)


@pytest.mark.parametrize(("grace", "sleep"), [(30, 3), (3, 3), (2, 2), (0, None)])
def test_a_pre_stop_sleep_never_exceeds_the_grace_period(grace: int, sleep: int | None) -> None:
    """The API server refuses a preStop sleep longer than terminationGracePeriodSeconds."""
    sent = pod({"outrigger.dev/inject": "log-watcher"}, terminationGracePeriodSeconds=grace)
    watcher = injected(default_policy(), sent)["spec"]["initContainers"][0]
    assert watcher.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds") == sleep
    response = answer(default_policy(), sent, "shop")
    shortened = [w for w in response.get("warnings", ()) if "shortened" in w]
    assert len(shortened) == (1 if grace < 3 else 0), response.get("warnings")
