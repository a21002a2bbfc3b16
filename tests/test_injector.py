"""The pure core: what `inject` keeps, what it adds, and what it refuses."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from webhook.core import annotations as ann
from webhook.core import volumes
from webhook.core.injector import REINJECTED, InjectionDenied, RequestContext, inject
from webhook.core.policy import Policy, parse_policy
from webhook.core.selection import (
    ALREADY_INJECTED,
    INJECTED,
    NAMESPACE_EXCLUDED,
    NOT_REQUESTED,
    OPTED_OUT,
)
from webhook.core.templates import envoy_concurrency

DEFAULT = RequestContext("default")
LOG_PATH = "outrigger.dev/log-path"
AMBASSADOR_PORT = "outrigger.dev/ambassador-port"
UPSTREAM = {"outrigger.dev/ambassador-upstream": "external-service:80"}
CONFIG = "outrigger.dev/ambassador-config"


def pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "p", "labels": {"app": "p"}}
    if annotations is not None:
        metadata["annotations"] = annotations
    containers = spec.pop("containers", [{"name": "main-app", "image": "myapp:1.0"}])
    return {"metadata": metadata, "spec": {"containers": containers, **spec}}


def names(containers: list[dict[str, Any]]) -> list[str]:
    return [c["name"] for c in containers]


def test_input_pod_is_never_modified(policy: Policy) -> None:
    original = pod({ann.INJECT: "log-watcher,ambassador", **UPSTREAM})
    snapshot = copy.deepcopy(original)
    inject(original, DEFAULT, policy)
    assert original == snapshot


def test_everything_else_in_the_pod_is_kept(policy: Policy) -> None:
    init = [{"name": "init", "image": "busybox:1.36"}]
    volumes = [{"name": "data", "emptyDir": {}}]
    before = pod(
        {ann.INJECT: "log-watcher", "team": "shop"},
        containers=[
            {"name": "a", "image": "a:1", "volumeMounts": [{"name": "data", "mountPath": "/d"}]},
            {"name": "b", "image": "b:1"},
        ],
        initContainers=init,
        volumes=volumes,
        nodeSelector={"disk": "ssd"},
    )
    after = inject(before, DEFAULT, policy).pod
    assert after["metadata"]["labels"] == {"app": "p"}
    assert after["metadata"]["annotations"]["team"] == "shop"
    assert after["spec"]["initContainers"][1:] == init  # native sidecars come first
    assert names(after["spec"]["initContainers"]) == ["log-watcher", *names(init)]
    assert after["spec"]["nodeSelector"] == {"disk": "ssd"}
    assert after["spec"]["volumes"][:1] == volumes
    assert names(after["spec"]["containers"]) == ["a", "b"]
    a_mounts = after["spec"]["containers"][0]["volumeMounts"]
    assert a_mounts == [
        {"name": "data", "mountPath": "/d"},
        {"name": "shared-logs", "mountPath": "/var/log/app"},
    ]


def test_log_watcher_shares_the_log_volume_with_every_app_container(policy: Policy) -> None:
    before = pod(
        {ann.INJECT: "log-watcher", LOG_PATH: "/srv/logs"},
        containers=[{"name": "a", "image": "a:1"}, {"name": "b", "image": "b:1"}],
    )
    spec = inject(before, DEFAULT, policy).pod["spec"]
    assert [v["name"] for v in spec["volumes"]] == [
        "shared-logs",
        "log-watcher-state",
        "log-watcher-config",
    ]
    assert spec["volumes"][:2] == [
        {"name": "shared-logs", "emptyDir": {"sizeLimit": "1Gi"}},
        {"name": "log-watcher-state", "emptyDir": {"sizeLimit": "16Mi"}},
    ]
    for container in spec["containers"]:
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts == {"shared-logs": "/srv/logs"}
    (watcher,) = spec["initContainers"]
    assert watcher["args"] == ["-c", "/etc/log-watcher/fluent-bit.yaml"]
    assert watcher["volumeMounts"][0] == {
        "name": "shared-logs",
        "mountPath": "/srv/logs",
        "readOnly": True,
    }


def test_ambassador_listens_where_the_app_expects_it(policy: Policy) -> None:
    before = pod({ann.INJECT: "ambassador", **UPSTREAM, AMBASSADOR_PORT: "9090"})
    ambassador = inject(before, DEFAULT, policy).pod["spec"]["initContainers"][-1]
    assert ambassador["name"] == "ambassador"
    assert ambassador["ports"] == [{"containerPort": 9090, "protocol": "TCP"}]
    assert ambassador["env"] == [
        {"name": "SERVICE_HOST", "value": "external-service"},
        {"name": "SERVICE_PORT", "value": "80"},
    ]
    assert ambassador["args"][0] == "--config-yaml"
    assert '"port_value":9090' in ambassador["args"][1]
    assert ambassador["image"] == policy.templates["ambassador"].container["image"]


def test_injected_containers_are_locked_down_by_policy(policy: Policy) -> None:
    before = pod({ann.INJECT: "log-watcher,ambassador", **UPSTREAM})
    injected = inject(before, DEFAULT, policy).pod["spec"]["initContainers"]
    assert names(injected) == ["log-watcher", "ambassador"]
    for container in injected:
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert "limits" in container["resources"]


def test_status_records_what_was_injected_and_the_policy(policy: Policy) -> None:
    before = pod({ann.INJECT: "ambassador,log-watcher", **UPSTREAM})
    result = inject(before, DEFAULT, policy)
    assert result.reason == INJECTED
    assert result.injected == ("log-watcher", "ambassador")  # the policy's order
    status = result.pod["metadata"]["annotations"][ann.STATUS]
    assert status == f'{{"injected":["log-watcher","ambassador"],"policy":"{policy.version}"}}'


@pytest.mark.parametrize(
    ("before", "context", "reason"),
    [
        pytest.param(pod(), DEFAULT, NOT_REQUESTED, id="no-annotations"),
        pytest.param(pod({ann.INJECT: "false"}), DEFAULT, OPTED_OUT, id="opt-out"),
        pytest.param(
            pod({ann.INJECT: "log-watcher"}),
            RequestContext("kube-system"),
            NAMESPACE_EXCLUDED,
            id="kube-system",
        ),
        pytest.param(
            pod({ann.INJECT: "log-watcher", ann.STATUS: "{}"}, hostNetwork=True),
            RequestContext("kube-public"),
            NAMESPACE_EXCLUDED,
            id="excluded-with-a-status",
        ),
    ],
)
def test_pods_left_as_they_are(
    before: dict[str, Any], context: RequestContext, reason: str, policy: Policy
) -> None:
    result = inject(before, context, policy)
    assert result.reason == reason
    assert result.pod is before


def test_the_webhooks_own_namespace_comes_with_the_request_context(
    policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never injected into; given by the caller (the command line reads $POD_NAMESPACE), not
    read from the environment by the core, whose answers are cached on their arguments."""
    asking = pod({ann.INJECT: "log-watcher"})
    own = inject(asking, RequestContext("outrigger-system", "outrigger-system"), policy)
    assert own.reason == NAMESPACE_EXCLUDED and own.pod is asking
    monkeypatch.setenv("POD_NAMESPACE", "outrigger-system")
    assert inject(asking, RequestContext("outrigger-system"), policy).injected
    assert inject(asking, RequestContext("shop", "outrigger-system"), policy).injected


