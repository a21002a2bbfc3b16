"""The policy from a file that may change under the running server, such as a ConfigMap mount.

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

from webhook.core.policy import Policy, PolicyError, load_policy
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


class PolicyFile:
    """The policy loaded from `path`, replaced when the file's content changes and validates.

    Readers call `current()` without a lock: a reload swaps the new policy in with a single
    attribute assignment and a `Policy` is immutable, so a request sees the old policy or the
    new one, whole. A bad new version is rejected and the old policy keeps serving: a typo in a
    ConfigMap must not take the admission of every pod in the cluster down with it.

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
        self.metrics = Metrics() if metrics is None else metrics
        try:
            self._fingerprint = _settled(_fingerprint(path))
            self._digest = _digest(path)
        except OSError as error:
            raise PolicyError(f"cannot read policy {path}: {error}") from None
        self._policy = load_policy(path)
        self._rejected: str | None = None  # what was last rejected, so it is reported once

    def current(self) -> Policy:
        """The policy in force: the last good version of the file."""
        return self._policy

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
            digest = _digest(self.path)
        except OSError as error:
            self._reject(f"unreadable: {error}", f"cannot read policy {self.path}: {error}")
            return False
        if digest == self._digest:  # touched, or back to the version in force
            self._rejected = None
            return False
        if digest == self._rejected:
            return False
        try:
            policy = load_policy(self.path)
        except PolicyError as error:
            self._reject(digest, str(error))
            return False
        self._swap(policy, digest)
        return True

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

    def _swap(self, policy: Policy, digest: str) -> None:
        previous = self._policy.version
        self._policy = policy
        self._digest = digest
        self._rejected = None
        self.metrics.count_reload("success")
        log.info(
            "policy %s in force, reloaded from %s (was %s)", policy.version, self.path, previous
        )

    def _reject(self, key: str, reason: str) -> None:
        if key == self._rejected:
            return
        self._rejected = key
        self.metrics.count_reload("failure")
        log.error(
            "rejected a new version of %s; policy %s stays in force: %s",
            self.path,
            self._policy.version,
            reason,
        )


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


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
