"""Refuse rather than corrupt: every illegal operation raises a clear error AND leaves the model (weights,
module tree, trainable flags, adapter state), the files and the outputs exactly as they were."""

from __future__ import annotations

import copy

import pytest
import torch

from structlora import (LoraConfig, LorettaAdpConfig, MTLoraConfig, PeftModel, TargetWarning, from_loretta,
                        get_peft_model)
from structlora.adapter_state import AdapterState, AdapterStateError, validate_adapter_name
from structlora.model import adapted_layers
from test_core import inputs, outputs, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama


def fingerprint(model: torch.nn.Module) -> dict:
    """Everything an operation could change: every tensor, the module tree, requires_grad, the adapter state."""
    root = model.get_base_model() if isinstance(model, PeftModel) else model  # the wrapped model itself
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
        torch.testing.assert_close(after["tensors"][key], tensor, rtol=0, atol=0, equal_nan=True,
                                   msg=f"{key} changed")


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
        get_peft_model(model.get_base_model(), LoraConfig(r=2))
    with pytest.raises(ValueError, match="it is a PeftModel.*load_adapter"):
        PeftModel.from_pretrained(model, str(tmp_path))
    with pytest.raises(ValueError, match="already holds structlora adapter layers"):
        PeftModel.from_pretrained(model.get_base_model(), str(tmp_path))
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
    corrupt = r"adapter_model\.safetensors' does not read as a safetensors file.*truncated or corrupt"
    with pytest.raises(ValueError, match=corrupt):
        model.load_adapter(str(tmp_path), "other")
    assert_unchanged(before, model)
    base = tiny_bert()
    before = fingerprint(base)
    with pytest.raises(ValueError, match=corrupt):
        PeftModel.from_pretrained(base, str(tmp_path))
    assert_unchanged(before, base)


def test_state_survives_deepcopy_and_switching():
    model = adapted()
    model.add_adapter("b", MTLoraConfig(r=2, structure="icfm", target_modules=["value"]))
    clone = copy.deepcopy(model)
    clone.set_adapter("b")
    assert model.active_adapter == "default" and clone.active_adapter == "b"
    assert clone.adapter_state is not model.adapter_state


# -- merges that cannot corrupt --------------------------------------------------------------------------------

def test_fp16_merge_overflow_is_refused_and_weights_untouched():
    model = get_peft_model(tiny_bert().half(), LoraConfig(r=4, target_modules=["query", "value"]))
    randomize_adapters(model)
    layer = model.base_model.bert.encoder.layer[1].attention.self.value
    with torch.no_grad():
        layer.adapters["default"].parameterization.lora_B.mul_(1e6)  # ΔW beyond fp16's 65504 in this layer only
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"merge refused at 'bert\.encoder\.layer\.1\.attention\.self\.value'.*"
                                         r"not finite in torch\.float16.*no weight was changed"):
        model.merge_adapter()
    assert_unchanged(before, model)  # layer 0 (checked and fine) was not written either
    with pytest.raises(ValueError, match="merge refused"):
        model.merge_and_unload()
    assert_unchanged(before, model)


def test_nan_adapter_is_never_merged():
    model = adapted()
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
    before = fingerprint(model)
    with pytest.raises(ValueError, match="ΔW of adapter 'default' is not finite"):
        model.merge_adapter()
    assert_unchanged(before, model)


