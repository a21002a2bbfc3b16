"""Build step of the package: compiles the per-review hot path to C with mypyc.

The modules listed under `[tool.outrigger] compiled` in pyproject.toml (the injector, the
differ, the review envelope and what they call per review) are type-checked Python that mypyc
turns into C extensions: a review of a pod never seen before takes about 40% less time in
process, and the server about a fifth less CPU per such request
(docs/operators/performance.md). Nothing else changes: the same sources, run interpreted when
not compiled.

OUTRIGGER_COMPILE: "1" compiles and fails without mypyc or a C compiler (the Makefile and the
Dockerfile); "0" builds pure Python; unset compiles where mypyc can be imported, else builds
pure Python and says so.
"""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from setuptools import setup

ROOT = Path(__file__).resolve().parent
GROUP = "outrigger_native"


def compiled_sources() -> list[str]:
    """The modules to compile, as paths from the project root."""
    with (ROOT / "pyproject.toml").open("rb") as file:
        modules: list[str] = tomllib.load(file)["tool"]["outrigger"]["compiled"]
    return [module.replace(".", "/") + ".py" for module in modules]


def extension_modules() -> list[Any]:
    setting = os.environ.get("OUTRIGGER_COMPILE", "")
    if setting == "0":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        if setting == "1":
            raise
        print("outrigger: mypyc is not installed, building pure Python", file=sys.stderr)
        return []
    # One shared library, named for the project (not for a hash of the module list, which
    # would leave a library behind each time the list changes).
    return list(mypycify(compiled_sources(), opt_level="3", group_name=GROUP))


setup(ext_modules=extension_modules())
