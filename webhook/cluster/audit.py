"""`outrigger audit`: the running pods that missed or outlived their injection.

Reads the cluster with the official client (raw JSON, as the webhook sees pods), following
the API's paging (`limit` and `continue`), then classifies each pod with the webhook's own
pure code (`webhook.core.audit`). Which namespaces count is the webhook configuration's
`namespaceSelector` (`--webhook NAME`; every namespace when there is none), and which policy
is `--policy FILE`, the chart's ConfigMap (`--from-cluster NAMESPACE/NAME`) or the embedded one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
import yaml

from webhook.cluster.registration import (
    RegistrationError,
    api_error,
    client_configuration,
    one_line,
)
from webhook.core.audit import (
    Finding,
    WorkloadFindings,
    classify,
    controller_of,
    group,
    workload_of,
)
from webhook.core.policy import LabelSelector, Policy, PolicyError, parse_policy
from webhook.limits import printable

CHUNK_SIZE = 500  # as kubectl's --chunk-size
POLICY_KEY = "policy.yaml"  # the chart's ConfigMap key


class AuditError(RuntimeError):
    """The cluster could not be read; the message says what and why."""


@dataclass(frozen=True)
class Scope:
    namespace: str | None  # None: all namespaces
    webhook: str
    chunk_size: int = CHUNK_SIZE
    selector: str | None = None  # a label selector on the pods (`app=web,tier!=db`)
    own_namespace: str = ""  # the webhook's, never injected into: its pods are no findings


def run_audit(
    kubeconfig: Path | None,
    context: str | None,
    scope: Scope,
    policy: Policy | None,
    from_cluster: str | None,
) -> tuple[Policy, list[WorkloadFindings]]:
    # A read-only report: fail fast on an unreachable server.
    with connected(kubeconfig, context, retries=1) as api:
        return audit_cluster(api, scope, policy, from_cluster)


@contextmanager
def connected(kubeconfig: Path | None, context: str | None, *, retries: int) -> Iterator[Any]:
    """An ApiClient for the kubeconfig; what the API refuses or an unreachable server raise
    AuditError from the block, saying which."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        configuration = client_configuration(kubeconfig, context)
    except RegistrationError as error:
        raise AuditError(str(error)) from None
    configuration.retries = retries
    api: Any = client.ApiClient(configuration)
    try:
        yield api
    except ApiException as error:
        raise AuditError(f"the API server refused: {api_error(error)}") from None
    except (OSError, urllib3.exceptions.HTTPError) as error:  # unreachable, TLS
        raise AuditError(f"cannot reach the API server: {one_line(error)}") from None
    finally:
        api.close()


def audit_cluster(
    api: Any, scope: Scope, policy: Policy | None, from_cluster: str | None
) -> tuple[Policy, list[WorkloadFindings]]:
    """The policy (`policy`, else the ConfigMap `from_cluster`, else the embedded one) and
    the findings under it, by workload."""
    from kubernetes import client

    if policy is None:
        policy = _cluster_policy(client.CoreV1Api(api), from_cluster)
    return policy, _findings(api, scope, policy)


def _findings(api: Any, scope: Scope, policy: Policy) -> list[WorkloadFindings]:
    from kubernetes import client

    core, apps, batch = client.CoreV1Api(api), client.AppsV1Api(api), client.BatchV1Api(api)
    selected = _selected_namespaces(api, core, scope)
    only = {"label_selector": scope.selector} if scope.selector else {}
    if scope.namespace is None:
        pods = paged(core.list_pod_for_all_namespaces, scope.chunk_size, **only)
    else:
        pods = paged(core.list_namespaced_pod, scope.chunk_size, namespace=scope.namespace, **only)
    findings: list[Finding] = []
    owners: dict[tuple[str, str], tuple[str, str]] = {}
    pending: dict[tuple[str, str], dict[str, Any]] = {}
    for pod in pods:
        namespace = str(pod["metadata"].get("namespace", scope.namespace or ""))
        if namespace not in selected:
            continue
        finding = classify(pod, namespace, policy, scope.own_namespace)
        if finding is not None:
            findings.append(finding)
            pending[(namespace, finding.pod)] = pod
    parents = _parents(apps, batch, {ns for ns, _ in pending}, scope.chunk_size, pending)
    for (namespace, name), pod in pending.items():
        owners[(namespace, name)] = workload_of(pod, namespace, parents)
    return group(findings, owners)


def _selected_namespaces(api: Any, core: Any, scope: Scope) -> set[str]:
    """Namespaces the webhook configuration's namespaceSelector matches (all, without one)."""
    selectors = _namespace_selectors(api, scope.webhook)
    if scope.namespace is not None:
        namespaces = [raw(core.read_namespace, scope.namespace)]
    else:
        namespaces = list(paged(core.list_namespace, scope.chunk_size))
    selected = set()
    for namespace in namespaces:
        labels = namespace["metadata"].get("labels") or {}
        if selectors is None or any(s.matches(labels) for s in selectors):
            selected.add(str(namespace["metadata"]["name"]))
    return selected


