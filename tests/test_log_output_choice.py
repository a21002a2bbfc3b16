"""The policy's log outputs, wired in: loaded and checked with the policy, picked by a pod's
`outrigger.dev/log-output`, a rule's `logOutput` or `logOutputs.default` (in that order),
rendered into the injected pod (configuration, env, CA volume) and taken out again when a pod
is injected afresh."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.conftest import FIXTURES
from webhook.core.injector import InjectionDenied, RequestContext, inject
from webhook.core.logoutputs import CA_MOUNT_PATH
from webhook.core.policy import Policy, PolicyError, default_policy, load_policy, parse_policy

PLATFORM_FILE = FIXTURES / "policies" / "good-platform-team.yaml"
PLATFORM = load_policy(PLATFORM_FILE)
ANNOTATION = "outrigger.dev/log-output"
WATCHER = "log-watcher"


def platform(**changes: Any) -> dict[str, Any]:
    """The platform policy's document with top-level `changes`."""
    document: dict[str, Any] = yaml.safe_load(PLATFORM_FILE.read_text())
    return {**document, **changes}


def app_pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "web-1",
            "annotations": {"outrigger.dev/inject": WATCHER, **(annotations or {})},
        },
        "spec": {
            "containers": [
                {"name": "app", "image": "registry.example.com/app:1"},
                {"name": "worker", "image": "registry.example.com/app:1"},
            ],
            **spec,
        },
    }


def injected(pod: dict[str, Any], namespace: str = "shop", policy: Policy = PLATFORM) -> Any:
    return inject(pod, RequestContext(namespace), policy).pod


def watcher(pod: dict[str, Any]) -> dict[str, Any]:
    spec = pod["spec"]
    found: dict[str, Any] = next(
        c for c in [*spec.get("initContainers", ()), *spec["containers"]] if c["name"] == WATCHER
    )
    return found


def config(pod: dict[str, Any]) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(
        pod["metadata"]["annotations"][f"{WATCHER}.outrigger.dev/fluent-bit.yaml"]
    )
    return document


def output_name(pod: dict[str, Any]) -> str:
    (output,) = config(pod)["pipeline"]["outputs"]
    return str(output["name"])


# Choosing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("namespace", "annotations", "expected"),
    [
        ("shop", {}, "stdout"),  # the policy's default
        ("checkout", {}, "loki"),  # a rule's choice
        ("shop", {ANNOTATION: "loki"}, "loki"),  # the pod's
        ("checkout", {ANNOTATION: "stdout"}, "stdout"),  # the pod's, over the rule's
    ],
)
def test_the_pod_picks_over_a_rule_over_the_default(
    namespace: str, annotations: dict[str, str], expected: str
) -> None:
    assert output_name(injected(app_pod(annotations), namespace)) == expected


def test_the_policy_default_applies_without_annotation_or_rule() -> None:
    document = platform()
    document["logOutputs"] = {**document["logOutputs"], "default": "loki"}
    policy = parse_policy(document)
    assert output_name(injected(app_pod(), "shop", policy)) == "loki"
    assert output_name(injected(app_pod({ANNOTATION: "stdout"}), "shop", policy)) == "stdout"


def test_the_first_matching_rule_with_an_output_decides() -> None:
    document = platform()
    document["logOutputs"]["outputs"]["loki-eu"] = {
        **document["logOutputs"]["outputs"]["loki"],
        "host": "loki.eu.example.com",
    }
    first = {"name": "all-to-eu", "logOutput": "loki-eu"}
    policy = parse_policy({**document, "rules": [first, *document["rules"]]})
    pod = injected(app_pod(), "checkout", policy)
    assert config(pod)["pipeline"]["outputs"][0]["host"] == "loki.eu.example.com"


def test_the_rule_is_explained() -> None:
    explanation = inject(app_pod(), RequestContext("checkout"), PLATFORM).explanation
    assert "log output loki: rule 'checkout-logs-to-loki', unless the pod picks one" in (
        explanation
    )
    ambassador = app_pod({"outrigger.dev/inject": "ambassador"})
    ambassador["metadata"]["annotations"]["outrigger.dev/ambassador-upstream"] = "a.example:443"
    explanation = inject(ambassador, RequestContext("checkout"), PLATFORM).explanation
    assert not any(line.startswith("log output") for line in explanation)  # no watcher


