"""The cluster policy: which sidecars exist, their images and container settings, and which
namespaces are never touched. Loaded and validated once; immutable afterwards.
"""

from __future__ import annotations

import hashlib
import re
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from webhook.annotations import AMBASSADOR, LOG_WATCHER

API_VERSION = "outrigger.dev/v1alpha1"
KIND = "InjectionPolicy"
# Never mutated whatever the policy says: a broken injection there can take the cluster down.
ALWAYS_EXCLUDED = frozenset({"kube-system", "kube-public"})

_IMAGE_NAME = re.compile(r"^[a-z0-9]+([._-]+[a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class PolicyError(ValueError):
    """The policy file is unreadable or invalid; the message names each bad field's path."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Model):
    requests: dict[str, str | int] = Field(default_factory=dict)
    limits: dict[str, str | int] = Field(default_factory=dict)


class SidecarSettings(_Model):
    """Container settings that the platform team controls; annotations cannot change them."""

    image: str
    resources: Resources = Field(default_factory=Resources)
    securityContext: dict[str, Any] = Field(default_factory=dict)

    @field_validator("image")
    @classmethod
    def _pinned(cls, image: str) -> str:
        if not is_pinned_image(image):
            raise ValueError(
                f"image {image!r} must be a valid reference pinned to a version tag "
                "(not :latest) or a sha256 digest"
            )
        return image

    @cached_property
    def container_fields(self) -> dict[str, Any]:
        """Resources and securityContext as container fields, built once per policy.

        Shared by every pod the policy injects into: callers must treat it as read-only.
        """
        fields: dict[str, Any] = {}
        resources = self.resources.model_dump(exclude_defaults=True)
        if resources:
            fields["resources"] = resources
        if self.securityContext:
            fields["securityContext"] = self.securityContext
        return fields


class LogWatcherSettings(SidecarSettings):
    # Bounds the shared log volume; kubelet evicts the pod past it, so leave unset to not cap.
    volumeSizeLimit: str | None = None


class AmbassadorSettings(SidecarSettings):
    listenAddress: str = "127.0.0.1"
    adminPort: int = Field(default=9901, ge=1024, le=65535)


class Sidecars(_Model):
    log_watcher: LogWatcherSettings = Field(alias="log-watcher")
    ambassador: AmbassadorSettings = Field(alias="ambassador")


class Policy(_Model):
    apiVersion: Literal["outrigger.dev/v1alpha1"]
    kind: Literal["InjectionPolicy"]
    excludedNamespaces: frozenset[str] = frozenset()
    sidecars: Sidecars

    def __hash__(self) -> int:
        # By identity, so that a policy can key caches of what is built from it; equal
        # policies loaded twice only miss each other's cache entries.
        return id(self)

    @cached_property
    def available_sidecars(self) -> frozenset[str]:
        return frozenset({LOG_WATCHER, AMBASSADOR})

    def excludes(self, namespace: str) -> bool:
        return namespace in ALWAYS_EXCLUDED or namespace in self.excludedNamespaces

    @cached_property
    def version(self) -> str:
        """A short content hash, recorded in the status annotation of every injected pod."""
        canonical = self.model_dump_json(by_alias=True).encode()
        return hashlib.sha256(canonical).hexdigest()[:12]


def is_pinned_image(image: str) -> bool:
    """A valid image reference whose tag is not `latest`, or that carries a digest."""
    reference, _, digest = image.partition("@")
    if digest and not _DIGEST.match(digest):
        return False
    slash = reference.rfind("/")
    colon = reference.rfind(":")
    name, tag = (reference[:colon], reference[colon + 1 :]) if colon > slash else (reference, "")
    if not _IMAGE_NAME.match(name) or (tag and not _TAG.match(tag)):
        return False
    return bool(digest) or (bool(tag) and tag != "latest")


def parse_policy(document: object, source: str = "policy") -> Policy:
    """Validate a parsed YAML document; errors are reported as `path: message` lines."""
    try:
        return Policy.model_validate(document)
    except ValidationError as error:
        lines = [f"{_error_path(e['loc'])}: {e['msg']}" for e in error.errors()]
        raise PolicyError(f"{source} is invalid:\n  " + "\n  ".join(lines)) from None


def load_policy(path: Path) -> Policy:
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise PolicyError(f"cannot read policy {path}: {error}") from None
    return parse_policy(document, str(path))


def default_policy() -> Policy:
    """The policy embedded in the package, used when no --policy file is given."""
    text = resources.files("webhook").joinpath("default-policy.yaml").read_text()
    return parse_policy(yaml.safe_load(text), "embedded default policy")


def _error_path(location: tuple[int | str, ...]) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(document)"
