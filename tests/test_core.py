"""Core library: every method on every layer kind, on tiny models built from configs (CPU, fp32)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, RobertaConfig, RobertaForSequenceClassification)

from structlora import (LoraConfig, LorettaAdpConfig, LorettaRepConfig, MTLoraConfig, PeftModel, adapted_layers,
                        get_peft_model)
from structlora.bottleneck_layers import BottleneckLayer
from structlora.layers import LowRankLayer

VOCAB = 97


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(config).eval()


def tiny_roberta() -> torch.nn.Module:
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=48, max_position_embeddings=70, num_labels=2)
    return RobertaForSequenceClassification(config).eval()


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


# (id, model builder, config factory, output key)
CASES = [
    ("lora-bert", tiny_bert, lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]), "logits"),
    ("lora-llama-all", tiny_llama,
     lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"]), "logits"),
    ("lora-embedding", tiny_llama, lambda: LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]), "logits"),
    ("lora-gpt2-fused", tiny_gpt2,
     lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                        enable_lora={"c_attn": [True, False, True]}), "logits"),
    *[(f"mtlora-{s}-{init}", tiny_roberta,
       (lambda s=s, init=init: MTLoraConfig(r=4, lora_alpha=8, structure=s, init=init,
                                            target_modules=["query", "value", "intermediate.dense"])), "logits")
      for s in ("shim", "icfm", "ctcm", "dtsm") for init in ("reference", "identity")],
    *[(f"mtlora-{s}-gpt2-fused", tiny_gpt2,
       (lambda s=s: MTLoraConfig(r=2, lora_alpha=16, structure=s, target_modules=["c_attn", "c_fc"],
                                 enable_lora={"c_attn": [True, True, True]})), "logits")
      for s in ("icfm", "dtsm")],
    ("mtlora-embedding", tiny_llama, lambda: MTLoraConfig(r=4, structure="ctcm", target_modules=["embed_tokens"]),
     "logits"),
    ("loretta-rep-bert", tiny_bert, lambda: LorettaRepConfig(r=4, tensor_rank=3, target_modules=["query", "value"]),
     "logits"),
    ("loretta-rep-llama", tiny_llama, lambda: LorettaRepConfig(r=4, tensor_rank=3), "logits"),
    ("loretta-rep-gpt2-fused", tiny_gpt2,
     lambda: LorettaRepConfig(r=2, tensor_rank=2, target_modules=["c_attn"], enable_lora=[True, True, True]), "logits"),
    ("loretta-adp-roberta-cls", tiny_roberta,
     lambda: LorettaAdpConfig(bottleneck_size=8, tensor_rank=3, task_type="SEQ_CLS"), "logits"),
    ("loretta-adp-llama", tiny_llama, lambda: LorettaAdpConfig(bottleneck_size=8, tensor_rank=3), "logits"),
    ("loretta-adp-llama-parallel", tiny_llama,
     lambda: LorettaAdpConfig(bottleneck_size=8, tensor_rank=3, use_parallel_adapter=True, scaling="learned"),
     "logits"),
    ("loretta-adp-gpt2", tiny_gpt2, lambda: LorettaAdpConfig(bottleneck_size=8, tensor_rank=2, non_linearity="gelu"),
     "logits"),
]
CASE_IDS = [case[0] for case in CASES]
LOW_RANK_CASES = [case for case in CASES if "adp" not in case[0]]


def inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, VOCAB, (2, 9), generator=generator),
            "attention_mask": torch.ones(2, 9, dtype=torch.long)}


@torch.no_grad()
def randomize_adapters(model: PeftModel, seed: int = 3) -> None:
    """Give every adapter tensor a non-trivial value so that ΔW != 0 (the default start is exactly zero)."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(parameter + 0.3 * noise if "norm" in name.lower() else 0.3 * noise)


def outputs(model: torch.nn.Module, key: str) -> torch.Tensor:
    return getattr(model(**inputs()), key)


@pytest.mark.parametrize("case_id,build,make_config,key", CASES, ids=CASE_IDS)
def test_default_init_leaves_outputs_unchanged(case_id, build, make_config, key):
    base = build()
    expected = outputs(base, key)
    model = get_peft_model(copy.deepcopy(base), make_config()).eval()
    if "cls" in case_id:  # a new tensorized classification head is a new head: compare the features instead
        model.get_base_model().classifier = base.classifier
        assert torch.allclose(outputs(model, key), expected, atol=1e-6)
        return
    assert torch.equal(outputs(model, key), expected)


