"""The cluster policy: the sidecar templates, what annotations may set in them, which images
are allowed, and which namespaces and pods get what. Loaded and validated once; immutable.

The platform team writes it (usually in a ConfigMap); app teams only choose among its sidecars
and set the parameters a template declares. Errors name the path of the bad field, such as
`sidecars[1].container.image: ...`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import ipaddress
import re
from collections.abc import Iterator, Mapping
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from webhook.ambassador.hostport import DNS_NAME
from webhook.ambassador.spec import LOCAL_PORT_MIN, PORT_MAX
from webhook.core.logoutputs import OUTPUT_ENV, LogOutputs
from webhook.core.logwatcher import (
    CONFIG_DIR,
    CONFIG_FILE,
    GLOBS_ACCEPTED,
    MULTILINE_PARSERS,
    STDOUT_FORMATS,
    LogWatcherSettings,
    parse_globs,
    pattern_problem,
)
from webhook.core.parameters import (
    PATH_ACCEPTED,
    Parameter,
    typed_default,
    valid_default,
    valid_path,
)
from webhook.core.sidecarresources import (
    Resource,
    ResourceOverride,
    check_template,
    requests_above_limits,
)
from webhook.core.volumes import normalised

API_VERSION = "outrigger.dev/v1alpha1"
KIND = "InjectionPolicy"
ANNOTATION_PREFIX = "outrigger.dev/"
RESERVED_ANNOTATIONS = frozenset({ANNOTATION_PREFIX + "inject", ANNOTATION_PREFIX + "status"})
# Never mutated whatever the policy says: a broken injection there can take the cluster down.
ALWAYS_EXCLUDED = frozenset({"kube-system", "kube-public"})
# The Helm chart sets it (downward API) so that the webhook never injects into its own pods;
# read by the command line, which hands it on (`RequestContext.own_namespace`).
OWN_NAMESPACE_ENV = "POD_NAMESPACE"
# 63 (a DNS label) less the longest suffix of the volumes a template adds ("-output-ca").
TEMPLATE_NAME_MAX = 53
# Where the webhook mounts files into its sidecars: the watcher's configuration
# (`CONFIG_DIR`); a log output's CA, the ambassador's Secrets and SDS files (/etc/outrigger/...).
WEBHOOK_MOUNT_ROOTS = (CONFIG_DIR, "/etc/outrigger")

# A classic sidecar's preStop sleep must leave room in the pod's termination grace period.
CLASSIC_PRE_STOP_MAX = 300

_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_REFERENCE = re.compile(r"\$\{([a-z0-9.-]+)\}")
_IMAGE_NAME = re.compile(r"^[a-z0-9]+([._-]+[a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")

# Restricted Pod Security Standard settings for injected containers, unless the policy's
# containerDefaults or a template say otherwise.
RESTRICTED_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


class PolicyError(ValueError):
    """The policy file is unreadable or invalid; the message names each bad field's path."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EnvoySettings(_Model):
    """Renders an Envoy bootstrap for the ambassador (see `webhook.ambassador`) into
    `${envoy.bootstrap}`, and appends `--concurrency` (from the CPU limit) to its args.

    The pod sets either `upstream` (one host:port, on `listenPort`) or `config` (a full
    ambassador configuration); each names a parameter of the template.
    """

    # One ${parameter} of type hostport: the one upstream, served on listenPort.
    upstream: str | None = None
    # The local port the app calls with `upstream`: a number from 1024 to 65535, or one
    # ${parameter} of type integer whose minimum and maximum lie within those; never
    # adminPort or healthPort (an annotation that sets either is denied, naming it).
    listenPort: str | Annotated[int, Field(ge=LOCAL_PORT_MIN, le=PORT_MAX)] = 8081
    # One ${parameter} of type ambassador: the full configuration (several upstreams,
    # routing, TLS...), instead of upstream and listenPort.
    config: str | None = None
    # Where the app's listeners bind: the pod's loopback, out of other pods' reach. An IP
    # address every pod has, loopback or unspecified (Envoy refuses a name such as localhost:
    # "malformed IP address", and cannot bind an address the pod does not own).
    listenAddress: str = "127.0.0.1"
    # Envoy's admin API, on 127.0.0.1 only; no container of the pod may take the port.
    adminPort: Annotated[int, Field(ge=1024, le=65535)] = 9901
    # Envoy's readiness endpoint (GET /ready) on all addresses, for the kubelet's probes; a
    # native ambassador's startupProbe calls it, so that the app starts once Envoy listens.
    # None: no endpoint (classic placement only).
    healthPort: Annotated[int, Field(ge=1024, le=65535)] | None = 9902
    # The readiness listener's address: DualStack ([::], IPv4 too) works in IPv4-only,
    # dual-stack and IPv6-only pods unless the node disables IPv6 (then IPv4: 0.0.0.0).
    healthAddressFamily: Literal["DualStack", "IPv4", "IPv6"] = "DualStack"
    # Secret names (globs) whose CA or client certificate an ambassador may mount.
    allowedSecrets: tuple[str, ...] = ()

    def secret_allowed(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.allowedSecrets)

    @field_validator("listenAddress")
    @classmethod
    def _an_address_the_pod_owns(cls, address: str) -> str:
        if "%" in address or not _pod_owns(address):
            raise ValueError(
                "must be an IP address every pod has: loopback (such as 127.0.0.1 or ::1) or "
                "unspecified (0.0.0.0 or ::)"
            )
        return address

    @property
    def reserved_ports(self) -> dict[int, str]:
        """The ports Envoy binds for itself, which no listener for the app may take."""
        reserved = {self.adminPort: "admin interface (envoy.adminPort)"}
        if self.healthPort is not None:
            reserved[self.healthPort] = "readiness endpoint (envoy.healthPort)"
        return reserved

    @model_validator(mode="after")
    def _distinct_ports(self) -> EnvoySettings:
        if self.adminPort == self.healthPort:
            raise ValueError(f"envoy.adminPort and envoy.healthPort are both {self.adminPort}")
        if isinstance(self.listenPort, int) and self.listenPort in self.reserved_ports:
            raise ValueError(
                f"envoy.listenPort {self.listenPort} is the {self.reserved_ports[self.listenPort]}"
            )
        return self


