"""Prometheus metrics of the webhook itself: policy reloads, the policy in force, the certificate.

Each `Metrics` has a registry of its own rather than prometheus-client's global one, so that
several apps (tests, or an embedding program) never clash over metric names and each `/metrics`
shows exactly its app's state.

Nothing here is touched per admission request: `/mutate` is the benchmarked hot path (README,
"Performance"). An increment of a pre-bound counter costs about 0.5 us there, cheap enough,
but it would have to live in `AdmissionEndpoint`; request rates and latencies are better taken
from the API server's own webhook metrics (`apiserver_admission_webhook_*`). What is counted
here happens at most once per policy poll.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import InfoMetricFamily, Metric

from webhook.core.policy import Policy

ReloadResult = Literal["success", "failure"]
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
        self._policy: Callable[[], Policy] | None = None
        self.registry.register(_PolicyInfoCollector(self))

    def follow_policy(self, policy: Callable[[], Policy]) -> None:
        """Report `policy()`'s version at each scrape, so it can never lag behind a reload."""
        self._policy = policy

    def policy_in_force(self) -> Policy | None:
        return self._policy() if self._policy is not None else None

    def count_reload(self, result: ReloadResult) -> None:
        self._reloads.labels(result=result).inc()

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
