"""Register the webhook with the API server: the MutatingWebhookConfiguration and its upsert.

`webhook_configuration` builds the object (the same content as the Helm chart's template) as a
plain dict; `apply_configuration` creates it, or replaces it keeping `metadata.resourceVersion`
so a concurrent writer is detected (409 Conflict) instead of overwritten; `delete_configuration`
removes it. `outrigger register` uses them, for clusters installed without Helm and to roll a
new CA bundle out.

A configuration that another tool manages (a Helm release, Argo CD, Flux, a server-side apply
manager) is neither replaced nor deleted unless forced (`foreign_manager` says who and what to
run instead): a replaced Helm object fails the release's next upgrade ("conflict occurred
while applying object") and is left behind by its uninstall ("not owned by this release"),
where a `failurePolicy: Fail` orphan blocks every pod of the selected namespaces.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509

from webhook.serving.certs import ca_bundle as file_ca_bundle

WEBHOOK_NAME = "inject.outrigger.dev"
WEBHOOK_PATH = "/mutate"
SERVICE_PORT = 443
INJECTION_LABEL = "outrigger.dev/injection"
FAILURE_POLICIES = ("Fail", "Ignore")
INJECTION_MODES = ("opt-in", "opt-out")
TIMEOUT_RANGE = (1, 30)  # the API server's bounds for webhooks[].timeoutSeconds
# Namespaces never sent to the webhook, besides its own (a webhook whose own pods need it to be
# admitted could never start again).
EXCLUDED_NAMESPACES = ("kube-system", "kube-public")

# Connect and read timeouts (seconds) of each API call: a blackholed API server fails the
# command instead of hanging it.
REQUEST_TIMEOUT = (10.0, 30.0)
CONFLICT_ATTEMPTS = 5
FIELD_MANAGER = "outrigger"
# The generated client sends a body without Content-Type (its `_content_type` is ignored); the
# API server would assume JSON, but say it.
_JSON = {"Content-Type": "application/json"}

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

FailurePolicy = Literal["Fail", "Ignore"]
InjectionMode = Literal["opt-in", "opt-out"]


class RegistrationError(Exception):
    """A registration that cannot be done; the message is one line for the user."""


@dataclass(frozen=True)
class Manager:
    """Who else manages a configuration, and what to run instead of `outrigger register`."""

    who: str
    instead: str


def foreign_manager(obj: dict[str, Any], helm_values: str = "") -> Manager | None:
    """The tool other than `outrigger register` that manages `obj` (a configuration as JSON),
    or None. `helm_values` are the `--set` options equivalent to the register options.

    Flux and Argo CD are named before Helm: what they deploy from a chart carries Helm's
    marks too (the chart's `app.kubernetes.io/managed-by: Helm` label, which `helm template`
    renders; Flux's helm-controller installs real Helm releases), and a `helm upgrade` of
    their objects would be undone at their next sync."""
    metadata = obj.get("metadata") or {}
    labels = metadata.get("labels") or {}
    annotations = metadata.get("annotations") or {}
    return (
        _gitops_manager(labels, annotations)
        or _helm_manager(labels, annotations, helm_values)
        or _server_side_applier(metadata.get("managedFields") or [])
    )


def _gitops_manager(labels: dict[str, str], annotations: dict[str, str]) -> Manager | None:
    """Flux (its labels on what it applies) or Argo CD (its tracking annotation)."""
    for label, kind in (
        ("helm.toolkit.fluxcd.io/name", "HelmRelease"),
        ("kustomize.toolkit.fluxcd.io/name", "Kustomization"),
    ):
        if label in labels:
            namespace = labels.get(label.replace("/name", "/namespace"), "")
            return Manager(
                f"Flux {kind} {namespace}/{labels[label]}",
                "change it where Flux reads it from (Flux would undo this change)",
            )
    if annotations.get("argocd.argoproj.io/tracking-id"):
        tracking = annotations["argocd.argoproj.io/tracking-id"].split(":", 1)[0]
        return Manager(
            f"Argo CD application {tracking}",
            "change it in the application's source (Argo CD would undo this change)",
        )
    return None


def _helm_manager(
    labels: dict[str, str], annotations: dict[str, str], helm_values: str
) -> Manager | None:
    release = annotations.get("meta.helm.sh/release-name")
    if labels.get("app.kubernetes.io/managed-by") != "Helm" and not release:
        return None
    name = release or "RELEASE"
    namespace = annotations.get("meta.helm.sh/release-namespace") or "NAMESPACE"
    return Manager(
        f"Helm release {namespace}/{name}",
        f"helm upgrade {name} CHART -n {namespace} --reuse-values{helm_values}",
    )


def _server_side_applier(managed_fields: list[dict[str, Any]]) -> Manager | None:
    """Server-side apply managers other than outrigger's own (plain updates do not count)."""
    appliers = sorted(
        {
            str(entry.get("manager"))
            for entry in managed_fields
            if entry.get("operation") == "Apply" and entry.get("manager") != FIELD_MANAGER
        }
    )
    if not appliers:
        return None
    return Manager(f"server-side apply ({', '.join(appliers)})", "apply the change with that tool")


def helm_values_of(body: dict[str, Any]) -> str:
    """The chart's `--set` options that give the chart's webhook what `body` holds."""
    webhook = body["webhooks"][0]
    operator = webhook["namespaceSelector"]["matchExpressions"][0]["operator"]
    mode = "opt-in" if operator == "In" else "opt-out"
    return (
        f" --set failurePolicy={webhook['failurePolicy']}"
        f" --set timeoutSeconds={webhook['timeoutSeconds']} --set injection.mode={mode}"
    )


def webhook_configuration(
    *,
    namespace: str,
    ca_bundle: str,
    name: str = "outrigger",
    service: str = "outrigger",
    failure_policy: str = "Fail",
    timeout_seconds: int = 5,
    injection_mode: str = "opt-in",
) -> dict[str, Any]:
    """The admissionregistration.k8s.io/v1 MutatingWebhookConfiguration, as a plain dict.

    `ca_bundle` is the base64 of the PEM CA that signed the webhook's serving certificate.
    Raises ValueError for a value the API server would reject.
    """
    _check_names(name=name, namespace=namespace, service=service)
    if failure_policy not in FAILURE_POLICIES:
        raise ValueError(f"failure policy must be Fail or Ignore, got {failure_policy!r}")
    low, high = TIMEOUT_RANGE
    if not low <= timeout_seconds <= high:
        raise ValueError(f"timeout must be {low} to {high} seconds, got {timeout_seconds}")
    selector = namespace_selector(injection_mode, namespace)
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "outrigger"}},
        "webhooks": [
            {
                "name": WEBHOOK_NAME,
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "reinvocationPolicy": "IfNeeded",
                "timeoutSeconds": timeout_seconds,
                "failurePolicy": failure_policy,
                "matchPolicy": "Equivalent",
                "clientConfig": {
                    "service": {
                        "name": service,
                        "namespace": namespace,
                        "path": WEBHOOK_PATH,
                        "port": SERVICE_PORT,
                    },
                    "caBundle": ca_bundle,
                },
                "rules": [
                    {
                        "operations": ["CREATE"],
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "resources": ["pods"],
                        "scope": "Namespaced",
                    }
                ],
                "namespaceSelector": selector,
            }
        ],
    }


