"""The real Fluent Bit, run as the webhook injects the log-watcher, to count what it ships.

The container comes from `inject` itself: its command and args verbatim (only the image's
binary path, `/fluent-bit/bin/fluent-bit`, is replaced by the local binary), its volume
mounts, its uid and gid, its read-only root. Each run is a private mount namespace
(`unshare --mount`) where every mount path is a bind mount of a per-test directory standing
for the pod's `emptyDir` (read-only where the mount says so), for a `downwardAPI` volume:
the files the kubelet projects from the pod's annotations (the generated configuration),
written from the injected pod's annotations, read-only, mode 0644, or for a `secret` volume:
the keys it selects of a Secret the test gives (`Kubelet.secrets`); the container's `env` is
resolved as the kubelet does (`fieldRef`s from the pod's name, namespace and node, and
`secretKeyRef`s from those Secrets; a missing one fails, as the container would not be
created) and is all the environment Fluent Bit gets besides PATH; the root filesystem is
remounted read-only, and Fluent Bit runs through `setpriv` as the container's uid and gid,
without capabilities or privilege escalation. The test plays the app: it writes log files into
the shared-logs directory directly.

The binary is not part of the project: `OUTRIGGER_FLUENTBIT` names it, or
`OUTRIGGER_KUBE_ASSETS` a folder holding `fluent-bit` (what `../shared/k8s/install.sh`
prints). Without either, or without root (mount namespaces), the tests are skipped.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from webhook.core.injector import RequestContext, inject
from webhook.core.policy import Policy

ENV_BINARY = "OUTRIGGER_FLUENTBIT"
ENV_ASSETS = "OUTRIGGER_KUBE_ASSETS"
HOW = (
    f"the real Fluent Bit tests need its binary: set {ENV_BINARY}=/path/to/fluent-bit "
    f"or {ENV_ASSETS}=$(../shared/k8s/install.sh)"
)
WATCHER = "log-watcher"
IMAGE_BINARY = "/fluent-bit/bin/fluent-bit"
GRACE = 5.0  # Fluent Bit's default shutdown grace (`Grace`), what a stop may take
SLACK = 10.0  # on top of any wait, for a slow or loaded machine
FLUSH = 1.0  # Fluent Bit's default `Flush`: records read are printed once a second
TOOLS = ("unshare", "mount", "setpriv")


# Finding it -------------------------------------------------------------------------------


def configured_binary() -> Path | None:
    """The binary the environment names, if it names one."""
    if os.environ.get(ENV_BINARY):
        return Path(os.environ[ENV_BINARY])
    if os.environ.get(ENV_ASSETS):
        return Path(os.environ[ENV_ASSETS]) / "fluent-bit"
    return None


def skip_reason() -> str | None:
    """Why these tests cannot run here, in one line, or None."""
    binary = configured_binary()
    if binary is None:
        return HOW
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        return f"{HOW} ({binary} is not an executable file)"
    if os.geteuid() != 0:
        return "the real Fluent Bit runs in a private mount namespace: root only (CI is root)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"the real Fluent Bit tests need util-linux's {', '.join(missing)}"
    return None


SKIP_REASON = skip_reason()


@functools.cache
def binary() -> Path:
    """The configured binary, or a copy that another uid can run: one under a 0700 directory
    (such as ~/.cache) cannot be reached by uid 65534."""
    found = configured_binary()
    assert found is not None, HOW
    if all(os.stat(p).st_mode & stat.S_IXOTH for p in [found, *found.parents]):
        return found
    directory = world_traversable_dir("outrigger-fluentbit-bin-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    copy = directory / "fluent-bit"
    shutil.copy2(found, copy)
    copy.chmod(0o755)
    return copy


def version() -> str:
    """`fluent-bit --version`'s first line's version, e.g. 4.2.0."""
    out = subprocess.run(
        [binary(), "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    return out.split()[2].removeprefix("v")


def world_traversable_dir(prefix: str) -> Path:
    """A fresh directory in the system temp dir (1777), not under pytest's 0700 tmp_path."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    directory.chmod(0o755)
    return directory


