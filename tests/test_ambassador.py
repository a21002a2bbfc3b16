"""The ambassador configuration: what each field becomes in Envoy, and what is refused.

Every generated bootstrap is also checked against Envoy's own API (envoy-data-plane)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.envoy_schema import validate_bootstrap
from webhook.ambassador.envoy import Listening, bootstrap, sds_files
from webhook.ambassador.spec import InvalidSpec, parse_spec

LISTENING = Listening("127.0.0.1", 9901, 9902)


def envoy(config: str) -> dict[str, Any]:
    generated = bootstrap(parse_spec(config), LISTENING)
    validate_bootstrap(generated)
    return generated


def listeners(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """By name, without the "upstream-" that keeps upstream listeners apart from Outrigger's."""
    return {
        item["name"].removeprefix("upstream-"): item
        for item in config["static_resources"]["listeners"]
    }


def clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in config["static_resources"]["clusters"]}


def manager(listener: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return found


def test_each_upstream_listens_on_its_own_loopback_port() -> None:
    config = envoy(
        "upstreams:\n"
        "  payments: {address: payments.example.com:443, port: 9001}\n"
        "  users: {address: users:80, port: 9002}\n"
    )
    found = listeners(config)
    assert {name: item["address"]["socket_address"] for name, item in found.items()} == {
        "payments": {"address": "127.0.0.1", "port_value": 9001},
        "users": {"address": "127.0.0.1", "port_value": 9002},
        "health": {
            "address": "::",
            "port_value": 9902,
            "ipv4_compat": True,
        },  # the only non-loopback one
    }
    assert config["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 9901,
    }


def test_resilience_settings() -> None:
    config = envoy(
        "upstreams:\n"
        "  api:\n"
        "    address: api.example.com:80\n"
        "    port: 8081\n"
        "    timeouts: {connect: 1s, request: 10s, idle: 300s}\n"
        "    retries: {count: 3, retryOn: [5xx, reset], perTryTimeout: 2s}\n"
        "    circuitBreaker: {maxConnections: 100, maxRequests: 200}\n"
        "    outlierDetection: {consecutive5xx: 7}\n"
        "    loadBalancing: LEAST_REQUEST\n"
        "    discovery: {type: STRICT_DNS, refreshRate: 30s, lookupFamily: V4_ONLY}\n"
    )
    route = manager(listeners(config)["api"])["route_config"]["virtual_hosts"][0]["routes"][0]
    assert route["route"] == {
        "cluster": "api",
        "auto_host_rewrite": True,
        "timeout": "10s",
        "retry_policy": {"retry_on": "5xx,reset", "num_retries": 3, "per_try_timeout": "2s"},
    }
    assert manager(listeners(config)["api"])["common_http_protocol_options"] == {
        "idle_timeout": "300s"
    }
    cluster = clusters(config)["api"]
    assert cluster["connect_timeout"] == "1s" and cluster["lb_policy"] == "LEAST_REQUEST"
    assert cluster["circuit_breakers"] == {
        "thresholds": [{"priority": "DEFAULT", "max_connections": 100, "max_requests": 200}]
    }
    assert cluster["outlier_detection"]["consecutive_5xx"] == 7
    dns = cluster["cluster_type"]["typed_config"]
    assert (dns["dns_refresh_rate"], dns["dns_lookup_family"]) == ("30s", "V4_ONLY")
    assert dns["all_addresses_in_single_endpoint"] is False  # STRICT_DNS: every address


def test_ip_upstream_is_static_and_keeps_the_host_header() -> None:
    config = envoy("upstreams:\n  legacy: {address: '10.1.2.3:8080', port: 8081}\n")
    assert clusters(config)["legacy"]["type"] == "STATIC"
    route = manager(listeners(config)["legacy"])["route_config"]["virtual_hosts"][0]["routes"][0]
    assert "auto_host_rewrite" not in route["route"]


def test_routing_puts_host_rules_before_path_prefixes() -> None:
    config = envoy(
        "upstreams: {a: {address: a.example.com:80}, b: {address: b.example.com:80}}\n"
        "routing:\n"
        "  port: 8081\n"
        "  routes:\n"
        "    - {pathPrefix: /b, upstream: b}\n"
        "    - {host: a.local, upstream: a}\n"
        "    - {pathPrefix: /, upstream: a}\n"
    )
    hosts = manager(listeners(config)["routing"])["route_config"]["virtual_hosts"]
    assert [(h["domains"], [r["match"]["prefix"] for r in h["routes"]]) for h in hosts] == [
        (["a.local"], ["/"]),
        (["*"], ["/b", "/"]),
    ]
    assert set(listeners(config)) == {"routing", "health"}


SPEC_BANK = (
    "upstreams:\n"
    "  bank:\n"
    "    address: api.bank.example:443\n"
    "    port: 8443\n"
    "    tls: {caSecret: bank-ca, clientCertSecret: bank-client}\n"
)


def test_tls_origination_with_client_certificate() -> None:
    config = envoy(SPEC_BANK)
    tls = clusters(config)["bank"]["transport_socket"]["typed_config"]
    assert tls["sni"] == "api.bank.example"
    context = tls["common_tls_context"]
    combined = context["combined_validation_context"]
    assert combined["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "api.bank.example"}}
    ]
    # The CA and the client certificate through file-based SDS, watching each Secret's mount.
    assert combined["validation_context_sds_secret_config"] == {
        "name": "tls-0-ca",
        "sds_config": {
            "path_config_source": {
                "path": "/etc/outrigger/sds/tls-0-ca.json",
                "watched_directory": {"path": "/etc/outrigger/secrets/bank-ca"},
            },
            "resource_api_version": "V3",
        },
    }
    (certificate,) = context["tls_certificate_sds_secret_configs"]
    assert certificate["name"] == "tls-1-cert"
    assert certificate["sds_config"]["path_config_source"]["watched_directory"] == {
        "path": "/etc/outrigger/secrets/bank-client"
    }
    files = {f.name: orjson.loads(f.text) for f in sds_files(parse_spec(SPEC_BANK))}
    (cert_resource,) = files["tls-1-cert"]["resources"]
    assert cert_resource["tls_certificate"]["private_key"] == {
        "filename": "/etc/outrigger/secrets/bank-client/tls.key"
    }
    (ca_resource,) = files["tls-0-ca"]["resources"]
    assert ca_resource["validation_context"] == {
        "trusted_ca": {"filename": "/etc/outrigger/secrets/bank-ca/ca.crt"}
    }
    assert parse_spec(
        "upstreams: {b: {address: 'b:443', port: 9000, tls: {caSecret: x, clientCertSecret: y}}}"
    ).secrets == ["x", "y"]


def test_tcp_proxy_and_no_access_log() -> None:
    config = envoy(
        "upstreams: {db: {address: db.example.com:5432, port: 5432, protocol: tcp}}\n"
        "accessLog: false\n"
    )
    proxy = manager(listeners(config)["db"])
    assert proxy["cluster"] == "db" and "access_log" not in proxy
    assert proxy["@type"].endswith("tcp_proxy.v3.TcpProxy")


def test_durations_are_given_to_envoy_in_seconds() -> None:
    config = envoy(
        "upstreams: {api: {address: api.example.com:80, port: 8081, "
        "timeouts: {connect: 500ms, request: 2m}, discovery: {refreshRate: 1h}}}"
    )
    cluster = clusters(config)["api"]
    assert cluster["connect_timeout"] == "0.5s"
    assert cluster["cluster_type"]["typed_config"]["dns_refresh_rate"] == "3600s"
    route = manager(listeners(config)["api"])["route_config"]["virtual_hosts"][0]["routes"][0]
    assert route["route"]["timeout"] == "120s"


def test_an_upstream_may_be_called_like_outriggers_own_listeners() -> None:
    config = envoy("upstreams: {health: {address: health.example.com:80, port: 8081}}")
    names = [item["name"] for item in config["static_resources"]["listeners"]]
    assert names == ["upstream-health", "health"]


def test_access_log_is_json_on_stdout() -> None:
    config = envoy("upstreams: {api: {address: api.example.com:80, port: 8081}}\n")
    log = manager(listeners(config)["api"])["access_log"][0]["typed_config"]
    assert log["@type"].endswith("StdoutAccessLog")
    assert log["log_format"]["json_format"]["response_code"] == "%RESPONSE_CODE%"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        pytest.param(
            "upstreams: {}", "upstreams: Dictionary should have at least 1 item", id="no-upstream"
        ),
        pytest.param(
            "upstreams: {a: {address: 'a:80'}}",
            "upstreams.a: needs a port",
            id="unreachable-upstream",
        ),
        pytest.param(
            "upstreams: {a: {address: 'nope', port: 9000}}",
            "upstreams.a.address: 'nope' is not host:port",
            id="bad-address",
        ),
        pytest.param(
            "upstreams: {a: {address: 'a:80', port: 80}}",
            "upstreams.a.port: Input should be greater than or equal to 1024",
            id="privileged-port",
        ),
        pytest.param(
            "upstreams: {a: {address: 'a:80', port: 9000, timeouts: {connect: 5}}}",
            "upstreams.a.timeouts.connect: Input should be a valid string",
            id="duration-not-string",
        ),
        pytest.param(
            "upstreams: {a: {address: 'a:80', port: 9000, timeouts: {connect: soon}}}",
            "upstreams.a.timeouts.connect: 'soon' is not a duration such as 250ms, 5s, 1.5m or 1h, "
            "greater than 0s, at most 9223372035.999999999s, in whole nanoseconds",
            id="duration-format",
        ),
        pytest.param(
            "upstreams: {a: {address: 'a:80', port: 9000, retries: {count: 11}}}",
            "upstreams.a.retries.count: Input should be less than or equal to 10",
            id="too-many-retries",
        ),
        pytest.param(
            "upstreams: {a: {address: 'a:80', port: 9000, retries: {count: 1, retryOn: [5XX]}}}",
            "upstreams.a.retries.retryOn.0: Input should be '5xx'",
            id="retry-on",
        ),
        pytest.param(
            "upstreams: {a: {address: 'a:80', port: 9000, loadBalancing: MAGLEV}}",
            "upstreams.a.loadBalancing: Input should be",
            id="lb-policy",
        ),
        pytest.param(
            "upstreams: {a: {address: 'a:80', port: 9000, tls: {}}}",
            "upstreams.a.tls.caSecret: Field required",
            id="tls-without-ca",
        ),
        pytest.param(
            "upstreams: {a: {address: 'a:80', port: 9000, colour: red}}",
            "upstreams.a.colour: Extra inputs are not permitted",
            id="unknown-field",
        ),
        pytest.param(
            "upstreams: {a: {address: 'a:80'}}\nrouting: {port: 9000, routes: [{upstream: b, "
            "pathPrefix: /}]}",
            "routing.routes: upstream 'b' is not in upstreams",
            id="route-to-nowhere",
        ),
        pytest.param(
            "upstreams: {a: {address: 'a:80'}}\nrouting: {port: 9000, routes: [{upstream: a}]}",
            "exactly one of pathPrefix or host",
            id="route-without-match",
        ),
        pytest.param(
            "upstreams: {a: {address: 'a:80', port: 9000}}\nrouting: {port: 9000, routes: "
            "[{upstream: a, pathPrefix: /}]}",
            "local port 9000 is used twice",
            id="routing-port-twice",
        ),
        pytest.param("just a string", "Input should be a valid dictionary", id="not-a-mapping"),
        pytest.param(
            "upstreams: {a: {address: 'a:80'}}\nrouting: {port: 9000, routes: [{upstream: a, "
            "host: x.local}, {upstream: a, host: x.local}]}",
            "host x.local is routed twice",
            id="host-twice",
        ),
        pytest.param(
            "upstreams: {a: {address: 'a:80'}}\nrouting: {port: 9000, routes: [{upstream: a, "
            "host: '*'}]}",
            'host "*" would shadow the path routes',
            id="host-star",
        ),
        pytest.param(
            "upstreams: {a: {address: '10.0.0.7:443', port: 9000, tls: {caSecret: c}}}",
            "tls.sni (and subjectAltNames) are required for an IP address upstream",
            id="tls-to-ip-without-sni",
        ),
    ],
)
def test_refused(config: str, message: str) -> None:
    with pytest.raises(InvalidSpec) as caught:
        parse_spec(config)
    assert message in str(caught.value)
