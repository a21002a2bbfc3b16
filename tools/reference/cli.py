"""docs/reference/cli.md: every command of `outrigger`, from its argument parser.

Per command and subcommand: its usage line, what it does, and a table of its options per
argument group. The parser is built with $POD_NAMESPACE unset (a default reads it) and its
usage formatted at a fixed width, so that the page is the same wherever it is generated.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tools.reference.markdown import anchor, code, header, paragraph, table
from webhook.cli import _parser

SOURCES = ("webhook/cli.py",)
COLUMNS = ("option", "value", "default", "meaning")
WIDTH = 100
# Defaults read from the environment where the parser is built: shown as the help says.
_ENVIRONMENT = ("POD_NAMESPACE",)


def render() -> str:
    with _environment_unset(_ENVIRONMENT):
        parser = _parser()
    lines = header("Command-line reference", SOURCES)
    lines += paragraph(
        "`outrigger COMMAND ...`, or `python -m webhook COMMAND ...`; `outrigger COMMAND "
        "--help` prints the same. A command whose reader goes away (`... | head`) ends "
        "quietly with exit status 141, as a shell reports SIGPIPE."
    )
    for name, command, summary in _commands(parser, "outrigger"):
        lines += _command(name, command, summary)
    return "\n".join(lines)


@contextmanager
def _environment_unset(names: tuple[str, ...]) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _commands(
    parser: argparse.ArgumentParser, name: str, summary: str = ""
) -> Iterator[tuple[str, argparse.ArgumentParser, str]]:
    """The parser and every command below it, depth first, each with its full name."""
    yield name, parser, summary
    for sub, command, help_ in _subcommands(parser):
        yield from _commands(command, f"{name} {sub}", help_)


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, Any, str]]:
    """(name, parser, one-line help) of each command directly below `parser`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for sub, command in action.choices.items():
                yield sub, command, helps.get(sub, "")


def _command(name: str, parser: argparse.ArgumentParser, summary: str) -> list[str]:
    lines = [f"## `{name}`", "", *paragraph(_sentence(summary))]
    lines += paragraph(" ".join((parser.description or "").split()))
    lines += ["```", _usage(parser), "```", ""]
    commands = [
        [f"[{code(sub)}]({anchor(f'`{name} {sub}`')})", help_]
        for sub, _, help_ in _subcommands(parser)
    ]
    lines += table(("command", "what it does"), commands) if commands else []
    for group in parser._action_groups:
        rows = [_row(action) for action in group._group_actions if _documented(action)]
        if not rows:
            continue
        title = group.title if group.title not in ("options", "positional arguments") else ""
        lines += [f"### {title[0].upper()}{title[1:]}", ""] if title else []
        lines += paragraph(" ".join((group.description or "").split()))
        lines += table(COLUMNS, rows)
    lines += _exclusive(parser)
    return lines


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _documented(action: argparse.Action) -> bool:
    return not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)


def _row(action: argparse.Action) -> list[str]:
    flags = ", ".join(map(code, action.option_strings)) or code(action.metavar or action.dest)
    return [flags, _value(action), _default(action), _help(action)]


def _value(action: argparse.Action) -> str:
    """What the option takes: its choices, its metavar, or nothing for a flag."""
    if action.nargs == 0:
        return ""
    if action.choices is not None:
        return "one of " + ", ".join(map(code, action.choices))
    metavar = action.metavar or (action.dest.upper() if action.option_strings else "")
    many = " ..." if action.nargs in ("*", "+") else ""
    return code(f"{metavar}{many}") if metavar else ""


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    default = action.default
    if default is None or default is argparse.SUPPRESS or default == []:
        return ""
    if isinstance(default, bool):
        return "yes" if default else "no"
    if isinstance(default, float) and default.is_integer():
        default = int(default)
    return code(str(default) if isinstance(default, Path | str | int | float) else default)


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:  # argparse's own placeholders, such as %(default)s
        text = text % {**vars(action), "prog": ""}
    return " ".join(text.split())


def _exclusive(parser: argparse.ArgumentParser) -> list[str]:
    lines = []
    for group in parser._mutually_exclusive_groups:
        flags = ", ".join(code(action.option_strings[-1]) for action in group._group_actions)
        need = "Exactly one" if group.required else "At most one"
        lines.append(f"- {need} of {flags}.")
    return [*lines, ""] if lines else []


def _sentence(text: str) -> str:
    return f"{text[0].upper()}{text[1:]}." if text else ""
