"""Quantized bases (bitsandbytes 4-bit nf4/fp4/double quant and 8-bit, torchao int8 weight-only) on CPU, for
every method: the adapter adds to the quantized layer's output what it adds on the dequantized weights, trains
in fp32 while the quantized weights stay as they are, merging refuses, and the dequantized merge is exact."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from structlora import LoraConfig, LorettaAdpConfig, LorettaRepConfig, MTLoraConfig, get_peft_model  # noqa: E402
from structlora.quantized import (dequantize_model, is_quantized, merge_and_unload_dequantized,  # noqa: E402
                                  prepare_model_for_kbit_training)
from tiny_models import tiny_llama_for, tiny_word_tokenizer  # noqa: E402

METHODS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8),
    "mtlora": lambda: MTLoraConfig(r=4, lora_alpha=8, structure="icfm"),
    "loretta_rep": lambda: LorettaRepConfig(r=4, tensor_rank=2),
    "loretta_adp": lambda: LorettaAdpConfig(bottleneck_size=8, tensor_rank=2),
}
QUANTIZATIONS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4-double-quant": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama_for(tiny_word_tokenizer(), hidden_size=64, intermediate_size=128).save_pretrained(folder)
    return folder


def _load(folder, quantization: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    options = dict(QUANTIZATIONS[quantization])
    if options.get("load_in_4bit"):
        options["bnb_4bit_compute_dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**options),
                                                 device_map="cpu", dtype=dtype)
    # Training mode (the tiny model has no dropout): in eval mode bitsandbytes repacks 4-bit weights at the first
    # no-grad forward for an AVX512-BF16 CPU kernel that rounds through bf16 (about 1e-2 on these logits).
    return model.train()


def _randomize_adapter(model) -> None:
    """Non-zero updates everywhere (a fresh adapter adds nothing, which would test nothing)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and ".adapters." in name and "norm" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def _ids(vocab: int = 60) -> torch.Tensor:
    return torch.randint(4, vocab, (2, 7), generator=torch.Generator().manual_seed(3))


def _quantized_bytes(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.dtype.is_floating_point}


# 4-bit layers compute with the dequantized weight: equal to rounding. 8-bit layers also quantize the
# activations (LLM.int8()), so the quantized and dequantized models differ by that rounding, adapter or not.
TOLERANCE = {"nf4": 1e-4, "fp4": 1e-4, "nf4-double-quant": 1e-4, "int8": 5e-2}


@pytest.mark.parametrize("quantization", list(QUANTIZATIONS))
@pytest.mark.parametrize("method", list(METHODS))
def test_adapter_on_quantized_base_equals_dequantized(tiny_folder, quantization, method):
    model = get_peft_model(_load(tiny_folder, quantization), METHODS[method]())
    assert sum(is_quantized(m.base_layer) for m in model.modules() if hasattr(m, "base_layer")) > 0
    _randomize_adapter(model)
    ids = _ids()
    with torch.no_grad():
        quantized = model(ids).logits
        with model.disable_adapter():
            quantized_base = model(ids).logits
    dequantize_model(model.get_base_model())
    assert not any(is_quantized(m) for m in model.modules())
    with torch.no_grad():
        dequantized = model(ids).logits
        with model.disable_adapter():
            dequantized_base = model(ids).logits
    assert (quantized - quantized_base).abs().max() > 1e-3  # the adapter does change the output
    tolerance = TOLERANCE[quantization]
    torch.testing.assert_close(quantized, dequantized, rtol=0, atol=tolerance)
    torch.testing.assert_close(quantized_base, dequantized_base, rtol=0, atol=tolerance)


