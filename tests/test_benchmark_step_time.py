"""Smoke test of benchmarks/step_time.py on a micro Llama: it runs, and it reports what it trained.

No timing assertions: on a shared CPU they would only measure the neighbours.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from benchmark_scripts import load_benchmark

pytest.importorskip("peft")

QV = ["q_proj", "v_proj"]


def load_step_time() -> ModuleType:
    return load_benchmark("step_time")


def micro_llama(step_time: ModuleType) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**step_time.SHAPES["micro"].llama_overrides))


def expected_trainable_params(step_time: ModuleType, method: str) -> int:
    """Counted by the libraries themselves on an independently built model and config."""
    import peft
    import structlora

    if method == "floor":
        return 1  # the single input gain
    base = micro_llama(step_time)
    if method == "peft_lora":
        model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=QV,
                                                          task_type="CAUSAL_LM"))
        return model.get_nb_trainable_parameters()[0]
    configs = {
        "lora": structlora.LoraConfig(r=8, lora_alpha=16, target_modules=QV),
        **{f"mtlora_{s}": structlora.MTLoraConfig(r=8, lora_alpha=16, target_modules=QV, structure=s)
           for s in ("shim", "icfm", "ctcm", "dtsm")},
        "loretta_rep": structlora.LorettaRepConfig(r=8, tensor_rank=5, target_modules=QV),
        "loretta_adp": structlora.LorettaAdpConfig(bottleneck_size=64, tensor_rank=5),
    }
    return structlora.get_peft_model(base, configs[method]).get_nb_trainable_parameters()[0]


def test_step_time_benchmark_runs_every_method_on_a_micro_llama(tmp_path: Path) -> None:
    step_time = load_step_time()
    json_path, markdown_path = tmp_path / "step_time.json", tmp_path / "step_time.md"
    returned = step_time.main(["--device", "cpu", "--shape", "micro", "--warmup", "1", "--steps", "2",
                               "--targets", "qv", "--threads", "1", "--quiet",
                               "--json", str(json_path), "--markdown", str(markdown_path)])

    report = json.loads(json_path.read_text())
    assert report["results"] == json.loads(json.dumps(returned["results"]))
    rows = {row["method"]: row for row in report["results"]}
    assert set(rows) == set(step_time.ALL_METHODS)
    assert len(report["results"]) == len(step_time.ALL_METHODS)  # one entry per method on the one target set
    for method, row in rows.items():
        assert "error" not in row, (method, row.get("error"))
        assert row["step_ms"] > 0 and row["tokens_per_s"] > 0 and len(row["step_times_ms"]) == 2
        assert row["trainable_params"] == expected_trainable_params(step_time, method), method
        if method != "floor":
            assert "overhead_over_floor_pct" in row
    assert rows["lora"]["targets"] == "qv" and rows["loretta_adp"]["targets"] == "default"
    assert [check["target"] for check in report["targets"]] == [
        "CPU micro, eager, qv: our LoRA step <= PEFT LoRA step"]
    table = markdown_path.read_text()
    assert table.count("\n| eager |") == len(step_time.ALL_METHODS)


def test_counting_saved_tensors_frees_the_graph_and_the_weights() -> None:
    """The first CUDA run leaked every configuration's graph and weights through the saved-tensor hook."""
    import gc
    import weakref

    step_time = load_step_time()
    model = micro_llama(step_time)
    weight = weakref.ref(model.get_input_embeddings().weight)
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    assert step_time.saved_activation_bytes(model, ids) > 0
    del model
    gc.collect()
    assert weight() is None


def test_profile_and_fused_adamw_options(tmp_path: Path) -> None:
    step_time = load_step_time()
    report = step_time.main(["--device", "cpu", "--shape", "micro", "--warmup", "1", "--steps", "1",
                             "--methods", "floor,lora", "--targets", "qv", "--adamw", "fused", "--no-throwaway",
                             "--profile", str(tmp_path / "prof"), "--quiet"])
    assert report["meta"]["adamw"] == "fused"
    rows = {row["method"]: row for row in report["results"]}
    assert set(rows) == {"floor", "lora"} and all("step_ms" in row for row in rows.values())
    assert rows["lora"]["profile"]["profiled_steps"] == 2
    assert rows["lora"]["profile"]["kernels_per_step"] is None  # device kernels are counted on CUDA only
    tables = sorted(p.name for p in (tmp_path / "prof").iterdir())
    assert tables == ["eager_floor_none.txt", "eager_lora_qv.txt"]
    assert "aten::mm" in (tmp_path / "prof" / "eager_lora_qv.txt").read_text()
