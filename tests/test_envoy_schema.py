"""The ambassador's Envoy bootstrap against Envoy's API (`tests.envoy_schema`, envoy-data-plane).

The generated bootstraps validate; each mutation of a valid one that Envoy would refuse
(a misspelled or misplaced field, a wrong JSON type, a bad enum value or duration, an unknown
or wrong `@type`) is caught, and the error names the JSON path of the problem.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from tests import envoy_schema
from tests.envoy_schema import EnvoyConfigError, validate_bootstrap, validate_message
from webhook.ambassador.envoy import Listening
from webhook.ambassador.envoy import bootstrap as envoy_bootstrap
from webhook.ambassador.hostport import Upstream, parse_hostport
from webhook.ambassador.spec import single_upstream

Config = dict[str, Any]

DNS_UPSTREAM = parse_hostport("api.example.com:443")
IP_UPSTREAM = parse_hostport("10.0.0.7:8080")

LISTENER = "static_resources.listeners[0]"
HCM = f"{LISTENER}.filter_chains[0].filters[0].typed_config"
ACCESS_LOG = f"{HCM}.access_log[0].typed_config"
ROUTE = f"{HCM}.route_config.virtual_hosts[0].routes[0]"
CLUSTER = "static_resources.clusters[0]"
UPSTREAM_ADDRESS = f"{CLUSTER}.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address"

HCM_TYPE = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER_URL = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
STDOUT_LOG_TYPE = "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
TLS_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def bootstrap(upstream: Upstream | None = DNS_UPSTREAM) -> Config:
    assert upstream is not None
    return envoy_bootstrap(single_upstream(upstream, 8081), Listening("127.0.0.1", 9901))


def hcm(config: Config) -> Config:
    chain = config["static_resources"]["listeners"][0]["filter_chains"][0]
    manager: Config = chain["filters"][0]["typed_config"]
    return manager


def access_log(config: Config) -> Config:
    log: Config = hcm(config)["access_log"][0]["typed_config"]
    return log


def route(config: Config) -> Config:
    found: Config = hcm(config)["route_config"]["virtual_hosts"][0]["routes"][0]
    return found


def cluster(config: Config) -> Config:
    found: Config = config["static_resources"]["clusters"][0]
    return found


def upstream_socket(config: Config) -> Config:
    endpoint = cluster(config)["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    socket: Config = endpoint["address"]["socket_address"]
    return socket


def rejection(config: Any, type_: str | type[Any] | None = None, **options: bool) -> list[str]:
    """The problems reported for `config` (a bootstrap unless `type_` is given)."""
    with pytest.raises(EnvoyConfigError) as caught:
        if type_ is None:
            validate_bootstrap(config, **options)
        else:
            validate_message(config, type_, **options)
    assert str(caught.value).splitlines()[1:] == caught.value.problems
    return caught.value.problems


def assert_reported(problems: list[str], path: str, fragment: str) -> None:
    lines = [line for line in problems if line.startswith(f"{path}: ")]
    assert lines, f"nothing reported at {path}; got:\n" + "\n".join(problems)
    assert any(fragment in line for line in lines), "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# What the webhook generates.


@pytest.mark.parametrize("upstream", [DNS_UPSTREAM, IP_UPSTREAM], ids=["dns", "ip"])
def test_generated_bootstrap_is_valid(upstream: Upstream) -> None:
    config = bootstrap(upstream)
    original = copy.deepcopy(config)
    validate_bootstrap(config)
    assert config == original  # validation never touches its input
    if upstream.is_ip:
        assert cluster(config)["type"] == "STATIC"
    else:  # DNS discovery through the DNS cluster extension, with LOGICAL_DNS semantics
        dns = cluster(config)["cluster_type"]["typed_config"]
        assert dns["all_addresses_in_single_endpoint"] is True


# ---------------------------------------------------------------------------------------------
# Mutations of a valid bootstrap: each must fail, naming the path.


def misspell_stat_prefix(config: Config) -> None:
    hcm(config)["stat_prefx"] = hcm(config).pop("stat_prefix")


def listeners_at_top_level(config: Config) -> None:
    config["listeners"] = config["static_resources"].pop("listeners")


def set_in(get: Callable[[Config], Config], key: str, value: Any) -> Callable[[Config], None]:
    def mutate(config: Config) -> None:
        get(config)[key] = value

    return mutate


def route_config_as_list(config: Config) -> None:
    hcm(config)["route_config"] = [hcm(config)["route_config"]]


def clusters_as_object(config: Config) -> None:
    config["static_resources"]["clusters"] = cluster(config)


MUTATIONS = [
    pytest.param(
        misspell_stat_prefix,
        f"{HCM}.stat_prefx",
        f"unknown field of {HCM_TYPE} (did you mean 'stat_prefix'?)",
        id="misspelled-hcm-field",
    ),
    pytest.param(
        set_in(lambda c: c, "stats_flush", "5s"),
        "stats_flush",
        "unknown field of envoy.config.bootstrap.v3.Bootstrap",
        id="unknown-top-level-field",
    ),
    pytest.param(
        listeners_at_top_level,
        "listeners",
        "unknown field of envoy.config.bootstrap.v3.Bootstrap",
        id="field-at-wrong-level",
    ),
    pytest.param(
        set_in(upstream_socket, "port_value", "https"),
        f"{UPSTREAM_ADDRESS}.socket_address.port_value",
        "expected an integer (uint32), got string 'https'",
        id="port-value-not-numeric",
    ),
    pytest.param(
        set_in(upstream_socket, "port_value", True),
        f"{UPSTREAM_ADDRESS}.socket_address.port_value",
        "expected an integer (uint32), got boolean True",
        id="port-value-bool",
    ),
    pytest.param(
        set_in(upstream_socket, "port_value", -443),
        f"{UPSTREAM_ADDRESS}.socket_address.port_value",
        "out of range for uint32",
        id="port-value-negative",
    ),
    pytest.param(
        set_in(cluster, "type", "LOGICAL_DNZ"),
        f"{CLUSTER}.type",
        "'LOGICAL_DNZ' is not a value of enum envoy.config.cluster.v3.ClusterDiscoveryType",
        id="cluster-type-typo",
    ),
    pytest.param(
        set_in(cluster, "dns_lookup_family", "IPV4_ONLY"),
        f"{CLUSTER}.dns_lookup_family",
        "is not a value of enum envoy.config.cluster.v3.ClusterDnsLookupFamily",
        id="dns-lookup-family-typo",
    ),
    pytest.param(
        set_in(cluster, "connect_timeout", "five seconds"),
        f"{CLUSTER}.connect_timeout",
        'expected a duration string like "5s"',
        id="connect-timeout-in-words",
    ),
    pytest.param(
        set_in(cluster, "connect_timeout", 5),
        f"{CLUSTER}.connect_timeout",
        "expected a duration string",
        id="connect-timeout-number",
    ),
    pytest.param(
        set_in(access_log, "@type", f"type.googleapis.com/{STDOUT_LOG_TYPE}s"),
        f"{ACCESS_LOG}.@type",
        "names no message type known to envoy-data-plane",
        id="unknown-type-url",
    ),
    pytest.param(
        set_in(hcm, "@type", "type.googleapis.com/envoy.extensions.filters.nope.v3.Nope"),
        f"{HCM}.@type",
        "names no message type known to envoy-data-plane",
        id="type-url-of-unknown-package",
    ),
    pytest.param(
        set_in(access_log, "path", "/dev/stdout"),  # a field of FileAccessLog
        f"{ACCESS_LOG}.path",
        f"unknown field of {STDOUT_LOG_TYPE}",
        id="field-of-another-message",
    ),
    pytest.param(
        set_in(hcm, "@type", ROUTER_URL),
        f"{HCM}.stat_prefix",
        "unknown field of envoy.extensions.filters.http.router.v3.Router",
        id="type-url-of-another-message",
    ),
    pytest.param(
        route_config_as_list,
        f"{HCM}.route_config",
        "expected an object (message envoy.config.route.v3.RouteConfiguration), got an array",
        id="list-for-message",
    ),
    pytest.param(
        clusters_as_object,
        "static_resources.clusters",
        "expected an array, got an object",
        id="message-for-list",
    ),
    pytest.param(
        set_in(lambda c: hcm(c)["route_config"]["virtual_hosts"][0], "domains", "*"),
        f"{HCM}.route_config.virtual_hosts[0].domains",
        "expected an array, got string '*'",
        id="string-for-list",
    ),
    pytest.param(
        set_in(lambda c: route(c)["route"], "auto_host_rewrite", "true"),
        f"{ROUTE}.route.auto_host_rewrite",
        "expected a boolean (true/false), got string 'true'",
        id="string-for-bool",
    ),
    pytest.param(
        set_in(lambda c: route(c)["match"], "path", "/"),
        f"{ROUTE}.match.path",
        "members of the oneof 'path_specifier' of envoy.config.route.v3.RouteMatch",
        id="two-oneof-members",
    ),
    pytest.param(
        set_in(cluster, "per_connection_buffer_limit_bytes", {"value": 32768}),
        f"{CLUSTER}.per_connection_buffer_limit_bytes",
        "expected an integer (uint32), got an object",
        id="wrapper-as-object",
    ),
    pytest.param(
        set_in(cluster, "load_assignment", None),
        f"{CLUSTER}.load_assignment",
        "null is not allowed",
        id="null-value",
    ),
    pytest.param(
        set_in(hcm, "statPrefix", "other"),
        f"{HCM}.statPrefix",
        "sets the same field as 'stat_prefix'",
        id="field-given-twice",
    ),
    pytest.param(
        set_in(cluster, "dns_refresh_rate", "5s"),
        f"{CLUSTER}.dns_refresh_rate",
        "deprecated field of envoy.config.cluster.v3.Cluster",
        id="deprecated-field",
    ),
]


@pytest.mark.parametrize(("mutate", "path", "fragment"), MUTATIONS)
def test_mutation_is_rejected_at_its_path(
    mutate: Callable[[Config], None], path: str, fragment: str
) -> None:
    config = bootstrap()
    mutate(config)
    assert_reported(rejection(config), path, fragment)


def test_every_problem_is_listed() -> None:
    config = bootstrap(IP_UPSTREAM)  # a STATIC cluster: `type` is its discovery field
    misspell_stat_prefix(config)
    cluster(config)["type"] = "LOGICAL_DNZ"
    cluster(config)["connect_timeout"] = "five seconds"
    problems = rejection(config)
    assert [problem.partition(": ")[0] for problem in problems] == [  # in the config's order
        f"{HCM}.stat_prefx",
        f"{CLUSTER}.connect_timeout",
        f"{CLUSTER}.type",
    ]


def test_deprecated_fields_can_be_allowed() -> None:
    config = bootstrap()
    cluster(config)["dns_refresh_rate"] = "5s"
    validate_bootstrap(config, allow_deprecated=True)


# ---------------------------------------------------------------------------------------------
# Proto-JSON forms Envoy accepts, and partial configs.


@pytest.mark.parametrize("timeout", ["5s", "0.25s", "0s", "1.000000001s"])
def test_durations(timeout: str) -> None:
    config = bootstrap()
    cluster(config)["connect_timeout"] = timeout
    validate_bootstrap(config)


@pytest.mark.parametrize("timeout", ["5", "5ms", "-1s", "1.5 s", ".5s", "0.0000000001s"])
def test_malformed_durations(timeout: str) -> None:
    config = bootstrap()
    cluster(config)["connect_timeout"] = timeout
    assert_reported(rejection(config), f"{CLUSTER}.connect_timeout", "duration")


def test_lower_camel_case_names_are_accepted() -> None:
    """The library reads proto-JSON's lowerCamelCase names; other casings are unknown fields."""
    config = bootstrap()
    hcm(config)["statPrefix"] = hcm(config).pop("stat_prefix")
    upstream_socket(config)["portValue"] = upstream_socket(config).pop("port_value")
    validate_bootstrap(config)
    hcm(config)["STAT_PREFIX"] = hcm(config).pop("statPrefix")
    assert_reported(rejection(config), f"{HCM}.STAT_PREFIX", "unknown field")


