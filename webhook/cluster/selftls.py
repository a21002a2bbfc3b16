"""`outrigger serve --tls-source self`: the webhook keeps its own CA and serving certificate in
a Secret of its namespace and publishes the CA in its own MutatingWebhookConfiguration, as
Vault's injector and Kyverno do. Nothing in the chart's rendered output changes between
renders, so GitOps tools stay in sync.

Each replica syncs at start and then every `interval` seconds:

1. It reads the Secret and asks `webhook.serving.authority.plan` what to do. A bundle that must
   change is written: created when absent, updated with the resourceVersion just read
   otherwise. The API server accepts one write per resourceVersion, so when replicas race
   (several starting at once, or renewing at once) one wins; the others get 409
   (AlreadyExists, Conflict), read again and adopt the winner's bundle: they all serve one CA.
   A Secret deleted or spoiled under a running replica is written back from its memory.
   The Secret belongs to the webhook configuration (an ownerReference, see `owner_references`):
   when the configuration is deleted (`helm uninstall`), the garbage collector deletes the
   Secret too, and a replica still running does not write it back until a configuration of
   that name exists again.
2. It publishes the Secret's CAs as the `caBundle` of every webhook of the configuration, with
   a JSON patch that first tests each webhook's name at its index.
3. It writes `ca.crt`, `tls.crt` and `tls.key` into the certificate directory the way the
   kubelet updates a Secret volume (a new directory, then one symlink swapped), so that the
   server's `ServingCertificate` reloads a consistent pair without dropping a connection.

The configuration is read first in each round: its uid goes into the Secret's ownerReference
and its webhooks get the caBundle.

The RBAC this needs: get, update and delete on that Secret (by name; delete only because the
OwnerReferencesPermissionEnforcement admission plugin, on by default in OpenShift, lets only
those who may delete an object change its ownerReferences), create on Secrets (the API cannot
limit a create by name), get and patch on that MutatingWebhookConfiguration (by name).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from webhook.cluster.apicalls import CallFailed, json_answer, retry_until
from webhook.serving.authority import Action, Bundle, BundleError, Settings, carry_out, plan
from webhook.serving.background import running
from webhook.serving.certs import CA_CERT, SERVING_CERT, SERVING_KEY
from webhook.serving.metrics import Metrics, SelfTLSResult

log = logging.getLogger("outrigger.selftls")

REQUEST_TIMEOUT = (5.0, 10.0)  # connect, read (seconds) of each API call
CONFLICT_ATTEMPTS = 5
RETRY_SECONDS = 5.0  # the next sync after a failed or unpublished one, at the latest
FIELD_MANAGER = "outrigger"
REASON_ANNOTATION = "outrigger.dev/tls-reason"
OWNER_API_VERSION = "admissionregistration.k8s.io/v1"
OWNER_KIND = "MutatingWebhookConfiguration"
_JSON = {"Content-Type": "application/json"}
_JSON_PATCH = {"Content-Type": "application/json-patch+json"}
_SERVED_FILES = (CA_CERT, SERVING_KEY, SERVING_CERT)


class SelfTLSError(Exception):
    """A sync that could not be done; the message is one line."""


class _Lost(Exception):
    """Another replica wrote the Secret first (409), or it was deleted since it was read."""


class _Refused(Exception):
    """The API server refused a write (403); the message says what and why."""


@dataclass(frozen=True)
class Target:
    """Where the bundle is kept and whose caBundle it goes to."""

    namespace: str
    secret: str
    webhook: str  # the MutatingWebhookConfiguration's name


@dataclass(frozen=True)
class Owner:
    """The webhook configuration the Secret belongs to: the garbage collector deletes the
    Secret once no object of this name and uid exists."""

    name: str
    uid: str

    @property
    def reference(self) -> dict[str, str]:
        """The Secret's ownerReference to it (neither `controller` nor `blockOwnerDeletion`:
        the latter would need rights on the configuration's finalizers)."""
        return {
            "apiVersion": OWNER_API_VERSION,
            "kind": OWNER_KIND,
            "name": self.name,
            "uid": self.uid,
        }


@dataclass(frozen=True)
class _Stored:
    bundle: Bundle | None  # None: absent or unusable
    resource_version: str | None  # None: absent
    secret_type: str
    problem: str
    references: tuple[Any, ...] = ()  # its ownerReferences
    reason: str = ""  # its REASON_ANNOTATION