class SidecarTemplate(_Model):
    """A sidecar the policy offers: its container, what it brings to the pod, and what a
    pod's annotations may set in it. Injected sidecars are placed in the policy's order."""

    # The name `outrigger.dev/inject` lists, and the injected container's. At most 53
    # characters: the volumes it adds are named after it (`<name>-output-ca` the longest), and
    # a volume's name is a DNS label of at most 63.
    name: Annotated[str, Field(pattern=_NAME, max_length=TEMPLATE_NAME_MAX)]
    # What the sidecar is for, for the people who read the policy and its references.
    description: str = ""
    # Placement: true, native (in initContainers, restartPolicy: Always); false, classic (in
    # containers); None follows the policy's nativeSidecars.
    native: bool | None = None
    # What annotations may set, by parameter name (lowercase letters, digits and '-'); the
    # template refers to a parameter as ${name}.
    parameters: dict[str, Parameter] = Field(default_factory=dict)
    # A container spec (image, command, args, env, ports, probes, resources, securityContext,
    # volumeMounts...) without `name`, which is the template's. Its image must be pinned (a
    # tag other than latest, or a digest) and in images.allowed. A ${parameter} is replaced
    # with the parameter's value: a value that is exactly ${name} takes the parameter's type
    # (a number for an integer), except in command, args and env[].value, which are strings;
    # a hostport parameter also offers ${name.host} and ${name.port}, an envoy block
    # ${envoy.bootstrap}, ${envoy.container-ports}, ${envoy.service-host},
    # ${envoy.service-port} and ${envoy.health-port}. Any other reference is an error at load.
    container: dict[str, Any]
    # Pod volumes the sidecar brings (no two templates may add volumes of the same name).
    volumes: tuple[dict[str, Any], ...] = ()
    # Mounts added to every app container, such as the shared log directory.
    appVolumeMounts: tuple[dict[str, Any], ...] = ()
    envoy: EnvoySettings | None = None
    # Renders the log-watcher's Fluent Bit configuration into a pod annotation
    # `<name>.outrigger.dev/fluent-bit.yaml`, projected read-only at
    # /etc/log-watcher/fluent-bit.yaml (a downwardAPI volume `<name>-config`), and sets
    # container.args to `-c` and that path: the template has no args. Checked at load. A
    # template without it runs its own args.
    logWatcher: LogWatcherSettings | None = None
    # Classic placement only: seconds the sidecar sleeps in preStop, so that it outlives the
    # app's shutdown (the kubelet signals every classic container at once). An integer or one
    # ${parameter} of type integer bounded 0 to 300; 0 or None: no preStop. Not together with
    # container.lifecycle.preStop. Native sidecars get none: the kubelet stops them after the
    # app by itself, and a sleep would only delay a Job's end.
    classicPreStopSleep: Annotated[int, Field(ge=0, le=CLASSIC_PRE_STOP_MAX)] | str | None = None
    # Native placement only: seconds the sidecar sleeps in preStop once the app has exited,
    # before its SIGTERM. For a reader of the app's files: what the app wrote last, in a file
    # the reader has not found yet, is read then (Fluent Bit stops reading at SIGTERM). Same
    # forms as classicPreStopSleep; the time comes out of the pod's grace period, and delays
    # a Job's end by as much.
    nativePreStopSleep: Annotated[int, Field(ge=0, le=CLASSIC_PRE_STOP_MAX)] | str | None = None
    # Run as the user and group the app containers run as, where the pod sets them (not
    # root): a reader of the app's files then reads those a restrictive umask keeps private.
    # Where the pod does not set them: the template's own user, with a warning.
    runAsAppUser: bool = False
    # Secrets (of the pod's namespace) that pull this template's image from a private
    # registry or mirror: merged into the pod's spec.imagePullSecrets after the pod's own,
    # each name once.
    imagePullSecrets: tuple[Annotated[str, Field(pattern=DNS_NAME, max_length=253)], ...] = ()
    # What a pod may set of this sidecar's resources with
    # `outrigger.dev/<sidecar>-<resource>-<request|limit>`, per resource, within which bounds
    # (`webhook.core.sidecarresources`); the template's own values must lie within them.
    # Absent or empty: no pod sizes this sidecar, the template's resources apply.
    resourceOverrides: dict[Resource, ResourceOverride] = Field(default_factory=dict)

    @field_validator("parameters")
    @classmethod
    def _parameter_names(cls, parameters: dict[str, Parameter]) -> dict[str, Parameter]:
        for name in parameters:
            if not re.fullmatch(_NAME, name):
                raise ValueError(f"parameter name {name!r} must be lowercase letters, digits, '-'")
        return parameters

    @field_validator("container")
    @classmethod
    def _container(cls, container: dict[str, Any]) -> dict[str, Any]:
        if "image" not in container:
            raise ValueError("container.image is required")
        if "name" in container:
            raise ValueError("container.name is set from the template's name; remove it")
        return container

    @model_validator(mode="after")
    def _mounts_apart_from_ours(self) -> SidecarTemplate:
        """The container's own mounts stay clear of the paths the webhook mounts into it
        (the watcher's configuration, a log output's CA, the ambassador's Secrets and SDS
        files): the API server refuses a pod with two mounts at one path."""
        for mount in self.container.get("volumeMounts", ()):
            path = mount.get("mountPath") if isinstance(mount, dict) else None
            if not isinstance(path, str) or "${" in path:
                continue
            path = normalised(path).rstrip("/") or "/"
            for ours in WEBHOOK_MOUNT_ROOTS:
                if _overlaps(path, ours):
                    raise ValueError(
                        f"container.volumeMounts: {path!r} overlaps {ours}, where Outrigger "
                        "mounts files of its own into the sidecar"
                    )
        return self

    @model_validator(mode="after")
    def _references_resolve(self) -> SidecarTemplate:
        known = self.reference_names
        # Where a pod without the annotation leaves a parameter unset, which the renderer
        # handles (one upstream or a configuration; a rule's or the default log output).
        optional = {"envoy": {"upstream", "config"}, "logWatcher": {"output"}}
        for where, value in (
            ("container", self.container),
            ("volumes", self.volumes),
            ("appVolumeMounts", self.appVolumeMounts),
            ("envoy", self.envoy.model_dump() if self.envoy else {}),
            ("logWatcher", self.logWatcher.model_dump() if self.logWatcher else {}),
            ("classicPreStopSleep", self.classicPreStopSleep),
            ("nativePreStopSleep", self.nativePreStopSleep),
        ):
            if isinstance(value, dict) and where in optional:
                value = {k: v for k, v in value.items() if k not in optional[where]}
            for reference in _references(value):
                if reference not in known:
                    raise ValueError(
                        f"{where} refers to ${{{reference}}}, which is not a parameter of this "
                        f"template (known: {', '.join(sorted(known)) or 'none'})"
                    )
                self._check_always_set(where, reference)
        return self

    def _check_always_set(self, where: str, reference: str) -> None:
        """A reference the renderer fills for every pod: its parameter has a default or is
        required (a pod without the annotation would leave it empty), and the readiness
        port exists."""
        if reference == "envoy.health-port" and self.envoy and self.envoy.healthPort is None:
            raise ValueError(f"{where} refers to ${{envoy.health-port}}; envoy.healthPort is null")
        name, _, part = reference.partition(".")  # a hostport's ${name.host}, ${name.port}
        parameter = self.parameters.get(name) if part in ("", "host", "port") else None
        if parameter is not None and parameter.default is None and not parameter.required:
            raise ValueError(
                f"{where} refers to ${{{reference}}}, whose parameter has no default and is "
                "not required: a pod without its annotation would leave it unset"
            )

    @model_validator(mode="after")
    def _pre_stop_sleeps(self) -> SidecarTemplate:
        lifecycle = self.container.get("lifecycle")
        for field in ("classicPreStopSleep", "nativePreStopSleep"):
            sleep = getattr(self, field)
            if sleep is not None and isinstance(lifecycle, dict) and "preStop" in lifecycle:
                raise ValueError(f"set {field} or container.lifecycle.preStop, not both")
            if isinstance(sleep, str):
                self._check_sleep_parameter(field, sleep)
        return self

    def _check_sleep_parameter(self, field: str, sleep: str) -> None:
        reference = _REFERENCE.fullmatch(sleep)
        parameter = self.parameters.get(reference.group(1)) if reference else None
        if parameter is None or parameter.type != "integer":
            raise ValueError(f"{field} must be a number or one ${{parameter}} of type integer")
        if not _bounded(parameter, 0, CLASSIC_PRE_STOP_MAX):
            raise ValueError(
                f"{field}: its parameter needs minimum >= 0 and maximum <= "
                f"{CLASSIC_PRE_STOP_MAX} (seconds)"
            )

    @model_validator(mode="after")
    def _envoy_parameters(self) -> SidecarTemplate:
        if self.envoy is None:
            return self
        expected = (
            ("upstream", self.envoy.upstream, "hostport"),
            ("config", self.envoy.config, "ambassador"),
            ("listenPort", self.envoy.listenPort, "integer"),
        )
        for field, value, kind in expected:
            if not isinstance(value, str):
                continue
            reference = _REFERENCE.fullmatch(value)
            if reference is None or self._type(reference.group(1)) != kind:
                raise ValueError(f"envoy.{field} must be one ${{parameter}} of type {kind}")
        if self.envoy.upstream is None and self.envoy.config is None:
            raise ValueError("envoy needs an upstream or a config parameter")
        if isinstance(self.envoy.listenPort, str):
            self._check_listen_port_parameter(self.envoy.listenPort)
        return self

    def _check_listen_port_parameter(self, listen_port: str) -> None:
        """The one upstream's local port, set by an annotation: within what Envoy's listener
        takes (`LOCAL_PORT_MIN`-65535), so that no value the parameter admits fails later."""
        reference = _REFERENCE.fullmatch(listen_port)
        assert reference is not None  # checked just before
        parameter = self.parameters[reference.group(1)]
        if not _bounded(parameter, LOCAL_PORT_MIN, PORT_MAX):
            raise ValueError(
                f"envoy.listenPort: its parameter needs minimum >= {LOCAL_PORT_MIN} and "
                f"maximum <= {PORT_MAX}"
            )
        assert self.envoy is not None  # the caller's
        default = typed_default(parameter)
        if isinstance(default, int) and default in self.envoy.reserved_ports:
            raise ValueError(
                f"envoy.listenPort: its parameter's default {default} is the "
                f"{self.envoy.reserved_ports[default]}"
            )

    @model_validator(mode="after")
    def _port_parameters_bounded(self) -> SidecarTemplate:
        """A port of the container that a pod sets (one ${parameter}) takes only ports: the
        API server refuses a pod with any other number."""
        for key, value in _items(self.container):
            reference = _REFERENCE.fullmatch(value) if isinstance(value, str) else None
            if key not in _PORT_FIELDS or reference is None:
                continue
            parameter = self.parameters.get(reference.group(1))
            if parameter is None or parameter.type != "integer":
                continue  # a reference the other checks name, or a port name
            if not _bounded(parameter, 1, PORT_MAX):
                raise ValueError(
                    f"container: {key} {value}: its parameter needs minimum >= 1 and "
                    f"maximum <= {PORT_MAX}"
                )
        return self

    @model_validator(mode="after")
    def _log_watcher(self) -> SidecarTemplate:
        """The generated file replaces the command-line options, and its paths must be the
        container's: the logs where a mount is, the read positions on a writable volume of
        the watcher's own (Fluent Bit exits 255 with `db` on a read-only mount)."""
        settings = self.logWatcher
        if settings is None:
            return self
        if "args" in self.container:
            raise ValueError(
                "logWatcher renders the watcher's configuration; remove container.args"
            )
        self._check_value("logWatcher.logPath", settings.logPath, "path", None)
        if "${" not in settings.logPath and not valid_path(settings.logPath):
            raise ValueError(f"logWatcher.logPath: expected {PATH_ACCEPTED}")
        if settings.files is not None:
            self._check_value("logWatcher.files", settings.files, "globs", None)
            self._check_file_patterns(settings)
        self._check_value("logWatcher.multiline", settings.multiline, "string", MULTILINE_PARSERS)
        self._check_value("logWatcher.format", settings.format, "string", STDOUT_FORMATS)
        if settings.output is not None:
            self._check_output(settings.output)
        taken = OUTPUT_ENV & {
            e.get("name") for e in self.container.get("env", ()) if isinstance(e, dict)
        }
        if taken:
            raise ValueError(
                f"container.env: {', '.join(sorted(taken))} is set by the log output; rename it"
            )
        mounts = [m for m in self.container.get("volumeMounts", ()) if isinstance(m, dict)]
        if not any(m.get("mountPath") == settings.logPath for m in mounts):
            raise ValueError("logWatcher.logPath must be the mountPath of a container.volumeMount")
        own = {str(v.get("name")) for v in self.volumes} - {
            str(m.get("name")) for m in self.appVolumeMounts
        }
        if not any(
            m.get("mountPath") == settings.stateDir
            and not m.get("readOnly")
            and m.get("name") in own
            for m in mounts
        ):
            raise ValueError(
                "logWatcher.stateDir must be the mountPath of a writable container.volumeMount "
                "of a volume of this template's own (not one of appVolumeMounts)"
            )
        return self

    def _check_file_patterns(self, settings: LogWatcherSettings) -> None:
        """Patterns written in the policy, literally or as the parameter's default, are
        checked as a pod's would be (within the template's own maxFilePatterns and
        maxPatternLength)."""
        assert settings.files is not None  # the caller's
        reference = _REFERENCE.fullmatch(settings.files)
        where: str = "logWatcher.files"
        text: object = settings.files
        if reference is not None:
            name = reference.group(1)
            where, text = f"parameters.{name}.default", self.parameters[name].default
            if text is None:
                return
        patterns = parse_globs(str(text))
        problem = "not file patterns" if patterns is None else pattern_problem(settings, patterns)
        if problem:
            raise ValueError(f"{where}: {problem} ({GLOBS_ACCEPTED})")

    def _check_output(self, output: str) -> None:
        """A literal (the policy checks the name) or one ${parameter} of type string without
        a default: with one, a rule's choice and logOutputs.default would never apply."""
        self._check_value("logWatcher.output", output, "string", None)
        reference = _REFERENCE.fullmatch(output)
        if reference is not None and self.parameters[reference.group(1)].default is not None:
            raise ValueError(
                "logWatcher.output: its parameter takes no default (without the annotation, "
                "a rule's logOutput or logOutputs.default applies)"
            )

    @property
    def output_parameter(self) -> str | None:
        """The parameter by which a pod picks the log output, if the template has one."""
        output = self.logWatcher.output if self.logWatcher else None
        reference = _REFERENCE.fullmatch(output) if output else None
        return reference.group(1) if reference else None

    def _check_value(
        self, field: str, value: str, kind: str, choices: tuple[str, ...] | None
    ) -> None:
        """`value` is a literal among `choices` (any, for None), or one ${parameter} of type
        `kind` whose values are all among them (an `enum` within `choices`)."""
        reference = _REFERENCE.fullmatch(value)
        if reference is None:
            if "${" in value or (choices is not None and value not in choices):
                expected = f"one of {', '.join(choices)}" if choices else "a literal"
                raise ValueError(f"{field} must be {expected} or one ${{parameter}} of type {kind}")
            return
        parameter = self.parameters.get(reference.group(1))
        if parameter is None or parameter.type != kind:
            raise ValueError(f"{field} must be one ${{parameter}} of type {kind}")
        if choices is not None and not (parameter.enum and set(parameter.enum) <= set(choices)):
            raise ValueError(f"{field}: its parameter needs an enum within {', '.join(choices)}")

    @model_validator(mode="after")
    def _defaults_valid(self) -> SidecarTemplate:
        for name, parameter in self.parameters.items():
            if parameter.default is not None and not valid_default(parameter):
                raise ValueError(
                    f"parameters.{name}.default: {parameter.default!r} is not a valid "
                    f"{parameter.type} for this parameter"
                )
        return self

    def _type(self, name: str) -> str | None:
        parameter = self.parameters.get(name)
        return None if parameter is None else parameter.type

    # The names of what a template adds to a pod beyond its own volumes: rendering gives them,
    # a re-injection takes them out again, and the policy keeps them distinct across templates.
    def secret_volume_name(self, index: int | str) -> str:
        return f"{self.name}-tls-{index}"  # one per Secret the ambassador mounts

    @property
    def sds_volume_name(self) -> str:
        return f"{self.name}-sds"

    @property
    def sds_annotation_prefix(self) -> str:
        return f"{self.name}.sds.outrigger.dev/"

    @property
    def config_volume_name(self) -> str:
        return f"{self.name}-config"  # the log-watcher's configuration file

    @property
    def config_annotation(self) -> str:
        return f"{self.name}.outrigger.dev/{CONFIG_FILE}"

    @property
    def output_ca_volume_name(self) -> str:
        return f"{self.name}-output-ca"  # the log output's TLS CA, from a Secret

    def adds_annotation(self, key: str) -> bool:
        """Whether `key` is one of the annotations this template adds to a pod."""
        if key.startswith(self.sds_annotation_prefix):
            return True
        return self.logWatcher is not None and key == self.config_annotation

    @cached_property
    def added_volume_names(self) -> tuple[str, ...]:
        """The names of the volumes this template adds to a pod: its own, and those it
        generates (`-tls-*`, a glob, for the ambassador's one volume per Secret)."""
        added = [str(volume.get("name")) for volume in self.volumes]
        if self.envoy is not None:
            added += [self.secret_volume_name("*"), self.sds_volume_name]
        if self.logWatcher is not None:
            added += [self.config_volume_name, self.output_ca_volume_name]
        return tuple(added)

    @cached_property
    def added_volume_matches(self) -> tuple[frozenset[str], tuple[str, ...]]:
        """`added_volume_names` as names and the prefixes of its globs: asked of every volume
        of every injected pod that comes back."""
        names = self.added_volume_names
        globs = tuple(added[:-1] for added in names if added.endswith("*"))
        return frozenset(added for added in names if not added.endswith("*")), globs

    def adds_volume(self, name: str) -> bool:
        """Whether `name` is one of the volumes this template adds to a pod."""
        names, globs = self.added_volume_matches
        return name in names or name.startswith(globs)

    @property
    def reference_names(self) -> frozenset[str]:
        names = set(self.parameters)
        for name, parameter in self.parameters.items():
            if parameter.type == "hostport":
                names |= {f"{name}.host", f"{name}.port"}
        if self.envoy is not None:
            names |= {
                "envoy.bootstrap",
                "envoy.container-ports",
                "envoy.service-host",
                "envoy.service-port",
                "envoy.health-port",
            }
        return frozenset(names)


