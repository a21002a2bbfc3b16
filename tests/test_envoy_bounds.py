"""Nothing admitted that Envoy refuses: the ambassador's bounds, read back from Envoy's API and
tried on the real binary.

1. Each bound the spec enforces is the one Envoy's protobuf descriptors declare
   (`validate.rules` in `xds-protos`), or, where Envoy checks beyond them (durations held as
   int64 nanoseconds), the one the real binary shows.
2. A property test draws values at and just past every bound, injects them through the
   default policy and asserts: admitted implies `envoy --mode validate` accepts the pod's
   ambassador with its exact argv; denied implies a message that names the annotation and the
   field.
3. Generated configurations (several upstreams, routing, tcp, TLS, retries, circuit breaking,
   outlier detection, discovery) pass `envoy --mode validate` as their pods would run them.
"""

from __future__ import annotations

import importlib
from decimal import Decimal
from typing import Any

import pytest
import yaml
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from validate import validate_pb2

from tests.real_envoy import IS_ROOT, Pki, ambassadors, mounted, validate
from webhook.ambassador import spec as ambassador
from webhook.core.injector import InjectionDenied, RequestContext, inject
from webhook.core.policy import default_policy

for _module in (
    "envoy.config.cluster.v3.cluster_pb2",
    "envoy.config.cluster.v3.circuit_breaker_pb2",
    "envoy.config.cluster.v3.outlier_detection_pb2",
    "envoy.config.core.v3.address_pb2",
    "envoy.extensions.clusters.dns.v3.dns_cluster_pb2",
    "envoy.extensions.transport_sockets.tls.v3.tls_pb2",
):
    importlib.import_module(_module)
POOL = descriptor_pool.Default()
CONFIG = "outrigger.dev/ambassador-config"
NS = Decimal("0.000000001")
MAX = ambassador.DURATION_MAX_SECONDS
U32 = ambassador.UINT32_MAX


def envoy_field(message: str, field: str) -> FieldDescriptor:
    return POOL.FindMessageTypeByName(message).fields_by_name[field]


def rules(message: str, field: str) -> Any:
    return envoy_field(message, field).GetOptions().Extensions[validate_pb2.rules]


def seconds(duration: Any) -> Decimal:
    return Decimal(duration.seconds) + Decimal(duration.nanos) / 10**9


def our_maximum(model: type[Any], field: str) -> int:
    """The `le` bound pydantic enforces on an optional integer field of the spec."""
    schema = model.model_json_schema()["properties"][field]
    options = schema.get("anyOf", [schema])
    (maximum,) = {option["maximum"] for option in options if "maximum" in option}
    return int(maximum)


# 1. Bounds read back from Envoy's descriptors -----------------------------------------------

UINT32_FIELDS = [
    (ambassador.CircuitBreaker, name, "envoy.config.cluster.v3.CircuitBreakers.Thresholds", field)
    for name, field in (
        ("maxConnections", "max_connections"),
        ("maxPendingRequests", "max_pending_requests"),
        ("maxRequests", "max_requests"),
        ("maxRetries", "max_retries"),
    )
] + [
    (
        ambassador.OutlierDetection,
        "consecutive5xx",
        "envoy.config.cluster.v3.OutlierDetection",
        "consecutive_5xx",
    )
]


@pytest.mark.parametrize(("model", "name", "message", "field"), UINT32_FIELDS, ids=lambda v: str(v))
def test_counts_are_bounded_as_uint32(
    model: type[Any], name: str, message: str, field: str
) -> None:
    assert envoy_field(message, field).message_type.full_name == "google.protobuf.UInt32Value"
    assert our_maximum(model, name) == ambassador.UINT32_MAX == 2**32 - 1


def test_max_ejection_percent_is_envoys() -> None:
    rule = rules("envoy.config.cluster.v3.OutlierDetection", "max_ejection_percent")
    assert rule.uint32.lte == ambassador.MAX_EJECTION_PERCENT
    assert our_maximum(ambassador.OutlierDetection, "maxEjectionPercent") == rule.uint32.lte


