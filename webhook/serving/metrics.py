"""Prometheus metrics of the webhook: every review by outcome and reason, the sidecars
injected, the reviews' own duration, policy reloads, the policy in force, the certificate.

Each `Metrics` has a registry of its own rather than prometheus-client's global one, so that
several apps (tests, or an embedding program) never clash over metric names and each `/metrics`
shows exactly its app's state. Per review the cost is a few increments of plain counts on the
event loop (`ReviewTally`: 0.6 us in process), measured with `make bench`
(docs/operators/performance.md).
Label sets are bounded: outcomes and reasons are fixed words, sidecars the policy's templates.
"""

from __future__ import annotations

import datetime
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from itertools import accumulate
from typing import Final, Literal, cast, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString as _untyped_go_float

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
DURATION_BUCKETS: Final = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
)  # fmt: skip
_EXPECTED_SERIES: Final = (
    ("injected", "injected"),
    ("unchanged", "not-requested"),
    ("denied", "invalid-annotation"),
    ("bad_request", "malformed"),
    ("error", "internal"),
)
_REVIEWS: Final = "outrigger_admission_reviews"
_REVIEWS_HELP: Final = (
    "AdmissionReviews answered, by outcome (injected, unchanged, denied, bad_request, error) "
    "and reason."
)
_SIDECARS: Final = "outrigger_sidecars_injected"
_SIDECARS_HELP: Final = "Sidecars injected into pods, by sidecar template."
_DURATION: Final = "outrigger_admission_review_duration_seconds"
_DURATION_HELP: Final = (
    "Time the webhook spent on a review (decoding, deciding, building, encoding)."
)
_POLICY_INFO: Final = "outrigger_policy"  # exposed as outrigger_policy_info{version="..."} 1
_POLICY_INFO_HELP: Final = "The policy in force; its version is recorded in the status annotation."
# What `generate_latest` writes, as prometheus-client's own server labels it when the scraper
# asks for nothing newer (its CONTENT_TYPE_LATEST is 1.0.0 in recent releases, 0.0.4 in older).
TEXT_FORMAT: Final = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The webhook's metrics, in a dedicated registry; thread-safe (the poller runs in a
    thread), but for `observe_review`, which the event loop alone calls."""

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
        # The per-review series: counted without locks on the event loop (`ReviewTally`).
        self._tally = ReviewTally()
        self.registry.register(_ReviewCollector(self._tally))
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
        self._policy: Callable[[], Policy] | None = None
        self.registry.register(_PolicyInfoCollector(self))

    def observe_review(
        self, outcome: str, reason: str, sidecars: tuple[str, ...], seconds: float
    ) -> None:
        """One answered review; on the event loop only (`ReviewTally`)."""
        self._tally.observe(outcome, reason, sidecars, seconds)

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


class ReviewTally:
    """The reviews by outcome and reason, the sidecars injected, the reviews' durations.

    Every review is accounted for on the event loop (`AdmissionEndpoint.account`), so these
    are plain counts, without the lock that prometheus-client takes per increment (four
    per review: 2.7 us in process, 0.6 us here), read at scrape time (`_ReviewCollector`,
    which copies each before reading it). Series appear at their first count, with the time
    as their `_created`; the expected outcomes exist from the start, at 0."""

    def __init__(self) -> None:
        now = time.time()
        self.reviews: dict[tuple[str, str], int] = dict.fromkeys(_EXPECTED_SERIES, 0)
        self.sidecars: dict[str, int] = {}
        self.reviews_created: dict[tuple[str, str], float] = dict.fromkeys(_EXPECTED_SERIES, now)
        self.sidecars_created: dict[str, float] = {}
        self.created = now
        # Per bucket (the last: above the largest bound), not cumulative; their sum is the count.
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.seconds = 0.0

    def observe(self, outcome: str, reason: str, sidecars: tuple[str, ...], seconds: float) -> None:
        key = (outcome, reason)
        reviews = self.reviews
        if key in reviews:
            reviews[key] += 1
        else:
            self.reviews_created[key] = time.time()
            reviews[key] = 1
        for sidecar in sidecars:
            if sidecar in self.sidecars:
                self.sidecars[sidecar] += 1
            else:
                self.sidecars_created[sidecar] = time.time()
                self.sidecars[sidecar] = 1
        self.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1  # `le`: a bound's own
        self.seconds += seconds


class _ReviewCollector:
    """`outrigger_admission_reviews`, `outrigger_sidecars_injected` and
    `outrigger_admission_review_duration_seconds`, as prometheus-client's Counter and
    Histogram would expose them, from a `ReviewTally`."""

    def __init__(self, tally: ReviewTally) -> None:
        self._tally = tally

    def collect(self) -> Iterator[Metric]:
        tally = self._tally
        reviews = CounterMetricFamily(_REVIEWS, _REVIEWS_HELP, labels=["outcome", "reason"])
        for (outcome, reason), count in list(tally.reviews.items()):
            created = tally.reviews_created[(outcome, reason)]
            reviews.add_metric([outcome, reason], count, created=created)
        yield reviews
        sidecars = CounterMetricFamily(_SIDECARS, _SIDECARS_HELP, labels=["sidecar"])
        for sidecar, count in list(tally.sidecars.items()):
            sidecars.add_metric([sidecar], count, created=tally.sidecars_created[sidecar])
        yield sidecars
        yield _histogram(list(tally.buckets), tally.seconds, tally.created)


# How prometheus-client writes a bucket's bound (`le`), as Go does.
_go_float = cast(Callable[[float], str], _untyped_go_float)


def _histogram(buckets: list[int], seconds: float, created: float) -> Metric:
    cumulative = list(accumulate(buckets))
    bounds = [*(_go_float(bound) for bound in DURATION_BUCKETS), "+Inf"]
    family = HistogramMetricFamily(_DURATION, _DURATION_HELP)
    family.add_metric([], list(zip(bounds, cumulative, strict=True)), seconds)
    family.add_sample(f"{_DURATION}_created", {}, created)
    return family


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