class LabelSelectorRequirement(_Model):
    """One requirement on a pod's label, as in a Kubernetes label selector."""

    key: str  # the label's name
    # In, NotIn: the label's value is (not) one of values; Exists, DoesNotExist: the label
    # is (not) set.
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[str, ...] = ()  # for In and NotIn


class LabelSelector(_Model):
    """A Kubernetes label selector: the pod matches when every pair of matchLabels and every
    requirement of matchExpressions holds."""

    matchLabels: dict[str, str] = Field(default_factory=dict)  # labels with these values
    matchExpressions: tuple[LabelSelectorRequirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if any(labels.get(key) != value for key, value in self.matchLabels.items()):
            return False
        return all(_requirement_holds(r, labels) for r in self.matchExpressions)


class Rule(_Model):
    """Which pods get which sidecars without asking, or must have them, or never get any."""

    # Named wherever Outrigger says which rule decided (`--explain`, warnings, messages).
    name: Annotated[str, Field(min_length=1)]
    namespaces: tuple[str, ...] = ()  # exact names or globs; empty: every namespace
    # The pods' labels (matchLabels, matchExpressions as in Kubernetes); none: every pod.
    podSelector: LabelSelector | None = None
    # Sidecars the pods it matches get by default: when their outrigger.dev/inject is absent
    # or true (false opts out of them).
    inject: tuple[str, ...] = ()
    # Sidecars the pods it matches always get, whatever they say (an opt-out gets a warning).
    require: tuple[str, ...] = ()
    # The pods it matches get nothing. By namespace alone (no podSelector, or an empty one)
    # not even a required sidecar; by podSelector, nothing but the required ones: whoever
    # creates a pod writes its labels, and may not skip what the platform requires.
    exclude: bool = False
    # The log output (a name in logOutputs) of the pods it matches, unless the pod's
    # annotation picks one; the first matching rule that sets it decides.
    logOutput: str | None = None

    def matches(self, namespace: str, labels: Mapping[str, str]) -> bool:
        if self.namespaces and not any(fnmatch.fnmatchcase(namespace, p) for p in self.namespaces):
            return False
        return self.podSelector is None or self.podSelector.matches(labels)

    @property
    def selects_by_labels(self) -> bool:
        """Whether the pod's labels, which its creator writes, take part in matching it (an
        empty podSelector does not: it matches every pod)."""
        selector = self.podSelector
        return selector is not None and bool(selector.matchLabels or selector.matchExpressions)


class ContainerDefaults(_Model):
    """What every injected container gets unless its template sets the field: the
    restricted Pod Security Standard settings, and modest resources."""

    # requests and limits; a template's own requests (or limits) replace these whole.
    resources: dict[str, Any] = Field(
        default_factory=lambda: {
            "requests": {"cpu": "10m", "memory": "32Mi"},
            "limits": {"cpu": "500m", "memory": "256Mi"},
        }
    )
    # Merged key by key under a template's own: non-root, no privilege escalation, every
    # capability dropped, a read-only root filesystem, the RuntimeDefault seccomp profile.
    securityContext: dict[str, Any] = Field(
        default_factory=lambda: dict(RESTRICTED_SECURITY_CONTEXT)
    )


class Images(_Model):
    """The images sidecars may run: every template's image and every `image` parameter's
    value is checked."""

    # Prefixes an image reference must start with, e.g. "registry.example.com/mirror/"; it
    # must also be pinned (a tag other than latest, or a sha256 digest).
    allowed: tuple[str, ...]


class Policy(_Model):
    """The cluster policy, `kind: InjectionPolicy`: a YAML file, usually kept in a ConfigMap
    (`outrigger serve --policy FILE` or `--policy-configmap NAMESPACE/NAME`). Unknown keys
    are errors at every level, each naming its path."""

    apiVersion: Literal["outrigger.dev/v1alpha1"]  # the version of this format
    kind: Literal["InjectionPolicy"]  # what the document is
    images: Images
    # The sidecar templates, in the order injected sidecars are placed in a pod.
    sidecars: tuple[SidecarTemplate, ...]
    # Which pods get which sidecars without asking, must have them, or never get any.
    rules: tuple[Rule, ...] = ()
    # Names or globs of namespaces never injected into, besides kube-system, kube-public and
    # the webhook's own ($POD_NAMESPACE).
    excludedNamespaces: tuple[str, ...] = ()
    # true: native sidecars (Kubernetes 1.29+), placed first in initContainers with
    # restartPolicy: Always, in the policy's order, so that Jobs complete and the ambassador
    # runs (and listens, through its startupProbe) before the app and its init containers
    # start; the embedded default policy sets it. false: appended to containers, for clusters
    # without native sidecars (no start order, and Jobs are denied classic sidecars).
    nativeSidecars: bool = False
    # What becomes of an outrigger.dev/ annotation no template declares (a typo): Warn
    # admits the pod with a warning, Deny refuses it.
    unknownAnnotations: Literal["Warn", "Deny"] = "Warn"
    containerDefaults: ContainerDefaults = Field(default_factory=ContainerDefaults)
    # Where log-watchers may ship records, by name (a pod's annotation, a rule's logOutput
    # or logOutputs.default picks one); stdout alone when absent or empty.
    logOutputs: LogOutputs = Field(default_factory=LogOutputs)

    @model_validator(mode="after")
    def _consistent(self) -> Policy:
        names = [t.name for t in self.sidecars]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"sidecars: duplicate template names {duplicates}")
        for index, template in enumerate(self.sidecars):
            problem = self._image_source_problem(template)
            if problem:
                raise ValueError(f"sidecars[{index}].container.image: {problem}")
        for index, template in enumerate(self.sidecars):
            for name, parameter in template.parameters.items():
                if parameter.annotation in RESERVED_ANNOTATIONS:
                    raise ValueError(
                        f"sidecars[{index}].parameters.{name}.annotation: "
                        f"{parameter.annotation} is reserved"
                    )
        for index, template in enumerate(self.sidecars):
            resources = {
                **self.containerDefaults.resources,
                **template.container.get("resources", {}),
            }
            for problem in requests_above_limits(resources):
                raise ValueError(f"sidecars[{index}].container.resources.{problem}")
            for problem in check_template(template.name, resources, template.resourceOverrides):
                raise ValueError(f"sidecars[{index}].resourceOverrides.{problem}")
        for index, template in enumerate(self.sidecars):
            envoy = template.envoy
            if envoy is not None and envoy.healthPort is None and self.native(template):
                raise ValueError(
                    f"sidecars[{index}].envoy.healthPort: a native ambassador needs a readiness "
                    "endpoint for its startupProbe (without it the app may start before Envoy "
                    "listens)"
                )
        self._volume_names_unique()
        for index, rule in enumerate(self.rules):
            unknown = [n for n in (*rule.inject, *rule.require) if n not in names]
            if unknown:
                raise ValueError(f"rules[{index}] ({rule.name}) names unknown sidecars {unknown}")
        self._log_outputs_known()
        return self

    def _log_outputs_known(self) -> None:
        """Every output a rule or a template names is one of logOutputs."""
        names = self.logOutputs.names
        known = ", ".join(sorted(names))
        for index, rule in enumerate(self.rules):
            if rule.logOutput is not None and rule.logOutput not in names:
                raise ValueError(
                    f"rules[{index}].logOutput: {rule.logOutput!r} is not an output of "
                    f"logOutputs (known: {known})"
                )
        for index, template in enumerate(self.sidecars):
            output = template.logWatcher.output if template.logWatcher else None
            if output is not None and "${" not in output and output not in names:
                raise ValueError(
                    f"sidecars[{index}].logWatcher.output: {output!r} is not an output of "
                    f"logOutputs (known: {known})"
                )

    def _volume_names_unique(self) -> None:
        """Two templates injected into one pod must not add volumes of the same name."""
        owners: dict[str, str] = {}
        for template in self.sidecars:
            for name in template.added_volume_names:
                if name in owners:
                    raise ValueError(
                        f"sidecars: {owners[name]} and {template.name} both add a volume {name!r}"
                    )
                owners[name] = template.name

    # By identity, so that a policy can key caches of what is built from it; equal policies
    # loaded twice only miss each other's cache entries. object's own: a C slot, hashed in a
    # third of the time of a method returning id(self), several times per review.
    __hash__ = object.__hash__

    @cached_property
    def templates(self) -> dict[str, SidecarTemplate]:
        return {template.name: template for template in self.sidecars}

    @cached_property
    def order(self) -> dict[str, int]:
        """Injected sidecars are placed in the order the policy lists them."""
        return {template.name: index for index, template in enumerate(self.sidecars)}

    @cached_property
    def selector_label_keys(self) -> frozenset[str]:
        """The labels the rules' podSelectors read: a pod's other labels never change which
        rules match it."""
        selectors = [rule.podSelector for rule in self.rules if rule.podSelector is not None]
        return frozenset(
            key
            for selector in selectors
            for key in (*selector.matchLabels, *(r.key for r in selector.matchExpressions))
        )

    @cached_property
    def version(self) -> str:
        """A short content hash, recorded in the status annotation of every injected pod."""
        canonical = self.model_dump_json(by_alias=True, exclude=self._unset_additions()).encode()
        return hashlib.sha256(canonical).hexdigest()[:12]

    def _unset_additions(self) -> dict[str, Any]:
        """Fields added since v1alpha1 was first hashed, where unset: a policy that does not
        use them keeps its version, and its injected pods are not injected afresh."""
        exclude: dict[str, Any] = {}
        if self.logOutputs == LogOutputs():
            exclude["logOutputs"] = True
        rules = {i: {"logOutput"} for i, r in enumerate(self.rules) if r.logOutput is None}
        if rules:
            exclude["rules"] = rules
        sidecars = {
            i: {"logWatcher": {"output"}}
            for i, t in enumerate(self.sidecars)
            if t.logWatcher is not None and t.logWatcher.output is None
        }
        if sidecars:
            exclude["sidecars"] = sidecars
        return exclude

    def excluded_namespace(self, namespace: str, own_namespace: str = "") -> bool:
        """`own_namespace`: the webhook's ("": none), which the process that serves or
        runs the webhook's commands knows (`$POD_NAMESPACE` in the chart), not the policy."""
        if namespace in ALWAYS_EXCLUDED or (own_namespace and namespace == own_namespace):
            return True
        return any(fnmatch.fnmatchcase(namespace, p) for p in self.excludedNamespaces)

    def matching_rules(self, namespace: str, labels: Mapping[str, str]) -> list[Rule]:
        return [rule for rule in self.rules if rule.matches(namespace, labels)]

    def native(self, template: SidecarTemplate) -> bool:
        return self.nativeSidecars if template.native is None else template.native

    def _image_source_problem(self, template: SidecarTemplate) -> str | None:
        """A literal image must be allowed; one a pod may choose must be exactly one
        ${parameter} of type image (whose values, the default included, are checked against
        images.allowed): a string parameter, or a reference inside a longer value, would let
        an annotation pick any image."""
        image = str(template.container["image"])
        if "${" not in image:
            return self.image_problem(image)
        reference = _REFERENCE.fullmatch(image)
        parameter = template.parameters.get(reference.group(1)) if reference else None
        if parameter is None or parameter.type != "image":
            return "a pod may choose it only through one ${parameter} of type image"
        if isinstance(parameter.default, str):
            return self.image_problem(parameter.default)
        return None

    def image_problem(self, image: str) -> str | None:
        """Why an image may not be used (not pinned, or outside the allowlist), or None."""
        if not is_pinned_image(image):
            return (
                f"image {image!r} must be a valid reference pinned to a version tag "
                "(not :latest) or a sha256 digest"
            )
        if not any(image.startswith(prefix) for prefix in self.images.allowed):
            return f"image {image!r} is not in images.allowed ({', '.join(self.images.allowed)})"
        return None


