"""`outrigger explain KIND/NAME`: the analysis (pure, on the objects as the API gives them) and
the command end to end.

The end-to-end tests run the real `outrigger explain` (the installed entry point, in a
subprocess) against a real kube-apiserver with its controller manager (`kube` tier): the
Deployments make real ReplicaSets and pods, which the webhook (registered by URL) injects or
not as the API server decides to call it.
"""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_against_cluster
from tests.fake_kube import write_kubeconfig
from tests.kube_env import ControlPlane
from tests.kube_webhook import (
    LABEL,
    configuration,
    new_selector,
    policy_configmap,
    registered,
    running_webhook,
)
from webhook.cluster import explain as cluster_explain
from webhook.cluster.registration import INJECTION_LABEL, webhook_configuration
from webhook.core import explain as ex
from webhook.core.audit import MISSING
from webhook.core.compiled import compile_policy
from webhook.core.injector import RequestContext, inject
from webhook.core.policy import default_policy, parse_policy
from webhook.serving.certs import write_certificates

POLICY = default_policy()
LOG = {"outrigger.dev/inject": "log-watcher"}
CONFIG = webhook_configuration(namespace="outrigger-system", ca_bundle="Cg==")  # opt-in
SELECTED = {INJECTION_LABEL: "enabled"}


def namespace(name: str = "shop", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/metadata.name": name, **(labels or {})},
        }
    }


def deployment(
    template_annotations: dict[str, str] | None = None,
    own_annotations: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "kind": "Deployment",
        "metadata": {
            "name": "web",
            "namespace": "shop",
            "uid": "deploy-uid",
            "annotations": own_annotations or {},
        },
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {
                    "labels": {"app": "web", **(labels or {})},
                    "annotations": template_annotations or {},
                },
                "spec": {"containers": [{"name": "app", "image": "registry.local/app:1.0"}]},
            },
        },
    }


def owned(obj: dict[str, Any], kind: str, name: str, uid: str, owner_uid: str) -> dict[str, Any]:
    """`obj` named `name` (uid `uid`), controlled by the object of uid `owner_uid`."""
    result = copy.deepcopy(obj)
    result["metadata"] = {
        **result.get("metadata", {}),
        "name": name,
        "uid": uid,
        "ownerReferences": [{"kind": kind, "name": "x", "uid": owner_uid, "controller": True}],
    }
    return result


def pod_from(workload: dict[str, Any], name: str, rs_uid: str, *, injected: bool) -> Any:
    """A pod of `workload`'s template, controlled by the ReplicaSet `rs_uid`, as the webhook
    left it (`injected`) or as it is created without the webhook."""
    pod = {"apiVersion": "v1", "kind": "Pod", **copy.deepcopy(workload["spec"]["template"])}
    pod["metadata"]["namespace"] = "shop"
    if injected:
        pod = copy.deepcopy(inject(pod, RequestContext("shop"), POLICY).pod)
    return owned(pod, "ReplicaSet", name, f"{name}-uid", rs_uid)


def explained(
    workload: dict[str, Any],
    ns: dict[str, Any] | None = None,
    config: dict[str, Any] | None = CONFIG,
    pods: list[Any] | None = None,
) -> ex.Explanation:
    return ex.explain(
        workload, ns or namespace(labels=SELECTED), config, "outrigger", POLICY, pods or []
    )


def codes(explanation: ex.Explanation) -> list[str]:
    return [mistake.code for mistake in explanation.mistakes]


# The target ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("deployment/web", ("Deployment", "web")),
        ("deploy/web", ("Deployment", "web")),
        ("deployments.apps/web", ("Deployment", "web")),
        ("sts/db-0.x", ("StatefulSet", "db-0.x")),
        ("ds/agent", ("DaemonSet", "agent")),
        ("rs/web-5d", ("ReplicaSet", "web-5d")),
        ("cj/report", ("CronJob", "report")),
        ("cronjob.batch/report", ("CronJob", "report")),
        ("job/report-29", ("Job", "report-29")),
        ("PO/web-5d-a", ("Pod", "web-5d-a")),
    ],
)
def test_targets_are_read_as_kubectl_names_them(text: str, expected: tuple[str, str]) -> None:
    assert ex.parse_target(text) == expected