@pytest.mark.parametrize("make,error,message", [
    (lambda: LoraConfig(lora_alpha=float("nan")), ValueError, "lora_alpha must be finite, got nan"),
    (lambda: LoraConfig(lora_alpha=float("inf")), ValueError, "lora_alpha must be finite"),
    (lambda: LoraConfig(lora_alpha=-1), ValueError, r"lora_alpha must be in \(0, inf\), got -1"),
    (lambda: LoraConfig(lora_alpha=0), ValueError, r"lora_alpha must be in \(0, inf\)"),
    (lambda: LoraConfig(lora_alpha="16"), TypeError, "lora_alpha must be a number, got str"),
    (lambda: LoraConfig(lora_dropout=float("nan")), ValueError, "lora_dropout must be finite"),
    (lambda: LoraConfig(lora_dropout=-0.1), ValueError, r"lora_dropout must be in \[0, 1\)"),
    (lambda: LoraConfig(lora_dropout=True), TypeError, "lora_dropout must be a number, got bool"),
    (lambda: LorettaAdpConfig(scaling=float("nan")), ValueError, "scaling must be finite"),
    (lambda: LorettaAdpConfig(scaling=-2.0), ValueError, r"scaling must be in \(0, inf\)"),
    (lambda: LorettaAdpConfig(scaling="big"), ValueError, "scaling must be a number or 'learned'"),
    (lambda: LorettaAdpConfig(adapter_dropout=float("inf")), ValueError, "adapter_dropout must be finite"),
    (lambda: LorettaAdpConfig(use_parallel_adapter="yes"), TypeError, "use_parallel_adapter must be true or false"),
    (lambda: LoraConfig(r=4.0), ValueError, "r must be a positive integer, got 4.0"),
    (lambda: LoraConfig(r=True), ValueError, "r must be a positive integer, got True"),
    (lambda: LoraConfig(target_modules=[]), TypeError, "target_modules must be a non-empty list"),
    (lambda: LoraConfig(target_modules=["q", 3]), TypeError, "target_modules entries must be non-empty strings"),
    (lambda: LoraConfig(target_modules="(unclosed"), ValueError, "target_modules '\\(unclosed' is not a valid regular"),
    (lambda: LoraConfig(target_modules=5), TypeError, "target_modules must be a non-empty list"),
    (lambda: LoraConfig(modules_to_save="classifier"), TypeError, "modules_to_save must be a list of module names"),
    (lambda: LoraConfig(enable_lora=[1, 0, 1]), TypeError, "enable_lora must be a non-empty list of true/false"),
    (lambda: LoraConfig(enable_lora={"c_attn": "yes"}), TypeError, r"enable_lora\['c_attn'\] must be"),
    (lambda: LoraConfig(enable_lora={}), TypeError, "enable_lora must not be an empty dict"),
    (lambda: LoraConfig(fan_in_fan_out="no"), TypeError, "fan_in_fan_out must be true or false"),
    (lambda: LoraConfig(train_norms=1), TypeError, "train_norms must be true or false"),
    (lambda: LoraConfig(bias=None), ValueError, "unknown bias None"),
    (lambda: LoraConfig(task_type=3), TypeError, "task_type must be one of"),
    (lambda: MTLoraConfig(structure=["shim"]), ValueError, "unknown structure"),
])
def test_config_fields_are_validated_by_name(make, error, message):
    with pytest.raises(error, match=message):
        make()


# -- config checked against the model -----------------------------------------------------------------------

@pytest.mark.parametrize("config,message", [
    (lambda: LoraConfig(r=2, target_modules=["c_attn"], enable_lora={"c_atn": [True, False, True]}),
     "enable_lora key 'c_atn' matches none of the target modules"),
    (lambda: LoraConfig(r=2, target_modules=["c_attn"], enable_lora=[True, False, True, True]),
     r"enable_lora gives 4 slices for 'transformer\.h\.0\.attn\.c_attn', which is a fused projection of 3"),
    (lambda: LoraConfig(r=2, target_modules=["c_attn", "c_proj"], enable_lora=[True, True]),
     "gives 2 slices for 'transformer.h.0.attn.c_attn'"),
    (lambda: LoraConfig(r=2, target_modules=["ln_1"]), r"matches 2 module\(s\) that lora cannot adapt: "
                                                       r"transformer\.h\.0\.ln_1 \(LayerNorm\)"),
    (lambda: LoraConfig(r=2, target_modules=["c_attn", "ln_f"]), "cannot adapt: transformer.ln_f"),
    (lambda: LorettaAdpConfig(bottleneck_size=4, tensor_rank=2, target_modules=["wte", "c_fc"]),
     r"loretta_adp cannot adapt: transformer\.wte \(Embedding\)"),
    (lambda: LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=False),
     "fan_in_fan_out=False does not fit 'transformer.h.0.attn.c_attn', a conv1d layer"),
])
def test_config_that_does_not_fit_the_model_is_refused(config, message):
    base = tiny_gpt2()
    before = fingerprint(base)
    with pytest.raises(ValueError, match=message):
        get_peft_model(base, config())
    assert_unchanged(before, base)


