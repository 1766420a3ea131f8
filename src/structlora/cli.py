"""The `structlora` console script. The command table and the dispatch live in ``structlora.recipes.commands``
(the command-line wing), so that a command which runs others (`sweep`) needs no import from above its wing."""

from __future__ import annotations

import sys

from structlora.recipes.commands import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