@pytest.mark.parametrize("case_id,build,make_config,key", LOW_RANK_CASES, ids=[c[0] for c in LOW_RANK_CASES])
def test_layer_forward_is_base_plus_delta_and_merge_agrees(case_id, build, make_config, key):
    model = get_peft_model(build(), make_config()).eval()
    randomize_adapters(model)
    layers = list(adapted_layers(model))
    assert layers and all(isinstance(layer, LowRankLayer) for _, layer in layers)
    for name, layer in layers:
        if layer.kind == "embedding":
            x = torch.randint(0, layer.in_features, (3, 5))
            one_hot = torch.nn.functional.one_hot(x, layer.in_features).float()
        else:
            x = one_hot = torch.randn(3, 5, layer.in_features)
        delta = layer.get_delta_weight()
        assert delta.shape == (layer.out_features, layer.in_features)
        assert delta.abs().sum() > 0
        expected = layer.base_layer(x) + one_hot @ delta.t()
        assert torch.allclose(layer(x), expected, atol=1e-5), name
    unmerged = outputs(model, key)
    model.merge_adapter()
    assert torch.allclose(outputs(model, key), unmerged, atol=1e-5)
    model.unmerge_adapter()
    assert torch.allclose(outputs(model, key), unmerged, atol=1e-5)
    plain = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, LowRankLayer) for m in plain.modules())
    assert torch.allclose(outputs(plain, key), unmerged, atol=1e-5)


@pytest.mark.parametrize("case_id,build,make_config,key", CASES, ids=CASE_IDS)
def test_save_load_roundtrip_and_disable(case_id, build, make_config, key, tmp_path):
    base = build()
    base_out = outputs(base, key)
    model = get_peft_model(copy.deepcopy(base), make_config()).eval()
    randomize_adapters(model)
    adapted = outputs(model, key)
    assert not torch.allclose(adapted, base_out, atol=1e-4)
    with model.disable_adapter():
        assert torch.equal(outputs(model, key), base_out)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json",
                                                          "adapter_model.safetensors"]  # PEFT's model card too
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert torch.equal(outputs(loaded, key), adapted)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # inference mode unless is_trainable=True


@pytest.mark.parametrize("case_id,build,make_config,key", CASES, ids=CASE_IDS)
def test_every_trainable_parameter_learns(case_id, build, make_config, key):
    """No dead parameters: zero-initialised factors get gradients once their partners have moved."""
    model = get_peft_model(build(), make_config()).train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.0)
    batch = inputs()
    for _ in range(3):
        optimizer.zero_grad()
        out = getattr(model(**batch), key)
        out.float().pow(2).mean().backward()
        optimizer.step()
    optimizer.zero_grad()
    getattr(model(**batch), key).float().pow(2).mean().backward()
    for name, parameter in trainable.items():
        assert not torch.equal(parameter.detach(), before[name]), f"{name} did not move"
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"{name} has no gradient"


