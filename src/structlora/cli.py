"""The `structlora` command line: thin dispatch to the recipes.

Each recipe module owns its flags and its work; this file only wires sub-commands, so that
the GLUE, NLG and LLM pipelines can grow without touching one another.

Contract for a recipe module registered below: `add_arguments(parser)` and `run(args) -> int | None`.
Modules are imported lazily so that `structlora --help` stays fast and optional extras stay optional.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# (sub-command path, module, help)
_COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("train", "glue"), "structlora.recipes.glue", "fine-tune an encoder on a GLUE task"),
    (("train", "nlg"), "structlora.recipes.nlg", "fine-tune a causal LM on E2E / WebNLG / DART"),
    (("train", "llm"), "structlora.recipes.llm", "fine-tune a causal LM on SuperGLUE-style tasks, SQuAD, DROP"),
    (("generate",), "structlora.recipes.generate", "beam-search decoding of an NLG test set"),
    (("score",), "structlora.recipes.score", "official-equivalent E2E / WebNLG / DART metrics"),
    (("report",), "structlora.recipes.report", "the papers' comparison table (markdown, CSV, plot) of runs"),
    (("sweep",), "structlora.recipes.sweep", "run a grid of tasks x methods x seeds, resumably"),
]


def _build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="structlora", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    # Only import the module the user asked for (plus cheap help for the others).
    wanted = tuple(a for a in argv if not a.startswith("-"))
    for path, module_name, help_text in _COMMANDS:
        if len(path) == 1:
            sub = subparsers.add_parser(path[0], help=help_text)
        else:
            if path[0] not in groups:
                group_parser = subparsers.add_parser(path[0], help=f"{path[0]} sub-commands")
                groups[path[0]] = group_parser.add_subparsers(dest="subcommand", required=True)
            sub = groups[path[0]].add_parser(path[1], help=help_text)
        sub.set_defaults(_module=module_name)
        if wanted[: len(path)] == path:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser(argv)
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    result = module.run(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
