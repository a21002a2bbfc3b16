"""Where the log-watcher ships records: the outputs a cluster policy names, rendered for
Fluent Bit's YAML configuration (`pipeline.outputs`, `pipeline.filters`) and the container.

The platform team names outputs in the policy (`LogOutputs`: `outputs`, `default`,
`allowedSecrets`); a rule or a pod's annotation picks one by name (`LogOutputs.pick`); stdout
stays the default and is always available. Each `LogOutput` says where (`type`, `host`,
`port`), how (`tls`), and as whom (`credentials`: keys of a Secret in the pod's namespace).

Secret values never appear in the generated configuration, which travels in an annotation:
the config refers to environment variables (`${OUTRIGGER_LOG_PASSWORD}`, which Fluent Bit
expands when it reads its config) and the container gets them from `secretKeyRef`s. A TLS CA
comes from a Secret mounted read-only at `CA_MOUNT_PATH`.

The policy's `logOutputs` is a `LogOutputs`; `webhook.core.logwatcher` renders the chosen
output into the configuration and `webhook.core.templates` adds the env and the CA volume.
The interface for the config generator (all pure; dicts are Kubernetes or Fluent Bit YAML):

- `output_entries(output, match)`: the `pipeline.outputs` entries (one today).
- `record_filters(output, containers, match)`: `pipeline.filters` entries that set
  `namespace`, `pod`, `container` and `node` in every record (from the downward API
  variables; `container` is the given app container names, comma-separated, since a record
  read from a shared file cannot tell which container wrote it). Nothing for stdout: the
  kubelet's log collector knows the pod of what a container prints.
- `container_env(output)`: the `env` entries those need: `fieldRef`s for POD_NAME,
  POD_NAMESPACE, NODE_NAME (with the filters) and `secretKeyRef`s for credentials.
- `ca_volumes(output, volume_name)`: `(volumes, volumeMounts)` for the TLS CA Secret.
- `secret_problems(output, allowed)`: why the output's Secrets are not allowed (globs).

Fluent Bit facts these rely on (checked against 4.2.0; tests/test_log_outputs.py runs it):

- `${VAR}` is expanded in every value (a password with spaces, `$` or `,` arrives intact); an
  unset one stops Fluent Bit at start rather than ship records without their pod.
- `tls.verify_hostname` is off by default (set on here), and it matches the certificate's
  DNS names only: a host given as an IP address never verifies, so TLS with verify needs a
  DNS name.
- `retry_limit` is 1 by default: a receiver's hiccup would drop a chunk. `no_limits` here,
  bounded by the input's `mem_buf_limit` (tail pauses while the buffer is full).
- Loki: `label_keys` move namespace, pod and container from the line into the stream's
  labels (node stays in the line). OpenTelemetry: the `log` key is the body and the rest of
  the record (the pod's metadata) the log record's attributes; without `logs_body_key` the
  rest is dropped. Resource attributes (`k8s.pod.name`) cannot be set for records read from
  files: `content_modifier` on `otel_resource_attributes` leaves them unchanged.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

OutputType = Literal[
    "stdout", "loki", "elasticsearch", "opensearch", "opentelemetry", "forward", "http"
]

# The Fluent Bit plugin of each type.
PLUGINS: dict[str, str] = {
    "stdout": "stdout",
    "loki": "loki",
    "elasticsearch": "es",
    "opensearch": "opensearch",
    "opentelemetry": "opentelemetry",
    "forward": "forward",
    "http": "http",
}
DEFAULT_PORTS: dict[str, int] = {
    "loki": 3100,
    "elasticsearch": 9200,
    "opensearch": 9200,
    "opentelemetry": 4318,
    "forward": 24224,
}
# Which credentials each type's plugin can present.
BASIC_AUTH = frozenset({"loki", "elasticsearch", "opensearch", "opentelemetry", "http"})
TOKEN_AUTH = frozenset({"loki", "elasticsearch", "opentelemetry", "http"})
SHARED_KEY_AUTH = frozenset({"forward"})

# The variables the container gets; the config refers to them as ${NAME}.
POD_NAME_ENV = "POD_NAME"
POD_NAMESPACE_ENV = "POD_NAMESPACE"
NODE_NAME_ENV = "NODE_NAME"
USERNAME_ENV = "OUTRIGGER_LOG_USERNAME"
PASSWORD_ENV = "OUTRIGGER_LOG_PASSWORD"
TOKEN_ENV = "OUTRIGGER_LOG_TOKEN"
SHARED_KEY_ENV = "OUTRIGGER_LOG_SHARED_KEY"
# Every variable `container_env` may set: a template's own env must leave them alone.
OUTPUT_ENV = frozenset(
    {POD_NAME_ENV, POD_NAMESPACE_ENV, NODE_NAME_ENV}
    | {USERNAME_ENV, PASSWORD_ENV, TOKEN_ENV, SHARED_KEY_ENV}
)
DOWNWARD_API = {
    POD_NAME_ENV: "metadata.name",
    POD_NAMESPACE_ENV: "metadata.namespace",
    NODE_NAME_ENV: "spec.nodeName",
}
# The record keys the filters set, in this order.
METADATA_KEYS = ("namespace", "pod", "container", "node")

CA_MOUNT_PATH = "/etc/outrigger/log-output-ca"
CA_FILE = "ca.crt"
CA_VOLUME = "log-watcher-output-ca"
STDOUT = "stdout"

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_NAME = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
_SECRET_NAME = Annotated[str, Field(pattern=rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$", max_length=253)]
_SECRET_KEY = Annotated[str, Field(pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)]
_OUTPUT_NAME = re.compile(rf"^{_DNS_LABEL}$")
# Free text that goes into the config verbatim: no `$` (an env reference could read the
# credentials into a label or a URI), no spaces, commas or quotes (list separators).
_URI = re.compile(r"^/[A-Za-z0-9._~!&()*+;=:@%/-]*$")
_LABEL_KEY = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9._/:-]{1,128}$")
_INDEX = re.compile(r"^[a-z0-9][a-z0-9._-]{0,254}$")
_TENANT = re.compile(r"^[A-Za-z0-9!._*()-]{1,150}$")


# Settings that only some types use; setting one for another type is a mistake.
_TYPE_FIELDS: dict[str, tuple[str, ...]] = {
    "labels": ("loki",),
    "tenantId": ("loki",),
    "index": ("elasticsearch", "opensearch"),
    "uri": ("http", "opentelemetry", "loki"),
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OutputTLS(_Model):
    """TLS to the receiver; the CA, when not a public one, from a Secret's `caKey`."""

    enabled: bool = False  # TLS to the receiver
    verify: bool = True  # the certificate chain and the host name (which must be a DNS name)
    # A Secret of the pod's namespace holding the CA, when it is not a public one (needs
    # enabled and verify); mounted read-only into the watcher.
    caSecret: _SECRET_NAME | None = None
    caKey: _SECRET_KEY = CA_FILE  # the CA's key in caSecret

    @model_validator(mode="after")
    def _consistent(self) -> OutputTLS:
        if self.caSecret is not None and not self.enabled:
            raise ValueError("caSecret needs enabled: true")
        if self.caSecret is not None and not self.verify:
            raise ValueError("caSecret has no use with verify: false")
        return self


