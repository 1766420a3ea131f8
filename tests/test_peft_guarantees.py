"""The guarantees of tests/test_guarantees.py on the PEFT path (`peft.get_peft_model(model, structlora config)`),
held by StructloraTuner and its layers whichever PEFT entry point reaches them: merge, unmerge and unloading are
all-or-nothing (an interrupt at the 2nd layer included); `__base__` is not an adapter name; loading a corrupt or
misshapen checkpoint changes nothing; a refused `PeftModel.from_pretrained` / `load_adapter` under a new name leaves the
model as it was before the call. (Unmerge after writes to a merged adapter: tests/test_guarantees.py, [peft].)"""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

import structlora  # noqa: E402
from structlora.layers import LowRankLayer  # noqa: E402
from structlora.peft_layers import StructloraLowRankLayer  # noqa: E402
from structlora.peft_tuner import StructloraTuner  # noqa: E402
from structlora.model import adapted_layers  # noqa: E402
from test_guarantees import (ROUND_TRIP_ATOL, _base_weights, _fail_at_call, _Interrupt,  # noqa: E402
                             _round_trip_weights)
from test_peft_tuner import outputs, perturbed, tiny_gpt2  # noqa: E402

TARGETS = ["c_attn", "c_fc"]  # 4 layers of the 2-block GPT-2: Conv1D, merged in (in, out) layout


def _peft_adapted(seed: int = 0, adapter_name: str = "default"):
    config = structlora.MTLoraConfig(r=2, structure="ctcm", target_modules=TARGETS)
    return perturbed(peft.get_peft_model(tiny_gpt2(), config, adapter_name=adapter_name), seed).eval()


def _layers(model) -> list[tuple[str, StructloraLowRankLayer]]:
    return list(adapted_layers(model))  # every layer here is low-rank (an MTLoRA adapter on GPT-2)


def _weight_key(layer_name: str) -> str:
    """The state-dict key of a layer's base weight (adapted_layers names layers relative to the base model)."""
    return f"base_model.model.{layer_name}.base_layer.weight"


def _snapshot(model) -> dict:
    """Every tensor, the module tree, requires_grad, the adapters and the inner model's peft_config."""
    return {"tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
            "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
            "adapters": sorted(model.peft_config) if hasattr(model, "peft_config") else None,
            "merged": [list(layer.merged_adapters) for _, layer in _layers(model)],
            "inner_config": "peft_config" in getattr(getattr(model, "base_model", model), "model", model).__dict__}


def _assert_same(before: dict, model) -> None:
    after = _snapshot(model)
    assert {k: v for k, v in after.items() if k != "tensors"} == {k: v for k, v in before.items() if k != "tensors"}
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, tensor in before["tensors"].items():
        assert torch.equal(after["tensors"][key], tensor), f"{key} changed"


# -- merge / unmerge / merge_and_unload: all or nothing -----------------------------------------------------------

def test_peft_merge_interrupted_at_the_second_layer_leaves_nothing_merged(monkeypatch):
    model = _peft_adapted()
    before, round_trip, expected = _snapshot(model), _round_trip_weights(model), outputs(model)
    _fail_at_call(monkeypatch, LowRankLayer, "merge_checked", 2)  # the weight write of layer 2
    with pytest.raises(_Interrupt):
        model.merge_adapter()  # peft.PeftModel's own method
    monkeypatch.undo()
    assert all(not layer.merged_adapters for _, layer in _layers(model))
    # Layer 1 was merged and taken out again: its weight is the round trip's; everything else is bit-equal.
    first = _layers(model)[0][0]
    assert torch.equal(_base_weights(model)[first], round_trip[first])
    before["tensors"][_weight_key(first)] = round_trip[first]
    _assert_same(before, model)
    torch.testing.assert_close(outputs(model), expected, rtol=0, atol=1e-5)
    model.merge_adapter()  # and the model still merges
    assert all(layer.merged_adapters == ["default"] for _, layer in _layers(model))
    torch.testing.assert_close(outputs(model), expected, rtol=1e-5, atol=1e-5)


