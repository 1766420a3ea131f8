"""structlora.PeftModel is a peft.PeftModel (structlora.peft_model): structlora.get_peft_model and
structlora.PeftModel.from_pretrained return PEFT's task classes with structlora's additions — adapters of several
structlora methods in one model, the adapter state machine checked before each transition, all-or-nothing saving,
and folders of structlora's earlier model class converted on load."""

from __future__ import annotations

import os

import pytest
import torch

peft = pytest.importorskip("peft")

import structlora  # noqa: E402
from structlora.adapter_state import AdapterStateError  # noqa: E402
from structlora.model import PeftModel as EarlierPeftModel  # noqa: E402
from test_peft_tuner import INPUT, METHODS, MODELS, config_for, outputs, perturbed  # noqa: E402

MIXED = ("lora", "mtlora-icfm", "loretta_rep", "loretta_adp")


def mixed_model(model_name: str = "gpt2"):
    """One model holding an adapter of each of MIXED (named after the method), each perturbed with its own seed."""
    model = structlora.get_peft_model(MODELS[model_name](), config_for(MIXED[0], model_name), MIXED[0])
    for method in MIXED[1:]:
        model.add_adapter(method, config_for(method, model_name))
    for seed, method in enumerate(MIXED):
        model.set_adapter(method)
        perturbed(model, seed)
    return model


def alone(folder) -> torch.Tensor:
    """The outputs of one saved adapter in a model of its own, loaded by PEFT's own class."""
    return outputs(peft.PeftModel.from_pretrained(MODELS["gpt2"](), str(folder)))


@pytest.mark.parametrize("model_name", ["gpt2", "bert"])
def test_get_peft_model_returns_peft_task_classes(model_name):
    model = structlora.get_peft_model(MODELS[model_name](), config_for("mtlora-shim", model_name))
    task_class = peft.PeftModelForSequenceClassification if model_name == "bert" else peft.PeftModel
    assert isinstance(model, structlora.PeftModel) and isinstance(model, task_class)
    assert isinstance(model, peft.PeftModel)
    with pytest.raises(TypeError, match="peft.get_peft_model"):
        structlora.get_peft_model(MODELS[model_name](), peft.LoraConfig(r=2))


