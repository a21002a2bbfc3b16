"""Kubernetes Events for the decisions a person should see and might not.

The warnings and denials the webhook returns reach whoever created the pod: for a
Deployment's pods that is the ReplicaSet controller, which drops them. So a denial, an answer
with warnings (a sidecar skipped on a hostNetwork or Windows pod, an opt-out of a required
sidecar, a value taken at its bound...) and an injection by a replica whose policy differs
from the one published to the API server become an Event on the pod's controlling owner (the
ReplicaSet, Job, StatefulSet...: a denied pod never exists), where `kubectl describe` and
`kubectl events` show them.

Never on the review's path: `note` (called on the event loop once the review is answered)
only decides and queues; one task sends, from a worker thread. Bounded everywhere: the same
reason for the same owner is sent at most once per `WINDOW_SECONDS` (occurrences in between
are counted into the next one, as the Event's `count`); the queue holds `QUEUE_SIZE` Events
and drops the rest, counted, when the API server is slow; the memory of recent keys holds
`KEYS` entries. Never for dry-run requests (`kubectl apply --dry-run=server` must leave no
trace). Core v1 Events, named after the owner and the reason so that a repeat updates its
`count` and `lastTimestamp` rather than making a new object. At most `SEND_RATE` Events a
second are sent (after a burst of `SEND_BURST`): what a flood of denials across many owners
costs the process is bounded, and the rest is dropped, counted.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from webhook.admission.review import AdmissionRequest, OwnerReference, Verdict
from webhook.cluster.apicalls import CallFailed, json_answer
from webhook.serving.logs import Throttled
from webhook.serving.metrics import Metrics

log = logging.getLogger("outrigger.events")
WINDOW_SECONDS = 60.0
QUEUE_SIZE = 256
KEYS = 4096
MESSAGE_CHARACTERS = 1024  # the API server accepts more; a reader wants less
CALL_SECONDS = 5.0
# Events sent per second at most, all owners together, after a burst (client-go's recorder
# limits per object; here a flood of pods of many owners must not cost the reviews CPU).
SEND_RATE = 5.0
SEND_BURST = 20
COMPONENT = "outrigger"

DENIED = "InjectionDenied"
WARNED = "InjectionWarning"
POLICY_MISMATCH = "PolicyVersionMismatch"


@dataclass(frozen=True)
class EventNote:
    """One Event to create or update: what happened to whose pods, and how often so far."""

    namespace: str
    owner: OwnerReference
    reason: str
    message: str
    count: int


@dataclass
class _Recent:
    sent_at: float
    total: int  # occurrences since the first, the Event's count
    pending: int = 0  # since the last one sent


def event_reasons(verdict: Verdict, policy_version: str, compiled_version: str) -> tuple[str, ...]:
    """The reason of each Event a decision is worth (most are worth none)."""
    if verdict.outcome in ("denied", "error"):
        reasons: tuple[str, ...] = (DENIED,)
    elif verdict.warnings:
        reasons = (WARNED,)
    else:
        reasons = ()
    if verdict.outcome == "injected" and compiled_version and compiled_version != policy_version:
        reasons += (POLICY_MISMATCH,)
    return reasons


def event_message(reason: str, verdict: Verdict, policy_version: str, compiled: str) -> str:
    """What the Event of `reason` says (made only for those sent, not for their repeats)."""
    if reason == DENIED:
        return f"pod denied ({verdict.reason}): {verdict.message}"
    if reason == WARNED:
        return "; ".join(verdict.warnings)
    return (
        f"injected under policy {policy_version}, while the API server's conditions come "
        f"from policy {compiled}: a replica has not loaded the policy in force"
    )


class EventAggregator:
    """Which decisions become Events now: at most one per (namespace, owner, reason) per
    window, the ones in between counted into the next. Pure bookkeeping, on the event loop."""

    def __init__(self, clock: Callable[[], float], window: float = WINDOW_SECONDS) -> None:
        self._clock = clock
        self._window = window
        self._recent: OrderedDict[tuple[str, str, str], _Recent] = OrderedDict()

    def note(
        self, request: AdmissionRequest | None, verdict: Verdict, policy: str, compiled: str
    ) -> tuple[list[EventNote], int]:
        """The Events to send for this decision, and how many were held back (aggregated)."""
        if request is None or request.dry_run or request.owner_reference is None:
            return [], 0
        notes, held = [], 0
        for reason in event_reasons(verdict, policy, compiled):
            if self._admit(request.namespace, request.owner_reference, reason) is None:
                held += 1
            else:
                message = event_message(reason, verdict, policy, compiled)
                notes.append(self._note(request, reason, message[:MESSAGE_CHARACTERS]))
        return notes, held

    def _admit(self, namespace: str, owner: OwnerReference, reason: str) -> _Recent | None:
        """The owner's record for `reason`, updated for a send now; None for a repeat within
        the window (counted into the next send)."""
        key = (namespace, owner.uid, reason)
        now = self._clock()
        recent = self._recent.get(key)
        if recent is None:
            recent = self._recent[key] = _Recent(now, 0)
            if len(self._recent) > KEYS:
                self._recent.popitem(last=False)  # the oldest key: at worst an early repeat
        elif now - recent.sent_at < self._window and recent.total:
            recent.pending += 1
            return None
        recent.total += recent.pending + 1
        recent.pending, recent.sent_at = 0, now
        self._recent.move_to_end(key)
        return recent

    def _note(self, request: AdmissionRequest, reason: str, message: str) -> EventNote:
        assert request.owner_reference is not None
        owner = request.owner_reference
        total = self._recent[(request.namespace, owner.uid, reason)].total
        return EventNote(request.namespace, owner, reason, message, total)


class EventRecorder:
    """`observe` for the server (`webhook.serving.server.DecisionSink`), `running` beside it."""

    def __init__(
        self,
        send: Callable[[EventNote], None],
        metrics: Metrics,
        *,
        clock: Callable[[], float] | None = None,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self._send = send
        self._metrics = metrics
        self._aggregator = EventAggregator(clock or time.monotonic)
        self._queue: asyncio.Queue[EventNote] = asyncio.Queue(maxsize=queue_size)
        self._dropped = Throttled(
            "Events queue full (%d): the API server is slow; dropped %d Event(s) since the "
            "last such line"
        )
        self._failed = Throttled("cannot record an Event: %s (%d since the last such line)")

    def observe(
        self, request: AdmissionRequest | None, verdict: Verdict, policy: str, compiled: str
    ) -> None:
        if verdict.outcome == "unchanged" and not verdict.warnings:
            return  # the common answer: nothing to tell, nothing to look up
        if self._queue.full():  # a flood: dropped before any bookkeeping, which costs more
            if request is not None and request.owner_reference and not request.dry_run:
                self._drop()
            return
        notes, held = self._aggregator.note(request, verdict, policy, compiled)
        for _ in range(held):
            self._metrics.count_event("aggregated")
        for note in notes:
            if self._queue.full():
                self._drop()
            else:
                self._queue.put_nowait(note)

    def _drop(self) -> None:
        self._metrics.count_event("dropped")
        self._dropped.note(self._queue.maxsize)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        task = asyncio.create_task(self._sending())
        try:
            yield
        finally:
            task.cancel()

    async def _sending(self) -> None:
        bucket = TokenBucket(SEND_RATE, SEND_BURST)
        while True:
            note = await self._queue.get()
            await asyncio.sleep(bucket.wait())
            try:
                await asyncio.to_thread(self._send, note)
                self._metrics.count_event("sent")
            except CallFailed as error:
                self._metrics.count_event("failed")
                self._failed.note(error)


class TokenBucket:
    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate, self._burst, self._clock = rate, float(burst), clock
        self._tokens, self._at = float(burst), clock()

    def wait(self) -> float:
        """Seconds to wait before the next send (0 while the burst lasts); takes its token."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        self._tokens -= 1
        return max(0.0, -self._tokens / self._rate)


