"""Bad rows in data files: an error naming ``file:line`` by default, skipped and counted on request.

Every reader of a data file (GLUE TSV, E2E csv / ``valid.txt``, WebNLG XML, DART JSON, SuperGLUE jsonl) hands
the rows it cannot use (too few columns, a label out of range or of the wrong type, a field missing) to one
:class:`BadRows`. By default it raises :class:`DataRowError` at the first one, naming the file, the line and
what would be valid; with ``skip=True`` (the recipes' ``--skip-bad-rows``) it records the row and the reader
drops it. The recipes print the count and store it in ``results.json`` (:meth:`BadRows.summary`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

SKIP_FLAG = "--skip-bad-rows"
_EXAMPLES_KEPT = 5


class DataRowError(ValueError):
    """A row of a data file cannot be used; the message starts with ``file:line``."""


class DataFileError(ValueError):
    """A data file cannot be read as text; the message starts with the file."""


def read_text(path: str | os.PathLike, encoding: str = "utf-8", newline: str | None = None) -> str:
    """The text of ``path``; a file in another encoding is a DataFileError naming the file and the byte."""
    try:
        with open(path, encoding=encoding, newline=newline) as handle:
            return handle.read()
    except UnicodeDecodeError as error:
        raise DataFileError(f"{path} is not {encoding.removesuffix('-sig').upper()} text (byte "
                            f"0x{error.object[error.start]:02x} at offset {error.start}); convert it to UTF-8, "
                            f"e.g. iconv -f latin1 -t utf-8") from None


def location(path: str | os.PathLike, line: int | None = None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


class BadRows:
    """Collects the bad rows of one command's data (``skip=False``: the first one is an error)."""

    def __init__(self, skip: bool = False) -> None:
        self.skip = skip
        self.count = 0
        self.by_file: dict[str, int] = {}
        self.examples: list[str] = []

    def report(self, path: str | os.PathLike, line: int | None, reason: str) -> None:
        """Raise DataRowError (default) or count the row, which the caller then drops."""
        where = location(path, line)
        if not self.skip:
            raise DataRowError(f"{where}: {reason}. Fix the row, or pass {SKIP_FLAG} to skip such rows (they are "
                               f"counted and reported)")
        self.count += 1
        self.by_file[str(path)] = self.by_file.get(str(path), 0) + 1
        if len(self.examples) < _EXAMPLES_KEPT:
            self.examples.append(f"{where}: {reason}")

    def summary(self) -> dict[str, Any]:
        """What results.json records: ``{"skipped_bad_rows": N, "bad_rows": {...}}`` (details only when N > 0)."""
        if not self.count:
            return {"skipped_bad_rows": 0}
        return {"skipped_bad_rows": self.count, "bad_rows": {"by_file": dict(self.by_file),
                                                             "first": list(self.examples)}}

    def print_summary(self) -> None:
        if self.count:
            files = ", ".join(f"{path} ({count})" for path, count in self.by_file.items())
            print(f"warning: {SKIP_FLAG}: skipped {self.count} bad row(s) in {files}; first: {self.examples[0]}",
                  file=sys.stderr)


def strict(bad_rows: BadRows | None) -> BadRows:
    """``bad_rows``, or a fresh one that raises at the first bad row (the readers' default)."""
    return bad_rows if bad_rows is not None else BadRows()


def add_skip_bad_rows_argument(parser: Any, action: Any = None) -> None:
    """``--skip-bad-rows/--no-skip-bad-rows`` (``action``: the parser's boolean action; argparse's by default)."""
    import argparse

    parser.add_argument(SKIP_FLAG, dest="skip_bad_rows", action=action or argparse.BooleanOptionalAction,
                        default=False,
                        help="skip data rows that cannot be used (too few columns, a label out of range or of the "
                             "wrong type, a missing field) and count them in results.json, instead of stopping "
                             "with an error that names file:line")
