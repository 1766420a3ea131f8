"""Training that fails loudly: non-finite steps stop the run, diverged adapters are never saved, incomplete
checkpoints and finished runs are not silently resumed or overwritten, --init-from refuses mismatched shapes."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from structlora import LoraConfig, get_peft_model
from structlora.model import PeftModel as EarlierPeftModel
from structlora.recipes import checkpoints, outputs
from structlora.recipes.adapter_model import adapter_state, wrap_model
from structlora.recipes.runs import init_from_run
from structlora.trainer import NonFiniteTrainingError
from test_core import randomize_adapters, tiny_bert
from test_reliability import assert_unchanged, fingerprint
from test_trainer import make_trainer



def _poison_step(trainer, step: int) -> None:
    """Make the loss of optimizer step `step` (1-based) NaN."""
    compute_loss = trainer.compute_loss

    def poisoned(model, inputs, *args, **kwargs):
        loss = compute_loss(model, inputs, *args, **kwargs)
        if trainer.state.global_step + 1 == step:
            loss = loss * float("nan") if not isinstance(loss, tuple) else (loss[0] * float("nan"), *loss[1:])
        return loss
    trainer.compute_loss = poisoned


def test_nonfinite_loss_stops_training_and_saves_nothing(tmp_path):
    trainer = make_trainer(str(tmp_path))
    _poison_step(trainer, 1)
    with pytest.raises(NonFiniteTrainingError, match="step 1: the loss is nan; training stopped"):
        trainer.train()
    assert not any(name.startswith("checkpoint-") for name in os.listdir(tmp_path))


def test_nonfinite_gradient_is_caught(tmp_path):
    trainer = make_trainer(str(tmp_path))
    parameter = next(p for p in trainer.model.parameters() if p.requires_grad)
    parameter.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(NonFiniteTrainingError, match="step 1: (the gradient of .* is not finite|the loss is)"):
        trainer.train()


def test_skip_nonfinite_steps_counts_and_keeps_weights_finite(tmp_path):
    trainer = make_trainer(str(tmp_path))
    trainer.skip_nonfinite_steps = True
    _poison_step(trainer, 2)
    trainer.train()
    assert trainer.skipped_nonfinite_steps == 1
    assert all(torch.isfinite(v).all() for v in adapter_state(trainer.model).values())
    assert outputs.robustness_record(trainer, None) == {"skipped_nonfinite_steps": 1}  # what results.json records


def test_nonfinite_adapter_is_never_saved(tmp_path):
    model = get_peft_model(tiny_bert(), LoraConfig(r=2))
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite values .* refusing to save a diverged adapter"):
        model.save_pretrained(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_missing_optimizer_state_is_refused(tmp_path):
    make_trainer(str(tmp_path), stop_at=2).train()
    checkpoint = tmp_path / "checkpoint-2"
    (checkpoint / "optimizer.pt").unlink()
    trainer = make_trainer(str(tmp_path))
    before = fingerprint(trainer.model)
    with pytest.raises(ValueError, match="lacks optimizer.pt: resuming it would not continue the same run"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert_unchanged(before, trainer.model)


# -- the recipes' output folder ---------------------------------------------------------------------------

def _args(output, **flags) -> argparse.Namespace:
    values = dict(output=str(output), resume=None, overwrite=False, method="lora", max_steps=-1, epochs=3.0)
    values.update(flags)
    return argparse.Namespace(**values)


def _checkpoint(output, step: int, complete: bool = True, max_steps: int = 4, epochs: float = 3.0):
    folder = output / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    names = ["adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"]
    for name in names if complete else names[:2]:
        (folder / name).write_text("x")
    (folder / "trainer_state.json").write_text(json.dumps(
        {"global_step": step, "max_steps": max_steps, "num_train_epochs": epochs}))
    return folder


def test_output_with_a_finished_run_is_refused(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"status": "completed"}))
    _checkpoint(tmp_path, 4)
    with pytest.raises(SystemExit, match="holds a completed run.*--overwrite.*--resume"):
        checkpoints.check_output_dir(_args(tmp_path))
    assert (tmp_path / "results.json").is_file() and (tmp_path / "checkpoints" / "checkpoint-4").is_dir()


def test_output_with_checkpoints_of_an_unfinished_run_is_refused(tmp_path):
    _checkpoint(tmp_path, 2)
    with pytest.raises(SystemExit, match="holds checkpoints of an unfinished run; pass --resume"):
        checkpoints.check_output_dir(_args(tmp_path))
    checkpoints.check_output_dir(_args(tmp_path, resume="latest"))  # resuming it is fine


def test_resume_on_a_finished_run_does_nothing(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps({"status": "completed"}))
    _checkpoint(tmp_path, 4, max_steps=4)
    with pytest.raises(SystemExit) as exit_info:
        checkpoints.check_output_dir(_args(tmp_path, resume="latest"))
    assert exit_info.value.code == 0
    assert "nothing to resume, nothing was done" in capsys.readouterr().err
    checkpoints.check_output_dir(_args(tmp_path, resume="latest", max_steps=8))  # a longer schedule continues it


def test_overwrite_replaces_the_run(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"status": "completed"}))
    (tmp_path / "keep.txt").write_text("user file")
    _checkpoint(tmp_path, 4)
    checkpoints.check_output_dir(_args(tmp_path, overwrite=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_resume_falls_back_from_a_half_written_checkpoint(tmp_path, capsys):
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4, complete=False)
    chosen = checkpoints.resume_checkpoint(_args(tmp_path, resume="latest"))
    assert chosen.endswith("checkpoint-2")
    assert "checkpoint-4 is incomplete (lacks optimizer.pt, scheduler.pt, rng_state.pth" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="lacks optimizer.pt"):
        checkpoints.resume_checkpoint(_args(tmp_path, resume=str(tmp_path / "checkpoints" / "checkpoint-4")))


# -- --init-from -------------------------------------------------------------------------------------------

def test_init_from_with_other_adapter_shapes_is_an_error(tmp_path):
    source = EarlierPeftModel(tiny_bert(), LoraConfig(r=4, target_modules=["query"]))  # the earlier layout: converted on load
    randomize_adapters(source)
    source.save_pretrained(tmp_path)
    model = wrap_model(tiny_bert(), LoraConfig(r=8, target_modules=["query"]))
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"another structure than this run's \(r 4 there, 8 here, from "
                                         r"adapter_config.json\)"):
        init_from_run(model, tmp_path)
    assert_unchanged(before, model)


@pytest.mark.parametrize("saved, wanted, field", [
    (dict(structure="dtsm"), dict(structure="ctcm"), "structure 'dtsm' there, 'ctcm' here"),
    (dict(structure="shim"), dict(structure="icfm"), "structure 'shim' there, 'icfm' here"),
    (dict(structure="shim", lora_alpha=16), dict(structure="shim", lora_alpha=32), "lora_alpha 16 there, 32 here"),
])
def test_init_from_another_structure_is_refused_though_the_shapes_match(tmp_path, saved, wanted, field):
    from structlora import MTLoraConfig

    source = EarlierPeftModel(tiny_bert(), MTLoraConfig(r=4, target_modules=["query"], **saved))
    randomize_adapters(source)
    source.save_pretrained(tmp_path)
    model = wrap_model(tiny_bert(), MTLoraConfig(r=4, target_modules=["query"], **wanted))
    assert {_module(k): v.shape for k, v in adapter_state(model).items()} == \
        {k: v.shape for k, v in source.adapter_state_dict().items()}  # a shape check alone would load it
    before = fingerprint(model)
    with pytest.raises(ValueError, match=f"--init-from {tmp_path}: its adapter has another structure than this "
                                         f"run's \\({field}, from adapter_config.json\\)"):
        init_from_run(model, tmp_path)
    assert_unchanged(before, model)


def test_init_from_checks_the_structure_recorded_in_the_weights_too(tmp_path):
    """An adapter_config.json edited after saving does not let other weights in: the weights file's own record
    of the structure is compared as well."""
    from structlora import MTLoraConfig

    source = EarlierPeftModel(tiny_bert(), MTLoraConfig(r=4, target_modules=["query"], structure="dtsm"))
    source.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "structure": "ctcm"}))
    model = wrap_model(tiny_bert(), MTLoraConfig(r=4, target_modules=["query"], structure="ctcm"))
    with pytest.raises(ValueError, match=r"structure 'dtsm' there, 'ctcm' here, from adapter_model.safetensors"):
        init_from_run(model, tmp_path)


def test_init_from_accepts_the_same_structure_with_another_dropout(tmp_path):
    from structlora import MTLoraConfig

    source = EarlierPeftModel(tiny_bert(), MTLoraConfig(r=4, target_modules=["query"], structure="ctcm"))
    randomize_adapters(source)
    source.save_pretrained(tmp_path)
    model = wrap_model(tiny_bert(), MTLoraConfig(r=4, target_modules=["query"], structure="ctcm", lora_dropout=0.1))
    init_from_run(model, tmp_path)
    loaded = adapter_state(model)
    assert loaded and all(torch.equal(v, source.adapter_state_dict()[_module(k)]) for k, v in loaded.items())


def test_init_from_reinitialises_only_a_head_and_says_so(tmp_path, capsys):
    from transformers import BertConfig, BertForSequenceClassification
    source = EarlierPeftModel(tiny_bert(), LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS"))
    randomize_adapters(source)
    source.save_pretrained(tmp_path)
    torch.manual_seed(0)
    two_way = BertForSequenceClassification(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=4, intermediate_size=48,
                                                       max_position_embeddings=64, num_labels=2)).eval()
    model = wrap_model(two_way, LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS"))
    head = "base_model.model.classifier.weight"
    head_before = adapter_state(model)[head].clone()
    init_from_run(model, tmp_path)
    assert "re-initialised 2 head tensor(s)" in capsys.readouterr().err
    assert torch.equal(adapter_state(model)[head], head_before)
    query = "bert.encoder.layer.0.attention.self.query.parameterization.lora_A"
    assert torch.equal(adapter_state(model)[_peft_key(query)], source.adapter_state_dict()[query])


def test_init_from_a_peft_folder_loads_its_weights(tmp_path):
    """A run saved by this release (peft.PeftModel.save_pretrained: PEFT's layout) starts a new run exactly."""
    from structlora import MTLoraConfig

    source = wrap_model(tiny_bert(), MTLoraConfig(r=4, target_modules=["query"], structure="ctcm"))
    randomize_adapters(source)
    source.save_pretrained(tmp_path)
    model = wrap_model(tiny_bert(), MTLoraConfig(r=4, target_modules=["query"], structure="ctcm"))
    init_from_run(model, tmp_path)
    expected, loaded = adapter_state(source), adapter_state(model)
    assert loaded.keys() == expected.keys() and len(loaded) == 8  # A, B, C, D of the 2 layers' query
    assert all(torch.equal(loaded[k], expected[k]) for k in loaded)


def _module(peft_key: str) -> str:
    """PEFT's key of an adapter tensor -> the earlier layout's (`structlora.convert`)."""
    return peft_key.removeprefix("base_model.model.").replace(".adapters.", ".")


def _peft_key(key: str) -> str:
    module, _, path = key.partition(".parameterization.")
    return f"base_model.model.{module}.adapters.parameterization.{path}"


# -- scorer inputs ---------------------------------------------------------------------------------------------

def test_score_refuses_empty_inputs_instead_of_hanging(tmp_path):
    from structlora.recipes.score import score_e2e, score_generation_eval
    hyps, refs = tmp_path / "hyps.txt", tmp_path / "refs.txt"
    hyps.write_text("")
    refs.write_text("")
    with pytest.raises(SystemExit, match=r"hyps\.txt is empty: nothing to score"):
        score_e2e(str(hyps), str(refs), use_java=False)
    (tmp_path / "ref0").write_text("")
    with pytest.raises(SystemExit, match="is empty: nothing to score"):
        score_generation_eval("webnlg", str(hyps), str(tmp_path / "ref"), use_java=False)


def test_java_scorers_time_out_instead_of_hanging(tmp_path, monkeypatch):
    """A Java process that never answers (here a fake `java` that sleeps) is stopped after the timeout: the
    persistent METEOR process (E2E) and the one-shot jars (PTB tokenizer, METEOR file mode)."""
    from structlora.tasks.nlg import generation_eval, metrics
    fake_java = tmp_path / "java"
    fake_java.write_text("#!/bin/sh\nexec sleep 600\n")
    fake_java.chmod(0o755)
    monkeypatch.setenv("JAVA", str(fake_java))
    scorer = metrics.MeteorScorer()
    with pytest.raises(metrics.JavaTimeout, match=r"METEOR 1.5 .* did not finish within 0.5 s"):
        scorer.compute_score({"a": ["the cat"]}, {"a": ["a cat"]}, timeout=0.5)
    assert scorer._meteor.meteor_p.poll() is not None  # the process was stopped, not left behind
    assert scorer._meteor.meteor_p.stdin.closed  # so pycocoevalcap's __del__ cannot fail while holding its lock
    scorer._meteor.__del__()  # pycocoevalcap's finaliser takes the lock its failed call kept: must not hang
    monkeypatch.setattr(metrics, "JAVA_TIMEOUT_S", 0.5)
    with pytest.raises(metrics.JavaTimeout, match="the Stanford PTB tokenizer"):
        metrics.ptb_tokenize(["a cat"])
    with pytest.raises(OSError, match=r"METEOR 1.5 \(Java\) did not finish"):  # the CLI's one-line error class
        generation_eval.meteor_generation_eval(["a cat"], [["the cat"]])


def test_generate_refuses_an_output_it_did_not_write(tmp_path):
    from structlora.recipes.generate import _check_output_owner
    output, record_path = tmp_path / "hyps.txt", tmp_path / "hyps.generate.json"
    output.write_text("a line the user wrote\nanother, unterminated")
    record = {"adapter": "abc", "dataset": "e2e", "split": "dev", "decoding": {"beams": 2}}
    with pytest.raises(SystemExit, match="exists but was not written by structlora generate"):
        _check_output_owner(str(output), str(record_path), record, restart=False)
    assert output.read_text() == "a line the user wrote\nanother, unterminated"  # not cut, not appended
    record_path.write_text(json.dumps({**record, "adapter": "other", "decoding": {"beams": 4}}))
    with pytest.raises(SystemExit, match="generated with another adapter, decoding; pass --restart"):
        _check_output_owner(str(output), str(record_path), record, restart=False)
    record_path.write_text(json.dumps(record))
    _check_output_owner(str(output), str(record_path), record, restart=False)  # same command: resumes
    _check_output_owner(str(output), str(tmp_path / "none.json"), record, restart=True)  # explicit flag


def _rank_problem(rank: int, port: int, results) -> None:
    import torch.distributed as dist
    from structlora.trainer_guards import _nonfinite_problem
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        layer = torch.nn.Linear(2, 2)
        layer.weight.grad = torch.full((2, 2), float("nan") if rank == 0 else 1.0)
        results[rank] = _nonfinite_problem(layer, torch.tensor(1.0))
    finally:
        dist.destroy_process_group()


def test_every_process_sees_a_nonfinite_gradient_of_one():
    """Sharded gradients differ between processes: all must stop together, or the others hang."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank_problem, args=(port, results), nprocs=2, join=True)
    assert results[0].startswith("the gradient of weight is not finite")
    assert results[1] == "another process saw a non-finite loss or gradient"


# -- data errors with file:line ----------------------------------------------------------------------------------

def _write_sst2(folder, train_rows):
    (folder / "sst2").mkdir(parents=True, exist_ok=True)
    (folder / "sst2" / "train.tsv").write_text("\n".join("\t".join(r) for r in [["sentence", "label"], *train_rows]) + "\n",
                                               encoding="utf-8")
    (folder / "sst2" / "dev.tsv").write_text("sentence\tlabel\nboring\t0\n", encoding="utf-8")


@pytest.mark.parametrize("bad,message", [("2", r"label '2' is not one of 0\.\.1"), ("0.7", "label '0.7' is not one of"),
                                         ("yes", "label 'yes' is not one of"), ("-1", "label '-1'")])
def test_glue_labels_are_validated_with_file_and_line(tmp_path, bad, message):
    from structlora.tasks.data_errors import DataRowError
    from structlora.tasks.glue.data import load_glue_local
    _write_sst2(tmp_path, [["a great film", "1"], ["dull", bad]])
    with pytest.raises(DataRowError, match=rf"sst2/train\.tsv:3: {message}.*pass --skip-bad-rows"):
        load_glue_local(tmp_path, "sst2")


def test_glue_bom_short_rows_and_counted_skips(tmp_path):
    """A short row is an error naming file:line (none of the real GLUE files in ../shared/data has one); with
    --skip-bad-rows it is skipped and counted."""
    from structlora.tasks.data_errors import BadRows, DataRowError
    from structlora.tasks.glue.data import load_glue_local
    _write_sst2(tmp_path, [["a great film", "1"], ["broken line"], ["fine", "1.0"], ["dull", "7"]])
    train = tmp_path / "sst2" / "train.tsv"
    train.write_bytes(b"\xef\xbb\xbf" + train.read_bytes())  # a UTF-8 BOM before the header
    with pytest.raises(DataRowError, match=r"train\.tsv:3: 1 tab-separated column\(s\), task 'sst2' needs at least 2"):
        load_glue_local(tmp_path, "sst2")
    bad_rows = BadRows(skip=True)
    data = load_glue_local(tmp_path, "sst2", bad_rows)
    assert data["train"]["label"] == [1, 1]  # the BOM did not hide the header's first column
    assert bad_rows.summary() == {"skipped_bad_rows": 2, "bad_rows": {
        "by_file": {str(train): 2}, "first": [f"{train}:3: 1 tab-separated column(s), task 'sst2' needs at least 2 here",
                                              f"{train}:5: label '7' is not one of 0..1 (task 'sst2')"]}}


# -- --resume compares the training flags --------------------------------------------------------------------

def test_resume_compares_training_flags_and_the_schedule_length_only_of_an_unfinished_run():
    from structlora.recipes.resume import changed_flags

    recorded = {"lr": 1e-4, "epochs": 3.0, "max_steps": -1, "seed": 0, "eval_batch_size": 32, "data_dir": "a"}
    now = {"lr": 1e-4, "epochs": 5.0, "max_steps": -1, "seed": 1, "eval_batch_size": 64, "data_dir": "a",
           "new_flag": 1}
    assert changed_flags(now, recorded, finished=False) == {"epochs": (3.0, 5.0), "seed": (0, 1)}
    assert changed_flags(now, recorded, finished=True) == {"seed": (0, 1)}  # a finished run continued longer
