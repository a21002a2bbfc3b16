"""The ambassador's readiness listener in each address family, with the real Envoy: probed on
127.0.0.1 and ::1 as the kubelet of an IPv4-only, a dual-stack or an IPv6-only pod would.

A module of its own: Envoy binds its listeners with SO_REUSEPORT, so another running Envoy on
the same ports would answer instead.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.real_envoy import ambassadors, needs_root, run_envoy
from tests.test_envoy_e2e import injected_pod
from webhook.core.policy import default_policy, parse_policy

pytestmark = needs_root
CONFIG = "upstreams: {plain: {address: 'localhost:18001', port: 9001}}"


def reachable(url: str) -> bool:
    try:
        return bool(urllib.request.urlopen(url, timeout=2).status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@pytest.mark.parametrize(
    ("family", "ipv4", "ipv6"),
    [("DualStack", True, True), ("IPv4", True, False), ("IPv6", False, True)],
)
def test_readiness_listener_families(family: str, ipv4: bool, ipv6: bool, tmp_path: Path) -> None:
    document = default_policy().model_dump(mode="json", exclude_none=True)
    for template in document["sidecars"]:
        if template["name"] == "ambassador":
            template["envoy"]["healthAddressFamily"] = family
    pod = injected_pod(parse_policy(document), CONFIG)
    (container,) = ambassadors(pod)
    ready = "http://127.0.0.1:9901/ready"  # the admin interface: up in every family
    with run_envoy(container, tmp_path / "envoy.log", ready):
        assert reachable("http://127.0.0.1:9902/ready") is ipv4
        assert reachable("http://[::1]:9902/ready") is ipv6