@pytest.mark.parametrize("quantization", ["nf4-double-quant", "int8"])
@pytest.mark.parametrize("method", list(METHODS))
def test_training_on_quantized_base_updates_fp32_adapter_only(tiny_folder, quantization, method):
    model = get_peft_model(_load(tiny_folder, quantization), METHODS[method]())
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    frozen = _quantized_bytes(model)
    assert frozen
    before = [p.detach().clone() for p in trained]
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    ids = _ids()
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert sum(not torch.equal(b, p) for b, p in zip(before, trained)) > len(trained) // 2
    for name, tensor in _quantized_bytes(model).items():
        assert torch.equal(tensor, frozen[name]), f"quantized weight {name} changed"


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_merge_refuses_and_dequantized_merge_is_exact(tiny_folder, quantization, tmp_path):
    model = get_peft_model(_load(tiny_folder, quantization), METHODS["loretta_rep"]())
    _randomize_adapter(model)
    frozen = _quantized_bytes(model)
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match="re-quantize W"):
            merge()
    for name, tensor in _quantized_bytes(model).items():
        assert torch.equal(tensor, frozen[name])
    ids = _ids()
    with torch.no_grad():
        adapted = model(ids).logits
    merged = merge_and_unload_dequantized(model)
    assert not any(is_quantized(m) for m in merged.modules())
    with torch.no_grad():
        # 4-bit: the quantized layer computes with its dequantized weight; 8-bit: activations are rounded too.
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=0, atol=TOLERANCE[quantization])
        merged_logits = merged(ids).logits
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain transformers, no quantization
    assert getattr(reloaded.config, "quantization_config", None) is None
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, merged_logits, rtol=0, atol=1e-6)


def _quantized_layout(model) -> list[tuple[str, str]]:
    return [(name, type(module).__name__) for name, module in model.named_modules() if is_quantized(module)]


@pytest.mark.parametrize("case", ["loretta_adp", "nan_lora"])
def test_a_refused_dequantized_merge_changes_nothing(tiny_folder, case):
    """LoRETTA_adp cannot be merged: refused before any layer is dequantized. A NaN LoRA is refused by the merge,
    after dequantizing: the quantized layers and markers are put back."""
    model = get_peft_model(_load(tiny_folder, "nf4"), METHODS["loretta_adp" if case == "loretta_adp" else "lora"]())
    _randomize_adapter(model)
    if case == "nan_lora":
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    layout, frozen = _quantized_layout(model), _quantized_bytes(model)
    assert len(layout) == 14
    config = model.get_base_model().config.quantization_config
    with pytest.raises(ValueError, match="not possible for LoRETTA_adp" if case == "loretta_adp" else "not finite"):
        merge_and_unload_dequantized(model)
    assert _quantized_layout(model) == layout
    for name, tensor in _quantized_bytes(model).items():
        assert torch.equal(tensor, frozen[name]), name
    base = model.get_base_model()
    assert base.config.quantization_config is config and base.is_loaded_in_4bit
    assert not model.adapter_state.merged and not model.adapter_state.unloaded
    with torch.no_grad():
        assert model(_ids()).logits.shape[0] == 2  # still runs on the quantized base


def test_prepare_model_for_kbit_training_is_peft_s(tiny_folder):
    peft = pytest.importorskip("peft")
    assert prepare_model_for_kbit_training is peft.prepare_model_for_kbit_training  # re-exported, not a copy
    ours = prepare_model_for_kbit_training(_load(tiny_folder, "nf4", torch.bfloat16))
    assert ours.model.norm.weight.dtype == torch.float32 and ours.lm_head.weight.dtype == torch.float32
    assert ours.is_gradient_checkpointing
    # Re-exported lazily: importing structlora.quantized alone does not import peft (seconds).
    import subprocess
    import sys
    code = "import sys, structlora.quantized as q\nassert 'peft' not in sys.modules\nq.prepare_model_for_kbit_training"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
    # Checkpointed layers with a frozen input still train the adapter (and the trained norms).
    model = get_peft_model(ours, METHODS["loretta_rep"]())
    model.train()
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "norm" in n)


@pytest.mark.parametrize("method", list(METHODS))
def test_torchao_int8_weight_only(method):
    torchao = pytest.importorskip("torchao.quantization")
    model = tiny_llama_for(tiny_word_tokenizer(), hidden_size=64, intermediate_size=128)
    torchao.quantize_(model, torchao.Int8WeightOnlyConfig())
    model = get_peft_model(model, METHODS[method]())
    assert sum(is_quantized(m.base_layer) for m in model.modules() if hasattr(m, "base_layer")) > 0
    _randomize_adapter(model)
    ids = _ids()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        quantized = model(ids).logits
        dequantize_model(model.get_base_model())
        torch.testing.assert_close(model(ids).logits, quantized, rtol=0, atol=1e-3)
