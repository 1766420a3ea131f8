"""structlora's methods as real PEFT methods (structlora.peft_method): configs are peft.PeftConfig, peft's own
get_peft_model / save_pretrained / PeftModel.from_pretrained run structlora's layers, and so do transformers'
load_adapter, AutoPeftModel and transformers' Trainer (TRL's trainers: tests/test_trl.py)."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

import structlora  # noqa: E402
from structlora.config import PEFT_TYPE_MARKER, StructloraPeftType  # noqa: E402
from structlora.peft_layers import (StructloraBottleneckLayer, StructloraLowRankLayer,  # noqa: E402
                                    StructloraTrainedCopy)
from tiny_models import tiny_llama_for, tiny_word_tokenizer  # noqa: E402

METHODS = {
    "lora": lambda: structlora.LoraConfig(r=2, lora_alpha=4),
    "mtlora-shim": lambda: structlora.MTLoraConfig(r=2, structure="shim"),
    "mtlora-icfm": lambda: structlora.MTLoraConfig(r=2, structure="icfm"),
    "mtlora-ctcm": lambda: structlora.MTLoraConfig(r=2, structure="ctcm"),
    "mtlora-dtsm": lambda: structlora.MTLoraConfig(r=2, structure="dtsm"),
    "loretta_rep": lambda: structlora.LorettaRepConfig(r=2, tensor_rank=2),
    "loretta_adp": lambda: structlora.LorettaAdpConfig(bottleneck_size=4, tensor_rank=2),
}
LOW_RANK = [m for m in METHODS if m != "loretta_adp"]


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=50,
                                      bos_token_id=0, eos_token_id=0))


def tiny_llama():
    return tiny_llama_for(tiny_word_tokenizer())


def tiny_bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=3))


MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert_classifier}
INPUT = torch.tensor([[1, 5, 7, 9, 11, 13, 2], [3, 4, 6, 8, 10, 12, 14]])


def perturbed(model, seed: int = 0):
    """Seeded noise on every trainable tensor: a stand-in for a trained adapter (a fresh one has B = 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model


def outputs(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def config_for(method: str, model_name: str):
    config = METHODS[method]()
    if model_name == "bert":
        config.task_type = structlora.TaskType.SEQ_CLS
    return config


# -- configs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
def test_configs_are_peft_configs_with_their_own_peft_type(method):
    config = METHODS[method]()
    assert isinstance(config, peft.PeftConfig)
    assert isinstance(config.peft_type, StructloraPeftType)
    assert peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[config.peft_type.value] is type(config)
    assert config.trainable_token_indices is None  # read by TRL


def test_config_validation_and_peft_type_are_checked():
    with pytest.raises(ValueError, match="r must be a positive integer"):
        structlora.MTLoraConfig(r=0)
    with pytest.raises(ValueError, match="peft_type 'LORA' does not fit MTLoraConfig"):
        structlora.MTLoraConfig(peft_type="LORA")
    with pytest.raises(ValueError, match="trainable_token_indices"):
        structlora.LoraConfig(trainable_token_indices=[1, 2])
    # earlier releases' folders carry PEFT_TYPE_MARKER: still read, with the method's own peft_type
    assert structlora.MTLoraConfig(peft_type=PEFT_TYPE_MARKER).peft_type is StructloraPeftType.MTLORA


# -- save / load through PEFT ------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("method", list(METHODS))
def test_peft_save_and_from_pretrained_give_identical_outputs(method, model_name, tmp_path):
    model = perturbed(peft.get_peft_model(MODELS[model_name](), config_for(method, model_name)))
    assert isinstance(model, peft.PeftModel)
    layers = [m for m in model.modules() if isinstance(m, (StructloraLowRankLayer, StructloraBottleneckLayer))]
    assert layers, "no structlora layer was injected"
    expected = outputs(model)
    model.train()
    with_grad = model(input_ids=INPUT).logits if model_name != "gpt2" else None  # GPT-2 has dropout on
    model.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == model.peft_config["default"].peft_type.value
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    loaded = peft.PeftModel.from_pretrained(MODELS[model_name](), str(tmp_path))
    torch.testing.assert_close(outputs(loaded), expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # from_pretrained: inference mode
    if with_grad is not None and model_name == "llama":  # the autograd path computes what the no-grad path does
        torch.testing.assert_close(with_grad, expected, rtol=1e-5, atol=1e-5)


def test_seq_cls_head_is_trained_saved_and_restored(tmp_path):
    model = peft.get_peft_model(tiny_bert_classifier(), config_for("mtlora-icfm", "bert"))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("classifier.modules_to_save.default" in n for n in trained)
    perturbed(model)
    expected = outputs(model)
    model.save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(tiny_bert_classifier(), str(tmp_path))
    torch.testing.assert_close(outputs(loaded), expected, rtol=0, atol=0)
    with loaded.disable_adapter():
        torch.testing.assert_close(outputs(loaded), outputs(tiny_bert_classifier()), rtol=0, atol=0)


def test_loretta_trains_norm_copies_and_tensorized_head():
    from structlora.tensor_train import TTLinear
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    base = RobertaForSequenceClassification(RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=32,
                                                          max_position_embeddings=40, num_labels=2))
    model = peft.get_peft_model(base, structlora.LorettaAdpConfig(bottleneck_size=4, tensor_rank=2,
                                                                  task_type="SEQ_CLS"))
    assert any(isinstance(m, StructloraTrainedCopy) for m in model.modules())
    head = model.base_model.model.classifier.modules_to_save["default"]
    assert isinstance(head.dense, TTLinear) and all(p.requires_grad for p in head.dense.parameters())


def test_modules_to_save_is_saved_and_restored(tmp_path):
    config = structlora.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    model = perturbed(peft.get_peft_model(tiny_llama(), config))
    expected = outputs(model)
    model.save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(outputs(loaded), expected, rtol=0, atol=0)


# -- merging -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
@pytest.mark.parametrize("method", LOW_RANK)
def test_merge_unmerge_and_merge_and_unload_equal_unmerged(method, model_name):
    model = perturbed(peft.get_peft_model(MODELS[model_name](), config_for(method, model_name)))
    base_weights = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    expected = outputs(model)
    model.merge_adapter()
    torch.testing.assert_close(outputs(model), expected, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(outputs(model), expected, rtol=1e-5, atol=1e-5)
    for name, parameter in model.named_parameters():
        if name in base_weights:
            torch.testing.assert_close(parameter, base_weights[name], rtol=1e-6, atol=1e-6)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in merged.modules())
    torch.testing.assert_close(outputs(merged), expected, rtol=1e-5, atol=1e-5)


def test_bottleneck_merge_is_refused_and_changes_nothing():
    model = perturbed(peft.get_peft_model(tiny_llama(), METHODS["loretta_adp"]()))
    expected = outputs(model)
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match="bottleneck adapter"):
            merge()
        torch.testing.assert_close(outputs(model), expected, rtol=0, atol=0)


def test_non_finite_merge_is_refused_before_any_weight_changes():
    model = perturbed(peft.get_peft_model(tiny_llama(), METHODS["mtlora-icfm"]()))
    expected = outputs(model)
    last = [m for m in model.modules() if isinstance(m, StructloraLowRankLayer)][-1]
    with torch.no_grad():
        last.adapters["default"].parameterization.lora_B.fill_(float("inf"))
    before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    with pytest.raises(ValueError, match="merge refused at .*no weight was changed"):
        model.merge_adapter()
    for name, parameter in model.named_parameters():
        if name in before:
            assert torch.equal(parameter, before[name])
    assert expected.isfinite().all()


def test_loading_a_checkpoint_that_lacks_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = peft.get_peft_model(tiny_llama(), METHODS["mtlora-dtsm"]())
    model.save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="lacks 1 of adapter 'default'"):
        peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))


