"""docs/CLI.md is the `--help` of every sub-command, and `--help` never imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from structlora import cli_docs
from structlora.recipes.commands import COMMANDS

REPO = Path(__file__).resolve().parents[1]


def test_docs_cli_md_is_up_to_date():
    assert (REPO / "docs" / "CLI.md").read_text() == cli_docs.render(), \
        "docs/CLI.md is out of date: python -m structlora.cli_docs > docs/CLI.md"


def test_every_flag_is_explained_and_shows_its_default():
    text = cli_docs.render()
    for path, *_ in COMMANDS:
        assert f"## structlora {' '.join(path)}" in text
    import argparse

    for path, *_ in COMMANDS:
        parser = cli_docs.build_parser(list(path))
        for name in path:
            action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            parser = action.choices[name]
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            assert action.help, f"{' '.join(path)} {action.option_strings[0]} has no help"
            shown = parser._get_formatter()._expand_help(action) if action.help else ""
            if not action.required and action.default is not None:
                assert "default" in shown.lower(), f"{' '.join(path)} {action.option_strings[0]}: {shown}"


def test_help_does_not_import_torch():
    src = REPO / "src"
    code = ("import sys\nfrom structlora.cli import main\n"
            f"for path in {[list(p) for p, *_ in COMMANDS]!r}:\n"
            "    try:\n        main([*path, '--help'])\n    except SystemExit:\n        pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]


def test_choices_listed_for_fast_help_match_the_library():
    from structlora.tasks.glue.data import GLUE_TASKS
    from structlora.tasks.llm.modeling import DTYPES
    from structlora.tasks.nlg.generation import DECODING_MODES
    from structlora.tasks.nlg.modeling import LAYOUTS, META_FILE
    from structlora.recipes import generate, glue, llm, nlg

    assert set(glue.GLUE_TASK_NAMES) == set(GLUE_TASKS)
    assert set(llm.MODEL_DTYPES) == set(DTYPES)
    assert set(nlg.LAYOUT_NAMES) == set(LAYOUTS)
    assert set(generate.DECODING_MODES) == set(DECODING_MODES) and generate.META_FILE == META_FILE