def test_policy_excluded_namespaces_are_skipped(policy: Policy) -> None:
    document = policy.model_dump(by_alias=True)
    custom = parse_policy({**document, "excludedNamespaces": ["batch"]})
    assert inject(pod({ann.INJECT: "log-watcher"}), RequestContext("batchx"), custom).injected
    result = inject(pod({ann.INJECT: "log-watcher"}), RequestContext("batch"), custom)
    assert result.reason == NAMESPACE_EXCLUDED


def test_injecting_twice_equals_injecting_once(policy: Policy) -> None:
    once = inject(pod({ann.INJECT: "log-watcher,ambassador", **UPSTREAM}), DEFAULT, policy).pod
    assert inject(copy.deepcopy(once), DEFAULT, policy).pod == once


@pytest.mark.parametrize(
    ("before", "message"),
    [
        pytest.param(pod({ann.INJECT: "nope"}), "outrigger.dev/inject", id="bad-annotation"),
        pytest.param(
            pod(
                {ann.INJECT: "log-watcher"},
                initContainers=[{"name": "log-watcher", "image": "x:1"}],
            ),
            "container name 'log-watcher' is already used",
            id="init-container-name",
        ),
        pytest.param(
            pod(
                {ann.INJECT: "ambassador", **UPSTREAM},
                containers=[{"name": "app", "image": "a:1", "ports": [{"containerPort": 9901}]}],
            ),
            "already uses port 9901",
            id="admin-port-taken",
        ),
        pytest.param(
            pod({ann.INJECT: "ambassador", **UPSTREAM, AMBASSADOR_PORT: "9901"}),
            "annotation outrigger.dev/ambassador-port: 9901 is the ambassador's admin interface",
            id="local-port-is-admin-port",
        ),
        pytest.param(
            {"metadata": {"annotations": {ann.INJECT: "log-watcher"}}, "spec": {}},
            "no spec.containers",
            id="no-containers",
        ),
        pytest.param(
            {"metadata": {"annotations": {AMBASSADOR_PORT: 8081}}, "spec": {}},
            "must be strings",
            id="non-string-annotation",
        ),
        pytest.param(
            {"metadata": {"annotations": {ann.INJECT: "log-watcher"}}, "spec": {"containers": {}}},
            "must be a list",
            id="containers-not-a-list",
        ),
    ],
)
def test_denied(before: dict[str, Any], message: str, policy: Policy) -> None:
    with pytest.raises(InjectionDenied) as caught:
        inject(before, DEFAULT, policy)
    assert message in str(caught.value)