@pytest.mark.parametrize("value", ["elastic", "Loki", "loki,stdout", ""])
def test_an_unknown_output_is_denied_naming_the_annotation_and_the_names(value: str) -> None:
    with pytest.raises(InjectionDenied) as denied:
        inject(app_pod({ANNOTATION: value}), RequestContext("shop"), PLATFORM)
    assert denied.value.reason == "invalid-annotation"
    assert f"annotation {ANNOTATION}: {value!r} is not a log output" in str(denied.value)
    assert str(denied.value).endswith("accepted: loki, stdout")


def test_the_default_policy_ships_to_stdout_and_knows_no_output_annotation() -> None:
    policy = default_policy()
    assert policy.logOutputs.names == {"stdout"}
    result = inject(app_pod({ANNOTATION: "loki"}), RequestContext("shop"), policy)
    assert output_name(result.pod) == "stdout"
    assert f"annotation {ANNOTATION} is not an Outrigger annotation and is ignored" in (
        result.warnings
    )


def test_policies_without_outputs_keep_their_version() -> None:
    """Pods injected before logOutputs existed are left alone, not injected afresh."""
    document = default_policy().model_dump(mode="json", exclude={"logOutputs"})
    for rule in document["rules"]:
        rule.pop("logOutput")
    bare = parse_policy(document)
    empty = parse_policy({**document, "logOutputs": {}})
    assert bare.version == empty.version == default_policy().version
    used = parse_policy({**document, "logOutputs": {"default": "stdout", "allowedSecrets": ["x"]}})
    assert used.version != bare.version


# Loading -----------------------------------------------------------------------------------


def test_a_dumped_policy_with_outputs_loads_again_as_itself() -> None:
    """As `outrigger serve --policy` reads what the chart and the tests write out."""
    again = parse_policy(PLATFORM.model_dump(mode="json"))
    assert again == PLATFORM
    assert again.version == PLATFORM.version


def load_error(document: dict[str, Any]) -> str:
    with pytest.raises(PolicyError) as error:
        parse_policy(document)
    return str(error.value)


def test_a_secret_the_policy_does_not_allow_is_an_error_naming_output_and_secret() -> None:
    document = platform()
    document["logOutputs"] = {**document["logOutputs"], "allowedSecrets": ["log-shipping"]}
    message = load_error(document)
    assert "logOutputs: outputs.loki: Secret 'logging-ca' is not in allowedSecrets" in message


def test_a_rule_naming_no_output_is_an_error() -> None:
    rules = [{"name": "r", "logOutput": "splunk"}]
    message = load_error(platform(rules=rules))
    assert "rules[0].logOutput: 'splunk' is not an output of logOutputs (known: loki, stdout)" in (
        message
    )


