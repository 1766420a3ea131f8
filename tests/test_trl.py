"""TRL's SFTTrainer and DPOTrainer on structlora models (structlora.integrations.trl), every method, CPU."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import DPOConfig, SFTConfig  # noqa: E402

from structlora import LoraConfig, LorettaAdpConfig, LorettaRepConfig, MTLoraConfig, PeftModel, get_peft_model  # noqa: E402
from structlora.integrations.trl import DPOTrainer, SFTTrainer  # noqa: E402
from tiny_models import tiny_llama_for, tiny_word_tokenizer  # noqa: E402

METHODS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8),
    "mtlora": lambda: MTLoraConfig(r=4, lora_alpha=8, structure="icfm"),
    "loretta_rep": lambda: LorettaRepConfig(r=4, tensor_rank=2),
    "loretta_adp": lambda: LorettaAdpConfig(bottleneck_size=8, tensor_rank=2),
}
# TRL's defaults, except bf16 (its default needs a GPU) and a short run with a checkpoint at the end.
RUN = dict(max_steps=2, save_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, bf16=False,
           report_to=[], logging_steps=1, disable_tqdm=True)


def _split_state(model: PeftModel) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(adapter tensors, base tensors), cloned."""
    adapter = {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}
    base = {k: v.detach().clone() for k, v in model.base_model.state_dict().items() if ".adapters." not in k}
    return adapter, base


def _assert_trained_adapter_only(model: PeftModel, before: tuple[dict, dict]) -> None:
    adapter_before, base_before = before
    adapter_after, base_after = _split_state(model)
    assert base_after.keys() == base_before.keys()
    for key, tensor in base_before.items():
        assert torch.equal(tensor, base_after[key]), f"base tensor {key} changed"
    changed = [k for k in adapter_before if not torch.equal(adapter_before[k], adapter_after[k])]
    assert changed, "no adapter tensor changed"


def _assert_adapter_only_checkpoint(checkpoint: str, model: PeftModel, tokenizer) -> None:
    files = set(os.listdir(checkpoint))
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
    # The checkpoint reloads onto a fresh copy of the base model with the trained model's outputs.
    reloaded = PeftModel.from_pretrained(tiny_llama_for(tokenizer), checkpoint)
    ids = tokenizer(["the cat sat on the mat ."], return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", list(METHODS))
def test_sft_default_config_completion_only_loss(method, tmp_path):
    tokenizer = tiny_word_tokenizer()
    model = get_peft_model(tiny_llama_for(tokenizer), METHODS[method]())
    before = _split_state(model)
    data = Dataset.from_dict({"prompt": ["the cat is", "a dog was"] * 4,
                              "completion": [" good .", " bad ."] * 4})
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path), **RUN), train_dataset=data,
                         processing_class=tokenizer)
    # Prompt-completion data: the default SFTConfig scores only the completion tokens.
    batch = trainer.data_collator([trainer.train_dataset[0]])
    prompt_length = len(tokenizer("the cat is").input_ids)
    assert (batch["labels"][0, :prompt_length] == -100).all()
    assert (batch["labels"][0, prompt_length:] != -100).any()
    trainer.train()
    assert trainer.state.log_history[0]["loss"] > 0
    _assert_trained_adapter_only(model, before)
    _assert_adapter_only_checkpoint(str(tmp_path / "checkpoint-2"), model, tokenizer)


def test_sft_packing(tmp_path):
    tokenizer = tiny_word_tokenizer()
    model = get_peft_model(tiny_llama_for(tokenizer), METHODS["loretta_rep"]())
    before = _split_state(model)
    data = Dataset.from_dict({"text": ["the cat sat on the mat .", "a dog ran .", "the dog is good ."] * 4})
    args = SFTConfig(output_dir=str(tmp_path), packing=True, max_length=16, **RUN)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    # Packed rows hold several documents: the position ids restart inside a row.
    assert int((batch["position_ids"][0] == 0).sum()) > 1
    trainer.train()
    _assert_trained_adapter_only(model, before)


@pytest.mark.parametrize("method", list(METHODS))
def test_dpo_reference_shares_the_base(method, tmp_path):
    tokenizer = tiny_word_tokenizer()
    model = get_peft_model(tiny_llama_for(tokenizer), METHODS[method]())
    adapter_numel = sum(t.numel() for t in model.adapter_state_dict().values())
    base_numel = sum(p.numel() for n, p in model.base_model.named_parameters() if ".adapters." not in n)
    before = _split_state(model)
    data = Dataset.from_dict({"prompt": ["the cat is", "a dog was"] * 4, "chosen": [" good .", " good ."] * 4,
                              "rejected": [" bad .", " bad ."] * 4})
    trainer = DPOTrainer(model=model, args=DPOConfig(output_dir=str(tmp_path), **RUN), train_dataset=data,
                         processing_class=tokenizer)
    # No second model: the reference is a frozen copy of the (fresh) adapter on the same base weights.
    assert trainer.ref_model is None
    assert sorted(model.peft_config) == ["default", "ref"]
    assert sum(p.numel() for p in model.parameters()) == base_numel + 2 * adapter_numel
    # A fresh adapter changes nothing, so the reference equals the adapter-disabled model: at step one the
    # policy equals the reference, every reward is 0 and the loss is log 2.
    batch = tokenizer(["the cat is good ."], return_tensors="pt")
    with torch.no_grad(), model.disable_adapter():
        disabled = model(**batch).logits
    model.set_adapter("ref")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, disabled, rtol=0, atol=0)
    model.set_adapter("default")
    ref_before = {k: v.clone() for k, v in model.adapter_state_dict("ref").items()}
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    _assert_trained_adapter_only(model, before)
    for key, tensor in model.adapter_state_dict("ref").items():
        assert torch.equal(tensor, ref_before[key]), f"the reference adapter changed: {key}"
    _assert_adapter_only_checkpoint(str(tmp_path / "checkpoint-2"), model, tokenizer)


def test_adapter_on_lm_head_is_refused(tmp_path):
    tokenizer = tiny_word_tokenizer()
    model = get_peft_model(tiny_llama_for(tokenizer), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    data = Dataset.from_dict({"prompt": ["the cat is"], "completion": [" good ."]})
    with pytest.raises(ValueError, match="lm_head.weight directly"):
        SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path), **RUN), train_dataset=data,
                   processing_class=tokenizer)


def test_sft_trains_with_loraplus_groups(tmp_path):
    tokenizer = tiny_word_tokenizer()
    model = get_peft_model(tiny_llama_for(tokenizer), MTLoraConfig(r=4, structure="ctcm"))
    data = Dataset.from_dict({"prompt": ["the cat is", "a dog was"] * 4, "completion": [" good .", " bad ."] * 4})
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path), **RUN), train_dataset=data,
                         processing_class=tokenizer, loraplus_lr_ratio=4)
    trainer.train()
    lrs = {group["name"]: group["initial_lr"] for group in trainer.optimizer.param_groups}
    assert lrs == {"A": 1e-2, "B": 4e-2}