class Credentials(_Model):
    """Keys of one Secret (in the pod's namespace): basic auth (`usernameKey` and
    `passwordKey`), a token (`tokenKey`: a bearer token; for Elasticsearch an API key), or a
    forward shared key (`sharedKeyKey`, with a username and password where the receiver has
    users)."""

    secret: _SECRET_NAME  # in the pod's namespace, within logOutputs.allowedSecrets
    usernameKey: _SECRET_KEY | None = None  # basic auth, with passwordKey
    passwordKey: _SECRET_KEY | None = None  # basic auth, with usernameKey
    # A bearer token (Elasticsearch: an API key); alone, without the other keys.
    tokenKey: _SECRET_KEY | None = None
    # forward's shared key (secure forward), with usernameKey and passwordKey where the
    # receiver has users.
    sharedKeyKey: _SECRET_KEY | None = None

    @model_validator(mode="after")
    def _one_scheme(self) -> Credentials:
        if (self.usernameKey is None) != (self.passwordKey is None):
            raise ValueError("set both usernameKey and passwordKey, or neither")
        basic = self.usernameKey is not None
        if self.tokenKey is not None and (basic or self.sharedKeyKey is not None):
            raise ValueError("tokenKey goes alone (no usernameKey, passwordKey, sharedKeyKey)")
        if not (basic or self.tokenKey or self.sharedKeyKey):
            raise ValueError("set usernameKey and passwordKey, tokenKey or sharedKeyKey")
        return self

    @property
    def schemes(self) -> tuple[str, ...]:
        return tuple(
            name
            for name, key in (
                ("basic", self.usernameKey),
                ("token", self.tokenKey),
                ("sharedKey", self.sharedKeyKey),
            )
            if key is not None
        )