def watcher_template(document: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = next(t for t in document["sidecars"] if t["name"] == WATCHER)
    return found


def test_a_template_literal_naming_no_output_is_an_error() -> None:
    document = platform()
    watcher_template(document)["logWatcher"]["output"] = "splunk"
    assert "sidecars[1].logWatcher.output: 'splunk' is not an output" in load_error(document)


def test_the_output_parameter_takes_no_default() -> None:
    document = platform()
    watcher_template(document)["parameters"]["output"]["default"] = "loki"
    assert "logWatcher.output: its parameter takes no default" in load_error(document)


def test_the_output_parameter_is_a_string() -> None:
    document = platform()
    watcher_template(document)["parameters"]["output"]["type"] = "integer"
    assert "logWatcher.output must be one ${parameter} of type string" in load_error(document)


def test_a_template_env_may_not_take_the_outputs_variables() -> None:
    document = platform()
    watcher_template(document)["container"]["env"] = [{"name": "POD_NAME", "value": "x"}]
    assert "container.env: POD_NAME is set by the log output" in load_error(document)


def test_a_template_literal_forces_its_output() -> None:
    document = platform()
    template = watcher_template(document)
    template["logWatcher"]["output"] = "loki"
    del template["parameters"]["output"]
    policy = parse_policy(document)
    assert output_name(injected(app_pod(), "shop", policy)) == "loki"


# Rendering ---------------------------------------------------------------------------------

LOKI_ENV = [
    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
    {
        "name": "OUTRIGGER_LOG_USERNAME",
        "valueFrom": {"secretKeyRef": {"name": "log-shipping", "key": "username"}},
    },
    {
        "name": "OUTRIGGER_LOG_PASSWORD",
        "valueFrom": {"secretKeyRef": {"name": "log-shipping", "key": "password"}},
    },
]
CA_VOLUME = {
    "name": "log-watcher-output-ca",
    "secret": {"secretName": "logging-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]},
}


def test_loki_renders_env_ca_volume_filters_and_output() -> None:
    pod = injected(app_pod({ANNOTATION: "loki"}, initContainers=[{"name": "init", "image": "i:1"}]))
    container = watcher(pod)
    assert container["env"] == LOKI_ENV
    assert CA_VOLUME in pod["spec"]["volumes"]
    ca_mount = {"name": "log-watcher-output-ca", "mountPath": CA_MOUNT_PATH, "readOnly": True}
    assert ca_mount in container["volumeMounts"]
    pipeline = config(pod)["pipeline"]
    assert list(pipeline) == ["inputs", "filters", "outputs"]
    # The app containers that mount the log volume; not the app's init container.
    assert pipeline["filters"] == [
        {
            "name": "modify",
            "match": "app.logs",
            "set": [
                "namespace ${POD_NAMESPACE}",
                "pod ${POD_NAME}",
                "container app,worker",
                "node ${NODE_NAME}",
            ],
        }
    ]
    (output,) = pipeline["outputs"]
    assert output["host"] == "loki.logging.svc.cluster.local"
    assert output["tls.ca_file"] == f"{CA_MOUNT_PATH}/ca.crt"
    assert output["http_passwd"] == "${OUTRIGGER_LOG_PASSWORD}"  # never the Secret's value
    assert output["labels"] == "cluster=prod-eu, job=outrigger"


def test_containers_of_the_pod_name_the_records() -> None:
    pod = app_pod({ANNOTATION: "loki"})
    pod["spec"]["containers"] = [{"name": "only", "image": "registry.example.com/app:1"}]
    filters = config(injected(pod))["pipeline"]["filters"]
    assert "container only" in filters[0]["set"]


def test_a_classic_watcher_is_not_among_the_containers_it_names() -> None:
    """Placed classically, the watcher sits in spec.containers beside the app: not a writer."""
    classic = parse_policy(platform(nativeSidecars=False))
    pod = injected(app_pod({ANNOTATION: "loki"}), "shop", classic)
    assert [c["name"] for c in pod["spec"]["containers"]] == ["app", "worker", WATCHER]
    assert "container app,worker" in config(pod)["pipeline"]["filters"][0]["set"]


def test_stdout_adds_no_env_volume_or_filter() -> None:
    pod = injected(app_pod({ANNOTATION: "stdout"}))
    assert "env" not in watcher(pod)
    assert all(v["name"] != "log-watcher-output-ca" for v in pod["spec"]["volumes"])
    assert "filters" not in config(pod)["pipeline"]


def test_an_output_without_ca_or_credentials_adds_only_the_downward_api() -> None:
    document = platform()
    document["logOutputs"]["outputs"]["plain"] = {"type": "http", "host": "logs.example.com"}
    pod = injected(app_pod({ANNOTATION: "plain"}), "shop", parse_policy(document))
    assert [e["name"] for e in watcher(pod)["env"]] == ["POD_NAME", "POD_NAMESPACE", "NODE_NAME"]
    assert all(v["name"] != "log-watcher-output-ca" for v in pod["spec"]["volumes"])


def test_a_pod_volume_named_like_the_ca_volume_is_denied() -> None:
    pod = app_pod({ANNOTATION: "loki"}, volumes=[{"name": "log-watcher-output-ca", "emptyDir": {}}])
    with pytest.raises(InjectionDenied, match="volume name 'log-watcher-output-ca' is already"):
        inject(pod, RequestContext("shop"), PLATFORM)


# Injected again ----------------------------------------------------------------------------


def test_an_injected_pod_is_left_alone() -> None:
    pod = injected(app_pod({ANNOTATION: "loki"}))
    again = inject(pod, RequestContext("shop"), PLATFORM)
    assert again.reason == "already-injected"
    assert again.pod is pod


def test_a_changed_choice_takes_the_env_and_ca_volume_out() -> None:
    loki = injected(app_pod(), "checkout")
    assert "env" in watcher(loki)
    without_rule = parse_policy(platform(rules=[]))
    result = inject(loki, RequestContext("checkout"), without_rule)
    assert result.reason == "reinjected"
    assert "env" not in watcher(result.pod)
    assert all(v["name"] != "log-watcher-output-ca" for v in result.pod["spec"]["volumes"])
    mounts = [m["name"] for m in watcher(result.pod)["volumeMounts"]]
    assert "log-watcher-output-ca" not in mounts
    assert output_name(result.pod) == "stdout"
    assert inject(result.pod, RequestContext("checkout"), without_rule).reason == (
        "already-injected"
    )
