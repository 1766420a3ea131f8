"""The `structlora` command line: thin dispatch to the recipes.

``structlora.cli:main`` (the console script) is ``main`` here: `sweep`, which runs other commands, imports it from
its own wing.

Each recipe module owns its flags and its work; this file only wires sub-commands, so that
the GLUE, NLG and LLM pipelines can grow without touching one another.

Contract for a recipe module registered below: `add_arguments(parser)` and `run(args) -> int | None`; a module
may name the class of its parser (`PARSER_CLASS`: the training recipes' is `flags.RecipeParser`, which reads
`--config` files).
Modules are imported lazily, and import torch / transformers only inside `run`, so that `--help` is fast
and optional extras stay optional.

Errors a user can fix (a missing file, an unreachable hub, a bad value) end the command with one
`error: ...` line and exit status 1 (argparse's usage errors: 2); set STRUCTLORA_TRACEBACK=1 to see the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import Any, Callable, Sequence

from ..tasks.data_dir import DATA_RULE
from .quiet import silence_import_noise

# (sub-command path, module, help, uses data)
COMMANDS: list[tuple[tuple[str, ...], str, str, bool]] = [
    (("train", "glue"), "structlora.recipes.glue", "fine-tune an encoder on a GLUE task", True),
    (("train", "nlg"), "structlora.recipes.nlg", "fine-tune a causal LM on E2E / WebNLG / DART", True),
    (("train", "llm"), "structlora.recipes.llm", "fine-tune a causal LM on SuperGLUE-style tasks, SQuAD, DROP",
     True),
    (("generate",), "structlora.recipes.generate", "beam-search decoding of an NLG split with a trained adapter",
     True),
    (("score",), "structlora.recipes.score", "official-equivalent E2E / WebNLG / DART metrics", False),
    (("report",), "structlora.recipes.report", "the papers' comparison table (markdown, CSV, plot) of runs",
     False),
    (("sweep",), "structlora.recipes.sweep", "run a grid of tasks x methods x seeds, resumably", True),
    (("eval",), "structlora.recipes.adapters:EVAL", "evaluate a trained run on a split and write its predictions",
     True),
    (("merge",), "structlora.recipes.adapters:MERGE", "merge a trained adapter into its base: a plain "
     "transformers model", False),
    (("export",), "structlora.recipes.adapters:EXPORT", "write a trained adapter as a plain PEFT LoRA folder",
     False),
    (("convert",), "structlora.recipes.convert", "rewrite a structlora adapter folder in PEFT's layout "
     "(peft.PeftModel.from_pretrained loads it)", False),
]
TRACEBACK_ENV = "STRUCTLORA_TRACEBACK"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and shows every flag's default (unless its help already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower() or action.default is argparse.SUPPRESS \
                or not action.option_strings or isinstance(action, argparse._HelpAction):
            return text
        if action.required:
            return f"{text} (required)" if text else "(required)"
        if action.default is None:
            return text
        return f"{text} (default: %(default)s)"


def _new_parser(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser,
                **kwargs: Any) -> argparse.ArgumentParser:
    """The sub-command actions' parser class: argparse's, or the one a command's module names."""
    return parser_class(**kwargs)


