"""The import contracts in pyproject.toml (`lint-imports`) hold, and they would catch a break.

`make test` runs `lint-imports` on the tree itself; these tests prove the contracts are armed:
a copy of the package with one forbidden import added must fail, naming the import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    # The copy is found first on the path, not the installed (editable) package.
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _copy(tmp_path: Path) -> Path:
    shutil.copytree(
        ROOT / "webhook", tmp_path / "webhook", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _add_import(module: Path, statement: str) -> None:
    text = module.read_text()
    marker = "from __future__ import annotations\n"
    assert marker in text
    module.write_text(text.replace(marker, f"{marker}\n{statement}  # noqa: F401\n", 1))


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    result = _lint(_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "statement", "expected"),
    [
        pytest.param(
            "core/injector.py",
            "from webhook.serving import server",
            "webhook.core is not allowed to import webhook.serving",
            id="core-imports-serving",
        ),
        pytest.param(
            "ambassador/envoy.py",
            "from webhook.core import policy",
            "webhook.ambassador is not allowed to import webhook.core",
            id="ambassador-imports-core",
        ),
        pytest.param(
            "admission/review.py",
            "from webhook.cluster import registration",
            "webhook.admission is not allowed to import webhook.cluster",
            id="admission-imports-cluster",
        ),
        pytest.param(
            "core/templates.py",
            "import fastapi",
            "webhook.core is not allowed to import fastapi",
            id="core-imports-fastapi",
        ),
        pytest.param(
            "core/parameters.py",
            "from webhook.core import annotations",
            "No cycles are allowed in webhook.core",
            id="cycle-in-core",
        ),
    ],
)
def test_a_forbidden_import_breaks_a_contract(
    tmp_path: Path, module: str, statement: str, expected: str
) -> None:
    tree = _copy(tmp_path)
    _add_import(tree / "webhook" / module, statement)
    result = _lint(tree)
    assert result.returncode != 0
    assert expected in result.stdout, result.stdout