def test_peft_unmerge_interrupted_at_the_second_layer_leaves_everything_merged(monkeypatch):
    model = _peft_adapted()
    expected = outputs(model)
    model.merge_adapter()
    merged = _base_weights(model)
    _fail_at_call(monkeypatch, LowRankLayer, "unmerge", 2)
    with pytest.raises(_Interrupt):
        model.unmerge_adapter()
    monkeypatch.undo()
    assert all(layer.merged_adapters == ["default"] for _, layer in _layers(model))
    for name, weight in _base_weights(model).items():  # layer 1 merged again: one more rounding at most
        torch.testing.assert_close(weight, merged[name], rtol=0, atol=ROUND_TRIP_ATOL, msg=name)
    torch.testing.assert_close(outputs(model), expected, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    assert not any(layer.merged_adapters for _, layer in _layers(model))
    torch.testing.assert_close(outputs(model), expected, rtol=1e-5, atol=1e-5)


def test_peft_merge_of_two_adapters_interrupted_in_the_second_layer_leaves_nothing_merged(monkeypatch):
    model = _peft_adapted()
    model.add_adapter("b", structlora.MTLoraConfig(r=2, structure="shim", target_modules=TARGETS))
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".adapters.b." in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    before, expected = _snapshot(model), outputs(model)
    _fail_at_call(monkeypatch, LowRankLayer, "merge_checked", 3)  # layer 1 took a and b; layer 2's a fails
    with pytest.raises(_Interrupt):
        model.merge_adapter(adapter_names=["default", "b"])
    monkeypatch.undo()
    assert all(not layer.merged_adapters for _, layer in _layers(model))
    first = _layers(model)[0][0]
    for name, weight in _base_weights(model).items():  # layer 1: W + ΔWa + ΔWb − ΔWb − ΔWa, within two roundings
        if name == first:
            torch.testing.assert_close(weight, before["tensors"][_weight_key(name)], rtol=0,
                                       atol=2 * ROUND_TRIP_ATOL)
            before["tensors"][_weight_key(name)] = weight
    _assert_same(before, model)
    torch.testing.assert_close(outputs(model), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("operation, where", [("merge_and_unload", "merging"), ("merge_and_unload", "unwrapping"),
                                              ("unload", "unwrapping")])  # unload() merges nothing
def test_peft_merge_and_unload_interrupted_at_the_second_layer_leaves_the_adapter_model(monkeypatch, operation,
                                                                                       where):
    model = _peft_adapted()
    before, round_trip, expected = _snapshot(model), _round_trip_weights(model), outputs(model)
    if where == "merging":
        _fail_at_call(monkeypatch, LowRankLayer, "merge_checked", 2)
    else:
        _fail_at_call(monkeypatch, StructloraTuner, "_replace_module", 2)  # PEFT's unwrapping, layer by layer
    with pytest.raises(_Interrupt):
        getattr(model, operation)()
    monkeypatch.undo()
    if operation == "merge_and_unload":  # merged (all or some) and unmerged again: the round trip's weights
        for name, weight in _base_weights(model).items():
            assert torch.equal(weight, round_trip[name]) or (
                where == "merging" and name != _layers(model)[0][0]), name
            before["tensors"][_weight_key(name)] = weight
    _assert_same(before, model)
    torch.testing.assert_close(outputs(model), expected, rtol=0, atol=1e-5)
    plain = getattr(model, operation)()
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in plain.modules())
    if operation == "merge_and_unload":
        torch.testing.assert_close(outputs(plain), expected, rtol=1e-5, atol=1e-5)


# -- the reserved name -------------------------------------------------------------------------------------------

def test_peft_base_is_a_reserved_adapter_name(tmp_path):
    config = structlora.MTLoraConfig(r=2, structure="ctcm", target_modules=TARGETS)
    base = tiny_gpt2()
    untouched = _snapshot(base)
    with pytest.raises(ValueError, match="'__base__': reserved.*base model"):
        peft.get_peft_model(base, config, adapter_name="__base__")
    _assert_same(untouched, base)
    model = _peft_adapted()
    model.save_pretrained(str(tmp_path))
    before, expected = _snapshot(model), outputs(model)
    with pytest.raises(ValueError, match="'__base__': reserved"):
        model.add_adapter("__base__", structlora.MTLoraConfig(r=2, structure="ctcm", target_modules=TARGETS))
    with pytest.raises(ValueError, match="'__base__': reserved"):
        model.load_adapter(str(tmp_path), adapter_name="__base__")
    _assert_same(before, model)
    assert torch.equal(outputs(model), expected)


# -- loading a bad checkpoint ------------------------------------------------------------------------------------

def _damaged_folder(tmp_path, damage: str) -> str:
    from safetensors.torch import load_file, save_file

    _peft_adapted(seed=5).save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-40])
        return str(tmp_path)
    tensors = load_file(str(path))
    key = sorted(tensors)[-1]  # the last key: torch would have copied every other tensor before it
    if damage == "misshapen":
        tensors[key] = torch.zeros(*tensors[key].shape[:-1], tensors[key].shape[-1] + 1)
    else:
        tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(path))
    return str(tmp_path)


@pytest.mark.parametrize("damage", ["misshapen", "nan", "truncated"])
def test_peft_loading_a_damaged_checkpoint_changes_no_weight(tmp_path, damage):
    folder = _damaged_folder(tmp_path, damage)
    model = _peft_adapted()
    before, expected = _snapshot(model), outputs(model)
    with pytest.raises(Exception, match="shape|non-finite|[Ee]rror|deserializ|incomplete"):
        model.load_adapter(folder, adapter_name="default")  # reload into the existing adapter
    _assert_same(before, model)
    assert torch.equal(outputs(model), expected)
    with pytest.raises(Exception, match="shape|non-finite|[Ee]rror|deserializ|incomplete"):
        peft.PeftModel.from_pretrained(tiny_gpt2(), folder)
    if damage == "misshapen":
        with pytest.raises(ValueError, match=r"has shape \(.*\), but the model's is \(.*nothing was loaded"):
            model.load_adapter(folder, adapter_name="default")


