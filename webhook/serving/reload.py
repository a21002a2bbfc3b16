"""The policy that may change under the running server: `PolicySlot` holds the version in force
and takes new ones that validate, from a file that may change (`PolicyFile`, a ConfigMap
mount) or from the API (`webhook.cluster.policywatch`, a watch on the ConfigMap).

A ConfigMap mount is slow to follow: the kubelet refreshes it on its sync period plus its
cache's TTL (about a minute by default), so two replicas can serve different versions for
tens of seconds. The watch applies a change within a second on every replica.

kubelet updates a ConfigMap volume without ever writing the file in place: it writes a new
timestamped directory `..2026_11_27_10_00_00.123`, points a `..data_tmp` symlink at it, renames
that over `..data` and deletes the old directory; `policy.yaml` is a symlink to
`..data/policy.yaml`. inotify watches inodes, and on such a path it misses the swap or reports
it on the wrong name, so the file is polled instead: a `stat` of the resolved file each
interval, and a read and a hash only when that changed (or changed in the last two seconds,
see `_RACY_NS`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from webhook.core.policy import Policy, PolicyError, load_policy_text
from webhook.serving.background import running
from webhook.serving.metrics import Metrics

log = logging.getLogger("outrigger.reload")

# (device, inode, mtime, size) of the file the path resolves to: a new ConfigMap version is a
# new file (another inode), an in-place edit changes the mtime.
Fingerprint = tuple[int, int, int, int]
# Recorded instead of a fingerprint too recent to be trusted: matches no file, so the next poll
# reads the content again.
_RECHECK: Fingerprint = (-1, -1, -1, -1)
# A file modified this recently may be modified again within the same timestamp tick (coarse on
# most filesystems), with the same size, and look unchanged: git's "racily clean" problem.
_RACY_NS = 2_000_000_000


class PolicySlot:
    """The policy in force, replaced by offered versions that validate.

    Readers call `current()` without a lock: a swap is a single attribute assignment and a
    `Policy` is immutable, so a request sees the old policy or the new one, whole. A bad new
    version is rejected (logged once per content, counted) and the old policy keeps serving: a
    typo in a ConfigMap must not take the admission of every pod in the cluster down with it.
    """

    def __init__(self, content: bytes, origin: str, metrics: Metrics | None = None) -> None:
        """Load `content` now; raises `PolicyError`, so that a bad first version fails the start."""
        self.metrics = Metrics() if metrics is None else metrics
        self._policy = _parsed(content, origin)
        self._digest = _digest(content)
        self._rejected: str | None = None  # what was last rejected, so it is reported once

    def current(self) -> Policy:
        """The policy in force: the last good version offered."""
        return self._policy

    def offer(self, content: bytes, origin: str) -> bool:
        """Swap in the policy in `content` if it is new and valid; True when it was."""
        digest = _digest(content)
        if digest == self._digest:  # unchanged, or back to the version in force
            self._rejected = None
            return False
        if digest == self._rejected:
            return False
        try:
            policy = _parsed(content, origin)
        except PolicyError as error:
            self.reject(digest, origin, str(error))
            return False
        previous = self._policy.version
        self._policy, self._digest, self._rejected = policy, digest, None
        self.metrics.count_reload("success")
        log.info("policy %s in force, reloaded from %s (was %s)", policy.version, origin, previous)
        return True

    def reject(self, key: str, origin: str, reason: str) -> None:
        """Report a version that cannot be used (once per `key`); the policy in force stays."""
        if key == self._rejected:
            return
        self._rejected = key
        self.metrics.count_reload("failure")
        log.error(
            "rejected a new version of %s; policy %s stays in force: %s",
            origin,
            self._policy.version,
            reason,
        )


class PolicyFile:
    """The policy loaded from `path`, replaced when the file's content changes and validates.

    The poller is an asyncio task bound to the app's lifespan (`watching()`) rather than a daemon
    thread: it starts with the server and is cancelled and awaited at its graceful shutdown, so
    it never outlives an app (the tests start several). Each poll's file work (stat, read, hash,
    YAML parsing and validation) runs in a worker thread through `asyncio.to_thread`, so the
    event loop serving `/mutate` never waits on the filesystem.
    """

    def __init__(
        self, path: Path, *, interval: float = 5.0, metrics: Metrics | None = None
    ) -> None:
        """Load the policy now; raises `PolicyError`, so that a bad file fails the start."""
        if not 0 < interval < float("inf"):
            raise ValueError(f"poll interval must be a positive number of seconds, not {interval}")
        self.path = path
        self.interval = interval
        try:
            self._fingerprint = _settled(_fingerprint(path))
            content = path.read_bytes()
        except OSError as error:
            raise PolicyError(f"cannot read policy {path}: {error}") from None
        self.slot = PolicySlot(content, str(path), metrics)
        self.metrics = self.slot.metrics

    def current(self) -> Policy:
        """The policy in force: the last good version of the file."""
        return self.slot.current()

    def check(self) -> bool:
        """Reload if the file's content changed; True when a new policy was swapped in.

        The order (fingerprint, then content, then load) makes a change that races with a check
        harmless: it changes the fingerprint after the one recorded, so the next check sees it.
        """
        fingerprint = _fingerprint(self.path)
        if fingerprint == self._fingerprint:
            return False
        self._fingerprint = _settled(fingerprint)
        try:
            content = self.path.read_bytes()
        except OSError as error:
            self.slot.reject(f"unreadable: {error}", str(self.path), f"cannot read it: {error}")
            return False
        return self.slot.offer(content, str(self.path))

    async def poll(self) -> None:
        """Check every `interval` seconds until cancelled; an unexpected error never stops it."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await asyncio.to_thread(self.check)
            except Exception:
                log.exception("cannot check policy %s; retrying in %ss", self.path, self.interval)

    def watching(self) -> AbstractAsyncContextManager[None]:
        """Poll in the background for the duration of the `async with` (the app's lifespan)."""
        return running(self.poll(), f"outrigger policy poll {self.path}")


def _fingerprint(path: Path) -> Fingerprint | None:
    """A cheap change detector of the file `path` resolves to; None when it cannot be stat'ed."""
    try:
        stat = os.stat(path)  # follows the symlinks to the current ..data version
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _settled(fingerprint: Fingerprint | None) -> Fingerprint | None:
    """The fingerprint to compare the next one with: `_RECHECK` while the mtime is too recent."""
    if fingerprint is not None and time.time_ns() - fingerprint[2] < _RACY_NS:
        return _RECHECK
    return fingerprint


def _digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _parsed(content: bytes, origin: str) -> Policy:
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PolicyError(f"cannot read policy {origin}: {error}") from None
    return load_policy_text(text, origin)
