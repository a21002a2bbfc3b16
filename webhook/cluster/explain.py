"""`outrigger explain KIND/NAME`: reads what decides a live workload's injection, for the
pure analysis of `webhook.core.explain`.

Read-only, with the official client and the API's own JSON (as admission sees objects): the
workload, its namespace, the MutatingWebhookConfiguration (`--webhook NAME`), the policy
(`--policy FILE`, the chart's ConfigMap with `--from-cluster NAMESPACE/NAME`, or the embedded
one), and the workload's pods (through its ReplicaSets or Jobs for a Deployment or a
CronJob), listed page by page and narrowed by the workload's selector where it has one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from webhook.cluster.apicalls import CallFailed, json_answer
from webhook.cluster.audit import CHUNK_SIZE, policy_in_config_map
from webhook.cluster.registration import REQUEST_TIMEOUT, RegistrationError, client_configuration
from webhook.core.explain import INTERMEDIATE, Explanation, explain, owned_pods, parse_target
from webhook.core.policy import Policy, default_policy

# Where a pod finds its own namespace (kubectl's default namespace in a pod).
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class ExplainError(RuntimeError):
    """The target is not one, or the cluster could not be read; the message says why."""


@dataclass(frozen=True)
class Request:
    target: str  # KIND/NAME, as the user wrote it
    namespace: str | None  # None: the kubeconfig context's, else "default"
    webhook: str  # the MutatingWebhookConfiguration's name
    policy: Policy | None  # None: from `from_cluster`, else the embedded one
    from_cluster: str | None  # NAMESPACE/NAME of the policy's ConfigMap


def run_explain(kubeconfig: Path | None, context: str | None, request: Request) -> Explanation:
    """Read the cluster and explain; ExplainError for a bad target or a failed read."""
    from kubernetes import client

    try:
        kind, name = parse_target(request.target)
        configuration = client_configuration(kubeconfig, context)
    except (ValueError, RegistrationError) as error:
        raise ExplainError(str(error)) from None
    configuration.retries = 1  # a read-only report: fail fast on an unreachable server
    namespace = request.namespace or default_namespace(kubeconfig, context)
    with client.ApiClient(configuration) as api:
        reader = _Reader(api)
        try:
            workload = reader.workload(kind, name, namespace)
            namespace_object = reader.get(
                f"read namespace {namespace}", "core", "read_namespace", namespace
            )
            webhook = reader.get(
                f"read mutatingwebhookconfiguration {request.webhook}",
                "admission",
                "read_mutating_webhook_configuration",
                request.webhook,
                absent_ok=True,
            )
            policy = request.policy or reader.policy(request.from_cluster)
            pods = reader.pods_of(workload, namespace)
        except CallFailed as error:
            raise ExplainError(str(error)) from None
    return explain(workload, namespace_object, webhook, request.webhook, policy, pods)


def default_namespace(kubeconfig: Path | None, context: str | None) -> str:
    """kubectl's: the pod's own in a pod, else the kubeconfig context's, else `default`."""
    from kubernetes import config
    from kubernetes.config.config_exception import ConfigException

    if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
        except OSError:
            return "default"
    listing: Any = config.list_kube_config_contexts  # untyped in the client
    try:
        contexts, active = listing(config_file=str(kubeconfig) if kubeconfig else None)
    except (ConfigException, OSError, ValueError):
        return "default"
    chosen = next((c for c in contexts if c.get("name") == context), None) if context else active
    return str(((chosen or {}).get("context") or {}).get("namespace") or "default")


