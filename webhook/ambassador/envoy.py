"""Envoy v3 bootstrap for an `AmbassadorSpec`, built from small typed builders.

Every builder returns Envoy's proto-JSON (snake_case, `@type` in each `typed_config`); the
tests check the result against Envoy's own API definitions (envoy-data-plane), so a misspelled
field or a wrong type fails there. The bootstrap is passed inline (`--config-yaml` takes JSON
too): the webhook creates no ConfigMap and the pod is self-contained. Rendering is cached per
spec: pods of one workload ask for the same configuration again and again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from webhook.ambassador.spec import AmbassadorSpec, Route, Routing, UpstreamSpec, duration_seconds
from webhook.limits import cache_small

Json = dict[str, Any]
_TYPE = "type.googleapis.com/envoy."
HCM = "envoy.filters.network.http_connection_manager"
HEALTH_PATH = "/ready"
# Where the Secrets an ambassador uses are mounted in its container, one directory each.
SECRETS_ROOT = "/etc/outrigger/secrets"
# Where the SDS files naming the certificate files in those Secrets are projected (from the
# pod's annotations, by a downwardAPI volume): Envoy reloads certificates only through SDS.
SDS_ROOT = "/etc/outrigger/sds"
# SDS needs a node identity; nothing else reads it.
NODE = {"id": "ambassador", "cluster": "outrigger"}
_SECRET_TYPE = _TYPE + "extensions.transport_sockets.tls.v3.Secret"

# One JSON object per request or connection on stdout, where the cluster collects logs.
_HTTP_LOG_FIELDS = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "authority": "%REQ(:AUTHORITY)%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration_ms": "%DURATION%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "request_id": "%REQ(X-REQUEST-ID)%",
}
_TCP_LOG_FIELDS = {
    "start_time": "%START_TIME%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration_ms": "%DURATION%",
    "response_flags": "%RESPONSE_FLAGS%",
}


def seconds(duration: str) -> str:
    """Envoy reads durations only in seconds ("0.25s"); the spec also takes ms, m and h."""
    return f"{duration_seconds(duration).normalize():f}s"


# The readiness listener's address for each family: DualStack is one IPv6 socket that also
# accepts IPv4 (ipv4_compat), so it answers the kubelet in IPv4-only, dual-stack and IPv6-only
# pods alike, as long as the node has not disabled IPv6 altogether (then: IPv4).
_HEALTH_ADDRESSES = {"DualStack": ("::", True), "IPv4": ("0.0.0.0", False), "IPv6": ("::", False)}


@dataclass(frozen=True, slots=True)
class Listening:
    """Where Envoy listens: for the app (loopback), its admin API and its readiness check."""

    address: str = "127.0.0.1"
    admin_port: int = 9901
    health_port: int | None = None  # on all addresses, so that the kubelet can probe it
    health_family: str = "DualStack"  # a key of _HEALTH_ADDRESSES


@dataclass(frozen=True, slots=True)
class SdsFile:
    """One SDS resource file: where Envoy reads it, and the Secret directory it watches."""

    name: str  # the resource's name, and the file's (`<name>.json` under SDS_ROOT)
    watched: str  # the Secret's mount, whose `..data` swap the kubelet makes on renewal
    text: str  # the file's JSON


@cache_small(1024, lambda spec, *_: 1024 * len(spec.upstreams))
def bootstrap_json(spec: AmbassadorSpec, listening: Listening) -> str:
    return orjson.dumps(bootstrap(spec, listening)).decode()


def bootstrap(spec: AmbassadorSpec, listening: Listening) -> Json:
    listeners = [
        _upstream_listener(name, upstream, listening.address, spec.accessLog)
        for name, upstream in spec.upstreams.items()
        if upstream.port is not None
    ]
    if spec.routing is not None:
        listeners.append(_routing_listener(spec, spec.routing, listening.address))
    if listening.health_port is not None:
        listeners.append(_health_listener(listening.health_port, listening.health_family))
    return {
        "node": NODE,
        "admin": {"address": socket_address("127.0.0.1", listening.admin_port)},
        "static_resources": {
            "listeners": listeners,
            "clusters": [_cluster(spec, name, u) for name, u in spec.upstreams.items()],
        },
    }


def socket_address(address: str, port: int, ipv4_compat: bool = False) -> Json:
    socket: Json = {"address": address, "port_value": port}
    if ipv4_compat:
        socket["ipv4_compat"] = True
    return {"socket_address": socket}


@cache_small(1024, lambda spec: 1024 * len(spec.upstreams))
def sds_files(spec: AmbassadorSpec) -> tuple[SdsFile, ...]:
    """The SDS files the bootstrap's TLS contexts read: per Secret (by its index in
    `spec.secrets`, as mounted), `tls-<i>-ca` for its ca.crt and `tls-<i>-cert` for its
    tls.crt and tls.key, each only where an upstream uses it."""
    files: dict[str, SdsFile] = {}
    for upstream in spec.upstreams.values():
        if upstream.tls is None:
            continue
        uses = [("ca", upstream.tls.caSecret)]
        if upstream.tls.clientCertSecret:
            uses.append(("cert", upstream.tls.clientCertSecret))
        for kind, secret in uses:
            name = _sds_name(spec, kind, secret)
            directory = f"{SECRETS_ROOT}/{secret}"
            if kind == "ca":
                body: Json = {
                    "validation_context": {"trusted_ca": {"filename": f"{directory}/ca.crt"}}
                }
            else:
                body = {
                    "tls_certificate": {
                        "certificate_chain": {"filename": f"{directory}/tls.crt"},
                        "private_key": {"filename": f"{directory}/tls.key"},
                    }
                }
            resource = {"@type": _SECRET_TYPE, "name": name, **body}
            text = orjson.dumps({"resources": [resource]}).decode()
            files[name] = SdsFile(name, directory, text)
    return tuple(files.values())


def _sds_name(spec: AmbassadorSpec, kind: str, secret: str) -> str:
    return f"tls-{spec.secrets.index(secret)}-{kind}"


def _sds_config(spec: AmbassadorSpec, kind: str, secret: str) -> Json:
    name = _sds_name(spec, kind, secret)
    source = {
        "path_config_source": {
            "path": f"{SDS_ROOT}/{name}.json",
            "watched_directory": {"path": f"{SECRETS_ROOT}/{secret}"},
        },
        "resource_api_version": "V3",
    }
    return {"name": name, "sds_config": source}


def _upstream_listener(name: str, upstream: UpstreamSpec, address: str, access_log: bool) -> Json:
    assert upstream.port is not None
    if upstream.protocol == "tcp":
        proxy: Json = {
            "@type": _TYPE + "extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": name,
            "cluster": name,
        }
        if upstream.timeouts.idle:
            proxy["idle_timeout"] = seconds(upstream.timeouts.idle)
        if access_log:
            proxy["access_log"] = [_stdout_log(_TCP_LOG_FIELDS)]
        network_filter = {"name": "envoy.filters.network.tcp_proxy", "typed_config": proxy}
    else:
        routes = [_route({"prefix": "/"}, name, upstream)]
        virtual_hosts = [{"name": name, "domains": ["*"], "routes": routes}]
        network_filter = _http_manager(name, virtual_hosts, access_log, upstream.timeouts.idle)
    # "upstream-": an upstream may be called "health" or "routing" like Outrigger's own.
    return _listener(f"upstream-{name}", address, upstream.port, network_filter)


def _routing_listener(spec: AmbassadorSpec, routing: Routing, address: str) -> Json:
    """Host rules first (a virtual host each), then path prefixes on the catch-all host."""
    by_host = [r for r in routing.routes if r.host]
    by_path = [r for r in routing.routes if r.pathPrefix]
    virtual_hosts = [
        {
            "name": f"host-{index}",
            "domains": [route.host],
            "routes": [_route({"prefix": "/"}, route.upstream, spec.upstreams[route.upstream])],
        }
        for index, route in enumerate(by_host)
    ]
    if by_path:
        virtual_hosts.append(
            {"name": "paths", "domains": ["*"], "routes": [_path_route(spec, r) for r in by_path]}
        )
    manager = _http_manager("routing", virtual_hosts, spec.accessLog, None)
    return _listener("routing", address, routing.port, manager)


def _path_route(spec: AmbassadorSpec, route: Route) -> Json:
    assert route.pathPrefix is not None
    return _route({"prefix": route.pathPrefix}, route.upstream, spec.upstreams[route.upstream])


def _route(match: Json, cluster: str, upstream: UpstreamSpec) -> Json:
    action: Json = {"cluster": cluster}
    if not upstream.target.is_ip:
        # The upstream's virtual hosting sees its own name, not "localhost:8081".
        action["auto_host_rewrite"] = True
    if upstream.timeouts.request:
        action["timeout"] = seconds(upstream.timeouts.request)
    if upstream.retries is not None:
        retry: Json = {
            "retry_on": ",".join(upstream.retries.retryOn),
            "num_retries": upstream.retries.count,
        }
        if upstream.retries.perTryTimeout:
            retry["per_try_timeout"] = seconds(upstream.retries.perTryTimeout)
        action["retry_policy"] = retry
    return {"match": match, "route": action}


def _http_manager(
    name: str, virtual_hosts: list[Json], access_log: bool, idle_timeout: str | None
) -> Json:
    manager: Json = {
        "@type": _TYPE + "extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {"name": name, "virtual_hosts": virtual_hosts},
        "http_filters": [_router()],
    }
    if access_log:
        manager["access_log"] = [_stdout_log(_HTTP_LOG_FIELDS)]
    if idle_timeout:
        manager["common_http_protocol_options"] = {"idle_timeout": seconds(idle_timeout)}
    return {"name": HCM, "typed_config": manager}


def _health_listener(port: int, family: str) -> Json:
    """`GET /ready` answers 200 while Envoy serves and 503 once it drains (health_check filter)."""
    health = {
        "name": "envoy.filters.http.health_check",
        "typed_config": {
            "@type": _TYPE + "extensions.filters.http.health_check.v3.HealthCheck",
            "pass_through_mode": False,
            "headers": [{"name": ":path", "string_match": {"exact": HEALTH_PATH}}],
        },
    }
    not_found = {"match": {"prefix": "/"}, "direct_response": {"status": 404}}
    manager = {
        "@type": _TYPE + "extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "health",
        "route_config": {
            "name": "health",
            "virtual_hosts": [{"name": "health", "domains": ["*"], "routes": [not_found]}],
        },
        "http_filters": [health, _router()],
    }
    address, ipv4_compat = _HEALTH_ADDRESSES[family]
    return {
        "name": "health",
        "address": socket_address(address, port, ipv4_compat),
        "filter_chains": [{"filters": [{"name": HCM, "typed_config": manager}]}],
    }


def _listener(name: str, address: str, port: int, network_filter: Json) -> Json:
    return {
        "name": name,
        "address": socket_address(address, port),
        "filter_chains": [{"filters": [network_filter]}],
    }


def _router() -> Json:
    return {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": _TYPE + "extensions.filters.http.router.v3.Router"},
    }


def _stdout_log(fields: dict[str, str]) -> Json:
    return {
        "name": "envoy.access_loggers.stdout",
        "typed_config": {
            "@type": _TYPE + "extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": {"json_format": fields},
        },
    }


def _cluster(spec: AmbassadorSpec, name: str, upstream: UpstreamSpec) -> Json:
    target = upstream.target
    endpoint = {"endpoint": {"address": socket_address(target.host, target.port)}}
    cluster: Json = {
        "name": name,
        "connect_timeout": seconds(upstream.timeouts.connect),
        "lb_policy": upstream.loadBalancing,
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]},
    }
    if target.is_ip:
        cluster["type"] = "STATIC"
    else:
        cluster["cluster_type"] = _dns_cluster_type(upstream)
    if upstream.circuitBreaker is not None:
        cluster["circuit_breakers"] = {"thresholds": [_thresholds(upstream)]}
    if upstream.outlierDetection is not None:
        detection = upstream.outlierDetection
        cluster["outlier_detection"] = {
            "consecutive_5xx": detection.consecutive5xx,
            "interval": seconds(detection.interval),
            "base_ejection_time": seconds(detection.baseEjectionTime),
            "max_ejection_percent": detection.maxEjectionPercent,
        }
    if upstream.tls is not None:
        cluster["transport_socket"] = _tls_socket(spec, upstream)
    return cluster


def _dns_cluster_type(upstream: UpstreamSpec) -> Json:
    """DNS discovery through the DNS cluster extension (Envoy's top-level DNS fields are
    deprecated); LOGICAL_DNS semantics is `all_addresses_in_single_endpoint`."""
    discovery = upstream.discovery
    return {
        "name": "envoy.cluster.dns",
        "typed_config": {
            "@type": _TYPE + "extensions.clusters.dns.v3.DnsCluster",
            "dns_refresh_rate": seconds(discovery.refreshRate),
            "dns_lookup_family": discovery.lookupFamily,
            "all_addresses_in_single_endpoint": discovery.type != "STRICT_DNS",
        },
    }


def _thresholds(upstream: UpstreamSpec) -> Json:
    breaker = upstream.circuitBreaker
    assert breaker is not None
    thresholds: Json = {"priority": "DEFAULT"}
    for field, value in (
        ("max_connections", breaker.maxConnections),
        ("max_pending_requests", breaker.maxPendingRequests),
        ("max_requests", breaker.maxRequests),
        ("max_retries", breaker.maxRetries),
    ):
        if value is not None:
            thresholds[field] = value
    return thresholds


def _tls_socket(spec: AmbassadorSpec, upstream: UpstreamSpec) -> Json:
    """The CA and client certificate come through file-based SDS, watching the Secret's
    directory, so that a renewed Secret is used from the next handshake on; the names the
    upstream's certificate must carry stay static."""
    tls = upstream.tls
    assert tls is not None
    sni = tls.sni or upstream.target.host
    names = tls.subjectAltNames or (sni,)
    context: Json = {
        "combined_validation_context": {
            "default_validation_context": {
                "match_typed_subject_alt_names": [
                    {"san_type": "DNS", "matcher": {"exact": name}} for name in names
                ]
            },
            "validation_context_sds_secret_config": _sds_config(spec, "ca", tls.caSecret),
        }
    }
    if tls.clientCertSecret:
        context["tls_certificate_sds_secret_configs"] = [
            _sds_config(spec, "cert", tls.clientCertSecret)
        ]
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _TYPE + "extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": sni,
            "common_tls_context": context,
        },
    }
