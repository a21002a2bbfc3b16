"""Sidecar templates rendered with the parameter values a pod's annotations set.

Only `${parameter}` references that the platform team wrote into a template are ever replaced,
so an annotation can set a value but never a field: a pod cannot choose an image, a capability,
privileged mode or a host path unless the template exposes exactly that as a parameter.

A value that is exactly `${name}` takes the parameter's type (a number for an integer), except
in `command`, `args` and `env[].value`, which Kubernetes wants as strings; a reference inside a
longer string is interpolated.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final

from webhook.ambassador.envoy import (
    HEALTH_PATH,
    SDS_ROOT,
    SECRETS_ROOT,
    Listening,
    SdsFile,
    bootstrap_json,
    sds_files,
)
from webhook.ambassador.hostport import Upstream
from webhook.ambassador.spec import LOCAL_PORT_MIN, PORT_MAX, AmbassadorSpec, single_upstream
from webhook.core.logoutputs import LogOutput, LogOutputs, ca_volumes, container_env
from webhook.core.logwatcher import (
    CONFIG_DIR,
    CONFIG_FILE,
    CONFIG_PATH,
    DEFAULT_FILES,
    NO_MULTILINE,
    WatcherConfig,
    config_yaml,
    parse_globs,
    pattern_problem,
)
from webhook.core.podresources import quantity
from webhook.core.policy import ContainerDefaults, EnvoySettings, SidecarTemplate
from webhook.core.sidecarresources import Override
from webhook.core.sidecarresources import apply as apply_overrides
from webhook.limits import echo

_REFERENCE: Final = re.compile(r"\$\{([a-z0-9.-]+)\}")
_STRING_FIELDS: Final = frozenset({"command", "args"})
_SECRETS: Final = "envoy.secrets"  # internal: the Secrets the ambassador mounts
_SDS: Final = "envoy.sds"  # internal: the SDS files naming the certificates in them
_CPU: Final = re.compile(r"([0-9]{1,9}(?:\.[0-9]{1,9})?)(m?)")
_DEFAULT_CONCURRENCY: Final = 2


class TemplateError(ValueError):
    """What the pod's parameters ask for does not fit the template (a denial, not a bug)."""