def test_fan_in_fan_out_on_linear_is_refused():
    with pytest.raises(ValueError, match="fan_in_fan_out=True does not fit .*a linear layer"):
        get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"], fan_in_fan_out=True))


# -- loaders that verify ---------------------------------------------------------------------------------------

def _saved(tmp_path, config=None, build=tiny_bert):
    model = get_peft_model(build(), config or LoraConfig(r=4, target_modules=["query", "value"]))
    randomize_adapters(model)
    model.save_pretrained(tmp_path)
    return model


def _rewrite_weights(folder, change):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    path = str(folder / "adapter_model.safetensors")
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata=metadata)


@pytest.mark.parametrize("change,message", [
    (lambda t: t.pop(sorted(t)[0]), r"lacks 1 of adapter 'default''s weights, e\.g\. bert\.encoder"),
    (lambda t: t.__setitem__(sorted(t)[0], torch.full_like(t[sorted(t)[0]], float("nan"))), "non-finite value"),
    (lambda t: t.__setitem__(sorted(t)[0], torch.full_like(t[sorted(t)[0]], float("inf"))), "non-finite value"),
    (lambda t: t.__setitem__(sorted(t)[0], torch.ones_like(t[sorted(t)[0]], dtype=torch.int64)),
     r"has dtype torch\.int64; adapter weights are floating point"),
    (lambda t: t.__setitem__(sorted(t)[0], torch.zeros(3, 3)), r"has shape \(3, 3\), but the model's is \(4, 32\)"),
    (lambda t: t.__setitem__("bert.pooler.dense.weight", torch.zeros(3)),
     r"holds 1 tensor\(s\) that no module of this model takes, e\.g\. bert\.pooler\.dense\.weight"),
])
def test_corrupt_adapter_folders_are_refused(tmp_path, change, message):
    _saved(tmp_path)
    _rewrite_weights(tmp_path, change)
    base = tiny_bert()
    before = fingerprint(base)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors'.*" + message):  # the file, then the culprit
        PeftModel.from_pretrained(base, str(tmp_path))
    assert_unchanged(before, base)


def test_fp16_overflow_on_load_is_refused(tmp_path):
    _saved(tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.__setitem__(sorted(t)[0], t[sorted(t)[0]] * 1e36))
    model = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query", "value"]))
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.half()  # fp16 adapters: the file's 3e35 is inf there
    before = fingerprint(model)
    with pytest.raises(ValueError, match="non-finite value.*in torch.float16"):
        model.load_adapter_weights(str(tmp_path))
    assert_unchanged(before, model)


def test_config_that_no_longer_matches_the_weights_is_refused(tmp_path):
    """ctcm and dtsm have the same tensors; the metadata saved beside them tells them apart."""
    import json
    _saved(tmp_path, MTLoraConfig(r=4, structure="ctcm", target_modules=["query"]))
    config_path = tmp_path / "adapter_config.json"
    data = json.loads(config_path.read_text())
    data["structure"] = "dtsm"
    config_path.write_text(json.dumps(data))
    base = tiny_bert()
    before = fingerprint(base)
    with pytest.raises(ValueError, match="structure: weights saved with 'ctcm', config has 'dtsm'"):
        PeftModel.from_pretrained(base, str(tmp_path))
    assert_unchanged(before, base)
    data["structure"], data["lora_alpha"] = "ctcm", 99
    config_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="lora_alpha: weights saved with 8, config has 99"):
        PeftModel.from_pretrained(tiny_bert(), str(tmp_path))