@pytest.mark.parametrize(
    "text", ["web", "bogus/web", "deploy/", "deploy/Web", "deploy/a/b", "deployment.batch/web"]
)
def test_other_targets_are_refused_saying_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match=r"KIND/NAME|not an object name"):
        ex.parse_target(text)


# Whether the API server calls the webhook ---------------------------------------------------


def test_a_correct_deployment_is_injected_as_expected() -> None:
    workload = deployment(LOG)
    pods = [pod_from(workload, "web-a", "rs-uid", injected=True)]
    replica_set = owned({"kind": "ReplicaSet"}, "Deployment", "web-5d", "rs-uid", "deploy-uid")
    result = explained(workload, pods=ex.owned_pods(workload, [replica_set], pods))
    assert (result.verdict, result.exit_status, result.mistakes) == (ex.INJECTED, 0, ())
    assert result.call.calls is True
    assert result.sidecars.injected == ("log-watcher",)
    assert "log-watcher: asked for by outrigger.dev/inject" in result.sidecars.explanation
    assert [(p.name, p.finding) for p in result.pods] == [("web-a", None)]


def test_annotations_on_the_deployments_own_metadata_are_named() -> None:
    result = explained(deployment(own_annotations=LOG))
    assert result.verdict == ex.NOT_INJECTED and result.exit_status == 1
    (mistake,) = result.mistakes
    assert mistake.code == "annotations-not-on-pod-template"
    assert "outrigger.dev/inject on its own metadata" in mistake.message
    assert "spec.template.metadata.annotations" in mistake.message


def test_the_same_annotation_on_both_metadata_is_a_harmless_copy() -> None:
    result = explained(deployment(LOG, own_annotations=LOG))
    assert result.exit_status == 0, result.mistakes


def test_a_cronjobs_job_template_metadata_is_a_wrong_place_too() -> None:
    cronjob = {
        "kind": "CronJob",
        "metadata": {"name": "report", "namespace": "shop", "uid": "cj-uid"},
        "spec": {
            "jobTemplate": {
                "metadata": {"annotations": LOG},
                "spec": {"template": deployment()["spec"]["template"]},
            }
        },
    }
    result = explained(cronjob)
    (mistake,) = result.mistakes
    assert "on spec.jobTemplate.metadata" in mistake.message
    assert "spec.jobTemplate.spec.template.metadata.annotations" in mistake.message


def test_a_namespace_without_the_injection_label_is_named_with_the_command() -> None:
    result = explained(deployment(LOG), ns=namespace())
    assert (result.verdict, result.exit_status, result.call.calls) == (ex.NOT_CALLED, 1, False)
    (mistake,) = result.mistakes
    assert mistake.code == "namespace-not-selected"
    assert f"label {INJECTION_LABEL} is missing (must be 'enabled')" in mistake.message
    assert f"kubectl label namespace shop {INJECTION_LABEL}=enabled" in mistake.message


def test_an_unlabelled_namespace_is_no_mistake_for_pods_that_want_nothing() -> None:
    result = explained(deployment(), ns=namespace())
    assert (result.verdict, result.exit_status, result.mistakes) == (ex.NOT_INJECTED, 0, ())
    assert result.call.calls is False  # said, not counted against it


def test_the_injection_label_on_the_pod_instead_of_the_namespace_is_said() -> None:
    result = explained(deployment(LOG, labels=SELECTED), ns=namespace())
    (mistake,) = result.mistakes
    assert "the pod template has the label outrigger.dev/injection" in mistake.message


