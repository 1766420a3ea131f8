"""Interoperability: export to a plain PEFT LoRA folder, import a `loretta` 0.1.0 folder."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from .adapter_state import ModuleSnapshot
from .atomic import staged_files
from .config import LorettaAdpConfig, LorettaRepConfig, TaskType, portable_model_name
from .layers import LowRankLayer, TrainableCopy
from .model_injection import _is_internal
from .names import ADAPTERS
from .peft_model import PeftModel, get_peft_model
from .targets import is_norm_module
from .tensor_train import TTLinear

logger = logging.getLogger("structlora")


def _materialize(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's state with tensor-train linears expanded to the nn.Linear layout they stand for."""
    state: dict[str, torch.Tensor] = {}
    tt_prefixes = []
    for name, sub in module.named_modules():
        if isinstance(sub, TTLinear):
            prefix = f"{name}." if name else ""
            tt_prefixes.append(prefix)
            state[prefix + "weight"] = sub.weight_tt.matrix().t()
            if sub.bias is not None:
                state[prefix + "bias"] = sub.bias
    for key, tensor in module.state_dict().items():
        if not any(key.startswith(p) for p in tt_prefixes):
            state[key] = tensor
    return state


@torch.no_grad()
def export_to_peft(model: PeftModel, save_directory: str, adapter_name: str | None = None) -> None:
    """Write a folder that `peft.PeftModel.from_pretrained` loads as plain LoRA with the same outputs.

    Exact for LoRA, MTLoRA (B·T·A is a rank-R LoRA with A' = T·A) and LoRETTA_rep (tensor trains
    expanded). The scaling is folded into lora_B; `use_rslora` is carried (with lora_alpha = √r, so that PEFT's
    scaling is exactly 1). A PiSSA adapter (init "pissa") is written as the rank-2R LoRA relative to the original
    base model, PEFT's `convert_pissa_to_lora`: A' = [T·A; A₀], B' = [s·B, −s·B₀] (`structlora.svd_init`).
    Per-module ranks go to `rank_pattern` (a fused q,k,v projection has rank 3r); trained norms and heads become
    `modules_to_save` (tensorized heads expanded to dense).

    Args:
        model: the structlora PeftModel, or a peft.PeftModel of a structlora method (`structlora.peft_method`).
        save_directory: the folder to write (created if needed).
        adapter_name: the adapter to export (default: the active one).
    Raises:
        ValueError: a bottleneck adapter (LoRETTA_adp, dense adapters), trained base biases, or two adapter
            kinds nested on one module: PEFT's LoRA cannot express them.
    """
    adapter_name = adapter_name or model.active_adapter
    config = model.peft_config[adapter_name]
    if isinstance(config, LorettaAdpConfig):
        raise ValueError(
            "export_to_peft cannot express a LoRETTA_adp adapter: a bottleneck adapter applies a non-linearity "
            "to the activations (down → act → up), which is not a low-rank weight update, so PEFT's LoRA "
            "cannot represent it. Save it with model.save_pretrained() instead.")
    base = model.get_base_model()
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    targets: list[str] = []
    fan_in_fan_out = False
    for name, layer in base.named_modules():
        if not isinstance(layer, LowRankLayer) or adapter_name not in layer.adapters:
            continue
        if _is_internal(name):
            raise ValueError(f"export_to_peft: {name!r} nests two adapter kinds, which PEFT cannot express")
        a_eff, b_eff = layer.adapters[adapter_name].parameterization.effective_factors(
            layer.adapters[adapter_name].scaling)
        prefix = f"base_model.model.{name}"
        if layer.kind == "embedding":
            tensors[f"{prefix}.lora_embedding_A"] = a_eff
            tensors[f"{prefix}.lora_embedding_B"] = b_eff
        else:
            tensors[f"{prefix}.lora_A.weight"] = a_eff
            tensors[f"{prefix}.lora_B.weight"] = b_eff
        fan_in_fan_out |= layer.kind == "conv1d"
        rank_pattern[name] = a_eff.shape[0]
        targets.append(name)
    modules_to_save = []
    for name, wrapper in base.named_modules():
        # a trained copy: structlora's (norms, heads), or PEFT's modules_to_save wrapper on a peft.PeftModel
        copies = wrapper.adapters if isinstance(wrapper, TrainableCopy) else getattr(wrapper, "modules_to_save", None)
        if isinstance(copies, nn.ModuleDict) and adapter_name in copies:
            modules_to_save.append(name)
            for key, tensor in _materialize(copies[adapter_name]).items():
                tensors[f"base_model.model.{name}.{key}"] = tensor
    ranks = set(rank_pattern.values())
    r = max(ranks, key=list(rank_pattern.values()).count)
    use_rslora = bool(getattr(config, "use_rslora", False))

    def unit_alpha(rank: int) -> float:
        # The scaling is folded into lora_B, so PEFT's scaling must be exactly 1 for every module: alpha / rank, or
        # alpha / √rank with use_rslora (written so that PEFT and vLLM read the adapter as the rsLoRA it is).
        return math.sqrt(rank) if use_rslora else rank

    peft_config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": config.task_type.value if isinstance(config.task_type, TaskType) else config.task_type,
        "r": r,
        "lora_alpha": unit_alpha(r),
        "use_rslora": use_rslora,
        "rank_pattern": {k: v for k, v in rank_pattern.items() if v != r},
        "alpha_pattern": {k: unit_alpha(v) for k, v in rank_pattern.items() if v != r},
        # Exact module names: PEFT matches them exactly, and serving engines read their last part (SGLang
        # refuses a regex string).
        "target_modules": sorted(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "modules_to_save": modules_to_save or None,
        "base_model_name_or_path": portable_model_name(config.base_model_name_or_path),
        "inference_mode": True,
    }
    if config.bias != "none":
        raise ValueError(f"export_to_peft: bias={config.bias!r} trains base biases, which a LoRA folder cannot hold")
    # Written aside and renamed into place (as save_pretrained): a failed export leaves an older folder as it was.
    with staged_files(save_directory, ("adapter_model.safetensors", "adapter_config.json")) as staging:
        with open(os.path.join(staging, "adapter_config.json"), "w") as handle:
            json.dump(peft_config, handle, indent=2)
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()},
                  os.path.join(staging, "adapter_model.safetensors"), metadata={"format": "pt"})


