"""Which modules an adapter goes on: PEFT-style matching and per-architecture defaults."""

from __future__ import annotations

import difflib
import re
from typing import Iterable, Union

from torch import nn

# Low-rank methods (LoRA, MTLoRA, LoRETTA_rep): attention query/value, as PEFT and the papers.
LOW_RANK_DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
}

# Where LoRETTA_adp puts its sequential adapters, and on which side of the projection (the authors'
# mapping: "mh_adapter" = before the linear, "output_adapter" = after it).
BOTTLENECK_PLACEMENT: dict[str, dict[str, str]] = {
    "bert": {"dense": "output"},
    "roberta": {"dense": "output"},
    "xlm-roberta": {"dense": "output"},
    "deberta": {"dense": "output"},
    "deberta-v2": {"dense": "output"},
    "llama": {"gate_proj": "input", "up_proj": "input", "down_proj": "output"},
    "mistral": {"gate_proj": "input", "up_proj": "input", "down_proj": "output"},
    "qwen2": {"gate_proj": "input", "up_proj": "input", "down_proj": "output"},
    "gemma": {"gate_proj": "input", "up_proj": "input", "down_proj": "output"},
    "gemma2": {"gate_proj": "input", "up_proj": "input", "down_proj": "output"},
    "opt": {"fc1": "input", "fc2": "output"},
    "gpt2": {"c_fc": "input", "c_proj": "output"},
}

# BERT family: after `attention.output.dense` and the layer's `output.dense`.
_BERT_FAMILY_ADAPTER_TARGETS = r".*\.output\.dense"
BOTTLENECK_DEFAULT_TARGETS: dict[str, Union[list[str], str]] = {
    "bert": _BERT_FAMILY_ADAPTER_TARGETS,
    "roberta": _BERT_FAMILY_ADAPTER_TARGETS,
    "xlm-roberta": _BERT_FAMILY_ADAPTER_TARGETS,
    "deberta": _BERT_FAMILY_ADAPTER_TARGETS,
    "deberta-v2": _BERT_FAMILY_ADAPTER_TARGETS,
    "llama": ["gate_proj", "up_proj", "down_proj"],
    "mistral": ["gate_proj", "up_proj", "down_proj"],
    "qwen2": ["gate_proj", "up_proj", "down_proj"],
    "gemma": ["gate_proj", "up_proj", "down_proj"],
    "gemma2": ["gate_proj", "up_proj", "down_proj"],
    "opt": ["fc1", "fc2"],
    "gpt2": r".*\.mlp\.c_(fc|proj)",
}
# Dense adapters (DenseAdapterConfig): Houlsby = after the attention output projection and after the FFN,
# Pfeiffer = after the FFN only. Every one sits on the projection's output ("output" placement).
_LLAMA_FAMILY = ("llama", "mistral", "qwen2", "gemma", "gemma2")
DENSE_ADAPTER_DEFAULT_TARGETS: dict[str, dict[str, Union[list[str], str]]] = {
    "houlsby": {
        **{family: _BERT_FAMILY_ADAPTER_TARGETS for family in ("bert", "roberta", "xlm-roberta", "deberta",
                                                               "deberta-v2")},
        **{family: ["o_proj", "down_proj"] for family in _LLAMA_FAMILY},
        "opt": ["out_proj", "fc2"],
        "gpt2": r".*\.(attn|mlp)\.c_proj",
    },
    "pfeiffer": {
        **{family: r".*\.layer\.\d+\.output\.dense" for family in ("bert", "roberta", "xlm-roberta",
                                                                     "deberta", "deberta-v2")},
        **{family: ["down_proj"] for family in _LLAMA_FAMILY},
        "opt": ["fc2"],
        "gpt2": r".*\.mlp\.c_proj",
    },
}
PARALLEL_DEFAULT_TARGETS: dict[str, list[str]] = {
    family: ["q_proj", "k_proj", "v_proj"] for family in ("llama", "mistral", "qwen2", "gemma", "gemma2", "opt")
}

# Fused projections and their slice count (an `enable_lora` list must have exactly this many entries there).
FUSED_PROJECTIONS: dict[str, dict[str, int]] = {
    "gpt2": {"c_attn": 3},  # q, k, v
    "gpt_neox": {"query_key_value": 3},
    "phi3": {"qkv_proj": 3, "gate_up_proj": 2},
}


class TargetWarning(UserWarning):
    """Some modules `target_modules` matches are not adapted (they are trained in full instead)."""


# Heads of a sequence classifier (trained and saved with the adapter, as PEFT's modules_to_save).
CLASSIFIER_HEAD_NAMES = ("classifier", "score")


def module_matches(name: str, targets: Union[list[str], str]) -> bool:
    """PEFT semantics: a string is a regex matched against the whole name; a list entry matches a name
    equal to it or ending in `.entry`."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith("." + target) for target in targets)


def default_targets(model_type: str, method: str, parallel: bool = False,
                    placement: str = "houlsby") -> Union[list[str], str]:
    if method == "adapter" and not parallel:
        table = DENSE_ADAPTER_DEFAULT_TARGETS[placement]
    elif method in ("loretta_adp", "adapter"):
        table = PARALLEL_DEFAULT_TARGETS if parallel else BOTTLENECK_DEFAULT_TARGETS
    else:
        table = LOW_RANK_DEFAULT_TARGETS
    if model_type not in table:
        raise ValueError(
            f"no default target_modules for model type {model_type!r} with method {method!r}; "
            f"pass target_modules (names or a regex). Architectures with defaults: {', '.join(sorted(table))}"
        )
    return table[model_type]


def unknown_target_error(targets: Union[list[str], str], names: Iterable[str],
                         adaptable: Iterable[str]) -> ValueError:
    """An error listing the model's module names that could have been meant."""
    names = list(names)
    adaptable = list(adaptable)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in adaptable})
    suggestions: list[str] = []
    for target in ([targets] if isinstance(targets, str) else targets):
        last = target.rsplit(".", 1)[-1]
        suggestions += difflib.get_close_matches(last, leaves, n=3, cutoff=0.4)
    hint = f" Did you mean: {', '.join(dict.fromkeys(suggestions))}?" if suggestions else ""
    return ValueError(
        f"target_modules {targets!r} matched no adaptable module of this model.{hint} "
        f"Adaptable module names (last component): {', '.join(leaves) or '(none)'}."
    )


def is_norm_module(module: nn.Module) -> bool:
    """LayerNorm / RMSNorm of any family (class name contains 'Norm' and it owns parameters)."""
    return "norm" in type(module).__name__.lower() and any(True for _ in module.parameters(recurse=False))


def enabled_slices(enable_lora: Union[list[bool], dict[str, list[bool]], None], name: str) -> list[bool] | None:
    """The slices of module `name` that get an adapter under a config's `enable_lora` (a list for every target, or
    a dict from a module-name suffix to its list); None: not a fused projection."""
    if isinstance(enable_lora, dict):
        for suffix, slices in enable_lora.items():
            if name == suffix or name.endswith("." + suffix):
                return list(slices)
        return None
    return list(enable_lora) if enable_lora is not None else None