def test_ports_are_envoys() -> None:
    rule = rules("envoy.config.core.v3.SocketAddress", "port_value")
    assert rule.uint32.lte == ambassador.PORT_MAX
    assert our_maximum(ambassador.UpstreamSpec, "port") == rule.uint32.lte


def test_sni_length_is_envoys() -> None:
    rule = rules("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", "sni")
    assert rule.string.max_bytes == ambassador.SNI_MAX_BYTES


@pytest.mark.parametrize(
    ("message", "field", "ours"),
    [
        ("envoy.config.cluster.v3.Cluster", "connect_timeout", ("timeouts", "connect")),
        ("envoy.config.cluster.v3.OutlierDetection", "interval", ("outlierDetection", "interval")),
        (
            "envoy.config.cluster.v3.OutlierDetection",
            "base_ejection_time",
            ("outlierDetection", "baseEjectionTime"),
        ),
        (
            "envoy.extensions.clusters.dns.v3.DnsCluster",
            "dns_refresh_rate",
            ("discovery", "refreshRate"),
        ),
    ],
)
def test_duration_minimums_are_envoys(message: str, field: str, ours: tuple[str, str]) -> None:
    """Envoy's `gt` on each duration: the bound itself is refused, one nanosecond more is not."""
    rule = rules(message, field)
    assert rule.duration.HasField("gt")
    bound = seconds(rule.duration.gt)
    at, above = f"{bound:f}s", f"{bound + NS:f}s"
    assert denial({ours[0]: {ours[1]: at}}) is not None
    assert denial({ours[0]: {ours[1]: above}}) is None


