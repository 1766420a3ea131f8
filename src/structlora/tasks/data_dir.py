"""Where every sub-command looks for data sets: one rule, stated in each ``--help``.

1. ``--data-dir DIR`` when given;
2. else ``$STRUCTLORA_DATA`` when set;
3. else ``../shared/data`` (beside the working directory, or beside the repository) when it exists;
4. else the Hugging Face Hub (the data set's hub id).

This module imports nothing heavy, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable

DATA_ENV = "STRUCTLORA_DATA"
DATA_RULE = (f"data: --data-dir, else ${DATA_ENV}, else ../shared/data beside the working directory or the "
             "repository (when it exists), else the Hugging Face Hub")
_REPO_ROOT = Path(__file__).resolve().parents[4]


def shared_data_candidates() -> list[Path]:
    """The ``../shared/data`` folders the rule looks at, in order."""
    candidates = [Path.cwd().parent / "shared" / "data", _REPO_ROOT.parent / "shared" / "data"]
    unique: list[Path] = []
    for candidate in candidates:
        if candidate not in unique:
            unique.append(candidate)
    return unique


def resolve_data_dir(flag: str | os.PathLike[str] | None,
                     has_data: Callable[[Path], bool] | None = None) -> Path | None:
    """The data folder by the rule above, or None for the hub.

    ``has_data(folder)`` (optional) tells whether an automatically found ``../shared/data`` holds the data
    wanted (e.g. the GLUE task): when it does not, the hub is used. A folder given by the flag or the
    environment variable is always returned, so a wrong path is reported instead of silently replaced.
    """
    if flag:
        return Path(flag).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    for candidate in shared_data_candidates():
        if candidate.is_dir() and (has_data is None or has_data(candidate)):
            return candidate
    return None


def add_data_dir_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, layout: str) -> None:
    """``--data-dir`` with the discovery rule in its help; ``layout`` says what the folder holds."""
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help=f"folder with the data ({layout}). Default: ${DATA_ENV}, else ../shared/data when "
                             "it exists, else the Hugging Face Hub")
