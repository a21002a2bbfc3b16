"""The ambassador's configuration, as a pod asks for it: a typed, validated `AmbassadorSpec`.

Two ways to ask, both parameters of the `ambassador` template:
- `outrigger.dev/ambassador-upstream: host:port` (and `ambassador-port`): one HTTP upstream on
  one local port, the seed's pattern;
- `outrigger.dev/ambassador-config`: YAML for everything else: several upstreams each on its
  own local port or routed on one port by path prefix or host, TCP proxying, timeouts,
  retries, circuit breaking, outlier detection, load balancing, DNS discovery, TLS to the
  upstream with SNI, a CA and an optional client certificate from Secrets.
`webhook.ambassador.envoy` turns the spec into an Envoy bootstrap.
"""

from __future__ import annotations

import re
from decimal import Decimal
from functools import lru_cache
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from webhook.ambassador.hostport import ACCEPTED as HOSTPORT_ACCEPTED
from webhook.ambassador.hostport import DNS_NAME, Upstream, parse_hostport
from webhook.limits import cache_small, echo

_DURATION = re.compile(r"([0-9]{1,20})(\.[0-9]{1,20})?(ms|s|m|h)")
_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_SECRET = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
_SAN = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

# Envoy's own limits on what Outrigger emits, mirrored so that nothing admitted makes Envoy
# refuse its bootstrap (tests/test_envoy_bounds.py reads each back from Envoy's protobuf
# descriptors, `validate.rules`, or checks it against the real binary).
# Durations: protobuf holds nanoseconds, and Envoy keeps every duration as int64 nanoseconds.
DURATION_MAX_SECONDS = Decimal("9223372035.999999999")
DNS_REFRESH_MIN_SECONDS = Decimal("0.001")  # DnsCluster.dns_refresh_rate: gt 1ms
UINT32_MAX = 2**32 - 1  # google.protobuf.UInt32Value: circuit breakers, outlier counts
SNI_MAX_BYTES = 255  # UpstreamTlsContext.sni: max_bytes
PORT_MAX = 65535  # SocketAddress.port_value: lte
# The lowest local port the app may call Envoy on: no privileged ports for a non-root sidecar.
LOCAL_PORT_MIN = 1024
MAX_EJECTION_PERCENT = 100  # OutlierDetection.max_ejection_percent: lte

# Bounds on one configuration, so that no annotation makes a review slow or its patch large.
MAX_UPSTREAMS = 32
MAX_ROUTES = 64
MAX_NAMES = 16  # subjectAltNames, retryOn
MAX_YAML_DEPTH = 12

_UNIT_SECONDS = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}


def duration_seconds(duration: str) -> Decimal:
    """A validated duration ("250ms", "1.5s", "2m", "1h") in seconds."""
    match = _DURATION.fullmatch(duration)
    assert match is not None  # validated
    number = Decimal(match.group(1) + (match.group(2) or ""))
    return number * _UNIT_SECONDS[match.group(3)]


def _duration(minimum_exclusive: Decimal | None) -> AfterValidator:
    span = (
        f"from 0s to {DURATION_MAX_SECONDS}s"
        if minimum_exclusive is None
        else f"greater than {minimum_exclusive.normalize():f}s, at most {DURATION_MAX_SECONDS}s"
    )
    accepted = f"a duration such as 250ms, 5s, 1.5m or 1h, {span}, in whole nanoseconds"

    def check(duration: str) -> str:
        if not (duration.isascii() and _DURATION.fullmatch(duration)):
            raise ValueError(f"{duration[:40]!r} is not {accepted}")
        value = duration_seconds(duration)
        too_low = minimum_exclusive is not None and value <= minimum_exclusive
        if too_low or value > DURATION_MAX_SECONDS or (value * 10**9) % 1:
            raise ValueError(f"{duration!r} is out of range: expected {accepted}")
        return duration

    check.__doc__ = accepted  # what the configuration reference shows the field accepts
    return AfterValidator(check)


