"""Refuse rather than corrupt: every illegal operation raises a clear error AND leaves the model (weights,
module tree, trainable flags, adapter state), the files and the outputs exactly as they were."""

from __future__ import annotations

import copy

import pytest
import torch

from structlora import LoraConfig, LorettaAdpConfig, MTLoraConfig, PeftModel, get_peft_model
from structlora.adapter_state import AdapterState, AdapterStateError, validate_adapter_name
from test_core import inputs, outputs, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama


def fingerprint(model: torch.nn.Module) -> dict:
    """Everything an operation could change: every tensor, the module tree, requires_grad, the adapter state."""
    root = model.base_model if isinstance(model, PeftModel) else model
    snapshot = {
        "tensors": {k: v.detach().clone() for k, v in root.state_dict(keep_vars=True).items()},
        "modules": [(n, type(m).__name__) for n, m in root.named_modules()],
        "trainable": sorted(n for n, p in root.named_parameters() if p.requires_grad),
        "hooks": len(root._forward_pre_hooks),
    }
    if isinstance(model, PeftModel):
        state = model.adapter_state
        snapshot["state"] = (list(state.names), state.active, list(state.merged), state.disabled_depth,
                             state.unloaded, sorted(model.peft_config))
    return snapshot


def assert_unchanged(before: dict, model: torch.nn.Module) -> None:
    after = fingerprint(model)
    assert after["modules"] == before["modules"]
    assert after["trainable"] == before["trainable"]
    assert after["hooks"] == before["hooks"]
    assert after.get("state") == before.get("state")
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, tensor in before["tensors"].items():
        assert torch.equal(after["tensors"][key], tensor), f"{key} changed"


def adapted(seed: int = 3) -> PeftModel:
    model = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query", "value"]))
    randomize_adapters(model, seed)
    return model


# -- the state object itself ---------------------------------------------------------------------------------

def test_state_transitions_and_version():
    state = AdapterState()
    state.add("default")
    state.activate("default")
    version = state.version
    state.mark_merged("default")
    with pytest.raises(AdapterStateError, match="merged into the base weights.*unmerge_adapter"):
        state.enter_disabled()
    with pytest.raises(AdapterStateError, match="add_adapter: adapter 'default' is merged"):
        state.add("b")
    assert state.names == ["default"] and state.version == version + 1
    state.mark_unmerged()
    state.enter_disabled()
    state.enter_disabled()
    with pytest.raises(AdapterStateError, match="merge_adapter inside a disable_adapter"):
        state.check_merge()
    state.exit_disabled()
    assert state.disabled
    state.exit_disabled()
    assert not state.disabled
    with pytest.raises(AdapterStateError, match="without a matching"):
        state.exit_disabled()


@pytest.mark.parametrize("name", ["a/b", "../x", "with space", "dot.ted", "", "1abc", "x" * 65, "adapters",
                                  "base_layer"])
def test_adapter_names_must_be_identifiers(name):
    with pytest.raises(ValueError, match="invalid adapter_name"):
        validate_adapter_name(name)


def test_adapter_name_type():
    with pytest.raises(TypeError, match="adapter_name must be a string"):
        validate_adapter_name(3)


# -- PeftModel: illegal transitions refused before touching anything ----------------------------------------

@pytest.mark.parametrize("name", ["../evil", "a/b", "a.b"])
def test_bad_adapter_name_leaves_base_untouched(name, tmp_path):
    base = tiny_bert()
    before = fingerprint(base)
    with pytest.raises(ValueError, match="invalid adapter_name"):
        get_peft_model(base, LoraConfig(r=2), adapter_name=name)
    assert_unchanged(before, base)
    model = adapted()
    before = fingerprint(model)
    with pytest.raises(ValueError, match="invalid adapter_name"):
        model.add_adapter(name, LoraConfig(r=2))
    assert_unchanged(before, model)
    assert list(tmp_path.iterdir()) == []


def test_wrapping_an_adapted_base_again_is_refused(tmp_path):
    model = adapted()
    model.save_pretrained(tmp_path)
    before = fingerprint(model)
    with pytest.raises(ValueError, match="already holds structlora adapter layers.*would reset them"):
        get_peft_model(model.base_model, LoraConfig(r=2))
    with pytest.raises(ValueError, match="it is a PeftModel.*load_adapter"):
        PeftModel.from_pretrained(model, str(tmp_path))
    with pytest.raises(ValueError, match="already holds structlora adapter layers"):
        PeftModel.from_pretrained(model.base_model, str(tmp_path))
    assert_unchanged(before, model)


def test_set_adapter_to_another_while_merged_is_refused():
    model = adapted()
    model.add_adapter("b", LoraConfig(r=2, target_modules=["query"]))
    model.merge_adapter()
    merged_out = outputs(model, "logits")
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"set_adapter\('b'\): adapter 'default' is merged.*unmerge_adapter"):
        model.set_adapter("b")
    assert_unchanged(before, model)
    assert torch.equal(outputs(model, "logits"), merged_out)
    model.set_adapter("default")  # the merged one itself: fine
    model.unmerge_adapter()
    model.set_adapter("b")
    assert model.active_adapter == "b"


