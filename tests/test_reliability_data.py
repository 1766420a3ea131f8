"""Data rows and flag values refused before any work: every reader names file:line (or skips and counts with
--skip-bad-rows), flags are checked against the model's positions before data or weights are read, and the
output folder is checked first. Each refusal also asserts that nothing was read, written or deleted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from structlora.tasks.data_errors import BadRows, DataRowError
from structlora.recipes import checkpoints, limits

BOM = b"\xef\xbb\xbf"


def _with_bom(path: Path) -> Path:
    path.write_bytes(BOM + path.read_bytes())
    return path


def _strict_then_skipped(read, path: Path, message: str, kept: int, skipped: int = 1):
    """The reader raises naming `message` (file:line) by default, and with skip=True drops and counts the row."""
    before = path.read_bytes()
    with pytest.raises(DataRowError, match=message):
        read(None)
    bad_rows = BadRows(skip=True)
    result = read(bad_rows)
    assert bad_rows.count == skipped and len(result) == kept
    assert path.read_bytes() == before  # reading never touches the file
    return result, bad_rows


# -- NLG readers -------------------------------------------------------------------------------------------------

def test_e2e_csv_rows_are_validated_with_file_and_line(tmp_path):
    from structlora.tasks.nlg.data import read_e2e_csv
    path = tmp_path / "devset.csv"
    good = 'mr,ref\n"name[A], eatType[pub]",A is a pub.\n'
    for bad, message in ((""""name[B], eatType[pub]",\n""", r"devset\.csv:3: empty 'ref'"),
                         ('"no slots here",B is a pub.\n', r"devset\.csv:3: not an E2E meaning representation"),
                         ('"name[B]",B is,a pub.\n', r"devset\.csv:3: 3 comma-separated fields where the header has 2")):
        path.write_text(good + bad, encoding="utf-8")
        _with_bom(path)  # the BOM is dropped: the header is still found
        inputs, _ = _strict_then_skipped(lambda rows: read_e2e_csv(path, rows), path, message, kept=1)
        assert inputs[0].source == "name : A | Type : pub" and inputs[0].references == ("A is a pub.",)


def test_e2e_lines_rows_are_validated_with_file_and_line(tmp_path):
    from structlora.tasks.nlg.data import read_e2e_lines
    path = tmp_path / "valid.txt"
    path.write_text("name : A || A is a pub.\nname : B with no separator\nname : C ||  \n", encoding="utf-8")
    _with_bom(path)
    inputs, bad_rows = _strict_then_skipped(lambda rows: read_e2e_lines(path, rows), path,
                                            r"valid\.txt:2: expected 'linearised mr \|\| reference'", kept=1, skipped=2)
    assert inputs[0].source == "name : A"  # not "\ufeffname : A"
    assert bad_rows.examples[1] == f"{path}:3: empty reference around '||'"


WEBNLG = """<?xml version="1.0" encoding="UTF-8"?>
<benchmark>
  <entries>
    <entry category="City" eid="Id1" size="1">
      <modifiedtripleset><mtriple>Aarhus | country | Denmark</mtriple></modifiedtripleset>
      <lex comment="good" lid="Id1">Aarhus is in Denmark.</lex>
    </entry>
    <entry category="City" eid="Id2" size="1">
      <modifiedtripleset><mtriple>Aarhus | country</mtriple></modifiedtripleset>
      <lex comment="good" lid="Id1">Broken.</lex>
    </entry>
  </entries>