def namespace_selector(injection_mode: str, namespace: str | None) -> dict[str, Any]:
    """The namespaces the webhook is sent: labelled in (opt-in) or not out (opt-out), never
    kube-system, kube-public nor its own `namespace`."""
    if injection_mode == "opt-in":
        injection = {"key": INJECTION_LABEL, "operator": "In", "values": ["enabled"]}
    elif injection_mode == "opt-out":
        injection = {"key": INJECTION_LABEL, "operator": "NotIn", "values": ["disabled"]}
    else:
        raise ValueError(f"injection mode must be opt-in or opt-out, got {injection_mode!r}")
    excluded = [*EXCLUDED_NAMESPACES, *([namespace] if namespace else [])]
    return {
        "matchExpressions": [
            injection,
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": excluded},
        ]
    }


def _check_names(*, name: str, namespace: str, service: str) -> None:
    if not _DNS_SUBDOMAIN.fullmatch(name) or len(name) > 253:
        raise ValueError(f"invalid name {name!r}: expected a DNS subdomain (lowercase, . and -)")
    if not _DNS_LABEL.fullmatch(namespace) or len(namespace) > 63:
        raise ValueError(f"invalid namespace {namespace!r}: expected a DNS label (lowercase, -)")
    if not _DNS_1035_LABEL.fullmatch(service) or len(service) > 63:
        raise ValueError(
            f"invalid service name {service!r}: expected a DNS label starting with a letter"
        )


