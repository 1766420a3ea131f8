"""PEFT's `init_lora_weights` (LoRA, MTLoRA, LoRETTA_rep) and `init_weights` (LoRETTA_adp, dense adapters): True keeps
the config's start (the output equals the base model's), False gives an adapter that changes the output from the
start (PEFT's meaning, which PEFT's own behaviour tests rely on). The field is validated, refused with an SVD start,
saved in adapter_config.json on both save paths, and folders saved without it still load."""

from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft")

import structlora  # noqa: E402
from test_peft_tuner import outputs, tiny_gpt2  # noqa: E402

# The PEFT field each method's config uses for it, and a config with it set.
METHODS = {
    "lora": ("init_lora_weights", lambda **kw: structlora.LoraConfig(r=2, lora_alpha=4, **kw)),
    "mtlora-reference": ("init_lora_weights", lambda **kw: structlora.MTLoraConfig(r=2, structure="ctcm", **kw)),
    "mtlora-identity": ("init_lora_weights", lambda **kw: structlora.MTLoraConfig(r=2, structure="icfm",
                                                                                   init="identity", **kw)),
    "loretta_rep": ("init_lora_weights", lambda **kw: structlora.LorettaRepConfig(r=2, tensor_rank=2, **kw)),
    "loretta_adp": ("init_weights", lambda **kw: structlora.LorettaAdpConfig(bottleneck_size=4, tensor_rank=2, **kw)),
    "adapter": ("init_weights", lambda **kw: structlora.DenseAdapterConfig(bottleneck_size=4, **kw)),
}
BUILDERS = {"structlora": structlora.get_peft_model, "peft": peft.get_peft_model}


def _config(method: str, value):
    field, make = METHODS[method]
    return make(**{field: value}, target_modules=["c_attn", "c_fc"] if method != "adapter" else None)


@pytest.mark.parametrize("builder", list(BUILDERS))
@pytest.mark.parametrize("method", list(METHODS))
def test_false_changes_the_output_from_the_start_and_true_keeps_it(method, builder):
    base = outputs(tiny_gpt2())
    torch.manual_seed(1)
    kept = outputs(BUILDERS[builder](tiny_gpt2(), _config(method, True)))
    assert torch.equal(kept, base)
    torch.manual_seed(1)
    changed = outputs(BUILDERS[builder](tiny_gpt2(), _config(method, False)))
    assert (changed - base).abs().max().item() > 1e-3


@pytest.mark.parametrize("method", ["lora", "mtlora-reference", "mtlora-identity", "loretta_rep"])
def test_false_gives_every_layer_a_non_zero_update_and_keeps_t_s_start(method):
    torch.manual_seed(3)
    model = structlora.get_peft_model(tiny_gpt2(), _config(method, False))
    layers = list(structlora.adapted_layers(model))
    assert len(layers) == 4
    for name, layer in layers:
        assert layer.get_delta_weight("default").abs().max().item() > 1e-3, name
        transform = layer.adapters["default"].parameterization.t_matrix()
        if method == "mtlora-identity":
            assert torch.equal(transform, torch.eye(2)), name  # T = I as the identity init gives it
        elif method == "mtlora-reference":
            assert not torch.equal(transform, torch.eye(2)), name  # C, D drawn as the reference init draws them


@pytest.mark.parametrize("value", ["false", 0, 1, None])
def test_init_lora_weights_must_be_a_bool(value):
    with pytest.raises(TypeError, match="init_lora_weights must be true or false"):
        structlora.MTLoraConfig(r=2, init_lora_weights=value)


@pytest.mark.parametrize("value", [0, "gaussian", None])
def test_init_weights_must_be_a_bool_or_a_loretta_name(value):
    with pytest.raises(ValueError, match="init_weights must be true or false.*bert, mam_adapter"):
        structlora.LorettaAdpConfig(init_weights=value)
    assert structlora.LorettaAdpConfig(init_weights="mam_adapter").init_weights == "mam_adapter"


@pytest.mark.parametrize("config", [lambda: structlora.LoraConfig(init="pissa", init_lora_weights=False),
                                    lambda: structlora.MTLoraConfig(init="lora-xs", init_lora_weights=False)])
def test_false_with_an_svd_start_is_refused_naming_both_fields(config):
    with pytest.raises(ValueError, match="init_lora_weights=False.*init '(pissa|lora-xs)'"):
        config()


LOADERS = {"structlora": structlora.PeftModel, "peft": peft.PeftModel}


@pytest.mark.parametrize("path", list(BUILDERS))
@pytest.mark.parametrize("method", list(METHODS))
def test_round_trip_on_both_save_paths(method, path, tmp_path):
    field = METHODS[method][0]
    torch.manual_seed(2)
    model = BUILDERS[path](tiny_gpt2(), _config(method, False))
    model.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())[field] is False
    loaded = LOADERS[path].from_pretrained(tiny_gpt2(), str(tmp_path))
    assert getattr(loaded.peft_config["default"], field) is False
    assert torch.equal(outputs(loaded), outputs(model))


@pytest.mark.parametrize("path", list(BUILDERS))
def test_a_folder_saved_without_the_key_loads_as_true(path, tmp_path):
    """Folders of earlier releases have no init_lora_weights: they load, as True (the start does not matter to
    trained weights), and the structure check of structlora's weights file does not count the field."""
    config = structlora.MTLoraConfig(r=2, structure="ctcm", target_modules=["c_attn"], init_lora_weights=False)
    model = BUILDERS[path](tiny_gpt2(), config)
    model.save_pretrained(str(tmp_path))
    config_file = tmp_path / "adapter_config.json"
    data = json.loads(config_file.read_text())
    del data["init_lora_weights"]
    config_file.write_text(json.dumps(data))
    loaded = LOADERS[path].from_pretrained(tiny_gpt2(), str(tmp_path))
    assert loaded.peft_config["default"].init_lora_weights is True
    assert torch.equal(outputs(loaded), outputs(model))