def test_frozen_base_and_trainable_sets():
    model = get_peft_model(tiny_roberta(), LorettaAdpConfig(bottleneck_size=8, tensor_rank=3, task_type="SEQ_CLS"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".adapters.default." in n or ".modules_to_save.default." in n for n in names)  # PEFT's head copy
    assert any("LayerNorm" in n for n in names)
    assert any("classifier.modules_to_save.default." in n for n in names)
    lora = get_peft_model(tiny_roberta(), LoraConfig(r=4, target_modules=["query"]))
    assert all("parameterization.lora_" in n for n, p in lora.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("structure", ["shim", "icfm", "ctcm", "dtsm"])
def test_get_factors_follow_the_structure(structure):
    model = get_peft_model(tiny_roberta(), MTLoraConfig(r=4, lora_alpha=8, structure=structure,
                                                        target_modules=["query"]))
    randomize_adapters(model)
    for _, layer in adapted_layers(model):
        f = layer.get_factors()
        c = f["C"]
        expected_t = {"shim": c, "icfm": c @ c.t(), "ctcm": c @ f.get("D", c), "dtsm": c + f.get("D", c)}[structure]
        assert torch.allclose(f["T"], expected_t)
        assert f["A"].shape == (4, 32) and f["B"].shape == (32, 4) and f["T"].shape == (4, 4)
        assert torch.allclose(layer.get_delta_weight(), f["scaling"] * f["B"] @ f["T"] @ f["A"], atol=1e-6)
        assert float(f["scaling"]) == 2.0


def test_identity_init_starts_t_at_identity():
    for structure in ("shim", "icfm", "ctcm", "dtsm"):
        model = get_peft_model(tiny_roberta(), MTLoraConfig(r=4, structure=structure, init="identity",
                                                            target_modules=["query"]))
        for _, layer in adapted_layers(model):
            assert torch.allclose(layer.get_factors()["T"], torch.eye(4))


def test_loretta_rep_factors_are_tensor_train_reconstructions():
    model = get_peft_model(tiny_bert(), LorettaRepConfig(r=4, tensor_rank=3, target_modules=["query"], init="reference"))
    for _, layer in adapted_layers(model):
        f = layer.get_factors()
        cores = [f[k] for k in sorted(k for k in f if k.startswith("A.cores."))]
        full = cores[0]
        for core in cores[1:]:
            full = torch.tensordot(full, core, dims=([-1], [0]))
        assert torch.allclose(f["A"], full.reshape(32, 4).t(), atol=1e-6)
        assert torch.equal(f["T"], torch.eye(4))
        assert layer.get_delta_weight().abs().sum() > 0  # the reference start is noise, not zero


def test_fused_projection_only_touches_enabled_slices():
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], enable_lora=[True, False, True]))
    randomize_adapters(model)
    for _, layer in adapted_layers(model):
        delta = layer.get_delta_weight()
        assert delta.shape == (96, 32)
        assert delta[32:64].abs().sum() == 0 and delta[:32].abs().sum() > 0 and delta[64:].abs().sum() > 0
        assert layer.get_factors()["A"].shape == (4, 32)


def test_mtlora_fused_transformation_mixes_all_slices():
    model = get_peft_model(tiny_gpt2(), MTLoraConfig(r=2, structure="shim", target_modules=["c_attn"],
                                                     enable_lora=[True, True, True]))
    for _, layer in adapted_layers(model):
        assert layer.get_factors()["T"].shape == (6, 6)


def test_several_named_adapters():
    base = tiny_bert()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["query"]))
    model.add_adapter("b", MTLoraConfig(r=2, structure="icfm", target_modules=["value"]))
    randomize_adapters(model, seed=1)  # only "default" is trainable now
    out_default = outputs(model, "logits")
    model.set_adapter("b")
    assert all(".adapters.b." in n for n, p in model.named_parameters() if p.requires_grad)
    randomize_adapters(model, seed=2)
    out_b = outputs(model, "logits")
    assert not torch.allclose(out_default, out_b)
    model.set_adapter("default")
    assert torch.equal(outputs(model, "logits"), out_default)


def test_mixed_methods_on_one_module_nest():
    model = get_peft_model(tiny_llama(), LorettaAdpConfig(bottleneck_size=8, tensor_rank=2, target_modules=["down_proj"]))
    model.add_adapter("lora", LoraConfig(r=2, target_modules=["down_proj"]))
    kinds = {next(kind.__name__ for kind in (BottleneckLayer, LowRankLayer) if isinstance(layer, kind))
             for _, layer in adapted_layers(model)}  # the PEFT tuner's layers subclass structlora's
    assert kinds == {"BottleneckLayer", "LowRankLayer"}
    model.set_adapter("lora")
    randomize_adapters(model)
    model.merge_adapter()
    merged = outputs(model, "logits")
    model.unmerge_adapter()
    assert torch.allclose(outputs(model, "logits"), merged, atol=1e-5)


def test_adapters_in_bf16_base_with_fp32_weights():
    base = tiny_llama().to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    logits = outputs(model, "logits")
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_gradient_checkpointing_and_compile():
    model = get_peft_model(tiny_llama(), MTLoraConfig(r=4, structure="dtsm"))
    randomize_adapters(model)
    reference = outputs(model, "logits")
    model.train()
    model.gradient_checkpointing_enable()
    model(**inputs()).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    assert torch.allclose(compiled(**inputs()).logits, reference, atol=1e-5)


