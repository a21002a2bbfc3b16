"""The log-watcher's Fluent Bit configuration, generated: a YAML file, not command-line options.

The webhook renders it per pod (`config_yaml`), puts it in a pod annotation, and a downwardAPI
volume projects that annotation read-only into the watcher at `CONFIG_PATH`; the container runs
`fluent-bit -c CONFIG_PATH`. Everything stays in the pod: no ConfigMap to create or clean up.

The platform team tunes the pipeline in the template's `logWatcher:` block
(`LogWatcherSettings`); a pod chooses, through annotations the template declares, which files
are read (`parse_globs`) and which of Fluent Bit's built-in multiline parsers joins their lines
(`MULTILINE_PARSERS`). Where records go is one of the policy's `logOutputs`
(`webhook.core.logoutputs`), chosen by the pod's annotation, a rule, or the policy's default:
`pipeline_outputs` renders it, and `pipeline_filters` the pod's metadata every record sent
directly needs (stdout needs none: the node's collector knows the pod).

Fluent Bit 4.2.0 facts this relies on (tests/test_fluentbit_real.py runs them):

- `path` takes several globs separated by commas; a file two globs match is read once.
- Its glob is glob(3): `*`, `?` and `[...]` within one path segment; `**` is a plain `*` (one
  directory level, not recursion), so it is refused rather than misunderstood.
- An unknown `multiline.parser` stops Fluent Bit at start (exit 255); `--dry-run` misses it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Final

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from webhook.core.logoutputs import STDOUT, LogOutput, output_entries, record_filters

# Where the watcher reads its configuration: a downwardAPI volume of the watcher alone.
CONFIG_DIR: Final = "/etc/log-watcher"
CONFIG_FILE: Final = "fluent-bit.yaml"  # Fluent Bit picks its YAML reader by the extension
CONFIG_PATH: Final = f"{CONFIG_DIR}/{CONFIG_FILE}"

# Fluent Bit's built-in multiline parsers (all present in 4.2.0), and `none`.
NO_MULTILINE: Final = "none"
MULTILINE_PARSERS: Final = (NO_MULTILINE, "java", "python", "go", "ruby", "docker", "cri")
STDOUT_FORMATS: Final = ("json_lines", "json", "json_stream", "msgpack")

# Hard bounds on `outrigger.dev/log-files`: they keep the generated file (an annotation) small;
# a template may only lower them.
MAX_FILE_PATTERNS: Final = 8
MAX_PATTERN_CHARS: Final = 128
DEFAULT_FILES: Final = ("*.log",)
_PATTERN = re.compile(r"^[A-Za-z0-9._*?\[\]/-]+$")
GLOBS_ACCEPTED: Final = (
    f"a comma-separated list of at most {MAX_FILE_PATTERNS} file patterns relative to the log "
    f"path, each at most {MAX_PATTERN_CHARS} characters of letters, digits, . _ - / and the "
    "wildcards * ? [ ] (such as *.log, requests/*.log, app.out); no leading /, no '..' or "
    "empty segment, no '**' (Fluent Bit matches one directory level per '*')"
)

# The record stream every input is tagged with, and every output matches.
TAG: Final = "app.logs"
_SIZE_KB = r"[1-9][0-9]{0,6}k"
# Fluent Bit's tail: its default buffer_chunk_size, below which buffer_max_size is refused.
TAIL_CHUNK_BYTES: Final = 32768
_SIZE_MB = r"[1-9][0-9]{0,3}MB"


class LogWatcherSettings(BaseModel):
    """The template's `logWatcher:` block: what a platform team tunes, as data.

    `logPath`, `files`, `multiline` and `format` are literals or one `${parameter}` (checked
    at policy load, in `SidecarTemplate`); the rest are the pipeline's guarantees: no line
    lost, none shipped twice, a bounded buffer.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Where the logs are read: one ${parameter} of type path, or a literal; the mountPath of
    # one of the container's volumeMounts.
    logPath: str
    # Which files below logPath: one ${parameter} of type globs, or a literal. None: *.log.
    files: str | None = None
    # Fluent Bit's multiline parser: none, java, python, go, ruby, docker or cri, or one
    # ${parameter} whose enum lists only those.
    multiline: str = NO_MULTILINE
    # The stdout output's format: json_lines, json, json_stream or msgpack, or one such
    # ${parameter}.
    format: str = "json_lines"
    # Read positions (tail.db): the mountPath of a writable volumeMount of a volume of the
    # template's own (not one of appVolumeMounts), kept across the watcher's restarts.
    stateDir: Annotated[str, Field(pattern=r"^/[A-Za-z0-9._/-]*$")] = "/var/lib/log-watcher"
    # Seconds between looks for new files matching the patterns.
    refreshInterval: Annotated[int, Field(ge=1, le=60)] = 1
    # Seconds a rotated (renamed) file is still read, for the lines written before the rename.
    rotateWait: Annotated[int, Field(ge=1, le=3600)] = 30
    # The input's buffer: past it, tail pauses instead of growing past the memory limit. A
    # quarter of the container's memory limit at most, whatever this says.
    memBufLimit: Annotated[str, Field(pattern=f"^{_SIZE_MB}$")] = "16MB"
    # The longest line read whole; a longer one is truncated, not the file skipped. At least
    # 33k: Fluent Bit's k is 1000 bytes, and tail refuses to start below its 32768-byte
    # buffer_chunk_size ("buffer_max_size must be >= buffer_chunk").
    bufferMaxSize: Annotated[str, Field(pattern=f"^{_SIZE_KB}$")] = "256k"

    @field_validator("bufferMaxSize")
    @classmethod
    def _not_below_a_chunk(cls, size: str) -> str:
        if int(size.removesuffix("k")) * 1000 < TAIL_CHUNK_BYTES:
            raise ValueError(
                f"must be at least 33k (Fluent Bit's tail reads {TAIL_CHUNK_BYTES} bytes at once)"
            )
        return size

    # Native placement with a multiline parser: the preStop sleep is at least this. Fluent
    # Bit holds a record's last lines until more come or ~5 s pass, and drops them at
    # SIGTERM: a Job's final stack trace needs 7 s from its write (new file) to be shipped.
    multilinePreStopSleep: Annotated[int, Field(ge=0, le=300)] = 10
    # The most patterns outrigger.dev/log-files may list: a policy may only lower it.
    maxFilePatterns: Annotated[int, Field(ge=1, le=MAX_FILE_PATTERNS)] = MAX_FILE_PATTERNS
    # The longest pattern outrigger.dev/log-files may hold: a policy may only lower it.
    maxPatternLength: Annotated[int, Field(ge=1, le=MAX_PATTERN_CHARS)] = MAX_PATTERN_CHARS
    # Which of the policy's logOutputs: one ${parameter} of type string (the pod's choice,
    # no default, so that a rule's or the policy's default applies without it), or a literal
    # name (every pod of this template ships there). None: a rule's choice, else the default.
    output: str | None = None

    @property
    def db(self) -> str:
        return f"{self.stateDir.rstrip('/')}/tail.db"


