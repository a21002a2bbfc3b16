"""The references in docs/reference/, generated from the code: `make docs` writes them, and
`python -m tools.reference --check` (which tests/test_docs_reference.py runs) fails naming
every page that is out of date.

Each page is a function of the code alone (sorted or in the code's own order, no dates, no
environment), so that a page differs from the generator's output only when someone changed
the code, or the page by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from tools.reference import ambassador, chart_values, cli, pod_annotations, policy
from tools.reference.markdown import COMMAND

ROOT = Path(__file__).resolve().parents[2]
DIRECTORY = Path("docs") / "reference"
__all__ = ["COMMAND", "PAGES", "ROOT", "generate", "stale", "write"]

PAGES: dict[str, Callable[[], str]] = {
    "annotations.md": pod_annotations.render,
    "policy.md": policy.render,
    "ambassador.md": ambassador.render,
    "cli.md": cli.render,
    "chart-values.md": chart_values.render,
}


def generate() -> dict[Path, str]:
    """Every page's text, by its path relative to the repository's root."""
    return {DIRECTORY / name: render().rstrip("\n") + "\n" for name, render in PAGES.items()}


def stale(root: Path = ROOT) -> list[Path]:
    """The pages whose file is missing or differs from what the code generates."""
    return list(_changed(root, generate()))


def write(root: Path = ROOT) -> list[Path]:
    """Write the pages that changed; returns them."""
    pages = generate()
    changed = list(_changed(root, pages))
    for path in changed:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(pages[path], encoding="utf-8")
    return changed


def _changed(root: Path, pages: dict[Path, str]) -> Iterator[Path]:
    return (path for path, text in pages.items() if _read(root / path) != text)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