def test_an_opted_out_namespace_is_told_how_to_opt_back_in() -> None:
    opt_out = webhook_configuration(
        namespace="outrigger-system", ca_bundle="Cg==", injection_mode="opt-out"
    )
    disabled = namespace(labels={INJECTION_LABEL: "disabled"})
    result = explained(deployment(LOG), ns=disabled, config=opt_out)
    (mistake,) = result.mistakes
    assert "which the selector excludes" in mistake.message
    assert f"kubectl label namespace shop {INJECTION_LABEL}-" in mistake.message
    assert explained(deployment(LOG), ns=namespace(), config=opt_out).exit_status == 0


def test_the_webhooks_own_namespace_is_never_injected() -> None:
    own = namespace("outrigger-system", SELECTED)
    workload = deployment(LOG)
    workload["metadata"]["namespace"] = "outrigger-system"
    result = explained(workload, ns=own)
    assert result.verdict == ex.NOT_INJECTED and result.call.calls is False
    assert "the webhook's own" in result.sidecars.explanation[0]


def test_an_object_selector_that_the_template_fails() -> None:
    config = copy.deepcopy(CONFIG)
    config["webhooks"][0]["objectSelector"] = {"matchLabels": {"inject": "yes"}}
    result = explained(deployment(LOG), config=config)
    assert result.verdict == ex.NOT_CALLED
    assert codes(result) == ["object-not-selected"]
    assert "label inject is missing" in result.mistakes[0].message
    with_label = explained(deployment(LOG, labels={"inject": "yes"}), config=config)
    assert with_label.verdict == ex.INJECTED


def test_no_configuration_or_no_rule_for_pods_means_no_call() -> None:
    absent = explained(deployment(LOG), config=None)
    assert absent.verdict == ex.NOT_CALLED and codes(absent) == ["no-webhook-configuration"]
    config = copy.deepcopy(CONFIG)
    config["webhooks"][0]["rules"][0]["operations"] = ["UPDATE"]
    updates_only = explained(deployment(LOG), config=config)
    assert updates_only.verdict == ex.NOT_CALLED and codes(updates_only) == ["no-pod-rule"]


def with_conditions(conditions: list[dict[str, str]]) -> dict[str, Any]:
    config = copy.deepcopy(CONFIG)
    config["webhooks"][0]["matchConditions"] = conditions
    return config


def compiled_conditions() -> list[dict[str, str]]:
    compiled = compile_policy(POLICY, "outrigger-system").match_conditions or ()
    return [{"name": c.name, "expression": c.expression} for c in compiled]


def test_the_policys_own_match_conditions_are_evaluated() -> None:
    config = with_conditions(compiled_conditions())
    asks = explained(deployment(LOG), config=config)
    assert asks.verdict == ex.INJECTED
    assert "  matchCondition outrigger.dev/policy-applies: true" in asks.call.lines
    silent = explained(deployment(), config=config)
    assert silent.call.calls is False and silent.exit_status == 0
    assert any("policy-applies: false (no outrigger.dev/" in line for line in silent.call.lines)


def test_a_condition_the_policy_does_not_compile_is_not_claimed() -> None:
    foreign = {"name": "team/only-frontends", "expression": "object.metadata.labels.tier == 'x'"}
    result = explained(deployment(LOG), config=with_conditions([foreign]))
    assert (result.verdict, result.call.calls, result.exit_status) == (ex.UNDETERMINED, None, 1)
    assert result.call.lines[3].startswith("  matchCondition team/only-frontends: not evaluated")
    assert "if called, will be injected with log-watcher" in result.summary


def test_a_condition_compiled_from_another_policy_is_not_evaluated() -> None:
    other = parse_policy({**POLICY.model_dump(mode="json"), "excludedNamespaces": ["batch-*"]})
    compiled = compile_policy(other, "outrigger-system").match_conditions or ()
    config = with_conditions([{"name": c.name, "expression": c.expression} for c in compiled])
    result = explained(deployment(LOG), config=config)
    assert result.verdict == ex.UNDETERMINED
    assert any("namespace-not-excluded: not evaluated" in line for line in result.call.lines)


