"""The references in docs/reference/ are generated from the code (tools/reference): each page
is what `make docs` writes today, and holds everything its source declares."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tools.reference import COMMAND, DIRECTORY, PAGES, generate, stale, write
from tools.reference.__main__ import main
from tools.reference.markdown import cell
from tools.reference.models import sections
from webhook.ambassador.spec import AmbassadorSpec
from webhook.cli import _parser
from webhook.core.annotations import INJECT, STATUS
from webhook.core.policy import Policy, default_policy

REFERENCE = ROOT / DIRECTORY


def page(name: str) -> str:
    return (REFERENCE / name).read_text(encoding="utf-8")


def rows(text: str) -> Iterator[dict[str, str]]:
    """Every row of the page's tables, by column name (a table leaves out empty columns)."""
    columns: list[str] = []
    for line in text.splitlines():
        if not line.startswith("|"):
            columns = []
            continue
        cells = [part.strip() for part in re.split(r"(?<!\\)\|", line)[1:-1]]
        if not columns:
            columns = cells
        elif not line.startswith("|---"):
            yield dict(zip(columns, cells, strict=True))


def first_cells(text: str) -> list[str]:
    """The first cell of every table row of a page, without its backticks."""
    return [next(iter(row.values())).strip("`") for row in rows(text)]


def test_the_references_are_up_to_date() -> None:
    pages = stale(ROOT)
    assert not pages, "\n".join(f"{page} is out of date: run `{COMMAND}`" for page in pages)


def test_check_names_the_stale_page_and_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--check"], root=tmp_path) == 1  # no pages at all
    assert write(tmp_path) == list(generate())
    assert main(["--check"], root=tmp_path) == 0
    edited = tmp_path / DIRECTORY / "cli.md"
    edited.write_text(edited.read_text() + "\nA line written by hand.\n")
    capsys.readouterr()
    assert main(["--check"], root=tmp_path) == 1
    assert capsys.readouterr().err == f"{DIRECTORY / 'cli.md'} is out of date: run `{COMMAND}`\n"
    assert write(tmp_path) == [DIRECTORY / "cli.md"]


def test_every_page_says_it_is_generated() -> None:
    for name in PAGES:
        first = page(name).splitlines()[0]
        assert f"by `{COMMAND}`" in first and "do not edit by hand" in first, name


def test_the_pages_do_not_depend_on_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A default read from $POD_NAMESPACE (`policy compile --namespace`) stays out of cli.md."""
    monkeypatch.setenv("POD_NAMESPACE", "somewhere-else")
    monkeypatch.setenv("COLUMNS", "37")
    assert generate() == generate() == {p: (ROOT / p).read_text() for p in generate()}
    assert "somewhere-else" not in page("cli.md")


def test_every_annotation_of_the_default_policy_has_its_row() -> None:
    policy = default_policy()
    expected = {INJECT, STATUS}
    for template in policy.sidecars:
        expected |= {parameter.annotation for parameter in template.parameters.values()}
        for resource, override in template.resourceOverrides.items():
            if override.request is not None:
                expected.add(f"outrigger.dev/{template.name}-{resource}-request")
            if override.limit is not None or override.removableLimit:
                expected.add(f"outrigger.dev/{template.name}-{resource}-limit")
    found = first_cells(page("annotations.md"))
    assert sorted(found) == sorted(expected)
    assert len(found) == len(set(found))


def test_an_annotation_row_says_its_default_and_accepted_values() -> None:
    by_key = {row["annotation"]: row for row in rows(page("annotations.md"))}
    port = by_key["`outrigger.dev/ambassador-port`"]
    assert (port["default"], port["accepted values"]) == ("`8081`", "an integer from 1024 to 65535")
    limit = by_key["`outrigger.dev/log-watcher-cpu-limit`"]
    assert limit["default"] == "`200m`"
    assert limit["accepted values"].endswith('from 50m to 2, or "none" to remove the limit')


def fields(root: type[Policy] | type[AmbassadorSpec]) -> Iterator[str]:
    for path, model in sections(root):
        yield from (f"{path}.{name}".lstrip(".") for name in model.model_fields)


@pytest.mark.parametrize(
    ("name", "root"), [("policy.md", Policy), ("ambassador.md", AmbassadorSpec)]
)
def test_every_field_has_a_described_row(name: str, root: type[Policy]) -> None:
    """Every field of the models, each with a description: a new field needs a comment."""
    by_field = {row["field"].strip("`"): row for row in rows(page(name))}
    assert sorted(by_field) == sorted(fields(root))
    undescribed = [path for path, row in by_field.items() if not row.get("description")]
    assert not undescribed, f"add a comment above these fields in the model: {undescribed}"


def test_the_ambassador_reference_names_envoy_settings() -> None:
    text = page("ambassador.md")
    assert "| Envoy |" in text
    by_field = {row["field"]: row for row in rows(text)}
    assert by_field["`upstreams.<name>.timeouts.connect`"]["Envoy"] == (
        "the cluster's connect_timeout."
    )


def commands(parser: argparse.ArgumentParser, name: str) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, command in action.choices.items():
                yield from commands(command, f"{name} {sub}")
        elif not isinstance(action, argparse._HelpAction):
            yield name, action


def test_every_command_and_option_is_in_the_cli_reference() -> None:
    text = page("cli.md")
    by_command = dict(re.findall(r"^## `([^`]+)`\n(.*?)(?=^## |\Z)", text, re.M | re.S))
    for name, action in commands(_parser(), "outrigger"):
        assert name in by_command, f"no section for {name}"
        for flag in action.option_strings or [action.metavar or action.dest]:
            assert f"`{flag}`" in by_command[name], f"{name}: {flag} is missing"


def values_keys(values: dict[str, object], prefix: str = "") -> Iterator[str]:
    for key, value in values.items():
        yield prefix + key
        if isinstance(value, dict):
            yield from values_keys(value, f"{prefix}{key}.")


def test_every_chart_value_has_its_row() -> None:
    values = yaml.safe_load((ROOT / "charts" / "outrigger" / "values.yaml").read_text())
    keys = first_cells(page("chart-values.md"))
    assert keys == list(values_keys(values))
    assert set(values) <= set(keys)


def test_chart_values_show_the_schema_and_the_comments() -> None:
    by_key = {row["key"]: row for row in rows(page("chart-values.md"))}
    replicas = by_key["`replicaCount`"]
    assert (replicas["type"], replicas["default"], replicas["accepted"]) == (
        "integer",
        "`2`",
        "1 to 20",
    )
    mode = by_key["`tls.mode`"]
    assert mode["accepted"] == "one of `self`, `helm`, `cert-manager`, `secret`"
    assert "<br>cert-manager: cert-manager issues and rotates it" in mode["description"]


def test_a_cell_escapes_what_markdown_would_read_as_markup() -> None:
    assert cell("a|b `c|d` <name> *.log") == "a\\|b `c\\|d` &lt;name> \\*.log"