Duration = Annotated[str, _duration(None)]
PositiveDuration = Annotated[str, _duration(Decimal(0))]
DnsRefreshDuration = Annotated[str, _duration(DNS_REFRESH_MIN_SECONDS)]
LocalPort = Annotated[int, Field(ge=LOCAL_PORT_MIN, le=PORT_MAX)]
Count = Annotated[int, Field(ge=1, le=UINT32_MAX)]
RetryOn = Literal[
    "5xx", "gateway-error", "reset", "connect-failure", "retriable-4xx", "refused-stream",
    "retriable-status-codes", "http3-post-connect-failure",
]  # fmt: skip


class InvalidSpec(ValueError):
    """The ambassador configuration is invalid; the message names each bad field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Model):
    """How long Envoy waits for the upstream."""

    # Time allowed to open a connection to the upstream.
    # Envoy: the cluster's connect_timeout.
    connect: PositiveDuration = "5s"
    # The whole request, retries included; None: Envoy's 15 s; "0s" waits forever. http
    # upstreams only.
    # Envoy: the route's timeout.
    request: Duration | None = None
    # None: Envoy's 1 h. http: closes an app-to-Envoy connection with no request in flight
    # (on the upstream's own listener only, not on routing's), once the idle time has passed
    # and after Envoy's drain and delayed-close windows, so a few seconds later than the
    # value; tcp: closes a proxied connection with no bytes either way.
    # Envoy: common_http_protocol_options.idle_timeout of the listener's connection manager;
    # tcp_proxy idle_timeout.
    idle: Duration | None = None


class Retries(_Model):
    """Retries of failed requests (http upstreams only)."""

    # Retries after the first attempt.
    # Envoy: the route's retry_policy.num_retries.
    count: Annotated[int, Field(ge=0, le=10)]
    # When to retry. Not `on`: YAML 1.1 reads that key as the boolean true.
    # Envoy: retry_policy.retry_on, comma-separated.
    retryOn: Annotated[tuple[RetryOn, ...], Field(max_length=MAX_NAMES)] = (
        "5xx",
        "connect-failure",
        "reset",
    )
    # The limit for each attempt.
    # Envoy: retry_policy.per_try_timeout.
    perTryTimeout: Duration | None = None


class CircuitBreaker(_Model):
    """Limits on what is in flight to the upstream, each per Envoy worker thread (see
    --concurrency), as Envoy applies them; past one, Envoy fails the request at once.
    Envoy: the cluster's circuit_breakers.thresholds[0] (priority DEFAULT)."""

    # Connections to the upstream; None: Envoy's 1024.
    # Envoy: max_connections.
    maxConnections: Count | None = None
    # Requests waiting for a connection; None: Envoy's 1024.
    # Envoy: max_pending_requests.
    maxPendingRequests: Count | None = None
    # Requests in flight; None: Envoy's 1024.
    # Envoy: max_requests.
    maxRequests: Count | None = None
    # Retries in flight, over all requests; None: Envoy's 3.
    # Envoy: max_retries.
    maxRetries: Annotated[int, Field(ge=0, le=UINT32_MAX)] | None = None


class OutlierDetection(_Model):
    """Ejects misbehaving hosts from the balancing for a while; `{}` turns it on with the
    defaults. Envoy: the cluster's outlier_detection."""

    # Errors in a row that eject a host.
    # Envoy: consecutive_5xx.
    consecutive5xx: Count = 5
    # How often ejections are evaluated.
    # Envoy: interval.
    interval: PositiveDuration = "10s"
    # The ejection time, multiplied by the number of times the host was ejected.
    # Envoy: base_ejection_time.
    baseEjectionTime: PositiveDuration = "30s"
    # The most hosts ejected at once (Envoy ejects at least one).
    # Envoy: max_ejection_percent.
    maxEjectionPercent: Annotated[int, Field(ge=1, le=MAX_EJECTION_PERCENT)] = 10


