"""Checking an adapter's targets against a model before anything is injected, and replacing a target: the one
copy that structlora's own model (`structlora.model_injection`) and the PEFT tuner (`structlora.peft_tuner`) share.
"""

from __future__ import annotations

from typing import Callable, Union

from torch import nn

from .config import AdapterConfig, LoraConfig
from .layers import base_shape, layer_kind
from .targets import enabled_slices, unknown_target_error


def model_type_of(model: nn.Module) -> str:
    """The transformers `model_type` of `model` ("" for a model without a config)."""
    return getattr(getattr(model, "config", None), "model_type", "") or ""


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted path `name` inside `root`."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def unmatched_targets_error(model: nn.Module, targets: Union[list[str], str],
                            is_internal: Callable[[str], bool]) -> ValueError:
    """The error for targets that match no module of `model` (names inside adapter wrappers left out), with the
    closest module names and the adaptable ones."""
    names = [n for n, _ in model.named_modules() if not is_internal(n)]
    adaptable = [n for n, m in model.named_modules() if layer_kind(m) and not is_internal(n)]
    return unknown_target_error(targets, names, adaptable)


def adaptable_targets(found: list[tuple[str, nn.Module]], kinds: tuple[str, ...], config: AdapterConfig,
                      targets: Union[list[str], str]) -> list[tuple[str, str, nn.Module]]:
    """(name, layer kind, module) of every matched module (unwrapped from its adapter layer) the method can adapt;
    ValueError listing those of another kind when there is any."""
    adaptable, unadaptable = [], []
    for name, module in found:
        kind = layer_kind(module)
        if kind in kinds:
            adaptable.append((name, kind, module))
        else:
            unadaptable.append(f"{name} ({type(module).__name__})")
    if unadaptable:
        raise ValueError(
            f"target_modules {targets!r} matches {len(unadaptable)} module(s) that {config.method} cannot adapt: "
            f"{', '.join(unadaptable[:5])}{' …' if len(unadaptable) > 5 else ''}. It adapts "
            f"{', '.join(kinds)} layers only: narrow target_modules to those")
    return adaptable


def check_low_rank_options(config: LoraConfig, candidates: list[tuple[str, str, nn.Module]], model_type: str,
                           fused: dict[str, int] | None) -> None:
    """Refuse per-layer options that do not fit the layers they apply to: `enable_lora` (a key naming no target, a
    slice count other than the fused projection's) and `fan_in_fan_out` (structlora reads the layout itself).

    `fused`: the model's fused projections and their slice counts (`FUSED_PROJECTIONS`; a projection not in it has
    one); None for a model whose fused projections are unknown, where any count that divides the layer is taken."""
    enable = config.enable_lora
    if isinstance(enable, dict):
        for key in enable:
            if not any(name == key or name.endswith("." + key) for name, _, _ in candidates):
                leaves = sorted({name.rsplit(".", 1)[-1] for name, _, _ in candidates})
                raise ValueError(f"enable_lora key {key!r} matches none of the target modules "
                                 f"(targets: {', '.join(leaves)}); a key must name a targeted fused projection")
    for name, kind, module in candidates:
        slices = enabled_slices(config.enable_lora, name)
        if slices is not None and fused is not None:
            expected = fused.get(name.rsplit(".", 1)[-1], 1)
            out_features = base_shape(module)[1] if kind != "embedding" else None
            divides = out_features is None or out_features % len(slices) == 0
            if len(slices) != expected and divides:  # a count that does not divide is reported by the layer
                what = f"a fused projection of {expected} slices" if expected > 1 else "not a fused projection"
                raise ValueError(f"enable_lora gives {len(slices)} slices for {name!r}, which is {what} in a "
                                 f"{model_type} model; give exactly {expected} entr{'ies' if expected > 1 else 'y'}"
                                 f"{'' if expected > 1 else ' or leave enable_lora unset for it'}")
        if config.fan_in_fan_out is not None and config.fan_in_fan_out != (kind == "conv1d"):
            raise ValueError(
                f"fan_in_fan_out={config.fan_in_fan_out} does not fit {name!r}, a {kind} layer (stored "
                f"{'in x out' if kind == 'conv1d' else 'out x in'}); structlora detects the layout itself: "
                f"leave fan_in_fan_out unset")
