"""Plain TRL (SFTTrainer, DPOTrainer, GRPOTrainer), unpatched, with structlora's methods on the PEFT path: a structlora
config as `peft_config=`, or a model already wrapped by `peft.get_peft_model`; every method, CPU, tiny seeded models.

TRL recognises the model as a `peft.PeftModel`, so it takes its adapter path unchanged: checkpoints hold the adapter
only, DPO's and GRPO's reference is the same model with the adapter disabled (no second base model), an adapter on
the LM head is refused by TRL itself, and on a 4-bit base TRL trains the adapter (in bf16, its QLoRA rule)."""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("trl")
peft = pytest.importorskip("peft")
from datasets import Dataset  # noqa: E402
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

import structlora  # noqa: E402
from structlora import LoraConfig, LorettaAdpConfig, LorettaRepConfig, MTLoraConfig  # noqa: E402
from structlora.peft_tuner import StructloraTuner  # noqa: E402
from tiny_models import tiny_llama_for, tiny_word_tokenizer  # noqa: E402

METHODS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8),
    "mtlora": lambda: MTLoraConfig(r=4, lora_alpha=8, structure="icfm"),
    "loretta_rep": lambda: LorettaRepConfig(r=4, tensor_rank=2),
    "loretta_adp": lambda: LorettaAdpConfig(bottleneck_size=8, tensor_rank=2),
}
# TRL's defaults, except bf16 (its default needs a GPU) and a short run with a checkpoint at the end.
RUN = dict(max_steps=2, save_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, bf16=False, use_cpu=True,
           report_to=[], logging_steps=1, disable_tqdm=True)
SENTENCE = "the cat sat on the mat ."


def _prompt_completion() -> Dataset:
    return Dataset.from_dict({"prompt": ["the cat is", "a dog was"] * 4, "completion": [" good .", " bad ."] * 4})


def _preferences() -> Dataset:
    return Dataset.from_dict({"prompt": ["the cat is", "a dog was"] * 4, "chosen": [" good .", " great ."] * 4,
                              "rejected": [" bad .", " awful ."] * 4})


def _snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(every parameter, cloned; the names of the trainable ones)."""
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n for n, p in model.named_parameters() if p.requires_grad})


def _assert_trained_adapter_only(model: torch.nn.Module, before: tuple[dict, set]) -> None:
    """Only adapter tensors train (and some of them changed); every frozen tensor, the base's included, is as it was."""
    tensors, trainable = before
    assert trainable and all(".adapters." in n for n in trainable), sorted(trainable)[:3]
    after = dict(model.named_parameters())
    assert after.keys() == tensors.keys()
    for name, tensor in tensors.items():
        if name not in trainable:
            assert torch.equal(after[name], tensor), f"frozen tensor {name} changed"
    assert any(not torch.equal(after[n], tensors[n]) for n in trainable), "no adapter tensor changed"


def _logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(tokenizer([SENTENCE], return_tensors="pt").input_ids).logits


def _assert_adapter_files_only(checkpoint: str) -> None:
    files = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert not [f for f in files if f.startswith(("model", "pytorch_model"))], sorted(files)


def _assert_adapter_only_checkpoint(checkpoint: str, model: torch.nn.Module, tokenizer) -> None:
    _assert_adapter_files_only(checkpoint)
    # The checkpoint loads with plain peft onto a fresh copy of the base model and gives the trained model's logits.
    reloaded = peft.PeftModel.from_pretrained(tiny_llama_for(tokenizer), checkpoint)
    assert isinstance(reloaded.base_model, StructloraTuner)
    torch.testing.assert_close(_logits(reloaded, tokenizer), _logits(model, tokenizer), rtol=0, atol=0)


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