def now_utc() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class SelfManagedTLS:
    """Keeps the Secret, the caBundle and the served files in step; see the module doc."""

    def __init__(
        self,
        target: Target,
        settings: Settings,
        cert_dir: Path,
        configuration: Any,
        *,
        interval: float = 60.0,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime.datetime] = now_utc,
    ) -> None:
        from kubernetes import client

        if not 0 < interval < float("inf"):
            raise ValueError(f"sync interval must be a positive number of seconds, not {interval}")
        self.target, self.settings, self.cert_dir = target, settings, cert_dir
        self.interval = interval
        self.metrics = Metrics() if metrics is None else metrics
        self._clock = clock
        api_client = client.ApiClient(configuration)
        # Bodies are plain dicts and answers raw JSON (as in `outrigger audit`), not models.
        self._core: Any = client.CoreV1Api(api_client)
        self._admission: Any = client.AdmissionregistrationV1Api(api_client)
        self._bundle: Bundle | None = None  # the one last settled: what this replica serves
        self._published = False  # by the last round

    # The sync ---------------------------------------------------------------------------------

    def sync(self) -> bool:
        """One round: read the webhook configuration, settle the Secret (owned by it), publish
        its CAs, write the served files. False when the CAs could not be published (no webhook
        configuration yet)."""
        try:
            configuration = self._read_configuration()
            bundle, result = self._settle(owner_of(configuration))
        except SelfTLSError:
            self.metrics.count_self_tls("error")
            raise
        self._bundle = bundle
        self._published = False
        try:
            published = self._publish(bundle, configuration)
        except SelfTLSError:
            self.metrics.count_self_tls("error")
            raise
        finally:  # what the Secret holds is served, published or not: it is retried
            self._write_files(bundle)
        self._published = published
        self.metrics.count_self_tls(result if published else "unpublished")
        return published

    def start(self, timeout: float) -> None:
        """Sync until the first success, retried for up to `timeout` seconds; raises the last
        `SelfTLSError`."""
        retry_until(timeout, self.sync, SelfTLSError, log)

    async def run(self) -> None:
        """Sync every `interval` seconds until cancelled; a failure never stops it. After a
        failed or unpublished round the next comes sooner (at most RETRY_SECONDS later): at
        install the webhook configuration may be created just after the pods start."""
        retry = min(self.interval, RETRY_SECONDS)
        delay = self.interval if self._published else retry  # after the start's round
        while True:
            await asyncio.sleep(delay)
            delay = retry
            try:
                if await asyncio.to_thread(self.sync):
                    delay = self.interval
            except SelfTLSError as error:
                log.error("%s; the certificate in use stays, retrying in %gs", error, delay)
            except Exception:
                log.exception("self-managed TLS sync failed; retrying in %gs", delay)

    def watching(self) -> AbstractAsyncContextManager[None]:
        """Sync in the background for the duration of the `async with` (the app's lifespan)."""
        return running(self.run(), f"outrigger self-managed TLS {self.target.secret}")

    # The Secret -------------------------------------------------------------------------------

    def _settle(self, owner: Owner | None) -> tuple[Bundle, SelfTLSResult]:
        """The bundle in force after this round, and what happened (kept, issued, adopted).
        The Secret is written when its bundle must change or its ownerReferences must name
        `owner` (None: the configuration does not exist)."""
        for _ in range(CONFLICT_ATTEMPTS):
            stored = self._read_secret()
            now = self._clock()
            turn = take_turn(
                stored.bundle, stored.problem, self._bundle, self.settings, now,
                owner_exists=owner is not None,
            )  # fmt: skip
            references = owner_references(stored.references, owner)
            if not turn.write and references == stored.references:
                return turn.bundle, self._served(turn, stored)
            reason = turn.reason if turn.write else stored.reason or turn.reason
            try:
                references = self._write_owned(turn, stored, reason, references)
            except _Lost:
                log.info(
                    "another replica wrote Secret %s first (or it was deleted); reading it",
                    self._where,
                )
                continue
            if not turn.write:
                if references != stored.references:
                    log.info(
                        "Secret %s now belongs to mutatingwebhookconfiguration %s: deleted with it",
                        self._where,
                        self.target.webhook,
                    )
                return turn.bundle, self._served(turn, stored)
            log.info("wrote Secret %s (%s): %s", self._where, turn.action.value, turn.reason)
            return turn.bundle, "issued"
        raise SelfTLSError(
            f"Secret {self._where}: still conflicting after {CONFLICT_ATTEMPTS} attempts"
        )

    def _write_owned(
        self, turn: Turn, stored: _Stored, reason: str, references: tuple[Any, ...]
    ) -> tuple[Any, ...]:
        """Write the Secret with `references`, and return the references written. Where the
        API server refuses to change them (OwnerReferencesPermissionEnforcement: only who may
        delete the Secret may), the certificate matters more than the uninstall: the Secret
        keeps the references it has (the bundle, if it must change, is written with them),
        and the log says what to grant."""
        try:
            self._write_secret(turn.bundle, stored, reason, references)
            return references
        except _Refused as refused:
            if references == stored.references:
                raise SelfTLSError(str(refused)) from None
            log.warning(
                "%s; the Secret stays without its owner (helm uninstall will leave it behind): "
                "grant delete on it, as the chart's Role does",
                refused,
            )
        if turn.write:
            try:
                self._write_secret(turn.bundle, stored, reason, stored.references)
            except _Refused as refused:
                raise SelfTLSError(str(refused)) from None
        return stored.references

    def _served(self, turn: Turn, stored: _Stored) -> SelfTLSResult:
        """Kept or adopted: a turn that wrote no bundle, said in the log when it matters."""
        if stored.resource_version is None:  # gone, and its configuration with it
            log.warning(
                "Secret %s was deleted with mutatingwebhookconfiguration %s (uninstalled?); "
                "serving the certificate in use, written back once the configuration exists",
                self._where,
                self.target.webhook,
            )
        adopted = self._bundle is not None and turn.bundle.data() != self._bundle.data()
        if adopted:
            log.info("serving certificate from Secret %s: %s", self._where, turn.reason)
        return "adopted" if adopted else "kept"

    def _read_secret(self) -> _Stored:
        found = self._call(
            f"read Secret {self._where}",
            lambda: self._core.read_namespaced_secret(
                self.target.secret,
                self.target.namespace,
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            ),
            absent_ok=True,
        )
        if found is None:
            return _Stored(None, None, "kubernetes.io/tls", "")
        stored = _stored(found)
        if stored.problem:
            log.warning("Secret %s holds no usable bundle: %s", self._where, stored.problem)
        return stored

    def _write_secret(
        self, bundle: Bundle, stored: _Stored, reason: str, references: tuple[Any, ...]
    ) -> None:
        """Create the Secret, or update the one read (conditional on its resourceVersion);
        `_Lost` when another replica, or a deletion, got there first."""
        metadata: dict[str, Any] = {
            "name": self.target.secret,
            "namespace": self.target.namespace,
            "labels": {
                "app.kubernetes.io/name": "outrigger",
                "app.kubernetes.io/component": "webhook-tls",
                "app.kubernetes.io/managed-by": "outrigger",
            },
            "annotations": {REASON_ANNOTATION: reason[:256]},
        }
        if references:
            metadata["ownerReferences"] = list(references)
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": metadata,
            "type": stored.secret_type,  # immutable: kept as found
            "data": {k: base64.b64encode(v).decode("ascii") for k, v in bundle.data().items()},
        }
        options = {
            "field_manager": FIELD_MANAGER,
            "_request_timeout": REQUEST_TIMEOUT,
            "_headers": _JSON,
        }
        lost: tuple[int, ...]
        if stored.resource_version is None:
            what, lost = "create", (409,)  # AlreadyExists
            call = partial(self._core.create_namespaced_secret, self.target.namespace, body)
        else:
            what, lost = "update", (409, 404)  # Conflict; NotFound: deleted since it was read
            metadata["resourceVersion"] = stored.resource_version  # the write is conditional
            replace = self._core.replace_namespaced_secret
            call = partial(replace, self.target.secret, self.target.namespace, body)
        self._call(
            f"{what} Secret {self._where}", partial(call, **options), lost=lost, refused=(403,)
        )

    # The caBundle -----------------------------------------------------------------------------

    def _read_configuration(self) -> dict[str, Any] | None:
        """The MutatingWebhookConfiguration, or None when it does not exist (yet)."""
        name = self.target.webhook
        configuration: dict[str, Any] | None = self._call(
            f"read mutatingwebhookconfiguration {name}",
            lambda: self._admission.read_mutating_webhook_configuration(
                name, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            ),
            absent_ok=True,
        )
        return configuration

    def _publish(self, bundle: Bundle, configuration: Mapping[str, Any] | None) -> bool:
        """Set every webhook's caBundle to the bundle's CAs; False when the configuration is
        missing (the API server cannot call this webhook until it exists)."""
        name = self.target.webhook
        if configuration is None:
            log.warning("mutatingwebhookconfiguration %s does not exist; not published", name)
            return False
        ops = ca_bundle_patch(configuration, base64.b64encode(bundle.data()[CA_CERT]).decode())
        if not ops:
            return True
        self._call(
            f"patch the caBundle of mutatingwebhookconfiguration {name}",
            lambda: self._admission.patch_mutating_webhook_configuration(
                name,
                ops,
                field_manager=FIELD_MANAGER,
                _request_timeout=REQUEST_TIMEOUT,
                _headers=_JSON_PATCH,
            ),
        )
        log.info("published the CA bundle in mutatingwebhookconfiguration %s", name)
        return True

    # The served files -------------------------------------------------------------------------

    def _write_files(self, bundle: Bundle) -> None:
        data = bundle.data()
        wanted = {name: data[name] for name in _SERVED_FILES}
        if all(_content(self.cert_dir / name) == value for name, value in wanted.items()):
            return
        write_atomically(self.cert_dir, wanted)

    # Calls ------------------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"{self.target.namespace}/{self.target.secret}"

    def _call(
        self,
        what: str,
        call: Callable[[], Any],
        *,
        absent_ok: bool = False,
        lost: tuple[int, ...] = (),
        refused: tuple[int, ...] = (),
    ) -> Any:
        """The decoded JSON answer of `call`; None for a 404 when `absent_ok`; raises `_Lost`
        for a status in `lost`, `_Refused` for one in `refused`, else `SelfTLSError`, each
        with a one-line message."""
        try:
            return json_answer(what, call, absent_ok=absent_ok)
        except CallFailed as failed:
            if failed.status in lost:
                raise _Lost from None
            if failed.status in refused:
                raise _Refused(str(failed)) from None
            raise SelfTLSError(str(failed)) from None


