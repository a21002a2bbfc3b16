"""The injected log-watcher, run: the real Fluent Bit with the container's exact command line,
mounts and user, and every line the app writes counted on its stdout.

Each test writes uniquely numbered lines into the shared log volume, as the app does, and
asserts the multiset shipped: every line once, none lost, none twice, content intact (quotes,
backslashes, tabs and non-ASCII text go through JSON). Waits poll stdout with a deadline;
nothing asserts how fast Fluent Bit is. See tests/real_fluentbit.py for how it runs, and
skips without OUTRIGGER_FLUENTBIT or OUTRIGGER_KUBE_ASSETS.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.real_fluentbit import (
    FLUSH,
    GRACE,
    SKIP_REASON,
    SLACK,
    Pod,
    Run,
    WatcherSpec,
    assert_once,
    fluentbit_bytes,
    injected_pod,
    mount_points,
    numbered,
    tail_properties,
    version,
    watcher_spec,
    write,
)
from webhook.core.logwatcher import MULTILINE_PARSERS
from webhook.core.policy import Policy, default_policy, parse_policy

if SKIP_REASON:  # one line for the module rather than one per test
    pytest.skip(SKIP_REASON, allow_module_level=True)

pytestmark = pytest.mark.fluentbit

LOG_FILES = "outrigger.dev/log-files"
MULTILINE = "outrigger.dev/log-multiline"


@pytest.fixture(scope="module")
def spec() -> Iterator[WatcherSpec]:
    """The default policy's log-watcher, as `inject` writes it, its mount points present."""
    watcher = watcher_spec(injected_pod(default_policy()))
    with mount_points(watcher):
        yield watcher


@pytest.fixture
def pod(spec: WatcherSpec) -> Iterator[Pod]:
    """Fresh emptyDirs; whatever still runs at the end is killed, the volumes removed."""
    volumes = Pod(spec)
    yield volumes
    volumes.close()


def refresh_interval(spec: WatcherSpec) -> float:
    """How long a new file may wait to be found (the next scan of the glob)."""
    return float(tail_properties(spec)["refresh_interval"])


def started(pod: Pod, log: Path) -> Run:
    """A watcher that has found `log` (it shipped the line the file starts with)."""
    write(log, ["started"])
    run = pod.start()
    assert run.wait_for(1) == ["started"]
    return run


def app_writes(log: Path, lines: list[str], batch: int = 100) -> None:
    """An app logging steadily: whole lines in small batches, a few milliseconds apart."""
    for start in range(0, len(lines), batch):
        write(log, lines[start : start + batch])
        time.sleep(0.005)


def test_the_binary_is_the_release_the_template_pins(spec: WatcherSpec) -> None:
    """Otherwise these tests vouch for another Fluent Bit than the one pods run."""
    assert spec.image.rsplit(":", 1)[1] == version()


def test_steady_writing_is_shipped_once(pod: Pod) -> None:
    """The everyday case: an app appending to app.log while the watcher follows it."""
    log = pod.logs / "app.log"
    run = started(pod, log)
    lines = numbered("steady", 3000)
    app_writes(log, lines)
    run.wait_for(1 + len(lines))
    assert run.stop() == 0
    assert_once(run.logs(), ["started", *lines])


def test_rotation_by_rename_loses_nothing(pod: Pod) -> None:
    """The documented rotation: app.log renamed out of `*.log` (app.log.1), the app still
    writing to its open descriptor for a while (read for `rotate_wait`), then a new app.log
    (found by the next scan)."""
    log = pod.logs / "app.log"
    run = started(pod, log)
    before, after_rename, reopened = (numbered(k, 1000) for k in ("before", "old-fd", "new"))
    with log.open("a", encoding="utf-8") as app:
        app.writelines(line + "\n" for line in before)
        app.flush()
        log.rename(pod.logs / "app.log.1")
        app.writelines(line + "\n" for line in after_rename)
    app_writes(log, reopened)
    written = ["started", *before, *after_rename, *reopened]
    run.wait_for(len(written), refresh_interval(pod.spec) + SLACK)
    assert run.stop() == 0
    assert_once(run.logs(), written)


