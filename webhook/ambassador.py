"""The ambassador: the Envoy bootstrap for a template's `envoy` block.

Envoy listens on the pod's loopback and proxies to the upstream. The bootstrap is passed
inline (`${envoy.bootstrap}` in the template's args, for `--config-yaml`, which takes JSON
too), so the webhook creates no ConfigMap and the pod is self-contained. Rendering it is
cached: pods of one workload ask for the same upstream again and again.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import orjson

from webhook.hostport import Upstream

UPSTREAM_CLUSTER = "upstream"
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_STDOUT_LOG = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"


@lru_cache(maxsize=1024)
def envoy_config_json(
    upstream: Upstream, listen_address: str, listen_port: int, admin_port: int
) -> str:
    bootstrap = envoy_bootstrap(upstream, listen_address, listen_port, admin_port)
    return orjson.dumps(bootstrap).decode()


def envoy_bootstrap(
    upstream: Upstream, listen_address: str, listen_port: int, admin_port: int
) -> dict[str, Any]:
    """A complete Envoy v3 bootstrap: one HTTP listener routing everything to the upstream."""
    return {
        "admin": {"address": _socket_address("127.0.0.1", admin_port)},
        "static_resources": {
            "listeners": [_listener(listen_address, listen_port)],
            "clusters": [_upstream_cluster(upstream)],
        },
    }


def _socket_address(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def _listener(address: str, port: int) -> dict[str, Any]:
    route = {
        "match": {"prefix": "/"},
        # The upstream's virtual hosting sees its own name, not "localhost:8081".
        "route": {"cluster": UPSTREAM_CLUSTER, "auto_host_rewrite": True},
    }
    manager = {
        "@type": f"{_HCM}.HttpConnectionManager",
        "stat_prefix": "ambassador",
        "access_log": [
            {"name": "envoy.access_loggers.stdout", "typed_config": {"@type": _STDOUT_LOG}}
        ],
        "route_config": {
            "name": UPSTREAM_CLUSTER,
            "virtual_hosts": [{"name": UPSTREAM_CLUSTER, "domains": ["*"], "routes": [route]}],
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}],
    }
    return {
        "name": "ambassador",
        "address": _socket_address(address, port),
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": manager,
                    }
                ]
            }
        ],
    }


def _upstream_cluster(upstream: Upstream) -> dict[str, Any]:
    endpoint = {"endpoint": {"address": _socket_address(upstream.host, upstream.port)}}
    cluster: dict[str, Any] = {
        "name": UPSTREAM_CLUSTER,
        # LOGICAL_DNS suits external services behind changing, many-address DNS names.
        "type": "STATIC" if upstream.is_ip else "LOGICAL_DNS",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": UPSTREAM_CLUSTER,
            "endpoints": [{"lb_endpoints": [endpoint]}],
        },
    }
    if not upstream.is_ip:
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    return cluster
