"""Layout, loss, and a 2-step train -> generate -> score run through the CLI on a tiny GPT-2 from config;
interrupted generation resumes without duplicates."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from structlora.tasks.nlg.data import NLGInput, read_e2e_references
from structlora.tasks.nlg.generation import DecodingSettings, clean_hypothesis, completed_lines, generate_hypotheses
from structlora.tasks.nlg.modeling import CompletionCollator, completion_loss, encode_example
from shared_paths import GPT2_TOKENIZER
from tiny_models import save_tiny_gpt2

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = GPT2_TOKENIZER if (GPT2_TOKENIZER / "vocab.json").exists() else None
pytestmark = pytest.mark.skipif(TOKENIZER_DIR is None, reason="GPT-2 tokenizer files (shared/models) not present")

MRS = [
    ("name[The Eagle], eatType[pub]", ["The Eagle is a pub.", "A pub called The Eagle."]),
    ("name[Zizzi], food[French]", ["Zizzi serves French food."]),
    ("name[Aromi], area[riverside]", ["Aromi is by the river.", "Aromi is in riverside."]),
    ("name[Cocum], priceRange[high]", ["Cocum is expensive."]),
    ("name[Alimentum], near[Burger King]", ["Alimentum is near Burger King."]),
    ("name[Loch Fyne], familyFriendly[yes]", ["Loch Fyne is family friendly."]),
    ("name[Bibimbap House], eatType[restaurant]", ["Bibimbap House is a restaurant."]),
    ("name[Clowns], customer rating[low]", ["Clowns has a low rating."]),
    ("name[Wildwood], food[Indian]", ["Wildwood serves Indian food."]),
    ("name[Strada], area[city centre]", ["Strada is in the city centre."]),
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, tokenizer) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), tokenizer)


@pytest.fixture()
def e2e_data(tmp_path) -> Path:
    import csv

    (tmp_path / "data" / "e2e").mkdir(parents=True)
    with open(tmp_path / "data" / "e2e" / "devset.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["mr", "ref"])
        for mr, refs in MRS:
            for ref in refs:
                writer.writerow([mr, ref])
    return tmp_path / "data"


def test_layout_masks_the_context_and_ends_with_eos(tokenizer):
    example = encode_example(tokenizer, "name : A", "A is a pub.", max_length=64)
    context = tokenizer("name : A ||")["input_ids"]
    assert example["input_ids"][: len(context)] == context
    assert example["labels"][: len(context)] == [-100] * len(context)
    assert example["labels"][len(context):] == example["input_ids"][len(context):]
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example["input_ids"][len(context):-1]) == " A is a pub."
    short = encode_example(tokenizer, "name : A", "A is a pub with a very long description.", max_length=len(context) + 3)
    assert len(short["input_ids"]) == len(context) + 3 and short["input_ids"][-1] == tokenizer.eos_token_id
    batch = CompletionCollator(tokenizer.eos_token_id)([example, short])
    assert batch["labels"][1, len(short["labels"]):].eq(-100).all()
    assert batch["attention_mask"].sum().item() == len(example["input_ids"]) + len(short["input_ids"])


def test_completion_loss_by_hand():
    vocab = 7
    labels = torch.tensor([[-100, -100, 3, 5]])
    # uniform logits: cross-entropy = ln V whatever the smoothing
    assert completion_loss(torch.zeros(1, 4, vocab), labels, 0.1).item() == pytest.approx(math.log(vocab))
    # one confident position (logit 10 on the right token), others uniform: smoothing eps=0.1 gives
    # (1-eps)*CE + eps*mean_k(-log p_k) on the completion positions (labels shifted by one)
    logits = torch.zeros(1, 4, vocab)
    logits[0, 1, 3] = 10.0  # predicts labels[2] = 3
    log_p = torch.log_softmax(logits[0, 1], -1)
    eps = 0.1
    first = (1 - eps) * -log_p[3] + eps * -log_p.mean()
    expected = (first + math.log(vocab)) / 2
    assert completion_loss(logits, labels, eps).item() == pytest.approx(expected.item(), rel=1e-6)


def test_clean_hypothesis_cuts_at_blank_line():
    assert clean_hypothesis(" The Eagle is a pub.\nIt is cheap.\n\nname : X ||") == "The Eagle is a pub. It is cheap."


def test_train_generate_score_through_cli(tiny_gpt2, e2e_data, tmp_path, capsys):
    from structlora.cli import main

    out = tmp_path / "run"
    assert main(["train", "nlg", "--dataset", "e2e", "--model", str(tiny_gpt2), "--data-dir", str(e2e_data),
                 "--train-split", "dev-train", "--heldout-fraction", "0.3", "--config",
                 str(REPO / "recipes" / "nlg" / "mtlora_gpt2.yaml"), "--max-steps", "2", "--batch-size", "2",
                 "--max-length", "64", "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    # MTLoRA r=4 on 2 layers of c_attn (q,k,v fused, 16 -> 3x16) and c_fc (16 -> 64) of a 16-wide GPT-2
    assert results["trainable_params"] == 1728
    assert results["method"] == "mtlora-shim" and results["label_smoothing"] == 0.1
    assert math.isfinite(results["eval"]["eval_loss"])
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["enable_lora"] == {"c_attn": [True, True, True]} and adapter_config["r"] == 4

    hyps = tmp_path / "gen" / "hyps.txt"
    generate = ["generate", "--adapter", str(out), "--output", str(hyps), "--beams", "2", "--max-new-tokens", "5",
                "--batch-size", "2", "--no-progress"]
    assert main(generate) == 0
    references = read_e2e_references(tmp_path / "gen" / "hyps.references.txt")
    assert len(references) == 3  # 30% of the 10 MRs held out
    assert len(hyps.read_text().splitlines()) == 3
    assert main(generate) == 0  # a finished output is skipped, not decoded twice
    assert len(hyps.read_text().splitlines()) == 3
    capsys.readouterr()

    assert main(["score", "e2e", "--ref", str(tmp_path / "gen" / "hyps.references.txt"), "--hyp", str(hyps),
                 "--json", "--no-java"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"} <= set(scores)
    assert 0.0 <= scores["BLEU"] <= 1.0 and scores["METEOR"] is None


def test_interrupted_generation_resumes_without_duplicates(tiny_gpt2, tokenizer, tmp_path):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2)
    inputs = [NLGInput(f"name : Place {i} | area : riverside", ("x",)) for i in range(5)]
    settings = DecodingSettings(beams=2, max_new_tokens=4, batch_size=2, mode="hf")  # patches generate()
    reference_run = tmp_path / "full.txt"
    assert generate_hypotheses(model, tokenizer, inputs, reference_run, settings, progress=False) == 5
    expected = reference_run.read_text().splitlines()

    output = tmp_path / "interrupted.txt"
    original_generate = model.generate
    calls = {"n": 0}

    def crash_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original_generate(*args, **kwargs)

    model.generate = crash_on_second_batch
    with pytest.raises(KeyboardInterrupt):
        generate_hypotheses(model, tokenizer, inputs, output, settings, progress=False)
    model.generate = original_generate
    with open(output, "a", encoding="utf-8") as handle:
        handle.write("half-written line")  # as if killed in the middle of a write
    assert completed_lines(output) == 2
    assert generate_hypotheses(model, tokenizer, inputs, output, settings, progress=False) == 3
    assert output.read_text().splitlines() == expected


def test_llama_family_trains_and_decodes(tokenizer, e2e_data, tmp_path):
    """A tiny Llama (the SmolLM2 architecture) through the same CLI: default q_proj/v_proj targets."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from structlora.cli import main

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model_dir = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    assert main(["train", "nlg", "--dataset", "e2e", "--model", str(model_dir), "--data-dir", str(e2e_data),
                 "--train-split", "dev-train", "--method", "lora", "--r", "2", "--max-steps", "1",
                 "--batch-size", "2", "--max-length", "48", "--label-smoothing", "0.1", "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    # r=2 on q_proj (16->16) and v_proj (16->8) of 2 layers: 2 * (2*16 + 16*2 + 2*16 + 8*2)
    assert results["trainable_params"] == 2 * (2 * 16 + 16 * 2 + 2 * 16 + 8 * 2)
    hyps = tmp_path / "hyps.txt"
    assert main(["generate", "--adapter", str(out), "--output", str(hyps), "--beams", "2", "--max-new-tokens", "3",
                 "--limit", "1", "--no-progress"]) == 0
    assert len(hyps.read_text().splitlines()) == 1


def test_generate_refuses_a_bad_row_or_skips_and_counts_it(tiny_gpt2, e2e_data, tmp_path, capsys):
    import csv

    from structlora.cli import main

    out = tmp_path / "run"
    assert main(["train", "nlg", "--dataset", "e2e", "--model", str(tiny_gpt2), "--data-dir", str(e2e_data),
                 "--train-split", "dev-train", "--heldout-fraction", "0.3", "--max-steps", "1", "--batch-size", "2",
                 "--max-length", "64", "--output", str(out)]) == 0
    devset = e2e_data / "e2e" / "devset.csv"
    bad_line = len(devset.read_text(encoding="utf-8").splitlines()) + 1
    with open(devset, "a", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerow(["name[Bad], eatType[pub]", ""])  # a row with an empty reference
    hyps = tmp_path / "gen" / "hyps.txt"
    generate = ["generate", "--adapter", str(out), "--output", str(hyps), "--beams", "1", "--max-new-tokens", "2",
                "--batch-size", "2", "--no-progress"]
    capsys.readouterr()
    assert main(generate) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"devset.csv:{bad_line}: empty 'ref'" in err[0] and "--skip-bad-rows" in err[0]
    assert not hyps.exists()  # refused before any decoding

    assert main(generate + ["--skip-bad-rows"]) == 0
    assert len(hyps.read_text().splitlines()) == 3  # the same 3 held-out MRs as without the bad row
    records = list(hyps.parent.glob("*.generate.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["skipped_bad_rows"] == 1