def test_failure_policy_ignore_is_explained() -> None:
    config = copy.deepcopy(CONFIG)
    config["webhooks"][0]["failurePolicy"] = "Ignore"
    lines = explained(deployment(LOG), config=config).call.lines
    assert lines[0] == "webhook inject.outrigger.dev (failurePolicy Ignore):"
    assert any("created without their sidecars" in line for line in lines)


# Which sidecars, and the annotations' mistakes ------------------------------------------------


def test_annotations_with_no_effect_are_mistakes() -> None:
    annotations = {**LOG, "outrigger.dev/log-pth": "/x", "outrigger.dev/ambassador-port": "9000"}
    result = explained(deployment(annotations))
    assert result.verdict == ex.INJECTED and result.exit_status == 1
    messages = [m.message for m in result.mistakes if m.code == "annotation-no-effect"]
    assert messages == [
        "annotation outrigger.dev/log-pth is not one the policy knows",
        "annotation outrigger.dev/ambassador-port is ignored: ambassador is not injected",
    ]


def test_a_denial_is_given_with_the_webhooks_message() -> None:
    result = explained(deployment({"outrigger.dev/inject": "bogus"}))
    assert (result.verdict, result.exit_status) == (ex.DENIED, 1)
    assert codes(result) == ["denied"]
    assert "unknown sidecar 'bogus'" in result.mistakes[0].message
    assert "REFUSED" in result.summary


def test_an_inject_label_instead_of_an_annotation_is_named() -> None:
    result = explained(deployment(labels={"outrigger.dev/inject": "log-watcher"}))
    assert codes(result) == ["label-not-annotation"]
    assert result.exit_status == 1


def test_a_rule_that_requires_a_sidecar_is_named() -> None:
    policy = parse_policy(
        {
            **POLICY.model_dump(mode="json"),
            "rules": [{"name": "shop-logs", "namespaces": ["shop"], "require": ["log-watcher"]}],
        }
    )
    result = ex.explain(deployment(), namespace(labels=SELECTED), CONFIG, "outrigger", policy, [])
    assert result.sidecars.explanation[0] == "log-watcher: required by rule 'shop-logs'"
    assert result.sidecars.explanation[1].startswith("log-watcher resources: cpu request 10m")
    assert result.verdict == ex.INJECTED


# The running pods -----------------------------------------------------------------------------


def test_pods_are_found_through_the_replica_sets_the_deployment_controls() -> None:
    workload = deployment(LOG)
    mine = owned({"kind": "ReplicaSet"}, "Deployment", "web-5d", "rs-uid", "deploy-uid")
    stranger = owned({"kind": "ReplicaSet"}, "Deployment", "web-5d", "other-rs", "old-deploy")
    pods = [
        pod_from(workload, "web-a", "rs-uid", injected=False),
        pod_from(workload, "web-b", "other-rs", injected=False),
        pod_from(workload, "web-c", "rs-uid", injected=True),
    ]
    found = ex.owned_pods(workload, [mine, stranger], pods)
    assert sorted(p["metadata"]["name"] for p in found) == ["web-a", "web-c"]
    result = explained(workload, pods=found)
    assert [(p.name, p.finding) for p in result.pods] == [("web-a", MISSING), ("web-c", None)]
    assert result.fix == "kubectl rollout restart deployment/web -n shop"
    assert result.verdict == ex.INJECTED and result.exit_status == 1


def test_terminating_pods_are_counted_not_classified() -> None:
    workload = deployment(LOG)
    leaving = pod_from(workload, "web-old", "rs-uid", injected=False)
    leaving["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    result = explained(
        workload, pods=[leaving, pod_from(workload, "web-a", "rs-uid", injected=True)]
    )
    assert (result.terminating, [p.name for p in result.pods]) == (1, ["web-a"])
    assert result.exit_status == 0