# -- SFT ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
def test_sft_with_a_structlora_peft_config_completion_only_loss(method, tmp_path):
    tokenizer = tiny_word_tokenizer()
    trainer = SFTTrainer(model=tiny_llama_for(tokenizer), args=SFTConfig(output_dir=str(tmp_path), **RUN),
                         train_dataset=_prompt_completion(), processing_class=tokenizer, peft_config=METHODS[method]())
    model = trainer.model
    assert isinstance(model, peft.PeftModel) and isinstance(model.base_model, StructloraTuner)
    before = _snapshot(model)
    # Prompt-completion data: the default SFTConfig scores only the completion tokens.
    batch = trainer.data_collator([trainer.train_dataset[0]])
    prompt_length = len(tokenizer("the cat is").input_ids)
    assert (batch["labels"][0, :prompt_length] == -100).all()
    assert (batch["labels"][0, prompt_length:] != -100).any()
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    _assert_trained_adapter_only(model, before)
    _assert_adapter_only_checkpoint(str(tmp_path / "checkpoint-2"), model, tokenizer)


@pytest.mark.parametrize("method", list(METHODS))
def test_sft_with_a_model_already_wrapped_by_peft(method, tmp_path):
    tokenizer = tiny_word_tokenizer()
    model = peft.get_peft_model(tiny_llama_for(tokenizer), METHODS[method]())
    before = _snapshot(model)
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path), **RUN),
                         train_dataset=_prompt_completion(), processing_class=tokenizer)
    assert trainer.model is model
    trainer.train()
    assert all(math.isfinite(x) for x in _losses(trainer))
    _assert_trained_adapter_only(model, before)
    _assert_adapter_only_checkpoint(str(tmp_path / "checkpoint-2"), model, tokenizer)


def test_sft_packing(tmp_path):
    tokenizer = tiny_word_tokenizer()
    data = Dataset.from_dict({"text": ["the cat sat on the mat .", "a dog ran .", "the dog is good ."] * 4})
    args = SFTConfig(output_dir=str(tmp_path), packing=True, max_length=16, **RUN)
    trainer = SFTTrainer(model=tiny_llama_for(tokenizer), args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=METHODS["loretta_rep"]())
    before = _snapshot(trainer.model)
    batch = next(iter(trainer.get_train_dataloader()))
    # Packed rows hold several documents: the position ids restart inside a row.
    assert int((batch["position_ids"][0] == 0).sum()) > 1
    trainer.train()
    _assert_trained_adapter_only(trainer.model, before)


def test_adapter_on_lm_head_is_refused_by_trl(tmp_path):
    """TRL's fused loss multiplies by lm_head.weight directly, so TRL itself refuses an adapter there."""
    tokenizer = tiny_word_tokenizer()
    with pytest.raises(ValueError, match="Applying a PEFT adapter to `lm_head` is not supported"):
        SFTTrainer(model=tiny_llama_for(tokenizer), args=SFTConfig(output_dir=str(tmp_path), **RUN),
                   train_dataset=_prompt_completion(), processing_class=tokenizer,
                   peft_config=LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))


def test_trained_copy_of_lm_head_is_what_the_fused_loss_trains(tmp_path):
    """A trained copy of the head (modules_to_save) is PEFT's ModulesToSaveWrapper, whose `weight` is the copy's:
    TRL's fused loss reads it, so the copy trains and the original head stays as it was."""
    tokenizer = tiny_word_tokenizer()
    trainer = SFTTrainer(model=tiny_llama_for(tokenizer), args=SFTConfig(output_dir=str(tmp_path), **RUN),
                         train_dataset=_prompt_completion(), processing_class=tokenizer,
                         peft_config=MTLoraConfig(r=2, structure="shim", modules_to_save=["lm_head"]))
    head = trainer.model.get_base_model().lm_head
    original, copy = head.original_module.weight.detach().clone(), head.weight.detach().clone()
    trainer.train()
    assert torch.equal(head.original_module.weight, original)
    assert not torch.equal(head.weight, copy)
    _assert_adapter_only_checkpoint(str(tmp_path / "checkpoint-2"), trainer.model, tokenizer)


