"""`outrigger audit`: the classification (pure, on pod lists) and the command end to end.

The end-to-end tests run the real `outrigger audit` (the installed entry point, in a
subprocess) against a real kube-apiserver with its controller manager (`kube` tier): the
pods are made by real Deployments, Jobs and the webhook itself, stored and defaulted by the
API server, listed in real pages.
"""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import FIXTURES, run_against_cluster
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
from webhook.core.audit import MISMATCHED, MISSING, STALE, classify, group, workload_of
from webhook.core.injector import RequestContext, inject
from webhook.core.policy import default_policy
from webhook.serving.certs import write_certificates

POLICY = default_policy()
LOG = {"outrigger.dev/inject": "log-watcher"}


def pod(
    name: str,
    annotations: dict[str, str] | None = None,
    owner: tuple[str, str] | None = None,
    namespace: str = "shop",
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "annotations": annotations or {},
    }
    if owner:
        metadata["ownerReferences"] = [
            {
                "apiVersion": "apps/v1",
                "kind": owner[0],
                "name": owner[1],
                "uid": "u",
                "controller": True,
            }
        ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "containers": [{"name": "app", "image": "registry.example.com/app:1"}],
            "nodeName": "node-1",
        },
        "status": {"phase": "Running"},
    }


def injected(name: str, **kwargs: Any) -> dict[str, Any]:
    """A pod as the webhook injected it, then defaulted by the API server and scheduled."""
    # A copy: the injector's result shares its sidecars with its caches, never to be modified.
    result = copy.deepcopy(
        inject(pod(name, dict(LOG), **kwargs), RequestContext("shop"), POLICY).pod
    )
    for container in result["spec"]["initContainers"]:
        container["terminationMessagePath"] = "/dev/termination-log"
        container["imagePullPolicy"] = "IfNotPresent"
    return result


def stale(name: str, **kwargs: Any) -> dict[str, Any]:
    """Injected under the policy of an earlier release (a golden of that time)."""
    old = yaml.safe_load((FIXTURES / "stale-status.yaml").read_text())["request"]["object"]
    result = copy.deepcopy(old)
    result["metadata"] = {
        **pod(name, **kwargs)["metadata"],
        "annotations": old["metadata"]["annotations"],
    }
    return result


# The classification -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        pytest.param(pod("a", LOG), MISSING, id="missing"),
        pytest.param(
            pod(
                "a",
                {"outrigger.dev/inject": "ambassador", "outrigger.dev/ambassador-upstream": "x:80"},
            ),
            MISSING,
            id="missing-ambassador",
        ),
        pytest.param(injected("a"), None, id="as-injected-with-defaults"),
        pytest.param(stale("a"), STALE, id="stale"),
        pytest.param(
            pod(
                "a",
                {
                    **LOG,
                    "outrigger.dev/status": json.dumps(
                        {"injected": ["log-watcher"], "policy": POLICY.version}
                    ),
                },
            ),
            MISMATCHED,
            id="mismatched",
        ),
        pytest.param(pod("a"), None, id="not-requested"),
        pytest.param(pod("a", {"outrigger.dev/inject": "false"}), None, id="opted-out"),
        pytest.param(pod("a", {"outrigger.dev/inject": "bogus"}), None, id="would-be-denied"),
    ],
)
def test_classify(sent: dict[str, Any], expected: str | None) -> None:
    finding = classify(sent, "shop", POLICY)
    assert (finding.kind if finding else None) == expected


def test_pods_in_the_webhooks_own_namespace_are_no_findings() -> None:
    """`outrigger audit` hands on $POD_NAMESPACE (`Scope.own_namespace`): never injected
    into, so nothing is missing there."""
    assert classify(pod("a", LOG), "outrigger-system", POLICY) is not None
    assert classify(pod("a", LOG), "outrigger-system", POLICY, "outrigger-system") is None


def test_a_tampered_injected_pod_is_mismatched() -> None:
    tampered = injected("a")
    tampered["spec"]["initContainers"][0]["image"] = "cr.fluentbit.io/fluent/fluent-bit:4.1.0"
    finding = classify(tampered, "shop", POLICY)
    assert finding is not None and finding.kind == MISMATCHED


TOKEN_MOUNT = {
    "name": "kube-api-access-x7k2p",
    "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
    "readOnly": True,
}


def with_token_after_injection(pod: dict[str, Any], *, also: dict[str, Any] | None = None) -> Any:
    """What the ServiceAccount plugin makes of a pod injected before it ran (`outrigger
    inject`, then a create): the token volume last, a token mount last in every container,
    sidecars included (a real API server's order, see test_kube_admission); `also` is one
    more mount for the app, as a tampering would add."""
    result = copy.deepcopy(pod)
    spec = result["spec"]
    spec["volumes"].append({"name": TOKEN_MOUNT["name"], "projected": {"sources": []}})
    for container in [*spec.get("initContainers", ()), *spec["containers"]]:
        container.setdefault("volumeMounts", []).append(dict(TOKEN_MOUNT))
    if also:
        spec["containers"][0]["volumeMounts"].append(also)
    return result