def test_unsupported_targets_are_refused_before_the_model_changes():
    base = tiny_llama()
    names = [n for n, _ in base.named_modules()]
    with pytest.raises(ValueError, match="cannot adapt"):
        peft.get_peft_model(base, structlora.LoraConfig(r=2, target_modules=r".*self_attn"))
    assert [n for n, _ in base.named_modules()] == names


# -- the ecosystem -----------------------------------------------------------------------------------------------
@pytest.fixture
def llama_folder(tmp_path):
    folder = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    tiny_word_tokenizer().save_pretrained(folder)
    return folder


def test_auto_peft_model_and_transformers_load_adapter(llama_folder, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = perturbed(peft.get_peft_model(AutoModelForCausalLM.from_pretrained(llama_folder),
                                          structlora.MTLoraConfig(r=2, structure="ctcm")))
    expected = outputs(model)
    adapter = tmp_path / "adapter"
    model.save_pretrained(str(adapter))
    # the saved config names the base by its folder name (portable): resolve it from the folder's parent
    monkeypatch.chdir(llama_folder.parent)
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    assert isinstance(auto, peft.PeftModelForCausalLM)
    torch.testing.assert_close(outputs(auto), expected, rtol=0, atol=0)
    plain = AutoModelForCausalLM.from_pretrained(llama_folder)
    plain.load_adapter(str(adapter))
    assert any(isinstance(m, StructloraLowRankLayer) for m in plain.modules())
    torch.testing.assert_close(outputs(plain), expected, rtol=0, atol=0)


def test_plain_peft_without_structlora_says_to_import_it(tmp_path):
    peft.get_peft_model(tiny_llama(), METHODS["mtlora-shim"]()).save_pretrained(str(tmp_path))
    script = ("import peft, sys\n"
              f"try:\n    peft.PeftConfig.from_pretrained({str(tmp_path)!r})\n"
              "except KeyError as error:\n    print('KeyError', error)\n"
              "print('structlora' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": ""}, cwd=str(tmp_path))
    assert "KeyError" in result.stdout and "then import structlora" in result.stdout, result.stdout + result.stderr
    assert result.stdout.strip().endswith("False")


