"""docs/CLI.md from the `--help` of every sub-command (kept in sync by tests/test_cli_docs.py).

    python -m structlora.cli_docs > docs/CLI.md
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

from .recipes.commands import COMMANDS, build_parser, command_parser

WIDTH = "100"


@contextlib.contextmanager
def _fixed_width() -> Iterator[None]:
    # argparse wraps to the terminal width ($COLUMNS): fix it so the file does not depend on the terminal.
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        yield
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def _help_of(path: tuple[str, ...]) -> str:
    return command_parser(build_parser(list(path)), path).format_help()


def render() -> str:
    """The whole of docs/CLI.md."""
    with _fixed_width():
        sections = ["# Command line reference", "",
                    "Generated from `--help` by `python -m structlora.cli_docs > docs/CLI.md`; "
                    "`tests/test_cli_docs.py` fails when it is out of date.", "",
                    "```text", build_parser([]).format_help().rstrip(), "```", ""]
        for path, *_ in COMMANDS:
            sections += [f"## structlora {' '.join(path)}", "", "```text", _help_of(path).rstrip(), "```", ""]
    return "\n".join(sections)


if __name__ == "__main__":
    sys.stdout.write(render())
