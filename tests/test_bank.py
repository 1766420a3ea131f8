"""The factor bank: before each forward the same-shaped factors of all layers (tensor trains, MTLoRA's T·A) are
computed in one batched chain. The model must compute exactly what it computes when every layer computes its
own, in every way a forward is reached (checkpointing, accumulation, direct calls of inner modules, changed
weights)."""

from __future__ import annotations

import copy

import pytest
import torch

import structlora.peft_tuner as tuner_module
from structlora import LorettaAdpConfig, LorettaRepConfig, MTLoraConfig, get_peft_model
from structlora.bank import _SLOTS
from structlora.tensor_train import TTMatrix


def tiny_llama(layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=4, vocab_size=64))


CONFIGS = {
    "rep": lambda: LorettaRepConfig(r=4, tensor_rank=3, target_modules=["q_proj", "v_proj"]),
    "adp": lambda: LorettaAdpConfig(bottleneck_size=8, tensor_rank=3),
    **{f"mtlora-{structure}": (lambda structure=structure: MTLoraConfig(r=4, structure=structure))
       for structure in ("shim", "icfm", "ctcm", "dtsm")},
}


def adapted(kind: str):
    model = get_peft_model(tiny_llama(), CONFIGS[kind]())
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero updates, so every factor's gradient is non-trivial
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and ("cores" in name or "lora_" in name):
                parameter.normal_(0.0, 0.5)
    return model


# Drawn on the CPU (seeded) and moved, so STRUCTLORA_TEST_DEVICE=cuda runs the same ids.
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0), device="cpu").to(torch.empty(0).device)


def loss_and_grads(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def unbanked(monkeypatch) -> None:
    monkeypatch.setattr(tuner_module, "bank", lambda members: 0)  # the tuner's pre-hook banks


def assert_same(got: tuple, want: tuple) -> None:
    assert torch.allclose(got[0], want[0], atol=1e-6)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        assert torch.allclose(got[1][name], want[1][name], atol=1e-5, rtol=1e-5), name
        assert got[1][name].abs().sum() > 0, name


def trains_of(model) -> list[TTMatrix]:
    return [m for m in model.modules() if isinstance(m, TTMatrix)]


def bankables_of(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "bank_key") and m.bank_key() is not None]


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_banked_step_equals_the_per_layer_step(kind: str, monkeypatch) -> None:
    model = adapted(kind)
    banked = loss_and_grads(model)
    members = bankables_of(model)
    assert members and all(member in _SLOTS for member in members)  # 3 layers: every member shares a group
    unbanked(monkeypatch)
    _SLOTS.clear()
    assert_same(banked, loss_and_grads(model))


@pytest.mark.parametrize("kind", ["rep", "mtlora-icfm"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_gives_the_same_gradients(reentrant: bool, kind: str) -> None:
    reference = loss_and_grads(adapted(kind))
    model = adapted(kind)
    model.gradient_checkpointing_enable({"use_reentrant": reentrant})
    model.train()
    assert_same(loss_and_grads(model), reference)
    assert_same(loss_and_grads(model), reference)  # and again: the second step rebuilds the bank


def test_gradient_accumulation_over_two_forwards() -> None:
    model = adapted("rep")
    _, once = loss_and_grads(model)
    model.zero_grad(set_to_none=True)
    for _ in range(2):
        model(input_ids=IDS, labels=IDS).loss.backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert torch.allclose(parameter.grad, 2 * once[name], atol=1e-5), name


def test_direct_call_after_a_weight_change_does_not_use_a_stale_slice(monkeypatch) -> None:
    model = adapted("rep")
    model(input_ids=IDS)  # banks every train
    with torch.no_grad():
        for train in trains_of(model):
            train.cores[0].mul_(1.5)  # an in-place change, as an optimizer step makes
    inner = model.get_base_model()  # calling the transformers model directly skips nothing here...
    direct_logits = inner.model(input_ids=IDS).last_hidden_state  # ...but its inner model skips the bank hook
    unbanked(monkeypatch)
    _SLOTS.clear()
    assert torch.allclose(direct_logits, inner.model(input_ids=IDS).last_hidden_state, atol=1e-6)


def test_direct_call_after_backward_rebuilds_instead_of_reusing_a_spent_chain() -> None:
    model = adapted("rep")
    model(input_ids=IDS, labels=IDS).loss.backward()  # spends the bank
    hidden = model.get_base_model().model(input_ids=IDS).last_hidden_state  # no hook: trains rebuild themselves
    hidden.sum().backward()  # would raise "backward through the graph a second time" on a spent slice
    assert all(train.core_storage.grad is not None for train in trains_of(model))


def test_no_grad_bank_is_not_used_with_grad() -> None:
    model = adapted("rep")
    with torch.no_grad():
        model(input_ids=IDS)  # banks without a graph
    model.get_base_model().model(input_ids=IDS).last_hidden_state.sum().backward()
    assert all(train.core_storage.grad is not None for train in trains_of(model))
    assert all(grad.abs().sum() > 0 for train in trains_of(model)
               for grad in train.core_views(train.core_storage.grad))


def test_deepcopy_banks_its_own_trains_and_unload_removes_the_hook() -> None:
    model = adapted("rep")
    clone = copy.deepcopy(model)
    assert_same(loss_and_grads(clone), loss_and_grads(model))
    assert all(train in _SLOTS for train in trains_of(clone))
    base = clone.merge_and_unload()
    assert not base._forward_pre_hooks


def test_only_the_active_unmerged_enabled_adapter_is_banked() -> None:
    model = get_peft_model(tiny_llama(), MTLoraConfig(r=4, structure="icfm"))
    model.add_adapter("other", LorettaRepConfig(r=4, tensor_rank=3, target_modules=["q_proj", "v_proj"]))
    _SLOTS.clear()
    model(input_ids=IDS)
    banked = set(_SLOTS.keys())
    default_members = [m for n, m in model.named_modules() if ".default" in n and hasattr(m, "bank_key")]
    other_members = [m for n, m in model.named_modules() if ".other" in n and hasattr(m, "bank_key")]
    assert default_members and other_members
    assert set(default_members) <= banked and not banked & set(other_members)
    _SLOTS.clear()
    with model.disable_adapter():
        model(input_ids=IDS)
    assert not _SLOTS
    model.merge_adapter()
    model(input_ids=IDS)
    assert not _SLOTS
