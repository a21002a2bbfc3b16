"""The log-watcher's generated Fluent Bit configuration, as the default and the docs' example
policies write it, and the annotations that choose its files and multiline parser.

Fluent Bit accepts misspelt keys in its configuration (and `--dry-run` passes them), so a
typo would only show in a running pod (a property silently ignored: positions not kept, long
lines skipping the file). tests/test_fluentbit_real.py runs the default policy's watcher;
these checks cover every policy without running it: every key must be one Fluent Bit v4
documents for its plugin, the guarantees must all be there, and the read positions must lie
on a writable volume of the watcher's own (Fluent Bit exits with 255 when `db` is on the
read-only log mount).
"""

from __future__ import annotations

import posixpath
from typing import Any

import pytest
import yaml

from tests.conftest import FIXTURES
from webhook.core.injector import InjectionDenied, RequestContext, inject
from webhook.core.logwatcher import (
    CONFIG_PATH,
    MAX_FILE_PATTERNS,
    MAX_PATTERN_CHARS,
    LogWatcherSettings,
    WatcherConfig,
    config_yaml,
    parse_globs,
)
from webhook.core.policy import Policy, PolicyError, default_policy, load_policy, parse_policy
from webhook.limits import MAX_ANNOTATION_BYTES

# Fluent Bit v4 manual, "Tail" input and "Standard Output" output: configuration parameters
# (and the keys every plugin takes: name, tag, match).
DOCUMENTED = {
    "tail": {
        "name",
        "tag",
        "buffer_chunk_size",
        "buffer_max_size",
        "path",
        "path_key",
        "exclude_path",
        "offset_key",
        "read_from_head",
        "refresh_interval",
        "rotate_wait",
        "ignore_older",
        "skip_long_lines",
        "skip_empty_lines",
        "truncate_long_lines",
        "db",
        "db.sync",
        "db.locking",
        "db.journal_mode",
        "db.compare_filename",
        "mem_buf_limit",
        "key",
        "inotify_watcher",
        "parser",
        "multiline.parser",
        "docker_mode",
    },
    "stdout": {"name", "match", "format", "json_date_key", "json_date_format"},
}
SERVICE = {"flush", "grace", "log_level", "daemon", "parsers_file", "http_server"}
# What keeps the watcher from losing lines or shipping them twice (docs/app-teams/log-watcher.md).
REQUIRED = {
    "tail": {
        "db",
        "mem_buf_limit",
        "buffer_max_size",
        "truncate_long_lines",
        "rotate_wait",
        "read_from_head",
        "refresh_interval",
    },
    "stdout": {"format", "match"},
}
LOG_FILES = "outrigger.dev/log-files"
MULTILINE = "outrigger.dev/log-multiline"
CONFIG_ANNOTATION = "log-watcher.outrigger.dev/fluent-bit.yaml"

POLICIES = [
    pytest.param(default_policy(), id="default"),
    pytest.param(load_policy(FIXTURES / "policies" / "good-platform-team.yaml"), id="platform"),
]