def test_a_token_volume_the_api_server_added_after_the_injection_is_fine() -> None:
    both = {
        "outrigger.dev/inject": "log-watcher,ambassador",
        "outrigger.dev/ambassador-upstream": "x:80",
    }
    sent = inject(pod("a", both), RequestContext("shop"), POLICY).pod
    assert classify(with_token_after_injection(sent), "shop", POLICY) is None
    extra = {"name": "shared-logs", "mountPath": "/elsewhere"}
    tampered = with_token_after_injection(sent, also=extra)
    finding = classify(tampered, "shop", POLICY)
    assert finding is not None and finding.kind == MISMATCHED


def test_a_terminating_pod_is_not_audited() -> None:
    """Replaced by a restart, it is on its way out: a rollout waiting for a clean audit would
    otherwise wait out its grace period."""
    leaving = stale("web-1")
    assert classify(leaving, "shop", POLICY) is not None
    leaving["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert classify(leaving, "shop", POLICY) is None


def test_excluded_namespaces_are_not_audited() -> None:
    assert classify(pod("a", LOG, namespace="kube-system"), "kube-system", POLICY) is None


def test_findings_are_grouped_by_workload_with_the_fix() -> None:
    pods = [
        pod("web-1", LOG, owner=("ReplicaSet", "web-5d")),
        pod("web-2", LOG, owner=("ReplicaSet", "web-5d")),
        pod("report-1", LOG, owner=("Job", "report-29")),
        pod("debug", LOG),
        pod("db-0", LOG, owner=("StatefulSet", "db")),
    ]
    parents = {
        ("shop", "ReplicaSet", "web-5d"): ("Deployment", "web"),
        ("shop", "Job", "report-29"): ("CronJob", "report"),
    }
    findings = [f for p in pods if (f := classify(p, "shop", POLICY))]
    owners = {("shop", p["metadata"]["name"]): workload_of(p, "shop", parents) for p in pods}
    fixes = {
        (g.owner_kind, g.owner_name): (len(g.findings), g.fix) for g in group(findings, owners)
    }
    assert fixes == {
        ("CronJob", "report"): (
            1,
            "delete the pods (CronJob report makes new ones): kubectl delete pod -n shop report-1",
        ),
        ("Deployment", "web"): (2, "kubectl rollout restart deployment/web -n shop"),
        ("Pod", "debug"): (
            1,
            "delete the pod and create it again: kubectl delete pod -n shop debug",
        ),
        ("StatefulSet", "db"): (1, "kubectl rollout restart statefulset/db -n shop"),
    }


# End to end, against a real API server and controller manager -------------------------------


def _template(app: str, annotations: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"labels": {"app": app}, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "registry.local/app:1.0"}], **spec},
    }


def _deployment(kube: ControlPlane, namespace: str, name: str, replicas: int) -> None:
    kube.call(
        "POST",
        f"/apis/apps/v1/namespaces/{namespace}/deployments",
        {
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": _template(name, LOG),
            },
        },
    )


def _job_of_a_cronjob(kube: ControlPlane, namespace: str) -> None:
    """CronJob `report` (suspended) and a Job it controls, as its schedule would make."""
    template = _template("report", LOG, restartPolicy="Never")
    cronjob = kube.call(
        "POST",
        f"/apis/batch/v1/namespaces/{namespace}/cronjobs",
        {
            "metadata": {"name": "report"},
            "spec": {
                "schedule": "0 0 1 1 *",
                "suspend": True,
                "jobTemplate": {"spec": {"template": template}},
            },
        },
    )
    owner = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "name": "report",
        "uid": cronjob["metadata"]["uid"],
        "controller": True,
    }
    kube.call(
        "POST",
        f"/apis/batch/v1/namespaces/{namespace}/jobs",
        {
            "metadata": {"name": "report-29", "ownerReferences": [owner]},
            "spec": {"template": template},
        },
    )


def _bare(kube: ControlPlane, namespace: str, pod: dict[str, Any]) -> None:
    body = {**pod, "metadata": {**pod["metadata"], "namespace": namespace}}
    body["spec"] = {k: v for k, v in body["spec"].items() if k != "nodeName"}
    body.pop("status", None)
    kube.call("POST", f"/api/v1/namespaces/{namespace}/pods", body)