@pytest.mark.parametrize("taken", ["shared-logs", "log-watcher-state", "log-watcher-config"])
def test_every_volume_a_template_adds_is_checked_for_collisions(policy: Policy, taken: str) -> None:
    before = pod({ann.INJECT: "log-watcher"}, volumes=[{"name": taken, "emptyDir": {}}])
    with pytest.raises(InjectionDenied) as denied:
        inject(before, DEFAULT, policy)
    assert f"volume name {taken!r} is already used in the pod; log-watcher adds" in str(
        denied.value
    )


@pytest.mark.parametrize(
    ("limit", "workers"),
    [(None, 2), ("1", 1), ("500m", 1), ("1500m", 2), ("2", 2), ("2.5", 3), ("4", 4), ("1Ki", 2)],
)
def test_envoy_workers_follow_the_cpu_limit(limit: str | None, workers: int) -> None:
    assert envoy_concurrency(limit) == workers


def test_the_ambassador_is_sized_by_its_cpu_limit(policy: Policy) -> None:
    before = pod({ann.INJECT: "ambassador", **UPSTREAM})
    (ambassador,) = inject(before, DEFAULT, policy).pod["spec"]["initContainers"]
    assert ambassador["resources"]["limits"]["cpu"] == "1"
    assert ambassador["args"][-2:] == ["--concurrency", "1"]


