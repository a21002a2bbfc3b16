"""`exclude` against `require`: an exclusion by pod labels lifts no requirement.

The pod's creator writes its labels, so an `exclude` rule that selects by `podSelector` cannot
exempt a pod from a sidecar a `require` rule gives it: the pod gets the required sidecars and
nothing else (no rule default, nothing it asks for). An `exclude` rule that selects by
namespace alone, and `excludedNamespaces`, still exempt it: namespaces are the platform's.
The engine, the envelope, `inject --explain` and the compiled CEL (matchConditions and the
guard, evaluated by the C++ CEL runtime) agree.
"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.cel_runtime import evaluate
from tests.conftest import FIXTURES, admission_review, outrigger_executable
from webhook.admission.review import review
from webhook.core.annotations import InvalidAnnotations
from webhook.core.compiled import compile_policy
from webhook.core.policy import Policy, load_policy, parse_policy
from webhook.core.selection import INJECTED, RULE_EXCLUDED, decide

TEAM = load_policy(FIXTURES / "policies" / "good-platform-team.yaml")
# The docs' platform policy: `frontends-ship-logs` requires log-watcher of tier=frontend
# pods in prod-*; `payments-egress` injects ambassador by default in payments;
# `no-sidecars-for-operators` excludes app.kubernetes.io/component=operator pods.
OPERATOR = {"app.kubernetes.io/component": "operator"}
FRONTEND = {"tier": "frontend"}
UPSTREAM = {"outrigger.dev/ambassador-upstream": "payments.example.com:443"}


def with_rules(*rules: dict[str, Any]) -> Policy:
    document = TEAM.model_dump(mode="json", exclude_none=True)
    document["rules"] = [*document["rules"], *rules]
    return parse_policy(document)


def pod(labels: dict[str, str], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "op", "labels": labels}
    if annotations is not None:
        metadata["annotations"] = annotations
    containers = [{"name": "app", "image": "registry.example.com/app:1"}]
    return {"metadata": metadata, "spec": {"containers": containers}}


def answer(policy: Policy, sent: dict[str, Any], namespace: str) -> dict[str, Any]:
    status, body = review(orjson.dumps(admission_review(sent, namespace=namespace)), policy)
    assert status == 200
    response: dict[str, Any] = orjson.loads(body)["response"]
    return response


def added_containers(response: dict[str, Any]) -> list[str]:
    operations = orjson.loads(base64.b64decode(response["patch"]))
    return [
        op["value"]["name"]
        for op in operations
        if op["op"] == "add" and op["path"].startswith("/spec/initContainers/")
    ] + [
        container["name"]
        for op in operations
        if op["path"] == "/spec/initContainers"
        for container in op["value"]
    ]


def test_a_label_exclusion_does_not_lift_a_require() -> None:
    response = answer(TEAM, pod({**FRONTEND, **OPERATOR}), "prod-eu")
    assert response["allowed"] and added_containers(response) == ["log-watcher"]


def test_what_the_pod_asks_for_beyond_the_requirement_stays_excluded_with_a_warning() -> None:
    asked = {"outrigger.dev/inject": "log-watcher,ambassador", **UPSTREAM}
    response = answer(TEAM, pod({**FRONTEND, **OPERATOR}, asked), "prod-eu")
    assert response["allowed"] and added_containers(response) == ["log-watcher"]
    assert (
        "outrigger.dev/inject asks for ambassador, which rule 'no-sidecars-for-operators' "
        "excludes from this pod (by its labels): only the sidecars a rule requires are injected"
    ) in response["warnings"]


def test_an_opt_out_of_a_label_excluded_pod_is_warned_about_as_any_other() -> None:
    response = answer(
        TEAM, pod({**FRONTEND, **OPERATOR}, {"outrigger.dev/inject": "false"}), "prod-eu"
    )
    assert response["allowed"] and added_containers(response) == ["log-watcher"]
    assert any("requires log-watcher" in warning for warning in response["warnings"])


@pytest.mark.parametrize(
    ("namespace", "labels", "annotations"),
    [
        pytest.param("payments", OPERATOR, UPSTREAM, id="a-rule-default"),
        pytest.param("shop", OPERATOR, {"outrigger.dev/inject": "log-watcher"}, id="asked-for"),
        pytest.param("prod-eu", {"tier": "backend", **OPERATOR}, None, id="nothing-required"),
    ],
)
def test_a_label_exclusion_still_excludes_what_is_not_required(
    namespace: str, labels: dict[str, str], annotations: dict[str, str] | None
) -> None:
    response = answer(TEAM, pod(labels, annotations), namespace)
    assert response == {"uid": response["uid"], "allowed": True}


@pytest.mark.parametrize(
    "exclude",
    [
        pytest.param({"namespaces": ["prod-sandbox"]}, id="by-namespace"),
        pytest.param({"namespaces": ["prod-sand*"], "podSelector": {}}, id="empty-selector"),
    ],
)
def test_an_exclusion_by_namespace_alone_still_exempts_from_a_require(
    exclude: dict[str, Any],
) -> None:
    policy = with_rules({"name": "sandbox", "exclude": True, **exclude})
    response = answer(policy, pod(FRONTEND), "prod-sandbox")
    assert response == {"uid": response["uid"], "allowed": True}
    decision = decide("prod-sandbox", FRONTEND, {}, policy)
    assert decision.reason == RULE_EXCLUDED and decision.explanation == (
        "excluded by rule 'sandbox'",
    )
    # and a namespace exclusion wins over a label one, whatever their order
    assert decide("prod-sandbox", {**FRONTEND, **OPERATOR}, {}, policy).reason == RULE_EXCLUDED


def test_the_decision_says_why_the_required_sidecar_came_despite_the_exclusion() -> None:
    decision = decide("prod-eu", {**FRONTEND, **OPERATOR}, {}, TEAM)
    assert decision.reason == INJECTED and decision.sidecars == ("log-watcher",)
    assert decision.explanation == (
        "log-watcher: required by rule 'frontends-ship-logs'",
        "rule 'no-sidecars-for-operators' excludes the pod by its labels, which exempt it "
        "from no rule's require (the pod's creator writes them): only the required sidecars "
        "are injected",
    )


def test_inject_explain_says_why_the_required_sidecar_came(tmp_path: Path) -> None:
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(
        yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", **pod({**FRONTEND, **OPERATOR})})
    )
    policy = FIXTURES / "policies" / "good-platform-team.yaml"
    result = subprocess.run(
        [outrigger_executable(), "inject", "--explain", "--policy", str(policy), "-n", "prod-eu",
         "-f", str(manifest)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "Pod/op in namespace prod-eu: injected log-watcher"
    assert lines[1].startswith("  API server: calls the webhook")
    assert lines[2:4] == [
        "  log-watcher: required by rule 'frontends-ship-logs'",
        "  rule 'no-sidecars-for-operators' excludes the pod by its labels, which exempt it "
        "from no rule's require (the pod's creator writes them): only the required sidecars "
        "are injected",
    ]


def test_the_compiled_conditions_and_guard_follow_the_precedence() -> None:
    compiled = compile_policy(TEAM, "outrigger-system")
    assert compiled.match_conditions is not None and compiled.validations is not None

    def called(labels: dict[str, str], namespace: str) -> bool:
        sent = pod(labels)
        return all(evaluate(c.expression, sent, namespace) for c in compiled.match_conditions)

    def refused(labels: dict[str, str], namespace: str) -> list[str]:
        sent = pod(labels)  # as the webhook down leaves it: no sidecar
        if not all(evaluate(c.expression, sent, namespace) for c in compiled.guard_conditions):
            return []
        return [
            v.message for v in compiled.validations if not evaluate(v.expression, sent, namespace)
        ]

    assert called({**FRONTEND, **OPERATOR}, "prod-eu")
    (message,) = refused({**FRONTEND, **OPERATOR}, "prod-eu")
    assert 'rule "frontends-ship-logs" requires the sidecar log-watcher' in message
    # Nothing required: the exclusion by labels holds, in the API server too.
    assert not called(OPERATOR, "payments") and refused(OPERATOR, "payments") == []
    assert not called({"tier": "backend", **OPERATOR}, "prod-eu")
    # By namespace alone: neither called nor guarded.
    sandboxed = compile_policy(
        with_rules({"name": "sandbox", "exclude": True, "namespaces": ["prod-sandbox"]}),
        "outrigger-system",
    )
    assert sandboxed.match_conditions is not None
    sent = pod(FRONTEND)
    assert not all(evaluate(c.expression, sent, "prod-sandbox") for c in sandboxed.match_conditions)
    assert not all(evaluate(c.expression, sent, "prod-sandbox") for c in sandboxed.guard_conditions)


# Selectors of every kind, so that the keys they read are all exercised.
SELECTING = with_rules(
    {"name": "canary", "namespaces": ["shop"], "inject": ["log-watcher"],
     "podSelector": {"matchExpressions": [{"key": "track", "operator": "In",
                                           "values": ["canary"]}]}},
    {"name": "untracked", "exclude": True,
     "podSelector": {"matchExpressions": [{"key": "owner", "operator": "DoesNotExist"}]}},
)  # fmt: skip
LABEL_KEYS = ["tier", "track", "owner", "app", "pod-template-hash", *OPERATOR]
LABEL_VALUES = ["frontend", "backend", "canary", "operator", "web"]


@settings(max_examples=300, deadline=None)
@given(
    namespace=st.sampled_from(["prod-eu", "shop", "payments", "kube-system"]),
    labels=st.dictionaries(st.sampled_from(LABEL_KEYS), st.sampled_from(LABEL_VALUES)),
    inject=st.sampled_from([None, "true", "false", "log-watcher", "ambassador", "nope"]),
)
def test_a_decision_reads_only_the_labels_the_selectors_name(
    namespace: str, labels: dict[str, str], inject: str | None
) -> None:
    """What the injector's decision cache is keyed on (`Policy.selector_label_keys`): the
    other labels of a pod never change its decision."""
    annotations = {} if inject is None else {"outrigger.dev/inject": inject}
    read = {key: value for key, value in labels.items() if key in SELECTING.selector_label_keys}

    def decided(labels: dict[str, str]) -> Any:
        try:
            return decide(namespace, labels, annotations, SELECTING)
        except InvalidAnnotations as error:
            return str(error)

    assert decided(labels) == decided(read)


def test_the_selector_label_keys_are_those_of_matchlabels_and_matchexpressions() -> None:
    assert SELECTING.selector_label_keys == {"tier", "track", "owner", *OPERATOR}
