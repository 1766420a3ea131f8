"""Candidate scoring and losses on a model whose logits are set by hand; SQuAD-style F1 / EM."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from structlora.tasks.llm.metrics import choice_accuracy, exact_match, generation_metrics, normalize_answer, token_f1
from structlora.tasks.llm.scoring import (EncodedExample, EncodedRow, ExampleCollator, collate_rows,
                                    completion_log_likelihoods, example_loss, score_candidates)
from structlora.tasks.llm.tasks import PromptedExample

WORDS = ["<pad>", "<s>", "the", "film", "was", "great", "terrible", "Yes", "No", "?"]
ID = {word: i for i, word in enumerate(WORDS)}


class BigramLM(torch.nn.Module):
    """logits[t] = TABLE[input_ids[t]]: the next-token distribution depends on the current token only,
    so every log-likelihood can be written down by hand. Checks positions are real-token counts."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                logits_to_keep: int = 0) -> SimpleNamespace:
        expected = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        assert torch.equal(position_ids, expected)
        logits = self.table[input_ids]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def hand_table() -> torch.Tensor:
    table = torch.zeros(len(WORDS), len(WORDS))
    table[ID["was"], ID["great"]] = 2.0  # after "was": great is e^2 times likelier than anything else
    table[ID["was"], ID["terrible"]] = 1.0
    table[ID["?"], ID["No"]] = 3.0
    return table


def log_prob(previous: str, word: str) -> float:
    row = hand_table()[ID[previous]]
    return float(row[ID[word]] - torch.logsumexp(row, 0))


class WordTokenizer:
    """Whitespace tokenizer over WORDS with a BOS token, the interface scoring needs."""

    pad_token_id, eos_token_id = 0, 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [ID[w] for w in text.replace("?", " ?").split()]
        return {"input_ids": ([ID["<s>"]] if add_special_tokens else []) + ids}


def test_completion_log_likelihoods_match_hand_values() -> None:
    model = BigramLM(hand_table())
    rows = [EncodedRow((1, ID["the"], ID["film"], ID["was"], ID["great"]), 1),
            EncodedRow((1, ID["film"], ID["was"], ID["terrible"], ID["?"]), 2)]
    sums, lengths = completion_log_likelihoods(model, collate_rows(rows, pad_id=0))
    assert lengths.tolist() == [1, 2]
    assert sums[0].item() == pytest.approx(log_prob("was", "great"), abs=1e-6)
    assert sums[1].item() == pytest.approx(log_prob("was", "terrible") + log_prob("terrible", "?"), abs=1e-6)
    # The uniform rows give log(1/10) per token: a hand-checkable anchor.
    assert log_prob("terrible", "?") == pytest.approx(math.log(0.1), abs=1e-6)


def test_score_candidates_picks_the_likeliest_completion() -> None:
    tokenizer = WordTokenizer()
    examples = [PromptedExample("the film was", (" terrible", " great"), (1,)),
                PromptedExample("the film was great ?", (" Yes", " No"), (1,)),
                PromptedExample("film ?", (" Yes", " No"), (0,))]
    scores = score_candidates(BigramLM(hand_table()), tokenizer, examples, max_length=16, batch_size=2)
    assert scores.predictions() == [1, 1, 1]
    assert scores.means[0] == pytest.approx([log_prob("was", "terrible"), log_prob("was", "great")], abs=1e-6)
    assert choice_accuracy(scores.predictions(), [e.gold for e in examples]) == pytest.approx(2 / 3)
    # Dev loss of the "candidates" objective = mean cross-entropy over candidate scores.
    expected = sum(float(torch.nn.functional.cross_entropy(torch.tensor([m]), torch.tensor([e.gold[0]])))
                   for m, e in zip(scores.means, examples)) / 3
    assert scores.objective_loss([1, 1, 0], "candidates") == pytest.approx(expected, abs=1e-6)


def test_losses_candidates_and_lm() -> None:
    model = BigramLM(hand_table())
    example = EncodedExample((EncodedRow((1, ID["was"], ID["terrible"]), 1), EncodedRow((1, ID["was"], ID["great"]), 1)),
                             gold=1)
    batch = ExampleCollator(pad_id=0)([example])
    scores = torch.tensor([[log_prob("was", "terrible"), log_prob("was", "great")]])
    expected_ce = torch.nn.functional.cross_entropy(scores, torch.tensor([1]))
    assert example_loss(model, batch, "candidates").item() == pytest.approx(expected_ce.item(), abs=1e-6)
    # 1 - sigmoid(1) is the probability of the wrong candidate: CE = log(1 + e^-1).
    assert expected_ce.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    gold_only = EncodedExample((EncodedRow((1, ID["the"], ID["was"], ID["great"]), 2),), gold=0)
    lm_loss = example_loss(model, ExampleCollator(pad_id=0)([gold_only]), "lm")
    assert lm_loss.item() == pytest.approx(-(log_prob("the", "was") + log_prob("was", "great")) / 2, abs=1e-6)


def test_loss_gradient_flows_to_the_model() -> None:
    model = BigramLM(hand_table())
    example = EncodedExample((EncodedRow((1, ID["was"], ID["terrible"]), 1), EncodedRow((1, ID["was"], ID["great"]), 1)),
                             gold=0)
    example_loss(model, ExampleCollator(pad_id=0)([example]), "candidates").backward()
    gradient = model.table.grad[ID["was"]]
    assert gradient[ID["terrible"]] < 0 < gradient[ID["great"]]  # descent raises the gold candidate


def test_normalisation_and_token_f1_known_values() -> None:
    assert normalize_answer("The  Eiffel-Tower, in Paris!") == "eiffeltower in paris"
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)  # P = 1, R = 2/3
    assert token_f1("cat cat", "cat") == pytest.approx(2 / 3)  # P = 1/2, R = 1
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("the", "a") == 1.0  # both normalise to nothing
    assert exact_match("The Cat.", "cat") == 1.0 and exact_match("cats", "cat") == 0.0
    metrics = generation_metrics(["Paris", "in 1990", "blue"], [["paris"], ["1990", "in 1991"], ["red"]])
    assert metrics["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)  # "in 1990" vs "1990": P = 1/2, R = 1
    assert metrics["exact_match"] == pytest.approx(1 / 3)


def test_shared_prefix_path_matches_full_rows_on_a_tiny_llama(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from structlora.tasks.llm.scoring import encode_example, pad_token_id, shared_prefix_log_likelihoods
    from structlora.tasks.llm.tiny import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "tiny", hidden_size=16, num_hidden_layers=1)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    examples = [PromptedExample("the man turned on the faucet so", (" water flowed", " the man was great"), (0,)),
                PromptedExample("Does this mean that? Yes or No?\n", ("Yes", "No"), (1,)),
                PromptedExample("It was", (" great", " terrible", " Maybe"), (2,))]
    batch = ExampleCollator(pad_token_id(tokenizer))([encode_example(tokenizer, e, 64) for e in examples])
    model.train()  # gradients flow through the repeated KV cache too
    shared_sums, _ = shared_prefix_log_likelihoods(model, batch)
    full_sums, _ = completion_log_likelihoods(model, batch)
    assert torch.allclose(shared_sums, full_sums, atol=1e-5)
    shared_sums.sum().backward()
    shared_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    full_sums.sum().backward()
    assert torch.allclose(shared_grad, model.model.layers[0].self_attn.q_proj.weight.grad, atol=1e-5)