class LogOutput(_Model):
    """One named destination in the policy. A setting for another type, or credentials the
    type cannot present, is an error at load."""

    # The receiver's kind, and the Fluent Bit output plugin that ships to it.
    type: OutputType
    # A lowercase DNS name or an IP address (no scheme, port or path); required except for
    # stdout.
    host: str | None = None
    # None: the type's default (loki 3100, elasticsearch and opensearch 9200, opentelemetry
    # 4318, forward 24224, http 80, or 443 with TLS).
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    tls: OutputTLS = Field(default_factory=OutputTLS)
    # As whom: keys of a Secret, as the type takes them (loki, elasticsearch, opensearch,
    # opentelemetry and http: basic auth; the same but opensearch: a token; forward: a
    # shared key).
    credentials: Credentials | None = None
    # loki: static stream labels (namespace, pod and container are labels too, from the record)
    labels: dict[str, str] = Field(default_factory=lambda: {"job": "outrigger"})
    tenantId: str | None = None  # loki: X-Scope-OrgID
    index: str = "outrigger"  # elasticsearch, opensearch
    uri: str | None = None  # http (default /), opentelemetry (default /v1/logs), loki
    # Fluent Bit's retry_limit: a number of retries (1 to 1000), or no_limits (tail pauses
    # while the buffer is full).
    retryLimit: int | str = "no_limits"

    @field_validator("host")
    @classmethod
    def _host(cls, host: str | None) -> str | None:
        if host is None:
            return None
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            pass
        if len(host) > 253 or not _DNS_NAME.fullmatch(host):
            raise ValueError(
                f"{host[:64]!r} is not a lowercase DNS name or an IP address "
                "(e.g. loki.logging.svc, 10.0.0.7, fd00::7; no scheme, port or path)"
            )
        return host

    @field_validator("retryLimit")
    @classmethod
    def _retry_limit(cls, limit: int | str) -> int | str:
        if limit != "no_limits" and not (isinstance(limit, int) and 1 <= limit <= 1000):
            raise ValueError(f"{str(limit)[:64]!r}: a number of retries (1-1000) or no_limits")
        return limit

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            if not _LABEL_KEY.fullmatch(key) or key in METADATA_KEYS:
                raise ValueError(
                    f"label {key[:64]!r}: a Loki label name ([a-zA-Z_][a-zA-Z0-9_]*), not one "
                    f"of {', '.join(METADATA_KEYS)} (set from each record)"
                )
            if not _LABEL_VALUE.fullmatch(value):
                raise ValueError(f"label {key}: {value[:64]!r} must be 1-128 of [A-Za-z0-9._/:-]")
        return labels

    @field_validator("uri")
    @classmethod
    def _uri(cls, uri: str | None) -> str | None:
        if uri is not None and (len(uri) > 256 or not _URI.fullmatch(uri)):
            raise ValueError(
                f"{uri[:64]!r} must be a path starting with / (at most 256 characters, no "
                "spaces, quotes, commas or $)"
            )
        return uri

    @field_validator("index")
    @classmethod
    def _index(cls, index: str) -> str:
        if not _INDEX.fullmatch(index) or index in {".", ".."}:
            raise ValueError(
                f"{index[:64]!r} is not an index name: lowercase letters, digits, '.', '_', "
                "'-', starting with a letter or digit, at most 255"
            )
        return index

    @field_validator("tenantId")
    @classmethod
    def _tenant(cls, tenant: str | None) -> str | None:
        if tenant is not None and not _TENANT.fullmatch(tenant):
            raise ValueError(f"{tenant[:64]!r} is not a Loki tenant ID (1-150, no spaces or $)")
        return tenant

    @model_validator(mode="after")
    def _fits_type(self) -> LogOutput:
        if self.type == STDOUT:
            self._stdout_only()
        elif self.host is None:
            raise ValueError(f"host: required for a {self.type} output")
        self._credentials_fit()
        for field, types in _TYPE_FIELDS.items():
            if self._set_apart_from_default(field) and self.type not in types:
                raise ValueError(f"{field}: only for {', '.join(types)}, not {self.type}")
        if self.tls.enabled and self.tls.verify and _is_ip(self.host):
            raise ValueError(
                "host: TLS with verify needs a DNS name (Fluent Bit checks the name against "
                "the certificate's DNS names only: an IP address never matches)"
            )
        return self

    def _set_apart_from_default(self, field: str) -> bool:
        """Set, to another value than the default: a dumped policy (every field written
        out) loads again."""
        default = type(self).model_fields[field].get_default(call_default_factory=True)
        return field in self.model_fields_set and getattr(self, field) != default

    def _stdout_only(self) -> None:
        extra = [f for f in ("host", "port", "credentials") if getattr(self, f)]
        if self.tls.enabled:
            extra.append("tls")
        if extra:
            raise ValueError(f"{', '.join(extra)}: a stdout output has no destination settings")

    def _credentials_fit(self) -> None:
        if self.credentials is None:
            return
        allowed = {"basic": BASIC_AUTH, "token": TOKEN_AUTH, "sharedKey": SHARED_KEY_AUTH}
        for scheme in self.credentials.schemes:
            if self.type in allowed[scheme]:
                continue
            if self.type == "forward" and scheme == "basic":
                if self.credentials.sharedKeyKey:
                    continue  # secure forward's user authentication
                raise ValueError(
                    "credentials: forward takes a username and password only with "
                    "sharedKeyKey (secure forward)"
                )
            types = ", ".join(sorted(allowed[scheme]))
            raise ValueError(
                f"credentials: {self.type} outputs cannot use {scheme} credentials (only {types})"
            )

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        if self.type == "http":
            return 443 if self.tls.enabled else 80
        return DEFAULT_PORTS[self.type]

    @property
    def secrets(self) -> tuple[str, ...]:
        """The Secrets this output reads, each once."""
        names = [self.credentials.secret] if self.credentials else []
        if self.tls.caSecret is not None and self.tls.caSecret not in names:
            names.append(self.tls.caSecret)
        return tuple(names)


