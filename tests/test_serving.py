"""Serving: export_to_peft folders meet vLLM's and SGLang's adapter rules; a merged model (norms folded in) saves as a plain
transformers checkpoint with the adapted model's outputs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from structlora import LoraConfig, LorettaRepConfig, MTLoraConfig, export_to_peft, get_peft_model
from structlora.serving import sglang_problems, vllm_problems
from test_core import tiny_gpt2
from tiny_models import perturb_adapters, tiny_llama_for, tiny_word_tokenizer

LOW_RANK = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8),
    "mtlora": lambda: MTLoraConfig(r=4, lora_alpha=8, structure="dtsm"),
    "loretta_rep": lambda: LorettaRepConfig(r=4, tensor_rank=2),  # trains the norms
    "loretta_rep_no_norms": lambda: LorettaRepConfig(r=4, tensor_rank=2, train_norms=False),
}


def _trained(config):
    return perturb_adapters(get_peft_model(tiny_llama_for(tiny_word_tokenizer()), config), scale=0.05).eval()


@pytest.mark.parametrize("method", ["lora", "mtlora", "loretta_rep_no_norms"])
def test_low_rank_exports_meet_vllm_rules(method, tmp_path):
    export_to_peft(_trained(LOW_RANK[method]()), str(tmp_path))
    assert vllm_problems(str(tmp_path)) == []


def test_vllm_rules_refuse_what_vllm_refuses(tmp_path):
    export_to_peft(_trained(LOW_RANK["loretta_rep"]()), str(tmp_path / "norms"))
    problems = vllm_problems(str(tmp_path / "norms"))
    assert len(problems) == 1 and "modules_to_save" in problems[0] and "merge_and_unload" in problems[0]
    export_to_peft(_trained(MTLoraConfig(r=32, structure="shim")), str(tmp_path / "rank"))
    assert vllm_problems(str(tmp_path / "rank"), max_lora_rank=16) == [
        "rank 32 exceeds max_lora_rank=16 (start vLLM with --max-lora-rank 32)"]
    assert vllm_problems(str(tmp_path / "rank"), max_lora_rank=32) == []


def test_gpt2_exports_are_refused_by_both_engines(tmp_path):
    """vLLM 0.33's GPT-2 has no LoRA support; SGLang 0.5.23 finds no 'layers.<N>.' in GPT-2's names and would
    skip every weight (serving the base model)."""
    model = get_peft_model(tiny_gpt2(), MTLoraConfig(r=2, structure="dtsm", target_modules=["c_attn", "c_fc"]))
    export_to_peft(model, str(tmp_path))
    assert vllm_problems(str(tmp_path)) == [
        "LoRA weights on GPT-2's ['c_attn', 'c_fc']: vLLM's GPT2LMHeadModel supports no LoRA (serve the merged model: "
        "merge_and_unload().save_pretrained())"]
    problems = sglang_problems(str(tmp_path))
    assert len(problems) == 1 and "without 'layers.<N>.'" in problems[0] and "transformer.h.0" in problems[0]


@pytest.mark.parametrize("method", ["lora", "mtlora", "loretta_rep_no_norms"])
def test_low_rank_exports_meet_sglang_rules(method, tmp_path):
    export_to_peft(_trained(LOW_RANK[method]()), str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert sglang_problems(str(tmp_path)) == []
    assert sglang_problems(str(tmp_path), max_lora_rank=4, lora_target_modules=["q_proj", "k_proj", "v_proj"]) == []


def test_sglang_rules_refuse_what_sglang_refuses_or_serves_differently(tmp_path):
    export_to_peft(_trained(LOW_RANK["loretta_rep"]()), str(tmp_path / "norms"))
    problems = sglang_problems(str(tmp_path / "norms"))
    assert len(problems) == 1 and problems[0].startswith("modules_to_save") and "merge_and_unload" in problems[0]
    export_to_peft(_trained(LOW_RANK["lora"]()), str(tmp_path / "lora"))
    assert sglang_problems(str(tmp_path / "lora"), max_lora_rank=2, lora_target_modules=["o_proj"]) == [
        "rank 4 exceeds --max-lora-rank 2", "target modules ['q_proj', 'v_proj'] are not in --lora-target-modules"]
    config_file = tmp_path / "lora" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    # What SGLang reads differently from PEFT: a regex, per-module ranks/alphas, rsLoRA scaling; and no peft_type.
    config_file.write_text(json.dumps({**config, "target_modules": "^(.*q_proj)$", "use_rslora": True,
                                       "alpha_pattern": {"model.layers.0.self_attn.q_proj": 8}}))
    assert sglang_problems(str(tmp_path / "lora")) == [
        "target_modules is the pattern '^(.*q_proj)$': SGLang needs a list of module names",
        "rank_pattern/alpha_pattern for ['model.layers.0.self_attn.q_proj']: SGLang serves every module with "
        "lora_alpha / r (export with one rank for every module)",
        "use_rslora: SGLang scales by lora_alpha / r, not lora_alpha / sqrt(r)"]
    config_file.write_text(json.dumps({k: v for k, v in config.items() if k != "peft_type"}))
    assert sglang_problems(str(tmp_path / "lora")) == ["adapter_config.json lacks peft_type"]


@pytest.mark.parametrize("method", ["lora", "mtlora", "loretta_rep"])
def test_merged_model_reloads_with_plain_transformers(method, tmp_path):
    model = _trained(LOW_RANK[method]())
    ids = torch.randint(4, 60, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert (adapted - base).abs().max() > 1e-3
    norm = model.get_base_model().model.norm
    trained_norm = (norm.current() if hasattr(norm, "current") else norm).weight.detach().clone()
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(reloaded.model.norm).__name__ == "LlamaRMSNorm"
    torch.testing.assert_close(reloaded.model.norm.weight, trained_norm, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted, rtol=0, atol=1e-5)
