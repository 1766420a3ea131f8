"""Quantized base models (QLoRA-style): bitsandbytes `Linear4bit` (nf4, fp4, double quant) and `Linear8bitLt`,
torchao weight-only tensors (e.g. `Int8WeightOnlyConfig`).

Every method wraps such a layer like any nn.Linear: the layer's own forward computes the base output in its
compute dtype and the adapter, kept in fp32 masters, adds its update cast to that dtype (the generic path of
`structlora.engine`; the fused dense path needs a plain weight). What cannot be done in place is merging:
adding ΔW to a 4- or 8-bit weight means re-quantizing W + ΔW, which rounds a small ΔW mostly away and cannot
be undone by `unmerge_adapter`. So `merge_adapter` and `merge_and_unload` refuse on a quantized base, and
`merge_and_unload_dequantized` gives the merged model in full precision instead (exact: dequantized W + ΔW),
which plain transformers saves and reloads, and which can be quantized again at load time.

Preparing a 4/8-bit model for training is PEFT's `prepare_model_for_kbit_training` (also importable from here).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

import torch
from torch import nn


def _bnb_class(module: nn.Module) -> str | None:
    """'Linear4bit' / 'Linear8bitLt' for bitsandbytes layers (by class, without importing bitsandbytes)."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("bitsandbytes") and cls.__name__ in ("Linear4bit", "Linear8bitLt"):
            return cls.__name__
    return None


def is_quantized(module: nn.Module) -> bool:
    """A linear layer whose weight is not a plain floating-point tensor (bitsandbytes, torchao, …). An adapter
    wrapper is not one itself (PEFT's layers show their base layer's `weight`): its `base_layer` may be."""
    if _bnb_class(module) is not None:
        return True
    if isinstance(getattr(module, "base_layer", None), nn.Module):
        return False
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return False
    tensor_subclass = type(weight) not in (torch.Tensor, nn.Parameter) and hasattr(weight, "dequantize")
    return tensor_subclass or not weight.dtype.is_floating_point


def describe(module: nn.Module) -> str:
    kind = _bnb_class(module)
    if kind == "Linear4bit":
        state = getattr(module.weight, "quant_state", None)
        quant_type = getattr(state, "quant_type", "4-bit")
        return f"bitsandbytes Linear4bit ({quant_type})"
    if kind:
        return f"bitsandbytes {kind}"
    return f"{type(module).__name__} with a {type(module.weight).__name__} weight"


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The (out x in) weight a quantized linear computes with, in fp32."""
    kind = _bnb_class(module)
    if kind:
        import bitsandbytes.functional as bnb_functional
    if kind == "Linear4bit":
        data, state = module.weight.data, module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks the weight for its CPU kernel at the first no-grad forward: unpack a copy.
            data, state = bnb_functional._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
        return bnb_functional.dequantize_4bit(data, state).float()
    if kind == "Linear8bitLt":
        # The row scales move from the weight to the layer's state at the first forward.
        weight = module.weight
        codes = weight.CB if getattr(weight, "CB", None) is not None else weight.data
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return bnb_functional.int8_vectorwise_dequant(codes, scales).float()
    weight = module.weight
    if hasattr(weight, "dequantize"):
        return weight.dequantize().float()
    raise TypeError(f"cannot dequantize {describe(module)}")


def refuse_quantized_merge(layers: Iterable[tuple[str, nn.Module]], what: str) -> None:
    """Raise before anything changes if an adapted layer's base is quantized."""
    for name, layer in layers:
        base = getattr(layer, "base_layer", None)
        if base is not None and is_quantized(base):
            raise ValueError(
                f"{what} cannot merge into {name!r}: its base is a {describe(base)}, so merging would re-quantize "
                f"W + ΔW, which rounds most of the adapter's update away and cannot be unmerged. Use "
                f"structlora.quantized.merge_and_unload_dequantized(model) for a full-precision merged model, or "
                f"keep the adapter unmerged (it runs on the quantized base as it is)")


def _plain_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    weight = dequantized_weight(module)
    bias = getattr(module, "bias", None)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias.float())
    return linear


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every quantized linear of `model` (adapter wrappers' bases included) by an nn.Linear holding its
    dequantized weight, in place; drop transformers' quantization markers so `save_pretrained` writes a plain
    checkpoint."""
    _dequantize(model, dtype)
    return model


def _dequantize(model: nn.Module, dtype: torch.dtype) -> Callable[[], None]:
    """dequantize_model, all or nothing; returns a function that puts the quantized modules and markers back."""
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    removed: list[tuple[Any, str, Any]] = []

    def undo() -> None:
        for module, child_name, child in reversed(replaced):
            setattr(module, child_name, child)
        for owner, attribute, value in reversed(removed):
            setattr(owner, attribute, value)

    try:
        for module in list(model.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear) and is_quantized(child):
                    plain = _plain_linear(child, dtype)
                    replaced.append((module, child_name, child))
                    setattr(module, child_name, plain)
        for target in (model, getattr(model, "base_model", None)):
            config = getattr(target, "config", None)
            if config is not None and hasattr(config, "quantization_config"):
                removed.append((config, "quantization_config", config.quantization_config))
                del config.quantization_config
            for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized", "hf_quantizer",
                         "quantization_method"):
                if isinstance(target, nn.Module) and flag in target.__dict__:
                    removed.append((target, flag, target.__dict__[flag]))
                    delattr(target, flag)
    except BaseException:
        undo()
        raise
    return undo


def merge_and_unload_dequantized(model: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The active adapter merged into a full-precision copy of the quantized base: every quantized linear
    becomes an nn.Linear with its dequantized weight (the weights the quantized model computes with), then the
    adapter is merged exactly. The quantized model is consumed (its modules are replaced).

    All or nothing: what merge_and_unload refuses for another reason than the quantized base (a bottleneck
    adapter, inside disable_adapter(), after merge_and_unload) is refused before anything is dequantized, and a
    failure later (a non-finite ΔW, an interrupt) puts the quantized modules back before it propagates."""
    _check_mergeable(model, "merge_and_unload_dequantized")
    undo = _dequantize(model.get_base_model(), dtype)
    try:
        return model.merge_and_unload()
    except BaseException:
        undo()
        raise


def _check_mergeable(model: Any, what: str) -> None:
    """Raise, changing nothing, if merging `model`'s active adapter would be refused for another reason than its
    quantized base: after merge_and_unload, inside disable_adapter(), while merged, or a bottleneck adapter."""
    check = getattr(model, "check_mergeable", None)
    if callable(check):  # structlora's earlier model class (BitFit)
        check(what, quantized_ok=True)
        return
    from .config import LorettaAdpConfig  # imports peft: not at this module's import

    model.adapter_state.check_merge()
    for name in model.active_adapters:
        config = model.peft_config[name]
        if isinstance(config, LorettaAdpConfig):
            kind = "dense" if config.method == "adapter" else "LoRETTA_adp"
            raise ValueError(f"{what} is not possible for {kind} adapter {name!r}: a bottleneck adapter applies a "
                             f"non-linearity (down → {config.non_linearity} → up) to the activations, so it is not a "
                             f"change of the weights and cannot be folded into them; nothing was dequantized")


def __getattr__(name: str) -> Any:
    """`prepare_model_for_kbit_training` is PEFT's own function (`peft.prepare_model_for_kbit_training`), re-exported
    here for the imports of earlier releases; peft is imported on first use, not with this module."""
    if name == "prepare_model_for_kbit_training":
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