class _Reader:
    """The calls, each answering the API's JSON; a failure raises CallFailed, one line."""

    def __init__(self, api: Any) -> None:
        from kubernetes import client

        self.apis = {
            "core": client.CoreV1Api(api),
            "apps": client.AppsV1Api(api),
            "batch": client.BatchV1Api(api),
            "admission": client.AdmissionregistrationV1Api(api),
        }

    def get(
        self, what: str, group: str, method: str, *args: Any, absent_ok: bool = False, **kwargs: Any
    ) -> Any:
        """The JSON `method` of the `group`'s API answers; None for a 404 when `absent_ok`."""
        call: Callable[..., Any] = getattr(self.apis[group], method)
        return json_answer(
            what,
            lambda: call(*args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT, **kwargs),
            absent_ok=absent_ok,
        )

    def workload(self, kind: str, name: str, namespace: str) -> dict[str, Any]:
        group, method = _READS[kind]
        what = f"read {kind.lower()} {name} in namespace {namespace}"
        found = self.get(what, group, method, name, namespace, absent_ok=True)
        if found is None:
            raise CallFailed(f"{kind.lower()} {name} not found in namespace {namespace}", 404)
        found["kind"] = kind  # a read answers it; a test double or proxy may not
        return dict(found)

    def policy(self, from_cluster: str | None) -> Policy:
        if from_cluster is None:
            return default_policy()
        namespace, _, name = from_cluster.partition("/")
        if not namespace or not name or "/" in name:
            raise CallFailed("--from-cluster takes NAMESPACE/NAME")
        what = f"read the policy's configmap {from_cluster}"
        config_map = self.get(what, "core", "read_namespaced_config_map", name, namespace)
        try:
            return policy_in_config_map(config_map, from_cluster)
        except ValueError as error:
            raise CallFailed(str(error)) from None

    def pods_of(self, workload: dict[str, Any], namespace: str) -> list[Any]:
        """The workload's pods, through its ReplicaSets or Jobs where it makes them so."""
        kind = workload["kind"]
        if kind == "Pod":
            return owned_pods(workload, [], [])
        selector = _label_selector(workload)
        intermediates: list[Any] = []
        if kind in INTERMEDIATE:
            listing = _LISTS[INTERMEDIATE[kind]]
            intermediates = list(self._paged(listing, namespace, selector))
        pods = self._paged(_LISTS["Pod"], namespace, selector)
        return owned_pods(workload, intermediates, pods)

    def _paged(
        self, listing: tuple[str, str, str], namespace: str, selector: str | None
    ) -> Iterator[Any]:
        """Every item of a list (`_LISTS`), page by page (`limit`, then `continue` until the
        API gives none)."""
        group, method, resource = listing
        token: str | None = None
        narrowed: dict[str, Any] = {"label_selector": selector} if selector else {}
        while True:
            extra: dict[str, Any] = {"_continue": token} if token else {}
            what = f"list {resource} in namespace {namespace}"
            page = self.get(what, group, method, namespace, limit=CHUNK_SIZE, **narrowed, **extra)
            yield from page.get("items") or []
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return


_READS = {
    "Pod": ("core", "read_namespaced_pod"),
    "Deployment": ("apps", "read_namespaced_deployment"),
    "StatefulSet": ("apps", "read_namespaced_stateful_set"),
    "DaemonSet": ("apps", "read_namespaced_daemon_set"),
    "ReplicaSet": ("apps", "read_namespaced_replica_set"),
    "Job": ("batch", "read_namespaced_job"),
    "CronJob": ("batch", "read_namespaced_cron_job"),
}
_LISTS = {
    "Pod": ("core", "list_namespaced_pod", "pods"),
    "ReplicaSet": ("apps", "list_namespaced_replica_set", "replicasets"),
    "Job": ("batch", "list_namespaced_job", "jobs"),
}


def _label_selector(workload: dict[str, Any]) -> str | None:
    """The workload's `spec.selector.matchLabels` as a list's labelSelector, which narrows
    what the API server sends (its ReplicaSets and pods carry those labels); ownership then
    decides. None for a CronJob, which has no selector."""
    selector = (workload.get("spec") or {}).get("selector") or {}
    labels = selector.get("matchLabels") or {}
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items())) or None
