"""export_to_peft (PEFT loads it, same outputs) and from_loretta (same outputs as the `loretta` package)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, RobertaConfig, RobertaForSequenceClassification

from structlora import (LoraConfig, LorettaAdpConfig, LorettaRepConfig, MTLoraConfig, export_to_peft, from_loretta,
                        get_peft_model)
from test_core import inputs, outputs, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama, tiny_roberta

peft = pytest.importorskip("peft")

EXPORT_CASES = [
    ("lora-bert", tiny_bert, lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])),
    ("mtlora-icfm-roberta-cls", tiny_roberta,
     lambda: MTLoraConfig(r=4, structure="icfm", task_type="SEQ_CLS", target_modules=["query", "value"])),
    ("mtlora-dtsm-gpt2-fused", tiny_gpt2,
     lambda: MTLoraConfig(r=2, lora_alpha=8, structure="dtsm", target_modules=["c_attn", "c_fc"],
                          enable_lora={"c_attn": [True, False, True]})),
    ("mtlora-ctcm-embedding", tiny_llama, lambda: MTLoraConfig(r=4, structure="ctcm", target_modules=["embed_tokens", "v_proj"])),
    ("loretta-rep-llama-norms", tiny_llama, lambda: LorettaRepConfig(r=4, tensor_rank=3)),
    ("loretta-rep-roberta-tt-head", tiny_roberta, lambda: LorettaRepConfig(r=4, tensor_rank=3, task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("case_id,build,make_config", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_export_to_peft_gives_the_same_outputs(case_id, build, make_config, tmp_path):
    base = build()
    model = get_peft_model(copy.deepcopy(base), make_config()).eval()
    randomize_adapters(model)
    expected = outputs(model, "logits")
    export_to_peft(model, str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert torch.allclose(outputs(loaded, "logits"), expected, atol=1e-5)


def test_export_refuses_bottleneck_adapters(tmp_path):
    model = get_peft_model(tiny_llama(), LorettaAdpConfig(bottleneck_size=8, tensor_rank=2))
    with pytest.raises(ValueError, match="non-linearity"):
        export_to_peft(model, str(tmp_path))
    with pytest.raises(ValueError, match="bottleneck adapter .* cannot be merged"):
        model.merge_and_unload()


# -- the authors' package -------------------------------------------------------------------------------------

loretta = pytest.importorskip("loretta")


def reference_roberta() -> torch.nn.Module:
    # The reference's shape tables start at hidden 768, so the parity model has that width (one layer).
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=100, hidden_size=768, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=40, num_labels=3)
    return RobertaForSequenceClassification(config).eval()


def reference_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=768, intermediate_size=768, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=40)
    return LlamaForCausalLM(config).eval()


def ids() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(5))}


REFERENCE_CASES = [
    ("rep-roberta-cls", reference_roberta,
     lambda: loretta.LorettaRepConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0,
                                      bias="none", task_type="SEQ_CLS", tensor_rank=5)),
    ("adp-roberta-cls", reference_roberta,
     lambda: loretta.LorettaAdpConfig(bottleneck_size=64, non_linearity="relu", adapter_dropout=0.0, scaling=1.0,
                                      bias="none", task_type="SEQ_CLS", tensor_rank=5)),
    ("adp-llama", reference_llama,
     lambda: loretta.LorettaAdpConfig(bottleneck_size=64, non_linearity="relu", target_modules=None, scaling=1.0,
                                      bias="none", task_type="CAUSAL_LM", tensor_rank=5)),
    ("rep-llama", reference_llama,
     lambda: loretta.LorettaRepConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.05,
                                      bias="none", task_type="CAUSAL_LM", tensor_rank=8)),
]


@pytest.mark.parametrize("case_id,build,make_config", REFERENCE_CASES, ids=[c[0] for c in REFERENCE_CASES])
def test_from_loretta_matches_the_reference_package(case_id, build, make_config, tmp_path, capsys):
    base = build()
    reference = loretta.get_peft_model(copy.deepcopy(base), make_config()).eval()
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if "factors" in name or "adapter_" in name:  # make B non-zero: the comparison is then meaningful
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(len(name))))
        expected = reference(**ids()).logits
    reference.save_pretrained(str(tmp_path))
    ours = from_loretta(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.allclose(ours(**ids()).logits, expected, atol=1e-5)


def test_from_loretta_returns_a_peft_model_and_a_failed_load_leaves_the_base(tmp_path):
    """from_loretta gives structlora.PeftModel (a peft.PeftModel), frozen unless is_trainable; a folder lacking one
    adapter tensor is refused after the injection, which is then taken back out: the base is as it was."""
    import structlora
    from safetensors.torch import load_file, save_file

    base = reference_llama()
    reference = loretta.get_peft_model(copy.deepcopy(base), REFERENCE_CASES[3][2]())
    reference.save_pretrained(str(tmp_path / "full"))
    ours = from_loretta(copy.deepcopy(base), str(tmp_path / "full"))
    assert isinstance(ours, structlora.PeftModel) and isinstance(ours, peft.PeftModel) and not ours.training
    assert not any(p.requires_grad for p in ours.parameters())
    trainable = from_loretta(copy.deepcopy(base), str(tmp_path / "full"), is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, p in get_peft_model(copy.deepcopy(base), LorettaRepConfig(
            r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], tensor_rank=8)).named_parameters()
        if p.requires_grad}
    files = sorted((tmp_path / "full").iterdir())
    weights = next(f for f in files if f.name.startswith("adapter_model"))
    tensors = load_file(str(weights)) if weights.suffix == ".safetensors" else torch.load(weights, weights_only=True)
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "adapter_config.json").write_text((tmp_path / "full" / "adapter_config.json").read_text())
    dropped = sorted(k for k in tensors if "lora_B" in k)[0]
    save_file({k: v.contiguous() for k, v in tensors.items() if k != dropped},
              str(tmp_path / "partial" / "adapter_model.safetensors"))
    modules = [(n, type(m)) for n, m in base.named_modules()]
    flags = [(n, p.requires_grad) for n, p in base.named_parameters()]
    with pytest.raises(ValueError, match=r"lacks 1 adapter tensor"):
        from_loretta(base, str(tmp_path / "partial"))
    assert [(n, type(m)) for n, m in base.named_modules()] == modules
    assert [(n, p.requires_grad) for n, p in base.named_parameters()] == flags


def test_loretta_quick_start_runs_after_changing_only_the_import(capsys):
    """The two snippets of the `loretta` README, with `from structlora import …`."""
    from structlora import LorettaAdpConfig, LorettaRepConfig, TaskType, get_peft_model  # noqa: F401

    peft_config = LorettaAdpConfig(bottleneck_size=64, non_linearity="relu", adapter_dropout=0.0,
                                   target_modules=None, scaling=1.0, bias="none", task_type="CAUSAL_LM",
                                   tensor_rank=5)
    model = get_peft_model(tiny_llama(), peft_config)
    model.print_trainable_parameters()
    peft_config = LorettaRepConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05,
                                   bias="none", task_type="CAUSAL_LM", tensor_rank=5)
    model = get_peft_model(tiny_llama(), peft_config)
    model.print_trainable_parameters()
    assert capsys.readouterr().out.count("trainable params") == 2