class LogOutputs(_Model):
    """The policy's outputs: what a rule or a pod's annotation may pick from."""

    # The outputs by name (a DNS label); `stdout` is always there, and may only be stdout.
    outputs: dict[str, LogOutput] = Field(default_factory=dict)
    # The output of pods that neither their annotation nor a rule gives one: stdout, or a
    # name of outputs.
    default: str = STDOUT
    # Secret names (globs) an output may read credentials or a CA from, in the pod's
    # namespace; an output reading another is an error at load, naming the output and Secret.
    allowedSecrets: tuple[str, ...] = ()

    @field_validator("outputs")
    @classmethod
    def _names(cls, outputs: dict[str, LogOutput]) -> dict[str, LogOutput]:
        for name, output in outputs.items():
            if not _OUTPUT_NAME.fullmatch(name) or len(name) > 63:
                raise ValueError(f"output name {name[:64]!r} must be a DNS label")
            if name == STDOUT and output.type != STDOUT:
                raise ValueError("output name 'stdout' is kept for the stdout output")
        return outputs

    @model_validator(mode="after")
    def _consistent(self) -> LogOutputs:
        if self.default != STDOUT and self.default not in self.outputs:
            known = ", ".join(sorted({STDOUT, *self.outputs}))
            raise ValueError(f"default: {self.default!r} is not an output (known: {known})")
        for name, output in self.outputs.items():
            for problem in secret_problems(output, self.allowedSecrets):
                raise ValueError(f"outputs.{name}: {problem}")
        return self

    @property
    def names(self) -> frozenset[str]:
        return frozenset({STDOUT, *self.outputs})

    def pick(self, name: str | None) -> LogOutput | None:
        """The output `name` (None: the default), or None when the policy has no such one."""
        chosen = self.default if name is None else name
        if chosen == STDOUT and STDOUT not in self.outputs:
            return LogOutput(type="stdout")
        return self.outputs.get(chosen)


# Rendering ----------------------------------------------------------------------------------


def output_entries(output: LogOutput, match: str = "*") -> list[dict[str, Any]]:
    """The `pipeline.outputs` entries that ship the records matching `match` to `output`."""
    entry: dict[str, Any] = {"name": PLUGINS[output.type], "match": match}
    if output.type == STDOUT:
        return [{**entry, "format": "json_lines"}]
    entry |= {"host": output.host, "port": output.effective_port}
    entry |= {"retry_limit": str(output.retryLimit)}
    entry |= _tls_properties(output.tls)
    entry |= _type_properties(output)
    entry |= _credential_properties(output)
    return [entry]


def _tls_properties(tls: OutputTLS) -> dict[str, Any]:
    if not tls.enabled:
        return {}
    properties = {"tls": "on", "tls.verify": _on(tls.verify)}
    # Fluent Bit checks the chain only unless told to check the name too.
    properties["tls.verify_hostname"] = _on(tls.verify)
    if tls.caSecret is not None:
        properties["tls.ca_file"] = f"{CA_MOUNT_PATH}/{CA_FILE}"
    return properties