def test_trainer_keeps_the_models_input_columns(tmp_path):
    """transformers' Trainer drops the dataset columns that the model's forward does not take (for a PeftModel it
    inspects get_base_model()): input_ids, attention_mask and labels must reach the model, other columns not."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_bert(), LoraConfig(r=2))
    rows = 4
    data = Dataset.from_dict({"input_ids": [[5, 6, 7]] * rows, "attention_mask": [[1, 1, 1]] * rows,
                              "labels": [0, 1, 2, 0], "unused": [9] * rows})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert tuple(batch["input_ids"].shape) == (2, 3) and tuple(batch["labels"].shape) == (2,)
    assert model(**batch).loss.item() > 0  # the labels reached the model: a loss is computed
    clone = copy.deepcopy(model)
    assert clone.forward.__self__ is clone


@pytest.mark.parametrize("method", ["lora", "mtlora", "loretta_rep", "loretta_adp"])
def test_counts_on_automatic_shapes_never_crash(method):
    """Hidden sizes the reference's tables lack (2048, 896, primes) get automatic tensor-train shapes."""
    make = {"lora": lambda: LoraConfig(r=8), "mtlora": lambda: MTLoraConfig(r=8, structure="ctcm"),
            "loretta_rep": lambda: LorettaRepConfig(r=8, tensor_rank=4),
            "loretta_adp": lambda: LorettaAdpConfig(bottleneck_size=16, tensor_rank=4)}[method]
    for hidden, inter in ((2048, 5632), (896, 4864), (98, 211)):
        with torch.device("meta"):
            base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=inter,
                                                num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                                                head_dim=hidden))
        trainable, _ = get_peft_model(base, make()).get_nb_trainable_parameters()
        assert trainable > 0


# -- parameter counts from the papers (built on the meta device) -----------------------------------------------

def _meta(builder):
    with torch.device("meta"):
        return builder()


def _adapter_params(model: PeftModel) -> int:
    return model.get_nb_trainable_parameters()[0]


def test_counts_llama2_7b():
    llama = lambda: LlamaForCausalLM(LlamaConfig())
    qv = ["q_proj", "v_proj"]
    assert _adapter_params(get_peft_model(_meta(llama), LoraConfig(r=8, target_modules=qv))) == 4_194_304
    assert _adapter_params(get_peft_model(_meta(llama), LorettaRepConfig(r=8, tensor_rank=8, target_modules=qv))) \
        == 516_096
    assert _adapter_params(get_peft_model(_meta(llama), LorettaAdpConfig(bottleneck_size=64, tensor_rank=5))) \
        == 876_800


def test_counts_roberta_base():
    roberta = lambda: RobertaForSequenceClassification(RobertaConfig(num_labels=2))
    assert _adapter_params(get_peft_model(_meta(roberta), LorettaAdpConfig(bottleneck_size=64, tensor_rank=5,
                                                                           task_type="SEQ_CLS"))) == 99_194
    targets = r".*\.(query|value|intermediate\.dense|layer\.\d+\.output\.dense)"
    for structure, expected in (("shim", 1_035_264), ("icfm", 1_035_264), ("ctcm", 1_038_336), ("dtsm", 1_038_336)):
        model = get_peft_model(_meta(roberta), MTLoraConfig(r=8, structure=structure, target_modules=targets))
        assert _adapter_params(model) == expected, structure


def test_counts_gpt2_medium():
    gpt2 = lambda: GPT2LMHeadModel(GPT2Config(n_embd=1024, n_layer=24, n_head=16))
    for structure, expected in (("shim", 1_085_184), ("icfm", 1_085_184), ("ctcm", 1_089_024), ("dtsm", 1_089_024)):
        config = MTLoraConfig(r=4, lora_alpha=32, structure=structure, target_modules=["c_attn", "c_fc"],
                              enable_lora={"c_attn": [True, True, True]})
        assert _adapter_params(get_peft_model(_meta(gpt2), config)) == expected, structure


def test_modules_to_save_are_trained_as_they_are():
    """Only the detected classification head is tensorized; a pretrained module the user lists is copied."""
    base = tiny_bert()
    model = get_peft_model(copy.deepcopy(base), LorettaRepConfig(r=4, tensor_rank=2, task_type="SEQ_CLS",
                                                                 modules_to_save=["pooler"]))
    pooler = model.get_base_model().bert.pooler  # PEFT's ModulesToSaveWrapper: the trained copy per adapter
    assert isinstance(pooler.modules_to_save["default"].dense, torch.nn.Linear)
    assert torch.equal(pooler.modules_to_save["default"].dense.weight, base.bert.pooler.dense.weight)
    assert all(p.requires_grad for p in pooler.modules_to_save["default"].parameters())
    assert not any(p.requires_grad for p in pooler.original_module.parameters())