def _sft_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"text": ["the film was good .", "the book is bad .", "a cat ran and a dog ran ."] * 4})


def test_plain_transformers_trainer_saves_adapter_only_and_resumes(tmp_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tokenizer = tiny_word_tokenizer()
    data = _sft_dataset().map(lambda row: tokenizer(row["text"]), remove_columns=["text"])

    def run(max_steps: int, resume: bool):
        torch.manual_seed(0)
        model = peft.get_peft_model(tiny_llama_for(tokenizer), structlora.LorettaRepConfig(r=2, tensor_rank=2))
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2,
                                 save_steps=1, report_to=[], use_cpu=True, learning_rate=1e-2, seed=0,
                                 data_seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=data,
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
        trainer.train(resume_from_checkpoint=resume or None)
        return model

    straight = run(2, resume=False)
    files = set(os.listdir(tmp_path / "checkpoint-1"))
    assert "adapter_model.safetensors" in files and not any(f.startswith("model.") for f in files)
    expected = {n: p.detach().clone() for n, p in straight.named_parameters() if p.requires_grad}
    (tmp_path / "checkpoint-2").rename(tmp_path / "straight-2")
    resumed = run(2, resume=True)  # from checkpoint-1
    for name, parameter in resumed.named_parameters():
        if name in expected:
            torch.testing.assert_close(parameter, expected[name], rtol=1e-5, atol=1e-6)


def test_readme_peft_section_runs_as_written(llama_folder, tmp_path, monkeypatch):
    """The README's "Use with PEFT, TRL, transformers" snippet, with a tiny local model for the hub one."""
    pytest.importorskip("trl")
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Use with PEFT, TRL, transformers", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    line = 'base_id = "HuggingFaceTB/SmolLM2-135M"'
    assert line in code
    code = code.replace(line, f"base_id = {str(llama_folder)!r}")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    assert isinstance(namespace["model"], peft.PeftModel)
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in namespace["merged"].modules())
    assert any(isinstance(m, StructloraLowRankLayer) for m in namespace["plain"].modules())
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("order", ["structlora first", "peft first", "config module first",
                                   "peft looked up before its import"])