class Discovery(_Model):
    """How the upstream's DNS name is resolved (ignored for an IP address)."""

    # STRICT_DNS balances over every address of a name (Kubernetes headless Services);
    # LOGICAL_DNS connects to the first (large external services). Default: LOGICAL_DNS for a
    # name, STATIC for an IP address.
    # Envoy: DnsCluster all_addresses_in_single_endpoint: false for STRICT_DNS, true
    # otherwise.
    type: Literal["STRICT_DNS", "LOGICAL_DNS"] | None = None
    # How often the name is resolved again.
    # Envoy: DnsCluster dns_refresh_rate.
    refreshRate: DnsRefreshDuration = "5s"
    # Which addresses of the name are used.
    # Envoy: DnsCluster dns_lookup_family.
    lookupFamily: Literal["V4_ONLY", "V6_ONLY", "V4_PREFERRED", "AUTO", "ALL"] = "V4_PREFERRED"


class TLS(_Model):
    """TLS origination: verify the upstream against a CA from a Secret, send SNI, maybe mTLS.
    The app still speaks plain HTTP (or TCP) to localhost. Envoy: the cluster's
    transport_socket envoy.transport_sockets.tls (UpstreamTlsContext)."""

    # A Secret of the pod's namespace whose ca.crt verifies the upstream's certificate;
    # reloaded when the Secret changes. The policy's envoy.allowedSecrets names those allowed.
    # Envoy: combined_validation_context.validation_context_sds_secret_config: the SDS file
    # /etc/outrigger/sds/tls-<i>-ca.json naming /etc/outrigger/secrets/<secret>/ca.crt.
    caSecret: Annotated[str, Field(pattern=_SECRET, max_length=253)]
    # The server name sent in the handshake: a DNS name (TLS sends no IP address as a server
    # name); default: the upstream's name, required for an IP address.
    # Envoy: sni.
    sni: Annotated[str, Field(pattern=DNS_NAME, max_length=SNI_MAX_BYTES)] | None = None
    # DNS names the certificate must carry one of, `*.` wildcards allowed; default: the SNI
    # name.
    # Envoy: match_typed_subject_alt_names (san_type DNS, exact) in
    # combined_validation_context.default_validation_context.
    subjectAltNames: Annotated[
        tuple[Annotated[str, Field(pattern=_SAN, max_length=253)], ...],
        Field(max_length=MAX_NAMES),
    ] = ()
    # A Secret whose tls.crt and tls.key Envoy presents (mutual TLS; cert-manager's layout);
    # reloaded when the Secret changes.
    # Envoy: tls_certificate_sds_secret_configs[0]: the SDS file
    # /etc/outrigger/sds/tls-<i>-cert.json naming /etc/outrigger/secrets/<secret>/tls.crt and
    # tls.key.
    clientCertSecret: Annotated[str, Field(pattern=_SECRET, max_length=253)] | None = None


class UpstreamSpec(_Model):
    """An external service. Envoy: the cluster <name>; with a port, the listener
    upstream-<name> (its stat_prefix is <name>)."""

    # host:port: a DNS name or an IP address ([v6]:port), port 1-65535 without leading zeros.
    # Envoy: the cluster's one endpoint; a DNS name makes a DNS cluster (cluster_type
    # envoy.cluster.dns), an IP address a STATIC one.
    address: str
    # The local port the app calls (localhost:<port>), its own listener; None: the upstream
    # is reached through routing only.
    # Envoy: a listener on 127.0.0.1:<port> (the policy's listenAddress).
    port: LocalPort | None = None
    # http: requests, routed, retried and timed; tcp: bytes, proxied as they come.
    # Envoy: http_connection_manager with one route `prefix: /`, or tcp_proxy.
    protocol: Literal["http", "tcp"] = "http"
    timeouts: Timeouts = Field(default_factory=Timeouts)
    retries: Retries | None = None
    circuitBreaker: CircuitBreaker | None = None
    # None: off.
    outlierDetection: OutlierDetection | None = None
    # Over the upstream's hosts.
    # Envoy: the cluster's lb_policy.
    loadBalancing: Literal["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"] = "ROUND_ROBIN"
    discovery: Discovery = Field(default_factory=Discovery)
    # None: plain text.
    tls: TLS | None = None

    @field_validator("address")
    @classmethod
    def _hostport(cls, address: str) -> str:
        if parse_hostport(address) is None:
            raise ValueError(f"{echo(address)} is not {HOSTPORT_ACCEPTED}")
        return address

    @model_validator(mode="after")
    def _http_only(self) -> UpstreamSpec:
        if self.protocol == "tcp" and (self.retries or self.timeouts.request):
            raise ValueError("retries and timeouts.request apply to http upstreams, not tcp")
        if self.tls is not None and self.tls.sni is None and self.target.is_ip:
            raise ValueError(
                "tls.sni (and subjectAltNames) are required for an IP address upstream: "
                "TLS sends no IP address as a server name"
            )
        return self

    @property
    def target(self) -> Upstream:
        upstream = parse_hostport(self.address)
        assert upstream is not None  # validated above
        return upstream