def test_loretta_folder_with_empty_or_partial_weights_is_refused(tmp_path):
    import json
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "tensor_rank": 2, "target_modules": ["query"],
         "task_type": "SEQ_CLS"}))
    torch.save({}, tmp_path / "adapter_model.bin")
    base = tiny_bert()
    before = fingerprint(base)
    with pytest.raises(ValueError, match=r"adapter_model\.bin' holds no tensors"):
        from_loretta(base, str(tmp_path))
    torch.save({"base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.layer.tensor.factors.0":
                torch.zeros(1, 4, 2)}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model\.bin' lacks \d+ adapter tensor"):
        from_loretta(base, str(tmp_path))
    torch.save({"base_model.model.bert.whatever": torch.zeros(2)}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model\.bin': unrecognised key 'base_model\.model\.bert\.whatever'"):
        from_loretta(base, str(tmp_path))
    assert_unchanged(before, base)
    # a causal-LM adapter on a classifier: the task type does not fit the model (PEFT: an AttributeError)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "task_type": "CAUSAL_LM"}))
    with pytest.raises(ValueError, match=r"task_type is CAUSAL_LM, but the model \(BertForSequenceClassification\)"):
        from_loretta(base, str(tmp_path))
    assert_unchanged(before, base)


def test_trained_norm_copies_are_fp32_masters_on_a_bf16_base():
    from structlora import LorettaRepConfig
    base = tiny_llama().to(torch.bfloat16)
    reference = outputs(copy.deepcopy(base), "logits")
    model = get_peft_model(base, LorettaRepConfig(r=4, tensor_rank=2))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("norm" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    logits = outputs(model, "logits")
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, reference)  # same function at init
    norms = {n: p.detach().clone() for n, p in trainable.items() if "norm" in n}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-4, weight_decay=0.0)
    model(**inputs()).logits.float().pow(2).mean().backward()
    optimizer.step()
    assert all(not torch.equal(trainable[n].detach(), before) for n, before in norms.items())


def _trainable_names(model: torch.nn.Module) -> list[str]:
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


@pytest.mark.parametrize("targets,saved,left_out", [
    (["dense"], ["pooler"], ["bert.pooler.dense"]),  # a suffix that also names a module inside modules_to_save
    (["query", "value"], ["query"], ["bert.encoder.layer.0.attention.self.query",
                                     "bert.encoder.layer.1.attention.self.query"]),  # the same module, both ways
])
def test_a_module_trained_in_full_is_not_also_adapted(targets, saved, left_out, tmp_path):
    """PEFT's rule: a module in modules_to_save (or inside one) is trained in full, not adapted. Before, it was
    both: LoRA factors inside the trained copy, and trainable factors on the frozen original that no forward used."""
    with pytest.warns(TargetWarning, match=f"{len(left_out)} module\\(s\\) trained in full \\(modules_to_save\\): "
                                           f"{left_out[0]}") as recorded:
        model = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=targets, modules_to_save=saved,
                                                       task_type="SEQ_CLS"))
    assert recorded[0].filename == __file__  # it points at the caller's line, not into structlora
    adapted_names = [name for name, _ in adapted_layers(model)]
    assert adapted_names and not set(adapted_names) & set(left_out)
    assert not [n for n in _trainable_names(model) if "lora_" in n and any(m in n for m in left_out)]
    # Every trainable tensor gets a gradient: none sits on a module that the forward no longer uses.
    randomize_adapters(model)  # the default start (B = 0) gives A no gradient
    model.train()
    model(**inputs(), labels=torch.tensor([0, 1])).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    peft = pytest.importorskip("peft")
    # (copies: PEFT appends the head to the modules_to_save list it is given)
    reference = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=list(targets),
                                                                 modules_to_save=list(saved), task_type="SEQ_CLS"))
    assert model.get_nb_trainable_parameters()[0] == reference.get_nb_trainable_parameters()[0]
    # The saved adapter loads back to the same outputs (loading applies the same rule).
    model.eval()
    expected = outputs(model, "logits")
    model.save_pretrained(tmp_path)
    with pytest.warns(TargetWarning):
        loaded = PeftModel.from_pretrained(tiny_bert(), str(tmp_path))
    assert torch.equal(outputs(loaded, "logits"), expected)


def test_targets_that_are_all_trained_in_full_are_refused():
    base = tiny_bert()
    before = fingerprint(base)
    with pytest.raises(ValueError, match=r"matches only modules trained in full \(the classification head\): "
                                         r"classifier\. .*target other modules$"):
        get_peft_model(base, LoraConfig(r=2, target_modules=["classifier"], task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match=r"\(modules_to_save\): bert.pooler.dense\. .*leave these out of "
                                         r"modules_to_save"):
        get_peft_model(base, LorettaAdpConfig(bottleneck_size=4, tensor_rank=2, target_modules=["pooler.dense"],
                                              modules_to_save=["pooler"]))
    assert_unchanged(before, base)
