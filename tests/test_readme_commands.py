"""The command lines of the README and of the recipe headers, run as a newcomer would.

- Every command parses (its flags exist, its --config file is in the repository).
- Run as written, offline, a command either works or stops with exactly one `error:` line (exit 1): the
  hub models they name are unreachable here, as on any machine without a network.
- The README's commands, in order, in a fresh working directory, with tiny models in place of the hub ones
  and small budgets, run on the shipped data (../shared/data) and write what the next command reads.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
from pathlib import Path

import pytest

from shared_paths import GPT2_TOKENIZER, SHARED_DATA
from structlora.recipes.commands import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def shell_commands(text: str, prefix: str = "") -> list[str]:
    """`structlora ...` lines (with backslash continuations joined, comments dropped) of ``text``; with
    ``prefix`` (e.g. "#"), lines are first stripped of it (recipe headers)."""
    lines = []
    for line in text.splitlines():
        if prefix:
            if not line.startswith(prefix):
                continue
            line = line[len(prefix):]
        lines.append(line)
    commands, current = [], ""
    for line in lines:
        stripped = line.strip()
        if current:
            current += " " + stripped
        elif stripped.startswith("structlora "):
            current = stripped
        else:
            continue
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        commands.append(re.sub(r"\s+#.*$", "", current).strip())
        current = ""
    return commands


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [c for block in blocks for c in shell_commands(block)]


def recipe_commands() -> list[tuple[str, str]]:
    found = []
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        found += [(path.name, c) for c in shell_commands(path.read_text(), prefix="#")]
    return found


def argv_of(command: str) -> list[str]:
    argv = shlex.split(command)
    assert argv[0] == "structlora"
    return argv[1:]


README = readme_commands()
RECIPES = recipe_commands()


def test_the_readme_and_every_recipe_show_commands():
    assert len(README) >= 7 and {c.split()[1] for c in README} >= {"train", "generate", "score", "report", "eval",
                                                                  "merge", "export"}
    assert len(RECIPES) == len(list((REPO / "recipes").rglob("*.yaml")))


@pytest.mark.parametrize("command", README + [c for _, c in RECIPES])
def test_every_command_parses_and_its_files_exist(command):
    argv = argv_of(command)
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    assert unknown == []
    if getattr(args, "config", None):
        assert (REPO / args.config).is_file(), args.config


@pytest.fixture()
def offline(monkeypatch):
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE once, at import: without the constant a hub id tries the network,
    # which on a machine without one can hang for many minutes instead of failing.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv("STRUCTLORA_TRACEBACK", raising=False)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse and recipe checks
        code = stop.code if isinstance(stop.code, int) else (print(stop.code, file=__import__("sys").stderr) or 1)
    return code, capsys.readouterr().err


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:") or "Traceback" in line]


# One recipe per kind: GLUE with its data shipped (sst2) and without (rte), LLM, NLG (all parse: see above).
OFFLINE_SAMPLE = ("mtlora_roberta_base_sst2.yaml", "mtlora_roberta_base_rte.yaml", "lora.yaml", "mtlora_gpt2.yaml")


@pytest.mark.parametrize("name,command", [(n, c) for n, c in RECIPES if n in OFFLINE_SAMPLE])
def test_recipe_commands_as_written_fail_offline_with_one_error_line(name, command, offline, tmp_path, capsys,
                                                                     monkeypatch):
    """The recipes name hub models: offline, one `error:` line naming the model (or the missing data)."""
    monkeypatch.chdir(REPO)
    argv = argv_of(command)
    argv[argv.index("--output") + 1] = str(tmp_path / "run")
    code, stderr = run_cli(argv, capsys)
    assert code == 1, stderr
    errors = error_lines(stderr)
    assert len(errors) == 1 and errors[0].startswith("error:"), stderr
    assert "Traceback" not in stderr
    # What to pass: the model (hub id unreachable) or the data (task not shipped).
    assert "--model" in errors[0] or "--data-dir" in errors[0], errors[0]


# Tiny stand-ins for the hub models the README names, and budgets that keep each run to seconds.
BUDGETS = {
    ("train", "glue"): ["--max-steps", "1", "--batch-size", "4", "--max-train-samples", "8",
                        "--max-eval-samples", "8", "--max-length", "32", "--eval-every", "1"],
    ("train", "nlg"): ["--max-steps", "1", "--batch-size", "2", "--max-train-examples", "4",
                       "--max-eval-examples", "2", "--max-length", "64"],
    ("train", "llm"): ["--max-steps", "1", "--batch-size", "2", "--n-train", "4", "--n-dev", "2", "--n-eval", "2",
                       "--max-length", "128"],
    ("generate",): ["--limit", "2", "--beams", "2", "--max-new-tokens", "3", "--no-progress"],
    ("score",): ["--no-java"],
    ("eval",): ["--max-eval-samples", "8"],
}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from structlora.tasks.llm.tiny import save_tiny_llama
    from tiny_models import save_tiny_bert

    root = tmp_path_factory.mktemp("readme-models")
    models = {"glue": save_tiny_bert(root / "bert"),
              "llm": save_tiny_llama(root / "llama", corpus=["The man saw dogs. Question: True or False?"])}
    if (GPT2_TOKENIZER / "vocab.json").exists():
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

        tokenizer = GPT2TokenizerFast.from_pretrained(str(GPT2_TOKENIZER))
        torch.manual_seed(0)
        config = GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=128, vocab_size=len(tokenizer))
        GPT2LMHeadModel(config).save_pretrained(root / "gpt2")
        tokenizer.save_pretrained(root / "gpt2")
        models["nlg"] = root / "gpt2"
    return models


def small_version(argv: list[str], models: dict[str, Path]) -> list[str]:
    """``argv`` with the hub model replaced by a tiny one and the budget flags appended."""
    key = tuple(argv[:2]) if argv[0] == "train" else (argv[0],)
    argv = list(argv)
    if "--model" in argv:
        argv[argv.index("--model") + 1] = str(models[argv[1]])
    if argv[0] == "report":
        argv = ["report", *sorted(p for a in argv[1:] for p in glob.glob(a))]
    if argv[0] == "sweep":
        return small_sweep(argv, models)
    return argv + BUDGETS.get(key, [])


def small_sweep(argv: list[str], models: dict[str, Path]) -> list[str]:
    """The README's grid cut to its first task, first two methods and first seed, each run on the tiny model
    with the GLUE budget (the flags for the runs travel inside --train-args)."""
    argv = list(argv)
    for flag in ("--tasks", "--seeds"):
        argv[argv.index(flag) + 1] = argv[argv.index(flag) + 1].split(",")[0]
    methods = argv.index("--methods") + 1
    argv[methods] = ",".join(argv[methods].split(",")[:2])
    kept_methods = argv[methods].split(",")
    while "--method-args" in argv:  # (repeatable) per-method flags: only those of the methods kept
        at = argv.index("--method-args")
        entry = argv[at + 1]
        del argv[at:at + 2]
        if entry.split("=", 1)[0] in kept_methods:
            argv += ["--method-args=" + entry]
    train_args = shlex.split(argv[argv.index("--train-args") + 1])
    if "--model" in train_args:
        train_args[train_args.index("--model") + 1] = str(models["glue"])
    argv[argv.index("--train-args") + 1] = shlex.join(train_args + BUDGETS[("train", "glue")])
    return argv


@pytest.mark.skipif(not (SHARED_DATA / "sst2").is_dir() or not (SHARED_DATA / "e2e").is_dir(),
                    reason="needs the shipped data (../shared/data)")
def test_readme_commands_run_in_order_on_the_shipped_data(tiny_models, offline, tmp_path, capsys, monkeypatch):
    if "nlg" not in tiny_models:
        pytest.skip("needs the GPT-2 tokenizer of ../shared/models")
    # A newcomer's checkout: the shipped data is found as ../shared/data, runs/ goes in the working directory.
    workdir = tmp_path / "structlora"
    workdir.mkdir()
    (tmp_path / "shared").symlink_to(SHARED_DATA.parent)
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("STRUCTLORA_DATA", raising=False)
    for config in {a for c in README for a in argv_of(c) if a.endswith((".yaml", ".json"))}:
        (workdir / config).parent.mkdir(parents=True, exist_ok=True)
        (workdir / config).write_text((REPO / config).read_text())
    for command in README:
        argv = small_version(argv_of(command), tiny_models)
        code, stderr = run_cli(argv, capsys)
        assert code == 0, f"{command}\n{stderr[-3000:]}"
    runs = sorted(p.name for p in (workdir / "runs").iterdir())
    assert runs, "the README's commands wrote no runs"
    for results in (workdir / "runs").glob("*/results.json"):
        assert json.loads(results.read_text())["eval"], results


def test_generate_on_a_missing_split_fails_before_loading_the_model(offline, tmp_path, capsys):
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    # A model that cannot be loaded: reaching it would give another error than the missing split's.
    (adapter / "structlora_nlg.json").write_text(json.dumps({"model": str(tmp_path / "no-model"), "dataset": "e2e",
                                                              "data_dir": str(tmp_path / "data")}))
    (tmp_path / "data" / "e2e").mkdir(parents=True)
    code, stderr = run_cli(["generate", "--adapter", str(tmp_path / "run"), "--split", "test",
                            "--output", str(tmp_path / "hyps.txt")], capsys)
    assert code == 1
    assert error_lines(stderr) == [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines(stderr)) == 1 and "test" in stderr and "--split dev" in stderr


def test_an_unknown_flag_shows_the_subcommand_usage(capsys):
    code, stderr = run_cli(["train", "glue", "--bf16", "false"], capsys)
    assert code == 2
    assert "usage: structlora train glue" in stderr and "unrecognized arguments: false" in stderr


def test_train_nlg_on_e2e_without_a_train_file_uses_dev_train(tmp_path):
    from structlora.recipes.nlg import default_train_split

    (tmp_path / "e2e").mkdir()
    (tmp_path / "e2e" / "devset.csv").write_text("mr,ref\n\"name[A]\",A.\n")
    assert default_train_split("e2e", str(tmp_path), "auto") == "dev-train"
    (tmp_path / "e2e" / "trainset.csv").write_text("mr,ref\n\"name[A]\",A.\n")
    assert default_train_split("e2e", str(tmp_path), "auto") == "train"


def test_a_data_set_the_hub_did_not_provide_names_data_dir():
    """Without ../shared/data (a clean clone) and offline, the NLG recipe's error says what to pass."""
    import argparse

    from structlora.recipes.commands import one_line

    error = ConnectionError("Couldn't reach 'e2e_nlg' on the Hub (LocalEntryNotFoundError)")
    line = one_line(error, argparse.Namespace(data_dir=None, model="gpt2-medium"))
    assert "--data-dir" in line and "e2e_nlg" in line and "--model" not in line
