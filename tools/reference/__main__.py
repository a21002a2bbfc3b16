"""`python -m tools.reference [--check]`: write docs/reference/, or check it is up to date."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tools.reference import COMMAND, ROOT, stale, write


def main(argv: Sequence[str] | None = None, root: Path = ROOT) -> int:
    """`root`: the repository whose docs/reference/ is written or checked."""
    parser = argparse.ArgumentParser(prog="python -m tools.reference", description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 naming the stale pages"
    )
    if parser.parse_args(argv).check:
        pages = stale(root)
        for page in pages:
            print(f"{page} is out of date: run `{COMMAND}`", file=sys.stderr)
        return 1 if pages else 0
    for page in write(root):
        print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