def test_import_structlora_registers_whenever_peft_is_imported(order, tmp_path):
    """`import structlora` alone (no config touched) is enough for peft's loaders, in either import order; and it
    does not import peft itself. A look-up of peft that imports nothing (transformers' is_peft_available(), which
    lm-eval's process does before it imports peft) does not use the import hook up."""
    peft.get_peft_model(tiny_llama(), METHODS["loretta_rep"]()).save_pretrained(str(tmp_path))
    imports = {"structlora first": "import structlora, sys\nassert 'peft' not in sys.modules\nimport peft\n",
               "peft first": "import peft\nimport structlora\n",
               "config module first": "from structlora.config import LoraConfig\nimport peft\n",
               "peft looked up before its import": "import structlora, sys, importlib.util\n"
                                                   "assert importlib.util.find_spec('peft') is not None\n"
                                                   "assert 'peft' not in sys.modules\nimport peft\n"}[order]
    script = imports + (f"config = peft.PeftConfig.from_pretrained({str(tmp_path)!r})\n"
                        "print(type(config).__module__, type(config).__name__)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.stdout.strip().endswith("structlora.config LorettaRepConfig"), result.stdout + result.stderr


@pytest.mark.parametrize("first", ["structlora.layers", "structlora.mixed", "structlora.peft_tuner"])
def test_any_module_imported_first_then_a_config_registers(first):
    """A module that imports the config module on its way in (registration imports it back) is not met half-built:
    the import works, and the first config built registers the methods with peft."""
    script = (f"import {first}\nimport structlora, peft\nfrom peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING\n"
              "config = structlora.MTLoraConfig(r=2)\nprint(config.peft_type in PEFT_TYPE_TO_CONFIG_MAPPING)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.stdout.strip() == "True", result.stdout + result.stderr[-2000:]


@pytest.mark.parametrize("method", ["mtlora-icfm", "loretta_adp"])
def test_mixed_batch_adapter_names_route_each_row_to_its_adapter(method):
    model = peft.get_peft_model(tiny_llama(), METHODS[method](), adapter_name="a")
    model.add_adapter("b", METHODS[method]())
    perturbed(model)  # only "a" is trainable: give "b" its own weights too
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".adapters.b." in name:
                parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)) * 0.2)
    model.eval()
    rows = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        rows[name] = outputs(model)
    with model.disable_adapter():
        rows["__base__"] = outputs(model)
    with torch.no_grad():
        mixed = model(input_ids=INPUT, adapter_names=["b", "__base__"]).logits
    torch.testing.assert_close(mixed[0], rows["b"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], rows["__base__"][1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        model(input_ids=INPUT, adapter_names=["a", "c"])
    doubled = torch.cat([INPUT, INPUT])  # 4 rows, 2 names: refused, not run as b, b, base, base
    with pytest.raises(ValueError, match="adapter_names has 2 entries, but the batch has 4 rows"):
        model(input_ids=doubled, adapter_names=["b", "__base__"])
    torch.testing.assert_close(outputs(model), rows["b"], rtol=0, atol=0)  # routing left no state behind


def test_low_cpu_mem_usage_is_refused_with_one_clear_error(tmp_path):
    peft.get_peft_model(tiny_llama(), METHODS["lora"]()).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="low_cpu_mem_usage=True is not supported"):
        peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path), low_cpu_mem_usage=True)
    model = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    with pytest.raises(ValueError, match="low_cpu_mem_usage=True is not supported"):
        model.load_adapter(str(tmp_path), adapter_name="other", low_cpu_mem_usage=True)
    assert list(model.peft_config) == ["default"]