# -- the authors' `loretta` 0.1.0 package ----------------------------------------------------------------------

_LORETTA_KEY_RULES = [
    # (pattern on the key after "base_model.model.", replacement in structlora's adapter state dict)
    (re.compile(r"^(?P<m>.+)\.lora_A\.layer\.tensor\.factors\.(?P<k>\d+)$"), r"\g<m>.parameterization.lora_A.cores.\g<k>"),
    (re.compile(r"^(?P<m>.+)\.lora_B\.layer\.tensor\.factors\.(?P<k>\d+)$"), r"\g<m>.parameterization.lora_B.0.cores.\g<k>"),
    (re.compile(r"^(?P<m>.+)\.adapter_(?P<p>down|up)\.layer\.tensor\.factors\.(?P<k>\d+)$"),
     r"\g<m>.adapter_\g<p>.weight_tt.cores.\g<k>"),
    (re.compile(r"^(?P<m>.+)\.adapter_(?P<p>down|up)\.layer\.bias$"), r"\g<m>.adapter_\g<p>.bias"),
    (re.compile(r"^(?P<m>.+)\.adapter_scaling$"), r"\g<m>.adapter_scaling"),
    (re.compile(r"^(?P<m>classifier|pooler)\.dense\.layer\.tensor\.factors\.(?P<k>\d+)$"), r"\g<m>.dense.weight_tt.cores.\g<k>"),
    (re.compile(r"^(?P<m>classifier|pooler)\.dense\.layer\.bias$"), r"\g<m>.dense.bias"),
    (re.compile(r"^(?P<m>classifier|score)\.(?P<rest>.+)$"), r"\g<m>.\g<rest>"),
]