@dataclass(frozen=True)
class Turn:
    """What a replica does with the Secret it read: serve the stored bundle, or write one."""

    bundle: Bundle
    write: bool  # False: the stored bundle serves as it is
    action: Action
    reason: str


def take_turn(
    stored: Bundle | None,
    problem: str,
    serving: Bundle | None,
    settings: Settings,
    now: datetime.datetime,
    *,
    owner_exists: bool = True,
) -> Turn:
    """A replica's turn, from the bundle stored (None: absent, or unusable for `problem`) and the
    one it serves (None at start). A stored bundle that needs nothing is served by everyone. A
    write is conditional on what was read, so when several replicas decide to write, the API
    server takes one; the others lose (409), read again, and their next turn serves the
    winner's. A bundle gone from the Secret while a replica serves it is written back, unless
    its owner, the webhook configuration, is gone too (`owner_exists` False): then the garbage
    collector deleted the Secret with it, as at `helm uninstall`, and writing it back would
    leave it behind for good. It is written back once a configuration exists again."""
    candidate = stored if stored is not None else serving
    decision = plan(candidate, settings, now)
    if stored is not None and decision.action is Action.KEEP:
        return Turn(stored, False, Action.KEEP, decision.reason)
    if stored is None and not problem and serving is not None and not owner_exists:
        return Turn(serving, False, Action.KEEP, "deleted with its webhook configuration")
    reason = decision.reason if decision.action is not Action.KEEP else "restored"
    if problem:
        reason = f"{reason} (stored: {problem})"
    return Turn(carry_out(decision.action, candidate, settings, now), True, decision.action, reason)


