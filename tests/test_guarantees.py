"""Guarantees that hold whichever entry point reaches them: unmerge restores the base weights that were merged
into (whatever was written to the adapter meanwhile); merge, unmerge and weight loading are all-or-nothing, also
for an interrupt or out-of-memory error in the middle; saving over an adapter never leaves a folder that loads as
something else."""

from __future__ import annotations

import copy

import pytest
import torch

import peft
import structlora.atomic
from structlora import LoraConfig, MTLoraConfig, PeftModel, get_peft_model
from structlora.layers import LowRankLayer
from structlora.model import adapted_layers
from structlora.peft_tuner import StructloraTuner
from test_core import inputs, outputs, randomize_adapters, tiny_bert, tiny_gpt2
from test_reliability import assert_unchanged, fingerprint


# One fp32 ulp of the merged weights here (|W| + |ΔW| < 2): what a merge → unmerge round trip may move a weight.
ROUND_TRIP_ATOL = 2.0 ** -23


def _adapted(config=None, wrap=get_peft_model) -> torch.nn.Module:
    """A tiny BERT with a non-trivial adapter; `wrap=peft.get_peft_model` gives the PEFT path (StructloraTuner)."""
    model = wrap(tiny_bert(), config or MTLoraConfig(r=4, structure="ctcm", target_modules=["query", "value", "dense"]))
    randomize_adapters(model)
    return model.eval()


def _peft_get_peft_model(model, config):
    import peft

    return peft.get_peft_model(model, config)


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {name: layer.base_layer.weight.detach().clone() for name, layer in adapted_layers(model)}


def _round_trip_weights(model) -> dict[str, torch.Tensor]:
    """The base weights after merge_adapter → unmerge_adapter with nothing written in between (on a copy)."""
    reference = copy.deepcopy(model)
    reference.merge_adapter()
    reference.unmerge_adapter()
    return _base_weights(reference)


def _write_by_load_state_dict(model) -> None:
    state = {k: v + 0.5 for k, v in model.state_dict().items() if ".adapters.default." in k}
    model.load_state_dict(state, strict=False)


def _write_by_optimizer_step(model) -> None:
    parameters = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(7)
    for parameter in parameters:
        parameter.grad = torch.randn(parameter.shape, generator=generator)
    torch.optim.SGD(parameters, lr=0.5).step()


def _write_by_set_data(model) -> None:
    for layer_name, layer in adapted_layers(model):
        for parameter in layer.adapters["default"].parameters():
            parameter.data = parameter.data * 1.5


@pytest.mark.parametrize("wrap", [get_peft_model, _peft_get_peft_model], ids=["structlora", "peft"])
@pytest.mark.parametrize("write", [_write_by_load_state_dict, _write_by_optimizer_step, _write_by_set_data],
                         ids=["load_state_dict", "optimizer_step", "param.data"])
def test_unmerge_restores_the_base_after_writes_to_a_merged_adapter(write, wrap):
    model = _adapted(wrap=wrap)
    before, round_trip = _base_weights(model), _round_trip_weights(model)
    model.merge_adapter()
    write(model)
    model.unmerge_adapter()
    after = _base_weights(model)
    for name, weight in before.items():
        # Bit-equal to a merge/unmerge round trip with no write in between: the ΔW that was added is the one
        # subtracted. That round trip rounds W + ΔW in fp32, so against the weights before the merge it is equal to
        # within half an ulp of |W| + |ΔW| (< 2 here: 2**-24 ≈ 6e-8; measured 5.8e-8), checked with one ulp.
        assert torch.equal(after[name], round_trip[name]), name
        torch.testing.assert_close(after[name], weight, rtol=0, atol=ROUND_TRIP_ATOL, msg=name)
    # What was written is kept: the adapter path now computes the base plus the new ΔW.
    for name, layer in adapted_layers(model):
        x = torch.randn(2, 3, layer.in_features)
        expected = layer.base_layer(x) + x @ layer.get_delta_weight().t()
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


class _Interrupt(BaseException):
    """Stands for KeyboardInterrupt / an out-of-memory error raised inside an operation."""


