"""Adapter flags that the chosen --method does not read are refused (they would be ignored without a word, and
the run would train another model than the one asked for): on the command line, from a config file, and up
front in `structlora sweep`."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import structlora.recipes.commands
from structlora.cli import main
from structlora.recipes import flags, methods

REPO = Path(__file__).resolve().parents[1]
# A value for each flag of METHOD_FLAG_READERS (not the default, where the flag has one).
SAMPLE = {"structure": "icfm", "r": "4", "lora_alpha": "16", "lora_dropout": "0.1", "tensor_rank": "3",
          "bottleneck_size": "8", "adapter_placement": "pfeiffer", "num_virtual_tokens": "4",
          "encoder_hidden_size": "8", "target_modules": "query", "init": "reference", "use_rslora": None,
          "loraplus_lr_ratio": "16"}


def recipe_args(*argv: str) -> argparse.Namespace:
    parser = flags.RecipeParser()
    methods.add_method_arguments(parser)
    flags.add_training_arguments(parser)
    return parser.parse_flags(argv)


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def test_every_flag_is_refused_by_exactly_the_methods_that_do_not_read_it():
    assert set(SAMPLE) == set(methods.METHOD_FLAG_READERS)
    refused = {}
    for dest, value in SAMPLE.items():
        for method in methods.METHODS:
            args = recipe_args("--method", method, flag(dest), *([] if value is None else [value]))
            try:
                methods.check_method_flags(args)
            except SystemExit as refusal:
                refused.setdefault(dest, []).append(method)
                assert str(refusal.code).startswith(f"error: {flag(dest)} is read only by --method ")
                assert f"--method {method} would ignore it" in str(refusal.code)
    assert refused == {
        "structure": ["lora", "loretta-rep", "loretta-adp", "full", "adapter", "bitfit", "ia3", "prefix", "prompt",
                      "ptuning"],
        "r": ["loretta-adp", "full", "adapter", "bitfit", "ia3", "prefix", "prompt", "ptuning"],
        "lora_alpha": ["loretta-adp", "full", "adapter", "bitfit", "ia3", "prefix", "prompt", "ptuning"],
        "lora_dropout": ["full", "bitfit", "ia3", "prefix", "prompt", "ptuning"],
        "tensor_rank": ["lora", "mtlora", "full", "adapter", "bitfit", "ia3", "prefix", "prompt", "ptuning"],
        "bottleneck_size": ["lora", "mtlora", "loretta-rep", "full", "bitfit", "ia3", "prefix", "prompt",
                            "ptuning"],
        "adapter_placement": ["lora", "mtlora", "loretta-rep", "loretta-adp", "full", "bitfit", "ia3", "prefix",
                              "prompt", "ptuning"],
        "num_virtual_tokens": ["lora", "mtlora", "loretta-rep", "loretta-adp", "full", "adapter", "bitfit", "ia3"],
        "encoder_hidden_size": ["lora", "mtlora", "loretta-rep", "loretta-adp", "full", "adapter", "bitfit", "ia3",
                                "prompt"],
        "target_modules": ["full", "prefix", "prompt", "ptuning"],
        "init": ["full", "bitfit", "ia3", "prefix", "prompt", "ptuning"],
        "use_rslora": ["loretta-adp", "full", "adapter", "bitfit", "ia3", "prefix", "prompt", "ptuning"],
        "loraplus_lr_ratio": ["loretta-adp", "full", "adapter", "bitfit", "ia3", "prefix", "prompt", "ptuning"],
    }


def test_defaults_pass_and_a_default_value_given_explicitly_is_still_refused():
    for method in methods.METHODS:
        methods.check_method_flags(recipe_args("--method", method))  # nothing set: nothing refused
    # `--structure shim` is the default value, but given with LoRA it says the user expects MTLoRA.
    with pytest.raises(SystemExit, match="--structure is read only by --method mtlora; --method lora would"):
        methods.check_method_flags(recipe_args("--method", "lora", "--structure", "shim"))
    methods.check_method_flags(recipe_args("--method", "mtlora", "--structure", "shim"))
    with pytest.raises(SystemExit, match="--init identity starts MTLoRA's T at I"):
        methods.check_method_flags(recipe_args("--method", "lora", "--init", "identity"))
    methods.check_method_flags(recipe_args("--method", "lora", "--init", "reference"))


def test_a_config_files_flag_is_refused_naming_the_file_unless_the_command_line_replaces_its_method(tmp_path,
                                                                                                       capsys):
    inconsistent = tmp_path / "bitfit.yaml"
    inconsistent.write_text("method: bitfit\nr: 16\n")
    with pytest.raises(SystemExit, match=f"--r \\(set by {inconsistent}\\) is read only by --method lora, mtlora, "
                                         "loretta-rep; --method bitfit would ignore it"):
        methods.check_method_flags(recipe_args("--config", str(inconsistent)))
    recipe = tmp_path / "mtlora.yaml"
    recipe.write_text("method: mtlora\nstructure: icfm\nr: 8\nlr: 4e-4\n")
    methods.check_method_flags(recipe_args("--config", str(recipe)))
    assert capsys.readouterr().err == ""
    # The recipe's budget with another method: its MTLoRA-only flag cannot be unset from the command line.
    args = recipe_args("--config", str(recipe), "--method", "lora")
    methods.check_method_flags(args)
    methods.check_method_flags(args)  # checked again when the config is built: one warning
    assert capsys.readouterr().err.splitlines() == [
        f"warning: --structure (set by {recipe}) is not read by --method lora (given on the command line): it is "
        "ignored"]
    assert methods.build_peft_config(args, "SEQ_CLS").r == 8
    with pytest.raises(SystemExit, match="--structure is read only by --method mtlora"):  # but never a flag given
        methods.check_method_flags(recipe_args("--config", str(recipe), "--method", "lora", "--structure", "ctcm"))


def test_build_and_wrap_refuse_before_building_a_model():
    pytest.importorskip("peft")
    with pytest.raises(SystemExit, match="--r is read only by"):
        methods.build_peft_config(recipe_args("--method", "bitfit", "--r", "8"), "SEQ_CLS")
    with pytest.raises(SystemExit, match="--target-modules is read only by"):
        methods.wrap_model(None, recipe_args("--method", "prompt", "--target-modules", "query"), "SEQ_CLS")


def test_the_command_line_refuses_with_one_line_before_reading_anything(tmp_path):
    missing = tmp_path / "no-such-model"
    result = subprocess.run([sys.executable, "-m", "structlora.cli", "train", "glue", "--task", "sst2", "--method",
                             "bitfit", "--r", "16", "--model", str(missing), "--output", str(tmp_path / "run")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: --r is read only by --method lora, mtlora, loretta-rep; --method bitfit would ignore it, training "
        "another model than the one asked for (leave --r unset, or choose one of those methods)"]
    assert not (tmp_path / "run").exists()


def test_sweep_refuses_a_shared_flag_that_one_method_ignores_before_any_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(structlora.recipes.commands, "main", lambda argv: calls.append(argv) or 0)
    with pytest.raises(SystemExit, match="error: --methods bitfit: --r is read only by .* In a sweep, give a flag "
                                         "that only some methods read with --method-args 'METHOD=FLAGS'"):
        main(["sweep", "glue", "--tasks", "sst2", "--methods", "lora,bitfit", "--seeds", "0", "--output",
              str(tmp_path / "grid"), "--train-args", "--model m --r 16"])
    with pytest.raises(SystemExit, match="--methods lora: --num-virtual-tokens"):
        main(["sweep", "glue", "--tasks", "sst2", "--methods", "lora,prompt", "--seeds", "0", "--output",
              str(tmp_path / "grid"), "--method-args", "lora=--num-virtual-tokens 4"])
    assert calls == [] and not (tmp_path / "grid").exists()
    # Given per method, the same flag reaches only the method that reads it.
    main(["sweep", "glue", "--tasks", "sst2", "--methods", "lora,bitfit", "--seeds", "0", "--output",
          str(tmp_path / "grid"), "--train-args", "--model m", "--method-args", "lora=--r 16"])
    assert [(argv[argv.index("--method") + 1], "--r" in argv) for argv in calls] == [("lora", True),
                                                                                     ("bitfit", False)]


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").rglob("*.yaml")))
def test_every_shipped_recipe_sets_only_flags_its_method_reads(recipe):
    kind = recipe.split("/")[1]
    # The flags argparse requires on the command line (they do not touch the adapter).
    required = {"llm": ["--task", "squad", "--model", "m"], "nlg": ["--dataset", "e2e", "--model", "m"]}
    argv = ["train", kind, "--config", str(REPO / recipe), *required.get(kind, [])]
    parser = structlora.recipes.commands.build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    assert unknown == []
    methods.check_method_flags(args)
    # Every key of the file lands, with its flag's type (YAML reads 4e-4 as a string, 80 as an integer).
    written = yaml.safe_load((REPO / recipe).read_text())
    assert written and args.config == str(REPO / recipe)
    for key, value in written.items():
        landed = getattr(args, key.replace("-", "_"))
        if isinstance(landed, float):
            assert landed == float(value) and not isinstance(landed, bool), key
        elif key in ("target-modules", "modules-to-save"):
            assert landed == flags.comma_list(value), key
        else:
            assert landed == value, key
