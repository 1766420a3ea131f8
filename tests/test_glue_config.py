"""Flags, config files (YAML/JSON, explicit flags win), the shipped recipe files, adapter configs, report."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import structlora
from structlora.recipes import flags, glue, methods, outputs, report

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "glue"
SRC = Path(__file__).resolve().parents[1] / "src"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = flags.RecipeParser()
    glue.add_arguments(parser)
    return parser.parse_flags(argv)


def test_yaml_values_become_defaults_and_explicit_flags_win(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("task: rte\nlr: 4e-4\nepochs: 80\nseed: 7\ntarget-modules: [query, value]\nbf16: true\n"
                      "lora_alpha: 16\n")
    args = parse(["--config", str(config), "--lr", "1e-3", "--seed", "42"])
    assert args.lr == 1e-3  # given on the command line
    assert args.seed == 42  # given explicitly, even though it equals the default
    assert args.epochs == 80.0 and isinstance(args.epochs, float)
    assert args.lr_scheduler == "linear"  # in neither: the default
    assert (args.task, args.target_modules, args.bf16, args.lora_alpha) == ("rte", ["query", "value"], True, 16.0)


def test_json_config_and_unknown_keys(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"method": "loretta-rep", "tensor-rank": 4, "warmup_steps": 500}))
    args = parse(["--config", str(config)])
    assert (args.method, args.tensor_rank, args.warmup_steps) == ("loretta-rep", 4, 500)
    config.write_text(json.dumps({"learning_rate": 1e-3}))
    with pytest.raises(SystemExit, match="unknown key.*learning_rate"):
        parse(["--config", str(config)])
    config.write_text(json.dumps({"method": "dora"}))
    with pytest.raises(SystemExit, match="run.json: key method: 'dora' not among choices"):
        parse(["--config", str(config)])


def test_flags_win_over_the_config_file_wherever_they_stand(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 4e-4\nseed: 7\nbf16: true\nuse-rslora: false\ngroup-by-length: true\n")
    for argv in (["--lr", "1e-3", "--no-bf16", "--config", str(config), "--use-rslora"],
                 ["--lr=1e-3", "--config", str(config), "--no-bf16", "--use-rslora"],
                 [f"--config={config}", "--use-rslora", "--no-bf16", "--lr", "1e-3"]):
        args = parse(argv)
        assert (args.lr, args.seed, args.bf16, args.use_rslora, args.group_by_length) == (1e-3, 7, False, True, True)
        assert flags.explicit_flags(args) == {"lr", "bf16", "use_rslora"} and args.config == str(config)
    # The file's booleans land when no flag is given; without a file, the defaults.
    args = parse(["--config", str(config)])
    assert (args.bf16, args.use_rslora, args.group_by_length, flags.explicit_flags(args)) == (True, False, True, set())
    assert (parse([]).bf16, parse([]).lr, parse([]).config) == (False, 5e-4, None)


@pytest.mark.parametrize("text,problem", [
    ("learning_rate: 1e-3\n", "unknown key learning_rate. Known: adam-beta1, "),
    ("lr: fast\n", "key lr: expected a number, got 'fast'"),
    ("bf16: maybe\n", "key bf16: Value not boolean: maybe."),
    ("task: wnli\n", "key task: 'wnli' not among choices"),
    ("- lr\n", "must hold a mapping of flag names to values"),
])
def test_a_bad_config_file_is_one_error_line_naming_file_and_key(tmp_path, text, problem):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as refusal:
        parse(["--lr", "1e-3", "--config", str(config)])
    message = str(refusal.value.code)
    assert message.startswith(f"error: {config}: {problem}") and "\n" not in message
    if "unknown" in problem:
        assert "lr, lr-scheduler" in message and "config" not in message.split("Known: ")[1].split(", ")


def test_config_and_command_line_errors_through_the_console_script(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 1\n")
    for argv, status, last_line in (
            (["--config", str(config)], 1, f"error: {config}: unknown key learning_rate. Known: "),
            (["--config", str(tmp_path / "missing.yaml")], 1, f"error: {tmp_path / 'missing.yaml'}: File does not "),
            (["--lr", "fast"], 2, "structlora train glue: error: argument --lr: expected a number, got 'fast'"),
            (["--no-such-flag"], 2, "structlora train glue: error: unrecognized arguments: --no-such-flag")):
        done = subprocess.run([sys.executable, "-m", "structlora.cli", "train", "glue", *argv], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120)
        assert done.returncode == status and done.stdout == ""
        assert done.stderr.splitlines()[-1].startswith(last_line) and "Traceback" not in done.stderr
        if status == 1:
            assert len(done.stderr.splitlines()) == 1


MTLORA_SETTINGS = {  # task: (lr, epochs, per-GPU batch, GPUs, seed), from the MTLoRA roberta_base_<task>.sh
    "cola": (4e-4, 80, 32, 2, 27), "mnli": (5e-4, 30, 16, 2, 0), "mrpc": (4e-4, 30, 16, 1, 0),
    "qnli": (4e-4, 25, 32, 2, 1739), "qqp": (5e-4, 25, 16, 2, 0), "rte": (5e-4, 80, 32, 1, 0),
    "sst2": (5e-4, 60, 16, 2, 69), "stsb": (4e-4, 40, 16, 1, 0),
}


@pytest.mark.parametrize("task", sorted(MTLORA_SETTINGS))
def test_mtlora_recipe_files(task):
    args = parse(["--config", str(RECIPES / f"mtlora_roberta_base_{task}.yaml")])
    assert (args.task, args.method, args.r, args.lora_alpha) == (task, "mtlora", 8, 16.0)
    # One device accumulates the GPUs' batches: the same effective batch.
    assert (args.lr, args.epochs, args.batch_size, args.grad_accum, args.seed) == MTLORA_SETTINGS[task]
    assert args.lora_dropout == 0.0 and isinstance(args.target_modules, str)
    assert (args.max_length, args.warmup_ratio, args.weight_decay) == (512, 0.06, 0.1)


@pytest.mark.parametrize("method", ["rep", "adp"])
def test_loretta_recipe_files(method):
    args = parse(["--config", str(RECIPES / f"loretta_{method}_deberta_base.yaml"), "--task", "sst2"])
    assert (args.method, args.tensor_rank, args.lr, args.epochs, args.batch_size) == (
        f"loretta-{method}", 5, 1e-4, 10.0, 8)
    # run_glue_v5.py's 'constant' schedule ignores finetune.sh's --warmup_step 500
    assert (args.max_length, args.lr_scheduler, args.warmup_steps, args.eval_every) == (128, "constant", 0, 500)
    assert args.lora_dropout == (0.05 if method == "rep" else None)


def test_build_peft_config_passes_only_given_values():
    args = parse(["--method", "loretta-rep", "--tensor-rank", "3"])
    config = methods.build_peft_config(args, "SEQ_CLS")
    assert isinstance(config, structlora.LorettaRepConfig)
    default = structlora.LorettaRepConfig()
    assert (config.tensor_rank, config.lora_alpha, config.r) == (3, default.lora_alpha, default.r)
    mtlora = methods.build_peft_config(parse(["--method", "mtlora", "--structure", "dtsm", "--r", "4"]), "SEQ_CLS")
    assert isinstance(mtlora, structlora.MTLoraConfig) and (mtlora.structure, mtlora.r) == ("dtsm", 4)
    adp = methods.build_peft_config(parse(["--method", "loretta-adp", "--bottleneck-size", "16"]), "SEQ_CLS")
    assert isinstance(adp, structlora.LorettaAdpConfig) and adp.bottleneck_size == 16
    lora = methods.build_peft_config(parse(["--target-modules", "query,value"]), "SEQ_CLS")
    assert isinstance(lora, structlora.LoraConfig) and list(lora.target_modules) == ["query", "value"]
    assert methods.build_peft_config(parse(["--method", "full"]), "SEQ_CLS") is None


def test_report_markdown_table(tmp_path, capsys):
    for name, method, accuracy in (("a", "lora", 0.8), ("b", "loretta-rep", 0.75)):
        outputs.write_results(str(tmp_path / name), "sst2", method, 1234 if method == "lora" else 99,
                             {"accuracy": accuracy}, [{"epoch": 1.0, "step": 2, "accuracy": accuracy}], 12.34)
    assert report.run(argparse.Namespace(runs=[str(tmp_path)], output=str(tmp_path / "table.md"),
                                         per_run=True)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| run | task | method | trainable params | accuracy | train time (s) |"
    assert lines[2] == f"| {tmp_path / 'a'} | sst2 | lora | 1,234 | 0.8000 | 12.3 |"
    assert lines[3] == f"| {tmp_path / 'b'} | sst2 | loretta-rep | 99 | 0.7500 | 12.3 |"
    assert (tmp_path / "table.md").read_text().strip() == "\n".join(lines)
