"""Batched beam-search decoding with resumable output and the scorers' reference files."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from ..prompt_learning import check_generate_matches_forward, generation_cache_kwargs
from .authors_decoding import (AUTHORS_REFERENCE_FILES, AuthorsBeamSettings, authors_beam_search, authors_hypothesis,
                               authors_post_process)
from .data import NLGInput, write_e2e_references, write_multi_references
from .modeling import SEPARATOR, prompt_ids

DECODING_MODES: tuple[str, ...] = ("authors", "hf")
_AUTHORS = AuthorsBeamSettings()  # the README's values, defined once in authors_decoding


@dataclass
class DecodingSettings:
    """The LoRA / MTLoRA decoding settings (the MTLoRA README: beam 10, length penalty 0.8, 4-gram
    blocking, 64 steps). ``mode="authors"`` is their ``gpt2_beam.py`` + ``gpt2_decode.py``
    (``structlora.tasks.nlg.authors_decoding``); ``mode="hf"`` is transformers' ``generate``, whose n-gram
    blocking also covers the prompt and whose beams stop differently. ``tokenize_lower`` is the decode
    step's ``--tokenize --lower`` (the authors use it for WebNLG and DART, on outputs and references)."""

    beams: int = _AUTHORS.beams
    length_penalty: float = _AUTHORS.length_penalty
    no_repeat_ngram_size: int = _AUTHORS.no_repeat_ngram_size
    repetition_penalty: float = _AUTHORS.repetition_penalty
    max_new_tokens: int = _AUTHORS.max_steps
    batch_size: int = 8
    mode: str = "authors"
    tokenize_lower: bool = False

    def __post_init__(self) -> None:
        if self.mode not in DECODING_MODES:
            raise ValueError(f"decoding mode {self.mode!r} is not one of {', '.join(DECODING_MODES)}")


def blank_line_tokens(tokenizer) -> tuple[int, ...]:
    """The token(s) the tokenizer writes a blank line with after text: ``ids("x\\n\\n")`` minus ``ids("x")``
    (GPT-2: 628; SmolLM2: 1116; Llama-2's SentencePiece: 13, 13, without the word-start piece a bare
    ``"\\n\\n"`` would get). Raises ValueError when the two encodings do not share that prefix."""
    word = tokenizer("x", add_special_tokens=False)["input_ids"]
    with_blank = tokenizer("x\n\n", add_special_tokens=False)["input_ids"]
    if with_blank[:len(word)] != word or len(with_blank) == len(word):
        raise ValueError(f"cannot tell which tokens write a blank line in this vocabulary ('x' -> {word}, "
                         f"'x\\n\\n' -> {with_blank}): the authors' decoding stops at end-of-text or a blank line; "
                         f"use --decoding hf")
    return tuple(with_blank[len(word):])


def stop_tokens(tokenizer) -> tuple[int, ...]:
    """The authors' single stop tokens: end-of-text and, where the vocabulary has one token for it, the blank
    line (GPT-2: 50256 and 628, the README's ``--eos_token_id 628``)."""
    blank = blank_line_tokens(tokenizer)
    return (tokenizer.eos_token_id,) + (blank if len(blank) == 1 else ())


def stop_sequences(tokenizer) -> tuple[tuple[int, ...], ...]:
    """The blank line as a multi-token stop, for vocabularies without a single ``"\\n\\n"`` token."""
    blank = blank_line_tokens(tokenizer)
    return (blank,) if len(blank) > 1 else ()


def sidecar_paths(output: str | os.PathLike) -> dict[str, str]:
    """Files written beside ``hyps.txt``: inputs, E2E references, GenerationEval reference prefix,
    WebNLG seen/unseen flags."""
    output = str(output)
    stem = output[:-4] if output.endswith(".txt") else output
    return {
        "sources": f"{stem}.sources.txt",
        "e2e_references": f"{stem}.references.txt",
        "reference_prefix": f"{stem}.reference",
        "seen": f"{stem}.seen.txt",
        "record": f"{stem}.generate.json",  # what produced the hypotheses: adapter fingerprint, data, settings
    }


def write_reference_files(dataset: str, inputs: Sequence[NLGInput], output: str | os.PathLike,
                          tokenize_lower: bool = False) -> dict[str, str]:
    """Write the sources and the references in the layout the dataset's scorer expects.
    ``tokenize_lower``: as ``gpt2_decode.py --ref_num 6 --tokenize --lower`` for WebNLG/DART: references
    lower-cased and split around non-word characters, exactly six per input (the first six; an input with
    fewer gets its first reference again instead of an empty line)."""
    paths = sidecar_paths(output)
    if tokenize_lower and dataset != "e2e":
        count = AUTHORS_REFERENCE_FILES
        inputs = [replace(x, references=tuple(authors_post_process(r, True, True)
                                              for r in (x.references + x.references[:1] * count)[:count]))
                  if x.references else x for x in inputs]
    with open(paths["sources"], "w", encoding="utf-8") as handle:
        handle.writelines(" ".join(x.source.split()) + "\n" for x in inputs)
    written = {"sources": paths["sources"]}
    if dataset == "e2e":
        write_e2e_references(inputs, paths["e2e_references"])
        written["references"] = paths["e2e_references"]
    else:
        write_multi_references(inputs, paths["reference_prefix"])
        written["reference_prefix"] = paths["reference_prefix"]
        if dataset == "webnlg":
            with open(paths["seen"], "w", encoding="utf-8") as handle:
                handle.writelines(("seen" if x.seen else "unseen") + "\n" for x in inputs)
            written["seen"] = paths["seen"]
    return written