def test_durations_stop_where_envoy_does() -> None:
    """Protobuf allows 315576000000 s; Envoy keeps durations as int64 nanoseconds."""
    assert Decimal(2**63 // 10**9 - 1) + Decimal("0.999999999") == ambassador.DURATION_MAX_SECONDS


# 2. At and just past every bound, on the real Envoy -------------------------------------


def duration_values(low_exclusive: Decimal | None) -> st.SearchStrategy[str]:
    low = Decimal(0) if low_exclusive is None else low_exclusive
    edges = [low, low + NS, MAX, MAX + NS, Decimal("0.0000000001"), Decimal("1.5")]
    if low_exclusive is None:
        edges.append(low - NS)  # negative: refused by the format
    plain = st.sampled_from(edges).map(lambda value: f"{value:f}s")
    units = st.sampled_from(["0.001ms", "0.000001ms", "1.0000000001ms", "2m", "153722867m"])
    return st.one_of(plain, units)


def integer_values(low: int, high: int) -> st.SearchStrategy[int]:
    return st.sampled_from([low - 1, low, high, high + 1]) | st.integers(low, high)


FIELDS: dict[tuple[str, ...], st.SearchStrategy[Any]] = {
    ("timeouts", "connect"): duration_values(Decimal(0)),
    ("timeouts", "request"): duration_values(None),
    ("timeouts", "idle"): duration_values(None),
    ("retries", "perTryTimeout"): duration_values(None),
    ("outlierDetection", "interval"): duration_values(Decimal(0)),
    ("outlierDetection", "baseEjectionTime"): duration_values(Decimal(0)),
    ("discovery", "refreshRate"): duration_values(ambassador.DNS_REFRESH_MIN_SECONDS),
    ("circuitBreaker", "maxConnections"): integer_values(1, U32),
    ("circuitBreaker", "maxPendingRequests"): integer_values(1, U32),
    ("circuitBreaker", "maxRequests"): integer_values(1, U32),
    ("circuitBreaker", "maxRetries"): integer_values(0, U32),
    ("outlierDetection", "consecutive5xx"): integer_values(1, U32),
    ("outlierDetection", "maxEjectionPercent"): integer_values(1, 100),
    ("retries", "count"): integer_values(0, 10),
    ("port",): integer_values(1024, ambassador.PORT_MAX),
    ("tls", "sni"): st.sampled_from([254, 255, 256]).map(
        lambda n: ("a" * 62 + ".") * 4 + "a" * (n - 252)
    ),
    ("address",): st.sampled_from(
        ["[fe80::1%eth0]:80", "[fe80::1]:80", "[::1]:65535", "127.0.0.1:0", "a.example.com:65536"]
    ),
}


def upstream_with(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    upstream: dict[str, Any] = {"address": "api.example.com:443", "port": 9000}
    if path[0] == "retries":
        upstream["retries"] = {"count": 1}
    if path[0] == "tls":
        upstream["tls"] = {"caSecret": "ambassador-ca"}
    target = upstream
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = value
    return upstream


def pod_for(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {
            "annotations": {"outrigger.dev/inject": "ambassador", CONFIG: yaml.safe_dump(config)}
        },
        "spec": {"containers": [{"name": "app", "image": "registry.example.com/app:1"}]},
    }


def denial(upstream_fields: dict[str, Any]) -> str | None:
    """The denial of an upstream `a` with these fields (over a valid address and port)."""
    upstream = {"address": "api.example.com:443", "port": 9000, **upstream_fields}
    config = {"upstreams": {"a": upstream}}
    try:
        inject(pod_for(config), RequestContext("default"), default_policy())
    except InjectionDenied as denied:
        return str(denied)
    return None


PKI = Pki()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(FIELDS)).flatmap(lambda path: st.tuples(st.just(path), FIELDS[path])))
def test_admitted_values_start_and_refused_ones_are_named(
    drawn: tuple[tuple[str, ...], Any],
) -> None:
    path, value = drawn
    config = {"upstreams": {"a": upstream_with(path, value)}}
    try:
        injected = inject(pod_for(config), RequestContext("default"), default_policy()).pod
    except InjectionDenied as denied:
        event("denied")
        message = str(denied)
        assert f"annotation {CONFIG}: upstreams.a.{'.'.join(path)}" in message, message
        return
    event("admitted")
    if not IS_ROOT:
        return
    (container,) = ambassadors(injected)
    with mounted(injected, container, PKI):
        result = validate(container)
    assert result.returncode == 0, (path, value, (result.stdout + result.stderr)[-1500:])


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("timeouts", "connect"), "0s"),
        (("timeouts", "connect"), "9223372036s"),
        (("timeouts", "idle"), "0.0000000001s"),
        (("timeouts", "request"), "1.0000000001ms"),
        (("discovery", "refreshRate"), "1ms"),
        (("circuitBreaker", "maxConnections"), 2**32),
        (("outlierDetection", "consecutive5xx"), 2**32),
        (("tls", "sni"), "a" * 256),
        (("address",), "[fe80::1%eth0]:80"),
    ],
    ids=lambda v: str(v),
)
def test_the_classes_envoy_refused_are_denied(path: tuple[str, ...], value: Any) -> None:
    """The issue's examples, one of each class: each is a named denial now."""
    message = denial(upstream_with(path, value))
    assert message is not None
    assert f"upstreams.a.{'.'.join(path)}" in message


@pytest.mark.parametrize(
    ("annotations", "field", "port", "what"),
    [
        pytest.param(
            {CONFIG: "upstreams: {a: {address: 'api.example.com:443', port: 9901}}"},
            f"annotation {CONFIG}: upstreams.a.port",
            9901,
            "admin interface (envoy.adminPort)",
            id="upstream-on-admin-port",
        ),
        pytest.param(
            {CONFIG: "upstreams: {a: {address: 'api.example.com:443', port: 9902}}"},
            f"annotation {CONFIG}: upstreams.a.port",
            9902,
            "readiness endpoint (envoy.healthPort)",
            id="upstream-on-health-port",
        ),
        pytest.param(
            {
                CONFIG: "upstreams: {a: {address: 'api.example.com:443'}}\n"
                "routing: {port: 9901, routes: [{pathPrefix: /, upstream: a}]}"
            },
            f"annotation {CONFIG}: routing.port",
            9901,
            "admin interface (envoy.adminPort)",
            id="routing-on-admin-port",
        ),
        pytest.param(
            {
                "outrigger.dev/ambassador-upstream": "api.example.com:443",
                "outrigger.dev/ambassador-port": "9902",
            },
            "annotation outrigger.dev/ambassador-port",
            9902,
            "readiness endpoint (envoy.healthPort)",
            id="single-upstream-on-health-port",
        ),
    ],
)
def test_a_local_port_envoy_binds_for_itself_is_refused_naming_the_field(
    annotations: dict[str, str], field: str, port: int, what: str
) -> None:
    """Found by the property test above: a listener on the admin or readiness port was
    denied as a port "bound twice", naming neither the field nor the ports accepted."""
    pod = pod_for({})
    pod["metadata"]["annotations"] = {"outrigger.dev/inject": "ambassador", **annotations}
    with pytest.raises(InjectionDenied) as denied:
        inject(pod, RequestContext("default"), default_policy())
    assert denied.value.reason == "invalid-annotation"
    assert str(denied.value) == (
        f"{field}: {port} is the ambassador's {what}; "
        "the app's local ports may be 1024-65535 except 9901, 9902"
    )


