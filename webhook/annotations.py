"""Pod annotations, parsed once into a typed, validated `InjectionRequest`.

Every `outrigger.dev/*` key the webhook reads or writes is a constant here, and this is the
only module that looks at annotation strings. Parsing reports every invalid annotation at
once, each message naming the annotation and the values it accepts.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import lru_cache

PREFIX = "outrigger.dev/"
INJECT = PREFIX + "inject"
LOG_PATH = PREFIX + "log-path"
AMBASSADOR_UPSTREAM = PREFIX + "ambassador-upstream"
AMBASSADOR_PORT = PREFIX + "ambassador-port"
STATUS = PREFIX + "status"

KNOWN_KEYS = frozenset({INJECT, LOG_PATH, AMBASSADOR_UPSTREAM, AMBASSADOR_PORT, STATUS})

DEFAULT_LOG_PATH = "/var/log/app"
DEFAULT_AMBASSADOR_PORT = 8081
# Envoy runs as a non-root user without NET_BIND_SERVICE, so it cannot bind privileged ports.
MIN_LOCAL_PORT = 1024

LOG_WATCHER = "log-watcher"
AMBASSADOR = "ambassador"

_OPT_OUT = frozenset({"", "false"})
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_NAME = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
_PATH_CHARS = re.compile(r"^/[A-Za-z0-9._@+=/-]*$")


@dataclass(frozen=True, slots=True)
class Upstream:
    """An external service the ambassador proxies to."""

    host: str
    port: int
    is_ip: bool = False


@dataclass(frozen=True, slots=True)
class AmbassadorRequest:
    upstream: Upstream
    local_port: int


@dataclass(frozen=True, slots=True)
class InjectionRequest:
    """What a pod's annotations ask for, already validated.

    `sidecars` keeps the order of first mention, without duplicates. `ambassador` is set
    exactly when "ambassador" is among the sidecars.
    """

    sidecars: tuple[str, ...]
    log_path: str
    ambassador: AmbassadorRequest | None
    warnings: tuple[str, ...]


class InvalidAnnotations(ValueError):
    """One or more annotations are invalid; `problems` holds one message per annotation."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def parse(annotations: Mapping[str, str], available: frozenset[str]) -> InjectionRequest:
    """Parse and validate the pod's annotations against the sidecars the policy defines."""
    ours = tuple(item for item in annotations.items() if item[0].startswith(PREFIX))
    return _parse(ours, available)


@lru_cache(maxsize=4096)
def _parse(ours: tuple[tuple[str, str], ...], available: frozenset[str]) -> InjectionRequest:
    """Cached on our annotations alone: every pod of a workload carries the same ones."""
    annotations = dict(ours)
    problems: list[str] = []
    sidecars = _parse_inject(annotations.get(INJECT, ""), available, problems)
    log_path = _parse_log_path(annotations.get(LOG_PATH), problems)
    ambassador = _parse_ambassador(annotations, AMBASSADOR in sidecars, problems)
    if problems:
        raise InvalidAnnotations(problems)
    return InjectionRequest(
        sidecars=sidecars,
        log_path=log_path,
        ambassador=ambassador,
        warnings=_unused_keys(annotations, sidecars),
    )


def _parse_inject(raw: str, available: Collection[str], problems: list[str]) -> tuple[str, ...]:
    value = raw.strip()
    if value.lower() in _OPT_OUT:
        return ()
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in available]
    if unknown:
        accepted = ", ".join(sorted(available))
        problems.append(
            f"annotation {INJECT}: unknown sidecar {', '.join(map(repr, unknown))}; "
            f'accepted: "false" or a comma-separated list of: {accepted}'
        )
        return ()
    return tuple(dict.fromkeys(names))


def _parse_log_path(raw: str | None, problems: list[str]) -> str:
    if raw is None:
        return DEFAULT_LOG_PATH
    path = raw.strip().rstrip("/")
    segments = path.split("/")
    if (
        not _PATH_CHARS.match(path)
        or len(path) > 1024
        or ".." in segments
        or "." in segments
        or "" in segments[1:]
    ):
        problems.append(
            f"annotation {LOG_PATH}: {raw!r} is not accepted; expected an absolute directory "
            "path below / such as /var/log/app (letters, digits, . _ - @ + =; "
            "no '..' or empty segments)"
        )
        return DEFAULT_LOG_PATH
    return path


def _parse_ambassador(
    annotations: Mapping[str, str], wanted: bool, problems: list[str]
) -> AmbassadorRequest | None:
    raw_upstream = annotations.get(AMBASSADOR_UPSTREAM)
    raw_port = annotations.get(AMBASSADOR_PORT)
    if not wanted:
        return None
    if raw_upstream is None:
        problems.append(
            f"annotation {AMBASSADOR_UPSTREAM} is required when {INJECT} includes "
            f"{AMBASSADOR}; expected host:port, e.g. api.example.com:443"
        )
        upstream = None
    else:
        upstream = _parse_upstream(raw_upstream, problems)
    port = _parse_port(raw_port, problems)
    if upstream is None or port is None:
        return None
    return AmbassadorRequest(upstream=upstream, local_port=port)


def _parse_upstream(raw: str, problems: list[str]) -> Upstream | None:
    upstream = _upstream(raw)
    if upstream is None:
        problems.append(
            f"annotation {AMBASSADOR_UPSTREAM}: {raw!r} is not accepted; expected host:port "
            "with a DNS name or IP address and a port from 1 to 65535 "
            "(e.g. api.example.com:443, 10.0.0.7:8080, [fd00::7]:80)"
        )
    return upstream


@lru_cache(maxsize=4096)
def _upstream(raw: str) -> Upstream | None:
    """Cached: the pods of one workload name the same upstream, and IP parsing is not cheap."""
    host, sep, port_text = raw.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text) if sep and port_text.isascii() and port_text.isdigit() else 0
    if not sep or not 1 <= port <= 65535:
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if len(host) > 253 or not _DNS_NAME.match(host.lower()):
            return None
        return Upstream(host=host.lower(), port=port)
    return Upstream(host=host, port=port, is_ip=True)


def _parse_port(raw: str | None, problems: list[str]) -> int | None:
    if raw is None:
        return DEFAULT_AMBASSADOR_PORT
    text = raw.strip()
    port = int(text) if text.isascii() and text.isdigit() else 0
    if not MIN_LOCAL_PORT <= port <= 65535:
        problems.append(
            f"annotation {AMBASSADOR_PORT}: {raw!r} is not accepted; expected a port number "
            f"from {MIN_LOCAL_PORT} to 65535 (default {DEFAULT_AMBASSADOR_PORT})"
        )
        return None
    return port


def _unused_keys(annotations: Mapping[str, str], sidecars: tuple[str, ...]) -> tuple[str, ...]:
    """Warn about our annotations that will have no effect, so nothing is silently dropped."""
    warnings: list[str] = []
    for key in annotations:
        if not key.startswith(PREFIX):
            continue
        if key not in KNOWN_KEYS:
            warnings.append(f"annotation {key} is not an Outrigger annotation and is ignored")
        elif key == LOG_PATH and LOG_WATCHER not in sidecars:
            warnings.append(f"annotation {key} is ignored: {LOG_WATCHER} is not injected")
        elif key in (AMBASSADOR_UPSTREAM, AMBASSADOR_PORT) and AMBASSADOR not in sidecars:
            warnings.append(f"annotation {key} is ignored: {AMBASSADOR} is not injected")
    return tuple(warnings)
