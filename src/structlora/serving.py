"""Checks that an `export_to_peft` folder is servable as plain LoRA by vLLM.

vLLM's LoRA loader (`vllm.lora.peft_helper.PEFTHelper.validate_legal` and `LoRAModel.from_local_checkpoint`,
read in vLLM 0.33.0) accepts a PEFT LoRA folder whose config has `r`, `lora_alpha` and `target_modules`, no
`modules_to_save` other than a classifier head ("classifier", "score"), `bias="none"`, no DoRA / LoRA bias,
every rank (`r` and `rank_pattern`) at most the server's `--max-lora-rank`, and weights only for the model's
LoRA-capable modules. `vllm_problems` applies those rules here without vLLM (its CPU build is not installable
from the package index into this environment; see docs in the README's serving section).

What cannot be plain LoRA (LoRETTA_adp's bottleneck adapters, trained norms, a trained LM head) is served as a
merged full model (`merge_and_unload().save_pretrained()`), or with structlora itself.
"""

from __future__ import annotations

import json
import os

from safetensors import safe_open

# What vLLM's Llama-family models accept as LoRA targets (its packed qkv_proj / gate_up_proj are matched by
# their parts), and the heads it accepts in modules_to_save.
VLLM_LLAMA_LORA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                     "embed_tokens", "lm_head"})
VLLM_SAVED_HEADS = ("classifier", "score")


def vllm_problems(folder: str, max_lora_rank: int = 16,
                  lora_modules: frozenset[str] = VLLM_LLAMA_LORA_MODULES) -> list[str]:
    """Why vLLM would refuse this PEFT LoRA folder (empty when it would load it)."""
    with open(os.path.join(folder, "adapter_config.json")) as handle:
        config = json.load(handle)
    problems = []
    missing = [key for key in ("r", "lora_alpha", "target_modules") if key not in config]
    if missing:
        problems.append(f"adapter_config.json lacks {', '.join(missing)}")
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r}: vLLM serves LoRA only")
    unsupported = [m for m in config.get("modules_to_save") or [] if m not in VLLM_SAVED_HEADS]
    if unsupported:
        problems.append(f"modules_to_save {unsupported}: vLLM accepts only {list(VLLM_SAVED_HEADS)} (trained norms "
                        f"or heads must be merged: merge_and_unload().save_pretrained())")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("bias: vLLM does not support adapter biases")
    if config.get("use_dora"):
        problems.append("use_dora: vLLM does not support DoRA")
    ranks = [config.get("r", 0), *(config.get("rank_pattern") or {}).values()]
    if max(ranks) > max_lora_rank:
        problems.append(f"rank {max(ranks)} exceeds max_lora_rank={max_lora_rank} (start vLLM with "
                        f"--max-lora-rank {_next_allowed_rank(max(ranks))})")
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), framework="pt") as weights:
        keys = list(weights.keys())
    saved = tuple(f".{head}." for head in config.get("modules_to_save") or [])
    unexpected = sorted({key.split(".lora_")[0].rsplit(".", 1)[-1] for key in keys
                         if ".lora_" in key and not any(part in key for part in saved)} - lora_modules)
    if unexpected:
        problems.append(f"LoRA weights on modules vLLM cannot adapt: {unexpected}")
    return problems


def _next_allowed_rank(rank: int) -> int:
    allowed = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted --max-lora-rank values
    return next((value for value in allowed if value >= rank), rank)