def owner_of(configuration: Mapping[str, Any] | None) -> Owner | None:
    """The owner a configuration read from the API makes (None: absent, or no name and uid)."""
    metadata = configuration.get("metadata") if configuration is not None else None
    if not isinstance(metadata, Mapping):
        return None
    name, uid = metadata.get("name"), metadata.get("uid")
    if isinstance(name, str) and name and isinstance(uid, str) and uid:
        return Owner(name, uid)
    return None


def owner_references(stored: Sequence[Any], owner: Owner | None) -> tuple[Any, ...]:
    """The ownerReferences the Secret should carry: the stored ones, with `owner` in place of
    a reference to a configuration of its name but another uid (an earlier release's, which the
    garbage collector would take for gone), or added. Other references, and one to `owner`
    as it is, are kept as they are. Without an owner (the configuration does not exist yet, or
    is being deleted) nothing changes: at install it is added once the configuration exists;
    at uninstall the garbage collector's deletion goes ahead."""
    if owner is None:
        return tuple(stored)
    wanted: list[Any] = []
    for reference in stored:
        if not _refers_to(reference, owner.name):
            wanted.append(reference)
        elif not any(_refers_to(kept, owner.name) for kept in wanted):  # duplicates dropped
            wanted.append(reference if reference.get("uid") == owner.uid else owner.reference)
    if not any(_refers_to(kept, owner.name) for kept in wanted):
        wanted.append(owner.reference)
    return tuple(wanted)