def test_proto_json_scalars() -> None:
    config = bootstrap(IP_UPSTREAM)  # a STATIC cluster: `type` is its discovery field
    upstream_socket(config)["port_value"] = "443"  # proto-JSON allows integers as strings
    cluster(config)["type"] = 0  # and enums as their number (STATIC)
    cluster(config)["per_connection_buffer_limit_bytes"] = 32768  # UInt32Value: a bare number
    hcm(config)["use_remote_address"] = False  # BoolValue: a bare bool
    cluster(config)["metadata"] = {"filter_metadata": {"outrigger": {"a": [1, None, {"b": "c"}]}}}
    validate_bootstrap(config)


def test_tls_upstream_cluster() -> None:
    tls_cluster = cluster(bootstrap())
    tls_cluster["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TLS_URL,
            "sni": "api.example.com",
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                "validation_context": {
                    "trusted_ca": {"filename": "/etc/ssl/certs/ca-certificates.crt"}
                },
            },
        },
    }
    tls_cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "auto_config": {"http2_protocol_options": {}},
        }
    }
    validate_message(tls_cluster, "envoy.config.cluster.v3.Cluster")

    # alpn_protocols belongs to the CommonTlsContext, one level down
    tls_cluster["transport_socket"]["typed_config"]["alpn_protocols"] = ["h2"]
    problems = rejection(tls_cluster, "type.googleapis.com/envoy.config.cluster.v3.Cluster")
    assert problems == [
        "transport_socket.typed_config.alpn_protocols: unknown field of "
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
    ]