def _fail_at_call(monkeypatch, owner, attribute: str, call: int) -> None:
    """Make the `call`-th call (1-based) of owner.attribute raise _Interrupt; the others run as before."""
    original = getattr(owner, attribute)
    count = {"n": 0}

    def failing(*args, **kwargs):
        count["n"] += 1
        if count["n"] == call:
            raise _Interrupt(f"injected at call {call}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, failing)


def test_merge_interrupted_at_the_second_layer_leaves_nothing_merged(monkeypatch):
    model = _adapted()
    before, round_trip, expected = fingerprint(model), _round_trip_weights(model), outputs(model, "logits")
    _fail_at_call(monkeypatch, LowRankLayer, "merge_checked", 2)  # the write of layer 2
    with pytest.raises(_Interrupt):
        model.merge_adapter()
    monkeypatch.undo()
    assert all(not layer.merged_adapters for _, layer in adapted_layers(model))
    assert not model.adapter_state.merged
    # Layer 1 was merged and taken out again: its weight is the round trip's; everything else is bit-equal.
    first = next(name for name, _ in adapted_layers(model))
    weights = _base_weights(model)
    assert torch.equal(weights[first], round_trip[first])
    key = f"{first}.base_layer.weight"
    before["tensors"][key] = weights[first]
    assert_unchanged(before, model)
    torch.testing.assert_close(outputs(model, "logits"), expected, rtol=0, atol=1e-5)
    model.merge_adapter()  # and the model still merges
    assert model.adapter_state.merged == ["default"]


def test_unmerge_interrupted_at_the_second_layer_leaves_everything_merged(monkeypatch):
    model = _adapted()
    expected = outputs(model, "logits")
    model.merge_adapter()
    merged = _base_weights(model)
    _fail_at_call(monkeypatch, LowRankLayer, "unmerge", 2)
    with pytest.raises(_Interrupt):
        model.unmerge_adapter()
    monkeypatch.undo()
    assert all(layer.merged_adapters == ["default"] for _, layer in adapted_layers(model))
    assert model.adapter_state.merged == ["default"]
    for name, weight in _base_weights(model).items():  # layer 1 merged again: one more rounding at most
        torch.testing.assert_close(weight, merged[name], rtol=0, atol=ROUND_TRIP_ATOL, msg=name)
    torch.testing.assert_close(outputs(model, "logits"), expected, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    assert not model.adapter_state.merged


def test_load_interrupted_in_the_middle_leaves_the_old_weights(monkeypatch, tmp_path):
    model = _adapted()
    other = _adapted(MTLoraConfig(r=4, structure="ctcm", target_modules=["query", "value", "dense"]))
    randomize_adapters(other, seed=11)
    other.save_pretrained(str(tmp_path))
    before, expected = fingerprint(model), outputs(model, "logits")
    original, calls = torch.Tensor.copy_, []

    def failing_copy(target, *args, **kwargs):  # torch's load_state_dict copies tensor by tensor
        calls.append(1)
        if len(calls) == 3:
            written = fingerprint(model)["tensors"]
            assert any(not torch.equal(written[k], v) for k, v in before["tensors"].items())  # some are new
            raise _Interrupt("injected at the 3rd tensor")
        return original(target, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", failing_copy)
    with pytest.raises(_Interrupt):
        model.load_adapter_weights(str(tmp_path))
    monkeypatch.undo()
    assert_unchanged(before, model)
    assert torch.equal(outputs(model, "logits"), expected)
    model.load_adapter_weights(str(tmp_path))  # and the load itself works
    assert torch.equal(outputs(model, "logits"), outputs(other, "logits"))


# -- saving over an adapter --------------------------------------------------------------------------------------

def _saved_pair(tmp_path, old_config, new_config):
    old, new = _adapted(old_config), _adapted(new_config)
    randomize_adapters(new, seed=5)
    folder = str(tmp_path / "adapter")
    old.save_pretrained(folder)
    files = {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()}
    return old, new, folder, files


def _loads_as(folder: str, model) -> None:
    loaded = PeftModel.from_pretrained(tiny_bert(), folder).eval()
    assert torch.equal(outputs(loaded, "logits"), outputs(model, "logits"))


def test_a_save_that_fails_mid_write_leaves_the_old_folder(tmp_path, monkeypatch):
    old, new, folder, files = _saved_pair(tmp_path, LoraConfig(r=4, target_modules=["query"]),
                                          LoraConfig(r=8, target_modules=["query", "value"]))

    def partial_save_file(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"\x00" * 100)  # a few bytes of the file, then the process dies
        raise _Interrupt("killed while writing")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", partial_save_file)  # PEFT's write of the weights
    with pytest.raises(_Interrupt):
        new.save_pretrained(folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()} == files  # no staging left either
    _loads_as(folder, old)
    new.save_pretrained(folder)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted(files)
    _loads_as(folder, new)


@pytest.mark.parametrize("new_config", [LoraConfig(r=4, lora_alpha=16, target_modules=["query"]),
                                        LoraConfig(r=4, target_modules=["query"])], ids=["other_alpha", "same"])
def test_a_save_killed_between_the_two_renames_never_loads_as_something_else(tmp_path, monkeypatch, new_config):
    old, new, folder, files = _saved_pair(tmp_path, LoraConfig(r=4, target_modules=["query"]), new_config)
    _fail_at_call(monkeypatch, structlora.atomic, "_move", 2)  # the weights are in place, the config is not
    with pytest.raises(_Interrupt):
        new.save_pretrained(folder)
    monkeypatch.undo()
    assert (tmp_path / "adapter" / "adapter_config.json").read_bytes() == files["adapter_config.json"]
    if new_config.lora_alpha != old.peft_config["default"].lora_alpha:
        with pytest.raises(ValueError, match="saved from a different adapter than its config describes"):
            PeftModel.from_pretrained(tiny_bert(), folder)
    else:  # the same structure: the old config describes the new weights exactly
        _loads_as(folder, new)


# -- adapter_names ----------------------------------------------------------------------------------------------

def _two_adapters():
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"]), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=4, target_modules=["c_attn"]))
    randomize_adapters(model)
    return model.eval()


def test_adapter_names_must_give_one_name_per_row():
    model = _two_adapters()
    ids = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(0))
    expected = outputs(model, "logits")
    for call in (lambda: model(input_ids=ids, adapter_names=["a", "b"]),
                 lambda: model.generate(input_ids=ids, adapter_names=["a", "b"], max_new_tokens=2, do_sample=False)):
        with pytest.raises(ValueError, match="2 entries, but the batch has 4 rows: give exactly one adapter name"):
            call()
    assert torch.equal(outputs(model, "logits"), expected) and not model.adapter_state.disabled
    # Inside generate a multiple is legitimate: each row's beams follow it.
    with torch.no_grad():
        mixed = model.generate(input_ids=ids[:2], adapter_names=["a", "b"], max_new_tokens=3, do_sample=False,
                               num_beams=2, pad_token_id=0)
        model.set_adapter("b")
        alone = model.generate(input_ids=ids[1:2], max_new_tokens=3, do_sample=False, num_beams=2, pad_token_id=0)
    assert torch.equal(mixed[1:2], alone)


def test_base_is_a_reserved_adapter_name():
    model = _two_adapters()
    before = fingerprint(model)
    with pytest.raises(ValueError, match="'__base__': reserved.*base model"):
        model.add_adapter("__base__", LoraConfig(r=4, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="reserved"):
        get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"]), adapter_name="__base__")
    assert_unchanged(before, model)


def test_merge_and_unload_interrupted_while_unwrapping_leaves_the_adapter_model(monkeypatch):
    model = _adapted()
    before, round_trip, expected = fingerprint(model), _round_trip_weights(model), outputs(model, "logits")
    _fail_at_call(monkeypatch, StructloraTuner, "_replace_module", 2)  # PEFT's unwrapping, module by module
    with pytest.raises(_Interrupt):
        model.merge_and_unload()
    monkeypatch.undo()
    for name, weight in round_trip.items():  # merged and unmerged again: the round trip's weights
        before["tensors"][f"{name}.base_layer.weight"] = weight
    assert_unchanged(before, model)
    torch.testing.assert_close(outputs(model, "logits"), expected, rtol=0, atol=1e-5)
    plain = model.merge_and_unload()
    torch.testing.assert_close(outputs(plain, "logits"), expected, rtol=0, atol=1e-5)


# -- PEFT's and transformers' method names ----------------------------------------------------------------------

def test_delete_adapter_as_peft():
    model = _two_adapters()
    model.add_adapter("c", MTLoraConfig(r=2, target_modules=["c_fc"]))
    randomize_adapters(model, seed=4)
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        b_alone = _alone_output(model, "b", ids)
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    with pytest.warns(UserWarning, match="Adapter a was active which is now deleted. Setting active adapter to b"):
        model.delete_adapter("a")
    assert model.active_adapter == "b" and list(model.peft_config) == ["b", "c"]
    assert not any(".adapters.a." in name for name, _ in model.named_parameters())
    assert all(".adapters.b." in n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, b_alone)
    model.delete_adapter(["c"])  # transformers' list form; c_fc layers keep their wrapper and compute the base
    assert list(model.peft_config) == ["b"] and model.adapter_state.names == ["b"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, b_alone)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, base)
    before = fingerprint(model)
    with pytest.raises(ValueError, match="only adapter"):
        model.delete_adapter("b")
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        model.delete_adapter("zz")
    model.add_adapter("d", LoraConfig(r=2, target_modules=["c_attn"]))
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged into the base weights.*unmerge_adapter"):
        model.delete_adapter("b")
    model.unmerge_adapter()
    model.delete_adapter("d")
    assert_unchanged(before, model)


def _alone_output(model, name, ids):
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        return model(input_ids=ids).logits
    finally:
        model.set_adapter(previous)


def test_disable_and_enable_adapters_as_transformers_and_peft():
    model = _two_adapters()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        assert not torch.allclose(adapted, base)
        for disable, enable in ((model.disable_adapters, model.enable_adapters),
                                (model.disable_adapter_layers, model.enable_adapter_layers)):
            disable()
            disable()  # harmless twice
            assert torch.equal(model(input_ids=ids).logits, base) and model.adapter_state.disabled
            with model.disable_adapter():  # a block inside still nests
                assert torch.equal(model(input_ids=ids).logits, base)
                with pytest.raises(ValueError, match="enable_adapters\\(\\) inside a disable_adapter\\(\\) block"):
                    model.enable_adapters()
            assert torch.equal(model(input_ids=ids).logits, base)
            with pytest.raises(ValueError, match=r"merge_adapter while disable_adapters\(\) is in effect.*enable_"):
                model.merge_adapter()
            enable()
            assert torch.equal(model(input_ids=ids).logits, adapted) and not model.adapter_state.disabled
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged into the base weights.*unmerge_adapter"):
        model.disable_adapters()
    model.unmerge_adapter()


def test_get_adapter_state_dict_and_peft_names_not_provided():
    model = _two_adapters()
    state = model.get_adapter_state_dict("b")
    assert state.keys() == model.adapter_state_dict("b").keys()
    assert all(torch.equal(state[k], v) for k, v in model.adapter_state_dict("b").items())
    assert model.get_adapter_state_dict().keys() == model.adapter_state_dict("a").keys()
    with pytest.raises(TypeError, match="state_dict=.*not supported"):
        model.get_adapter_state_dict("a", state_dict=model.state_dict())
    for name, hint in (("enable_peft_hotswap", "hotswap_adapter"), ("add_weighted_adapter", "adapter_names")):
        with pytest.raises(AttributeError, match=f"has no {name}\\(\\): .*{hint}"):
            getattr(model, name)
    # structlora.PeftModel is a peft.PeftModel: PEFT's unload() and get_model_status() are provided, as PEFT's.
    status = model.get_model_status()
    assert (status.available_adapters, status.active_adapters, status.merged_adapters) == (["a", "b"], ["a"], [])
    assert status.requires_grad == {"a": True, "b": False} and status.enabled
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
    plain = copy.deepcopy(model).unload()
    assert not any(isinstance(m, LowRankLayer) for m in plain.modules())
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, base)


def test_an_export_that_fails_mid_write_leaves_the_old_peft_folder(tmp_path, monkeypatch):
    import structlora.interop
    old, new, _, _ = _saved_pair(tmp_path, LoraConfig(r=4, target_modules=["query"]),
                                 LoraConfig(r=8, target_modules=["query", "value"]))
    folder = tmp_path / "peft"
    structlora.interop.export_to_peft(old, str(folder))
    files = {p.name: p.read_bytes() for p in folder.iterdir()}

    def partial_save_file(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"\x00" * 100)
        raise _Interrupt("killed while writing")

    monkeypatch.setattr(structlora.interop, "save_file", partial_save_file)
    with pytest.raises(_Interrupt):
        structlora.interop.export_to_peft(new, str(folder))
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
