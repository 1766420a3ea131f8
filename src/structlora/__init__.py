"""structlora: MTLoRA and LoRETTA parameter-efficient fine-tuning for Hugging Face transformers."""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from . import _plugin

__version__ = "0.1.0"

# Public names and the module that defines each. They are imported on first use (PEP 562), so that
# `import structlora` (and `structlora --help`) does not pay for torch and transformers until needed.
_EXPORTS: dict[str, str] = {
    "AdapterConfig": "config", "LoraConfig": "config", "MTLoraConfig": "config", "LorettaRepConfig": "config",
    "LorettaAdpConfig": "config", "TaskType": "config", "DenseAdapterConfig": "config", "BitFitConfig": "config",
    "export_to_peft": "interop", "from_loretta": "interop", "convert_folder": "convert",
    "PeftModel": "peft_model", "adapted_layers": "model", "get_peft_model": "peft_model",
    "PeftModelForCausalLM": "peft_model", "PeftModelForSequenceClassification": "peft_model",
    "PeftModelForSeq2SeqLM": "peft_model", "PeftModelForTokenClassification": "peft_model",
    "clear_factor_caches": "inference",
    "AdapterTrainer": "trainer",
    "TargetWarning": "targets",
    "create_loraplus_optimizer": "loraplus",
    "StructloraPeftType": "config",
}

if TYPE_CHECKING:
    from .convert import convert_folder
    from .config import (AdapterConfig, BitFitConfig, DenseAdapterConfig, LoraConfig, LorettaAdpConfig,
                         LorettaRepConfig, MTLoraConfig, StructloraPeftType, TaskType)
    from .inference import clear_factor_caches
    from .interop import export_to_peft, from_loretta
    from .loraplus import create_loraplus_optimizer
    from .model import adapted_layers
    from .peft_model import (PeftModel, PeftModelForCausalLM, PeftModelForSeq2SeqLM,
                             PeftModelForSequenceClassification, PeftModelForTokenClassification, get_peft_model)
    from .targets import TargetWarning
    from .trainer import AdapterTrainer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'structlora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    if "structlora.config" in sys.modules:
        _plugin.register_when_possible()  # the methods are in PEFT's tables before a config reaches peft's loaders
    globals()[name] = value  # later look-ups skip this function
    return value


# structlora's methods go into PEFT's tables as soon as peft is imported (now, if it already is): `peft.PeftModel
# .from_pretrained` then loads structlora folders. peft itself is not imported here (seconds; see _plugin).
_plugin.activate()


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "AdapterConfig", "LoraConfig", "MTLoraConfig", "LorettaRepConfig", "LorettaAdpConfig", "DenseAdapterConfig",
    "BitFitConfig", "TaskType", "StructloraPeftType",
    "get_peft_model", "PeftModel", "PeftModelForCausalLM", "PeftModelForSequenceClassification",
    "PeftModelForSeq2SeqLM", "PeftModelForTokenClassification", "adapted_layers", "export_to_peft", "from_loretta", "convert_folder",
    "AdapterTrainer", "clear_factor_caches", "TargetWarning", "create_loraplus_optimizer",
]