def test_a_pod_is_explained_as_created_anew_and_classified_itself() -> None:
    workload = deployment(LOG)
    pod = pod_from(workload, "web-a", "rs-uid", injected=True)
    pod["kind"] = "Pod"
    result = explained(pod, pods=ex.owned_pods(pod, [], []))
    assert result.sidecars.injected == ("log-watcher",)  # from the pod, its injection taken out
    assert [(p.name, p.finding) for p in result.pods] == [("web-a", None)]
    assert result.notes == (
        "this pod was made by ReplicaSet/x: its next pods come from that template",
    )
    assert result.exit_status == 0


# Output ---------------------------------------------------------------------------------------


def test_what_comes_from_the_cluster_is_escaped_in_text_and_json() -> None:
    hostile = "outrigger.dev/\x1b[2Jx\u202e"
    result = explained(deployment(own_annotations={hostile: "1"}))
    text = ex.render_text(result)
    assert "\x1b" not in text and "\u202e" not in text
    assert "outrigger.dev/\\x1b[2Jx\\u202e on its own metadata" in text
    document = ex.render_json(result)
    assert document.isascii() and "\x1b" not in document
    assert hostile in json.loads(document)["mistakes"][0]["message"]


def test_the_json_document_holds_the_same_facts() -> None:
    result = explained(deployment(LOG), ns=namespace())
    document = json.loads(ex.render_json(result))
    assert document["verdict"] == ex.NOT_CALLED and document["exitStatus"] == 1
    assert document["webhook"]["calls"] is False
    assert document["sidecars"]["injected"] == ["log-watcher"]
    assert [m["code"] for m in document["mistakes"]] == ["namespace-not-selected"]


# End to end, against a real API server and controller manager -------------------------------


def create_deployment(
    kube: ControlPlane,
    namespace: str,
    name: str,
    *,
    own: dict[str, str],
    template: dict[str, str],
    replicas: int = 1,
) -> None:
    kube.call(
        "POST",
        f"/apis/apps/v1/namespaces/{namespace}/deployments",
        {
            "metadata": {"name": name, "annotations": own},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}, "annotations": template},
                    "spec": {"containers": [{"name": "app", "image": "registry.local/app:1.0"}]},
                },
            },
        },
    )


def create_cronjob(kube: ControlPlane, namespace: str, name: str) -> None:
    """A suspended CronJob annotated on its jobTemplate's metadata, not its pod template."""
    template = {
        "metadata": {"labels": {"app": name}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "app", "image": "registry.local/app:1.0"}],
        },
    }
    kube.call(
        "POST",
        f"/apis/batch/v1/namespaces/{namespace}/cronjobs",
        {
            "metadata": {"name": name},
            "spec": {
                "schedule": "0 0 1 1 *",
                "suspend": True,
                "jobTemplate": {"metadata": {"annotations": LOG}, "spec": {"template": template}},
            },
        },
    )


