"""benchmarks/activation_memory.py: the meta-device count equals the count on real tensors, and on the
Llama-2-7B shape it reproduces PEFT's measured H100 memory and shows the issue's memory target."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("peft")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_activation_memory() -> ModuleType:
    # benchmarks/ is not a package; the script imports its sibling step_time by path, as when run directly.
    spec = importlib.util.spec_from_file_location("activation_memory_benchmark", BENCHMARKS / "activation_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def by_configuration(report: dict) -> dict[tuple[str, str], dict]:
    return {(row["method"], row["targets"]): row for row in report["results"]}


def test_meta_count_equals_the_count_on_real_tensors() -> None:
    activation_memory = load_activation_memory()
    common = ["--shape", "micro", "--dtype", "float32", "--methods", "peft_lora,lora,mtlora_icfm,loretta_rep,loretta_adp"]
    on_meta = by_configuration(activation_memory.main([*common, "--device", "meta"]))
    on_cpu = by_configuration(activation_memory.main([*common, "--device", "cpu"]))
    assert on_meta.keys() == on_cpu.keys() and len(on_meta) == 1 + 4 * 2 + 1
    for key, row in on_meta.items():
        # Only the attention differs (the CUDA flash op on meta also keeps its 24-byte RNG state per call),
        # and it is the same in every configuration: the extras over the floor are equal to the byte.
        assert row["extra_over_floor_bytes"] == on_cpu[key]["extra_over_floor_bytes"], key
        assert 0 <= row["saved_activation_bytes"] - on_cpu[key]["saved_activation_bytes"] <= 2 * 24, key


def test_7b_shape_reproduces_peft_on_the_h100_and_meets_the_memory_target() -> None:
    activation_memory = load_activation_memory()
    rows = by_configuration(activation_memory.main(["--shape", "7b", "--methods", "peft_lora,lora,loretta_rep",
                                                    "--targets", "qv"]))
    peft_extra = rows[("peft_lora", "qv")]["extra_over_floor_bytes"] / 2**30
    published = (activation_memory.PUBLISHED_H100_PEAK_GIB[("peft_lora", "qv")]
                 - activation_memory.PUBLISHED_H100_PEAK_GIB["floor"])
    assert abs(peft_extra - published) < 0.05 * published  # 3.98 GiB counted vs 4.0 GiB measured
    # Ours keeps the bf16 input once for q and v (32 layers x 32 MiB) where PEFT keeps an fp32 copy per adapter.
    assert rows[("lora", "qv")]["extra_vs_peft"] == pytest.approx(0.25, abs=0.01)
    assert rows[("loretta_rep", "qv")]["extra_vs_peft"] <= 0.5