def test_tls_material_reaches_envoy_through_projected_sds_files(policy: Policy) -> None:
    config = (
        "upstreams: {bank: {address: 'bank.example:443', port: 9000, tls: "
        "{caSecret: ambassador-bank-ca, clientCertSecret: ambassador-bank-client}}}"
    )
    after = inject(pod({ann.INJECT: "ambassador", CONFIG: config}), DEFAULT, policy).pod
    annotations = after["metadata"]["annotations"]
    volumes = {v["name"]: v for v in after["spec"]["volumes"]}
    assert volumes["ambassador-tls-0"]["secret"] == {"secretName": "ambassador-bank-ca"}
    assert volumes["ambassador-tls-1"]["secret"] == {"secretName": "ambassador-bank-client"}
    items = volumes["ambassador-sds"]["downwardAPI"]["items"]
    assert [item["path"] for item in items] == ["tls-0-ca.json", "tls-1-cert.json"]
    for item in items:
        key = (
            item["fieldRef"]["fieldPath"].removeprefix("metadata.annotations['").removesuffix("']")
        )
        assert key.startswith("ambassador.sds.outrigger.dev/")
        (resource,) = orjson.loads(annotations[key])["resources"]
        assert resource["name"] == item["path"].removesuffix(".json")
    (ambassador,) = after["spec"]["initContainers"]
    mounts = {m["mountPath"]: m for m in ambassador["volumeMounts"]}
    assert mounts["/etc/outrigger/sds"] == {
        "name": "ambassador-sds",
        "mountPath": "/etc/outrigger/sds",
        "readOnly": True,
    }


# outrigger.dev/status: trusted only as far as the pod holds what it claims ---------------


@pytest.mark.parametrize("status", ["", "{}", '{"injected":["log-watcher"]}', "not json", "[1]"])
def test_a_forged_status_exempts_nothing(policy: Policy, status: str) -> None:
    result = inject(pod({ann.INJECT: "log-watcher", ann.STATUS: status}), DEFAULT, policy)
    assert result.reason == REINJECTED and result.injected == ("log-watcher",)
    assert names(result.pod["spec"]["initContainers"]) == ["log-watcher"]


def test_a_required_sidecar_cannot_be_skipped_with_a_status(policy: Policy) -> None:
    document = policy.model_dump(mode="json", exclude_none=True)
    document["rules"] = [{"name": "audit-logs", "require": ["log-watcher"]}]
    strict = parse_policy(document)
    forged = pod({ann.INJECT: "false", ann.STATUS: '{"injected":["log-watcher"],"policy":"x"}'})
    result = inject(forged, DEFAULT, strict)
    assert names(result.pod["spec"]["initContainers"]) == ["log-watcher"]


def test_an_injected_pod_is_left_as_it_is_even_with_the_api_servers_defaults(
    policy: Policy,
) -> None:
    once = inject(pod({ann.INJECT: "log-watcher,ambassador", **UPSTREAM}), DEFAULT, policy).pod
    defaulted = copy.deepcopy(once)
    for container in [*defaulted["spec"]["containers"], *defaulted["spec"]["initContainers"]]:
        container["terminationMessagePath"] = "/dev/termination-log"
        container["imagePullPolicy"] = "IfNotPresent"
        for probe in ("readinessProbe", "startupProbe"):
            if probe in container:
                container[probe]["successThreshold"] = 1
    again = inject(defaulted, DEFAULT, policy)
    assert again.reason == ALREADY_INJECTED and again.pod is defaulted


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(
            lambda p: p["spec"]["initContainers"][0].update(image="busybox:1.36"), id="image"
        ),
        pytest.param(lambda p: p["spec"]["initContainers"][0]["args"].pop(), id="args"),
        pytest.param(lambda p: p["spec"]["initContainers"].pop(0), id="sidecar-removed"),
        pytest.param(lambda p: p["spec"]["volumes"].pop(), id="volume-removed"),
        pytest.param(lambda p: p["spec"]["containers"][0].pop("volumeMounts"), id="mount-removed"),
        pytest.param(
            lambda p: p["spec"]["initContainers"][0]["securityContext"].update(privileged=True),
            id="privileged",
        ),
    ],
)
def test_a_pod_that_does_not_hold_what_its_status_claims_is_injected_afresh(
    policy: Policy, tamper: Any
) -> None:
    original = pod({ann.INJECT: "log-watcher"})
    once = inject(original, DEFAULT, policy).pod
    tampered = copy.deepcopy(once)
    tamper(tampered)
    again = inject(tampered, DEFAULT, policy)
    assert again.reason == REINJECTED
    assert again.pod == once  # the tampering is gone, nothing else changed