def test_adapters_of_several_methods_share_one_model_and_each_computes_what_it_does_alone(tmp_path):
    model = mixed_model()
    model.save_pretrained(str(tmp_path))
    folders = {method: tmp_path / method for method in MIXED}  # PEFT's layout: a sub-folder per non-default name
    base = outputs(MODELS["gpt2"]())
    for method in MIXED:
        model.set_adapter(method)
        got = outputs(model)
        torch.testing.assert_close(got, alone(folders[method]), rtol=0, atol=0)
        assert (got - base).abs().max() > 1e-3
    # one batch, one adapter per row
    routed = model(input_ids=INPUT, adapter_names=["loretta_adp", "__base__"]).logits
    torch.testing.assert_close(routed[0], alone(folders["loretta_adp"])[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(routed[1], base[1], rtol=0, atol=1e-6)
    # loaded back into one model: the same four adapters
    loaded = structlora.PeftModel.from_pretrained(MODELS["gpt2"](), str(folders[MIXED[0]]), adapter_name=MIXED[0])
    for method in MIXED[1:]:
        loaded.load_adapter(str(folders[method]), method)
    for method in MIXED:
        model.set_adapter(method), loaded.set_adapter(method)
        torch.testing.assert_close(outputs(loaded), outputs(model), rtol=0, atol=0)


def test_peft_loads_what_structlora_saves_and_structlora_loads_what_peft_saves(tmp_path):
    model = perturbed(structlora.get_peft_model(MODELS["llama"](), config_for("mtlora-dtsm", "llama")))
    expected = outputs(model)
    model.save_pretrained(str(tmp_path / "ours"))
    torch.testing.assert_close(outputs(peft.PeftModel.from_pretrained(MODELS["llama"](), str(tmp_path / "ours"))),
                               expected, rtol=0, atol=0)
    theirs = perturbed(peft.get_peft_model(MODELS["llama"](), config_for("loretta_rep", "llama")))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    loaded = structlora.PeftModel.from_pretrained(MODELS["llama"](), str(tmp_path / "theirs"))
    assert isinstance(loaded, structlora.PeftModel)
    torch.testing.assert_close(outputs(loaded), outputs(theirs), rtol=0, atol=0)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_transitions_the_state_machine_refuses_change_nothing():
    model = mixed_model()
    model.set_adapter("lora")
    model.merge_adapter()
    before, merged_outputs = _weights(model), outputs(model)
    refusals = [
        (lambda: model.set_adapter("mtlora-icfm"), "merged into the base weights, so switching would apply both"),
        (lambda: model.disable_adapter().__enter__(), "merged into the base weights, which cannot be disabled"),
        (lambda: model.delete_adapter("lora"), "it is merged into the base weights"),
        (lambda: model.add_adapter("new", config_for("lora", "gpt2")), "merged into the base weights"),
    ]
    for call, message in refusals:
        with pytest.raises(AdapterStateError, match=message):
            call()
        assert model.adapter_state.merged == ["lora"] and model.active_adapter == "lora"
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        torch.testing.assert_close(outputs(model), merged_outputs, rtol=0, atol=0)
    model.unmerge_adapter()
    with model.disable_adapter():
        with model.disable_adapter():  # blocks nest
            assert model.adapter_state.disabled_depth == 2
        torch.testing.assert_close(outputs(model), outputs(MODELS["gpt2"]()), rtol=0, atol=1e-6)
        with pytest.raises(AdapterStateError, match="inside a disable_adapter"):
            model.merge_adapter()
    assert not model.adapter_state.disabled
    with pytest.raises(AdapterStateError, match="delete every adapter"):
        model.delete_adapter(list(MIXED))
    with pytest.raises(ValueError, match="reserved"):
        model.add_adapter("__base__", config_for("lora", "gpt2"))
    with pytest.raises(ValueError, match="invalid adapter_name"):
        model.add_adapter("a.b", config_for("lora", "gpt2"))
    assert list(model.peft_config) == list(MIXED)


def test_a_model_is_spent_after_merge_and_unload(tmp_path):
    model = perturbed(structlora.get_peft_model(MODELS["gpt2"](), config_for("mtlora-shim", "gpt2")))
    expected = outputs(model)
    merged = model.merge_and_unload()
    torch.testing.assert_close(outputs(merged), expected, rtol=0, atol=1e-5)
    for call in (lambda: model.save_pretrained(str(tmp_path)), lambda: model.merge_adapter(),
                 lambda: model.add_adapter("b", config_for("lora", "gpt2"))):
        with pytest.raises(AdapterStateError, match="unloaded by merge_and_unload"):
            call()
    assert os.listdir(tmp_path) == []


def test_saving_is_all_or_nothing(tmp_path, monkeypatch):
    model = perturbed(structlora.get_peft_model(MODELS["gpt2"](), config_for("lora", "gpt2")))
    model.save_pretrained(str(tmp_path))
    first = outputs(model)
    perturbed(model, seed=1)
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the weights are renamed into place, then the config rename is "killed"
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(str(tmp_path))
    monkeypatch.setattr(os, "replace", real_replace)
    # the new weights are in place beside the old config (same structure): the folder loads, as the new adapter
    loaded = structlora.PeftModel.from_pretrained(MODELS["gpt2"](), str(tmp_path))
    torch.testing.assert_close(outputs(loaded), outputs(model), rtol=0, atol=0)
    assert not torch.equal(outputs(loaded), first)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".saving-")) == []
    # non-finite weights: refused before anything is written
    stamp = os.stat(tmp_path / "adapter_model.safetensors").st_mtime_ns
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        model.save_pretrained(str(tmp_path))
    assert os.stat(tmp_path / "adapter_model.safetensors").st_mtime_ns == stamp


@pytest.mark.parametrize("method", ["mtlora-ctcm", "loretta_adp"])
def test_folders_of_the_earlier_model_class_are_converted_on_load(method, tmp_path):
    earlier = perturbed(EarlierPeftModel(MODELS["bert"](), config_for(method, "bert")))
    earlier.save_pretrained(str(tmp_path))
    expected = outputs(EarlierPeftModel.from_pretrained(MODELS["bert"](), str(tmp_path)))
    files = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    with pytest.warns(UserWarning, match="converted on load"):
        loaded = structlora.PeftModel.from_pretrained(MODELS["bert"](), str(tmp_path))
    assert isinstance(loaded, peft.PeftModelForSequenceClassification)
    torch.testing.assert_close(outputs(loaded), expected, rtol=0, atol=0)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == files  # left as it was


def test_a_failed_load_leaves_the_base_model_as_it_was(tmp_path):
    perturbed(structlora.get_peft_model(MODELS["gpt2"](), config_for("mtlora-shim", "gpt2"))).save_pretrained(
        str(tmp_path))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    base = MODELS["gpt2"]()
    modules_before = [(n, type(m)) for n, m in base.named_modules()]
    with pytest.raises(ValueError):
        structlora.PeftModel.from_pretrained(base, str(tmp_path))
    assert [(n, type(m)) for n, m in base.named_modules()] == modules_before
