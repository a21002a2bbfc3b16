"""End to end: a pod of the docs' platform policy picks its Loki output, the webhook
injects the log-watcher, and the real Fluent Bit runs it exactly as injected (command, mounts
including the projected configuration and the CA Secret, user, and the env the kubelet
resolves: the pod's name, namespace and node, the credentials from the Secret) against a
local Loki push receiver over TLS with basic authentication; every line the app writes
arrives once, with its namespace, pod, container and node.

The policy's host is `localhost` (a DNS name, which Fluent Bit's TLS verification needs),
resolving to the receiver on 127.0.0.1, with a certificate for it from a test CA.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import FIXTURES
from tests.fluentbit_outputs import Receiver, basic_auth, decode_loki, make_pki
from tests.real_fluentbit import (
    SKIP_REASON,
    SLACK,
    Kubelet,
    Pod,
    WatcherSpec,
    assert_once,
    injected_pod,
    mount_points,
    numbered,
    watcher_spec,
    write,
)
from webhook.core.logoutputs import CA_MOUNT_PATH
from webhook.core.policy import Policy, parse_policy

if SKIP_REASON:
    pytest.skip(SKIP_REASON, allow_module_level=True)

pytestmark = pytest.mark.fluentbit

USER, PASSWORD = "shipper", "p@ss w0rd with $, and spaces"  # arrives intact through ${VAR}
LINES = 500


def platform_policy(port: int) -> Policy:
    """The docs' platform policy, its Loki output on this machine."""
    document: dict[str, Any] = yaml.safe_load(
        (FIXTURES / "policies" / "good-platform-team.yaml").read_text()
    )
    loki = document["logOutputs"]["outputs"]["loki"]
    document["logOutputs"]["outputs"]["loki"] = {**loki, "host": "localhost", "port": port}
    return parse_policy(document)


@pytest.fixture
def pki(tmp_path: Path) -> Any:
    return make_pki(tmp_path / "pki", "loki")


@pytest.fixture
def loki(pki: Any) -> Iterator[Receiver]:
    receiver = Receiver(decode_loki, pki, auth=basic_auth(USER, PASSWORD))
    yield receiver
    receiver.stop()


@pytest.fixture
def kubelet(pki: Any) -> Kubelet:
    return Kubelet(
        pod_name="checkout-7d4b9c-x2k8q",
        namespace="shop",
        node_name="worker-3",
        secrets={
            "log-shipping": {"username": USER, "password": PASSWORD},
            "logging-ca": {"ca.crt": pki.ca_file.read_text()},
        },
    )


@pytest.fixture
def spec(loki: Receiver, kubelet: Kubelet) -> Iterator[WatcherSpec]:
    pod = injected_pod(
        platform_policy(loki.port),
        security={"runAsUser": 1000, "runAsGroup": 1000},
        annotations={"outrigger.dev/log-output": "loki"},
        namespace=kubelet.namespace,
    )
    watcher = watcher_spec(pod, kubelet)
    with mount_points(watcher):
        yield watcher


def test_the_injected_watcher_ships_every_line_once_to_loki_with_its_pod(
    spec: WatcherSpec, loki: Receiver, kubelet: Kubelet
) -> None:
    assert any(m.path == CA_MOUNT_PATH for m in spec.mounts)  # the CA comes from the Secret
    assert dict(spec.env)["OUTRIGGER_LOG_PASSWORD"] == PASSWORD
    pod = Pod(spec)
    try:
        run = pod.start()
        lines = numbered("loki", LINES)
        write(pod.logs / "app.log", lines[: LINES // 2])
        write(pod.logs / "requests.log", lines[LINES // 2 :])
        records = loki.wait_for(LINES, 10 + SLACK)
        assert run.stop_as_the_kubelet(spec) == 0, run.tail
        printed = run.records()
    finally:
        pod.close()
    assert_once([r["log"] for r in loki.records()], lines)
    metadata = {"namespace": "shop", "pod": kubelet.pod_name, "container": "app"}
    for record in records:
        # namespace, pod and container are the stream's labels, beside the policy's own; the
        # node stays in the line.
        assert set(record) == {"log", "node", "_stream"}
        assert record["node"] == kubelet.node_name
        assert record["_stream"] == {**metadata, "cluster": "prod-eu", "job": "outrigger"}
    assert loki.received.rejected == 0
    assert {h.get("X-Scope-OrgID") for h in loki.received.headers} == {"shop"}
    assert loki.received.paths == {"/loki/api/v1/push"}
    assert printed == []  # nothing on stdout: the records went to Loki