def test_a_long_line_is_truncated_and_the_file_read_on(pod: Pod) -> None:
    """`buffer_max_size` counts the newline and Fluent Bit's k is 1000: the longest line
    shipped whole is one byte short of it; a longer one is shipped as its first that many
    bytes, the rest dropped, and the next lines are read as usual."""
    limit = fluentbit_bytes(tail_properties(pod.spec)["buffer_max_size"]) - 1
    log = pod.logs / "app.log"
    run = started(pod, log)
    longest_whole = "whole " + "w" * (limit - len("whole "))
    too_long = "cut " + "x" * (300 * 1024)  # over 256 KiB too, what the docs once said
    lines = [*numbered("pre", 100), longest_whole, too_long, *numbered("post", 1000)]
    write(log, lines)
    run.wait_for(1 + len(lines))
    assert run.stop() == 0
    shipped = run.logs()
    assert too_long[:limit] in shipped
    assert_once(shipped, ["started", *[too_long[:limit] if s is too_long else s for s in lines]])


def test_a_restarted_watcher_goes_on_where_it_stopped(pod: Pod) -> None:
    """A container restart: a new process, the same volumes. The read positions in the state
    volume's db make the second run ship only what was written since."""
    log = pod.logs / "app.log"
    first_lines, while_down = numbered("first", 2000), numbered("down", 1500)
    first = started(pod, log)
    app_writes(log, first_lines)
    first.wait_for(1 + len(first_lines))
    assert first.stop() == 0
    app_writes(log, while_down)
    second = pod.start()
    second.wait_for(len(while_down))
    assert second.stop() == 0
    assert_once(first.logs(), ["started", *first_lines])
    assert_once(second.logs(), while_down)


def test_a_job_ends_and_its_last_lines_are_shipped(pod: Pod) -> None:
    """A Job's app exits and the kubelet sends the native sidecar SIGTERM at once: the lines
    the app logged up to its last write (to a file the watcher already follows) are all
    shipped, and Fluent Bit exits 0 within its grace."""
    log = pod.logs / "app.log"
    run = started(pod, log)
    lines = numbered("job", 2000)
    app_writes(log, lines, batch=50)
    assert run.stop(GRACE + SLACK) == 0
    assert "service has stopped (0 pending tasks)" in run.tail
    assert_once(run.logs(), ["started", *lines])


def test_what_is_unread_at_sigterm_is_not_shipped_but_nothing_else_is_lost(pod: Pod) -> None:
    """Fluent Bit stops reading at SIGTERM (its grace only prints what it has read): of a
    1 MB burst written just before, the part read is shipped in order, once; what is lost
    is the unread tail, nothing in between."""
    log = pod.logs / "app.log"
    run = started(pod, log)
    burst = numbered("burst", 20000)
    write(log, burst)
    assert run.stop() == 0
    shipped = run.logs()[1:]
    assert shipped == burst[: len(shipped)], "not a prefix of the burst: a line lost or twice"


# What real apps do (issue 19) ---------------------------------------------------------------

CLASSIC = parse_policy({**default_policy().model_dump(mode="json"), "nativeSidecars": False})


@contextmanager
def pod_of(spec: WatcherSpec) -> Iterator[Pod]:
    """The emptyDirs of a pod whose watcher is `spec`; whatever still runs is killed."""
    volumes = Pod(spec)
    assert all(Path(m.path).is_dir() for m in spec.mounts)  # made by the `spec` fixture
    try:
        yield volumes
    finally:
        volumes.close()


