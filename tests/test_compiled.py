"""The hot path is compiled: the modules pyproject.toml lists under `[tool.outrigger] compiled`
are what the suite (and the server) import from their mypyc extensions, so the tests test
what ships; and the list names modules of the package."""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import tomllib

import pytest

from tests.conftest import ROOT
from webhook.serving.server import hot_path


def compiled_modules() -> list[str]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        modules: list[str] = tomllib.load(file)["tool"]["outrigger"]["compiled"]
    return modules


@pytest.mark.parametrize("module", compiled_modules())
def test_each_listed_module_is_a_module_of_the_package(module: str) -> None:
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file()


@pytest.mark.skipif(
    os.environ.get("OUTRIGGER_COMPILE") == "0", reason="OUTRIGGER_COMPILE=0: pure Python asked for"
)
@pytest.mark.parametrize("module", compiled_modules())
def test_each_listed_module_is_imported_compiled(module: str) -> None:
    path = importlib.import_module(module).__file__ or ""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    assert path.endswith(suffixes), f"{module} runs interpreted ({path}): run make"


@pytest.mark.skipif(
    os.environ.get("OUTRIGGER_COMPILE") == "0", reason="OUTRIGGER_COMPILE=0: pure Python asked for"
)
def test_the_server_reports_the_hot_path_compiled() -> None:
    assert hot_path() == "compiled"


@pytest.mark.skipif(
    os.environ.get("OUTRIGGER_COMPILE") == "0", reason="OUTRIGGER_COMPILE=0: pure Python asked for"
)
def test_the_records_of_a_review_are_read_only() -> None:
    """A memoised answer (`Mutation`) is shared by every pod of its shape: compiled, no field
    of it, or of the other records a review makes, can be written (their fields are Final,
    which mypyc enforces at run time; interpreted, mypy does)."""
    from webhook.admission.review import AdmissionRequest, Mutation, OwnerReference, Verdict
    from webhook.core.injector import Injection, RequestContext

    records = [
        (Mutation("patch", (), ("log-watcher",), "injected"), "patch"),
        (AdmissionRequest("uid", "shop", b"{}", "web-"), "pod_json"),
        (Verdict("injected", "injected"), "outcome"),
        (Injection({}, "injected"), "pod"),
        (RequestContext("shop"), "namespace"),
        (OwnerReference("apps/v1", "ReplicaSet", "web", "uid"), "uid"),
    ]
    for record, field in records:
        with pytest.raises(AttributeError):
            setattr(record, field, "changed")
        assert getattr(record, field) != "changed"
