"""Tiny models built from a config, saved with a tokenizer to a folder: no hub access, a few seconds.

    from tiny_models import save_tiny_bert
    model_dir = save_tiny_bert(tmp_path / "tiny-bert")   # BertForSequenceClassification-loadable folder
"""

from __future__ import annotations

from pathlib import Path

# Enough words for the fixture sentences; anything else becomes [UNK] (word-piece falls back to it).
TINY_WORDS: tuple[str, ...] = (
    "the", "a", "an", "film", "movie", "is", "was", "good", "bad", "great", "awful", "fun", "boring",
    "not", "very", "and", "but", "it", "this", "that", "of", "to", "in", "story", "actors", "plot",
    "i", "you", "he", "she", "they", "we", "saw", "liked", "hated", "book", "cat", "dog", "ran",
    "man", "woman", "is", "are", "what", "who", "where", "why", "how", "yes", "no", "same", "different",
    "question", "answer", "sentence", "word", ".", ",", "?", "!", "'", "s",
)
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def write_tiny_vocab(path: Path) -> Path:
    words = list(dict.fromkeys(TINY_WORDS))  # unique, order kept
    path.write_text("\n".join([*SPECIAL_TOKENS, *words]) + "\n")
    return path


def save_tiny_bert(
    folder: str | Path,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    intermediate_size: int = 64,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised tiny ``BertModel`` and a ``BertTokenizerFast`` to ``folder``.

    Loading it with ``AutoModelForSequenceClassification`` adds a fresh head, like a real checkpoint."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = write_tiny_vocab(folder / "vocab.txt")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(vocab_file.read_text().split()),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)  # safetensors
    tokenizer.save_pretrained(folder)
    return folder


def tiny_word_tokenizer():
    """A whitespace word-level fast tokenizer over TINY_WORDS, with <pad>, <s>, </s> and <unk>: no files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {word: index for index, word in enumerate(dict.fromkeys([*specials, *TINY_WORDS]))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_llama_for(tokenizer, seed: int = 0, hidden_size: int = 32, num_hidden_layers: int = 2,
                   intermediate_size: int = 56):
    """A randomly initialised tiny LlamaForCausalLM whose vocabulary and special ids match `tokenizer`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config)


def save_tiny_gpt2(folder: str | Path, tokenizer, seed: int = 0) -> Path:  # noqa: ANN001 - a transformers tokenizer
    """Save a randomly initialised 2-block, 16-wide `GPT2LMHeadModel` (absolute positions, 128 of them) sized to
    ``tokenizer``'s vocabulary, with that tokenizer, to ``folder``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=128, vocab_size=len(tokenizer))
    if tokenizer.eos_token_id is not None:  # GPT-2's defaults (50256) only fit GPT-2's own tokenizer
        config.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        config.eos_token_id = tokenizer.eos_token_id
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def perturb_adapters(model, scale: float, seed: int = 0, generator=None):  # noqa: ANN001, ANN201 - PeftModel, returned
    """Adds seeded N(0, scale²) noise to every adapter parameter, in place: a stand-in for a trained adapter (a
    fresh one has B = 0, which would let a path skip work it must do when trained). `generator` (instead of
    `seed`): a caller's generator, which goes on to draw what it draws next. Returns the model."""
    import torch

    generator = generator if generator is not None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".adapters." in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model
