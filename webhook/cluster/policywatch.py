"""The policy from its ConfigMap through the API (`outrigger serve --policy-configmap NS/NAME`),
as client-go's reflector follows an object: a list, then a watch from the list's
resourceVersion, both on that one object (a `metadata.name` field selector).

- ADDED, MODIFIED: the policy key's content is offered to the `PolicySlot`, which applies a
  valid version at once and rejects a bad one (logged, counted), the old one serving on.
- BOOKMARK (asked for with allowWatchBookmarks): only the resourceVersion moves on, so that a
  watch renewed after a quiet hour does not start from a compacted version.
- DELETED: the policy in force stays (logged); a ConfigMap created again is applied.
- ERROR with 410 Gone (the resourceVersion is too old): list again, then watch.
- The stream ends (the server's timeoutSeconds, a dropped connection): watch again from the
  last resourceVersion; after a failure, back off up to 30 s.

Every replica sees a change within the API server's watch latency (milliseconds), against
about a minute for a ConfigMap volume. The RBAC this needs: get, list and watch on configmaps
with resourceNames [NAME] (the API server authorizes a list or watch with a `metadata.name`
field selector by that name).

The watch runs in a daemon thread: it blocks on a streaming read, which a shutdown must not wait
for, nor can interrupt (closing a response another thread reads from waits for that read), so
a stopping server leaves it behind; the PolicySlot's swap is one attribute assignment, safe
from any thread.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from webhook.cluster.apicalls import failure, retry_until
from webhook.cluster.registration import one_line
from webhook.serving.metrics import Metrics
from webhook.serving.reload import PolicySlot

log = logging.getLogger("outrigger.policywatch")

WATCH_SECONDS = 300  # asked of the API server per watch; it ends the stream then, we renew it
CONNECT_TIMEOUT = 5.0
MAX_BACKOFF = 30.0
MIN_WATCH_SECONDS = 1.0  # a watch that ends sooner is not renewed before this
DEFAULT_KEY = "policy.yaml"


class PolicyWatchError(Exception):
    """A list or watch that failed; the message is one line."""


@dataclass(frozen=True)
class Step:
    """What one list answer or watch event means for the watch."""

    resource_version: str | None  # where the next watch starts; None: list again
    content: bytes | None = None  # a version of the policy to offer
    problem: str = ""  # a version that cannot be offered (say it once)
    note: str = ""  # worth a log line


def from_list(answer: Mapping[str, Any], name: str, key: str) -> Step:
    """The step for a ConfigMapList answer (the field selector leaves at most our object)."""
    version = str((answer.get("metadata") or {}).get("resourceVersion") or "") or None
    items = [
        item
        for item in answer.get("items") or []
        if isinstance(item, dict) and (item.get("metadata") or {}).get("name") == name
    ]
    if not items:
        return Step(version, note=f"ConfigMap {name} does not exist")
    return _object_step(items[0], version, key)


def from_event(event: Mapping[str, Any], resource_version: str | None, key: str) -> Step:
    """The step for one watch event, given the resourceVersion the watch is at."""
    kind = event.get("type")
    obj = event.get("object") or {}
    version = str((obj.get("metadata") or {}).get("resourceVersion") or "") or resource_version
    if kind in ("ADDED", "MODIFIED"):
        return _object_step(obj, version, key)
    if kind == "BOOKMARK":
        return Step(version)
    if kind == "DELETED":
        return Step(version, note="the ConfigMap was deleted; the policy in force stays")
    if kind == "ERROR":
        code = obj.get("code")
        message = one_line(obj.get("message") or obj.get("reason") or "no message")
        if code == 410:  # Gone: too old a resourceVersion; a list gives a current one
            return Step(None, note=f"the watch expired ({message}); listing again")
        return Step(None, note=f"the watch failed: {code} {message}; listing again")
    return Step(resource_version, note=f"ignored a watch event of type {kind!r}")


def _object_step(obj: Mapping[str, Any], version: str | None, key: str) -> Step:
    data = obj.get("data") or {}
    if not isinstance(data, dict) or key not in data:
        keys = ", ".join(sorted(data)) if isinstance(data, dict) and data else "none"
        return Step(version, problem=f"the ConfigMap has no key {key!r} (its keys: {keys})")
    return Step(version, content=str(data[key]).encode("utf-8"))


class PolicyWatch:
    """The policy of one ConfigMap, kept current by a list and watch; see the module doc."""

    def __init__(
        self,
        namespace: str,
        name: str,
        configuration: Any,
        *,
        key: str = DEFAULT_KEY,
        metrics: Metrics | None = None,
        watch_seconds: int = WATCH_SECONDS,
    ) -> None:
        from kubernetes import client

        self.namespace, self.name, self.key = namespace, name, key
        self.metrics = Metrics() if metrics is None else metrics
        self.watch_seconds = watch_seconds
        self._core: Any = client.CoreV1Api(client.ApiClient(configuration))
        self._slot: PolicySlot | None = None
        self._version: str | None = None
        self._stop = threading.Event()

    @property
    def origin(self) -> str:
        return f"ConfigMap {self.namespace}/{self.name} ({self.key})"

    def start(self, timeout: float) -> PolicySlot:
        """The first version, listed (retried for up to `timeout` seconds while the API server
        is out of reach or the ConfigMap missing); a bad one raises `PolicyError`."""
        step = retry_until(timeout, self._first_version, PolicyWatchError, log)
        assert step.content is not None
        self._slot = PolicySlot(step.content, self.origin, self.metrics)
        self._version = step.resource_version
        log.info("policy %s from %s, watched", self._slot.current().version, self.origin)
        return self._slot

    def _first_version(self) -> Step:
        """A list that holds the policy; PolicyWatchError, naming the ConfigMap, if not."""
        try:
            step = self._list()
        except PolicyWatchError as error:
            raise PolicyWatchError(f"{self.origin}: {error}") from None
        if step.content is None:
            raise PolicyWatchError(f"{self.origin}: {step.problem or step.note}")
        return step

    def watching(self) -> AbstractAsyncContextManager[None]:
        """Watch in a daemon thread for the duration of the `async with` (the app's lifespan)."""

        @asynccontextmanager
        async def running() -> Any:
            thread = threading.Thread(target=self.run, name="outrigger policy watch", daemon=True)
            thread.start()
            try:
                yield
            finally:
                self.stop()

        return running()

    def stop(self) -> None:
        """No more lists or watches; an open stream is abandoned where it is."""
        self._stop.set()

    def run(self) -> None:
        """List when needed, watch, repeat, until `stop()`; a failure never ends it."""
        backoff = 0.0
        while not self._stop.is_set():
            try:
                if self._version is None:
                    self._apply(self._list())
                started = time.monotonic()
                self._watch()
                backoff = 0.0
                if time.monotonic() - started < MIN_WATCH_SECONDS:  # ended at once: no hot loop
                    self._stop.wait(MIN_WATCH_SECONDS)
            except PolicyWatchError as error:
                if self._stop.is_set():
                    return
                backoff = min(max(backoff * 2, 1.0), MAX_BACKOFF)
                self.metrics.count_policy_watch("error")
                log.error("%s: %s; retrying in %gs", self.origin, error, backoff)
                self._stop.wait(backoff)
            except Exception:
                log.exception("%s: the watch failed; retrying in %gs", self.origin, MAX_BACKOFF)
                self._stop.wait(MAX_BACKOFF)

    # One list, one watch ----------------------------------------------------------------------

    def _list(self) -> Step:
        answer = self._request("list", _request_timeout=(CONNECT_TIMEOUT, 30.0))
        try:
            listed = json.loads(answer.data)
        except (ValueError, AttributeError) as error:
            raise PolicyWatchError(f"the list answer is not JSON: {one_line(error)}") from None
        if not isinstance(listed, dict) or not isinstance(listed.get("items") or [], list):
            raise PolicyWatchError("the list answer is not a List")
        return from_list(listed, self.name, self.key)

    def _watch(self) -> None:
        """One watch stream from the current resourceVersion, until it ends."""
        response = self._request(
            "watch",
            watch=True,
            resource_version=self._version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.watch_seconds,
            # The server ends the stream after watch_seconds; a silent connection longer than
            # that is dead.
            _request_timeout=(CONNECT_TIMEOUT, self.watch_seconds + 30.0),
        )
        try:
            for line in _lines(response):
                if self._stop.is_set():
                    return
                event = json.loads(line)
                if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
                    raise PolicyWatchError(f"a watch event is not an object: {line[:80]!r}")
                self._apply(from_event(event, self._version, self.key))
                if self._version is None:  # expired or failed: list again
                    self.metrics.count_policy_watch("relisted")
                    return
            self.metrics.count_policy_watch("renewed")
        except ValueError as error:
            raise PolicyWatchError(f"a watch event is not JSON: {one_line(error)}") from None
        except OSError as error:  # the connection dropped
            raise PolicyWatchError(f"the watch stream broke: {one_line(error)}") from None
        finally:
            response.release_conn()

    def _apply(self, step: Step) -> None:
        self._version = step.resource_version
        if step.note:
            log.warning("%s: %s", self.origin, step.note)
        if self._slot is None:
            return
        if step.content is not None:
            self._slot.offer(step.content, self.origin)
        elif step.problem:
            self._slot.reject(f"problem: {step.problem}", self.origin, step.problem)

    def _request(self, what: str, **options: Any) -> Any:
        """The raw answer of a list (or, with `watch=True`, a watch) of our one ConfigMap."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return self._core.list_namespaced_config_map(
                self.namespace,
                field_selector=f"metadata.name={self.name}",
                _preload_content=False,
                **options,
            )
        except (ApiException, HTTPError, OSError) as error:
            raise PolicyWatchError(failure(f"{what} the ConfigMap", error)) from None


def _lines(response: Any) -> Iterator[str]:
    """The watch's events, one JSON document per line, as the chunks arrive."""
    from kubernetes.watch import watch
    from urllib3.exceptions import HTTPError

    lines: Any = watch.iter_resp_lines  # untyped in the client
    try:
        yield from lines(response)
    except HTTPError as error:  # a read timeout or a protocol error mid-stream
        raise OSError(one_line(error)) from None