def test_weights_cannot_be_loaded_or_added_while_merged(tmp_path):
    model = adapted()
    model.save_pretrained(tmp_path)
    model.merge_adapter()
    before = fingerprint(model)
    with pytest.raises(ValueError, match="load_adapter: adapter 'default' is merged"):
        model.load_adapter(str(tmp_path), "default")
    with pytest.raises(ValueError, match="add_adapter: adapter 'default' is merged"):
        model.load_adapter(str(tmp_path), "other")
    with pytest.raises(ValueError, match="add_adapter: adapter 'default' is merged"):
        model.add_adapter("other", LoraConfig(r=2))
    with pytest.raises(ValueError, match="loading adapter weights: adapter 'default' is merged"):
        model.set_adapter_state_dict(model.adapter_state_dict())
    assert_unchanged(before, model)


def test_merge_inside_disable_is_refused_and_disable_nests():
    model = adapted()
    base_out = outputs(model.base_model, "logits")  # adapters enabled: this is the adapted output
    with model.disable_adapter():
        plain = outputs(model, "logits")
        before = fingerprint(model)
        with pytest.raises(ValueError, match="merge_adapter inside a disable_adapter"):
            model.merge_adapter()
        with pytest.raises(ValueError, match="merge_adapter inside a disable_adapter"):
            model.merge_and_unload()
        assert_unchanged(before, model)
        with model.disable_adapter():
            assert torch.equal(outputs(model, "logits"), plain)
        assert torch.equal(outputs(model, "logits"), plain)  # still disabled after the inner block
    assert torch.equal(outputs(model, "logits"), base_out)
    assert model.adapter_state.disabled_depth == 0


def test_disable_while_merged_is_a_value_error():
    model = adapted()
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged into the base weights, which cannot be disabled"):
        with model.disable_adapter():
            pass
    assert model.adapter_state.disabled_depth == 0


def test_save_after_unload_is_refused_and_writes_nothing(tmp_path):
    model = adapted()
    model.save_pretrained(tmp_path)
    saved = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    reference = outputs(model, "logits")
    plain = model.merge_and_unload()
    assert torch.allclose(outputs(plain, "logits"), reference, atol=1e-5)
    for operation in (lambda: model.save_pretrained(tmp_path), lambda: model.merge_adapter(),
                      lambda: model.add_adapter("b", LoraConfig(r=2)), lambda: model.set_adapter("default"),
                      lambda: model.load_adapter(str(tmp_path), "b"), lambda: model.unmerge_adapter()):
        with pytest.raises(ValueError, match="unloaded by merge_and_unload"):
            operation()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == saved


def test_failed_injection_rolls_back():
    """c_fc fails (5 slices do not divide 128) after attn.c_proj (earlier in module order) was wrapped: undone."""
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    randomize_adapters(model)
    reference = outputs(model, "logits")
    before = fingerprint(model)
    with pytest.raises(ValueError, match="enable_lora has 5 slices"):
        model.add_adapter("b", LoraConfig(r=2, target_modules=["c_proj", "c_fc"], enable_lora={"c_fc": [True] * 5}))
    assert_unchanged(before, model)
    with pytest.raises(ValueError, match="modules_to_save entry 'nope'"):
        model.add_adapter("b", LoraConfig(r=2, target_modules=["c_fc"], modules_to_save=["nope"]))
    assert_unchanged(before, model)
    assert torch.equal(outputs(model, "logits"), reference)
    model.add_adapter("b", LoraConfig(r=2, target_modules=["c_fc"]))  # the name is still free
    assert model.adapter_state.names == ["default", "b"]


def test_failed_construction_leaves_the_callers_model_as_it_was():
    base = tiny_llama()
    before = fingerprint(base)
    with pytest.raises(ValueError, match="modules_to_save entry 'nope'"):
        get_peft_model(base, LorettaAdpConfig(bottleneck_size=4, tensor_rank=2, modules_to_save=["nope"]))
    assert_unchanged(before, base)


def test_failed_load_rolls_back(tmp_path):
    model = adapted()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:60])
    before = fingerprint(model)
    with pytest.raises(ValueError, match="corrupt adapter weights file"):
        model.load_adapter(str(tmp_path), "other")
    assert_unchanged(before, model)
    base = tiny_bert()
    before = fingerprint(base)
    with pytest.raises(ValueError, match="corrupt adapter weights file"):
        PeftModel.from_pretrained(base, str(tmp_path))
    assert_unchanged(before, base)


def test_state_survives_deepcopy_and_switching():
    model = adapted()
    model.add_adapter("b", MTLoraConfig(r=2, structure="icfm", target_modules=["value"]))
    clone = copy.deepcopy(model)
    clone.set_adapter("b")
    assert model.active_adapter == "default" and clone.active_adapter == "b"
    assert clone.adapter_state is not model.adapter_state