def test_generate_with_adapter_names_matches_each_adapter_alone():
    model = peft.get_peft_model(tiny_llama(), METHODS["mtlora-shim"](), adapter_name="a")
    model.add_adapter("b", METHODS["mtlora-shim"]())
    perturbed(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".adapters.b." in name:
                parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    model.eval()
    prompt = INPUT[:, :4]
    options = dict(max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=0)
    alone = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        alone[name] = model.generate(input_ids=prompt, **options)
    assert not torch.equal(alone["a"], alone["b"])  # the adapters decode differently: routing is visible
    mixed = model.generate(input_ids=prompt, adapter_names=["b", "a"], **options)
    assert torch.equal(mixed[0], alone["b"][0]) and torch.equal(mixed[1], alone["a"][1])
    with pytest.raises(ValueError, match="adapter_names has 1 entries, but the batch has 2 rows"):
        model.generate(input_ids=prompt, adapter_names=["b"], **options)  # beams expand rows; names must not


@pytest.mark.parametrize("method", ["lora", "mtlora-icfm", "loretta_rep", "loretta_adp"])
def test_4bit_base_trains_through_plain_transformers_trainer(method, llama_folder, tmp_path):
    """transformers refuses to fine-tune a quantized model that is not a PEFT model; a structlora one now is."""
    pytest.importorskip("bitsandbytes")
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForLanguageModeling, Trainer,
                              TrainingArguments)

    base = AutoModelForCausalLM.from_pretrained(
        llama_folder, device_map="cpu", dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32))
    model = peft.get_peft_model(base, METHODS[method]())
    quantized = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    assert quantized, "the base is not quantized"
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tokenizer = tiny_word_tokenizer()
    data = _sft_dataset().map(lambda row: tokenizer(row["text"]), remove_columns=["text"])
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, learning_rate=1e-2, save_strategy="no")
    Trainer(model=model, args=args, train_dataset=data,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False)).train()
    parameters = dict(model.named_parameters())
    assert any(not torch.equal(parameters[n], before) for n, before in trained.items())
    assert all(torch.equal(parameters[n], before) for n, before in quantized.items())


@pytest.mark.parametrize("method, model_name", [("mtlora-ctcm", "bert"), ("loretta_rep", "llama"), ("lora", "gpt2")])
def test_export_to_peft_lora_from_the_peft_path(method, model_name, tmp_path):
    """A peft.PeftModel of a structlora method exports to a plain PEFT LoRA folder (heads and norms included)
    that plain peft loads with the same outputs."""
    model = perturbed(peft.get_peft_model(MODELS[model_name](), config_for(method, model_name)))
    expected = outputs(model)
    structlora.export_to_peft(model, str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    loaded = peft.PeftModel.from_pretrained(MODELS[model_name](), str(tmp_path))
    assert not any(isinstance(m, StructloraLowRankLayer) for m in loaded.modules())
    torch.testing.assert_close(outputs(loaded), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("version, accepted", [("0.20.0", False), ("0.21.0", True), ("0.22.3", True),
                                               ("0.23.0.dev0", False), ("1.0.0", False)])
def test_peft_outside_the_tested_range_is_one_clear_error(version, accepted, monkeypatch):
    from structlora import peft_support

    monkeypatch.setattr(peft_support.metadata, "version", lambda name: version)
    if accepted:
        assert peft_support.require_supported_peft() == version
    else:
        with pytest.raises(ImportError, match=r"structlora needs peft>=0\.21,<0\.23 .*but peft " + re.escape(version)):
            peft_support.require_supported_peft()


def test_structlora_peft_model_loads_a_folder_saved_through_peft(tmp_path):
    saved = perturbed(peft.get_peft_model(tiny_llama(), METHODS["mtlora-icfm"]()))
    saved.save_pretrained(str(tmp_path))
    loaded = structlora.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert isinstance(loaded, structlora.PeftModel)
    torch.testing.assert_close(outputs(loaded), outputs(saved), rtol=0, atol=0)
    assert isinstance(structlora.MTLoraConfig.from_pretrained(str(tmp_path)), structlora.MTLoraConfig)
