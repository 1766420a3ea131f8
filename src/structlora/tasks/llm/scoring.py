"""Tokenising prompted examples, scoring candidates, the training losses and greedy generation.

A candidate's score is the mean log-likelihood of its completion tokens given the context (MeZO).
Batches are left-padded so every completion ends at the last position: the model then only has to
produce logits for the last few positions (`logits_to_keep`), which keeps the vocabulary-sized
logits tensor small even for long passages (BoolQ, MultiRC, ReCoRD).  Where the model has a KV cache,
the context an example's candidates share goes through the model once (`shared_prefix_log_likelihoods`).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F

from ..prompt_learning import check_generate_matches_forward, generation_cache_kwargs, is_prompt_learning
from .tasks import PromptedExample

Objective = Literal["candidates", "lm"]


@dataclass(frozen=True)
class EncodedRow:
    """Token ids of `context + completion`; the last `completion_length` ids are the completion."""

    input_ids: tuple[int, ...]
    completion_length: int


@dataclass(frozen=True)
class EncodedExample:
    rows: tuple[EncodedRow, ...]  # one per candidate (only the gold one for the "lm" objective)
    gold: int  # index of the gold row


def pad_token_id(tokenizer: Any) -> int:
    """The pad id, falling back to EOS (Llama-style tokenizers have no pad token)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def encode_context(tokenizer: Any, context: str) -> list[int]:
    return list(tokenizer(context, add_special_tokens=True)["input_ids"])


def encode_candidate(tokenizer: Any, context_ids: Sequence[int], context: str, completion: str,
                     max_length: int) -> EncodedRow:
    """Tokenise `context + completion` as one string when the context tokens stay a prefix of it (so
    merges across the boundary look like running text, as MeZO does), else concatenate the two
    tokenisations.  Over-long rows lose tokens from the left, never from the completion."""
    full_ids = list(tokenizer(context + completion, add_special_tokens=True)["input_ids"])
    if full_ids[: len(context_ids)] == list(context_ids) and len(full_ids) > len(context_ids):
        completion_length = len(full_ids) - len(context_ids)
    else:
        completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
        full_ids = list(context_ids) + completion_ids
        completion_length = len(completion_ids)
    if completion_length == 0:
        raise ValueError(f"completion {completion!r} has no tokens")
    if len(full_ids) > max_length:
        full_ids = full_ids[-max_length:]
        completion_length = min(completion_length, max_length - 1)
    return EncodedRow(tuple(full_ids), completion_length)


def encode_example(tokenizer: Any, example: PromptedExample, max_length: int,
                   objective: Objective = "candidates") -> EncodedExample:
    """All candidates for scoring / the "candidates" loss; only the gold one for the "lm" loss."""
    context_ids = encode_context(tokenizer, example.context)
    if objective == "lm":
        completions, gold = (example.gold_completion,), 0
    else:
        completions, gold = example.candidates, example.gold[0]
    rows = tuple(encode_candidate(tokenizer, context_ids, example.context, c, max_length) for c in completions)
    return EncodedExample(rows, gold)