def _namespace_selectors(api: Any, name: str) -> list[LabelSelector] | None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    registration = client.AdmissionregistrationV1Api(api)
    try:
        configuration = raw(registration.read_mutating_webhook_configuration, name)
    except ApiException as error:
        if error.status == 404:
            return None  # not installed under this name: every namespace counts
        raise
    return [
        LabelSelector.model_validate(webhook.get("namespaceSelector") or {})
        for webhook in configuration.get("webhooks") or []
    ]


def _parents(
    apps: Any,
    batch: Any,
    namespaces: set[str],
    chunk_size: int,
    pods: dict[tuple[str, str], dict[str, Any]],
) -> dict[tuple[str, str, str], tuple[str, str]]:
    """The controllers of the ReplicaSets and Jobs that own the pods found."""
    kinds = {controller_of(pod) for pod in pods.values()}
    listings: list[tuple[str, Callable[..., Any]]] = []
    if any(kind and kind[0] == "ReplicaSet" for kind in kinds):
        listings.append(("ReplicaSet", apps.list_namespaced_replica_set))
    if any(kind and kind[0] == "Job" for kind in kinds):
        listings.append(("Job", batch.list_namespaced_job))
    parents = {}
    for namespace in sorted(namespaces):
        for kind, listing in listings:
            for item in paged(listing, chunk_size, namespace=namespace):
                controller = controller_of(item)
                if controller is not None:
                    parents[(namespace, kind, str(item["metadata"]["name"]))] = controller
    return parents


def _cluster_policy(core: Any, from_cluster: str | None) -> Policy:
    from webhook.core.policy import default_policy

    if from_cluster is None:
        return default_policy()
    namespace, _, name = from_cluster.partition("/")
    config_map = raw(core.read_namespaced_config_map, name, namespace)
    try:
        return policy_in_config_map(config_map, from_cluster)
    except ValueError as error:
        raise AuditError(str(error)) from None


def policy_in_config_map(config_map: dict[str, Any], origin: str) -> Policy:
    """The policy in the chart's ConfigMap (its POLICY_KEY); ValueError, with a message that
    names `origin` (NAMESPACE/NAME), when it holds none or an invalid one."""
    text = (config_map.get("data") or {}).get(POLICY_KEY)
    if text is None:
        raise ValueError(f"ConfigMap {origin} has no {POLICY_KEY}")
    try:
        return parse_policy(yaml.safe_load(text), f"ConfigMap {origin}")
    except (PolicyError, yaml.YAMLError) as error:
        raise ValueError(str(error)) from None


def paged(call: Callable[..., Any], chunk_size: int, **arguments: Any) -> Iterator[dict[str, Any]]:
    """Every item of a list, page by page (`limit`, then `continue` until the API gives none)."""
    token: str | None = None
    while True:
        extra = {"_continue": token} if token else {}
        page = raw(call, limit=chunk_size, **arguments, **extra)
        yield from page.get("items") or []
        token = (page.get("metadata") or {}).get("continue")
        if not token:
            return


def raw(call: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The API's own JSON (camelCase, as admission sees objects), not the client's models."""
    response = call(*args, _preload_content=False, **kwargs)
    document: dict[str, Any] = json.loads(response.data)
    return document


def render_table(policy: Policy, groups: list[WorkloadFindings]) -> str:
    """For a terminal: every line escaped (`printable`), as names and denials quote objects."""
    if not groups:
        return f"outrigger audit: nothing found (policy {policy.version})\n"
    lines = [f"policy {policy.version}"]
    for workload in groups:
        lines.append("")
        lines.append(f"{workload.namespace}  {workload.owner_kind}/{workload.owner_name}")
        for finding in sorted(workload.findings, key=lambda f: (f.kind, f.pod)):
            lines.append(f"  {finding.kind:<10}  {finding.pod}  {finding.detail}")
        lines.append(f"  fix: {workload.fix}")
    count = sum(len(w.findings) for w in groups)
    lines.append("")
    lines.append(f"{count} pod(s) in {len(groups)} workload(s)")
    return "\n".join(map(printable, lines)) + "\n"


def render_json(policy: Policy, groups: list[WorkloadFindings]) -> str:
    document = {
        "policy": policy.version,
        "workloads": [
            {
                "namespace": w.namespace,
                "kind": w.owner_kind,
                "name": w.owner_name,
                "fix": w.fix,
                "pods": [
                    {
                        "name": f.pod,
                        "finding": f.kind,
                        "sidecars": list(f.sidecars),
                        "detail": f.detail,
                    }
                    for f in w.findings
                ],
            }
            for w in groups
        ],
    }
    return json.dumps(document, indent=2) + "\n"
