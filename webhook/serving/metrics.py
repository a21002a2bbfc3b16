"""Prometheus metrics of the webhook: every review by outcome and reason, the sidecars
injected, the reviews' own duration, policy reloads, the policy in force, the certificate.

Each `Metrics` has a registry of its own rather than prometheus-client's global one, so that
several apps (tests, or an embedding program) never clash over metric names and each `/metrics`
shows exactly its app's state. Per review the cost is a dictionary lookup of a pre-bound child
and two increments (`observe_review`), measured with `make bench` (docs/operators/performance.md).
Label sets are bounded: outcomes and reasons are fixed words, sidecars the policy's templates.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from typing import Any, Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import InfoMetricFamily, Metric

from webhook.core.policy import Policy

ReloadResult = Literal["success", "failure"]
# A self-managed TLS sync: nothing changed, this replica wrote a new bundle, it took another
# replica's, the CA could not be published (no webhook configuration), or it failed.
SelfTLSResult = Literal["kept", "issued", "adopted", "unpublished", "error"]
# Why a policy ConfigMap watch was started again: its stream ended as the server meant it to
# (renewed), its resourceVersion expired (relisted, a 410), or it failed (error).
WatchRestart = Literal["renewed", "relisted", "error"]
# A publication of the compiled policy: applied whole, applied with a part fallen back (not
# compiled, or refused by the API server), no webhook configuration to publish to, failed.
CompiledPolicyResult = Literal["applied", "fallback", "unpublished", "error"]
# Why the server closed a connection on its own: to stay under the connection cap, a TLS
# handshake not finished in time (or failed), a client pipelining too deep, an upgrade asked.
ConnectionClosed = Literal["cap", "handshake", "pipelining", "upgrade"]
# What became of a decision worth a Kubernetes Event (`webhook.cluster.events`).
EventResult = Literal["sent", "aggregated", "dropped", "failed"]
# From 50 us (a memoised answer) to 100 ms (the largest admissible configuration, uncached).
DURATION_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
)  # fmt: skip
_EXPECTED_SERIES = (
    ("injected", "injected"),
    ("unchanged", "not-requested"),
    ("denied", "invalid-annotation"),
    ("bad_request", "malformed"),
    ("error", "internal"),
)
_POLICY_INFO = "outrigger_policy"  # exposed as outrigger_policy_info{version="..."} 1
_POLICY_INFO_HELP = "The policy in force; its version is recorded in the status annotation."
# What `generate_latest` writes, as prometheus-client's own server labels it when the scraper
# asks for nothing newer (its CONTENT_TYPE_LATEST is 1.0.0 in recent releases, 0.0.4 in older).
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The webhook's metrics, in a dedicated registry; thread-safe (the poller runs in a thread)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._reloads = Counter(
            "outrigger_policy_reloads",
            "Policy file changes applied (success) or rejected, the old policy kept (failure).",
            ["result"],
            registry=self.registry,
        )
        for result in ("success", "failure"):
            self._reloads.labels(result=result)  # both series exist from the start, at 0
        self._certificate_expiry = Gauge(
            "outrigger_serving_certificate_expiry_timestamp_seconds",
            "When the serving certificate expires (Unix time); alert well before it.",
            registry=self.registry,
        )
        self._self_tls = Counter(
            "outrigger_self_tls_syncs",
            "Self-managed TLS syncs (tls-source self), by result: kept, issued (this replica "
            "wrote a new bundle), adopted (another replica's), unpublished, error.",
            ["result"],
            registry=self.registry,
        )
        self._policy_watch = Counter(
            "outrigger_policy_watch_restarts",
            "Policy ConfigMap watches started again, by reason: renewed (the stream ended), "
            "relisted (410 Gone: listed again), error (backed off).",
            ["reason"],
            registry=self.registry,
        )
        self._reviews = Counter(
            "outrigger_admission_reviews",
            "AdmissionReviews answered, by outcome (injected, unchanged, denied, bad_request, "
            "error) and reason.",
            ["outcome", "reason"],
            registry=self.registry,
        )
        self._sidecars = Counter(
            "outrigger_sidecars_injected",
            "Sidecars injected into pods, by sidecar template.",
            ["sidecar"],
            registry=self.registry,
        )
        self._duration = Histogram(
            "outrigger_admission_review_duration_seconds",
            "Time the webhook spent on a review (decoding, deciding, building, encoding).",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._compiled_syncs = Counter(
            "outrigger_compiled_policy_syncs",
            "Publications of the compiled policy (matchConditions, guard), by result: applied, "
            "fallback (a part not compiled or refused: see the log), unpublished, error.",
            ["result"],
            registry=self.registry,
        )
        self._compiled_info = Gauge(
            "outrigger_compiled_policy_info",
            "The policy version the API server's matchConditions and guard were last compiled "
            "from by this replica, and each part's state (compiled, fallback, off).",
            ["version", "match_conditions", "guard"],
            registry=self.registry,
        )
        self._connections = Gauge(
            "outrigger_connections_open",
            "Client connections open (TLS handshakes included); see --max-connections.",
            registry=self.registry,
        )
        self._connections_closed = Counter(
            "outrigger_connections_closed",
            "Connections the server closed on its own, by reason: cap (room made at the "
            "connection cap), handshake (TLS not finished in time, or failed), pipelining, "
            "upgrade.",
            ["reason"],
            registry=self.registry,
        )
        self._busy = Counter(
            "outrigger_requests_refused_busy",
            "Requests answered 503 because the bytes of request bodies held at once were at "
            "their budget (large bodies only).",
            registry=self.registry,
        )
        self._events = Counter(
            "outrigger_events",
            "Decisions worth a Kubernetes Event on the pod's owner, by what became of them: "
            "sent (created or updated), aggregated (the same reason for the same owner within "
            "a minute: counted in the next one), dropped (the queue full: the API slow), "
            "failed (the API refused or was unreachable).",
            ["result"],
            registry=self.registry,
        )
        self._event_children = {
            result: self._events.labels(result=result) for result in get_args(EventResult)
        }
        # That version, for the decision log; "" until published (or when not published).
        self.compiled_version = ""
        self._review_children: dict[tuple[str, str], Any] = {}
        self._sidecar_children: dict[str, Any] = {}
        for outcome, reason in _EXPECTED_SERIES:  # exist from the start, at 0
            self._review_child(outcome, reason)
        self._policy: Callable[[], Policy] | None = None
        self.registry.register(_PolicyInfoCollector(self))

    def observe_review(
        self, outcome: str, reason: str, sidecars: tuple[str, ...], seconds: float
    ) -> None:
        """One answered review (children are bound once per label set: the hot path)."""
        self._review_child(outcome, reason).inc()
        for sidecar in sidecars:
            child = self._sidecar_children.get(sidecar)
            if child is None:
                child = self._sidecar_children[sidecar] = self._sidecars.labels(sidecar=sidecar)
            child.inc()
        self._duration.observe(seconds)

    def _review_child(self, outcome: str, reason: str) -> Any:
        child = self._review_children.get((outcome, reason))
        if child is None:
            child = self._reviews.labels(outcome=outcome, reason=reason)
            self._review_children[(outcome, reason)] = child
        return child

    def follow_policy(self, policy: Callable[[], Policy]) -> None:
        """Report `policy()`'s version at each scrape, so it can never lag behind a reload."""
        self._policy = policy

    def policy_in_force(self) -> Policy | None:
        return self._policy() if self._policy is not None else None

    def count_reload(self, result: ReloadResult) -> None:
        self._reloads.labels(result=result).inc()

    def count_policy_watch(self, reason: WatchRestart) -> None:
        self._policy_watch.labels(reason=reason).inc()

    def count_self_tls(self, result: SelfTLSResult) -> None:
        self._self_tls.labels(result=result).inc()

    def count_compiled_policy_sync(self, result: CompiledPolicyResult) -> None:
        self._compiled_syncs.labels(result=result).inc()

    def set_compiled_policy(self, version: str, parts: tuple[str, str]) -> None:
        """The compiled policy now in the API server: one series, the last published."""
        self._compiled_info.clear()
        conditions, guard = parts
        self._compiled_info.labels(version, conditions, guard).set(1)
        self.compiled_version = version

    def follow_connections(self, count: Callable[[], int]) -> None:
        """Report `count()` as the open connections at each scrape."""
        self._connections.set_function(count)

    def count_connection_closed(self, reason: ConnectionClosed) -> None:
        self._connections_closed.labels(reason=reason).inc()

    def count_busy(self) -> None:
        self._busy.inc()

    def count_event(self, result: EventResult) -> None:
        self._event_children[result].inc()

    def set_certificate_expiry(self, not_after: datetime.datetime) -> None:
        self._certificate_expiry.set(not_after.timestamp())

    def exposition(self) -> bytes:
        """Every metric in this registry, in the Prometheus text format (`TEXT_FORMAT`)."""
        return generate_latest(self.registry)


class _PolicyInfoCollector:
    """Collects `outrigger_policy_info` from the policy in force at scrape time.

    Computed when scraped rather than set at each swap: there is no moment at which the
    reported version and the served one differ, and an app built around any policy callable
    (not only a reloading `PolicyFile`) reports correctly.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        yield InfoMetricFamily(_POLICY_INFO, _POLICY_INFO_HELP, labels=["version"])

    def collect(self) -> Iterator[Metric]:
        policy = self._metrics.policy_in_force()
        if policy is not None:
            yield InfoMetricFamily(
                _POLICY_INFO, _POLICY_INFO_HELP, value={"version": policy.version}
            )