class EncodedDataset(torch.utils.data.Dataset):
    """A list of encoded examples for `transformers.Trainer` (no column pruning needed)."""

    def __init__(self, examples: Sequence[EncodedExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> EncodedExample:
        return self.examples[index]


def collate_rows(rows: Sequence[EncodedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded `input_ids`, `attention_mask`, `position_ids` and `completion_lengths`."""
    width = max(len(row.input_ids) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row.input_ids):] = torch.tensor(row.input_ids)
        attention_mask[i, width - len(row.input_ids):] = 1
    # Positions count real tokens only, so left padding does not shift the rotary / learned positions.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    completion_lengths = torch.tensor([row.completion_length for row in rows], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "completion_lengths": completion_lengths}


class ExampleCollator:
    """Flattens the candidate rows of a batch of `EncodedExample`s; `group_sizes` and `gold` let the
    loss regroup the row scores per example."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: Sequence[EncodedExample]) -> dict[str, torch.Tensor]:
        groups = [example.rows for example in examples]
        batch = collate_rows([row for rows in groups for row in rows], self.pad_id)
        batch.update(collate_shared_prefix(groups, self.pad_id))
        batch["group_sizes"] = torch.tensor([len(rows) for rows in groups], dtype=torch.long)
        batch["gold"] = torch.tensor([example.gold for example in examples], dtype=torch.long)
        return batch


def _shared_prefix_length(rows: Sequence[EncodedRow]) -> int:
    """Leading tokens all rows of one example share, stopping before the first completion token."""
    limit = min(len(row.input_ids) - row.completion_length for row in rows)
    first = rows[0].input_ids
    length = 0
    while length < limit and all(row.input_ids[length] == first[length] for row in rows):
        length += 1
    return length


def collate_shared_prefix(groups: Sequence[Sequence[EncodedRow]], pad_id: int) -> dict[str, torch.Tensor]:
    """Tensors to run each example's shared prefix once and only the candidates' suffixes per row:
    `prefix_*` (left-padded, one per example) and `suffix_*` (right-padded, one per row; the attention
    mask spans prefix + suffix).  Empty when some example shares no token (no BOS, empty context)."""
    prefix_lengths = [_shared_prefix_length(rows) for rows in groups]
    if min(prefix_lengths) == 0:
        return {}
    prefix = collate_rows([EncodedRow(rows[0].input_ids[:p], 1) for rows, p in zip(groups, prefix_lengths)], pad_id)
    suffixes = [(e, row.input_ids[p:], row.completion_length)
                for e, (rows, p) in enumerate(zip(groups, prefix_lengths)) for row in rows]
    width = max(len(ids) for _, ids, _ in suffixes)
    suffix_ids = torch.full((len(suffixes), width), pad_id, dtype=torch.long)
    suffix_mask = torch.zeros((len(suffixes), width), dtype=torch.long)
    for i, (_, ids, _) in enumerate(suffixes):
        suffix_ids[i, :len(ids)] = torch.tensor(ids)
        suffix_mask[i, :len(ids)] = 1
    row_example = torch.tensor([e for e, _, _ in suffixes], dtype=torch.long)
    real_prefix = torch.tensor(prefix_lengths, dtype=torch.long)[row_example]
    return {
        "prefix_input_ids": prefix["input_ids"], "prefix_attention_mask": prefix["attention_mask"],
        "prefix_position_ids": prefix["position_ids"], "suffix_input_ids": suffix_ids,
        "suffix_attention_mask": torch.cat([prefix["attention_mask"][row_example], suffix_mask], dim=1),
        "suffix_position_ids": real_prefix.unsqueeze(1) + torch.arange(width).unsqueeze(0),
        "suffix_lengths": suffix_mask.sum(1), "row_example": row_example,
    }


def _base_forward_parameters(model: torch.nn.Module) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inspect.signature(base.forward).parameters


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in _base_forward_parameters(model)


def _checkpointing(model: torch.nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # transformers 5 renamed `is_gradient_checkpointing` (still there, deprecated).
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(base), name) or name in vars(base):
            return bool(getattr(base, name))
    return False


def can_share_prefix(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> bool:
    """The shared-prefix path needs a KV cache, which gradient checkpointing switches off in training, and a
    model that does not add virtual tokens of its own (PEFT's prompt learning would add them to each part)."""
    return ("prefix_input_ids" in batch and "past_key_values" in _base_forward_parameters(model)
            and not (model.training and _checkpointing(model)) and not is_prompt_learning(model))


def shared_prefix_log_likelihoods(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as `completion_log_likelihoods`, but each example's shared context goes through the
    model once (its KV cache is then repeated for the candidates): 2-3x less work on SuperGLUE."""
    prefix = model(input_ids=batch["prefix_input_ids"], attention_mask=batch["prefix_attention_mask"],
                   position_ids=batch["prefix_position_ids"], use_cache=True, logits_to_keep=1)
    rows = batch["row_example"]
    cache = prefix.past_key_values
    cache.reorder_cache(rows)  # one cache row per candidate (index_select, differentiable)
    suffix_ids = batch["suffix_input_ids"]
    suffix = model(input_ids=suffix_ids, attention_mask=batch["suffix_attention_mask"],
                   position_ids=batch["suffix_position_ids"], past_key_values=cache, use_cache=True)
    # Suffix token 0 is predicted by the prefix's last position, token j by suffix position j - 1.
    logits = torch.cat([prefix.logits[:, -1:][rows], suffix.logits[:, :-1]], dim=1)
    token_log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, suffix_ids.unsqueeze(-1)).squeeze(-1)
    lengths = batch["completion_lengths"]
    offsets = torch.arange(suffix_ids.shape[1], device=lengths.device).unsqueeze(0)
    ends = batch["suffix_lengths"].unsqueeze(1)
    in_completion = (offsets < ends) & (offsets >= ends - lengths.unsqueeze(1))
    return (token_log_probs * in_completion).sum(-1), lengths.to(token_log_probs.dtype)


def row_log_likelihoods(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-likelihood and completion length per row, by the cheapest available path."""
    if can_share_prefix(model, batch):
        return shared_prefix_log_likelihoods(model, batch)
    return completion_log_likelihoods(model, batch)


def completion_log_likelihoods(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of completion-token log-probabilities and completion lengths, one per row."""
    lengths = batch["completion_lengths"]
    span = int(lengths.max())
    model_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    if _accepts_logits_to_keep(model):
        model_inputs["logits_to_keep"] = span + 1
    logits = model(**model_inputs).logits[:, -(span + 1):-1]  # predictions of the last `span` tokens
    targets = batch["input_ids"][:, -span:]
    token_log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    offsets = torch.arange(span, device=lengths.device).unsqueeze(0)
    in_completion = offsets >= (span - lengths).unsqueeze(1)
    return (token_log_probs * in_completion).sum(-1), lengths.to(token_log_probs.dtype)


def _split_scores(scores: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """Row scores -> (examples, max candidates), padded with -inf."""
    sizes = group_sizes.tolist()
    table = scores.new_full((len(sizes), max(sizes)), float("-inf"))
    start = 0
    for i, size in enumerate(sizes):
        table[i, :size] = scores[start:start + size]
        start += size
    return table


def example_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], objective: Objective) -> torch.Tensor:
    """"candidates": cross-entropy over the candidates' mean log-likelihoods;
    "lm": token-averaged negative log-likelihood of the gold completions."""
    sums, lengths = row_log_likelihoods(model, batch)
    if objective == "lm":
        sizes = batch["group_sizes"]
        gold_rows = torch.cumsum(sizes, 0) - sizes + batch["gold"]
        return -sums[gold_rows].sum() / lengths[gold_rows].sum()
    return F.cross_entropy(_split_scores(sums / lengths, batch["group_sizes"]), batch["gold"])


# Off a terminal (a log file, CI) the bar redraws at most this often, so a log gets a few lines, not one per batch.
LOG_REDRAW_SECONDS = 30.0


def progress_bar(total: int, description: str | None) -> Any:
    """A tqdm bar over `total` examples on stderr (stdout stays for results); no bar when `description` is None."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="example", file=sys.stderr, disable=description is None,
                mininterval=0.1 if sys.stderr.isatty() else LOG_REDRAW_SECONDS, dynamic_ncols=True)


def _token_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices sorted by length (less padding), `batch_size` at a time."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


@dataclass(frozen=True)
class CandidateScores:
    """Per example, per candidate: summed completion log-likelihood and completion token count."""

    sums: list[list[float]]
    lengths: list[list[int]]

    @property
    def means(self) -> list[list[float]]:
        return [[s / n for s, n in zip(sums, lengths)] for sums, lengths in zip(self.sums, self.lengths)]

    def predictions(self) -> list[int]:
        return [max(range(len(m)), key=m.__getitem__) for m in self.means]

    def objective_loss(self, golds: Sequence[int], objective: Objective) -> float:
        """The training objective evaluated on these scores (the dev loss)."""
        if objective == "lm":
            nll = -sum(sums[g] for sums, g in zip(self.sums, golds))
            return nll / max(sum(lengths[g] for lengths, g in zip(self.lengths, golds)), 1)
        losses = [F.cross_entropy(torch.tensor([m]), torch.tensor([g])) for m, g in zip(self.means, golds)]
        return float(torch.stack(losses).mean())


@torch.no_grad()
def score_candidates(model: torch.nn.Module, tokenizer: Any, examples: Sequence[PromptedExample],
                     max_length: int, batch_size: int = 8, progress: str | None = None) -> CandidateScores:
    """Summed log-likelihood (and token count) of every candidate of every example (a progress bar titled
    `progress` unless it is None)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = [encode_example(tokenizer, example, max_length) for example in examples]
    sums = [[0.0] * len(ex.rows) for ex in encoded]
    lengths = [[row.completion_length for row in ex.rows] for ex in encoded]
    collate = ExampleCollator(pad_token_id(tokenizer))
    # Batches of whole examples, about `batch_size` rows each, similar lengths together.
    per_batch = max(1, batch_size // max(len(ex.rows) for ex in encoded)) if encoded else 1
    with progress_bar(len(encoded), progress) as bar:
        for indices in _token_batches([len(ex.rows[0].input_ids) for ex in encoded], per_batch):
            batch = {k: v.to(device) for k, v in collate([encoded[i] for i in indices]).items()}
            totals, _ = row_log_likelihoods(model, batch)
            flat = iter(totals.tolist())
            for i in indices:
                sums[i] = [next(flat) for _ in encoded[i].rows]
            bar.update(len(indices))
    model.train(was_training)
    return CandidateScores(sums, lengths)


def newline_token_ids(tokenizer: Any) -> torch.Tensor:
    """Ids of every vocabulary token whose text contains a newline."""
    vocabulary = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return torch.tensor([i for i, token in enumerate(vocabulary)
                         if token is not None and "\n" in tokenizer.convert_tokens_to_string([token])],
                        dtype=torch.long)


class _StopAtNewline:
    """Stopping criterion: a row is done once it generated a newline token."""

    def __init__(self, newline_ids: torch.Tensor, prompt_width: int) -> None:
        self.newline_ids = newline_ids
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_width:]
        return torch.isin(generated, self.newline_ids.to(generated.device)).any(-1)


@torch.no_grad()
def generate_answers(model: torch.nn.Module, tokenizer: Any, examples: Sequence[PromptedExample],
                     max_length: int, max_new_tokens: int = 50, batch_size: int = 8,
                     progress: str | None = None) -> list[str]:
    """Greedy decoding of at most `max_new_tokens`, cut at the first newline and stripped (a progress bar titled
    `progress` unless it is None)."""
    from transformers import StoppingCriteriaList

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    contexts = [encode_context(tokenizer, e.context)[-(max_length - max_new_tokens):] for e in examples]
    answers = [""] * len(examples)
    newline_ids = newline_token_ids(tokenizer)
    if contexts:
        check_generate_matches_forward(model, contexts[0])
    with progress_bar(len(examples), progress) as bar:
        for indices in _token_batches([len(c) for c in contexts], batch_size):
            rows = [EncodedRow(tuple(contexts[i]), 1) for i in indices]
            batch = collate_rows(rows, pad_id)
            width = batch["input_ids"].shape[1]
            stop = StoppingCriteriaList([_StopAtNewline(newline_ids, width)])
            output = model.generate(input_ids=batch["input_ids"].to(device),
                                    attention_mask=batch["attention_mask"].to(device),
                                    max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                    stopping_criteria=stop, pad_token_id=pad_id, **generation_cache_kwargs(model))
            for position, index in enumerate(indices):
                text = tokenizer.decode(output[position, width:], skip_special_tokens=True)
                answers[index] = text.split("\n")[0].strip()
            bar.update(len(indices))
    model.train(was_training)
    return answers