# The container the webhook injects ----------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    volume: str
    path: str
    read_only: bool
    # A downwardAPI volume: each file's path in it and its text (the annotation it projects).
    projected: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class WatcherSpec:
    """What of the injected container decides how Fluent Bit runs."""

    image: str
    argv: tuple[str, ...]
    mounts: tuple[Mount, ...]
    uid: int
    gid: int
    read_only_root: bool
    log_volume: str  # the volume the app containers mount too: where they write
    pre_stop_sleep: int  # seconds of its preStop sleep: the kubelet's SIGTERM comes after
    env: tuple[tuple[str, str], ...] = ()  # the container's env, resolved by the kubelet


@dataclass(frozen=True)
class Kubelet:
    """What the kubelet knows when it creates the container: the pod's name (the API server
    makes it from generateName), namespace and node, and the Secrets of the namespace."""

    pod_name: str = "app-x7k2q"
    namespace: str = "default"
    node_name: str = "node-1"
    secrets: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def field_value(self, path: str) -> str:
        """A downward API `fieldRef` value; the paths the injection uses only."""
        fields = {
            "metadata.name": self.pod_name,
            "metadata.namespace": self.namespace,
            "spec.nodeName": self.node_name,
        }
        assert path in fields, f"no downward API value for {path} here"
        return fields[path]

    def secret(self, name: str, key: str) -> str:
        """A Secret's key; a missing one fails, as the kubelet refuses the container."""
        assert name in self.secrets, f"Secret {name!r} not found in {self.namespace}"
        assert key in self.secrets[name], f"Secret {name!r} has no key {key!r}"
        return self.secrets[name][key]


def injected_pod(
    policy: Policy,
    security: dict[str, Any] | None = None,
    annotations: dict[str, str] | None = None,
    namespace: str = "default",
) -> dict[str, Any]:
    """A pod asking for the log-watcher (with the pod `security` context and more
    `annotations` when given), as the webhook returns it for `namespace`."""
    pod: dict[str, Any] = {
        "metadata": {
            "generateName": "app-",
            "annotations": {"outrigger.dev/inject": WATCHER, **(annotations or {})},
        },
        "spec": {"containers": [{"name": "app", "image": "registry.example.com/app:1"}]},
    }
    if security:
        pod["spec"]["securityContext"] = security
    result: dict[str, Any] = inject(pod, RequestContext(namespace), policy).pod
    return result


def watcher_spec(pod: dict[str, Any], kubelet: Kubelet | None = None) -> WatcherSpec:
    """The log-watcher of an injected pod, as `kubelet` creates it; every volume it mounts
    must be an emptyDir, a downwardAPI volume of the pod's annotations, or a Secret's."""
    kubelet = kubelet or Kubelet()
    spec = pod["spec"]
    watcher = next(
        c for c in [*spec.get("initContainers", ()), *spec["containers"]] if c["name"] == WATCHER
    )
    volumes = {v["name"]: v for v in spec["volumes"]}
    annotations = pod["metadata"].get("annotations", {})
    mounts = tuple(
        Mount(
            m["name"],
            m["mountPath"],
            bool(m.get("readOnly")),
            projected(volumes[m["name"]], annotations) or secret_files(volumes[m["name"]], kubelet),
        )
        for m in watcher["volumeMounts"]
    )
    assert all("emptyDir" in volumes[m.volume] or m.projected for m in mounts), mounts
    app_volumes = {m["name"] for c in spec["containers"] for m in c.get("volumeMounts", ())}
    security = watcher["securityContext"]
    return WatcherSpec(
        image=watcher["image"],
        argv=(*watcher["command"], *watcher.get("args", ())),
        mounts=mounts,
        uid=security["runAsUser"],
        gid=security.get("runAsGroup", security["runAsUser"]),
        read_only_root=bool(security.get("readOnlyRootFilesystem")),
        log_volume=next(m.volume for m in mounts if m.volume in app_volumes),
        pre_stop_sleep=watcher.get("lifecycle", {})
        .get("preStop", {})
        .get("sleep", {})
        .get("seconds", 0),
        env=tuple((e["name"], resolved(e, kubelet)) for e in watcher.get("env", ())),
    )