# The least rights `explain` needs (docs/platform/upgrades.md lists them).
EXPLAIN_RULES = [
    {"apiGroups": [""], "resources": ["namespaces", "configmaps"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
    {
        "apiGroups": ["apps"],
        "resources": ["deployments", "statefulsets", "daemonsets"],
        "verbs": ["get"],
    },
    {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": ["get", "list"]},
    {"apiGroups": ["batch"], "resources": ["cronjobs"], "verbs": ["get"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list"]},
    {
        "apiGroups": ["admissionregistration.k8s.io"],
        "resources": ["mutatingwebhookconfigurations"],
        "verbs": ["get"],
    },
]


def reader_kubeconfig(kube: ControlPlane, directory: Path, namespace: str) -> Path:
    """A ServiceAccount's kubeconfig with EXPLAIN_RULES and nothing else, by a ClusterRole."""
    name = f"explain-reader-{namespace}"
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    kube.call("POST", f"{rbac}/clusterroles", {"metadata": {"name": name}, "rules": EXPLAIN_RULES})
    kube.call(
        "POST",
        f"{rbac}/clusterrolebindings",
        {
            "metadata": {"name": name},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": name,
            },
            "subjects": [{"kind": "ServiceAccount", "name": "explainer", "namespace": namespace}],
        },
    )
    return kube.token_kubeconfig(directory, namespace, "explainer")


@pytest.fixture(scope="module")
def cluster(
    kube_controllers: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ControlPlane, dict[str, str]]]:
    """With the webhook registered for namespaces labelled LABEL=<selected>: in `good` (so
    labelled) Deployment `web` annotated on its pod template, `misplaced` on its own
    metadata; in `bare` (not labelled) `web` annotated on its template. Each has a pod."""
    kube = kube_controllers
    selected = new_selector()
    good = kube.namespace("good", {LABEL: selected})
    bare = kube.namespace("bare")
    policy_configmap(kube, good)
    with running_webhook(tmp_path_factory.mktemp("explain-webhook")) as webhook:
        body = configuration(webhook.url, webhook.server.cert_dir / "ca.crt", selected)
        with registered(kube, body) as name:
            create_deployment(kube, good, "web", own={}, template=LOG, replicas=2)
            create_deployment(kube, good, "misplaced", own=LOG, template={})
            create_deployment(kube, bare, "web", own={}, template=LOG)
            create_cronjob(kube, good, "report")
            injected, _ = kube.wait_for_pods(good, "app=web", 2)
            assert [c["name"] for c in injected["spec"]["initContainers"]] == ["log-watcher"]
            kube.wait_for_pods(good, "app=misplaced")
            kube.wait_for_pods(bare, "app=web")
            names = {"good": good, "bare": bare, "webhook": name, "selected": selected}
            names["pod"] = injected["metadata"]["name"]
            yield kube, names


def run_explain(tmp_path: Path, kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_against_cluster("explain", tmp_path, kubeconfig, *args)


@pytest.mark.kube
def test_a_correct_deployment_exits_0(
    cluster: tuple[ControlPlane, dict[str, str]], tmp_path: Path
) -> None:
    kube, names = cluster
    good = names["good"]
    result = run_explain(
        tmp_path, kube.kubeconfig, "deploy/web", "-n", good, "--webhook", names["webhook"],
        "--from-cluster", f"{good}/outrigger-policy",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"Deployment/web in namespace {good}: will be injected with log-watcher"
    assert f"    namespaceSelector matches namespace {good}" in lines
    assert "  log-watcher: asked for by outrigger.dev/inject" in lines
    assert "running pods: 2, all as the policy says" in lines
    assert lines[-1] == "mistakes: none found"


@pytest.mark.kube
def test_least_rights_and_the_contexts_namespace_suffice(
    cluster: tuple[ControlPlane, dict[str, str]], tmp_path: Path
) -> None:
    """A ServiceAccount with EXPLAIN_RULES alone; no -n: the kubeconfig context's namespace."""
    kube, names = cluster
    good = names["good"]
    kubeconfig = reader_kubeconfig(kube, tmp_path, good)
    config = json.loads(kubeconfig.read_text())
    config["contexts"][0]["context"]["namespace"] = good
    kubeconfig.write_text(json.dumps(config))
    args = ("--webhook", names["webhook"], "--from-cluster", f"{good}/outrigger-policy")
    for target in ("deploy/web", f"po/{names['pod']}"):
        result = run_explain(tmp_path, kubeconfig, target, *args)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f" in namespace {good}: will be injected with log-watcher" in result.stdout
    cronjob = run_explain(tmp_path, kubeconfig, "cj/report", *args)
    assert cronjob.returncode == 1, cronjob.stdout + cronjob.stderr
    assert "CronJob/report has outrigger.dev/inject on spec.jobTemplate.metadata" in cronjob.stdout


@pytest.mark.kube
def test_pods_are_listed_page_by_page(
    cluster: tuple[ControlPlane, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages of one item make the reader follow `continue` through the real API's lists."""
    kube, names = cluster
    monkeypatch.setattr(cluster_explain, "CHUNK_SIZE", 1)
    request = cluster_explain.Request("deploy/web", names["good"], names["webhook"], None, None)
    result = cluster_explain.run_explain(kube.kubeconfig, None, request)
    assert [p.finding for p in result.pods] == [None, None]
    assert result.exit_status == 0


@pytest.mark.kube
def test_annotations_on_the_deployments_metadata_exit_1_naming_them(
    cluster: tuple[ControlPlane, dict[str, str]], tmp_path: Path
) -> None:
    kube, names = cluster
    good = names["good"]
    args = ("deployment/misplaced", "-n", good, "--webhook", names["webhook"])
    result = run_explain(tmp_path, kube.kubeconfig, *args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "not injected, as the policy says (no annotation or rule asks" in result.stdout
    assert (
        "  - Deployment/misplaced has outrigger.dev/inject on its own metadata, which its pods "
        "do not inherit (the webhook sees only the pods): move it to "
        "spec.template.metadata.annotations"
    ) in result.stdout.splitlines()
    document = json.loads(run_explain(tmp_path, kube.kubeconfig, *args, "-o", "json").stdout)
    assert document["exitStatus"] == 1 and document["webhook"]["calls"] is True
    assert [m["code"] for m in document["mistakes"]] == ["annotations-not-on-pod-template"]
    assert [p["finding"] for p in document["pods"]] == [None]


@pytest.mark.kube
def test_an_unlabelled_namespace_exits_1_naming_the_label(
    cluster: tuple[ControlPlane, dict[str, str]], tmp_path: Path
) -> None:
    kube, names = cluster
    bare, selected = names["bare"], names["selected"]
    result = run_explain(
        tmp_path, kube.kubeconfig, "deploy/web", "-n", bare, "--webhook", names["webhook"]
    )
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "will NOT be injected: the API server does not call the webhook" in out
    assert f"label {LABEL} is missing (must be {selected!r})" in out
    assert "running pods: 1, 1 not as the policy says" in out
    assert f"kubectl label namespace {bare} {LABEL}={selected}" in out
    assert "missing: should have log-watcher" in out  # its pod was created without it
    assert f"fix: kubectl rollout restart deployment/web -n {bare}" in out


@pytest.mark.kube
def test_a_workload_that_does_not_exist_exits_2(
    cluster: tuple[ControlPlane, dict[str, str]], tmp_path: Path
) -> None:
    kube, names = cluster
    result = run_explain(tmp_path, kube.kubeconfig, "sts/nothing", "-n", names["good"])
    assert result.returncode == 2
    assert (
        result.stderr == f"outrigger: statefulset nothing not found in namespace {names['good']}\n"
    )


def test_an_unreachable_cluster_exits_2(tmp_path: Path) -> None:
    paths = write_certificates(tmp_path / "c", ["localhost"], ["127.0.0.1"])
    kubeconfig = write_kubeconfig(tmp_path, "https://127.0.0.1:1", paths.ca_cert)
    result = run_explain(tmp_path, kubeconfig, "deploy/web", "-n", "shop")
    assert result.returncode == 2
    assert result.stderr.startswith("outrigger: cannot read deployment web in namespace shop")
    assert "Traceback" not in result.stderr


def test_a_malformed_target_exits_2_before_any_call(tmp_path: Path) -> None:
    result = run_explain(tmp_path, tmp_path / "absent", "deploy")
    assert result.returncode == 2 and "expected KIND/NAME" in result.stderr
