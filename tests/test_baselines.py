"""The papers' baselines: dense (Houlsby / Pfeiffer) adapters, BitFit, and IA3 / prompt / P-tuning / prefix
through PEFT. Outputs at init, exact counts, save -> load, gradients, refusals."""

from __future__ import annotations

import argparse
import copy
import sys

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

from structlora import (AdapterConfig, BitFitConfig, DenseAdapterConfig, LorettaAdpConfig, PeftModel,
                        adapted_layers, get_peft_model)
from structlora.recipes import flags, methods, training

VOCAB, HIDDEN, BOTTLENECK = 97, 32, 8


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(config).eval()


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64)).eval()


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=56, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, VOCAB, (2, 9), generator=generator),
            "attention_mask": torch.ones(2, 9, dtype=torch.long)}


def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(**batch()).logits


def head_size() -> int:
    return HIDDEN * 3 + 3  # BERT's 3-way classifier


def trained_steps(model: torch.nn.Module, steps: int = 3) -> dict[str, torch.Tensor]:
    """A few AdamW steps on a squared-output loss; returns the last gradients of every trainable tensor."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # A small step: larger ones can push every ReLU unit of a tiny adapter negative on this one batch.
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps + 1):
        optimizer.zero_grad()
        logits(model).pow(2).mean().backward()
        grads = {n: p.grad.detach().clone() for n, p in trainable.items() if p.grad is not None}
        optimizer.step()
    model.eval()
    return {n: grads.get(n, torch.zeros(1)) for n in trainable}


# ------------------------------------------------------------------------------------- dense adapters
# (model, placement) -> the modules that get an adapter (Houlsby: attention output and FFN; Pfeiffer: FFN)
DENSE_CASES = {
    ("bert", "houlsby"): (tiny_bert, {f"bert.encoder.layer.{i}.{m}" for i in range(2)
                                     for m in ("attention.output.dense", "output.dense")}),
    ("bert", "pfeiffer"): (tiny_bert, {f"bert.encoder.layer.{i}.output.dense" for i in range(2)}),
    ("llama", "houlsby"): (tiny_llama, {f"model.layers.{i}.{m}" for i in range(2)
                                       for m in ("self_attn.o_proj", "mlp.down_proj")}),
    ("llama", "pfeiffer"): (tiny_llama, {f"model.layers.{i}.mlp.down_proj" for i in range(2)}),
    ("gpt2", "houlsby"): (tiny_gpt2, {f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_proj", "mlp.c_proj")}),
    ("gpt2", "pfeiffer"): (tiny_gpt2, {f"transformer.h.{i}.mlp.c_proj" for i in range(2)}),
}


def dense_config(family: str, placement: str, **kwargs) -> DenseAdapterConfig:
    task = {"task_type": "SEQ_CLS"} if family == "bert" else {}
    return DenseAdapterConfig(bottleneck_size=BOTTLENECK, placement=placement, **task, **kwargs)


@pytest.mark.parametrize("family,placement", list(DENSE_CASES), ids=[f"{f}-{p}" for f, p in DENSE_CASES])
def test_dense_adapter_placement_count_init_and_roundtrip(family, placement, tmp_path):
    build, expected_modules = DENSE_CASES[(family, placement)]
    base = build()
    base_out = logits(base)
    model = get_peft_model(copy.deepcopy(base), dense_config(family, placement)).eval()
    assert {name for name, _ in adapted_layers(model)} == expected_modules
    assert torch.equal(logits(model), base_out)  # up projection zero: the base function at init
    # Each adapter on a HIDDEN-wide output: down (H x b + b) and up (b x H + H); the head for BERT.
    per_adapter = HIDDEN * BOTTLENECK + BOTTLENECK + BOTTLENECK * HIDDEN + HIDDEN
    expected = len(expected_modules) * per_adapter + (head_size() if family == "bert" else 0)
    assert model.get_nb_trainable_parameters()[0] == expected
    grads = trained_steps(model)
    assert all(g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items() if g.abs().sum() == 0]
    adapted = logits(model)
    assert not torch.allclose(adapted, base_out, atol=1e-5)
    model.save_pretrained(tmp_path)
    config = AdapterConfig.from_pretrained(str(tmp_path))
    assert type(config) is DenseAdapterConfig and config.placement == placement and config.method == "adapter"
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert torch.equal(logits(loaded), adapted)
    with loaded.disable_adapter():
        assert torch.equal(logits(loaded), base_out)
    with pytest.raises(ValueError, match="dense adapter"):
        model.merge_and_unload()


def test_dense_adapter_is_plain_linear_and_rejects_tensor_trains():
    model = get_peft_model(tiny_bert(), dense_config("bert", "pfeiffer"))
    layer = dict(adapted_layers(model))["bert.encoder.layer.0.output.dense"]
    assert type(layer.adapters["default"].adapter_down) is torch.nn.Linear
    assert isinstance(DenseAdapterConfig(), LorettaAdpConfig)  # the same bottleneck layer underneath
    with pytest.raises(ValueError, match="placement"):
        DenseAdapterConfig(placement="parallel-ish")
    with pytest.raises(ValueError, match="tensorized"):
        DenseAdapterConfig(tensorized=True)


# ------------------------------------------------------------------------------------------------ BitFit
def test_bitfit_trains_exactly_the_biases_and_the_head(tmp_path):
    base = tiny_bert()
    base_out = logits(base)
    model = get_peft_model(copy.deepcopy(base), BitFitConfig(task_type="SEQ_CLS")).eval()
    assert torch.equal(logits(model), base_out)
    biases = sum(p.numel() for n, p in base.named_parameters() if n.endswith("bias") and not n.startswith("classifier"))
    assert model.get_nb_trainable_parameters()[0] == biases + head_size()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.endswith("bias") or ".classifier.adapters." in n for n in trainable)
    assert not any(".original." in n for n in trainable)  # the frozen head original is not trained
    grads = trained_steps(model)
    assert all(g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items() if g.abs().sum() == 0]
    adapted = logits(model)
    assert not torch.allclose(adapted, base_out, atol=1e-5)
    model.save_pretrained(tmp_path)
    assert type(AdapterConfig.from_pretrained(str(tmp_path))) is BitFitConfig
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert torch.equal(logits(loaded), adapted)
    with pytest.raises(ValueError, match="biases in place"):  # the base biases are gone: refuse, not mislead
        with loaded.disable_adapter():
            pass
    assert torch.equal(logits(loaded.merge_and_unload()), adapted)  # nothing to fold: biases are in place


def test_bitfit_refusals():
    with pytest.raises(ValueError, match="bias must be 'all'"):
        BitFitConfig(bias="none")
    with pytest.raises(ValueError, match="target_modules"):
        BitFitConfig(target_modules=["query"])
    with pytest.raises(ValueError, match="no bias parameters"):
        get_peft_model(tiny_llama(), BitFitConfig())


# --------------------------------------------------------------------------------------- through PEFT
def recipe_args(*argv: str) -> argparse.Namespace:
    parser = flags.RecipeParser()
    methods.add_method_arguments(parser)
    flags.add_training_arguments(parser)
    return parser.parse_flags(argv)


def test_ia3_through_peft_starts_at_the_base_function_and_learns():
    pytest.importorskip("peft")
    base = tiny_bert()
    base_out = logits(base)
    model = methods.wrap_model(copy.deepcopy(base), recipe_args("--method", "ia3"), "SEQ_CLS").eval()
    assert type(model).__module__.startswith("peft")
    assert torch.allclose(logits(model), base_out, atol=1e-6)  # IA3 vectors start at one
    # PEFT's BERT defaults: key, value and output.dense (attention and FFN) scaled; the FFN one on its input.
    ffn_in, per_layer = 48, HIDDEN * 3 + 48
    assert ffn_in and methods.count_trainable_parameters(model, exclude=methods.HEAD_MODULE_NAMES) == 2 * per_layer
    grads = trained_steps(model)
    assert all(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("method,expected", [("prompt", 4 * HIDDEN),
                                             # P-tuning: embedding + MLP encoder (H -> 16 -> 16 -> H)
                                             ("ptuning", 4 * HIDDEN + (HIDDEN * 16 + 16) + (16 * 16 + 16)
                                              + (16 * HIDDEN + HIDDEN))])
def test_prompt_methods_through_peft_count_and_learn(method, expected):
    pytest.importorskip("peft")
    args = recipe_args("--method", method, "--num-virtual-tokens", "4",
                       *(["--encoder-hidden-size", "16"] if method == "ptuning" else []))
    model = methods.wrap_model(tiny_bert(), args, "SEQ_CLS")
    assert methods.count_trainable_parameters(model, exclude=methods.HEAD_MODULE_NAMES) == expected
    assert methods.count_trainable_parameters(model) == expected + head_size()
    grads = trained_steps(model)
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_encoder_hidden_size_reparametrises_the_prefix_and_is_refused_where_unused():
    pytest.importorskip("peft")
    from structlora.recipes import limits, peft_methods

    prefix = peft_methods.build_config(recipe_args("--method", "prefix", "--encoder-hidden-size", "24"), "CAUSAL_LM")
    assert (prefix.prefix_projection, prefix.encoder_hidden_size) == (True, 24)
    assert peft_methods.build_config(recipe_args("--method", "prefix"), "CAUSAL_LM").prefix_projection is False
    assert peft_methods.build_config(recipe_args("--method", "ptuning"), "CAUSAL_LM").encoder_hidden_size == 128
    for method in ("lora", "adapter", "prompt", "full"):
        with pytest.raises(SystemExit, match=f"--encoder-hidden-size is read only by --method prefix, ptuning; "
                                             f"--method {method} would ignore it"):
            methods.build_peft_config(recipe_args("--method", method, "--encoder-hidden-size", "8"), "SEQ_CLS")
    # A zero would otherwise fall back to the method's default (20 tokens, 128 wide) without a word.
    for flag in ("--num-virtual-tokens", "--encoder-hidden-size"):
        with pytest.raises(SystemExit, match=f"{flag} 0: must be an integer >= 1"):
            limits.check_training_flags(recipe_args("--method", "ptuning", flag, "0"))


def test_prefix_refused_where_the_model_takes_no_cache_and_missing_peft(monkeypatch):
    pytest.importorskip("peft")
    with pytest.raises(SystemExit, match="past_key_values"):
        methods.wrap_model(tiny_bert(), recipe_args("--method", "prefix"), "SEQ_CLS")
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    with pytest.raises(SystemExit, match="pip install peft"):
        methods.wrap_model(tiny_bert(), recipe_args("--method", "prompt"), "SEQ_CLS")


def test_recipe_builds_the_baseline_configs():
    adapter = methods.build_peft_config(recipe_args("--method", "adapter", "--adapter-placement", "pfeiffer",
                                                   "--bottleneck-size", "16"), "SEQ_CLS")
    assert type(adapter) is DenseAdapterConfig and (adapter.placement, adapter.bottleneck_size) == ("pfeiffer", 16)
    assert type(methods.build_peft_config(recipe_args("--method", "bitfit"), "SEQ_CLS")) is BitFitConfig
    assert training.default_trainer_class("ia3").__name__ == "GuardedTrainer"  # transformers' Trainer saves PEFT models


@pytest.mark.parametrize("recipe", ["adapter_deberta_base", "bitfit_deberta_base", "ia3_deberta_base",
                                    "prompt_deberta_base", "ptuning_deberta_base", "full_deberta_base",
                                    "full_roberta_base", "bitfit_roberta_base", "adapter_houlsby_roberta_base",
                                    "adapter_pfeiffer_roberta_base"])
def test_baseline_recipe_files_build_their_method(recipe):
    from pathlib import Path

    from structlora.recipes import glue

    parser = flags.RecipeParser()
    glue.add_arguments(parser)
    path = Path(__file__).resolve().parents[1] / "recipes" / "glue" / f"{recipe}.yaml"
    args = parser.parse_flags(["--config", str(path), "--task", "rte"])
    assert args.method == recipe.split("_")[0] and args.lr > 0 and args.model
    config = methods.build_peft_config(args, "SEQ_CLS") if args.method not in ("ia3", "prompt", "ptuning") else None
    if args.method == "adapter":
        assert config.placement == recipe.split("_")[1] if "roberta" in recipe else config.placement == "houlsby"
    if args.method in ("prompt", "ptuning"):
        assert args.num_virtual_tokens == 20