class Route(_Model):
    """Each route has an upstream and exactly one of pathPrefix and host; path prefixes are
    tried in the order given."""

    # An http upstream of upstreams.
    # Envoy: the route's cluster.
    upstream: str
    # A path prefix starting with /, printable ASCII without spaces: what an HTTP request
    # path can hold (others arrive percent-encoded).
    # Envoy: the route's match.prefix, in the virtual host `paths` (domain *).
    pathPrefix: Annotated[str, Field(pattern=r"^/[!-~]*$", max_length=1024)] | None = None
    # A Host header: a lowercase name, optionally with a leading wildcard (*.example.com),
    # and an optional :port.
    # Envoy: a virtual host host-<n> with domains [<host>] and one route `prefix: /`.
    host: Annotated[str, Field(pattern=r"^[a-z0-9*]([-a-z0-9.*]*[a-z0-9])?(:[0-9]+)?$")] | None = (
        None
    )

    @model_validator(mode="after")
    def _one_match(self) -> Route:
        if (self.pathPrefix is None) == (self.host is None):
            raise ValueError("a route matches on exactly one of pathPrefix or host")
        return self


class Routing(_Model):
    """HTTP routing on one local port, by path prefix or Host header, in the order given.
    Envoy: the listener `routing`."""

    # The local port the app calls.
    # Envoy: a listener on 127.0.0.1:<port>.
    port: LocalPort
    routes: Annotated[tuple[Route, ...], Field(min_length=1, max_length=MAX_ROUTES)]

    @field_validator("routes")
    @classmethod
    def _distinct_hosts(cls, routes: tuple[Route, ...]) -> tuple[Route, ...]:
        hosts = [route.host for route in routes if route.host]
        if "*" in hosts:
            raise ValueError('host "*" would shadow the path routes; use pathPrefix: / instead')
        twice = sorted({host for host in hosts if hosts.count(host) > 1})
        if twice:
            raise ValueError(f"host {', '.join(twice)} is routed twice")
        return routes


class AmbassadorSpec(_Model):
    """The value of `outrigger.dev/ambassador-config`: YAML, validated field by field."""

    # The external services, by name: lowercase letters, digits and '-', at most 50
    # characters. SERVICE_HOST and SERVICE_PORT are set to the first one's address.
    upstreams: Annotated[dict[str, UpstreamSpec], Field(min_length=1, max_length=MAX_UPSTREAMS)]
    routing: Routing | None = None
    # One JSON line per request (http) or connection (tcp) on Envoy's stdout.
    # Envoy: access_log envoy.access_loggers.stdout with json_format, on every listener but
    # health.
    accessLog: bool = True

    def __hash__(self) -> int:
        # By identity, to key the rendering cache: specs come from caches themselves, so
        # equal specs are mostly the same object.
        return id(self)

    @field_validator("upstreams")
    @classmethod
    def _names(cls, upstreams: dict[str, UpstreamSpec]) -> dict[str, UpstreamSpec]:
        for name in upstreams:
            if not re.fullmatch(_NAME, name) or len(name) > 50:
                raise ValueError(
                    f"upstream name {echo(name)}: lowercase letters, digits and '-', at most 50"
                )
        return upstreams

    @model_validator(mode="after")
    def _consistent(self) -> AmbassadorSpec:
        routed = {route.upstream for route in (self.routing.routes if self.routing else ())}
        for name in sorted(routed - self.upstreams.keys()):
            raise ValueError(f"routing.routes: upstream {name!r} is not in upstreams")
        for name, upstream in self.upstreams.items():
            if upstream.port is None and name not in routed:
                raise ValueError(f"upstreams.{name}: needs a port, or a route to it")
            if name in routed and upstream.protocol == "tcp":
                raise ValueError(f"upstreams.{name}: a tcp upstream cannot be routed over http")
        ports = self.ports
        twice = sorted({port for port in ports if ports.count(port) > 1})
        if twice:
            raise ValueError(f"local port {', '.join(map(str, twice))} is used twice")
        return self

    @property
    def ports(self) -> list[int]:
        """The local ports Envoy listens on for the app."""
        return [port for _, port in self.listeners]

    @property
    def listeners(self) -> list[tuple[str, int]]:
        """The local ports Envoy listens on for the app, each with the field that sets it."""
        ports = [
            (f"upstreams.{n}.port", u.port) for n, u in self.upstreams.items() if u.port is not None
        ]
        return ports + ([("routing.port", self.routing.port)] if self.routing else [])

    @property
    def secrets(self) -> list[str]:
        """The Secrets to mount, each once, in a stable order."""
        names: dict[str, None] = {}
        for upstream in self.upstreams.values():
            if upstream.tls is not None:
                names[upstream.tls.caSecret] = None
                if upstream.tls.clientCertSecret:
                    names[upstream.tls.clientCertSecret] = None
        return list(names)