def test_sft_trains_with_loraplus_groups(tmp_path):
    tokenizer = tiny_word_tokenizer()
    model = peft.get_peft_model(tiny_llama_for(tokenizer), MTLoraConfig(r=4, structure="ctcm"))
    optimizer = structlora.create_loraplus_optimizer(model, torch.optim.AdamW, {"lr": 1e-2}, loraplus_lr_ratio=4)
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path), **RUN),
                         train_dataset=_prompt_completion(), processing_class=tokenizer, optimizers=(optimizer, None))
    before = _snapshot(model)
    trainer.train()
    lrs = {group["name"]: group["initial_lr"] for group in trainer.optimizer.param_groups}
    assert lrs == {"A": 1e-2, "B": 4e-2}
    _assert_trained_adapter_only(model, before)


# -- DPO ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
def test_dpo_with_a_structlora_peft_config_uses_the_disabled_adapter_as_reference(method, tmp_path):
    tokenizer = tiny_word_tokenizer()
    base_numel = sum(p.numel() for p in tiny_llama_for(tokenizer).parameters())
    trainer = DPOTrainer(model=tiny_llama_for(tokenizer), args=DPOConfig(output_dir=str(tmp_path), **RUN),
                         train_dataset=_preferences(), processing_class=tokenizer, peft_config=METHODS[method]())
    model = trainer.model
    # No second model and no second adapter: the parameters are the base's and the one trained adapter's.
    assert trainer.ref_model is None
    assert list(model.peft_config) == ["default"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for p in model.parameters()) == base_numel + trainable
    before = _snapshot(model)
    trainer.train()
    first, second = [entry for entry in trainer.state.log_history if "loss" in entry][:2]
    # A fresh adapter changes nothing, so at step one the policy is its reference: every reward is 0, the loss log 2.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert second["rewards/margins"] != 0 and math.isfinite(second["loss"])
    _assert_trained_adapter_only(model, before)
    # The reference (the adapter disabled) is still exactly the untouched base model.
    with model.disable_adapter():
        disabled = _logits(model, tokenizer)
    torch.testing.assert_close(disabled, _logits(tiny_llama_for(tokenizer), tokenizer), rtol=0, atol=0)
    _assert_adapter_only_checkpoint(str(tmp_path / "checkpoint-2"), model, tokenizer)


@pytest.mark.parametrize("method", list(METHODS))
def test_dpo_with_a_wrapped_model_keeps_a_frozen_copy_of_the_adapter_as_reference(method, tmp_path):
    """TRL's rule for a model passed already wrapped (its adapter may be pre-trained): a frozen copy of the adapter,
    "ref" (a few KB), on the same base weights. For a fresh adapter that is exactly the adapter-disabled model."""
    tokenizer = tiny_word_tokenizer()
    model = peft.get_peft_model(tiny_llama_for(tokenizer), METHODS[method]())
    adapter_numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base_numel = sum(p.numel() for p in model.parameters()) - adapter_numel
    trainer = DPOTrainer(model=model, args=DPOConfig(output_dir=str(tmp_path), **RUN), train_dataset=_preferences(),
                         processing_class=tokenizer)
    assert trainer.ref_model is None
    assert sorted(model.peft_config) == ["default", "ref"]
    assert sum(p.numel() for p in model.parameters()) == base_numel + 2 * adapter_numel
    with model.disable_adapter():
        disabled = _logits(model, tokenizer)
    model.set_adapter("ref")
    torch.testing.assert_close(_logits(model, tokenizer), disabled, rtol=0, atol=0)
    model.set_adapter("default")
    model.train()
    ref_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".ref." in n}
    assert ref_before
    before = _snapshot(model)
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    _assert_trained_adapter_only(model, before)  # the "ref" copy is frozen: unchanged
    assert all(torch.equal(p, ref_before[n]) for n, p in model.named_parameters() if ".ref." in n)
    assert all(".ref." not in n for n in before[1])
    _assert_adapter_only_checkpoint(str(tmp_path / "checkpoint-2"), model, tokenizer)


# -- GRPO -----------------------------------------------------------------------------------------------------------
def _length_reward(completions: list[str], **_: object) -> list[float]:
    """Longer completions score higher: sampled completions differ, so the advantages (and gradients) are not 0."""
    return [float(len(completion)) for completion in completions]