def _subcommand_parser(subparsers: argparse._SubParsersAction, name: str, help_text: str, uses_data: bool,
                       parser_class: type[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    description = help_text + (f".\n\n{DATA_RULE}." if uses_data else ".")
    return subparsers.add_parser(name, help=help_text, description=description, formatter_class=HelpFormatter,
                                 parser_class=parser_class)


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="structlora", description=__doc__.splitlines()[0],
                                     epilog=f"{DATA_RULE}. `structlora COMMAND --help` lists each command's flags.",
                                     formatter_class=HelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_new_parser)
    groups: dict[str, argparse._SubParsersAction] = {}
    # Only import the module the user asked for (plus cheap help for the others).
    wanted = tuple(a for a in argv if not a.startswith("-"))
    for path, module_name, help_text, uses_data in COMMANDS:
        module = _command(module_name) if wanted[: len(path)] == path else None
        parser_class = getattr(module, "PARSER_CLASS", argparse.ArgumentParser)
        if len(path) > 1 and path[0] not in groups:
            group_parser = subparsers.add_parser(path[0], help=f"{path[0]} sub-commands",
                                                 formatter_class=HelpFormatter)
            groups[path[0]] = group_parser.add_subparsers(dest="subcommand", required=True, metavar="TASK",
                                                          parser_class=_new_parser)
        sub = _subcommand_parser(groups[path[0]] if len(path) > 1 else subparsers, path[-1], help_text, uses_data,
                                 parser_class)
        if module is not None:
            module.add_arguments(sub)
    return parser


def command_parser(parser: argparse.ArgumentParser, path: Sequence[str]) -> argparse.ArgumentParser:
    """The parser of the sub-command ``path`` (e.g. ``("train", "glue")``) in ``build_parser``'s tree."""
    for name in path:
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = subparsers.choices[name]
    return parser


def _command(name: str):  # noqa: ANN202 - a module or an object with add_arguments / run
    """``package.module`` or ``package.module:OBJECT`` (several commands in one module)."""
    module_name, _, attribute = name.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


_HUB_FAILURE_HINTS = ("huggingface.co", "couldn't connect", "offline mode", "is not a local folder",
                      "repository not found", "not a valid model identifier")


# datasets' message when neither a local copy nor the Hub has a data set ("Couldn't reach 'e2e_nlg' on the Hub").
_DATASET_HUB_FAILURE = "couldn't reach"


def one_line(error: BaseException, args: argparse.Namespace) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and _DATASET_HUB_FAILURE in text.lower() and hasattr(args, "data_dir"):
        # Checked before the model: datasets' message names the data set but not where a local copy goes.
        return (f"cannot load the data set: no local copy was found and the Hugging Face Hub did not provide it "
                f"({text}). Pass --data-dir with the folder that holds it ({DATA_RULE})")
    model = getattr(args, "model", None)
    if model and isinstance(error, OSError) and any(h in text.lower() for h in _HUB_FAILURE_HINTS):
        # transformers' message names neither the model nor what to do instead.
        return (f"cannot load --model {model!r}: it is not a local folder and the Hugging Face Hub did not "
                f"provide it ({text.split('. ')[0]}). Pass a local folder (config.json + weights), a .gguf file, or "
                "(train nlg / train llm) the packaged smollm2-135m, or connect to the Hub once")
    return text


def _process_group_started() -> bool:
    """Whether a default process group exists (never true before torch is imported, so this imports nothing)."""
    distributed = sys.modules.get("torch.distributed")
    return bool(distributed and distributed.is_available() and distributed.is_initialized())


def _end_process_group(existed_before: bool) -> None:
    """A run under torchrun leaves the gloo group accelerate started alive; destroyed here, not at interpreter
    exit, where gloo can abort a run that succeeded. A group the caller had started before is left to it."""
    if not existed_before and _process_group_started():
        from structlora.distributed import end_process_group

        end_process_group()


def _one_line_warnings(show_other: Callable[..., None]) -> Callable[..., None]:
    """A `warnings.showwarning` that prints structlora's own warnings as the CLI's other `warning:` lines and
    passes other libraries' to `show_other`."""
    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        if category.__module__.startswith("structlora."):
            print(f"warning: {message}", file=sys.stderr)
        else:
            show_other(message, category, filename, lineno, file, line)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    silence_import_noise()
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    path = (args.command, *([args.subcommand] if getattr(args, "subcommand", None) else []))
    if unknown:  # report against the sub-command, so its usage (not the top level's) is shown
        command_parser(parser, path).error(f"unrecognized arguments: {' '.join(unknown)}")
    module = _command(next(name for command, name, *_ in COMMANDS if command == tuple(path)))
    group_existed = _process_group_started()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            result = module.run(args)
    except Exception as error:  # noqa: BLE001 - every failure is one line; the traceback only on request
        if os.environ.get(TRACEBACK_ENV):
            raise
        if isinstance(error, (OSError, ValueError)):  # a missing file, an unreachable hub, a bad value
            message = f"{one_line(error, args)} (set {TRACEBACK_ENV}=1 for the traceback)"
        else:  # not foreseen by any check
            message = (f"unexpected {type(error).__name__}: {one_line(error, args)} (probably a structlora bug: "
                       f"rerun with {TRACEBACK_ENV}=1 and report the traceback)")
        print(f"error: {message}", file=sys.stderr)
        return 1
    finally:
        _end_process_group(group_existed)
    return int(result or 0)