def resolved(variable: dict[str, Any], kubelet: Kubelet) -> str:
    """An `env` entry's value as the kubelet sets it: literal, `fieldRef` or `secretKeyRef`."""
    if "value" in variable:
        return str(variable["value"])
    source = variable["valueFrom"]
    if "fieldRef" in source:
        return kubelet.field_value(source["fieldRef"]["fieldPath"])
    reference = source["secretKeyRef"]
    return kubelet.secret(reference["name"], reference["key"])


def secret_files(volume: dict[str, Any], kubelet: Kubelet) -> tuple[tuple[str, str], ...]:
    """The files the kubelet writes into a `secret` volume (the `items` it selects, else
    every key); () for any other volume."""
    secret = volume.get("secret")
    if secret is None:
        return ()
    name = secret["secretName"]
    items = secret.get("items") or [{"key": k, "path": k} for k in kubelet.secrets.get(name, {})]
    return tuple((item["path"], kubelet.secret(name, item["key"])) for item in items)


def projected(volume: dict[str, Any], annotations: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The files the kubelet writes into a downwardAPI volume, from the pod's annotations
    (`metadata.annotations['KEY']` fields only); () for any other volume. An annotation the
    pod lacks fails here, as the kubelet fails the container."""
    files = []
    for item in volume.get("downwardAPI", {}).get("items", ()):
        match = re.fullmatch(r"metadata\.annotations\['(.+)'\]", item["fieldRef"]["fieldPath"])
        assert match, item
        files.append((item["path"], annotations[match[1]]))
    return tuple(files)


def config(spec: WatcherSpec) -> dict[str, Any]:
    """The Fluent Bit configuration the container's `-c` names, as it will read it."""
    command, flag, path = spec.argv
    assert (command, flag) == (IMAGE_BINARY, "-c"), spec.argv
    for mount in spec.mounts:
        for name, text in mount.projected:
            if f"{mount.path}/{name}" == path:
                document: dict[str, Any] = yaml.safe_load(text)
                return document
    raise AssertionError(f"{path} is not a file of the watcher's mounts")


def tail_properties(spec: WatcherSpec) -> dict[str, str]:
    """The properties of the configuration's one `tail` input."""
    (tail,) = config(spec)["pipeline"]["inputs"]
    assert tail["name"] == "tail", tail
    return {key: str(value) for key, value in tail.items()}


def fluentbit_bytes(size: str) -> int:
    """A size as Fluent Bit reads it: its units are decimal, 256k is 256,000 bytes."""
    match = re.fullmatch(r"(\d+)([kmg]?)b?", size.lower())
    assert match, size
    return int(match[1]) * int(1000 ** " kmg".index(match[2] or " "))


@contextmanager
def mount_points(spec: WatcherSpec) -> Iterator[None]:
    """The mount paths as empty host directories, which `mount --bind` needs; those this made
    are removed afterwards (the binds themselves never leave the private namespace)."""
    made: list[Path] = []
    try:
        for mount in spec.mounts:
            missing = [p for p in [Path(mount.path), *Path(mount.path).parents] if not p.exists()]
            for directory in reversed(missing):
                directory.mkdir()
                made.append(directory)
        yield
    finally:
        for directory in reversed(made):
            with suppress(OSError):  # still in use by another session's namespace
                directory.rmdir()


# Running it ---------------------------------------------------------------------------------


@dataclass
class Run:
    """One Fluent Bit process: its stdout (the shipped records) and stderr in files."""

    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def records(self) -> list[dict[str, Any]]:
        """Every complete JSON line printed so far."""
        text = self.stdout.read_bytes().decode()
        complete = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line]

    def logs(self) -> list[str]:
        return [record["log"] for record in self.records()]

    def wait_for(self, count: int, seconds: float = FLUSH + SLACK) -> list[str]:
        """The shipped lines once there are at least `count`, polling, within `seconds`."""
        deadline = time.monotonic() + seconds
        while len(shipped := self.logs()) < count:
            if self.process.poll() is not None:
                raise AssertionError(f"fluent-bit exited ({self.process.returncode}):\n{self.tail}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(shipped)}/{count} lines in {seconds} s:\n{self.tail}")
            time.sleep(0.05)
        return shipped

    def stop(self, seconds: float = GRACE + SLACK) -> int:
        """SIGTERM, as the kubelet stops a container; its exit code, killed past `seconds`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"fluent-bit still running {seconds} s after SIGTERM") from None

    def stop_as_the_kubelet(self, spec: WatcherSpec) -> int:
        """What the kubelet does to the container once the app has exited (native) or the
        pod is deleted (classic): its preStop sleep, then SIGTERM."""
        time.sleep(spec.pre_stop_sleep)
        return self.stop()

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=SLACK)

    @property
    def tail(self) -> str:
        return self.stderr.read_text(errors="replace")[-3000:]


@dataclass
class Pod:
    """A pod's emptyDirs for the watcher, and the watcher runs that share them."""

    spec: WatcherSpec
    root: Path = field(default_factory=lambda: world_traversable_dir("outrigger-fluentbit-"))
    runs: list[Run] = field(default_factory=list)

    def __post_init__(self) -> None:
        (self.root / "volumes").mkdir(mode=0o755)
        for mount in self.spec.mounts:
            self.volume(mount.volume).mkdir(mode=0o777)
            self.volume(mount.volume).chmod(0o777)  # as the kubelet makes an emptyDir
            for name, text in mount.projected:
                file = self.volume(mount.volume) / name
                file.write_text(text, encoding="utf-8")
                file.chmod(0o644)  # the downwardAPI volume's defaultMode

    def volume(self, name: str) -> Path:
        return self.root / "volumes" / name

    @property
    def logs(self) -> Path:
        """The shared log volume, where the app writes."""
        return self.volume(self.spec.log_volume)

    def start(self) -> Run:
        """A new watcher process (a container start, or a restart with the same volumes)."""
        index = len(self.runs)
        stdout, stderr = self.root / f"stdout.{index}", self.root / f"stderr.{index}"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", self.script()],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd="/",
                env={**dict(self.spec.env), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                start_new_session=True,
            )
        self.runs.append(Run(process, stdout, stderr))
        return self.runs[-1]

    def script(self) -> str:
        """Mounts as the container has them, then Fluent Bit as its user, nothing more."""
        lines = ["set -e"]
        for mount in self.spec.mounts:
            source, target = shlex.quote(str(self.volume(mount.volume))), shlex.quote(mount.path)
            lines.append(f"mount --bind {source} {target}")
            if mount.read_only:
                lines.append(f"mount -o remount,bind,ro {target}")
        if self.spec.read_only_root:
            lines.append("mount -o remount,bind,ro /")
        lines.append(shlex.join(["exec", *self.as_user(), *self.argv()]))
        return "\n".join(lines)

    def as_user(self) -> list[str]:
        uid, gid = str(self.spec.uid), str(self.spec.gid)
        return [
            *("setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"),
            *("--no-new-privs", "--bounding-set=-all", "--inh-caps=-all", "--"),
        ]

    def argv(self) -> list[str]:
        """The container's command and args; the image's binary path is the local binary."""
        command, *args = self.spec.argv
        assert command == IMAGE_BINARY, f"not the image's fluent-bit: {command}"
        return [str(binary()), *args]

    def close(self) -> None:
        """Kill whatever still runs (a failed test), then remove the volumes."""
        for run in self.runs:
            run.kill()
        shutil.rmtree(self.root, ignore_errors=True)


# The app's side -----------------------------------------------------------------------------


def numbered(label: str, count: int) -> list[str]:
    """Unique lines, with what JSON must escape (quotes, backslash, tab) and non-ASCII text."""
    return [f'{label} {i:06d} "quoted" back\\slash\ttab ünïcødé ✓' for i in range(count)]


def write(path: Path, lines: list[str]) -> None:
    """Append whole lines, as an app logging to a file does."""
    with path.open("a", encoding="utf-8") as file:
        file.writelines(line + "\n" for line in lines)


def assert_once(shipped: list[str], written: list[str]) -> None:
    """Every written line shipped exactly once, intact: nothing lost, nothing twice."""
    got, want = Counter(shipped), Counter(written)
    lost, extra = want - got, got - want
    assert not lost and not extra, (
        f"{len(shipped)} shipped for {len(written)} written: "
        f"{lost.total()} lost (e.g. {_some(lost)}), "
        f"{extra.total()} extra or twice (e.g. {_some(extra)})"
    )


def _some(lines: Counter[str]) -> list[str]:
    return [line[:60] for line in sorted(lines)[:3]]