def running(pod: Pod) -> Run:
    """A watcher that has made its first scan of the log volume (nothing there yet)."""
    run = pod.start()
    deadline = time.monotonic() + SLACK
    while "worker #0 started" not in run.tail:
        assert run.process.poll() is None and time.monotonic() < deadline, run.tail
        time.sleep(0.05)
    time.sleep(0.2)  # the first scan comes with the start: the app's file is new after it
    return run


@pytest.mark.parametrize(
    ("policy", "annotations"),
    [
        pytest.param(default_policy(), {}, id="native"),
        # Classic: the pod is deleted, app and watcher get SIGTERM together; the stop delay
        # (10 s by default, 2 s here to keep the test short) is the watcher's preStop sleep.
        pytest.param(CLASSIC, {"outrigger.dev/log-watcher-stop-delay": "2"}, id="classic"),
    ],
)
def test_a_sub_second_job_ships_every_line(
    spec: WatcherSpec, policy: Policy, annotations: dict[str, str]
) -> None:
    """A Job's app creates a new file after the watcher started, writes 300 lines and exits
    at once; the kubelet then stops the watcher as its container says (native: the preStop
    sleep, then SIGTERM). Fluent Bit stops reading at SIGTERM and finds new files only at its
    scans: every line is shipped all the same, once, and it exits 0."""
    watcher = watcher_spec(injected_pod(policy, annotations=annotations))
    assert watcher.pre_stop_sleep > refresh_interval(watcher)  # to find the file and read it
    with pod_of(watcher) as pod:
        run = running(pod)
        lines = numbered("job", 300)
        write(pod.logs / "job.log", lines)  # the app's whole life
        assert run.stop_as_the_kubelet(watcher) == 0
        assert_once(run.logs(), lines)


@pytest.mark.parametrize("mode", [0o640, 0o600], ids=["umask-027", "umask-077"])
def test_files_private_to_the_app_s_user_are_read_as_that_user(
    spec: WatcherSpec, mode: int
) -> None:
    """An app running as uid 1000 that keeps its files to itself: the pod says so
    (securityContext.runAsUser), and the watcher reads as that user."""
    identity = {"runAsUser": 1000, "runAsGroup": 1000}
    watcher = watcher_spec(injected_pod(default_policy(), security=identity))
    assert (watcher.uid, watcher.gid) == (1000, 1000)
    with pod_of(watcher) as pod:
        log = pod.logs / "app.log"
        lines = numbered("private", 500)
        write(log, lines)
        os.chown(log, 1000, 1000)
        log.chmod(mode)
        run = pod.start()
        run.wait_for(len(lines))
        assert run.stop() == 0
        assert_once(run.logs(), lines)


def test_without_the_app_s_user_private_files_are_not_read(spec: WatcherSpec) -> None:
    """The same file where the pod does not say the app's user: the watcher reads as 65534
    and is refused (what the admission warning says), so the case above is no accident."""
    assert spec.uid == 65534
    with pod_of(spec) as pod:
        log = pod.logs / "app.log"
        write(log, numbered("private", 10))
        os.chown(log, 1000, 1000)
        log.chmod(0o600)
        run = pod.start()
        deadline = time.monotonic() + SLACK
        while "Permission denied" not in run.tail and time.monotonic() < deadline:
            time.sleep(0.05)
        assert run.stop() == 0
        assert run.logs() == [] and "Permission denied" in run.tail


# The generated configuration: records, files and multiline (issue 19) -----------------------


def test_records_are_the_date_and_the_line(pod: Pod) -> None:
    """What the node's log collection gets: one JSON object per line, the time and the line
    as written (no newline), nothing else, as the command-line options printed."""
    log = pod.logs / "app.log"
    run = started(pod, log)
    assert run.stop() == 0
    (record,) = run.records()
    assert set(record) == {"date", "log"} and record["log"] == "started"
    assert isinstance(record["date"], float)


FILES = "*.log, requests/*.log, app.out, app.log"  # app.log twice: *.log matches it too


