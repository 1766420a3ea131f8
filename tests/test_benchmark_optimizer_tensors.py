"""Plumbing of benchmarks/optimizer_tensors.py (issue 30): the trainable set it builds without the frozen model is
get_peft_model's, a round reports every method, the old source is extracted, the targets are judged from the
numbers. No timing assertions: on a shared CPU they would only measure the neighbours."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("optimizer_tensors")


def peft_trainable_shapes(step_time, method: str, targets: str) -> list[tuple[int, ...]]:
    """What get_peft_model trains on an independently built micro Llama with the benchmark's config."""
    import structlora
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**step_time.SHAPES["micro"].llama_overrides))
    settings = micro_settings(step_time)
    model = structlora.get_peft_model(base, step_time.adapter_config(method, targets, settings))
    return sorted(tuple(p.shape) for p in model.parameters() if p.requires_grad)


def micro_settings(step_time):
    return step_time.BenchSettings(device=torch.device("cpu"), dtype=torch.float32, shape_name="micro", batch_size=1,
                                   seq_len=1, rank=8, lora_alpha=16.0, tensor_rank=5, bottleneck_size=64,
                                   warmup_steps=1, timed_steps=1, learning_rate=1e-4, seed=0)


@pytest.mark.parametrize("targets", ["qv", "all"])
@pytest.mark.parametrize("method", ["lora", "loretta_rep"])
def test_the_trainable_set_is_get_peft_models(bench, method: str, targets: str) -> None:
    step_time = load_benchmark("step_time")
    overrides = step_time.SHAPES["micro"].llama_overrides
    built = bench.trainable_set(method, targets, overrides, step_time, micro_settings(step_time))
    assert sorted(tuple(p.shape) for p in built) == peft_trainable_shapes(step_time, method, targets)


def test_a_round_reports_counts_and_times_for_every_method(bench) -> None:
    result = bench.measure("micro", "micro", ["qv"], optimizer_steps=2, training_steps=1)
    assert set(result["optimizer"]) == set(result["step"]) == {"lora/qv", "loretta_rep/qv"}
    # micro: 2 layers x (q, v); LoRA 2 tensors per module, LoRETTA_rep 1 plus 2 x 2 + 1 trained norms.
    assert result["optimizer"]["lora/qv"]["tensors"] == 8
    assert result["optimizer"]["loretta_rep/qv"]["tensors"] == 4 + 5
    assert all(len(entry["step_ms"]) == 2 for entry in result["optimizer"].values())
    assert all(len(times) == 1 for times in result["step"].values())


def test_the_baseline_source_is_extracted_from_git(bench, tmp_path: Path) -> None:
    source = bench.extract_source("HEAD", tmp_path)
    assert (source / "structlora" / "tensor_train.py").is_file()


def test_targets_are_judged_on_the_newest_version(bench) -> None:
    def version(rep_tensors: int, rep_step: float) -> dict:
        return {"optimizer": {"lora/all": {"tensors": 448, "numel": 1, "step_ms": 1.0},
                              "loretta_rep/all": {"tensors": rep_tensors, "numel": 1, "step_ms": 1.0}},
                "step": {"lora/all": 100.0, "loretta_rep/all": rep_step}}

    table, checks = bench.report({"old": version(2305, 120.0), "new": version(289, 104.0)}, ["all"])
    assert [c["met"] for c in checks] == [True, True]
    assert "| old | loretta_rep | all | 2,305 |" in table and "| 1.200 |" in table
    _, checks = bench.report({"new": version(449, 105.5)}, ["all"])
    assert [c["met"] for c in checks] == [False, False]
