"""Interop messages and portable saved configs: a PEFT config handed to structlora, a structlora folder handed
to PEFT's loaders (and the reverse), resolved default targets and portable base model names in adapter_config.json,
and older folders that lack them."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification

import structlora
from structlora import LoraConfig, LorettaAdpConfig, PeftModel, export_to_peft, get_peft_model
from structlora.config import PEFT_TYPE_MARKER, portable_model_name
from structlora.mixed import hotswap_adapter
from structlora.model import CONFIG_METADATA_KEY, WEIGHTS_NAME
# Folders in the layout of structlora's earlier model class (what older releases wrote) are built with that class on
# purpose; structlora.PeftModel is now a peft.PeftModel and saves in PEFT's layout.
from structlora.model import get_peft_model as earlier_get_peft_model

INPUTS = torch.tensor([[2, 7, 11, 5, 3, 9]])


def tiny_bert(name_or_path: str = "") -> torch.nn.Module:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, num_labels=2)).eval()
    model.name_or_path = name_or_path  # what from_pretrained(path) records
    return model


def trained(config, name_or_path: str = "", wrap=get_peft_model) -> PeftModel:
    model = wrap(tiny_bert(name_or_path), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def saved_config(folder) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUTS).logits


def test_a_peft_config_is_refused_with_what_to_use():
    peft = pytest.importorskip("peft")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match=r"takes a structlora config \(LoraConfig, MTLoraConfig, .*\), got "
                                        r"peft\..*\.LoraConfig; PEFT's own configs go to peft\.get_peft_model"):
        structlora.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["0"]))
    assert not any("lora" in name for name, _ in model.named_modules())  # the model is left as it was


def test_saved_config_records_the_resolved_default_targets(tmp_path):
    """Defaults are saved as what they resolved to for the model type (as PEFT saves them): a default list as it
    is, a default regex as that regex; the folder reloads to the same outputs."""
    lora = trained(LoraConfig(r=2, task_type="SEQ_CLS"))
    lora.save_pretrained(str(tmp_path / "lora"))
    assert saved_config(tmp_path / "lora")["target_modules"] == ["query", "value"]
    adp = trained(LorettaAdpConfig(bottleneck_size=4, tensor_rank=2, task_type="SEQ_CLS"))
    adp.save_pretrained(str(tmp_path / "adp"))
    assert saved_config(tmp_path / "adp")["target_modules"] == r".*\.output\.dense"  # LoRETTA_adp's default
    for folder, model in (("lora", lora), ("adp", adp)):
        loaded = PeftModel.from_pretrained(tiny_bert(), str(tmp_path / folder))
        torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_explicit_targets_are_saved_as_given(tmp_path):
    model = trained(LoraConfig(r=2, target_modules=r".*\.query", task_type="SEQ_CLS"))
    model.save_pretrained(str(tmp_path))
    assert saved_config(tmp_path)["target_modules"] == r".*\.query"


def test_base_model_name_is_portable(tmp_path):
    local = tmp_path / "models" / "tiny-bert"
    local.mkdir(parents=True)
    assert portable_model_name(str(local)) == "tiny-bert"
    assert portable_model_name(str(local) + "/") == "tiny-bert"
    assert portable_model_name("./tiny-bert") == "tiny-bert"
    assert portable_model_name("roberta-base") == "roberta-base"
    assert portable_model_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    snapshot = "/home/u/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M/snapshots/0123abc"
    assert portable_model_name(snapshot) == "HuggingFaceTB/SmolLM2-135M"
    assert portable_model_name(None) is None and portable_model_name("") is None

    model = trained(LoraConfig(r=2, task_type="SEQ_CLS"), name_or_path=str(local))
    model.save_pretrained(str(tmp_path / "adapter"))
    assert saved_config(tmp_path / "adapter")["base_model_name_or_path"] == "tiny-bert"
    export_to_peft(model, str(tmp_path / "peft"))
    assert saved_config(tmp_path / "peft")["base_model_name_or_path"] == "tiny-bert"
    # A config whose path was set by hand (or read from an older folder) is written portably too.
    explicit = trained(LoraConfig(r=2, task_type="SEQ_CLS", base_model_name_or_path=str(local)))
    explicit.save_pretrained(str(tmp_path / "explicit"))
    assert saved_config(tmp_path / "explicit")["base_model_name_or_path"] == "tiny-bert"


def _make_old_format(folder) -> None:
    """Rewrite a saved folder as structlora wrote it before: default targets null (in the config and in the
    weights' structure metadata), an absolute base path, no peft_type marker."""
    config = saved_config(folder)
    config.update(target_modules=None, base_model_name_or_path="/abs/local/tiny-bert")
    del config["peft_type"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    path = str(folder / WEIGHTS_NAME)
    from safetensors import safe_open
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    structure = json.loads(metadata[CONFIG_METADATA_KEY])
    structure["target_modules"] = None
    metadata[CONFIG_METADATA_KEY] = json.dumps(structure, sort_keys=True)
    save_file(load_file(path), path, metadata=metadata)


OLDER_CONFIGS = {"lora": lambda: LoraConfig(r=2, task_type="SEQ_CLS"),
                 "loretta_adp": lambda: LorettaAdpConfig(bottleneck_size=4, tensor_rank=2, task_type="SEQ_CLS")}


@pytest.mark.parametrize("method", list(OLDER_CONFIGS))
def test_older_folders_without_resolved_targets_still_load(method, tmp_path):
    model = trained(OLDER_CONFIGS[method](), wrap=earlier_get_peft_model)
    model.save_pretrained(str(tmp_path))
    _make_old_format(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), str(tmp_path))
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    fresh = get_peft_model(tiny_bert(), OLDER_CONFIGS[method]())
    fresh.load_adapter(str(tmp_path), adapter_name="old")
    fresh.set_adapter("old")
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("method", list(OLDER_CONFIGS))
def test_older_folders_without_resolved_targets_hotswap(method, tmp_path):
    """Same structure: defaults then, resolved now."""
    model = trained(OLDER_CONFIGS[method](), wrap=earlier_get_peft_model)
    model.save_pretrained(str(tmp_path))
    _make_old_format(tmp_path)
    fresh = get_peft_model(tiny_bert(), OLDER_CONFIGS[method]())
    hotswap_adapter(fresh, str(tmp_path), "default")
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)