@pytest.fixture(scope="module")
def cluster(
    kube_controllers: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ControlPlane, dict[str, str]]]:
    """A namespace `shop` whose pods were made before the webhook selected it (missing,
    stale, forged), then one Deployment made through the webhook (fine), and a namespace
    `lab` the webhook does not select. Yields the names audit needs."""
    kube = kube_controllers
    shop, lab = kube.namespace("shop"), kube.namespace("lab")
    _deployment(kube, shop, "web", 2)
    _job_of_a_cronjob(kube, shop)
    _bare(kube, shop, pod("debug", LOG))
    _bare(kube, shop, stale("old"))
    forged_status = json.dumps({"injected": ["log-watcher"], "policy": POLICY.version})
    _bare(kube, shop, pod("forged", {**LOG, "outrigger.dev/status": forged_status}))
    _bare(kube, lab, pod("lab-1", LOG))
    kube.wait_for_pods(shop, "app=web", 2)
    kube.wait_for_pods(shop, "app=report", 1)
    selected = new_selector()
    policy_configmap(kube, shop)
    with running_webhook(tmp_path_factory.mktemp("audit-webhook")) as webhook:
        body = configuration(webhook.url, webhook.server.cert_dir / "ca.crt", selected)
        with registered(kube, body) as name:
            kube.call(
                "PATCH",
                f"/api/v1/namespaces/{shop}",
                {"metadata": {"labels": {LABEL: selected}}},
                content_type="application/merge-patch+json",
            )
            _deployment(kube, shop, "api", 1)
            (api_pod,) = kube.wait_for_pods(shop, "app=api", 1)
            assert [c["name"] for c in api_pod["spec"]["initContainers"]] == ["log-watcher"]
            yield kube, {"shop": shop, "lab": lab, "webhook": name}


def audit(tmp_path: Path, kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_against_cluster("audit", tmp_path, kubeconfig, *args)


@pytest.mark.kube
@pytest.mark.parametrize("chunk_size", ["1", "500"])
def test_audit_finds_every_class_grouped_by_workload(
    cluster: tuple[ControlPlane, dict[str, str]], tmp_path: Path, chunk_size: str
) -> None:
    """Chunks of one pod make audit follow `continue` through every list of the real API."""
    kube, names = cluster
    shop = names["shop"]
    result = audit(
        tmp_path, kube.kubeconfig, "--webhook", names["webhook"], "--chunk-size", chunk_size,
        "-o", "json", "--from-cluster", f"{shop}/outrigger-policy",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["policy"] == POLICY.version
    found = {
        (w["namespace"], w["kind"], w["name"]): sorted(p["finding"] for p in w["pods"])
        for w in report["workloads"]
    }
    assert found == {
        (shop, "Deployment", "web"): ["missing", "missing"],
        (shop, "CronJob", "report"): ["missing"],
        (shop, "Pod", "debug"): ["missing"],
        (shop, "Pod", "old"): ["stale"],
        (shop, "Pod", "forged"): ["mismatched"],
    }  # the api Deployment's pod is as injected; lab is not selected
    fixes = {w["name"]: w["fix"] for w in report["workloads"]}
    assert fixes["web"] == f"kubectl rollout restart deployment/web -n {shop}"


@pytest.mark.kube
def test_audit_prints_a_table_and_one_namespace(
    cluster: tuple[ControlPlane, dict[str, str]], tmp_path: Path
) -> None:
    kube, names = cluster
    shop = names["shop"]
    result = audit(tmp_path, kube.kubeconfig, "--webhook", names["webhook"], "-n", shop)
    assert result.returncode == 1, result.stderr
    assert f"{shop}  Deployment/web" in result.stdout
    assert "  missing     web-" in result.stdout and "should have log-watcher" in result.stdout
    assert f"fix: kubectl rollout restart deployment/web -n {shop}" in result.stdout
    assert "6 pod(s) in 5 workload(s)" in result.stdout


@pytest.mark.kube
def test_audit_of_a_namespace_the_webhook_does_not_select_exits_0(
    cluster: tuple[ControlPlane, dict[str, str]], tmp_path: Path
) -> None:
    kube, names = cluster
    result = audit(tmp_path, kube.kubeconfig, "--webhook", names["webhook"], "-n", names["lab"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nothing found" in result.stdout


@pytest.mark.kube
def test_audit_leaves_out_a_pod_already_terminating(kube: ControlPlane, tmp_path: Path) -> None:
    """A finalizer holds the deleted pod in the API, terminating, as a kubelet's grace period
    would."""
    namespace = kube.namespace("ending")
    _bare(kube, namespace, pod("staying", LOG))
    held = pod("leaving", LOG)
    held["metadata"]["finalizers"] = ["outrigger.test/hold"]
    _bare(kube, namespace, held)
    path = f"/api/v1/namespaces/{namespace}/pods/leaving"
    kube.call("DELETE", path)
    try:
        assert kube.call("GET", path)["metadata"]["deletionTimestamp"]
        result = audit(
            tmp_path, kube.kubeconfig, "-n", namespace, "-o", "json",
            "--webhook", "outrigger-absent",  # no configuration: every namespace counts
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        found = [p["name"] for w in json.loads(result.stdout)["workloads"] for p in w["pods"]]
        assert found == ["staying"]
    finally:
        kube.call(
            "PATCH", path, {"metadata": {"finalizers": None}},
            content_type="application/merge-patch+json",
        )  # fmt: skip


def test_an_unreachable_cluster_is_a_clear_error(tmp_path: Path) -> None:
    paths = write_certificates(tmp_path / "c", ["localhost"], ["127.0.0.1"])
    kubeconfig = write_kubeconfig(tmp_path, "https://127.0.0.1:1", paths.ca_cert)
    result = audit(tmp_path, kubeconfig)
    assert result.returncode == 2
    assert result.stderr.startswith("outrigger: ") and "Traceback" not in result.stderr
