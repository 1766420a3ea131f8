"""Each recipe file, built on the meta device (no weights), trains exactly the parameters the authors'
run (or the paper) trains. Configs are the published architectures' config values."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from structlora.recipes import adapter_model, flags, glue, llm, methods, nlg

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def recipe_args(module, path: Path, *argv: str) -> argparse.Namespace:
    parser = flags.RecipeParser()
    module.add_arguments(parser)
    return parser.parse_flags(["--config", str(path), *argv])


def trained_count(model: torch.nn.Module, args: argparse.Namespace, task_type: str, enable_lora=None) -> int:
    config = methods.build_peft_config(args, task_type)
    if enable_lora is not None:
        config.enable_lora = enable_lora
    return methods.count_trainable_parameters(adapter_model.wrap_model(model, config))


def roberta_base(num_labels: int):
    from transformers import AutoModelForSequenceClassification, RobertaConfig

    config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, num_labels=num_labels)
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)


@pytest.mark.parametrize("structure,expected", [("shim", 1_627_394), ("icfm", 1_627_394),
                                                ("ctcm", 1_630_466), ("dtsm", 1_630_466)])
def test_glue_mtlora_roberta_base_count(structure, expected):
    args = recipe_args(glue, RECIPES / "glue" / "mtlora_roberta_base_sst2.yaml", "--structure", structure)
    assert trained_count(roberta_base(2), args, "SEQ_CLS") == expected


def test_glue_mtlora_adapts_the_ffn_output_but_not_the_attention_output():
    args = recipe_args(glue, RECIPES / "glue" / "mtlora_roberta_base_rte.yaml")
    model = adapter_model.wrap_model(roberta_base(2), methods.build_peft_config(args, "SEQ_CLS"))
    adapted = {name.split(".layer.0.", 1)[1].split(".adapters.", 1)[0] for name, p in model.named_parameters()
               if p.requires_grad and ".layer.0." in name}
    assert adapted == {"attention.self.query", "attention.self.value", "intermediate.dense", "output.dense"}


def test_nlg_mtlora_gpt2_medium_count():
    from transformers import GPT2Config, GPT2LMHeadModel

    args = recipe_args(nlg, RECIPES / "nlg" / "mtlora_gpt2.yaml", "--dataset", "e2e", "--model", "gpt2-medium")
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_embd=1024, n_layer=24, n_head=16))
    assert trained_count(model, args, "CAUSAL_LM", nlg._parse_enable_lora(args.enable_lora)) == 1_085_184


def test_nlg_recipe_enable_lora_can_be_unset_from_the_command_line():
    recipe = RECIPES / "nlg" / "mtlora_gpt2.yaml"
    args = recipe_args(nlg, recipe, "--dataset", "e2e", "--model", "gpt2-medium")
    assert nlg._parse_enable_lora(args.enable_lora) == {"c_attn": [True, True, True]}
    for unset in ("none", "default"):
        args = recipe_args(nlg, recipe, "--dataset", "e2e", "--model", "gpt2-medium", "--enable-lora", unset)
        assert nlg._parse_enable_lora(args.enable_lora) is None
    args = recipe_args(nlg, recipe, "--dataset", "e2e", "--model", "gpt2-medium", "--enable-lora", "c_attn=1,0,1")
    assert nlg._parse_enable_lora(args.enable_lora) == {"c_attn": [True, False, True]}


def llama_2_7b():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("recipe,expected", [("loretta-adp.yaml", 876_800), ("loretta-rep.yaml", 516_096)])
def test_llm_loretta_llama_2_7b_counts(recipe, expected):
    args = recipe_args(llm, RECIPES / "llm" / recipe, "--task", "RTE", "--model", "meta-llama/Llama-2-7b-hf")
    assert trained_count(llama_2_7b(), args, "CAUSAL_LM") == expected


def test_glue_loretta_adp_deberta_base_count():
    from transformers import AutoModelForSequenceClassification, DebertaConfig

    args = recipe_args(glue, RECIPES / "glue" / "loretta_adp_deberta_base.yaml", "--task", "sst2")
    config = DebertaConfig(vocab_size=50265, relative_attention=True, max_relative_positions=-1,
                           position_biased_input=False, pos_att_type=["c2p", "p2c"], num_labels=2)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    assert trained_count(model, args, "SEQ_CLS") == 99_194


def gpt2_medium():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config(n_embd=1024, n_layer=24, n_head=16))


# GPT-2 medium: width 1024, 24 blocks; Li & Liang's prefix of 10 tokens reparametrised through a 512-wide MLP,
# their adapters of width 100 (one per block after the FFN, or two: after attention and after the FFN).
WIDTH, BLOCKS, ADAPTER = 1024, 24, 1024 * 100 + 100 + 100 * 1024 + 1024


@pytest.mark.parametrize("recipe,expected", [
    ("full_gpt2.yaml", 354_823_168),  # every GPT-2 medium weight (the embedding tied to the LM head, counted once)
    ("prefix_gpt2.yaml", 10 * WIDTH + (WIDTH * 512 + 512) + (512 * BLOCKS * 2 * WIDTH + BLOCKS * 2 * WIDTH)),
    ("adapter_houlsby_gpt2.yaml", 2 * BLOCKS * ADAPTER),
    ("adapter_pfeiffer_gpt2.yaml", BLOCKS * ADAPTER),
])
def test_nlg_gpt2_medium_baseline_counts(recipe, expected):
    pytest.importorskip("peft")
    args = recipe_args(nlg, RECIPES / "nlg" / recipe, "--dataset", "e2e", "--model", "gpt2-medium")
    model = methods.wrap_model(gpt2_medium(), args, "CAUSAL_LM")
    assert methods.count_trainable_parameters(model) == expected