def injected(policy: Policy, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    pod = {
        "metadata": {"annotations": {"outrigger.dev/inject": "log-watcher", **(annotations or {})}},
        "spec": {"containers": [{"name": "app", "image": "registry.example.com/app:1"}]},
    }
    result: dict[str, Any] = inject(pod, RequestContext("default"), policy).pod
    return result


def watcher_of(pod: dict[str, Any]) -> dict[str, Any]:
    spec = pod["spec"]
    (watcher,) = [
        c
        for c in [*spec.get("initContainers", ()), *spec["containers"]]
        if c["name"] == "log-watcher"
    ]
    return watcher


def config_of(pod: dict[str, Any]) -> dict[str, Any]:
    """The configuration the watcher reads: the annotation its downwardAPI volume projects."""
    document: dict[str, Any] = yaml.safe_load(pod["metadata"]["annotations"][CONFIG_ANNOTATION])
    return document


def tail_of(pod: dict[str, Any]) -> dict[str, str]:
    (tail,) = config_of(pod)["pipeline"]["inputs"]
    return tail  # type: ignore[no-any-return]


@pytest.mark.parametrize("policy", POLICIES)
def test_every_key_is_documented_and_every_guarantee_there(policy: Policy) -> None:
    config = config_of(injected(policy))
    assert set(config) == {"service", "pipeline"}
    assert set(config["service"]) <= SERVICE
    (tail,) = config["pipeline"]["inputs"]
    (stdout,) = config["pipeline"]["outputs"]
    for name, plugin in (("tail", tail), ("stdout", stdout)):
        assert plugin["name"] == name
        assert set(plugin) <= DOCUMENTED[name], set(plugin) - DOCUMENTED[name]
        assert REQUIRED[name] <= set(plugin), REQUIRED[name] - set(plugin)
        assert all(isinstance(value, str) for value in plugin.values()), plugin
    assert stdout["match"] == tail["tag"]


def test_the_default_guarantees_are_those_of_the_command_line_it_replaces() -> None:
    """The same values as the -p options of the template before the generated file."""
    tail = tail_of(injected(default_policy()))
    assert tail == {
        "name": "tail",
        "tag": tail["tag"],
        "path": "/var/log/app/*.log",
        "read_from_head": "true",
        "refresh_interval": "1",
        "db": "/var/lib/log-watcher/tail.db",
        "mem_buf_limit": "16MB",
        "buffer_max_size": "256k",
        "truncate_long_lines": "on",
        "rotate_wait": "30",
    }
    (stdout,) = config_of(injected(default_policy()))["pipeline"]["outputs"]
    assert stdout["format"] == "json_lines"


@pytest.mark.parametrize("policy", POLICIES)
def test_the_watcher_runs_the_file_projected_read_only_from_the_annotation(policy: Policy) -> None:
    pod = injected(policy)
    watcher = watcher_of(pod)
    assert [*watcher["command"], *watcher["args"]] == [
        "/fluent-bit/bin/fluent-bit",
        "-c",
        CONFIG_PATH,
    ]
    directory, name = posixpath.split(CONFIG_PATH)
    (mount,) = [m for m in watcher["volumeMounts"] if m["mountPath"] == directory]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["downwardAPI"]["items"] == [
        {
            "path": name,
            "fieldRef": {"fieldPath": f"metadata.annotations['{CONFIG_ANNOTATION}']"},
        }
    ]
    for app in pod["spec"]["containers"]:  # the watcher's alone
        assert mount["name"] not in {m["name"] for m in app.get("volumeMounts", ())}


@pytest.mark.parametrize("policy", POLICIES)
def test_read_positions_are_kept_on_a_writable_volume_of_the_watchers_own(policy: Policy) -> None:
    pod = injected(policy)
    watcher, spec, tail = watcher_of(pod), pod["spec"], tail_of(pod)
    directory = posixpath.dirname(tail["db"])
    (mount,) = [m for m in watcher["volumeMounts"] if m["mountPath"] == directory]
    assert mount.get("readOnly", False) is False
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert "sizeLimit" in volume["emptyDir"]
    for app in spec["containers"]:
        if app["name"] != "log-watcher":
            assert mount["name"] not in {m["name"] for m in app.get("volumeMounts", ())}
    # The log volume itself stays read-only for the watcher, and is bounded too.
    (logs,) = [m for m in watcher["volumeMounts"] if tail["path"].startswith(m["mountPath"] + "/")]
    assert logs["readOnly"] is True
    (log_volume,) = [v for v in spec["volumes"] if v["name"] == logs["name"]]
    assert "sizeLimit" in log_volume["emptyDir"]


# The annotations --------------------------------------------------------------------------


def test_the_files_a_pod_names_are_read_below_its_log_path() -> None:
    pod = injected(
        default_policy(),
        {"outrigger.dev/log-path": "/srv/logs", LOG_FILES: "*.log, requests/*.log,app.out"},
    )
    assert tail_of(pod)["path"] == "/srv/logs/*.log,/srv/logs/requests/*.log,/srv/logs/app.out"


@pytest.mark.parametrize("parser", ["java", "python", "go", "ruby", "docker", "cri"])
def test_a_multiline_parser_is_set_on_the_tail_input(parser: str) -> None:
    assert tail_of(injected(default_policy(), {MULTILINE: parser}))["multiline.parser"] == parser


def test_no_multiline_parser_by_default_nor_with_none() -> None:
    assert "multiline.parser" not in tail_of(injected(default_policy()))
    assert "multiline.parser" not in tail_of(injected(default_policy(), {MULTILINE: "none"}))


@pytest.mark.parametrize(
    "value",
    [
        "/var/log/*.log",  # leading /
        "../secrets/*",  # out of the log path
        "a/../b.log",
        "logs//a.log",  # an empty segment
        "logs/",
        "./a.log",
        "**/*.log",  # Fluent Bit's glob: one level, not recursion
        "a b.log",
        "$(id).log",
        "a.log,",  # an empty pattern
        ",".join(["a.log"] * (MAX_FILE_PATTERNS + 1)),
        "a" * (MAX_PATTERN_CHARS + 1),
        "app\n.log",
    ],
)
def test_bad_file_patterns_are_denied_naming_the_annotation_and_what_is_accepted(
    value: str,
) -> None:
    with pytest.raises(InjectionDenied) as denied:
        injected(default_policy(), {LOG_FILES: value})
    message = str(denied.value)
    assert message.startswith(f"annotation {LOG_FILES}: ")
    assert "comma-separated list of at most 8 file patterns" in message
    assert "no '**'" in message and denied.value.reason == "invalid-annotation"


def test_an_unknown_multiline_parser_is_denied_with_the_choices() -> None:
    with pytest.raises(InjectionDenied) as denied:
        injected(default_policy(), {MULTILINE: "kotlin"})
    assert str(denied.value) == (
        f"annotation {MULTILINE}: 'kotlin' is not accepted; expected one of: none, java, "
        "python, go, ruby, docker, cri (default none) (no control characters)"
    )


@pytest.mark.parametrize(
    ("text", "patterns"),
    [
        ("*.log", ("*.log",)),
        (" *.log , requests/*.log,app.out ", ("*.log", "requests/*.log", "app.out")),
        ("app-[0-9].log,?.txt", ("app-[0-9].log", "?.txt")),
        ("a.log,a.log", ("a.log",)),  # each once
        (",".join(f"{i}.log" for i in range(8)), tuple(f"{i}.log" for i in range(8))),
    ],
)
def test_good_file_patterns(text: str, patterns: tuple[str, ...]) -> None:
    assert parse_globs(text) == patterns


def test_a_template_may_accept_fewer_patterns_and_says_so() -> None:
    document = default_policy().model_dump(mode="json")
    watcher = document["sidecars"][0]
    watcher["logWatcher"] = {**watcher["logWatcher"], "maxFilePatterns": 2, "maxPatternLength": 8}
    policy = parse_policy(document)
    with pytest.raises(InjectionDenied, match=f"annotation {LOG_FILES}: 3 patterns, the cluster"):
        injected(policy, {LOG_FILES: "a.log,b.log,c.log"})
    with pytest.raises(InjectionDenied, match="a pattern of 9 characters, the cluster policy"):
        injected(policy, {LOG_FILES: "123456789"})
    assert tail_of(injected(policy, {LOG_FILES: "a.log,b.log"}))["path"].count(",") == 1


def test_the_largest_configuration_stays_a_small_annotation() -> None:
    """At most 8 patterns of 128 characters below a 1024-character log path: far below the
    bound the webhook keeps every annotation to (Kubernetes allows 256 KiB for them all)."""
    config = WatcherConfig(
        settings=default_policy().templates["log-watcher"].logWatcher,  # type: ignore[arg-type]
        log_path="/" + "l" * 1023,
        files=tuple(f"{i}" + "p" * (MAX_PATTERN_CHARS - 1) for i in range(MAX_FILE_PATTERNS)),
        multiline="python",
    )
    size = len(config_yaml(config).encode())
    assert 8 * 1024 < size < MAX_ANNOTATION_BYTES / 1.5


# The policy's logWatcher block ------------------------------------------------------------


def watcher_template(**changes: Any) -> dict[str, Any]:
    document = default_policy().model_dump(mode="json")
    watcher = document["sidecars"][0]
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            watcher[section] = {**watcher[section], field: value}
        else:
            watcher[section] = value
    return document


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"container": {**default_policy().templates["log-watcher"].container, "args": ["-v"]}},
            "remove container.args",
        ),
        ({"logWatcher__multiline": "kotlin"}, "logWatcher.multiline must be one of none, java"),
        (
            {"logWatcher__multiline": "${log-path}"},
            "logWatcher.multiline must be one ${parameter} of type string",
        ),
        (
            {"logWatcher__files": "${log-path}"},
            "logWatcher.files must be one ${parameter} of type globs",
        ),
        ({"logWatcher__logPath": "/elsewhere"}, "logWatcher.logPath must be the mountPath"),
        (
            {"logWatcher__stateDir": "/tmp"},
            "logWatcher.stateDir must be the mountPath of a writable",
        ),
        ({"logWatcher__format": "logfmt"}, "logWatcher.format must be one of json_lines"),
        ({"logWatcher__rotateWait": 0}, "rotateWait"),
        ({"logWatcher__bufferMaxSize": "256MB"}, "bufferMaxSize"),
        ({"logWatcher__maxFilePatterns": 9}, "maxFilePatterns"),
        ({"logWatcher__refresh_interval": 1}, "refresh_interval"),  # a typo
    ],
)
def test_a_bad_log_watcher_block_is_refused_at_load(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=message.replace("$", r"\$").replace("{", r"\{")):
        parse_policy(watcher_template(**changes))