def test_tcp_proxy_filter() -> None:
    tcp_proxy = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "ambassador",
        "cluster": "upstream",
        "idle_timeout": "300s",
        "max_connect_attempts": 3,
    }
    network_filter = {"name": "envoy.filters.network.tcp_proxy", "typed_config": tcp_proxy}
    validate_message(network_filter, "envoy.config.listener.v3.Filter")

    tcp_proxy["weighted_clusters"] = {"clusters": [{"name": "upstream", "weight": 1}]}
    assert_reported(
        rejection(network_filter, "envoy.config.listener.v3.Filter"),
        "typed_config.weighted_clusters",
        "oneof 'cluster_specifier'",
    )


def test_any_without_type_is_rejected() -> None:
    config = bootstrap()
    del access_log(config)["@type"]
    assert_reported(rejection(config), f"{ACCESS_LOG}.@type", "missing")


def test_message_class_or_type_url() -> None:
    from envoy_data_plane.envoy.config.core.v3 import SocketAddress

    socket = {"address": "127.0.0.1", "port_value": 9901}
    validate_message(socket, SocketAddress)
    validate_message(socket, "type.googleapis.com/envoy.config.core.v3.SocketAddress")
    assert rejection([socket], SocketAddress) == [
        "<root>: expected an object (message envoy.config.core.v3.SocketAddress), got an array"
    ]
    with pytest.raises(LookupError):
        validate_message(socket, "envoy.config.core.v3.SocketAdress")


def test_the_library_parses_what_the_walk_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the walk, envoy-data-plane's own from_dict runs; its errors are reported too."""

    def lenient_walk(self: Any, value: Any, spec: Any, path: str) -> Any:
        return {"static_resources": {"clusters": [{"name": "upstream", "connect_timeout": "soon"}]}}

    monkeypatch.setattr(envoy_schema._Walker, "value", lenient_walk)
    problems = rejection(bootstrap())
    assert len(problems) == 1
    assert problems[0].startswith("<root>: envoy-data-plane rejects it: ValueError")
    assert "soon" in problems[0]
