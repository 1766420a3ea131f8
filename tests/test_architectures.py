"""Default targets and placements work on every architecture we list (tiny random models, all methods)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

from structlora import LoraConfig, LorettaAdpConfig, LorettaRepConfig, MTLoraConfig, adapted_layers, get_peft_model

SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)
DECODER = dict(SMALL, num_key_value_heads=2, max_position_embeddings=32)
ARCHITECTURES = {
    "bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(**SMALL, num_labels=2)),
    "roberta": lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(**SMALL, num_labels=2)),
    "deberta": lambda: tf.DebertaForSequenceClassification(tf.DebertaConfig(**SMALL, num_labels=2)),
    "deberta-v2": lambda: tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(**SMALL, num_labels=2)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4)),
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**DECODER)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**DECODER)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**DECODER)),
    "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**DECODER, head_dim=8)),
    "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                  num_attention_heads=4, ffn_dim=48, word_embed_proj_dim=32)),
}
METHODS = {
    "lora": lambda cls: LoraConfig(r=2, task_type="SEQ_CLS" if cls else None),
    "mtlora": lambda cls: MTLoraConfig(r=2, structure="ctcm", task_type="SEQ_CLS" if cls else None),
    "loretta_rep": lambda cls: LorettaRepConfig(r=2, tensor_rank=2, task_type="SEQ_CLS" if cls else None),
    "loretta_adp": lambda cls: LorettaAdpConfig(bottleneck_size=4, tensor_rank=2, task_type="SEQ_CLS" if cls else None),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_default_targets(arch, method):
    torch.manual_seed(0)
    base = ARCHITECTURES[arch]().eval()
    is_classifier = "SequenceClassification" in type(base).__name__
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    expected = base(input_ids=ids).logits
    model = get_peft_model(copy.deepcopy(base), METHODS[method](is_classifier)).eval()
    layers = list(adapted_layers(model))
    assert len(layers) >= 1
    logits = model(input_ids=ids).logits
    assert logits.shape == expected.shape
    if not is_classifier:  # a classifier's head is new and trainable; everything else starts unchanged
        assert torch.allclose(logits, expected, atol=1e-6)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable > 0