def test_what_a_status_claims_is_taken_out_only_for_the_policys_templates(policy: Policy) -> None:
    foreign = {"name": "proxy", "image": "registry.example.com/proxy:1"}
    sent = pod({ann.INJECT: "log-watcher", ann.STATUS: '{"injected":["proxy"]}'})
    sent["spec"]["containers"].append(foreign)
    result = inject(sent, DEFAULT, policy).pod
    kept = [c for c in result["spec"]["containers"] if c["name"] == "proxy"]
    assert [c["image"] for c in kept] == [foreign["image"]]  # an app container, kept


def test_what_in_tree_admission_plugins_add_on_reinvocation_is_not_a_mismatch(
    policy: Policy,
) -> None:
    """The API server reruns its own mutating plugins after the webhooks: LimitRanger adds a
    namespace's default resources, ServiceAccount its token mount, to our containers too."""
    once = inject(pod({ann.INJECT: "log-watcher"}), DEFAULT, policy).pod
    again = copy.deepcopy(once)
    (watcher,) = again["spec"]["initContainers"]
    watcher["resources"]["limits"]["ephemeral-storage"] = "1Gi"
    watcher["volumeMounts"].append(
        {
            "name": "kube-api-access-x7k2p",
            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
            "readOnly": True,
        }
    )
    result = inject(again, DEFAULT, policy)
    assert result.reason == ALREADY_INJECTED and result.pod is again


def test_any_other_extra_mount_in_an_injected_container_is_a_mismatch(policy: Policy) -> None:
    once = inject(pod({ann.INJECT: "log-watcher"}), DEFAULT, policy).pod
    again = copy.deepcopy(once)
    again["spec"]["initContainers"][0]["volumeMounts"].append(
        {"name": "host", "mountPath": "/host"}
    )
    assert inject(again, DEFAULT, policy).reason == REINJECTED


def test_a_remembered_sidecar_check_answers_only_for_the_same_content(policy: Policy) -> None:
    """The check of an injected container or volume is remembered by the JSON of both sides
    (`webhook.core.volumes`): a pod whose sidecar or volume differs in any value is never
    taken for the one checked before it, and the same content is answered alike."""
    volumes._CHECKED_ITEMS.clear()
    once = inject(pod({ann.INJECT: "log-watcher,ambassador", **UPSTREAM}), DEFAULT, policy).pod
    assert inject(copy.deepcopy(once), DEFAULT, policy).reason == ALREADY_INJECTED
    spec = once["spec"]
    # The app, both sidecars and every volume (a deep copy shares nothing with the pod).
    assert len(volumes._CHECKED_ITEMS) == 3 + len(spec["volumes"])
    for field, value in [("image", "registry.example.com/other:1"), ("args", ["-c", "x"]),
                         ("restartPolicy", "Never"), ("ports", [])]:  # fmt: skip
        tampered = copy.deepcopy(once)
        tampered["spec"]["initContainers"][1][field] = value
        assert inject(tampered, DEFAULT, policy).reason == REINJECTED, field
    shared_logs = next(v for v in spec["volumes"] if "emptyDir" in v)
    tampered = copy.deepcopy(once)
    next(v for v in tampered["spec"]["volumes"] if v == shared_logs)["emptyDir"] = {}
    assert inject(tampered, DEFAULT, policy).reason == REINJECTED
    assert inject(copy.deepcopy(once), DEFAULT, policy).reason == ALREADY_INJECTED


# The ServiceAccount plugin's token mount ------------------------------------------------------

TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_VOLUME = {"name": "kube-api-access-x7k2p", "projected": {"sources": []}}


def with_token(**spec: Any) -> dict[str, Any]:
    """A pod as the ServiceAccount plugin leaves it before the webhooks: its token volume,
    mounted into the app container with the plugin's fields."""
    app = {
        "name": "main-app",
        "image": "myapp:1.0",
        "volumeMounts": [
            {"name": "kube-api-access-x7k2p", "readOnly": True, "mountPath": TOKEN_PATH}
        ],
    }
    return pod({ann.INJECT: "log-watcher,ambassador", **UPSTREAM}, containers=[app],
               volumes=[TOKEN_VOLUME], **spec)  # fmt: skip