# 3. Generated configurations, on the real Envoy ------------------------------------------


@st.composite
def ambassador_configs(draw: st.DrawFn) -> dict[str, Any]:
    """Several upstreams with any mix of the features, maybe routed: what a team would write."""
    names = draw(
        st.lists(
            st.sampled_from(["api", "db", "bank", "search", "s3"]),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    upstreams: dict[str, Any] = {}
    for index, name in enumerate(names):
        protocol = draw(st.sampled_from(["http", "http", "tcp"]))
        upstream: dict[str, Any] = {
            "address": draw(
                st.sampled_from(
                    [f"{name}.example.com:443", "10.0.0.7:8080", "[fd00::7]:80", "localhost:9999"]
                )
            ),
            "port": 9000 + index,
            "protocol": protocol,
        }
        if draw(st.booleans()):
            upstream["timeouts"] = {
                "connect": draw(st.sampled_from(["250ms", "5s", "1m"])),
                "idle": draw(st.sampled_from(["0s", "30s", "1h"])),
            }
            if protocol == "http":
                upstream["timeouts"]["request"] = draw(st.sampled_from(["0s", "1.5s", "2m"]))
        if protocol == "http" and draw(st.booleans()):
            upstream["retries"] = {"count": draw(st.integers(0, 10)), "perTryTimeout": "500ms"}
        if draw(st.booleans()):
            upstream["circuitBreaker"] = {
                "maxConnections": draw(st.integers(1, U32)),
                "maxRetries": draw(st.integers(0, 3)),
            }
        if draw(st.booleans()):
            upstream["outlierDetection"] = {
                "consecutive5xx": draw(st.integers(1, 100)),
                "maxEjectionPercent": draw(st.integers(1, 100)),
            }
        upstream["loadBalancing"] = draw(
            st.sampled_from(["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"])
        )
        if draw(st.booleans()):
            upstream["discovery"] = {
                "type": draw(st.sampled_from(["STRICT_DNS", "LOGICAL_DNS"])),
                "refreshRate": "30s",
            }
        if draw(st.booleans()):
            upstream["tls"] = {"caSecret": f"ambassador-{name}-ca", "sni": f"{name}.example.com"}
            if draw(st.booleans()):
                upstream["tls"]["clientCertSecret"] = f"ambassador-{name}-client"
        upstreams[name] = upstream
    config: dict[str, Any] = {"upstreams": upstreams, "accessLog": draw(st.booleans())}
    http = [name for name, u in upstreams.items() if u["protocol"] == "http"]
    if http and draw(st.booleans()):
        routes = [{"pathPrefix": f"/{name}", "upstream": name} for name in http]
        config["routing"] = {"port": 9100, "routes": routes}
    return config


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ambassador_configs())
def test_generated_configurations_start(config: dict[str, Any]) -> None:
    injected = inject(pod_for(config), RequestContext("default"), default_policy()).pod
    if not IS_ROOT:
        return
    (container,) = ambassadors(injected)
    with mounted(injected, container, PKI):
        result = validate(container)
    assert result.returncode == 0, (config, (result.stdout + result.stderr)[-1500:])
