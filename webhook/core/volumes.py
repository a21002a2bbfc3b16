"""Shared volumes: the pod-level volumes a sidecar brings and the mounts that share them."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import orjson

Container = dict[str, Any]


def with_mounts(container: Container, mounts: Sequence[dict[str, Any]]) -> Container:
    """A copy of `container` that also has `mounts` (the original is kept, as are its lists)."""
    return {**container, "volumeMounts": [*(container.get("volumeMounts") or ()), *mounts]}


def without_mounts(container: Container, removed: Callable[[object], bool]) -> Container:
    """`container` without its mounts of the volumes `removed` names (itself if none)."""
    mounts = container.get("volumeMounts")
    if not isinstance(mounts, list):
        return container
    kept = [m for m in mounts if not (isinstance(m, dict) and removed(m.get("name")))]
    if len(kept) == len(mounts):
        return container
    if not kept:
        return {key: value for key, value in container.items() if key != "volumeMounts"}
    return {**container, "volumeMounts": kept}


# Where the ServiceAccount admission plugin mounts the pod's API token volume
# (`DefaultAPITokenMountPath`), in every container that mounts nothing there, and how it
# names that volume: `kube-api-access-` and five random characters.
API_TOKEN_PATH: Final = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_VOLUME_PREFIX: Final = "kube-api-access-"


def api_token_mount(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """The mount of the pod's API token that the ServiceAccount admission plugin gives each
    container without a mount at API_TOKEN_PATH, where the pod shows the plugin mounted it
    (its first volume named `kube-api-access-...`, mounted there by one of its containers,
    and `automountServiceAccountToken` not false); None otherwise.

    The plugin runs again after the webhooks and would append this very mount to the
    sidecars, and that change would make the API server call the webhook a second time
    (`reinvocationPolicy: IfNeeded`) for every pod. Written by the injection, in the plugin's
    order of fields, it leaves the plugin nothing to do: the pod ends the same."""
    if spec.get("automountServiceAccountToken") is False:
        return None
    names = token_volume_names(spec.get("volumes"))
    if not names:
        return None
    name = names[0]
    for field in ("containers", "initContainers"):
        for container in _list(spec.get(field)):
            mounts = container.get("volumeMounts") if isinstance(container, dict) else None
            for mount in _list(mounts):
                if _at_token_path(mount) and mount.get("name") == name:
                    return {"name": name, "readOnly": True, "mountPath": API_TOKEN_PATH}
    return None


def token_volume_names(volumes: Any) -> list[str]:
    """The names, in order, of `volumes` named as the plugin names its token volume."""
    return [
        name
        for volume in _list(volumes)
        if isinstance(volume, dict)
        and isinstance(name := volume.get("name"), str)
        and name.startswith(TOKEN_VOLUME_PREFIX)
    ]


def with_api_token(container: Container, mount: dict[str, Any] | None) -> Container:
    """`container` with the plugin's token `mount` (`api_token_mount`), unless it mounts
    something at that path already (as the plugin decides: the path as written)."""
    if mount is None:
        return container
    for existing in _list(container.get("volumeMounts")):
        if _at_token_path(existing):
            return container
    return with_mounts(container, [mount])


def _at_token_path(mount: Any) -> bool:
    return isinstance(mount, dict) and mount.get("mountPath") == API_TOKEN_PATH


def _list(value: Any) -> list[Any] | tuple[()]:
    return value if isinstance(value, list) else ()


def mount_conflicts(containers: Sequence[Container], path: str) -> list[str]:
    """Names of containers that already mount something at `path` (Kubernetes forbids two),
    comparing paths as the runtime resolves them: `/var/log//app/.` is `/var/log/app`."""
    path = normalised(path)
    return [
        str(container.get("name"))
        for container in containers
        if any(
            normalised(str(m.get("mountPath", ""))) == path
            for m in container.get("volumeMounts") or ()
        )
    ]


def normalised(path: str) -> str:
    if "//" not in path and "/." not in path and not path.endswith("/"):
        return path  # already what the runtime resolves (the common case: no work)
    return posixpath.normpath(re.sub("/+", "/", path)) if path else path


# What the API server adds to an injected pod that comes back (reinvocation), besides what
# the webhook wrote: fields it defaults when unset (in containers, probes, ports, volumes),
# resources that a namespace's LimitRange defaults, and the service-account token mount that
# the ServiceAccount admission plugin appends to every container (`kube-api-access-<hash>`)
# when it runs again after the webhooks. Nothing else may differ.
API_DEFAULTS: Final = frozenset(
    {
        "terminationMessagePath",
        "terminationMessagePolicy",
        "imagePullPolicy",
        "timeoutSeconds",
        "periodSeconds",
        "successThreshold",
        "failureThreshold",
        "scheme",
        "protocol",
        "defaultMode",
        "apiVersion",  # a downwardAPI item's fieldRef
    }
)
_DEFAULTED_MAPS: Final = frozenset({"requests", "limits"})  # LimitRanger's defaults
# Lists whose items are known by a key and whose order means nothing to Kubernetes. Where the
# token volume and its mounts sit depends on whether the ServiceAccount plugin ran before the
# injection (the webhook) or after it (`outrigger inject`, then a create): the order of the
# others is what the webhook wrote, but the removal and re-adding of re-injection moves them.
_KEYED_LISTS: Final = {"volumes": "name", "volumeMounts": "mountPath"}


def contains(actual: Any, expected: Any, key: str = "") -> bool:
    """Whether `actual` is `expected` but for what the API server adds (API_DEFAULTS, a
    LimitRange's resources, the service-account token mount): every key of `expected` with
    a value it holds in turn, lists item by item."""
    if actual is expected:  # shared with the pod as it came: held, however deep it nests
        return True
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            # Most values are shared with the pod as it came: compared here without a call.
            and all(
                k in actual and (actual[k] is v or contains(actual[k], v, k))
                for k, v in expected.items()
            )
            and all(k in expected or _added_by_api(k, v, key) for k, v in actual.items())
        )
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) < len(expected):
            return False
        if key in _KEYED_LISTS:
            return _contains_keyed(actual, expected, _KEYED_LISTS[key], key)
        extra = actual[len(expected) :]
        if extra and not (key == "volumeMounts" and all(_token_mount(m) for m in extra)):
            return False
        held = _item_check(key)
        return all(held(a, e) for a, e in zip(actual, expected, strict=False))
    return bool(actual == expected) and type(actual) is type(expected)


def _item_check(key: str) -> Callable[[Any, Any], bool]:
    """How the items of the list `key` are checked: those of the lists of containers and
    volumes remembered (`_remembered_contains`), others compared as they are."""
    return _remembered_contains if key in _REMEMBERED_LISTS else contains


def _remembered_contains(actual: Any, expected: Any) -> bool:
    """`contains` for one container or volume, remembered by the JSON of both: an injected
    sidecar (or volume) is checked against the same rendering at every reinvocation of
    every pod injected alike, and comparing it field by field in Python took a third of
    such a review. An item that shares lists or objects with the pod as it came (the app's)
    is compared as it is: what it shares costs nothing there, and its JSON could be large."""
    if actual is expected:
        return True
    if (
        not isinstance(actual, dict)
        or not isinstance(expected, dict)
        or any(
            actual.get(key) is value
            for key, value in expected.items()
            if isinstance(value, dict | list)  # strings may be shared by chance
        )
    ):
        return contains(actual, expected)
    try:
        both = (orjson.dumps(actual), orjson.dumps(expected))
    except (orjson.JSONEncodeError, TypeError):  # not JSON: compared as it is
        return contains(actual, expected)
    if len(both[0]) + len(both[1]) > _CHECKED_ITEM_BYTES:
        return contains(actual, expected)
    held = _CHECKED_ITEMS.get(both)
    if held is None:
        held = contains(actual, expected)
        if len(_CHECKED_ITEMS) >= _CHECKED_ITEM_ENTRIES:
            _CHECKED_ITEMS.clear()  # a bound, not a policy: refilled by the next reviews
        _CHECKED_ITEMS[both] = held
    return held


# Containers and volumes checked by `_remembered_contains`: at most about 4 MiB of keys.
# Read and written from the event loop and worker threads alike; a lost entry is only
# checked again.
_REMEMBERED_LISTS: Final = frozenset({"containers", "initContainers", "volumes"})
_CHECKED_ITEM_BYTES: Final = 16 * 1024
_CHECKED_ITEM_ENTRIES: Final = 256
_CHECKED_ITEMS: Final[dict[tuple[bytes, bytes], bool]] = {}


def _added_by_api(key: str, value: Any, parent: str) -> bool:
    """Whether a field the webhook did not write is one the API server adds: a default, a
    LimitRange's resource, or the token mounts of a container that had no mounts."""
    if key in API_DEFAULTS or parent in _DEFAULTED_MAPS:
        return True
    if parent == "resources" and key in _DEFAULTED_MAPS:  # a LimitRange's limits or requests
        return True
    return key == "volumeMounts" and isinstance(value, list) and all(map(_token_mount, value))


def _token_mount(mount: Any) -> bool:
    return isinstance(mount, dict) and str(mount.get("name", "")).startswith(TOKEN_VOLUME_PREFIX)


def _contains_keyed(actual: list[Any], expected: list[Any], field: str, key: str) -> bool:
    """`contains` for a list known by `field`, in any order: each expected item is held by
    the actual item of its key, and the only extra items are token mounts."""
    by_key = {item.get(field): item for item in actual if isinstance(item, dict)}
    if len(by_key) != len(actual):  # items that are not objects, or keys twice: not ours
        return False
    held = _item_check(key)
    for item in expected:
        if not isinstance(item, dict) or not held(by_key.pop(item.get(field), None), item):
            return False
    return all(key == "volumeMounts" and _token_mount(extra) for extra in by_key.values())