@pytest.mark.parametrize("method", list(METHODS))
def test_grpo_step_with_a_structlora_peft_config(method, tmp_path):
    """One GRPO step: generation without gradients (structlora's inference path), a KL term against the reference
    (beta > 0), which for a PEFT model is the same model with the adapter disabled."""
    tokenizer = tiny_word_tokenizer()
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=1, save_steps=1, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=4, beta=0.1, learning_rate=1e-2, bf16=False,
                      use_cpu=True, report_to=[], logging_steps=1, disable_tqdm=True, seed=0)
    trainer = GRPOTrainer(model=tiny_llama_for(tokenizer), reward_funcs=_length_reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["the cat is", "a dog was"] * 2}),
                          processing_class=tokenizer, peft_config=METHODS[method]())
    model = trainer.model
    assert isinstance(model.base_model, StructloraTuner)
    assert trainer.ref_model is None and list(model.peft_config) == ["default"]
    before = _snapshot(model)
    trainer.train()
    log = trainer.state.log_history[0]
    assert math.isfinite(log["loss"]) and log["reward_std"] > 0 and log["grad_norm"] > 0
    _assert_trained_adapter_only(model, before)
    # After the optimizer step, the no-grad path (cached factors, used by generation) sees the new weights.
    ids = tokenizer([SENTENCE], return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        cached = model(ids).logits
    torch.testing.assert_close(model(ids).logits.detach(), cached, rtol=1e-6, atol=1e-6)
    _assert_adapter_only_checkpoint(str(tmp_path / "checkpoint-1"), model, tokenizer)


# -- a 4-bit (bitsandbytes nf4) base --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama_for(tiny_word_tokenizer(), hidden_size=64, intermediate_size=128).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method", list(METHODS))
def test_4bit_base_trains_through_plain_sft_trainer(method, tiny_folder, tmp_path):
    """transformers refuses to fine-tune a purely quantized model; with a structlora peft_config TRL wraps it in a
    peft.PeftModel, casts the adapter to bf16 (its QLoRA rule) and trains it; the 4-bit weights stay as they were."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tokenizer = tiny_word_tokenizer()
    base = AutoModelForCausalLM.from_pretrained(
        tiny_folder, device_map="cpu", dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32))
    trainer = SFTTrainer(model=base, args=SFTConfig(output_dir=str(tmp_path), **RUN),
                         train_dataset=_prompt_completion(), processing_class=tokenizer, peft_config=METHODS[method]())
    model = trainer.model
    assert sum(p.dtype == torch.uint8 for p in model.parameters()) == 14  # 2 blocks x 7 projections in 4 bits
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    before = _snapshot(model)
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    _assert_trained_adapter_only(model, before)
    _assert_adapter_files_only(str(tmp_path / "checkpoint-2"))


def test_readme_trl_section_runs_as_written(tmp_path, monkeypatch):
    """README's "Training with TRL" snippet, with a tiny local model for the hub one."""
    from pathlib import Path

    folder = tmp_path / "tiny-llama"
    tokenizer = tiny_word_tokenizer()
    tiny_llama_for(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Training with TRL", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    line = 'base_id = "HuggingFaceTB/SmolLM2-135M"'
    assert line in code
    code = code.replace(line, f"base_id = {str(folder)!r}").replace('bf16=False,', 'bf16=False, use_cpu=True,')
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    assert namespace["dpo"].model is namespace["sft"].model and sorted(namespace["sft"].model.peft_config) == [
        "default", "ref"]
    assert sorted(os.listdir(tmp_path / "out" / "adapter")) == ["README.md", "adapter_config.json",
                                                                "adapter_model.safetensors"]
    reloaded = peft.PeftModel.from_pretrained(tiny_llama_for(tokenizer), str(tmp_path / "out" / "adapter"))
    torch.testing.assert_close(_logits(reloaded, tokenizer), _logits(namespace["dpo"].model, tokenizer),
                               rtol=0, atol=0)