def is_pinned_image(image: str) -> bool:
    """A valid image reference whose tag is not `latest`, or that carries a digest."""
    reference, _, digest = image.partition("@")
    if digest and not _DIGEST.fullmatch(digest):
        return False
    slash = reference.rfind("/")
    colon = reference.rfind(":")
    name, tag = (reference[:colon], reference[colon + 1 :]) if colon > slash else (reference, "")
    if not _IMAGE_NAME.fullmatch(name) or (tag and not _TAG.fullmatch(tag)):
        return False
    return bool(digest) or (bool(tag) and tag != "latest")


def parse_policy(document: object, source: str = "policy") -> Policy:
    """Validate a parsed YAML document; errors are reported as `path: message` lines."""
    try:
        return Policy.model_validate(document)
    except ValidationError as error:
        lines = [_line(e) for e in error.errors()]
        raise PolicyError(f"{source} is invalid:\n  " + "\n  ".join(lines)) from None


def load_policy(path: Path) -> Policy:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PolicyError(f"cannot read policy {path}: {error}") from None
    return load_policy_text(text, str(path))


def load_policy_text(text: str, source: str) -> Policy:
    """The policy in the YAML `text` (a file's or a ConfigMap's), named `source` in errors."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise PolicyError(f"cannot read policy {source}: {error}") from None
    return parse_policy(document, source)


def default_policy() -> Policy:
    """The policy embedded in the package, used when no --policy file is given."""
    text = resources.files("webhook.core").joinpath("default-policy.yaml").read_text()
    return parse_policy(yaml.safe_load(text), "embedded default policy")


def _requirement_holds(requirement: LabelSelectorRequirement, labels: Mapping[str, str]) -> bool:
    present = requirement.key in labels
    match requirement.operator:
        case "In":
            return present and labels[requirement.key] in requirement.values
        case "NotIn":
            return not present or labels[requirement.key] not in requirement.values
        case "Exists":
            return present
        case _:
            return not present


# The container fields that hold a port number (ports, probes, lifecycle handlers).
_PORT_FIELDS = frozenset({"containerPort", "port", "hostPort"})


def _items(value: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) of the objects nested in `value`."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key, item
            yield from _items(item)
    elif isinstance(value, list):
        for item in value:
            yield from _items(item)


def _bounded(parameter: Parameter, low: int, high: int) -> bool:
    """Whether every value an integer parameter admits lies within `low`..`high`."""
    least, most = parameter.minimum, parameter.maximum
    return least is not None and least >= low and most is not None and most <= high


def _overlaps(path: str, root: str) -> bool:
    """Whether one of the two (normalised) paths is the other or lies under it."""
    return path == root or root.startswith(path.rstrip("/") + "/") or path.startswith(root + "/")


def _pod_owns(address: str) -> bool:
    """Whether every pod can bind `address`: its loopback (127/8, ::1) or any address. Envoy
    fails to start on another ("Cannot assign requested address"), an IPv4-mapped one
    included ("Invalid argument"), and refuses a zone ("malformed IP address")."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:  # a name, or no address at all
        return False
    if isinstance(parsed, ipaddress.IPv4Address):
        return parsed.is_loopback or parsed.is_unspecified
    return parsed in (ipaddress.IPv6Address("::1"), ipaddress.IPv6Address("::"))


def _references(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        # Anything that looks like a reference counts, so that a malformed one is an error.
        yield from re.findall(r"\$\{([^}]*)\}", value)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _references(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _references(item)


def _line(error: Any) -> str:
    """`path: message`; checks across fields put their own path at the start of the message."""
    message = str(error["msg"]).removeprefix("Value error, ")
    path = _error_path(error["loc"])
    return f"{path}: {message}" if path else message


def _error_path(location: tuple[int | str, ...]) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path