def test_a_multiline_parameter_must_offer_only_fluent_bit_s_parsers() -> None:
    document = watcher_template()
    document["sidecars"][0]["parameters"]["multiline"]["enum"] = ["none", "java", "kotlin"]
    with pytest.raises(PolicyError, match="its parameter needs an enum within none, java"):
        parse_policy(document)


def test_the_state_must_not_be_on_a_volume_the_app_mounts() -> None:
    document = watcher_template(logWatcher__stateDir="/var/log/app")
    mounts = document["sidecars"][0]["container"]["volumeMounts"]
    mounts[0] = {**mounts[0], "mountPath": "/var/log/app", "readOnly": False}
    document["sidecars"][0]["logWatcher"]["logPath"] = "/var/log/app"
    with pytest.raises(PolicyError, match="stateDir must be the mountPath of a writable"):
        parse_policy(document)


def test_settings_defaults_are_the_documented_guarantees() -> None:
    settings = LogWatcherSettings(logPath="/var/log/app")
    assert (settings.refreshInterval, settings.rotateWait) == (1, 30)
    assert (settings.memBufLimit, settings.bufferMaxSize, settings.db) == (
        "16MB",
        "256k",
        "/var/lib/log-watcher/tail.db",
    )


def test_a_template_without_the_block_keeps_its_own_args() -> None:
    """A generic template (the platform policy's config-reloader) is rendered as before."""
    policy = load_policy(FIXTURES / "policies" / "good-platform-team.yaml")
    pod = {
        "metadata": {"annotations": {"outrigger.dev/inject": "config-reloader"}},
        "spec": {"containers": [{"name": "app", "image": "registry.example.com/app:1"}]},
    }
    result = inject(pod, RequestContext("default"), policy).pod
    (reloader,) = result["spec"]["initContainers"]
    assert reloader["args"] == ["--watch=/etc/app", "--interval=30s"]
    assert set(result["metadata"]["annotations"]) == {
        "outrigger.dev/inject",
        "outrigger.dev/status",
    }


def pre_stop_sleep(pod: dict[str, Any]) -> int | None:
    sleep = watcher_of(pod).get("lifecycle", {}).get("preStop", {}).get("sleep", {})
    return sleep.get("seconds")  # type: ignore[no-any-return]


def test_with_a_multiline_parser_a_native_watcher_sleeps_longer_before_sigterm() -> None:
    """Fluent Bit drops a record's held lines at SIGTERM: a Job's final stack trace needs the
    multiline timeout to pass first (multilinePreStopSleep); classic placement keeps its
    stop delay, which the pod sets."""
    assert pre_stop_sleep(injected(default_policy())) == 3
    assert pre_stop_sleep(injected(default_policy(), {MULTILINE: "none"})) == 3
    assert pre_stop_sleep(injected(default_policy(), {MULTILINE: "java"})) == 10
    classic = parse_policy({**default_policy().model_dump(mode="json"), "nativeSidecars": False})
    assert pre_stop_sleep(injected(classic, {MULTILINE: "java"})) == 10  # the stop delay
    assert (
        pre_stop_sleep(
            injected(classic, {MULTILINE: "java", "outrigger.dev/log-watcher-stop-delay": "2"})
        )
        == 2
    )