# -- a failed PEFT load leaves the base model as it was ------------------------------------------------------------

def _refused_folder(tmp_path, kind: str) -> str:
    """An adapter folder that structlora's tuner refuses, for reasons found before (config) or after (weights) PEFT
    has injected the layers."""
    import json
    import os

    from safetensors.torch import load_file, save_file

    folder = tmp_path / kind
    _peft_adapted(seed=5).save_pretrained(str(folder))
    if kind == "other model type":
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_type": "llama"}))
        return str(folder)
    path = str(folder / "adapter_model.safetensors")
    if kind == "no weights file":
        os.remove(path)
        return str(folder)
    if kind == "truncated file":
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) - 40)
        return str(folder)
    tensors = load_file(path)
    key = sorted(tensors)[-1]
    if kind == "missing weights":
        del tensors[key]
    elif kind == "misshapen":
        tensors[key] = torch.zeros(*tensors[key].shape[:-1], tensors[key].shape[-1] + 1)
    else:
        tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, path)
    return str(folder)


REFUSALS = {"missing weights": "lacks 1 of adapter '.*''s weights", "misshapen": "has shape",
            "non-finite": "non-finite", "other model type": "made for a 'llama' model",
            "no weights file": "no adapter_model.safetensors", "truncated file": "does not read as a safetensors file"}


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_a_refused_peft_from_pretrained_leaves_the_base_as_it_was(kind, tmp_path):
    folder = _refused_folder(tmp_path, kind)
    base = tiny_gpt2()
    names, before, expected = [n for n, _ in base.named_modules()], _snapshot(base), outputs(base)
    with pytest.raises(ValueError, match=REFUSALS[kind]):
        peft.PeftModel.from_pretrained(base, folder)
    assert [n for n, _ in base.named_modules()] == names  # no structlora layer left in it
    _assert_same(before, base)
    assert torch.equal(outputs(base), expected)
    assert "peft_config" not in base.__dict__ and not base._forward_pre_hooks
    # The same base then takes a good adapter as if nothing had happened.
    good = tmp_path / "good"
    _peft_adapted(seed=5).save_pretrained(str(good))
    assert torch.equal(outputs(peft.PeftModel.from_pretrained(base, str(good))), outputs(_peft_adapted(seed=5)))


@pytest.mark.parametrize("kind", ["missing weights", "misshapen", "no weights file"])
def test_a_refused_load_adapter_under_a_new_name_removes_only_that_adapter(kind, tmp_path):
    folder = _refused_folder(tmp_path, kind)
    model = _peft_adapted()
    names, before, expected = [n for n, _ in model.named_modules()], _snapshot(model), outputs(model)
    with pytest.raises(ValueError, match=REFUSALS[kind]):
        model.load_adapter(folder, adapter_name="other")
    assert [n for n, _ in model.named_modules()] == names
    _assert_same(before, model)
    assert torch.equal(outputs(model), expected)


def test_an_adapter_the_user_had_is_kept_when_a_load_into_it_is_refused(tmp_path):
    """Only an injection made by the failing load call is undone: get_peft_model's adapter stays."""
    folder = _refused_folder(tmp_path, "missing weights")
    model = _peft_adapted()
    before, expected = _snapshot(model), outputs(model)
    with pytest.raises(ValueError, match="lacks"):
        model.load_adapter(folder, adapter_name="default")
    _assert_same(before, model)
    assert torch.equal(outputs(model), expected)


@pytest.mark.parametrize("entry", ["get_peft_model", "from_pretrained"])
def test_an_injection_interrupted_at_the_second_layer_leaves_the_base_as_it_was(entry, monkeypatch, tmp_path):
    _peft_adapted(seed=5).save_pretrained(str(tmp_path))
    base = tiny_gpt2()
    names, before, expected = [n for n, _ in base.named_modules()], _snapshot(base), outputs(base)
    _fail_at_call(monkeypatch, StructloraTuner, "_create_and_replace", 2)
    with pytest.raises(_Interrupt):
        if entry == "get_peft_model":
            peft.get_peft_model(base, structlora.MTLoraConfig(r=2, structure="ctcm", target_modules=TARGETS))
        else:
            peft.PeftModel.from_pretrained(base, str(tmp_path))
    monkeypatch.undo()
    assert [n for n, _ in base.named_modules()] == names
    _assert_same(before, base)
    assert torch.equal(outputs(base), expected)
    assert "peft_config" not in base.__dict__