def clean_hypothesis(text: str) -> str:
    """Cut at the first blank line and flatten to one line (one hypothesis per output line)."""
    text = text.replace("\r\n", "\n")
    blank = text.find("\n\n")
    if blank >= 0:
        text = text[:blank]
    return " ".join(text.split())


def completed_lines(output: str | os.PathLike) -> int:
    """How many hypotheses an earlier (interrupted) run left; a half-written last line is removed."""
    path = Path(output)
    if not path.exists():
        return 0
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        path.write_bytes(data)
    return data.count(b"\n")


@torch.no_grad()
def generate_hypotheses(model, tokenizer, inputs: Sequence[NLGInput], output: str | os.PathLike,
                        settings: DecodingSettings, separator: str = SEPARATOR, resume: bool = True,
                        progress: bool = True, max_length: int | None = None) -> int:
    """Decode one hypothesis per input into ``output`` (one line each, in input order), appending
    after the lines an earlier run wrote when ``resume``. Returns the number decoded now."""
    from tqdm.auto import tqdm

    done = completed_lines(output) if resume else 0
    if done > len(inputs):
        raise ValueError(f"{output} has {done} lines but there are only {len(inputs)} inputs")
    if not resume and os.path.exists(output):
        os.remove(output)
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    remaining = list(inputs[done:])
    if remaining:
        check_generate_matches_forward(model, prompt_ids(tokenizer, remaining[0].source, separator))
    bar = tqdm(total=len(inputs), initial=done, desc="generate", unit="input", disable=not progress)
    decoded = 0
    with open(output, "a", encoding="utf-8") as handle:
        for start in range(0, len(remaining), settings.batch_size):
            batch = remaining[start:start + settings.batch_size]
            prompts = [prompt_ids(tokenizer, x.source, separator) for x in batch]
            if max_length is not None:  # keep the end of over-long contexts (the separator must stay)
                prompts = [p[-max(1, max_length - settings.max_new_tokens):] for p in prompts]
            decode = _authors_batch if settings.mode == "authors" else _hf_batch
            for text in decode(model, tokenizer, prompts, settings, pad, device):
                handle.write(text + "\n")
            handle.flush()  # a crash loses at most the batch in flight
            decoded += len(batch)
            bar.update(len(batch))
    bar.close()
    return decoded


def _authors_batch(model, tokenizer, prompts: list[list[int]], settings: DecodingSettings, pad: int,
                   device) -> list[str]:
    """``gpt2_beam.py`` beams, then ``gpt2_decode.py``'s clean-up (and ``--tokenize --lower``)."""
    beam = AuthorsBeamSettings(beams=settings.beams, length_penalty=settings.length_penalty,
                               no_repeat_ngram_size=settings.no_repeat_ngram_size,
                               repetition_penalty=settings.repetition_penalty, max_steps=settings.max_new_tokens,
                               stop_tokens=stop_tokens(tokenizer), stop_sequences=stop_sequences(tokenizer))
    texts = [authors_hypothesis(tokenizer, row) for row in authors_beam_search(model, prompts, beam, pad)]
    # One output line per input: a hypothesis with single newlines stays one line, as in their file.
    return [" ".join(authors_post_process(t, settings.tokenize_lower, settings.tokenize_lower).split("\n"))
            for t in texts]


def _hf_batch(model, tokenizer, prompts: list[list[int]], settings: DecodingSettings, pad: int,
              device) -> list[str]:
    """transformers' beam search on left-padded prompts, cut at end-of-text and the first blank line."""
    eos = tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):  # left padding: every prompt ends where generation starts
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention[row, width - len(ids):] = 1
    generated = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention.to(device),
        num_beams=settings.beams, num_return_sequences=1, do_sample=False,
        length_penalty=settings.length_penalty, no_repeat_ngram_size=settings.no_repeat_ngram_size,
        repetition_penalty=settings.repetition_penalty, max_new_tokens=settings.max_new_tokens,
        early_stopping=True, eos_token_id=eos, pad_token_id=pad, **generation_cache_kwargs(model),
    )
    texts = []
    for row in generated[:, width:].tolist():
        if eos in row:  # cut at end-of-text
            row = row[: row.index(eos)]
        text = tokenizer.decode(row, skip_special_tokens=True)
        if settings.tokenize_lower:
            text = authors_post_process(text, True, True)
        texts.append(clean_hypothesis(text))
    return texts