@dataclass(frozen=True, slots=True)
class WatcherConfig:
    """One pod's watcher: the settings with the pod's values in."""

    settings: LogWatcherSettings
    log_path: str
    files: tuple[str, ...] = DEFAULT_FILES
    multiline: str = NO_MULTILINE
    format: str = "json_lines"
    output: LogOutput = field(default_factory=lambda: LogOutput(type="stdout"))
    # The app containers that write the files read: a record's `container` (see
    # `record_filters`); only an output other than stdout uses them.
    containers: tuple[str, ...] = ()


def parse_globs(text: str) -> tuple[str, ...] | None:
    """The patterns of `outrigger.dev/log-files`, each once in order; None when invalid."""
    patterns = [pattern.strip() for pattern in text.split(",")]
    if not 1 <= len(patterns) <= MAX_FILE_PATTERNS or not all(map(_valid_pattern, patterns)):
        return None
    return tuple(dict.fromkeys(patterns))


def _valid_pattern(pattern: str) -> bool:
    segments = pattern.split("/")
    return (
        len(pattern) <= MAX_PATTERN_CHARS
        and _PATTERN.fullmatch(pattern) is not None
        and "**" not in pattern
        and all(segment not in ("", ".", "..") for segment in segments)
    )


def config_yaml(config: WatcherConfig) -> str:
    """The configuration file's text (YAML, every value a string, as Fluent Bit reads them)."""
    pipeline: dict[str, Any] = {"inputs": pipeline_inputs(config)}
    filters = pipeline_filters(config)
    if filters:
        pipeline["filters"] = filters
    pipeline["outputs"] = pipeline_outputs(config)
    document = {"service": {"flush": "1", "grace": "5"}, "pipeline": pipeline}
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False, width=1 << 16)


def pipeline_inputs(config: WatcherConfig) -> list[dict[str, str]]:
    """The one `tail` input: every setting that keeps a line from being lost or read twice."""
    settings = config.settings
    tail = {
        "name": "tail",
        "tag": TAG,
        "path": ",".join(f"{config.log_path}/{pattern}" for pattern in config.files),
        "read_from_head": "true",
        "refresh_interval": str(settings.refreshInterval),
        "db": settings.db,
        "mem_buf_limit": settings.memBufLimit,
        "buffer_max_size": settings.bufferMaxSize,
        "truncate_long_lines": "on",
        "rotate_wait": str(settings.rotateWait),
    }
    if config.multiline != NO_MULTILINE:
        tail["multiline.parser"] = config.multiline
    return [tail]


def pipeline_filters(config: WatcherConfig) -> list[dict[str, Any]]:
    """What a record sent directly needs to be found again: its namespace, pod, container
    and node (none for stdout, whose collector knows the pod)."""
    return record_filters(config.output, config.containers, TAG)


def pipeline_outputs(config: WatcherConfig) -> list[dict[str, Any]]:
    """Where records go: stdout in the template's `format`, for the node's log collection, or
    the chosen output of the policy."""
    if config.output.type == STDOUT:
        return [{"name": "stdout", "match": TAG, "format": config.format}]
    return output_entries(config.output, TAG)


def pattern_problem(settings: LogWatcherSettings, patterns: tuple[str, ...]) -> str | None:
    """Why the pod's patterns exceed the template's own (lower) bounds, or None."""
    if len(patterns) > settings.maxFilePatterns:
        return f"{len(patterns)} patterns, the cluster policy accepts {settings.maxFilePatterns}"
    longest = max(len(pattern) for pattern in patterns)
    if longest > settings.maxPatternLength:
        return (
            f"a pattern of {longest} characters, the cluster policy accepts "
            f"{settings.maxPatternLength}"
        )
    return None
