"""Precision and checkpointing follow the device; one data rule; boolean flags switch recipe values off."""

from __future__ import annotations

import argparse
from pathlib import Path

from structlora.recipes import device, flags
from structlora.tasks import data_dir


def parsed(argv: list[str], config: Path | None = None) -> argparse.Namespace:
    parser = flags.RecipeParser()
    flags.add_training_arguments(parser)
    parser.add_argument("--model-dtype", default="float32")
    return parser.parse_flags(argv + (["--config", str(config)] if config else []))


def test_bf16_and_recipe_checkpointing_are_turned_off_on_a_cpu_without_bf16(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(device, "bf16_supported", lambda: False)
    monkeypatch.setattr(device, "has_accelerator", lambda: False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("bf16: true\nmodel-dtype: bfloat16\ngradient-checkpointing: true\n")
    args = device.resolve_device_settings(parsed([], recipe))
    assert (args.bf16, args.model_dtype, args.gradient_checkpointing) == (False, "float32", False)
    assert capsys.readouterr().err.count("warning:") == 2
    # An explicit flag is honoured (checkpointing), and --no-bf16 switches the recipe's value off.
    args = device.resolve_device_settings(parsed(["--gradient-checkpointing", "--no-bf16"], recipe))
    assert args.gradient_checkpointing is True and args.bf16 is False


def test_bf16_is_kept_where_the_device_has_it(monkeypatch, tmp_path):
    monkeypatch.setattr(device, "bf16_supported", lambda: True)
    monkeypatch.setattr(device, "has_accelerator", lambda: True)
    args = device.resolve_device_settings(parsed(["--bf16", "--gradient-checkpointing"]))
    assert args.bf16 is True and args.gradient_checkpointing is True


def test_bf16_on_a_cpu_that_has_it_is_said_not_silent(monkeypatch, capsys):
    monkeypatch.setattr(device, "bf16_supported", lambda: True)
    monkeypatch.setattr(device, "has_accelerator", lambda: False)
    args = device.resolve_device_settings(parsed(["--bf16"]))
    assert args.bf16 is True
    assert capsys.readouterr().err.startswith("note: bf16 on the CPU: it has native bfloat16 arithmetic")
    assert device.precision_name(args) == "bf16 mixed precision on the CPU"
    device.resolve_device_settings(parsed([]))
    assert capsys.readouterr().err == ""  # float32: nothing to say


def test_data_rule_flag_then_environment_then_shared_then_hub(monkeypatch, tmp_path):
    monkeypatch.delenv(data_dir.DATA_ENV, raising=False)
    shared = tmp_path / "shared" / "data"
    monkeypatch.setattr(data_dir, "shared_data_candidates", lambda: [shared])
    assert data_dir.resolve_data_dir(None) is None  # the hub
    shared.mkdir(parents=True)
    assert data_dir.resolve_data_dir(None) == shared
    assert data_dir.resolve_data_dir(None, has_data=lambda root: (root / "sst2").is_dir()) is None
    monkeypatch.setenv(data_dir.DATA_ENV, str(tmp_path / "env"))
    assert data_dir.resolve_data_dir(None) == tmp_path / "env"
    assert data_dir.resolve_data_dir(str(tmp_path / "flag")) == tmp_path / "flag"
