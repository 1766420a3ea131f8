"""Bad input gets a clear error naming the culprit and what would be valid."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from structlora import (LoraConfig, LorettaAdpConfig, LorettaRepConfig, MTLoraConfig, PeftModel, from_loretta,
                        get_peft_model)
from test_core import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama


def test_unknown_target_lists_candidate_names():
    with pytest.raises(ValueError, match=r"matched no adaptable module.*Did you mean: q_proj"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_prj"]))


def test_unknown_architecture_without_targets():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match="no default target_modules for model type 'gpt_neox'.*pass target_modules"):
        get_peft_model(model, LoraConfig())


@pytest.mark.parametrize("make,message", [
    (lambda: LoraConfig(r=0), "r must be a positive integer, got 0"),
    (lambda: MTLoraConfig(r=-2), "r must be a positive integer, got -2"),
    (lambda: LorettaRepConfig(tensor_rank=0), "tensor_rank must be a positive integer, got 0"),
    (lambda: LorettaAdpConfig(bottleneck_size=0), "bottleneck_size must be a positive integer, got 0"),
    (lambda: MTLoraConfig(structure="xyz"), "unknown structure 'xyz'; valid values: shim, icfm, ctcm, dtsm"),
    (lambda: LorettaAdpConfig(non_linearity="softplusplus"), "unknown non_linearity 'softplusplus'; valid values: relu"),
    (lambda: MTLoraConfig(init="zeros"), "unknown init 'zeros'; valid values: reference, identity"),
    (lambda: LoraConfig(lora_dropout=1.5), r"lora_dropout must be in \[0, 1\)"),
    (lambda: LoraConfig(task_type="REGRESSION"), "unknown task_type 'REGRESSION'"),
])
def test_invalid_config_values(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_enable_lora_must_divide_the_output():
    with pytest.raises(ValueError, match="enable_lora has 5 slices, which does not divide out_features=96"):
        get_peft_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"], enable_lora=[True] * 5))


def test_loading_onto_a_base_with_other_shapes_names_module_and_shapes(tmp_path):
    model = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query"]))
    model.save_pretrained(tmp_path)
    from transformers import BertConfig, BertForSequenceClassification
    wider = BertForSequenceClassification(BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=48, num_labels=3))
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors': bert\.encoder\.layer\.0\.attention\.self\.query"
                                         r"\.adapters\.default\.parameterization\.lora_A has shape \(4, 32\), but "
                                         r"the model's is \(4, 48\)"):
        PeftModel.from_pretrained(wider, str(tmp_path))


def test_loading_onto_another_architecture(tmp_path):
    get_peft_model(tiny_bert(), LoraConfig(r=4)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="made for a 'bert' model, but the base model is 'llama'"):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path))


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json in"):
        PeftModel.from_pretrained(tiny_bert(), str(tmp_path))
    model = get_peft_model(tiny_bert(), LoraConfig(r=4))
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:40])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors' does not read as a safetensors file.*corrupt"):
        PeftModel.from_pretrained(tiny_bert(), str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt adapter config .*adapter_config.json"):
        PeftModel.from_pretrained(tiny_bert(), str(tmp_path))
    weights.write_bytes(good)  # the weights whole again: the config alone is at fault (a folder in the earlier
    (tmp_path / "adapter_config.json").write_text(json.dumps({"method": "prefix"}))  # layout reads weights first)
    with pytest.raises(ValueError, match="method 'prefix', which structlora does not know"):
        PeftModel.from_pretrained(tiny_bert(), str(tmp_path))
    (weights).unlink()
    model.peft_config["default"].save_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors in"):
        PeftModel.from_pretrained(tiny_bert(), str(tmp_path))


def test_loretta_folder_never_unpickles_objects(tmp_path):
    """A pickle holding anything but tensors is refused (torch.load with weights_only=True)."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "tensor_rank": 2, "target_modules": ["query"]}))
    with open(tmp_path / "adapter_model.bin", "wb") as handle:
        pickle.dump({"x": Payload()}, handle)
    with pytest.raises(ValueError, match="corrupt or unsafe loretta weights file"):
        from_loretta(tiny_bert(), str(tmp_path))


def test_adding_to_a_peft_model_and_duplicate_names():
    model = get_peft_model(tiny_bert(), LoraConfig(r=2))
    with pytest.raises(ValueError, match="use model.add_adapter"):
        get_peft_model(model, LoraConfig(r=2))
    with pytest.raises(ValueError, match="an adapter named 'default' already exists"):
        model.add_adapter("default", LoraConfig(r=2))
    with pytest.raises(ValueError, match="no adapter named 'nope'; adapters: default"):
        model.set_adapter("nope")


def test_disable_while_merged_is_refused():
    model = get_peft_model(tiny_bert(), LoraConfig(r=2))
    randomize_adapters(model)
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        with model.disable_adapter():
            pass


def test_lora_embedding_only_for_dense_methods():
    with pytest.raises(ValueError, match=r"loretta_rep cannot adapt: model\.embed_tokens \(Embedding\)\. It adapts "
                                         r"linear, conv1d layers only"):
        get_peft_model(tiny_llama(), LorettaRepConfig(target_modules=["embed_tokens"]))
