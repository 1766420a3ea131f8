"""transformers' Trainer through AdapterTrainer on a peft.PeftModel: adapter-only checkpoints, resume, best-model
reload, for "default", a named adapter alone, and a named adapter beside another (issue 27, item 6)."""

from __future__ import annotations

import os

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from transformers import TrainerCallback, TrainingArguments

from structlora import AdapterTrainer, MTLoraConfig
from test_core import VOCAB, tiny_bert


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 32) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, 8), generator=generator)
        self.labels = (self.ids[:, 0] % 3).tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


class StopAt(TrainerCallback):
    """Simulates an interruption right after a checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True
        return control


def make_trainer(output_dir: str, load_best: bool = False, stop_at: int | None = None,
                 adapter_name: str = "default") -> AdapterTrainer:
    model = peft.get_peft_model(tiny_bert(), MTLoraConfig(r=4, structure="icfm", task_type="SEQ_CLS"),
                                adapter_name=adapter_name)
    args = TrainingArguments(output_dir=output_dir, max_steps=4, per_device_train_batch_size=8,
                             learning_rate=1e-2, save_steps=2, save_strategy="steps", report_to=[], seed=0,
                             use_cpu=True, logging_steps=1, eval_strategy="steps", eval_steps=2,
                             load_best_model_at_end=load_best, metric_for_best_model="loss", greater_is_better=False,
                             disable_tqdm=True)
    callbacks = [StopAt(stop_at)] if stop_at else []
    return AdapterTrainer(model=model, args=args, train_dataset=PairDataset(), eval_dataset=PairDataset(16),
                          callbacks=callbacks)


def adapter_state(trainer: AdapterTrainer) -> dict[str, torch.Tensor]:
    model = trainer.model
    state = get_peft_model_state_dict(model, adapter_name=model.active_adapter)
    return {k: v.detach().clone() for k, v in state.items()}


def test_checkpoints_hold_the_adapter_only_and_resume_matches(tmp_path):
    full = make_trainer(str(tmp_path / "full"))
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not any(name.startswith("model") for name in files)  # no full-model weights
    assert os.path.getsize(checkpoint / "adapter_model.safetensors") < 200_000

    interrupted = make_trainer(str(tmp_path / "resumed"), stop_at=2)
    interrupted.train()
    resumed = make_trainer(str(tmp_path / "resumed"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    expected, got = adapter_state(full), adapter_state(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.allclose(expected[key], got[key], atol=1e-6), key



def test_best_checkpoint_is_reloaded_at_the_end(tmp_path):
    trainer = make_trainer(str(tmp_path), load_best=True)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    reloaded = PeftModel.from_pretrained(tiny_bert(), best).eval()
    batch = {k: torch.stack([PairDataset()[i][k] for i in range(4)]) for k in ("input_ids", "attention_mask")}
    trainer.model.eval()
    assert torch.allclose(reloaded(**batch).logits, trainer.model(**batch).logits, atol=1e-6)


def _named_trainer(output_dir: str, load_best: bool = False, stop_at: int | None = None,
                   beside: bool = True) -> AdapterTrainer:
    """The trained adapter is "task"; with `beside`, the model was built with another adapter, "other", which every
    checkpoint saves beside it (at the checkpoint's top when it is named "default")."""
    trainer = make_trainer(output_dir, load_best, stop_at, adapter_name="other" if beside else "task")
    if beside:
        model = trainer.model
        model.add_adapter("task", MTLoraConfig(r=4, structure="ctcm", task_type="SEQ_CLS"))
        model.set_adapter("task")
    return trainer


@pytest.mark.parametrize("beside", [False, True], ids=["named-alone", "named-beside-another"])
def test_a_named_adapter_resumes_and_reloads_its_best_checkpoint(tmp_path, beside):
    full = _named_trainer(str(tmp_path / "full"), beside=beside)
    full.train()
    assert {"task", "other"} & set(os.listdir(tmp_path / "full" / "checkpoint-2")) == ({"task", "other"} if beside
                                                                                        else {"task"})
    interrupted = _named_trainer(str(tmp_path / "resumed"), stop_at=2, beside=beside)
    interrupted.train()
    resumed = _named_trainer(str(tmp_path / "resumed"), beside=beside)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    expected, got = adapter_state(full), adapter_state(resumed)
    assert expected.keys() == got.keys() and expected
    for key in expected:
        assert torch.allclose(expected[key], got[key], atol=1e-6), key
    assert resumed.model.active_adapter == "task"

    best = _named_trainer(str(tmp_path / "best"), load_best=True, beside=beside)
    best.args.greater_is_better = True  # the higher eval loss, step 2's (1.099 > 1.098): not the last weights
    best.train()
    checkpoint = best.state.best_model_checkpoint
    assert checkpoint.endswith("checkpoint-2")
    reloaded = PeftModel.from_pretrained(tiny_bert(), os.path.join(checkpoint, "task")).eval()
    batch = {k: torch.stack([PairDataset()[i][k] for i in range(4)]) for k in ("input_ids", "attention_mask")}
    best.model.eval()
    assert best.model.active_adapter == "task"
    assert torch.allclose(reloaded(**batch).logits, best.model(**batch).logits, atol=1e-6)