@lru_cache(maxsize=256)
def single_upstream(upstream: Upstream, port: int) -> AmbassadorSpec:
    """The spec of `ambassador-upstream` and `ambassador-port`: one HTTP upstream."""
    address = f"[{upstream.host}]" if ":" in upstream.host else upstream.host
    return AmbassadorSpec(
        upstreams={"upstream": UpstreamSpec(address=f"{address}:{upstream.port}", port=port)}
    )


@cache_small(1024, len)
def parse_spec(text: str) -> AmbassadorSpec:
    """Parse `ambassador-config` YAML; `InvalidSpec` names every bad field (small ones cached)."""
    if _flow_depth(text) > MAX_YAML_DEPTH:  # before PyYAML, whose scanner is slow on these
        raise InvalidSpec(f"not valid YAML: nested deeper than {MAX_YAML_DEPTH} levels")
    try:
        document = _load(text)
    except yaml.YAMLError as error:
        raise InvalidSpec(f"not valid YAML: {_bounded(_yaml_problem(error))}") from None
    except ValueError as error:  # e.g. an integer past Python's 4300-digit limit
        raise InvalidSpec(f"not a valid configuration: {_bounded(str(error))}") from None
    try:
        return AmbassadorSpec.model_validate(document)
    except ValidationError as error:
        lines = [_line(e) for e in error.errors()[:10]]
        raise InvalidSpec("; ".join(lines)) from None


def _load(text: str) -> object:
    loader = _BoundedLoader(text)  # reads the text: a NUL is refused already here
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


class _BoundedLoader(yaml.SafeLoader):
    """Safe YAML without aliases (whose expansion costs what the text does not show) and at
    most MAX_YAML_DEPTH levels deep (deeper nesting exhausts the recursion that composes it)."""

    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("aliases (*name) are not accepted")
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise yaml.YAMLError(f"nested deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _flow_depth(text: str) -> int:
    """How deep `[` and `{` nest, counting those in strings too (an over-estimate is fine)."""
    depth = deepest = 0
    for character in text:
        if character in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif character in "]}":
            depth -= 1
    return deepest


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's message on one line: what and where, without the quoted lines of the input and
    their caret (a denial is one line on the user's terminal)."""
    if not isinstance(error, yaml.MarkedYAMLError):
        return str(error)
    text = ": ".join(part for part in (error.context, error.problem) if part)
    mark = error.problem_mark or error.context_mark
    return text if mark is None else f"{text} (line {mark.line + 1}, column {mark.column + 1})"


def _bounded(message: str) -> str:
    return message if len(message) <= 300 else message[:300] + "..."


def _line(error: object) -> str:
    assert isinstance(error, dict)
    location = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{location}: {message}" if location else message