def _refers_to(reference: Any, name: str) -> bool:
    """Whether an ownerReference names the MutatingWebhookConfiguration `name` (any uid)."""
    return (
        isinstance(reference, Mapping)
        and reference.get("kind") == OWNER_KIND
        and str(reference.get("apiVersion", "")).split("/")[0] == OWNER_API_VERSION.split("/")[0]
        and reference.get("name") == name
    )


def ca_bundle_patch(configuration: Mapping[str, Any], ca_bundle: str) -> list[dict[str, Any]]:
    """JSON patch operations setting each webhook's caBundle to `ca_bundle` (none when all
    have it). Each `add` is preceded by a `test` of the webhook's name at that index."""
    ops: list[dict[str, Any]] = []
    for index, webhook in enumerate(configuration.get("webhooks") or []):
        if not isinstance(webhook, dict) or not isinstance(webhook.get("name"), str):
            continue  # not a webhook the API server would store: nothing to publish to
        client_config = webhook.get("clientConfig") or {}
        if client_config.get("caBundle") == ca_bundle:
            continue
        ops.append({"op": "test", "path": f"/webhooks/{index}/name", "value": webhook["name"]})
        path = f"/webhooks/{index}/clientConfig/caBundle"
        ops.append({"op": "add", "path": path, "value": ca_bundle})
    return ops


def write_atomically(directory: Path, files: Mapping[str, bytes]) -> None:
    """Replace `files` in `directory` at once, as the kubelet updates a Secret volume: the
    content goes into a new hidden directory, a `..data` symlink is swapped to it, and each
    name is a symlink through `..data`. Readers see the old set or the new one, never a mix."""
    directory.mkdir(parents=True, exist_ok=True)
    version = directory / f"..{time.time_ns()}"
    version.mkdir(mode=0o700)
    for name, content in files.items():
        descriptor = os.open(version / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
    data, swap = directory / "..data", directory / "..data_tmp"
    swap.unlink(missing_ok=True)
    swap.symlink_to(version.name)
    os.replace(swap, data)
    for name in files:
        link = directory / name
        if not (link.is_symlink() and os.readlink(link) == f"..data/{name}"):
            staged = directory / f".{name}.link"
            staged.unlink(missing_ok=True)
            staged.symlink_to(f"..data/{name}")
            os.replace(staged, link)
    for entry in directory.iterdir():  # older versions, and any a crash left half-written
        if entry.name.startswith("..") and entry != version and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def _stored(found: Mapping[str, Any]) -> _Stored:
    """What a Secret read from the API holds: its bundle (None: unusable, `problem` says why),
    and what a write keeps of it (resourceVersion, type, ownerReferences, reason)."""
    metadata = found.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    references = metadata.get("ownerReferences")
    annotations = metadata.get("annotations")
    reason = annotations.get(REASON_ANNOTATION) if isinstance(annotations, dict) else None
    bundle, problem = None, ""
    try:
        data = found.get("data") or {}
        if not isinstance(data, dict):
            raise BundleError("its data is not a map")
        bundle = Bundle.from_data(_decoded(data))
    except BundleError as error:
        problem = str(error)
    return _Stored(
        bundle,
        resource_version=str(metadata.get("resourceVersion") or "") or None,
        secret_type=str(found.get("type") or "Opaque"),
        problem=problem,
        references=tuple(references) if isinstance(references, list) else (),
        reason=str(reason or ""),
    )


def _content(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _decoded(data: Mapping[str, Any]) -> dict[str, bytes]:
    decoded: dict[str, bytes] = {}
    for name, value in data.items():
        try:
            decoded[str(name)] = base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError):
            raise BundleError(f"{name} is not base64") from None
    return decoded