def load_ca_bundle(ca_file: Path | None = None, ca_bundle: str | None = None) -> str:
    """The caBundle value from a PEM file or a base64 string, checked to hold certificates."""
    if ca_bundle is not None:
        try:
            pem = base64.b64decode(ca_bundle.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise RegistrationError("--ca-bundle is not valid base64") from None
        _check_pem(pem, "--ca-bundle")
        return base64.b64encode(pem).decode("ascii")
    if ca_file is None:
        raise RegistrationError("no CA given: pass --ca-file or --ca-bundle")
    try:
        pem = ca_file.read_bytes()
    except OSError as error:
        raise RegistrationError(f"cannot read CA file {ca_file}: {error.strerror}") from None
    _check_pem(pem, f"CA file {ca_file}")
    return file_ca_bundle(ca_file)


def _check_pem(pem: bytes, what: str) -> None:
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        certificates = []
    if not certificates:
        raise RegistrationError(f"{what} holds no PEM certificate")


@dataclass(frozen=True)
class Outcome:
    """What `apply_configuration` did."""

    action: Literal["created", "replaced"]
    resource_version: str | None
    previous_resource_version: str | None = None
    conflicts: int = 0


def apply_configuration(
    body: dict[str, Any],
    *,
    kubeconfig: Path | None = None,
    context: str | None = None,
    attempts: int = CONFLICT_ATTEMPTS,
    force: bool = False,
) -> Outcome:
    """Create the MutatingWebhookConfiguration `body`, or replace the existing one.

    Read, then create (404) or replace with the resourceVersion just read; a 409 Conflict (a
    concurrent change, or a create that lost a race) starts over, `attempts` times at most.
    An existing configuration that another tool manages is only replaced with `force`.
    Any failure is raised as RegistrationError with a one-line message.
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    name = body["metadata"]["name"]
    try:
        with client.ApiClient(client_configuration(kubeconfig, context)) as api_client:
            api = client.AdmissionregistrationV1Api(api_client)
            for attempt in range(attempts):
                if attempt:
                    time.sleep(0.2 * attempt)  # let the concurrent writer finish
                try:
                    return _upsert(api, name, body, conflicts=attempt, force=force)
                except ApiException as error:
                    if error.status != 409:
                        raise
            raise RegistrationError(
                f"mutatingwebhookconfiguration {name}: still conflicting after {attempts} "
                "attempts (someone else keeps changing it)"
            )
    except ApiException as error:
        raise RegistrationError(f"API server: {api_error(error)}") from None
    except HTTPError as error:
        raise RegistrationError(f"cannot reach the API server: {one_line(error)}") from None
    except OSError as error:
        raise RegistrationError(f"cannot reach the API server: {one_line(error)}") from None


def _upsert(api: Any, name: str, body: dict[str, Any], *, conflicts: int, force: bool) -> Outcome:
    from kubernetes.client.exceptions import ApiException

    try:
        existing = api.read_mutating_webhook_configuration(name, _request_timeout=REQUEST_TIMEOUT)
    except ApiException as error:
        if error.status != 404:
            raise
        created = api.create_mutating_webhook_configuration(
            body, field_manager=FIELD_MANAGER, _request_timeout=REQUEST_TIMEOUT, _headers=_JSON
        )
        return Outcome("created", _resource_version(created), conflicts=conflicts)
    _refuse_foreign(api, existing, name, helm_values_of(body), "replace", force)
    previous = _resource_version(existing)
    replacement = {**body, "metadata": _kept_metadata(existing, body["metadata"], previous)}
    replaced = api.replace_mutating_webhook_configuration(
        name,
        replacement,
        field_manager=FIELD_MANAGER,
        _request_timeout=REQUEST_TIMEOUT,
        _headers=_JSON,
    )
    return Outcome("replaced", _resource_version(replaced), previous, conflicts)


def _refuse_foreign(
    api: Any, existing: Any, name: str, helm_values: str, action: str, force: bool
) -> None:
    """RegistrationError when another tool manages `existing` and `force` is not given."""
    manager = foreign_manager(api.api_client.sanitize_for_serialization(existing), helm_values)
    if manager is None or force:
        return
    raise RegistrationError(
        f"mutatingwebhookconfiguration {name} is managed by {manager.who}: {manager.instead}; "
        f"--force would {action} it anyway"
    )


@dataclass(frozen=True)
class Deletion:
    """What `delete_configuration` did."""

    deleted: bool
    resource_version: str | None = None


def delete_configuration(
    name: str,
    *,
    kubeconfig: Path | None = None,
    context: str | None = None,
    force: bool = False,
    attempts: int = CONFLICT_ATTEMPTS,
) -> Deletion:
    """Delete the configuration `name` (`outrigger register --delete`) if nothing else manages
    it (or with `force`): read it, then delete with its uid and resourceVersion as
    preconditions, so that an object changed or recreated in between is not deleted unseen."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    helm_uninstall = " (or helm uninstall RELEASE -n NAMESPACE)"
    try:
        with client.ApiClient(client_configuration(kubeconfig, context)) as api_client:
            api: Any = client.AdmissionregistrationV1Api(api_client)
            for _ in range(attempts):
                try:
                    existing = api.read_mutating_webhook_configuration(
                        name, _request_timeout=REQUEST_TIMEOUT
                    )
                except ApiException as error:
                    if error.status == 404:
                        return Deletion(False)
                    raise
                _refuse_foreign(api, existing, name, helm_uninstall, "delete", force)
                version = _resource_version(existing)
                preconditions = {"uid": existing.metadata.uid, "resourceVersion": version}
                try:
                    api.delete_mutating_webhook_configuration(
                        name,
                        body={"preconditions": preconditions},
                        _request_timeout=REQUEST_TIMEOUT,
                        _headers=_JSON,
                    )
                except ApiException as error:
                    if error.status == 404:
                        return Deletion(False)
                    if error.status != 409:  # 409: changed since read, look again
                        raise
                    continue
                return Deletion(True, version)
            raise RegistrationError(
                f"mutatingwebhookconfiguration {name}: still changing after {attempts} attempts"
            )
    except ApiException as error:
        raise RegistrationError(f"API server: {api_error(error)}") from None
    except (HTTPError, OSError) as error:
        raise RegistrationError(f"cannot reach the API server: {one_line(error)}") from None


def _kept_metadata(existing: Any, ours: dict[str, Any], version: str | None) -> dict[str, Any]:
    """Our metadata over the object's own labels and annotations, which stay: Helm's
    ownership annotations and cert-manager's `inject-ca-from` must survive a re-register."""
    metadata = getattr(existing, "metadata", None)
    labels = dict(getattr(metadata, "labels", None) or {})
    annotations = dict(getattr(metadata, "annotations", None) or {})
    kept = {**ours, "labels": {**labels, **ours.get("labels", {})}, "resourceVersion": version}
    merged = {**annotations, **ours.get("annotations", {})}
    if merged:
        kept["annotations"] = merged
    return kept


def _resource_version(obj: Any) -> str | None:
    metadata = getattr(obj, "metadata", None)
    version = getattr(metadata, "resource_version", None)
    return str(version) if version is not None else None


def client_configuration(kubeconfig: Path | None, context: str | None) -> Any:
    """In-cluster credentials in a pod (unless a kubeconfig or context is named), else the
    kubeconfig (`--kubeconfig`, $KUBECONFIG or ~/.kube/config)."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    load_incluster: Any = config.load_incluster_config  # untyped in the client
    load_kube_config: Any = config.load_kube_config

    configuration = client.Configuration()
    try:
        if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            load_incluster(client_configuration=configuration)
        else:
            if kubeconfig is not None and not kubeconfig.is_file():
                raise RegistrationError(f"kubeconfig {kubeconfig} does not exist")
            load_kube_config(
                config_file=str(kubeconfig) if kubeconfig else None,
                context=context,
                client_configuration=configuration,
                persist_config=False,
            )
    except ConfigException as error:
        raise RegistrationError(
            f"cannot load the cluster configuration: {one_line(error)}"
        ) from None
    except (OSError, ValueError) as error:  # unreadable file, malformed YAML or base64
        raise RegistrationError(
            f"cannot load the cluster configuration: {one_line(error)}"
        ) from None
    return configuration


def api_error(error: Any) -> str:
    """`403 Forbidden: <the Status message>` from an ApiException."""
    message = ""
    try:
        status = json.loads(error.body or "")
        if isinstance(status, dict):
            message = str(status.get("message") or "")
    except (TypeError, ValueError):
        message = str(error.body or "")[:200]
    prefix = f"{error.status} {error.reason}".strip()
    return one_line(f"{prefix}: {message}" if message else prefix)


def one_line(value: object) -> str:
    return " ".join(str(value).split()) or type(value).__name__