PEFT_LOADERS = {
    "PeftModel.from_pretrained": lambda peft, folder: peft.PeftModel.from_pretrained(tiny_bert(), folder),
    "PeftConfig.from_pretrained": lambda peft, folder: peft.PeftConfig.from_pretrained(folder),
    "LoraConfig.from_pretrained": lambda peft, folder: peft.LoraConfig.from_pretrained(folder),
    "AutoPeftModel": lambda peft, folder: peft.AutoPeftModelForSequenceClassification.from_pretrained(folder),
    "transformers load_adapter": lambda peft, folder: tiny_bert().load_adapter(folder),
}


@pytest.mark.parametrize("loader", list(PEFT_LOADERS))
def test_peft_loaders_on_our_folder_name_structlora_convert(loader, tmp_path):
    """With structlora imported, PEFT's config table sends its marker to structlora.convert.LookAlikeFolder (without
    it, PEFT's KeyError quotes the marker: tests/test_peft_tuner.py)."""
    peft = pytest.importorskip("peft")
    trained(LoraConfig(r=2, task_type="SEQ_CLS"), wrap=earlier_get_peft_model).save_pretrained(str(tmp_path))
    assert saved_config(tmp_path)["peft_type"] == PEFT_TYPE_MARKER
    with pytest.raises(ValueError, match=r"written by the save_pretrained of structlora's earlier model class .*"
                                         r"`structlora convert SRC DST`"):
        PEFT_LOADERS[loader](peft, str(tmp_path))


def test_exported_folder_loads_in_peft_and_our_loader_names_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = trained(LoraConfig(r=2, task_type="SEQ_CLS"))
    export_to_peft(model, str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path))
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)
    base = tiny_bert()
    names = [n for n, _ in base.named_modules()]
    with pytest.raises(TypeError, match=r"holds a LoraConfig \(peft_type .*LORA\), not a structlora method: load it "
                                        r"with peft\.PeftModel\.from_pretrained"):
        PeftModel.from_pretrained(base, str(tmp_path))
    assert [n for n, _ in base.named_modules()] == names