Values = Mapping[str, str | int | bool | Upstream | AmbassadorSpec | tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class RenderedSidecar:
    """What one template adds to a pod: read-only, shared by the pods that ask alike."""

    name: str
    container: dict[str, Any]
    volumes: tuple[dict[str, Any], ...]
    app_volume_mounts: tuple[dict[str, Any], ...]
    # Ports the sidecar binds in the pod's network namespace (container ports, Envoy admin);
    # a port listed twice cannot be bound twice.
    ports: tuple[int, ...]
    # The annotations that set its parameters, for messages that say what to change.
    annotations: tuple[str, ...]
    # Annotations it adds to the pod (the ambassador's SDS files, projected from them).
    pod_annotations: tuple[tuple[str, str], ...] = ()
    image_pull_secrets: tuple[str, ...] = ()
    # Runs as the app's user where the pod says it (see webhook.core.identity).
    run_as_app_user: bool = False
    # A log-watcher's configuration, for `with_app_containers` to name the pod's containers in.
    watcher: WatcherConfig | None = None
    config_annotation: str = ""
    # Each resource value and where it came from, and what follows from them (inject --explain).
    resource_sources: tuple[str, ...] = ()
    # Its container as placed in pods, and that container's JSON, per name of the pod's API
    # token volume (`webhook.core.injector._placed`): made once, shared by the pods that ask
    # alike. Not copied by `dataclasses.replace`: a changed sidecar is placed afresh.
    placements: dict[str | None, tuple[dict[str, Any], bytes | None]] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    @property
    def native(self) -> bool:
        """A native sidecar: an init container that keeps running (restartPolicy: Always)."""
        return "restartPolicy" in self.container


def render(
    template: SidecarTemplate,
    values: Values,
    defaults: ContainerDefaults,
    *,
    native: bool,
    outputs: LogOutputs | None = None,
    rule_output: str | None = None,
    overrides: tuple[Override, ...] = (),
) -> RenderedSidecar:
    """`native`: a native sidecar (an init container that keeps running, Kubernetes 1.29+).
    A log-watcher ships to one of `outputs` (stdout alone when None): the pod's choice, else
    `rule_output` (a rule's), else their default. `overrides`: the resources the pod sets
    (checked against the template's bounds by `webhook.core.annotations`)."""
    references = _references(template, values)
    container = {"name": template.name, **_substitute(template.container, references)}
    try:
        resources, sources = apply_overrides(
            {**defaults.resources, **container.get("resources", {})}, overrides, template.name
        )
    except ValueError as error:
        raise TemplateError(str(error)) from None
    container["resources"] = resources
    if native:
        container["restartPolicy"] = "Always"
        if template.envoy is not None and template.envoy.healthPort is not None:
            container.setdefault("startupProbe", _startup_probe(template.envoy.healthPort))
    watcher = None
    if template.logWatcher is not None:
        output = chosen_output(template, references, outputs or LogOutputs(), rule_output)
        watcher = _watcher_config(template, references, output, resources)
        sources += (f"Fluent Bit mem_buf_limit {watcher.settings.memBufLimit}",)
    sleep = _substitute(
        template.nativePreStopSleep if native else template.classicPreStopSleep, references
    )
    if native and watcher is not None and watcher.multiline != NO_MULTILINE:
        sleep = max(sleep or 0, watcher.settings.multilinePreStopSleep)
    if sleep:
        lifecycle = {**container.get("lifecycle", {}), "preStop": {"sleep": {"seconds": sleep}}}
        container["lifecycle"] = lifecycle
    container["securityContext"] = {
        **defaults.securityContext,
        **container.get("securityContext", {}),
    }
    ports = [p["containerPort"] for p in container.get("ports", ()) if "containerPort" in p]
    volumes = _substitute(list(template.volumes), references)
    pod_annotations: list[tuple[str, str]] = []
    if template.envoy is not None:
        ports += [template.envoy.adminPort, template.envoy.healthPort]
        sources += _add_concurrency(container)
        pairs = _secret_volumes(template, references[_SECRETS])
        sds = references[_SDS]
        if sds:
            pairs.append(_sds_volume(template, sds))
            pod_annotations = [(template.sds_annotation_prefix + f.name, f.text) for f in sds]
        volumes += [volume for volume, _ in pairs]
        mounts = [*container.get("volumeMounts", ()), *(mount for _, mount in pairs)]
        if mounts:
            container["volumeMounts"] = mounts
    if watcher is not None:
        pod_annotations.append((template.config_annotation, config_yaml(watcher)))
        volume, mount = _config_volume(template)
        ca_volume, ca_mount = ca_volumes(watcher.output, template.output_ca_volume_name)
        volumes += [volume, *ca_volume]
        container["volumeMounts"] = [*container.get("volumeMounts", ()), mount, *ca_mount]
        env = container_env(watcher.output)
        if env:
            container["env"] = [*container.get("env", ()), *env]
        container = _with_config_args(container)
    return RenderedSidecar(
        name=template.name,
        container=container,
        volumes=tuple(volumes),
        app_volume_mounts=tuple(_substitute(list(template.appVolumeMounts), references)),
        ports=tuple(p for p in ports if isinstance(p, int)),
        annotations=tuple(p.annotation for p in template.parameters.values()),
        pod_annotations=tuple(pod_annotations),
        image_pull_secrets=template.imagePullSecrets,
        run_as_app_user=template.runAsAppUser,
        watcher=watcher,
        config_annotation=template.config_annotation if watcher else "",
        resource_sources=sources,
    )


def chosen_output(
    template: SidecarTemplate,
    references: Mapping[str, Any],
    outputs: LogOutputs,
    rule_output: str | None,
) -> LogOutput:
    """The log-watcher's output: the template's literal, else the pod's annotation, else the
    rule's, else the policy's default. An annotation naming no output is denied."""
    settings = template.logWatcher
    assert settings is not None
    parameter = template.output_parameter  # it has no default: set only by the annotation
    if parameter is None:
        name = settings.output or rule_output  # a literal: the policy checked it at load
    else:
        name = str(references[parameter]) if parameter in references else rule_output
    output = outputs.pick(name)
    if output is None:
        assert parameter is not None  # rules and literals are checked at load
        raise TemplateError(
            f"annotation {template.parameters[parameter].annotation}: {echo(str(name))} is not "
            f"a log output of the cluster policy; accepted: {', '.join(sorted(outputs.names))}"
        )
    return output


def with_app_containers(
    spec: Mapping[str, Any], sidecars: tuple[RenderedSidecar, ...]
) -> tuple[RenderedSidecar, ...]:
    """The sidecars, a log-watcher that ships records directly with the pod's app containers
    that mount its log volume named in its configuration (each record's `container`)."""
    result = []
    for sidecar in sidecars:
        watcher = sidecar.watcher
        if watcher is None or watcher.output.type == "stdout":
            result.append(sidecar)
            continue
        names = _log_writers(spec, sidecar, watcher.log_path)
        text = config_yaml(dataclasses.replace(watcher, containers=names))
        annotations = tuple(
            (key, text if key == sidecar.config_annotation else value)
            for key, value in sidecar.pod_annotations
        )
        result.append(dataclasses.replace(sidecar, pod_annotations=annotations))
    return tuple(result)


def _log_writers(
    spec: Mapping[str, Any], sidecar: RenderedSidecar, log_path: str
) -> tuple[str, ...]:
    """The app containers that mount the volume the watcher reads at `log_path`: all of
    them when the template mounts it into the app, else those that mount it themselves."""
    mounts = sidecar.container.get("volumeMounts", ())
    volume = next((m.get("name") for m in mounts if m.get("mountPath") == log_path), None)
    containers = [c for c in spec.get("containers") or () if isinstance(c, dict)]
    if any(m.get("name") == volume for m in sidecar.app_volume_mounts):
        return tuple(str(c.get("name")) for c in containers)
    return tuple(
        str(c.get("name"))
        for c in containers
        if any(isinstance(m, dict) and m.get("name") == volume for m in c.get("volumeMounts") or ())
    )


def _add_concurrency(container: dict[str, Any]) -> tuple[str, ...]:
    """Envoy starts a worker per node CPU unless told; size it for its own CPU: the limit,
    else the request (a pod may remove the limit), rounded up. Returns what was decided.

    Connection and circuit-breaker limits apply per worker, so fewer workers also keep them
    meaningful. The template may set `--concurrency` itself.
    """
    args = [str(arg) for arg in container.get("args", ())]
    if "--concurrency" in args:
        return ("Envoy --concurrency as the template sets it",)
    resources = container["resources"]
    for kind in ("limits", "requests"):
        cpu = (resources.get(kind) or {}).get("cpu")
        if cpu is not None:
            workers = envoy_concurrency(cpu)
            container["args"] = [*args, "--concurrency", str(workers)]
            return (f"Envoy --concurrency {workers} (from the cpu {kind[:-1]} {cpu})",)
    container["args"] = [*args, "--concurrency", str(_DEFAULT_CONCURRENCY)]
    return (f"Envoy --concurrency {_DEFAULT_CONCURRENCY} (no cpu limit or request)",)


def envoy_concurrency(cpu: object) -> int:
    """Worker threads for a CPU quantity ("500m", "1", "2.5"): rounded up, at least 1; 2 for
    one this cannot read."""
    match = _CPU.fullmatch(str(cpu)) if cpu is not None else None
    if match is None:
        return _DEFAULT_CONCURRENCY
    cores = Decimal(match.group(1)) / (1000 if match.group(2) else 1)
    return max(1, math.ceil(cores))


def _sds_volume(
    template: SidecarTemplate, files: tuple[SdsFile, ...]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The SDS files, projected read-only from the pod's annotations (downward API)."""
    items = [(f"{f.name}.json", f"{template.sds_annotation_prefix}{f.name}") for f in files]
    return _annotation_files(template.sds_volume_name, SDS_ROOT, items)


def _annotation_files(
    name: str, mount_path: str, files: list[tuple[str, str]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A downwardAPI volume `name` with a file per (path, pod annotation key), and its
    read-only mount at `mount_path`: files from the pod itself, no object outside it."""
    items = [
        {"path": path, "fieldRef": {"fieldPath": f"metadata.annotations['{key}']"}}
        for path, key in files
    ]
    volume = {"name": name, "downwardAPI": {"items": items}}
    return volume, {"name": name, "mountPath": mount_path, "readOnly": True}


def _watcher_config(
    template: SidecarTemplate,
    references: dict[str, Any],
    output: LogOutput,
    resources: Mapping[str, Any],
) -> WatcherConfig:
    """The pod's watcher: the template's settings with the pod's parameter values in, its
    buffer within its memory limit."""
    settings = template.logWatcher
    assert settings is not None
    memory = (resources.get("limits") or {}).get("memory")
    buffer = mem_buf_limit(settings.memBufLimit, memory)
    if buffer != settings.memBufLimit:
        settings = settings.model_copy(update={"memBufLimit": buffer})
    files = _substitute(settings.files, references) if settings.files else DEFAULT_FILES
    if isinstance(files, str):  # a literal of the policy's, checked at load
        files = parse_globs(files)
    if not isinstance(files, tuple):  # the policy checks the reference's type at load
        raise TypeError(f"logWatcher.files of {template.name} is not a list of patterns")
    problem = pattern_problem(settings, files)
    if problem:
        annotation = template.parameters[_parameter(str(settings.files))].annotation
        raise TemplateError(f"annotation {annotation}: {problem}")
    return WatcherConfig(
        settings=settings,
        log_path=str(_substitute(settings.logPath, references)).rstrip("/"),
        files=files,
        multiline=str(_substitute(settings.multiline, references)),
        format=str(_substitute(settings.format, references)),
        output=output,
    )


def mem_buf_limit(template_value: str, memory_limit: object) -> str:
    """Fluent Bit's `mem_buf_limit` (the tail input's buffer, which pauses reading when full)
    for a memory limit: the template's, at most a quarter of the limit (the process itself,
    its per-file buffers and the output's copy take the rest), at least 1MB."""
    if memory_limit is None:
        return template_value
    quarter_mb = int(quantity(memory_limit, "memory limit") / 4 / (1 << 20))
    return f"{max(1, min(int(template_value.removesuffix('MB')), quarter_mb))}MB"


def _with_config_args(container: dict[str, Any]) -> dict[str, Any]:
    """The container running `fluent-bit -c CONFIG_PATH`: its args next to its command."""
    items = [(key, value) for key, value in container.items() if key != "args"]
    keys = [key for key, _ in items]
    at = keys.index("command") + 1 if "command" in keys else keys.index("image") + 1
    return dict([*items[:at], ("args", ["-c", CONFIG_PATH]), *items[at:]])


def _config_volume(template: SidecarTemplate) -> tuple[dict[str, Any], dict[str, Any]]:
    """The configuration file, projected read-only from the pod's annotation, as the
    ambassador's SDS files are."""
    files = [(CONFIG_FILE, template.config_annotation)]
    return _annotation_files(template.config_volume_name, CONFIG_DIR, files)


def _startup_probe(port: int) -> dict[str, Any]:
    """The kubelet starts the app containers once a native sidecar's startupProbe succeeds.

    Every second, so that the app starts within about a second of Envoy listening (its
    listeners and /ready open together, once its clusters are initialised); 600 failures
    (10 minutes, as Istio allows) before a slow node's Envoy is restarted.
    """
    return {
        "httpGet": {"path": HEALTH_PATH, "port": port},
        "periodSeconds": 1,
        "timeoutSeconds": 1,
        "failureThreshold": 600,
    }


def _secret_volumes(
    template: SidecarTemplate, secrets: list[str]
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """A read-only Secret volume per Secret, mounted at SECRETS_ROOT/<name> in the sidecar."""
    pairs = []
    for index, secret in enumerate(secrets):
        name = template.secret_volume_name(index)
        volume = {"name": name, "secret": {"secretName": secret}}
        mount = {"name": name, "mountPath": f"{SECRETS_ROOT}/{secret}", "readOnly": True}
        pairs.append((volume, mount))
    return pairs


def _references(template: SidecarTemplate, values: Values) -> dict[str, Any]:
    """Every name a template may refer to: parameters, hostport parts, the Envoy bootstrap."""
    references: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, Upstream):
            references[name] = f"{value.host}:{value.port}"
            references[f"{name}.host"] = value.host
            references[f"{name}.port"] = value.port
        else:
            references[name] = value
    if template.envoy is not None:
        references.update(_envoy_references(template, template.envoy, values, references))
    return references


def _envoy_references(
    template: SidecarTemplate, envoy: EnvoySettings, values: Values, references: dict[str, Any]
) -> dict[str, Any]:
    spec = _ambassador_spec(template, envoy, values, references)
    listening = Listening(
        envoy.listenAddress, envoy.adminPort, envoy.healthPort, envoy.healthAddressFamily
    )
    first = next(iter(spec.upstreams.values())).target
    return {
        "envoy.bootstrap": bootstrap_json(spec, listening),
        "envoy.container-ports": [{"containerPort": p, "protocol": "TCP"} for p in spec.ports],
        "envoy.service-host": first.host,
        "envoy.service-port": first.port,
        "envoy.health-port": envoy.healthPort,
        _SECRETS: spec.secrets,
        _SDS: sds_files(spec),
    }


def _ambassador_spec(
    template: SidecarTemplate, envoy: EnvoySettings, values: Values, references: dict[str, Any]
) -> AmbassadorSpec:
    """The pod's ambassador configuration: the `config` parameter, or one `upstream`."""
    config = values.get(_parameter(envoy.config)) if envoy.config else None
    upstream = values.get(_parameter(envoy.upstream)) if envoy.upstream else None
    if isinstance(config, AmbassadorSpec) and isinstance(upstream, Upstream):
        raise TemplateError(f"set one of {_annotations(template, envoy)}, not both")
    if isinstance(config, AmbassadorSpec):
        spec = config
        where = [
            (f"annotation {_config_annotation(template, envoy)}: {f}", p) for f, p in spec.listeners
        ]
    elif isinstance(upstream, Upstream):
        port = int(_substitute(envoy.listenPort, references))
        spec = single_upstream(upstream, port)
        where = [(_listen_port_source(template, envoy), port)]
    else:
        raise TemplateError(
            f"{template.name} needs one of {_annotations(template, envoy)}; expected "
            "host:port, or an ambassador configuration"
        )
    _check_not_reserved(envoy, where)
    for name in spec.secrets:
        if not envoy.secret_allowed(name):
            raise TemplateError(
                f"annotation {_config_annotation(template, envoy)}: Secret {name!r} is not one "
                "the cluster policy lets the ambassador mount "
                f"(allowed: {', '.join(envoy.allowedSecrets) or 'none'})"
            )
    return spec


def _check_not_reserved(envoy: EnvoySettings, listeners: list[tuple[str, int]]) -> None:
    """A local port the app would call must not be one Envoy binds for itself: Envoy would
    refuse its bootstrap (or the pod be denied later, naming no field)."""
    reserved = envoy.reserved_ports
    for where, port in listeners:
        if port in reserved:
            others = ", ".join(map(str, reserved))
            raise TemplateError(
                f"{where}: {port} is the ambassador's {reserved[port]}; the app's local "
                f"ports may be {LOCAL_PORT_MIN}-{PORT_MAX} except {others}"
            )


def _listen_port_source(template: SidecarTemplate, envoy: EnvoySettings) -> str:
    """Where the one upstream's local port comes from, as a message names it."""
    if isinstance(envoy.listenPort, int):
        return "the policy's envoy.listenPort"
    return f"annotation {template.parameters[_parameter(envoy.listenPort)].annotation}"


def _parameter(reference: str) -> str:
    match = _REFERENCE.fullmatch(reference)
    assert match is not None  # the policy checks envoy references at load
    return match.group(1)


def _substitute(value: Any, references: dict[str, Any], as_string: bool = False) -> Any:
    if isinstance(value, str):
        whole = _REFERENCE.fullmatch(value)
        if whole is not None:
            found = references[whole.group(1)]
            return str(found) if as_string else found
        return _REFERENCE.sub(lambda m: _text(references[m.group(1)]), value)
    if isinstance(value, dict):
        return {
            key: _substitute(
                item,
                references,
                as_string or key in _STRING_FIELDS or (key == "value" and "name" in value),
            )
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_substitute(item, references, as_string) for item in value]
    return value


def _text(value: Any) -> str:
    """A value inside a longer string: a list of patterns comma-separated, as written."""
    return ",".join(value) if isinstance(value, tuple) else str(value)


def _annotations(template: SidecarTemplate, envoy: EnvoySettings) -> str:
    references = (envoy.upstream, envoy.config)
    keys = [template.parameters[_parameter(r)].annotation for r in references if r]
    return " or ".join(f"annotation {key}" for key in keys)


def _config_annotation(template: SidecarTemplate, envoy: EnvoySettings) -> str:
    assert envoy.config is not None  # Secrets only come from a configuration
    return template.parameters[_parameter(envoy.config)].annotation