def _read_loretta_weights(directory: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(path of the weights file, its tensors): a non-empty dict of string keys to tensors, or an error."""
    safe_path = os.path.join(directory, "adapter_model.safetensors")
    bin_path = os.path.join(directory, "adapter_model.bin")
    if os.path.isfile(safe_path):
        path = safe_path
        try:
            state = load_file(safe_path)
        except Exception as error:  # safetensors raises its own error type for a corrupt header
            raise ValueError(f"corrupt loretta weights file {safe_path!r}: {error}") from error
    elif not os.path.isfile(bin_path):
        raise FileNotFoundError(f"no adapter_model.bin or adapter_model.safetensors in {directory!r}")
    else:
        path = bin_path
        try:
            # The one non-safetensors read we allow: plain tensors only, never arbitrary objects.
            state = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several types for a corrupt or non-tensor file
            raise ValueError(f"corrupt or unsafe loretta weights file {bin_path!r}: {error}") from error
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} does not hold a state dict")
    if not state:
        raise ValueError(f"{path!r} holds no tensors: an empty save, not a trained adapter")
    for key, tensor in state.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path!r}: entry {key!r} is not a named tensor")
    return path, state


def _loretta_config(data: dict[str, Any]) -> LorettaRepConfig | LorettaAdpConfig:
    common = {"target_modules": data.get("target_modules"), "task_type": data.get("task_type"),
              "bias": data.get("bias") or "none", "tensor_rank": data.get("tensor_rank", 5), "init": "reference"}
    peft_type = data.get("peft_type")
    if peft_type == "LORA":
        if data.get("enable_lora"):
            raise ValueError("from_loretta supports unfused projections only (this folder uses enable_lora)")
        return LorettaRepConfig(r=data["r"], lora_alpha=data.get("lora_alpha") or data["r"],
                                lora_dropout=data.get("lora_dropout") or 0.0, **common)
    if peft_type == "BOTTLENECK":
        return LorettaAdpConfig(bottleneck_size=data["bottleneck_size"], non_linearity=data.get("non_linearity", "tanh"),
                                adapter_dropout=data.get("adapter_dropout") or 0.0, scaling=data.get("scaling", 1.0),
                                use_parallel_adapter=data.get("use_parallel_adapter", False), **common)
    raise ValueError(f"unsupported loretta peft_type {peft_type!r}; expected 'LORA' (LoRETTA_rep) or 'BOTTLENECK' (LoRETTA_adp)")


def from_loretta(model: nn.Module, directory: str, adapter_name: str = "default",
                 is_trainable: bool = False) -> PeftModel:
    """Load a folder saved by the authors' `loretta` 0.1.0 package; the outputs equal that package's.

    Their save holds adapter (and SEQ_CLS head) weights only: norms they trained are not in the folder,
    so the loaded norms are the base model's, exactly as when `loretta` itself reloads the folder.

    Args:
        model: the base model the folder was trained on.
        directory: the `loretta` folder (adapter_config.json and adapter_model.bin or .safetensors).
        adapter_name: the name to give the adapter.
        is_trainable: False (default) freezes the adapter.
    Returns:
        A structlora PeftModel, a peft.PeftModel (LoRETTA_rep for peft_type LORA, LoRETTA_adp for BOTTLENECK).
    Raises:
        FileNotFoundError: a missing file. ValueError: a corrupt or unsafe file, an unsupported config, or
            weights that do not fit the model; `model` is left as it was (all or nothing).
    """
    config_path = os.path.join(directory, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no adapter_config.json in {directory!r}: not a loretta adapter folder")
    try:
        with open(config_path) as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"corrupt loretta config {config_path!r}: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"corrupt loretta config {config_path!r}: expected a JSON object")
    try:
        config = _loretta_config(data)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"loretta config {config_path!r}: {error!s}") from error
    config.inference_mode = not is_trainable
    path, tensors = _read_loretta_weights(directory)  # read and checked before the model is touched
    snapshot = ModuleSnapshot(model)
    try:
        peft_model = get_peft_model(model, config, adapter_name)
        _fill_from_loretta(peft_model, adapter_name, path, tensors)
    except BaseException:
        snapshot.restore()  # the injected layers taken back out: `model` as it was
        raise
    if not is_trainable:
        peft_model.eval()
    return peft_model


_PEFT_PREFIX = "base_model.model."


def _fill_from_loretta(peft_model: PeftModel, adapter_name: str, path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Load the loretta tensors into `adapter_name` through PEFT's set_peft_model_state_dict (and the tuner's checks
    of shapes and finite values), after checking that every key has a place and nothing but norms is missing."""
    expected = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    # loretta's keys name the module path as structlora's earlier layout does: PEFT's key without `.adapters.`
    by_module_path = {key.removeprefix(_PEFT_PREFIX).replace(f".{ADAPTERS}.", "."): key for key in expected}
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        short = key.removeprefix(_PEFT_PREFIX)
        for pattern, replacement in _LORETTA_KEY_RULES:
            if pattern.match(short):
                target = pattern.sub(replacement, short)
                if target not in by_module_path:
                    raise ValueError(f"{path!r}: key {key!r} (as {target!r}) has no place in this model's adapter "
                                     f"(an adapter for another base model or config?)")
                converted[by_module_path[target]] = tensor
                break
        else:
            raise ValueError(f"{path!r}: unrecognised key {key!r} for a loretta adapter")
    # The reference never saves trained norms: keep the base model's (what `loretta` reloads too). Nothing
    # else may be missing: a missing adapter tensor would silently stay at its random initial value.
    norm_prefixes = tuple(f"{_PEFT_PREFIX}{name}.{ADAPTERS}." for name, module in
                          peft_model.get_base_model().named_modules()
                          if isinstance(module, TrainableCopy) and is_norm_module(module.original))
    missing = [key for key in expected if key not in converted]
    absent = [key for key in missing if not key.startswith(norm_prefixes)]
    if absent:
        raise ValueError(f"{path!r} lacks {len(absent)} adapter tensor(s) this config implies, e.g. "
                         f"{', '.join(absent[:3])} (in loretta's naming: base_model.model.<module>...)")
    if missing:
        logger.warning("from_loretta: %d trained-norm tensor(s) are not in %s (loretta never saves them); "
                       "the base model's norms are used, as when loretta reloads the folder", len(missing), path)
    for key in missing:
        converted[key] = expected[key].clone()
    result = set_peft_model_state_dict(peft_model, converted, adapter_name=adapter_name)
    # the tuner refuses a missing or misshapen tensor before copying; this catches a key PEFT itself skipped
    unexpected = list(getattr(result, "unexpected_keys", ()))
    if unexpected:
        raise ValueError(f"{path!r}: {len(unexpected)} tensor(s) were not taken by the model, e.g. {unexpected[0]}")
