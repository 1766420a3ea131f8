"""The LoRA / MTLoRA authors' beam search and decode step, on a Hugging Face causal LM.

Reimplements (does not copy) ``examples/NLG/src/gpt2_beam.py`` and ``gpt2_decode.py`` of
microsoft/LoRA, which the MTLoRA repository ships unchanged in this respect (see docs/FIDELITY.md).
It differs from ``transformers``' ``generate(num_beams=...)`` in ways that change the outputs:

* n-gram blocking looks at the *generated* tokens only (``generate`` also blocks n-grams of the prompt
  of a decoder-only model, so it cannot copy a 4-gram of the meaning representation);
* a hypothesis ends at any stop token (50256 ``<|endoftext|>`` or 628 ``"\\n\\n"`` for GPT-2; for another
  vocabulary its end-of-text and the token(s) it writes a blank line with, see ``stop_sequences``) and is
  scored ``sum log p / len ** length_penalty`` with ``len`` the generated length including the stop
  token; a finished beam stays in the beam with score ``-inf``; decoding always runs ``max_steps``
  steps and then also considers the unfinished beams;
* log-probabilities are ``log(softmax(logits))`` in float32, exactly as the script computes them.

:func:`authors_beam_search` returns each input's best sequence padded with 0 to ``max_steps`` tokens,
the script's ``predict`` field; :func:`authors_hypothesis` is the decode step's text clean-up and
:func:`authors_post_process` its ``--tokenize --lower`` option.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

GPT2_STOP_TOKENS: tuple[int, ...] = (50256, 628)  # <|endoftext|> and "\n\n" (the README's --eos_token_id 628)
# WebNLG / DART references: gpt2_decode.py --ref_num 6 writes six files (an input's first six references; the
# first one again where it has fewer), which GenerationEval reads with eval.py -nr 6 (LoRA NLG README).
AUTHORS_REFERENCE_FILES = 6


@dataclass
class AuthorsBeamSettings:
    """``gpt2_beam.py`` arguments as the README runs them (E2E: --beam 10 --eval_len 64
    --no_repeat_ngram_size 4 --repetition_penalty 1.0 --eos_token_id 628; length penalty 0.8)."""

    beams: int = 10
    length_penalty: float = 0.8
    no_repeat_ngram_size: int = 4
    repetition_penalty: float = 1.0
    max_steps: int = 64
    min_length: int = 0
    stop_tokens: tuple[int, ...] = GPT2_STOP_TOKENS
    # Multi-token stops: a hypothesis also ends when its generated tokens end with one of these (a blank line
    # in a vocabulary without a single "\n\n" token, e.g. Llama-2's 13, 13). GPT-2 needs none.
    stop_sequences: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if any(len(sequence) < 2 for sequence in self.stop_sequences):
            raise ValueError(f"stop_sequences must hold sequences of 2 or more tokens (single tokens go in "
                             f"stop_tokens), got {self.stop_sequences}")
        if self.stop_sequences and self.min_length > 0:
            raise ValueError("min_length > 0 with multi-token stop_sequences is not supported (the script bans "
                             "single stop tokens only)")


def banned_ngram_tokens(history: torch.Tensor, n: int, step: int) -> list[list[int]]:
    """For every hypothesis, the tokens that would repeat an n-gram of its generated tokens."""
    if step + 1 < n:
        return [[] for _ in range(history.shape[0])]
    banned = []
    for tokens in history.tolist():
        seen: dict[tuple[int, ...], list[int]] = {}
        for start in range(len(tokens) - n + 1):
            seen.setdefault(tuple(tokens[start:start + n - 1]), []).append(tokens[start + n - 1])
        banned.append(seen.get(tuple(tokens[step + 1 - n:step]), []))
    return banned


def _adjust_scores(logits: torch.Tensor, history: torch.Tensor | None, step: int,
                   settings: AuthorsBeamSettings) -> torch.Tensor:
    """Repetition penalty, minimum length and n-gram blocking, in the script's order, in place."""
    if history is not None and settings.repetition_penalty != 1.0:
        for row, tokens in enumerate(history.tolist()):
            for token in set(tokens):
                if logits[row, token] < 0:
                    logits[row, token] *= settings.repetition_penalty
                else:
                    logits[row, token] /= settings.repetition_penalty
    if step < settings.min_length:
        logits[:, list(settings.stop_tokens)] = -float("inf")
    if history is not None and settings.no_repeat_ngram_size > 0:
        for row, banned in enumerate(banned_ngram_tokens(history, settings.no_repeat_ngram_size, step)):
            logits[row, banned] = -float("inf")
    return logits


