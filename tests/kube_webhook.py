"""`outrigger serve` registered with a real API server by `url`, for the tests that create pods
through it: the API server calls the webhook, applies its patch with its own JSON Patch, runs
its in-tree admission plugins again and defaults the result, as in a cluster."""

from __future__ import annotations

import base64
import copy
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT
from tests.kube_env import ControlPlane
from tests.test_https import Server, start_server, stop_server
from webhook.cluster.registration import WEBHOOK_PATH, webhook_configuration
from webhook.core.policy import Policy, default_policy, load_policy, parse_policy

LABEL = "outrigger-test/webhook"  # the namespaces a test's webhook configuration selects
CONFIGURATIONS = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
POLICY_CONFIGMAP = "outrigger-policy"
CLASSIC = parse_policy({**default_policy().model_dump(mode="json"), "nativeSidecars": False})


@dataclass
class Webhook:
    """A running `outrigger serve` and the policy it serves."""

    server: Server
    process: subprocess.Popen[bytes]
    policy: Policy

    @property
    def url(self) -> str:
        return self.server.ip_url + WEBHOOK_PATH


@contextmanager
def running_webhook(root: Path, policy: Policy | None = None) -> Iterator[Webhook]:
    """`outrigger serve` for 127.0.0.1 with `policy` (the embedded one when None)."""
    extra: list[str] = []
    if policy is not None:
        root.mkdir(parents=True, exist_ok=True)
        (root / "policy.yaml").write_text(yaml.safe_dump(policy.model_dump(mode="json")))
        extra = ["--policy", str(root / "policy.yaml")]
        policy = load_policy(root / "policy.yaml")  # its version is the file's, as served
    server, process = start_server(root, *extra)
    try:
        yield Webhook(server, process, policy or default_policy())
    finally:
        stop_server(server, process)


def configuration(
    url: str, ca_file: Path, selected: str, *, failure_policy: str = "Fail", name: str = ""
) -> dict[str, Any]:
    """The configuration `outrigger register` builds, but calling `url` and selecting the
    namespaces labelled LABEL=`selected` (so no other test's pods reach it)."""
    body = copy.deepcopy(
        webhook_configuration(
            namespace="outrigger-system",
            ca_bundle=base64.b64encode(ca_file.read_bytes()).decode(),
            failure_policy=failure_policy,
            timeout_seconds=10,
        )
    )
    body["metadata"]["name"] = name or f"outrigger-{selected}"
    hook = body["webhooks"][0]
    hook["clientConfig"] = {"url": url, "caBundle": hook["clientConfig"]["caBundle"]}
    hook["namespaceSelector"] = {"matchLabels": {LABEL: selected}}
    return body


@contextmanager
def registered(kube: ControlPlane, body: dict[str, Any]) -> Iterator[str]:
    """The configuration created, then deleted on exit; yields its name."""
    kube.call("POST", CONFIGURATIONS, body)
    try:
        yield str(body["metadata"]["name"])
    finally:
        kube.request("DELETE", f"{CONFIGURATIONS}/{body['metadata']['name']}")


def selected_namespace(kube: ControlPlane, selected: str, prefix: str = "t") -> str:
    """A fresh namespace that the configuration selecting `selected` calls the webhook for."""
    return kube.namespace(prefix, {LABEL: selected})


def policy_configmap(kube: ControlPlane, namespace: str) -> str:
    """The default policy as the ConfigMap `outrigger-policy` in `namespace` (what
    `--from-cluster NAMESPACE/outrigger-policy` reads); returns its name."""
    text = (ROOT / "webhook" / "core" / "default-policy.yaml").read_text()
    body = {"metadata": {"name": POLICY_CONFIGMAP}, "data": {"policy.yaml": text}}
    kube.call("POST", f"/api/v1/namespaces/{namespace}/configmaps", body)
    return POLICY_CONFIGMAP


def new_selector() -> str:
    return uuid.uuid4().hex[:10]
