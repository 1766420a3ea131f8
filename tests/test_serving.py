"""Serving: export_to_peft folders meet vLLM's adapter rules; a merged model (norms folded in) saves as a plain
transformers checkpoint with the adapted model's outputs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from structlora import LoraConfig, LorettaRepConfig, MTLoraConfig, export_to_peft, get_peft_model
from structlora.serving import vllm_problems
from tiny_models import tiny_llama_for, tiny_word_tokenizer

LOW_RANK = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8),
    "mtlora": lambda: MTLoraConfig(r=4, lora_alpha=8, structure="dtsm"),
    "loretta_rep": lambda: LorettaRepConfig(r=4, tensor_rank=2),  # trains the norms
    "loretta_rep_no_norms": lambda: LorettaRepConfig(r=4, tensor_rank=2, train_norms=False),
}


def _trained(config):
    model = get_peft_model(tiny_llama_for(tiny_word_tokenizer()), config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".adapters." in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.eval()


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


@pytest.mark.parametrize("method", ["lora", "mtlora", "loretta_rep"])
def test_merged_model_reloads_with_plain_transformers(method, tmp_path):
    model = _trained(LOW_RANK[method]())
    ids = torch.randint(4, 60, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert (adapted - base).abs().max() > 1e-3
    norm = model.base_model.model.norm
    trained_norm = (norm.current() if hasattr(norm, "current") else norm).weight.detach().clone()
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(reloaded.model.norm).__name__ == "LlamaRMSNorm"
    torch.testing.assert_close(reloaded.model.norm.weight, trained_norm, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted, rtol=0, atol=1e-5)