def _left_padded(prompts: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
        attention[row, width - len(ids):] = 1
    return input_ids, attention


def _ended(history: torch.Tensor, stop: torch.Tensor, sequences: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """Which hypotheses end here: last token a stop token, or last tokens one of the stop sequences."""
    ended = torch.isin(history[:, -1], stop)
    for sequence in sequences:
        if history.shape[-1] >= len(sequence):
            tail = torch.tensor(sequence, device=history.device)
            ended |= (history[:, -len(sequence):] == tail).all(dim=-1)
    return ended


@torch.no_grad()
def authors_beam_search(model, prompts: Sequence[Sequence[int]],
                        settings: AuthorsBeamSettings = AuthorsBeamSettings(), pad_token_id: int = 0
                        ) -> list[list[int]]:
    """Beam search of ``gpt2_beam.py`` over a batch of prompts (token ids, ending with the separator).
    Returns one list of ``max_steps`` token ids per prompt: the best hypothesis (its stop token
    included) followed by zeros, as the script's ``predict`` field."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if settings.beams < 1 or settings.max_steps < 1:
        raise ValueError(f"beams ({settings.beams}) and max_steps ({settings.max_steps}) must be >= 1")
    device = next(model.parameters()).device
    batch, beams = len(prompts), settings.beams
    input_ids, attention = _left_padded(prompts, pad_token_id)
    input_ids = input_ids.repeat_interleave(beams, dim=0).to(device)
    attention = attention.repeat_interleave(beams, dim=0).to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    offsets = (torch.arange(batch, device=device) * beams).unsqueeze(-1)
    stop = torch.tensor(settings.stop_tokens, device=device)

    best_score: dict[int, float] = {}
    best_sequence = torch.zeros((batch, settings.max_steps), dtype=torch.long)
    beam_scores = torch.zeros((batch, beams), dtype=torch.float, device=device)
    history: torch.Tensor | None = None
    past = None
    next_input, next_position = input_ids, positions

    def add_candidates(only_stopped: bool) -> None:
        length = history.shape[-1]
        flat = beam_scores.view(-1)
        ended = _ended(history, stop, settings.stop_sequences) if only_stopped \
            else torch.ones_like(flat, dtype=torch.bool)
        for index in ended.nonzero().flatten().tolist():
            score = flat[index] / length ** settings.length_penalty
            owner = index // beams
            if owner not in best_score or best_score[owner] < score:
                best_score[owner] = score
                best_sequence[owner, :length] = history[index].cpu()
            flat[index] = -float("inf")

    for step in range(settings.max_steps):
        out = model(input_ids=next_input, attention_mask=attention, position_ids=next_position,
                    past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = _adjust_scores(out.logits[:, -1, :].float(), history, step, settings)
        log_probs = torch.log(torch.softmax(logits, dim=-1))  # not log_softmax: the script's numerics
        vocab = log_probs.shape[-1]
        if step == 0:
            candidates = log_probs.view(batch, beams, vocab)[:, 0, :]
        else:
            candidates = (beam_scores.unsqueeze(-1) + log_probs.view(batch, beams, vocab)).view(batch, -1)
        beam_scores, tokens = torch.topk(candidates, beams, dim=1, largest=True, sorted=True)
        origin = (tokens // vocab + offsets).view(-1)
        token = (tokens % vocab).view(-1, 1)
        past.reorder_cache(origin)
        history = token if history is None else torch.cat((history[origin], token), dim=1)
        add_candidates(only_stopped=True)
        if bool(torch.isinf(beam_scores).all()):
            break  # every beam has ended: later steps cannot change the result
        attention = torch.cat((attention[origin], attention.new_ones((attention.shape[0], 1))), dim=1)
        next_position = next_position[:, -1:] + 1
        next_input = token
    add_candidates(only_stopped=False)
    return best_sequence.tolist()


def authors_hypothesis(tokenizer, predicted: Sequence[int]) -> str:
    """``gpt2_decode.py``: decode, cut at the first ``<|endoftext|>`` and the first blank line, strip."""
    text = tokenizer.decode(list(predicted), skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if tokenizer.eos_token:
        text = text.split(tokenizer.eos_token)[0]
    return text.split("\n\n")[0].strip()


def authors_post_process(text: str, tokenize: bool, lower: bool) -> str:
    """``gpt2_decode.py --lower --tokenize``: lower-case, then split around every non-word character."""
    if lower:
        text = text.lower()
    if tokenize:
        text = " ".join(re.split(r"(\W)", text)).split()
        text = " ".join(text)
    return text
