"""LeanRMSNorm: the trainable copy of Llama-style RMSNorms computes the same function as transformers' module,
keeps less for the backward, and is what LoRETTA's train_norms puts in a Llama."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from structlora import LorettaRepConfig, get_peft_model
from structlora.layers import TrainableCopy
from structlora.norms import LLAMA_STYLE_RMSNORMS, LeanRMSNorm, lean_norm_copy


def transformers_norm_class(class_name: str) -> type[nn.Module] | None:
    """The installed transformers class of that name (its model folder derives from the name), or None."""
    family = class_name.removesuffix("RMSNorm")
    module_name = "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(family))
    for candidate in (module_name, family.lower()):
        try:
            module = importlib.import_module(f"transformers.models.{candidate}.modeling_{candidate}")
        except ImportError:
            continue
        return getattr(module, class_name, None)
    return None


def outputs_and_grads(norm: nn.Module, x: torch.Tensor, grad_out: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    out = norm(x)
    out.backward(grad_out)
    return out.detach(), x.grad, norm.weight.grad


@pytest.mark.parametrize("class_name", sorted(LLAMA_STYLE_RMSNORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_norm_equals_the_transformers_norm(class_name: str, dtype: torch.dtype) -> None:
    norm_class = transformers_norm_class(class_name)
    if norm_class is None:
        pytest.skip(f"{class_name} is not in this transformers version")
    torch.manual_seed(0)
    original = norm_class(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        original.weight.normal_(1.0, 0.3)
    lean = lean_norm_copy(original)
    assert isinstance(lean, LeanRMSNorm)
    x = (torch.randn(3, 7, 48) * 2.5).to(dtype)
    grad_out = torch.randn(3, 7, 48).to(dtype)
    expected, got = outputs_and_grads(original, x, grad_out), outputs_and_grads(lean, x, grad_out)
    assert torch.equal(got[0], expected[0])  # the forward is the same ops in the same order
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, mine, theirs in zip(("input grad", "weight grad"), got[1:], expected[1:]):
        assert mine.dtype == theirs.dtype, name
        assert torch.allclose(mine.float(), theirs.float(), **tolerance), name
        assert mine.abs().sum() > 0, name


def test_other_norms_keep_an_exact_copy() -> None:
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    # Gemma scales by (1 + w) and LayerNorm has a bias: different functions, so no lean copy.
    assert lean_norm_copy(GemmaRMSNorm(16)) is None
    assert lean_norm_copy(nn.LayerNorm(16)) is None


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    sizes: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if tensor is not module.weight:
            sizes.setdefault(storage._cdata, storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(x.requires_grad_(True))
    return sum(sizes.values())


def test_lean_norm_saves_only_the_input_and_the_rms() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    original = LlamaRMSNorm(64).to(torch.bfloat16)
    x = torch.randn(4, 32, 64, dtype=torch.bfloat16)
    input_bytes, rms_bytes = x.numel() * 2, 4 * 32 * 4  # bf16 input, one fp32 value per token
    assert saved_bytes(lean_norm_copy(original), x.clone()) == input_bytes + rms_bytes
    original.weight.requires_grad_(True)  # what a plain trainable copy keeps: an fp32 input and a bf16 output
    assert saved_bytes(original, x.clone()) == 2 * input_bytes + input_bytes + rms_bytes


def test_loretta_trains_lean_norms_in_a_llama_and_they_learn() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, vocab_size=64))
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = get_peft_model(base, LorettaRepConfig(r=4, tensor_rank=3, target_modules=["q_proj", "v_proj"]))
    copies = [m for m in model.modules() if isinstance(m, TrainableCopy)]
    assert len(copies) == 2 * 2 + 1  # two norms per layer and the final one
    assert all(isinstance(c.adapters["default"], LeanRMSNorm) for c in copies)
    assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-6)  # zero update, same norms
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(c.adapters["default"].weight.grad.abs().sum() > 0 for c in copies)


def test_lean_norm_compiles_without_graph_breaks() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    lean = lean_norm_copy(LlamaRMSNorm(16))
    x = torch.randn(3, 5, 16)
    expected_out, expected_grad_x, _ = outputs_and_grads(lean, x, torch.ones(3, 5, 16))
    lean.weight.grad = None
    compiled = torch.compile(lean, backend="aot_eager", fullgraph=True)  # fullgraph: a break is an error
    out, grad_x, grad_weight = outputs_and_grads(compiled, x, torch.ones(3, 5, 16))
    assert torch.allclose(out, expected_out, atol=1e-6) and torch.allclose(grad_x, expected_grad_x, atol=1e-6)
    assert grad_weight is not None and grad_weight.abs().sum() > 0