def test_the_files_a_pod_names_are_each_shipped_once(spec: WatcherSpec) -> None:
    """outrigger.dev/log-files: a subdirectory and a name without .log are read; a file two
    patterns match is read once; what no pattern matches is not read."""
    watcher = watcher_spec(injected_pod(default_policy(), annotations={LOG_FILES: FILES}))
    with pod_of(watcher) as pod:
        (pod.logs / "requests").mkdir(mode=0o777)
        written = {
            "app.log": numbered("app", 200),
            "requests/get.log": numbered("requests", 200),
            "app.out": numbered("out", 200),
        }
        for name, lines in written.items():
            write(pod.logs / name, lines)
        write(pod.logs / "debug.txt", numbered("unmatched", 10))
        run = pod.start()
        run.wait_for(600)
        time.sleep(refresh_interval(watcher) + FLUSH)  # room for a second reading
        assert run.stop() == 0
        assert_once(run.logs(), [line for lines in written.values() for line in lines])


JAVA_TRACE = [
    'Exception in thread "main" java.lang.IllegalStateException: order 42 not found',
    *(f"\tat com.example.shop.Orders.find{i}(Orders.java:{100 + i})" for i in range(33)),
    "Caused by: java.sql.SQLException: connection reset",
    "\tat com.example.shop.Db.query(Db.java:7)",
    "\tat com.example.shop.Db.run(Db.java:3)",
    "\t... 33 more",
]


def test_a_java_stack_trace_is_one_record(spec: WatcherSpec) -> None:
    """outrigger.dev/log-multiline: java: the 38 lines of a trace ship as one record, the
    single lines around it one record each. Fluent Bit's multiline core keeps each line's
    newline in `log` (the docs say so)."""
    assert len(JAVA_TRACE) == 38
    watcher = watcher_spec(injected_pod(default_policy(), annotations={MULTILINE: "java"}))
    with pod_of(watcher) as pod:
        before, after = numbered("before", 5), numbered("after", 5)
        write(pod.logs / "app.log", [*before, *JAVA_TRACE, *after])
        run = pod.start()
        run.wait_for(11)
        time.sleep(FLUSH)  # nothing more comes
        assert run.stop() == 0
        expected = [*before, "\n".join(JAVA_TRACE), *after]
        assert run.logs() == [line + "\n" for line in expected]


@pytest.mark.parametrize("parser", MULTILINE_PARSERS)
def test_every_multiline_parser_offered_exists_in_this_fluent_bit(
    spec: WatcherSpec, parser: str
) -> None:
    """An unknown multiline.parser stops Fluent Bit at start (exit 255) and `--dry-run`
    misses it: each value the annotation accepts is run, and ships a line."""
    watcher = watcher_spec(injected_pod(default_policy(), annotations={MULTILINE: parser}))
    with pod_of(watcher) as pod:
        write(pod.logs / "app.log", ["one line", "another line"])
        run = pod.start()
        run.wait_for(1)
        assert run.stop() == 0, run.tail
        assert "not registered" not in run.tail


def test_a_job_s_final_stack_trace_is_shipped(spec: WatcherSpec) -> None:
    """A Job's app crashes: a new file, a line, then a trace, and it exits. Fluent Bit holds
    a record's last lines until more come or its multiline timeout (~5 s) passes, and drops
    them at SIGTERM (7 s from the write were needed in a measurement, 6 were not): with a
    multiline parser the native preStop sleep is longer, and the trace is shipped, once."""
    pod_ = injected_pod(default_policy(), annotations={MULTILINE: "java"})
    watcher = watcher_spec(pod_)
    assert watcher.pre_stop_sleep >= 7 + FLUSH
    with pod_of(watcher) as pod:
        run = running(pod)
        write(pod.logs / "job.log", ["starting", *JAVA_TRACE])  # the app's whole life
        assert run.stop_as_the_kubelet(watcher) == 0
        assert run.logs() == ["starting\n", "\n".join(JAVA_TRACE) + "\n"]