class EventSender:
    """Creates or updates core v1 Events through the API (create, patch on events)."""

    def __init__(self, configuration: Any) -> None:
        from kubernetes import client

        self._api: Any = client.CoreV1Api(client.ApiClient(configuration))
        self._instance = socket.gethostname()

    def __call__(self, note: EventNote) -> None:
        name = event_name(note.owner, note.reason)
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if note.count > 1:
            patch = {"count": note.count, "lastTimestamp": now, "message": note.message}
            if self._patch(name, note.namespace, patch) is not None:
                return
        body = self._event(note, name, now)
        try:
            json_answer(
                "create an Event",
                lambda: self._api.create_namespaced_event(
                    note.namespace, body, _preload_content=False, _request_timeout=CALL_SECONDS
                ),
            )
        except CallFailed as error:
            if error.status != 409:
                raise
            # Made before this process forgot the owner (a restart, or its memory of recent
            # owners full): brought up to date, its count left as it was.
            self._patch(name, note.namespace, {"lastTimestamp": now, "message": note.message})

    def _patch(self, name: str, namespace: str, patch: dict[str, Any]) -> Any:
        """The patched Event, or None when there is none by that name (deleted, expired)."""
        return json_answer(
            "update an Event",
            lambda: self._api.patch_namespaced_event(
                name, namespace, patch, _preload_content=False, _request_timeout=CALL_SECONDS
            ),
            absent_ok=True,
        )

    def _event(self, note: EventNote, name: str, now: str) -> dict[str, Any]:
        owner = note.owner
        return {
            "metadata": {"name": name, "namespace": note.namespace},
            "involvedObject": {
                "apiVersion": owner.api_version,
                "kind": owner.kind,
                "name": owner.name,
                "namespace": note.namespace,
                "uid": owner.uid,
            },
            "reason": note.reason,
            "message": note.message,
            "type": "Warning",
            "count": note.count,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "source": {"component": COMPONENT, "host": self._instance},
        }


def event_name(owner: OwnerReference, reason: str) -> str:
    """One Event per owner and reason (a repeat updates it): the owner's name (cut to leave
    room), and a digest of its uid and the reason, as kubelet names its Events."""
    digest = hashlib.sha256(f"{owner.uid}/{reason}".encode()).hexdigest()[:16]
    return f"{owner.name[:200]}.{digest}"