def token_mounts(container: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in container.get("volumeMounts", ()) if m["mountPath"] == TOKEN_PATH]


@pytest.mark.parametrize("native", [True, False], ids=["native", "classic"])
def test_sidecars_get_the_token_mount_the_serviceaccount_plugin_would_add(
    policy: Policy, native: bool
) -> None:
    """The plugin runs again after the webhooks and mounts the token into every container
    without a mount at its path; written by the injection in the plugin's fields and order
    (last), it leaves the plugin nothing to add, so the API server calls no second time."""
    policy = parse_policy({**policy.model_dump(mode="json"), "nativeSidecars": native})
    spec = inject(with_token(), DEFAULT, policy).pod["spec"]
    sidecars = spec["initContainers"] if native else spec["containers"][1:]
    assert names(sidecars) == ["log-watcher", "ambassador"]
    mount = {"name": "kube-api-access-x7k2p", "readOnly": True, "mountPath": TOKEN_PATH}
    for sidecar in sidecars:
        assert sidecar["volumeMounts"][-1] == mount and token_mounts(sidecar) == [mount]
    assert orjson.dumps(mount) == orjson.dumps(sidecars[0]["volumeMounts"][-1])  # field order


@pytest.mark.parametrize(
    "case",
    ["automount off", "no token volume", "token volume not mounted", "mounted elsewhere"],
)
def test_no_token_mount_where_the_plugin_would_add_none(policy: Policy, case: str) -> None:
    """Without the plugin's volume mounted at its path by a container of the pod (it did not
    run, or the pod turned it off), the sidecars get none: the plugin would give none."""
    sent = with_token()
    spec = sent["spec"]
    if case == "automount off":
        spec["automountServiceAccountToken"] = False
    elif case == "no token volume":
        del spec["volumes"], spec["containers"][0]["volumeMounts"]
    elif case == "token volume not mounted":
        del spec["containers"][0]["volumeMounts"]
    else:
        spec["containers"][0]["volumeMounts"][0]["mountPath"] = "/token"
    injected = inject(sent, DEFAULT, policy).pod["spec"]
    assert all(not token_mounts(c) for c in injected["initContainers"])


def test_the_token_mount_names_the_first_token_volume_as_the_plugin_does(policy: Policy) -> None:
    sent = with_token()
    sent["spec"]["volumes"].append({**TOKEN_VOLUME, "name": "kube-api-access-zzzzz"})
    injected = inject(sent, DEFAULT, policy).pod["spec"]
    assert {m["name"] for c in injected["initContainers"] for m in token_mounts(c)} == {
        "kube-api-access-x7k2p"
    }


def test_a_sidecar_mounting_something_at_the_token_path_keeps_it(policy: Policy) -> None:
    """As the plugin decides: any mount at the path, as written, and none is added."""
    own = {"name": "own-token", "mountPath": TOKEN_PATH}
    sidecar = {"name": "log-watcher", "volumeMounts": [own]}
    mount = volumes.api_token_mount(with_token()["spec"])
    assert volumes.with_api_token(sidecar, mount) is sidecar
    other = {"name": "other", "volumeMounts": [{"name": "x", "mountPath": TOKEN_PATH + "/"}]}
    assert token_mounts(volumes.with_api_token(other, mount)) == [mount]


def test_an_injected_pod_with_its_token_mounts_is_injected_already(policy: Policy) -> None:
    once = inject(with_token(), DEFAULT, policy).pod
    again = inject(copy.deepcopy(once), DEFAULT, policy)
    assert again.reason == ALREADY_INJECTED
    tampered = copy.deepcopy(once)
    tampered["spec"]["initContainers"][0]["volumeMounts"][-1]["readOnly"] = False
    assert inject(tampered, DEFAULT, policy).reason == REINJECTED
