"""A tiny Llama and byte-level BPE tokenizer built offline in about a second (tests, smoke runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

_DEFAULT_CORPUS: tuple[str, ...] = (
    "It was great. It was terrible. Yes or No? Yes, No, or Maybe? Question: Answer: Passage: Title:",
    "Does this mean that the claim is true? Can we infer that? the man turned on the faucet so water flowed",
    "because she was tired. In the previous sentence, does the pronoun refer to him? I found this answer.",
)


def save_tiny_llama(folder: str | Path, corpus: Iterable[str] = (), vocab_size: int = 400,
                    hidden_size: int = 32, num_hidden_layers: int = 2, seed: int = 0) -> Path:
    """Save a randomly initialised `LlamaForCausalLM` and a `PreTrainedTokenizerFast` to `folder`."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([*_DEFAULT_CORPUS, *corpus], vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<s>", "</s>", "<pad>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", padding_side="left")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)  # safetensors
    tokenizer.save_pretrained(folder)
    return folder
