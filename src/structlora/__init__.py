"""structlora: MTLoRA and LoRETTA parameter-efficient fine-tuning for Hugging Face transformers."""

from .config import (AdapterConfig, BitFitConfig, DenseAdapterConfig, LoraConfig, LorettaAdpConfig,
                     LorettaRepConfig, MTLoraConfig, TaskType)
from .interop import export_to_peft, from_loretta
from .model import PeftModel, adapted_layers, get_peft_model

__version__ = "0.1.0"


def __getattr__(name: str):
    # The Trainer subclass imports transformers' Trainer (and accelerate): load it only when asked.
    if name == "AdapterTrainer":
        from .trainer import AdapterTrainer
        return AdapterTrainer
    raise AttributeError(f"module 'structlora' has no attribute {name!r}")


__all__ = [
    "AdapterConfig", "LoraConfig", "MTLoraConfig", "LorettaRepConfig", "LorettaAdpConfig", "DenseAdapterConfig",
    "BitFitConfig", "TaskType",
    "get_peft_model", "PeftModel", "adapted_layers", "export_to_peft", "from_loretta", "AdapterTrainer",
]