def _type_properties(output: LogOutput) -> dict[str, Any]:
    match output.type:
        case "loki":
            properties = {
                "labels": ", ".join(f"{k}={v}" for k, v in output.labels.items()),
                # From each record: the pod's streams stay apart.
                "label_keys": "$namespace,$pod,$container",
                "line_format": "json",
            }
            if output.uri is not None:
                properties["uri"] = output.uri
            if output.tenantId is not None:
                properties["tenant_id"] = output.tenantId
            return properties
        case "elasticsearch" | "opensearch":
            # Elasticsearch 8 and OpenSearch 2 refuse a mapping type in a bulk request.
            return {"index": output.index, "suppress_type_name": "on"}
        case "opentelemetry":
            return {
                "logs_uri": output.uri or "/v1/logs",
                "logs_body_key": "$log",
                "logs_body_key_attributes": "on",
            }
        case "http":
            return {"uri": output.uri or "/", "format": "json_lines", "json_date_format": "iso8601"}
        case _:
            return {}


def _credential_properties(output: LogOutput) -> dict[str, Any]:
    credentials = output.credentials
    if credentials is None:
        return {}
    properties: dict[str, Any] = {}
    if credentials.usernameKey is not None:
        user, password = ("username", "password") if output.type == "forward" else _HTTP_BASIC
        properties |= {user: f"${{{USERNAME_ENV}}}", password: f"${{{PASSWORD_ENV}}}"}
    if credentials.sharedKeyKey is not None:
        properties["shared_key"] = f"${{{SHARED_KEY_ENV}}}"
    if credentials.tokenKey is not None:
        properties |= _token_property(output.type)
    return properties


_HTTP_BASIC = ("http_user", "http_passwd")


def _token_property(output_type: str) -> dict[str, str]:
    token = f"${{{TOKEN_ENV}}}"
    if output_type == "loki":
        return {"bearer_token": token}
    if output_type == "elasticsearch":
        return {"http_api_key": token}  # sent as `Authorization: ApiKey <token>`
    return {"header": f"Authorization Bearer {token}"}


def record_filters(
    output: LogOutput, containers: Sequence[str], match: str = "*"
) -> list[dict[str, Any]]:
    """`pipeline.filters` entries that set namespace, pod, container and node in each record
    matching `match`; `containers` are the app containers that write the files read."""
    if output.type == STDOUT:
        return []
    values = {
        "namespace": f"${{{POD_NAMESPACE_ENV}}}",
        "pod": f"${{{POD_NAME_ENV}}}",
        "container": ",".join(containers) or "unknown",
        "node": f"${{{NODE_NAME_ENV}}}",
    }
    # `set`, not `add`: the pod's own records cannot pass for another pod's.
    setting = [f"{key} {values[key]}" for key in METADATA_KEYS]
    return [{"name": "modify", "match": match, "set": setting}]


def container_env(output: LogOutput) -> list[dict[str, Any]]:
    """The log-watcher's `env` entries the output's filters and credentials refer to."""
    if output.type == STDOUT:
        return []
    env: list[dict[str, Any]] = [
        {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}
        for name, path in DOWNWARD_API.items()
    ]
    credentials = output.credentials
    if credentials is None:
        return env
    for name, key in (
        (USERNAME_ENV, credentials.usernameKey),
        (PASSWORD_ENV, credentials.passwordKey),
        (TOKEN_ENV, credentials.tokenKey),
        (SHARED_KEY_ENV, credentials.sharedKeyKey),
    ):
        if key is not None:
            reference = {"name": credentials.secret, "key": key}
            env.append({"name": name, "valueFrom": {"secretKeyRef": reference}})
    return env


def ca_volumes(
    output: LogOutput, volume_name: str = CA_VOLUME
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The pod volume and the log-watcher's read-only mount of the TLS CA Secret, if any."""
    secret = output.tls.caSecret
    if secret is None:
        return [], []
    items = [{"key": output.tls.caKey, "path": CA_FILE}]
    volume = {"name": volume_name, "secret": {"secretName": secret, "items": items}}
    mount = {"name": volume_name, "mountPath": CA_MOUNT_PATH, "readOnly": True}
    return [volume], [mount]


def secret_problems(output: LogOutput, allowed: Sequence[str]) -> list[str]:
    """Why the output may not read its Secrets: one message per Secret no glob allows."""
    return [
        f"Secret {name!r} is not in allowedSecrets ({', '.join(allowed) or 'none'})"
        for name in output.secrets
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in allowed)
    ]


def _is_ip(host: str | None) -> bool:
    try:
        ipaddress.ip_address(host or "")
    except ValueError:
        return False
    return True


def _on(flag: bool) -> str:
    return "on" if flag else "off"