</benchmark>
"""


def test_webnlg_entries_are_validated_with_file_and_line(tmp_path):
    from structlora.tasks.nlg.data import read_webnlg_xml
    path = tmp_path / "1triples.xml"
    path.write_text(WEBNLG, encoding="utf-8")
    _with_bom(path)
    inputs, _ = _strict_then_skipped(lambda rows: read_webnlg_xml([path], bad_rows=rows), path,
                                     r"1triples\.xml:8: entry Id2: malformed triple 'Aarhus \| country'", kept=1)
    assert inputs[0].references == ("Aarhus is in Denmark.",)
    path.write_text(WEBNLG.replace("</entries>", ""), encoding="utf-8")
    with pytest.raises(DataRowError, match=r"1triples\.xml:13: not well-formed XML"):
        read_webnlg_xml([path], bad_rows=BadRows(skip=True))  # a broken file is never a skippable row


def test_dart_records_are_validated_with_file_and_line(tmp_path):
    from structlora.tasks.nlg.data import read_dart_json
    path = tmp_path / "dart.json"
    records = [{"tripleset": [["A", "LOCATION", "B"]], "annotations": [{"text": "A is in B."}]},
               {"tripleset": [["A", "B"]], "annotations": [{"text": "bad"}]},
               {"tripleset": [["C", "X", "D"]], "annotations": [{"text": 3}]}]
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    _with_bom(path)
    inputs, bad_rows = _strict_then_skipped(lambda rows: read_dart_json(path, rows), path,
                                            r"dart\.json:16: record 1: triple \['A', 'B'\] is not", kept=1, skipped=2)
    assert inputs[0].source == "A : location : B"
    assert bad_rows.examples[1].startswith(f"{path}:29: record 2: 'annotations' is not a list")
    path.write_text('[{"tripleset": ', encoding="utf-8")
    with pytest.raises(DataRowError, match=r"dart\.json:1: not valid JSON"):
        read_dart_json(path)


# -- LLM (SuperGLUE-style) readers -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,message", [
    ({"premise": "p", "hypothesis": "h", "label": 3}, r"val\.jsonl:2: label 3 outside 0\.\.2"),
    ({"premise": "p", "hypothesis": "h", "label": 1.0}, r"val\.jsonl:2: label 1\.0 is not one of 0\.\.2, entailment"),
    ({"premise": "p", "hypothesis": "h", "label": "maybe"}, r"val\.jsonl:2: label 'maybe' is not one of"),
    ({"premise": "p", "label": 0}, r"val\.jsonl:2: missing field 'hypothesis' for task CB"),
    ("{not json", r"val\.jsonl:2: not a JSON object"),
])
def test_llm_records_are_validated_with_file_and_line(tmp_path, bad, message):
    from structlora.tasks.llm.data import sample_splits
    from structlora.tasks.llm.tasks import get_task
    folder = tmp_path / "superglue" / "CB"
    folder.mkdir(parents=True)
    good = {"premise": "It rains.", "hypothesis": "It is wet.", "label": "entailment"}
    lines = [json.dumps(good), bad if isinstance(bad, str) else json.dumps(bad), json.dumps({**good, "label": 1})]
    path = folder / "val.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _with_bom(path)
    (folder / "train.jsonl").write_text(json.dumps(good) + "\n", encoding="utf-8")

    def read(rows):
        return sample_splits(get_task("CB"), 1, 0, 10, data_dir=tmp_path, bad_rows=rows).eval
    examples, _ = _strict_then_skipped(read, path, message, kept=2)
    assert sorted(e.gold for e in examples) == [(0,), (1,)]


# -- flags checked before any work --------------------------------------------------------------------------------

def _save_config(folder: Path, config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)  # config.json only: no weights to load
    return folder


def test_model_positions_from_config_json(tmp_path):
    from transformers import BertConfig, GPT2Config, LlamaConfig, RobertaConfig
    assert limits.model_positions(str(_save_config(tmp_path / "gpt2", GPT2Config(n_positions=128))))[::2] == (128, True)
    assert limits.model_positions(str(_save_config(tmp_path / "bert", BertConfig())))[::2] == (512, True)
    # RoBERTa's 514 positions start after the padding index: 512 tokens fit.
    roberta = _save_config(tmp_path / "roberta", RobertaConfig(max_position_embeddings=514, pad_token_id=1))
    assert limits.model_positions(str(roberta))[::2] == (512, True)
    assert limits.model_positions(str(_save_config(tmp_path / "llama", LlamaConfig())))[::2] == (2048, False)
    assert limits.model_positions("no/such-model-anywhere")[0] is None  # not cached: the loader reports it


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory) -> Path:
    from tiny_models import save_tiny_bert
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))  # 128 positions


@pytest.fixture
def nothing_loaded(monkeypatch):
    """Data and model loading fail the test: the refusal must come before them."""
    import transformers

    from structlora.tasks import glue
    from structlora.tasks.nlg import data as nlg_data
    from structlora.recipes import nlg

    def forbidden(*args, **kwargs):
        raise AssertionError("data or model weights were loaded before the flags were checked")
    monkeypatch.setattr(glue, "load_glue", forbidden)
    monkeypatch.setattr(nlg_data, "load_split", forbidden)
    monkeypatch.setattr(nlg, "load_split", forbidden)
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", forbidden)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", forbidden)


@pytest.mark.parametrize("flags,message", [
    (["--max-length", "4096"], r"--max-length 4096 is more than the 128 positions of --model .* use --max-length 1\.\.128"),
    (["--batch-size", "0"], r"--batch-size 0: must be an integer >= 1"),
    (["--max-train-samples", "0"], r"--max-train-samples 0: must be an integer >= 1"),
    (["--eval-batch-size", "-2"], r"--eval-batch-size -2: must be an integer >= 1"),
    (["--grad-accum", "0"], r"--grad-accum 0: must be an integer >= 1"),
    (["--lr", "nan"], r"--lr nan: must be a finite number >= 0"),
    (["--epochs", "-1"], r"--epochs -1\.0: must be a finite number >= 0"),
    (["--warmup-ratio", "1.5"], r"--warmup-ratio 1\.5: must be a finite number in \[0, 1\]"),
])
def test_training_flags_are_checked_before_any_work(tiny_bert_folder, tmp_path, nothing_loaded, flags, message):
    from structlora.cli import main
    output = tmp_path / "run"
    with pytest.raises(SystemExit, match="error: " + message):
        main(["train", "glue", "--task", "sst2", "--model", str(tiny_bert_folder), "--data-dir", str(tmp_path),
              "--output", str(output), *flags])
    assert not output.exists()


def test_nlg_and_llm_flags_are_checked_before_any_work(tmp_path, nothing_loaded, capsys):
    from transformers import GPT2Config, LlamaConfig

    from structlora.cli import main
    gpt2 = _save_config(tmp_path / "gpt2", GPT2Config(n_positions=128))
    with pytest.raises(SystemExit, match=r"--max-length 512 is more than the 128 positions .*n_positions"):
        main(["train", "nlg", "--dataset", "e2e", "--model", str(gpt2), "--max-length", "512",
              "--output", str(tmp_path / "nlg")])
    with pytest.raises(SystemExit, match=r"--max-train-examples 0: must be an integer >= 1"):
        main(["train", "nlg", "--dataset", "e2e", "--model", str(gpt2), "--max-train-examples", "0",
              "--output", str(tmp_path / "nlg")])
    llama = _save_config(tmp_path / "llama", LlamaConfig(max_position_embeddings=64))
    for flags, message in ((["--n-eval", "0"], r"--n-eval 0: must be an integer >= 1"),
                           (["--batch-size", "0"], r"--batch-size 0: must be an integer >= 1"),
                           (["--icl", "-1"], r"--icl -1: must be an integer >= 0")):
        with pytest.raises(SystemExit, match=message):
            main(["train", "llm", "--task", "CB", "--model", str(llama), "--output", str(tmp_path / "llm"), *flags])
    # Rotary positions: beyond them runs (no crash), with a warning, so the check does not refuse it.
    limits.check_max_length(2048, str(llama))
    assert "beyond the 64 positions" in capsys.readouterr().err
    assert not (tmp_path / "nlg").exists() and not (tmp_path / "llm").exists()


def test_output_folder_is_checked_before_any_work(tiny_bert_folder, tmp_path, nothing_loaded):
    from structlora.cli import main
    output = tmp_path / "run"
    output.mkdir()
    (output / "results.json").write_text(json.dumps({"status": "completed"}))
    with pytest.raises(SystemExit, match="holds a completed run"):
        main(["train", "glue", "--task", "sst2", "--model", str(tiny_bert_folder), "--output", str(output)])
    # An LLM evaluation-only run (--method none) used to overwrite it silently.
    with pytest.raises(SystemExit, match="holds a completed run"):
        main(["train", "llm", "--task", "CB", "--method", "none", "--model", str(tiny_bert_folder),
              "--max-length", "64", "--output", str(output)])
    assert [p.name for p in output.iterdir()] == ["results.json"]


def test_overwrite_keeps_the_old_run_when_the_new_one_fails_before_training(tiny_bert_folder, tmp_path):
    """--overwrite deletes the old run only when training starts: a data error first leaves it in place."""
    from structlora.cli import main
    output = tmp_path / "run"
    checkpoint = output / "checkpoints" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (output / "results.json").write_text(json.dumps({"status": "completed"}))
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_text("sentence\tlabel\nfine\t1\nbad\t2\n")
    (tmp_path / "sst2" / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    assert main(["train", "glue", "--task", "sst2", "--model", str(tiny_bert_folder), "--data-dir", str(tmp_path),
                 "--output", str(output), "--overwrite"]) == 1  # the DataRowError: one error line
    assert (output / "results.json").is_file() and checkpoint.is_dir()


def test_resume_refuses_a_checkpoint_without_rng_state_unless_allowed(tmp_path, capsys):
    import argparse
    checkpoint = tmp_path / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
                 "trainer_state.json"):
        (checkpoint / name).write_text("x")
    args = argparse.Namespace(output=str(tmp_path), resume=str(checkpoint), method="lora")
    with pytest.raises(SystemExit, match=r"lacks rng_state\.pth; .*--allow-incomplete-checkpoint"):
        checkpoints.resume_checkpoint(args)
    args.allow_incomplete_checkpoint = True
    assert checkpoints.resume_checkpoint(args) == str(checkpoint)
    assert "resuming" in capsys.readouterr().err
    (checkpoint / "adapter_model.safetensors").unlink()  # the weights themselves are never optional
    with pytest.raises(SystemExit, match="lacks adapter_model.safetensors"):
        checkpoints.resume_checkpoint(args)


def test_a_diverging_run_stops_and_a_skipped_step_is_counted(tiny_bert_folder, tmp_path, monkeypatch):
    """The recipe path of the issue's first example: a NaN loss at step 2 stops `train glue` with one error line,
    results.json says "diverged", no adapter is saved and checkpoint-1 stays finite. With --skip-nonfinite-steps
    the step is skipped, and with --skip-bad-rows two bad data rows are skipped: results.json counts both."""
    from safetensors.torch import load_file

    from structlora import AdapterTrainer
    from structlora.cli import main
    compute_loss = AdapterTrainer.compute_loss

    def nan_at_step_2(self, model, inputs, *args, **kwargs):
        loss = compute_loss(self, model, inputs, *args, **kwargs)
        poisoned = model.training and self.state.global_step == 1 and not isinstance(loss, tuple)
        return loss * float("nan") if poisoned else loss
    monkeypatch.setattr(AdapterTrainer, "compute_loss", nan_at_step_2)
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_text("sentence\tlabel\n" + "good\t1\nbad\t0\n" * 4 + "broken\nodd\t0.5\n")
    (tmp_path / "sst2" / "dev.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    run = ["train", "glue", "--task", "sst2", "--model", str(tiny_bert_folder), "--data-dir", str(tmp_path),
           "--max-steps", "2", "--eval-every", "1", "--batch-size", "4"]
    output = tmp_path / "diverged"
    with pytest.raises(SystemExit, match=r"^error: step 2: the loss is nan; training stopped"):
        main([*run, "--output", str(output), "--skip-bad-rows"])
    assert json.loads((output / "results.json").read_text())["status"] == "diverged"
    assert not (output / "adapter").exists()
    kept = load_file(str(output / "checkpoints" / "checkpoint-1" / "adapter_model.safetensors"))
    assert all(tensor.isfinite().all() for tensor in kept.values())
    assert main([*run, "--output", str(tmp_path / "skipped"), "--skip-nonfinite-steps", "--skip-bad-rows"]) == 0
    results = json.loads((tmp_path / "skipped" / "results.json").read_text())
    assert (results["status"], results["skipped_nonfinite_steps"], results["train_examples"]) == ("completed", 1, 8)
    assert results["skipped_bad_rows"] == 2
    assert results["bad_rows"]["first"] == [
        f"{tmp_path / 'sst2' / 'train.tsv'}:10: 1 tab-separated column(s), task 'sst2' needs at least 2 here",
        f"{tmp_path / 'sst2' / 'train.tsv'}:11: label '0.5' is not one of 0..1 (task 'sst2')"]
